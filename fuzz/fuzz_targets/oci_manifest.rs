//! An OCI manifest or index as a registry sends it: parsed, and every layer title checked as
//! `kiln pull` checks it before writing.
#![no_main]

use kiln_ship::oci::{check_title, Index, Manifest, ANN_TITLE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = serde_json::from_slice::<Manifest>(data) {
        for l in &m.layers {
            if let Some(t) = l.annotation(ANN_TITLE) {
                let _ = check_title(t);
            }
            let _ = kiln_ship::digest::oci_hex(&l.digest);
        }
    }
    let _ = serde_json::from_slice::<Index>(data);
});
