//! GNU sparse maps (GNU tar manual, "Storing Sparse Files"): which byte ranges of a sparse
//! file hold data. The archive stores only those ranges, packed one after the other; everything
//! else reads as zeroes.
//!
//! Encodings: the old GNU type `S` header (4 pairs in the header, 21 per extension block), PAX
//! 0.0 (repeated `GNU.sparse.offset`/`numbytes`), PAX 0.1 (`GNU.sparse.map=o,n,o,n`), PAX 1.0
//! (decimal numbers, one per line, at the start of the entry's data: the count, then the
//! pairs; padded with NULs to a 512-byte block). All end up here as a list of pairs that is
//! checked and brought to canonical form.

use std::io;

use kiln_formats::fstree::{FileData, Segment};

use super::pax::MAX_SPARSE_RUNS;

/// Checks a sparse map against the file's logical size and the bytes stored in the archive and
/// returns its canonical runs: zero-length pairs dropped (GNU tar ends maps of files that end in
/// a hole with one), adjacent runs merged. Pairs must be in ascending order and must not
/// overlap.
pub fn canonical_runs(
    pairs: &[(u64, u64)],
    realsize: u64,
    stored: u64,
) -> Result<Vec<Segment>, String> {
    if pairs.len() > MAX_SPARSE_RUNS {
        return Err(format!(
            "sparse map has {} runs, more than {MAX_SPARSE_RUNS}",
            pairs.len()
        ));
    }
    let mut runs: Vec<Segment> = Vec::new();
    let mut end_prev = 0u64;
    let mut total = 0u64;
    for (i, &(offset, len)) in pairs.iter().enumerate() {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= realsize)
            .ok_or_else(|| {
                format!("sparse map run {i} ({offset}+{len}) runs past the file size {realsize}")
            })?;
        if offset < end_prev {
            return Err(format!(
                "sparse map run {i} at offset {offset} overlaps or precedes the run before it (which ends at {end_prev})"
            ));
        }
        end_prev = end;
        if len == 0 {
            continue;
        }
        total += len;
        match runs.last_mut() {
            Some(last) if last.offset + last.len == offset => last.len += len,
            _ => runs.push(Segment { offset, len }),
        }
    }
    if total != stored {
        return Err(format!(
            "sparse map describes {total} bytes of data but the entry stores {stored}"
        ));
    }
    Ok(runs)
}

/// Builds the [`FileData`] of a (possibly) sparse file, in the same canonical form the
/// directory reader produces: a map that covers the whole file is no map at all.
pub fn file_data(size: u64, runs: Option<Vec<Segment>>) -> FileData {
    let dense = FileData::dense(size, kiln_formats::fstree::DataRef::Empty);
    match runs {
        None => dense,
        Some(_) if size == 0 => dense,
        Some(r) if r.len() == 1 && r[0].offset == 0 && r[0].len == size => dense,
        Some(r) => FileData {
            size,
            data: kiln_formats::fstree::DataRef::Empty,
            segments: Some(r.into()),
        },
    }
}

/// Reads a PAX 1.0 sparse map from the start of an entry's data. `read_block` fills the next
/// 512-byte block of data (or fails). Returns the pairs and the bytes consumed (whole blocks).
/// The map is at most `data_len` bytes, and its count is bounded by [`MAX_SPARSE_RUNS`].
pub fn read_map_v1(
    data_len: u64,
    mut read_block: impl FnMut(&mut [u8; 512]) -> io::Result<()>,
) -> Result<(Vec<(u64, u64)>, u64), String> {
    let mut block = [0u8; 512];
    let mut consumed = 0u64;
    let mut pos = 512usize; // force a read
    let mut next_number = |what: &str| -> Result<u64, String> {
        let mut v: u64 = 0;
        let mut digits = 0;
        loop {
            if pos == 512 {
                if consumed + 512 > data_len {
                    return Err(format!(
                        "sparse map ({what}) runs past the entry's {data_len} bytes of data"
                    ));
                }
                read_block(&mut block).map_err(|e| format!("reading the sparse map: {e}"))?;
                consumed += 512;
                pos = 0;
            }
            let c = block[pos];
            pos += 1;
            match c {
                b'0'..=b'9' => {
                    if digits == 20 {
                        return Err(format!("sparse map {what} has more than 20 digits"));
                    }
                    v = v
                        .checked_mul(10)
                        .and_then(|v| v.checked_add(u64::from(c - b'0')))
                        .ok_or_else(|| format!("sparse map {what} is out of range"))?;
                    digits += 1;
                }
                b'\n' if digits > 0 => return Ok(v),
                _ => {
                    return Err(format!(
                        "sparse map {what}: unexpected byte {:?} (expected decimal digits and a newline)",
                        c as char
                    ))
                }
            }
        }
    };
    let count = next_number("count")?;
    if count > MAX_SPARSE_RUNS as u64 {
        return Err(format!(
            "sparse map claims {count} runs, more than {MAX_SPARSE_RUNS}"
        ));
    }
    let mut pairs = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let off = next_number("offset")?;
        let len = next_number("length")?;
        pairs.push((off, len));
    }
    Ok((pairs, consumed))
}

/// One piece of a logical byte range of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    /// Stored bytes: `len` bytes at logical offset `logical` are at `packed` bytes from the
    /// start of the file's stored data.
    Data { packed: u64, logical: u64, len: u64 },
    /// A hole: `len` zero bytes at logical offset `logical`.
    Hole { logical: u64, len: u64 },
}

/// Packed offset of each run of `runs`: the sum of the lengths of the runs before it.
pub fn packed_starts(runs: &[Segment]) -> Vec<u64> {
    runs.iter()
        .scan(0u64, |acc, s| {
            let start = *acc;
            *acc += s.len;
            Some(start)
        })
        .collect()
}

/// Calls `f` for each piece (data or hole, in order) of the logical range
/// `[offset, offset + len)` of `file`. Errors if the range runs past the file's size.
/// `starts`, when given, is [`packed_starts`] of the file's runs, which saves summing the runs
/// before the range (files with many runs are read run by run).
pub fn map_range(
    file: &FileData,
    offset: u64,
    len: u64,
    starts: Option<&[u64]>,
    mut f: impl FnMut(Piece) -> io::Result<()>,
) -> io::Result<()> {
    let end = offset
        .checked_add(len)
        .filter(|&e| e <= file.size)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "read of {len} bytes at offset {offset} runs past the end of a {}-byte file",
                    file.size
                ),
            )
        })?;
    if len == 0 {
        return Ok(());
    }
    let Some(segs) = &file.segments else {
        return f(Piece::Data {
            packed: offset,
            logical: offset,
            len,
        });
    };
    // Runs before the range only contribute their length to the packed offset.
    let first = segs.partition_point(|s| s.offset + s.len <= offset);
    let mut packed: u64 = match starts.and_then(|s| s.get(first)) {
        Some(&p) => p,
        None => segs.iter().take(first).map(|s| s.len).sum(),
    };
    let mut cur = offset;
    for s in segs.iter().skip(first) {
        if s.offset >= end {
            break;
        }
        if s.offset > cur {
            f(Piece::Hole {
                logical: cur,
                len: s.offset - cur,
            })?;
            cur = s.offset;
        }
        let piece_end = (s.offset + s.len).min(end);
        f(Piece::Data {
            packed: packed + (cur - s.offset),
            logical: cur,
            len: piece_end - cur,
        })?;
        cur = piece_end;
        packed += s.len;
        if cur == end {
            break;
        }
    }
    if cur < end {
        f(Piece::Hole {
            logical: cur,
            len: end - cur,
        })?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn canonical_form() {
        let r = canonical_runs(&[(0, 10), (10, 5), (100, 0), (200, 1), (300, 0)], 300, 16).unwrap();
        assert_eq!(
            r,
            [
                Segment { offset: 0, len: 15 },
                Segment {
                    offset: 200,
                    len: 1
                }
            ]
        );
        for (pairs, size, stored) in [
            (&[(0u64, 10u64), (5, 10)][..], 100u64, 20u64),
            (&[(50, 10), (0, 10)], 100, 20),
            (&[(95, 10)], 100, 10),
            (&[(u64::MAX, 2)], u64::MAX, 2),
            (&[(0, 10)], 100, 11),
        ] {
            assert!(canonical_runs(pairs, size, stored).is_err(), "{pairs:?}");
        }
    }

    #[test]
    fn file_data_matches_directory_reader_forms() {
        assert_eq!(
            file_data(10, Some(vec![Segment { offset: 0, len: 10 }])).segments,
            None
        );
        let hole = file_data(10, Some(vec![]));
        assert_eq!(hole.segments.as_deref(), Some(&[][..]));
        assert_eq!(hole.stored_len(), 0);
        assert_eq!(file_data(0, Some(vec![])).segments, None);
    }

    fn blocks(text: &[u8]) -> impl FnMut(&mut [u8; 512]) -> io::Result<()> + '_ {
        let mut at = 0;
        move |b| {
            b.fill(0);
            let n = text.len().saturating_sub(at).min(512);
            b[..n].copy_from_slice(&text[at..at + n]);
            at += 512;
            Ok(())
        }
    }

    #[test]
    fn v1_map() {
        let (pairs, used) = read_map_v1(2048, blocks(b"2\n0\n5\n4096\n3\n")).unwrap();
        assert_eq!(pairs, [(0, 5), (4096, 3)]);
        assert_eq!(used, 512);
        let mut long = b"300\n".to_vec();
        for i in 0..300u64 {
            long.extend_from_slice(format!("{}\n1\n", i * 10).as_bytes());
        }
        let (pairs, used) = read_map_v1(1 << 20, blocks(&long)).unwrap();
        assert_eq!(pairs.len(), 300);
        assert_eq!(used, long.len().div_ceil(512) as u64 * 512);
        for bad in [
            &b"2\n0\n"[..],
            b"x\n",
            b"\n",
            b"99999999999\n",
            b"1\n0\n123456789012345678901\n",
        ] {
            assert!(read_map_v1(512, blocks(bad)).is_err(), "{bad:?}");
        }
        assert!(
            read_map_v1(0, blocks(b"0\n")).is_err(),
            "no room for the map"
        );
    }

    #[test]
    fn ranges_map_to_packed_offsets() {
        let f = file_data(
            100,
            Some(vec![
                Segment {
                    offset: 10,
                    len: 10,
                },
                Segment { offset: 50, len: 5 },
            ]),
        );
        let pieces = |off, len| {
            let mut v = Vec::new();
            map_range(&f, off, len, None, |p| {
                v.push(p);
                Ok(())
            })
            .map(|()| v)
        };
        use Piece::*;
        assert_eq!(
            pieces(0, 100).unwrap(),
            [
                Hole {
                    logical: 0,
                    len: 10
                },
                Data {
                    packed: 0,
                    logical: 10,
                    len: 10
                },
                Hole {
                    logical: 20,
                    len: 30
                },
                Data {
                    packed: 10,
                    logical: 50,
                    len: 5
                },
                Hole {
                    logical: 55,
                    len: 45
                },
            ]
        );
        assert_eq!(
            pieces(52, 2).unwrap(),
            [Data {
                packed: 12,
                logical: 52,
                len: 2
            }]
        );
        assert_eq!(
            pieces(15, 40).unwrap(),
            [
                Data {
                    packed: 5,
                    logical: 15,
                    len: 5
                },
                Hole {
                    logical: 20,
                    len: 30
                },
                Data {
                    packed: 10,
                    logical: 50,
                    len: 5
                },
            ]
        );
        assert!(pieces(99, 2).is_err());
        let starts = packed_starts(f.segments.as_deref().unwrap());
        assert_eq!(starts, [0, 10]);
        let mut v = Vec::new();
        map_range(&f, 52, 2, Some(&starts), |p| {
            v.push(p);
            Ok(())
        })
        .unwrap();
        assert_eq!(
            v,
            [Data {
                packed: 12,
                logical: 52,
                len: 2
            }]
        );
    }
}
