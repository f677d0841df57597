//! `kiln boot`.

use clap::Args;

use super::Outcome;

#[derive(Args)]
pub struct BootArgs {}

pub fn run(_args: BootArgs) -> Outcome {
    anyhow::bail!("kiln boot is not implemented yet")
}
