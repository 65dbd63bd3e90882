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
