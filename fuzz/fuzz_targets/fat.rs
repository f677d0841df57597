//! The FAT reader (ESP updates, FAT slots): open, walk, read every file.
#![no_main]

use kiln_formats::fat::FatReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let read = |off: u64, buf: &mut [u8]| kiln_formats::io::ReadAt::read_at(data, off, buf);
    let Ok(r) = FatReader::open(read) else {
        return;
    };
    if let Ok(all) = r.walk() {
        for (path, _) in all.iter().take(64) {
            let _ = r.read_file(path);
        }
    }
});
