//! Bulk Data `$export`, driven as a Bulk Data client drives it: kick-off, polling, download
//! and parsing of every NDJSON file, cancel, a restart, and two tenants that must not see
//! each other's jobs.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Method, StatusCode};
use fhirstore_server::config::ServerSettings;
use serde_json::{json, Value};
use support::{open_server, server, Srv, FHIR};

const ASYNC: (&str, &str) = ("prefer", "respond-async");

fn local(url: &str) -> String {
    url.trim_start_matches("http://fhir.test").to_owned()
}

/// Kicks off an export (`uri` under the tenant base) and returns the status URL.
async fn kick_off(s: &Srv, uri: &str, auth: &[(&str, &str)]) -> String {
    let mut headers = vec![ASYNC, ("accept", "application/fhir+json")];
    headers.extend_from_slice(auth);
    let r = s.call(Method::GET, uri, &headers, Body::empty()).await;
    assert_eq!(
        r.status,
        StatusCode::ACCEPTED,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    local(r.header("content-location").expect("Content-Location"))
}

/// Polls the status URL as a client does (honouring `Retry-After`, bounded) until the job
/// ends; returns the final response's status and body.
async fn wait(s: &Srv, status_url: &str, auth: &[(&str, &str)]) -> (StatusCode, Value) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = s.call(Method::GET, status_url, auth, Body::empty()).await;
        if r.status != StatusCode::ACCEPTED {
            return (r.status, r.json());
        }
        assert!(r.header("x-progress").is_some());
        assert!(Instant::now() < deadline, "the export never finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every file of a manifest, downloaded and parsed: type → resources.
async fn download(
    s: &Srv,
    manifest: &Value,
    auth: &[(&str, &str)],
) -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for o in manifest["output"].as_array().expect("output") {
        let url = local(o["url"].as_str().expect("url"));
        let r = s.call(Method::GET, &url, auth, Body::empty()).await;
        assert_eq!(r.status, StatusCode::OK, "{url}");
        assert_eq!(r.header("content-type"), Some("application/fhir+ndjson"));
        let lines: Vec<Value> = String::from_utf8_lossy(&r.body)
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON resource per line"))
            .collect();
        assert_eq!(Some(lines.len() as u64), o["count"].as_u64(), "{url}");
        let t = o["type"].as_str().expect("type").to_owned();
        assert!(lines.iter().all(|r| r["resourceType"] == t.as_str()));
        out.entry(t).or_default().extend(lines);
    }
    out
}

fn ids(resources: &[Value]) -> BTreeSet<String> {
    resources
        .iter()
        .map(|r| r["id"].as_str().unwrap_or("").to_owned())
        .collect()
}

async fn seed(s: &Srv, tenant: &str) {
    let mut entries = Vec::new();
    let mut put = |r: Value| {
        let url = format!(
            "{}/{}",
            r["resourceType"].as_str().unwrap_or(""),
            r["id"].as_str().unwrap_or("")
        );
        entries.push(json!({"resource": r, "request": {"method": "PUT", "url": url}}));
    };
    for i in 0..30 {
        put(
            json!({"resourceType": "Patient", "id": format!("p{i}"), "name": [{"family": format!("F{i}")}]}),
        );
        for j in 0..2 {
            put(
                json!({"resourceType": "Observation", "id": format!("o{i}-{j}"), "status": "final",
                "code": {"text": "x"}, "subject": {"reference": format!("Patient/p{i}")}}),
            );
        }
    }
    put(json!({"resourceType": "Organization", "id": "org", "name": "Clinic"}));
    put(
        json!({"resourceType": "Group", "id": "g", "type": "person", "actual": true,
        "member": (0..5).map(|i| json!({"entity": {"reference": format!("Patient/p{i}")}})).collect::<Vec<_>>()}),
    );
    let r = s
        .post(
            &format!("/fhir/{tenant}"),
            &json!({"resourceType": "Bundle", "type": "transaction", "entry": entries}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
}

/// A system export is the snapshot at its kick-off: writes made right after it (an update, a
/// create, a delete) do not show, every file parses and counts right, and what it holds is
/// what a search of that state finds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_is_one_snapshot() {
    let s = open_server().await;
    seed(&s, "t").await;
    let before: BTreeSet<String> = s
        .all_ids("/fhir/t/Patient?_count=100")
        .await
        .into_iter()
        .collect();
    let status = kick_off(&s, "/fhir/t/$export", &[]).await;
    // Written after the kick-off: none of it may appear, and nothing may go missing.
    let r = s
        .put(
            "/fhir/t/Patient/p0",
            &json!({"resourceType": "Patient", "id": "p0", "name": [{"family": "Changed"}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        s.delete("/fhir/t/Patient/p1").await.status,
        StatusCode::NO_CONTENT
    );
    let r = s
        .put(
            "/fhir/t/Patient/p99",
            &json!({"resourceType": "Patient", "id": "p99"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);

    let (code, manifest) = wait(&s, &status, &[]).await;
    assert_eq!(code, StatusCode::OK, "{manifest}");
    assert!(manifest["transactionTime"].as_str().is_some());
    assert_eq!(manifest["requiresAccessToken"], false);
    assert!(manifest["request"]
        .as_str()
        .is_some_and(|r| r.ends_with("/fhir/t/$export")));
    let files = download(&s, &manifest, &[]).await;
    assert_eq!(
        files.keys().map(String::as_str).collect::<Vec<_>>(),
        ["Group", "Observation", "Organization", "Patient"]
    );
    let patients = &files["Patient"];
    assert_eq!(
        ids(patients),
        before,
        "the Patients as they were at the kick-off"
    );
    let p0 = patients.iter().find(|p| p["id"] == "p0").expect("p0");
    assert_eq!(p0["name"][0]["family"], "F0");
    assert_eq!(files["Observation"].len(), 60);

    // Narrowed: one type, a later _since.
    let status = kick_off(
        &s,
        "/fhir/t/$export?_type=Patient&_outputFormat=application%2Ffhir%2Bndjson",
        &[],
    )
    .await;
    let (_, manifest) = wait(&s, &status, &[]).await;
    let files = download(&s, &manifest, &[]).await;
    assert_eq!(files.keys().collect::<Vec<_>>(), ["Patient"]);
    let mut now: BTreeSet<String> = before.clone();
    now.remove("p1");
    now.insert("p99".into());
    assert_eq!(ids(&files["Patient"]), now);
}

/// Patient and Group exports hold compartments only; `_typeFilter` narrows a type; bad
/// kick-offs are 400s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patient_and_group_exports() {
    let s = open_server().await;
    seed(&s, "t").await;
    let status = kick_off(&s, "/fhir/t/Patient/$export", &[]).await;
    let (_, manifest) = wait(&s, &status, &[]).await;
    let files = download(&s, &manifest, &[]).await;
    // The Group is in its members' compartments (Group.member); the Organization is not.
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        ["Group", "Observation", "Patient"]
    );
    assert_eq!(files["Patient"].len(), 30);
    assert_eq!(files["Observation"].len(), 60);

    let status = kick_off(&s, "/fhir/t/Group/g/$export", &[]).await;
    let (_, manifest) = wait(&s, &status, &[]).await;
    let files = download(&s, &manifest, &[]).await;
    assert_eq!(
        ids(&files["Patient"]),
        (0..5).map(|i| format!("p{i}")).collect()
    );
    assert_eq!(files["Observation"].len(), 10);

    let status = kick_off(
        &s,
        "/fhir/t/Patient/$export?_type=Observation&_typeFilter=Observation%3Fsubject%3DPatient%2Fp3",
        &[],
    )
    .await;
    let (_, manifest) = wait(&s, &status, &[]).await;
    let files = download(&s, &manifest, &[]).await;
    assert_eq!(
        ids(&files["Observation"]),
        ["o3-0", "o3-1"].iter().map(|s| s.to_string()).collect()
    );

    for (uri, headers) in [
        ("/fhir/t/$export", vec![]),
        ("/fhir/t/$export?_outputFormat=text%2Fcsv", vec![ASYNC]),
        ("/fhir/t/Patient/$export?_type=Organization", vec![ASYNC]),
        (
            "/fhir/t/$export?_typeFilter=Observation%3Fnope%3D1",
            vec![ASYNC],
        ),
        ("/fhir/t/$export-status/nojob", vec![]),
    ] {
        let r = s.call(Method::GET, uri, &headers, Body::empty()).await;
        assert!(r.status.is_client_error(), "{uri}: {}", r.status);
        r.issue();
    }
    assert_eq!(
        s.call(
            Method::GET,
            "/fhir/t/Group/nogroup/$export",
            &[ASYNC],
            Body::empty()
        )
        .await
        .status,
        StatusCode::NOT_FOUND
    );
    // POST with a Parameters body.
    let r = s
        .call(
            Method::POST,
            "/fhir/t/$export",
            &[ASYNC, FHIR],
            json!({"resourceType": "Parameters", "parameter": [
                {"name": "_type", "valueString": "Organization"}]})
            .to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let (_, manifest) = wait(
        &s,
        &local(r.header("content-location").expect("location")),
        &[],
    )
    .await;
    assert_eq!(
        download(&s, &manifest, &[])
            .await
            .keys()
            .collect::<Vec<_>>(),
        ["Organization"]
    );
}

/// `DELETE` on the status URL cancels the job and removes its files; a job a restart
/// interrupted ends as complete or failed, never "in progress".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_restart() {
    let s = open_server().await;
    seed(&s, "t").await;
    let status = kick_off(&s, "/fhir/t/$export", &[]).await;
    let id = status.rsplit('/').next().expect("id").to_owned();
    let dir = s.dir.path().join("exports").join("t").join(&id);
    assert!(dir.exists());
    let r = s.call(Method::DELETE, &status, &[], Body::empty()).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(s.get(&status).await.status, StatusCode::NOT_FOUND);
    assert!(!dir.exists(), "the files went with the job");

    // A second server over the same data directory finds a job the first left running.
    let status = kick_off(&s, "/fhir/t/$export", &[]).await;
    let id = status.rsplit('/').next().expect("id").to_owned();
    let record = s
        .dir
        .path()
        .join("exports")
        .join("t")
        .join(&id)
        .join("job.json");
    let text = std::fs::read_to_string(&record).expect("record");
    let mut job: Value = serde_json::from_str(&text).expect("json");
    job["state"] = json!("InProgress");
    let other = tempfile::tempdir().expect("dir");
    let copy = other.path().join("exports").join("t").join(&id);
    std::fs::create_dir_all(&copy).expect("copy dir");
    std::fs::write(copy.join("job.json"), job.to_string()).expect("copy");
    let settings = ServerSettings {
        export_dir: Some(other.path().join("exports")),
        ..ServerSettings::default()
    };
    let restarted = support::server(settings).await;
    fhirstore_server::export::recover(&restarted.app);
    let (code, body) = wait(&restarted, &status, &[]).await;
    assert_eq!(code, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        body.to_string().contains("stopped while this export ran"),
        "{body}"
    );
    // The first server's own job still completes.
    assert_eq!(wait(&s, &status, &[]).await.0, StatusCode::OK);
}

/// Jobs belong to their tenant: another tenant's token can neither poll nor download them,
/// by their own base or the owner's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_stay_in_their_tenant() {
    let s = server(ServerSettings {
        tokens: vec![
            ("a".into(), "token-a".into()),
            ("b".into(), "token-b".into()),
        ],
        ..ServerSettings::default()
    })
    .await;
    let a = [("authorization", "Bearer token-a")];
    let b = [("authorization", "Bearer token-b")];
    let r = s
        .call(
            Method::PUT,
            "/fhir/a/Patient/secret",
            &[FHIR, a[0]],
            json!({"resourceType": "Patient", "id": "secret"}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let status = kick_off(&s, "/fhir/a/$export", &a).await;
    let (code, manifest) = wait(&s, &status, &a).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(manifest["requiresAccessToken"], true);
    let file = local(manifest["output"][0]["url"].as_str().expect("url"));
    let id = status.rsplit('/').next().expect("id");
    for (uri, auth, want) in [
        (status.clone(), &b, StatusCode::FORBIDDEN),
        (
            format!("/fhir/b/$export-status/{id}"),
            &b,
            StatusCode::NOT_FOUND,
        ),
        (file.clone(), &b, StatusCode::FORBIDDEN),
        (
            file.replace("/fhir/a/", "/fhir/b/"),
            &b,
            StatusCode::NOT_FOUND,
        ),
        (file.clone(), &a, StatusCode::OK),
    ] {
        let r = s.call(Method::GET, &uri, auth, Body::empty()).await;
        assert_eq!(r.status, want, "{uri}");
        if want != StatusCode::OK {
            assert!(!String::from_utf8_lossy(&r.body).contains("secret"));
        }
    }
}

/// An export's files expire `export_ttl` after its kick-off: the status and files are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_expire() {
    let s = server(ServerSettings {
        export_ttl: Duration::from_millis(200),
        ..ServerSettings::default()
    })
    .await;
    seed(&s, "t").await;
    let status = kick_off(&s, "/fhir/t/$export?_type=Organization", &[]).await;
    let (code, manifest) = wait(&s, &status, &[]).await;
    assert_eq!(code, StatusCode::OK);
    let id = status.rsplit('/').next().expect("id").to_owned();
    let dir = s.dir.path().join("exports").join("t").join(&id);
    // The record says when it was made: age it past the time to live.
    let record = dir.join("job.json");
    let mut job: Value =
        serde_json::from_str(&std::fs::read_to_string(&record).expect("read")).expect("json");
    job["transaction_time"] = json!(job["transaction_time"].as_i64().expect("time") - 1_000_000);
    std::fs::write(&record, job.to_string()).expect("write");
    fhirstore_server::export::sweep_all(&s.app);
    assert!(!dir.exists());
    assert_eq!(s.get(&status).await.status, StatusCode::NOT_FOUND);
    let file = local(manifest["output"][0]["url"].as_str().expect("url"));
    assert_eq!(s.get(&file).await.status, StatusCode::NOT_FOUND);
}
