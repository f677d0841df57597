//! The GPT reader (inspect, update, kiln-init, the slot bounds check).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = kiln_formats::gpt::Gpt::from_bytes(data) {
        let _ = g.dump();
        let _ = g.validate();
    }
});
