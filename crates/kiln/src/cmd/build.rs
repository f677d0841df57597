//! `kiln build`.

use clap::Args;

use super::Outcome;

#[derive(Args)]
pub struct BuildArgs {}

pub fn run(_args: BuildArgs) -> Outcome {
    anyhow::bail!("kiln build is not implemented yet")
}
