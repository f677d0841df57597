//! The ext4 reader (injection checks, round trips): superblock, the tree dump, every inode's
//! data.
#![no_main]

use kiln_formats::ext4::{dump, reader::Reader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(r) = Reader::open(data) else {
        return;
    };
    let _ = dump::superblock(&r);
    let _ = dump::tree(&r);
    for ino in 1..32 {
        let _ = dump::inode(&r, ino);
        let _ = r.read_data(ino);
        let _ = r.dir_entries(ino);
    }
});
