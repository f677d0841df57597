//! Tar sources: ustar, GNU (long names and links, old and PAX sparse files), PAX (long paths,
//! fractional and negative times, large ids and sizes, `SCHILY.xattr.*`, `LIBARCHIVE.xattr.*`),
//! plain or compressed with gzip, xz or zstd (detected by magic bytes).
//!
//! Two ways in:
//! * an uncompressed tar *file* is indexed: headers are read, data is skipped by seeking, and
//!   each file records [`DataRef::Tar`] (the offset of its packed data); [`TarContents`] reads
//!   it later by offset, mapping a sparse file's logical offsets to its packed runs;
//! * anything else (compressed, stdin, a pipe) is a [`TarStream`], read once: each regular
//!   file's stored bytes go to the writer's [`Placer`] as they pass by.
//!
//! The parser is kiln's own rather than the `tar` crate: that crate does not expose GNU sparse
//! maps (it expands them into zeroes), cannot index by offset, and its errors carry neither the
//! entry nor the offset that a user needs to find the fault.
//!
//! Layout: [`header`] (the 512-byte block), [`pax`] (extended records), [`sparse`] (sparse
//! maps), `input` (decompression, seeking vs streaming), `parser` (entries), `build` (tree
//! semantics), [`dump`] (a human listing for debugging).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Cursor, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use kiln_formats::fstree::{read_host_or_inline, DataRef, FileData, Placer, Tree};

use crate::{Error, Opened, SourceContents};

mod build;
pub mod header;
mod input;
mod parser;
pub mod pax;
pub mod sparse;

pub use input::Compression;
pub use parser::MAX_META;

pub(crate) use build::Builder;
pub(crate) use input::{decoder, detect, read_magic};
use input::{Backend, Seekable, Streamed};
use parser::{Kind, Parser};

/// Opens a tar file: an uncompressed regular file is indexed now; a compressed file, or one
/// that cannot seek (a FIFO), becomes a stream.
pub fn open_file(path: &Path) -> Result<Opened, Error> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let md = f.metadata().map_err(|e| Error::io(path, e))?;
    let magic = input::read_magic(&mut f).map_err(|e| Error::io(path, e))?;
    let c = input::detect(&magic).map_err(|msg| Error::Source {
        path: path.display().to_string(),
        msg,
    })?;
    if c == Compression::None && md.is_file() {
        f.seek(SeekFrom::Start(0)).map_err(|e| Error::io(path, e))?;
        let reader = f.try_clone().map_err(|e| Error::io(path, e))?;
        let tree = index(reader, md.len())?;
        return Ok(Opened::Indexed(
            tree,
            SourceContents::Tar(TarContents::new(f)),
        ));
    }
    let name = path.display().to_string();
    Ok(Opened::Stream(TarStream::with_compression(
        c,
        Cursor::new(magic).chain(f),
        &name,
    )?))
}

/// Indexes an uncompressed tar of `len` bytes: reads every header, skips the data, and returns
/// the tree with [`DataRef::Tar`] offsets into `r`.
pub fn index<R: Read + Seek>(r: R, len: u64) -> Result<Tree, Error> {
    let mut p = Parser::new(Seekable::new(r, len));
    let mut b = Builder::new();
    while let Some(e) = p.next_entry()? {
        let target = b.target(&e)?;
        let data = if e.kind == Kind::File && e.stored > 0 {
            DataRef::Tar(e.data_offset)
        } else {
            DataRef::Empty
        };
        b.add(&e, target, data, &mut |_| {})?;
    }
    Ok(b.finish())
}

/// A tar stream read once, front to back; or a container image, whose layer streams are read
/// once each, in order, into one tree.
pub struct TarStream {
    input: Input,
    compression: Compression,
    limit: Option<u64>,
}

enum Input {
    Tar(Box<dyn Read + Send>),
    Image(Box<crate::oci::Image>),
}

impl std::fmt::Debug for TarStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TarStream")
            .field("compression", &self.compression)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl TarStream {
    /// The tar stream on standard input (compression detected from its first bytes).
    pub fn stdin() -> Result<Self, Error> {
        Self::from_reader(io::stdin(), "-")
    }

    /// A tar stream from any reader; `name` is used in messages. The compression is detected
    /// from the first bytes.
    pub fn from_reader(mut r: impl Read + Send + 'static, name: &str) -> Result<Self, Error> {
        let magic = input::read_magic(&mut r).map_err(|e| Error::Io {
            path: name.into(),
            source: e,
        })?;
        let c = input::detect(&magic).map_err(|msg| Error::Source {
            path: name.into(),
            msg,
        })?;
        Self::with_compression(c, Cursor::new(magic).chain(r), name)
    }

    fn with_compression(
        c: Compression,
        r: impl Read + Send + 'static,
        name: &str,
    ) -> Result<Self, Error> {
        let reader = input::decoder(c, r).map_err(|e| Error::Source {
            path: name.into(),
            msg: format!("starting the {c:?} decoder: {e}"),
        })?;
        Ok(Self {
            input: Input::Tar(reader),
            compression: c,
            limit: None,
        })
    }

    /// A container image opened by [`crate::oci::open`]: its layers, in order, are the stream.
    pub fn image(image: crate::oci::Image) -> Self {
        Self {
            input: Input::Image(Box::new(image)),
            compression: Compression::None,
            limit: None,
        }
    }

    /// The image's configuration (entrypoint, environment, digests) when this stream is a
    /// container image.
    pub fn image_config(&self) -> Option<&crate::oci::ImageConfig> {
        match &self.input {
            Input::Image(i) => Some(i.config()),
            Input::Tar(_) => None,
        }
    }

    /// The compression detected.
    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// Bounds the total uncompressed bytes read (headers, data and padding): a decompression
    /// bomb fails with an error at this many bytes instead of running on. Writers pass a bound
    /// derived from the image size; their [`Placer`] also refuses data that does not fit.
    pub fn with_limit(mut self, max_bytes: u64) -> Self {
        self.limit = Some(max_bytes);
        self
    }

    /// Reads the whole stream. Each regular file that stores bytes is handed to `placer`
    /// (exactly its data runs, packed, in order) and recorded as [`DataRef::Placed`]; a file
    /// replaced by a later entry of the same name is passed to [`Placer::discard`].
    pub fn read(self, placer: &mut dyn Placer) -> Result<Tree, Error> {
        match self.input {
            Input::Tar(reader) => {
                let mut b = Builder::new();
                read_entries(reader, self.limit, &mut b, placer, false)?;
                Ok(b.finish())
            }
            Input::Image(image) => image.apply(self.limit, placer),
        }
    }
}

/// Reads one tar stream (already decompressed) into `b`. With `layer`, entries are an image
/// layer's: whiteouts hide what lower layers made instead of being added.
pub(crate) fn read_entries(
    reader: Box<dyn Read + Send>,
    limit: Option<u64>,
    b: &mut Builder,
    placer: &mut dyn Placer,
    layer: bool,
) -> Result<(), Error> {
    let mut p = Parser::new(Streamed::new(reader));
    p.set_limit(limit);
    while let Some(e) = p.next_entry()? {
        if layer && b.whiteout(&e, &mut |i| placer.discard(i))? {
            continue;
        }
        let target = b.target(&e)?;
        let data = if e.kind == Kind::File && e.stored > 0 {
            let file = sparse::file_data(e.size, e.runs.clone());
            let placed = placer.place(&file, &mut DataReader { p: &mut p });
            let place_err = |source: io::Error| Error::Place {
                entry: e.display(),
                offset: e.offset,
                source,
            };
            match placed {
                Ok(_) if p.data_left() > 0 => {
                    return Err(place_err(io::Error::other(format!(
                        "the writer took only {} of the entry's {} bytes",
                        e.stored - p.data_left(),
                        e.stored
                    ))))
                }
                Ok(i) => DataRef::Placed(i),
                Err(err) => {
                    return Err(match p.take_data_failure() {
                        Some(msg) => Error::Entry {
                            entry: e.display(),
                            offset: e.offset,
                            msg,
                        },
                        None => place_err(err),
                    })
                }
            }
        } else {
            DataRef::Empty
        };
        b.add(&e, target, data, &mut |i| placer.discard(i))?;
    }
    // The end-of-archive marker is not the end of the stream: the compressed framing is
    // verified only by reading on to its end.
    p.finish_stream()
}

/// The current entry's data, as the placer sees it.
struct DataReader<'a, 't, B> {
    p: &'a mut Parser<'t, B>,
}

impl<B: Backend> Read for DataReader<'_, '_, B> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.p.read_data(buf)
    }
}

/// Sparse files with more runs than this get their packed run offsets computed once and kept,
/// so reading such a file run by run costs O(log n) per read instead of O(n).
const MANY_RUNS: usize = 64;

/// Reads file bytes from an uncompressed tar file by offset.
#[derive(Debug)]
pub struct TarContents {
    file: File,
    /// Packed run offsets of files with many runs, by the file's data offset in the tar.
    starts: Mutex<BTreeMap<u64, Arc<[u64]>>>,
}

impl TarContents {
    /// Reads the tar `file` that a tree was indexed from.
    pub fn new(file: File) -> Self {
        Self {
            file,
            starts: Mutex::new(BTreeMap::new()),
        }
    }

    fn starts_of(&self, base: u64, file: &FileData) -> Option<Arc<[u64]>> {
        let runs = file.segments.as_deref().filter(|r| r.len() > MANY_RUNS)?;
        // A poisoned lock only means another reader panicked; the map is still consistent.
        let mut cache = self.starts.lock().unwrap_or_else(|e| e.into_inner());
        Some(
            cache
                .entry(base)
                .or_insert_with(|| sparse::packed_starts(runs).into())
                .clone(),
        )
    }

    /// Reads `buf.len()` bytes of `file` at logical offset `offset`; holes of a sparse file
    /// read as zeroes.
    pub fn read_at(&self, file: &FileData, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let DataRef::Tar(base) = file.data else {
            return read_host_or_inline(file, offset, buf);
        };
        let starts = self.starts_of(base, file);
        sparse::map_range(file, offset, buf.len() as u64, starts.as_deref(), |piece| {
            let (logical, len) = match piece {
                sparse::Piece::Data { logical, len, .. } | sparse::Piece::Hole { logical, len } => {
                    (logical, len)
                }
            };
            // map_range keeps pieces inside the requested range, so these fit in `buf`.
            let start = (logical - offset) as usize;
            let dst = &mut buf[start..start + len as usize];
            match piece {
                sparse::Piece::Hole { .. } => {
                    dst.fill(0);
                    Ok(())
                }
                sparse::Piece::Data { packed, .. } => {
                    let at = base + packed;
                    self.file.read_exact_at(dst, at).map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!("tar data: {} bytes at offset {at}: {e}", dst.len()),
                        )
                    })
                }
            }
        })
    }
}

/// Writes a human listing of a tar stream (plain or compressed) to `out`: every header block
/// with its offset and raw fields, every extended record, and the entry they add up to. Data
/// is skipped. Stops at the first error, which is returned after what was listed so far.
pub fn dump(r: impl Read + Send + 'static, out: &mut dyn Write) -> Result<(), Error> {
    let s = TarStream::from_reader(r, "input")?;
    writeln!(out, "compression: {:?}", s.compression).map_err(|e| Error::Io {
        path: "dump output".into(),
        source: e,
    })?;
    let Input::Tar(reader) = s.input else {
        return Ok(());
    };
    let mut p = Parser::new(Streamed::new(reader));
    p.set_trace(out);
    while p.next_entry()?.is_some() {}
    Ok(())
}
