//! Reading any kiln source (directory, tar, compressed tar, stdin) into a tree whose file
//! bytes can be read at random: indexed sources as they are, one-pass streams by spooling each
//! file's bytes into one unlinked temp file as they go by. Memory stays bounded by the number
//! of files; the spool costs disk equal to the tree's data.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;

use anyhow::Context;
use kiln_formats::fstree::{Contents, DataRef, FileData, Placer, Tree};
use kiln_tree::{SourceArg, SourceContents};

/// File bytes of a tree read by [`open`].
pub enum TreeContents {
    /// An indexed source (directory, uncompressed tar).
    Source(SourceContents),
    /// A stream spooled to a temp file.
    Spool(Spool),
}

impl Contents for TreeContents {
    fn read_at(&self, file: &FileData, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match self {
            TreeContents::Source(s) => s.read_at(file, offset, buf),
            TreeContents::Spool(s) => s.read_at(file, offset, buf),
        }
    }
}

/// Opens a source for scanning: the tree and a reader for its bytes.
pub fn open(arg: &SourceArg) -> anyhow::Result<(Tree, TreeContents)> {
    match kiln_tree::open(arg).with_context(|| format!("{arg:?}"))? {
        kiln_tree::Opened::Indexed(t, c) => Ok((t, TreeContents::Source(c))),
        kiln_tree::Opened::Stream(s) => {
            let mut spool = Spool::new()?;
            let t = s.read(&mut spool).context("reading the tar stream")?;
            Ok((t, TreeContents::Spool(spool)))
        }
    }
}

/// A [`Placer`] that appends each file's packed bytes to a temp file.
pub struct Spool {
    file: File,
    len: u64,
    /// Start offset in the spool of each placed file.
    starts: Vec<u64>,
}

impl Spool {
    /// An empty spool in the system temp directory (unlinked at once).
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            file: tempfile::tempfile().context("creating a spool file")?,
            len: 0,
            starts: Vec::new(),
        })
    }

    fn read_at(&self, file: &FileData, offset: u64, buf: &mut [u8]) -> io::Result<()> {
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
        let mut w = io::BufWriter::new(&self.file);
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
        let c = TreeContents::Spool(s);
        let mut buf = [0u8; 5];
        c.read_at(
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
        c.read_at(&sp, 101, &mut b3).unwrap();
        assert_eq!(&b3, b"XYZ");
        c.read_at(&sp, 0, &mut b3).unwrap();
        assert_eq!(&b3, b"abc");
        assert!(c.read_at(&sp, 50, &mut b3).is_err(), "a hole is not data");
        // A short stream is an error, not a silently truncated file.
        let mut s2 = Spool::new().unwrap();
        assert!(s2
            .place(&FileData::dense(10, DataRef::Empty), &mut &b"short"[..])
            .is_err());
    }
}
