//! The chunk table sidecar (`IMAGE.chunks`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = kiln_inject::ChunkTable::from_bytes(data, "fuzz") {
        let _ = t.digest();
        let _ = t.to_bytes();
    }
});
