//! Shared fixtures for the CLI tests: running kiln, a raw-slot base image, `kiln serve` and `s3s-fs`
//! processes on loopback, a misbehaving upstream, minisign keys.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_inject::slots::{ByteRange, PayloadInfo, RawMeta, SizeField, Slot, SlotMeta, SlotTable};
use sha2::{Digest, Sha256};

pub const IMAGE_LEN: u64 = 20 << 20;
pub const DATA: u64 = 9 << 20;
pub const CAPACITY: u64 = 300_000;
pub const UPSTREAM_FINE: &str = "<!doctype html><title>from upstream</title><p>fine</p>\n";

pub fn kiln_bin() -> &'static str {
    env!("CARGO_BIN_EXE_kiln")
}

/// Runs the kiln binary with `args`.
pub fn kiln(args: &[&str]) -> Output {
    Command::new(kiln_bin())
        .args(args)
        .output()
        .expect("run kiln")
}

/// Runs kiln and asserts it succeeded.
pub fn ok(args: &[&str]) -> Output {
    let o = kiln(args);
    assert!(
        o.status.success(),
        "kiln {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Hex SHA-256 of a file.
pub fn sha(p: &Path) -> String {
    hex::encode(Sha256::digest(fs::read(p).unwrap()))
}

/// The sorted names in a directory (to show a failed run left no file behind).
pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A path as a `&str` argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Writes a base of `len` bytes (deterministic filler) with one raw slot "piece" of
/// `capacity` bytes at `data` (size field at data - 8) and the table at 24576.
pub fn write_base(path: &Path, len: u64, data: u64, capacity: u64) {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut bytes = vec![0u8; len as usize];
    for c in bytes.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    let reserved = capacity.div_ceil(4096) * 4096;
    bytes[data as usize - 8..data as usize - 4].copy_from_slice(&7u32.to_le_bytes());
    bytes[data as usize..(data + reserved) as usize].fill(0);
    bytes[data as usize..data as usize + 7].copy_from_slice(b"loading");
    fs::write(path, &bytes).unwrap();
    let t = SlotTable {
        image_len: len,
        slots: vec![Slot {
            name: "piece".into(),
            path: String::new(),
            capacity,
            data: vec![ByteRange {
                offset: data,
                len: reserved,
            }],
            meta: SlotMeta::Raw(RawMeta {
                size_fields: vec![SizeField {
                    offset: data - 8,
                    width: 4,
                }],
            }),
            default: PayloadInfo::of(b"loading"),
        }],
    };
    let f = fs::File::options().write(true).open(path).unwrap();
    t.write_into(&f, "base").unwrap();
}

/// The example config's demo base: 16 MiB, an 8 MiB slot at 1 MiB.
pub fn write_raw_base(path: &Path) {
    write_base(path, 16 << 20, 1 << 20, 8 << 20);
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub base: PathBuf,
    pub pieces: PathBuf,
    pub base_sha_before: String,
    n: std::cell::Cell<u32>,
}

impl Fixture {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        write_base(&base, IMAGE_LEN, DATA, CAPACITY);
        let pieces = dir.path().join("pieces");
        fs::create_dir(&pieces).unwrap();
        let base_sha_before = hex::encode(Sha256::digest(fs::read(&base).unwrap()));
        Self {
            dir,
            base,
            pieces,
            base_sha_before,
            n: 0.into(),
        }
    }

    pub fn base_sha(&self) -> String {
        hex::encode(Sha256::digest(fs::read(&self.base).unwrap()))
    }

    /// `kiln inject` output for a payload file, and its chunked digest from `kiln verify`.
    pub fn expected(&self, payload: &Path) -> (Vec<u8>, String) {
        let n = self.n.get() + 1;
        self.n.set(n);
        let out = self.dir.path().join(format!("expected-{n}.img"));
        let st = Command::new(kiln_bin())
            .args(["inject", self.base.to_str().unwrap(), "--slot"])
            .arg(format!("piece={}", payload.display()))
            .arg("-o")
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        let v = Command::new(kiln_bin())
            .args(["verify", out.to_str().unwrap(), "--print", "--json"])
            .output()
            .unwrap();
        assert!(v.status.success());
        let j: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap();
        let bytes = fs::read(&out).unwrap();
        fs::remove_file(&out).unwrap();
        (bytes, j["chunked_digest"].as_str().unwrap().to_string())
    }

    fn write_config(
        &self,
        limits_extra: &str,
        tables: &str,
        image: &str,
        sources_extra: &str,
    ) -> PathBuf {
        let n = self.n.get() + 1;
        self.n.set(n);
        let mut limits = String::new();
        for (k, v) in [
            ("requests_per_second", "1000"),
            ("burst", "1000"),
            ("downloads_per_ip", "100"),
            ("write_timeout", "\"10s\""),
            ("cache_ttl", "\"1h\""),
        ] {
            if !limits_extra.lines().any(|l| l.trim_start().starts_with(k)) {
                limits.push_str(&format!("{k} = {v}\n"));
            }
        }
        limits.push_str(limits_extra);
        let text = format!(
            "listen = \"127.0.0.1:0\"\nuploads = \"{up}\"\n[limits]\n{limits}\n{tables}\n{image}\n\
             [[source]]\nkind = \"dir\"\npath = \"{pieces}\"\nextension = \".html\"\n{sources_extra}",
            up = self.dir.path().join("uploads").display(),
            pieces = self.pieces.display(),
        );
        let p = self.dir.path().join(format!("serve-{n}.toml"));
        fs::write(&p, text).unwrap();
        p
    }

    fn local_image(&self) -> String {
        format!(
            "[[image]]\nname = \"demo\"\nbase = \"{}\"\nslot = \"piece\"\n",
            self.base.display()
        )
    }

    /// Config with extra top-level tables (e.g. `[signing]`).
    pub fn config(&self, tables: &str) -> PathBuf {
        self.write_config("", tables, &self.local_image(), "")
    }

    /// Config with extra sources and limits.
    pub fn config_with(&self, sources: &str, limits: &str) -> PathBuf {
        self.write_config(limits, "", &self.local_image(), sources)
    }

    /// Config with another image block.
    pub fn config_with_image(&self, image: &str, limits: &str) -> PathBuf {
        self.write_config(limits, "", image, "")
    }
}

fn wait_line(child: &mut Child, what: &str) -> String {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(out);
        let mut line = String::new();
        let _ = r.read_line(&mut line);
        let _ = tx.send(line);
        // Keep draining so the child never blocks on a full pipe.
        let mut sink = Vec::new();
        let _ = r.read_to_end(&mut sink);
    });
    rx.recv_timeout(Duration::from_secs(120))
        .unwrap_or_else(|_| panic!("{what} did not start"))
}

/// A `kiln serve` child process.
pub struct KilnServer {
    child: Child,
    pub url: String,
    pub addr: String,
}

impl KilnServer {
    pub fn start(config: &Path) -> Self {
        Self::start_with_env(config, &[])
    }

    /// Starts a server with extra environment variables (e.g. AWS_* for the object store).
    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Self {
        let log = config.with_extension("log");
        let mut child = Command::new(kiln_bin())
            .envs(env.iter().copied())
            .args([
                "serve",
                "--config",
                config.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
            ])
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let line = wait_line(&mut child, "kiln serve");
        let Some(url) = line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            panic!(
                "kiln serve failed: {line:?}\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        };
        let addr = url.trim_start_matches("http://").to_string();
        Self {
            child,
            url: url.to_string(),
            addr,
        }
    }
}

impl KilnServer {
    /// Sends SIGTERM (graceful shutdown) to this server.
    pub fn sigterm(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) with the pid of a child this test started; no memory is passed.
        assert_eq!(
            unsafe { libc::kill(pid, libc::SIGTERM) },
            0,
            "kill -TERM {pid}"
        );
    }

    /// Waits up to `limit` for the process to exit; its status, or `None` if still running.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            if t.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's log (stderr).
    pub fn log(&self, config: &Path) -> String {
        fs::read_to_string(config.with_extension("log")).unwrap_or_default()
    }
}

impl Drop for KilnServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nginx on loopback with `http_body` inside its `http { }` block (a reverse proxy or a file
/// server); `{PORT}` in it is replaced by the port it listens on.
pub struct Nginx {
    child: Child,
    pub url: String,
}

impl Nginx {
    pub fn start(dir: &Path, http_body: &str) -> Self {
        let nginx = kiln_testkit::require_tool("nginx");
        let port = free_port();
        let root = dir.join("nginx");
        fs::create_dir_all(root.join("tmp")).unwrap();
        let conf = root.join("nginx.conf");
        let t = root.join("tmp");
        fs::write(
            &conf,
            format!(
                "user root;\nworker_processes 2;\ndaemon off;\npid {pid};\nerror_log {err} info;\n\
                 events {{ worker_connections 1024; }}\n\
                 http {{\n  access_log {acc};\n  client_body_temp_path {t};\n  proxy_temp_path {t};\n\
                 fastcgi_temp_path {t};\n  uwsgi_temp_path {t};\n  scgi_temp_path {t};\n{body}\n}}\n",
                pid = root.join("nginx.pid").display(),
                err = root.join("error.log").display(),
                acc = root.join("access.log").display(),
                t = t.display(),
                body = http_body.replace("{PORT}", &port.to_string()),
            ),
        )
        .unwrap();
        let child = Command::new(nginx)
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(&root)
            .stdout(Stdio::null())
            .stderr(fs::File::create(root.join("stderr.log")).unwrap())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "nginx did not start: {}",
                fs::read_to_string(root.join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM lets the master stop its workers; SIGKILL would leave them running.
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) on the pid of the nginx master this test started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub use kiln_testkit::free_port;

/// An s3s-fs server with bucket `kiln` holding `base.img`.
pub struct S3Server {
    child: Child,
    pub url: String,
}

impl S3Server {
    pub fn start(dir: &Path, base: &Path) -> Self {
        let root = dir.join("s3root");
        fs::create_dir_all(root.join("kiln")).unwrap();
        fs::copy(base, root.join("kiln/base.img")).unwrap();
        let port = free_port();
        let child = Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", "AKTEST", "--secret-key", "SKTEST-secret"])
            .arg(&root)
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("s3s-fs.log")).unwrap())
            .spawn()
            .expect(
                "s3s-fs must be installed: cargo install s3s-fs --version 0.14.1 --features binary",
            );
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "s3s-fs did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A deliberately difficult upstream: /fine, /slow (6 s), /huge (20 MB, no length),
/// /redirect (302 to a loopback /secret); counts hits per path.
pub struct Upstream {
    pub port: u16,
    hits: Arc<Mutex<HashMap<String, usize>>>,
}

impl Upstream {
    pub fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let hits: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let h = hits.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let h = h.clone();
                std::thread::spawn(move || serve_upstream(s, port, &h));
            }
        });
        Self { port, hits }
    }

    pub fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

fn serve_upstream(mut s: TcpStream, port: u16, hits: &Mutex<HashMap<String, usize>>) {
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).map_or(true, |n| n == 0) || h == "\r\n" {
            break;
        }
    }
    let path = line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .trim_start_matches('/')
        .to_string();
    *hits.lock().unwrap().entry(path.clone()).or_default() += 1;
    let _ = match path.as_str() {
        "fine" => write!(s, "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{UPSTREAM_FINE}", UPSTREAM_FINE.len()),
        "slow" => {
            std::thread::sleep(Duration::from_secs(6));
            write!(s, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi")
        }
        "huge" => {
            let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n\r\n");
            let chunk = vec![b'x'; 1 << 20];
            for _ in 0..20 {
                if s.write_all(&chunk).is_err() {
                    break;
                }
            }
            Ok(())
        }
        "redirect" => write!(s, "HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{port}/secret\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
        _ => write!(s, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    };
}

/// An unencrypted minisign key pair made by the minisign CLI: (public, secret).
pub fn minisign_keys(dir: &Path) -> (PathBuf, PathBuf) {
    let pk = dir.join("kiln.pub");
    let sk = dir.join("kiln.key");
    let st = Command::new("minisign")
        .args([
            "-G",
            "-W",
            "-p",
            pk.to_str().unwrap(),
            "-s",
            sk.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .output()
        .expect("minisign must be installed");
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    (pk, sk)
}
