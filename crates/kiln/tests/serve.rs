//! `kiln serve` end to end: every response is byte-identical to `kiln inject`'s output (full,
//! resumed, random ranges, HEAD, 304, 416) for a local base and a base in an S3-compatible
//! server (s3s-fs); bad input gets a clean 4xx/5xx and the server keeps serving; manifests
//! verify with the minisign CLI.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use reqwest::header;
use sha2::{Digest, Sha256};

const PIECE_SMALL: &str = "<!doctype html><title>small</title><p>hello</p>\n";

async fn get(c: &reqwest::Client, url: &str, hdrs: &[(&str, &str)]) -> reqwest::Response {
    let mut r = c.get(url);
    for (k, v) in hdrs {
        r = r.header(*k, *v);
    }
    r.send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// The RFC 9530 / RFC 3230 header values for a body.
fn digest_headers(body: &[u8]) -> (String, String) {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(body));
    (format!("sha-256=:{b64}:"), format!("SHA-256={b64}"))
}

/// Checks one personalised download against the bytes `kiln inject` produced.
/// Returns the base bytes the server has sent by sendfile so far (from `/metrics`).
async fn check_identity(base: &str, image: &str, piece: &str, want: &[u8], digest: &str) -> u64 {
    let c = reqwest::Client::new();
    let url = format!("{base}/os/{image}/{piece}.img");
    let len = want.len() as u64;
    let (repr, legacy) = digest_headers(want);
    let cache = if piece.starts_with("u-") {
        "public, max-age=31536000, immutable"
    } else {
        "public, no-cache"
    };

    let r = get(&c, &url, &[]).await;
    assert_eq!(r.status(), 200, "{url}");
    assert_eq!(r.headers()["repr-digest"], repr.as_str(), "{url}");
    assert_eq!(r.headers()["digest"], legacy.as_str(), "{url}");
    assert_eq!(r.headers()[header::CACHE_CONTROL], cache, "{url}");
    let etag = r.headers()[header::ETAG].to_str().unwrap().to_string();
    assert!(
        etag.starts_with('"') && !etag.starts_with("W/"),
        "strong ETag: {etag}"
    );
    assert_eq!(
        r.headers()[header::CONTENT_LENGTH],
        len.to_string().as_str()
    );
    assert_eq!(r.headers()["kiln-chunked-digest"], digest);
    let cd = r.headers()[header::CONTENT_DISPOSITION]
        .to_str()
        .unwrap()
        .to_string();
    let short = if piece.starts_with("u-") {
        &piece[..10]
    } else {
        piece
    };
    let filename = format!("{image}-{short}.img");
    assert_eq!(cd, format!("attachment; filename=\"{filename}\""));
    let body = r.bytes().await.unwrap();
    assert!(
        body.as_ref() == want,
        "full download differs from kiln inject"
    );

    // The checksum file, in sha256sum's format, checks the download under its name.
    let r = get(&c, &format!("{url}.sha256"), &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()[header::CACHE_CONTROL], cache);
    let line = r.text().await.unwrap();
    assert_eq!(
        line,
        format!("{}  {filename}\n", hex::encode(Sha256::digest(want)))
    );
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join(&filename), &body).unwrap();
    fs::write(d.path().join("SUM"), &line).unwrap();
    let ck = Command::new("sha256sum")
        .args(["-c", "SUM"])
        .current_dir(d.path())
        .output()
        .unwrap();
    assert!(ck.status.success(), "sha256sum -c: {ck:?}");
    fs::write(d.path().join(&filename), &body[1..]).unwrap();
    let ck = Command::new("sha256sum")
        .args(["-c", "SUM"])
        .current_dir(d.path())
        .output()
        .unwrap();
    assert!(!ck.status.success(), "sha256sum -c accepted a damaged file");
    // A friendlier name only changes the file name.
    let r = get(&c, &format!("{url}?name=My%20page.html"), &[]).await;
    assert_eq!(
        r.headers()[header::CONTENT_DISPOSITION],
        format!("attachment; filename=\"{image}-My-page.img\"").as_str()
    );
    drop(r);

    let r = c.head(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()[header::CONTENT_LENGTH],
        len.to_string().as_str()
    );
    assert_eq!(r.headers()[header::ETAG], etag.as_str());
    assert!(r.bytes().await.unwrap().is_empty());

    // A download interrupted at `cut` and resumed with If-Range.
    let cut = len / 3 + 12_345;
    let r = get(
        &c,
        &url,
        &[("range", &format!("bytes={cut}-")), ("if-range", &etag)],
    )
    .await;
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()[header::CONTENT_RANGE],
        format!("bytes {cut}-{}/{len}", len - 1).as_str()
    );
    // RFC 9530: Repr-Digest describes the whole image, also on a partial response.
    assert_eq!(r.headers()["repr-digest"], repr.as_str());
    assert!(
        r.bytes().await.unwrap().as_ref() == &want[cut as usize..],
        "resumed tail differs"
    );

    // Random ranges (a fixed-seed generator), including ones across the slot's edges.
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for i in 0..24 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let a = x % len;
        let span = if i % 3 == 0 { 1 } else { (x >> 20) % (3 << 20) };
        let b = (a + span).min(len - 1);
        let r = get(&c, &url, &[("range", &format!("bytes={a}-{b}"))]).await;
        assert_eq!(r.status(), 206, "bytes={a}-{b}");
        assert!(
            r.bytes().await.unwrap().as_ref() == &want[a as usize..=b as usize],
            "range {a}-{b} differs"
        );
    }
    let r = get(&c, &url, &[("range", "bytes=-1000")]).await;
    assert_eq!(r.status(), 206);
    assert!(r.bytes().await.unwrap().as_ref() == &want[want.len() - 1000..]);

    let r = get(&c, &url, &[("if-none-match", &etag)]).await;
    assert_eq!(r.status(), 304);
    assert!(r.bytes().await.unwrap().is_empty());

    // If-Range with another validator: the whole image, not a fragment of a different one.
    let r = get(
        &c,
        &url,
        &[("range", "bytes=0-9"), ("if-range", "\"other\"")],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()[header::CONTENT_LENGTH],
        len.to_string().as_str()
    );
    drop(r);

    for bad in [
        format!("bytes={len}-"),
        "bytes=-0".to_string(),
        "bytes=abc".into(),
        "bytes=9-2".into(),
    ] {
        let r = get(&c, &url, &[("range", &bad)]).await;
        assert_eq!(r.status(), 416, "{bad}");
        assert_eq!(
            r.headers()[header::CONTENT_RANGE],
            format!("bytes */{len}").as_str()
        );
    }
    // Several ranges: documented as answered with the whole image.
    let r = get(&c, &url, &[("range", "bytes=0-1,5-6")]).await;
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap().as_ref() == want);

    let m = get(&c, &format!("{base}/metrics"), &[])
        .await
        .text()
        .await
        .unwrap();
    m.lines()
        .find_map(|l| l.strip_prefix("kiln_download_sendfile_bytes_total "))
        .unwrap_or_else(|| panic!("no sendfile counter: {m}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_base_is_served_byte_identical_with_signed_manifests() {
    let fx = Fixture::new();
    fs::write(fx.pieces.join("hello.html"), PIECE_SMALL).unwrap();
    let full: Vec<u8> = (0..CAPACITY).map(|i| b'a' + (i % 26) as u8).collect();
    fs::write(fx.pieces.join("full.html"), &full).unwrap();
    let empty = fx.pieces.join("empty.html");
    fs::write(&empty, b"").unwrap();
    let (pk, sk) = minisign_keys(fx.dir.path());
    let cfg = fx.config(&format!(
        "[signing]\nsecret_key = \"{}\"\npublic_key = \"{}\"\n",
        sk.display(),
        pk.display()
    ));
    let srv = KilnServer::start(&cfg);

    for piece in ["hello", "full", "empty"] {
        let (want, digest) = fx.expected(&fx.pieces.join(format!("{piece}.html")));
        let sent = check_identity(&srv.url, "demo", piece, &want, &digest).await;
        // A local base leaves by sendfile, not through a buffer.
        assert!(sent > 0, "{piece}: no base byte was sent by sendfile");
    }

    // Upload, then download by id.
    let c = reqwest::Client::new();
    let page = b"<!doctype html><p>uploaded</p>".to_vec();
    let r = c
        .post(format!("{}/os/demo", srv.url))
        .header("content-type", "text/html")
        .body(page.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let j: serde_json::Value = r.json().await.unwrap();
    let id = j["id"].as_str().unwrap().to_string();
    let up = fx.dir.path().join("uploaded.html");
    fs::write(&up, &page).unwrap();
    let (want, digest) = fx.expected(&up);
    check_identity(&srv.url, "demo", &id, &want, &digest).await;

    // Signed manifest, checked by the minisign CLI.
    let m = get(&c, &format!("{}/os/demo/hello.manifest", srv.url), &[]).await;
    assert_eq!(m.status(), 200);
    let m = m.bytes().await.unwrap();
    let sig = get(
        &c,
        &format!("{}/os/demo/hello.manifest.minisig", srv.url),
        &[],
    )
    .await;
    assert_eq!(sig.status(), 200);
    let sig = sig.bytes().await.unwrap();
    let mf = fx.dir.path().join("hello.manifest");
    fs::write(&mf, &m).unwrap();
    fs::write(fx.dir.path().join("hello.manifest.minisig"), &sig).unwrap();
    let v = Command::new("minisign")
        .args(["-V", "-p", pk.to_str().unwrap(), "-m", mf.to_str().unwrap()])
        .output()
        .expect("minisign must be installed");
    assert!(
        v.status.success(),
        "minisign -V: {}",
        String::from_utf8_lossy(&v.stderr)
    );
    // The checksum file's signature: `minisign -V` on it, then `sha256sum -c`, checks the image.
    let sum = get(&c, &format!("{}/os/demo/hello.img.sha256", srv.url), &[])
        .await
        .text()
        .await
        .unwrap();
    let sig = get(
        &c,
        &format!("{}/os/demo/hello.img.sha256.minisig", srv.url),
        &[],
    )
    .await;
    assert_eq!(sig.status(), 200);
    let sig = sig.text().await.unwrap();
    let sf = fx.dir.path().join("demo-hello.img.sha256");
    fs::write(&sf, &sum).unwrap();
    fs::write(fx.dir.path().join("demo-hello.img.sha256.minisig"), &sig).unwrap();
    let v = Command::new("minisign")
        .args(["-V", "-p", pk.to_str().unwrap(), "-m", sf.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        v.status.success(),
        "minisign -V: {}",
        String::from_utf8_lossy(&v.stderr)
    );
    let (hello, _) = fx.expected(&fx.pieces.join("hello.html"));
    let shown = String::from_utf8_lossy(&v.stdout).to_string();
    assert!(
        shown.contains(&format!(
            "file:demo-hello.img\tsha256:{}",
            hex::encode(Sha256::digest(&hello))
        )),
        "trusted comment: {shown}"
    );
    fs::write(&sf, sum.replace('0', "1")).unwrap();
    let v = Command::new("minisign")
        .args(["-V", "-p", pk.to_str().unwrap(), "-m", sf.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!v.status.success(), "a changed checksum file verified");
    let mj: serde_json::Value = serde_json::from_slice(&m).unwrap();
    let (_, digest) = fx.expected(&fx.pieces.join("hello.html"));
    assert_eq!(mj["chunked_digest"], digest.as_str());
    assert_eq!(
        mj["sha256"],
        format!("sha256:{}", hex::encode(Sha256::digest(&hello))).as_str()
    );
    assert_eq!(mj["payload"]["len"], PIECE_SMALL.len());
    // A tampered manifest does not verify.
    fs::write(&mf, String::from_utf8_lossy(&m).replace("hello", "hellp")).unwrap();
    let v = Command::new("minisign")
        .args(["-V", "-p", pk.to_str().unwrap(), "-m", mf.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!v.status.success());

    let cat: serde_json::Value = get(&c, &format!("{}/api/catalog", srv.url), &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(cat["images"][0]["name"], "demo");
    assert_eq!(cat["images"][0]["slots"][0]["kind"], "raw");
    assert!(cat["images"][0]["pieces"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p == "hello"));
    let metrics = get(&c, &format!("{}/metrics", srv.url), &[])
        .await
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("kiln_downloads_total{image=\"demo\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kiln_injection_seconds_count"),
        "{metrics}"
    );
    assert_eq!(fx.base_sha(), fx.base_sha_before, "base modified");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_store_base_is_served_byte_identical() {
    let fx = Fixture::new();
    fs::write(fx.pieces.join("hello.html"), PIECE_SMALL).unwrap();
    let s3 = S3Server::start(fx.dir.path(), &fx.base);
    let cfg = fx.config_with_image(
        &format!(
            "[[image]]\nname = \"demo\"\nbase = \"s3://kiln/base.img\"\nslot = \"piece\"\n\
         [image.store]\nendpoint = \"{}\"\nregion = \"us-east-1\"\naccess_key_id = \"AKTEST\"\n\
         secret_access_key = \"SKTEST-secret\"\nallow_http = \"true\"\n",
            s3.url
        ),
        "",
    );
    let srv = KilnServer::start(&cfg);
    let (want, digest) = fx.expected(&fx.pieces.join("hello.html"));
    let sent = check_identity(&srv.url, "demo", "hello", &want, &digest).await;
    assert_eq!(sent, 0, "an object-store base has no file to send");
    drop(srv);
    drop(s3);
}

/// Sends raw bytes and returns the status line's code.
fn raw_status(addr: &str, request: &str) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap();
    let line = String::from_utf8_lossy(&buf[..n]).to_string();
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clean_errors_and_the_server_keeps_serving() {
    let fx = Fixture::new();
    fs::write(fx.pieces.join("hello.html"), PIECE_SMALL).unwrap();
    let up = Upstream::start();
    let upstream = format!(
        "[[source]]\nkind = \"upstream\"\nurl = \"http://127.0.0.1:{}/{{piece}}\"\nallow_hosts = [\"127.0.0.1\"]\n\
         timeout = \"2s\"\nmax_size = \"64K\"\nallow_private = true\n",
        up.port
    );
    let cfg = fx.config_with(&upstream, "write_timeout = \"1s\"\ndownloads_per_ip = 2\n");
    let srv = KilnServer::start(&cfg);
    let c = reqwest::Client::new();
    let u = |p: &str| format!("{}{p}", srv.url);

    // Traversal in image or piece names, raw so no client normalises the path.
    for path in [
        "/os/../../etc/passwd",
        "/os/demo/..%2F..%2Fetc%2Fpasswd.img",
        "/os/demo/../../../etc/passwd.img",
        "/os/..%2F..%2Fetc/hello.img",
        "/os/demo/%2e%2e.img",
        "/os/demo/.hidden.img",
    ] {
        let code = raw_status(
            &srv.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        );
        assert!((400..500).contains(&code), "{path}: {code}");
    }
    // Garbage instead of HTTP.
    let code = raw_status(&srv.addr, "\x16\x03\x01garbage\r\n\r\n");
    assert_eq!(code, 400);

    assert_eq!(get(&c, &u("/os/nope/hello.img"), &[]).await.status(), 404);
    assert_eq!(get(&c, &u("/os/demo/missing.img"), &[]).await.status(), 404);
    assert_eq!(get(&c, &u("/os/demo/hello.iso"), &[]).await.status(), 404);
    assert_eq!(
        get(&c, &u("/os/demo/hello.img"), &[("range", "bytes=zz")])
            .await
            .status(),
        416
    );
    assert_eq!(
        get(&c, &u("/os/demo/hello.manifest.minisig"), &[])
            .await
            .status(),
        404
    );

    let post = |body: Vec<u8>, ctype: &'static str| {
        c.post(u("/os/demo"))
            .header("content-type", ctype)
            .body(body)
            .send()
    };
    assert_eq!(
        post(vec![b'a'; CAPACITY as usize + 1], "text/html")
            .await
            .unwrap()
            .status(),
        413
    );
    assert_eq!(
        post(b"<p>x</p>".to_vec(), "application/x-sh")
            .await
            .unwrap()
            .status(),
        415
    );
    assert_eq!(
        post(vec![0xff, 0xfe, 0], "text/html")
            .await
            .unwrap()
            .status(),
        415
    );
    assert_eq!(
        c.post(u("/os/nope"))
            .header("content-type", "text/html")
            .body("x")
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    // Upstream: fine, slow, huge, redirecting to loopback.
    let r = get(&c, &u("/os/demo/fine.img"), &[]).await;
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.unwrap();
    let fine = fx.dir.path().join("fine.html");
    fs::write(&fine, UPSTREAM_FINE).unwrap();
    let (want, _) = fx.expected(&fine);
    assert!(
        body.as_ref() == want,
        "upstream piece download differs from kiln inject"
    );
    let t = std::time::Instant::now();
    assert_eq!(get(&c, &u("/os/demo/slow.img"), &[]).await.status(), 504);
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "slow upstream held the request {:?}",
        t.elapsed()
    );
    assert_eq!(get(&c, &u("/os/demo/huge.img"), &[]).await.status(), 502);
    assert_eq!(
        get(&c, &u("/os/demo/redirect.img"), &[]).await.status(),
        502
    );
    assert_eq!(up.hits("secret"), 0, "the redirect target was fetched");
    assert_eq!(
        get(&c, &u("/os/demo/missing-upstream.img"), &[])
            .await
            .status(),
        404
    );

    // Download caps: two streams held open without reading, the third is refused.
    let h1 = get(&c, &u("/os/demo/hello.img"), &[]).await;
    let h2 = get(&c, &u("/os/demo/hello.img"), &[]).await;
    assert_eq!((h1.status().as_u16(), h2.status().as_u16()), (200, 200));
    let r3 = get(&c, &u("/os/demo/hello.img"), &[]).await;
    assert_eq!(r3.status(), 429);
    assert!(r3.headers().contains_key(header::RETRY_AFTER));
    drop((h1, h2));
    // A client that stops reading is dropped after the write timeout, freeing its slot.
    let mut stalled = TcpStream::connect(&srv.addr).unwrap();
    stalled
        .write_all(b"GET /os/demo/hello.img HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut freed = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let m = get(&c, &u("/metrics"), &[]).await.text().await.unwrap();
        if m.contains("kiln_downloads_active 0") {
            freed = true;
            break;
        }
    }
    assert!(freed, "slots not released after clients left or stalled");
    drop(stalled);

    // Still serving.
    assert_eq!(get(&c, &u("/healthz"), &[]).await.status(), 200);
    let (want, _) = fx.expected(&fx.pieces.join("hello.html"));
    let r = get(&c, &u("/os/demo/hello.img"), &[]).await;
    assert!(r.bytes().await.unwrap().as_ref() == want);
    drop(srv);

    // Without allow_private, an upstream on loopback is refused before any connection.
    let hits = up.hits("fine");
    let strict = upstream.replace("allow_private = true", "allow_private = false");
    let cfg = fx.config_with(&strict, "");
    let srv = KilnServer::start(&cfg);
    let r = get(&c, &format!("{}/os/demo/fine.img", srv.url), &[]).await;
    assert_eq!(r.status(), 502);
    assert!(r.text().await.unwrap().contains("non-public"));
    assert_eq!(up.hits("fine"), hits);
    drop(srv);

    // Per-IP rate limit.
    let cfg = fx.config_with("", "requests_per_second = 0.5\nburst = 3\n");
    let srv = KilnServer::start(&cfg);
    let mut limited = None;
    for _ in 0..6 {
        let r = get(&c, &format!("{}/api/catalog", srv.url), &[]).await;
        if r.status() == 429 {
            limited = Some(
                r.headers()[header::RETRY_AFTER]
                    .to_str()
                    .unwrap()
                    .to_string(),
            );
            break;
        }
    }
    let wait: u64 = limited
        .expect("no 429 after exceeding the burst")
        .parse()
        .unwrap();
    assert!((1..=2).contains(&wait), "Retry-After {wait}");
    assert_eq!(
        get(&c, &format!("{}/healthz", srv.url), &[]).await.status(),
        200
    );
    assert_eq!(fx.base_sha(), fx.base_sha_before);
}

#[test]
fn example_config_serves() {
    // The shipped example works as documented (with its demo base).
    let d = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let ex = d.path().join("examples");
    fs::create_dir_all(ex.join("pieces")).unwrap();
    fs::copy(root.join("examples/serve.toml"), ex.join("serve.toml")).unwrap();
    fs::copy(
        root.join("examples/pieces/hello.html"),
        ex.join("pieces/hello.html"),
    )
    .unwrap();
    let base = d.path().join("out/demo.img");
    fs::create_dir_all(base.parent().unwrap()).unwrap();
    common::write_raw_base(&base);
    let srv = KilnServer::start(&ex.join("serve.toml"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let r = reqwest::get(format!("{}/os/demo/hello.img", srv.url))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let cd = r.headers()[header::CONTENT_DISPOSITION]
            .to_str()
            .unwrap()
            .to_string();
        assert!(cd.contains("demo-hello.img"), "{cd}");
        let page = reqwest::get(format!("{}/", srv.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(page.contains("kiln demo image"));
    });
}

/// A base made by `kiln build` with an ext4 slot (in-image slot table, the build's chunk
/// sidecar): downloads equal `kiln inject` output, and the filesystem in a download passes
/// e2fsck and holds the piece.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn built_ext4_base_is_served_byte_identical() {
    kiln_testkit::require_tool("e2fsck");
    kiln_testkit::require_tool("debugfs");
    let mut fx = Fixture::new();
    let spec_dir = fx.dir.path().join("spec");
    fs::create_dir_all(spec_dir.join("src")).unwrap();
    fs::write(spec_dir.join("loading.html"), b"<p>loading</p>\n").unwrap();
    fs::write(
        spec_dir.join("kiln.toml"),
        r#"
[image]
name = "served"
version = "1"
seed = "00112233445566778899aabbccddeeff"
source_date_epoch = 1700000000

[[partition]]
type = "linux-generic"
label = "page"
fs = "ext4"
size = "4M"
slot = { name = "piece", path = "/index.html", capacity = "256K", default = "loading.html" }

[[partition]]
type = "linux-generic"
label = "data"
fs = "none"
size = "32M"
"#,
    )
    .unwrap();
    let out = spec_dir.join("out");
    let st = Command::new(kiln_bin())
        .args(["build", spec_dir.to_str().unwrap(), "-q", "-o"])
        .arg(&out)
        .arg("--source")
        .arg(spec_dir.join("src"))
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    // The built disk (and its chunk sidecar) replaces the fixture's raw-slot base.
    fs::copy(out.join("served_1.img"), &fx.base).unwrap();
    fs::copy(
        out.join("served_1.img.chunks"),
        fx.base.with_extension("img.chunks"),
    )
    .unwrap();
    fx.base_sha_before = fx.base_sha();
    let report: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("served.json")).unwrap()).unwrap();
    let part = &report["partitions"][0];
    let (off, size) = (
        part["offset"].as_u64().unwrap() as usize,
        part["size"].as_u64().unwrap() as usize,
    );
    // The slot partition is first in the spec (and the GPT) but laid out last, after the big
    // one, and the chunk table holds the SHA-256 midstate where the slot starts.
    let data = &report["partitions"][1];
    assert_eq!(data["label"], "data");
    assert!(data["offset"].as_u64().unwrap() < off as u64, "{report}");
    let disk_len = fs::metadata(&fx.base).unwrap().len();
    let tail = disk_len - off as u64;
    assert!(tail <= size as u64 + (1 << 20), "tail {tail}");
    let chunks = fs::read(fx.base.with_extension("img.chunks")).unwrap();
    assert_eq!(
        &chunks[8..12],
        &2u32.to_le_bytes(),
        "chunk table with midstates"
    );

    fs::write(fx.pieces.join("hello.html"), PIECE_SMALL).unwrap();
    let full: Vec<u8> = (0..256 * 1024).map(|i| b'a' + (i % 26) as u8).collect();
    fs::write(fx.pieces.join("full.html"), &full).unwrap();
    fs::write(fx.pieces.join("empty.html"), b"").unwrap();
    let cfg = fx.config("");
    let srv = KilnServer::start(&cfg);
    let c = reqwest::Client::new();
    for (piece, content) in [
        ("hello", PIECE_SMALL.as_bytes()),
        ("full", &full[..]),
        ("empty", b""),
    ] {
        let (want, digest) = fx.expected(&fx.pieces.join(format!("{piece}.html")));
        check_identity(&srv.url, "demo", piece, &want, &digest).await;
        let body = get(&c, &format!("{}/os/demo/{piece}.img", srv.url), &[])
            .await
            .bytes()
            .await
            .unwrap();
        let p = fx.dir.path().join(format!("{piece}.ext4"));
        fs::write(&p, &body[off..off + size]).unwrap();
        let fsck = Command::new("e2fsck").arg("-fn").arg(&p).output().unwrap();
        assert!(
            fsck.status.success(),
            "{piece}: {}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        let cat = Command::new("debugfs")
            .args(["-R", "cat /index.html"])
            .arg(&p)
            .output()
            .unwrap();
        assert!(cat.stdout == content, "{piece}: debugfs cat differs");
    }
    let cat: serde_json::Value = get(&c, &format!("{}/api/catalog", srv.url), &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(cat["images"][0]["slots"][0]["kind"], "ext4");
    // Each plain sha256 hashed the tail from the slot on, not the whole disk.
    let m = get(&c, &format!("{}/metrics", srv.url), &[])
        .await
        .text()
        .await
        .unwrap();
    let metric = |name: &str| -> u64 {
        m.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing: {m}"))
            .parse()
            .unwrap()
    };
    let (hashed, count) = (
        metric("kiln_sha256_hashed_bytes_total"),
        metric("kiln_sha256_total"),
    );
    assert_eq!(count, 3, "one sha256 per prepared piece");
    assert!(
        hashed > 0 && hashed <= count * tail,
        "hashed {hashed} bytes for {count} images; the tail is {tail} of {disk_len}"
    );
    assert_eq!(fx.base_sha(), fx.base_sha_before, "base modified");
}

/// The page and its assets: same-origin only under a strict CSP, cache policies for a CDN,
/// the no-JavaScript path (form → piece page with the sha256 and a link), probes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_assets_cache_policies_and_the_no_script_path() {
    let fx = Fixture::new();
    fs::write(fx.pieces.join("hello.html"), PIECE_SMALL).unwrap();
    let srv = KilnServer::start(&fx.config(""));
    let c = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let u = |p: &str| format!("{}{p}", srv.url);

    let r = get(&c, &u("/"), &[]).await;
    assert_eq!(r.status(), 200);
    let csp = r.headers()[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert_eq!(r.headers()[header::CACHE_CONTROL], "no-cache");
    let page = r.text().await.unwrap();
    assert!(
        !page.contains("<script>") && !page.contains("style="),
        "inline code in the page"
    );
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "absolute URLs in the page"
    );
    for (kind, ctype) in [(".css", "text/css"), (".js", "text/javascript")] {
        let at = page.find(kind).unwrap();
        let start = page[..at].rfind("/assets/").unwrap();
        let path = &page[start..at + kind.len()];
        let r = get(&c, &u(path), &[]).await;
        assert_eq!(r.status(), 200, "{path}");
        assert!(r.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with(ctype));
        assert_eq!(
            r.headers()[header::CACHE_CONTROL],
            "public, max-age=31536000, immutable"
        );
    }
    assert_eq!(get(&c, &u("/assets/page.css"), &[]).await.status(), 404);

    // Without JavaScript: the form's GET redirects to the piece's page.
    let r = get(&c, &u("/get?image=demo&piece=hello"), &[]).await;
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()[header::LOCATION], "/os/demo/hello");
    let r = get(&c, &u("/os/demo/hello"), &[]).await;
    assert_eq!(r.status(), 200);
    let html = r.text().await.unwrap();
    let (want, _) = fx.expected(&fx.pieces.join("hello.html"));
    assert!(html.contains(&hex::encode(Sha256::digest(&want))), "{html}");
    assert!(html.contains("href=\"/os/demo/hello.img\""), "{html}");
    assert!(
        html.contains("href=\"/os/demo/hello.img.sha256\""),
        "{html}"
    );
    for (q, status) in [
        ("/get?image=demo&piece=", 400),
        ("/get?image=demo&piece=..%2Fx", 400),
        ("/get?image=nope&piece=hello", 404),
        ("/os/demo/missing", 404),
    ] {
        let r = get(&c, &u(q), &[]).await;
        assert_eq!(r.status(), status, "{q}");
        assert!(r.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
        assert!(r.text().await.unwrap().contains("role=\"alert\""), "{q}");
    }

    // Errors and APIs are not cached; probes answer.
    let r = get(&c, &u("/os/demo/missing.img"), &[]).await;
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()[header::CACHE_CONTROL], "no-store");
    let r = get(&c, &u("/api/catalog"), &[]).await;
    assert_eq!(r.headers()[header::CACHE_CONTROL], "no-store");
    assert_eq!(get(&c, &u("/readyz"), &[]).await.status(), 200);
    assert_eq!(get(&c, &u("/healthz"), &[]).await.status(), 200);
}

/// SIGTERM with a drain delay: `/readyz` turns 503 while the listener still accepts, then the
/// listener closes, a download in flight still completes, and the process exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_readyz_off_then_lets_running_downloads_finish() {
    use futures::StreamExt;
    let fx = Fixture::new();
    fs::write(fx.pieces.join("hello.html"), PIECE_SMALL).unwrap();
    let cfg = fx.config_with("", "shutdown_delay = \"2s\"\nshutdown_grace = \"30s\"\n");
    let mut srv = KilnServer::start(&cfg);
    let fresh = || {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
    };
    let url = format!("{}/os/demo/hello.img", srv.url);
    let (want, _) = fx.expected(&fx.pieces.join("hello.html"));
    assert_eq!(
        get(&fresh(), &format!("{}/readyz", srv.url), &[])
            .await
            .status(),
        200
    );

    let r = get(&fresh(), &url, &[]).await;
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut got = body.next().await.unwrap().unwrap().to_vec();
    let t0 = std::time::Instant::now();
    srv.sigterm();
    let mut not_ready = false;
    while t0.elapsed() < Duration::from_millis(1500) {
        let r = get(&fresh(), &format!("{}/readyz", srv.url), &[]).await;
        if r.status() == 503 {
            not_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(not_ready, "/readyz still 200 after SIGTERM");
    assert_eq!(
        get(&fresh(), &format!("{}/healthz", srv.url), &[])
            .await
            .status(),
        200,
        "still accepting during the drain delay"
    );
    while TcpStream::connect(&srv.addr).is_ok() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "listener never closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(1900),
        "closed after {:?}, before the 2 s delay",
        t0.elapsed()
    );
    while let Some(b) = body.next().await {
        got.extend_from_slice(&b.unwrap());
    }
    assert!(got == want, "the download in flight was cut or differs");
    let st = srv
        .wait_exit(Duration::from_secs(10))
        .expect("no exit after the last download");
    assert!(st.success(), "{st}");
}
