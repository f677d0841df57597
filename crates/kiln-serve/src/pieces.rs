//! Pieces: the payloads named in URLs. A piece comes from the uploads directory (ids
//! `u-<32 hex>`, content-addressed), a local directory, or an upstream URL template. Upstream
//! fetches have a timeout, a size limit, a host allow-list, no redirects, and never connect to
//! loopback, private, link-local or otherwise non-public addresses: the host is resolved here,
//! every address is checked, and the connection goes only to the checked addresses.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;

use crate::config::{valid_name, SourceConfig};
use crate::error::ApiError;
use crate::store::{is_upload_id, SharedStore};

/// A resolved piece.
#[derive(Clone, Debug)]
pub struct Piece {
    /// Its bytes.
    pub data: Bytes,
    /// Where it came from, for logs.
    pub origin: String,
}

/// True for addresses a server-side fetch must never reach.
pub fn is_forbidden_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xC0) == 64) // 100.64.0.0/10 carrier-grade NAT
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24 protocol assignments
                || (o[0] == 198 && (o[1] & 0xFE) == 18) // 198.18.0.0/15 benchmarking
                || o[0] >= 240 // reserved
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_forbidden_ip(IpAddr::V4(v4));
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xFE00) == 0xFC00 // unique local fc00::/7
                || (s[0] & 0xFFC0) == 0xFE80 // link-local fe80::/10
                || (s[0] == 0x2001 && s[1] == 0x0DB8) // documentation
                || (s[0] == 0x0064 && s[1] == 0xFF9B) // NAT64 can reach IPv4 private space
        }
    }
}

/// One configured source.
pub enum Source {
    /// Files in a directory.
    Dir { path: PathBuf, extension: String },
    /// An upstream URL template.
    Upstream(Upstream),
}

/// An upstream URL template and its policy.
pub struct Upstream {
    template: String,
    allow_hosts: Vec<String>,
    timeout: Duration,
    max_size: u64,
    allow_private: bool,
}

/// The piece sources plus the uploads store.
pub struct Sources {
    sources: Vec<Source>,
    uploads: Option<Arc<SharedStore>>,
}

impl Sources {
    /// From the config.
    pub fn new(cfg: &[SourceConfig], uploads: Option<Arc<SharedStore>>) -> Self {
        let sources = cfg
            .iter()
            .map(|s| match s {
                SourceConfig::Dir { path, extension } => Source::Dir {
                    path: path.clone(),
                    extension: extension.clone(),
                },
                SourceConfig::Upstream {
                    url,
                    allow_hosts,
                    timeout,
                    max_size,
                    allow_private,
                } => Source::Upstream(Upstream {
                    template: url.clone(),
                    allow_hosts: allow_hosts.clone(),
                    timeout: timeout.0,
                    max_size: max_size.0,
                    allow_private: *allow_private,
                }),
            })
            .collect();
        Self { sources, uploads }
    }

    /// The uploads store.
    pub fn uploads(&self) -> Option<&Arc<SharedStore>> {
        self.uploads.as_ref()
    }

    /// Names of pieces available in directory sources (for the catalog), sorted.
    pub fn list(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in &self.sources {
            if let Source::Dir { path, extension } = s {
                let Ok(rd) = std::fs::read_dir(path) else {
                    continue;
                };
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if let Some(stem) = name.strip_suffix(extension.as_str()) {
                        if valid_name(stem) && !out.iter().any(|o| o == stem) {
                            out.push(stem.to_string());
                        }
                    }
                }
            }
        }
        out.sort();
        out
    }

    /// Finds `piece` (already validated), at most `limit` bytes.
    pub async fn fetch(&self, piece: &str, limit: u64) -> Result<Piece, ApiError> {
        if !valid_name(piece) {
            return Err(ApiError::bad_request(format!(
                "invalid piece name {piece:?}"
            )));
        }
        if is_upload_id(piece) {
            let Some(store) = &self.uploads else {
                return Err(ApiError::not_found(format!("no piece {piece:?}")));
            };
            let data = store
                .get_upload(piece, limit)
                .await?
                .ok_or_else(|| ApiError::not_found(format!("no uploaded piece {piece:?}")))?;
            return Ok(Piece {
                data,
                origin: format!("upload {piece}"),
            });
        }
        for s in &self.sources {
            match s {
                Source::Dir { path, extension } => {
                    let p = path.join(format!("{piece}{extension}"));
                    if let Some(p) = read_limited(&p, limit).await? {
                        return Ok(p);
                    }
                }
                Source::Upstream(u) => return u.fetch(piece, limit).await,
            }
        }
        Err(ApiError::not_found(format!("no piece {piece:?}")))
    }
}

/// Reads a regular file of at most `limit` bytes; `None` if it does not exist.
async fn read_limited(p: &Path, limit: u64) -> Result<Option<Piece>, ApiError> {
    let meta = match tokio::fs::metadata(p).await {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ApiError::internal(format!("{}: {e}", p.display()))),
    };
    if !meta.is_file() {
        return Ok(None);
    }
    if meta.len() > limit {
        return Err(ApiError::too_large(format!(
            "piece is {} bytes, more than the slot's capacity of {limit}",
            meta.len()
        )));
    }
    let data = tokio::fs::read(p)
        .await
        .map_err(|e| ApiError::internal(format!("{}: {e}", p.display())))?;
    if data.len() as u64 > limit {
        return Err(ApiError::too_large(format!(
            "piece grew past {limit} bytes"
        )));
    }
    Ok(Some(Piece {
        data: data.into(),
        origin: p.display().to_string(),
    }))
}

/// A resolver for reqwest that refuses hosts whose addresses are not public.
struct CheckedResolver {
    allow_private: bool,
}

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if addrs.is_empty() {
                return Err(format!("{host}: no addresses").into());
            }
            if !allow_private {
                if let Some(bad) = addrs.iter().find(|a| is_forbidden_ip(a.ip())) {
                    return Err(
                        format!("{host} resolves to {}, a non-public address", bad.ip()).into(),
                    );
                }
            }
            let it: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(it)
        })
    }
}

impl Upstream {
    async fn fetch(&self, piece: &str, limit: u64) -> Result<Piece, ApiError> {
        let url_s = self.template.replace("{piece}", piece);
        let url = reqwest::Url::parse(&url_s)
            .map_err(|e| ApiError::internal(format!("upstream URL {url_s:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ApiError::forbidden(format!(
                "upstream {url}: only http and https"
            )));
        }
        let host = url
            .host_str()
            .unwrap_or_default()
            .trim_matches(['[', ']'])
            .to_string();
        if !self
            .allow_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(&host))
        {
            return Err(ApiError::forbidden(format!(
                "upstream host {host:?} is not allowed"
            )));
        }
        // An address literal never goes through the resolver, so check it here.
        if let Ok(ip) = host.parse::<IpAddr>() {
            if !self.allow_private && is_forbidden_ip(ip) {
                return Err(ApiError::bad_gateway(format!(
                    "upstream {host} is a non-public address"
                )));
            }
        }
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(self.timeout)
            .connect_timeout(self.timeout)
            .dns_resolver(Arc::new(CheckedResolver {
                allow_private: self.allow_private,
            }))
            .no_proxy()
            .build()
            .map_err(|e| ApiError::internal(format!("http client: {e}")))?;
        let max = self.max_size.min(limit);
        let work = async {
            let resp = client
                .get(url.clone())
                .send()
                .await
                .map_err(|e| classify(&url, e))?;
            let status = resp.status();
            if status.is_redirection() {
                return Err(ApiError::bad_gateway(format!(
                    "upstream {url} answered {status} (redirects are not followed)"
                )));
            }
            if status == reqwest::StatusCode::NOT_FOUND {
                return Err(ApiError::not_found(format!("no piece {piece:?} upstream")));
            }
            if !status.is_success() {
                return Err(ApiError::bad_gateway(format!(
                    "upstream {url} answered {status}"
                )));
            }
            if resp.content_length().is_some_and(|n| n > max) {
                return Err(ApiError::bad_gateway(format!(
                    "upstream piece is larger than {max} bytes"
                )));
            }
            let mut body = BytesMut::new();
            let mut s = resp.bytes_stream();
            while let Some(chunk) = s.next().await {
                let chunk = chunk.map_err(|e| classify(&url, e))?;
                if (body.len() + chunk.len()) as u64 > max {
                    return Err(ApiError::bad_gateway(format!(
                        "upstream piece is larger than {max} bytes"
                    )));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Piece {
                data: body.freeze(),
                origin: url.to_string(),
            })
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(ApiError::gateway_timeout(format!(
                "upstream {url} did not answer within {:?}",
                self.timeout
            ))),
        }
    }
}

fn classify(url: &reqwest::Url, e: reqwest::Error) -> ApiError {
    if e.is_timeout() {
        ApiError::gateway_timeout(format!("upstream {url}: timed out"))
    } else {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg = format!("{msg}: {s}");
            src = s.source();
        }
        ApiError::bad_gateway(format!("upstream {url}: {msg}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_addresses() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.1.1",
            "::1",
            "::ffff:127.0.0.1",
            "fd00::1",
            "fe80::1",
            "::",
        ] {
            assert!(is_forbidden_ip(a.parse().unwrap()), "{a}");
        }
        for a in ["1.1.1.1", "93.184.216.34", "2606:4700::1111"] {
            assert!(!is_forbidden_ip(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn upload_ids() {
        let id = crate::store::upload_id(b"hello");
        assert!(is_upload_id(&id) && valid_name(&id), "{id}");
        assert!(!is_upload_id("u-../../etc/passwd"));
    }
}
