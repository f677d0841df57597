//! Counters for `/metrics` in the Prometheus text exposition format (version 0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// Upper bounds (seconds) of the injection latency histogram.
const BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

/// All counters.
#[derive(Default)]
pub struct Metrics {
    downloads: Mutex<BTreeMap<String, u64>>,
    /// Body bytes sent for downloads.
    pub bytes: AtomicU64,
    /// Of those, the base bytes sent from the file by sendfile(2).
    pub sendfile_bytes: AtomicU64,
    responses: Mutex<BTreeMap<u16, u64>>,
    /// Requests refused by the rate limiter or download caps.
    pub limited: AtomicU64,
    /// Downloads that ended with an error while streaming.
    pub stream_errors: AtomicU64,
    /// Uploads accepted.
    pub uploads: AtomicU64,
    /// Bytes hashed to give personalised images their plain sha256 (from a midstate on).
    pub sha256_bytes: AtomicU64,
    /// Plain sha256s computed.
    pub sha256_count: AtomicU64,
    hist: Mutex<([u64; BUCKETS.len()], u64, f64)>,
}

impl Metrics {
    /// A download of `image` started.
    pub fn download(&self, image: &str) {
        let mut m = self.downloads.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(image.to_string()).or_default() += 1;
    }

    /// A response with `status` went out.
    pub fn response(&self, status: u16) {
        let mut m = self.responses.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(status).or_default() += 1;
    }

    /// One injection (fetch + plan + digest) took `secs`.
    pub fn injection(&self, secs: f64) {
        let mut h = self.hist.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                h.0[i] += 1;
            }
        }
        h.1 += 1;
        h.2 += secs;
    }

    /// The exposition text; `active` is the number of running downloads.
    pub fn render(&self, active: u32) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# HELP kiln_downloads_total Personalised downloads started."
        );
        let _ = writeln!(o, "# TYPE kiln_downloads_total counter");
        for (k, v) in self
            .downloads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(o, "kiln_downloads_total{{image=\"{k}\"}} {v}");
        }
        let _ = writeln!(
            o,
            "# HELP kiln_download_bytes_total Body bytes sent for downloads."
        );
        let _ = writeln!(o, "# TYPE kiln_download_bytes_total counter");
        let _ = writeln!(o, "kiln_download_bytes_total {}", self.bytes.load(Relaxed));
        let _ = writeln!(
            o,
            "# HELP kiln_download_sendfile_bytes_total Of those, base bytes sent from the file by sendfile."
        );
        let _ = writeln!(o, "# TYPE kiln_download_sendfile_bytes_total counter");
        let _ = writeln!(
            o,
            "kiln_download_sendfile_bytes_total {}",
            self.sendfile_bytes.load(Relaxed)
        );
        let _ = writeln!(o, "# HELP kiln_downloads_active Downloads streaming now.");
        let _ = writeln!(o, "# TYPE kiln_downloads_active gauge");
        let _ = writeln!(o, "kiln_downloads_active {active}");
        let _ = writeln!(o, "# HELP kiln_responses_total HTTP responses by status.");
        let _ = writeln!(o, "# TYPE kiln_responses_total counter");
        for (k, v) in self
            .responses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(o, "kiln_responses_total{{status=\"{k}\"}} {v}");
        }
        let _ = writeln!(
            o,
            "# HELP kiln_errors_total Error responses (4xx and 5xx) plus failed streams."
        );
        let _ = writeln!(o, "# TYPE kiln_errors_total counter");
        let errs: u64 = self
            .responses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(k, _)| **k >= 400)
            .map(|(_, v)| v)
            .sum::<u64>()
            + self.stream_errors.load(Relaxed);
        let _ = writeln!(o, "kiln_errors_total {errs}");
        let _ = writeln!(
            o,
            "# HELP kiln_rate_limited_total Requests refused by rate limits or download caps."
        );
        let _ = writeln!(o, "# TYPE kiln_rate_limited_total counter");
        let _ = writeln!(o, "kiln_rate_limited_total {}", self.limited.load(Relaxed));
        let _ = writeln!(o, "# HELP kiln_uploads_total Uploads accepted.");
        let _ = writeln!(o, "# TYPE kiln_uploads_total counter");
        let _ = writeln!(o, "kiln_uploads_total {}", self.uploads.load(Relaxed));
        let _ = writeln!(
            o,
            "# HELP kiln_sha256_hashed_bytes_total Bytes hashed for plain sha256s of personalised \
             images (from the base's midstate before the first patch to the end)."
        );
        let _ = writeln!(o, "# TYPE kiln_sha256_hashed_bytes_total counter");
        let _ = writeln!(
            o,
            "kiln_sha256_hashed_bytes_total {}",
            self.sha256_bytes.load(Relaxed)
        );
        let _ = writeln!(
            o,
            "# HELP kiln_sha256_total Plain sha256s computed for personalised images."
        );
        let _ = writeln!(o, "# TYPE kiln_sha256_total counter");
        let _ = writeln!(o, "kiln_sha256_total {}", self.sha256_count.load(Relaxed));
        let _ = writeln!(
            o,
            "# HELP kiln_injection_seconds Time to fetch a piece and plan its injection."
        );
        let _ = writeln!(o, "# TYPE kiln_injection_seconds histogram");
        let h = self.hist.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(o, "kiln_injection_seconds_bucket{{le=\"{b}\"}} {}", h.0[i]);
        }
        let _ = writeln!(o, "kiln_injection_seconds_bucket{{le=\"+Inf\"}} {}", h.1);
        let _ = writeln!(o, "kiln_injection_seconds_sum {}", h.2);
        let _ = writeln!(o, "kiln_injection_seconds_count {}", h.1);
        o
    }
}
