//! Tar streams: ustar, GNU (long names and links, sparse), PAX (long paths, fractional times,
//! large ids and sizes, `SCHILY.xattr.*`, `LIBARCHIVE.xattr.*`), compressed with gzip, xz or zstd
//! (detected by magic bytes).

use std::fs::File;
use std::io;
use std::path::Path;

use kiln_formats::fstree::{FileData, Placer, Tree};

use crate::{Error, Opened};

/// Opens a tar file: an uncompressed one is indexed now, a compressed one becomes a stream.
pub fn open_file(path: &Path) -> Result<Opened, Error> {
    Err(Error::Source {
        path: path.display().to_string(),
        msg: "tar sources are not supported yet".into(),
    })
}

/// A tar stream read once, front to back.
pub struct TarStream {
    _private: (),
}

impl TarStream {
    /// The tar stream on standard input.
    pub fn stdin() -> Result<Self, Error> {
        Err(Error::Source {
            path: "-".into(),
            msg: "tar streams are not supported yet".into(),
        })
    }

    /// Reads the whole stream, handing file bytes to `placer`.
    pub fn read(self, _placer: &mut dyn Placer) -> Result<Tree, Error> {
        Err(Error::Source {
            path: "-".into(),
            msg: "tar streams are not supported yet".into(),
        })
    }
}

/// Reads file bytes from an uncompressed tar file by offset.
#[derive(Debug)]
pub struct TarContents {
    file: File,
}

impl TarContents {
    /// Reads `buf.len()` bytes of `file` at logical offset `offset`.
    pub fn read_at(&self, file: &FileData, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let _ = (&self.file, file, offset, buf);
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "tar contents are not supported yet",
        ))
    }
}
