//! `kiln update`.

use clap::Args;

use super::Outcome;

#[derive(Args)]
pub struct UpdateArgs {}

pub fn run(_args: UpdateArgs) -> Outcome {
    anyhow::bail!("kiln update is not implemented yet")
}
