//! kiln-inject: slots and patch plans. A slot is a file whose storage was reserved contiguously
//! at build time; injecting a payload is a handful of [`Region`] patches over the immutable base,
//! and a composed image ("base + patches") reads and seeks like a file.
