//! The kernel log through `/dev/kmsg` (Documentation/ABI/testing/dev-kmsg): kiln-init reads the
//! records the kernel wrote while it loaded a module or mounted a filesystem, so a failure is
//! reported with its real cause (`Unknown symbol crc32c`, `Cannot load crc32c driver`) rather
//! than a bare errno. The modprobe helper writes its own findings here too, as it has no console.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;

/// A reader positioned at the end of the log: [`Kmsg::take`] returns what came since.
pub struct Kmsg {
    f: std::fs::File,
}

impl Kmsg {
    /// Opens `/dev/kmsg` non-blocking, positioned after the newest record.
    pub fn open() -> Option<Self> {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .ok()?;
        f.seek(SeekFrom::End(0)).ok()?;
        Some(Kmsg { f })
    }

    /// The messages of the records written since the last call (or since opening).
    pub fn take(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        // One record per read; 8 KiB is more than the kernel's record limit.
        let mut buf = vec![0u8; 8192];
        loop {
            match self.f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if let Some(m) = message(&buf[..n]) {
                        out.push(m);
                    }
                }
                // EPIPE: records were overwritten before we read them; carry on with the next.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(_) => break, // EAGAIN: nothing more
            }
        }
        out
    }
}

/// The text of one record: `PRIO,SEQ,USEC,FLAGS[,…];MESSAGE\n` followed by optional
/// continuation lines (` KEY=VALUE`), which are dropped.
pub fn message(record: &[u8]) -> Option<String> {
    let s = String::from_utf8_lossy(record);
    let (_, rest) = s.split_once(';')?;
    let first = rest.lines().next().unwrap_or("");
    Some(first.trim_end().to_string())
}

/// Writes one line to the kernel log at `level` (0 emergency … 7 debug).
pub fn write(level: u8, msg: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        let _ = f.write_all(format!("<{}>{msg}\n", level.min(7)).as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_parse() {
        assert_eq!(
            message(b"4,1503,3317563,-;erofs: Unknown symbol crc32c (err -2)\n").as_deref(),
            Some("erofs: Unknown symbol crc32c (err -2)")
        );
        assert_eq!(
            message(b"6,339,5140900,-,caller=T1;usb 1-1: new device\n SUBSYSTEM=usb\n").as_deref(),
            Some("usb 1-1: new device")
        );
        assert_eq!(message(b"no separator"), None);
    }
}
