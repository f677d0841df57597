//! Random access to a source that can only be read once (a compressed tar, stdin): each file's
//! bytes go, packed, into one unlinked temp file as the stream goes by. Memory stays bounded
//! by the number of files; the spool costs disk equal to the tree's data. Used where a whole
//! tree must be known before any output can be laid out (a disk image, an SBOM scan), as
//! opposed to `kiln mkfs`, whose writers place stream data straight into the image.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;

use kiln_formats::fstree::{DataRef, FileData, Placer};

/// A [`Placer`] that appends each file's packed bytes to a temp file.
#[derive(Debug)]
pub struct Spool {
    file: File,
    len: u64,
    /// Start offset in the spool of each placed file.
    starts: Vec<u64>,
}

impl Spool {
    /// An empty spool in the system temp directory (unlinked at once).
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            file: tempfile::tempfile()?,
            len: 0,
            starts: Vec::new(),
        })
    }

    /// Bytes spooled so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when nothing was spooled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reads `buf.len()` bytes of `file` at logical `offset` (placed files from the spool,
    /// host and inline data as usual).
    pub fn read_at(&self, file: &FileData, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let DataRef::Placed(i) = file.data else {
            return kiln_formats::fstree::read_host_or_inline(file, offset, buf);
        };
        let start = *self.starts.get(i as usize).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("spooled file {i} unknown"))
        })?;
        // Map the logical offset to the packed position: runs are stored back to back.
        let mut packed = 0u64;
        for r in file.runs() {
            if offset >= r.offset && offset < r.offset + r.len {
                return self
                    .file
                    .read_exact_at(buf, start + packed + (offset - r.offset));
            }
            packed += r.len;
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("offset {offset} is in a hole"),
        ))
    }
}

impl Placer for Spool {
    fn place(&mut self, file: &FileData, data: &mut dyn Read) -> io::Result<u32> {
        let start = self.len;
        let mut w = io::BufWriter::with_capacity(1 << 20, &self.file);
        let n = io::copy(data, &mut w)?;
        w.flush()?;
        drop(w);
        if n != file.stored_len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("file data: expected {} bytes, got {n}", file.stored_len()),
            ));
        }
        self.len += n;
        let i = u32::try_from(self.starts.len())
            .map_err(|_| io::Error::other("more than 4 billion files"))?;
        self.starts.push(start);
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_formats::fstree::Segment;

    #[test]
    fn spooled_files_read_back_dense_and_sparse() {
        let mut s = Spool::new().unwrap();
        let dense = FileData::dense(5, DataRef::Empty);
        let i = s.place(&dense, &mut &b"hello"[..]).unwrap();
        // A sparse file: 3 bytes at 0, a hole, 4 bytes at 100; stored packed.
        let sparse = FileData {
            size: 104,
            data: DataRef::Empty,
            segments: Some(
                vec![
                    Segment { offset: 0, len: 3 },
                    Segment {
                        offset: 100,
                        len: 4,
                    },
                ]
                .into(),
            ),
        };
        let j = s.place(&sparse, &mut &b"abcWXYZ"[..]).unwrap();
        let mut buf = [0u8; 5];
        s.read_at(
            &FileData {
                data: DataRef::Placed(i),
                ..dense.clone()
            },
            0,
            &mut buf,
        )
        .unwrap();
        assert_eq!(&buf, b"hello");
        let sp = FileData {
            data: DataRef::Placed(j),
            ..sparse.clone()
        };
        let mut b3 = [0u8; 3];
        s.read_at(&sp, 101, &mut b3).unwrap();
        assert_eq!(&b3, b"XYZ");
        s.read_at(&sp, 0, &mut b3).unwrap();
        assert_eq!(&b3, b"abc");
        assert!(s.read_at(&sp, 50, &mut b3).is_err(), "a hole is not data");
        // A short stream is an error, not a silently truncated file.
        let mut s2 = Spool::new().unwrap();
        assert!(s2
            .place(&FileData::dense(10, DataRef::Empty), &mut &b"short"[..])
            .is_err());
    }
}
