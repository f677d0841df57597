//! The PE reader (the UKI stub, kernels).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(pe) = kiln_formats::pe::Pe::parse(data, "fuzz") {
        let _ = pe.dump();
    }
});
