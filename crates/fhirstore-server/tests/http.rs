//! The REST API, called in process: every interaction, its headers, and every error status.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Method, StatusCode};
use fhirstore_server::config::ServerSettings;
use serde_json::{json, Value};
use support::{open_server, server, Srv, FHIR};

fn patient(family: &str) -> Value {
    json!({"resourceType": "Patient", "name": [{"family": family}], "gender": "female"})
}

async fn create(s: &Srv, tenant: &str, body: &Value) -> String {
    let rt = body["resourceType"].as_str().unwrap_or("");
    let r = s.post(&format!("/fhir/{tenant}/{rt}"), body).await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()["id"].as_str().unwrap_or("").to_owned()
}

async fn total(s: &Srv, uri: &str) -> u64 {
    let sep = if uri.contains('?') { '&' } else { '?' };
    let r = s.get(&format!("{uri}{sep}_summary=count")).await;
    assert_eq!(r.status, StatusCode::OK);
    r.json()["total"].as_u64().unwrap_or(u64::MAX)
}

#[tokio::test]
async fn crud_versions_and_headers() {
    let s = open_server().await;
    let r = s.post("/fhir/t1/Patient", &patient("Ng")).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let id = r.json()["id"].as_str().expect("id").to_owned();
    assert_eq!(
        r.header("location"),
        Some(format!("http://fhir.test/fhir/t1/Patient/{id}/_history/1").as_str())
    );
    assert_eq!(r.header("etag"), Some("W/\"1\""));
    assert!(r
        .header("last-modified")
        .is_some_and(|d| d.ends_with(" GMT")));
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("application/fhir+json")));

    let read = s.get(&format!("/fhir/t1/Patient/{id}")).await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.header("etag"), Some("W/\"1\""));
    assert_eq!(read.json()["name"][0]["family"], "Ng");
    let cached = s
        .call(
            Method::GET,
            &format!("/fhir/t1/Patient/{id}"),
            &[("if-none-match", "W/\"1\"")],
            Body::empty(),
        )
        .await;
    assert_eq!(cached.status, StatusCode::NOT_MODIFIED);
    // If-Modified-Since: the resource's own Last-Modified is not modified since; a second
    // earlier is; an unreadable date is no condition; If-None-Match wins over it.
    let last_modified = read.header("last-modified").unwrap_or("").to_owned();
    let earlier = "Mon, 01 Jan 2001 00:00:00 GMT";
    for (headers, expected) in [
        (
            vec![("if-modified-since", last_modified.as_str())],
            StatusCode::NOT_MODIFIED,
        ),
        (vec![("if-modified-since", earlier)], StatusCode::OK),
        (vec![("if-modified-since", "yesterday")], StatusCode::OK),
        (
            vec![
                ("if-none-match", "W/\"7\""),
                ("if-modified-since", last_modified.as_str()),
            ],
            StatusCode::OK,
        ),
    ] {
        let r = s
            .call(
                Method::GET,
                &format!("/fhir/t1/Patient/{id}"),
                &headers,
                Body::empty(),
            )
            .await;
        assert_eq!(r.status, expected, "{headers:?}");
    }

    let mut body = read.json();
    body["gender"] = json!("male");
    let uri = format!("/fhir/t1/Patient/{id}");
    // The same If-Match twice: the first write wins, the second is refused.
    let mut answers = Vec::new();
    for _ in 0..2 {
        let h = [FHIR, ("if-match", "W/\"1\"")];
        answers.push(s.call(Method::PUT, &uri, &h, body.to_string()).await);
    }
    let (up, stale) = (&answers[0], &answers[1]);
    assert_eq!(up.status, StatusCode::OK);
    assert_eq!(up.header("etag"), Some("W/\"2\""));
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(stale.issue(), "conflict");
    assert_eq!(s.get(&uri).await.header("etag"), Some("W/\"2\""));

    let made = s
        .put(
            "/fhir/t1/Patient/chosen-id",
            &json!({"resourceType": "Patient", "id": "chosen-id"}),
        )
        .await;
    assert_eq!(made.status, StatusCode::CREATED, "update-as-create");
    assert!(made
        .header("location")
        .is_some_and(|l| l.ends_with("/Patient/chosen-id/_history/1")));

    let v1 = s.get(&format!("{uri}/_history/1")).await;
    assert_eq!(v1.status, StatusCode::OK);
    assert_eq!(v1.json()["gender"], "female");
    assert_eq!(v1.json()["meta"]["versionId"], "1");

    let del = s.delete(&uri).await;
    assert_eq!(del.status, StatusCode::NO_CONTENT);
    assert_eq!(del.header("etag"), Some("W/\"3\""));
    let gone = s.get(&uri).await;
    assert_eq!(gone.status, StatusCode::GONE);
    assert_eq!(gone.issue(), "deleted");
    assert_eq!(
        s.get(&format!("{uri}/_history/3")).await.status,
        StatusCode::GONE
    );
    assert_eq!(
        s.get(&format!("{uri}/_history/2")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        s.get(&format!("{uri}/_history/9")).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        s.delete(&uri).await.status,
        StatusCode::NO_CONTENT,
        "deleting twice is fine"
    );

    let h = s.get(&format!("{uri}/_history")).await.json();
    assert_eq!(h["type"], "history");
    let methods: Vec<&str> = h["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["request"]["method"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(methods, ["DELETE", "PUT", "POST"]);
    assert!(h["entry"][0].get("resource").is_none());
    let th = s.get("/fhir/t1/Patient/_history").await.json();
    assert_eq!(th["entry"].as_array().map(Vec::len), Some(4));
    let sys = s.get("/fhir/t1/_history?_count=2").await.json();
    assert_eq!(sys["entry"].as_array().map(Vec::len), Some(2));
    assert!(sys["link"][1]["relation"] == "next");

    let srv = &s;
    let prefer = |value: &'static str| async move {
        let h = [FHIR, ("prefer", value)];
        let body = patient("Min").to_string();
        srv.call(Method::POST, "/fhir/t1/Patient", &h, body).await
    };
    let minimal = prefer("return=minimal").await;
    assert_eq!(minimal.status, StatusCode::CREATED);
    assert!(minimal.body.is_empty());
    assert!(minimal.header("location").is_some());
    let oo = prefer("return=OperationOutcome").await;
    assert_eq!(oo.json()["resourceType"], "OperationOutcome");

    let subset = s
        .get("/fhir/t1/Patient/chosen-id?_elements=gender")
        .await
        .json();
    assert_eq!(subset["meta"]["tag"][0]["code"], "SUBSETTED");
    let found = s
        .get("/fhir/t1/Patient?family=Min&_elements=gender")
        .await
        .json();
    assert_eq!(found["entry"][0]["resource"]["gender"], "female");
    assert!(found["entry"][0]["resource"].get("name").is_none());

    let zipped = s
        .call(
            Method::GET,
            "/fhir/t1/Patient?_count=50",
            &[("accept-encoding", "gzip")],
            Body::empty(),
        )
        .await;
    assert_eq!(zipped.header("content-encoding"), Some("gzip"));
}

/// Method, URI, headers, body, expected status and issue code.
type Case = (
    Method,
    String,
    Vec<(&'static str, &'static str)>,
    String,
    StatusCode,
    &'static str,
);

#[tokio::test]
async fn errors_are_operation_outcomes_with_the_right_status() {
    let s = server(ServerSettings {
        max_body: 4_000,
        ..ServerSettings::default()
    })
    .await;
    let id = create(&s, "t", &patient("Kept")).await;
    let uri = format!("/fhir/t/Patient/{id}");
    let cases: Vec<Case> = vec![
        (
            Method::POST,
            "/fhir/t/Patient".into(),
            vec![FHIR],
            "{nope".into(),
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            Method::POST,
            "/fhir/t/Patient".into(),
            vec![FHIR],
            json!({"resourceType": "Observation"}).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            Method::PUT,
            uri.clone(),
            vec![FHIR],
            json!({"resourceType": "Patient", "id": "other"}).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            Method::PUT,
            uri.clone(),
            vec![FHIR],
            json!({"resourceType": "Patient"}).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            Method::PUT,
            uri.clone(),
            vec![FHIR, ("if-match", "yesterday")],
            json!({"resourceType": "Patient", "id": id}).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            Method::GET,
            "/fhir/t/Patient/$match".into(),
            vec![],
            String::new(),
            StatusCode::BAD_REQUEST,
            "not-supported",
        ),
        (
            Method::GET,
            "/fhir/t/Nope".into(),
            vec![],
            String::new(),
            StatusCode::NOT_FOUND,
            "not-found",
        ),
        (
            Method::GET,
            format!("{uri}/extra"),
            vec![],
            String::new(),
            StatusCode::NOT_FOUND,
            "not-found",
        ),
        (
            Method::GET,
            "/elsewhere".into(),
            vec![],
            String::new(),
            StatusCode::NOT_FOUND,
            "not-found",
        ),
        (
            Method::GET,
            "/fhir/t/Patient/abc/_history/x".into(),
            vec![],
            String::new(),
            StatusCode::NOT_FOUND,
            "not-found",
        ),
        (
            Method::POST,
            uri.clone(),
            vec![FHIR],
            "{}".into(),
            StatusCode::METHOD_NOT_ALLOWED,
            "not-supported",
        ),
        (
            Method::PATCH,
            "/fhir/t/Patient".into(),
            vec![],
            String::new(),
            StatusCode::METHOD_NOT_ALLOWED,
            "not-supported",
        ),
        (
            Method::POST,
            "/admin/status".into(),
            vec![],
            String::new(),
            StatusCode::METHOD_NOT_ALLOWED,
            "not-supported",
        ),
        (
            Method::POST,
            "/fhir/t/Patient".into(),
            vec![("content-type", "application/fhir+xml")],
            "<Patient/>".into(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not-supported",
        ),
        (
            Method::GET,
            "/fhir/t/Patient?_format=xml".into(),
            vec![],
            String::new(),
            StatusCode::NOT_ACCEPTABLE,
            "not-supported",
        ),
        (
            Method::GET,
            uri.clone(),
            vec![("accept", "application/fhir+xml")],
            String::new(),
            StatusCode::NOT_ACCEPTABLE,
            "not-supported",
        ),
        (
            Method::POST,
            "/fhir/t/Patient".into(),
            vec![FHIR],
            json!({"resourceType": "Patient", "text": {"div": "x".repeat(5_000)}}).to_string(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-long",
        ),
        (
            Method::POST,
            "/fhir/t/Patient".into(),
            vec![FHIR],
            json!({"resourceType": "Patient", "gender": 5}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "processing",
        ),
        (
            Method::GET,
            "/fhir/t/Patient?birthdate=notadate".into(),
            vec![],
            String::new(),
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            Method::GET,
            "/fhir/t/Patient?nonsense=1".into(),
            vec![("prefer", "handling=strict")],
            String::new(),
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            Method::GET,
            "/fhir/t/Patient/_history?_since=soon".into(),
            vec![],
            String::new(),
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
    ];
    for (method, uri, headers, body, status, code) in cases {
        let r = s.call(method.clone(), &uri, &headers, body).await;
        assert_eq!(
            r.status,
            status,
            "{method} {uri}: {}",
            String::from_utf8_lossy(&r.body)
        );
        if !code.is_empty() {
            assert_eq!(r.issue(), code, "{method} {uri}");
        }
    }
    // Nothing stored was touched by the failed requests.
    let kept = s.get(&uri).await;
    assert_eq!(kept.header("etag"), Some("W/\"1\""));
    assert_eq!(total(&s, "/fhir/t/Patient").await, 1);

    // Lenient by default: an unknown parameter is ignored, said so, and left out of `self`.
    let lenient = s.get("/fhir/t/Patient?nonsense=1&family=Kept").await.json();
    assert_eq!(lenient["total"], 1);
    let self_link = lenient["link"][0]["url"].as_str().unwrap_or("");
    assert!(self_link.contains("family=Kept") && !self_link.contains("nonsense"));
    let outcome = lenient["entry"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["search"]["mode"] == "outcome"))
        .expect("an outcome entry");
    assert!(outcome["resource"]["issue"][0]["diagnostics"]
        .as_str()
        .is_some_and(|d| d.contains("nonsense")));
}

#[tokio::test]
async fn conditional_create_update_and_delete() {
    let s = open_server().await;
    let body = json!({"resourceType": "Patient",
        "identifier": [{"system": "urn:x", "value": "1"}]});
    let srv = &s;
    let cond = |q: &'static str, body: &Value| {
        let body = body.to_string();
        async move {
            let h = [FHIR, ("if-none-exist", q)];
            srv.call(Method::POST, "/fhir/c/Patient", &h, body).await
        }
    };
    let first = cond("identifier=urn:x|1", &body).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let again = cond("identifier=urn:x|1", &body).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.json()["id"], first.json()["id"]);
    assert_eq!(again.header("etag"), Some("W/\"1\""));
    let bad = cond("nonsense=1", &body).await;
    assert_eq!(
        bad.status,
        StatusCode::BAD_REQUEST,
        "conditional criteria are strict"
    );

    let dup =
        json!({"resourceType": "Patient", "identifier": [{"system": "urn:x", "value": "dup"}]});
    create(&s, "c", &dup).await;
    create(&s, "c", &dup).await;
    let many = cond("identifier=urn:x|dup", &dup).await;
    assert_eq!(many.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(many.issue(), "multiple-matches");
    assert_eq!(
        s.put("/fhir/c/Patient?identifier=urn:x|dup", &dup)
            .await
            .status,
        StatusCode::PRECONDITION_FAILED
    );

    let two = json!({"resourceType": "Patient", "identifier": [{"system": "urn:x", "value": "2"}]});
    let made = s.put("/fhir/c/Patient?identifier=urn:x|2", &two).await;
    assert_eq!(made.status, StatusCode::CREATED);
    let updated = s.put("/fhir/c/Patient?identifier=urn:x|2", &two).await;
    assert_eq!(updated.status, StatusCode::OK);
    assert_eq!(updated.json()["id"], made.json()["id"]);
    assert_eq!(updated.header("etag"), Some("W/\"2\""));

    assert_eq!(
        s.delete("/fhir/c/Patient").await.status,
        StatusCode::PRECONDITION_FAILED
    );
    assert_eq!(
        s.delete("/fhir/c/Patient?identifier=urn:x|dup")
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(total(&s, "/fhir/c/Patient?identifier=urn:x|dup").await, 0);
    assert_eq!(total(&s, "/fhir/c/Patient").await, 2);
}

#[tokio::test]
async fn json_patch() {
    let s = open_server().await;
    let id = create(
        &s,
        "p",
        &json!({"resourceType": "Patient", "active": false}),
    )
    .await;
    let uri = format!("/fhir/p/Patient/{id}");
    let patch = |ops: Value, extra: Option<(&'static str, &'static str)>| {
        let mut h = vec![("content-type", "application/json-patch+json")];
        h.extend(extra);
        (h, ops.to_string())
    };
    let (h, b) = patch(
        json!([{"op": "replace", "path": "/active", "value": true}]),
        None,
    );
    let r = s.call(Method::PATCH, &uri, &h, b).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("etag"), Some("W/\"2\""));
    assert_eq!(r.json()["active"], true);

    let (h, b) = patch(
        json!([{"op": "replace", "path": "/active", "value": false}]),
        Some(("if-match", "W/\"1\"")),
    );
    assert_eq!(
        s.call(Method::PATCH, &uri, &h, b).await.status,
        StatusCode::PRECONDITION_FAILED
    );
    let (h, b) = patch(json!([{"op": "remove", "path": "/nothing"}]), None);
    assert_eq!(
        s.call(Method::PATCH, &uri, &h, b).await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    let (h, b) = patch(
        json!([{"op": "replace", "path": "/id", "value": "other"}]),
        None,
    );
    assert_eq!(
        s.call(Method::PATCH, &uri, &h, b).await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    let (h, b) = patch(
        json!([{"op": "replace", "path": "/gender", "value": 7}]),
        None,
    );
    assert_eq!(
        s.call(Method::PATCH, &uri, &h, b).await.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "the patched resource is validated"
    );
    let r = s
        .call(
            Method::PATCH,
            &uri,
            &[("content-type", "application/json-patch+json")],
            "[{",
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = s.call(Method::PATCH, &uri, &[FHIR], "[]").await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let (h, b) = patch(json!([]), None);
    let missing = s.call(Method::PATCH, "/fhir/p/Patient/absent", &h, b).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let now = s.get(&uri).await;
    assert_eq!(now.header("etag"), Some("W/\"2\""));
    assert_eq!(now.json()["active"], true);
}

#[tokio::test]
async fn search_pages_stay_valid_while_data_changes() {
    let s = open_server().await;
    let mut original = BTreeSet::new();
    for _ in 0..25 {
        original.insert(create(&s, "s", &patient("Page")).await);
    }
    let first = s.get("/fhir/s/Patient?family=Page&_count=10").await.json();
    assert_eq!(first["type"], "searchset");
    assert_eq!(first["entry"].as_array().map(Vec::len), Some(10));
    assert!(
        first.get("total").is_none(),
        "no total unless asked, when there are more pages"
    );
    let next = first["link"][1]["url"].as_str().expect("next link");
    assert!(next.starts_with("http://fhir.test/fhir/s/Patient?") && next.contains("_cursor="));
    // Writes between pages: five more matches, and one of the first page deleted.
    for _ in 0..5 {
        create(&s, "s", &patient("Page")).await;
    }
    let gone = first["entry"][0]["resource"]["id"].as_str().unwrap_or("");
    s.delete(&format!("/fhir/s/Patient/{gone}")).await;
    let rest = s.all_ids(next.trim_start_matches("http://fhir.test")).await;
    let mut seen: Vec<String> = first["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e["resource"]["id"].as_str().unwrap_or("").to_owned())
        .collect();
    seen.extend(rest);
    let unique: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no resource twice");
    for id in &original {
        assert!(id == gone || unique.contains(id), "{id} was skipped");
    }

    let accurate = s
        .get("/fhir/s/Patient?family=Page&_total=accurate&_count=1")
        .await
        .json();
    assert_eq!(accurate["total"], 29);
    assert_eq!(total(&s, "/fhir/s/Patient?family=Page").await, 29);
    let zero = s.get("/fhir/s/Patient?family=Page&_count=0").await.json();
    assert_eq!(zero["total"], 29);
    assert!(zero.get("entry").is_none());
    let by_get: BTreeSet<String> = s
        .all_ids("/fhir/s/Patient?family=Page&_count=7")
        .await
        .into_iter()
        .collect();
    let posted = s
        .call(
            Method::POST,
            "/fhir/s/Patient/_search",
            &[("content-type", "application/x-www-form-urlencoded")],
            "family=Page&_count=100",
        )
        .await
        .json();
    let by_post: BTreeSet<String> = posted["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e["resource"]["id"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(by_get.len(), 29);
    assert_eq!(by_get, by_post);

    let pid = original
        .iter()
        .find(|i| *i != gone)
        .cloned()
        .unwrap_or_default();
    let obs = json!({"resourceType": "Observation", "status": "final",
        "code": {"text": "x"}, "subject": {"reference": format!("Patient/{pid}")}});
    create(&s, "s", &obs).await;
    let inc = s
        .get("/fhir/s/Observation?_include=Observation:subject")
        .await
        .json();
    let modes: Vec<&str> = inc["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e["search"]["mode"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(modes, ["match", "include"]);
    assert_eq!(
        inc["entry"][1]["resource"]["id"].as_str(),
        Some(pid.as_str())
    );
    let system = s.get(&format!("/fhir/s?_id={pid}")).await.json();
    assert_eq!(
        system["entry"][0]["resource"]["id"].as_str(),
        Some(pid.as_str())
    );
}

#[tokio::test]
async fn transaction_and_batch_bundles() {
    let s = open_server().await;
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:8f1c7e2a-0000-4000-8000-000000000001",
         "resource": {"resourceType": "Patient", "name": [{"family": "Tx"}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "hr"},
                      "subject": {"reference": "urn:uuid:8f1c7e2a-0000-4000-8000-000000000001"}},
         "request": {"method": "POST", "url": "Observation"}}
    ]});
    let r = s.post("/fhir/b", &tx).await;
    assert_eq!(r.status, StatusCode::OK);
    let b = r.json();
    assert_eq!(b["type"], "transaction-response");
    let loc = |i: usize| {
        b["entry"][i]["response"]["location"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };
    assert_eq!(b["entry"][0]["response"]["status"], "201 Created");
    assert!(loc(0).starts_with("Patient/") && loc(1).starts_with("Observation/"));
    let patient_ref = loc(0).split("/_history").next().unwrap_or("").to_owned();
    let obs_id = loc(1).split('/').nth(1).unwrap_or("").to_owned();
    let obs = s.get(&format!("/fhir/b/Observation/{obs_id}")).await.json();
    assert_eq!(
        obs["subject"]["reference"].as_str(),
        Some(patient_ref.as_str())
    );

    // All or nothing: the second entry is invalid, so the first is not stored either.
    let failing = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "name": [{"family": "Never"}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Patient", "id": "p2", "gender": 5},
         "request": {"method": "PUT", "url": "Patient/p2"}}
    ]});
    let r = s.post("/fhir/b", &failing).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(total(&s, "/fhir/b/Patient?family=Never").await, 0);
    let bad_url = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "POST", "url": "Nope"}, "resource": {"resourceType": "Patient"}}]});
    assert_eq!(
        s.post("/fhir/b", &bad_url).await.status,
        StatusCode::BAD_REQUEST
    );

    // A batch: each entry alone.
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": {"resourceType": "Patient", "name": [{"family": "Batch"}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Patient", "gender": 5},
         "request": {"method": "POST", "url": "Patient"}},
        {"request": {"method": "POST", "url": "NotAType"}},
        {"request": {"method": "DELETE", "url": format!("Observation/{obs_id}")}}
    ]});
    let r = s.post("/fhir/b", &batch).await;
    assert_eq!(r.status, StatusCode::OK);
    let b = r.json();
    assert_eq!(b["type"], "batch-response");
    let statuses: Vec<&str> = b["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e["response"]["status"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        statuses,
        [
            "201 Created",
            "422 Unprocessable Entity",
            "400 Bad Request",
            "204 No Content"
        ]
    );
    assert_eq!(
        b["entry"][1]["response"]["outcome"]["resourceType"],
        "OperationOutcome"
    );
    assert_eq!(total(&s, "/fhir/b/Patient?family=Batch").await, 1);
    assert_eq!(
        s.get(&format!("/fhir/b/Observation/{obs_id}")).await.status,
        StatusCode::GONE
    );

    for body in [
        json!({"resourceType": "Patient"}),
        json!({"resourceType": "Bundle", "type": "collection"}),
    ] {
        assert_eq!(
            s.post("/fhir/b", &body).await.status,
            StatusCode::BAD_REQUEST
        );
    }
}

#[tokio::test]
async fn batch_reads_answer_as_the_same_get_would() {
    let s = open_server().await;
    let p = json!({"resourceType": "Patient", "id": "br1", "name": [{"family": "Reader"}]});
    assert_eq!(
        s.put("/fhir/br/Patient/br1", &p).await.status,
        StatusCode::CREATED
    );
    let p2 = json!({"resourceType": "Patient", "id": "br1", "name": [{"family": "Reader"}], "gender": "female"});
    assert_eq!(
        s.put("/fhir/br/Patient/br1", &p2).await.status,
        StatusCode::OK
    );
    // The same id in another tenant, which no entry may reach.
    let other = json!({"resourceType": "Patient", "id": "only-elsewhere"});
    s.put("/fhir/br-other/Patient/only-elsewhere", &other).await;
    s.put(
        "/fhir/br-other/Patient/br1",
        &json!({"resourceType": "Patient", "id": "br1", "gender": "male"}),
    )
    .await;

    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient/br1"}},
        {"request": {"method": "GET", "url": "Patient/br1/_history/1"}},
        {"request": {"method": "GET", "url": "Patient?family=reader&_count=5"}},
        {"request": {"method": "GET", "url": "Patient/only-elsewhere"}},
        {"request": {"method": "GET", "url": "Patient/br1", "ifNoneMatch": "W/\"2\""}},
        {"request": {"method": "GET", "url": "http://fhir.test/fhir/br/Patient/br1/_history"}},
        {"request": {"method": "GET", "url": "http://elsewhere.example/fhir/Patient/br1"}},
        {"request": {"method": "GET", "url": "Patient?family=Reader&_sort=nonsense"}},
        {"resource": {"resourceType": "Patient", "id": "br2", "name": [{"family": "Reader"}]},
         "request": {"method": "PUT", "url": "Patient/br2"}},
        {"request": {"method": "GET", "url": "Patient/br1", "ifModifiedSince": "Mon, 01 Jan 2001 00:00:00 GMT"}}
    ]});
    let r = s
        .call(
            Method::POST,
            "/fhir/br",
            &[FHIR, ("prefer", "return=minimal")],
            batch.to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let b = r.json();
    let e = |i: usize| b["entry"][i].clone();
    let statuses: Vec<String> = b["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e["response"]["status"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        statuses,
        [
            "200 OK",
            "200 OK",
            "200 OK",
            "404 Not Found",
            "304 Not Modified",
            "200 OK",
            "400 Bad Request",
            "400 Bad Request",
            "201 Created",
            "200 OK"
        ]
    );
    // A read: the current version whatever the batch preferred for its writes, with its
    // version headers carried into the entry.
    assert_eq!(e(0)["resource"]["gender"], "female");
    assert_eq!(e(0)["response"]["etag"], "W/\"2\"");
    assert!(e(0)["response"]["lastModified"].is_string());
    assert_eq!(e(0)["fullUrl"], "http://fhir.test/fhir/br/Patient/br1");
    assert!(e(1)["resource"]["gender"].is_null());
    assert_eq!(e(1)["response"]["etag"], "W/\"1\"");
    // Reads run after the batch's writes, so the search sees br2.
    let search = e(2)["resource"].clone();
    assert_eq!(search["type"], "searchset");
    let mut ids: Vec<&str> = search["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["resource"]["id"].as_str())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["br1", "br2"]);
    assert_eq!(
        e(3)["response"]["outcome"]["resourceType"],
        "OperationOutcome"
    );
    assert!(e(4)["resource"].is_null());
    assert_eq!(e(5)["resource"]["type"], "history");
    assert_eq!(e(5)["resource"]["entry"].as_array().map(Vec::len), Some(2));
    assert!(
        e(8)["resource"].is_null(),
        "return=minimal still applies to writes"
    );
    assert_eq!(e(9)["resource"]["gender"], "female", "changed since 2001");

    // A version that is a deletion: 410, its OperationOutcome as the entry's outcome.
    assert_eq!(
        s.delete("/fhir/br/Patient/br2").await.status,
        StatusCode::NO_CONTENT
    );
    let gone = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient/br2/_history/2"}}]});
    let b = s.post("/fhir/br", &gone).await.json();
    assert_eq!(b["entry"][0]["response"]["status"], "410 Gone");
    assert_eq!(b["entry"][0]["response"]["etag"], "W/\"2\"");
    assert_eq!(
        b["entry"][0]["response"]["outcome"]["resourceType"],
        "OperationOutcome"
    );
    assert!(b["entry"][0]["resource"].is_null());

    // A transaction's reads run after its writes, and see them (R4's processing order),
    // whatever their place in the Bundle.
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "GET", "url": "Patient?family=TxRead"}},
        {"resource": {"resourceType": "Patient", "name": [{"family": "TxRead"}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"request": {"method": "GET", "url": "Patient/br1"}}
    ]});
    let r = s.post("/fhir/br", &tx).await;
    assert_eq!(r.status, StatusCode::OK);
    let b = r.json();
    assert_eq!(b["type"], "transaction-response");
    assert_eq!(
        b["entry"][0]["resource"]["total"], 1,
        "the search saw the write"
    );
    assert_eq!(b["entry"][1]["response"]["status"], "201 Created");
    assert_eq!(b["entry"][2]["resource"]["id"], "br1");
    assert_eq!(total(&s, "/fhir/br/Patient?family=TxRead").await, 1);
    // An invalid write still fails the whole transaction, reads and all, and the outcome
    // names its entry as the client numbers it (the read before it counts).
    let bad = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "GET", "url": "Patient/br1"}},
        {"resource": {"resourceType": "Patient", "name": [{"family": "TxRead2"}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Patient", "gender": 5},
         "request": {"method": "POST", "url": "Patient"}}
    ]});
    let r = s.post("/fhir/br", &bad).await;
    assert!(r.status.is_client_error());
    let issue = &r.json()["issue"][0];
    assert_eq!(issue["expression"], json!(["Bundle.entry[2]"]), "{issue}");
    assert!(
        issue["diagnostics"]
            .as_str()
            .is_some_and(|d| d.starts_with("entry 2:")),
        "{issue}"
    );
    assert_eq!(total(&s, "/fhir/br/Patient?family=TxRead2").await, 0);

    // A relative reference that resolves, against its entry's fullUrl, to an entry created
    // in the Bundle points at the new resource (bundle.html).
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "http://example.com/fhir/Patient/0",
         "resource": {"resourceType": "Patient", "name": [{"family": "Based"}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "http://example.com/fhir/Observation/0",
         "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": "Patient/0"}},
         "request": {"method": "POST", "url": "Observation"}}
    ]});
    let b = s.post("/fhir/br", &tx).await.json();
    let patient = b["entry"][0]["resource"]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    assert_ne!(patient, "0");
    assert_eq!(
        b["entry"][1]["resource"]["subject"]["reference"],
        format!("Patient/{patient}").as_str()
    );
}

#[tokio::test]
async fn capability_statement_follows_the_tenant_search_parameters() {
    let s = open_server().await;
    let cs = s.get("/fhir/m/metadata").await.json();
    assert_eq!(cs["resourceType"], "CapabilityStatement");
    assert_eq!(cs["fhirVersion"], "4.0.1");
    let rest = &cs["rest"][0];
    let params_of = |cs: &Value, t: &str| -> Vec<String> {
        cs["rest"][0]["resource"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["type"] == t))
            .and_then(|r| r["searchParam"].as_array())
            .map(|ps| {
                ps.iter()
                    .map(|p| p["name"].as_str().unwrap_or("").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(params_of(&cs, "Patient").contains(&"family".to_owned()));
    assert!(!params_of(&cs, "Patient").contains(&"favourite-colour".to_owned()));
    let system: Vec<&str> = rest["interaction"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["code"].as_str())
        .collect();
    assert!(system.contains(&"transaction") && system.contains(&"batch"));
    let text = rest["searchParam"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "_text"))
        .expect("_text");
    assert!(text["documentation"]
        .as_str()
        .is_some_and(|d| d.contains("_include")));

    let ext = "http://example.org/fhir/StructureDefinition/favourite-colour";
    let p = json!({"resourceType": "Patient",
        "extension": [{"url": ext, "valueCode": "teal"}]});
    let pid = create(&s, "m", &p).await;
    let sp = json!({"resourceType": "SearchParameter", "id": "favourite-colour",
        "url": "http://example.org/fhir/SearchParameter/patient-favourite-colour",
        "name": "FavouriteColour", "status": "active", "description": "colour",
        "code": "favourite-colour", "base": ["Patient"], "type": "token",
        "expression": format!("Patient.extension('{ext}').value")});
    assert_eq!(
        s.put("/fhir/m/SearchParameter/favourite-colour", &sp)
            .await
            .status,
        StatusCode::CREATED
    );
    // The server reindexes in the background; the parameter becomes searchable when done.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let cs = s.get("/fhir/m/metadata").await.json();
        if params_of(&cs, "Patient").contains(&"favourite-colour".to_owned()) {
            break;
        }
        assert!(Instant::now() < deadline, "the reindex never finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let found = s.get("/fhir/m/Patient?favourite-colour=teal").await.json();
    assert_eq!(
        found["entry"][0]["resource"]["id"].as_str(),
        Some(pid.as_str())
    );
    let other = s.get("/fhir/other/metadata").await.json();
    assert!(
        !params_of(&other, "Patient").contains(&"favourite-colour".to_owned()),
        "another tenant does not see it"
    );
}

/// Full text combined with what only the SQL primary answers (an include and a sort by date)
/// is answered by both together on the embedded default, and the response says how.
#[tokio::test]
async fn full_text_combines_with_includes_and_sorts() {
    let s = open_server().await;
    let pid = create(
        &s,
        "m",
        &json!({"resourceType": "Patient", "name": [{"family": "Chalmers"}]}),
    )
    .await;
    let mut ids = Vec::new();
    for (day, text) in [
        ("01", "chest pain at rest"),
        ("03", "chest pain on exertion"),
        ("02", "ankle sprain"),
    ] {
        let o = json!({"resourceType": "Observation", "status": "final",
            "code": {"text": "note"},
            "text": {"status": "generated", "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">{text}</div>")},
            "subject": {"reference": format!("Patient/{pid}")},
            "effectiveDateTime": format!("2024-05-{day}")});
        ids.push(create(&s, "m", &o).await);
    }
    // Another tenant's matching note stays out.
    create(
        &s,
        "other",
        &json!({"resourceType": "Observation", "status": "final", "code": {"text": "note"},
            "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">chest pain</div>"}}),
    )
    .await;
    let r = s
        .get("/fhir/m/Observation?_text=chest%20pain&_include=Observation:subject&_sort=-date")
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.issue());
    let b = r.json();
    let entries: Vec<(String, String)> = b["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["search"]["mode"].as_str().unwrap_or("").to_owned(),
                e["resource"]["id"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let want = vec![
        ("match".to_owned(), ids[1].clone()),
        ("match".to_owned(), ids[0].clone()),
        ("include".to_owned(), pid.clone()),
    ];
    assert_eq!(entries, want);
    let route = r.header("x-search-route").unwrap_or_default().to_owned();
    assert!(
        route.contains("tantivy[_text]") && route.contains("primary[_sort,_include,ids]"),
        "{route}"
    );
}
