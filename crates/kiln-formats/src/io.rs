//! Positional reads from an image, shared by every format's reader (ext4, EROFS, ISO 9660).
//!
//! Exact-read semantics: a read either fills the whole buffer or fails, and reading past the
//! end of an image is an `UnexpectedEof` naming the offset, so a truncated image is an error
//! at the structure that needed the missing bytes rather than a silent zero fill.

use std::io;

/// The initial capacity for a collection whose length was read from an image. A count from
/// an untrusted header sizes an allocation only up to this bound; the collection grows past it
/// as real entries are read, so a hostile count fails at the first entry the image does not
/// hold instead of asking the allocator for gigabytes up front.
pub fn capacity_hint(count: u64) -> usize {
    const MAX_UP_FRONT: u64 = 1 << 16;
    count.min(MAX_UP_FRONT) as usize
}

/// Random-access bytes an image is read from.
pub trait ReadAt: Sync {
    /// Fills `buf` from byte `offset`; short images are an error.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

impl ReadAt for [u8] {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|o| self.get(o..o.checked_add(buf.len())?));
        match src {
            Some(s) => {
                buf.copy_from_slice(s);
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "read of {} bytes at {offset} past the end of the {}-byte image",
                    buf.len(),
                    self.len()
                ),
            )),
        }
    }
}

impl ReadAt for Vec<u8> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.as_slice().read_at(offset, buf)
    }
}

impl ReadAt for std::fs::File {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("read of {} bytes at offset {offset}: {e}", buf.len()),
            )
        })
    }
}

impl<T: ReadAt + ?Sized> ReadAt for &T {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(offset, buf)
    }
}

/// Reads through a [`crate::sink::Sink`] (an image just written).
pub struct SinkReader<'a>(pub &'a dyn crate::sink::Sink);

impl ReadAt for SinkReader<'_> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_at(offset, buf)
    }
}

/// `len` bytes of `inner` from `offset`: a partition of a disk image, as a filesystem reader
/// takes it (its offsets start at the partition). Reads past `len` are errors.
pub struct Window<R> {
    /// The whole image.
    pub inner: R,
    /// Where the window starts in it.
    pub offset: u64,
    /// Its length.
    pub len: u64,
}

impl<R: ReadAt> ReadAt for Window<R> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if offset.saturating_add(buf.len() as u64) > self.len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "read of {} bytes at {offset} past the end of the {}-byte partition",
                    buf.len(),
                    self.len
                ),
            ));
        }
        self.inner.read_at(self.offset + offset, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_read_their_range_only() {
        let img: Vec<u8> = (0..16).collect();
        let w = Window {
            inner: &img,
            offset: 4,
            len: 8,
        };
        let mut b = [0u8; 3];
        w.read_at(5, &mut b).unwrap();
        assert_eq!(b, [9, 10, 11]);
        let e = w.read_at(6, &mut b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn exact_reads_and_eof_errors() {
        let img = vec![1u8, 2, 3, 4];
        let mut b = [0u8; 2];
        img.read_at(2, &mut b).unwrap();
        assert_eq!(b, [3, 4]);
        let e = img.read_at(3, &mut b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("at 3"));
        assert!(img.read_at(u64::MAX, &mut b).is_err());
    }
}
