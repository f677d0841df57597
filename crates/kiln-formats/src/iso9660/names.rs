//! File identifiers: ISO 9660 level 1 names (ECMA-119 §7.5, §7.6: `NAME.EXT;1` with d-characters,
//! at most 8+3, directories at most 8), Joliet names (UCS-2 big-endian, at most 64 characters,
//! Joliet spec §3) and the record order of ECMA-119 §9.3.
//!
//! The real names live in Rock Ridge NM entries; these identifiers only need to be valid,
//! unique within their directory (case-insensitively unique too, since readers without Rock
//! Ridge lower-case them) and deterministic. Collisions are resolved by replacing the tail of
//! the stem with `_N`, numbering per colliding candidate, in the tree's name order.

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};

/// Longest level-1 stem (ECMA-119 §10.1: 8 characters before the separator).
pub const ISO_STEM_MAX: usize = 8;
/// Longest level-1 extension.
pub const ISO_EXT_MAX: usize = 3;
/// Longest Joliet identifier in UCS-2 code units (Joliet spec §3.2).
pub const JOLIET_MAX: usize = 64;

/// One code unit of an identifier: a byte (ISO 9660) or a UCS-2 unit (Joliet).
pub trait Unit: Copy + Ord + Eq + std::hash::Hash {
    /// The unit for an ASCII character.
    fn ascii(c: u8) -> Self;
    /// The unit with ASCII letters folded to lower case (uniqueness is checked on folded
    /// names: Windows compares Joliet names case-insensitively).
    fn fold(self) -> Self;
}

impl Unit for u8 {
    fn ascii(c: u8) -> Self {
        c
    }
    fn fold(self) -> Self {
        self.to_ascii_lowercase()
    }
}

impl Unit for u16 {
    fn ascii(c: u8) -> Self {
        u16::from(c)
    }
    fn fold(self) -> Self {
        match u8::try_from(self) {
            Ok(b) => u16::from(b.to_ascii_lowercase()),
            Err(_) => self,
        }
    }
}

/// Splits an identifier into (stem, extension, version) per ECMA-119 §7.5: the version follows
/// the last `;`, the extension the last `.` before it. A name without `.` has an empty extension.
pub fn split_identifier<T: Unit>(id: &[T]) -> (&[T], &[T], &[T]) {
    let (body, version) = match id.iter().rposition(|&c| c == T::ascii(b';')) {
        Some(i) => (&id[..i], &id[i + 1..]),
        None => (id, &id[id.len()..]),
    };
    match body.iter().rposition(|&c| c == T::ascii(b'.')) {
        Some(i) => (&body[..i], &body[i + 1..], version),
        None => (body, &body[body.len()..], version),
    }
}

/// Compares two sequences as if the shorter were padded with spaces (ECMA-119 §9.3 a, b).
fn cmp_padded<T: Unit>(a: &[T], b: &[T]) -> Ordering {
    let n = a.len().max(b.len());
    let space = T::ascii(b' ');
    for i in 0..n {
        let x = a.get(i).copied().unwrap_or(space);
        let y = b.get(i).copied().unwrap_or(space);
        match x.cmp(&y) {
            Ordering::Equal => {}
            o => return o,
        }
    }
    Ordering::Equal
}

/// The order of directory records within a directory (ECMA-119 §9.3): by stem, then extension
/// (both space-padded), then version descending. Ties (identifiers equal after padding) fall
/// back to the raw units so the order is total and deterministic.
pub fn cmp_identifiers<T: Unit>(a: &[T], b: &[T]) -> Ordering {
    let (sa, ea, va) = split_identifier(a);
    let (sb, eb, vb) = split_identifier(b);
    cmp_padded(sa, sb)
        .then_with(|| cmp_padded(ea, eb))
        .then_with(|| cmp_padded(vb, va))
        .then_with(|| a.cmp(b))
}

/// Maps a character to a d-character (ECMA-119 §7.4.1: `A-Z 0-9 _`), upper-casing letters.
fn d_char(c: char) -> u8 {
    match c {
        'A'..='Z' | '0'..='9' | '_' => c as u8,
        'a'..='z' => c.to_ascii_uppercase() as u8,
        _ => b'_',
    }
}

/// Maps a character to something Joliet allows: every UCS-2 character except controls and
/// `* / : ; ? \` (Joliet spec §3.1); characters outside the BMP become `_`.
fn joliet_char(c: char) -> u16 {
    let v = c as u32;
    if !(0x20..=0xFFFF).contains(&v) || matches!(c, '*' | '/' | ':' | ';' | '?' | '\\') {
        u16::from(b'_')
    } else {
        v as u16
    }
}

/// Allocates unique identifiers within one directory.
#[derive(Default)]
pub struct Mangler<T: Unit> {
    /// Keys (`stem.ext`, case already folded) taken so far.
    used: HashSet<Vec<T>>,
    /// Next suffix number to try per original candidate, so 100k colliding names cost O(n).
    next: HashMap<Vec<T>, u64>,
}

impl<T: Unit> Mangler<T> {
    /// A mangler for an empty directory.
    pub fn new() -> Self {
        Self {
            used: HashSet::new(),
            next: HashMap::new(),
        }
    }

    fn key(stem: &[T], ext: &[T]) -> Vec<T> {
        let mut k: Vec<T> = stem.iter().map(|c| c.fold()).collect();
        k.push(T::ascii(b'.'));
        k.extend(ext.iter().map(|c| c.fold()));
        k
    }

    /// Reserves a name that must not be handed out (e.g. one taken by construction).
    pub fn reserve(&mut self, stem: &[T], ext: &[T]) {
        self.used.insert(Self::key(stem, ext));
    }

    /// Returns a unique (stem, ext) for the candidate: the candidate itself if free, else the
    /// stem's tail replaced by `_N` so that it stays within `max_stem` units. `None` only when
    /// every number that fits is taken.
    pub fn unique(
        &mut self,
        stem: Vec<T>,
        ext: Vec<T>,
        max_stem: usize,
    ) -> Option<(Vec<T>, Vec<T>)> {
        let key = Self::key(&stem, &ext);
        if self.used.insert(key.clone()) {
            return Some((stem, ext));
        }
        let mut n = self.next.get(&key).copied().unwrap_or(1);
        loop {
            let digits = n.to_string();
            let mut suffix: Vec<T> = Vec::with_capacity(digits.len() + 1);
            if digits.len() < max_stem {
                suffix.push(T::ascii(b'_'));
            }
            suffix.extend(digits.bytes().map(T::ascii));
            if suffix.len() > max_stem {
                return None;
            }
            let keep = stem.len().min(max_stem - suffix.len());
            let mut cand = stem[..keep].to_vec();
            cand.extend_from_slice(&suffix);
            n += 1;
            if self.used.insert(Self::key(&cand, &ext)) {
                self.next.insert(key, n);
                return Some((cand, ext));
            }
        }
    }
}

/// The level-1 candidate (stem, extension) for a name: d-characters, stem at most 8,
/// extension at most 3 (none for directories). Never empty.
pub fn iso_candidate(name: &[u8], is_dir: bool) -> (Vec<u8>, Vec<u8>) {
    let text = String::from_utf8_lossy(name);
    let (stem, ext) = if is_dir {
        (&text[..], "")
    } else {
        match text.rfind('.') {
            Some(0) | None => (&text[..], ""),
            Some(i) => (&text[..i], &text[i + 1..]),
        }
    };
    let mut s: Vec<u8> = stem.chars().map(d_char).take(ISO_STEM_MAX).collect();
    if s.is_empty() {
        s.push(b'_');
    }
    let e: Vec<u8> = ext.chars().map(d_char).take(ISO_EXT_MAX).collect();
    (s, e)
}

/// The identifier bytes of a level-1 name: `STEM` for a directory, `STEM.EXT;1` for a file.
pub fn iso_identifier(stem: &[u8], ext: &[u8], is_dir: bool) -> Vec<u8> {
    let mut id = stem.to_vec();
    if !is_dir {
        id.push(b'.');
        id.extend_from_slice(ext);
        id.extend_from_slice(b";1");
    }
    id
}

/// The Joliet candidate (stem, extension) for a name: UCS-2 units, at most 64 in total,
/// keeping a short extension when the stem must be cut.
pub fn joliet_candidate(name: &[u8], is_dir: bool) -> (Vec<u16>, Vec<u16>) {
    let mut units: Vec<u16> = String::from_utf8_lossy(name)
        .chars()
        .map(joliet_char)
        .collect();
    // "." and ".." (and longer runs of dots) would read as the special directory names.
    if units.iter().all(|&c| c == u16::from(b'.')) {
        units = vec![u16::from(b'_'); units.len()];
    }
    let dot = if is_dir {
        None
    } else {
        units
            .iter()
            .rposition(|&c| c == u16::from(b'.'))
            .filter(|&i| i > 0)
    };
    let (mut stem, mut ext) = match dot {
        Some(i) => (units[..i].to_vec(), units[i + 1..].to_vec()),
        None => (units, Vec::new()),
    };
    if ext.len() > 16 {
        // A long "extension" is just a dotted name; treat it as part of the stem.
        stem.push(u16::from(b'.'));
        stem.append(&mut ext);
    }
    let room = JOLIET_MAX - if ext.is_empty() { 0 } else { ext.len() + 1 };
    stem.truncate(room);
    (stem, ext)
}

/// Longest Joliet stem that still leaves room for `ext`.
pub fn joliet_stem_max(ext: &[u16]) -> usize {
    JOLIET_MAX - if ext.is_empty() { 0 } else { ext.len() + 1 }
}

/// The identifier units of a Joliet name (no `;1` version, as most writers do).
pub fn joliet_identifier(stem: &[u16], ext: &[u16]) -> Vec<u16> {
    let mut id = stem.to_vec();
    if !ext.is_empty() {
        id.push(u16::from(b'.'));
        id.extend_from_slice(ext);
    }
    id
}

/// UCS-2 big-endian bytes of `units`.
pub fn ucs2_be(units: &[u16]) -> Vec<u8> {
    units.iter().flat_map(|u| u.to_be_bytes()).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn iso_candidates_table() {
        for (name, dir, stem, ext) in [
            ("hello.txt", false, "HELLO", "TXT"),
            ("piece.html", false, "PIECE", "HTM"),
            ("root.erofs", false, "ROOT", "ERO"),
            (".hidden", false, "_HIDDEN", ""),
            ("a.b.c", false, "A_B", "C"),
            ("verylongname", true, "VERYLONG", ""),
            ("dir.d", true, "DIR_D", ""),
            ("caf\u{e9}", false, "CAF_", ""),
        ] {
            let (s, e) = iso_candidate(name.as_bytes(), dir);
            assert_eq!(
                (s.as_slice(), e.as_slice()),
                (stem.as_bytes(), ext.as_bytes())
            );
        }
    }

    #[test]
    fn mangling_is_unique_and_linear() {
        let mut m = Mangler::<u8>::new();
        let mut seen = HashSet::new();
        for i in 0..100_000 {
            let (s, e) = iso_candidate(format!("entry-{i:06}").as_bytes(), false);
            let (s, e) = m.unique(s, e, ISO_STEM_MAX).unwrap();
            assert!(s.len() <= ISO_STEM_MAX);
            assert!(seen.insert(iso_identifier(&s, &e, false)));
        }
    }

    #[test]
    fn record_order_follows_ecma119() {
        let mut ids: Vec<&[u8]> = vec![b"B.;1", b"A0.;1", b"A.B;1", b"A.;1", b"A_", b"A"];
        ids.sort_by(|a, b| cmp_identifiers(a, b));
        // Equal stems and extensions: the higher version first, and a missing version sorts
        // as a space, below any digit.
        assert_eq!(
            ids,
            [&b"A.;1"[..], b"A", b"A.B;1", b"A0.;1", b"A_", b"B.;1"]
        );
        // Joliet: a name with a space sorts before the same stem continued.
        let a: Vec<u16> = "a b".encode_utf16().collect();
        let b: Vec<u16> = "a".encode_utf16().collect();
        assert_eq!(cmp_identifiers(&b, &a), Ordering::Less);
    }

    #[test]
    fn joliet_names_keep_extension_within_64() {
        let long = "n".repeat(255) + ".html";
        let (s, e) = joliet_candidate(long.as_bytes(), false);
        let id = joliet_identifier(&s, &e);
        assert_eq!(id.len(), JOLIET_MAX);
        assert_eq!(String::from_utf16(&id[id.len() - 5..]).unwrap(), ".html");
        let (s, _) = joliet_candidate(b"a:b*c", true);
        assert_eq!(String::from_utf16(&s).unwrap(), "a_b_c");
    }
}
