//! `kiln serve` scaled out: two replicas behind nginx on loopback, sharing an S3-compatible
//! store (s3s-fs) for the base, the uploads and the prepared-payload records.
//!
//! - An upload through one replica downloads byte-identical through the other.
//! - During 50 concurrent downloads through nginx, SIGTERM to one replica loses no download:
//!   downloads it is serving finish within its grace period, new requests go to the other
//!   replica, and clients it cuts off at the end of the grace period resume with Range (and
//!   If-Range with the shared ETag) and finish; every body is byte-identical to `kiln inject`'s
//!   output. The replica exits cleanly.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use reqwest::header;
use sha2::{Digest, Sha256};
use tokio::sync::Barrier;

const PAGE: &[u8] = b"<!doctype html><title>shared</title><p>uploaded to one replica</p>\n";
const CLIENTS: usize = 50;
const GRACE_S: u64 = 8;

/// A replica's config. With `env_store`, the store's endpoint and credentials are left to the
/// AWS_* environment (as in examples/deploy), else they are in the config.
fn replica_config(fx: &Fixture, s3: &S3Server, name: &str, env_store: bool) -> std::path::PathBuf {
    let store = if env_store {
        String::new()
    } else {
        format!(
            "endpoint = \"{}\"\nregion = \"us-east-1\"\naccess_key_id = \"AKTEST\"\n\
             secret_access_key = \"SKTEST-secret\"\nallow_http = \"true\"\n",
            s3.url
        )
    };
    let text = format!(
        "listen = \"127.0.0.1:0\"\nuploads = \"s3://kiln/uploads\"\n[store]\n{store}\n\
         [limits]\nrequests_per_second = 10000\nburst = 10000\ndownloads_per_ip = 1000\n\
         downloads_total = 1000\nwrite_timeout = \"60s\"\nshutdown_grace = \"{GRACE_S}s\"\n\
         [[image]]\nname = \"demo\"\nbase = \"s3://kiln/base.img\"\nslot = \"piece\"\n\
         [image.store]\n{store}\n\
         [[source]]\nkind = \"dir\"\npath = \"{}\"\nextension = \".html\"\n",
        fx.pieces.display()
    );
    let p = fx.dir.path().join(format!("{name}.toml"));
    fs::write(&p, text).unwrap();
    p
}

/// How a client reads its download.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Pace {
    /// Everything at once, before the SIGTERM.
    Fast,
    /// A first piece, then waits for the SIGTERM, then the rest at once (inside the grace).
    AfterSignal,
    /// Reads nothing until the grace period is over (cut off on the stopping replica: the
    /// socket buffers on the way hold far less than the image), then everything.
    Stall,
}

#[derive(Debug, Default)]
struct Outcome {
    sha256: String,
    /// Replica (`$upstream_addr`) of each response, first one first.
    upstreams: Vec<String>,
    statuses: Vec<u16>,
    etags: Vec<String>,
    done_at: Option<Instant>,
}

struct Timeline {
    start_barrier: Barrier,
    signal: tokio::sync::watch::Receiver<Option<Instant>>,
}

/// The replica that answered: nginx lists every upstream it tried, the last one answered.
fn served_by(h: &header::HeaderMap) -> String {
    h.get("x-upstream")
        .map(|v| v.to_str().unwrap())
        .unwrap_or_default()
        .rsplit(", ")
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Downloads `url` at `pace`, resuming with Range + If-Range after a cut.
async fn client(url: String, pace: Pace, len: u64, tl: Arc<Timeline>) -> Outcome {
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut out = Outcome::default();
    let mut h = Sha256::new();
    let mut got = 0u64;
    let mut first = true;
    let mut signal = tl.signal.clone();
    for attempt in 0..5 {
        let mut req = c.get(&url);
        if got > 0 {
            req = req
                .header(header::RANGE, format!("bytes={got}-"))
                .header(header::IF_RANGE, out.etags[0].clone());
        }
        let r = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("attempt {attempt}: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        out.statuses.push(r.status().as_u16());
        out.upstreams.push(served_by(r.headers()));
        out.etags.push(
            r.headers()
                .get(header::ETAG)
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default(),
        );
        assert!(
            (got == 0 && r.status() == 200) || (got > 0 && r.status() == 206),
            "attempt {attempt} at byte {got}: {}",
            r.status()
        );
        let mut body = r.bytes_stream();
        if first {
            first = false;
            tl.start_barrier.wait().await;
        }
        if pace == Pace::Stall && got == 0 {
            loop {
                let s = *signal.borrow_and_update();
                if s.is_some_and(|t| t.elapsed() > Duration::from_secs(GRACE_S + 2)) {
                    break;
                }
                match s {
                    None => signal.changed().await.unwrap(),
                    Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
        let mut cut = false;
        while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else {
                cut = true;
                break;
            };
            h.update(&chunk);
            got += chunk.len() as u64;
            let signalled = *signal.borrow_and_update();
            match (pace, signalled) {
                (Pace::Fast, _) => {}
                (Pace::AfterSignal, None) if got >= 1 << 20 => {
                    // Hold the response open until the replica is told to stop.
                    while signal.borrow_and_update().is_none() {
                        signal.changed().await.unwrap();
                    }
                }
                (Pace::AfterSignal, _) => {}
                (Pace::Stall, _) => {}
            }
        }
        if got == len && !cut {
            out.done_at = Some(Instant::now());
            out.sha256 = hex::encode(h.finalize());
            return out;
        }
        // Cut off (early end of body or a connection error): resume where it stopped.
    }
    panic!("download of {url} did not finish: {out:?}, {got} of {len} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_uploads_and_survive_a_sigterm_during_50_downloads() {
    let fx = Fixture::new();
    let s3 = S3Server::start(fx.dir.path(), &fx.base);
    let ca = replica_config(&fx, &s3, "a", true);
    let cb = replica_config(&fx, &s3, "b", false);
    let mut a = KilnServer::start_with_env(
        &ca,
        &[
            ("AWS_ENDPOINT_URL", &s3.url),
            ("AWS_ACCESS_KEY_ID", "AKTEST"),
            ("AWS_SECRET_ACCESS_KEY", "SKTEST-secret"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ALLOW_HTTP", "true"),
        ],
    );
    let b = KilnServer::start(&cb);
    let nginx = Nginx::start(
        fx.dir.path(),
        &format!(
            "  upstream kiln {{ server {}; server {}; }}\n\
             server {{\n  listen 127.0.0.1:{{PORT}} sndbuf=64k;\n  location / {{\n\
             proxy_pass http://kiln;\n  proxy_buffering off;\n  proxy_http_version 1.1;\n\
             proxy_set_header Connection \"\";\n  proxy_next_upstream error timeout;\n\
             add_header X-Upstream $upstream_addr always;\n  }}\n}}\n",
            a.addr, b.addr
        ),
    );
    let c = reqwest::Client::new();

    // An upload through replica A is downloadable, byte-identical, through replica B.
    let r = c
        .post(format!("{}/os/demo", a.url))
        .header("content-type", "text/html")
        .body(PAGE.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let page = fx.dir.path().join("page.html");
    fs::write(&page, PAGE).unwrap();
    let (want, _) = fx.expected(&page);
    let want_sha = hex::encode(Sha256::digest(&want));
    let from_b = c
        .get(format!("{}/os/demo/{id}.img", b.url))
        .send()
        .await
        .unwrap();
    assert_eq!(from_b.status(), 200);
    let repr = from_b.headers()["repr-digest"]
        .to_str()
        .unwrap()
        .to_string();
    let etag_b = from_b.headers()[header::ETAG].to_str().unwrap().to_string();
    assert!(
        from_b.bytes().await.unwrap().as_ref() == want,
        "replica B's download differs from kiln inject"
    );
    let from_a = c
        .head(format!("{}/os/demo/{id}.img", a.url))
        .send()
        .await
        .unwrap();
    assert_eq!(from_a.headers()[header::ETAG], etag_b.as_str(), "same ETag");
    assert_eq!(from_a.headers()["repr-digest"], repr.as_str());
    // Both replicas' checksum files agree with the bytes.
    for srv in [&a.url, &b.url] {
        let line = c
            .get(format!("{srv}/os/demo/{id}.img.sha256"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(line.starts_with(&format!("{want_sha}  ")), "{srv}: {line}");
    }
    // The upload lives in the shared store, not on a replica's disk.
    let key = fx.dir.path().join(format!("s3root/kiln/uploads/{id}"));
    assert_eq!(fs::read(&key).unwrap(), PAGE);
    // A named piece prepared on B is recorded once and served from the record by A.
    fs::write(fx.pieces.join("named.html"), b"<p>named, version 1</p>").unwrap();
    let named_b = c
        .get(format!("{}/os/demo/named.img.sha256", b.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    fs::write(
        fx.pieces.join("named.html"),
        b"<p>named, version 2 (changed)</p>",
    )
    .unwrap();
    let named_a = c
        .get(format!("{}/os/demo/named.img.sha256", a.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        named_a, named_b,
        "replicas agree on a piece within its cache_ttl"
    );
    assert!(Path::new(
        &fx.dir
            .path()
            .join("s3root/kiln/uploads/prepared/demo/named.json")
    )
    .exists());

    // 50 concurrent downloads through nginx; SIGTERM to A while they run.
    let url = format!("{}/os/demo/{id}.img", nginx.url);
    let len = want.len() as u64;
    let (tx, rx) = tokio::sync::watch::channel(None);
    let tl = Arc::new(Timeline {
        start_barrier: Barrier::new(CLIENTS + 1),
        signal: rx,
    });
    let paces = [Pace::Fast, Pace::AfterSignal, Pace::Stall];
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|i| tokio::spawn(client(url.clone(), paces[i % 3], len, tl.clone())))
        .collect();
    // Every response has started, so each client is attached to a replica; the fast ones
    // complete before the signal.
    tl.start_barrier.wait().await;
    let mut outcomes = Vec::new();
    let mut pending = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        if paces[i % 3] == Pace::Fast {
            outcomes.push((Pace::Fast, t.await.unwrap()));
        } else {
            pending.push((paces[i % 3], t));
        }
    }
    let signalled = Instant::now();
    a.sigterm();
    tx.send(Some(signalled)).unwrap();
    let a_addr = a.addr.clone();
    let a_exit = tokio::task::spawn_blocking(move || {
        let st = a.wait_exit(Duration::from_secs(GRACE_S + 15));
        (st, signalled.elapsed(), a)
    });
    // A closes its listening socket at once; new requests then go to B.
    let t0 = Instant::now();
    while std::net::TcpStream::connect(&a_addr).is_ok() {
        assert!(t0.elapsed() < Duration::from_secs(5), "A still accepts");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        served_by(r.headers()),
        b.addr,
        "a new request after SIGTERM reached the stopping replica"
    );
    assert!(r.bytes().await.unwrap().as_ref() == want);
    for (pace, t) in pending {
        outcomes.push((pace, t.await.unwrap()));
    }
    let (status, exited, a) = a_exit.await.unwrap();
    let status = status.expect("replica A did not exit after SIGTERM");
    assert!(status.success(), "replica A exited with {status}");

    for (i, (pace, o)) in outcomes.iter().enumerate() {
        assert_eq!(o.sha256, want_sha, "client {i} ({pace:?}): {o:?}");
        assert!(
            o.etags.iter().all(|e| *e == etag_b),
            "client {i}: ETags differ across replicas: {o:?}"
        );
    }
    let on_a = |o: &Outcome| o.upstreams[0] == a.addr;
    assert!(
        outcomes.iter().any(|(p, o)| *p == Pace::Fast && on_a(o)),
        "nginx sent no download to A"
    );
    let after_signal_on_a: Vec<_> = outcomes
        .iter()
        .filter(|(p, o)| *p == Pace::AfterSignal && on_a(o))
        .collect();
    assert!(
        !after_signal_on_a.is_empty(),
        "no download held open across the SIGTERM was on replica A"
    );
    for (_, o) in &after_signal_on_a {
        assert_eq!(
            o.statuses.len(),
            1,
            "a download replica A was serving did not finish in its grace period: {o:?}"
        );
        assert!(o.done_at.unwrap() > signalled);
    }
    let stall_on_a: Vec<_> = outcomes
        .iter()
        .filter(|(p, o)| *p == Pace::Stall && on_a(o))
        .collect();
    assert!(
        !stall_on_a.is_empty(),
        "no stalled download was on replica A"
    );
    for (_, o) in &stall_on_a {
        assert!(
            o.statuses.len() >= 2 && o.statuses[1..].iter().all(|s| *s == 206),
            "a cut-off download did not resume with a 206: {o:?}"
        );
        assert!(
            o.upstreams[1..].iter().all(|u| *u == b.addr),
            "resumed from the stopped replica: {o:?}"
        );
        assert!(o.done_at.unwrap() > signalled + Duration::from_secs(GRACE_S));
    }
    eprintln!(
        "SIGTERM: {} downloads held across it on A finished in the grace period, {} cut at \
         its end resumed on B; A exited after {exited:?}",
        after_signal_on_a.len(),
        stall_on_a.len()
    );
    // It exits when its last download is done or cut: at the end of the grace period here.
    assert!(
        exited < Duration::from_secs(GRACE_S + 3),
        "A took {exited:?} to exit"
    );
    drop(a);
    drop(nginx);
    drop(b);
    drop(s3);
}
