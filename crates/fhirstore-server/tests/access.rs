//! Tokens, tenant isolation, the admin endpoints, metrics and graceful shutdown.

mod support;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use fhirstore_server::config::ServerSettings;
use serde_json::json;
use support::{server, FHIR};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn tokens() -> ServerSettings {
    ServerSettings {
        tokens: vec![
            ("a".into(), "token-a".into()),
            ("b".into(), "token-b".into()),
        ],
        admin_token: Some("root".into()),
        ..ServerSettings::default()
    }
}

#[tokio::test]
async fn tokens_keep_tenants_apart() {
    let s = server(tokens()).await;
    let auth = |t: &'static str| ("authorization", t);
    let body = json!({"resourceType": "Patient", "id": "p1", "name": [{"family": "Secret"}]});
    let r = s
        .call(
            Method::PUT,
            "/fhir/a/Patient/p1",
            &[FHIR, auth("Bearer token-a")],
            body.to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);

    let get = |uri: &'static str, token: Option<&'static str>| {
        let s = &s;
        async move {
            let headers: Vec<(&str, &str)> =
                token.map(|t| ("authorization", t)).into_iter().collect();
            s.call(Method::GET, uri, &headers, Body::empty()).await
        }
    };
    let none = get("/fhir/a/Patient/p1", None).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert!(none
        .header("www-authenticate")
        .is_some_and(|w| w.starts_with("Bearer")));
    assert_eq!(
        get("/fhir/a/Patient/p1", Some("Basic abc")).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get("/fhir/a/Patient/p1", Some("Bearer wrong")).await.status,
        StatusCode::FORBIDDEN
    );

    // Tenant b's token learns nothing about tenant a: the same 403 for a tenant with data, a
    // tenant without, a resource that exists and one that does not.
    let probes = [
        get("/fhir/a/Patient/p1", Some("Bearer token-b")).await,
        get("/fhir/a/Patient/nothing", Some("Bearer token-b")).await,
        get("/fhir/zzz/Patient/p1", Some("Bearer token-b")).await,
        get("/fhir/a/Patient?family=Secret", Some("Bearer token-b")).await,
        get("/fhir/a/metadata", Some("Bearer token-b")).await,
    ];
    for p in &probes {
        assert_eq!(p.status, StatusCode::FORBIDDEN);
        assert_eq!(p.body, probes[0].body);
    }
    // In its own tenant, b finds nothing of a's, whatever it asks.
    assert_eq!(
        get("/fhir/b/Patient/p1", Some("Bearer token-b"))
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    let search = get("/fhir/b/Patient?family=Secret", Some("Bearer token-b"))
        .await
        .json();
    assert!(search.get("entry").is_none());
    let hist = get("/fhir/b/_history", Some("Bearer token-b")).await.json();
    assert!(hist.get("entry").is_none());
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "DELETE", "url": "Patient/p1"}}]});
    let r = s
        .call(
            Method::POST,
            "/fhir/b",
            &[FHIR, auth("Bearer token-b")],
            bundle.to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    // a's resource survived b's delete of the same id.
    let mine = get("/fhir/a/Patient/p1", Some("Bearer token-a")).await;
    assert_eq!(mine.status, StatusCode::OK);
    assert_eq!(mine.json()["name"][0]["family"], "Secret");
    // The admin token reaches every tenant.
    assert_eq!(
        get("/fhir/a/Patient/p1", Some("Bearer root")).await.status,
        StatusCode::OK
    );

    // Admin endpoints take the admin token only.
    for uri in ["/admin/status", "/metrics", "/admin/reconcile"] {
        assert_eq!(
            get(uri, None).await.status,
            StatusCode::UNAUTHORIZED,
            "{uri}"
        );
        assert_eq!(
            get(uri, Some("Bearer token-a")).await.status,
            StatusCode::FORBIDDEN,
            "{uri}"
        );
        assert_eq!(
            get(uri, Some("Bearer root")).await.status,
            StatusCode::OK,
            "{uri}"
        );
    }
}

#[tokio::test]
async fn admin_status_reconcile_and_metrics() {
    let s = server(ServerSettings::default()).await;
    for i in 0..5 {
        let p = json!({"resourceType": "Patient", "id": format!("r{i}")});
        let r = s.put(&format!("/fhir/adm/Patient/r{i}"), &p).await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    assert!(s
        .app
        .store
        .composite()
        .wait_for_sync(Duration::from_secs(30))
        .await
        .expect("sync"));
    let status = s.get("/admin/status").await.json();
    let tantivy = &status["secondaries"][0];
    assert_eq!(tantivy["name"], "tantivy");
    assert_eq!(tantivy["lagChanges"], 0);
    assert_eq!(tantivy["healthy"], true);

    let job = s.reconcile(&json!({"tenant": "adm", "dryRun": true})).await;
    assert_eq!(job["state"], "done", "{job}");
    for count in ["missing", "extra", "stale", "ahead", "repaired"] {
        assert_eq!(job["report"][count], 0, "{count}: {job}");
    }
    assert_eq!(job["report"]["entries"][0]["resource_type"], "Patient");
    let bad = s
        .call(
            Method::POST,
            "/admin/reconcile",
            &[],
            json!({"type": "Nope"}).to_string(),
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        s.get("/admin/reconcile/unknown").await.status,
        StatusCode::NOT_FOUND
    );

    let text = String::from_utf8(s.get("/metrics").await.body).expect("utf-8");
    assert!(
        text.contains("fhirstore_http_requests_total{interaction=\"update\",status=\"201\"} 5"),
        "{text}"
    );
    assert!(text.contains("fhirstore_sync_lag_changes{secondary=\"tantivy\"} 0"));
    assert!(text.contains("fhirstore_reconcile_total{count=\"jobs\"} 1"));
    assert!(
        text.contains("fhirstore_http_request_duration_seconds_count{interaction=\"update\"} 5")
    );
}

/// A request whose body is still arriving when shutdown starts is answered, and then the
/// server stops.
#[tokio::test]
async fn graceful_shutdown_finishes_requests_in_flight() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = fhirstore_server::deploy::open(&support::store_settings(dir.path()))
        .await
        .expect("open");
    let app = fhirstore_server::App::new(store, ServerSettings::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // Tells the test when the request has reached the routes, so shutdown starts while it is
    // in flight.
    let entered = std::sync::Arc::new(tokio::sync::Notify::new());
    let signal = entered.clone();
    let routes = fhirstore_server::router(app.clone()).layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            signal.notify_one();
            next.run(req)
        },
    ));
    let served = tokio::spawn(fhirstore_server::serve_router(
        app.store.clone(),
        routes,
        listener,
        async {
            let _ = stopped.await;
        },
    ));

    let body = json!({"resourceType": "Patient", "id": "late"}).to_string();
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "PUT /fhir/g/Patient/late HTTP/1.1\r\nhost: x\r\ncontent-type: application/fhir+json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.expect("write");
    conn.write_all(&body.as_bytes()[..5]).await.expect("write");
    conn.flush().await.expect("flush");
    entered.notified().await;
    let _ = stop.send(());
    conn.write_all(&body.as_bytes()[5..])
        .await
        .expect("write rest");
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&reply).contains("\r\n\r\n") {
        let n = conn.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&reply);
    assert!(text.starts_with("HTTP/1.1 201"), "{text}");
    drop(conn);
    tokio::time::timeout(Duration::from_secs(30), served)
        .await
        .expect("the server stopped")
        .expect("task")
        .expect("serve");
}

/// With a schedule configured, `serve` runs reconcile jobs on it; they show in the jobs list
/// and the metrics, and shutdown stops them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_reconcile_runs_while_serving() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = fhirstore_server::deploy::open(&support::store_settings(dir.path()))
        .await
        .expect("open");
    let settings = ServerSettings {
        reconcile: Some(fhirstore_sync::schedule::Schedule {
            interval: Duration::from_millis(50),
            window: Duration::from_secs(3_600),
            mode: fhirstore_sync::reconcile::ReconcileMode::Repair,
            deep: Some(0),
        }),
        ..ServerSettings::default()
    };
    let app = fhirstore_server::App::new(store, settings);
    let ctx = fhirstore_core::TenantContext::full(
        fhirstore_core::TenantId::new("sched").expect("tenant"),
    );
    let patient = fhirstore_core::ResourceType::new("Patient").expect("type");
    app.store
        .storage()
        .create(&ctx, patient, json!({"resourceType": "Patient"}))
        .await
        .expect("create");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(fhirstore_server::serve(app.clone(), listener, async {
        let _ = stopped.await;
    }));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let jobs: Vec<_> = app.jobs.all().iter().map(|(id, j)| j.json(id)).collect();
        let full = jobs.iter().find(|j| {
            j["report"]["job"]
                .as_str()
                .is_some_and(|id| id.starts_with("scheduled-reconcile-"))
        });
        if let Some(full) = full {
            assert_eq!(full["state"], "done", "{full}");
            assert_eq!(full["report"]["missing"], 0, "{full}");
            assert!(jobs
                .iter()
                .any(|j| j["report"]["job"] == "scheduled-recent"));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no scheduled run: {jobs:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = app.metrics.render(&[], &[]);
    assert!(
        text.contains("fhirstore_reconcile_total{count=\"jobs\"}"),
        "{text}"
    );
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(30), served)
        .await
        .expect("stopped")
        .expect("task")
        .expect("serve");
}
