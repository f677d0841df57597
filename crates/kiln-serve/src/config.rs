//! `serve.toml`: the catalog of base images, piece sources and limits. See
//! `examples/serve.toml` for a commented example.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to listen on (`--listen` overrides).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Where uploaded payloads (content-addressed) and, in an object store, prepared-payload
    /// records live: a directory, or `s3://bucket/prefix` shared by every replica. Without it,
    /// uploads are refused.
    pub uploads: Option<String>,
    /// Options for the object store behind `uploads = "s3://…"` (as for `[image.store]`).
    #[serde(default)]
    pub store: BTreeMap<String, String>,
    /// Load balancers in front: for requests from these addresses the client address (for
    /// rate limits and download caps) is taken from `X-Forwarded-For`.
    #[serde(default)]
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Limits and timeouts.
    #[serde(default)]
    pub limits: Limits,
    /// minisign key for signed manifests.
    pub signing: Option<Signing>,
    /// The base images.
    #[serde(rename = "image", default)]
    pub images: Vec<ImageConfig>,
    /// Where pieces (payloads named in URLs) come from, tried in order.
    #[serde(rename = "source", default)]
    pub sources: Vec<SourceConfig>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

/// A size like `8M`, `512K`, `1G` or a plain byte count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Size(n)),
            Raw::S(s) => parse_size(&s).map(Size).map_err(serde::de::Error::custom),
        }
    }
}

/// Parses `123`, `4K`, `8M`, `1G` (binary multiples). `MB` and the like are refused as
/// ambiguous, as everywhere else in kiln.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let upper = t.to_ascii_uppercase();
    if ["KB", "MB", "GB", "TB"].iter().any(|u| upper.ends_with(u)) {
        anyhow::bail!(
            "{s:?}: {} is ambiguous (powers of 1000 or 1024?); write K, M or G (powers of 1024)",
            &t[t.len() - 2..]
        );
    }
    let (num, mul) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .with_context(|| format!("{s:?}: expected a size like 512K, 8M or a byte count"))
}

/// A duration like `10s`, `500ms`, `2m`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(Dur)
            .map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
    }
}

/// Protection and limits.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Requests per second per client IP (token bucket refill rate).
    pub requests_per_second: f64,
    /// Burst size of the per-IP token bucket.
    pub burst: u32,
    /// Concurrent downloads per client IP.
    pub downloads_per_ip: u32,
    /// Concurrent downloads in total.
    pub downloads_total: u32,
    /// Open connections in total (accepting pauses above this).
    pub connections: u32,
    /// Largest accepted upload (also capped by the slot's capacity).
    pub upload_max: Size,
    /// Content types accepted for uploads.
    pub upload_types: Vec<String>,
    /// A client that accepts no bytes for this long is disconnected.
    pub write_timeout: Dur,
    /// Time allowed to send request headers.
    pub header_timeout: Dur,
    /// Bytes of prepared payloads kept in memory.
    pub cache_bytes: Size,
    /// How long a fetched piece is reused before it is fetched again.
    pub cache_ttl: Dur,
    /// On SIGTERM: how long running downloads may take to finish after the server stops
    /// accepting connections.
    pub shutdown_grace: Dur,
    /// On SIGTERM: how long to keep accepting, with `/readyz` answering 503, before closing
    /// the listener, for load balancers that probe `/readyz` (0 for nginx's passive checks).
    pub shutdown_delay: Dur,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            requests_per_second: 10.0,
            burst: 40,
            downloads_per_ip: 4,
            downloads_total: 256,
            connections: 4096,
            upload_max: Size(8 << 20),
            upload_types: vec!["text/html".into(), "text/plain".into()],
            write_timeout: Dur(Duration::from_secs(30)),
            header_timeout: Dur(Duration::from_secs(10)),
            cache_bytes: Size(256 << 20),
            cache_ttl: Dur(Duration::from_secs(300)),
            shutdown_grace: Dur(Duration::from_secs(30)),
            shutdown_delay: Dur(Duration::ZERO),
        }
    }
}

/// Manifest signing.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signing {
    /// minisign secret key file.
    pub secret_key: PathBuf,
    /// minisign public key file (served at /api/minisign.pub).
    pub public_key: Option<PathBuf>,
    /// Environment variable holding the key's password; unset = an unencrypted key.
    pub password_env: Option<String>,
}

/// One base image.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    /// URL name: `/os/{name}/…`.
    pub name: String,
    /// Shown on the page.
    pub title: Option<String>,
    /// Shown on the page and put in download names; by default the `VERSION` of a base named
    /// like `kiln build`'s output, `NAME_VERSION.img` (or `.iso`).
    pub version: Option<String>,
    /// A local path (relative to the config file) or an object-store URL (`s3://bucket/key`).
    pub base: String,
    /// Options for the object store (e.g. `endpoint`, `region`, `access_key_id`,
    /// `secret_access_key`, `allow_http`); AWS_* environment variables also apply.
    #[serde(default)]
    pub store: BTreeMap<String, String>,
    /// The slot pieces go into.
    pub slot: String,
    /// Download extension: `img` or `iso`.
    #[serde(default = "default_ext")]
    pub extension: String,
    /// Download file name; `{name}`, `{version}`, `{piece}` and `{ext}` are replaced. By
    /// default `{name}-{version}-{piece}.{ext}` (`{name}-{piece}.{ext}` without a version).
    pub filename: Option<String>,
}

impl ImageConfig {
    /// The configured version, else the one in a `NAME_VERSION.ext` base name.
    pub fn version(&self) -> Option<String> {
        if let Some(v) = &self.version {
            return Some(v.clone());
        }
        let file = self.base.rsplit('/').next()?;
        let stem = file
            .strip_suffix(".img")
            .or_else(|| file.strip_suffix(".iso"))?;
        let (_, v) = stem.rsplit_once('_')?;
        valid_name(v).then(|| v.to_string())
    }
}

fn default_ext() -> String {
    "img".into()
}

/// A piece source.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum SourceConfig {
    /// Files `{path}/{piece}{extension}`.
    Dir {
        path: PathBuf,
        #[serde(default)]
        extension: String,
    },
    /// `url` with `{piece}` replaced, fetched over HTTP(S).
    Upstream {
        url: String,
        /// Hosts the URL may point at (exact names).
        allow_hosts: Vec<String>,
        /// Whole-request timeout.
        #[serde(default = "default_timeout")]
        timeout: Dur,
        /// Largest piece accepted.
        #[serde(default = "default_upstream_max")]
        max_size: Size,
        /// Allow loopback/private/link-local addresses (tests only; off by default).
        #[serde(default)]
        allow_private: bool,
    },
}

fn default_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}

fn default_upstream_max() -> Size {
    Size(8 << 20)
}

/// Valid image and piece names: `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}` without `..`.
pub fn valid_name(n: &str) -> bool {
    let b = n.as_bytes();
    (1..=64).contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
        && !n.contains("..")
}

impl Config {
    /// Reads and checks a config file; relative paths are resolved against its directory.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut c: Config =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        c.resolve(dir)?;
        Ok(c)
    }

    /// Resolves relative paths against `dir` and checks names and values.
    pub fn resolve(&mut self, dir: &Path) -> anyhow::Result<()> {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        if let Some(u) = &mut self.uploads {
            if !u.contains("://") {
                let mut p = PathBuf::from(&*u);
                abs(&mut p);
                *u = p.display().to_string();
            } else if !u.starts_with("s3://") {
                bail!("uploads = {u:?}: a directory or an s3://bucket/prefix URL");
            }
        }
        if let Some(s) = &mut self.signing {
            abs(&mut s.secret_key);
            if let Some(p) = &mut s.public_key {
                abs(p);
            }
        }
        if self.images.is_empty() {
            bail!("no [[image]] in the config");
        }
        for im in &mut self.images {
            if !valid_name(&im.name) || im.name.contains('.') {
                bail!("[[image]] {:?}: names are 1-64 of A-Z a-z 0-9 _ -", im.name);
            }
            if !matches!(im.extension.as_str(), "img" | "iso") {
                bail!("[[image]] {:?}: extension must be img or iso", im.name);
            }
            if let Some(v) = &im.version {
                if !valid_name(v) {
                    bail!(
                        "[[image]] {:?}: version {v:?} must be 1-64 of A-Z a-z 0-9 . _ -",
                        im.name
                    );
                }
            }
            if !im.base.contains("://") {
                let mut p = PathBuf::from(&im.base);
                abs(&mut p);
                im.base = p.display().to_string();
            }
        }
        for (i, im) in self.images.iter().enumerate() {
            if self.images[..i].iter().any(|o| o.name == im.name) {
                bail!("[[image]] {:?} defined twice", im.name);
            }
        }
        for s in &mut self.sources {
            match s {
                SourceConfig::Dir { path, .. } => abs(path),
                SourceConfig::Upstream { url, .. } => {
                    if !url.contains("{piece}") {
                        bail!("[[source]] url {url:?} has no {{piece}} placeholder");
                    }
                }
            }
        }
        if self.limits.requests_per_second <= 0.0 || self.limits.burst == 0 {
            bail!("[limits] requests_per_second and burst must be positive");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_sizes() {
        for ok in ["a", "hello-world", "u-0123", "A_b.c"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "a..b",
            "-x",
            "a b",
            "é",
            &"x".repeat(65),
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert_eq!(parse_size("8M").unwrap(), 8 << 20);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("8X").is_err());
    }

    #[test]
    fn versions_come_from_the_config_or_a_built_base_name() {
        let im = |base: &str, version: Option<&str>| ImageConfig {
            name: "kiosk".into(),
            title: None,
            version: version.map(str::to_string),
            base: base.into(),
            store: BTreeMap::new(),
            slot: "piece".into(),
            extension: "img".into(),
            filename: None,
        };
        let cases = [
            ("/srv/kiosk_2026.11.22.img", None, Some("2026.11.22")),
            ("s3://images/os/kiosk_1.0.iso", None, Some("1.0")),
            ("/srv/kiosk_1.0.img", Some("2.0"), Some("2.0")),
            ("/srv/base.img", None, None),
            ("/srv/kiosk_.img", None, None),
            ("/srv/kiosk_1.0.raw", None, None),
        ];
        for (base, v, want) in cases {
            assert_eq!(im(base, v).version().as_deref(), want, "{base}");
        }
    }

    #[test]
    fn examples_parse() {
        let text = include_str!("../../../examples/serve.toml");
        let mut c: Config = toml::from_str(text).unwrap();
        c.resolve(Path::new("/x")).unwrap();
        assert!(!c.images.is_empty());
        let text = include_str!("../../../examples/deploy/serve.toml");
        let mut c: Config = toml::from_str(text).unwrap();
        c.resolve(Path::new("/x")).unwrap();
        assert_eq!(c.uploads.as_deref(), Some("s3://kiln/uploads"));
        assert_eq!(
            c.trusted_proxies,
            ["127.0.0.1".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(c.images[0].version().as_deref(), Some("1.0"));
    }
}
