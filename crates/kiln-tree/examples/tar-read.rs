//! Reads a source the way an image writer does and prints what it found; with `--dump`, lists
//! a tar stream's headers instead. Used by `scripts/bench-tar-read` and for debugging archives.
//!
//! ```sh
//! cargo run --release -p kiln-tree --example tar-read -- rootfs.tar.zst
//! cargo run --release -p kiln-tree --example tar-read -- --dump rootfs.tar | less
//! ```

use std::io::{self, Read};
use std::path::PathBuf;
use std::process::ExitCode;

use kiln_formats::fstree::{FileData, NodeKind, Placer};
use kiln_tree::{open, Opened, SourceArg};

/// Counts the bytes a streaming writer would place, without keeping them.
#[derive(Default)]
struct Counter {
    files: u32,
    bytes: u64,
}

impl Placer for Counter {
    fn place(&mut self, _file: &FileData, data: &mut dyn Read) -> io::Result<u32> {
        self.bytes += io::copy(data, &mut io::sink())?;
        self.files += 1;
        Ok(self.files - 1)
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (dump, src) = match args.as_slice() {
        [flag, src] if flag == "--dump" => (true, src),
        [src] => (false, src),
        _ => return Err("usage: tar-read [--dump] SOURCE (a directory, a tar file, or -)".into()),
    };
    let arg = SourceArg::parse(&PathBuf::from(src));
    if dump {
        let out = &mut io::stdout().lock();
        match arg {
            SourceArg::Stdin => kiln_tree::tar::dump(io::stdin(), out)?,
            SourceArg::TarFile(p) => kiln_tree::tar::dump(std::fs::File::open(p)?, out)?,
            SourceArg::Dir(_) | SourceArg::Image(..) => {
                return Err("--dump lists tar archives only".into())
            }
        }
        return Ok(());
    }
    let (tree, mode, placed) = match open(&arg)? {
        Opened::Indexed(t, _) => (t, "indexed", None),
        Opened::Stream(s) => {
            let mut c = Counter::default();
            let t = s.read(&mut c)?;
            (t, "streamed", Some(c))
        }
    };
    let (mut files, mut dirs, mut other, mut size) = (0u64, 0u64, 0u64, 0u64);
    for id in tree.walk() {
        match &tree.node(id).kind {
            NodeKind::File(f) => {
                files += 1;
                size += f.size;
            }
            NodeKind::Dir(_) => dirs += 1,
            _ => other += 1,
        }
    }
    println!(
        "{mode}: {} nodes ({files} files, {dirs} directories, {other} other), {size} bytes of file data",
        files + dirs + other
    );
    if let Some(c) = placed {
        println!("placed {} files, {} bytes", c.files, c.bytes);
    }
    Ok(())
}

fn main() -> ExitCode {
    let Err(e) = run() else {
        return ExitCode::SUCCESS;
    };
    eprintln!("error: {e}");
    ExitCode::FAILURE
}
