//! An in-process server over a fresh SQLite + tantivy data directory, called without a socket.

#![allow(dead_code, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use axum::Router;
use fhirstore_server::config::{ModeArg, SearchBounds, ServerSettings, StoreSettings};
use fhirstore_server::{deploy, router, App};
use serde_json::Value;
use tower::ServiceExt as _;

pub struct Srv {
    pub app: Arc<App>,
    router: Router,
    pub dir: tempfile::TempDir,
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{}: body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `OperationOutcome` issue code of an error response.
    pub fn issue(&self) -> String {
        let v = self.json();
        assert_eq!(v["resourceType"], "OperationOutcome", "{v}");
        v["issue"][0]["code"].as_str().unwrap_or("").to_owned()
    }
}

pub fn store_settings(dir: &std::path::Path) -> StoreSettings {
    StoreSettings {
        data_dir: dir.to_owned(),
        postgres: None,
        redis: None,
        redis_prefix: "fhirstore".to_owned(),
        redis_mode: ModeArg::Off,
        index_mode: ModeArg::Async,
        search: SearchBounds::default(),
        memory_cache: fhirstore_server::config::DEFAULT_MEMORY_CACHE,
        body_compression: fhirstore_sql::SqlConfig::default().body_compression,
    }
}

pub async fn server(settings: ServerSettings) -> Srv {
    let dir = tempfile::tempdir().expect("temp dir");
    let stores = store_settings(dir.path());
    server_on(dir, &stores, settings)
        .await
        .expect("open stores")
}

/// A server on the stores `stores` names, keeping `dir` alive with it.
pub async fn server_on(
    dir: tempfile::TempDir,
    stores: &StoreSettings,
    settings: ServerSettings,
) -> fhirstore_core::Result<Srv> {
    let store = deploy::open(stores).await?;
    let settings = ServerSettings {
        export_dir: settings
            .export_dir
            .or_else(|| Some(stores.data_dir.join("exports"))),
        ..settings
    };
    let app = App::new(store, settings);
    Ok(Srv {
        router: router(app.clone()),
        app,
        dir,
    })
}

/// Deletes every Redis key the stores' prefix owns.
pub async fn purge_redis(stores: &StoreSettings) {
    let mut config = fhirstore_redis::RedisConfig::new(stores.redis.clone().unwrap_or_default());
    config.prefix = stores.redis_prefix.clone();
    fhirstore_redis::RedisSecondary::connect(&config)
        .await
        .expect("redis")
        .purge()
        .await
        .expect("purge");
}

pub async fn open_server() -> Srv {
    server(ServerSettings::default()).await
}

pub const FHIR: (&str, &str) = ("content-type", "application/fhir+json");

impl Srv {
    pub async fn call(
        &self,
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
        body: impl Into<Body>,
    ) -> Resp {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "fhir.test");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self
            .router
            .clone()
            .oneshot(req.body(body.into()).expect("request"))
            .await
            .expect("infallible");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .expect("body")
            .to_vec();
        Resp {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, uri: &str) -> Resp {
        self.call(Method::GET, uri, &[], Body::empty()).await
    }

    pub async fn post(&self, uri: &str, body: &Value) -> Resp {
        self.call(Method::POST, uri, &[FHIR], body.to_string())
            .await
    }

    pub async fn put(&self, uri: &str, body: &Value) -> Resp {
        self.call(Method::PUT, uri, &[FHIR], body.to_string()).await
    }

    pub async fn delete(&self, uri: &str) -> Resp {
        self.call(Method::DELETE, uri, &[], Body::empty()).await
    }

    /// Every id a search finds, following `next` links to the end.
    pub async fn all_ids(&self, uri: &str) -> Vec<String> {
        self.all_entries(uri)
            .await
            .into_iter()
            .filter(|(mode, _)| mode == "match")
            .map(|(_, r)| r["id"].as_str().unwrap_or("").to_owned())
            .collect()
    }

    /// Every entry of a searchset, following `next` links to the end: its search mode and
    /// its resource.
    pub async fn all_entries(&self, uri: &str) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        let mut next = Some(uri.to_owned());
        let mut pages = 0;
        while let Some(u) = next.take() {
            pages += 1;
            assert!(pages < 1_000, "paging does not end");
            let r = self.get(&u).await;
            assert_eq!(
                r.status,
                StatusCode::OK,
                "{u}: {}",
                String::from_utf8_lossy(&r.body)
            );
            let b = r.json();
            for e in b["entry"].as_array().into_iter().flatten() {
                let mode = e["search"]["mode"].as_str().unwrap_or("").to_owned();
                out.push((mode, e["resource"].clone()));
            }
            next = b["link"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|l| l["relation"] == "next")
                .and_then(|l| l["url"].as_str())
                .map(|u| u.trim_start_matches("http://fhir.test").to_owned());
        }
        out
    }
}

impl Srv {
    /// Starts a reconcile job over HTTP and waits for it to end; returns the finished job.
    pub async fn reconcile(&self, ask: &Value) -> Value {
        let started = self
            .call(
                Method::POST,
                "/admin/reconcile",
                &[("content-type", "application/json")],
                ask.to_string(),
            )
            .await;
        assert_eq!(started.status, StatusCode::ACCEPTED);
        let location = started.header("location").expect("job location").to_owned();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let job = self.get(&location).await.json();
            if job["state"] != "running" {
                return job;
            }
            assert!(Instant::now() < deadline, "the job never finished");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
