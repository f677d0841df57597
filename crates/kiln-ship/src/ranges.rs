//! Fetching byte ranges of one remote file ([`Remote`]: HTTP(S) with `Range`, S3 with ranged
//! GETs, a local file), several ranges at once, each checked by the caller unit by unit, with
//! retries that resume where the last good unit ended.
//!
//! This is what `kiln update --from` fetches missing blocks with. The caller's `sink` receives
//! whole units (the update's 4 KiB blocks; the last unit of a range may be shorter) at their
//! absolute offset, and decides: accept (it has written them), refetch ([`Verdict::Refetch`]:
//! the bytes did not hash to what the signed index says, so the range is asked for again from
//! that unit on), or abort. A connection dropped mid-body, a timeout or a 5xx is retried the
//! same way, from the first unit not yet accepted: an interrupted range never refetches what
//! was already accepted. After `attempts` failed tries of one range the whole fetch fails,
//! naming the remote, the byte offset and the last failure.

use std::cell::Cell;
use std::ops::Range;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use futures::StreamExt;
use object_store::path::Path as ObjPath;

use crate::store::Remote;

/// What the sink says about the units it was handed.
#[derive(Debug)]
pub enum Verdict {
    /// Every unit was good and is written.
    Accept,
    /// The unit at this absolute offset is bad (the ones before it were accepted): fetch
    /// again from there. The message says why, for the error if the retries run out.
    Refetch(u64, String),
}

/// How to fetch.
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// Ranges in flight at once.
    pub parallel: usize,
    /// Tries per range (the first one included) before giving up.
    pub attempts: u32,
    /// The unit the sink checks (bytes); ranges are handed over in whole units.
    pub unit: u64,
    /// First pause between tries; doubles each time, at most 2 s.
    pub backoff: Duration,
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self {
            parallel: 4,
            attempts: 6,
            unit: 4096,
            backoff: Duration::from_millis(100),
        }
    }
}

/// Applies an update to the shared fetch statistics (one lock, taken by the caller).
type StatsSink<'a> = &'a dyn Fn(&dyn Fn(&mut FetchStats));

/// What the fetch cost.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FetchStats {
    /// Body bytes received, retries and rejected units included.
    pub bytes: u64,
    /// Requests sent.
    pub requests: u64,
    /// Tries that failed and were repeated (dropped connections, bad units, errors).
    pub retries: u64,
}

/// One try's outcome when it did not finish its range.
enum TryError {
    /// Worth another try (network, 5xx, a rejected unit).
    Transient(String),
    /// Not worth another try (404, a server ignoring Range, the sink's own failure).
    Fatal(anyhow::Error),
}

/// Fetches `ranges` of `remote` (each `start..end`, absolute byte offsets, `start` on a unit
/// boundary), handing each range's bytes in order to `sink`, at most `opts.parallel` ranges at
/// a time. Blocking: runs its own single-threaded runtime, so `sink` needs no `Send`.
pub fn fetch_ranges(
    remote: &Remote,
    ranges: &[Range<u64>],
    opts: &FetchOptions,
    sink: &dyn Fn(u64, &[u8]) -> anyhow::Result<Verdict>,
) -> anyhow::Result<FetchStats> {
    if opts.unit == 0 || opts.parallel == 0 || opts.attempts == 0 {
        bail!("internal: fetch options {opts:?}");
    }
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the fetch runtime")?;
    let stats = Cell::new(FetchStats::default());
    let add = |f: &dyn Fn(&mut FetchStats)| {
        let mut s = stats.take();
        f(&mut s);
        stats.set(s);
    };
    rt.block_on(async {
        let mut jobs = futures::stream::iter(ranges.iter().cloned())
            .map(|r| fetch_one(&client, remote, r, opts, sink, &add))
            .buffer_unordered(opts.parallel);
        while let Some(done) = jobs.next().await {
            done?;
        }
        anyhow::Ok(())
    })?;
    Ok(stats.take())
}

/// Fetches a small file whole (at most `max` bytes), blocking; an error when it is missing.
pub fn get_whole(remote: &Remote, max: u64) -> anyhow::Result<Vec<u8>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the fetch runtime")?;
    rt.block_on(remote.get_small(max))?
        .map(|(b, _)| b)
        .ok_or_else(|| anyhow!("{remote}: not found"))
}

/// One range, with its retries.
async fn fetch_one(
    client: &reqwest::Client,
    remote: &Remote,
    r: Range<u64>,
    opts: &FetchOptions,
    sink: &dyn Fn(u64, &[u8]) -> anyhow::Result<Verdict>,
    add: StatsSink<'_>,
) -> anyhow::Result<()> {
    let mut pos = r.start;
    let mut tries = 0u32;
    let mut pause = opts.backoff;
    while pos < r.end {
        tries += 1;
        add(&|s| s.requests += 1);
        let before = pos;
        let res = one_try(client, remote, pos..r.end, opts.unit, sink, add, &mut pos).await;
        match res {
            Ok(()) => {}
            Err(TryError::Fatal(e)) => return Err(e),
            Err(TryError::Transient(why)) => {
                // Progress made in this try does not count against the range: a server that
                // drops every connection after a while still completes, one try at a time.
                if pos > before {
                    tries = 0;
                    pause = opts.backoff;
                }
                if tries >= opts.attempts {
                    bail!(
                        "{remote}: bytes {pos}..{}: giving up after {tries} tries: {why}",
                        r.end
                    );
                }
                add(&|s| s.retries += 1);
                tracing::info!(%remote, from = pos, to = r.end, tries, error = %why, "range request cut short; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
    Ok(())
}

/// One request for `want`; advances `pos` past every unit the sink accepted.
async fn one_try(
    client: &reqwest::Client,
    remote: &Remote,
    want: Range<u64>,
    unit: u64,
    sink: &dyn Fn(u64, &[u8]) -> anyhow::Result<Verdict>,
    add: StatsSink<'_>,
    pos: &mut u64,
) -> Result<(), TryError> {
    let mut buf: Vec<u8> = Vec::new();
    // Hands whole units to the sink (all of `buf` when `last`).
    let mut deliver = |buf: &mut Vec<u8>, last: bool| -> Result<(), TryError> {
        let whole = if last {
            buf.len()
        } else {
            buf.len() - buf.len() % unit as usize
        };
        if whole == 0 {
            return Ok(());
        }
        let verdict = sink(*pos, &buf[..whole]).map_err(TryError::Fatal)?;
        match verdict {
            Verdict::Accept => {
                *pos += whole as u64;
                buf.drain(..whole);
                Ok(())
            }
            Verdict::Refetch(at, why) => {
                *pos = at.clamp(*pos, *pos + whole as u64);
                Err(TryError::Transient(why))
            }
        }
    };
    match remote {
        Remote::Http(u) => {
            let resp = client
                .get(u.clone())
                .header(
                    reqwest::header::RANGE,
                    format!("bytes={}-{}", want.start, want.end - 1),
                )
                .send()
                .await
                .map_err(|e| TryError::Transient(format!("GET: {}", e.without_url())))?;
            let status = resp.status();
            if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                return Err(TryError::Transient(format!("GET: {status}")));
            }
            if status != reqwest::StatusCode::PARTIAL_CONTENT {
                return Err(TryError::Fatal(anyhow!(
                    "{remote}: asked for bytes {}..{}, got {status}{}",
                    want.start,
                    want.end,
                    if status.is_success() {
                        " (the server ignores Range requests; kiln update --from needs them)"
                    } else {
                        ""
                    }
                )));
            }
            let cr = resp
                .headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let first = cr
                .strip_prefix("bytes ")
                .and_then(|s| s.split('-').next())
                .and_then(|s| s.parse::<u64>().ok());
            if first != Some(want.start) {
                return Err(TryError::Fatal(anyhow!(
                    "{remote}: asked for bytes from {}, the server answered Content-Range {cr:?}",
                    want.start
                )));
            }
            let mut stream = resp.bytes_stream();
            let mut got = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk =
                    chunk.map_err(|e| TryError::Transient(format!("body: {}", e.without_url())))?;
                add(&|s| s.bytes += chunk.len() as u64);
                got += chunk.len() as u64;
                if got > want.end - want.start {
                    return Err(TryError::Fatal(anyhow!(
                        "{remote}: more bytes than the {} asked for from {}",
                        want.end - want.start,
                        want.start
                    )));
                }
                buf.extend_from_slice(&chunk);
                deliver(&mut buf, false)?;
            }
            if got < want.end - want.start {
                // Give the sink what arrived, then try again for the rest.
                deliver(&mut buf, false)?;
                return Err(TryError::Transient(format!(
                    "the connection ended after {got} of {} bytes",
                    want.end - want.start
                )));
            }
            deliver(&mut buf, true)
        }
        Remote::S3 { store, key, .. } => {
            let b = store
                .get_range(&ObjPath::from(key.as_str()), want.clone())
                .await
                .map_err(|e| {
                    TryError::Transient(format!("GET: {}", crate::store::scrub(&e.to_string())))
                })?;
            add(&|s| s.bytes += b.len() as u64);
            if b.len() as u64 != want.end - want.start {
                return Err(TryError::Transient(format!(
                    "{} bytes for a {}-byte range",
                    b.len(),
                    want.end - want.start
                )));
            }
            buf.extend_from_slice(&b);
            deliver(&mut buf, true)
        }
        Remote::File(p) => {
            use std::os::unix::fs::FileExt;
            let f = std::fs::File::open(p)
                .with_context(|| format!("{}: open", p.display()))
                .map_err(TryError::Fatal)?;
            buf.resize((want.end - want.start) as usize, 0);
            f.read_exact_at(&mut buf, want.start)
                .with_context(|| {
                    format!(
                        "{}: reading bytes {}..{}",
                        p.display(),
                        want.start,
                        want.end
                    )
                })
                .map_err(TryError::Fatal)?;
            add(&|s| s.bytes += want.end - want.start);
            deliver(&mut buf, true)
        }
    }
}

/// Merges sorted, unit-aligned block indexes into byte ranges: runs of consecutive blocks, a
/// gap of up to `max_gap` blocks bridged (one request is cheaper than two for a few KiB), each
/// range at most `max_blocks` long, the last one clipped to `len`.
pub fn coalesce(
    blocks: &[u64],
    block: u64,
    len: u64,
    max_gap: u64,
    max_blocks: u64,
) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    let mut run: Option<(u64, u64)> = None; // first block, end block (exclusive)
    for &b in blocks {
        run = match run {
            Some((s, e)) if b >= e && b - e <= max_gap && b + 1 - s <= max_blocks => {
                Some((s, b + 1))
            }
            Some((s, e)) => {
                out.push(s * block..(e * block).min(len));
                Some((b, b + 1))
            }
            None => Some((b, b + 1)),
        };
    }
    if let Some((s, e)) = run {
        out.push(s * block..(e * block).min(len));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn coalescing() {
        let k = 4096;
        assert_eq!(coalesce(&[], k, 100 * k, 1, 8), vec![]);
        assert_eq!(coalesce(&[0, 1, 2], k, 100 * k, 0, 8), vec![0..3 * k]);
        assert_eq!(
            coalesce(&[0, 2, 5], k, 100 * k, 1, 8),
            vec![0..3 * k, 5 * k..6 * k]
        );
        assert_eq!(
            coalesce(&[0, 1, 2, 3, 4], k, 100 * k, 0, 2),
            vec![0..2 * k, 2 * k..4 * k, 4 * k..5 * k]
        );
        // The last block is clipped to the file's length.
        assert_eq!(coalesce(&[9], k, 9 * k + 10, 0, 8), vec![9 * k..9 * k + 10]);
    }

    #[test]
    fn file_ranges_and_refetch() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let data: Vec<u8> = (0..20_000u32).map(|i| i as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let remote = Remote::File(p);
        let got = std::cell::RefCell::new(vec![0u8; data.len()]);
        let rejected = Cell::new(false);
        let sink = |off: u64, b: &[u8]| {
            // Reject the unit at 8192 once: it is asked for again.
            if off <= 8192 && off + b.len() as u64 > 8192 && !rejected.replace(true) {
                got.borrow_mut()[off as usize..8192].copy_from_slice(&b[..(8192 - off) as usize]);
                return Ok(Verdict::Refetch(8192, "bad".into()));
            }
            got.borrow_mut()[off as usize..off as usize + b.len()].copy_from_slice(b);
            Ok(Verdict::Accept)
        };
        let opts = FetchOptions {
            backoff: Duration::from_millis(1),
            ..FetchOptions::default()
        };
        let s = fetch_ranges(&remote, &[0..12288, 12288..20_000], &opts, &sink).unwrap();
        assert_eq!(*got.borrow(), data);
        assert_eq!(s.retries, 1);
        assert_eq!(s.bytes, 20_000 + 4096);
    }
}
