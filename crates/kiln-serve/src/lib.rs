//! kiln-serve: personalised downloads over HTTP, streamed from an immutable base plus patches.
