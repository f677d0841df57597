//! Servers and tools the release-engineering tests run against, all on loopback and started
//! by the test itself: the CNCF distribution registry (`docker-registry`), `s3s-fs`, and a
//! cutting proxy for interrupted downloads. A missing tool fails the test loudly: CI installs
//! every one of them.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The kiln binary under test.
pub fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

/// Runs a command, returning its output; panics if it cannot start (missing tool).
pub fn run(cmd: &mut Command) -> Output {
    let prog = format!("{:?}", cmd.get_program());
    match cmd.output() {
        Ok(o) => o,
        Err(e) => panic!("cannot run {prog}: {e} (CI installs it; see .ci/run)"),
    }
}

/// Runs a command that must succeed; returns stdout.
pub fn ok(cmd: &mut Command) -> String {
    let desc = format!("{cmd:?}");
    let o = run(cmd);
    assert!(
        o.status.success(),
        "{desc} failed: {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Finds `name` on PATH (or in ~/.cargo/bin), panicking with a clear message if absent.
pub fn tool(name: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(h) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(h).join(".cargo/bin"));
    }
    for d in dirs {
        let p = d.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("required tool {name:?} not found on PATH (CI installs it; see .ci/run)");
}

pub use kiln_testkit::free_port;

fn wait_http(port: u16, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
            );
            if s.write_all(req.as_bytes()).is_ok() {
                let mut b = [0u8; 12];
                if s.read_exact(&mut b).is_ok() && b.starts_with(b"HTTP/1.") {
                    return;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("server on port {port} did not come up");
}

/// A child process killed on drop.
pub struct Server {
    child: Child,
    pub port: u16,
    pub root: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// Starts the distribution registry with filesystem storage on a free loopback port.
pub fn registry() -> Server {
    registry_with_auth(None)
}

/// Starts the registry, with htpasswd (Basic) authentication when `auth` = (user, password).
pub fn registry_with_auth(auth: Option<(&str, &str)>) -> Server {
    let bin = tool("docker-registry");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("storage");
    let port = free_port();
    let cfg = dir.path().join("cfg.yml");
    let mut text = format!(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
        root.display()
    );
    if let Some((user, password)) = auth {
        let line = ok(Command::new(tool("htpasswd")).args(["-Bbn", user, password]));
        let htpasswd = dir.path().join("htpasswd");
        std::fs::write(&htpasswd, line.trim()).unwrap();
        text.push_str(&format!(
            "auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
            htpasswd.display()
        ));
    }
    std::fs::write(&cfg, text).unwrap();
    let child = Command::new(bin)
        .arg("serve")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start docker-registry");
    wait_http(port, "/v2/");
    Server {
        child,
        port,
        root,
        _dir: dir,
    }
}

/// The on-disk file of a blob in the registry's filesystem storage.
pub fn registry_blob_path(reg: &Server, hex: &str) -> PathBuf {
    reg.root.join(format!(
        "docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ))
}

pub const S3_AK: &str = "kilnaccess";
pub const S3_SK: &str = "kiln-secret-Zq9X7rT2";

/// Starts s3s-fs on a free loopback port, with bucket `kiln` created.
pub fn s3() -> Server {
    let bin = tool("s3s-fs");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("fs");
    std::fs::create_dir_all(root.join("kiln")).unwrap();
    let port = free_port();
    let child = Command::new(bin)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--access-key",
            S3_AK,
            "--secret-key",
            S3_SK,
        ])
        .arg(&root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start s3s-fs");
    wait_http(port, "/");
    Server {
        child,
        port,
        root,
        _dir: dir,
    }
}

/// Environment for kiln talking to `s3`.
pub fn s3_env<'a>(cmd: &'a mut Command, s3: &Server) -> &'a mut Command {
    cmd.env("AWS_ACCESS_KEY_ID", S3_AK)
        .env("AWS_SECRET_ACCESS_KEY", S3_SK)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT", format!("http://127.0.0.1:{}", s3.port))
}

/// Runs a Python snippet using the `oras` package (oras-py).
pub fn oras_py(script: &str) -> String {
    ok(Command::new(tool("python3")).arg("-c").arg(script))
}

/// Deterministic pseudo-random bytes.
pub fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// What the cutting proxy saw.
#[derive(Default)]
pub struct ProxyLog {
    /// Request lines and Range headers, in order.
    pub requests: Vec<String>,
}

/// A one-request-per-connection HTTP proxy to `upstream` that, for the first `cuts` blob
/// GETs, forwards only the response head and `keep` body bytes, then drops the connection.
pub struct CuttingProxy {
    pub port: u16,
    pub log: Arc<Mutex<ProxyLog>>,
    stop: Arc<AtomicU64>,
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.stop.store(1, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

pub fn cutting_proxy(upstream: u16, cuts: u64, keep: usize) -> CuttingProxy {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let log = Arc::new(Mutex::new(ProxyLog::default()));
    let stop = Arc::new(AtomicU64::new(0));
    let cuts_left = Arc::new(AtomicU64::new(cuts));
    let (log2, stop2) = (log.clone(), stop.clone());
    std::thread::spawn(move || {
        for conn in l.incoming() {
            if stop2.load(Ordering::SeqCst) != 0 {
                break;
            }
            let Ok(mut c) = conn else { continue };
            let log = log2.clone();
            let cuts_left = cuts_left.clone();
            std::thread::spawn(move || {
                let _ = c.set_read_timeout(Some(Duration::from_secs(20)));
                // Read the request head (GET/HEAD have no body).
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match c.read(&mut b) {
                        Ok(1) => head.push(b[0]),
                        _ => return,
                    }
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let first = text.lines().next().unwrap_or("").to_string();
                let range = text
                    .lines()
                    .find(|l| l.to_ascii_lowercase().starts_with("range:"))
                    .map(|l| l.to_string());
                log.lock().unwrap().requests.push(match &range {
                    Some(r) => format!("{first} | {r}"),
                    None => first.clone(),
                });
                // Force one request per connection so the relay ends at upstream EOF.
                let mut fwd = String::new();
                for line in text.split("\r\n") {
                    if line.is_empty() || line.to_ascii_lowercase().starts_with("connection:") {
                        continue;
                    }
                    fwd.push_str(line);
                    fwd.push_str("\r\n");
                }
                fwd.push_str("Connection: close\r\n\r\n");
                let Ok(mut u) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    return;
                };
                if u.write_all(fwd.as_bytes()).is_err() {
                    return;
                }
                let cut = first.starts_with("GET ") && first.contains("/blobs/sha256:") && {
                    let left = cuts_left.load(Ordering::SeqCst);
                    left > 0
                        && cuts_left
                            .compare_exchange(left, left - 1, Ordering::SeqCst, Ordering::SeqCst)
                            .is_ok()
                };
                let mut resp = Vec::new();
                let mut buf = [0u8; 16384];
                loop {
                    let n = match u.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    resp.extend_from_slice(&buf[..n]);
                    if cut {
                        if let Some(h) = resp.windows(4).position(|w| w == b"\r\n\r\n") {
                            let limit = h + 4 + keep;
                            if resp.len() >= limit {
                                let _ = c.write_all(&resp[..limit]);
                                let _ = c.shutdown(std::net::Shutdown::Both);
                                return;
                            }
                        }
                        continue;
                    }
                    if c.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
                if cut {
                    let _ = c.write_all(&resp);
                }
            });
        }
    });
    CuttingProxy { port, log, stop }
}

/// sha256 hex of a file.
pub fn sha256(p: &Path) -> String {
    kiln_ship::digest::sha256_file(p).unwrap().0
}
