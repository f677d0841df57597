//! One module per subcommand, each with its `*Args` and a `run`.

pub mod boot;
pub mod build;
pub mod inject;
pub mod inspect;
pub mod mkfs;
pub mod serve;
pub mod ship;
pub mod update;
pub mod verify;

/// What every subcommand returns.
pub type Outcome = anyhow::Result<std::process::ExitCode>;
