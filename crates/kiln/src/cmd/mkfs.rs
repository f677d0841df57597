//! `kiln mkfs ext4|erofs`.

use clap::Subcommand;

use super::Outcome;

mod erofs;

#[derive(Subcommand)]
pub enum MkfsCommand {
    /// An ext4 image.
    Ext4,
    /// An EROFS image (read-only, optionally LZ4-compressed).
    Erofs(erofs::ErofsArgs),
}

pub fn run(cmd: MkfsCommand) -> Outcome {
    match cmd {
        MkfsCommand::Ext4 => anyhow::bail!("kiln mkfs ext4 is not implemented yet"),
        MkfsCommand::Erofs(a) => erofs::run(a),
    }
}
