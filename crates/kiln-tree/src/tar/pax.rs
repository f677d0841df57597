//! PAX extended headers (POSIX.1-2017, `pax` utility, "pax Extended Header").
//!
//! An extended header's data is a sequence of records `"%d %s=%s\n"`: the decimal length of the
//! whole record (including the length digits and the newline), a space, a keyword, `=`, and a
//! value that may hold any bytes. A type `x` header applies to the next entry only; a type `g`
//! header to every following entry. Keywords kiln reads:
//!
//! * `path`, `linkpath`, `size`, `uid`, `gid`, `mtime` (decimal seconds with an optional
//!   fraction and sign) from POSIX;
//! * `SCHILY.xattr.NAME` (raw value) from star and GNU tar, `LIBARCHIVE.xattr.NAME` (NAME
//!   percent-encoded, value base64) from libarchive, `SCHILY.devmajor`/`SCHILY.devminor`;
//! * `GNU.sparse.*` for GNU tar's PAX sparse formats 0.0, 0.1 and 1.0 (GNU tar manual,
//!   "Storing Sparse Files").
//!
//! Other keywords (atime, ctime, uname, gname, charset, comments, vendor keys) are ignored, as
//! POSIX allows for keywords an implementation does not use.

use std::collections::BTreeMap;

use base64::Engine;
use kiln_formats::fstree::Timestamp;

/// Upper bound on the pairs of a GNU sparse map (any of its encodings). A map entry costs 16
/// bytes of memory, so this caps one entry's map at 16 MiB.
pub const MAX_SPARSE_RUNS: usize = 1 << 20;

/// The values an extended header (or several, merged) supplies for one entry.
#[derive(Clone, Debug, Default)]
pub struct Pax {
    /// `path`: the entry name, overriding the header's.
    pub path: Option<Vec<u8>>,
    /// `linkpath`: the link target.
    pub linkpath: Option<Vec<u8>>,
    /// `size`: bytes of data following the header.
    pub size: Option<u64>,
    /// `uid`.
    pub uid: Option<u32>,
    /// `gid`.
    pub gid: Option<u32>,
    /// `mtime`, with nanoseconds.
    pub mtime: Option<Timestamp>,
    /// `SCHILY.devmajor`.
    pub devmajor: Option<u32>,
    /// `SCHILY.devminor`.
    pub devminor: Option<u32>,
    /// Extended attributes by full name; a later record for the same name wins.
    pub xattrs: BTreeMap<Box<[u8]>, Box<[u8]>>,
    /// `GNU.sparse.*` keywords.
    pub sparse: SparseKeys,
}

/// The `GNU.sparse.*` keywords of one entry.
#[derive(Clone, Debug, Default)]
pub struct SparseKeys {
    /// `GNU.sparse.major` (1 for format 1.0).
    pub major: Option<u64>,
    /// `GNU.sparse.minor`.
    pub minor: Option<u64>,
    /// `GNU.sparse.name`: the real name (formats 0.1 and 1.0).
    pub name: Option<Vec<u8>>,
    /// `GNU.sparse.realsize` (1.0) or `GNU.sparse.size` (0.x): the logical file size.
    pub realsize: Option<u64>,
    /// `GNU.sparse.numblocks` (0.x): how many pairs the map has.
    pub numblocks: Option<u64>,
    /// Pairs from repeated `GNU.sparse.offset`/`GNU.sparse.numbytes` records (0.0) or from
    /// `GNU.sparse.map` (0.1).
    pub map: Vec<(u64, u64)>,
    /// A `GNU.sparse.offset` waiting for its `numbytes`.
    pub pending_offset: Option<u64>,
}

impl SparseKeys {
    /// True when any keyword marks the entry as a PAX sparse file.
    pub fn present(&self) -> bool {
        self.major.is_some() || self.realsize.is_some() || self.numblocks.is_some()
    }
}

/// Splits extended header data into (keyword, value) records, calling `f` for each. Errors
/// give the byte offset of the bad record within the data.
pub fn for_each_record(
    data: &[u8],
    mut f: impl FnMut(&[u8], &[u8]) -> Result<(), String>,
) -> Result<(), (usize, String)> {
    let mut at = 0usize;
    while at < data.len() {
        let rest = &data[at..];
        // Some writers pad the data with NULs; nothing else may follow the last record.
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let space = rest
            .iter()
            .take(20)
            .position(|&b| b == b' ')
            .ok_or((at, "record does not start with `LENGTH `".to_string()))?;
        let len_digits = &rest[..space];
        if len_digits.is_empty() || !len_digits.iter().all(u8::is_ascii_digit) {
            return Err((at, "record length is not a decimal number".into()));
        }
        let len: usize = std::str::from_utf8(len_digits)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or((at, "record length out of range".to_string()))?;
        if len <= space + 1 || len > rest.len() {
            return Err((
                at,
                format!(
                    "record length {len} does not fit the {} bytes that remain",
                    rest.len()
                ),
            ));
        }
        let record = &rest[space + 1..len];
        let Some((&b'\n', body)) = record.split_last() else {
            return Err((
                at,
                format!("record of length {len} does not end in a newline"),
            ));
        };
        let eq = body
            .iter()
            .position(|&b| b == b'=')
            .ok_or((at, "record has no `=`".to_string()))?;
        let (key, value) = (&body[..eq], &body[eq + 1..]);
        if key.is_empty() {
            return Err((at, "record has an empty keyword".into()));
        }
        f(key, value).map_err(|m| (at, m))?;
        at += len;
    }
    Ok(())
}

fn text(v: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(v).map_err(|_| format!("value {:?} is not text", lossy(v)))
}

fn lossy(v: &[u8]) -> String {
    let s = String::from_utf8_lossy(v);
    if s.len() > 64 {
        let mut end = 64;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    } else {
        s.into_owned()
    }
}

/// A non-negative decimal number.
pub fn decimal(key: &[u8], v: &[u8]) -> Result<u64, String> {
    let s = text(v)?;
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{}={:?}: expected a decimal number",
            lossy(key),
            lossy(v)
        ));
    }
    s.parse()
        .map_err(|_| format!("{}={s}: number out of range", lossy(key)))
}

fn id(key: &[u8], v: &[u8]) -> Result<u32, String> {
    let n = decimal(key, v)?;
    u32::try_from(n).map_err(|_| format!("{}={n}: larger than 2^32-1", lossy(key)))
}

/// A PAX time: `[-]SECONDS[.FRACTION]`. The fraction is cut to nanoseconds; a negative time
/// `-1.25` is 1.25 s before the epoch, i.e. `sec = -2, nsec = 750_000_000`.
pub fn parse_time(v: &[u8]) -> Result<Timestamp, String> {
    let bad = || format!("time {:?} is not `[-]SECONDS[.FRACTION]`", lossy(v));
    let (negative, rest) = match v.split_first() {
        Some((b'-', r)) => (true, r),
        _ => (false, v),
    };
    let (int, frac) = match rest.iter().position(|&b| b == b'.') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    if int.is_empty() || !int.iter().all(u8::is_ascii_digit) || !frac.iter().all(u8::is_ascii_digit)
    {
        return Err(bad());
    }
    let mut sec: i64 = 0;
    for &d in int {
        sec = sec
            .checked_mul(10)
            .and_then(|s| s.checked_add(i64::from(d - b'0')))
            .ok_or_else(bad)?;
    }
    let mut nsec: u32 = 0;
    for i in 0..9 {
        nsec = nsec * 10 + frac.get(i).map_or(0, |&d| u32::from(d - b'0'));
    }
    if negative {
        if nsec > 0 {
            sec = sec.checked_add(1).ok_or_else(bad)?;
            nsec = 1_000_000_000 - nsec;
        }
        sec = -sec;
    }
    Ok(Timestamp { sec, nsec })
}

/// Decodes `%XX` escapes in a libarchive xattr name.
fn percent_decode(v: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        if v[i] == b'%' {
            let hex = v
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad %-escape in xattr name {:?}", lossy(v)))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(v[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn check_xattr_name(name: &[u8]) -> Result<(), String> {
    if name.is_empty() || name.contains(&0) {
        return Err(format!(
            "xattr name {:?} is empty or contains NUL",
            lossy(name)
        ));
    }
    Ok(())
}

/// Which kind of extended header a record came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Type `x`: the next entry only.
    Local,
    /// Type `g`: all following entries.
    Global,
}

impl Pax {
    /// Applies one record. An empty value removes what an earlier (global) record set, as
    /// POSIX specifies. `path`, `linkpath`, `size` and sparse maps in a global header would
    /// apply one name or size to every entry; they are ignored there.
    pub fn apply(&mut self, key: &[u8], v: &[u8], scope: Scope) -> Result<(), String> {
        let global = scope == Scope::Global;
        let empty = v.is_empty();
        match key {
            b"path" if !global => self.path = (!empty).then(|| v.to_vec()),
            b"linkpath" if !global => self.linkpath = (!empty).then(|| v.to_vec()),
            b"size" if !global => self.size = if empty { None } else { Some(decimal(key, v)?) },
            b"uid" => self.uid = if empty { None } else { Some(id(key, v)?) },
            b"gid" => self.gid = if empty { None } else { Some(id(key, v)?) },
            b"mtime" => self.mtime = if empty { None } else { Some(parse_time(v)?) },
            b"SCHILY.devmajor" => self.devmajor = if empty { None } else { Some(id(key, v)?) },
            b"SCHILY.devminor" => self.devminor = if empty { None } else { Some(id(key, v)?) },
            _ if key.starts_with(b"SCHILY.xattr.") => {
                let name = &key[b"SCHILY.xattr.".len()..];
                check_xattr_name(name)?;
                self.xattrs.insert(name.into(), v.into());
            }
            _ if key.starts_with(b"LIBARCHIVE.xattr.") => {
                let name = percent_decode(&key[b"LIBARCHIVE.xattr.".len()..])?;
                check_xattr_name(&name)?;
                let value = base64::engine::GeneralPurpose::new(
                    &base64::alphabet::STANDARD,
                    base64::engine::GeneralPurposeConfig::new()
                        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
                )
                .decode(v)
                .map_err(|e| format!("xattr {:?}: value is not base64: {e}", lossy(&name)))?;
                self.xattrs.insert(name.into(), value.into());
            }
            _ if key.starts_with(b"GNU.sparse.") && !global => self.apply_sparse(key, v)?,
            _ => {}
        }
        Ok(())
    }

    fn apply_sparse(&mut self, key: &[u8], v: &[u8]) -> Result<(), String> {
        let s = &mut self.sparse;
        match &key[b"GNU.sparse.".len()..] {
            b"major" => s.major = Some(decimal(key, v)?),
            b"minor" => s.minor = Some(decimal(key, v)?),
            b"name" => s.name = Some(v.to_vec()),
            b"realsize" | b"size" => s.realsize = Some(decimal(key, v)?),
            b"numblocks" => {
                let n = decimal(key, v)?;
                if n > MAX_SPARSE_RUNS as u64 {
                    return Err(format!(
                        "GNU.sparse.numblocks={n}: more than {MAX_SPARSE_RUNS} runs"
                    ));
                }
                s.numblocks = Some(n);
            }
            b"offset" => {
                if s.pending_offset.is_some() {
                    return Err("GNU.sparse.offset without its GNU.sparse.numbytes".into());
                }
                s.pending_offset = Some(decimal(key, v)?);
            }
            b"numbytes" => {
                let off = s
                    .pending_offset
                    .take()
                    .ok_or("GNU.sparse.numbytes without a GNU.sparse.offset before it")?;
                if s.map.len() >= MAX_SPARSE_RUNS {
                    return Err(format!("sparse map has more than {MAX_SPARSE_RUNS} runs"));
                }
                s.map.push((off, decimal(key, v)?));
            }
            b"map" => {
                let t = text(v)?;
                let nums: Vec<&str> = if t.is_empty() {
                    Vec::new()
                } else {
                    t.split(',').collect()
                };
                if !nums.len().is_multiple_of(2) {
                    return Err("GNU.sparse.map has an odd count of numbers".into());
                }
                if nums.len() / 2 > MAX_SPARSE_RUNS {
                    return Err(format!("sparse map has more than {MAX_SPARSE_RUNS} runs"));
                }
                s.map.clear();
                for pair in nums.chunks_exact(2) {
                    let off = decimal(key, pair[0].as_bytes())?;
                    let len = decimal(key, pair[1].as_bytes())?;
                    s.map.push((off, len));
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    type Records = Vec<(String, Vec<u8>)>;

    fn records(data: &[u8]) -> Result<Records, (usize, String)> {
        let mut out = Vec::new();
        for_each_record(data, |k, v| {
            out.push((String::from_utf8_lossy(k).into_owned(), v.to_vec()));
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn record_framing() {
        let ok = records(b"11 path=ab\n16 mtime=1.5e\nx\n\0\0\0").unwrap();
        assert_eq!(ok[0], ("path".into(), b"ab".to_vec()));
        assert_eq!(
            ok[1],
            ("mtime".into(), b"1.5e\nx".to_vec()),
            "values may hold newlines"
        );
        for (bad, at) in [
            (&b"11 path=ab"[..], 0),
            (b"9 path=ab\n", 0),
            (b"x1 path=ab\n", 0),
            (b"11 path=abX", 0),
            (b"11 path=ab\n12 pathab\n", 11),
            (b"99999999999999999999999 a=b\n", 0),
            (b"11 path=ab\nzzz", 11),
            (b"6 =ab\n", 0),
        ] {
            let e = records(bad).unwrap_err();
            assert_eq!(e.0, at, "{:?}: {}", String::from_utf8_lossy(bad), e.1);
        }
    }

    #[test]
    fn times() {
        for (s, sec, nsec) in [
            ("0", 0, 0),
            ("1700000000.123456789", 1_700_000_000, 123_456_789),
            ("1.5", 1, 500_000_000),
            ("1.0000000019", 1, 1),
            ("-1.25", -2, 750_000_000),
            ("-31536000", -31_536_000, 0),
            ("-0.000000001", -1, 999_999_999),
        ] {
            assert_eq!(parse_time(s.as_bytes()), Ok(Timestamp { sec, nsec }), "{s}");
        }
        for bad in ["", "-", "1.2.3", "1e9", " 1", "99999999999999999999"] {
            assert!(parse_time(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn xattr_keywords() {
        let mut p = Pax::default();
        p.apply(b"SCHILY.xattr.user.a", b"raw\0bytes", Scope::Local)
            .unwrap();
        p.apply(b"LIBARCHIVE.xattr.user.b%3Dc%25", b"Yg", Scope::Local)
            .unwrap();
        p.apply(b"LIBARCHIVE.xattr.user.d", b"AAEC/w==", Scope::Local)
            .unwrap();
        assert_eq!(&*p.xattrs[&b"user.a"[..]], b"raw\0bytes");
        assert_eq!(&*p.xattrs[&b"user.b=c%"[..]], b"b");
        assert_eq!(&*p.xattrs[&b"user.d"[..]], &[0, 1, 2, 255]);
        assert!(p
            .apply(b"LIBARCHIVE.xattr.user.e", b"!!", Scope::Local)
            .is_err());
        assert!(p
            .apply(b"LIBARCHIVE.xattr.user.%zz", b"", Scope::Local)
            .is_err());
        assert!(p.apply(b"SCHILY.xattr.", b"x", Scope::Local).is_err());
    }

    #[test]
    fn globals_skip_names_and_empty_values_reset() {
        let mut p = Pax::default();
        p.apply(b"path", b"every/entry", Scope::Global).unwrap();
        p.apply(b"uid", b"7", Scope::Global).unwrap();
        assert_eq!(p.path, None);
        assert_eq!(p.uid, Some(7));
        p.apply(b"uid", b"", Scope::Local).unwrap();
        assert_eq!(p.uid, None);
        assert!(p.apply(b"uid", b"4294967296", Scope::Local).is_err());
    }

    #[test]
    fn sparse_keywords() {
        let mut p = Pax::default();
        for (k, v) in [
            ("GNU.sparse.size", "100"),
            ("GNU.sparse.numblocks", "2"),
            ("GNU.sparse.offset", "0"),
            ("GNU.sparse.numbytes", "10"),
            ("GNU.sparse.offset", "50"),
            ("GNU.sparse.numbytes", "5"),
        ] {
            p.apply(k.as_bytes(), v.as_bytes(), Scope::Local).unwrap();
        }
        assert_eq!(p.sparse.map, [(0, 10), (50, 5)]);
        assert_eq!(p.sparse.realsize, Some(100));
        let mut q = Pax::default();
        q.apply(b"GNU.sparse.map", b"1,2,3,4", Scope::Local)
            .unwrap();
        assert_eq!(q.sparse.map, [(1, 2), (3, 4)]);
        assert!(q.apply(b"GNU.sparse.map", b"1,2,3", Scope::Local).is_err());
        assert!(q.apply(b"GNU.sparse.numbytes", b"1", Scope::Local).is_err());
        assert!(q
            .apply(b"GNU.sparse.numblocks", b"99999999999", Scope::Local)
            .is_err());
    }
}
