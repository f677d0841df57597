//! The qcow2, VHD and VMDK readers (round trips, `kiln convert` checks): open whatever the
//! bytes are, dump it, and read the first MiBs of the virtual disk and its last bytes.
#![no_main]

use kiln_formats::vmdisk::{self, qcow2, vhd, vmdk};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let len = data.len() as u64;
    if let Ok(q) = qcow2::Reader::open(&data, len) {
        let _ = q.dump();
    }
    if let Ok(v) = vhd::Reader::open(&data, len) {
        let _ = v.dump();
    }
    if let Ok(k) = vmdk::Reader::open(&data, len) {
        let _ = k.dump();
    }
    if let Ok(d) = vmdisk::open_any(&data, len) {
        let size = d.size();
        let mut buf = vec![0u8; 4 << 20];
        let n = size.min(buf.len() as u64) as usize;
        let _ = d.read_virtual(0, &mut buf[..n]);
        let tail = size.min(4096) as usize;
        let _ = d.read_virtual(size - tail as u64, &mut buf[..tail]);
    }
});
