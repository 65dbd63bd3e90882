//! Searches split between backends: full text (only tantivy answers it) combined with what
//! only the primary answers (chains, `_has`, includes, sorts by a parameter) or with anything
//! else, on a SQLite and on a PostgreSQL primary.
//!
//! Each split answer is checked against the single-backend answers it is made of: the matches
//! of the full-text part alone (tantivy) and of the rest alone (whichever backend the router
//! picks for it), intersected, in the order the rest asks for (or tantivy's relevance order
//! for `_sort=_score`), page by page, with the includes the primary gives those matches, in two
//! tenants that hold different data.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use fhirstore_core::changelog::Primary;
use fhirstore_core::search::Handling;
use fhirstore_core::secondary::Secondary;
use fhirstore_core::{Error, ResourceStorage, ResourceType, SearchQuery, TenantContext};
use fhirstore_sync::{CompositeStorage, Routed, SecondaryConfig, SyncConfig};
use fhirstore_tantivy::{TantivyConfig, TantivySecondary};
use serde_json::json;

/// The stack users run by default: the primary and an asynchronous tantivy index.
async fn stack(primary: Arc<dyn Primary>, split_bound: usize) -> CompositeStorage {
    let index = TantivySecondary::in_memory(TantivyConfig {
        commit_interval: Duration::from_millis(20),
        ..TantivyConfig::default()
    })
    .await
    .expect("tantivy");
    let sync = SyncConfig {
        batch_wait: Duration::from_millis(2),
        poll_interval: Duration::from_millis(10),
        split_bound,
        ..SyncConfig::default()
    };
    let store = CompositeStorage::new(
        primary,
        vec![(
            "tantivy".to_owned(),
            Arc::new(index) as Arc<dyn Secondary>,
            SecondaryConfig::index(),
        )],
        sync,
    )
    .expect("composite");
    assert!(store
        .wait_for_sync(Duration::from_secs(120))
        .await
        .expect("built"));
    store
}

fn rt(t: &str) -> ResourceType {
    ResourceType::new(t).expect("type")
}

fn query(t: &str, qs: &str) -> SearchQuery {
    SearchQuery::parse(Some(rt(t)), qs, Handling::Strict).expect(qs)
}

/// Tenant `a`: the official examples and the Synthea patients; tenant `b`: the Synthea
/// patients only (under ids of their own), so an answer leaking across tenants shows.
async fn load(store: &CompositeStorage) -> (TenantContext, TenantContext) {
    let (a, b) = (
        fhirstore_testkit::random_tenant(),
        fhirstore_testkit::random_tenant(),
    );
    for (_, body) in fhirstore_testkit::fixtures::r4_examples() {
        let (Some(t), Some(id)) = (body["resourceType"].as_str(), body["id"].as_str()) else {
            continue;
        };
        let (Ok(t), Ok(id)) = (ResourceType::new(t), fhirstore_core::LogicalId::new(id)) else {
            continue;
        };
        if t.as_str() == "Bundle" {
            continue;
        }
        // A few examples do not validate; they are not what this test is about.
        let _ = store.update(&a, t, &id, body, None).await;
    }
    for (file, bundle) in fhirstore_testkit::fixtures::synthea_bundles() {
        let ops = fhirstore_core::bundle::write_ops(&bundle).expect("writes");
        for ctx in [&a, &b] {
            store
                .transaction(ctx, ops.clone())
                .await
                .unwrap_or_else(|e| panic!("{file}: {e}"));
        }
    }
    (a, b)
}

/// Every page of `q` through the router: the matches in order, each page's routed answer.
async fn pages(store: &CompositeStorage, ctx: &TenantContext, q: &SearchQuery) -> Vec<Routed> {
    let mut q = q.clone();
    let mut out = Vec::new();
    loop {
        let routed = store
            .search_routed(ctx, &q, None)
            .await
            .unwrap_or_else(|e| panic!("{q:?}: {e}"));
        for m in routed.page.matches.iter().chain(&routed.page.included) {
            assert_eq!(m.tenant, *ctx.tenant(), "another tenant's resource");
        }
        let next = routed.page.next_cursor.clone();
        out.push(routed);
        match next {
            Some(c) => q.cursor = Some(c),
            None => return out,
        }
        assert!(out.len() < 1_000, "paging does not end");
    }
}

fn ids(pages: &[Routed]) -> Vec<String> {
    pages
        .iter()
        .flat_map(|p| &p.page.matches)
        .map(|m| m.key.id.as_str().to_owned())
        .collect()
}

/// One combination: the full-text part, the rest, and the type.
struct Case {
    ty: &'static str,
    text: &'static str,
    rest: &'static str,
    /// Only a split can answer it (tantivy cannot do the rest).
    split: bool,
}

const CASES: &[Case] = &[
    Case {
        ty: "Observation",
        text: "_content=blood",
        rest: "category=vital-signs",
        split: false,
    },
    Case {
        ty: "Observation",
        text: "_content=pressure",
        rest: "date=ge2016-01-01",
        split: false,
    },
    Case {
        ty: "Observation",
        text: "_content=blood",
        rest: "subject:Patient.gender=male",
        split: true,
    },
    Case {
        ty: "Observation",
        text: "_content=blood",
        rest: "subject=Patient/example&_sort=-date",
        split: true,
    },
    Case {
        ty: "Observation",
        text: "_content=blood",
        rest: "category=vital-signs&_include=Observation:subject",
        split: true,
    },
    Case {
        ty: "Observation",
        text: "_content=laboratory",
        rest: "_revinclude=DiagnosticReport:result",
        split: true,
    },
    Case {
        ty: "Observation",
        text: "_content=weight",
        rest: "_sort=-date",
        split: true,
    },
    Case {
        ty: "Observation",
        text: "_content=blood",
        rest: "subject:Patient.gender=female&_sort=date&_total=accurate",
        split: true,
    },
    Case {
        ty: "Observation",
        text: "_content=pressure",
        rest: "subject:Patient.gender=male&_sort=_score",
        split: true,
    },
    Case {
        ty: "Encounter",
        text: "_content=medication",
        rest: "_has:Observation:encounter:category=laboratory",
        split: true,
    },
    Case {
        ty: "Condition",
        text: "_content=disorder",
        rest: "clinical-status=active&_include=Condition:subject&_sort=-onset-date",
        split: true,
    },
    Case {
        ty: "Patient",
        text: "_content=female",
        rest: "family=Chalmers",
        split: false,
    },
    Case {
        ty: "Patient",
        text: "_text=patient",
        rest: "birthdate=ge1950&_sort=birthdate&_revinclude=Observation:subject",
        split: true,
    },
];

/// The answer a split must give, from the single-backend answers of its parts.
async fn expected(store: &CompositeStorage, ctx: &TenantContext, c: &Case) -> Vec<String> {
    let by_score = c.rest.contains("_sort=_score");
    let rest_criteria: Vec<&str> = c
        .rest
        .split('&')
        .filter(|p| !p.starts_with("_sort=_score"))
        .collect();
    let rest = query(c.ty, &format!("{}&_count=1000", rest_criteria.join("&")));
    let text = query(
        c.ty,
        &format!(
            "{}&_count=1000{}",
            c.text,
            if by_score { "&_sort=_score" } else { "" }
        ),
    );
    let text_pages = pages(store, ctx, &text).await;
    assert!(text_pages.iter().all(|p| p.backend.starts_with("tantivy")));
    let rest_pages = pages(store, ctx, &rest).await;
    let (text_ids, rest_ids) = (ids(&text_pages), ids(&rest_pages));
    if by_score {
        let keep: HashSet<&String> = rest_ids.iter().collect();
        text_ids.into_iter().filter(|i| keep.contains(i)).collect()
    } else {
        let keep: HashSet<&String> = text_ids.iter().collect();
        rest_ids.into_iter().filter(|i| keep.contains(i)).collect()
    }
}

/// Every case, in both tenants, page by page.
async fn split_answers_equal_the_intersection(store: &CompositeStorage) {
    let (a, b) = load(store).await;
    assert!(store
        .wait_for_sync(Duration::from_secs(60))
        .await
        .expect("sync"));
    let mut nonempty = 0;
    for ctx in [&a, &b] {
        for c in CASES {
            let want = expected(store, ctx, c).await;
            nonempty += usize::from(!want.is_empty());
            let q = query(c.ty, &format!("{}&{}&_count=7", c.text, c.rest));
            let got = pages(store, ctx, &q).await;
            let what = format!("{}?{}&{}", c.ty, c.text, c.rest);
            assert_eq!(ids(&got), want, "{what}");
            if c.split {
                assert!(
                    got.iter()
                        .all(|p| p.backend.ends_with("+primary") && p.parts.len() >= 2),
                    "{what} is split: {:?}",
                    got.first().map(|p| &p.parts)
                );
            }
            if q.total != fhirstore_core::search::TotalMode::None {
                assert_eq!(got[0].page.total, Some(want.len() as u64), "{what}: total");
            }
            // Each page includes what the primary includes for exactly those matches.
            if !q.includes.is_empty() || !q.revincludes.is_empty() {
                for page in &got {
                    let page_ids: Vec<&str> = page
                        .page
                        .matches
                        .iter()
                        .map(|m| m.key.id.as_str())
                        .collect();
                    if page_ids.is_empty() {
                        continue;
                    }
                    let mut alone = q.clone();
                    alone.criteria.clear();
                    alone.sort.clear();
                    alone.count = Some(1000);
                    alone.total = fhirstore_core::search::TotalMode::None;
                    alone = SearchQuery {
                        criteria: query(c.ty, &format!("_id={}", page_ids.join(","))).criteria,
                        ..alone
                    };
                    let primary = store
                        .primary()
                        .search(ctx, &alone)
                        .await
                        .expect("includes alone");
                    let keys = |list: &[fhirstore_core::StoredResource]| -> BTreeSet<String> {
                        list.iter()
                            .map(|r| format!("{}/{}", r.key.resource_type, r.key.id))
                            .collect()
                    };
                    assert_eq!(
                        keys(&page.page.included),
                        keys(&primary.included),
                        "{what}: includes"
                    );
                }
            }
            // A count of the same search counts the same matches.
            let count = query(c.ty, &format!("{}&{}&_summary=count", c.text, c.rest));
            let n = store
                .search_routed(ctx, &count, None)
                .await
                .expect("count")
                .page
                .total;
            assert_eq!(n, Some(want.len() as u64), "{what}: _summary=count");
        }
    }
    assert!(
        nonempty >= CASES.len(),
        "the cases match something: {nonempty}"
    );
}

/// A write that returned is in the next split search, and paging a split search while writes
/// land neither repeats nor skips a resource that matched throughout.
async fn split_searches_see_writes_and_page_stably(store: &CompositeStorage) {
    let ctx = fhirstore_testkit::random_tenant();
    let patient = store
        .create(
            &ctx,
            rt("Patient"),
            json!({"resourceType": "Patient", "gender": "male"}),
        )
        .await
        .expect("patient")
        .resource
        .key
        .id;
    let observation = |i: usize, word: &str| {
        json!({
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": format!("{word} reading {i}")},
            "subject": {"reference": format!("Patient/{patient}")},
            "effectiveDateTime": format!("2020-01-{:02}", 1 + i % 28),
        })
    };
    let mut originals = Vec::new();
    for i in 0..30 {
        let w = store
            .create(&ctx, rt("Observation"), observation(i, "zanzibar"))
            .await
            .expect("create");
        originals.push(w.resource.key.id);
    }
    // Read-your-writes across the split: the index is asynchronous, the search waits for it.
    let fresh = store
        .create(&ctx, rt("Observation"), observation(99, "quetzal"))
        .await
        .expect("create")
        .resource
        .key
        .id;
    let q = query(
        "Observation",
        "_content=quetzal&subject:Patient.gender=male",
    );
    let routed = store.search_routed(&ctx, &q, None).await.expect("search");
    assert!(!routed.behind);
    let found: Vec<_> = routed.page.matches.iter().map(|m| &m.key.id).collect();
    assert_eq!(found, [&fresh]);

    // Paging under writes: new matches land before and after the cursor.
    let mut q = query(
        "Observation",
        "_content=zanzibar&subject:Patient.gender=male&_sort=-date&_count=4",
    );
    let mut seen = Vec::new();
    let mut written = 0;
    loop {
        let routed = store.search_routed(&ctx, &q, None).await.expect("page");
        seen.extend(routed.page.matches.iter().map(|m| m.key.id.clone()));
        store
            .create(&ctx, rt("Observation"), observation(written, "zanzibar"))
            .await
            .expect("write while paging");
        written += 1;
        match routed.page.next_cursor {
            Some(c) => q.cursor = Some(c),
            None => break,
        }
    }
    let unique: HashSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no resource twice");
    for id in &originals {
        assert!(
            unique.contains(id),
            "{id} matched throughout and was skipped"
        );
    }
}

/// A term matching more than the bound is answered by letting the primary's selective side
/// drive; when both sides pass the bound the search is refused, naming the bound.
async fn broad_full_text_lets_the_primary_drive(store: &CompositeStorage) {
    let ctx = fhirstore_testkit::random_tenant();
    let mut patients = Vec::new();
    for gender in ["male", "female"] {
        let p = store
            .create(
                &ctx,
                rt("Patient"),
                json!({"resourceType": "Patient", "gender": gender}),
            )
            .await
            .expect("patient")
            .resource
            .key
            .id;
        patients.push(p);
    }
    // 60 Observations mention "common"; 3 of them belong to the female patient.
    for i in 0..60 {
        let subject = if i % 20 == 0 {
            &patients[1]
        } else {
            &patients[0]
        };
        store
            .create(
                &ctx,
                rt("Observation"),
                json!({"resourceType": "Observation", "status": "final",
                       "code": {"text": format!("common {i}")},
                       "subject": {"reference": format!("Patient/{subject}")}}),
            )
            .await
            .expect("create");
    }
    let q = query(
        "Observation",
        "_content=common&subject:Patient.gender=female&_total=accurate",
    );
    let routed = store.search_routed(&ctx, &q, None).await.expect("search");
    assert_eq!(routed.page.matches.len(), 3);
    assert_eq!(routed.page.total, Some(3));
    let backends: Vec<&str> = routed
        .parts
        .iter()
        .map(|p| p.backend.split('-').next().unwrap_or_default())
        .collect();
    // The secondary passed the bound; the primary listed its side; the secondary answered
    // within it; the primary made the page.
    assert_eq!(backends, ["tantivy", "primary", "tantivy", "primary"]);
    assert_eq!(routed.parts[0].rows, 21, "the bound plus one, no more");

    let both_broad = query("Observation", "_content=common&subject:Patient.gender=male");
    match store.search_routed(&ctx, &both_broad, None).await {
        Err(Error::TooCostly(m)) => assert!(m.contains("split_bound"), "{m}"),
        other => panic!("both sides past the bound: {other:?}"),
    }
    // Mixed relevance and parameter sorts are refused clearly.
    let mixed = query(
        "Observation",
        "_content=common&subject:Patient.gender=female&_sort=_score,-date",
    );
    assert!(matches!(
        store.search_routed(&ctx, &mixed, None).await,
        Err(Error::Unsupported(_))
    ));
}

#[tokio::test]
async fn sqlite_split_searches() {
    let Some(primary) = fhirstore_integration::sqlite_store(env!("CARGO_TARGET_TMPDIR")).await
    else {
        return;
    };
    let store = stack(Arc::new(primary), 100_000).await;
    split_answers_equal_the_intersection(&store).await;
    split_searches_see_writes_and_page_stably(&store).await;
    let Some(primary) = fhirstore_integration::sqlite_store(env!("CARGO_TARGET_TMPDIR")).await
    else {
        return;
    };
    broad_full_text_lets_the_primary_drive(&stack(Arc::new(primary), 20).await).await;
}

#[tokio::test]
async fn postgres_split_searches() {
    // A database of the test's own: a new index catches up with every tenant's change log, and
    // on the shared database that is whatever every test before this one wrote.
    let Some((_db, primary)) = fhirstore_integration::postgres_own_store().await else {
        return;
    };
    let store = stack(Arc::new(primary), 100_000).await;
    split_answers_equal_the_intersection(&store).await;
    split_searches_see_writes_and_page_stably(&store).await;
    drop(store);
    let Some((_db, primary)) = fhirstore_integration::postgres_own_store().await else {
        return;
    };
    broad_full_text_lets_the_primary_drive(&stack(Arc::new(primary), 20).await).await;
}
