//! `kiln mkfs iso9660 SOURCE -o OUT`: a directory or tar into an ISO 9660 image with Rock Ridge
//! (modes, owners, times, symlinks, device nodes, long names) and Joliet, as
//! `xorriso -as mkisofs -R -J` makes it, written to a temp file beside OUT and renamed at the
//! end. Bootable live media come from `kiln build` with `output = ["iso"]`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use kiln_formats::iso9660::{IsoOptions, IsoPlan};
use kiln_formats::repart;
use kiln_tree::{Normalize, SourceArg};

use super::parse_seed;
use super::Print;
use crate::cmd::Outcome;

/// Make an ISO 9660 image (Rock Ridge and Joliet) from a directory or a tar stream.
#[derive(Args, Debug)]
pub struct IsoArgs {
    /// A directory, a tar file (plain, gzip, xz or zstd), or `-` for a tar stream on stdin.
    pub source: PathBuf,
    /// The image to write.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Volume identifier (1..=32 printable ASCII characters).
    #[arg(long, default_value = "KILN")]
    pub label: String,
    /// 32 hex digits (or a UUID): the volume date-UUID derives from it. Default: all zero.
    #[arg(long, value_parser = parse_seed)]
    pub seed: Option<repart::Uuid>,
    /// Leave out the Joliet tree.
    #[arg(long)]
    pub no_joliet: bool,
    #[command(flatten)]
    pub print: Print,
}

pub fn run(a: IsoArgs) -> Outcome {
    let progress = crate::progress::Renderer::new("kiln mkfs", a.print.quiet);
    let norm = Normalize::from_env(false).context("reading SOURCE_DATE_EPOCH")?;
    if a.label.is_empty()
        || a.label.len() > 32
        || !a.label.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
    {
        bail!("--label {:?}: 1..=32 printable ASCII characters", a.label);
    }
    let source = SourceArg::parse(&a.source);
    let (mut tree, contents) = kiln_tree::open_random_access(&source)
        .with_context(|| format!("reading {}", a.source.display()))?;
    norm.apply(&mut tree);
    // The volume dates: SOURCE_DATE_EPOCH, else the newest mtime in the tree (never the clock,
    // so the same tree gives the same image).
    let timestamp = norm.source_date_epoch.unwrap_or_else(|| {
        tree.nodes
            .iter()
            .map(|n| n.meta.mtime.sec)
            .max()
            .unwrap_or(0)
    });
    let mut opts = IsoOptions::new(&a.label, timestamp, &a.seed.unwrap_or(repart::Uuid::nil()));
    opts.joliet = !a.no_joliet;
    let plan =
        IsoPlan::new(&tree, &opts).with_context(|| format!("laying out {}", a.source.display()))?;
    let size = plan.size();
    super::write_fixed(&a.output, size, |sink| {
        Ok(plan.write(&tree, &contents, None, sink)?)
    })?;
    super::tree_summary(&progress, &a.output, size, &tree);
    if a.print.json {
        // docs/json/mkfs-iso9660.schema.json
        let j = serde_json::json!({
            "schema": "kiln.mkfs-iso9660/1",
            "format": "iso9660",
            "output": a.output.display().to_string(),
            "size": size,
            "digest": super::digest_file(&a.output)?,
            "seconds": progress.elapsed().as_secs_f64(),
            "files": plan.extents().len(),
        });
        println!("{j}");
    }
    Ok(std::process::ExitCode::SUCCESS)
}
