//! Where tar bytes come from: a seekable uncompressed file (data is skipped by seeking, and its
//! length is known, so an entry that claims more data than the file holds is caught at once) or
//! a one-pass stream (stdin, or any decompressor). Compression is recognised by magic bytes:
//! gzip (RFC 1952, `1f 8b`; every member of a multi-member file is read), xz (`fd 37 7a 58 5a
//! 00`; concatenated streams are read), zstd (RFC 8878, `28 b5 2f fd`; all frames).

use std::io::{self, BufRead, BufReader, Read, Seek};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// How the bytes of a source are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip, possibly several members.
    Gzip,
    /// xz.
    Xz,
    /// zstd.
    Zstd,
}

/// Longest magic number [`detect`] looks at.
pub const MAGIC_LEN: usize = 6;

/// Recognises the compression from the first bytes of a source. Formats kiln cannot read are
/// named in the error rather than misread as a tar.
pub fn detect(magic: &[u8]) -> Result<Compression, String> {
    Ok(if magic.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if magic.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Compression::Xz
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else if magic.starts_with(b"BZh") {
        return Err("bzip2-compressed input is not supported (use gzip, xz or zstd)".into());
    } else if magic.starts_with(&[0x04, 0x22, 0x4d, 0x18]) {
        return Err("lz4-compressed input is not supported (use gzip, xz or zstd)".into());
    } else if magic.starts_with(&[0x1f, 0x9d]) {
        return Err("compress(1) (.Z) input is not supported (use gzip, xz or zstd)".into());
    } else {
        Compression::None
    })
}

/// Wraps `r` in the decoder for `c`. Decoder errors name the format and how many compressed
/// bytes had been consumed, so a corrupt stream points at where it broke.
pub fn decoder<R: Read + Send + 'static>(c: Compression, r: R) -> io::Result<Box<dyn Read + Send>> {
    let consumed = Arc::new(AtomicU64::new(0));
    let counted = Counted {
        inner: r,
        n: consumed.clone(),
    };
    let (inner, what): (Box<dyn Read + Send>, &'static str) = match c {
        Compression::None => return Ok(Box::new(counted.inner)),
        Compression::Gzip => (
            Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(counted))),
            "gzip",
        ),
        Compression::Xz => (
            Box::new(xz2::read::XzDecoder::new_multi_decoder(counted)),
            "xz",
        ),
        // The zstd decoder reads every frame of a multi-frame stream until EOF and checks
        // each frame's content checksum when the frame has one.
        Compression::Zstd => (Box::new(zstd::stream::read::Decoder::new(counted)?), "zstd"),
    };
    Ok(Box::new(Decoded {
        inner,
        what,
        consumed,
    }))
}

/// Counts the compressed bytes a decoder has read.
struct Counted<R> {
    inner: R,
    n: Arc<AtomicU64>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n.fetch_add(k as u64, Ordering::Relaxed);
        Ok(k)
    }
}

/// A decoder whose errors say which format failed and where in the compressed input.
struct Decoded {
    inner: Box<dyn Read + Send>,
    what: &'static str,
    consumed: Arc<AtomicU64>,
}

impl Read for Decoded {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).map_err(|e| {
            if e.kind() == io::ErrorKind::Interrupted {
                return e;
            }
            io::Error::new(
                e.kind(),
                format!(
                    "{} stream corrupt or truncated (within the first {} compressed bytes): {e}",
                    self.what,
                    self.consumed.load(Ordering::Relaxed)
                ),
            )
        })
    }
}

/// Reads up to [`MAGIC_LEN`] bytes from the start of `r` (fewer only at end of input).
pub fn read_magic(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut buf = [0u8; MAGIC_LEN];
    let mut n = 0;
    while n < MAGIC_LEN {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(buf[..n].to_vec())
}

/// A source of tar bytes the parser reads front to back.
pub trait Backend {
    /// Reads into `buf`; 0 means end of input.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Skips up to `n` bytes; returns how many were skipped (fewer only at end of input).
    fn skip(&mut self, n: u64) -> io::Result<u64>;
}

/// An uncompressed tar in a seekable file of known length.
pub struct Seekable<R> {
    r: BufReader<R>,
    pos: u64,
    len: u64,
}

impl<R: Read + Seek> Seekable<R> {
    /// Reads `r` (positioned at 0) whose total length is `len`.
    pub fn new(r: R, len: u64) -> Self {
        Self {
            r: BufReader::with_capacity(16 * 1024, r),
            pos: 0,
            len,
        }
    }
}

impl<R: Read + Seek> Backend for Seekable<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.r.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }

    fn skip(&mut self, n: u64) -> io::Result<u64> {
        let can = n.min(self.len.saturating_sub(self.pos));
        let buffered = self.r.buffer().len() as u64;
        if can <= buffered {
            // Within the buffer: no system call.
            self.r.consume(can as usize);
        } else {
            let delta = i64::try_from(can).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, "skip larger than 2^63 bytes")
            })?;
            self.r.seek_relative(delta)?;
        }
        self.pos += can;
        Ok(can)
    }
}

/// A one-pass stream; skipping reads and discards.
pub struct Streamed<R> {
    r: R,
    scratch: Box<[u8]>,
}

impl<R: Read> Streamed<R> {
    /// Reads `r` front to back.
    pub fn new(r: R) -> Self {
        Self {
            r,
            scratch: vec![0u8; 64 * 1024].into(),
        }
    }
}

impl<R: Read> Backend for Streamed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.r.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    fn skip(&mut self, n: u64) -> io::Result<u64> {
        let mut done = 0u64;
        while done < n {
            let want = (n - done).min(self.scratch.len() as u64) as usize;
            let k = self.read_scratch(want)?;
            if k == 0 {
                break;
            }
            done += k as u64;
        }
        Ok(done)
    }
}

impl<R: Read> Streamed<R> {
    fn read_scratch(&mut self, want: usize) -> io::Result<usize> {
        loop {
            match self.r.read(&mut self.scratch[..want]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }
}

impl<B: Backend + ?Sized> Backend for Box<B> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (**self).read(buf)
    }
    fn skip(&mut self, n: u64) -> io::Result<u64> {
        (**self).skip(n)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::{Cursor, Write};

    #[test]
    fn detects_magic() {
        assert_eq!(detect(&[0x1f, 0x8b, 8]), Ok(Compression::Gzip));
        assert_eq!(detect(b"\xfd7zXZ\0"), Ok(Compression::Xz));
        assert_eq!(detect(&[0x28, 0xb5, 0x2f, 0xfd, 0]), Ok(Compression::Zstd));
        assert_eq!(detect(b"ustar"), Ok(Compression::None));
        assert_eq!(detect(b""), Ok(Compression::None));
        assert!(detect(b"BZh91AY").unwrap_err().contains("bzip2"));
    }

    #[test]
    fn multi_member_gzip_reads_every_member() {
        let mut data = Vec::new();
        for part in [&b"first "[..], b"second"] {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(part).unwrap();
            data.extend(e.finish().unwrap());
        }
        let mut out = String::new();
        decoder(Compression::Gzip, Cursor::new(data))
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, "first second");
    }

    #[test]
    fn seekable_skip_stops_at_end() {
        let mut s = Seekable::new(Cursor::new(vec![7u8; 100_000]), 100_000);
        let mut b = [0u8; 10];
        assert_eq!(s.read(&mut b).unwrap(), 10);
        assert_eq!(s.skip(5).unwrap(), 5);
        assert_eq!(s.skip(90_000).unwrap(), 90_000);
        assert_eq!(s.skip(20_000).unwrap(), 9_985);
        assert_eq!(s.read(&mut b).unwrap(), 0);
        let mut t = Streamed::new(Cursor::new(vec![1u8; 100_000]));
        assert_eq!(t.skip(150_000).unwrap(), 100_000);
    }
}
