//! Payloads → patches. [`plan_injection`] turns a slot table and one payload per chosen slot
//! into a [`PatchPlan`]: for every slot, the data area (payload, then zero fill to the end of
//! the reservation, so the result never depends on what the base held there) plus the
//! kind-specific metadata patches.
//!
//! Filesystem kinds plug in at [`metadata_regions`]: one `match` arm per [`SlotMeta`] variant
//! that calls the format's "rewrite metadata for a new size" function (see [`crate::kinds`]),
//! after checking that the base still holds what the table says. Metadata patches of all
//! slots are planned over one overlay, so slots sharing a structure (several FAT slots in one
//! filesystem patch the same FAT sectors and FSInfo sector) compose into one region each.

use bytes::Bytes;

use crate::bounds::ImageBounds;
use crate::kinds::{self, Overlay};
use crate::region::{PatchPlan, Region};
use crate::slots::{RawMeta, Slot, SlotMeta, SlotTable};
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
/// base of the wrong size, a base whose filesystem no longer matches the table.
pub fn plan_injection(
    table: &SlotTable,
    base: &(dyn ReadAt + Sync),
    payloads: &[Payload],
) -> Result<PatchPlan> {
    table.check_image_len(base.len(), "base image")?;
    let bounds = ImageBounds::read(base);
    for slot in &table.slots {
        bounds.check(table, slot, &[])?;
    }
    let mut regions = Vec::new();
    let mut overlay = Overlay::new(base);
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
        let patches = metadata_patches(slot, &overlay, len)?;
        let spans: Vec<(u64, u64)> = patches.iter().map(|(o, b)| (*o, b.len() as u64)).collect();
        bounds.check(table, slot, &spans)?;
        for (offset, bytes) in patches {
            overlay.add(offset, &bytes);
        }
    }
    regions.extend(
        overlay
            .into_patches()
            .map(|(offset, bytes)| Region::bytes(offset, bytes)),
    );
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

/// The metadata patches for `slot` alone holding a payload of `len` bytes, read from `base`
/// (which is checked against the table first).
pub fn metadata_regions(slot: &Slot, base: &(dyn ReadAt + Sync), len: u64) -> Result<Vec<Region>> {
    let overlay = Overlay::new(base);
    Ok(metadata_patches(slot, &overlay, len)?
        .into_iter()
        .map(|(offset, bytes)| Region::bytes(offset, bytes))
        .collect())
}

/// One arm per filesystem kind.
fn metadata_patches(slot: &Slot, src: &Overlay, len: u64) -> Result<kinds::Patches> {
    match &slot.meta {
        SlotMeta::Raw(m) => Ok(raw_size_fields(m, len)),
        SlotMeta::Ext4(m) => kinds::ext4(slot, m, src, len),
        SlotMeta::Fat(m) => kinds::fat(slot, m, src, len),
        SlotMeta::Erofs(m) => kinds::erofs(slot, m, src, len),
        SlotMeta::Iso9660(m) => kinds::iso9660(slot, m, src, len),
    }
}

/// Each size field gets `len` in little-endian, truncated to its width (the table validation
/// guarantees the capacity, hence `len`, fits).
fn raw_size_fields(m: &RawMeta, len: u64) -> kinds::Patches {
    m.size_fields
        .iter()
        .map(|f| {
            let bytes = len.to_le_bytes();
            (f.offset, bytes[..usize::from(f.width).min(8)].to_vec())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slots::{ByteRange, IsoMeta, PayloadInfo, SizeField};
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
        assert!(e.contains("slot \"b\" (ext4 filesystem at byte 0)"), "{e}");
    }
    /// An ISO 9660 slot: both-endian sizes in each record; a table whose offsets do not hold
    /// a record of the slot's extent is refused before anything is patched.
    #[test]
    fn iso9660_slot_patches_record_sizes_and_checks_records() {
        // Two 34-byte file records (ISO 9660 and Joliet) for extent 7 holding 10 bytes.
        let mut base = vec![0u8; 8 * 2048];
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
                offset: 7 * 2048,
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
        assert!(matches!(err, Error::Base { .. }), "{err}");
        assert!(err.to_string().contains("byte offset 200"), "{err}");
        // A record of another extent is refused too.
        base[302..306].copy_from_slice(&8u32.to_le_bytes());
        base[306..310].copy_from_slice(&8u32.to_be_bytes());
        let err = metadata_regions(&slot(vec![100, 300]), &base, 5).unwrap_err();
        assert!(err.to_string().contains("extent 7"), "{err}");
    }
}
