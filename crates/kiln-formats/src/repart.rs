//! systemd-repart's deterministic identifiers (SPECS.md, "systemd-repart deterministic IDs").
