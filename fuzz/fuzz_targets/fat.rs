//! The FAT reader (ESP updates, FAT slots): open, walk, read every file.
#![no_main]

use kiln_formats::fat::FatReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(r) = FatReader::open(data) else {
        return;
    };
    if let Ok(all) = r.walk() {
        for (path, _) in all.iter().take(64) {
            let _ = r.read_file(path);
        }
    }
});
