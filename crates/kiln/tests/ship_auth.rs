//! Registry authentication: Basic against the distribution registry with htpasswd, credentials
//! from the environment and from a docker config file, and the Bearer token flow (challenge,
//! token endpoint with Basic credentials, retry with the token) against a small scripted
//! registry, since running the distribution registry's token auth needs a signing CA.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod ship_support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use ship_support::*;

const USER: &str = "kiln";
const PASS: &str = "Pw-9f3kQ-never-printed";

#[test]
fn basic_auth_from_env_and_docker_config() {
    let reg = registry_with_auth(Some((USER, PASS)));
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("a.txt");
    std::fs::write(&f, b"authenticated bytes").unwrap();
    let target = format!("oci://{}/kiln/auth:1", reg.addr());
    let empty_cfg = t.path().join("nodocker");
    std::fs::create_dir_all(&empty_cfg).unwrap();

    // No credentials: a clear refusal.
    let o = run(kiln()
        .env("DOCKER_CONFIG", &empty_cfg)
        .env_remove("KILN_REGISTRY_USERNAME")
        .arg("push")
        .arg(&f)
        .arg(&target));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("wants credentials") && err.contains("KILN_REGISTRY_USERNAME"),
        "{err}"
    );

    // Wrong password: refused, and neither password is echoed.
    let o = run(kiln()
        .env("DOCKER_CONFIG", &empty_cfg)
        .env("KILN_REGISTRY_USERNAME", USER)
        .env("KILN_REGISTRY_PASSWORD", "wrong-Pw-123456")
        .arg("push")
        .arg(&f)
        .arg(&target));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("unauthorized"), "{err}");
    assert!(
        !err.contains("wrong-Pw-123456") && !err.contains(PASS),
        "{err}"
    );

    // Right credentials from the environment.
    ok(kiln()
        .env("DOCKER_CONFIG", &empty_cfg)
        .env("KILN_REGISTRY_USERNAME", USER)
        .env("KILN_REGISTRY_PASSWORD", PASS)
        .arg("push")
        .arg(&f)
        .arg(&target));

    // Credentials from a docker config file (`auths.<host>.auth` = base64 user:password).
    let cfg_dir = t.path().join("docker");
    std::fs::create_dir_all(&cfg_dir).unwrap();
    let auth = base64_std(format!("{USER}:{PASS}").as_bytes());
    std::fs::write(
        cfg_dir.join("config.json"),
        format!(
            "{{\"auths\":{{\"{}\":{{\"auth\":\"{auth}\"}}}}}}",
            reg.addr()
        ),
    )
    .unwrap();
    let out = t.path().join("pulled");
    let o = run(kiln()
        .env("DOCKER_CONFIG", &cfg_dir)
        .env_remove("KILN_REGISTRY_USERNAME")
        .arg("pull")
        .arg(&target)
        .arg("-o")
        .arg(&out));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(out.join("a.txt")).unwrap(),
        b"authenticated bytes"
    );
}

fn base64_std(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut o = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                o.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                o.push('=');
            }
        }
    }
    o
}

/// A scripted registry serving one artifact behind a Bearer token, and its token endpoint.
fn token_registry(blob: &'static [u8]) -> (u16, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let log = Arc::new(Mutex::new(Vec::new()));
    let log2 = log.clone();
    let blob_digest = format!(
        "sha256:{}",
        kiln_ship::digest::sha256_reader(blob).unwrap().0
    );
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": kiln_ship::oci::MT_MANIFEST,
        "artifactType": "application/vnd.test",
        "config": {"mediaType": kiln_ship::oci::MT_EMPTY, "digest": kiln_ship::oci::EMPTY_DIGEST, "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": blob_digest, "size": blob.len(),
                    "annotations": {"org.opencontainers.image.title": "tok.bin"}}],
    }))
    .unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                match c.read(&mut b) {
                    Ok(1) => head.push(b[0]),
                    _ => break,
                }
            }
            let text = String::from_utf8_lossy(&head).into_owned();
            let line = text.lines().next().unwrap_or("").to_string();
            let path = line.split(' ').nth(1).unwrap_or("").to_string();
            let authz = text
                .lines()
                .find(|l| l.to_ascii_lowercase().starts_with("authorization:"))
                .map(|l| l[14..].trim().to_string())
                .unwrap_or_default();
            log2.lock().unwrap().push(format!("{line} | {authz}"));
            let (status, ctype, body): (&str, &str, Vec<u8>) = if path.starts_with("/token?") {
                let want = format!("Basic {}", base64_std(format!("{USER}:{PASS}").as_bytes()));
                if authz == want
                    && path.contains("scope=repository%3Asecret%2Frepo%3Apull")
                    && path.contains("service=fake")
                {
                    (
                        "200 OK",
                        "application/json",
                        b"{\"token\":\"tok-123\"}".to_vec(),
                    )
                } else {
                    (
                        "401 Unauthorized",
                        "text/plain",
                        b"bad token request".to_vec(),
                    )
                }
            } else if authz != "Bearer tok-123" {
                ("401 Unauthorized", "text/plain", Vec::new())
            } else if path == "/v2/secret/repo/manifests/v1" {
                ("200 OK", kiln_ship::oci::MT_MANIFEST, manifest.clone())
            } else if path == format!("/v2/secret/repo/blobs/{blob_digest}") {
                ("200 OK", "application/octet-stream", blob.to_vec())
            } else {
                ("404 Not Found", "text/plain", Vec::new())
            };
            let mut resp = format!("HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
            if status.starts_with("401") && !path.starts_with("/token") {
                resp.push_str(&format!("WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"fake\"\r\n"));
            }
            resp.push_str("\r\n");
            let _ = c.write_all(resp.as_bytes());
            let _ = c.write_all(&body);
        }
    });
    (port, log)
}

#[test]
fn bearer_token_flow() {
    let (port, log) = token_registry(b"bytes behind a token");
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("o");
    let o = run(kiln()
        .env("DOCKER_CONFIG", t.path())
        .env("KILN_REGISTRY_USERNAME", USER)
        .env("KILN_REGISTRY_PASSWORD", PASS)
        .arg("pull")
        .arg(format!("oci://127.0.0.1:{port}/secret/repo:v1"))
        .arg("-o")
        .arg(&out));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}\n{:#?}", log.lock().unwrap());
    assert_eq!(
        std::fs::read(out.join("tok.bin")).unwrap(),
        b"bytes behind a token"
    );
    let log = log.lock().unwrap().clone();
    // Challenge, then the token request with Basic credentials, then the retry with the token.
    assert!(
        log[0].starts_with("GET /v2/secret/repo/manifests/v1") && log[0].ends_with("| "),
        "{log:#?}"
    );
    assert!(log[1].starts_with("GET /token?"), "{log:#?}");
    assert!(log[2].ends_with("| Bearer tok-123"), "{log:#?}");
    assert!(!err.contains(PASS) && !err.contains("tok-123"), "{err}");

    // Without credentials the token endpoint refuses, and kiln says so.
    let o = run(kiln()
        .env("DOCKER_CONFIG", t.path())
        .env_remove("KILN_REGISTRY_USERNAME")
        .arg("pull")
        .arg(format!("oci://127.0.0.1:{port}/secret/repo:v1"))
        .arg("-o")
        .arg(t.path().join("p")));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("token endpoint answered 401"));
}
