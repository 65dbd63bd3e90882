//! The `fhirstore` command, run as a user runs it.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn fhirstore(data: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fhirstore"))
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run fhirstore")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "fhirstore failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn search(data: &Path, tenant: &str, q: &str) -> Value {
    serde_json::from_str(&ok(&fhirstore(data, &["search", tenant, q]))).expect("a Bundle")
}

fn ids(bundle: &Value) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["resource"]["id"].as_str().map(str::to_owned))
        .collect()
}

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/r4-examples")
}

#[test]
fn import_the_r4_examples_then_search_reconcile_and_status() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path();
    // Every example resource; the example Bundles are examples of the Bundle format (a
    // transaction calling `$lookup`, batches of reads, responses), not data to load.
    let examples: Vec<String> = std::fs::read_dir(examples())
        .expect("examples")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            !p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("Bundle-"))
        })
        .filter_map(|p| p.to_str().map(str::to_owned))
        .collect();
    assert!(examples.len() > 600);
    let mut args = vec!["import", "--tenant", "ex"];
    args.extend(examples.iter().map(String::as_str));
    let out = ok(&fhirstore(data, &args));
    assert!(
        out.contains(&format!("from {} files", examples.len())),
        "the summary names every file: {out}"
    );
    // Synthea's transaction Bundles, each one transaction with urn:uuid references resolved.
    let synthea = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/synthea");
    ok(&fhirstore(
        data,
        &["import", "--tenant", "ex", synthea.to_str().expect("utf-8")],
    ));
    let enc = search(data, "ex", "Encounter?_count=1");
    let subject = enc["entry"][0]["resource"]["subject"]["reference"]
        .as_str()
        .unwrap_or("");
    assert!(subject.starts_with("Patient/"), "{subject}");
    let linked = search(
        data,
        "ex",
        &format!("Patient?_id={}", subject.trim_start_matches("Patient/")),
    );
    assert_eq!(
        ids(&linked).len(),
        1,
        "the Encounter's subject was imported with it"
    );

    let patients = search(data, "ex", "Patient?family=Chalmers");
    assert!(ids(&patients).contains(&"example".to_owned()), "{patients}");
    let weight = search(
        data,
        "ex",
        "Observation?code=http://loinc.org|29463-7&subject=Patient/example&_total=accurate",
    );
    assert!(ids(&weight).contains(&"example".to_owned()));
    assert!(weight["total"].as_u64().is_some_and(|n| n >= 1));
    let nobody = search(data, "other", "Patient?family=Chalmers");
    assert!(ids(&nobody).is_empty(), "another tenant sees none of it");
    // Full text goes to tantivy, which import kept in step.
    let text = search(data, "ex", "Patient?_content=Chalmers");
    assert!(ids(&text).contains(&"example".to_owned()), "{text}");

    let report: Value = serde_json::from_str(&ok(&fhirstore(
        data,
        &["reconcile", "--tenant", "ex", "--json"],
    )))
    .expect("JSON report");
    for count in ["missing", "extra", "stale", "ahead", "repaired"] {
        assert_eq!(report[count], 0, "{count} in {report}");
    }
    assert!(report["entries"].as_array().is_some_and(|e| e.len() > 10));
    let dry = ok(&fhirstore(
        data,
        &[
            "reconcile",
            "--tenant",
            "ex",
            "--type",
            "Patient",
            "--dry-run",
            "--deep",
        ],
    ));
    assert!(
        dry.contains("missing 0, extra 0, stale 0, ahead 0, repaired 0"),
        "{dry}"
    );

    let status: Value = serde_json::from_str(&ok(&fhirstore(data, &["status"]))).expect("JSON");
    assert_eq!(status["secondaries"][0]["name"], "tantivy");
    assert_eq!(status["secondaries"][0]["lagChanges"], 0);
}

/// Runs an import that must fail, and returns what it printed on stderr.
fn import_fails(data: &Path, input: &Path) -> String {
    let out = fhirstore(
        data,
        &["import", "--tenant", "bad", input.to_str().expect("utf-8")],
    );
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn import_stops_at_bad_input_naming_it_and_keeps_what_came_before() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).expect("mkdir");
    let line = |i: usize| {
        format!(r#"{{"resourceType": "Patient", "id": "n{i}", "name": [{{"family": "Nd"}}]}}"#)
    };
    std::fs::write(
        input.join("a.ndjson"),
        format!(
            "{}\n{}\n\n{}\n{{broken\n{}\n",
            line(1),
            line(2),
            line(3),
            line(4)
        ),
    )
    .expect("write");
    let err = import_fails(&data, &input);
    assert!(err.contains("a.ndjson, line 5: not JSON"), "{err}");
    let kept = search(&data, "bad", "Patient?family=Nd&_total=accurate");
    assert_eq!(kept["total"], 3, "the lines before the bad one are stored");

    // A resource the store refuses, in a collection Bundle read entry by entry.
    std::fs::remove_file(input.join("a.ndjson")).expect("rm");
    std::fs::write(
        input.join("b.json"),
        r#"{"resourceType": "Bundle", "type": "collection", "entry": [
            {"resource": {"resourceType": "Patient", "id": "c0", "name": [{"family": "Coll"}]}},
            {"resource": {"resourceType": "Patient", "id": "c1", "gender": 5}},
            {"resource": {"resourceType": "Patient", "id": "c2", "name": [{"family": "Coll"}]}}]}"#,
    )
    .expect("write");
    let err = import_fails(&data, &input);
    assert!(err.contains("b.json, entry 1: invalid resource"), "{err}");
    assert_eq!(ids(&search(&data, "bad", "Patient?family=Coll")), ["c0"]);

    // A transaction Bundle is all or nothing.
    std::fs::remove_file(input.join("b.json")).expect("rm");
    std::fs::write(
        input.join("t.json"),
        r#"{"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": {"resourceType": "Patient", "name": [{"family": "Tx"}]},
             "request": {"method": "POST", "url": "Patient"}},
            {"resource": {"resourceType": "Patient", "gender": 5},
             "request": {"method": "POST", "url": "Patient"}}]}"#,
    )
    .expect("write");
    let out = fhirstore(
        &data,
        &[
            "import",
            "--tenant",
            "bad",
            input.join("t.json").to_str().expect("utf-8"),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("t.json, the transaction: "), "{err}");
    assert!(ids(&search(&data, "bad", "Patient?family=Tx")).is_empty());

    let missing = fhirstore(&data, &["import", "/no/such/file.json"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/no/such/file.json"));
}

/// `import --keep-going` over the whole official examples folder (Bundles included) and a
/// folder of bad files: it imports everything it can, batching single-resource files into
/// chunks, writes one report line for exactly each thing it could not take, and exits
/// non-zero.
#[test]
fn import_keeps_going_and_reports_exactly_what_it_could_not_take() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(&bad).expect("mkdir");
    std::fs::write(
        bad.join("lines.ndjson"),
        concat!(
            r#"{"resourceType": "Patient", "id": "kg1", "name": [{"family": "KeepGoing"}]}"#,
            "\n{broken\n",
            r#"{"resourceType": "Patient", "id": "kg2", "gender": 5}"#,
            "\n",
            r#"{"resourceType": "Patient", "id": "kg3", "name": [{"family": "KeepGoing"}]}"#,
            "\n"
        ),
    )
    .expect("write");
    std::fs::write(bad.join("not-json.json"), "{nope").expect("write");
    std::fs::write(
        bad.join("twice.json"),
        r#"{"resourceType": "Patient", "id": "kg4", "gender": "male", "gender": "female"}"#,
    )
    .expect("write");
    let report = dir.path().join("report.ndjson");
    let out = fhirstore(
        &data,
        &[
            "import",
            "--tenant",
            "kg",
            "--keep-going",
            "--report",
            report.to_str().expect("utf-8"),
            examples().to_str().expect("utf-8"),
            bad.to_str().expect("utf-8"),
        ],
    );
    assert!(
        !out.status.success(),
        "a rejection makes the exit status fail"
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(stderr.contains("rejected; the report is"), "{stderr}");
    let lines: Vec<Value> = std::fs::read_to_string(&report)
        .expect("report")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let place = |v: &Value| {
        let file = v["file"].as_str().unwrap_or("");
        let name = Path::new(file)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_owned();
        (name, v["at"].as_str().map(str::to_owned))
    };
    let ours: Vec<(String, Option<String>)> = lines
        .iter()
        .map(place)
        .filter(|(f, _)| matches!(f.as_str(), "lines.ndjson" | "not-json.json" | "twice.json"))
        .collect();
    assert_eq!(
        ours,
        [
            ("lines.ndjson".to_owned(), Some("line 2".to_owned())),
            ("lines.ndjson".to_owned(), Some("line 3".to_owned())),
            ("not-json.json".to_owned(), None),
            ("twice.json".to_owned(), None),
        ]
    );
    for l in &lines {
        let status = l["status"].as_u64().unwrap_or(0);
        assert!((400..500).contains(&status), "{l}");
        assert_eq!(l["outcome"]["resourceType"], "OperationOutcome", "{l}");
    }
    // The rest is in: the good lines around the bad ones, and every example file.
    assert_eq!(
        ids(&search(&data, "kg", "Patient?family=KeepGoing")),
        ["kg1", "kg3"]
    );
    let example = search(&data, "kg", "Patient?_id=example");
    assert_eq!(ids(&example), ["example"]);
    // Single-resource files share commits.
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let number = |after: &str| -> u64 {
        stdout
            .split(after)
            .next()
            .and_then(|s| s.split_whitespace().last())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let (files, commits) = (number(" files in"), number(" commits"));
    assert!(files > 600, "{stdout}");
    assert!(commits * 4 < files, "{stdout}");
}

#[test]
fn serve_refuses_an_open_api_beyond_loopback() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = fhirstore(dir.path(), &["serve", "--listen", "0.0.0.0:0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to listen on 0.0.0.0:0"));
}
