//! gzip, xz and zstd framing around a tar stream: the first input byte picks the format, the
//! rest is the compressed stream after that format's magic number, so the fuzzer spends no
//! time rediscovering magic numbers.
#![no_main]

use std::io::Read;

use kiln_formats::fstree::{FileData, Placer};
use libfuzzer_sys::fuzz_target;

struct Sink;

impl Placer for Sink {
    fn place(&mut self, _file: &FileData, data: &mut dyn Read) -> std::io::Result<u32> {
        std::io::copy(data, &mut std::io::sink())?;
        Ok(0)
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let magic: &[u8] = match which % 3 {
        0 => &[0x1f, 0x8b],
        1 => &[0xfd, b'7', b'z', b'X', b'Z', 0],
        _ => &[0x28, 0xb5, 0x2f, 0xfd],
    };
    let mut input = magic.to_vec();
    input.extend_from_slice(rest);
    let Ok(s) = kiln_tree::tar::TarStream::from_reader(std::io::Cursor::new(input), "fuzz") else {
        return;
    };
    let _ = s.with_limit(1 << 24).read(&mut Sink);
});
