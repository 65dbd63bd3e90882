//! A tour of the storage API on the embedded SQLite store, with no other service needed:
//! `cargo run -p fhirstore-sql --example quickstart [DATA_DIR]`.

use fhirstore_core::{
    Handling, HistoryRequest, HistoryScope, ResourceStorage, ResourceType, SearchQuery,
    TenantContext, TenantId,
};
use fhirstore_sql::{SqlConfig, SqliteStore};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "data".into());
    std::fs::create_dir_all(&dir)?;
    let path = std::path::Path::new(&dir).join("fhirstore.sqlite");
    let store = SqliteStore::open(&path, SqlConfig::default()).await?;
    let ctx = TenantContext::full(TenantId::new("demo")?);
    let patient = ResourceType::new("Patient")?;

    let created = store
        .create(
            &ctx,
            patient,
            json!({"resourceType": "Patient", "name": [{"family": "Chalmers", "given": ["Peter"]}],
                   "identifier": [{"system": "urn:mrn", "value": "12345"}]}),
        )
        .await?;
    let id = created.resource.key.id.clone();
    println!("created Patient/{id} version {}", created.resource.version);

    let mut body = created.resource.content.clone();
    body["active"] = json!(true);
    let updated = store
        .update(&ctx, patient, &id, body, Some(created.resource.version))
        .await?;
    println!("updated to version {}", updated.resource.version);

    let query = SearchQuery::parse(
        Some(patient),
        "identifier=urn:mrn|12345&_total=accurate",
        Handling::Strict,
    )?;
    let page = store.search(&ctx, &query).await?;
    println!(
        "identifier search: {} match(es) in total",
        page.total.unwrap_or(0)
    );

    let history = store
        .history(
            &ctx,
            &HistoryRequest::new(HistoryScope::Instance(patient, id.clone())),
        )
        .await?;
    for v in &history.entries {
        println!(
            "  history: version {} at {}",
            v.version,
            fhirstore_core::format_instant(v.last_updated)
        );
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&store.read(&ctx, patient, &id).await?.content)?
    );
    println!("database: {}", path.display());
    Ok(())
}
