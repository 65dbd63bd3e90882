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
