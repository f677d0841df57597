//! A tar stream read once (the path for stdin and compressed sources): every entry's data goes
//! to a placer that counts it. Input bounded by a limit, as writers bound it.
#![no_main]

use std::io::Read;

use kiln_formats::fstree::{FileData, Placer};
use libfuzzer_sys::fuzz_target;

struct Count(u32);

impl Placer for Count {
    fn place(&mut self, _file: &FileData, data: &mut dyn Read) -> std::io::Result<u32> {
        std::io::copy(data, &mut std::io::sink())?;
        self.0 += 1;
        Ok(self.0 - 1)
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = kiln_tree::tar::TarStream::from_reader(std::io::Cursor::new(data.to_vec()), "fuzz")
    else {
        return;
    };
    let _ = s.with_limit(1 << 24).read(&mut Count(0));
});
