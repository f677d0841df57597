//! A small driver for the ISO 9660 writer and reader, for benchmarks and debugging (the kiln
//! CLI gets its ISO output through `kiln build`):
//!
//! ```text
//! cargo run --release -p kiln-formats --example iso -- build SRC_DIR OUT.iso [--esp ESP.img] [--hybrid] [--label L]
//! cargo run --release -p kiln-formats --example iso -- dump IMAGE.iso
//! ```

use std::fs::File;
use std::path::PathBuf;
use std::process::ExitCode;

use kiln_formats::fstree::HostContents;
use kiln_formats::iso9660::writer::HybridOptions;
use kiln_formats::iso9660::{dump, IsoOptions, IsoPlan, ReadAt};
use kiln_formats::repart::Uuid;
use kiln_formats::sink::FileSink;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("dump") => {
            let path = args.get(1).ok_or("dump needs an image path")?;
            let f = File::open(path)?;
            let len = f.metadata()?.len();
            print!("{}", dump::dump(&f, len)?);
            Ok(())
        }
        Some("build") => {
            let src = PathBuf::from(args.get(1).ok_or("build needs SRC_DIR OUT")?);
            let out = PathBuf::from(args.get(2).ok_or("build needs SRC_DIR OUT")?);
            let mut esp: Option<PathBuf> = None;
            let mut hybrid = false;
            let mut label = "KILN".to_string();
            let mut i = 3;
            while i < args.len() {
                match args[i].as_str() {
                    "--esp" => {
                        esp = Some(args.get(i + 1).ok_or("--esp needs a path")?.into());
                        i += 1;
                    }
                    "--hybrid" => hybrid = true,
                    "--label" => {
                        label = args.get(i + 1).ok_or("--label needs a value")?.clone();
                        i += 1;
                    }
                    other => return Err(format!("unknown argument {other:?}").into()),
                }
                i += 1;
            }
            let epoch: i64 = std::env::var("SOURCE_DATE_EPOCH")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let seed = Uuid::from_bytes(*b"kiln-iso-example");
            let tree = kiln_tree::dir::read_dir_tree(&src)?;
            let mut opts = IsoOptions::new(&label, epoch, &seed);
            let esp_file = match &esp {
                Some(p) => Some(File::open(p)?),
                None => None,
            };
            if let Some(f) = &esp_file {
                opts.esp_len = Some(f.metadata()?.len());
            }
            if hybrid {
                opts.hybrid = Some(HybridOptions::from_seed(&seed));
            }
            let plan = IsoPlan::new(&tree, &opts)?;
            let f = File::create(&out)?;
            f.set_len(plan.size())?;
            plan.write(
                &tree,
                &HostContents,
                esp_file.as_ref().map(|f| f as &dyn ReadAt),
                &FileSink::new(&f, 0, plan.size()),
            )?;
            eprintln!("{}: {} bytes", out.display(), plan.size());
            Ok(())
        }
        _ => Err(
            "usage: iso build SRC OUT [--esp IMG] [--hybrid] [--label L] | iso dump IMAGE".into(),
        ),
    }
}
