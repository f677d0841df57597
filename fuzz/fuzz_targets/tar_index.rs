//! An uncompressed tar file indexed by offset (the path for plain tar files).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = kiln_tree::tar::index(std::io::Cursor::new(data), data.len() as u64);
});
