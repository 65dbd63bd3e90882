//! The server on PostgreSQL with Redis and tantivy, as `--postgres` and `--redis` configure it.

mod support;

use std::time::Duration;

use axum::http::StatusCode;
use fhirstore_core::changelog::{ChangeLog, Consumers};
use fhirstore_core::secondary::Secondary;
use fhirstore_server::config::{ModeArg, SearchBounds, ServerSettings, StoreSettings};
use serde_json::json;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_primary_with_redis_and_tantivy() {
    let unique = uuid::Uuid::now_v7().simple().to_string();
    let dir = tempfile::tempdir().expect("temp dir");
    let stores = StoreSettings {
        data_dir: dir.path().to_owned(),
        postgres: Some(env_or(
            "FHIRSTORE_TEST_POSTGRES_URL",
            "postgres://postgres@127.0.0.1:5432/test",
        )),
        redis: Some(env_or("FHIRSTORE_TEST_REDIS_URL", "redis://127.0.0.1:6379")),
        redis_prefix: format!("fhirstore-srv-{unique}"),
        redis_mode: ModeArg::Sync,
        index_mode: ModeArg::Async,
        search: SearchBounds::default(),
        memory_cache: fhirstore_server::config::DEFAULT_MEMORY_CACHE,
        body_compression: fhirstore_sql::SqlConfig::default().body_compression,
    };
    // Both secondaries start built, with their cursors at the log's head: on the shared test
    // database a new secondary would otherwise be rebuilt from every earlier run's data.
    let ready = async {
        let pg = fhirstore_sql::PostgresStore::connect(
            stores.postgres.as_deref().unwrap_or_default(),
            fhirstore_sql::SqlConfig::default(),
        )
        .await?;
        let mut config =
            fhirstore_redis::RedisConfig::new(stores.redis.clone().unwrap_or_default());
        config.prefix = stores.redis_prefix.clone();
        let redis = fhirstore_redis::RedisSecondary::connect(&config).await?;
        redis.mark_built().await?;
        std::fs::write(dir.path().join("tantivy-consumer-id"), &unique)
            .map_err(|e| fhirstore_core::Error::backend("id", false, e))?;
        let index = fhirstore_tantivy::TantivySecondary::open(
            &dir.path().join("tantivy"),
            Default::default(),
        )
        .await?;
        index.mark_built().await?;
        drop(index);
        let head = pg.log_head().await?;
        for name in [
            format!("redis-{}", stores.redis_prefix),
            format!("tantivy-{unique}"),
        ] {
            pg.lease(&name, "test-setup", Duration::from_secs(30))
                .await?;
            pg.advance(&name, "test-setup", head, None).await?;
            pg.release(&name, "test-setup").await?;
        }
        Ok::<_, fhirstore_core::Error>(())
    };
    if let Err(e) = ready.await {
        if std::env::var("FHIRSTORE_REQUIRE_SERVICES").as_deref() == Ok("1") {
            panic!("PostgreSQL or Redis unavailable: {e}");
        }
        eprintln!("skipping: PostgreSQL or Redis unavailable: {e}");
        return;
    }
    let s = match support::server_on(dir, &stores, ServerSettings::default()).await {
        Ok(s) => s,
        Err(e) if std::env::var("FHIRSTORE_REQUIRE_SERVICES").as_deref() != Ok("1") => {
            eprintln!("skipping: PostgreSQL or Redis unavailable: {e}");
            return;
        }
        Err(e) => panic!("PostgreSQL or Redis unavailable: {e}"),
    };
    let base = format!("/fhir/srv-{}", &unique[..20]);
    let p = json!({"resourceType": "Patient", "id": "pg1", "name": [{"family": "Postgres"}],
        "identifier": [{"system": "urn:srv", "value": unique}]});
    let r = s.put(&format!("{base}/Patient/pg1"), &p).await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(
        s.get(&format!("{base}/Patient/pg1")).await.header("etag"),
        Some("W/\"1\"")
    );
    let found = s
        .get(&format!("{base}/Patient?identifier=urn:srv|{unique}"))
        .await
        .json();
    assert_eq!(found["entry"][0]["resource"]["id"], "pg1");

    // Clinical access on PostgreSQL: the compartment, $everything and a Patient export.
    let o = json!({"resourceType": "Observation", "id": "pgo", "status": "final",
        "code": {"text": "x"}, "subject": {"reference": "Patient/pg1"}});
    assert_eq!(
        s.put(&format!("{base}/Observation/pgo"), &o).await.status,
        StatusCode::CREATED
    );
    let ids = |b: &serde_json::Value| -> Vec<String> {
        b["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                format!(
                    "{}/{}",
                    e["resource"]["resourceType"].as_str().unwrap_or(""),
                    e["resource"]["id"].as_str().unwrap_or("")
                )
            })
            .collect()
    };
    let compartment = s
        .get(&format!("{base}/Patient/pg1/Observation"))
        .await
        .json();
    assert_eq!(ids(&compartment), ["Observation/pgo"]);
    let everything = s
        .get(&format!("{base}/Patient/pg1/$everything"))
        .await
        .json();
    assert_eq!(ids(&everything), ["Patient/pg1", "Observation/pgo"]);
    let kick = s
        .call(
            axum::http::Method::GET,
            &format!("{base}/Patient/$export"),
            &[("prefer", "respond-async")],
            axum::body::Body::empty(),
        )
        .await;
    assert_eq!(kick.status, StatusCode::ACCEPTED);
    let poll = kick
        .header("content-location")
        .unwrap_or("")
        .trim_start_matches("http://fhir.test")
        .to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let manifest = loop {
        let r = s.get(&poll).await;
        if r.status == StatusCode::OK {
            break r.json();
        }
        assert_eq!(r.status, StatusCode::ACCEPTED);
        assert!(
            std::time::Instant::now() < deadline,
            "the export never finished"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let types: Vec<&str> = manifest["output"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["type"].as_str())
        .collect();
    assert_eq!(types, ["Observation", "Patient"], "{manifest}");

    let status = s.get("/admin/status").await.json();
    let names: Vec<&str> = status["secondaries"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert!(names.iter().any(|n| n.starts_with("tantivy-")), "{names:?}");
    assert!(
        names.contains(&format!("redis-fhirstore-srv-{unique}").as_str()),
        "{names:?}"
    );
    assert!(s
        .app
        .store
        .composite()
        .wait_for_sync(Duration::from_secs(60))
        .await
        .expect("sync"));
    let text = s
        .get(&format!("{base}/Patient?_content=postgres"))
        .await
        .json();
    assert_eq!(
        text["entry"][0]["resource"]["id"], "pg1",
        "tantivy answers full text"
    );

    let job = s
        .reconcile(&json!({"tenant": &base[6..], "dryRun": true}))
        .await;
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(
        job["report"]["entries"].as_array().map(Vec::len),
        Some(4),
        "{job}"
    );
    for count in ["missing", "extra", "stale", "ahead"] {
        assert_eq!(job["report"][count], 0, "{count}: {job}");
    }
    s.app.store.composite().shutdown().await;
    support::purge_redis(&stores).await;
}
