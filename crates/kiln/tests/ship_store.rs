//! Object storage, manifests and cache sync against `s3s-fs` on loopback (a real S3 server
//! that checks SigV4 and honours If-Match / If-None-Match on PutObject).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod ship_support;

use std::path::Path;

use ship_support::*;

fn s3_lib_env(s3: &Server) {
    // Library calls in this process read the same environment the CLI gets.
    std::env::set_var("AWS_ACCESS_KEY_ID", S3_AK);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", S3_SK);
    std::env::set_var("AWS_REGION", "us-east-1");
    std::env::set_var("AWS_ENDPOINT", format!("http://127.0.0.1:{}", s3.port));
}

#[test]
fn upload_and_download_with_sidecars_and_wrong_sidecar_refused() {
    let s3 = s3();
    let t = tempfile::tempdir().unwrap();
    let a = t.path().join("disk.img");
    let b = t.path().join("notes.txt");
    std::fs::write(&a, bytes(12 << 20, 3)).unwrap(); // above 10 MiB: multipart upload
    std::fs::write(&b, b"hello\n").unwrap();
    let out = ok(s3_env(&mut kiln(), &s3)
        .arg("upload")
        .arg(&a)
        .arg(&b)
        .arg("s3://kiln/rel/v1"));
    assert!(out.contains("s3://kiln/rel/v1/disk.img"), "{out}");
    // The server's files: object and sidecar, sidecar in sha256sum format.
    let side = std::fs::read_to_string(s3.root.join("kiln/rel/v1/disk.img.sha256")).unwrap();
    assert_eq!(side, format!("{}  disk.img\n", sha256(&a)));
    assert_eq!(
        std::fs::read(s3.root.join("kiln/rel/v1/disk.img")).unwrap(),
        std::fs::read(&a).unwrap()
    );

    let got = t.path().join("got.img");
    ok(s3_env(&mut kiln(), &s3)
        .args(["download", "s3://kiln/rel/v1/disk.img", "-o"])
        .arg(&got));
    assert_eq!(std::fs::read(&got).unwrap(), std::fs::read(&a).unwrap());

    // A sidecar naming other bytes: refused, no output, the secret never printed.
    std::fs::write(
        s3.root.join("kiln/rel/v1/notes.txt.sha256"),
        format!("{}  notes.txt\n", "0".repeat(64)),
    )
    .unwrap();
    let dest = t.path().join("notes.out");
    let o = run(s3_env(&mut kiln(), &s3)
        .args(["download", "s3://kiln/rel/v1/notes.txt", "-o"])
        .arg(&dest));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("sha256 mismatch") && err.contains("s3://kiln/rel/v1/notes.txt"),
        "{err}"
    );
    assert!(!dest.exists());
    assert_eq!(
        std::fs::read_dir(t.path())
            .unwrap()
            .filter(|e| e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("kiln-tmp"))
            .count(),
        0
    );
    assert!(!err.contains(S3_SK));

    // No sidecar at all: refused.
    std::fs::remove_file(s3.root.join("kiln/rel/v1/notes.txt.sha256")).unwrap();
    let o = run(s3_env(&mut kiln(), &s3)
        .args(["download", "s3://kiln/rel/v1/notes.txt", "-o"])
        .arg(&dest));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no sidecar"));

    // Wrong credentials: a clear error that does not echo the secret.
    let o = run(s3_env(&mut kiln(), &s3)
        .env("AWS_SECRET_ACCESS_KEY", "wrong-secret-value-123")
        .args(["download", "s3://kiln/rel/v1/disk.img", "-o"])
        .arg(&dest));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !err.contains("wrong-secret-value-123") && !err.contains(S3_SK),
        "{err}"
    );
}

fn outdir(dir: &Path, files: &[(&str, &[u8])]) {
    std::fs::create_dir_all(dir).unwrap();
    for (n, b) in files {
        std::fs::write(dir.join(n), b).unwrap();
    }
}

#[test]
fn conditional_put_conflicts_are_detected_and_publishers_keep_each_others_slices() {
    let s3 = s3();
    s3_lib_env(&s3);
    let t = tempfile::tempdir().unwrap();
    let rt = kiln_ship::runtime().unwrap();
    rt.block_on(async {
        let r = kiln_ship::store::Remote::parse("s3://kiln/m/manifest.json").unwrap();
        // Create-if-absent: the second create loses.
        r.put_conditional(b"one".to_vec(), None).await.unwrap();
        let e = r.put_conditional(b"two".to_vec(), None).await.unwrap_err();
        assert!(
            matches!(
                e.downcast_ref::<kiln_ship::Error>(),
                Some(kiln_ship::Error::Conflict { .. })
            ),
            "{e:#}"
        );
        // If-Match: a writer holding a stale ETag loses.
        let (_, v1) = r.get_small(1 << 20).await.unwrap().unwrap();
        r.put_conditional(b"three".to_vec(), v1.clone())
            .await
            .unwrap();
        let e = r.put_conditional(b"four".to_vec(), v1).await.unwrap_err();
        assert!(
            matches!(
                e.downcast_ref::<kiln_ship::Error>(),
                Some(kiln_ship::Error::Conflict { .. })
            ),
            "{e:#}"
        );
        assert_eq!(r.get_small(1 << 20).await.unwrap().unwrap().0, b"three");
    });

    // Two publishers of different slices through the CLI: both slices survive.
    let a = t.path().join("a");
    let b = t.path().join("b");
    outdir(&a, &[("disk.img", b"AAAA")]);
    outdir(&b, &[("disk.img", b"BBBB")]);
    let o = run(s3_env(&mut kiln(), &s3)
        .args(["manifest", "emit"])
        .arg(format!("x86_64={}", a.display()))
        .args([
            "--slice",
            "a",
            "--release",
            "1",
            "--publish",
            "s3://kiln/rel/manifest.json",
        ]));
    assert!(!o.status.success(), "no baseline and no --init: refused");
    assert!(String::from_utf8_lossy(&o.stderr).contains("without a baseline"));
    ok(s3_env(&mut kiln(), &s3)
        .args(["manifest", "emit"])
        .arg(format!("x86_64={}", a.display()))
        .args([
            "--slice",
            "a",
            "--release",
            "1",
            "--init",
            "--publish",
            "s3://kiln/rel/manifest.json",
        ]));
    ok(s3_env(&mut kiln(), &s3)
        .args(["manifest", "emit"])
        .arg(format!("aarch64={}", b.display()))
        .args([
            "--slice",
            "b",
            "--release",
            "7",
            "--publish",
            "s3://kiln/rel/manifest.json",
        ]));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s3.root.join("kiln/rel/manifest.json")).unwrap())
            .unwrap();
    assert_eq!(m["schemaVersion"], 1);
    assert_eq!(
        m["slices"]["a"]["artifacts"]["x86_64"]["disk.img"]["sha256"],
        sha256(&a.join("disk.img"))
    );
    assert_eq!(
        m["slices"]["b"]["artifacts"]["aarch64"]["disk.img"]["key"],
        "b/7/aarch64/disk.img"
    );
    assert_eq!(
        m["slices"]["b"]["artifacts"]["aarch64"]["disk.img"]["size"],
        4
    );

    // Another publisher gets in between this publisher's read and its write (a separate kiln
    // process, run at exactly that moment): the stale write is refused by If-Match, and the
    // publisher re-reads, merges again, and keeps the other's slice.
    s3_lib_env(&s3);
    let e = t.path().join("e");
    outdir(&e, &[("uki.efi", b"EEEE")]);
    let mut calls = Vec::new();
    rt.block_on(async {
        let r = kiln_ship::store::Remote::parse("s3://kiln/rel/manifest.json").unwrap();
        let slice_c = kiln_ship::manifest::slice_from_dirs(
            &[kiln_ship::manifest::OutDir {
                arch: "x86_64".into(),
                dir: a.clone(),
            }],
            "c",
            "2",
            kiln_ship::manifest::DEFAULT_KEY,
        )
        .unwrap();
        kiln_ship::manifest::publish_slice_with(&r, "c", &slice_c, false, &mut |attempt| {
            calls.push(attempt);
            if attempt == 1 {
                ok(s3_env(&mut kiln(), &s3)
                    .args(["manifest", "emit"])
                    .arg(format!("x86_64={}", e.display()))
                    .args([
                        "--slice",
                        "e",
                        "--release",
                        "5",
                        "--publish",
                        "s3://kiln/rel/manifest.json",
                    ]));
            }
        })
        .await
        .unwrap();
        let m = kiln_ship::manifest::read(&r).await.unwrap().unwrap();
        let names: Vec<&String> = m.slices.keys().collect();
        assert_eq!(names, ["a", "b", "c", "e"]);
    });
    assert_eq!(
        calls,
        [1, 2],
        "the first write must have been refused and retried"
    );
}

fn count_downloaded(stdout: &str) -> usize {
    stdout.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn sync_downloads_only_what_changed_and_keeps_old_files_on_failure() {
    let s3 = s3();
    let t = tempfile::tempdir().unwrap();
    let x = t.path().join("x86");
    let arm = t.path().join("arm");
    outdir(
        &x,
        &[("disk.img", &bytes(300_000, 1)), ("uki.efi", b"uki-v1")],
    );
    outdir(&arm, &[("disk.img", &bytes(200_000, 2))]);
    // Publish: upload the artifacts where the keys say, then the manifest.
    let publish = |release: &str| {
        for (arch, dir) in [("x86_64", &x), ("aarch64", &arm)] {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                ok(s3_env(&mut kiln(), &s3)
                    .arg("upload")
                    .arg(&p)
                    .arg(format!("s3://kiln/rel/main/{release}/{arch}")));
            }
        }
        ok(s3_env(&mut kiln(), &s3)
            .args(["manifest", "emit"])
            .arg(format!("x86_64={}", x.display()))
            .arg(format!("aarch64={}", arm.display()))
            .args(["--slice", "main", "--release", release, "--init", "-o"])
            .arg(t.path().join("manifest.json")));
        ok(s3_env(&mut kiln(), &s3)
            .arg("upload")
            .arg(t.path().join("manifest.json"))
            .arg("s3://kiln/rel"));
    };
    publish("1");
    let cache = t.path().join("cache");
    let sync = |arches: &[&str]| {
        let mut c = kiln();
        s3_env(&mut c, &s3)
            .args(["sync", "s3://kiln/rel/manifest.json", "--cache"])
            .arg(&cache);
        for a in arches {
            c.args(["--arch", a]);
        }
        run(&mut c)
    };
    // Fresh cache, x86_64 only: downloads both x86_64 artifacts and nothing else.
    let o = sync(&["x86_64"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("kiln sync: plan: 2 to download, 0 up to date"),
        "{err}"
    );
    assert_eq!(count_downloaded(&String::from_utf8_lossy(&o.stdout)), 2);
    let cached = cache.join("main/1/x86_64/disk.img");
    assert_eq!(
        std::fs::read(&cached).unwrap(),
        std::fs::read(x.join("disk.img")).unwrap()
    );
    assert!(!cache.join("main/1/aarch64").exists());
    // Unchanged manifest: nothing downloaded.
    let o = sync(&["x86_64"]);
    assert!(o.status.success());
    assert_eq!(count_downloaded(&String::from_utf8_lossy(&o.stdout)), 0);
    assert!(String::from_utf8_lossy(&o.stderr).contains("plan: 0 to download, 2 up to date"));
    // One artifact changes (same key, new bytes): only it is downloaded.
    std::fs::write(x.join("uki.efi"), b"uki-v2").unwrap();
    publish("1");
    let before = std::fs::metadata(&cached).unwrap().modified().unwrap();
    let o = sync(&["x86_64"]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("fetch main/1/x86_64/uki.efi (changed")
            && err.contains("keep  main/1/x86_64/disk.img"),
        "{err}"
    );
    assert_eq!(count_downloaded(&String::from_utf8_lossy(&o.stdout)), 1);
    assert_eq!(
        std::fs::read(cache.join("main/1/x86_64/uki.efi")).unwrap(),
        b"uki-v2"
    );
    assert_eq!(
        std::fs::metadata(&cached).unwrap().modified().unwrap(),
        before,
        "unchanged file untouched"
    );
    // A failed download (the store holds bytes that do not match the manifest) keeps the old file.
    std::fs::write(x.join("uki.efi"), b"uki-v3").unwrap();
    publish("1");
    std::fs::write(
        s3.root.join("kiln/rel/main/1/x86_64/uki.efi"),
        b"uki-CORRUPT",
    )
    .unwrap();
    let o = sync(&["x86_64"]);
    assert!(!o.status.success(), "a failed download fails the sync");
    assert!(String::from_utf8_lossy(&o.stderr).contains("failed main/1/x86_64/uki.efi"));
    assert_eq!(
        std::fs::read(cache.join("main/1/x86_64/uki.efi")).unwrap(),
        b"uki-v2",
        "old file kept"
    );
    let stray: Vec<_> = std::fs::read_dir(cache.join("main/1/x86_64"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains("kiln-tmp"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
    // Once the store is fixed, the next sync fetches it (the failed one was not recorded).
    ok(s3_env(&mut kiln(), &s3)
        .arg("upload")
        .arg(x.join("uki.efi"))
        .arg("s3://kiln/rel/main/1/x86_64"));
    let o = sync(&["x86_64"]);
    assert!(o.status.success());
    assert_eq!(count_downloaded(&String::from_utf8_lossy(&o.stdout)), 1);
    assert_eq!(
        std::fs::read(cache.join("main/1/x86_64/uki.efi")).unwrap(),
        b"uki-v3"
    );
    // All architectures: only the aarch64 one is new.
    let o = sync(&[]);
    assert!(o.status.success());
    assert_eq!(count_downloaded(&String::from_utf8_lossy(&o.stdout)), 1);
    assert_eq!(
        std::fs::read(cache.join("main/1/aarch64/disk.img")).unwrap(),
        std::fs::read(arm.join("disk.img")).unwrap()
    );
}

#[test]
fn sync_from_a_local_manifest() {
    let t = tempfile::tempdir().unwrap();
    let rel = t.path().join("rel");
    let x = t.path().join("out");
    outdir(&x, &[("a.bin", b"1"), ("b.bin", b"2")]);
    ok(kiln()
        .args(["manifest", "emit"])
        .arg(format!("x86_64={}", x.display()))
        .args(["--release", "9", "--key", "{arch}/{name}", "--init", "-o"])
        .arg(rel.join("manifest.json")));
    std::fs::create_dir_all(rel.join("x86_64")).unwrap();
    for n in ["a.bin", "b.bin"] {
        std::fs::copy(x.join(n), rel.join("x86_64").join(n)).unwrap();
    }
    let cache = t.path().join("c");
    let o = run(kiln()
        .arg("sync")
        .arg(rel.join("manifest.json"))
        .arg("--cache")
        .arg(&cache));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(cache.join("x86_64/b.bin")).unwrap(), b"2");
    // A manifest whose key climbs out of the cache is refused.
    let text = std::fs::read_to_string(rel.join("manifest.json"))
        .unwrap()
        .replace("x86_64/a.bin", "../../evil");
    std::fs::write(rel.join("manifest.json"), text).unwrap();
    let o = run(kiln()
        .arg("sync")
        .arg(rel.join("manifest.json"))
        .arg("--cache")
        .arg(&cache));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("../../evil"));
}

#[test]
fn sync_over_http() {
    let t = tempfile::tempdir().unwrap();
    let rel = t.path().join("rel");
    let x = t.path().join("out");
    outdir(&x, &[("a.bin", &bytes(100_000, 7))]);
    ok(kiln()
        .args(["manifest", "emit"])
        .arg(format!("x86_64={}", x.display()))
        .args(["--release", "1", "--key", "{arch}/{name}", "--init", "-o"])
        .arg(rel.join("manifest.json")));
    std::fs::create_dir_all(rel.join("x86_64")).unwrap();
    std::fs::copy(x.join("a.bin"), rel.join("x86_64/a.bin")).unwrap();
    let port = free_port();
    let mut server = std::process::Command::new(tool("python3"))
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
            "--directory",
        ])
        .arg(&rel)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let cache = t.path().join("c");
    let o = run(kiln()
        .arg("sync")
        .arg(format!("http://127.0.0.1:{port}/manifest.json"))
        .arg("--cache")
        .arg(&cache));
    let _ = server.kill();
    let _ = server.wait();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(cache.join("x86_64/a.bin")).unwrap(),
        std::fs::read(x.join("a.bin")).unwrap()
    );
}
