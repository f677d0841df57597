//! Per-IP rate limiting (token buckets) and download slots (per IP and in total). A download
//! slot is held by the response body and released when the body finishes or is dropped, so a
//! client that disconnects frees its slot at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Token buckets per client address.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl RateLimiter {
    /// `rate` tokens per second, at most `burst` stored.
    pub fn new(rate: f64, burst: u32) -> Self {
        Self {
            rate,
            burst: f64::from(burst),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `ip`; on refusal returns the seconds until one is available.
    pub fn check(&self, ip: IpAddr) -> Result<(), u64> {
        let now = Instant::now();
        let mut m = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() > 100_000 {
            // Forget clients whose buckets are full again: they hold no state worth keeping.
            let (rate, burst) = (self.rate, self.burst);
            m.retain(|_, (t, at)| *t + now.duration_since(*at).as_secs_f64() * rate < burst);
        }
        let (tokens, at) = m.entry(ip).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / self.rate).ceil().max(1.0) as u64)
        }
    }
}

/// Counts of running downloads.
pub struct DownloadSlots {
    per_ip: u32,
    total: u32,
    state: Mutex<(u32, HashMap<IpAddr, u32>)>,
}

/// Why a download slot was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// This client has too many downloads running.
    PerIp,
    /// The server has too many downloads running.
    Total,
}

impl DownloadSlots {
    /// Caps per IP and in total.
    pub fn new(per_ip: u32, total: u32) -> Arc<Self> {
        Arc::new(Self {
            per_ip,
            total,
            state: Mutex::new((0, HashMap::new())),
        })
    }

    /// Takes a slot for `ip`.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<SlotGuard, Refused> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.0 >= self.total {
            return Err(Refused::Total);
        }
        let n = st.1.entry(ip).or_insert(0);
        if *n >= self.per_ip {
            return Err(Refused::PerIp);
        }
        *n += 1;
        st.0 += 1;
        Ok(SlotGuard {
            slots: self.clone(),
            ip,
        })
    }

    /// Downloads running now.
    pub fn active(&self) -> u32 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0
    }
}

/// A held download slot.
pub struct SlotGuard {
    slots: Arc<DownloadSlots>,
    ip: IpAddr,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut st = self.slots.state.lock().unwrap_or_else(|e| e.into_inner());
        st.0 = st.0.saturating_sub(1);
        if let Some(n) = st.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                st.1.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_slots() {
        let r = RateLimiter::new(1.0, 2);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(r.check(ip).is_ok());
        assert!(r.check(ip).is_ok());
        assert_eq!(r.check(ip), Err(1));
        assert!(r.check("127.0.0.2".parse().unwrap()).is_ok());

        let s = DownloadSlots::new(1, 2);
        let a = s.acquire(ip).unwrap();
        assert_eq!(s.acquire(ip).err(), Some(Refused::PerIp));
        let b = s.acquire("10.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(
            s.acquire("10.0.0.2".parse().unwrap()).err(),
            Some(Refused::Total)
        );
        drop(a);
        drop(b);
        assert_eq!(s.active(), 0);
        assert!(s.acquire(ip).is_ok());
    }
}
