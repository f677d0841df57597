//! Date conversions for ISO 9660: the 7-byte recording date (ECMA-119 §9.1.5, also RRIP TF
//! short form) and the 17-byte volume date (§8.4.26.1). Everything kiln writes is UTC (offset 0)
//! so the bytes do not depend on the build machine's time zone.

use super::layout::{LongDate, ShortDate};

pub use crate::calendar::{civil_from_days, days_from_civil, utc_from_unix};

/// Earliest instant a [`ShortDate`] can hold: 1900-01-01T00:00:00Z.
pub const SHORT_MIN: i64 = -2_208_988_800;
/// Latest instant a [`ShortDate`] can hold: 2155-12-31T23:59:59Z.
pub const SHORT_MAX: i64 = 5_869_583_999;

/// The recording date of a Unix timestamp, clamped to the representable 1900..=2155 range
/// (clamping rather than failing: a file time far in the past or future is not worth
/// refusing an image for, and the clamp is deterministic).
pub fn short_date(sec: i64) -> ShortDate {
    let (y, mo, d, h, mi, s) = utc_from_unix(sec.clamp(SHORT_MIN, SHORT_MAX));
    ShortDate {
        years_since_1900: (y - 1900) as u8,
        month: mo as u8,
        day: d as u8,
        hour: h as u8,
        minute: mi as u8,
        second: s as u8,
        gmt_offset: 0,
    }
}

/// The Unix timestamp a [`ShortDate`] denotes, honouring its UTC offset. `None` for a zeroed
/// ("not recorded") date or out-of-range fields.
pub fn short_date_to_unix(d: &ShortDate) -> Option<i64> {
    if d.month == 0 || d.month > 12 || d.day == 0 || d.day > 31 {
        return None;
    }
    if d.hour > 23 || d.minute > 59 || d.second > 60 {
        return None;
    }
    let days = days_from_civil(
        1900 + i64::from(d.years_since_1900),
        u32::from(d.month),
        u32::from(d.day),
    );
    let local =
        days * 86_400 + i64::from(d.hour) * 3600 + i64::from(d.minute) * 60 + i64::from(d.second);
    Some(local - i64::from(d.gmt_offset) * 15 * 60)
}

/// The volume date of a Unix timestamp (years 1..=9999; clamped), with hundredths `centis`.
pub fn long_date(sec: i64, centis: u32) -> LongDate {
    // 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z
    let sec = sec.clamp(-62_135_596_800, 253_402_300_799);
    let (y, mo, d, h, mi, s) = utc_from_unix(sec);
    let text = format!(
        "{y:04}{mo:02}{d:02}{h:02}{mi:02}{s:02}{:02}",
        centis.min(99)
    );
    let mut digits = [b'0'; 16];
    digits.copy_from_slice(&text.as_bytes()[..16]);
    LongDate {
        digits,
        gmt_offset: 0,
    }
}

/// The Unix timestamp of a volume date, or `None` when unset or malformed.
pub fn long_date_to_unix(d: &LongDate) -> Option<i64> {
    if d.digits == LongDate::UNSET.digits || !d.digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let num = |a: usize, b: usize| -> i64 {
        d.digits[a..b]
            .iter()
            .fold(0i64, |acc, &c| acc * 10 + i64::from(c - b'0'))
    };
    let (y, mo, day) = (num(0, 4), num(4, 6), num(6, 8));
    if !(1..=12).contains(&mo) || !(1..=31).contains(&day) {
        return None;
    }
    let days = days_from_civil(y, mo as u32, day as u32);
    let local = days * 86_400 + num(8, 10) * 3600 + num(10, 12) * 60 + num(12, 14);
    Some(local - i64::from(d.gmt_offset) * 15 * 60)
}

/// A volume date as blkid and GRUB print it as the volume UUID: `YYYY-MM-DD-HH-MM-SS-cc`.
pub fn long_date_uuid(d: &LongDate) -> String {
    let s = String::from_utf8_lossy(&d.digits).into_owned();
    let s = s.as_bytes();
    let part = |a: usize, b: usize| String::from_utf8_lossy(&s[a..b]).into_owned();
    format!(
        "{}-{}-{}-{}-{}-{}-{}",
        part(0, 4),
        part(4, 6),
        part(6, 8),
        part(8, 10),
        part(10, 12),
        part(12, 14),
        part(14, 16)
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn civil_round_trip_table() {
        for (sec, expect) in [
            (0i64, (1970, 1, 1, 0, 0, 0)),
            (951_782_400, (2000, 2, 29, 0, 0, 0)),
            (-1, (1969, 12, 31, 23, 59, 59)),
            (4_102_444_800, (2100, 1, 1, 0, 0, 0)),
            (SHORT_MIN, (1900, 1, 1, 0, 0, 0)),
            (SHORT_MAX, (2155, 12, 31, 23, 59, 59)),
        ] {
            assert_eq!(utc_from_unix(sec), expect, "{sec}");
            assert_eq!(short_date_to_unix(&short_date(sec)), Some(sec), "{sec}");
        }
        for days in -800_000..800_000i64 {
            if days % 997 != 0 {
                continue;
            }
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn short_dates_clamp() {
        assert_eq!(short_date(i64::MIN), short_date(SHORT_MIN));
        assert_eq!(short_date(i64::MAX), short_date(SHORT_MAX));
    }

    #[test]
    fn long_dates() {
        let d = long_date(1_700_000_000, 42);
        assert_eq!(&d.digits, b"2023111422132042");
        assert_eq!(long_date_to_unix(&d), Some(1_700_000_000));
        assert_eq!(long_date_uuid(&d), "2023-11-14-22-13-20-42");
        assert_eq!(long_date_to_unix(&LongDate::UNSET), None);
    }
}
