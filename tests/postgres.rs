//! The conformance suite and SQL checks against the PostgreSQL server (FHIRSTORE_TEST_POSTGRES_URL).

use fhirstore_integration::postgres_store;

fhirstore_testkit::conformance_tests!(postgres_store());
fhirstore_integration::sql_primary_tests!(postgres_store());

/// A tenant's own parameter registered and reindexed through two stores (two pools, as two
/// processes would have) on one database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_parameters_across_stores() {
    let (Some(a), Some(b)) = (postgres_store().await, postgres_store().await) else {
        return;
    };
    fhirstore_testkit::checks::custom_parameters_across_stores(&a, &b).await;
}

/// The same suite through `Arc<dyn ResourceStorage>`, exercising the forwarding impl.
mod via_arc {
    use std::sync::Arc;

    use fhirstore_core::ResourceStorage;
    use fhirstore_integration::postgres_store;

    async fn store() -> Option<Arc<dyn ResourceStorage>> {
        postgres_store()
            .await
            .map(|s| Arc::new(s) as Arc<dyn ResourceStorage>)
    }

    fhirstore_testkit::conformance_tests!(store());
}

/// `refresh_statistics` vacuums and analyzes the search tables (so index-only scans need no
/// heap fetches, and the planner knows the data after a bulk load), and needs admin rights.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_statistics_vacuums_and_analyzes() {
    use fhirstore_core::{Error, Permissions, ResourceStorage, TenantContext};
    let Some(store) = postgres_store().await else {
        return;
    };
    let Ok(url) = std::env::var("FHIRSTORE_TEST_POSTGRES_URL") else {
        return;
    };
    let ctx = fhirstore_testkit::random_tenant();
    let reader = TenantContext::new(ctx.tenant().clone(), Permissions::READ_ONLY);
    assert!(matches!(
        store.refresh_statistics(&reader).await,
        Err(Error::TenantDenied(_))
    ));
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .expect("connect");
    let (before,): (f64,) = sqlx::query_as("SELECT extract(epoch FROM clock_timestamp())::float8")
        .fetch_one(&mut conn)
        .await
        .expect("now");
    store.refresh_statistics(&ctx).await.expect("refresh");
    for table in ["resources", "search_token", "search_string"] {
        let (vacuumed, analyzed): (Option<f64>, Option<f64>) = sqlx::query_as(
            "SELECT extract(epoch FROM last_vacuum)::float8, \
             extract(epoch FROM last_analyze)::float8 \
             FROM pg_stat_user_tables WHERE relname = $1",
        )
        .bind(table)
        .fetch_one(&mut conn)
        .await
        .expect("table stats");
        assert!(vacuumed.is_some_and(|t| t >= before), "{table} vacuumed");
        assert!(analyzed.is_some_and(|t| t >= before), "{table} analyzed");
    }
}

/// Searches past `search_timeout` are cancelled while reads and writes keep answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_searches_are_bounded() {
    let Some(store) =
        fhirstore_integration::postgres_store_with(fhirstore_integration::bounded_search_config())
            .await
    else {
        return;
    };
    fhirstore_integration::heavy_searches_are_bounded(std::sync::Arc::new(store)).await;
}

/// A search whose caller goes away mid-statement is cancelled on the server at once, not at
/// `search_timeout`: the one search connection answers the next search right away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_searches_are_cancelled_at_once() {
    use fhirstore_core::ResourceStorage as _;
    use std::time::{Duration, Instant};
    let config = fhirstore_sql::SqlConfig {
        search_timeout: Duration::from_secs(120),
        search_connections: 1,
        ..Default::default()
    };
    let Some(store) = fhirstore_integration::postgres_store_with(config).await else {
        return;
    };
    let store = std::sync::Arc::new(store);
    let ctx = fhirstore_testkit::random_tenant();
    fhirstore_integration::load_named_patients(&*store, &ctx, 1_000).await;
    let mut watcher =
        <sqlx::PgConnection as sqlx::Connection>::connect(&fhirstore_integration::postgres_url())
            .await
            .expect("connect");
    let heavy = {
        let (store, ctx) = (store.clone(), ctx.clone());
        tokio::spawn(async move {
            store
                // Seconds of work on the server (60,000 bound values, PostgreSQL's limit being
                // 65,535), far longer than the next search may wait.
                .search(&ctx, &fhirstore_integration::heavy_query_of(100, 600))
                .await
        })
    };
    // Until the heavy statement has run on the server for a while: no other search of the
    // suite runs that long.
    let running = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND application_name = 'fhirstore-search' AND state = 'active' \
         AND now() - query_start > interval '300 milliseconds'";
    let waited = Instant::now();
    loop {
        let (n,): (i64,) = sqlx::query_as(running)
            .fetch_one(&mut watcher)
            .await
            .expect("activity");
        if n > 0 {
            break;
        }
        assert!(
            !heavy.is_finished(),
            "the heavy search ended before it was abandoned"
        );
        assert!(
            waited.elapsed() < Duration::from_secs(60),
            "the heavy search never ran"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    heavy.abort();
    let light = fhirstore_core::SearchQuery::parse(
        Some(fhirstore_core::ResourceType::new("Patient").expect("type")),
        "family:exact=Baker0x1",
        fhirstore_core::search::Handling::Strict,
    )
    .expect("query");
    let t = Instant::now();
    let page = store.search(&ctx, &light).await.expect("light search");
    assert_eq!(page.matches.len(), 1);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "the next search waited {:?} for the abandoned one",
        t.elapsed()
    );
}

/// The search checks hold under each page strategy: the smallest set driving, and every
/// page walking its order (by id, or by the sort parameter's index).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_strategy_answers_the_search_checks() {
    for (_, config) in fhirstore_integration::strategy_configs() {
        let Some(store) = fhirstore_integration::postgres_store_with(config).await else {
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
        let Some(store) = fhirstore_integration::postgres_store_with(config).await else {
            return;
        };
        fhirstore_integration::date_ranges_follow_the_model(&store).await;
    }
    let Some(store) = fhirstore_integration::postgres_store().await else {
        return;
    };
    fhirstore_integration::date_ranges_follow_the_model(&store).await;
}

/// Sorted pages under the default strategy choice follow the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sorted_pages_follow_the_model() {
    let Some(store) = fhirstore_integration::postgres_store().await else {
        return;
    };
    fhirstore_integration::sorted_pages_follow_the_model(&store).await;
}

/// Rows a parameter shares with others are stored once, under their parts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_rows_are_stored_once() {
    let (Some(store), Ok(url)) = (
        postgres_store().await,
        std::env::var("FHIRSTORE_TEST_POSTGRES_URL"),
    ) else {
        return;
    };
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
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
        |t| format!("'{t}'"),
    )
    .await;
}

/// Bodies are stored deflated, as text at level 0, and text bodies from before bytea still read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_stored_deflated() {
    let (Some(deflated), Ok(url)) = (
        postgres_store().await,
        std::env::var("FHIRSTORE_TEST_POSTGRES_URL"),
    ) else {
        return;
    };
    let plain_config = fhirstore_sql::SqlConfig {
        body_compression: 0,
        ..Default::default()
    };
    let plain = fhirstore_sql::PostgresStore::connect(&url, plain_config)
        .await
        .expect("connect");
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .expect("connect");
    fhirstore_integration::bodies_are_stored_deflated(
        &deflated,
        &plain,
        async |sql: String| {
            let (n,): (i32,) = sqlx::query_as(&sql)
                .fetch_one(&mut conn)
                .await
                .expect("scalar");
            i64::from(n)
        },
        |json| format!("convert_to('{}', 'UTF8')", json.replace('\'', "''")),
    )
    .await;
}
