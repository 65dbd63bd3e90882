//! The secondary checks against the tantivy secondary (an index in memory), and what only it
//! has: full-text search with relevance, near-real-time commits, and an index directory that
//! is missing or damaged.

use fhirstore_core::search::Handling;
use fhirstore_core::secondary::{Change, Health, Secondary};
use fhirstore_core::{
    from_micros, LogicalId, ResourceKey, ResourceType, SearchQuery, TenantContext, VersionId,
};
use fhirstore_tantivy::{TantivyConfig, TantivySecondary};
use serde_json::{json, Value};

async fn tantivy_secondary() -> Option<TantivySecondary> {
    Some(
        TantivySecondary::in_memory(TantivyConfig::default())
            .await
            .expect("index in memory"),
    )
}

async fn sqlite_store() -> Option<fhirstore_sql::SqliteStore> {
    fhirstore_integration::sqlite_store(env!("CARGO_TARGET_TMPDIR")).await
}

fhirstore_testkit::secondary_tests!(tantivy_secondary(), sqlite_store());

fn change(ctx: &TenantContext, t: &str, id: &str, v: u64, body: Value) -> Change {
    Change {
        tenant: ctx.tenant().clone(),
        key: ResourceKey {
            resource_type: ResourceType::new(t).expect("type"),
            id: LogicalId::new(id).expect("id"),
        },
        version: VersionId::new(v).expect("version"),
        last_updated: from_micros(1_700_000_000_000_000 + v as i64),
        content: Some(body),
    }
}

fn note(id: &str, div: &str, extra: &str) -> Value {
    json!({
        "resourceType": "Observation", "id": id, "status": "final",
        "code": {"text": extra},
        "text": {"status": "generated", "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">{div}</div>")},
    })
}

async fn ids(s: &TantivySecondary, ctx: &TenantContext, qs: &str) -> Vec<String> {
    let q = SearchQuery::parse(ResourceType::new("Observation").ok(), qs, Handling::Strict)
        .expect("query");
    s.search(ctx, &q)
        .await
        .expect("search")
        .matches
        .into_iter()
        .map(|r| r.key.id.to_string())
        .collect()
}

/// `_text` searches the narrative only (tags stripped, case and accents folded), `_content`
/// every string; words are AND-ed, comma-separated values OR-ed; `_sort=_score` puts the most
/// relevant first; another tenant's text is never found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_text_with_relevance() {
    let s = tantivy_secondary().await.expect("index");
    let (a, b) = (
        fhirstore_testkit::random_tenant(),
        fhirstore_testkit::random_tenant(),
    );
    let docs = [
        (
            "n1",
            "<p>Patient reports <b>chest pain</b> after exercise.</p>",
            "ECG",
        ),
        (
            "n2",
            "Chest pain, chest tightness, chest pressure: chest CT ordered",
            "CT",
        ),
        (
            "n3",
            "No complaints. Fiebre &amp; tos resolved (Ménière excluded)",
            "pain score",
        ),
        ("n4", "Routine visit", "routine"),
    ];
    let mut changes: Vec<Change> = docs
        .iter()
        .map(|(id, div, extra)| change(&a, "Observation", id, 1, note(id, div, extra)))
        .collect();
    changes.push(change(
        &b,
        "Observation",
        "n9",
        1,
        note("n9", "chest pain everywhere", "x"),
    ));
    s.apply(&changes).await.expect("apply");
    s.mark_built().await.expect("built");

    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    assert_eq!(
        sorted(ids(&s, &a, "_text=chest%20pain").await),
        ["n1", "n2"]
    );
    // "pain" is in n3's code text, not its narrative.
    assert_eq!(
        sorted(ids(&s, &a, "_content=pain").await),
        ["n1", "n2", "n3"]
    );
    assert_eq!(sorted(ids(&s, &a, "_text=pain").await), ["n1", "n2"]);
    assert_eq!(
        ids(&s, &a, "_text=MENIERE").await,
        ["n3"],
        "accents and case fold"
    );
    assert_eq!(
        ids(&s, &a, "_text=b").await,
        Vec::<String>::new(),
        "tags are not text"
    );
    assert_eq!(
        sorted(ids(&s, &a, "_text=routine,fiebre").await),
        ["n3", "n4"]
    );
    assert_eq!(ids(&s, &a, "_text=chest&_sort=_score").await, ["n2", "n1"]);
    assert_eq!(ids(&s, &b, "_text=chest").await, ["n9"]);
    assert_eq!(
        sorted(ids(&s, &a, "_content=pain&status=final").await),
        ["n1", "n2", "n3"]
    );
}

/// Applies are batched into commits (with the timer far away, nothing commits on its own),
/// yet never hidden: a search or a read by id commits what is pending first, so it sees every
/// change applied before it, as a synchronous apply promises.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_are_batched_until_flush() {
    let config = TantivyConfig {
        commit_interval: std::time::Duration::from_secs(3600),
        ..TantivyConfig::default()
    };
    let s = TantivySecondary::in_memory(config).await.expect("index");
    s.mark_built().await.expect("built");
    let a = fhirstore_testkit::random_tenant();
    s.apply(&[change(
        &a,
        "Observation",
        "w1",
        1,
        note("w1", "waiting", "x"),
    )])
    .await
    .expect("apply");
    assert_eq!(s.pending(), 1, "held for the batch, not committed alone");
    assert_eq!(ids(&s, &a, "_text=waiting").await, ["w1"]);
    assert_eq!(s.pending(), 0, "the search committed it");

    s.apply(&[change(
        &a,
        "Observation",
        "w1",
        2,
        note("w1", "changed", "x"),
    )])
    .await
    .expect("apply v2");
    assert_eq!(s.pending(), 1);
    let read = s
        .read(
            &a,
            ResourceType::new("Observation").expect("t"),
            &LogicalId::new("w1").expect("id"),
        )
        .await
        .expect("read")
        .expect("held");
    assert_eq!(read.version.get(), 2);
    assert_eq!(ids(&s, &a, "_text=changed").await, ["w1"]);
}

/// An index directory: new is unbuilt; built and reopened keeps its data and state; damaged
/// (unreadable metadata) is moved aside and starts empty, asking for a rebuild, rather than
/// failing or answering from what is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_directory_lifecycle() {
    let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("fhirstore-tantivy")
        .join(fhirstore_testkit::random_tenant().tenant().as_str());
    let dir = root.join("index");
    let a = fhirstore_testkit::random_tenant();
    let obs = ResourceType::new("Observation").expect("t");
    let id = LogicalId::new("d1").expect("id");
    {
        let s = TantivySecondary::open(&dir, TantivyConfig::default())
            .await
            .expect("open new");
        assert!(matches!(s.health().await, Health::NeedsRebuild(_)));
        assert!(
            s.read(&a, obs, &id).await.is_err(),
            "unbuilt index answered"
        );
        s.apply(&[change(&a, "Observation", "d1", 1, note("d1", "kept", "x"))])
            .await
            .expect("apply");
        s.mark_built().await.expect("built");
    }
    {
        let s = TantivySecondary::open(&dir, TantivyConfig::default())
            .await
            .expect("reopen");
        assert_eq!(s.health().await, Health::Healthy);
        let r = s.read(&a, obs, &id).await.expect("read").expect("kept");
        assert_eq!(r.version.get(), 1);
        assert_eq!(ids(&s, &a, "_text=kept").await, ["d1"]);
    }
    std::fs::write(dir.join("meta.json"), b"{ not json").expect("damage");
    let s = TantivySecondary::open(&dir, TantivyConfig::default())
        .await
        .expect("a damaged index still opens");
    match s.health().await {
        Health::NeedsRebuild(why) => assert!(why.contains("could not be opened"), "{why}"),
        other => panic!("damaged index reported {other:?}"),
    }
    assert!(s.read(&a, obs, &id).await.is_err());
    let aside: Vec<_> = std::fs::read_dir(&root)
        .expect("root")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("damaged"))
        .collect();
    assert_eq!(
        aside.len(),
        1,
        "the damaged index is kept aside for inspection"
    );
    s.mark_built().await.expect("rebuilt (empty)");
    assert_eq!(s.read(&a, obs, &id).await.expect("read"), None);
}

/// A cursor is client input: any offset, up to the largest number it can spell, is an empty
/// page or a clear error, never an overflow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cursors_cannot_overflow() {
    let s = tantivy_secondary().await.expect("index");
    let a = fhirstore_testkit::random_tenant();
    s.apply(&[change(&a, "Observation", "n1", 1, note("n1", "pain", "x"))])
        .await
        .expect("apply");
    s.mark_built().await.expect("built");
    for cursor in [
        "tantivy%3A18446744073709551615",
        "tantivy%3A18446744073709551614",
    ] {
        assert!(ids(&s, &a, &format!("_text=pain&_cursor={cursor}"))
            .await
            .is_empty());
    }
    let q = SearchQuery::parse(
        ResourceType::new("Observation").ok(),
        "_text=pain&_cursor=tantivy%3A99999999999999999999999",
        Handling::Strict,
    )
    .expect("query");
    assert!(matches!(
        s.search(&a, &q).await,
        Err(fhirstore_core::Error::InvalidSearch(_))
    ));
}
