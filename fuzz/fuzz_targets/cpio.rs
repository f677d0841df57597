//! The cpio (newc) reader (initrds).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = kiln_formats::cpio::read(data);
    let _ = kiln_formats::cpio::dump(data);
});
