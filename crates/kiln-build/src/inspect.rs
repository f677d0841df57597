//! `kiln inspect`: what is in an image — kiln's or anyone's. A GPT disk shows its partitions
//! with the filesystem or verity superblock found in each; an ISO shows its volume descriptors,
//! El Torito catalog and hybrid GPT; a bare filesystem image shows itself; kiln's slot table is
//! shown wherever it is found.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Context, Result};
use kiln_formats::repart::Uuid;
use kiln_formats::{gpt, iso9660, verity};
use serde::Serialize;

/// A filesystem (or verity superblock) recognised at some offset.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Detected {
    /// `ext4`, `erofs`, `vfat`, `iso9660`, `verity`, `swap`, `squashfs`.
    pub kind: String,
    /// Label, if the format has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// UUID or serial, if the format has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Bytes the filesystem spans (ext4, EROFS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Inodes (ext4).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inodes: Option<u64>,
    /// Data blocks the hash tree covers (verity).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_blocks: Option<u64>,
    /// Data block size in bytes (verity).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_block_size: Option<u64>,
    /// Hash block size in bytes (verity).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash_block_size: Option<u64>,
    /// Salt, hex (verity).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub salt: Option<String>,
    /// FAT entry width: 12, 16 or 32 (vfat).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fat_bits: Option<u8>,
    /// Why a recognised superblock could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Detected {
    /// The format-specific facts as `key=value` pairs for the human form.
    fn details(&self) -> Vec<(&'static str, String)> {
        let mut d = Vec::new();
        let mut put = |k: &'static str, v: Option<String>| {
            if let Some(v) = v {
                d.push((k, v));
            }
        };
        put("data_blocks", self.data_blocks.map(|v| v.to_string()));
        put(
            "data_block_size",
            self.data_block_size.map(|v| v.to_string()),
        );
        put(
            "hash_block_size",
            self.hash_block_size.map(|v| v.to_string()),
        );
        put("salt", self.salt.clone());
        put("size", self.size.map(|v| v.to_string()));
        put("inodes", self.inodes.map(|v| v.to_string()));
        put("fat", self.fat_bits.map(|b| format!("FAT{b}")));
        put("error", self.error.clone());
        d
    }
}

/// One GPT partition.
#[derive(Clone, Debug, Serialize)]
pub struct PartInfo {
    /// Partition number.
    pub number: u32,
    /// DPS type name, or the GUID.
    #[serde(rename = "type")]
    pub type_name: String,
    /// Partition UUID.
    pub uuid: String,
    /// GPT name.
    pub label: String,
    /// Byte offset.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
    /// Attribute names.
    pub attributes: Vec<String>,
    /// What is inside.
    pub content: Option<Detected>,
}

/// An inspected image.
#[derive(Clone, Debug, Serialize)]
pub struct Inspection {
    /// [`crate::json::INSPECT_SCHEMA`].
    pub schema: &'static str,
    /// The file.
    pub path: String,
    /// Its size.
    pub size: u64,
    /// Disk GUID, for a GPT disk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_uuid: Option<String>,
    /// Why the primary GPT was not used, if the backup was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpt_warning: Option<String>,
    /// Why neither GPT header could be used, on a disk that says it has a GPT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpt_error: Option<String>,
    /// GPT partitions.
    pub partitions: Vec<PartInfo>,
    /// What the image itself is when it is not (only) a partitioned disk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<Detected>,
    /// ISO 9660 details (descriptors, El Torito) in human form.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iso: Option<String>,
    /// The El Torito boot catalog's entries, one summary line each.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub boot_entries: Vec<String>,
    /// kiln's slot table.
    #[serde(serialize_with = "crate::json::slots")]
    pub slots: Vec<kiln_inject::Slot>,
    /// Why the slot table could not be read, when one seems to be there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot_error: Option<String>,
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn text(b: &[u8]) -> Option<String> {
    let s = String::from_utf8_lossy(b)
        .trim_end_matches(['\0', ' '])
        .to_string();
    (!s.is_empty()).then_some(s)
}

/// Recognises what starts at `off` in `f`.
pub fn detect(f: &File, off: u64, len: u64) -> Option<Detected> {
    let mut head = vec![0u8; 4096.min(usize::try_from(len).unwrap_or(usize::MAX))];
    if head.len() < 1024 || f.read_exact_at(&mut head, off).is_err() {
        return None;
    }
    if head.starts_with(&verity::SIGNATURE) {
        return Some(
            match verity::parse_superblock(&head[..verity::SUPERBLOCK_SIZE]) {
                Ok((sb, params)) => Detected {
                    kind: "verity".into(),
                    uuid: Some(params.uuid.to_string()),
                    data_blocks: Some(sb.data_blocks.get()),
                    data_block_size: Some(u64::from(params.data_block_size)),
                    hash_block_size: Some(u64::from(params.hash_block_size)),
                    salt: Some(hex::encode(&params.salt)),
                    ..Default::default()
                },
                Err(e) => Detected {
                    kind: "verity".into(),
                    error: Some(e.to_string()),
                    ..Default::default()
                },
            },
        );
    }
    if head.len() >= 2048 && le16(&head, 1024 + 56) == 0xEF53 {
        let sb = &head[1024..];
        let blocks = u64::from(le32(sb, 4)) | (u64::from(le32(sb, 0x150)) << 32);
        let bs = 1024u64 << le32(sb, 24).min(16);
        return Some(Detected {
            kind: "ext4".into(),
            label: text(&sb[120..136]),
            uuid: Some(Uuid::from_slice(&sb[104..120]).ok()?.to_string()),
            size: Some(blocks * bs),
            inodes: Some(u64::from(le32(sb, 0))),
            ..Default::default()
        });
    }
    if head.len() >= 2048 && le32(&head, 1024) == 0xE0F5_E1E2 {
        let sb = &head[1024..];
        let blocks = u64::from(le32(sb, 36)) << sb[12].min(16);
        return Some(Detected {
            kind: "erofs".into(),
            label: text(&sb[64..80]),
            uuid: Some(Uuid::from_slice(&sb[48..64]).ok()?.to_string()),
            size: Some(blocks),
            ..Default::default()
        });
    }
    if head.len() >= 4096 && &head[4086..4096] == b"SWAPSPACE2" {
        return Some(Detected {
            kind: "swap".into(),
            ..Default::default()
        });
    }
    if head.starts_with(b"hsqs") {
        return Some(Detected {
            kind: "squashfs".into(),
            ..Default::default()
        });
    }
    if le16(&head, 510) == 0xAA55 && (head[0] == 0xEB || head[0] == 0xE9) {
        let (bits, serial_at, label_at) = if &head[82..87] == b"FAT32" {
            (32, 67, 71)
        } else if &head[54..59] == b"FAT16" || &head[54..59] == b"FAT12" {
            (if &head[54..59] == b"FAT16" { 16 } else { 12 }, 39, 43)
        } else {
            return None;
        };
        let serial = le32(&head, serial_at);
        return Some(Detected {
            kind: "vfat".into(),
            label: text(&head[label_at..label_at + 11]).filter(|l| l != "NO NAME"),
            uuid: Some(format!("{:04X}-{:04X}", serial >> 16, serial & 0xFFFF)),
            fat_bits: Some(bits),
            ..Default::default()
        });
    }
    let mut cd = [0u8; 6];
    if len > 32774 && f.read_exact_at(&mut cd, off + 32768).is_ok() && &cd[1..6] == b"CD001" {
        let mut pvd = vec![0u8; 2048];
        f.read_exact_at(&mut pvd, off + 32768).ok()?;
        return Some(Detected {
            kind: "iso9660".into(),
            label: text(&pvd[40..72]),
            ..Default::default()
        });
    }
    None
}

/// Inspects the image at `path`.
pub fn inspect(path: &Path) -> Result<Inspection> {
    // Checked before opening: opening a FIFO blocks until a writer appears.
    let md = std::fs::metadata(path).with_context(|| format!("inspecting {}", path.display()))?;
    kiln_inject::source::image_kind(&md, path)?;
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = {
        use std::io::{Seek, SeekFrom};
        (&f).seek(SeekFrom::End(0))
            .with_context(|| format!("{}: size", path.display()))?
    };
    let mut ins = Inspection {
        schema: crate::json::INSPECT_SCHEMA,
        path: path.display().to_string(),
        size,
        disk_uuid: None,
        gpt_warning: None,
        gpt_error: None,
        partitions: Vec::new(),
        filesystem: None,
        iso: None,
        boot_entries: Vec::new(),
        slots: Vec::new(),
        slot_error: None,
    };
    match gpt::Gpt::read(&f) {
        Ok(g) => {
            ins.disk_uuid = Some(g.disk_guid.to_string());
            ins.gpt_warning = g.primary_error.clone();
            for (i, p) in g.partitions.iter().enumerate() {
                let attributes = gpt::attribute_names(p.attributes);
                ins.partitions.push(PartInfo {
                    number: g.entry_numbers.get(i).copied().unwrap_or(i as u32 + 1),
                    type_name: gpt::type_by_guid(&p.type_guid)
                        .map(|t| t.name.to_string())
                        .unwrap_or_else(|| p.type_guid.to_string()),
                    uuid: p.part_guid.to_string(),
                    label: p.name.clone(),
                    offset: p.offset(),
                    size: p.size(),
                    attributes,
                    content: detect(&f, p.offset(), p.size()),
                });
            }
        }
        Err(e) => {
            // Not a GPT disk: maybe a bare filesystem. But a disk whose protective MBR or
            // either header says GPT, with both copies unusable, is a damaged disk.
            if claims_gpt(&f, size) {
                ins.gpt_error = Some(e.to_string());
            }
            ins.filesystem = detect(&f, 0, size);
        }
    }
    let mut cd = [0u8; 6];
    if size > 32774 && f.read_exact_at(&mut cd, 32768).is_ok() && &cd[1..6] == b"CD001" {
        match iso9660::dump::dump(&f, size) {
            Ok(d) => ins.iso = Some(d),
            Err(e) => ins.iso = Some(format!("ISO 9660 descriptors unreadable: {e}")),
        }
        if ins.filesystem.is_none() {
            ins.filesystem = detect(&f, 0, size);
        }
        if let Ok(Some(cat)) = iso9660::reader::IsoImage::open_file(&f).map(|i| i.boot) {
            ins.boot_entries = boot_entries(&cat, &ins.partitions);
        }
    }
    match kiln_inject::slots::read_table(&f, &path.display().to_string()) {
        Ok(t) => ins.slots = t.slots,
        Err(e) => {
            // No magic at 24576 means no table; anything else is a damaged one, worth saying.
            let mut magic = [0u8; 8];
            if size >= kiln_inject::slots::TABLE_OFFSET + 8
                && f.read_exact_at(&mut magic, kiln_inject::slots::TABLE_OFFSET)
                    .is_ok()
                && magic == kiln_inject::slots::MAGIC
            {
                ins.slot_error = Some(e.to_string());
            } else if let Ok(t) = std::fs::read(kiln_inject::slots::sidecar_path(path))
                .map_err(anyhow::Error::from)
                .and_then(|b| Ok(kiln_inject::SlotTable::from_sidecar_json(&b, "sidecar")?))
            {
                ins.slots = t.slots;
            }
        }
    }
    Ok(ins)
}

/// True when the image says it has a GPT: a protective MBR entry (type 0xEE, UEFI 2.10
/// §5.2.3) or the `EFI PART` signature at LBA 1 or at the last LBA.
fn claims_gpt(f: &File, size: u64) -> bool {
    let mut mbr = [0u8; 512];
    if f.read_exact_at(&mut mbr, 0).is_ok()
        && mbr[510..512] == [0x55, 0xAA]
        && (0..4).any(|i| mbr[446 + 16 * i + 4] == 0xEE)
    {
        return true;
    }
    let mut sig = [0u8; 8];
    [512, size.saturating_sub(512) & !511]
        .into_iter()
        .filter(|&o| o > 0)
        .any(|o| f.read_exact_at(&mut sig, o).is_ok() && &sig == b"EFI PART")
}

impl Inspection {
    /// True when nothing in the image was recognised.
    pub fn recognised(&self) -> bool {
        self.disk_uuid.is_some()
            || self.gpt_error.is_some()
            || self.filesystem.is_some()
            || self.iso.is_some()
            || !self.slots.is_empty()
            || self.slot_error.is_some()
    }
}

/// One line per El Torito entry: platform, where its image lies and, for a hybrid ISO, the
/// GPT partition holding the same bytes (what a USB boot reads instead).
fn boot_entries(cat: &iso9660::reader::BootCatalog, parts: &[PartInfo]) -> Vec<String> {
    cat.images
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let platform = match b.platform {
                iso9660::layout::PLATFORM_EFI => "UEFI".to_string(),
                iso9660::layout::PLATFORM_X86 => "BIOS".to_string(),
                p => format!("platform {p:#04x}"),
            };
            let at = u64::from(b.load_rba) * 2048;
            let part = parts
                .iter()
                .find(|p| p.offset == at)
                .map(|p| format!(", = GPT partition {} ({})", p.number, p.type_name))
                .unwrap_or_default();
            format!(
                "entry {i}: {platform}{}{}, image at byte {at} ({} sectors of 512 in the entry; 0 = to the end){part}",
                if b.bootable { " bootable" } else { "" },
                if b.media_type == 0 { " no-emulation" } else { "" },
                b.sector_count,
            )
        })
        .collect()
}

fn human(b: u64) -> String {
    crate::spec::human_size(b)
}

/// The human form.
pub fn format(ins: &Inspection) -> String {
    let mut o = format!("{}: {} ({} bytes)\n", ins.path, human(ins.size), ins.size);
    if let Some(u) = &ins.disk_uuid {
        o += &format!("GPT disk {u}\n");
    }
    if let Some(e) = &ins.gpt_error {
        o += &format!("GPT: both headers unusable: {e}\n");
    }
    if let Some(w) = &ins.gpt_warning {
        o += &format!("  warning: primary GPT unusable ({w}); read the backup\n");
    }
    for p in &ins.partitions {
        o += &format!(
            "  {:>2}  {:<22} {:<20} {:>10}  @{:<12} {}{}\n",
            p.number,
            p.type_name,
            p.label,
            human(p.size),
            p.offset,
            p.uuid,
            if p.attributes.is_empty() {
                String::new()
            } else {
                format!(" [{}]", p.attributes.join(","))
            }
        );
        if let Some(d) = &p.content {
            o += &format!("      {}\n", describe(d));
        }
    }
    if let Some(d) = &ins.filesystem {
        o += &format!("image: {}\n", describe(d));
    }
    if !ins.boot_entries.is_empty() {
        o += "El Torito boot catalog:\n";
        for l in &ins.boot_entries {
            o += &format!("  {l}\n");
        }
    }
    if let Some(iso) = &ins.iso {
        o += "ISO 9660:\n";
        for l in iso.lines() {
            o += &format!("  {l}\n");
        }
    }
    if let Some(e) = &ins.slot_error {
        o += &format!("slot table: {e}\n");
    }
    if !ins.slots.is_empty() {
        o += "slots:\n";
        for s in &ins.slots {
            let at = s.data.first().map(|r| r.offset).unwrap_or(0);
            o += &format!(
                "  {:<12} {:<8} {:<24} capacity {:>10}  data @{}  default {} bytes\n",
                s.name,
                s.kind().to_string(),
                s.path,
                human(s.capacity),
                at,
                s.default.len
            );
        }
    }
    o
}

fn describe(d: &Detected) -> String {
    let mut s = d.kind.clone();
    if let Some(l) = &d.label {
        s += &format!(" label={l:?}");
    }
    if let Some(u) = &d.uuid {
        s += &format!(" uuid={u}");
    }
    for (k, v) in d.details() {
        s += &format!(" {k}={v}");
    }
    s
}
/// The full dumps (`kiln inspect --dump`) of every ext4 and EROFS filesystem of the image at
/// `path` (each GPT partition, or the whole file) and of its ISO 9660 volume: superblock,
/// groups and every inode with its path, as the golden tests snapshot them. An unreadable
/// filesystem gets a line saying why instead.
pub fn dumps(path: &Path, ins: &Inspection) -> Result<String> {
    use kiln_formats::{erofs, ext4};
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut places: Vec<(String, u64, u64, &Detected)> = ins
        .partitions
        .iter()
        .filter_map(|p| {
            p.content.as_ref().map(|c| {
                (
                    format!("partition {} ({})", p.number, p.label),
                    p.offset,
                    p.size,
                    c,
                )
            })
        })
        .collect();
    if let Some(c) = &ins.filesystem {
        places.push(("the image".to_string(), 0, ins.size, c));
    }
    let mut out = String::new();
    for (what, off, len, c) in places {
        let w = kiln_formats::io::Window {
            inner: &f,
            offset: off,
            len,
        };
        let text = match c.kind.as_str() {
            "ext4" => ext4::reader::Reader::open(w)
                .and_then(|r| {
                    Ok(format!(
                        "{}\n{}",
                        ext4::dump::superblock(&r),
                        ext4::dump::tree(&r)?
                    ))
                })
                .map_err(|e| e.to_string()),
            "erofs" => erofs::Image::open(w)
                .and_then(|img| erofs::dump::dump(&img, usize::MAX))
                .map_err(|e| e.to_string()),
            _ => continue,
        };
        out.push_str(&format!("== {what}: {}\n", c.kind));
        match text {
            Ok(t) => out.push_str(&t),
            Err(e) => out.push_str(&format!("unreadable: {e}\n")),
        }
        out.push('\n');
    }
    if let Some(iso) = &ins.iso {
        out.push_str("== ISO 9660\n");
        out.push_str(iso);
    }
    Ok(out)
}
