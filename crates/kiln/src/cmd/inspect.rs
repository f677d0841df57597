//! `kiln inspect`.

use clap::Args;

use super::Outcome;

#[derive(Args)]
pub struct InspectArgs {}

pub fn run(_args: InspectArgs) -> Outcome {
    anyhow::bail!("kiln inspect is not implemented yet")
}
