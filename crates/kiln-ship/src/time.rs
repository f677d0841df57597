//! Timestamps for documents kiln writes. Never the wall clock: `SOURCE_DATE_EPOCH` when set,
//! else the Unix epoch, so the same inputs give the same bytes.

/// Seconds since the epoch from `SOURCE_DATE_EPOCH` (an error if set but not an integer), or 0.
pub fn source_date_epoch() -> anyhow::Result<i64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v.trim().parse::<i64>().map_err(|_| {
            anyhow::anyhow!("SOURCE_DATE_EPOCH={v:?} is not an integer number of seconds")
        }),
        Err(_) => Ok(0),
    }
}

/// Formats seconds since the epoch as RFC 3339 UTC (`2026-11-22T00:00:00Z`).
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = kiln_formats::calendar::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        for (s, want) in [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_700_000_000, "2023-11-14T22:13:20Z"),
            (-1, "1969-12-31T23:59:59Z"),
        ] {
            assert_eq!(rfc3339(s), want);
        }
    }
}
