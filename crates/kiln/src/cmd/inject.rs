//! `kiln inject`.

use clap::Args;

use super::Outcome;

#[derive(Args)]
pub struct InjectArgs {}

pub fn run(_args: InjectArgs) -> Outcome {
    anyhow::bail!("kiln inject is not implemented yet")
}
