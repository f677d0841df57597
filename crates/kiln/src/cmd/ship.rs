//! Release engineering: `kiln push|pull|upload|download|manifest|sync|sign|sbom|lint`.

use clap::{Args, Subcommand};

use super::Outcome;

macro_rules! stub {
    ($($args:ident => $f:ident),* $(,)?) => {$(
        #[derive(Args)]
        pub struct $args {}
        pub fn $f(_a: $args) -> Outcome {
            anyhow::bail!(concat!("kiln ", stringify!($f), " is not implemented yet"))
        }
    )*};
}

stub!(PushArgs => push, PullArgs => pull, UploadArgs => upload, DownloadArgs => download,
      SyncArgs => sync, SignArgs => sign, SbomArgs => sbom, LintArgs => lint);

#[derive(Subcommand)]
pub enum ManifestCommand {
    /// Write a manifest for build outputs.
    Emit,
}

pub fn manifest(_c: ManifestCommand) -> Outcome {
    anyhow::bail!("kiln manifest is not implemented yet")
}
