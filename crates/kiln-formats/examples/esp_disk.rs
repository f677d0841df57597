//! Builds a GPT disk image holding one ESP whose FAT filesystem is filled from a host
//! directory, for trying kiln's GPT and FAT writers with firmware (QEMU + OVMF) by hand.
//!
//! Usage: `esp_disk SRC_DIR DISK.img ESP_MIB [12|16|32]`

use std::fs::File;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use kiln_formats::fat::{FatOptions, FatType, FatWriter};
use kiln_formats::fstree::{DataRef, FileData, HostContents, Meta, Node, NodeKind, Tree};
use kiln_formats::gpt::{self, Gpt, Partition};
use kiln_formats::repart::Uuid;
use kiln_formats::sink::FileSink;

fn load(tree: &mut Tree, root: &Path, dir: &Path) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let rel = p.strip_prefix(root).map_err(std::io::Error::other)?;
        let rel = format!("/{}", rel.display());
        if e.file_type()?.is_dir() {
            tree.mkdir_p(rel.as_bytes(), &Meta::default())
                .map_err(std::io::Error::other)?;
            load(tree, root, &p)?;
        } else {
            let size = e.metadata()?.len();
            let node = Node {
                kind: NodeKind::File(FileData::dense(size, DataRef::Host(Arc::from(p.as_path())))),
                meta: Meta::default(),
                slot: None,
            };
            tree.insert(rel.as_bytes(), node, &Meta::default())
                .map_err(std::io::Error::other)?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (src, out, mib, ty) = match args.as_slice() {
        [s, o, m] => (s, o, m, None),
        [s, o, m, t] => (s, o, m, Some(t.as_str())),
        _ => {
            eprintln!("usage: esp_disk SRC_DIR DISK.img ESP_MIB [12|16|32]");
            return ExitCode::from(2);
        }
    };
    let run = || -> Result<(), Box<dyn std::error::Error>> {
        let esp_size = mib.parse::<u64>()? << 20;
        let fat_type = match ty {
            Some("12") => Some(FatType::Fat12),
            Some("16") => Some(FatType::Fat16),
            Some("32") => Some(FatType::Fat32),
            None => None,
            Some(other) => return Err(format!("unknown FAT type {other}").into()),
        };
        let mut tree = Tree::default();
        load(&mut tree, Path::new(src), Path::new(src))?;
        let disk_size = esp_size + (2 << 20);
        let mut g = Gpt::new(disk_size, Uuid::from_bytes([0x42; 16]))?;
        g.partitions.push(Partition {
            type_guid: gpt::TYPE_ESP,
            part_guid: Uuid::from_bytes([0x24; 16]),
            first_lba: 2048,
            last_lba: 2048 + esp_size / 512 - 1,
            attributes: 0,
            name: "esp".into(),
        });
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(out)?;
        f.set_len(disk_size)?;
        let disk = FileSink::new(&f, 0, disk_size);
        g.write(&disk)?;
        let w = FatWriter::new(
            &tree,
            FatOptions {
                size: esp_size,
                fat_type,
                volume_id: [1, 2, 3, 4],
                label: Some("ESP".into()),
            },
        )?;
        w.write(&HostContents, &disk.sub(1 << 20, esp_size)?)?;
        eprintln!(
            "FAT{} ESP of {esp_size} bytes in {out}",
            w.geometry().fat_type.bits()
        );
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("esp_disk: {e}");
            ExitCode::FAILURE
        }
    }
}
