//! `kiln serve`.

use clap::Args;

use super::Outcome;

#[derive(Args)]
pub struct ServeArgs {}

pub fn run(_args: ServeArgs) -> Outcome {
    anyhow::bail!("kiln serve is not implemented yet")
}
