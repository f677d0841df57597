//! `kiln mkfs ext4|erofs`.

use clap::Subcommand;

use super::Outcome;

#[derive(Subcommand)]
pub enum MkfsCommand {
    /// An ext4 image.
    Ext4,
    /// An EROFS image.
    Erofs,
}

pub fn run(cmd: MkfsCommand) -> Outcome {
    match cmd {
        MkfsCommand::Ext4 => anyhow::bail!("kiln mkfs ext4 is not implemented yet"),
        MkfsCommand::Erofs => anyhow::bail!("kiln mkfs erofs is not implemented yet"),
    }
}
