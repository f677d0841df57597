//! Patches over an image: a [`Region`] is a byte range whose new contents are some bytes
//! followed by zeroes, and a [`PatchPlan`] is a validated, sorted, non-overlapping set of
//! regions over an image of known size. Everything that emits a composed image (in place, to a
//! file, to a stream, over HTTP) walks the same plan, so all outputs agree byte for byte.

use std::ops::Range;

use bytes::Bytes;

use crate::{Error, Result};

/// New contents for `[offset, offset + len)`: `data`, then zeroes up to `len`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    /// Absolute byte offset in the image.
    pub offset: u64,
    /// Length of the patched range in bytes (at least `data.len()`).
    pub len: u64,
    /// Bytes written at `offset`; the rest of the range reads as zero.
    pub data: Bytes,
}

impl Region {
    /// A region holding exactly `data`.
    pub fn bytes(offset: u64, data: impl Into<Bytes>) -> Self {
        let data = data.into();
        Self {
            offset,
            len: data.len() as u64,
            data,
        }
    }

    /// A region of `len` zero bytes.
    pub fn zeroes(offset: u64, len: u64) -> Self {
        Self {
            offset,
            len,
            data: Bytes::new(),
        }
    }

    /// The byte range it covers (saturating: validation rejects overflowing regions).
    pub fn range(&self) -> Range<u64> {
        self.offset..self.offset.saturating_add(self.len)
    }

    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// A validated patch plan: regions sorted by offset, pairwise disjoint (adjacent is fine), all
/// inside `[0, image_len)`, none empty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PatchPlan {
    image_len: u64,
    regions: Vec<Region>,
}

impl PatchPlan {
    /// Validates and sorts `regions` over an image of `image_len` bytes. Empty regions are
    /// dropped; overlapping, overflowing or out-of-bounds ones are an error naming the offsets.
    pub fn new(image_len: u64, mut regions: Vec<Region>) -> Result<Self> {
        regions.retain(|r| r.len > 0);
        for r in &regions {
            if r.data.len() as u64 > r.len {
                return Err(Error::RegionData {
                    offset: r.offset,
                    len: r.len,
                    data_len: r.data.len() as u64,
                });
            }
            if r.offset
                .checked_add(r.len)
                .is_none_or(|end| end > image_len)
            {
                return Err(Error::OutOfBounds {
                    offset: r.offset,
                    len: r.len,
                    image_len,
                });
            }
        }
        regions.sort_by_key(|r| r.offset);
        for w in regions.windows(2) {
            if let [a, b] = w {
                if b.offset < a.end() {
                    return Err(Error::Overlap {
                        a_offset: a.offset,
                        a_len: a.len,
                        b_offset: b.offset,
                        b_len: b.len,
                    });
                }
            }
        }
        Ok(Self { image_len, regions })
    }

    /// Size of the composed image in bytes (the base's size: patches never change it).
    pub fn image_len(&self) -> u64 {
        self.image_len
    }

    /// The regions, sorted by offset.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Total bytes covered by patches.
    pub fn patched_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// The pieces that make up `range` of the composed image, in order. `range` is clamped to
    /// the image.
    pub fn segments(&self, range: Range<u64>) -> Segments<'_> {
        let end = range.end.min(self.image_len);
        let start = range.start.min(end);
        // First region that ends after `start`.
        let idx = self.regions.partition_point(|r| r.end() <= start);
        Segments {
            plan: self,
            cur: start,
            end,
            idx,
        }
    }
}

/// One piece of a composed image's byte range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    /// Bytes `[offset, offset + len)` of the base, unchanged.
    Base { offset: u64, len: u64 },
    /// Patch bytes (a cheap slice of the region's data).
    Data(Bytes),
    /// This many zero bytes (a region's fill).
    Zero(u64),
}

impl Segment {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Segment::Base { len, .. } => *len,
            Segment::Data(b) => b.len() as u64,
            Segment::Zero(n) => *n,
        }
    }

    /// True for a zero-length segment (never produced by [`Segments`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Iterator over the [`Segment`]s of a byte range; see [`PatchPlan::segments`].
#[derive(Clone, Debug)]
pub struct Segments<'a> {
    plan: &'a PatchPlan,
    cur: u64,
    end: u64,
    idx: usize,
}

impl Iterator for Segments<'_> {
    type Item = Segment;

    fn next(&mut self) -> Option<Segment> {
        while self.cur < self.end {
            let Some(r) = self.plan.regions.get(self.idx) else {
                let seg = Segment::Base {
                    offset: self.cur,
                    len: self.end - self.cur,
                };
                self.cur = self.end;
                return Some(seg);
            };
            if self.cur < r.offset {
                let stop = r.offset.min(self.end);
                let seg = Segment::Base {
                    offset: self.cur,
                    len: stop - self.cur,
                };
                self.cur = stop;
                return Some(seg);
            }
            if self.cur >= r.end() {
                self.idx += 1;
                continue;
            }
            let rel = self.cur - r.offset;
            let data_len = r.data.len() as u64;
            let stop = r.end().min(self.end);
            if rel < data_len {
                let upto = (stop - r.offset).min(data_len);
                // rel < upto <= data.len(), both fit in usize because data is in memory.
                let seg = Segment::Data(r.data.slice(rel as usize..upto as usize));
                self.cur = r.offset + upto;
                return Some(seg);
            }
            let seg = Segment::Zero(stop - self.cur);
            self.cur = stop;
            return Some(seg);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(len: u64, regions: Vec<Region>) -> Result<PatchPlan> {
        PatchPlan::new(len, regions)
    }

    #[test]
    fn validation_table() {
        let cases: Vec<(Vec<Region>, Option<&str>)> = vec![
            (
                vec![Region::bytes(0, &b"ab"[..]), Region::bytes(2, &b"c"[..])],
                None,
            ),
            (
                vec![Region::bytes(5, &b"ab"[..]), Region::bytes(0, &b"c"[..])],
                None,
            ),
            (
                vec![Region::bytes(0, &b"ab"[..]), Region::bytes(1, &b"c"[..])],
                Some("overlaps patch at offset 0"),
            ),
            (
                vec![Region::bytes(9, &b"ab"[..])],
                Some("runs past the end"),
            ),
            (vec![Region::zeroes(u64::MAX, 2)], Some("runs past the end")),
            (
                vec![Region {
                    offset: 0,
                    len: 1,
                    data: Bytes::from_static(b"xy"),
                }],
                Some("do not fit"),
            ),
            (vec![Region::zeroes(3, 0), Region::zeroes(3, 1)], None),
        ];
        for (regions, want) in cases {
            let got = plan(10, regions.clone());
            match (got, want) {
                (Ok(_), None) => {}
                (Err(e), Some(w)) => assert!(e.to_string().contains(w), "{e} !~ {w}"),
                (r, w) => panic!("{regions:?}: got {r:?}, want {w:?}"),
            }
        }
    }

    fn materialise(p: &PatchPlan, base: &[u8], range: Range<u64>) -> Vec<u8> {
        let mut out = Vec::new();
        for s in p.segments(range) {
            match s {
                Segment::Base { offset, len } => {
                    out.extend_from_slice(&base[offset as usize..(offset + len) as usize])
                }
                Segment::Data(b) => out.extend_from_slice(&b),
                Segment::Zero(n) => out.extend(std::iter::repeat_n(0, n as usize)),
            }
        }
        out
    }

    #[test]
    fn segments_match_naive_application_for_every_range() {
        let base: Vec<u8> = (0..64u8).map(|i| i | 0x80).collect();
        let p = plan(
            64,
            vec![
                Region {
                    offset: 4,
                    len: 8,
                    data: Bytes::from_static(b"abc"),
                },
                Region::bytes(12, &b"XY"[..]),
                Region::zeroes(30, 5),
                Region::bytes(60, &b"1234"[..]),
            ],
        )
        .unwrap();
        let mut naive = base.clone();
        naive[4..12].copy_from_slice(b"abc\0\0\0\0\0");
        naive[12..14].copy_from_slice(b"XY");
        naive[30..35].fill(0);
        naive[60..64].copy_from_slice(b"1234");
        for a in 0..=64u64 {
            for b in a..=70u64 {
                let got = materialise(&p, &base, a..b);
                let want = &naive[a as usize..(b.min(64)) as usize];
                assert_eq!(got, want, "range {a}..{b}");
                assert!(p.segments(a..b).all(|s| !s.is_empty()));
            }
        }
    }
}
