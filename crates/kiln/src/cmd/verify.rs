//! `kiln verify`.

use clap::Args;

use super::Outcome;

#[derive(Args)]
pub struct VerifyArgs {}

pub fn run(_args: VerifyArgs) -> Outcome {
    anyhow::bail!("kiln verify is not implemented yet")
}
