//! Walks a tar archive entry by entry: reads each header, folds GNU long names, PAX extended
//! headers and sparse maps into one [`Entry`], and leaves the entry's data for the caller to
//! read (streaming) or skip (indexing).
//!
//! Robustness rules: every read is bounded (extended headers and long names by [`MAX_META`],
//! sparse maps by [`MAX_SPARSE_RUNS`], the whole input by an optional caller limit); every error
//! names the entry as far as it is known and the byte offset of the header block at fault in the
//! uncompressed stream.
//!
//! Data rules follow POSIX: hard links, symlinks, devices, directories and FIFOs carry no data
//! whatever their size field says (as Go's archive/tar also reads them), so a lying size on
//! those cannot make the reader swallow the following headers or skip gigabytes.

use std::io::{self, Write};

use kiln_formats::fstree::{Segment, Timestamp, Xattr};

use super::header::{self, cstr, parse_number, Header, BLOCK};
use super::input::Backend;
use super::pax::{self, Pax, Scope, MAX_SPARSE_RUNS};
use super::sparse;
use crate::Error;

/// Upper bound on the extended-header bytes (PAX records, GNU long names and links) that
/// precede one entry, and on all global PAX records together.
pub const MAX_META: u64 = 1 << 20;

/// What an entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A regular file (types `0`, NUL, `7`, and `S`).
    File,
    /// A hard link to an earlier entry (`linkname`).
    HardLink,
    /// A symbolic link.
    Symlink,
    /// A character device.
    Char,
    /// A block device.
    Block,
    /// A directory (types `5` and GNU `D`).
    Dir,
    /// A FIFO.
    Fifo,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::HardLink => "hardlink",
            Kind::Symlink => "symlink",
            Kind::Char => "char",
            Kind::Block => "block",
            Kind::Dir => "dir",
            Kind::Fifo => "fifo",
        }
    }
}

/// One archive member with everything its headers said about it.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Byte offset of the entry's main header (the one carrying its type) in the uncompressed
    /// stream.
    pub offset: u64,
    /// Path as stored (not yet normalised).
    pub path: Vec<u8>,
    /// Link target (hard and symbolic links).
    pub link: Vec<u8>,
    /// What the entry is.
    pub kind: Kind,
    /// Permission bits.
    pub perm: u16,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Modification time.
    pub mtime: Timestamp,
    /// Extended attributes, sorted by name.
    pub xattrs: Vec<Xattr>,
    /// Device numbers (devices only).
    pub dev: (u32, u32),
    /// Logical file size (the real size of a sparse file).
    pub size: u64,
    /// Bytes of file data stored in the archive (after any PAX 1.0 sparse map).
    pub stored: u64,
    /// Offset of the stored data in the uncompressed stream.
    pub data_offset: u64,
    /// Data runs of a sparse file, canonical (see [`sparse::canonical_runs`]).
    pub runs: Option<Vec<Segment>>,
}

impl Entry {
    /// The path for messages.
    pub fn display(&self) -> String {
        String::from_utf8_lossy(&self.path).into_owned()
    }
}

/// A PAX record: keyword and value.
type KeyValue = (Box<[u8]>, Box<[u8]>);

/// A PAX record and the offset of the extended header that held it.
type Record = (Box<[u8]>, Box<[u8]>, u64);

/// Extension headers seen before an entry's main header.
#[derive(Default)]
struct Pending {
    /// Offset of the first extension header.
    first: Option<u64>,
    /// PAX records of `x` headers, with the offset of the header that held them.
    records: Vec<Record>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    bytes: u64,
}

/// The entry-by-entry reader.
pub struct Parser<'t, B> {
    input: B,
    pos: u64,
    limit: Option<u64>,
    globals: Vec<KeyValue>,
    globals_bytes: u64,
    data_left: u64,
    pad: u64,
    current: Option<(String, u64)>,
    data_failure: Option<String>,
    ended: bool,
    trace: Option<&'t mut dyn Write>,
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn entry_err(entry: &[u8], offset: u64, msg: impl Into<String>) -> Error {
    Error::Entry {
        entry: lossy(entry),
        offset,
        msg: msg.into(),
    }
}

fn limit_error(limit: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::FileTooLarge,
        format!("input exceeds the limit of {limit} uncompressed bytes"),
    )
}

impl<'t, B: Backend> Parser<'t, B> {
    /// A parser over `input`, positioned at the start of the archive.
    pub fn new(input: B) -> Self {
        Self {
            input,
            pos: 0,
            limit: None,
            globals: Vec::new(),
            globals_bytes: 0,
            data_left: 0,
            pad: 0,
            current: None,
            data_failure: None,
            ended: false,
            trace: None,
        }
    }

    /// Refuses to read more than `limit` bytes of (uncompressed) input in total.
    pub fn set_limit(&mut self, limit: Option<u64>) {
        self.limit = limit;
    }

    /// Writes a line per header, extended record and entry to `out` (for [`super::dump`]).
    pub fn set_trace(&mut self, out: &'t mut dyn Write) {
        self.trace = Some(out);
    }

    fn trace(&mut self, line: std::fmt::Arguments<'_>) -> Result<(), Error> {
        if let Some(t) = self.trace.as_mut() {
            t.write_fmt(line)
                .and_then(|()| t.write_all(b"\n"))
                .map_err(|e| Error::Io {
                    path: "dump output".into(),
                    source: e,
                })?;
        }
        Ok(())
    }

    /// Reads until `buf` is full or the input ends; returns the bytes read. A read that
    /// would cross the caller's limit fails before reading.
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(l) = self.limit {
            if self.pos.saturating_add(buf.len() as u64) > l {
                return Err(limit_error(l));
            }
        }
        let mut n = 0;
        while n < buf.len() {
            let k = self.input.read(&mut buf[n..])?;
            if k == 0 {
                break;
            }
            n += k;
            self.pos += k as u64;
        }
        Ok(n)
    }

    /// Skips `n` bytes; returns how many were there before the input ended.
    fn skip(&mut self, n: u64) -> io::Result<u64> {
        if let Some(l) = self.limit {
            if self.pos.saturating_add(n) > l {
                return Err(limit_error(l));
            }
        }
        let k = self.input.skip(n)?;
        self.pos += k;
        Ok(k)
    }

    /// Reads the next block of the current entry's data region (PAX 1.0 sparse maps).
    fn data_block(&mut self, block: &mut [u8; BLOCK]) -> io::Result<()> {
        let n = self.fill(block)?;
        if n < BLOCK {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("archive ends at offset {}", self.pos),
            ));
        }
        Ok(())
    }

    /// Skips what is left of the current entry's data and padding.
    fn finish_data(&mut self) -> Result<(), Error> {
        let want = self.data_left + self.pad;
        self.data_left = 0;
        self.pad = 0;
        if want == 0 {
            return Ok(());
        }
        let start = self.pos;
        let (name, offset) = self.current.clone().unwrap_or_default();
        let got = self
            .skip(want)
            .map_err(|e| entry_err(name.as_bytes(), offset, format!("skipping data: {e}")))?;
        if got < want {
            return Err(entry_err(
                name.as_bytes(),
                offset,
                format!(
                    "archive truncated: {want} more bytes of data and padding expected from offset {start}, but the input ends at offset {}",
                    start + got
                ),
            ));
        }
        Ok(())
    }

    /// Reads an extension header's data (bounded by the caller) and its padding.
    fn read_meta(&mut self, size: u64, name: &[u8], offset: u64) -> Result<Vec<u8>, Error> {
        let mut data = vec![0u8; size as usize];
        let n = self
            .fill(&mut data)
            .map_err(|e| entry_err(name, offset, format!("reading extended header: {e}")))?;
        let pad = size.next_multiple_of(BLOCK as u64) - size;
        let p = if n as u64 == size {
            self.skip(pad)
                .map_err(|e| entry_err(name, offset, format!("reading extended header: {e}")))?
        } else {
            0
        };
        if n as u64 != size || p != pad {
            return Err(entry_err(
                name,
                offset,
                format!(
                    "archive truncated inside a {size}-byte extended header (input ends at offset {})",
                    self.pos
                ),
            ));
        }
        Ok(data)
    }

    /// The next entry, or `None` after the end-of-archive marker.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, Error> {
        if self.ended {
            return Ok(None);
        }
        self.finish_data()?;
        self.current = None;
        let mut pending = Pending::default();
        loop {
            let off = self.pos;
            let mut block = [0u8; BLOCK];
            let n = self.fill(&mut block).map_err(|e| Error::Archive {
                offset: off,
                msg: format!("reading header: {e}"),
            })?;
            if n == 0 {
                return Err(Error::Archive {
                    offset: off,
                    msg: if off == 0 {
                        "empty input: not a tar archive".into()
                    } else {
                        "input ends without the end-of-archive marker (two zero blocks): truncated archive?".into()
                    },
                });
            }
            if n < BLOCK {
                let name = cstr(&block[..n.min(100)]);
                return Err(Error::Archive {
                    offset: off,
                    msg: format!(
                        "truncated archive: the header block of {:?} has only {n} of 512 bytes",
                        lossy(name)
                    ),
                });
            }
            if block.iter().all(|&b| b == 0) {
                return self.end_marker(off, &pending).map(|()| None);
            }
            let h: Header = zerocopy::transmute!(block);
            let hdr_name = h.path_bytes();
            self.check_header(&h, &hdr_name, off)?;
            let size = field(&h.size, "size", &hdr_name, off)?;
            let size = u64::try_from(size)
                .map_err(|_| entry_err(&hdr_name, off, format!("negative size {size}")))?;
            self.trace(format_args!(
                "{off:>12}  header type={} name={:?} size={size} mode={} uid={} gid={} mtime={} magic={}",
                type_char(h.typeflag),
                lossy(&hdr_name),
                lossy(cstr(&h.mode)).trim(),
                lossy(cstr(&h.uid)).trim(),
                lossy(cstr(&h.gid)).trim(),
                parse_number(&h.mtime).map_or_else(|e| e.to_string(), |v| v.to_string()),
                if h.is_ustar() { "ustar" } else if h.is_gnu() { "gnu" } else { "v7" },
            ))?;
            match h.typeflag {
                header::PAX_LOCAL
                | header::PAX_SOLARIS
                | header::PAX_GLOBAL
                | header::GNU_LONGNAME
                | header::GNU_LONGLINK => {
                    pending.first.get_or_insert(off);
                    let global = h.typeflag == header::PAX_GLOBAL;
                    let used = if global {
                        self.globals_bytes
                    } else {
                        pending.bytes
                    };
                    if size > MAX_META || used + size > MAX_META {
                        return Err(entry_err(
                            &hdr_name,
                            off,
                            format!(
                                "extended header of {size} bytes exceeds the limit of {MAX_META} bytes of extended headers per entry"
                            ),
                        ));
                    }
                    let data = self.read_meta(size, &hdr_name, off)?;
                    self.extension(&h, &hdr_name, off, data, &mut pending)?;
                }
                header::GNU_VOLHDR => {
                    // A volume label names no file: skip it and its data.
                    self.current = Some((lossy(&hdr_name), off));
                    self.pad = size.next_multiple_of(BLOCK as u64);
                    self.finish_data()?;
                }
                _ => {
                    let e = self.entry(&h, hdr_name, off, size, pending)?;
                    self.trace(format_args!(
                        "{:>12}    => {} {:?} link={:?} perm={:o} uid={} gid={} mtime={}.{:09} size={} stored={} data@{} runs={:?} xattrs={:?}",
                        "",
                        e.kind.name(),
                        e.display(),
                        lossy(&e.link),
                        e.perm,
                        e.uid,
                        e.gid,
                        e.mtime.sec,
                        e.mtime.nsec,
                        e.size,
                        e.stored,
                        e.data_offset,
                        e.runs.as_ref().map(|r| r.iter().map(|s| (s.offset, s.len)).collect::<Vec<_>>()),
                        e.xattrs.iter().map(|x| lossy(&x.name)).collect::<Vec<_>>(),
                    ))?;
                    return Ok(Some(e));
                }
            }
        }
    }

    fn end_marker(&mut self, off: u64, pending: &Pending) -> Result<(), Error> {
        if let Some(first) = pending.first {
            return Err(Error::Archive {
                offset: first,
                msg: "extended header is not followed by an entry (end of archive instead)".into(),
            });
        }
        let mut second = [0u8; BLOCK];
        let n = self.fill(&mut second).map_err(|e| Error::Archive {
            offset: off + BLOCK as u64,
            msg: format!("reading end-of-archive marker: {e}"),
        })?;
        // GNU tar accepts a single zero block at the very end; anything after the marker
        // (record padding) is not read.
        if second[..n].iter().any(|&b| b != 0) {
            return Err(Error::Archive {
                offset: off,
                msg: "a lone zero block is followed by more headers (concatenated archives are not supported)".into(),
            });
        }
        self.trace(format_args!("{off:>12}  end of archive"))?;
        self.ended = true;
        Ok(())
    }

    fn check_header(&mut self, h: &Header, name: &[u8], off: u64) -> Result<(), Error> {
        let (stored, unsigned, signed) = h.checksums();
        match stored {
            Ok(s) if s == i64::from(unsigned) || s == i64::from(signed) => Ok(()),
            Ok(s) => Err(entry_err(
                name,
                off,
                format!(
                    "bad header checksum: the header says {s}, its bytes sum to {unsigned} (not a tar archive, or corrupted)"
                ),
            )),
            Err(e) => Err(entry_err(
                name,
                off,
                format!("unreadable header checksum field ({e}): not a tar archive, or corrupted"),
            )),
        }
    }

    fn extension(
        &mut self,
        h: &Header,
        name: &[u8],
        off: u64,
        data: Vec<u8>,
        pending: &mut Pending,
    ) -> Result<(), Error> {
        pending.bytes += data.len() as u64;
        match h.typeflag {
            header::GNU_LONGNAME => {
                let v = cstr(&data).to_vec();
                self.trace(format_args!("{:>12}    longname={:?}", "", lossy(&v)))?;
                pending.long_name = Some(v);
            }
            header::GNU_LONGLINK => {
                let v = cstr(&data).to_vec();
                self.trace(format_args!("{:>12}    longlink={:?}", "", lossy(&v)))?;
                pending.long_link = Some(v);
            }
            header::PAX_GLOBAL => {
                let mut records = Vec::new();
                let mut check = Pax::default();
                pax::for_each_record(&data, |k, v| {
                    check.apply(k, v, Scope::Global)?;
                    records.push((Box::<[u8]>::from(k), Box::<[u8]>::from(v)));
                    Ok(())
                })
                .map_err(|(at, m)| {
                    entry_err(
                        name,
                        off,
                        format!("global PAX record at data byte {at}: {m}"),
                    )
                })?;
                for (k, v) in records {
                    self.trace(format_args!(
                        "{:>12}    global {}={}",
                        "",
                        lossy(&k),
                        lossy(&v)
                    ))?;
                    self.globals_bytes += (k.len() + v.len()) as u64;
                    self.globals.retain(|(gk, _)| *gk != k);
                    if !v.is_empty() {
                        self.globals.push((k, v));
                    }
                }
            }
            _ => {
                let mut recs: Vec<Record> = Vec::new();
                pax::for_each_record(&data, |k, v| {
                    recs.push((k.into(), v.into(), off));
                    Ok(())
                })
                .map_err(|(at, m)| {
                    entry_err(name, off, format!("PAX record at data byte {at}: {m}"))
                })?;
                for (k, v, _) in &recs {
                    self.trace(format_args!("{:>12}    {}={}", "", lossy(k), lossy(v)))?;
                }
                pending.records.extend(recs);
            }
        }
        Ok(())
    }

    fn entry(
        &mut self,
        h: &Header,
        hdr_name: Vec<u8>,
        off: u64,
        size_field: u64,
        pending: Pending,
    ) -> Result<Entry, Error> {
        let mut pax = Pax::default();
        for (k, v) in &self.globals {
            // Validated when the global header was read.
            let _ = pax.apply(k, v, Scope::Global);
        }
        // The best name known so far, for messages.
        let mut name = pending
            .long_name
            .clone()
            .unwrap_or_else(|| hdr_name.clone());
        for (k, v, at) in &pending.records {
            if &**k == b"path" && !v.is_empty() {
                name = v.to_vec();
            }
            pax.apply(k, v, Scope::Local)
                .map_err(|m| entry_err(&name, *at, format!("PAX header: {m}")))?;
        }
        if let Some(real) = &pax.sparse.name {
            name = real.clone();
        }
        let path = name;
        let link = pax
            .linkpath
            .take()
            .or(pending.long_link)
            .unwrap_or_else(|| cstr(&h.linkname).to_vec());
        let err = |msg: String| entry_err(&path, off, msg);

        let kind = match h.typeflag {
            header::REGULAR | header::REGULAR_OLD | header::CONTIGUOUS
                if path.last() == Some(&b'/') =>
            {
                // Pre-POSIX archives mark directories with a trailing slash only.
                Kind::Dir
            }
            header::REGULAR | header::REGULAR_OLD | header::CONTIGUOUS | header::GNU_SPARSE => {
                Kind::File
            }
            header::HARDLINK => Kind::HardLink,
            header::SYMLINK => Kind::Symlink,
            header::CHAR => Kind::Char,
            header::BLOCKDEV => Kind::Block,
            header::DIR | header::GNU_DUMPDIR => Kind::Dir,
            header::FIFO => Kind::Fifo,
            header::GNU_MULTIVOL => {
                return Err(err(
                    "multi-volume continuation entries are not supported".into()
                ))
            }
            t => return Err(err(format!("unsupported entry type {:?}", type_char(t)))),
        };

        let mode = field(&h.mode, "mode", &path, off)?;
        let perm = (mode & 0o7777) as u16;
        let id = |v: Option<u32>, f: &[u8], what: &str| -> Result<u32, Error> {
            match v {
                Some(v) => Ok(v),
                None => {
                    let n = field(f, what, &path, off)?;
                    u32::try_from(n).map_err(|_| {
                        entry_err(&path, off, format!("{what} {n} is not a 32-bit id"))
                    })
                }
            }
        };
        let uid = id(pax.uid, &h.uid, "uid")?;
        let gid = id(pax.gid, &h.gid, "gid")?;
        let mtime = match pax.mtime {
            Some(t) => t,
            None => Timestamp::from_secs(field(&h.mtime, "mtime", &path, off)?),
        };
        let dev = if matches!(kind, Kind::Char | Kind::Block) {
            (
                id(pax.devmajor, &h.devmajor, "devmajor")?,
                id(pax.devminor, &h.devminor, "devminor")?,
            )
        } else {
            (0, 0)
        };
        let size = pax.size.unwrap_or(size_field);
        if size > i64::MAX as u64 {
            return Err(err(format!("size {size} is larger than 2^63-1 bytes")));
        }
        let xattrs = std::mem::take(&mut pax.xattrs)
            .into_iter()
            .map(|(name, value)| Xattr { name, value })
            .collect();

        // The data region: header-only types have none, whatever their size says.
        let has_data = kind == Kind::File || h.typeflag == header::GNU_DUMPDIR;
        let region = if has_data {
            size.next_multiple_of(BLOCK as u64)
        } else {
            0
        };
        let data_len = if has_data { size } else { 0 };
        self.current = Some((lossy(&path), off));

        let mut logical = data_len;
        let mut consumed = 0u64;
        let mut runs = None;
        if kind == Kind::File && h.typeflag == header::GNU_SPARSE {
            let gnu = h.gnu();
            let realsize = field(&gnu.realsize, "realsize", &path, off)?;
            let realsize = u64::try_from(realsize)
                .map_err(|_| err(format!("negative sparse real size {realsize}")))?;
            let mut pairs = Vec::new();
            push_pairs(&gnu.sparse, &mut pairs, &path, off)?;
            let mut more = gnu.isextended != 0;
            while more {
                if pairs.len() > MAX_SPARSE_RUNS {
                    return Err(err(format!(
                        "sparse map has more than {MAX_SPARSE_RUNS} runs"
                    )));
                }
                let ext_off = self.pos;
                let mut block = [0u8; BLOCK];
                let n = self.fill(&mut block).map_err(|e| {
                    entry_err(
                        &path,
                        ext_off,
                        format!("reading sparse extension block: {e}"),
                    )
                })?;
                if n < BLOCK {
                    return Err(entry_err(
                        &path,
                        ext_off,
                        "archive truncated inside the sparse map's extension blocks",
                    ));
                }
                let ext: header::GnuSparseExt = zerocopy::transmute!(block);
                push_pairs(&ext.sparse, &mut pairs, &path, ext_off)?;
                more = ext.isextended != 0;
            }
            runs = Some(
                sparse::canonical_runs(&pairs, realsize, data_len)
                    .map_err(|m| err(format!("old GNU sparse map: {m}")))?,
            );
            logical = realsize;
        } else if kind == Kind::File && pax.sparse.present() {
            let s = &pax.sparse;
            let realsize = s.realsize.ok_or_else(|| {
                err("PAX sparse entry without GNU.sparse.realsize or GNU.sparse.size".into())
            })?;
            let pairs = if s.major == Some(1) {
                let (pairs, used) = sparse::read_map_v1(data_len, |b| self.data_block(b))
                    .map_err(|m| entry_err(&path, off, format!("PAX 1.0 sparse map: {m}")))?;
                consumed = used;
                pairs
            } else {
                if s.pending_offset.is_some() {
                    return Err(err(
                        "GNU.sparse.offset without its GNU.sparse.numbytes".into()
                    ));
                }
                if let Some(n) = s.numblocks {
                    if n != s.map.len() as u64 {
                        return Err(err(format!(
                            "GNU.sparse.numblocks={n} but the map has {} pairs",
                            s.map.len()
                        )));
                    }
                }
                s.map.clone()
            };
            runs = Some(
                sparse::canonical_runs(&pairs, realsize, data_len - consumed)
                    .map_err(|m| err(format!("PAX sparse map: {m}")))?,
            );
            logical = realsize;
        }
        let stored = data_len - consumed;
        self.data_left = stored;
        self.pad = region - data_len;
        let (kind, size) = if kind == Kind::File {
            (kind, logical)
        } else {
            (kind, 0)
        };
        Ok(Entry {
            offset: off,
            path,
            link,
            kind,
            perm,
            uid,
            gid,
            mtime,
            xattrs,
            dev,
            size,
            stored: if kind == Kind::File { stored } else { 0 },
            data_offset: self.pos,
            runs,
        })
    }

    /// Reads up to `buf.len()` bytes of the current entry's data. Returns 0 at its end. If the
    /// input fails or ends early, the error is also kept for [`Parser::take_data_failure`].
    pub fn read_data(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.data_left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let mut want = buf
            .len()
            .min(usize::try_from(self.data_left).unwrap_or(usize::MAX));
        let start = self.pos;
        if let Some(l) = self.limit {
            // Hand out data up to the limit; the read after that reports it.
            let allowed = l.saturating_sub(start);
            if allowed == 0 {
                let e = limit_error(l);
                self.data_failure = Some(format!("reading data at offset {start}: {e}"));
                return Err(e);
            }
            want = want.min(usize::try_from(allowed).unwrap_or(usize::MAX));
        }
        let n = match self.fill(&mut buf[..want]) {
            Ok(n) => n,
            Err(e) => {
                self.data_failure = Some(format!("reading data at offset {start}: {e}"));
                return Err(e);
            }
        };
        if n == 0 {
            let msg = format!(
                "archive truncated: {} more bytes of data expected, but the input ends at offset {start}",
                self.data_left
            );
            self.data_failure = Some(msg.clone());
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, msg));
        }
        self.data_left -= n as u64;
        Ok(n)
    }

    /// Why the last [`Parser::read_data`] failed, if it was the archive's fault.
    pub fn take_data_failure(&mut self) -> Option<String> {
        self.data_failure.take()
    }

    /// Bytes of the current entry's data not read yet.
    pub fn data_left(&self) -> u64 {
        self.data_left
    }

    /// After the end-of-archive marker of a stream: reads the input to its end, so that the
    /// decompressor checks its trailer (gzip CRC-32 and ISIZE, xz and zstd checksums) and
    /// rejects bytes after the last compressed member. What follows the marker must be zero
    /// (record padding), at most [`MAX_TRAILER`] bytes, and within the caller's limit.
    pub fn finish_stream(&mut self) -> Result<(), Error> {
        let start = self.pos;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let room = MAX_TRAILER.saturating_sub(self.pos - start);
            if room == 0 {
                return Err(Error::Archive {
                    offset: start,
                    msg: format!(
                        "more than {MAX_TRAILER} bytes follow the end-of-archive marker (not record padding)"
                    ),
                });
            }
            let want = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
            let at = self.pos;
            let n = self.fill(&mut buf[..want]).map_err(|e| Error::Archive {
                offset: at,
                msg: format!(
                    "reading to the end of the stream after the end-of-archive marker: {e}"
                ),
            })?;
            if n == 0 {
                return Ok(());
            }
            if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
                return Err(Error::Archive {
                    offset: at + i as u64,
                    msg: "non-zero data after the end-of-archive marker (concatenated archives are not supported)".into(),
                });
            }
        }
    }
}

/// Bytes of zero padding a stream may carry after its end-of-archive marker. GNU tar pads to
/// its record size (10 KiB by default, up to a few MiB with a large blocking factor).
pub const MAX_TRAILER: u64 = 16 << 20;

/// A numeric header field, or an error naming it.
fn field(f: &[u8], what: &str, name: &[u8], off: u64) -> Result<i64, Error> {
    parse_number(f).map_err(|e| {
        entry_err(
            name,
            off,
            format!("{what} field {:?}: {e}", lossy(cstr(f)).trim()),
        )
    })
}

fn push_pairs(
    fields: &[header::SparseField],
    pairs: &mut Vec<(u64, u64)>,
    name: &[u8],
    off: u64,
) -> Result<(), Error> {
    for f in fields {
        if f.offset[0] == 0 {
            // An unused slot; the rest are unused too.
            break;
        }
        let o = field(&f.offset, "sparse offset", name, off)?;
        let n = field(&f.numbytes, "sparse length", name, off)?;
        let (Ok(o), Ok(n)) = (u64::try_from(o), u64::try_from(n)) else {
            return Err(entry_err(name, off, "negative number in the sparse map"));
        };
        pairs.push((o, n));
    }
    Ok(())
}

fn type_char(t: u8) -> String {
    if t.is_ascii_graphic() {
        (t as char).to_string()
    } else {
        format!("\\x{t:02x}")
    }
}
