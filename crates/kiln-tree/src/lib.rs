//! kiln-tree: the input tree. Reads a source (a directory, a tar stream: plain, gzip, xz or
//! zstd, from a file or stdin) into a [`Tree`] of metadata plus references to file bytes, and
//! normalises it (sorted names, clamped times, optional all-root ownership).
//!
//! File bytes are never extracted or held wholesale: a directory's files are referenced by path,
//! an uncompressed tar file's by offset; a stream that cannot be read twice hands each file's
//! bytes to the writer's [`Placer`] as they go by.

#![forbid(unsafe_code)]

use std::io;
use std::path::{Path, PathBuf};

use kiln_formats::fstree::{Contents, FileData, Placer, Tree};

pub mod dir;
pub mod oci;
pub mod output;
pub mod progress;
pub mod spool;
pub mod tar;

/// Errors reading a source. Messages name the path, entry or byte offset at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error on a host path.
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    /// The source itself is unusable.
    #[error("{path}: {msg}")]
    Source { path: String, msg: String },
    /// A bad tar entry: `entry` is its name (as far as it could be read), `offset` the byte
    /// offset of its header in the uncompressed stream.
    #[error("tar entry {entry:?} at offset {offset}: {msg}")]
    Entry {
        entry: String,
        offset: u64,
        msg: String,
    },
    /// A malformed archive where no entry name is known.
    #[error("tar archive at offset {offset}: {msg}")]
    Archive { offset: u64, msg: String },
    /// The writer's [`Placer`] could not store an entry's data (typically: the image is full).
    #[error("tar entry {entry:?} at offset {offset}: {source}")]
    Place {
        entry: String,
        offset: u64,
        source: io::Error,
    },
    /// An error inside one layer of a container image; `layer` names the image, the layer's
    /// position and its digest.
    #[error("{layer}: {source}")]
    Layer { layer: String, source: Box<Error> },
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: io::Error) -> Self {
        Error::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// How to normalise a tree after reading.
#[derive(Clone, Debug, Default)]
pub struct Normalize {
    /// Clamp every mtime later than this (`SOURCE_DATE_EPOCH`) to it.
    pub source_date_epoch: Option<i64>,
    /// Make every file owned by uid 0 / gid 0.
    pub all_root: bool,
}

impl Normalize {
    /// Reads `SOURCE_DATE_EPOCH` from the environment (an error if set but not an integer).
    pub fn from_env(all_root: bool) -> Result<Self, Error> {
        let source_date_epoch = match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(v) => Some(v.trim().parse::<i64>().map_err(|_| Error::Source {
                path: "SOURCE_DATE_EPOCH".into(),
                msg: format!("{v:?} is not an integer number of seconds"),
            })?),
            Err(_) => None,
        };
        Ok(Self {
            source_date_epoch,
            all_root,
        })
    }

    /// Applies the normalisation to every node.
    pub fn apply(&self, tree: &mut Tree) {
        for n in &mut tree.nodes {
            if let Some(epoch) = self.source_date_epoch {
                if n.meta.mtime.sec > epoch || (n.meta.mtime.sec == epoch && n.meta.mtime.nsec > 0)
                {
                    n.meta.mtime = kiln_formats::fstree::Timestamp::from_secs(epoch);
                }
            }
            if self.all_root {
                n.meta.uid = 0;
                n.meta.gid = 0;
            }
        }
    }
}

/// What a source argument names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceArg {
    /// A host directory.
    Dir(PathBuf),
    /// A tar file (plain or compressed; detected by magic bytes).
    TarFile(PathBuf),
    /// A tar stream on standard input (`-`).
    Stdin,
    /// A container image (`oci://…`, `oci-layout:DIR[:TAG]`, `docker-archive:FILE`) and the
    /// architecture to pick from a multi-platform index (default: the host's).
    Image(oci::ImageRef, Option<String>),
}

impl SourceArg {
    /// Interprets a command-line source: `-` is stdin, a directory is a directory, anything else
    /// is a tar file.
    pub fn parse(arg: &Path) -> Self {
        if let Some(r) = arg.to_str().and_then(oci::ImageRef::parse) {
            return SourceArg::Image(r, None);
        }
        if arg == Path::new("-") {
            SourceArg::Stdin
        } else if arg.is_dir() {
            SourceArg::Dir(arg.to_path_buf())
        } else {
            SourceArg::TarFile(arg.to_path_buf())
        }
    }
}

/// A source opened for reading.
pub enum Opened {
    /// The whole tree is known and file bytes can be read on demand, in any order: a directory
    /// or an uncompressed tar file. Writers lay data out in canonical order.
    Indexed(Tree, SourceContents),
    /// A compressed tar or a pipe: one pass, file bytes go to the writer's [`Placer`] in the
    /// order they arrive.
    Stream(tar::TarStream),
}

/// Opens a source. Directories and uncompressed tar files are read (metadata only) right away.
pub fn open(arg: &SourceArg) -> Result<Opened, Error> {
    match arg {
        SourceArg::Dir(p) => Ok(Opened::Indexed(
            dir::read_dir_tree(p)?,
            SourceContents::Host,
        )),
        SourceArg::TarFile(p) => tar::open_file(p),
        SourceArg::Stdin => Ok(Opened::Stream(tar::TarStream::stdin()?)),
        SourceArg::Image(r, arch) => oci::open(r, arch.as_deref()),
    }
}

/// Reads any source into a tree in one go. For a stream, `placer` receives the file bytes.
pub fn read_with(
    arg: &SourceArg,
    placer: &mut dyn Placer,
) -> Result<(Tree, SourceContents), Error> {
    match open(arg)? {
        Opened::Indexed(t, c) => Ok((t, c)),
        Opened::Stream(s) => Ok((s.read(placer)?, SourceContents::Host)),
    }
}

/// Opens any source with random access to its file bytes: indexed sources as they are, a
/// stream (compressed tar, stdin) spooled once to an unlinked temp file.
pub fn open_random_access(arg: &SourceArg) -> Result<(Tree, SourceContents), Error> {
    open_random_access_image(arg).map(|(t, c, _)| (t, c))
}

/// [`open_random_access`], also returning a container image's configuration.
pub fn open_random_access_image(
    arg: &SourceArg,
) -> Result<(Tree, SourceContents, Option<oci::ImageConfig>), Error> {
    match open(arg)? {
        Opened::Indexed(t, c) => Ok((t, c, None)),
        Opened::Stream(s) => {
            let config = s.image_config().cloned();
            let mut spool = spool::Spool::new().map_err(|e| Error::Io {
                path: "temp spool".into(),
                source: e,
            })?;
            let mut t = s.read(&mut spool)?;
            let contents = spool.into_contents(&mut t).map_err(|e| Error::Io {
                path: "temp spool".into(),
                source: e,
            })?;
            Ok((t, SourceContents::Spool(contents), config))
        }
    }
}

/// Reads file bytes for the trees [`open`] returns.
#[derive(Debug)]
pub enum SourceContents {
    /// Host paths and inline data only.
    Host,
    /// Offsets into an uncompressed tar file (plus host paths and inline data).
    Tar(tar::TarContents),
    /// A once-read stream spooled to a temp file (see [`open_random_access`]): its files are
    /// [`DataRef::Tar`](kiln_formats::fstree::DataRef::Tar) offsets into the spool.
    Spool(tar::TarContents),
}

impl Contents for SourceContents {
    fn read_at(&self, file: &FileData, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match self {
            SourceContents::Host => kiln_formats::fstree::read_host_or_inline(file, offset, buf),
            SourceContents::Tar(t) => t.read_at(file, offset, buf),
            SourceContents::Spool(s) => s.read_at(file, offset, buf),
        }
    }
}
