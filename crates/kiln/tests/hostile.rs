//! Broken and hostile inputs against the CLI: each test reproduces one defect of the input
//! audit (the number in its comment) and asserts the clean outcome: a non-zero exit with an
//! error naming the input, no output under the final name, no temp file left, the base image
//! unchanged, bounded memory.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{entries, kiln, kiln_bin, ok, s, sha};
use kiln_inject::slots::{ByteRange, PayloadInfo, RawMeta, SizeField, Slot, SlotMeta, SlotTable};

/// Asserts that `o` failed and its stderr mentions every one of `want`.
fn failed_with(o: &Output, want: &[&str]) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "should fail; stderr: {err}");
    for w in want {
        assert!(err.contains(w), "{err:?} does not mention {w:?}");
    }
    assert!(
        !err.contains("panicked"),
        "a panic is not an error message: {err}"
    );
    err
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name)
}

/// A sorted plain tar of `dir` at `to`.
fn tar_of(dir: &Path, to: &Path) {
    kiln_testkit::run_ok(
        Command::new("tar")
            .arg("--sort=name")
            .arg("--owner=0")
            .arg("--group=0")
            .arg("-cf")
            .arg(to)
            .arg("-C")
            .arg(dir)
            .arg("."),
    );
}

/// `tool -c ARGS < from > to`.
fn compress(tool: &str, args: &[&str], from: &Path, to: &Path) {
    let out = Command::new(tool)
        .args(args)
        .arg("-c")
        .stdin(fs::File::open(from).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{tool}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::write(to, out.stdout).unwrap();
}

// 1. `kiln build --source X.tar.gz|.zst|.xz` (and compressed stdin) failed with "unknown
// placed data": the spooled stream's indexes reached the ext4 planner as its own.
#[test]
fn build_from_compressed_tars_and_stdin_gives_the_plain_tar_image() {
    let d = tempfile::tempdir().unwrap();
    let tar = d.path().join("root.tar");
    tar_of(&example("hello-rootfs"), &tar);
    let spec = example("hello");
    let build = |source: &Path, stdin: Option<&Path>, out: &str| -> String {
        let mut c = Command::new(kiln_bin());
        c.args([
            "build",
            s(&spec),
            "-o",
            s(&d.path().join(out)),
            "-q",
            "--source",
        ]);
        match stdin {
            Some(f) => {
                c.arg("-").stdin(fs::File::open(f).unwrap());
            }
            None => {
                c.arg(source);
            }
        }
        let o = c.output().unwrap();
        assert!(
            o.status.success(),
            "build from {}: {}",
            source.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        sha(&d.path().join(out).join("hello_1.0.img"))
    };
    let plain = build(&tar, None, "plain");
    for (tool, ext) in [("gzip", "gz"), ("zstd", "zst"), ("xz", "xz")] {
        let z = d.path().join(format!("root.tar.{ext}"));
        compress(tool, &[], &tar, &z);
        assert_eq!(build(&z, None, ext), plain, "--source root.tar.{ext}");
        assert_eq!(
            build(&z, Some(&z), &format!("{ext}-stdin")),
            plain,
            "--source - < root.tar.{ext}"
        );
    }
}

/// A tar holding one incompressible file, gzip-compressed with stored (level 0) blocks, so a
/// flipped byte changes the data without breaking the deflate framing: only the CRC can tell.
fn stored_gzip_tar(dir: &Path) -> (Vec<u8>, usize) {
    let src = dir.join("src");
    fs::create_dir_all(&src).unwrap();
    let payload = kiln_testkit::pseudo_random(7, 64 << 10);
    fs::write(src.join("blob"), &payload).unwrap();
    let tar = dir.join("plain.tar");
    tar_of(&src, &tar);
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::none());
    e.write_all(&fs::read(&tar).unwrap()).unwrap();
    let gz = e.finish().unwrap();
    // The blob's bytes appear verbatim in the stored blocks.
    let at = gz
        .windows(64)
        .position(|w| w == &payload[4096..4160])
        .expect("stored deflate keeps the bytes");
    (gz, at)
}

// 2. A corrupt compressed tar was accepted: reading stopped at the tar end marker, so the
// gzip CRC/ISIZE and the zstd checksum were never checked, and trailing garbage passed.
#[test]
fn corrupt_or_trailing_compressed_streams_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let (gz, at) = stored_gzip_tar(d.path());
    let out = d.path().join("out");
    fs::create_dir_all(&out).unwrap();
    let mkfs = |input: &Path| kiln(&["mkfs", "ext4", s(input), "-o", s(&out.join("x.img"))]);
    // The intact stream works.
    let good = d.path().join("good.tar.gz");
    fs::write(&good, &gz).unwrap();
    ok(&["mkfs", "ext4", s(&good), "-o", s(&out.join("x.img"))]);
    fs::remove_file(out.join("x.img")).unwrap();

    let mut flipped = gz.clone();
    flipped[at + 10] ^= 0x01;
    let f = d.path().join("flipped.tar.gz");
    fs::write(&f, &flipped).unwrap();
    failed_with(&mkfs(&f), &["flipped.tar.gz", "gzip"]);

    let mut trailing = gz.clone();
    trailing.extend_from_slice(b"trailing garbage after the member");
    let t = d.path().join("trailing.tar.gz");
    fs::write(&t, &trailing).unwrap();
    failed_with(&mkfs(&t), &["trailing.tar.gz", "gzip"]);

    // zstd with a content checksum over raw (incompressible) blocks: a flipped byte is caught
    // only by the checksum at the end of the frame.
    let mut z = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
    z.include_checksum(true).unwrap();
    z.write_all(&fs::read(d.path().join("plain.tar")).unwrap())
        .unwrap();
    let mut zs = z.finish().unwrap();
    let payload = kiln_testkit::pseudo_random(7, 64 << 10);
    let zat = zs
        .windows(64)
        .position(|w| w == &payload[4096..4160])
        .expect("raw zstd block keeps the bytes");
    zs[zat + 10] ^= 0x01;
    let zf = d.path().join("flipped.tar.zst");
    fs::write(&zf, &zs).unwrap();
    failed_with(&mkfs(&zf), &["flipped.tar.zst", "zstd"]);
    assert_eq!(
        entries(&out),
        Vec::<String>::new(),
        "no output, no temp file"
    );
}

/// Runs kiln with a deadline: returns its output and peak RSS in KiB (from `/usr/bin/time`),
/// or fails the test if it is still running after `secs` (it is killed first).
fn bounded(args: &[&str], secs: u64) -> (Output, u64) {
    let time = kiln_testkit::require_tool("time");
    let d = tempfile::tempdir().unwrap();
    let rss = d.path().join("rss");
    let mut child = Command::new(time)
        .arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(&rss)
        // timeout(1) ends kiln itself (killing `time` would leave it running); time(1)
        // reports the peak RSS of the whole reaped process tree.
        .arg("timeout")
        .arg("-s")
        .arg("KILL")
        .arg(secs.to_string())
        .arg(kiln_bin())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed().as_secs() >= secs {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kiln {args:?} still running after {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let o = child.wait_with_output().unwrap();
    let kib = fs::read_to_string(&rss)
        .unwrap()
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap();
    (o, kib)
}

// 4. `--slot page=/dev/zero` grew without bound (3.2 GB RSS in 4 s): the payload was read
// whole after a stat that says 0 bytes. Reading stops at capacity + 1 byte.
#[test]
fn an_endless_payload_stops_at_capacity_plus_one() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.img");
    common::write_base(&base, 4 << 20, 1 << 20, 300_000);
    let before = sha(&base);
    let out = d.path().join("out.img");
    let zero_digest = format!("sha256:{}", "0".repeat(64));
    for args in [
        vec![
            "inject",
            s(&base),
            "--slot",
            "piece=/dev/zero",
            "-o",
            s(&out),
        ],
        vec![
            "inject",
            s(&base),
            "--slot",
            "piece=/dev/zero",
            "--in-place",
        ],
        vec![
            "verify",
            s(&base),
            "--slot",
            "piece=/dev/zero",
            "--digest",
            &zero_digest,
        ],
    ] {
        let (o, kib) = bounded(&args, 20);
        failed_with(&o, &["piece", "capacity of 300000 bytes"]);
        assert!(kib < 64 << 10, "{args:?}: peak RSS {kib} KiB");
    }
    assert_eq!(sha(&base), before, "base untouched");
    assert_eq!(entries(d.path()), ["base.img"]);
}

/// A GPT disk of `len` bytes with one partition over 1 MiB..len-1 MiB (deterministic filler
/// inside it), and no slot table.
fn gpt_disk(path: &Path, len: u64) {
    use kiln_formats::gpt::{Gpt, Partition};
    use kiln_formats::repart::Uuid;
    use kiln_formats::sink::FileSink;
    let f = fs::File::create(path).unwrap();
    f.set_len(len).unwrap();
    let mut g = Gpt::new(len, Uuid::from_bytes([7u8; 16])).unwrap();
    g.partitions.push(Partition {
        type_guid: kiln_formats::gpt::parse_type("linux-generic").unwrap(),
        part_guid: Uuid::from_bytes([9u8; 16]),
        first_lba: 2048,
        last_lba: (len >> 9) - 2049,
        attributes: 0,
        name: "data".into(),
    });
    g.write(&FileSink::new(&f, 0, len)).unwrap();
}

fn raw_table(len: u64, offset: u64, size_field: Option<u64>) -> SlotTable {
    SlotTable {
        image_len: len,
        slots: vec![Slot {
            name: "piece".into(),
            path: String::new(),
            capacity: 4096,
            data: vec![ByteRange { offset, len: 4096 }],
            meta: SlotMeta::Raw(RawMeta {
                size_fields: size_field
                    .map(|o| {
                        vec![SizeField {
                            offset: o,
                            width: 4,
                        }]
                    })
                    .unwrap_or_default(),
            }),
            default: PayloadInfo::of(b""),
        }],
    }
}

// 6. A sidecar or `--table` describing a raw slot at offset 0 let `inject` overwrite the
// primary GPT (and with --in-place, the base's own). Slots must lie inside a partition, off
// GPT structures, the slot table and other slots.
#[test]
fn slot_tables_cannot_point_at_gpt_structures_or_the_table() {
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("disk.img");
    let len = 8u64 << 20;
    gpt_disk(&disk, len);
    let before = sha(&disk);
    let payload = d.path().join("p.html");
    fs::write(&payload, b"<p>x</p>").unwrap();
    let cases = [
        (0u64, None, "outside every GPT partition"), // protective MBR, primary header
        (1024, None, "outside every GPT partition"), // primary entry array
        (len - 4096, None, "outside every GPT partition"), // backup entries and header
        (2 << 20, Some(512u64), "outside every GPT partition"), // size field on the header
    ];
    for (i, (offset, field, want)) in cases.into_iter().enumerate() {
        let t = d.path().join(format!("t{i}.json"));
        fs::write(&t, raw_table(len, offset, field).to_sidecar_json().unwrap()).unwrap();
        let out = d.path().join(format!("out{i}.img"));
        let piece = format!("piece={}", s(&payload));
        failed_with(
            &kiln(&[
                "inject",
                s(&disk),
                "--table",
                s(&t),
                "--slot",
                &piece,
                "-o",
                s(&out),
            ]),
            &["piece", want],
        );
        failed_with(
            &kiln(&[
                "inject",
                s(&disk),
                "--table",
                s(&t),
                "--slot",
                &piece,
                "--in-place",
            ]),
            &["piece", want],
        );
        assert!(!out.exists());
        assert_eq!(sha(&disk), before, "case {i}: the base's GPT is untouched");
    }
    // Inside the partition it works (the check is not a blanket refusal).
    let t = d.path().join("good.json");
    fs::write(
        &t,
        raw_table(len, 2 << 20, Some((2 << 20) + 8192))
            .to_sidecar_json()
            .unwrap(),
    )
    .unwrap();
    let out = d.path().join("good.img");
    ok(&[
        "inject",
        s(&disk),
        "--table",
        s(&t),
        "--slot",
        &format!("piece={}", s(&payload)),
        "-o",
        s(&out),
    ]);
    assert_eq!(
        &fs::read(&out).unwrap()[2 << 20..(2 << 20) + 8],
        b"<p>x</p>"
    );

    // Without a GPT, the in-image slot table area is off limits.
    let raw = d.path().join("raw.img");
    common::write_base(&raw, 4 << 20, 1 << 20, 300_000);
    let raw_before = sha(&raw);
    let t = d.path().join("over-table.json");
    fs::write(
        &t,
        raw_table(4 << 20, 24576, None).to_sidecar_json().unwrap(),
    )
    .unwrap();
    failed_with(
        &kiln(&[
            "inject",
            s(&raw),
            "--table",
            s(&t),
            "--slot",
            &format!("piece={}", s(&payload)),
            "--in-place",
        ]),
        &["overlaps the slot table"],
    );
    assert_eq!(sha(&raw), raw_before);
}

// 7. `kiln mkfs -o` equal to the input replaced the source tar. 8. `-o` into a missing
// directory: every command creates it (documented in the README), inject included.
#[test]
fn mkfs_refuses_its_own_input_and_outputs_create_missing_directories() {
    let d = tempfile::tempdir().unwrap();
    let tar = d.path().join("root.tar");
    tar_of(&example("hello-rootfs"), &tar);
    let before = sha(&tar);
    let link = d.path().join("link.tar");
    std::os::unix::fs::symlink(&tar, &link).unwrap();
    let hard = d.path().join("hard.tar");
    fs::hard_link(&tar, &hard).unwrap();
    for fs_kind in ["ext4", "erofs"] {
        for out in [&tar, &link, &hard] {
            failed_with(
                &kiln(&["mkfs", fs_kind, s(&tar), "-o", s(out)]),
                &["is the source"],
            );
            assert_eq!(sha(&tar), before, "mkfs {fs_kind} -o {}", out.display());
        }
    }
    let mut names = entries(d.path());
    names.sort();
    assert_eq!(
        names,
        ["hard.tar", "link.tar", "root.tar"],
        "no temp file left"
    );

    let nested = d.path().join("a/b/c.img");
    ok(&["mkfs", "ext4", s(&tar), "-o", s(&nested)]);
    ok(&[
        "mkfs",
        "erofs",
        s(&tar),
        "-o",
        s(&d.path().join("e/f/g.img")),
    ]);
    let base = d.path().join("base.img");
    common::write_base(&base, 4 << 20, 1 << 20, 300_000);
    let payload = d.path().join("p");
    fs::write(&payload, b"hi").unwrap();
    ok(&[
        "inject",
        s(&base),
        "--slot",
        &format!("piece={}", s(&payload)),
        "-o",
        s(&d.path().join("x/y/out.img")),
    ]);
    assert!(d.path().join("x/y/out.img").is_file());
}

// 10. Messages: `inject` on a directory or /dev/zero blamed a truncated table; a missing file
// printed "(os error 2)" twice.
#[test]
fn messages_name_what_is_wrong() {
    let d = tempfile::tempdir().unwrap();
    let payload = d.path().join("p");
    fs::write(&payload, b"hi").unwrap();
    let piece = format!("piece={}", s(&payload));
    let out = d.path().join("o.img");
    failed_with(
        &kiln(&["inject", s(d.path()), "--slot", &piece, "-o", s(&out)]),
        &["is a directory, not an image"],
    );
    failed_with(
        &kiln(&["inject", "/dev/zero", "--slot", &piece, "-o", s(&out)]),
        &["/dev/zero is a character device, not an image"],
    );
    let missing = d.path().join("missing.img");
    for args in [
        vec!["inject", s(&missing), "--slot", &piece, "-o", s(&out)],
        vec!["mkfs", "ext4", s(&missing), "-o", s(&out)],
        vec!["mkfs", "erofs", s(&missing), "-o", s(&out)],
        vec!["inspect", s(&missing)],
    ] {
        let e = failed_with(&kiln(&args), &["missing.img"]);
        assert_eq!(e.matches("os error 2").count(), 1, "{args:?}: {e}");
    }
    assert!(!out.exists());
}

// 3. An interrupted mkfs left its temp file: SIGINT and SIGTERM remove unfinished outputs.
#[test]
fn a_signal_removes_the_unfinished_output() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("x.img");
        // A stream that never ends: kiln waits on stdin with its temp file open.
        let mut child = Command::new(kiln_bin())
            .args(["mkfs", "ext4", "-", "-o", s(&out)])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3])
            .unwrap();
        let start = std::time::Instant::now();
        while entries(d.path()).is_empty() {
            assert!(start.elapsed().as_secs() < 20, "no temp file appeared");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(entries(d.path())[0].contains(".kiln-tmp-"));
        unsafe { libc::kill(child.id() as i32, sig) };
        let status = child.wait().unwrap();
        drop(stdin);
        assert!(!status.success());
        assert_eq!(entries(d.path()), Vec::<String>::new(), "signal {sig}");
    }
}

/// What the fake registry answers for a path.
#[derive(Clone)]
enum Answer {
    /// 200 with this body and a Content-Length.
    Body(&'static str, Vec<u8>),
    /// 200 without Content-Length: `len` bytes of spaces, then close.
    Endless(usize),
}

/// A registry on loopback that answers GETs from a fixed map (404 otherwise). Serves at most
/// `max_conns` connections, each for at most 30 s, then stops.
fn fake_registry(map: Vec<(String, Answer)>, max_conns: usize) -> u16 {
    use std::io::{BufRead, BufReader};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in l.incoming().take(max_conns) {
            let Ok(mut c) = conn else { continue };
            let map = map.clone();
            std::thread::spawn(move || {
                c.set_write_timeout(Some(std::time::Duration::from_secs(30)))
                    .unwrap();
                let mut r = BufReader::new(c.try_clone().unwrap());
                let mut first = String::new();
                if r.read_line(&mut first).is_err() {
                    return;
                }
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                let path = first.split(' ').nth(1).unwrap_or("").to_string();
                match map.iter().find(|(p, _)| *p == path).map(|(_, a)| a.clone()) {
                    Some(Answer::Body(ct, b)) => {
                        let _ = write!(
                            c,
                            "HTTP/1.1 200 OK\r\nContent-Type: {ct}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            b.len()
                        );
                        let _ = c.write_all(&b);
                    }
                    Some(Answer::Endless(len)) => {
                        let _ = write!(
                            c,
                            "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nConnection: close\r\n\r\n"
                        );
                        let chunk = vec![b' '; 1 << 16];
                        for _ in 0..len / chunk.len() {
                            if c.write_all(&chunk).is_err() {
                                break;
                            }
                        }
                    }
                    None => {
                        let _ = write!(
                            c,
                            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        );
                    }
                }
            });
        }
    });
    port
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// One layer of a test manifest: title, media type, blob, extra annotations.
type Layer<'a> = (&'a str, &'a str, &'a [u8], &'a [(&'a str, String)]);

/// A manifest with these layers.
fn manifest(layers: &[Layer<'_>]) -> Vec<u8> {
    let layers: Vec<serde_json::Value> = layers
        .iter()
        .map(|(title, mt, blob, extra)| {
            let mut ann = serde_json::Map::new();
            ann.insert("org.opencontainers.image.title".into(), (*title).into());
            for (k, v) in *extra {
                ann.insert((*k).into(), v.clone().into());
            }
            serde_json::json!({
                "mediaType": mt,
                "digest": format!("sha256:{}", sha256_hex(blob)),
                "size": blob.len(),
                "annotations": ann,
            })
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.kiln.test",
        "config": {
            "mediaType": "application/vnd.oci.empty.v1+json",
            "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
            "size": 2
        },
        "layers": layers,
    }))
    .unwrap()
}

const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

// 4. `kiln pull` buffered a manifest sent without Content-Length past its 4 MiB cap (539 MB
// RSS), and decompressed a zstd layer without limit although the layer says its size.
#[test]
fn pull_bounds_manifests_and_zstd_layers() {
    let d = tempfile::tempdir().unwrap();
    let port = fake_registry(
        vec![("/v2/big/manifests/1".into(), Answer::Endless(256 << 20))],
        4,
    );
    let out = d.path().join("o");
    let (o, kib) = bounded(
        &[
            "pull",
            &format!("oci://127.0.0.1:{port}/big:1"),
            "-o",
            s(&out),
        ],
        60,
    );
    failed_with(&o, &["manifest", "larger than 4194304 bytes"]);
    assert!(kib < 64 << 10, "peak RSS {kib} KiB for an endless manifest");

    // 33 KB of zstd that says 1 MiB but expands to 64 MiB.
    let raw = vec![0u8; 64 << 20];
    let blob = zstd::encode_all(&raw[..], 19).unwrap();
    let m = manifest(&[(
        "bomb.bin.zst",
        "application/vnd.kiln.file.v1+zstd",
        &blob,
        &[
            ("dev.kiln.uncompressed.size", (1u64 << 20).to_string()),
            (
                "dev.kiln.uncompressed.digest",
                format!("sha256:{}", sha256_hex(&raw[..1 << 20])),
            ),
        ],
    )]);
    let port = fake_registry(
        vec![
            ("/v2/bomb/manifests/1".into(), Answer::Body(MT_MANIFEST, m)),
            (
                format!("/v2/bomb/blobs/sha256:{}", sha256_hex(&blob)),
                Answer::Body("application/octet-stream", blob.clone()),
            ),
        ],
        8,
    );
    let out = d.path().join("bomb");
    let (o, _) = bounded(
        &[
            "pull",
            &format!("oci://127.0.0.1:{port}/bomb:1"),
            "-o",
            s(&out),
        ],
        60,
    );
    failed_with(&o, &["bomb.bin", "more than 1048576 bytes"]);
    assert_eq!(entries(&out), Vec::<String>::new(), "nothing kept");
}

// 5. `kiln pull -o DIR` followed a symlink already inside DIR and wrote outside it.
// 11. A size mismatch left `.NAME.DIGEST.kiln-partial` behind.
#[test]
fn pull_never_writes_through_links_and_cleans_up_after_a_size_mismatch() {
    let d = tempfile::tempdir().unwrap();
    let outside = d.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let blob = b"layer bytes".to_vec();
    let m = manifest(&[("sub/file", "application/octet-stream", &blob, &[])]);
    let bdig = format!("/v2/a/blobs/sha256:{}", sha256_hex(&blob));
    let port = fake_registry(
        vec![
            ("/v2/a/manifests/1".into(), Answer::Body(MT_MANIFEST, m)),
            (
                bdig.clone(),
                Answer::Body("application/octet-stream", blob.clone()),
            ),
        ],
        16,
    );
    let out = d.path().join("out");
    fs::create_dir(&out).unwrap();
    std::os::unix::fs::symlink(&outside, out.join("sub")).unwrap();
    let r = format!("oci://127.0.0.1:{port}/a:1");
    failed_with(
        &kiln(&["pull", &r, "-o", s(&out)]),
        &["sub", "symbolic link"],
    );
    assert_eq!(
        entries(&outside),
        Vec::<String>::new(),
        "nothing written outside"
    );

    // The partial file's name is a link to a file outside.
    fs::remove_file(out.join("sub")).unwrap();
    fs::create_dir(out.join("sub")).unwrap();
    let victim = outside.join("victim");
    fs::write(&victim, b"precious").unwrap();
    let partial = out
        .join("sub")
        .join(format!(".file.{}.kiln-partial", &sha256_hex(&blob)[..16]));
    std::os::unix::fs::symlink(&victim, &partial).unwrap();
    failed_with(&kiln(&["pull", &r, "-o", s(&out)]), &["symbolic link"]);
    assert_eq!(fs::read(&victim).unwrap(), b"precious");
    fs::remove_file(&partial).unwrap();
    ok(&["pull", &r, "-o", s(&out)]);
    assert_eq!(fs::read(out.join("sub/file")).unwrap(), blob);

    // A blob longer than its descriptor says.
    let short = b"short".to_vec();
    let mut m: serde_json::Value =
        serde_json::from_slice(&manifest(&[("f", "application/octet-stream", &short, &[])]))
            .unwrap();
    let long = b"short and then some more".to_vec();
    let dig = m["layers"][0]["digest"].as_str().unwrap().to_string();
    m["layers"][0]["size"] = 5.into();
    let port = fake_registry(
        vec![
            (
                "/v2/b/manifests/1".into(),
                Answer::Body(MT_MANIFEST, serde_json::to_vec(&m).unwrap()),
            ),
            (
                format!("/v2/b/blobs/{dig}"),
                Answer::Body("application/octet-stream", long),
            ),
        ],
        8,
    );
    let out = d.path().join("mismatch");
    failed_with(
        &kiln(&[
            "pull",
            &format!("oci://127.0.0.1:{port}/b:1"),
            "-o",
            s(&out),
        ]),
        &["size"],
    );
    assert_eq!(entries(&out), Vec::<String>::new(), "no partial file left");
}

// 9. `kiln inspect` said nothing (rc 0) about a disk with both GPT copies invalid, blocked on a
// FIFO, and printed "14 B" for an unknown file.
#[test]
fn inspect_reports_damaged_unknown_and_special_files() {
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("disk.img");
    let len = 4u64 << 20;
    gpt_disk(&disk, len);
    ok(&["inspect", s(&disk)]);
    let mut b = fs::read(&disk).unwrap();
    b[512 + 16] ^= 0xff; // primary header CRC
    let last = (len - 512) as usize;
    b[last + 16] ^= 0xff; // backup header CRC
    fs::write(&disk, &b).unwrap();
    let o = kiln(&["inspect", s(&disk)]);
    failed_with(&o, &["damaged GPT", "backup"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("both headers unusable"));

    let fifo = d.path().join("fifo");
    kiln_testkit::run_ok(Command::new("mkfifo").arg(&fifo));
    let (o, _) = bounded(&["inspect", s(&fifo)], 20);
    failed_with(&o, &["is a FIFO"]);

    let odd = d.path().join("odd.bin");
    fs::write(&odd, b"fourteen bytes").unwrap();
    failed_with(
        &kiln(&["inspect", s(&odd)]),
        &["odd.bin", "unrecognised format"],
    );
}

// 12. Budgets compared the uncompressed estimate: a disk that built to 836 MiB failed
// `budget = "900M"` as "2.0 GiB". They judge the written size, and list the heaviest paths
// by their compressed share.
#[test]
fn budgets_judge_the_compressed_size() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    fs::create_dir_all(src.join("usr/share/doc")).unwrap();
    // 12 MiB of text that LZ4 shrinks about tenfold.
    let line = b"kiln bakes bootable images, reproducibly, without root; ";
    let text: Vec<u8> = line.iter().copied().cycle().take(12 << 20).collect();
    fs::write(src.join("usr/share/doc/manual.txt"), &text).unwrap();
    fs::write(src.join("usr/share/doc/small"), b"x").unwrap();
    let spec = |image_budget: &str| {
        format!(
            "[image]\nname = \"b\"\nversion = \"1\"\nbudget = \"{image_budget}\"\n[[partition]]\ntype = \"root\"\nfs = \"erofs\"\ncompression = \"lz4hc\"\nbudget = \"4M\"\n"
        )
    };
    let build = |out: &str| {
        Command::new(kiln_bin())
            .args([
                "build",
                s(d.path()),
                "-o",
                s(&d.path().join(out)),
                "-q",
                "--source",
                s(&src),
            ])
            .output()
            .unwrap()
    };
    fs::write(d.path().join("kiln.toml"), spec("8M")).unwrap();
    let o = build("fits");
    assert!(
        o.status.success(),
        "a disk of a few MiB fits 8M though its tree is 12 MiB: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let disk = fs::metadata(d.path().join("fits/b_1.img")).unwrap().len();
    assert!(disk <= 8 << 20, "{disk}");

    fs::write(d.path().join("kiln.toml"), spec("1M")).unwrap();
    let e = failed_with(
        &build("over"),
        &["over the image budget of 1.0 MiB", "share"],
    );
    let usr = e
        .lines()
        .find(|l| l.trim_end().ends_with("/usr/share/doc/manual.txt"))
        .expect("heaviest path listed");
    assert!(
        !usr.contains("12.0 MiB"),
        "listed by compressed share, not raw size: {usr}"
    );
    assert_eq!(
        fs::read_dir(d.path().join("over"))
            .map(|r| r.count())
            .unwrap_or(0),
        0,
        "nothing under a final name"
    );
}

/// Sends `head` and then `body` in small slow pieces (ignoring write errors: the server may
/// answer early), then reads the whole answer.
fn slow_post(addr: &str, head: &str, body_len: usize) -> std::io::Result<String> {
    use std::io::Read;
    let mut c = std::net::TcpStream::connect(addr)?;
    c.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    c.write_all(head.as_bytes())?;
    let piece = vec![b'a'; 16 << 10];
    let mut sent = 0;
    while sent < body_len {
        let n = piece.len().min(body_len - sent);
        if c.write_all(&piece[..n]).is_err() {
            break;
        }
        sent += n;
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let mut answer = Vec::new();
    c.read_to_end(&mut answer)?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

// 14. An oversized upload reached the client as a reset: kiln serve answered 413 and closed
// while the client was still sending, so the client often saw a broken connection.
#[test]
fn an_oversized_upload_gets_its_413_even_from_a_slow_sender() {
    let fx = common::Fixture::new();
    let srv = common::KilnServer::start(&fx.config(""));
    let len = (common::CAPACITY as usize) * 4;
    for (i, head) in [
        format!(
            "POST /os/demo HTTP/1.1\r\nHost: x\r\nContent-Type: text/html\r\nContent-Length: {len}\r\n\r\n"
        ),
        "POST /os/demo HTTP/1.1\r\nHost: x\r\nContent-Type: text/html\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_string(),
    ]
    .iter()
    .enumerate()
    {
        for round in 0..3 {
            let answer = if i == 0 {
                slow_post(&srv.addr, head, len)
            } else {
                // One chunk header announcing the whole body, then the bytes.
                let h = format!("{head}{len:x}\r\n");
                slow_post(&srv.addr, &h, len)
            };
            let answer = answer.unwrap_or_else(|e| panic!("round {round}: connection broke: {e}"));
            assert!(
                answer.starts_with("HTTP/1.1 413"),
                "round {round}: {:?}",
                answer.lines().next()
            );
            assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
            assert!(answer.contains("exceeds the limit"), "{answer}");
        }
    }
    // The server still serves.
    let ok = slow_post(
        &srv.addr,
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        0,
    )
    .unwrap();
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
}
