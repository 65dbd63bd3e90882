//! Loaders for the data under `fixtures/`.

use std::path::PathBuf;

use serde_json::Value;

/// The folder holding the official FHIR R4 clinical examples (from `hl7.fhir.r4.examples@4.0.1`).
pub fn r4_examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/r4-examples")
}

/// Every example, as (file name, resource), sorted by file name.
pub fn r4_examples() -> Vec<(String, Value)> {
    json_files(&r4_examples_dir())
}

/// The Synthea patients under `fixtures/synthea` (one transaction Bundle each, made with
/// `tietai-synthea`; the README gives the command and seed), as (file name, Bundle).
pub fn synthea_bundles() -> Vec<(String, Value)> {
    json_files(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/synthea"))
}

/// Every `.json` file in `dir`, parsed, sorted by file name.
fn json_files(dir: &std::path::Path) -> Vec<(String, Value)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p)
                .unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("parsing {}: {e}", p.display()));
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (name, v)
        })
        .collect()
}
