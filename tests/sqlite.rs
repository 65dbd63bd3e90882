//! The conformance suite and SQL checks against the embedded SQLite store (a real file, WAL).

async fn sqlite_store() -> Option<fhirstore_sql::SqliteStore> {
    fhirstore_integration::sqlite_store(env!("CARGO_TARGET_TMPDIR")).await
}

fhirstore_testkit::conformance_tests!(sqlite_store());

async fn two_stores_on_one_file(
    prefix: &str,
) -> (fhirstore_sql::SqliteStore, fhirstore_sql::SqliteStore) {
    fhirstore_integration::two_sqlite_stores_on_one_file(env!("CARGO_TARGET_TMPDIR"), prefix).await
}

fn fresh_file(prefix: &str) -> std::path::PathBuf {
    fhirstore_integration::fresh_sqlite_file(env!("CARGO_TARGET_TMPDIR"), prefix)
}
fhirstore_integration::sql_primary_tests!(sqlite_store());

/// Two store instances on one database file (as two processes would be) writing the same
/// resource concurrently: no "database is locked", no lost or duplicated version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_on_one_file_serialise_writers() {
    use fhirstore_core::{LogicalId, ResourceStorage, ResourceType};
    let (a, b) = two_stores_on_one_file("shared").await;
    let ctx = fhirstore_testkit::random_tenant();
    let pt = ResourceType::new("Patient").expect("type");
    let id = LogicalId::new("shared").expect("id");
    let body = || serde_json::json!({"resourceType": "Patient", "id": "shared"});
    a.update(&ctx, pt, &id, body(), None).await.expect("seed");
    let writers = (0..16).map(|w| {
        let store: &dyn ResourceStorage = if w % 2 == 0 { &a } else { &b };
        let (ctx, id) = (&ctx, &id);
        async move {
            for _ in 0..25 {
                store
                    .update(ctx, pt, id, body(), None)
                    .await
                    .expect("no lock error");
            }
        }
    });
    futures::future::join_all(writers).await;
    assert_eq!(
        b.read(&ctx, pt, &id).await.expect("read").version.get(),
        401
    );
    let other = a.read(&ctx, pt, &id).await.expect("read via a");
    assert_eq!(other.version.get(), 401);
}

/// With validation off, a body the R4 schema rejects is stored as sent; with the default
/// (strict) it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_can_be_switched_off() {
    use fhirstore_core::validate::Validation;
    use fhirstore_core::{LogicalId, ResourceStorage, ResourceType};
    let ctx = fhirstore_testkit::random_tenant();
    let pt = ResourceType::new("Patient").expect("type");
    let id = LogicalId::new("loose").expect("id");
    let body = serde_json::json!({"resourceType": "Patient", "id": "loose", "gender": 5});
    for (validation, accepted) in [(Validation::Off, true), (Validation::Strict, false)] {
        let path = fresh_file("validation");
        let config = fhirstore_sql::SqlConfig {
            validation,
            ..Default::default()
        };
        let store = fhirstore_sql::SqliteStore::open(&path, config)
            .await
            .expect("open");
        let r = store.update(&ctx, pt, &id, body.clone(), None).await;
        assert_eq!(r.is_ok(), accepted, "{validation:?}: {r:?}");
        assert_eq!(store.read(&ctx, pt, &id).await.is_ok(), accepted);
    }
}

/// The same suite through `Arc<dyn ResourceStorage>`, exercising the forwarding impl.
mod via_arc {
    use std::sync::Arc;

    use fhirstore_core::ResourceStorage;

    use super::sqlite_store;

    async fn store() -> Option<Arc<dyn ResourceStorage>> {
        sqlite_store()
            .await
            .map(|s| Arc::new(s) as Arc<dyn ResourceStorage>)
    }

    fhirstore_testkit::conformance_tests!(store());
}

/// A tenant's own parameter registered and reindexed through two stores on one file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_parameters_across_stores() {
    let (a, b) = two_stores_on_one_file("params").await;
    fhirstore_testkit::checks::custom_parameters_across_stores(&a, &b).await;
}

/// Searches past `search_timeout` are cancelled while reads and writes keep answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_searches_are_bounded() {
    let Some(store) = fhirstore_integration::sqlite_store_with(
        env!("CARGO_TARGET_TMPDIR"),
        fhirstore_integration::bounded_search_config(),
    )
    .await
    else {
        return;
    };
    fhirstore_integration::heavy_searches_are_bounded(std::sync::Arc::new(store)).await;
}

/// The search checks hold under each page strategy: the smallest set driving, and every
/// page walking its order (by id, or by the sort parameter's index).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_strategy_answers_the_search_checks() {
    for (_, config) in fhirstore_integration::strategy_configs() {
        let Some(store) =
            fhirstore_integration::sqlite_store_with(env!("CARGO_TARGET_TMPDIR"), config).await
        else {
            return;
        };
        fhirstore_integration::search_checks(&store).await;
    }
}

/// Date criteria on one parameter follow the model under each page strategy and the default
/// choice, where a range of the date index drives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn date_ranges_follow_the_model() {
    for (_, config) in fhirstore_integration::strategy_configs() {
        let Some(store) =
            fhirstore_integration::sqlite_store_with(env!("CARGO_TARGET_TMPDIR"), config).await
        else {
            return;
        };
        fhirstore_integration::date_ranges_follow_the_model(&store).await;
    }
    let Some(store) = sqlite_store().await else {
        return;
    };
    fhirstore_integration::date_ranges_follow_the_model(&store).await;
}

/// Sorted pages under the default strategy choice follow the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sorted_pages_follow_the_model() {
    let Some(store) = sqlite_store().await else {
        return;
    };
    fhirstore_integration::sorted_pages_follow_the_model(&store).await;
}

/// Rows a parameter shares with others are stored once, under their parts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_rows_are_stored_once() {
    use sqlx::Connection;
    let path = fresh_file("shared-rows");
    let store = fhirstore_sql::SqliteStore::open(&path, fhirstore_sql::SqlConfig::default())
        .await
        .expect("open");
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("connect");
    fhirstore_integration::shared_rows_are_stored_once(
        &store,
        async |sql: String| {
            let (n,): (i64,) = sqlx::query_as(&sql)
                .fetch_one(&mut conn)
                .await
                .expect("count");
            n
        },
        |t| format!("(SELECT key FROM tenant_keys WHERE tenant = '{t}')"),
    )
    .await;
}

/// Bodies are stored deflated, as text at level 0, and text bodies of older files still read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_stored_deflated() {
    use sqlx::Connection;
    let path = fresh_file("bodies");
    let deflated = fhirstore_sql::SqliteStore::open(&path, fhirstore_sql::SqlConfig::default())
        .await
        .expect("open");
    let plain_config = fhirstore_sql::SqlConfig {
        body_compression: 0,
        ..Default::default()
    };
    let plain = fhirstore_sql::SqliteStore::open(&path, plain_config)
        .await
        .expect("open");
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("connect");
    fhirstore_integration::bodies_are_stored_deflated(
        &deflated,
        &plain,
        async |sql: String| {
            let (n,): (i64,) = sqlx::query_as(&sql)
                .fetch_one(&mut conn)
                .await
                .expect("scalar");
            n
        },
        |json| format!("'{}'", json.replace('\'', "''")),
    )
    .await;
}

/// Search-index rows hold a short key for their tenant, not its name, a key of its own per
/// tenant; migration 0015 turns the names of a file written before it into keys, and the
/// same searches answer the same after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_rows_hold_tenant_keys() {
    use fhirstore_core::{Handling, LogicalId, ResourceStorage as _, ResourceType, SearchQuery};
    use sqlx::Connection;
    let path = fresh_file("tenant-keys");
    let open = || fhirstore_sql::SqliteStore::open(&path, fhirstore_sql::SqlConfig::default());
    let store = open().await.expect("open");
    let pt = ResourceType::new("Patient").expect("type");
    let ob = ResourceType::new("Observation").expect("type");
    let (a, b) = (
        fhirstore_testkit::random_tenant(),
        fhirstore_testkit::random_tenant(),
    );
    for (ctx, n) in [(&a, 3), (&b, 2)] {
        for i in 0..n {
            let id = format!("k{i}");
            let body = serde_json::json!({"resourceType": "Patient", "id": id,
                "name": [{"family": "Keyes"}], "gender": "female"});
            store
                .update(ctx, pt, &LogicalId::new(&id).expect("id"), body, None)
                .await
                .expect("patient");
            let obs = serde_json::json!({"resourceType": "Observation", "id": id,
                "status": "final", "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                "subject": {"reference": format!("Patient/{id}")}});
            store
                .update(ctx, ob, &LogicalId::new(&id).expect("id"), obs, None)
                .await
                .expect("observation");
        }
    }
    let queries = [
        (pt, "family=keyes&gender=female"),
        (ob, "subject:Patient.family=keyes"),
        (pt, "_has:Observation:subject:code=8867-4"),
        (pt, "_sort=family&_count=2"),
    ];
    let answers = async |store: &fhirstore_sql::SqliteStore| {
        let mut out = Vec::new();
        for ctx in [&a, &b] {
            for (rt, qs) in queries {
                let q = SearchQuery::parse(Some(rt), qs, Handling::Strict).expect(qs);
                let page = store.search(ctx, &q).await.expect(qs);
                out.push((qs, page.matches.len(), page.total));
            }
        }
        out
    };
    let before = answers(&store).await;
    let found: Vec<usize> = before.iter().map(|(_, n, _)| *n).collect();
    assert_eq!(found, [3, 3, 3, 2, 2, 2, 2, 2], "{before:?}");

    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("connect");
    let scalar = async |conn: &mut sqlx::SqliteConnection, sql: String| -> String {
        let (v,): (String,) = sqlx::query_as(&sql).fetch_one(conn).await.expect(&sql);
        v
    };
    let key_of = |t: &fhirstore_core::TenantContext| {
        format!(
            "SELECT key FROM tenant_keys WHERE tenant = '{}'",
            t.tenant().as_str()
        )
    };
    let (key_a, key_b) = (
        scalar(&mut conn, key_of(&a)).await,
        scalar(&mut conn, key_of(&b)).await,
    );
    assert!(key_a.starts_with('.') && key_b.starts_with('.') && key_a != key_b);
    let tables = [
        "search_token",
        "search_string",
        "search_date",
        "search_quantity",
        "search_reference",
        "search_uri",
        "search_composite",
    ];
    let mut tenants: Vec<String> = Vec::new();
    for table in tables {
        let rows: Vec<(String,)> = sqlx::query_as(&format!("SELECT DISTINCT tenant FROM {table}"))
            .fetch_all(&mut conn)
            .await
            .expect("tenants");
        tenants.extend(rows.into_iter().map(|(t,)| t));
    }
    tenants.sort();
    tenants.dedup();
    assert_eq!(
        tenants,
        {
            let mut k = vec![key_a.clone(), key_b.clone()];
            k.sort();
            k
        },
        "index rows hold keys, never names"
    );

    // As a file written before migration 0015 held them: names in the index rows.
    drop(store);
    for table in tables {
        sqlx::query(&format!(
            "UPDATE {table} SET tenant = (SELECT k.tenant FROM tenant_keys k WHERE k.key = {table}.tenant)"
        ))
        .execute(&mut conn)
        .await
        .expect("back to names");
    }
    sqlx::query("DROP TABLE tenant_keys; DELETE FROM _sqlx_migrations WHERE version = 15")
        .execute(&mut conn)
        .await
        .expect("before 0015");
    drop(conn);
    let store = open().await.expect("migrated");
    assert_eq!(answers(&store).await, before);
}
