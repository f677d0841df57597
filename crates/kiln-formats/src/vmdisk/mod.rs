//! VM disk containers written from a raw disk layout: qcow2 v3 (`qcow2`), VHD fixed and dynamic
//! (`vhd`) and VMDK streamOptimized (`vmdk`). Each module has the on-disk structures, a writer,
//! a reader (round trips, fuzzing, `kiln convert` checks) and a dump.
//!
//! The writers stream: they read the raw image cluster by cluster through [`ReadAt`], skip the
//! ranges the caller knows to be holes (`SEEK_DATA`/`SEEK_HOLE` of the raw file) and test the
//! rest for zeroes on the fly, so no image is ever held in memory; the bookkeeping they keep is
//! one table entry per allocated cluster. Compression runs on a batch of clusters at a time in
//! parallel, and the results are written in cluster order, so the bytes do not depend on the
//! thread count. Nothing time- or host-dependent goes into an output: timestamps and
//! identifiers come from the caller.

use std::io;

use rayon::prelude::*;

use crate::io::ReadAt;

pub mod qcow2;
pub mod vhd;
pub mod vmdk;

/// Errors of the VM disk writers and readers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading the raw image or writing the container failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// A container is malformed.
    #[error("{format}: {what} (at byte offset {offset})")]
    Corrupt {
        /// `qcow2`, `vhd` or `vmdk`.
        format: &'static str,
        /// Where the bad structure starts.
        offset: u64,
        /// What is wrong.
        what: String,
    },
    /// A valid container that uses a feature these readers do not implement.
    #[error("{format}: unsupported: {what}")]
    Unsupported {
        /// `qcow2`, `vhd` or `vmdk`.
        format: &'static str,
        /// The feature.
        what: String,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn corrupt(format: &'static str, offset: u64, what: impl Into<String>) -> Error {
    Error::Corrupt {
        format,
        offset,
        what: what.into(),
    }
}

/// How compressed clusters are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (qcow2: a 4 KiB window, as QEMU inflates it; VMDK: a zlib stream).
    Zlib,
    /// One zstd frame per cluster (qcow2 compression type 1).
    Zstd,
}

impl Compression {
    /// The name the spec and the CLI use.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }
}

/// The raw disk a container is written from.
pub struct Raw<'a> {
    /// The raw bytes (reads past `size` are never made).
    pub data: &'a dyn ReadAt,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// The ranges that may hold data, sorted and disjoint; everything else reads as zeroes.
    /// `None`: all of it may.
    pub runs: Option<Vec<(u64, u64)>>,
}

impl Raw<'_> {
    /// The indices of the `chunk`-sized pieces that may hold data, ascending.
    pub(crate) fn candidate_chunks(&self, chunk: u64) -> Vec<u64> {
        let n = self.size.div_ceil(chunk);
        match &self.runs {
            None => (0..n).collect(),
            Some(runs) => {
                let mut out: Vec<u64> = Vec::new();
                for &(off, len) in runs {
                    if len == 0 || off >= self.size {
                        continue;
                    }
                    let end = (off + len).min(self.size);
                    let first = off / chunk;
                    let last = (end - 1) / chunk;
                    let start = match out.last() {
                        Some(&l) if l >= first => l + 1,
                        _ => first,
                    };
                    out.extend(start..=last);
                }
                out
            }
        }
    }

    /// Chunk `index` (`chunk` bytes, zero-padded past the end of the disk), or `None` if it is
    /// all zeroes.
    pub(crate) fn read_chunk(&self, index: u64, chunk: u64) -> io::Result<Option<Vec<u8>>> {
        let off = index * chunk;
        let mut buf = vec![0u8; chunk as usize];
        let n = chunk.min(self.size.saturating_sub(off)) as usize;
        self.data.read_at(off, &mut buf[..n])?;
        Ok(if is_zero(&buf) { None } else { Some(buf) })
    }

    /// Calls `emit(index, data)` for every non-zero chunk in ascending order, with `data`
    /// transformed by `f` (run in parallel over batches of `batch` chunks).
    pub(crate) fn for_each_nonzero<T: Send>(
        &self,
        chunk: u64,
        batch: usize,
        f: impl Fn(Vec<u8>) -> T + Sync,
        mut emit: impl FnMut(u64, T) -> Result<()>,
    ) -> Result<()> {
        let candidates = self.candidate_chunks(chunk);
        for group in candidates.chunks(batch.max(1)) {
            let done: Vec<(u64, Option<T>)> = group
                .par_iter()
                .map(|&i| Ok((i, self.read_chunk(i, chunk)?.map(&f))))
                .collect::<io::Result<_>>()?;
            for (i, t) in done {
                if let Some(t) = t {
                    emit(i, t)?;
                }
            }
        }
        Ok(())
    }
}

/// True when every byte is zero (16 bytes at a time).
pub fn is_zero(buf: &[u8]) -> bool {
    let words = buf.chunks_exact(16);
    let rest = words.remainder();
    rest.iter().all(|&b| b == 0)
        && words
            .into_iter()
            .all(|w| u128::from_ne_bytes(w.try_into().unwrap_or([1; 16])) == 0)
}

/// A positioned writer that counts where it is (the containers are written front to back,
/// with one seek back for a header).
pub(crate) struct Out<'w, W: io::Write + io::Seek> {
    pub w: &'w mut W,
    pub pos: u64,
}

impl<W: io::Write + io::Seek> Out<'_, W> {
    pub fn write(&mut self, b: &[u8]) -> io::Result<()> {
        self.w.write_all(b)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    /// Zeroes up to `to` (a hole where the file system makes one: a seek).
    pub fn skip_to(&mut self, to: u64) -> io::Result<()> {
        if to > self.pos {
            self.w.seek(io::SeekFrom::Start(to))?;
            self.pos = to;
        }
        Ok(())
    }

    /// Writes zero bytes up to `to` (for streams that must be dense).
    pub fn pad_to(&mut self, to: u64) -> io::Result<()> {
        const Z: [u8; 4096] = [0; 4096];
        while self.pos < to {
            let n = ((to - self.pos) as usize).min(Z.len());
            self.write(&Z[..n])?;
        }
        Ok(())
    }

    pub fn write_at(&mut self, off: u64, b: &[u8]) -> io::Result<()> {
        self.w.seek(io::SeekFrom::Start(off))?;
        self.w.write_all(b)?;
        self.w.seek(io::SeekFrom::Start(self.pos))?;
        Ok(())
    }
}

/// A container opened for reading: its virtual size and positional reads of the virtual disk.
pub trait VirtualDisk {
    /// Virtual disk size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` with the virtual disk's bytes at `offset` (within `size`).
    fn read_virtual(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
}

/// The error for a read of `len` bytes at `offset` that does not lie within a `size`-byte
/// virtual disk (`None` when it does); every reader checks this before mapping anything.
pub(crate) fn past_end(offset: u64, len: usize, size: u64) -> Option<Error> {
    offset
        .checked_add(len as u64)
        .is_none_or(|e| e > size)
        .then(|| {
            Error::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("read at {offset} past the {size}-byte virtual disk"),
            ))
        })
}

/// Which container a file is, by its magic: `qcow2`, `vhd`, `vmdk` or `None` (raw or unknown).
pub fn detect(r: &dyn ReadAt, len: u64) -> Option<&'static str> {
    let mut head = [0u8; 8];
    if len >= 8 && r.read_at(0, &mut head).is_ok() {
        if &head[..4] == qcow2::MAGIC {
            return Some("qcow2");
        }
        if &head[..4] == vmdk::MAGIC {
            return Some("vmdk");
        }
        if &head == vhd::COOKIE {
            return Some("vhd");
        }
    }
    let mut tail = [0u8; 8];
    if len >= 512 && r.read_at(len - 512, &mut tail).is_ok() && &tail == vhd::COOKIE {
        return Some("vhd");
    }
    None
}

/// Reads the whole virtual disk of `d` through `sink(offset, bytes)` in `chunk`-sized pieces
/// (the readers' round trip and the fuzz target).
pub fn read_all(d: &dyn VirtualDisk, chunk: usize, mut sink: impl FnMut(u64, &[u8])) -> Result<()> {
    let mut buf = vec![0u8; chunk.max(512)];
    let mut off = 0u64;
    while off < d.size() {
        let n = (d.size() - off).min(buf.len() as u64) as usize;
        d.read_virtual(off, &mut buf[..n])?;
        sink(off, &buf[..n]);
        off += n as u64;
    }
    Ok(())
}

/// Opens `bytes` as whichever container it is (fuzzing and tests).
pub fn open_any<'a>(r: &'a dyn ReadAt, len: u64) -> Result<Box<dyn VirtualDisk + 'a>> {
    match detect(r, len) {
        Some("qcow2") => Ok(Box::new(qcow2::Reader::open(r, len)?)),
        Some("vmdk") => Ok(Box::new(vmdk::Reader::open(r, len)?)),
        Some("vhd") => Ok(Box::new(vhd::Reader::open(r, len)?)),
        _ => Err(corrupt("vmdisk", 0, "neither qcow2, VHD nor VMDK")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A disk with random, text, repeated and zero regions and an odd length.
    fn sample() -> Vec<u8> {
        let mut d = vec![0u8; 5 * 1024 * 1024 + 777];
        let mut x = 0x1234_5678u32;
        for b in &mut d[70_000..400_000] {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        for (i, b) in d[2_200_000..3_000_000].iter_mut().enumerate() {
            *b = b"kiln bakes images "[i % 18];
        }
        let n = d.len();
        d[n - 5..].copy_from_slice(b"tail!");
        d
    }

    fn write_all_formats(raw: &Raw<'_>) -> Vec<(&'static str, Vec<u8>)> {
        let mut outs = Vec::new();
        for comp in [None, Some(Compression::Zstd), Some(Compression::Zlib)] {
            let mut c = Cursor::new(Vec::new());
            qcow2::write(raw, &mut c, qcow2::Options { compression: comp }).unwrap();
            outs.push(("qcow2", c.into_inner()));
        }
        for dynamic in [false, true] {
            let mut c = Cursor::new(Vec::new());
            let o = vhd::Options {
                dynamic,
                unique_id: [9; 16],
                timestamp: 0,
            };
            vhd::write(raw, &mut c, o).unwrap();
            outs.push(("vhd", c.into_inner()));
        }
        let mut c = Cursor::new(Vec::new());
        let o = vmdk::Options {
            file_name: "t.vmdk".into(),
            cid: 7,
        };
        vmdk::write(raw, &mut c, &o).unwrap();
        outs.push(("vmdk", c.into_inner()));
        outs
    }

    fn read_back(img: &[u8]) -> Result<Vec<u8>> {
        let d = open_any(&img, img.len() as u64)?;
        let mut v = Vec::new();
        read_all(d.as_ref(), 1 << 20, |_, b| v.extend_from_slice(b))?;
        Ok(v)
    }

    #[test]
    fn round_trips_every_format() {
        let data = sample();
        let runs = vec![
            (65_536, 400_000),
            (2_000_000, 1_100_000),
            (data.len() as u64 - 100, 100),
        ];
        for runs in [None, Some(runs)] {
            let raw = Raw {
                data: &data,
                size: data.len() as u64,
                runs,
            };
            for (fmt, img) in write_all_formats(&raw) {
                assert_eq!(detect(&img, img.len() as u64), Some(fmt));
                let back = read_back(&img).unwrap();
                assert!(back.len() >= data.len(), "{fmt}");
                assert_eq!(&back[..data.len()], &data[..], "{fmt}");
                assert!(is_zero(&back[data.len()..]), "{fmt}");
            }
        }
    }

    #[test]
    fn identical_inputs_give_identical_bytes() {
        let data = sample();
        let raw = Raw {
            data: &data,
            size: data.len() as u64,
            runs: None,
        };
        assert_eq!(write_all_formats(&raw), write_all_formats(&raw));
    }

    /// Truncations and flipped bytes are errors or other data, never panics.
    #[test]
    fn damaged_containers_do_not_panic() {
        let data = sample();
        let raw = Raw {
            data: &data,
            size: data.len() as u64,
            runs: None,
        };
        for (fmt, img) in write_all_formats(&raw) {
            let n = img.len();
            for cut in [0, 1, 100, 511, 512, 1536, 65_536, n / 2, n - 513, n - 1] {
                let _ = read_back(&img[..cut.min(n)]);
            }
            assert!(
                read_back(&img[..n / 2]).is_err() || fmt == "vhd",
                "{fmt} half"
            );
            let mut x = 0x9e37_79b9u32;
            for _ in 0..200 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let mut bad = img.clone();
                let at = (x as usize) % n.min(200_000);
                bad[at] ^= 0xA5;
                let _ = read_back(&bad);
            }
        }
    }
}
