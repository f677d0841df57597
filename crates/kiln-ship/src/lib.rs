//! kiln-ship: getting images to the machines and people who boot them.
