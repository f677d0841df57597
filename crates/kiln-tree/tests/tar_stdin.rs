//! `kiln_tree::read_with` on standard input (`-`): compressed and plain tar streams. This test
//! binary holds a single test because it replaces the process's file descriptor 0.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::os::fd::AsRawFd;

use common::{Ar, Recorder};
use kiln_formats::fstree::{DataRef, NodeKind};
use kiln_tree::{read_with, SourceArg, SourceContents};

#[test]
fn read_with_reads_tar_streams_from_stdin() {
    let mut a = Ar::default();
    a.dir(b"./etc/");
    a.file(b"./etc/hostname", b"kiln\n");
    a.link(b"./etc/name", b'1', b"./etc/hostname");
    a.end();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&a.buf).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(&a.buf[..], 3).unwrap();

    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in [("gz", &gz), ("zst", &zst), ("plain", &a.buf)] {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        // SAFETY: dup2 onto fd 0 with a descriptor we own; nothing else in this process reads
        // standard input.
        assert_eq!(unsafe { libc::dup2(f.as_raw_fd(), 0) }, 0);
        let mut rec = Recorder::default();
        let (t, contents) = read_with(&SourceArg::parse("-".as_ref()), &mut rec).unwrap();
        assert!(matches!(contents, SourceContents::Host), "{name}");
        let id = t.resolve(b"/etc/hostname").unwrap();
        assert_eq!(t.resolve(b"/etc/name"), Some(id), "{name}: hardlink");
        let NodeKind::File(f) = &t.node(id).kind else {
            panic!("{name}: not a file")
        };
        assert_eq!(f.data, DataRef::Placed(0), "{name}");
        assert_eq!(rec.files, [b"kiln\n".to_vec()], "{name}");
    }
}
