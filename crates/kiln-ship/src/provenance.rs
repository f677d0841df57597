//! Provenance: an in-toto Statement v1 (<https://in-toto.io/Statement/v1>) whose predicate is
//! SLSA provenance v1 (<https://slsa.dev/provenance/v1>): the subjects (every output with its
//! sha256), the build definition (spec and source digests, seed, kiln version) and the run
//! details (builder, invocation).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{json, Value};

/// The statement `_type`.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// The predicate type.
pub const PREDICATE_TYPE: &str = "https://slsa.dev/provenance/v1";
/// kiln's build type: what the external parameters mean.
pub const BUILD_TYPE: &str = "https://kiln.invalid/build/v1";

/// One output of the build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject {
    /// Output file name.
    pub name: String,
    /// sha256, lowercase hex.
    pub sha256: String,
}

/// Subjects for output files: their file names and sha256s.
pub fn subjects_for_files(files: &[PathBuf]) -> anyhow::Result<Vec<Subject>> {
    files
        .iter()
        .map(|f| {
            let (sha256, _) = crate::digest::sha256_file(f)?;
            let name = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            Ok(Subject { name, sha256 })
        })
        .collect()
}

/// What was built and from what.
#[derive(Clone, Debug, Default)]
pub struct BuildDefinition {
    /// The spec as named on the command line.
    pub spec: String,
    /// sha256 (hex) of the spec file.
    pub spec_sha256: String,
    /// The source tree as named (a directory, a tar).
    pub source: String,
    /// sha256 (hex) of the source: the tar file, or the build's digest of a directory tree.
    pub source_sha256: String,
    /// The seed every UUID and salt derives from.
    pub seed: String,
    /// `SOURCE_DATE_EPOCH`, when set.
    pub source_date_epoch: Option<i64>,
    /// Further external parameters (sorted).
    pub extra: BTreeMap<String, Value>,
}

/// Who ran the build and when.
#[derive(Clone, Debug, Default)]
pub struct RunDetails {
    /// URI of the builder (`https://kiln.invalid/builder/local`, a CI runner's URI).
    pub builder_id: String,
    /// An identifier of this run (CI job URL), if any.
    pub invocation_id: Option<String>,
    /// RFC 3339 start time, if the caller records one (kiln itself never reads the clock).
    pub started_on: Option<String>,
    /// RFC 3339 finish time, if recorded.
    pub finished_on: Option<String>,
}

/// Builds the statement. Subjects are sorted by name so the same build gives the same bytes.
pub fn statement(subjects: &[Subject], def: &BuildDefinition, run: &RunDetails) -> Value {
    let mut subs: Vec<&Subject> = subjects.iter().collect();
    subs.sort_by(|a, b| a.name.cmp(&b.name));
    let subject: Vec<Value> = subs
        .iter()
        .map(|s| json!({ "name": s.name, "digest": { "sha256": s.sha256 } }))
        .collect();
    let mut external = serde_json::Map::new();
    external.insert(
        "spec".into(),
        json!({ "path": def.spec, "digest": { "sha256": def.spec_sha256 } }),
    );
    external.insert(
        "source".into(),
        json!({ "uri": def.source, "digest": { "sha256": def.source_sha256 } }),
    );
    external.insert("seed".into(), json!(def.seed));
    if let Some(e) = def.source_date_epoch {
        external.insert("sourceDateEpoch".into(), json!(e));
    }
    for (k, v) in &def.extra {
        external.insert(k.clone(), v.clone());
    }
    let mut metadata = serde_json::Map::new();
    if let Some(i) = &run.invocation_id {
        metadata.insert("invocationId".into(), json!(i));
    }
    if let Some(t) = &run.started_on {
        metadata.insert("startedOn".into(), json!(t));
    }
    if let Some(t) = &run.finished_on {
        metadata.insert("finishedOn".into(), json!(t));
    }
    let mut run_details = json!({
        "builder": {
            "id": run.builder_id,
            "version": { "kiln": env!("CARGO_PKG_VERSION") },
        },
    });
    if !metadata.is_empty() {
        run_details["metadata"] = Value::Object(metadata);
    }
    json!({
        "_type": STATEMENT_TYPE,
        "subject": subject,
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": Value::Object(external),
                "internalParameters": { "kilnVersion": env!("CARGO_PKG_VERSION") },
                "resolvedDependencies": [
                    { "uri": def.source, "digest": { "sha256": def.source_sha256 } },
                ],
            },
            "runDetails": run_details,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_shape() {
        let s = statement(
            &[
                Subject {
                    name: "b.iso".into(),
                    sha256: "b".repeat(64),
                },
                Subject {
                    name: "a.img".into(),
                    sha256: "a".repeat(64),
                },
            ],
            &BuildDefinition {
                spec: "kiln.toml".into(),
                spec_sha256: "c".repeat(64),
                source: "root.tar".into(),
                source_sha256: "d".repeat(64),
                seed: "00".into(),
                ..Default::default()
            },
            &RunDetails {
                builder_id: "https://kiln.invalid/builder/local".into(),
                ..Default::default()
            },
        );
        assert_eq!(s["_type"], STATEMENT_TYPE);
        assert_eq!(s["predicateType"], PREDICATE_TYPE);
        assert_eq!(s["subject"][0]["name"], "a.img");
        assert_eq!(s["subject"][1]["digest"]["sha256"], "b".repeat(64));
        assert_eq!(
            s["predicate"]["buildDefinition"]["externalParameters"]["spec"]["digest"]["sha256"],
            "c".repeat(64)
        );
        assert_eq!(
            s["predicate"]["buildDefinition"]["externalParameters"]["seed"],
            "00"
        );
        assert_eq!(
            s["predicate"]["runDetails"]["builder"]["id"],
            "https://kiln.invalid/builder/local"
        );
    }
}
