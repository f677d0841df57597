//! The JSON conventions every `--json` output and the build report follow (README, "JSON
//! output"; the schemas are `docs/json/*.schema.json`):
//!
//! - a top-level `"schema": "kiln.NAME/MAJOR"`; MAJOR grows when a field is renamed, removed or
//!   changes type, not when an optional field is added;
//! - snake_case keys; names as values (partition types, roles, attributes) in kebab-case;
//! - byte counts are `size` or end in `_size` (`capacity` is the slot's own term);
//! - digests of bytes are `"sha256:HEX"` under `digest` or a key ending in `_digest`; dm-verity
//!   root hashes and salts stay plain hex, as `roothash=` and veritysetup take them;
//! - GPT attributes are a list of names; objects, not lists of pairs; no Rust enum names.
//!
//! These serializers let the report structs keep their internal types (a hex `sha256` that
//! provenance also uses, attribute bits, the slot table's own structs) while the JSON follows
//! the conventions.

use kiln_inject::slots::{ByteRange, PayloadInfo, Slot, SlotMeta};
use serde::ser::SerializeSeq;
use serde::{Serialize, Serializer};

/// Schema name of the build report (`OUTDIR/NAME.json`, `kiln build --json`).
pub const BUILD_SCHEMA: &str = "kiln.build/2";
/// Schema name of `kiln update --json` (both `--with` and `--from`).
pub const UPDATE_SCHEMA: &str = "kiln.update/1";
/// Schema name of `kiln inspect --json`.
pub const INSPECT_SCHEMA: &str = "kiln.inspect/1";

/// `"sha256:HEX"` from lowercase hex.
pub fn sha256_digest(hex: &str) -> String {
    format!("sha256:{hex}")
}

/// Serializes a hex sha256 as `"sha256:HEX"`.
pub fn sha256<S: Serializer>(hex: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&sha256_digest(hex))
}

/// Serializes GPT attribute bits as their names.
pub fn gpt_attributes<S: Serializer>(bits: &u64, s: S) -> Result<S::Ok, S::Error> {
    kiln_formats::gpt::attribute_names(*bits).serialize(s)
}

/// A byte range as reported: `{offset, size}`.
#[derive(Serialize)]
struct Range {
    offset: u64,
    size: u64,
}

impl From<&ByteRange> for Range {
    fn from(r: &ByteRange) -> Self {
        Range {
            offset: r.offset,
            size: r.len,
        }
    }
}

/// A payload as reported: `{size, digest}`.
#[derive(Serialize)]
struct Payload<'a> {
    size: u64,
    #[serde(serialize_with = "sha256")]
    digest: &'a str,
}

impl<'a> From<&'a PayloadInfo> for Payload<'a> {
    fn from(p: &'a PayloadInfo) -> Self {
        Payload {
            size: p.len,
            digest: &p.sha256,
        }
    }
}

/// One slot as reported. The slot table itself (in the image and its `.slots.json` sidecar) is
/// an on-disk format with its own version and keeps its names; this is its view in reports.
#[derive(Serialize)]
struct SlotView<'a> {
    name: &'a str,
    path: &'a str,
    kind: String,
    capacity: u64,
    data: Vec<Range>,
    meta: &'a SlotMeta,
    default: Payload<'a>,
}

impl<'a> From<&'a Slot> for SlotView<'a> {
    fn from(s: &'a Slot) -> Self {
        SlotView {
            name: &s.name,
            path: &s.path,
            kind: s.kind().to_string(),
            capacity: s.capacity,
            data: s.data.iter().map(Range::from).collect(),
            meta: &s.meta,
            default: Payload::from(&s.default),
        }
    }
}

/// Serializes slots in the report view.
pub fn slots<S: Serializer>(slots: &[Slot], s: S) -> Result<S::Ok, S::Error> {
    let mut seq = s.serialize_seq(Some(slots.len()))?;
    for slot in slots {
        seq.serialize_element(&SlotView::from(slot))?;
    }
    seq.end()
}
