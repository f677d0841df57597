//! The slot table, in-image encoding and sidecar JSON; a table that decodes is also planned
//! against a fuzzer-chosen image (the same bytes), as inject and serve would.
#![no_main]

use kiln_inject::slots::SlotTable;
use kiln_inject::{plan_injection, Payload};
use libfuzzer_sys::fuzz_target;

struct Bytes<'a>(&'a [u8]);

impl kiln_inject::ReadAt for Bytes<'_> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let Some(rest) = usize::try_from(offset).ok().and_then(|o| self.0.get(o..)) else {
            return Ok(0);
        };
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        Ok(n)
    }

    fn len(&self) -> u64 {
        self.0.len() as u64
    }
}

fuzz_target!(|data: &[u8]| {
    let tables = [
        SlotTable::decode(data, "fuzz"),
        SlotTable::from_sidecar_json(data, "fuzz"),
    ];
    for t in tables.into_iter().flatten() {
        let _ = kiln_inject::slots::format_table(&t);
        let _ = t.encode();
        let mut image = data.to_vec();
        image.resize(t.image_len.min(1 << 20) as usize, 0);
        for s in &t.slots {
            let p = Payload::new(s.name.clone(), b"<p>fuzz</p>".to_vec());
            let _ = plan_injection(&t, &Bytes(&image), &[p]);
        }
    }
});
