//! The ISO 9660 reader (ISO slots, inspect): the dump, both trees, every file.
#![no_main]

use kiln_formats::iso9660::{dump, reader::IsoImage, reader::TreeKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let len = data.len() as u64;
    let _ = dump::dump(&data, len);
    let Ok(img) = IsoImage::open(&data, len) else {
        return;
    };
    for kind in [TreeKind::Primary, TreeKind::Joliet] {
        if let Ok(entries) = img.entries(&data, kind) {
            for e in entries.iter().take(64) {
                let _ = img.read_file(&data, e);
            }
        }
    }
});
