//! The conformance suite and SQL checks against the embedded SQLite store (a real file, WAL).

async fn sqlite_store() -> Option<fhirstore_sql::SqliteStore> {
    fhirstore_integration::sqlite_store(env!("CARGO_TARGET_TMPDIR")).await
}

fhirstore_testkit::conformance_tests!(sqlite_store());
fhirstore_integration::sql_primary_tests!(sqlite_store());

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
