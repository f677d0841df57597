//! Firmware as the oracle: OVMF finds the ESP in kiln's GPT, reads kiln's FAT16 and FAT32,
//! starts systemd-boot from `EFI/BOOT/BOOTX64.EFI`, and systemd-boot reads
//! `loader/loader.conf` (long names in a subdirectory): its countdown shows the timeout we
//! wrote there.
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_formats::fat::{FatOptions, FatType, FatWriter};
use kiln_formats::fstree::{DataRef, FileData, HostContents, Meta, Node, NodeKind, Tree};
use kiln_formats::gpt::{self, Gpt, Partition};
use kiln_formats::repart::Uuid;
use kiln_formats::sink::FileSink;
use kiln_testkit::require_tool;

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
const SD_BOOT: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";

fn file(data: DataRef, size: u64) -> Node {
    Node {
        kind: NodeKind::File(FileData::dense(size, data)),
        meta: Meta::default(),
        slot: None,
    }
}

fn esp_disk(dir: &Path, fat_type: FatType) -> PathBuf {
    for p in [OVMF_CODE, OVMF_VARS, SD_BOOT] {
        assert!(
            Path::new(p).exists(),
            "{p} missing; .ci/run installs ovmf and systemd-boot-efi"
        );
    }
    let mut t = Tree::default();
    let m = Meta::default();
    let boot = std::fs::metadata(SD_BOOT).unwrap().len();
    t.insert(
        b"/EFI/BOOT/BOOTX64.EFI",
        file(DataRef::Host(Arc::from(Path::new(SD_BOOT))), boot),
        &m,
    )
    .unwrap();
    let conf = b"timeout 37\n";
    t.insert(
        b"/loader/loader.conf",
        file(DataRef::Inline(Arc::from(&conf[..])), conf.len() as u64),
        &m,
    )
    .unwrap();

    let esp = 64u64 << 20;
    let disk_size = esp + (2 << 20);
    let img = dir.join(format!("fat{}.img", fat_type.bits()));
    let mut g = Gpt::new(disk_size, Uuid::from_bytes([0x42; 16])).unwrap();
    g.partitions.push(Partition {
        type_guid: gpt::TYPE_ESP,
        part_guid: Uuid::from_bytes([0x24; 16]),
        first_lba: 2048,
        last_lba: 2048 + esp / 512 - 1,
        attributes: 0,
        name: "esp".into(),
    });
    let f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&img)
        .unwrap();
    f.set_len(disk_size).unwrap();
    let sink = FileSink::new(&f, 0, disk_size);
    g.write(&sink).unwrap();
    let w = FatWriter::new(
        &t,
        FatOptions {
            size: esp,
            fat_type: Some(fat_type),
            volume_id: [1, 2, 3, 4],
            label: Some("ESP".into()),
        },
    )
    .unwrap();
    assert_eq!(w.geometry().fat_type, fat_type);
    w.write(&HostContents, &sink.sub(1 << 20, esp).unwrap())
        .unwrap();
    img
}

/// Boots the disk under OVMF (TCG) until `marker` appears on the serial console.
fn boot_until(dir: &Path, img: &Path, marker: &str) -> (bool, String) {
    let vars = dir.join("vars.fd");
    std::fs::copy(OVMF_VARS, &vars).unwrap();
    let mut child = Command::new(require_tool("qemu-system-x86_64"))
        .args(["-machine", "q35", "-m", "256", "-nographic", "-no-reboot"])
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"))
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,file={}", vars.display()))
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,snapshot=on",
            img.display()
        ))
        .args(["-serial", "stdio", "-monitor", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut seen = Vec::new();
    let mut found = false;
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(b) => seen.extend_from_slice(&b),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => break,
        }
        if String::from_utf8_lossy(&seen).contains(marker) {
            found = true;
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let text: String = String::from_utf8_lossy(&seen)
        .chars()
        .filter(|c| !c.is_control() || *c == '\n')
        .collect();
    (found, text)
}

#[test]
fn ovmf_boots_systemd_boot_from_kiln_fat16_and_fat32() {
    let dir = tempfile::tempdir().unwrap();
    for ty in [FatType::Fat16, FatType::Fat32] {
        let img = esp_disk(dir.path(), ty);
        let (found, text) = boot_until(dir.path(), &img, "Boot in 37 s");
        let tail: String = text
            .chars()
            .rev()
            .take(2000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        assert!(
            found,
            "FAT{}: systemd-boot did not show the loader.conf timeout; console tail:\n{tail}",
            ty.bits()
        );
    }
}
