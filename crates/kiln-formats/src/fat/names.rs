//! Short (8.3) and long (VFAT) names (fatgen103 §6.1 and §7).
//!
//! Short names are generated deterministically per directory: a name that already is a valid
//! 8.3 name in upper case is stored as is, with no long name; a name that fits 8.3 once upper-
//! cased gets that short name plus a long name; anything else gets `BASE~N.EXT` with the
//! smallest free `N`, the base shortened to make room. Names are processed in the tree's sorted
//! order, so the same tree always gets the same short names.

use std::collections::BTreeSet;

use super::layout::{LfnEntry, ATTR_LONG_NAME, LFN_LAST, LFN_UNITS};
use zerocopy::little_endian::U16;

/// Longest long name in UTF-16 units.
pub const LONG_NAME_MAX: usize = 255;

/// Characters a long name may not contain (besides controls below 0x20).
const LONG_FORBIDDEN: &[char] = &['"', '*', '/', ':', '<', '>', '?', '\\', '|'];

/// Checks that `name` can be a FAT long name; returns its UTF-16 form.
pub fn check_long_name(name: &[u8]) -> Result<Vec<u16>, String> {
    let s = std::str::from_utf8(name).map_err(|_| "name is not valid UTF-8".to_string())?;
    if let Some(c) = s
        .chars()
        .find(|&c| (c as u32) < 0x20 || LONG_FORBIDDEN.contains(&c))
    {
        return Err(format!("FAT names cannot contain {c:?}"));
    }
    if s.ends_with('.') || s.ends_with(' ') {
        return Err("FAT names cannot end with a dot or a space".into());
    }
    let units: Vec<u16> = s.encode_utf16().collect();
    if units.len() > LONG_NAME_MAX {
        return Err(format!(
            "name is {} UTF-16 units, FAT allows {LONG_NAME_MAX}",
            units.len()
        ));
    }
    Ok(units)
}

/// A byte allowed in a short name (fatgen103 §6.1, upper case only).
fn short_char_ok(b: u8) -> bool {
    b.is_ascii_uppercase() || b.is_ascii_digit() || b"$%'-_@~`!(){}^#&".contains(&b)
}

/// The 11-byte 8.3 form of `name` if it is already a valid upper-case short name.
pub fn exact_short(name: &[u8]) -> Option<[u8; 11]> {
    let (base, ext) = match name.iter().position(|&b| b == b'.') {
        Some(i) => (&name[..i], &name[i + 1..]),
        None => (name, &[][..]),
    };
    if base.is_empty() || base.len() > 8 || ext.len() > 3 || ext.contains(&b'.') {
        return None;
    }
    if name.contains(&b'.') && ext.is_empty() {
        return None;
    }
    if !base.iter().chain(ext).all(|&b| short_char_ok(b)) {
        return None;
    }
    let mut out = [b' '; 11];
    out[..base.len()].copy_from_slice(base);
    out[8..8 + ext.len()].copy_from_slice(ext);
    Some(out)
}

/// Upper-cases and filters one part of a name into short-name bytes; `lossy` is set when a
/// character had to be replaced or dropped.
fn basis(part: &str, lossy: &mut bool) -> Vec<u8> {
    let mut out = Vec::new();
    for c in part.chars() {
        if c == ' ' || c == '.' {
            *lossy = true;
            continue;
        }
        let u = c.to_ascii_uppercase();
        if u.is_ascii() && short_char_ok(u as u8) {
            out.push(u as u8);
        } else {
            *lossy = true;
            out.push(b'_');
        }
    }
    out
}

/// Assigns short names within one directory. Feed every name of the directory to
/// [`ShortNames::reserve_exact`] first, then call [`ShortNames::assign`] for each in order.
#[derive(Debug, Default)]
pub struct ShortNames {
    used: BTreeSet<[u8; 11]>,
}

impl ShortNames {
    /// Records a name that will be stored as its own exact short name.
    pub fn reserve_exact(&mut self, name: &[u8]) -> bool {
        match exact_short(name) {
            Some(s) => self.used.insert(s),
            None => false,
        }
    }

    /// Marks an 11-byte name as taken (the volume label, `.` and `..` need not be).
    pub fn take(&mut self, short: [u8; 11]) {
        self.used.insert(short);
    }

    /// The short name for `name` and whether a long name must accompany it. Names for which
    /// [`exact_short`] succeeds must have been reserved.
    pub fn assign(&mut self, name: &str) -> Result<([u8; 11], bool), String> {
        if let Some(s) = exact_short(name.as_bytes()) {
            return Ok((s, false));
        }
        let trimmed = name.trim_start_matches('.');
        let mut lossy = trimmed.len() != name.len();
        let (b, e) = match trimmed.rfind('.') {
            Some(i) => (&trimmed[..i], &trimmed[i + 1..]),
            None => (trimmed, ""),
        };
        let mut base = basis(b, &mut lossy);
        let mut ext = basis(e, &mut lossy);
        if base.is_empty() {
            base.push(b'_');
            lossy = true;
        }
        if base.len() > 8 || ext.len() > 3 {
            lossy = true;
        }
        base.truncate(8);
        ext.truncate(3);
        let mut short = [b' '; 11];
        short[8..8 + ext.len()].copy_from_slice(&ext);
        if !lossy {
            short[..base.len()].copy_from_slice(&base);
            if self.used.insert(short) {
                return Ok((short, true));
            }
        }
        for n in 1u32..1_000_000 {
            let tail = format!("~{n}");
            let keep = base.len().min(8 - tail.len());
            let mut s = short;
            s[..8].fill(b' ');
            s[..keep].copy_from_slice(&base[..keep]);
            s[keep..keep + tail.len()].copy_from_slice(tail.as_bytes());
            if self.used.insert(s) {
                return Ok((s, true));
            }
        }
        Err("no free short name (more than 999999 similar names)".into())
    }
}

/// The checksum of an 8.3 name that long-name entries carry (fatgen103 §7.2).
pub fn checksum(short: &[u8; 11]) -> u8 {
    short.iter().fold(0u8, |sum, &b| {
        ((sum & 1) << 7).wrapping_add(sum >> 1).wrapping_add(b)
    })
}

/// Long-name entries for `units`, in on-disk order (last part first).
pub fn lfn_entries(units: &[u16], short: &[u8; 11]) -> Vec<LfnEntry> {
    let sum = checksum(short);
    let n = units.len().div_ceil(LFN_UNITS);
    let mut out = Vec::with_capacity(n);
    for i in (0..n).rev() {
        let mut chunk = [0xFFFFu16; LFN_UNITS];
        let part = &units[i * LFN_UNITS..units.len().min((i + 1) * LFN_UNITS)];
        chunk[..part.len()].copy_from_slice(part);
        if part.len() < LFN_UNITS {
            chunk[part.len()] = 0;
        }
        let u = |k: usize| U16::new(chunk[k]);
        out.push(LfnEntry {
            ord: (i as u8 + 1) | if i == n - 1 { LFN_LAST } else { 0 },
            name1: [u(0), u(1), u(2), u(3), u(4)],
            attr: ATTR_LONG_NAME,
            kind: 0,
            checksum: sum,
            name2: [u(5), u(6), u(7), u(8), u(9), u(10)],
            fst_clus_lo: U16::new(0),
            name3: [u(11), u(12)],
        });
    }
    out
}

/// The display form of an 8.3 name (`BASE.EXT`), honouring the lower-case flags.
pub fn short_display(short: &[u8; 11], nt_res: u8) -> String {
    let mut base: String = String::from_utf8_lossy(&short[..8]).trim_end().to_string();
    let mut ext: String = String::from_utf8_lossy(&short[8..]).trim_end().to_string();
    if base.starts_with('\u{5}') {
        base.replace_range(..1, "\u{E5}");
    }
    if nt_res & super::layout::NT_LOWER_BASE != 0 {
        base = base.to_ascii_lowercase();
    }
    if nt_res & super::layout::NT_LOWER_EXT != 0 {
        ext = ext.to_ascii_lowercase();
    }
    if ext.is_empty() {
        base
    } else {
        format!("{base}.{ext}")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn s(x: &[u8; 11]) -> String {
        String::from_utf8_lossy(x).into_owned()
    }

    #[test]
    fn short_names() {
        let mut n = ShortNames::default();
        for name in [
            "BOOTX64.EFI",
            "EFI",
            "a.b.c",
            "readme.txt",
            "Very Long Name.html",
        ] {
            n.reserve_exact(name.as_bytes());
        }
        assert_eq!(n.assign("BOOTX64.EFI").unwrap(), (*b"BOOTX64 EFI", false));
        assert_eq!(n.assign("EFI").unwrap(), (*b"EFI        ", false));
        assert_eq!(s(&n.assign("readme.txt").unwrap().0), "README  TXT");
        assert_eq!(
            s(&n.assign("Very Long Name.html").unwrap().0),
            "VERYLO~1HTM"
        );
        assert_eq!(
            s(&n.assign("Very Long Name2.html").unwrap().0),
            "VERYLO~2HTM"
        );
        assert_eq!(s(&n.assign("a.b.c").unwrap().0), "AB~1    C  ");
        assert_eq!(s(&n.assign(".bashrc").unwrap().0), "BASHRC~1   ");
        assert_eq!(s(&n.assign("ünï").unwrap().0), "_N_~1      ");
        assert_eq!(s(&n.assign("README.TXt").unwrap().0), "README~1TXT");
        assert!(exact_short(b"lower.txt").is_none());
        assert!(exact_short(b"A.").is_none());
        assert!(check_long_name(b"a:b").is_err());
        assert!(check_long_name(b"trailing.").is_err());
        assert!(check_long_name(b"\xff").is_err());
        assert!(check_long_name("x".repeat(256).as_bytes()).is_err());
    }

    #[test]
    fn checksum_and_lfn_layout() {
        // Checksum of "FOO     BAR" computed by hand with the rotate-right-and-add rule.
        let mut sum = 0u8;
        for &b in b"FOO     BAR" {
            sum = sum.rotate_right(1).wrapping_add(b);
        }
        assert_eq!(checksum(b"FOO     BAR"), sum);
        let units: Vec<u16> = "abcdefghijklmn".encode_utf16().collect();
        let e = lfn_entries(&units, b"ABCDEF~1   ");
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].ord, 0x42);
        assert_eq!(e[0].name1[0].get(), u16::from(b'n'));
        assert_eq!(e[0].name1[1].get(), 0);
        assert_eq!(e[0].name1[2].get(), 0xFFFF);
        assert_eq!(e[1].ord, 1);
    }
}
