//! Paging cursors are client input: any cursor, under any sort, against the SQLite primary and
//! the tantivy index, is a page or a request error; never a panic or a backend failure (a 5xx).
#![no_main]

use std::sync::OnceLock;

use fhirstore_core::search::Handling;
use fhirstore_core::secondary::{Change, Secondary};
use fhirstore_core::{
    Error, LogicalId, ResourceStorage, ResourceType, SearchQuery, TenantContext, TenantId,
};
use fhirstore_sql::{SqlConfig, SqliteStore};
use fhirstore_tantivy::{TantivyConfig, TantivySecondary};
use libfuzzer_sys::fuzz_target;
use serde_json::json;

struct Stores {
    runtime: tokio::runtime::Runtime,
    sql: SqliteStore,
    index: TantivySecondary,
    ctx: TenantContext,
}

const SORTS: [&str; 5] = [
    "",
    "&_sort=family",
    "&_sort=-birthdate,_id",
    "&_sort=_lastUpdated",
    "&_sort=-_id",
];

/// A small store, seeded once per process, under the fuzz crate's target directory.
fn stores() -> &'static Stores {
    static STORES: OnceLock<Stores> = OnceLock::new();
    STORES.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        std::fs::create_dir_all(&dir).expect("target dir");
        let path = dir.join(format!("cursor-{}.sqlite", std::process::id()));
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        let (sql, index, ctx) = runtime.block_on(async {
            let sql = SqliteStore::open(&path, SqlConfig::default())
                .await
                .expect("sqlite");
            let index = TantivySecondary::in_memory(TantivyConfig::default())
                .await
                .expect("index");
            let ctx = TenantContext::full(TenantId::new("fuzz").expect("tenant"));
            let pt = ResourceType::new("Patient").expect("type");
            let mut changes = Vec::new();
            for i in 0..30 {
                let id = LogicalId::new(format!("p{i:02}")).expect("id");
                let body = json!({"resourceType": "Patient", "id": id.as_str(),
                    "name": [{"family": format!("F{}", i % 7)}],
                    "birthDate": format!("19{:02}-0{}-1{}", 50 + i, 1 + i % 9, i % 10)});
                let w = sql.update(&ctx, pt, &id, body, None).await.expect("seed");
                changes.push(Change::of(&w.resource));
            }
            index.apply(&changes).await.expect("index");
            index.mark_built().await.expect("built");
            (sql, index, ctx)
        });
        Stores {
            runtime,
            sql,
            index,
            ctx,
        }
    })
}

fn acceptable(r: &fhirstore_core::Result<fhirstore_core::SearchPage>, cursor: &str) {
    match r {
        Ok(_) | Err(Error::InvalidSearch(_) | Error::Unsupported(_) | Error::TooCostly(_)) => {}
        Err(e) => panic!("cursor {cursor:?} made a {e:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let s = stores();
    let cursor = String::from_utf8_lossy(rest).into_owned();
    let pt = ResourceType::new("Patient").ok();
    let sort = SORTS[usize::from(pick) % SORTS.len()];
    let Ok(mut q) = SearchQuery::parse(pt, &format!("_count=5{sort}"), Handling::Strict) else {
        return;
    };
    q.cursor = Some(cursor.clone());
    acceptable(&s.runtime.block_on(s.sql.search(&s.ctx, &q)), &cursor);
    let Ok(mut q) = SearchQuery::parse(pt, "_content=f1&_count=5", Handling::Strict) else {
        return;
    };
    q.cursor = Some(cursor.clone());
    acceptable(&s.runtime.block_on(s.index.search(&s.ctx, &q)), &cursor);
});
