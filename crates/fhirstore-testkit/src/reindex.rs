//! Checks for a tenant's own SearchParameters: registration by writing the resource, the
//! reindex job (batched, resumable, interleaved with writes), activation, retirement, bad
//! definitions, and isolation from other tenants.

use parking_lot::Mutex;
use std::collections::BTreeSet;

use fhirstore_core::{
    Error, Handling, LogicalId, ReindexOptions, ReindexState, ReindexStatus, ResourceStorage,
    ResourceType, SearchQuery, TenantContext,
};
use serde_json::{json, Value};

use crate::random_tenant;

const EXT: &str = "http://example.org/fhir/StructureDefinition/favourite-colour";
const COLOURS: &str = "http://example.org/colours";
const PARAM_URL: &str = "http://example.org/fhir/SearchParameter/patient-favourite-colour";

fn patient() -> ResourceType {
    ResourceType::new("Patient").expect("known type")
}

fn colour_param(status: &str, expression: &str) -> Value {
    json!({
        "resourceType": "SearchParameter",
        "id": "favourite-colour",
        "url": PARAM_URL,
        "name": "FavouriteColour",
        "status": status,
        "description": "A patient's favourite colour, from an extension.",
        "code": "favourite-colour",
        "base": ["Patient"],
        "type": "token",
        "expression": expression
    })
}

const EXPRESSION: &str =
    "Patient.extension('http://example.org/fhir/StructureDefinition/favourite-colour').value";

/// Patient `id` with a favourite colour (or none).
async fn put(store: &dyn ResourceStorage, ctx: &TenantContext, id: &str, colour: Option<&str>) {
    let mut body = json!({"resourceType": "Patient", "id": id, "active": true});
    if let Some(c) = colour {
        body["extension"] = json!([{"url": EXT, "valueCoding": {"system": COLOURS, "code": c}}]);
    }
    let id = LogicalId::new(id).expect("valid id");
    store
        .update(ctx, patient(), &id, body, None)
        .await
        .unwrap_or_else(|e| panic!("writing Patient/{id}: {e}"));
}

/// Ids of every match of `qs`, parsed against the tenant's own searchable parameters.
async fn ids(
    store: &dyn ResourceStorage,
    ctx: &TenantContext,
    qs: &str,
) -> Result<BTreeSet<String>, Error> {
    let reg = store.search_parameters(ctx).await?;
    let mut q = SearchQuery::parse_in(&reg, Some(patient()), qs, Handling::Strict)?;
    q.count = Some(1000);
    let page = store.search(ctx, &q).await?;
    assert!(page.next_cursor.is_none(), "one page holds every match");
    Ok(page
        .matches
        .iter()
        .map(|r| r.key.id.as_str().to_owned())
        .collect())
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

async fn status(store: &dyn ResourceStorage, ctx: &TenantContext) -> Vec<ReindexStatus> {
    store.reindex_status(ctx).await.expect("reindex status")
}

/// A SearchParameter written with status `active` becomes searchable only after its reindex
/// job has visited every existing resource; the job runs in batches, can stop after any batch
/// and resume, and writes made between its batches (before and after its position) are
/// indexed by the writes themselves. Retiring it makes it unsearchable at once and its rows
/// are removed by the job. Another tenant never sees the parameter or its rows.
pub async fn custom_search_parameters(store: &dyn ResourceStorage) {
    let a = random_tenant();
    let b = random_tenant();
    // 30 patients: every third red, every third blue, the rest without a colour.
    let colour = |i: usize| match i % 3 {
        0 => Some("red"),
        1 => Some("blue"),
        _ => None,
    };
    for ctx in [&a, &b] {
        for i in 0..30 {
            put(store, ctx, &format!("cp{i:02}"), colour(i)).await;
        }
    }
    let unknown = ids(store, &a, "favourite-colour=red").await;
    assert!(
        matches!(unknown, Err(Error::InvalidSearch(_))),
        "{unknown:?}"
    );

    let sp = ResourceType::new("SearchParameter").expect("type");
    let sp_id = LogicalId::new("favourite-colour").expect("id");
    store
        .update(&a, sp, &sp_id, colour_param("active", EXPRESSION), None)
        .await
        .expect("registering the parameter");
    let st = status(store, &a).await;
    assert_eq!(st.len(), 1, "{st:?}");
    assert_eq!(
        (
            st[0].state,
            st[0].processed,
            st[0].total,
            st[0].code.as_str()
        ),
        (ReindexState::Reindexing, 0, 30, "favourite-colour")
    );
    // Not searchable until every resource is indexed: a half-built index would miss matches.
    let early = ids(store, &a, "favourite-colour=red").await;
    assert!(matches!(early, Err(Error::InvalidSearch(_))), "{early:?}");

    // Two batches of 7, then stop, as a crash or a shutdown would.
    let seen = Mutex::new(Vec::new());
    let record = |s: &ReindexStatus| seen.lock().push(s.processed);
    let opts = ReindexOptions {
        batch: 7,
        max_batches: Some(2),
    };
    let st = store.reindex(&a, opts, &record).await.expect("two batches");
    assert_eq!(*seen.lock(), vec![7, 14]);
    assert_eq!(
        (st[0].state, st[0].processed),
        (ReindexState::Reindexing, 14)
    );

    // Writes between batches: cp03 (already visited) turns blue, cp27 (not yet) loses its
    // colour, cp29 turns red, a new cp30 is red, and cp00 (visited, red) is deleted.
    put(store, &a, "cp03", Some("blue")).await;
    put(store, &a, "cp27", None).await;
    put(store, &a, "cp29", Some("red")).await;
    put(store, &a, "cp30", Some("red")).await;
    store
        .delete(&a, patient(), &LogicalId::new("cp00").expect("id"))
        .await
        .expect("delete");

    seen.lock().clear();
    let opts = ReindexOptions {
        batch: 7,
        max_batches: None,
    };
    let st = store.reindex(&a, opts, &record).await.expect("the rest");
    // 30 live patients after the writes; the first 14 positions held cp00–cp13, of which cp00
    // is gone, so 30 - 13 = 17 remain: batches of 7, 7 and 3.
    assert_eq!(*seen.lock(), vec![21, 28, 31]);
    assert_eq!((st[0].state, st[0].processed), (ReindexState::Active, 31));

    // Red: i % 3 == 0 → cp00 (deleted), cp03 (now blue), cp06 … cp27 (now none), plus cp29
    // and cp30.
    let red = set(&[
        "cp06", "cp09", "cp12", "cp15", "cp18", "cp21", "cp24", "cp29", "cp30",
    ]);
    assert_eq!(
        ids(store, &a, "favourite-colour=red")
            .await
            .expect("search"),
        red
    );
    assert_eq!(
        ids(store, &a, &format!("favourite-colour={COLOURS}|red"))
            .await
            .expect("search"),
        red
    );
    let blue = set(&[
        "cp01", "cp03", "cp04", "cp07", "cp10", "cp13", "cp16", "cp19", "cp22", "cp25", "cp28",
    ]);
    assert_eq!(
        ids(store, &a, "favourite-colour=blue")
            .await
            .expect("search"),
        blue
    );
    let none = ids(store, &a, "favourite-colour:missing=true")
        .await
        .expect("search");
    assert_eq!(none.len(), 30 - red.len() - blue.len(), "{none:?}");
    assert!(none.contains("cp27") && none.contains("cp02") && !none.contains("cp00"));
    // It sorts: by code, ascending (blue before red), ties by id; patients without a colour
    // last.
    let reg = store.search_parameters(&a).await.expect("params");
    let mut q = SearchQuery::parse_in(
        &reg,
        Some(patient()),
        "_sort=favourite-colour",
        Handling::Strict,
    )
    .expect("sort parses");
    q.count = Some(1000);
    let sorted: Vec<String> = store
        .search(&a, &q)
        .await
        .expect("sorted search")
        .matches
        .iter()
        .map(|r| r.key.id.as_str().to_owned())
        .collect();
    let expected: Vec<String> = blue.iter().chain(&red).chain(&none).cloned().collect();
    assert_eq!(sorted, expected);
    // It combines with the official parameters.
    assert_eq!(
        ids(store, &a, "favourite-colour=red&_id=cp06,cp07")
            .await
            .expect("search"),
        set(&["cp06"])
    );

    // The other tenant has the same patients but not the parameter: unknown there, and A's
    // parameter set finds none of B's resources.
    let in_b = ids(store, &b, "favourite-colour=red").await;
    assert!(matches!(in_b, Err(Error::InvalidSearch(_))), "{in_b:?}");
    assert!(status(store, &b).await.is_empty());
    let a_params = store.search_parameters(&a).await.expect("A's parameters");
    let q = SearchQuery::parse_in(
        &a_params,
        Some(patient()),
        "favourite-colour=red",
        Handling::Strict,
    )
    .expect("parses with A's parameters");
    assert!(store
        .search(&b, &q)
        .await
        .expect("search B")
        .matches
        .is_empty());

    // Retiring it: unsearchable at once; the job then removes its rows.
    store
        .update(&a, sp, &sp_id, colour_param("retired", EXPRESSION), None)
        .await
        .expect("retiring");
    let retired = ids(store, &a, "favourite-colour=red").await;
    assert!(
        matches!(retired, Err(Error::InvalidSearch(_))),
        "{retired:?}"
    );
    assert_eq!(status(store, &a).await[0].state, ReindexState::Removing);
    assert!(
        !store
            .search(&a, &q)
            .await
            .expect("search")
            .matches
            .is_empty(),
        "rows remain until the job runs"
    );
    let st = store
        .reindex(&a, ReindexOptions::default(), &|_: &ReindexStatus| {})
        .await
        .expect("removal");
    assert!(st.is_empty(), "{st:?}");
    assert!(
        store
            .search(&a, &q)
            .await
            .expect("search")
            .matches
            .is_empty(),
        "rows removed"
    );
}

/// Definitions that cannot work are refused with `InvalidResource`, and nothing is stored or
/// registered: a code the type already has, an expression the evaluator cannot compile, an
/// unknown base type, a `special` parameter. A draft is stored but registers nothing; an
/// official R4 definition stored as a resource registers nothing either.
pub async fn custom_search_parameters_rejected(store: &dyn ResourceStorage) {
    let ctx = random_tenant();
    let sp = ResourceType::new("SearchParameter").expect("type");
    let cases: Vec<(&str, Value)> = vec![
        ("clashing code", {
            let mut v = colour_param("active", EXPRESSION);
            v["code"] = json!("family");
            v
        }),
        (
            "bad expression",
            colour_param("active", "Patient.extension("),
        ),
        ("unknown base", {
            let mut v = colour_param("active", EXPRESSION);
            v["base"] = json!(["Spaceship"]);
            v
        }),
        ("special", {
            let mut v = colour_param("active", EXPRESSION);
            v["type"] = json!("special");
            v
        }),
        ("code with a colon", {
            let mut v = colour_param("active", EXPRESSION);
            v["code"] = json!("colour:x");
            v
        }),
    ];
    for (what, body) in cases {
        let r = store.create(&ctx, sp, body).await;
        assert!(matches!(r, Err(Error::InvalidResource(_))), "{what}: {r:?}");
    }
    assert_eq!(store.count(&ctx, Some(sp)).await.expect("count"), 0);
    assert!(status(store, &ctx).await.is_empty());

    store
        .create(&ctx, sp, colour_param("draft", EXPRESSION))
        .await
        .expect("a draft is stored");
    let official = json!({
        "resourceType": "SearchParameter",
        "url": "http://hl7.org/fhir/SearchParameter/individual-family",
        "name": "family",
        "status": "active",
        "description": "A portion of the family name of the patient",
        "code": "family",
        "base": ["Patient", "Practitioner"],
        "type": "string",
        "expression": "Patient.name.family | Practitioner.name.family"
    });
    store
        .create(&ctx, sp, official)
        .await
        .expect("an official definition is stored");
    assert!(status(store, &ctx).await.is_empty());
    assert_eq!(store.count(&ctx, Some(sp)).await.expect("count"), 2);
}

/// Two stores on one database, as two processes would be: a job started by one resumes in the
/// other after a batch, each
/// store's writes index a parameter the other registered, and each sees the other's
/// activation at its next call.
pub async fn custom_parameters_across_stores(a: &dyn ResourceStorage, b: &dyn ResourceStorage) {
    let ctx = random_tenant();
    for i in 0..20 {
        put(a, &ctx, &format!("cp{i:02}"), (i % 4 == 0).then_some("red")).await;
    }
    // B knows the tenant's parameters before A registers one.
    assert!(b
        .search_parameters(&ctx)
        .await
        .expect("params")
        .get(patient(), "favourite-colour")
        .is_none());
    let sp = ResourceType::new("SearchParameter").expect("type");
    a.update(
        &ctx,
        sp,
        &LogicalId::new("favourite-colour").expect("id"),
        colour_param("active", EXPRESSION),
        None,
    )
    .await
    .expect("register via A");
    let one = ReindexOptions {
        batch: 5,
        max_batches: Some(1),
    };
    let st = a
        .reindex(&ctx, one, &|_: &ReindexStatus| {})
        .await
        .expect("one batch on A");
    assert_eq!(st[0].processed, 5);

    let all = ReindexOptions {
        batch: 5,
        max_batches: None,
    };
    let noop = |_: &ReindexStatus| {};
    assert_eq!(status(b, &ctx).await[0].processed, 5);

    // B writes with A's registration: cp01 turns red behind the position, cp40 is new.
    put(b, &ctx, "cp01", Some("red")).await;
    put(b, &ctx, "cp40", Some("red")).await;
    let st = b.reindex(&ctx, all, &noop).await.expect("the rest on B");
    assert_eq!((st[0].state, st[0].processed), (ReindexState::Active, 21));

    let red = set(&["cp00", "cp01", "cp04", "cp08", "cp12", "cp16", "cp40"]);
    assert_eq!(
        ids(a, &ctx, "favourite-colour=red")
            .await
            .expect("A sees it active"),
        red
    );
    assert_eq!(
        ids(b, &ctx, "favourite-colour=red").await.expect("B too"),
        red
    );
}

/// A tenant's own date parameter over a repeating element, indexed by the reindex job: two
/// criteria on it may hold of different values of one resource, and a pair of bounds still
/// finds it (the job records that the parameter has several rows per resource, as a write
/// would).
pub async fn custom_date_parameter_over_several_values(store: &dyn ResourceStorage) {
    const VISIT: &str = "http://example.org/fhir/StructureDefinition/visit";
    let ctx = random_tenant();
    for (id, visits) in [
        ("dv1", &["2001-01-01", "2010-01-01"][..]),
        ("dv2", &["2002-06-01"][..]),
        ("dv3", &["2011-01-01"][..]),
    ] {
        let extension: Vec<Value> = visits
            .iter()
            .map(|d| json!({"url": VISIT, "valueDate": d}))
            .collect();
        let body = json!({"resourceType": "Patient", "id": id, "extension": extension});
        let id = LogicalId::new(id).expect("valid id");
        store
            .update(&ctx, patient(), &id, body, None)
            .await
            .expect("write");
    }
    let sp = ResourceType::new("SearchParameter").expect("type");
    let param = json!({
        "resourceType": "SearchParameter",
        "id": "visit-date",
        "url": "http://example.org/fhir/SearchParameter/patient-visit-date",
        "name": "VisitDate",
        "status": "active",
        "description": "The dates a patient visited.",
        "code": "visit-date",
        "base": ["Patient"],
        "type": "date",
        "expression": format!("Patient.extension('{VISIT}').value")
    });
    store
        .update(
            &ctx,
            sp,
            &LogicalId::new("visit-date").expect("id"),
            param,
            None,
        )
        .await
        .expect("registering the parameter");
    let opts = ReindexOptions {
        batch: 2,
        max_batches: None,
    };
    let st = store.reindex(&ctx, opts, &|_| {}).await.expect("reindex");
    assert_eq!(st[0].state, ReindexState::Active, "{st:?}");
    for (qs, want) in [
        (
            "visit-date=ge2005-01-01&visit-date=lt2003-01-01",
            &["dv1"][..],
        ),
        (
            "visit-date=ge2000-01-01&visit-date=lt2003-01-01",
            &["dv1", "dv2"][..],
        ),
        ("visit-date=2010", &["dv1"][..]),
        (
            "visit-date=ge2010-06-01&visit-date=lt2012-01-01",
            &["dv3"][..],
        ),
    ] {
        assert_eq!(ids(store, &ctx, qs).await.expect(qs), set(want), "{qs}");
    }
}
