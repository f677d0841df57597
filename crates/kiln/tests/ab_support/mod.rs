//! Shared by the A/B and distribution tests (appliance, arm64, delta, distro): what a disk's
//! GPT and ESP hold, the boot report of the Debian example, and a
//! static HTTP server with byte ranges that can tamper with what it serves and drop
//! connections on purpose (a few lines over std::net: `GET` with one byte range, `HEAD`).
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kiln_build::qemu::BootOutcome;
use kiln_formats::fat::FatReader;
use kiln_formats::gpt::{Gpt, Partition};

/// The partition named `name`.
pub fn partition(disk: &Path, name: &str) -> Partition {
    let f = fs::File::open(disk).unwrap();
    let gpt = Gpt::read(&f).unwrap();
    gpt.partitions
        .into_iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("{}: no partition named {name}", disk.display()))
}

/// The partitions' names, in table order.
pub fn gpt_names(disk: &Path) -> Vec<String> {
    let f = fs::File::open(disk).unwrap();
    Gpt::read(&f)
        .unwrap()
        .partitions
        .iter()
        .map(|p| p.name.clone())
        .collect()
}

/// The first `len` bytes of partition `number` (1-based; the whole partition when `None`).
pub fn partition_bytes(disk: &Path, number: usize, len: Option<u64>) -> Vec<u8> {
    let f = fs::File::open(disk).unwrap();
    let g = Gpt::read(&f).unwrap();
    let p = &g.partitions[number - 1];
    let mut b = vec![0u8; len.unwrap_or(p.size()) as usize];
    f.read_exact_at(&mut b, p.offset()).unwrap();
    b
}

/// All bytes of the partition named `name` (the first one of that name).
pub fn partition_named_bytes(disk: &Path, name: &str) -> Vec<u8> {
    let p = partition(disk, name);
    let f = fs::File::open(disk).unwrap();
    let mut b = vec![0u8; p.size() as usize];
    f.read_exact_at(&mut b, p.offset()).unwrap();
    b
}

/// File names in the ESP's EFI/Linux, read with kiln's FAT reader, sorted.
pub fn esp_ukis(disk: &Path) -> Vec<String> {
    let esp = partition(disk, "esp");
    let f = fs::File::open(disk).unwrap();
    let r = FatReader::open(|o: u64, b: &mut [u8]| f.read_exact_at(b, esp.offset() + o)).unwrap();
    let mut names: Vec<String> = r
        .list("/EFI/Linux")
        .unwrap()
        .into_iter()
        .filter(|e| !e.is_dir())
        .map(|e| e.name)
        .collect();
    names.sort();
    names
}

/// A file of the ESP.
pub fn esp_file(disk: &Path, path: &str) -> Vec<u8> {
    let esp = partition(disk, "esp");
    let f = fs::File::open(disk).unwrap();
    let r = FatReader::open(|o: u64, b: &mut [u8]| f.read_exact_at(b, esp.offset() + o)).unwrap();
    r.read_file(path).unwrap()
}

/// Faults the server injects.
#[derive(Default)]
pub struct Faults {
    /// Flip the first byte of every ranged response for files ending like this.
    pub tamper: Option<String>,
    /// For this many more responses of files ending like this, send only this many body bytes
    /// and close the connection.
    pub drop: Option<(String, usize, u32)>,
    /// Requests served with a Range header.
    pub ranged: u32,
    /// Body bytes sent.
    pub sent: u64,
}

/// A static file server for `dir` on 127.0.0.1; returns its base URL.
pub fn serve(dir: PathBuf, faults: Arc<Mutex<Faults>>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let (dir, faults) = (dir.clone(), faults.clone());
            std::thread::spawn(move || {
                let _ = answer(s, &dir, &faults);
            });
        }
    });
    format!("http://127.0.0.1:{port}")
}

fn answer(mut s: TcpStream, dir: &Path, faults: &Mutex<Faults>) -> std::io::Result<()> {
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut range = None;
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        if h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = v.trim().strip_prefix("bytes=").map(str::to_string);
            }
        }
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let name = path.trim_start_matches('/');
    let file = dir.join(name);
    if name.contains("..") || !file.is_file() {
        return s.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
    }
    let len = fs::metadata(&file)?.len();
    let (start, end) = match &range {
        Some(r) => {
            let (a, b) = r.split_once('-').unwrap();
            let a: u64 = a.parse().unwrap();
            let b: u64 = if b.is_empty() {
                len - 1
            } else {
                b.parse::<u64>().unwrap().min(len - 1)
            };
            (a, b + 1)
        }
        None => (0, len),
    };
    let mut body = vec![0u8; (end - start) as usize];
    fs::File::open(&file)?.read_exact_at(&mut body, start)?;
    let mut cut = None;
    {
        let mut f = faults.lock().unwrap();
        if range.is_some() {
            f.ranged += 1;
            if f.tamper
                .as_ref()
                .is_some_and(|t| name.ends_with(t.as_str()))
                && !body.is_empty()
            {
                body[0] ^= 0xff;
            }
            if let Some((t, n, left)) = &mut f.drop {
                if name.ends_with(t.as_str()) && *left > 0 && body.len() > *n {
                    *left -= 1;
                    cut = Some(*n);
                }
            }
        }
        if method == "GET" {
            f.sent += cut.unwrap_or(body.len()) as u64;
        }
    }
    let head = match &range {
        Some(_) => format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{len}\r\nConnection: close\r\n\r\n",
            end - start,
            end - 1
        ),
        None => format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"),
    };
    s.write_all(head.as_bytes())?;
    if method == "GET" {
        s.write_all(&body[..cut.unwrap_or(body.len())])?;
    }
    s.flush()?;
    if cut.is_some() {
        s.shutdown(std::net::Shutdown::Both)?;
    }
    Ok(())
}

/// The `KILN key: value` lines of the boot report (the last report on the console). A line
/// may start with what the getty or systemd's terminal probing wrote to the same console
/// (`vm login: `, escape sequences), so the key is looked for anywhere in it.
pub fn report_of(console: &str) -> BTreeMap<String, String> {
    let start = console.rfind("KILN-REPORT-BEGIN").unwrap_or(0);
    console[start..]
        .lines()
        .filter_map(|l| l.find("KILN ").map(|i| &l[i + 5..]))
        .filter_map(|l| {
            l.split_once(": ")
                .or_else(|| l.trim_end().strip_suffix(':').map(|k| (k, "")))
        })
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// Asserts that the boot matched, with its console and QEMU's messages when it did not; the
/// boot report it printed.
pub fn must_succeed(out: &BootOutcome, what: &str) -> BTreeMap<String, String> {
    assert!(
        out.success(),
        "boot {what}: {}\n--- console ---\n{}\n--- qemu ---\n{}",
        out.summary(),
        out.console,
        out.qemu_stderr
    );
    report_of(&out.console)
}

/// What every systemd boot of the Debian example from its verity disk must show (its boot
/// report), with the serial getty on `tty`; the report.
pub fn check_systemd_disk_boot(
    out: &BootOutcome,
    tty: &str,
    what: &str,
) -> BTreeMap<String, String> {
    let r = must_succeed(out, what);
    let c = &out.console;
    let get = |k: &str| r.get(k).map(String::as_str).unwrap_or("<missing>");
    assert_eq!(get("multi-user"), "active", "{what}: {r:?}\n{c}");
    assert!(
        get("init").ends_with("/systemd"),
        "{what}: PID 1 is {}",
        get("init")
    );
    assert!(
        c.contains("kiln-init: [") && c.contains("switching root to /sbin/init"),
        "{what}: kiln-init did not switch root:\n{c}"
    );
    // The root: dm-verity over EROFS, read-only; /var from its partition, writable.
    assert!(
        get("mount /").starts_with("/dev/mapper/root erofs ro"),
        "{what}: root {}",
        get("mount /")
    );
    assert_eq!(get("root-writable"), "no", "{what}");
    assert!(
        get("mount /var").contains(" ext4 rw"),
        "{what}: /var {}",
        get("mount /var")
    );
    assert_eq!(get("var-writable"), "yes", "{what}");
    // The spec's overlays.
    assert!(
        get("mount /etc").starts_with("overlay overlay rw"),
        "{what}: /etc {}",
        get("mount /etc")
    );
    assert!(
        get("mount /tmp").starts_with("overlay overlay rw"),
        "{what}: /tmp {}",
        get("mount /tmp")
    );
    // Empty machine-id in the image: systemd made one up for this boot.
    assert_eq!(
        get("machine-id").len(),
        32,
        "{what}: machine-id {:?}",
        get("machine-id")
    );
    // A getty on the serial console.
    assert_eq!(get("getty"), "active", "{what}");
    // The getty holds the serial console. (Its prompt is not looked for: agetty prints it on
    // its own schedule, and under load that can come after the report has ended.)
    assert_eq!(get("getty-tty"), tty, "{what}");
    assert_eq!(get("failed"), "", "{what}: failed units");
    // kiln-init did dm-verity; systemd's generator is told not to wait for it again.
    assert!(
        get("cmdline").contains("systemd.verity=no"),
        "{what}: {}",
        get("cmdline")
    );
    r
}

/// The example appliance's marker lines (`APPLIANCE-…`) on the console.
pub fn markers(out: &BootOutcome) -> Vec<&str> {
    out.console
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("APPLIANCE-"))
        .collect()
}
