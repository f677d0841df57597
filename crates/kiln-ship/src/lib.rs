//! kiln-ship: getting images to the machines and people who boot them.
//!
//! - [`image_source`]: `oci://` container images as build sources (layers streamed once).
//! - [`oci`]: ORAS-compatible artifacts in OCI registries (push, pull with resume, referrers).
//! - [`store`]: S3-compatible object stores (S3, R2, MinIO) with `.sha256` sidecars and
//!   conditional puts.
//! - [`manifest`]: versioned release manifests, slice merges, conditional publishing.
//! - [`ranges`]: byte ranges of a remote file, in parallel, checked unit by unit, resumed.
//! - [`sync`]: bring a local cache up to date with a manifest, downloading only what changed.
//! - [`sign`]: minisign signatures compatible with the `minisign` CLI.
//! - [`sbom`]: SPDX 2.3 JSON from a tree's dpkg and rpm databases.
//! - [`provenance`]: in-toto Statement v1 with a SLSA provenance v1 predicate.
//! - [`policy`]: forbidden patterns in names and file contents, streamed.
//!
//! Library functions return `anyhow::Result` with context naming the file, key or URL at fault;
//! failures a caller may want to tell apart are [`Error`] values inside (use
//! `err.downcast_ref::<kiln_ship::Error>()`).

#![forbid(unsafe_code)]

pub mod digest;
pub mod image_source;
pub mod manifest;
pub mod oci;
pub mod policy;
pub mod provenance;
pub mod ranges;
pub mod sbom;
pub mod sign;
pub mod spool;
pub mod store;
pub mod sync;
pub mod time;

/// Failures callers tell apart. Messages are lowercase and name what was checked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Downloaded or stored bytes do not hash to what was promised.
    #[error("{what}: sha256 mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The blob, file or key checked.
        what: String,
        /// The digest promised (manifest, descriptor or sidecar).
        expected: String,
        /// The digest of the bytes received.
        actual: String,
    },
    /// Bytes received are not the promised length.
    #[error("{what}: size mismatch: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        /// The blob or file checked.
        what: String,
        /// Bytes promised.
        expected: u64,
        /// Bytes received.
        actual: u64,
    },
    /// A conditional write lost a race: the object changed since it was read.
    #[error("{key}: conditional write refused: the object changed since it was read (or was created concurrently)")]
    Conflict {
        /// The object key.
        key: String,
    },
    /// A file name from a remote artifact would escape the output directory.
    #[error("layer title {title:?}: {reason}")]
    UnsafeTitle {
        /// The title annotation as received.
        title: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A signature did not verify.
    #[error("{path}: signature verification failed: {reason}")]
    BadSignature {
        /// The signed file.
        path: String,
        /// What the verifier said.
        reason: String,
    },
}

/// Builds the single-threaded tokio runtime the CLI runs the network commands on.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("starting the async runtime: {e}"))
}
