//! `kiln push` / `kiln pull` against the CNCF distribution registry on loopback, with the ORAS
//! reference client (oras-py) on the other side.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod ship_support;

use std::collections::BTreeMap;
use std::path::Path;

use ship_support::*;

fn write_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    std::fs::create_dir_all(dir).unwrap();
    let files = vec![
        ("disk.img".to_string(), bytes(3 * 1024 * 1024 + 123, 1)),
        ("report.json".to_string(), b"{\"ok\":true}\n".to_vec()),
        ("empty.txt".to_string(), Vec::new()),
    ];
    for (n, b) in &files {
        std::fs::write(dir.join(n), b).unwrap();
    }
    files
}

#[test]
fn kiln_push_then_oras_pull_is_byte_identical_and_kiln_pull_round_trips() {
    let reg = registry();
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let files = write_files(&out);
    let target = format!("oci://{}/kiln/img:1.0", reg.addr());
    // A 1 MiB chunk size forces the PATCH-chunked upload path for disk.img.
    let stdout = ok(kiln()
        .args(["push"])
        .arg(&out)
        .arg(&target)
        .args(["--chunk-size", "1048576"]));
    assert!(stdout.contains("@sha256:"), "{stdout}");

    // oras-py pulls what kiln pushed.
    let oras_dir = t.path().join("oras");
    oras_py(&format!(
        "import oras.client\nc = oras.client.OrasClient(insecure=True)\nc.pull(target='{}/kiln/img:1.0', outdir='{}')\n",
        reg.addr(),
        oras_dir.display()
    ));
    for (n, b) in &files {
        assert_eq!(
            &std::fs::read(oras_dir.join(n)).unwrap(),
            b,
            "oras pulled {n}"
        );
    }

    // The manifest is an ORAS artifact: empty config, artifactType, titles.
    let m = oras_py(&format!(
        "import json, oras.client\nc = oras.client.OrasClient(insecure=True)\nprint(json.dumps(c.get_manifest('{}/kiln/img:1.0')))\n",
        reg.addr()
    ));
    let m: serde_json::Value = serde_json::from_str(m.trim()).unwrap();
    assert_eq!(m["artifactType"], "application/vnd.kiln.image.v1");
    assert_eq!(
        m["config"]["mediaType"],
        "application/vnd.oci.empty.v1+json"
    );
    assert_eq!(m["config"]["digest"], kiln_ship::oci::EMPTY_DIGEST);
    let titles: Vec<&str> = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            l["annotations"]["org.opencontainers.image.title"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(titles, ["disk.img", "empty.txt", "report.json"]);

    // kiln pulls it back.
    let back = t.path().join("back");
    ok(kiln().args(["pull", &target, "-o"]).arg(&back));
    for (n, b) in &files {
        assert_eq!(&std::fs::read(back.join(n)).unwrap(), b, "kiln pulled {n}");
    }
    // A second pull finds everything up to date and downloads nothing.
    let o = run(kiln().args(["pull", &target, "-o"]).arg(&back));
    assert!(o.status.success());
    assert_eq!(
        String::from_utf8_lossy(&o.stderr)
            .matches("up to date")
            .count(),
        3,
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn oras_push_then_kiln_pull() {
    let reg = registry();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    let files = write_files(&src);
    let names: Vec<String> = files
        .iter()
        .filter(|(_, b)| !b.is_empty())
        .map(|(n, _)| format!("'{n}'"))
        .collect();
    oras_py(&format!(
        "import os, oras.client\nos.chdir('{}')\nc = oras.client.OrasClient(insecure=True)\nc.push(target='{}/fromoras/art:v1', files=[{}])\n",
        src.display(),
        reg.addr(),
        names.join(", ")
    ));
    let out = t.path().join("pulled");
    ok(kiln()
        .args([
            "pull",
            &format!("oci://{}/fromoras/art:v1", reg.addr()),
            "-o",
        ])
        .arg(&out));
    for (n, b) in files.iter().filter(|(_, b)| !b.is_empty()) {
        assert_eq!(&std::fs::read(out.join(n)).unwrap(), b, "{n}");
    }
}

#[test]
fn corrupted_blob_is_refused_and_nothing_is_left() {
    let reg = registry();
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    write_files(&out);
    let target = format!("oci://{}/kiln/corrupt:1", reg.addr());
    ok(kiln().args(["push"]).arg(out.join("disk.img")).arg(&target));
    let hex = sha256(&out.join("disk.img"));
    let blob = registry_blob_path(&reg, &hex);
    let mut data = std::fs::read(&blob).unwrap();
    data[1000] ^= 0xff;
    std::fs::write(&blob, &data).unwrap();

    let dest = t.path().join("pulled");
    let o = run(kiln().args(["pull", &target, "-o"]).arg(&dest));
    assert!(!o.status.success(), "corrupted pull must fail");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("sha256 mismatch") && err.contains(&hex),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(&dest)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.is_empty(),
        "nothing may be left after a refused pull: {left:?}"
    );
}

#[test]
fn interrupted_download_resumes_with_range() {
    let reg = registry();
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let files = write_files(&out);
    ok(kiln()
        .args(["push"])
        .arg(out.join("disk.img"))
        .arg(format!("oci://{}/kiln/resume:1", reg.addr())));
    let want = &files[0].1;

    // 1. The connection is cut after 1 MiB of the blob: kiln resumes within the run.
    let proxy = cutting_proxy(reg.port, 1, 1 << 20);
    let dest = t.path().join("a");
    // A partial left by an older version of the tag (another digest) is neither resumed nor kept.
    std::fs::create_dir_all(&dest).unwrap();
    let stale = dest.join(".disk.img.0123456789abcdef.kiln-partial");
    std::fs::write(&stale, vec![7u8; 2 << 20]).unwrap();
    let o = run(kiln()
        .args([
            "pull",
            &format!("oci://127.0.0.1:{}/kiln/resume:1", proxy.port),
            "-o",
        ])
        .arg(&dest));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    assert_eq!(&std::fs::read(dest.join("disk.img")).unwrap(), want);
    let log = proxy.log.lock().unwrap().requests.clone();
    let ranged: Vec<&String> = log
        .iter()
        .filter(|r| r.to_ascii_lowercase().contains("range: bytes="))
        .collect();
    assert_eq!(ranged.len(), 1, "one resumed request expected: {log:#?}");
    let from: u64 = ranged[0]
        .rsplit('=')
        .next()
        .unwrap()
        .trim_end_matches('-')
        .parse()
        .unwrap();
    assert!(
        from >= 1 << 20 && from < want.len() as u64,
        "resumed from {from}: {log:#?}"
    );
    assert!(err.contains("resuming at byte"), "{err}");
    assert!(!stale.exists(), "stale partial removed");

    // 2. Every attempt is cut: the run fails, keeps the partial file, and a later run resumes it.
    let proxy = cutting_proxy(reg.port, 1, 700_000);
    let dest = t.path().join("b");
    let o = run(kiln()
        .args([
            "pull",
            &format!("oci://127.0.0.1:{}/kiln/resume:1", proxy.port),
            "-o",
        ])
        .arg(&dest)
        .args(["--retries", "0"]));
    assert!(!o.status.success());
    let partial = dest.join(format!(
        ".disk.img.{}.kiln-partial",
        &sha256(&out.join("disk.img"))[..16]
    ));
    let have = std::fs::metadata(&partial)
        .expect("partial file kept")
        .len();
    assert_eq!(have, 700_000);
    assert!(!dest.join("disk.img").exists());
    let proxy2 = cutting_proxy(reg.port, 0, 0);
    ok(kiln()
        .args([
            "pull",
            &format!("oci://127.0.0.1:{}/kiln/resume:1", proxy2.port),
            "-o",
        ])
        .arg(&dest));
    assert_eq!(&std::fs::read(dest.join("disk.img")).unwrap(), want);
    assert!(!partial.exists());
    let log = proxy2.log.lock().unwrap().requests.clone();
    assert!(log.iter().any(|r| r.contains("bytes=700000-")), "{log:#?}");
}

#[test]
fn unsafe_titles_are_refused_before_writing() {
    let reg = registry();
    let t = tempfile::tempdir().unwrap();
    let rt = kiln_ship::runtime().unwrap();
    for (i, title) in ["../escape.txt", "/etc/evil", "a/../../b"]
        .iter()
        .enumerate()
    {
        let r = kiln_ship::oci::Reference::parse(&format!("oci://{}/kiln/evil:{i}", reg.addr()))
            .unwrap();
        rt.block_on(async {
            let c = kiln_ship::oci::Client::new(&r, Default::default()).unwrap();
            let body = b"pwned";
            let digest = format!("sha256:{}", kiln_ship::digest::sha256_reader(&body[..]).unwrap().0);
            c.push_blob_bytes(body, &digest).await.unwrap();
            c.push_blob_bytes(b"{}", kiln_ship::oci::EMPTY_DIGEST).await.unwrap();
            let mut ann = BTreeMap::new();
            ann.insert(kiln_ship::oci::ANN_TITLE.to_string(), title.to_string());
            let m = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": kiln_ship::oci::MT_MANIFEST,
                "artifactType": "application/vnd.test",
                "config": {"mediaType": kiln_ship::oci::MT_EMPTY, "digest": kiln_ship::oci::EMPTY_DIGEST, "size": 2},
                "layers": [{"mediaType": "application/octet-stream", "digest": digest, "size": 5, "annotations": ann}],
            });
            c.put_manifest(&serde_json::to_vec(&m).unwrap(), kiln_ship::oci::MT_MANIFEST, &i.to_string()).await.unwrap();
        });
        let dest = t.path().join(format!("d{i}/inner"));
        let o = run(kiln().args(["pull", &r.to_string(), "-o"]).arg(&dest));
        assert!(!o.status.success(), "{title}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("layer title") && err.contains(title), "{err}");
        assert!(!t.path().join(format!("d{i}/escape.txt")).exists());
        assert!(!dest.exists(), "nothing written for {title}");
    }
}

#[test]
fn zstd_layers_say_so_and_restore_the_original() {
    let reg = registry();
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    // Compressible: a sparse-ish disk image.
    let mut img = vec![0u8; 4 << 20];
    img[..1 << 20].copy_from_slice(&bytes(1 << 20, 9));
    std::fs::write(out.join("disk.img"), &img).unwrap();
    let target = format!("oci://{}/kiln/z:1", reg.addr());
    ok(kiln()
        .args(["push", "--zstd"])
        .arg(out.join("disk.img"))
        .arg(&target));
    let m = oras_py(&format!(
        "import json, oras.client\nc = oras.client.OrasClient(insecure=True)\nprint(json.dumps(c.get_manifest('{}/kiln/z:1')))\n",
        reg.addr()
    ));
    let m: serde_json::Value = serde_json::from_str(m.trim()).unwrap();
    let l = &m["layers"][0];
    assert_eq!(l["mediaType"], "application/vnd.kiln.file.v1+zstd");
    assert_eq!(
        l["annotations"]["org.opencontainers.image.title"],
        "disk.img.zst"
    );
    assert!(l["size"].as_u64().unwrap() < img.len() as u64 / 2);
    // kiln restores the original bytes.
    let back = t.path().join("back");
    ok(kiln().args(["pull", &target, "-o"]).arg(&back));
    assert_eq!(std::fs::read(back.join("disk.img")).unwrap(), img);
    // oras users get a real zstd file.
    let od = t.path().join("oras");
    oras_py(&format!(
        "import oras.client\nc = oras.client.OrasClient(insecure=True)\nc.pull(target='{}/kiln/z:1', outdir='{}')\n",
        reg.addr(),
        od.display()
    ));
    ok(std::process::Command::new(tool("zstd"))
        .args(["-d", "-q"])
        .arg(od.join("disk.img.zst"))
        .arg("-o")
        .arg(od.join("disk.img")));
    assert_eq!(std::fs::read(od.join("disk.img")).unwrap(), img);
}

#[test]
fn signatures_and_sbom_attach_as_referrers_via_the_tag_fallback() {
    let reg = registry();
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let files = write_files(&out);
    let key = t.path().join("k.key");
    let pubkey = t.path().join("k.pub");
    ok(std::process::Command::new(tool("minisign"))
        .args(["-G", "-W", "-f", "-p"])
        .arg(&pubkey)
        .arg("-s")
        .arg(&key));
    let sbom = t.path().join("sbom.spdx.json");
    std::fs::write(&sbom, b"{\"spdxVersion\":\"SPDX-2.3\"}\n").unwrap();
    let target = format!("oci://{}/kiln/signed:1", reg.addr());
    let stdout = ok(kiln()
        .args(["push"])
        .arg(out.join("disk.img"))
        .arg(&target)
        .arg("--key")
        .arg(&key)
        .arg("--sbom")
        .arg(&sbom));
    let main_digest = stdout
        .lines()
        .next()
        .unwrap()
        .rsplit('@')
        .next()
        .unwrap()
        .to_string();

    // This registry has no referrers API; the fallback tag lists both referrers.
    let listed = ok(kiln().args(["pull", &target, "--referrers"]));
    assert!(
        listed.contains("application/vnd.kiln.signature.v1+minisign"),
        "{listed}"
    );
    assert!(listed.contains("application/spdx+json"), "{listed}");
    let tag = kiln_ship::oci::fallback_tag(&main_digest).unwrap();
    let idx = oras_py(&format!(
        "import json, oras.client\nc = oras.client.OrasClient(insecure=True)\nprint(json.dumps(c.get_manifest('{}/kiln/signed:{tag}', allowed_media_type=['application/vnd.oci.image.index.v1+json'])))\n",
        reg.addr()
    ));
    let idx: serde_json::Value = serde_json::from_str(idx.trim()).unwrap();
    assert_eq!(idx["manifests"].as_array().unwrap().len(), 2, "{idx}");

    // Pull the signature artifact and check it with the minisign CLI against the pulled image.
    let sig_digest = listed
        .lines()
        .find(|l| l.contains("minisign"))
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    let d = t.path().join("sig");
    ok(kiln()
        .args([
            "pull",
            &format!("oci://{}/kiln/signed@{sig_digest}", reg.addr()),
            "-o",
        ])
        .arg(&d));
    let img = t.path().join("img");
    ok(kiln().args(["pull", &target, "-o"]).arg(&img));
    assert_eq!(std::fs::read(img.join("disk.img")).unwrap(), files[0].1);
    ok(std::process::Command::new(tool("minisign"))
        .arg("-Vm")
        .arg(img.join("disk.img"))
        .arg("-x")
        .arg(d.join("disk.img.minisig"))
        .arg("-p")
        .arg(&pubkey));
}
