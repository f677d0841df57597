//! Payloads → patches. [`plan_injection`] turns a slot table and one payload per chosen slot
//! into a [`PatchPlan`]: for every slot, the data area (payload, then zero fill to the end of
//! the reservation, so the result never depends on what the base held there) plus the
//! kind-specific metadata patches.
//!
//! Filesystem kinds plug in at [`metadata_regions`]: one `match` arm per [`SlotMeta`] variant
//! that calls the format's "rewrite metadata for a new size" function (reading whatever base
//! bytes it needs through [`ReadAt`]) and returns the patched byte ranges.

use bytes::Bytes;

use crate::region::{PatchPlan, Region};
use crate::slots::{IsoMeta, RawMeta, Slot, SlotMeta, SlotTable};
use crate::source::ReadAt;
use crate::{Error, Result};

/// A payload for one slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payload {
    /// Slot name.
    pub slot: String,
    /// The bytes (the file's new contents, exactly).
    pub data: Bytes,
}

impl Payload {
    /// A payload for `slot`.
    pub fn new(slot: impl Into<String>, data: impl Into<Bytes>) -> Self {
        Self {
            slot: slot.into(),
            data: data.into(),
        }
    }
}

/// The patches that put `payloads` into `base` according to `table`. Slots without a payload
/// keep their base contents. Errors: unknown slot, slot given twice, payload over capacity,
/// base of the wrong size, a kind this build cannot rewrite.
pub fn plan_injection(
    table: &SlotTable,
    base: &dyn ReadAt,
    payloads: &[Payload],
) -> Result<PatchPlan> {
    table.check_image_len(base.len(), "base image")?;
    let mut regions = Vec::new();
    for (i, p) in payloads.iter().enumerate() {
        if payloads[..i].iter().any(|q| q.slot == p.slot) {
            return Err(Error::DuplicateSlot(p.slot.clone()));
        }
        let slot = table.get(&p.slot).ok_or_else(|| Error::UnknownSlot {
            name: p.slot.clone(),
            available: table.names(),
        })?;
        let len = p.data.len() as u64;
        if len > slot.capacity {
            return Err(Error::TooLarge {
                slot: slot.name.clone(),
                len,
                capacity: slot.capacity,
            });
        }
        regions.extend(data_regions(slot, &p.data));
        regions.extend(metadata_regions(slot, base, len)?);
    }
    PatchPlan::new(table.image_len, regions)
}

/// The data area of `slot` holding `payload` followed by zeroes.
pub fn data_regions(slot: &Slot, payload: &Bytes) -> Vec<Region> {
    let mut rest = payload.clone();
    slot.data
        .iter()
        .map(|r| {
            let take = (r.len.min(rest.len() as u64)) as usize;
            let data = rest.split_to(take);
            Region {
                offset: r.offset,
                len: r.len,
                data,
            }
        })
        .collect()
}

/// The metadata patches for `slot` holding a payload of `len` bytes. This is where each
/// filesystem kind's rewrite function is wired in.
pub fn metadata_regions(slot: &Slot, base: &dyn ReadAt, len: u64) -> Result<Vec<Region>> {
    match &slot.meta {
        SlotMeta::Raw(m) => Ok(raw_size_fields(m, len)),
        // To wire a filesystem kind: call its format-level rewrite with the base bytes it
        // needs (read via `base.read_exact_at`) and map the result to absolute Regions, e.g.
        //   SlotMeta::Ext4(m) => ext4_regions(m, base, len),
        // where ext4_regions reads the 256-byte inode at m.inode_offset and the superblock at
        // m.fs_offset + 1024 (checksum seed), calls kiln_formats::ext4::slot::rewrite_inode and
        // returns Region::bytes(m.inode_offset, new_inode).
        SlotMeta::Iso9660(m) => iso9660_regions(&slot.name, m, base, len),
        SlotMeta::Ext4(_) | SlotMeta::Fat(_) | SlotMeta::Erofs(_) => Err(Error::Unsupported {
            slot: slot.name.clone(),
            kind: slot.kind(),
        }),
    }
}

/// ISO 9660: the both-endian data length of every directory record (ISO 9660 and Joliet)
/// pointing at the slot's extent; nothing else in the image depends on a file's size (see
/// `kiln_formats::iso9660::slot`). Each record is checked first, so a table that does not
/// belong to this image cannot overwrite another record.
fn iso9660_regions(name: &str, m: &IsoMeta, base: &dyn ReadAt, len: u64) -> Result<Vec<Region>> {
    use kiln_formats::iso9660::slot as iso;
    for &r in &m.record_offsets {
        let mut rec = [0u8; 34];
        let n = base
            .read_at(r, &mut rec)
            .map_err(|e| Error::io(format!("base image: slot {name:?} record at {r}"), e))?;
        // The record alone, at offset 0 of a copy: the check reads only these bytes.
        let rec: &[u8] = rec.get(..n).unwrap_or_default();
        iso::verify_records(&rec, m.extent_lba, &[0]).map_err(|e| Error::Table {
            place: "base image".into(),
            offset: r,
            msg: format!("slot {name:?}: {e}"),
        })?;
    }
    let patches = iso::record_size_patches(&m.record_offsets, len)
        .map_err(|e| Error::InvalidTable(format!("slot {name:?}: {e}")))?;
    Ok(patches
        .into_iter()
        .map(|p| Region::bytes(p.offset, Bytes::from(p.data)))
        .collect())
}

/// Each size field gets `len` in little-endian, truncated to its width (the table validation
/// guarantees the capacity, hence `len`, fits).
fn raw_size_fields(m: &RawMeta, len: u64) -> Vec<Region> {
    m.size_fields
        .iter()
        .map(|f| {
            let bytes = len.to_le_bytes();
            Region::bytes(
                f.offset,
                Bytes::copy_from_slice(&bytes[..usize::from(f.width).min(8)]),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slots::{ByteRange, PayloadInfo, SizeField};
    use crate::ComposedImage;
    use std::sync::Arc;

    fn table() -> SlotTable {
        SlotTable {
            image_len: 4096,
            slots: vec![
                Slot {
                    name: "a".into(),
                    path: String::new(),
                    capacity: 300,
                    data: vec![
                        ByteRange {
                            offset: 1000,
                            len: 200,
                        },
                        ByteRange {
                            offset: 2000,
                            len: 100,
                        },
                    ],
                    meta: SlotMeta::Raw(RawMeta {
                        size_fields: vec![
                            SizeField {
                                offset: 990,
                                width: 2,
                            },
                            SizeField {
                                offset: 992,
                                width: 8,
                            },
                        ],
                    }),
                    default: PayloadInfo::of(b""),
                },
                Slot {
                    name: "b".into(),
                    path: String::new(),
                    capacity: 10,
                    data: vec![ByteRange {
                        offset: 3000,
                        len: 10,
                    }],
                    meta: SlotMeta::Raw(RawMeta::default()),
                    default: PayloadInfo::of(b""),
                },
            ],
        }
    }

    fn compose(base: &[u8], plan: PatchPlan) -> Vec<u8> {
        use std::io::Read;
        let mut out = Vec::new();
        ComposedImage::new(base, Arc::new(plan))
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn payload_spans_ranges_and_size_fields_are_written() {
        let base = vec![0xEEu8; 4096];
        let payload: Vec<u8> = (0..250u32).map(|i| i as u8).collect();
        let plan = plan_injection(&table(), &base, &[Payload::new("a", payload.clone())]).unwrap();
        let out = compose(&base, plan);
        assert_eq!(&out[1000..1200], &payload[..200]);
        assert_eq!(&out[2000..2050], &payload[200..]);
        assert!(out[2050..2100].iter().all(|&b| b == 0));
        assert_eq!(&out[990..992], &250u16.to_le_bytes());
        assert_eq!(&out[992..1000], &250u64.to_le_bytes());
        assert!(
            out[3000..3010].iter().all(|&b| b == 0xEE),
            "slot b untouched"
        );
        assert_eq!(out[989], 0xEE);
    }

    #[test]
    fn empty_full_and_repeated_payloads() {
        let base = vec![0x55u8; 4096];
        let t = table();
        let empty = compose(
            &base,
            plan_injection(&t, &base, &[Payload::new("a", vec![])]).unwrap(),
        );
        assert!(empty[1000..1200].iter().all(|&b| b == 0));
        assert_eq!(&empty[990..992], &[0, 0]);
        let full = vec![9u8; 300];
        let once = compose(
            &base,
            plan_injection(&t, &base, &[Payload::new("a", full.clone())]).unwrap(),
        );
        // Injecting into the already-injected image gives the same bytes.
        let twice = compose(
            &once,
            plan_injection(&t, &once, &[Payload::new("a", full)]).unwrap(),
        );
        assert_eq!(once, twice);
    }

    #[test]
    fn errors() {
        let base = vec![0u8; 4096];
        let t = table();
        let cases: Vec<(Vec<Payload>, &str)> = vec![
            (
                vec![Payload::new("nope", vec![])],
                "unknown slot \"nope\" (this image has: a, b)",
            ),
            (
                vec![Payload::new("a", vec![0; 301])],
                "301 bytes, more than the slot's capacity of 300",
            ),
            (
                vec![Payload::new("b", vec![]), Payload::new("b", vec![])],
                "more than once",
            ),
        ];
        for (p, want) in cases {
            let e = plan_injection(&t, &base, &p).unwrap_err().to_string();
            assert!(e.contains(want), "{e} !~ {want}");
        }
        let e = plan_injection(&t, &&base[..100], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("image is 100 bytes"), "{e}");
        let mut t2 = t.clone();
        t2.slots[1].meta = SlotMeta::Ext4(crate::slots::Ext4Meta {
            fs_offset: 0,
            inode: 12,
            inode_offset: 0,
        });
        let e = plan_injection(&t2, &base, &[Payload::new("b", vec![])])
            .unwrap_err()
            .to_string();
        assert!(e.contains("ext4 slots is not available"), "{e}");
    }
    /// An ISO 9660 slot: both-endian sizes in each record; a table whose offsets do not hold
    /// a record of the slot's extent is refused before anything is patched.
    #[test]
    fn iso9660_slot_patches_record_sizes_and_checks_records() {
        // Two 34-byte file records (ISO 9660 and Joliet) for extent 7 holding 10 bytes.
        let mut base = vec![0u8; 4096];
        for r in [100usize, 300] {
            base[r] = 34;
            base[r + 2..r + 6].copy_from_slice(&7u32.to_le_bytes());
            base[r + 6..r + 10].copy_from_slice(&7u32.to_be_bytes());
            base[r + 10..r + 14].copy_from_slice(&10u32.to_le_bytes());
            base[r + 14..r + 18].copy_from_slice(&10u32.to_be_bytes());
        }
        let slot = |records: Vec<u64>| Slot {
            name: "page".into(),
            path: "/page.html".into(),
            capacity: 2048,
            data: vec![ByteRange {
                offset: 2048,
                len: 2048,
            }],
            meta: SlotMeta::Iso9660(IsoMeta {
                fs_offset: 0,
                extent_lba: 7,
                record_offsets: records,
            }),
            default: PayloadInfo::of(b""),
        };
        let regions = metadata_regions(&slot(vec![100, 300]), &base, 0x0102_0304).unwrap();
        let want: Vec<u8> = [0x04, 0x03, 0x02, 0x01, 0x01, 0x02, 0x03, 0x04].to_vec();
        assert_eq!(regions.len(), 2);
        for (r, at) in regions.iter().zip([110u64, 310]) {
            assert_eq!((r.offset, r.len, &r.data[..]), (at, 8, &want[..]));
        }
        // Offset 200 holds no record: an error naming it, no patches.
        let err = metadata_regions(&slot(vec![100, 200]), &base, 5).unwrap_err();
        assert!(matches!(err, Error::Table { offset: 200, .. }), "{err}");
        // A record of another extent is refused too.
        base[302..306].copy_from_slice(&8u32.to_le_bytes());
        base[306..310].copy_from_slice(&8u32.to_be_bytes());
        let err = metadata_regions(&slot(vec![100, 300]), &base, 5).unwrap_err();
        assert!(err.to_string().contains("extent 7"), "{err}");
    }
}
