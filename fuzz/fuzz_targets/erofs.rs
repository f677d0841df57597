//! The EROFS reader: the dump, then a bounded walk that reads every file.
#![no_main]

use kiln_formats::erofs::{dump, Image};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(img) = Image::open(data) else {
        return;
    };
    let _ = dump::dump(&img, 200);
    let Ok(root) = img.root() else {
        return;
    };
    let mut todo = vec![root];
    let mut seen = 0;
    while let Some(dir) = todo.pop() {
        let Ok(entries) = img.read_dir(&dir) else {
            continue;
        };
        for e in entries {
            seen += 1;
            if seen > 256 || e.name == b"." || e.name == b".." {
                continue;
            }
            if let Ok(i) = img.inode(e.nid) {
                if e.file_type == 2 {
                    todo.push(i);
                } else {
                    let _ = img.read_all(&i);
                }
            }
        }
    }
});
