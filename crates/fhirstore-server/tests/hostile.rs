//! What a hostile or careless client tried, each answered with a 4xx and an `OperationOutcome`
//! (never a 5xx, never a leak), with nothing stored lost or changed.

mod support;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use fhirstore_server::config::{Limits, ModeArg, ServerSettings};
use serde_json::{json, Value};
use support::{open_server, server, server_on, store_settings, Srv, FHIR};

fn limited(limits: Limits) -> ServerSettings {
    ServerSettings {
        limits,
        ..ServerSettings::default()
    }
}

async fn post_text(s: &Srv, uri: &str, body: String) -> support::Resp {
    s.call(Method::POST, uri, &[FHIR], body).await
}

fn batch(kind: &str, entries: Vec<Value>) -> Value {
    json!({"resourceType": "Bundle", "type": kind, "entry": entries})
}

fn post_patient(family: &str) -> Value {
    json!({"resource": {"resourceType": "Patient", "name": [{"family": family}]},
           "request": {"method": "POST", "url": "Patient"}})
}

async fn patients(s: &Srv, tenant: &str) -> u64 {
    let r = s
        .get(&format!("/fhir/{tenant}/Patient?_summary=count"))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    r.json()["total"].as_u64().unwrap_or(u64::MAX)
}

/// A Bundle may not hold more entries than `max_bundle_entries`, and a batch's reads may not
/// grow its response past `max_response_bytes`: the writes still report, the reads past the
/// limit answer 413 on their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_are_bounded() {
    let metadata = open_server().await.get("/fhir/b/metadata").await.body.len();
    assert!(
        metadata > 10_000,
        "the CapabilityStatement is large: {metadata}"
    );
    // Room for two CapabilityStatements and the write's entry, not for a third.
    let max_response_bytes = 2 * metadata + 5_000;
    let s = server(limited(Limits {
        max_bundle_entries: 20,
        max_response_bytes,
        ..Limits::default()
    }))
    .await;
    for kind in ["batch", "transaction"] {
        let many = batch(
            kind,
            (0..21).map(|i| post_patient(&format!("m{i}"))).collect(),
        );
        let r = s.post("/fhir/b", &many).await;
        assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{kind}");
        assert_eq!(r.issue(), "too-long");
        assert!(String::from_utf8_lossy(&r.body).contains("max_bundle_entries = 20"));
    }
    let empties =
        json!({"resourceType": "Bundle", "type": "batch", "entry": vec![json!({}); 1_000]});
    assert_eq!(
        s.post("/fhir/b", &empties).await.status,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    assert_eq!(
        patients(&s, "b").await,
        0,
        "nothing of a refused Bundle is written"
    );

    let mut entries = vec![post_patient("kept")];
    entries.extend((0..5).map(|_| json!({"request": {"method": "GET", "url": "metadata"}})));
    let r = s.post("/fhir/b", &batch("batch", entries)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.body.len() < max_response_bytes + 5_000,
        "{} bytes",
        r.body.len()
    );
    let statuses: Vec<String> = r.json()["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(statuses[0], "201 Created");
    assert!(
        statuses[1..3].iter().all(|s| s.starts_with("200")),
        "{statuses:?}"
    );
    assert!(
        statuses[3..].iter().all(|s| s.starts_with("413")),
        "{statuses:?}"
    );
    assert_eq!(patients(&s, "b").await, 1);
}

/// Searches beyond a limit are 400 `too-costly` naming the limit, whichever dialect would have
/// failed on them; a NUL or a cursor at the end of the number line is a 4xx too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_searches_are_refused_with_4xx() {
    let s = open_server().await;
    let criteria: Vec<String> = (0..2_000).map(|i| format!("family=f{i}")).collect();
    let sort = vec!["family"; 2_000].join(",");
    // Within max_value_bytes (8 KiB), beyond max_or_values (1,000).
    let values: Vec<String> = (0..1_500).map(|i| format!("c{i}")).collect();
    let cases = [
        (format!("Patient?{}", criteria.join("&")), "max_criteria"),
        (format!("Patient?_sort={sort}"), "max_value_bytes"),
        (
            format!("Patient?_sort={}", vec!["family"; 20].join(",")),
            "max_sort_keys",
        ),
        (
            format!("Observation?code={}", values.join(",")),
            "max_or_values",
        ),
        (
            format!(
                "Patient?{}",
                vec!["_include=Patient:organization"; 100].join("&")
            ),
            "max_includes",
        ),
        // Five links, one past the default of four: forward, and `_has` nested in `_has`.
        (
            "Observation?subject:Patient.organization:Organization.partof:Organization\
             .partof:Organization.partof:Organization.name=x"
                .to_owned(),
            "max_chain_depth",
        ),
        (
            format!(
                "Observation?{}code=x",
                "_has:Observation:has-member:".repeat(5)
            ),
            "max_chain_depth",
        ),
    ];
    for (uri, limit) in cases {
        let r = s.get(&format!("/fhir/h/{uri}")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{limit}");
        assert_eq!(r.issue(), "too-costly", "{uri}");
        let text = String::from_utf8_lossy(&r.body);
        assert!(text.contains(limit), "{limit}: {text}");
    }
    for uri in [
        "Patient?family=a%00b",
        "Patient?name:contains=%00",
        "Patient?_cursor=not-a-cursor",
    ] {
        let r = s.get(&format!("/fhir/h/{uri}")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{uri}");
        r.issue();
    }
    // The first full-text search waits for the new index to be built; a page cursor goes
    // straight to the index that made it.
    assert_eq!(
        s.get("/fhir/h/Patient?_content=x").await.status,
        StatusCode::OK
    );
    for uri in [
        "Patient?_content=x&_cursor=tantivy%3A18446744073709551615",
        "Patient?_content=x&_cursor=tantivy%3A18446744073709551614",
    ] {
        let r = s.get(&format!("/fhir/h/{uri}")).await;
        assert!(r.status.is_success(), "{uri}: {}", r.status);
    }
    // The limits are the operator's: raised, the same search runs.
    let relaxed = server(limited(Limits {
        search: fhirstore_core::search::SearchLimits {
            max_sort_keys: 3_000,
            max_chain_depth: 5,
            ..Default::default()
        },
        ..Limits::default()
    }))
    .await;
    let r = relaxed
        .get(&format!(
            "/fhir/h/Patient?_sort={}",
            vec!["family"; 20].join(",")
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = relaxed
        .get(
            "/fhir/h/Observation?subject:Patient.organization:Organization.partof:Organization\
             .partof:Organization.partof:Organization.name=x",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
}

/// Bodies FHIR does not allow are refused whole, and the stored version stays as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_resources_change_nothing() {
    let s = open_server().await;
    let r = s
        .put(
            "/fhir/v/Patient/p",
            &json!({"resourceType": "Patient", "id": "p", "name": [{"family": "Kept"}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let cases: Vec<(String, StatusCode, &str)> = vec![
        (
            r#"{"resourceType":"Patient","id":"p","gender":"male","gender":"female"}"#.into(),
            StatusCode::BAD_REQUEST,
            "twice",
        ),
        (
            r#"{"resourceType":"Patient","id":"p","extension":[1]}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "/extension/0",
        ),
        (
            r#"{"resourceType":"Patient","id":"p","extension":["x"]}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "/extension/0",
        ),
        (
            r#"{"resourceType":"Patient","id":"p","name":[[{"family":5}]]}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "/name/0",
        ),
        (
            r#"{"resourceType":"Patient","id":"p","birthDate":"2021-02-30"}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "/birthDate",
        ),
        (
            r#"{"resourceType":"Patient","id":"p","name":[{"family":"a\u0000b"}]}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "NUL",
        ),
        (
            json!({"resourceType": "Patient", "id": "p",
                   "text": {"status": "generated", "div": "x".repeat(9 << 20)}})
            .to_string(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "max_resource_bytes",
        ),
    ];
    for (body, status, want) in cases {
        let r = s
            .call(Method::PUT, "/fhir/v/Patient/p", &[FHIR], body)
            .await;
        assert_eq!(r.status, status, "{want}");
        let text = String::from_utf8_lossy(&r.body);
        assert!(text.contains(want), "{want}: {text}");
        r.issue();
    }
    let now = s.get("/fhir/v/Patient/p").await.json();
    assert_eq!(now["meta"]["versionId"], "1");
    assert_eq!(now["name"][0]["family"], "Kept");
}

/// Decimals come back as they were written, and search by the precision written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decimals_keep_their_text() {
    let s = open_server().await;
    let body = r#"{"resourceType":"Observation","status":"final","code":{"text":"weight"},
        "valueQuantity":{"value":1.50,"unit":"kg"},
        "component":[{"code":{"text":"big"},"valueQuantity":{"value":1606938044258990275541962092341162602522202993782792835301376}}]}"#;
    let r = post_text(&s, "/fhir/d/Observation", body.to_owned()).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let id = r.json()["id"].as_str().expect("id").to_owned();
    let read = s.get(&format!("/fhir/d/Observation/{id}")).await;
    let text = String::from_utf8_lossy(&read.body);
    assert!(text.contains(r#""value":1.50"#), "{text}");
    assert!(
        text.contains("1606938044258990275541962092341162602522202993782792835301376"),
        "{text}"
    );
    let found = s.all_ids("/fhir/d/Observation?value-quantity=1.50").await;
    assert_eq!(found, [id]);
    assert!(s
        .all_ids("/fhir/d/Observation?value-quantity=1.51")
        .await
        .is_empty());
}

/// ContactPoint tokens take `system|value`, as other servers do, on the primary and in the
/// full-text index alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contact_points_search_by_system() {
    let s = open_server().await;
    let r = s
        .post(
            "/fhir/c/Practitioner",
            &json!({"resourceType": "Practitioner",
                    "telecom": [{"system": "email", "value": "m.versteegh@bmc.nl"},
                                {"system": "phone", "value": "555-555-2003"}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let id = r.json()["id"].as_str().expect("id").to_owned();
    for (q, hit) in [
        ("email=email|m.versteegh@bmc.nl", true),
        ("email=m.versteegh@bmc.nl", true),
        ("telecom=phone|555-555-2003", true),
        ("phone=phone|555-555-2003", true),
        ("telecom=email|555-555-2003", false),
        ("email=|m.versteegh@bmc.nl", false),
    ] {
        let found = s.all_ids(&format!("/fhir/c/Practitioner?{q}")).await;
        assert_eq!(found.len(), usize::from(hit), "{q}: {found:?}");
        if hit {
            assert_eq!(found[0], id);
        }
    }
}

/// A transaction whose entries share a fullUrl is refused: every reference to it would be
/// ambiguous.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_url_is_one_entry() {
    let s = open_server().await;
    let entry = |family: &str| {
        json!({"fullUrl": "urn:uuid:5b1a3c2e-0000-4000-8000-000000000001",
               "resource": {"resourceType": "Patient", "name": [{"family": family}]},
               "request": {"method": "POST", "url": "Patient"}})
    };
    let r = s
        .post(
            "/fhir/u",
            &batch("transaction", vec![entry("One"), entry("Two")]),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&r.body).contains("entry 1"));
    assert_eq!(patients(&s, "u").await, 0);
}

/// A write that returned is in the next search, even one the asynchronous full-text index
/// answers: the search waits (bounded) for the index to pass the log's head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_text_sees_the_write_that_just_returned() {
    let s = open_server().await;
    for i in 0..5 {
        let family = format!("Chalmers{i}x");
        let r = s
            .post(
                "/fhir/ft/Patient",
                &json!({"resourceType": "Patient", "name": [{"family": family}]}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED);
        let found = s
            .all_ids(&format!(
                "/fhir/ft/Patient?_content={}",
                family.to_lowercase()
            ))
            .await;
        assert_eq!(
            found.len(),
            1,
            "write {i} was not found right after it returned"
        );
    }
}

/// No password and no host path reaches a tenant; the operator's views redact passwords.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secrets_in_metadata_or_status() {
    let base = std::env::var("FHIRSTORE_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let Some(rest) = base.strip_prefix("redis://").filter(|r| !r.contains('@')) else {
        eprintln!("SKIP: FHIRSTORE_TEST_REDIS_URL carries credentials already");
        return;
    };
    // A Redis without a password takes any password for the default user.
    let secret = "s3cret-pa55";
    let dir = tempfile::tempdir().expect("temp dir");
    let mut stores = store_settings(dir.path());
    stores.redis = Some(format!("redis://default:{secret}@{rest}"));
    stores.redis_mode = ModeArg::Sync;
    stores.redis_prefix = format!("fhirstore-secret-{}", uuid::Uuid::now_v7().simple());
    let s = match server_on(dir, &stores, ServerSettings::default()).await {
        Ok(s) => s,
        Err(e) if std::env::var("FHIRSTORE_REQUIRE_SERVICES").as_deref() != Ok("1") => {
            eprintln!("SKIP: Redis unavailable ({e})");
            return;
        }
        Err(e) => panic!("Redis is required (FHIRSTORE_REQUIRE_SERVICES=1): {e}"),
    };
    let path = s.dir.path().to_string_lossy().into_owned();
    let metadata = s.get("/fhir/t/metadata").await;
    assert_eq!(metadata.status, StatusCode::OK);
    let text = String::from_utf8_lossy(&metadata.body);
    assert!(!text.contains(secret), "{text}");
    assert!(!text.contains(&path), "a host path reached a tenant");
    assert!(!text.contains(rest), "a host reached a tenant");
    assert!(text.contains("redis"), "the kinds of store are still said");
    let status = s
        .call(Method::GET, "/admin/status", &[], Body::empty())
        .await;
    let text = String::from_utf8_lossy(&status.body);
    assert!(!text.contains(secret), "{text}");
    assert!(text.contains("default:***@"), "{text}");
    assert!(!s.app.store.describe().contains(secret));
    s.app.store.composite().shutdown().await;
    support::purge_redis(&stores).await;
}

/// Sends one raw HTTP/1.1 request head and reads the whole answer (the server closes).
async fn raw(addr: std::net::SocketAddr, head: String) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(head.as_bytes()).await.expect("send");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.expect("read");
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// A long URL or a megabyte of header, over a real socket, gets 414 or 431 with an
/// `OperationOutcome` naming the limit, not the HTTP parser's empty answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_urls_and_headers_get_an_outcome() {
    let s = open_server().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(fhirstore_server::serve(s.app.clone(), listener, async {
        let _ = stopped.await;
    }));
    let long = "x".repeat(1 << 20);
    let get =
        |target: String| format!("GET {target} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
    let (status, text) = raw(
        addr,
        get(format!("/fhir/t/Patient?family={}", &long[..40_000])),
    )
    .await;
    assert_eq!(status, 414, "{}", &text[..text.len().min(300)]);
    assert!(text.contains("OperationOutcome") && text.contains("max_uri_bytes"));
    // Past 65,534 bytes the HTTP parser answers 414 itself, before any handler runs.
    let (status, _) = raw(addr, get(format!("/fhir/t/Patient?family={long}"))).await;
    assert_eq!(status, 414);
    let (status, text) = raw(
        addr,
        format!("GET /fhir/t/metadata HTTP/1.1\r\nHost: h\r\nX-Big: {long}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 431, "{}", &text[..text.len().min(300)]);
    assert!(text.contains("OperationOutcome") && text.contains("max_header_bytes"));
    let (status, _) = raw(
        addr,
        "GET /fhir/t/metadata HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".into(),
    )
    .await;
    assert_eq!(status, 200, "an ordinary request still works");
    let _ = stop.send(());
    tokio::time::timeout(std::time::Duration::from_secs(30), served)
        .await
        .expect("stopped")
        .expect("task")
        .expect("serve");
}
