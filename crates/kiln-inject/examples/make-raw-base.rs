//! Writes a demo base image with one raw slot, for trying `kiln inject` and `kiln serve`
//! before a filesystem writer provides real slots:
//!
//! ```sh
//! cargo run --release -p kiln-inject --example make-raw-base -- out/demo.img [SIZE_MIB]
//! ```
//!
//! Layout: pseudo-random filler (deterministic), the slot table at 24576, a little-endian u32
//! size field at 1 MiB - 8 and an 8 MiB data area at 1 MiB holding a default "loading" page.
//! The chunk table sidecar (IMAGE.chunks) is written too.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use kiln_inject::slots::{ByteRange, PayloadInfo, RawMeta, SizeField, Slot, SlotMeta, SlotTable};
use kiln_inject::{ChunkTable, FileSource};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(args.next().ok_or("usage: make-raw-base OUT [SIZE_MIB]")?);
    let mib: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(64);
    let len = mib.max(16) << 20;
    if let Some(d) = out.parent() {
        std::fs::create_dir_all(d)?;
    }
    let f = File::create(&out)?;
    // xorshift filler: deterministic, incompressible enough to make downloads honest.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; 1 << 20];
    for block in 0..(len >> 20) {
        for c in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all_at(&buf, block << 20)?;
    }
    let default = b"<!doctype html><title>loading</title><p>loading\xe2\x80\xa6</p>\n";
    let data = 1u64 << 20;
    let cap = 8u64 << 20;
    f.write_all_at(&(default.len() as u32).to_le_bytes(), data - 8)?;
    f.write_all_at(default, data)?;
    f.write_all_at(
        &vec![0u8; (cap as usize) - default.len()],
        data + default.len() as u64,
    )?;
    let table = SlotTable {
        image_len: len,
        slots: vec![Slot {
            name: "piece".into(),
            path: String::new(),
            capacity: cap,
            data: vec![ByteRange {
                offset: data,
                len: cap,
            }],
            meta: SlotMeta::Raw(RawMeta {
                size_fields: vec![SizeField {
                    offset: data - 8,
                    width: 4,
                }],
            }),
            default: PayloadInfo::of(default),
        }],
    };
    table.write_into(&f, &out.display().to_string())?;
    f.sync_all()?;
    drop(f);
    let chunks = ChunkTable::compute_resumable(&FileSource::open(&out)?, &table.resume_points())?;
    let mut side = out.as_os_str().to_owned();
    side.push(".chunks");
    File::create(PathBuf::from(side))?.write_all(&chunks.to_bytes())?;
    println!("{} ({len} bytes), {}", out.display(), chunks.digest());
    Ok(())
}
