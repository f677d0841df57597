//! Load client for scripts/bench-serve: N concurrent GETs of one URL, each body checked
//! against an expected length and crc32c (a fast whole-body fingerprint; the benchmark
//! computes the expected value from `kiln inject`'s output file).
//!
//! ```sh
//! load crc FILE                 # prints "LEN CRC32C" of a file
//! load get URL N LEN CRC32C     # prints a JSON summary
//! ```

use std::time::{Duration, Instant};

use futures::StreamExt;

fn crc_file(path: &str) -> std::io::Result<(u64, u32)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut len, mut crc) = (0u64, 0u32);
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok((len, crc));
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        len += n as u64;
    }
}

struct One {
    ok: bool,
    bytes: u64,
    ttfb: Duration,
    total: Duration,
    err: Option<String>,
}

async fn one(c: reqwest::Client, url: String, want_len: u64, want_crc: u32) -> One {
    let t0 = Instant::now();
    let mut out = One {
        ok: false,
        bytes: 0,
        ttfb: Duration::ZERO,
        total: Duration::ZERO,
        err: None,
    };
    let r = match c.get(&url).send().await {
        Ok(r) => r,
        Err(e) => {
            out.err = Some(e.to_string());
            return out;
        }
    };
    if !r.status().is_success() {
        out.err = Some(format!("status {}", r.status()));
        return out;
    }
    let mut s = r.bytes_stream();
    let mut crc = 0u32;
    let mut first = true;
    while let Some(b) = s.next().await {
        match b {
            Ok(b) => {
                if first {
                    out.ttfb = t0.elapsed();
                    first = false;
                }
                crc = crc32c::crc32c_append(crc, &b);
                out.bytes += b.len() as u64;
            }
            Err(e) => {
                out.err = Some(e.to_string());
                break;
            }
        }
    }
    out.total = t0.elapsed();
    out.ok = out.err.is_none() && out.bytes == want_len && crc == want_crc;
    if out.err.is_none() && !out.ok {
        out.err = Some(format!("got {} bytes crc {crc:08x}", out.bytes));
    }
    out
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    match a.first().map(String::as_str) {
        Some("crc") => {
            let (len, crc) = crc_file(a.get(1).ok_or("crc FILE")?)?;
            println!("{len} {crc}");
            Ok(())
        }
        Some("get") => {
            let url = a.get(1).ok_or("get URL N LEN CRC")?.clone();
            let n: usize = a.get(2).ok_or("N")?.parse()?;
            let len: u64 = a.get(3).ok_or("LEN")?.parse()?;
            let crc: u32 = a.get(4).ok_or("CRC")?.parse()?;
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async move {
                let c = reqwest::Client::builder()
                    .pool_max_idle_per_host(0)
                    .build()
                    .map_err(|e| e.to_string())?;
                let t0 = Instant::now();
                let tasks: Vec<_> = (0..n)
                    .map(|_| tokio::spawn(one(c.clone(), url.clone(), len, crc)))
                    .collect();
                let mut res = Vec::new();
                for t in tasks {
                    res.push(t.await.map_err(|e| e.to_string())?);
                }
                let wall = t0.elapsed().as_secs_f64();
                let ok = res.iter().filter(|r| r.ok).count();
                let bytes: u64 = res.iter().map(|r| r.bytes).sum();
                let mut ttfb: Vec<f64> =
                    res.iter().map(|r| r.ttfb.as_secs_f64() * 1000.0).collect();
                let mut tot: Vec<f64> = res.iter().map(|r| r.total.as_secs_f64()).collect();
                let errors: Vec<&String> =
                    res.iter().filter_map(|r| r.err.as_ref()).take(5).collect();
                println!(
                    "{}",
                    serde_json::json!({
                        "downloads": n, "identical": ok, "bytes": bytes, "wall_s": wall,
                        "throughput_gbps": bytes as f64 / wall / 1e9,
                        "ttfb_ms_p50": pct(&mut ttfb, 0.5), "ttfb_ms_p99": pct(&mut ttfb, 0.99),
                        "ttfb_ms_max": pct(&mut ttfb, 1.0),
                        "download_s_p50": pct(&mut tot, 0.5), "download_s_max": pct(&mut tot, 1.0),
                        "errors": errors,
                    })
                );
                Ok::<(), String>(())
            })?;
            Ok(())
        }
        _ => Err("usage: load crc FILE | load get URL N LEN CRC32C".into()),
    }
}
