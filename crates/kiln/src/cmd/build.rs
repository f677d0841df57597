//! `kiln build`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::anyhow;
use clap::Args;

use super::Outcome;

/// Build a disk image and/or a hybrid live ISO (`[image] output`), with split artifacts, report,
/// SBOM and provenance, from a spec.
#[derive(Args)]
pub struct BuildArgs {
    /// The spec file, or a directory holding kiln.toml.
    #[arg(default_value = ".")]
    pub spec: PathBuf,
    /// Output directory (created if missing).
    #[arg(short = 'o', long = "output", value_name = "OUTDIR")]
    pub outdir: PathBuf,
    /// Source tree (directory, tar, tar.gz/.xz/.zst, or - for stdin), overriding the spec's.
    #[arg(long, value_name = "PATH")]
    pub source: Option<PathBuf>,
    /// Seed (32 hex digits or a UUID) overriding the spec's: every UUID and salt derives from it.
    #[arg(long, value_name = "HEX32")]
    pub seed: Option<String>,
    /// Image version overriding the spec's `[image] version` (not `--version`, which prints
    /// kiln's own).
    #[arg(long, value_name = "VERSION")]
    pub image_version: Option<String>,
    /// Sign the disk, split artifacts and report with this minisign secret key.
    #[arg(long, value_name = "FILE", alias = "sign")]
    pub key: Option<PathBuf>,
    /// Print the build report (OUTDIR/NAME.json) on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress and no stage lines on stderr (errors still go there).
    #[arg(short, long)]
    pub quiet: bool,
}

pub fn run(a: BuildArgs) -> Outcome {
    let seed = match &a.seed {
        Some(s) => Some(
            kiln_formats::repart::uuid_from_spec(s)
                .ok_or_else(|| anyhow!("--seed {s:?}: expected 32 hex digits or a UUID"))?,
        ),
        None => None,
    };
    let progress = crate::progress::Renderer::new("kiln build", a.quiet);
    let report = kiln_build::image::build_with(
        &kiln_build::image::BuildOptions {
            spec: a.spec,
            outdir: a.outdir.clone(),
            source: a.source,
            seed,
            version: a.image_version,
            sign_key: a.key,
            quiet: a.quiet,
        },
        &progress,
    )?;
    drop(progress);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if !a.quiet {
        for file in report
            .disk
            .iter()
            .map(|d| &d.file)
            .chain(report.iso.iter().map(|i| &i.file))
        {
            println!("{}", a.outdir.join(file).display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
