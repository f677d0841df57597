//! A person's path through `kiln serve`'s page in headless Chromium (Debian's, driven by
//! playwright-core), at a desktop size (1280×900) and a phone size (390×844): upload a page,
//! follow the progress, download; the downloaded file's sha256 must equal the one the page
//! shows and `kiln inject`'s output. Every text colour the page can show must meet WCAG AA
//! contrast, nothing may scroll sideways, nothing may come from another origin, and the
//! screenshots are kept under `target/tmp/browser-artifacts/`.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

const VIEWPORTS: [(u32, u32, &str); 2] = [(1280, 900, "desktop"), (390, 844, "phone")];

fn artifacts() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser-artifacts");
    fs::create_dir_all(&d).unwrap();
    d
}

fn run_browser(url: &str, out: &Path, mode: &str, arg: &str, vp: (u32, u32, &str)) -> Value {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run `npm ci --prefix {}` (scripts/test does)",
        dir.display()
    );
    let shots = artifacts().join(format!("{}-{mode}", vp.2));
    let o = Command::new("node")
        .arg(dir.join("download.mjs"))
        .args([url, out.to_str().unwrap(), mode, arg])
        .args([vp.0.to_string(), vp.1.to_string()])
        .arg(&shots)
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

/// WCAG 2.1 AA (1.4.3): 4.5:1, or 3:1 for large text (24 px, or 18.66 px bold).
fn assert_contrast(what: &str, texts: &Value) {
    let texts = texts.as_array().unwrap();
    assert!(!texts.is_empty(), "{what}: no text measured");
    let bad: Vec<&Value> = texts
        .iter()
        .filter(|t| {
            let need = if t["large"].as_bool().unwrap() {
                3.0
            } else {
                4.5
            };
            t["ratio"].as_f64().unwrap() < need
        })
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: text below WCAG AA contrast: {}",
        serde_json::to_string_pretty(&bad).unwrap()
    );
}

/// The screenshots exist and are PNG images.
fn assert_screenshots(r: &Value) {
    let shots = r["screenshots"].as_array().unwrap();
    assert!(!shots.is_empty());
    for s in shots {
        let b = fs::read(s.as_str().unwrap()).unwrap();
        assert!(b.starts_with(b"\x89PNG\r\n\x1a\n") && b.len() > 1000, "{s}");
    }
}

/// Checks that apply to every run: layout, contrast, origin of every request, screenshots.
fn assert_page_quality(r: &Value, base_url: &str, vp: (u32, u32, &str)) {
    let what = format!("{} {}", vp.2, r["mode"]);
    for c in r["checks"].as_array().unwrap() {
        let state = format!("{what} ({})", c["state"]);
        assert!(
            c["scrollWidth"].as_u64().unwrap() <= c["clientWidth"].as_u64().unwrap(),
            "{state}: horizontal overflow: scrollWidth {} > clientWidth {}",
            c["scrollWidth"],
            c["clientWidth"]
        );
        assert_eq!(
            c["wide"],
            serde_json::json!([]),
            "{state}: elements past the right edge"
        );
        assert_contrast(&state, &c["texts"]);
    }
    if let Some(states) = r.get("states") {
        // Pending, active, done and failed steps and the busy button, forced one by one.
        let seen: Vec<&str> = states
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["state"].as_str().unwrap())
            .collect();
        for s in ["pending", "active", "done", "failed", "disabled"] {
            assert!(seen.contains(&s), "{what}: state {s} not measured");
        }
        assert_contrast(&format!("{what} (step states)"), states);
    }
    for u in r["requests"].as_array().unwrap() {
        let u = u.as_str().unwrap();
        assert!(u.starts_with(base_url), "{what}: external request {u}");
    }
    assert_screenshots(r);
}

fn file_sha(p: &str) -> String {
    hex::encode(Sha256::digest(fs::read(p).unwrap()))
}

fn serve_fixture() -> (Fixture, KilnServer) {
    let fx = Fixture::new();
    fs::write(
        fx.pieces.join("hello.html"),
        "<!doctype html><p>browser piece</p>\n",
    )
    .unwrap();
    let srv = KilnServer::start(&fx.config(""));
    (fx, srv)
}

#[test]
fn upload_progress_download_and_checksum_at_desktop_and_phone_sizes() {
    let (fx, srv) = serve_fixture();
    let out = fx.dir.path().join("downloads");
    fs::create_dir(&out).unwrap();
    let upload = fx.dir.path().join("My Piece.html");
    fs::write(&upload, "<!doctype html><p>uploaded from the browser</p>\n").unwrap();
    let (want, _) = fx.expected(&upload);
    let want_sha = hex::encode(Sha256::digest(&want));
    let base_url = format!("{}/", srv.url);

    for vp in VIEWPORTS {
        let r = run_browser(&base_url, &out, "upload", upload.to_str().unwrap(), vp);
        assert_page_quality(&r, &srv.url, vp);
        assert_eq!(
            r["steps"],
            serde_json::json!(["fetching", "preparing", "ready"]),
            "{r}"
        );
        assert_eq!(r["classes"], serde_json::json!(["done", "done", "done"]));
        // A friendly name from the uploaded file, not the content id.
        assert_eq!(r["name"], "demo-My-Piece.img");
        let got = file_sha(r["file"].as_str().unwrap());
        assert_eq!(r["shown"].as_str().unwrap(), got, "shown sha256 = file");
        assert_eq!(got, want_sha, "download = kiln inject output");
        assert_eq!(r["copied"], r["shown"], "the copy button copies the sha256");
        assert!(r["linkText"].as_str().unwrap().contains("Click here"));
        assert!(r["linkHref"].as_str().unwrap().contains("?name=My-Piece"));
        // Busy while working, usable again afterwards; progress announced politely.
        let busy: Vec<bool> = serde_json::from_value(r["busy"].clone()).unwrap();
        assert_eq!(busy.first(), Some(&true), "button disabled while busy");
        assert_eq!(busy.last(), Some(&false));
        assert_eq!(r["buttonEnabledAfter"], true);
        assert_eq!(
            r["live"],
            serde_json::json!({"role": "status", "live": "polite"})
        );
        let said = r["announced"].to_string();
        assert!(
            said.contains("Uploading") && said.contains("ready"),
            "{said}"
        );
    }
}

#[test]
fn a_failed_step_is_marked_failed_and_the_form_comes_back() {
    let (fx, srv) = serve_fixture();
    let out = fx.dir.path().join("downloads");
    fs::create_dir(&out).unwrap();
    for vp in VIEWPORTS {
        let r = run_browser(&format!("{}/", srv.url), &out, "fail", "no-such-piece", vp);
        assert_page_quality(&r, &srv.url, vp);
        assert_eq!(r["steps"], serde_json::json!(["fetching", "error"]), "{r}");
        assert_eq!(
            r["classes"],
            serde_json::json!(["failed", "pending", "pending"]),
            "{r}"
        );
        assert!(
            r["error"].as_str().unwrap().contains("no-such-piece"),
            "{r}"
        );
        assert_eq!(r["errorRole"], "alert");
        assert_eq!(r["buttonEnabledAfter"], true);
    }
}

#[test]
fn without_javascript_the_form_leads_to_a_download_link_and_the_checksum() {
    let (fx, srv) = serve_fixture();
    let out = fx.dir.path().join("downloads");
    fs::create_dir(&out).unwrap();
    let (want, _) = fx.expected(&fx.pieces.join("hello.html"));
    for vp in VIEWPORTS {
        let r = run_browser(&format!("{}/", srv.url), &out, "nojs", "hello", vp);
        assert_page_quality(&r, &srv.url, vp);
        assert_eq!(r["pageUrl"], format!("{}/os/demo/hello", srv.url));
        assert_eq!(r["name"], "demo-hello.img");
        let got = file_sha(r["file"].as_str().unwrap());
        assert_eq!(r["shown"].as_str().unwrap(), got);
        assert_eq!(got, hex::encode(Sha256::digest(&want)));
    }
}
