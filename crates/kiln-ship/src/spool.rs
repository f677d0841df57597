//! Reading any kiln source with random access to its bytes (see `kiln_tree::spool`).

use anyhow::Context;
use kiln_formats::fstree::Tree;
use kiln_tree::{SourceArg, SourceContents};

/// Opens a source for scanning: the tree and a reader for its bytes.
pub fn open(arg: &SourceArg) -> anyhow::Result<(Tree, SourceContents)> {
    kiln_tree::open_random_access(arg).with_context(|| format!("{arg:?}"))
}
