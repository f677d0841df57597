//! `Range` header parsing in kiln serve: any header against any length gives a range inside
//! the body or a refusal.
#![no_main]

use kiln_serve::http::{parse_range, RangeReq};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let len = u64::from_le_bytes(data[..8].try_into().unwrap_or([0; 8]));
    let Ok(h) = std::str::from_utf8(&data[8..]) else {
        return;
    };
    if let RangeReq::Single(first, last) = parse_range(h, len) {
        assert!(
            first <= last && last < len,
            "{h:?} over {len}: {first}..={last}"
        );
    }
});
