//! The 512-byte tar header block and its numeric fields.
//!
//! Layout from POSIX.1-2017, `pax` utility, "ustar Interchange Format" (the common first 345
//! bytes and the 155-byte `prefix`), and the GNU tar manual, "Basic Tar Format" (the old GNU
//! variant that reuses the prefix area for times, a 4-entry sparse map and the real size, and
//! the 512-byte sparse extension block that follows a type `S` header).
//!
//! Numbers are ASCII octal, NUL- or space-terminated; GNU tar and star store values that do not
//! fit as big-endian base-256 with the top bit of the first byte set (`0x80` positive, `0xff`
//! negative, two's complement over the whole field).

use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

/// Size of every tar block: headers, extension blocks and data padding.
pub const BLOCK: usize = 512;

/// Typeflag: regular file.
pub const REGULAR: u8 = b'0';
/// Typeflag: regular file written by pre-POSIX tars (a NUL byte).
pub const REGULAR_OLD: u8 = 0;
/// Typeflag: hard link to the entry named by `linkname`.
pub const HARDLINK: u8 = b'1';
/// Typeflag: symbolic link to `linkname`.
pub const SYMLINK: u8 = b'2';
/// Typeflag: character device.
pub const CHAR: u8 = b'3';
/// Typeflag: block device.
pub const BLOCKDEV: u8 = b'4';
/// Typeflag: directory.
pub const DIR: u8 = b'5';
/// Typeflag: FIFO.
pub const FIFO: u8 = b'6';
/// Typeflag: contiguous file (treated as a regular file, as POSIX allows).
pub const CONTIGUOUS: u8 = b'7';
/// Typeflag: PAX extended header for the next entry.
pub const PAX_LOCAL: u8 = b'x';
/// Typeflag: PAX global extended header.
pub const PAX_GLOBAL: u8 = b'g';
/// Typeflag: Solaris' spelling of a PAX extended header (same record format).
pub const PAX_SOLARIS: u8 = b'X';
/// Typeflag: GNU long name for the next entry (data = the name, NUL-terminated).
pub const GNU_LONGNAME: u8 = b'L';
/// Typeflag: GNU long link target for the next entry.
pub const GNU_LONGLINK: u8 = b'K';
/// Typeflag: old GNU sparse file.
pub const GNU_SPARSE: u8 = b'S';
/// Typeflag: GNU dumpdir (a directory whose data lists its contents for incremental dumps).
pub const GNU_DUMPDIR: u8 = b'D';
/// Typeflag: GNU volume label (not a file).
pub const GNU_VOLHDR: u8 = b'V';
/// Typeflag: GNU multi-volume continuation (unsupported).
pub const GNU_MULTIVOL: u8 = b'M';

/// `magic` + `version` of a POSIX ustar header.
pub const MAGIC_USTAR: &[u8; 8] = b"ustar\x0000";
/// `magic` + `version` of an old GNU header.
pub const MAGIC_GNU: &[u8; 8] = b"ustar  \x00";

/// One 512-byte header block. All fields are ASCII; there is no endianness.
#[derive(Clone, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Header {
    /// Entry name (last part of the path for ustar), NUL-terminated unless all 100 bytes are used.
    pub name: [u8; 100],
    /// Permission bits (and, in old archives, file type bits), octal.
    pub mode: [u8; 8],
    /// Owner user id, octal or base-256.
    pub uid: [u8; 8],
    /// Owner group id, octal or base-256.
    pub gid: [u8; 8],
    /// Bytes of data that follow the header (padded to 512), octal or base-256.
    pub size: [u8; 12],
    /// Modification time in seconds since the epoch, octal or base-256 (may be negative).
    pub mtime: [u8; 12],
    /// Sum of the 512 header bytes, counting this field as eight spaces; octal.
    pub chksum: [u8; 8],
    /// Entry type, one of the typeflag constants.
    pub typeflag: u8,
    /// Link target for hard and symbolic links.
    pub linkname: [u8; 100],
    /// `ustar\0` (POSIX) or `ustar ` (old GNU); absent in V7 archives.
    pub magic: [u8; 6],
    /// `00` (POSIX) or ` \0` (old GNU).
    pub version: [u8; 2],
    /// Owner user name (unused: kiln keeps numeric ids).
    pub uname: [u8; 32],
    /// Owner group name (unused).
    pub gname: [u8; 32],
    /// Device major number for character and block devices, octal.
    pub devmajor: [u8; 8],
    /// Device minor number, octal.
    pub devminor: [u8; 8],
    /// The format-specific rest: [`UstarTail`] or [`GnuTail`].
    pub tail: [u8; 167],
}
const _: () = assert!(size_of::<Header>() == BLOCK);
const _: () = assert!(std::mem::offset_of!(Header, chksum) == 148);
const _: () = assert!(std::mem::offset_of!(Header, typeflag) == 156);
const _: () = assert!(std::mem::offset_of!(Header, magic) == 257);
const _: () = assert!(std::mem::offset_of!(Header, tail) == 345);

/// The rest of a POSIX ustar header.
#[derive(Clone, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct UstarTail {
    /// Leading directories of the path, joined to `name` with a `/` when non-empty.
    pub prefix: [u8; 155],
    /// Unused.
    pub pad: [u8; 12],
}
const _: () = assert!(size_of::<UstarTail>() == 167);

/// One (offset, length) pair of an old GNU sparse map.
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct SparseField {
    /// Logical byte offset of a data run, octal; empty (NUL) for an unused slot.
    pub offset: [u8; 12],
    /// Length of the run in bytes, octal.
    pub numbytes: [u8; 12],
}
const _: () = assert!(size_of::<SparseField>() == 24);

/// The rest of an old GNU header (`struct oldgnu_header`).
#[derive(Clone, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct GnuTail {
    /// Access time (incremental dumps only), octal.
    pub atime: [u8; 12],
    /// Change time (incremental dumps only), octal.
    pub ctime: [u8; 12],
    /// Offset of this part in a multi-volume archive.
    pub offset: [u8; 12],
    /// Unused.
    pub longnames: [u8; 4],
    /// Unused.
    pub unused: u8,
    /// First four runs of a type `S` sparse map.
    pub sparse: [SparseField; 4],
    /// Non-zero when a [`GnuSparseExt`] block follows with more runs.
    pub isextended: u8,
    /// Logical size of a sparse file, octal or base-256.
    pub realsize: [u8; 12],
    /// Unused.
    pub pad: [u8; 17],
}
const _: () = assert!(size_of::<GnuTail>() == 167);
const _: () = assert!(std::mem::offset_of!(GnuTail, sparse) == 386 - 345);
const _: () = assert!(std::mem::offset_of!(GnuTail, realsize) == 483 - 345);

/// A sparse extension block following a type `S` header whose `isextended` is set.
#[derive(Clone, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct GnuSparseExt {
    /// 21 more runs.
    pub sparse: [SparseField; 21],
    /// Non-zero when another extension block follows.
    pub isextended: u8,
    /// Unused.
    pub pad: [u8; 7],
}
const _: () = assert!(size_of::<GnuSparseExt>() == BLOCK);

impl Header {
    /// An all-zero header (used to build archives in tests and to detect end-of-archive).
    pub fn zeroed() -> Self {
        <Self as FromZeros>::new_zeroed()
    }

    /// The ustar tail view.
    pub fn ustar(&self) -> &UstarTail {
        zerocopy::transmute_ref!(&self.tail)
    }

    /// The old GNU tail view.
    pub fn gnu(&self) -> &GnuTail {
        zerocopy::transmute_ref!(&self.tail)
    }

    /// Mutable old GNU tail view.
    pub fn gnu_mut(&mut self) -> &mut GnuTail {
        zerocopy::transmute_mut!(&mut self.tail)
    }

    /// Mutable ustar tail view.
    pub fn ustar_mut(&mut self) -> &mut UstarTail {
        zerocopy::transmute_mut!(&mut self.tail)
    }

    /// `magic` and `version` together.
    pub fn magic_version(&self) -> [u8; 8] {
        let mut m = [0u8; 8];
        m[..6].copy_from_slice(&self.magic);
        m[6..].copy_from_slice(&self.version);
        m
    }

    /// True for a POSIX ustar header (whose `prefix` field is meaningful).
    pub fn is_ustar(&self) -> bool {
        &self.magic_version() == MAGIC_USTAR
    }

    /// True for an old GNU header (whose tail holds GNU fields).
    pub fn is_gnu(&self) -> bool {
        &self.magic_version() == MAGIC_GNU
    }

    /// The checksum as stored, and the unsigned and signed sums computed over the block.
    pub fn checksums(&self) -> (Result<i64, NumError>, u32, i32) {
        let bytes = self.as_bytes();
        let mut unsigned = 0u32;
        let mut signed = 0i32;
        for (i, &b) in bytes.iter().enumerate() {
            let b = if (148..156).contains(&i) { b' ' } else { b };
            unsigned += u32::from(b);
            signed += i32::from(b as i8);
        }
        (parse_number(&self.chksum), unsigned, signed)
    }

    /// Recomputes and stores the checksum (POSIX form: six octal digits, NUL, space).
    pub fn set_checksum(&mut self) {
        self.chksum = [b' '; 8];
        let sum: u32 = self.as_bytes().iter().map(|&b| u32::from(b)).sum();
        let s = format!("{sum:06o}\0 ");
        self.chksum.copy_from_slice(s.as_bytes());
    }

    /// The name as stored (`prefix/name` for ustar), up to the first NUL of each field.
    pub fn path_bytes(&self) -> Vec<u8> {
        let name = cstr(&self.name);
        if self.is_ustar() {
            let prefix = cstr(&self.ustar().prefix);
            if !prefix.is_empty() {
                let mut p = Vec::with_capacity(prefix.len() + 1 + name.len());
                p.extend_from_slice(prefix);
                p.push(b'/');
                p.extend_from_slice(name);
                return p;
            }
        }
        name.to_vec()
    }
}

/// The bytes of a fixed-size field up to its first NUL.
pub fn cstr(field: &[u8]) -> &[u8] {
    match field.iter().position(|&b| b == 0) {
        Some(n) => &field[..n],
        None => field,
    }
}

/// Why a numeric field could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NumError {
    /// A character other than an octal digit inside the number.
    NotOctal(u8),
    /// The value does not fit in 64 bits.
    Overflow,
}

impl std::fmt::Display for NumError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NumError::NotOctal(c) => write!(f, "byte {:?} is not an octal digit", *c as char),
            NumError::Overflow => f.write_str("value does not fit in 64 bits"),
        }
    }
}

/// Reads a numeric header field: octal ASCII (leading spaces, trailing spaces or NULs allowed;
/// an empty field is 0) or base-256 when the first byte has its top bit set.
pub fn parse_number(field: &[u8]) -> Result<i64, NumError> {
    match field.first() {
        Some(&b) if b & 0x80 != 0 => parse_base256(field),
        _ => parse_octal(field),
    }
}

fn parse_octal(field: &[u8]) -> Result<i64, NumError> {
    let start = field.iter().position(|&b| b != b' ').unwrap_or(field.len());
    let digits = &field[start..];
    let end = digits
        .iter()
        .position(|&b| b == b' ' || b == 0)
        .unwrap_or(digits.len());
    // After the terminator only more spaces or NULs may follow.
    if let Some(&c) = digits[end..].iter().find(|&&b| b != b' ' && b != 0) {
        return Err(NumError::NotOctal(c));
    }
    let mut v: i64 = 0;
    for &c in &digits[..end] {
        if !(b'0'..=b'7').contains(&c) {
            return Err(NumError::NotOctal(c));
        }
        v = v
            .checked_mul(8)
            .and_then(|v| v.checked_add(i64::from(c - b'0')))
            .ok_or(NumError::Overflow)?;
    }
    Ok(v)
}

fn parse_base256(field: &[u8]) -> Result<i64, NumError> {
    let negative = field.first().is_some_and(|&b| b & 0x40 != 0);
    let flip = if negative { 0xff } else { 0 };
    let mut v: u64 = 0;
    for (i, &b) in field.iter().enumerate() {
        let mut b = b ^ flip;
        if i == 0 {
            b &= 0x7f;
        }
        if v >> 56 != 0 {
            return Err(NumError::Overflow);
        }
        v = (v << 8) | u64::from(b);
    }
    let v = i64::try_from(v).map_err(|_| NumError::Overflow)?;
    // Two's complement: the bitwise inverse of the magnitude bits is -(v + 1).
    Ok(if negative { -v - 1 } else { v })
}

/// Writes `v` into a numeric field: octal when it fits, else base-256 (tests build archives
/// with this).
pub fn put_number(field: &mut [u8], v: i64) {
    let n = field.len();
    let octal = format!("{v:0width$o}\0", width = n - 1);
    if v >= 0 && octal.len() == n {
        field.copy_from_slice(octal.as_bytes());
        return;
    }
    let bytes = v.to_be_bytes();
    for (i, f) in field.iter_mut().rev().enumerate() {
        *f = if i < 8 {
            bytes[7 - i]
        } else if v < 0 {
            0xff
        } else {
            0
        };
    }
    if v >= 0 {
        field[0] = 0x80;
    } else {
        field[0] |= 0x80;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        let cases: &[(&[u8], Result<i64, NumError>)] = &[
            (b"0000644\0", Ok(0o644)),
            (b"   644 \0", Ok(0o644)),
            (b"\0\0\0\0\0\0\0\0", Ok(0)),
            (b"        ", Ok(0)),
            (b"00000001750\0", Ok(1000)),
            (b"0000009\0", Err(NumError::NotOctal(b'9'))),
            (b"12 3\0\0\0\0", Err(NumError::NotOctal(b'3'))),
            (b"abc\0\0\0\0\0", Err(NumError::NotOctal(b'a'))),
            (&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], Ok(256)),
            (
                &[
                    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                ],
                Ok(-1),
            ),
            (
                &[
                    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00,
                ],
                Ok(-256),
            ),
            (
                &[0x80, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
                Err(NumError::Overflow),
            ),
            (b"7777777777777777777777", Err(NumError::Overflow)),
        ];
        for (field, want) in cases {
            assert_eq!(parse_number(field), *want, "{field:?}");
        }
    }

    #[test]
    fn put_number_round_trips() {
        for v in [
            0i64,
            1,
            0o7777777,
            0o10000000,
            -1,
            -86400 * 365,
            i64::MAX,
            i64::MIN + 1,
        ] {
            for n in [8usize, 12] {
                let mut f = vec![0u8; n];
                put_number(&mut f, v);
                if n == 8 && !(-(1 << 55)..=(1 << 55)).contains(&v) {
                    continue;
                }
                assert_eq!(parse_number(&f), Ok(v), "{v} in {n} bytes: {f:?}");
            }
        }
    }

    #[test]
    fn checksum_matches_after_set() {
        let mut h = Header::zeroed();
        h.name[..3].copy_from_slice(b"abc");
        h.set_checksum();
        let (stored, unsigned, _) = h.checksums();
        assert_eq!(stored, Ok(i64::from(unsigned)));
    }
}
