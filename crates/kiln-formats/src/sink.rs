//! Positional output for writers.
//!
//! Writers emit bytes at absolute offsets through a [`Sink`]. The contract is that a sink's
//! window starts out all zeroes (a fresh sparse file, a fresh buffer), so a writer only writes
//! what is not zero and never spends time or disk on holes. Sinks may be shared between threads:
//! `write_at` takes `&self`.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// Where a writer's bytes go.
pub trait Sink: Sync {
    /// Writes `buf` at `offset` (relative to the sink's window). Writing past the window's end
    /// is an error, never a silent overlap with whatever lies beyond.
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()>;

    /// Reads back bytes already written (used by writers that patch structures after the fact
    /// and by hashing passes). Unwritten areas read as zeroes.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Size of the window in bytes.
    fn len(&self) -> u64;

    /// True when the window is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The file and byte offset this window starts at, when the sink is a window of a file:
    /// lets a writer copy file data in the kernel (`copy_file_range`) instead of through a
    /// buffer. Writes made that way must stay inside the window.
    fn file_window(&self) -> Option<(&File, u64)> {
        None
    }
}

fn out_of_window(offset: u64, len: usize, window: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "write of {len} bytes at offset {offset} runs past the end of the {window}-byte output"
        ),
    )
}

/// A window `[base, base + len)` of a file, written with `pwrite`. Block-aligned runs of zero
/// bytes are skipped so the file stays sparse. Every [`WRITEBACK_EVERY`] bytes written, the
/// sink asks the kernel to start writing the file back, so the disk works while the writer
/// computes and the final `fsync` of an atomic output finds little left to do.
///
/// Large writes from an [`AlignedBuf`] at [`DIRECT_ALIGN`]-aligned file offsets bypass the page
/// cache (`O_DIRECT`, through a second descriptor opened on first use): writers that stage their
/// output in such buffers (the EROFS data region, copied file data) stream to the device at its
/// own speed. Everything else, and every write on a filesystem without direct I/O, is buffered.
#[derive(Debug)]
pub struct FileSink<'a> {
    file: &'a File,
    base: u64,
    len: u64,
    written: AtomicU64,
    direct: OnceLock<Option<File>>,
    direct_refused: AtomicBool,
}

/// The alignment direct I/O needs of buffers, file offsets and lengths (the page size, which
/// covers every logical block size up to 4 KiB).
pub const DIRECT_ALIGN: usize = 4096;

/// The smallest write worth sending around the page cache.
pub const DIRECT_MIN: usize = 256 << 10;

/// One page of an [`AlignedBuf`].
#[derive(
    Clone,
    Copy,
    zerocopy::IntoBytes,
    zerocopy::FromBytes,
    zerocopy::Immutable,
    zerocopy::KnownLayout,
)]
#[repr(C, align(4096))]
struct Page([u8; DIRECT_ALIGN]);

/// A zeroed byte buffer whose start is [`DIRECT_ALIGN`]-aligned, so a [`FileSink`] can write it
/// with direct I/O.
pub struct AlignedBuf {
    pages: Vec<Page>,
    len: usize,
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

impl AlignedBuf {
    /// `len` zero bytes.
    pub fn new(len: usize) -> Self {
        Self {
            pages: vec![Page([0; DIRECT_ALIGN]); len.div_ceil(DIRECT_ALIGN)],
            len,
        }
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &zerocopy::IntoBytes::as_bytes(self.pages.as_slice())[..self.len]
    }

    /// The bytes, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut zerocopy::IntoBytes::as_mut_bytes(self.pages.as_mut_slice())[..self.len]
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Bytes written between two writeback requests.
pub const WRITEBACK_EVERY: u64 = 64 << 20;

use kiln_os::start_writeback;

impl<'a> FileSink<'a> {
    /// A window of `len` bytes starting at byte `base` of `file`. The caller guarantees the
    /// window reads as zeroes (a freshly created or truncated file).
    pub fn new(file: &'a File, base: u64, len: u64) -> Self {
        Self {
            file,
            base,
            len,
            written: AtomicU64::new(0),
            direct: OnceLock::new(),
            direct_refused: AtomicBool::new(false),
        }
    }

    /// Writes `buf` at absolute file offset `at`: around the page cache when `buf` is large
    /// and both it and `at` are aligned, otherwise through the page cache.
    fn put(&self, at: u64, buf: &[u8]) -> io::Result<()> {
        let aligned = buf.len() >= DIRECT_MIN
            && (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
            && at.is_multiple_of(DIRECT_ALIGN as u64)
            && !self.direct_refused.load(Ordering::Relaxed);
        if aligned {
            if let Some(d) = self.direct.get_or_init(|| kiln_os::open_direct(self.file)) {
                let whole = buf.len() / DIRECT_ALIGN * DIRECT_ALIGN;
                match d.write_all_at(&buf[..whole], at) {
                    Ok(()) => {
                        if whole < buf.len() {
                            self.file.write_all_at(&buf[whole..], at + whole as u64)?;
                        }
                        return Ok(());
                    }
                    // A filesystem that accepts O_DIRECT at open but not these writes.
                    Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                        self.direct_refused.store(true, Ordering::Relaxed);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        self.file.write_all_at(buf, at)?;
        self.wrote(buf.len());
        Ok(())
    }

    fn wrote(&self, n: usize) {
        let n = n as u64;
        let before = self.written.fetch_add(n, Ordering::Relaxed);
        if (before + n) / WRITEBACK_EVERY != before / WRITEBACK_EVERY {
            start_writeback(self.file);
        }
    }

    /// A sub-window `[offset, offset + len)` of this one.
    pub fn sub(&self, offset: u64, len: u64) -> io::Result<FileSink<'a>> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(out_of_window(offset, len as usize, self.len));
        }
        Ok(FileSink::new(self.file, self.base + offset, len))
    }

    /// The underlying file and the window's base offset in it.
    pub fn file(&self) -> (&'a File, u64) {
        (self.file, self.base)
    }
}

const ZERO_CHUNK: usize = 4096;

impl Sink for FileSink<'_> {
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > self.len)
        {
            return Err(out_of_window(offset, buf.len(), self.len));
        }
        // Skip chunk-aligned all-zero runs; write the rest in as few calls as possible.
        let mut start = 0usize;
        let mut pos = 0usize;
        while pos < buf.len() {
            let end = (pos + ZERO_CHUNK).min(buf.len());
            if buf[pos..end].iter().all(|&b| b == 0) {
                if start < pos {
                    self.put(self.base + offset + start as u64, &buf[start..pos])?;
                }
                start = end;
            }
            pos = end;
        }
        if start < buf.len() {
            self.put(self.base + offset + start as u64, &buf[start..])?;
        }
        Ok(())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > self.len)
        {
            return Err(out_of_window(offset, buf.len(), self.len));
        }
        // The file may be shorter than the window if set_len was not called yet: pad zeroes.
        let mut done = 0;
        while done < buf.len() {
            match self
                .file
                .read_at(&mut buf[done..], self.base + offset + done as u64)?
            {
                0 => {
                    buf[done..].fill(0);
                    break;
                }
                n => done += n,
            }
        }
        Ok(())
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn file_window(&self) -> Option<(&File, u64)> {
        Some((self.file, self.base))
    }
}

/// An in-memory sink (small images: an ESP to embed, test fixtures).
#[derive(Debug)]
pub struct MemSink {
    buf: Mutex<Vec<u8>>,
}

impl MemSink {
    /// A zeroed buffer of `len` bytes.
    pub fn new(len: usize) -> Self {
        Self {
            buf: Mutex::new(vec![0; len]),
        }
    }

    /// The bytes written.
    pub fn into_inner(self) -> Vec<u8> {
        self.buf.into_inner().unwrap_or_else(|p| p.into_inner())
    }
}

impl Sink for MemSink {
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut b = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        let len = b.len() as u64;
        let start = usize::try_from(offset)
            .ok()
            .filter(|&o| (o as u64) + data.len() as u64 <= len);
        let Some(start) = start else {
            return Err(out_of_window(offset, data.len(), len));
        };
        b[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn read_at(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let b = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        let len = b.len() as u64;
        let start = usize::try_from(offset)
            .ok()
            .filter(|&o| (o as u64) + out.len() as u64 <= len);
        let Some(start) = start else {
            return Err(out_of_window(offset, out.len(), len));
        };
        out.copy_from_slice(&b[start..start + out.len()]);
        Ok(())
    }

    fn len(&self) -> u64 {
        self.buf.lock().unwrap_or_else(|p| p.into_inner()).len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn file_sink_skips_zero_chunks_and_bounds_writes() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("x"))
            .unwrap();
        f.set_len(1 << 20).unwrap();
        let s = FileSink::new(&f, 4096, 65536);
        let mut data = vec![0u8; 32768];
        data[0] = 1;
        data[20000] = 2;
        s.write_at(0, &data).unwrap();
        let mut back = vec![0u8; 32768];
        s.read_at(0, &mut back).unwrap();
        assert_eq!(back, data);
        // Only the two chunks holding non-zero bytes were allocated.
        assert!(f.metadata().unwrap().blocks() * 512 <= 2 * 4096 + 4096);
        assert!(s.write_at(65536 - 10, &[1; 11]).is_err());
        assert!(s.sub(60000, 10000).is_err());
    }

    #[test]
    fn mem_sink_round_trip() {
        let s = MemSink::new(100);
        s.write_at(10, b"abc").unwrap();
        assert!(s.write_at(98, b"abc").is_err());
        let v = s.into_inner();
        assert_eq!(&v[10..13], b"abc");
    }
}
