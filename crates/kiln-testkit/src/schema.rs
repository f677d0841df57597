//! `--json` outputs against their JSON Schemas (`docs/json/NAME.schema.json`, draft 2020-12).

use std::path::PathBuf;

use serde_json::Value;

/// `docs/json` in the repository.
pub fn schema_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/json")
}

/// The schema `docs/json/NAME.schema.json`, checked against the draft 2020-12 meta-schema.
pub fn load(name: &str) -> Value {
    let path = schema_dir().join(format!("{name}.schema.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let schema: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
    assert!(
        jsonschema::draft202012::meta::is_valid(&schema),
        "{} is not a valid draft 2020-12 schema",
        path.display()
    );
    schema
}

/// Every way `doc` breaks schema `name` (`docs/json/NAME.schema.json`), one line each.
pub fn errors(name: &str, doc: &Value) -> Vec<String> {
    let schema = load(name);
    let validator =
        jsonschema::draft202012::new(&schema).unwrap_or_else(|e| panic!("schema {name}: {e}"));
    validator
        .iter_errors(doc)
        .map(|e| format!("at {:?}: {e}", e.instance_path().to_string()))
        .collect()
}

/// Panics unless `doc` follows schema `name` and says so in its `schema` field.
pub fn assert_valid(name: &str, doc: &Value) {
    let errs = errors(name, doc);
    assert!(
        errs.is_empty(),
        "output does not follow docs/json/{name}.schema.json:\n  {}\n{}",
        errs.join("\n  "),
        serde_json::to_string_pretty(doc).unwrap_or_default()
    );
}

/// Parses a command's stdout as one JSON document and checks it against schema `name`.
pub fn assert_valid_output(name: &str, stdout: &[u8]) -> Value {
    let doc: Value = serde_json::from_slice(stdout).unwrap_or_else(|e| {
        panic!(
            "not one JSON document ({e}):\n{}",
            String::from_utf8_lossy(stdout)
        )
    });
    assert_valid(name, &doc);
    doc
}
