//! A person's path through `kiln serve`: headless Chromium (Debian's, driven by
//! playwright-core) opens `/`, names a piece or uploads one, sees the progress steps and
//! receives the download, whose bytes must equal `kiln inject`'s output.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;
use sha2::{Digest, Sha256};

fn run_browser(url: &str, out: &Path, mode: &str, arg: &str) -> serde_json::Value {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run `npm ci --prefix {}` (CI does)",
        dir.display()
    );
    let o = Command::new("node")
        .arg(dir.join("download.mjs"))
        .args([url, out.to_str().unwrap(), mode, arg])
        .current_dir(&dir)
        .output()
        .expect("node must be installed");
    assert!(
        o.status.success(),
        "browser run failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let line = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(line.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {line}"))
}

#[test]
fn browser_names_a_piece_sees_progress_and_downloads() {
    let fx = Fixture::new();
    let piece = "<!doctype html><p>browser piece</p>\n";
    fs::write(fx.pieces.join("hello.html"), piece).unwrap();
    let srv = KilnServer::start(&fx.config(""));
    let out = fx.dir.path().join("downloads");
    fs::create_dir(&out).unwrap();

    let r = run_browser(&format!("{}/", srv.url), &out, "piece", "hello");
    assert_eq!(r["name"], "demo-hello.img");
    assert_eq!(
        r["steps"],
        serde_json::json!(["fetching", "preparing", "ready"])
    );
    assert_eq!(r["classes"], serde_json::json!(["done", "done", "done"]));
    let got = fs::read(r["file"].as_str().unwrap()).unwrap();
    let (want, digest) = fx.expected(&fx.pieces.join("hello.html"));
    assert_eq!(
        hex::encode(Sha256::digest(&got)),
        hex::encode(Sha256::digest(&want))
    );
    assert_eq!(r["digest"], digest.as_str());

    // Uploading a page through the form.
    let upload = fx.dir.path().join("mine.html");
    fs::write(&upload, "<!doctype html><p>uploaded from the browser</p>\n").unwrap();
    let r = run_browser(
        &format!("{}/", srv.url),
        &out,
        "upload",
        upload.to_str().unwrap(),
    );
    assert_eq!(
        r["steps"],
        serde_json::json!(["fetching", "preparing", "ready"])
    );
    let got = fs::read(r["file"].as_str().unwrap()).unwrap();
    let (want, _) = fx.expected(&upload);
    assert!(
        got == want,
        "uploaded piece download differs from kiln inject"
    );
}
