//! The conformance checks. Each builds its own data in a fresh tenant and asserts behaviour the
//! FHIR R4 spec or the fhirstore contract requires.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use fhirstore_core::search::{Criterion, CriterionValues, TokenValue};
use fhirstore_core::{
    format_instant, Error, Handling, HistoryRequest, HistoryScope, LogicalId, OpOutcome,
    Permissions, ResourceStorage, ResourceType, SearchQuery, StoredResource, TenantContext,
    VersionId, WriteKind, WriteOp,
};
use serde_json::{json, Value};

use crate::random_tenant;
pub use crate::reindex::{
    custom_parameters_across_stores, custom_search_parameters, custom_search_parameters_rejected,
};

fn rt(name: &str) -> ResourceType {
    ResourceType::new(name).expect("known resource type")
}

fn patient() -> ResourceType {
    rt("Patient")
}

fn id(s: &str) -> LogicalId {
    LogicalId::new(s).expect("valid id")
}

fn patient_body(id: Option<&str>, family: &str) -> Value {
    let mut v = json!({"resourceType": "Patient", "name": [{"family": family}]});
    if let Some(id) = id {
        v["id"] = json!(id);
    }
    v
}

/// Writes Patient `id` (update-as-create) with one name, `family`.
async fn put_patient(
    store: &dyn ResourceStorage,
    ctx: &TenantContext,
    id: &LogicalId,
    family: &str,
) -> fhirstore_core::Written {
    store
        .update(
            ctx,
            patient(),
            id,
            patient_body(Some(id.as_str()), family),
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("writing Patient/{id}: {e}"))
}

fn with_identifier(mut body: Value, system: &str, value: &str) -> Value {
    body["identifier"] = json!([{"system": system, "value": value}]);
    body
}

fn family(r: &StoredResource) -> &str {
    r.content["name"][0]["family"].as_str().unwrap_or("")
}

fn query(rt: Option<ResourceType>, qs: &str) -> SearchQuery {
    SearchQuery::parse(rt, qs, Handling::Strict).expect("valid query")
}

fn identifier_query(system: &str, value: &str) -> SearchQuery {
    SearchQuery::all(Some(patient())).with(Criterion::new(
        "identifier",
        CriterionValues::Token(vec![TokenValue {
            system: Some(system.into()),
            code: Some(value.into()),
        }]),
    ))
}

async fn all_history(
    store: &dyn ResourceStorage,
    ctx: &TenantContext,
    scope: HistoryScope,
    page: u32,
) -> Vec<StoredResource> {
    let mut req = HistoryRequest::new(scope);
    req.count = Some(page);
    let mut out = Vec::new();
    loop {
        let p = store.history(ctx, &req).await.expect("history page");
        assert!(p.entries.len() <= page as usize, "page larger than _count");
        out.extend(p.entries);
        match p.next_cursor {
            Some(c) => req.cursor = Some(c),
            None => return out,
        }
    }
}

async fn all_matches(
    store: &dyn ResourceStorage,
    ctx: &TenantContext,
    mut q: SearchQuery,
) -> Vec<StoredResource> {
    let mut out = Vec::new();
    loop {
        let p = store.search(ctx, &q).await.expect("search page");
        out.extend(p.matches);
        match p.next_cursor {
            Some(c) => q.cursor = Some(c),
            None => return out,
        }
    }
}

/// create assigns a fresh id and version 1, and stamps `meta`; the caller's id and meta values
/// are not trusted. read returns exactly what create returned.
pub async fn create_assigns_id_and_meta(store: &dyn ResourceStorage) {
    let ctx = random_tenant();
    let mut body = patient_body(Some("caller-chosen"), "Chalmers");
    body["meta"] = json!({"versionId": "42", "lastUpdated": "1999-01-01T00:00:00Z",
        "tag": [{"system": "urn:t", "code": "keep"}]});
    let w = store
        .create(&ctx, patient(), body)
        .await
        .expect("create succeeds");
    assert_eq!(w.kind, WriteKind::Created);
    assert_ne!(w.resource.key.id.as_str(), "caller-chosen");
    assert_eq!(w.resource.version, VersionId::FIRST);
    assert_eq!(&w.resource.tenant, ctx.tenant());
    assert!(w.seq.is_some(), "a write returns its outbox position");
    let c = &w.resource.content;
    assert_eq!(c["id"], json!(w.resource.key.id.as_str()));
    assert_eq!(c["meta"]["versionId"], "1");
    assert_eq!(
        c["meta"]["lastUpdated"],
        json!(format_instant(w.resource.last_updated))
    );
    assert_eq!(c["meta"]["tag"][0]["code"], "keep", "other meta is kept");
    let second = store
        .create(&ctx, patient(), patient_body(None, "Other"))
        .await
        .expect("second create");
    assert_ne!(second.resource.key.id, w.resource.key.id);
    assert!(second.seq > w.seq, "outbox positions increase");

    let r = store
        .read(&ctx, patient(), &w.resource.key.id)
        .await
        .expect("read back");
    assert_eq!(r, w.resource);
}

/// Reading or vreading what was never written is NotFound.
pub async fn read_absent_is_not_found(store: &dyn ResourceStorage) {
    let ctx = random_tenant();
    let e = store.read(&ctx, patient(), &id("nope")).await;
    assert!(matches!(e, Err(Error::NotFound(_))), "{e:?}");
    let w = store
        .create(&ctx, patient(), patient_body(None, "A"))
        .await
        .expect("create");
    let e = store
        .vread(&ctx, patient(), &w.resource.key.id, VersionId::FIRST.next())
        .await;
    assert!(matches!(e, Err(Error::NotFound(_))), "{e:?}");
    let e = store
        .read(&ctx, rt("Observation"), &w.resource.key.id)
        .await;
    assert!(
        matches!(e, Err(Error::NotFound(_))),
        "same id, other type: {e:?}"
    );
}

/// update writes version n+1 and keeps version n readable by vread.
pub async fn update_writes_new_version(store: &dyn ResourceStorage) {
    let ctx = random_tenant();
    let w = store
        .create(&ctx, patient(), patient_body(None, "One"))
        .await
        .expect("create");
    let pid = w.resource.key.id.clone();
    let u = put_patient(store, &ctx, &pid, "Two").await;
    assert_eq!(u.kind, WriteKind::Updated);
    assert_eq!(u.resource.version.get(), 2);
    assert_eq!(u.resource.content["meta"]["versionId"], "2");
    assert!(u.resource.last_updated >= w.resource.last_updated);
    let v1 = store
        .vread(&ctx, patient(), &pid, VersionId::FIRST)
        .await
        .expect("vread 1");
    assert_eq!(family(&v1), "One");
    assert_eq!(v1, w.resource);
    let cur = store.read(&ctx, patient(), &pid).await.expect("read");
    assert_eq!(family(&cur), "Two");
    assert_eq!(cur.version.get(), 2);
}

/// update of an absent id creates it with that id at version 1.
pub async fn update_as_create(store: &dyn ResourceStorage) {
    let ctx = random_tenant();
    let pid = id("chosen-by-client");
    let w = put_patient(store, &ctx, &pid, "X").await;
    assert_eq!(w.kind, WriteKind::Created);
    assert_eq!(w.resource.version, VersionId::FIRST);
    assert_eq!(w.resource.key.id, pid);
    let r = store.read(&ctx, patient(), &pid).await.expect("read");
    assert_eq!(family(&r), "X");
}

/// A stale If-Match fails with VersionConflict and changes nothing; the current one succeeds.
pub async fn if_match_guards_updates(store: &dyn ResourceStorage) {
    let ctx = random_tenant();
    let w = store
        .create(&ctx, patient(), patient_body(None, "A"))
        .await
        .expect("create");
    let pid = w.resource.key.id.clone();
    put_patient(store, &ctx, &pid, "B").await;
    let stale = store
        .update(
            &ctx,
            patient(),
            &pid,
            patient_body(Some(pid.as_str()), "C"),
            Some(VersionId::FIRST),
        )
        .await;
    match stale {
        Err(Error::VersionConflict {
            expected, current, ..
        }) => assert_eq!((expected, current), (1, 2)),
        other => panic!("expected a version conflict, got {other:?}"),
    }
    let r = store.read(&ctx, patient(), &pid).await.expect("read");
    assert_eq!((family(&r), r.version.get()), ("B", 2));
    let ok = store
        .update(
            &ctx,
            patient(),
            &pid,
            patient_body(Some(pid.as_str()), "C"),
            VersionId::new(2),
        )
        .await
        .expect("matching If-Match");
    assert_eq!(ok.resource.version.get(), 3);
    let absent = store
        .update(
            &ctx,
            patient(),
            &id("absent"),
            patient_body(Some("absent"), "Z"),
            Some(VersionId::FIRST),
        )
        .await;
    assert!(
        matches!(absent, Err(Error::VersionConflict { current: 0, .. })),
        "If-Match on an absent resource: {absent:?}"
    );
    assert!(matches!(
        store.read(&ctx, patient(), &id("absent")).await,
        Err(Error::NotFound(_))
    ));
}

/// delete writes a tombstone version; read is then Gone; deleting again, or deleting what never
/// existed, succeeds without writing a version.
pub async fn delete_writes_tombstone(store: &dyn ResourceStorage) {
    let ctx = random_tenant();
    let w = store
        .create(&ctx, patient(), patient_body(None, "A"))
        .await
        .expect("create");
    let pid = w.resource.key.id.clone();
    let d = store.delete(&ctx, patient(), &pid).await.expect("delete");
    assert_eq!(d.deleted.len(), 1);
    assert_eq!(d.deleted[0].1.get(), 2);
    assert!(d.seq > w.seq);
    assert!(matches!(
        store.read(&ctx, patient(), &pid).await,
        Err(Error::Gone(_))
    ));
    let tomb = store
        .vread(&ctx, patient(), &pid, VersionId::new(2).expect("2"))
        .await
        .expect("vread tombstone");
    assert!(tomb.deleted);
    assert_eq!(tomb.content, Value::Null);
    let v1 = store
        .vread(&ctx, patient(), &pid, VersionId::FIRST)
        .await
        .expect("old version stays");
    assert_eq!(family(&v1), "A");

    let again = store
        .delete(&ctx, patient(), &pid)
        .await
        .expect("delete again");
    assert!(again.deleted.is_empty() && again.seq.is_none());
    let never = store
        .delete(&ctx, patient(), &id("never-was"))
        .await
        .expect("delete absent");
    assert!(never.deleted.is_empty());
    let h = all_history(
        store,
        &ctx,
        HistoryScope::Instance(patient(), pid.clone()),
        10,
    )
    .await;
    assert_eq!(h.len(), 2, "no version for repeated delete");
    assert_eq!(store.count(&ctx, Some(patient())).await.expect("count"), 0);
}

/// Updating a deleted resource brings it back as a new version.
pub async fn update_after_delete_recreates(store: &dyn ResourceStorage) {
    let ctx = random_tenant();
    let pid = id("phoenix");
    put_patient(store, &ctx, &pid, "A").await;
    store.delete(&ctx, patient(), &pid).await.expect("delete");
    let w = put_patient(store, &ctx, &pid, "B").await;
    assert_eq!(w.kind, WriteKind::Created, "no live version existed");
    assert_eq!(w.resource.version.get(), 3);
    let r = store.read(&ctx, patient(), &pid).await.expect("read");
    assert_eq!(family(&r), "B");
}

/// Malformed bodies are rejected with InvalidResource naming the problem, and nothing stored
/// changes.
pub async fn bad_input_changes_nothing(store: &dyn ResourceStorage) {
    let ctx = random_tenant();
    let pid = id("p1");
    put_patient(store, &ctx, &pid, "Original").await;
    let huge = json!({"resourceType": "Patient", "id": "p1",
        "text": {"status": "generated", "div": "x".repeat(9 * 1024 * 1024)}});
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"resourceType": "Observation", "id": "p1"}),
            "does not match the type",
        ),
        (
            json!({"resourceType": "Patient", "id": "p2"}),
            "does not match the id",
        ),
        (json!("just a string"), "JSON object"),
        (json!([{"resourceType": "Patient"}]), "JSON object"),
        (json!({"id": "p1"}), "resourceType"),
        (
            json!({"resourceType": "Patient", "id": "p1", "meta": []}),
            "meta",
        ),
        (
            json!({"resourceType": "Patient", "id": "p1", "gender": 5}),
            "/gender",
        ),
        (
            json!({"resourceType": "Patient", "id": "p1", "nickname": "Pete"}),
            "nickname",
        ),
        (
            json!({"resourceType": "Patient", "id": "p1", "extension": [1]}),
            "/extension/0",
        ),
        (
            json!({"resourceType": "Patient", "id": "p1", "name": [[{"family": 5}]]}),
            "/name/0",
        ),
        (
            json!({"resourceType": "Patient", "id": "p1", "birthDate": "2021-02-30"}),
            "/birthDate",
        ),
        (
            json!({"resourceType": "Patient", "id": "p1", "name": [{"family": "a\u{0}b"}]}),
            "NUL",
        ),
        (huge, "max_resource_bytes"),
    ];
    for (body, want) in cases {
        let e = store.update(&ctx, patient(), &pid, body, None).await;
        match e {
            Err(Error::InvalidResource(m) | Error::TooLarge(m)) => {
                assert!(m.contains(want), "{m:?} lacks {want:?}")
            }
            other => panic!("expected InvalidResource({want}), got {other:?}"),
        }
    }
    let e = store
        .create(
            &ctx,
            patient(),
            json!({"resourceType": "Patient", "meta": "x"}),
        )
        .await;
    assert!(matches!(e, Err(Error::InvalidResource(_))), "{e:?}");
    let bad_cond = store
        .conditional_update(
            &ctx,
            patient(),
            &identifier_query("urn:x", "1"),
            json!({"resourceType": "Patient", "id": "bad id!"}),
        )
        .await;
    assert!(
        matches!(bad_cond, Err(Error::InvalidResource(_))),
        "{bad_cond:?}"
    );

    let r = store
        .read(&ctx, patient(), &pid)
        .await
        .expect("still there");
    assert_eq!((family(&r), r.version.get()), ("Original", 1));
    let h = all_history(store, &ctx, HistoryScope::System, 50).await;
    assert_eq!(h.len(), 1, "no failed write left a version");
    assert_eq!(store.count(&ctx, None).await.expect("count"), 1);
}

/// FHIR decimals keep the text they were written with (`1.50` is not `1.5`; precision is
/// meaning), through storage, reads, history and search, and integers of any size come back
/// digit for digit.
pub async fn decimals_keep_their_precision(store: &dyn ResourceStorage) {
    let ctx = random_tenant();
    let big = "1606938044258990275541962092341162602522202993782792835301376";
    let body: Value = serde_json::from_str(&format!(
        r#"{{"resourceType": "Observation", "id": "d1", "status": "final", "code": {{"text": "w"}},
            "valueQuantity": {{"value": 1.50, "unit": "kg"}},
            "component": [{{"code": {{"text": "c"}}, "valueQuantity": {{"value": {big}}}}}]}}"#
    ))
    .expect("json");
    let oid = id("d1");
    let obs = rt("Observation");
    store
        .update(&ctx, obs, &oid, body, None)
        .await
        .expect("written");
    let text = |v: &Value| serde_json::to_string(v).expect("serialises");
    let r = store.read(&ctx, obs, &oid).await.expect("read");
    assert_eq!(text(&r.content["valueQuantity"]["value"]), "1.50");
    assert_eq!(
        text(&r.content["component"][0]["valueQuantity"]["value"]),
        big
    );
    let h = all_history(store, &ctx, HistoryScope::System, 10).await;
    assert_eq!(text(&h[0].content["valueQuantity"]["value"]), "1.50");
    expect_matches(
        store,
        &ctx,
        &[
            ("Observation", "value-quantity=1.50", &["d1"]),
            ("Observation", "value-quantity=1.49", &[]),
        ],
    )
    .await;
}

/// Compartment searches equal the searches they stand for: over the official examples, for
/// every Patient (and a few Encounters and Practitioners), each member type's compartment
/// search returns exactly the union of that type's searches by each compartment parameter,
/// and the whole compartment (`Patient/p/*`) the union over every type plus the patient
/// itself. A second tenant holds the same ids with other data and never shows through.
pub async fn compartments_equal_the_equivalent_searches(store: &dyn ResourceStorage) {
    use fhirstore_core::compartment::{CompartmentScope, Compartments};
    let (a, b) = (random_tenant(), random_tenant());
    let mut seeded: BTreeMap<ResourceType, Vec<LogicalId>> = BTreeMap::new();
    for (_, body) in crate::fixtures::r4_examples() {
        let Some(t) = body["resourceType"]
            .as_str()
            .and_then(|t| ResourceType::new(t).ok())
        else {
            continue;
        };
        let Some(id) = body["id"].as_str().and_then(|i| LogicalId::new(i).ok()) else {
            continue;
        };
        if t.as_str() == "Bundle" {
            continue;
        }
        store
            .update(&a, t, &id, body.clone(), None)
            .await
            .expect("seed a");
        seeded.entry(t).or_default().push(id);
    }
    // Tenant b: the same Patient ids, each with an Observation of its own.
    for id in seeded.get(&patient()).into_iter().flatten() {
        put_patient(store, &b, id, "Other").await;
        store
            .create(
                &b,
                rt("Observation"),
                json!({"resourceType": "Observation", "status": "final", "code": {"text": "b"},
                       "subject": {"reference": format!("Patient/{id}")}}),
            )
            .await
            .expect("seed b");
    }
    let keys = |rs: Vec<StoredResource>| -> BTreeSet<String> {
        rs.into_iter()
            .map(|r| {
                assert_eq!(&r.tenant, a.tenant(), "another tenant's resource");
                format!("{}/{}", r.key.resource_type, r.key.id)
            })
            .collect()
    };
    let owners: Vec<(ResourceType, LogicalId)> = ["Patient", "Encounter", "Practitioner"]
        .into_iter()
        .flat_map(|t| {
            let t = rt(t);
            let ids = seeded.get(&t).cloned().unwrap_or_default();
            let n = if t == patient() { ids.len() } else { 3 };
            ids.into_iter().take(n).map(move |i| (t, i))
        })
        .collect();
    assert!(owners.len() > 10, "the examples hold patients");
    let mut failures = Vec::new();
    let mut nonempty = 0;
    for (owner, id) in &owners {
        let c = Compartments::r4().get(*owner).expect("compartment");
        let mut whole = BTreeSet::from([format!("{owner}/{id}")]);
        for (member, params) in &c.members {
            let mut scoped = SearchQuery::all(Some(*member));
            scoped.compartment = Some(
                CompartmentScope::new(*owner, Some(id.clone()), Some(&[*member])).expect("scope"),
            );
            let got = keys(all_matches(store, &a, scoped).await);
            let mut want = BTreeSet::new();
            if member == owner {
                want.insert(format!("{owner}/{id}"));
            }
            for p in params {
                let qs = format!("{p}={owner}/{id}");
                // A compartment parameter that is not a reference search of this type
                // cannot place anything in the compartment.
                let Ok(q) = SearchQuery::parse(Some(*member), &qs, Handling::Strict) else {
                    continue;
                };
                want.extend(keys(all_matches(store, &a, q).await));
            }
            if got != want {
                failures.push(format!("{owner}/{id}/{member}: got {got:?}, want {want:?}"));
            }
            nonempty += usize::from(!got.is_empty());
            whole.extend(want);
        }
        let mut all = SearchQuery::all(None);
        all.compartment =
            Some(CompartmentScope::new(*owner, Some(id.clone()), None).expect("scope"));
        let got = keys(all_matches(store, &a, all).await);
        if got != whole {
            failures.push(format!("{owner}/{id}/*: got {got:?}, want {whole:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(nonempty > 20, "the examples fill compartments: {nonempty}");
    // With criteria and a sort, as `Patient/p/Observation?code=…` is searched.
    let p = &owners[0].1;
    let mut q = SearchQuery::parse(
        Some(rt("Observation")),
        "status=final&_sort=-date",
        Handling::Strict,
    )
    .expect("query");
    q.compartment = Some(
        CompartmentScope::new(patient(), Some(p.clone()), Some(&[rt("Observation")]))
            .expect("scope"),
    );
    let scoped = keys(all_matches(store, &a, q).await);
    let mut plain = keys(
        all_matches(
            store,
            &a,
            query(
                Some(rt("Observation")),
                &format!("status=final&subject=Patient/{p}"),
            ),
        )
        .await,
    );
    plain.extend(keys(
        all_matches(
            store,
            &a,
            query(
                Some(rt("Observation")),
                &format!("status=final&performer=Patient/{p}"),
            ),
        )
        .await,
    ));
    assert_eq!(scoped, plain);
}

/// Conditional references in a transaction (R4 3.1.0.11.2): `Patient?identifier=…` becomes
/// the one match's `Patient/id`, a match written earlier in the same transaction included; no
/// match or several fail the whole transaction with a precondition error naming the entry.
pub async fn transaction_resolves_conditional_references(store: &dyn ResourceStorage) {
    let ctx = random_tenant();
    let obs = rt("Observation");
    let with_mrn = |mrn: &str| json!({"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": mrn}]});
    let one = store
        .create(&ctx, patient(), with_mrn("1"))
        .await
        .expect("p1");
    for _ in 0..2 {
        store
            .create(&ctx, patient(), with_mrn("dup"))
            .await
            .expect("dup");
    }
    let observation = |reference: &str| WriteOp::Create {
        resource_type: obs,
        resource: json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                         "subject": {"reference": reference},
                         "performer": [{"reference": reference}]}),
        if_none_exist: None,
        full_url: None,
    };
    let out = store
        .transaction(&ctx, vec![observation("Patient?identifier=urn:mrn|1")])
        .await
        .expect("resolved");
    let OpOutcome::Written(w) = &out[0] else {
        panic!("{out:?}")
    };
    let want = format!("Patient/{}", one.resource.key.id);
    assert_eq!(w.resource.content["subject"]["reference"], want.as_str());
    assert_eq!(
        w.resource.content["performer"][0]["reference"],
        want.as_str()
    );

    let before = store.count(&ctx, None).await.expect("count");
    for (reference, why) in [
        ("Patient?identifier=urn:mrn|none", "matches no resource"),
        ("Patient?identifier=urn:mrn|dup", "more than one"),
    ] {
        let e = store
            .transaction(
                &ctx,
                vec![
                    WriteOp::Create {
                        resource_type: patient(),
                        resource: with_mrn("side"),
                        if_none_exist: None,
                        full_url: None,
                    },
                    observation(reference),
                ],
            )
            .await
            .expect_err(why);
        assert!(
            matches!(e.kind(), Error::PreconditionFailed(m) if m.contains(why))
                && e.entry() == Some(1),
            "{e:?}"
        );
    }
    assert_eq!(
        store.count(&ctx, None).await.expect("count"),
        before,
        "a failed transaction wrote nothing"
    );

    // Written earlier in the same transaction.
    let out = store
        .transaction(
            &ctx,
            vec![
                WriteOp::Create {
                    resource_type: patient(),
                    resource: with_mrn("new"),
                    if_none_exist: None,
                    full_url: None,
                },
                observation("Patient?identifier=urn:mrn|new"),
            ],
        )
        .await
        .expect("same transaction");
    let (OpOutcome::Written(p), OpOutcome::Written(o)) = (&out[0], &out[1]) else {
        panic!("{out:?}")
    };
    assert_eq!(
        o.resource.content["subject"]["reference"],
        format!("Patient/{}", p.resource.key.id).as_str()
    );
}

/// History at instance, type and system scope: newest first, tombstones included, `_since`
/// honoured, and paging returns every version exactly once.
pub async fn history_all_scopes(store: &dyn ResourceStorage) {
    let ctx = random_tenant();
    let a = id("a");
    put_patient(store, &ctx, &a, "A1").await;
    let obs = store
        .create(
            &ctx,
            rt("Observation"),
            json!({"resourceType": "Observation", "status": "final",
                   "code": {"text": "x"}}),
        )
        .await
        .expect("obs");
    let a2 = put_patient(store, &ctx, &a, "A2").await;
    store.delete(&ctx, patient(), &a).await.expect("delete a");
    put_patient(store, &ctx, &id("b"), "B1").await;

    let inst = all_history(store, &ctx, HistoryScope::Instance(patient(), a.clone()), 2).await;
    let versions: Vec<u64> = inst.iter().map(|r| r.version.get()).collect();
    assert_eq!(versions, vec![3, 2, 1]);
    assert!(inst[0].deleted && !inst[1].deleted);
    assert_eq!(family(&inst[1]), "A2");

    let ty = all_history(store, &ctx, HistoryScope::Type(patient()), 2).await;
    let keys: Vec<(String, u64)> = ty
        .iter()
        .map(|r| (r.key.id.to_string(), r.version.get()))
        .collect();
    let want: Vec<(String, u64)> = [("b", 1), ("a", 3), ("a", 2), ("a", 1)]
        .iter()
        .map(|(i, v)| (i.to_string(), *v))
        .collect();
    assert_eq!(keys, want);

    let sys = all_history(store, &ctx, HistoryScope::System, 3).await;
    assert_eq!(sys.len(), 5);
    assert_eq!(
        sys[3].key, obs.resource.key,
        "system history interleaves types by time"
    );

    let mut since = HistoryRequest::new(HistoryScope::System);
    since.since = Some(a2.resource.last_updated);
    let recent = store.history(&ctx, &since).await.expect("since");
    assert!(
        recent.entries.len() >= 3,
        "a2, the delete and b1 are at or after a2"
    );
    assert!(recent
        .entries
        .iter()
        .all(|r| r.last_updated >= a2.resource.last_updated));
    assert!(!recent
        .entries
        .iter()
        .any(|r| r.key == obs.resource.key && r.last_updated < a2.resource.last_updated));
}

/// Writes made while paging through history never shift later pages: every version that existed
/// when paging began is returned exactly once.
pub async fn history_paging_is_stable_under_writes(store: &dyn ResourceStorage) {
    let ctx = random_tenant();
    for i in 0..12 {
        store
            .create(&ctx, patient(), patient_body(None, &format!("P{i}")))
            .await
            .expect("seed");
    }
    let before: HashSet<(String, u64)> =
        all_history(store, &ctx, HistoryScope::Type(patient()), 100)
            .await
            .into_iter()
            .map(|r| (r.key.id.to_string(), r.version.get()))
            .collect();
    let mut req = HistoryRequest::new(HistoryScope::Type(patient()));
    req.count = Some(5);
    let mut seen = Vec::new();
    let mut page_no = 0;
    loop {
        let p = store.history(&ctx, &req).await.expect("page");
        seen.extend(
            p.entries
                .iter()
                .map(|r| (r.key.id.to_string(), r.version.get())),
        );
        // Interleave writes with paging.
        store
            .create(
                &ctx,
                patient(),
                patient_body(None, &format!("new{page_no}")),
            )
            .await
            .expect("concurrent write");
        page_no += 1;
        match p.next_cursor {
            Some(c) => req.cursor = Some(c),
            None => break,
        }
    }
    let unique: HashSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "no version returned twice");
    assert_eq!(
        unique, before,
        "exactly the versions that existed when paging began"
    );
}

/// count counts live resources per type and across types; deleted ones are not counted.
pub async fn count_counts_live_resources(store: &dyn ResourceStorage) {
    let ctx = random_tenant();
    let mut ids = Vec::new();
    for i in 0..5 {
        let w = store
            .create(&ctx, patient(), patient_body(None, &format!("P{i}")))
            .await
            .expect("create");
        ids.push(w.resource.key.id);
    }
    store
        .create(
            &ctx,
            rt("Observation"),
            json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}}),
        )
        .await
        .expect("obs");
    store
        .delete(&ctx, patient(), &ids[0])
        .await
        .expect("delete");
    assert_eq!(store.count(&ctx, Some(patient())).await.expect("count"), 4);
    assert_eq!(
        store
            .count(&ctx, Some(rt("Observation")))
            .await
            .expect("count"),
        1
    );
    assert_eq!(store.count(&ctx, None).await.expect("count"), 5);
    assert_eq!(
        store
            .count(&ctx, Some(rt("Encounter")))
            .await
            .expect("count"),
        0
    );
}

/// `_id` (with OR) and `_lastUpdated` (with prefixes) select the right live resources;
/// `_total=accurate` counts them.
pub async fn search_by_id_and_last_updated(store: &dyn ResourceStorage) {
    let ctx = random_tenant();
    let mut written = Vec::new();
    for name in ["a", "b", "c", "d"] {
        let w = store
            .update(
                &ctx,
                patient(),
                &id(name),
                patient_body(Some(name), name),
                None,
            )
            .await
            .expect("seed");
        written.push(w.resource);
    }
    store
        .delete(&ctx, patient(), &id("d"))
        .await
        .expect("delete d");

    let page = store
        .search(
            &ctx,
            &query(Some(patient()), "_id=a,c,d,zz&_total=accurate"),
        )
        .await
        .expect("search _id");
    let got: Vec<&str> = page.matches.iter().map(|r| r.key.id.as_str()).collect();
    assert_eq!(got, vec!["a", "c"], "deleted and absent ids do not match");
    assert_eq!(page.total, Some(2));
    assert_eq!(
        page.matches[0], written[0],
        "search returns the stored resource"
    );

    let first = written[0].last_updated;
    let last = written[2].last_updated;
    let ge = format_instant(last);
    let page = store
        .search(
            &ctx,
            &query(Some(patient()), &format!("_lastUpdated=ge{ge}")),
        )
        .await
        .expect("ge");
    assert!(page.matches.iter().all(|r| r.last_updated >= last));
    assert!(page.matches.iter().any(|r| r.key.id.as_str() == "c"));
    let lt = format_instant(first);
    let page = store
        .search(
            &ctx,
            &query(Some(patient()), &format!("_lastUpdated=lt{lt}")),
        )
        .await
        .expect("lt");
    assert!(
        page.matches.is_empty(),
        "nothing was written before the first write"
    );
    let page = store
        .search(
            &ctx,
            &query(
                Some(patient()),
                "_lastUpdated=lt2000-01-01,ge2000-01-01&_total=accurate",
            ),
        )
        .await
        .expect("or of dates");
    assert_eq!(
        page.total,
        Some(3),
        "an OR covering all time matches every live patient"
    );
    let page = store
        .search(&ctx, &query(Some(patient()), "_lastUpdated=2001"))
        .await
        .expect("eq year");
    assert!(page.matches.is_empty());

    let sys = store
        .search(&ctx, &query(None, "_id=a"))
        .await
        .expect("system search");
    assert_eq!(sys.matches.len(), 1);
}

/// `identifier` matches system|value, |value-less system forms and bare values.
pub async fn search_by_identifier(store: &dyn ResourceStorage) {
    let ctx = random_tenant();
    let one = store
        .create(
            &ctx,
            patient(),
            with_identifier(patient_body(None, "One"), "urn:mrn", "123"),
        )
        .await
        .expect("one");
    store
        .create(
            &ctx,
            patient(),
            with_identifier(patient_body(None, "Two"), "urn:other", "123"),
        )
        .await
        .expect("two");
    let mut no_system = patient_body(None, "Three");
    no_system["identifier"] = json!([{"value": "123"}]);
    store
        .create(&ctx, patient(), no_system)
        .await
        .expect("three");

    let names = |page: &fhirstore_core::SearchPage| -> Vec<String> {
        let mut v: Vec<String> = page.matches.iter().map(|r| family(r).to_owned()).collect();
        v.sort();
        v
    };
    let p = store
        .search(&ctx, &query(Some(patient()), "identifier=urn:mrn|123"))
        .await
        .expect("system|code");
    assert_eq!(names(&p), vec!["One"]);
    assert_eq!(p.matches[0].key, one.resource.key);
    let p = store
        .search(&ctx, &query(Some(patient()), "identifier=123"))
        .await
        .expect("code");
    assert_eq!(names(&p), vec!["One", "Three", "Two"]);
    let p = store
        .search(&ctx, &query(Some(patient()), "identifier=|123"))
        .await
        .expect("|code");
    assert_eq!(names(&p), vec!["Three"]);
    let p = store
        .search(&ctx, &query(Some(patient()), "identifier=urn:other|"))
        .await
        .expect("system|");
    assert_eq!(names(&p), vec!["Two"]);
    let p = store
        .search(
            &ctx,
            &query(Some(patient()), "identifier=urn:mrn|999,urn:other|123"),
        )
        .await
        .expect("or");
    assert_eq!(names(&p), vec!["Two"]);

    // An update replaces the index entries of the old version.
    let pid = one.resource.key.id.clone();
    store
        .update(
            &ctx,
            patient(),
            &pid,
            with_identifier(patient_body(Some(pid.as_str()), "One"), "urn:mrn", "456"),
            None,
        )
        .await
        .expect("update");
    let p = store
        .search(&ctx, &query(Some(patient()), "identifier=urn:mrn|123"))
        .await
        .expect("old value");
    assert!(p.matches.is_empty(), "old identifier no longer matches");
    let p = store
        .search(&ctx, &query(Some(patient()), "identifier=urn:mrn|456"))
        .await
        .expect("new value");
    assert_eq!(names(&p), vec!["One"]);
    // A delete removes them.
    store.delete(&ctx, patient(), &pid).await.expect("delete");
    let p = store
        .search(&ctx, &query(Some(patient()), "identifier=urn:mrn|456"))
        .await
        .expect("after delete");
    assert!(p.matches.is_empty());
    // Hostile values are data, never SQL.
    let p = store
        .search(
            &ctx,
            &query(Some(patient()), "identifier=x'%20OR%20'1'%3D'1"),
        )
        .await
        .expect("injection attempt is a plain value");
    assert!(p.matches.is_empty());
}

/// Paging by cursor returns every match exactly once, even with writes between pages.
pub async fn search_paging_covers_every_match_once(store: &dyn ResourceStorage) {
    let ctx = random_tenant();
    let mut want = HashSet::new();
    for i in 0..23 {
        let w = store
            .create(&ctx, patient(), patient_body(None, &format!("P{i:02}")))
            .await
            .expect("seed");
        want.insert(w.resource.key.id.to_string());
    }
    // Each walk writes a new match between pages: it may or may not appear, but nothing
    // repeats and nothing that existed before is skipped, in key order and in sorted orders
    // (keyset cursors, not offsets).
    for qs in [
        "_count=5&_total=accurate",
        "_count=5&_sort=family&_total=estimate",
        "_count=4&_sort=-_lastUpdated,family&_total=accurate",
        "_count=6&_sort=-family,_id",
    ] {
        let before = want.clone();
        let mut q = query(Some(patient()), qs);
        let mut seen = Vec::new();
        loop {
            let p = store.search(&ctx, &q).await.expect("page");
            if q.total != fhirstore_core::search::TotalMode::None {
                assert_eq!(p.total, Some(want.len() as u64), "{qs}");
            }
            assert!(p.matches.len() <= q.page_size() as usize, "{qs}");
            seen.extend(p.matches.iter().map(|r| r.key.id.to_string()));
            let late = store
                .create(
                    &ctx,
                    patient(),
                    patient_body(None, &format!("Late{}", want.len())),
                )
                .await
                .expect("write between pages");
            want.insert(late.resource.key.id.to_string());
            match p.next_cursor {
                Some(c) => q.cursor = Some(c),
                None => break,
            }
        }
        let unique: HashSet<String> = seen.iter().cloned().collect();
        assert_eq!(unique.len(), seen.len(), "{qs}: a match returned twice");
        assert!(
            before.is_subset(&unique),
            "{qs}: a match that existed was skipped"
        );
    }
    let tampered = query(Some(patient()), "_cursor=Patient%2Fx'%3B%20DROP");
    assert!(matches!(
        store.search(&ctx, &tampered).await,
        Err(Error::InvalidSearch(_))
    ));
}

/// Conditional create: no match creates, one match returns it unchanged, several fail 412.
pub async fn conditional_create(store: &dyn ResourceStorage) {
    let ctx = random_tenant();
    let crit = identifier_query("urn:mrn", "42");
    let body = with_identifier(patient_body(None, "First"), "urn:mrn", "42");
    let first = store
        .conditional_create(&ctx, patient(), &crit, body.clone())
        .await
        .expect("creates");
    assert_eq!(first.kind, WriteKind::Created);
    let again = store
        .conditional_create(
            &ctx,
            patient(),
            &crit,
            with_identifier(patient_body(None, "Second"), "urn:mrn", "42"),
        )
        .await
        .expect("matches");
    assert_eq!(again.kind, WriteKind::Unchanged);
    assert_eq!(again.resource, first.resource);
    assert!(again.seq.is_none());
    assert_eq!(store.count(&ctx, Some(patient())).await.expect("count"), 1);

    store
        .create(&ctx, patient(), body)
        .await
        .expect("a duplicate, unconditionally");
    let multi = store
        .conditional_create(&ctx, patient(), &crit, patient_body(None, "Third"))
        .await;
    assert!(
        matches!(multi, Err(Error::PreconditionFailed(_))),
        "{multi:?}"
    );
    assert_eq!(store.count(&ctx, Some(patient())).await.expect("count"), 2);

    let by_id = query(Some(patient()), &format!("_id={}", first.resource.key.id));
    let w = store
        .conditional_create(&ctx, patient(), &by_id, patient_body(None, "X"))
        .await
        .expect("by _id");
    assert_eq!(w.kind, WriteKind::Unchanged);
}

/// Conditional update: no match creates (with the body's id if it has one), one match is
/// updated, several fail 412, and a body id that contradicts the match is rejected.
pub async fn conditional_update(store: &dyn ResourceStorage) {
    let ctx = random_tenant();
    let crit = identifier_query("urn:mrn", "7");
    let created = store
        .conditional_update(
            &ctx,
            patient(),
            &crit,
            with_identifier(patient_body(None, "A"), "urn:mrn", "7"),
        )
        .await
        .expect("no match creates");
    assert_eq!(created.kind, WriteKind::Created);
    let pid = created.resource.key.id.clone();
    let updated = store
        .conditional_update(
            &ctx,
            patient(),
            &crit,
            with_identifier(patient_body(None, "B"), "urn:mrn", "7"),
        )
        .await
        .expect("one match updates");
    assert_eq!(updated.kind, WriteKind::Updated);
    assert_eq!(updated.resource.key.id, pid);
    assert_eq!(updated.resource.version.get(), 2);

    let wrong = store
        .conditional_update(
            &ctx,
            patient(),
            &crit,
            with_identifier(patient_body(Some("someone-else"), "C"), "urn:mrn", "7"),
        )
        .await;
    assert!(matches!(wrong, Err(Error::InvalidResource(_))), "{wrong:?}");

    let named = store
        .conditional_update(
            &ctx,
            patient(),
            &identifier_query("urn:mrn", "8"),
            with_identifier(patient_body(Some("given-id"), "D"), "urn:mrn", "8"),
        )
        .await
        .expect("no match with id: update-as-create");
    assert_eq!(named.resource.key.id.as_str(), "given-id");

    store
        .create(
            &ctx,
            patient(),
            with_identifier(patient_body(None, "E"), "urn:mrn", "7"),
        )
        .await
        .expect("second match");
    let multi = store
        .conditional_update(&ctx, patient(), &crit, patient_body(None, "F"))
        .await;
    assert!(
        matches!(multi, Err(Error::PreconditionFailed(_))),
        "{multi:?}"
    );
    let r = store.read(&ctx, patient(), &pid).await.expect("read");
    assert_eq!(family(&r), "B", "failed conditional update changed nothing");
}

/// Conditional delete removes every match and nothing else.
pub async fn conditional_delete(store: &dyn ResourceStorage) {
    let ctx = random_tenant();
    for i in 0..3 {
        store
            .create(
                &ctx,
                patient(),
                with_identifier(patient_body(None, &format!("X{i}")), "urn:grp", "x"),
            )
            .await
            .expect("seed");
    }
    let keep = store
        .create(
            &ctx,
            patient(),
            with_identifier(patient_body(None, "Keep"), "urn:grp", "y"),
        )
        .await
        .expect("keep");
    let d = store
        .conditional_delete(&ctx, patient(), &identifier_query("urn:grp", "x"))
        .await
        .expect("conditional delete");
    assert_eq!(d.deleted.len(), 3);
    assert!(d.deleted.iter().all(|(_, v)| v.get() == 2));
    assert_eq!(store.count(&ctx, Some(patient())).await.expect("count"), 1);
    store
        .read(&ctx, patient(), &keep.resource.key.id)
        .await
        .expect("the non-match survives");
    let none = store
        .conditional_delete(&ctx, patient(), &identifier_query("urn:grp", "x"))
        .await
        .expect("no matches is fine");
    assert!(none.deleted.is_empty());
}

/// A transaction with one failing entry commits nothing; outcomes come back in entry order.
pub async fn transaction_is_atomic(store: &dyn ResourceStorage) {
    let ctx = random_tenant();
    let existing = put_patient(store, &ctx, &id("e"), "E1").await;
    let ops = vec![
        WriteOp::Create {
            resource_type: patient(),
            resource: patient_body(None, "New"),
            if_none_exist: None,
            full_url: None,
        },
        WriteOp::Update {
            resource_type: patient(),
            id: id("e"),
            resource: patient_body(Some("e"), "E2"),
            if_match: Some(VersionId::new(9).expect("9")),
        },
    ];
    let e = store.transaction(&ctx, ops).await;
    match e.as_ref().map_err(Error::kind) {
        Err(Error::VersionConflict {
            expected: 9,
            current: 1,
            ..
        }) => {}
        other => panic!("expected the stale entry's conflict, got {other:?}"),
    }
    assert_eq!(store.count(&ctx, Some(patient())).await.expect("count"), 1);
    let r = store.read(&ctx, patient(), &id("e")).await.expect("read");
    assert_eq!(r, existing.resource);
    assert_eq!(
        all_history(store, &ctx, HistoryScope::System, 50)
            .await
            .len(),
        1
    );

    let invalid = vec![
        WriteOp::Delete {
            resource_type: patient(),
            id: id("e"),
        },
        WriteOp::Create {
            resource_type: patient(),
            resource: json!({"resourceType": "Observation"}),
            if_none_exist: None,
            full_url: None,
        },
    ];
    match store.transaction(&ctx, invalid).await {
        Err(e) if matches!(e.kind(), Error::InvalidResource(_)) => {
            assert_eq!(e.entry(), Some(1), "{e}");
        }
        other => panic!("expected an invalid entry 1, got {other:?}"),
    }
    store
        .read(&ctx, patient(), &id("e"))
        .await
        .expect("delete was not committed");

    let dup = vec![
        WriteOp::Delete {
            resource_type: patient(),
            id: id("e"),
        },
        WriteOp::Update {
            resource_type: patient(),
            id: id("e"),
            resource: patient_body(Some("e"), "E3"),
            if_match: None,
        },
    ];
    assert!(matches!(
        store
            .transaction(&ctx, dup)
            .await
            .as_ref()
            .map_err(Error::kind),
        Err(Error::InvalidResource(_))
    ));

    let ok = vec![
        WriteOp::Update {
            resource_type: patient(),
            id: id("e"),
            resource: patient_body(Some("e"), "E2"),
            if_match: Some(VersionId::FIRST),
        },
        WriteOp::Delete {
            resource_type: patient(),
            id: id("gone-before"),
        },
        WriteOp::Create {
            resource_type: patient(),
            resource: patient_body(None, "New"),
            if_none_exist: None,
            full_url: None,
        },
    ];
    let out = store.transaction(&ctx, ok).await.expect("commits");
    assert_eq!(out.len(), 3);
    assert!(matches!(&out[0], OpOutcome::Written(w) if w.resource.version.get() == 2));
    assert!(matches!(&out[1], OpOutcome::Deleted(d) if d.deleted.is_empty()));
    assert!(matches!(&out[2], OpOutcome::Written(w) if w.kind == WriteKind::Created));
    assert_eq!(store.count(&ctx, Some(patient())).await.expect("count"), 2);
}

/// `urn:uuid:` fullUrls resolve to the ids assigned in the same transaction, including a
/// conditional create that matched an existing resource.
pub async fn transaction_resolves_urn_uuid_references(store: &dyn ResourceStorage) {
    let ctx = random_tenant();
    let existing = store
        .create(
            &ctx,
            rt("Practitioner"),
            json!({"resourceType": "Practitioner",
            "identifier": [{"system": "urn:npi", "value": "1"}]}),
        )
        .await
        .expect("seed practitioner");
    let ops = vec![
        WriteOp::Create {
            resource_type: rt("Observation"),
            resource: json!({"resourceType": "Observation", "status": "final",
                "code": {"text": "bp"},
                "subject": {"reference": "urn:uuid:11111111-1111-1111-1111-111111111111"},
                "performer": [{"reference": "urn:uuid:22222222-2222-2222-2222-222222222222"}]}),
            if_none_exist: None,
            full_url: None,
        },
        WriteOp::Create {
            resource_type: patient(),
            resource: patient_body(None, "Referenced"),
            if_none_exist: None,
            full_url: Some("urn:uuid:11111111-1111-1111-1111-111111111111".into()),
        },
        WriteOp::Create {
            resource_type: rt("Practitioner"),
            resource: json!({"resourceType": "Practitioner",
                "identifier": [{"system": "urn:npi", "value": "1"}]}),
            if_none_exist: Some(
                SearchQuery::parse(
                    Some(rt("Practitioner")),
                    "identifier=urn:npi|1",
                    Handling::Strict,
                )
                .expect("criteria"),
            ),
            full_url: Some("urn:uuid:22222222-2222-2222-2222-222222222222".into()),
        },
    ];
    let out = store.transaction(&ctx, ops).await.expect("commits");
    let (OpOutcome::Written(obs), OpOutcome::Written(pat), OpOutcome::Written(pr)) =
        (&out[0], &out[1], &out[2])
    else {
        panic!("unexpected outcomes {out:?}");
    };
    assert_eq!(pr.kind, WriteKind::Unchanged);
    assert_eq!(pr.resource.key, existing.resource.key);
    let stored = store
        .read(&ctx, rt("Observation"), &obs.resource.key.id)
        .await
        .expect("read obs");
    assert_eq!(
        stored.content["subject"]["reference"],
        json!(format!("Patient/{}", pat.resource.key.id))
    );
    assert_eq!(
        stored.content["performer"][0]["reference"],
        json!(format!("Practitioner/{}", existing.resource.key.id))
    );
}

/// Batch entries succeed or fail each on their own.
pub async fn batch_entries_stand_alone(store: &dyn ResourceStorage) {
    let ctx = random_tenant();
    let ops = vec![
        WriteOp::Create {
            resource_type: patient(),
            resource: patient_body(None, "Good1"),
            if_none_exist: None,
            full_url: None,
        },
        WriteOp::Update {
            resource_type: patient(),
            id: id("x"),
            resource: patient_body(Some("y"), "Bad"),
            if_match: None,
        },
        WriteOp::Update {
            resource_type: patient(),
            id: id("z"),
            resource: patient_body(Some("z"), "Stale"),
            if_match: Some(VersionId::new(4).expect("4")),
        },
        WriteOp::Update {
            resource_type: patient(),
            id: id("w"),
            resource: patient_body(Some("w"), "Good2"),
            if_match: None,
        },
    ];
    let out = store.batch(&ctx, ops).await.expect("batch runs");
    assert_eq!(out.len(), 4);
    assert!(out[0].is_ok());
    fn entry(r: &Result<OpOutcome, Error>) -> (Option<usize>, Option<&Error>) {
        match r {
            Err(e) => (e.entry(), Some(e.kind())),
            Ok(_) => (None, None),
        }
    }
    assert!(matches!(
        entry(&out[1]),
        (Some(1), Some(Error::InvalidResource(_)))
    ));
    assert!(matches!(
        entry(&out[2]),
        (Some(2), Some(Error::VersionConflict { .. }))
    ));
    assert!(out[3].is_ok());
    assert_eq!(store.count(&ctx, Some(patient())).await.expect("count"), 2);
    let r = store.read(&ctx, patient(), &id("w")).await.expect("w");
    assert_eq!(family(&r), "Good2");
}

/// A context without a permission cannot use it, and a denied call changes nothing.
pub async fn permissions_are_enforced(store: &dyn ResourceStorage) {
    let full = random_tenant();
    let w = store
        .create(&full, patient(), patient_body(None, "A"))
        .await
        .expect("seed");
    let pid = w.resource.key.id.clone();
    let ro = TenantContext::new(full.tenant().clone(), Permissions::READ_ONLY);
    store
        .read(&ro, patient(), &pid)
        .await
        .expect("read allowed");
    let denied = [
        store
            .create(&ro, patient(), patient_body(None, "B"))
            .await
            .err(),
        store
            .update(
                &ro,
                patient(),
                &pid,
                patient_body(Some(pid.as_str()), "B"),
                None,
            )
            .await
            .err(),
        store.delete(&ro, patient(), &pid).await.err(),
    ];
    for e in denied {
        assert!(matches!(e, Some(Error::TenantDenied(_))), "{e:?}");
    }
    let mut no_delete = Permissions::ALL;
    no_delete.delete = false;
    let nd = TenantContext::new(full.tenant().clone(), no_delete);
    assert!(matches!(
        store.delete(&nd, patient(), &pid).await,
        Err(Error::TenantDenied(_))
    ));
    let batch = store
        .batch(
            &ro,
            vec![WriteOp::Delete {
                resource_type: patient(),
                id: pid.clone(),
            }],
        )
        .await
        .expect("batch runs");
    assert!(matches!(
        batch[0].as_ref().map_err(Error::kind),
        Err(Error::TenantDenied(_))
    ));
    let no_read = TenantContext::new(
        full.tenant().clone(),
        Permissions {
            read: false,
            write: true,
            delete: true,
            admin: false,
        },
    );
    assert!(matches!(
        store.read(&no_read, patient(), &pid).await,
        Err(Error::TenantDenied(_))
    ));
    assert!(matches!(
        store
            .search(&no_read, &SearchQuery::all(Some(patient())))
            .await,
        Err(Error::TenantDenied(_))
    ));
    let r = store.read(&full, patient(), &pid).await.expect("unchanged");
    assert_eq!(r, w.resource);
}

/// Two tenants holding the same ids: every read path of one sees only its own data.
pub async fn tenant_isolation_reads(store: &dyn ResourceStorage) {
    let a = random_tenant();
    let b = random_tenant();
    let shared = id("shared");
    for (ctx, who) in [(&a, "A"), (&b, "B")] {
        store
            .update(
                ctx,
                patient(),
                &shared,
                with_identifier(patient_body(Some("shared"), who), "urn:mrn", "same"),
                None,
            )
            .await
            .expect("seed");
    }
    store
        .update(
            &b,
            patient(),
            &shared,
            with_identifier(patient_body(Some("shared"), "B2"), "urn:mrn", "same"),
            None,
        )
        .await
        .expect("b v2");
    put_patient(store, &b, &id("only-b"), "B").await;

    let ra = store.read(&a, patient(), &shared).await.expect("a read");
    assert_eq!((family(&ra), ra.version.get()), ("A", 1));
    assert_eq!(&ra.tenant, a.tenant());
    assert!(matches!(
        store.read(&a, patient(), &id("only-b")).await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        store
            .vread(&a, patient(), &shared, VersionId::new(2).expect("2"))
            .await,
        Err(Error::NotFound(_))
    ));
    for scope in [
        HistoryScope::System,
        HistoryScope::Type(patient()),
        HistoryScope::Instance(patient(), shared.clone()),
    ] {
        let h = all_history(store, &a, scope.clone(), 1).await;
        assert_eq!(h.len(), 1, "{scope:?}");
        assert!(h
            .iter()
            .all(|r| &r.tenant == a.tenant() && family(r) == "A"));
    }
    // B's history cursor used in A still yields only A's data.
    let mut req = HistoryRequest::new(HistoryScope::System);
    req.count = Some(1);
    let b_page = store.history(&b, &req).await.expect("b page");
    req.cursor = b_page.next_cursor;
    let a_with_b_cursor = store.history(&a, &req).await.expect("a page");
    assert!(a_with_b_cursor.entries.iter().all(|r| family(r) == "A"));

    for qs in [
        "_id=shared",
        "identifier=urn:mrn|same",
        "identifier=same",
        "_id=only-b",
        "",
    ] {
        let hits = all_matches(store, &a, query(Some(patient()), qs)).await;
        assert!(
            hits.iter()
                .all(|r| &r.tenant == a.tenant() && family(r) == "A"),
            "{qs}: {hits:?}"
        );
        // A system-level search knows only the parameters every resource has.
        if !qs.starts_with("identifier") {
            let sys = all_matches(store, &a, query(None, qs)).await;
            assert!(sys.iter().all(|r| family(r) == "A"), "system {qs}");
        }
    }
    let total = store
        .search(&a, &query(Some(patient()), "_total=accurate"))
        .await
        .expect("total");
    assert_eq!(total.total, Some(1));
    assert_eq!(store.count(&a, None).await.expect("count a"), 1);
    assert_eq!(store.count(&b, None).await.expect("count b"), 2);
}

/// Two tenants holding the same ids: no write path of one changes the other's data.
pub async fn tenant_isolation_writes(store: &dyn ResourceStorage) {
    let a = random_tenant();
    let b = random_tenant();
    let shared = id("shared");
    let mut b_state = None;
    for (ctx, who) in [(&a, "A"), (&b, "B")] {
        let w = store
            .update(
                ctx,
                patient(),
                &shared,
                with_identifier(patient_body(Some("shared"), who), "urn:mrn", "same"),
                None,
            )
            .await
            .expect("seed");
        b_state = Some(w.resource);
    }
    let b_state = b_state.expect("b seeded");

    // If-Match is checked against the caller's tenant's version only.
    put_patient(store, &a, &shared, "A2").await;
    store
        .update(
            &a,
            patient(),
            &shared,
            patient_body(Some("shared"), "A3"),
            VersionId::new(2),
        )
        .await
        .expect("a's own version");
    let crit = identifier_query("urn:mrn", "same");
    store
        .conditional_update(
            &b,
            patient(),
            &crit,
            with_identifier(patient_body(None, "B-cond"), "urn:mrn", "same"),
        )
        .await
        .expect("b conditional update finds only b's");
    store
        .delete(&a, patient(), &shared)
        .await
        .expect("a delete");
    let a_created = store
        .conditional_create(
            &a,
            patient(),
            &crit,
            with_identifier(patient_body(None, "A-new"), "urn:mrn", "same"),
        )
        .await
        .expect("a conditional create");
    assert_eq!(
        a_created.kind,
        WriteKind::Created,
        "b's match is invisible to a"
    );
    let d = store
        .conditional_delete(&a, patient(), &crit)
        .await
        .expect("a conditional delete");
    assert_eq!(d.deleted.len(), 1);

    let rb = store.read(&b, patient(), &shared).await.expect("b intact");
    assert_eq!(family(&rb), "B-cond");
    assert_eq!(
        rb.version.get(),
        2,
        "only b's own conditional update touched it"
    );
    let v1 = store
        .vread(&b, patient(), &shared, VersionId::FIRST)
        .await
        .expect("b v1");
    assert_eq!(v1, b_state);
    assert_eq!(store.count(&b, Some(patient())).await.expect("count"), 1);
    assert_eq!(
        all_history(store, &b, HistoryScope::System, 10).await.len(),
        2
    );
}

/// Transactions and batches of one tenant never read or change the other's data.
pub async fn tenant_isolation_transactions(store: &dyn ResourceStorage) {
    let a = random_tenant();
    let b = random_tenant();
    let shared = id("shared");
    store
        .update(
            &b,
            patient(),
            &shared,
            with_identifier(patient_body(Some("shared"), "B"), "urn:mrn", "t"),
            None,
        )
        .await
        .expect("seed b");
    let ops = vec![
        WriteOp::Delete {
            resource_type: patient(),
            id: shared.clone(),
        },
        WriteOp::Create {
            resource_type: patient(),
            resource: with_identifier(patient_body(None, "A"), "urn:mrn", "t"),
            if_none_exist: Some(identifier_query("urn:mrn", "t")),
            full_url: None,
        },
        WriteOp::ConditionalDelete {
            resource_type: patient(),
            criteria: query(Some(patient()), "_id=shared"),
        },
    ];
    let out = store.transaction(&a, ops).await.expect("a transaction");
    assert!(matches!(&out[0], OpOutcome::Deleted(d) if d.deleted.is_empty()));
    assert!(matches!(&out[1], OpOutcome::Written(w) if w.kind == WriteKind::Created));
    let batch = store
        .batch(
            &a,
            vec![WriteOp::Update {
                resource_type: patient(),
                id: shared.clone(),
                resource: patient_body(Some("shared"), "A"),
                if_match: Some(VersionId::FIRST),
            }],
        )
        .await
        .expect("batch");
    assert!(
        matches!(
            batch[0].as_ref().map_err(Error::kind),
            Err(Error::VersionConflict { current: 0, .. })
        ),
        "b's version 1 is not a's: {batch:?}"
    );
    let rb = store.read(&b, patient(), &shared).await.expect("b intact");
    assert_eq!((family(&rb), rb.version.get()), ("B", 1));
    assert_eq!(store.count(&b, None).await.expect("count"), 1);
}

/// 32 concurrent writers × 50 updates to one resource, no If-Match: every update lands, as
/// versions 2..=1601 with no gaps and no duplicates.
pub async fn concurrent_updates_have_no_gaps(store: &dyn ResourceStorage) {
    let ctx = random_tenant();
    let pid = id("hot");
    put_patient(store, &ctx, &pid, "w0").await;
    let writers = (0..32).map(|w| {
        let ctx = &ctx;
        let pid = &pid;
        async move {
            for i in 0..50 {
                store
                    .update(
                        ctx,
                        patient(),
                        pid,
                        patient_body(Some("hot"), &format!("w{w}-{i}")),
                        None,
                    )
                    .await
                    .expect("concurrent update");
            }
        }
    });
    futures::future::join_all(writers).await;
    let r = store.read(&ctx, patient(), &pid).await.expect("read");
    assert_eq!(r.version.get(), 1601);
    let h = all_history(
        store,
        &ctx,
        HistoryScope::Instance(patient(), pid.clone()),
        1000,
    )
    .await;
    let versions: Vec<u64> = h.iter().map(|r| r.version.get()).collect();
    let want: Vec<u64> = (1..=1601).rev().collect();
    assert_eq!(
        versions, want,
        "history is every version, newest first, no gaps"
    );
}

/// Write futures dropped at every stage (before, during and after their transaction) leave the
/// store whole and usable, as a client disconnecting mid-request does: each transaction lands
/// completely or not at all, later writes succeed, and version histories have no gaps.
pub async fn cancelled_writes_leave_store_usable(store: &dyn ResourceStorage) {
    use futures::FutureExt as _;
    let ctx = random_tenant();
    let hot: Vec<LogicalId> = (0..4).map(|i| id(&format!("hot{i}"))).collect();
    for p in &hot {
        put_patient(store, &ctx, p, "start").await;
    }
    for k in 0..80usize {
        let update = store.update(
            &ctx,
            patient(),
            &hot[k % hot.len()],
            patient_body(Some(hot[k % hot.len()].as_str()), &format!("c{k}")),
            None,
        );
        let pair = store.transaction(
            &ctx,
            ["a", "b"]
                .iter()
                .map(|side| WriteOp::Update {
                    resource_type: patient(),
                    id: id(&format!("{side}{k}")),
                    resource: patient_body(Some(&format!("{side}{k}")), "pair"),
                    if_match: None,
                })
                .collect(),
        );
        let mut both = Box::pin(futures::future::join(update, pair));
        // Polled a different number of times each round, so the drop lands at every stage.
        for _ in 0..k % 9 {
            if futures::poll!(both.as_mut()).is_ready() {
                break;
            }
            tokio::task::yield_now().await;
        }
        drop(both);
        // Some rounds also drop a future that was never polled, or polled only once.
        if k % 5 == 0 {
            let _ = store
                .delete(&ctx, patient(), &hot[(k + 1) % hot.len()])
                .now_or_never();
        }
    }
    for (i, p) in hot.iter().enumerate() {
        store
            .update(
                &ctx,
                patient(),
                p,
                patient_body(Some(p.as_str()), &format!("after{i}")),
                None,
            )
            .await
            .unwrap_or_else(|e| panic!("a write after cancelled writes failed: {e}"));
    }
    let mut q = query(Some(patient()), "family=pair");
    q.count = Some(1000);
    // One page is one statement, so one snapshot: a pair is seen whole or not at all.
    let page = store.search(&ctx, &q).await.expect("search pairs");
    assert!(page.next_cursor.is_none());
    let mut seen: HashMap<String, u32> = HashMap::new();
    for r in &page.matches {
        *seen.entry(r.key.id.as_str()[1..].to_owned()).or_default() += 1;
    }
    for (k, n) in &seen {
        assert_eq!(*n, 2, "transaction {k} landed in part");
    }
    for p in &hot {
        let h = all_history(
            store,
            &ctx,
            HistoryScope::Instance(patient(), p.clone()),
            1000,
        )
        .await;
        let versions: Vec<u64> = h.iter().map(|r| r.version.get()).collect();
        let want: Vec<u64> = (1..=versions.len() as u64).rev().collect();
        assert_eq!(versions, want, "history of {p} has gaps");
    }
}

/// 32 concurrent writers with the same If-Match: exactly one wins, the rest conflict.
pub async fn concurrent_if_match_has_one_winner(store: &dyn ResourceStorage) {
    let ctx = random_tenant();
    let pid = id("contested");
    put_patient(store, &ctx, &pid, "start").await;
    let racers = (0..32).map(|w| {
        let ctx = &ctx;
        let pid = &pid;
        async move {
            store
                .update(
                    ctx,
                    patient(),
                    pid,
                    patient_body(Some("contested"), &format!("racer{w}")),
                    Some(VersionId::FIRST),
                )
                .await
        }
    });
    let results = futures::future::join_all(racers).await;
    let wins = results.iter().filter(|r| r.is_ok()).count();
    let conflicts = results
        .iter()
        .filter(|r| matches!(r, Err(Error::VersionConflict { .. })))
        .count();
    assert_eq!((wins, conflicts), (1, 31), "{results:?}");
    let r = store.read(&ctx, patient(), &pid).await.expect("read");
    assert_eq!(r.version.get(), 2);
}

/// Ids matching `qs`, sorted; every match must belong to `ctx`'s tenant.
async fn matching_ids(
    store: &dyn ResourceStorage,
    ctx: &TenantContext,
    rt: &str,
    qs: &str,
) -> Vec<String> {
    let hits = all_matches(store, ctx, query(Some(self::rt(rt)), qs)).await;
    assert!(
        hits.iter().all(|r| &r.tenant == ctx.tenant()),
        "{qs} crossed tenants"
    );
    let mut ids: Vec<String> = hits.into_iter().map(|r| r.key.id.to_string()).collect();
    ids.sort();
    ids
}

/// Runs each `(type, query, expected ids)` case and fails listing every case that differed.
async fn expect_matches(
    store: &dyn ResourceStorage,
    ctx: &TenantContext,
    cases: &[(&str, &str, &[&str])],
) {
    let mut failures = Vec::new();
    for (t, qs, want) in cases {
        let got = matching_ids(store, ctx, t, qs).await;
        if got != *want {
            failures.push(format!("{t}?{qs}: got {got:?}, want {want:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Stores each document (which names its type and id) in the tenant.
async fn put_all(store: &dyn ResourceStorage, ctx: &TenantContext, docs: Vec<Value>) {
    for d in docs {
        let t = rt(d["resourceType"].as_str().expect("type"));
        let i = id(d["id"].as_str().expect("id"));
        store.update(ctx, t, &i, d, None).await.expect("seed");
    }
}

/// The hand-built search data set: Patients p1-p3, Observations o1-o4, RiskAssessments ra1-ra2,
/// ValueSet vs, Organization o1. Tenant `a` gets the families Chalmers, Chalk, García; tenant
/// `b` holds the same ids with family Zed everywhere, so any leak shows.
async fn seed_search_fixture(store: &dyn ResourceStorage) -> (TenantContext, TenantContext) {
    let a = random_tenant();
    let b = random_tenant();
    let data = |family: [&str; 3]| {
        vec![
            json!({"resourceType": "Patient", "id": "p1", "gender": "male", "birthDate": "1974-12-25",
                   "name": [{"family": family[0], "given": ["Peter", "James"]}],
                   "telecom": [{"system": "email", "value": "peter@x.org"}],
                   "generalPractitioner": [{"reference": "Practitioner/gp1"}]}),
            json!({"resourceType": "Patient", "id": "p2", "gender": "female", "birthDate": "1980-05",
                   "name": [{"family": family[1], "given": ["Anna"]}]}),
            json!({"resourceType": "Patient", "id": "p3", "gender": "female", "birthDate": "2001-01-01",
                   "name": [{"family": family[2], "given": ["José"]}],
                   "managingOrganization": {"reference": "Organization/o1"}}),
            json!({"resourceType": "Observation", "id": "o1", "status": "final",
                   "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
                   "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2020-06-01T10:00:00Z",
                   "valueQuantity": {"value": 70, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"}}),
            json!({"resourceType": "Observation", "id": "o2", "status": "final",
                   "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                   "subject": {"reference": "Patient/p2"},
                   "effectivePeriod": {"start": "2020-01-01", "end": "2020-01-31"},
                   "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}}),
            json!({"resourceType": "Observation", "id": "o3", "status": "final",
                   "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
                   "subject": {"reference": "Group/g1"}, "effectiveDateTime": "2021-03-01",
                   "valueQuantity": {"value": 100.5, "unit": "kg"}}),
            json!({"resourceType": "RiskAssessment", "id": "ra1", "status": "final",
                   "subject": {"reference": "Patient/p1"}, "prediction": [{"probabilityDecimal": 0.25}]}),
            json!({"resourceType": "RiskAssessment", "id": "ra2", "status": "final",
                   "subject": {"reference": "Patient/p2"}, "prediction": [{"probabilityDecimal": 0.8}]}),
            json!({"resourceType": "ValueSet", "id": "vs", "status": "active",
                   "url": "http://example.org/fhir/ValueSet/a"}),
            json!({"resourceType": "Organization", "id": "o1", "name": format!("Acme {}", family[0])}),
            json!({"resourceType": "Observation", "id": "o4", "status": "final",
                   "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                   "subject": {"reference": "Patient/p3"}, "effectiveDateTime": "2019-05-05",
                   "valueQuantity": {"value": 60, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}}),
        ]
    };
    for (ctx, families) in [
        (&a, ["Chalmers", "Chalk", "García"]),
        (&b, ["Zed", "Zed", "Zed"]),
    ] {
        for r in data(families) {
            let t = rt(r["resourceType"].as_str().expect("type"));
            let rid = id(r["id"].as_str().expect("id"));
            store.update(ctx, t, &rid, r, None).await.expect("seed");
        }
    }
    (a, b)
}

/// Every parameter type, prefix and modifier the store claims, on a small data set whose
/// expected matches were worked out by hand. A second tenant holds the same ids with other
/// values; none of its resources may appear.
pub async fn search_parameter_types(store: &dyn ResourceStorage) {
    let (a, b) = seed_search_fixture(store).await;
    let cases: &[(&str, &str, &[&str])] = &[
        // string: starts-with, case- and accent-insensitive; :exact; :contains
        ("Patient", "family=chal", &["p1", "p2"]),
        ("Patient", "family=CHALMERS", &["p1"]),
        ("Patient", "family:exact=Chalmers", &["p1"]),
        ("Patient", "family:exact=chalmers", &[]),
        ("Patient", "family:contains=alk", &["p2"]),
        ("Patient", "given=jose", &["p3"]),
        ("Patient", "name=garc", &["p3"]),
        ("Patient", "family=chal&given=anna", &["p2"]),
        ("Patient", "family=zed", &[]),
        // token, :not
        ("Patient", "gender=female", &["p2", "p3"]),
        ("Patient", "gender:not=female", &["p1"]),
        ("Patient", "email=peter@x.org", &["p1"]),
        // ContactPoint: the system is the token's system, as HAPI and Helios index it
        ("Patient", "email=email|peter@x.org", &["p1"]),
        ("Patient", "telecom=email|peter@x.org", &["p1"]),
        ("Patient", "telecom=phone|peter@x.org", &[]),
        ("Patient", "email=|peter@x.org", &[]),
        (
            "Observation",
            "code=http://loinc.org|29463-7",
            &["o1", "o3"],
        ),
        (
            "Observation",
            "code:not=http://loinc.org|29463-7",
            &["o2", "o4"],
        ),
        // date: precision ranges and every prefix
        ("Patient", "birthdate=1974", &["p1"]),
        ("Patient", "birthdate=1980", &["p2"]),
        ("Patient", "birthdate=1980-05-15", &[]),
        ("Patient", "birthdate=ge1980-01-01", &["p2", "p3"]),
        ("Patient", "birthdate=lt1980", &["p1"]),
        ("Patient", "birthdate=eb1975", &["p1"]),
        ("Patient", "birthdate=sa2000", &["p3"]),
        ("Patient", "birthdate=ne1980", &["p1", "p3"]),
        ("Patient", "birthdate=le1974-12-25", &["p1"]),
        ("Observation", "date=2020", &["o1", "o2"]),
        ("Observation", "date=2020-06", &["o1"]),
        ("Observation", "date=gt2020-06-01", &["o3"]),
        ("Observation", "date=le2020-01-15", &["o2", "o4"]),
        // reference: Type/id, id, :Type, absolute forms
        ("Patient", "general-practitioner=Practitioner/gp1", &["p1"]),
        ("Patient", "general-practitioner=gp1", &["p1"]),
        ("Patient", "general-practitioner:Practitioner=gp1", &["p1"]),
        ("Patient", "organization=Organization/o1", &["p3"]),
        ("Observation", "subject=Patient/p1", &["o1"]),
        ("Observation", "patient=p2", &["o2"]),
        ("Observation", "patient=g1", &[]),
        ("Observation", "subject=Group/g1", &["o3"]),
        // quantity: precision, prefixes, system and code
        ("Observation", "value-quantity=70", &["o1"]),
        ("Observation", "value-quantity=gt71", &["o2", "o3"]),
        ("Observation", "value-quantity=gt71||kg", &["o3"]),
        (
            "Observation",
            "value-quantity=lt100|http://unitsofmeasure.org|kg",
            &["o1"],
        ),
        ("Observation", "value-quantity=100", &[]),
        ("Observation", "value-quantity=100.5", &["o3"]),
        // number
        ("RiskAssessment", "probability=gt0.5", &["ra2"]),
        ("RiskAssessment", "probability=0.25", &["ra1"]),
        ("RiskAssessment", "probability=le0.25", &["ra1"]),
        // uri, :below, :above
        (
            "ValueSet",
            "url=http://example.org/fhir/ValueSet/a",
            &["vs"],
        ),
        ("ValueSet", "url:below=http://example.org/fhir", &["vs"]),
        (
            "ValueSet",
            "url:above=http://example.org/fhir/ValueSet/a/x",
            &["vs"],
        ),
        ("ValueSet", "url:below=http://other.org", &[]),
        // chaining: typed, inferred from a single target, multi-level; never across tenants
        ("Observation", "subject:Patient.family=chalmers", &["o1"]),
        ("Observation", "patient.family=chal", &["o1", "o2"]),
        ("Observation", "patient.family=zed", &[]),
        ("Observation", "patient.organization.name=acme", &["o4"]),
        (
            "Observation",
            "subject:Patient.gender=female&date=2020",
            &["o2"],
        ),
        // reverse chaining, nested
        (
            "Patient",
            "_has:Observation:patient:code=http://loinc.org|8867-4",
            &["p2", "p3"],
        ),
        (
            "Patient",
            "_has:Observation:patient:value-quantity=gt65",
            &["p1", "p2"],
        ),
        (
            "Patient",
            "_has:RiskAssessment:subject:probability=gt0.5",
            &["p2"],
        ),
        (
            "Organization",
            "_has:Patient:organization:_has:Observation:patient:code=http://loinc.org|8867-4",
            &["o1"],
        ),
        ("Organization", "_has:Patient:organization:family=zed", &[]),
        // :missing on every kind of table
        (
            "Patient",
            "general-practitioner:missing=true",
            &["p2", "p3"],
        ),
        ("Patient", "organization:missing=false", &["p3"]),
        ("Patient", "birthdate:missing=false", &["p1", "p2", "p3"]),
        ("Patient", "_id:missing=true", &[]),
    ];
    expect_matches(store, &a, cases).await;
    // Hostile values are data, never SQL, in every table.
    for qs in [
        "family=x'%20OR%201%3D1--",
        "family:contains=%25",
        "url:below=%25",
        "subject=Patient/x'--",
    ] {
        let t = if qs.starts_with("url") {
            "ValueSet"
        } else if qs.starts_with("subject") {
            "Observation"
        } else {
            "Patient"
        };
        let got = SearchQuery::parse(Some(rt(t)), qs, Handling::Strict);
        if let Ok(q) = got {
            let hits = store.search(&a, &q).await.expect("runs");
            assert!(hits.matches.is_empty(), "{qs} matched {:?}", hits.matches);
        }
    }
    assert_eq!(
        store.count(&b, Some(patient())).await.expect("count"),
        3,
        "b untouched"
    );
}

/// `_include` and `_revinclude`, typed and wildcard, with `:iterate`: included resources come
/// back once, apart from the matches, and only from the searching tenant.
pub async fn search_includes(store: &dyn ResourceStorage) {
    let (a, _b) = seed_search_fixture(store).await;
    let run = |t: &'static str, qs: &'static str| {
        let a = &a;
        async move {
            let page = store
                .search(a, &query(Some(rt(t)), qs))
                .await
                .unwrap_or_else(|e| panic!("{t}?{qs}: {e}"));
            let keys = |rs: &[StoredResource]| {
                assert!(
                    rs.iter().all(|r| &r.tenant == a.tenant()),
                    "{t}?{qs} crossed tenants"
                );
                let mut v: Vec<String> = rs.iter().map(|r| r.key.to_string()).collect();
                v.sort();
                v
            };
            (keys(&page.matches), keys(&page.included))
        }
    };
    let cases: &[(&str, &str, &[&str], &[&str])] = &[
        (
            "Observation",
            "_id=o1&_include=Observation:subject",
            &["Observation/o1"],
            &["Patient/p1"],
        ),
        (
            "Observation",
            "code=http://loinc.org|29463-7&_include=Observation:subject:Patient",
            &["Observation/o1", "Observation/o3"],
            &["Patient/p1"],
        ),
        (
            "Observation",
            "_id=o1&_include=Observation:subject:Group",
            &["Observation/o1"],
            &[],
        ),
        (
            "Patient",
            "_id=p3&_include=Patient:organization",
            &["Patient/p3"],
            &["Organization/o1"],
        ),
        (
            "Patient",
            "_id=p1&_revinclude=Observation:subject&_revinclude=RiskAssessment:subject",
            &["Patient/p1"],
            &["Observation/o1", "RiskAssessment/ra1"],
        ),
        (
            "Patient",
            "_id=p1&_revinclude=*",
            &["Patient/p1"],
            &["Observation/o1", "RiskAssessment/ra1"],
        ),
        (
            "Observation",
            "_id=o4&_include=Observation:patient&_include:iterate=Patient:organization",
            &["Observation/o4"],
            &["Organization/o1", "Patient/p3"],
        ),
        // Without :iterate the second hop is not taken.
        (
            "Observation",
            "_id=o4&_include=Observation:patient&_include=Patient:organization",
            &["Observation/o4"],
            &["Patient/p3"],
        ),
        // A match is never repeated as an include.
        (
            "Patient",
            "_id=p1,p2&_revinclude=Observation:subject&_include=Patient:general-practitioner",
            &["Patient/p1", "Patient/p2"],
            &["Observation/o1", "Observation/o2"],
        ),
    ];
    for (t, qs, want_matches, want_included) in cases {
        let (m, i) = run(t, qs).await;
        assert_eq!(m, *want_matches, "{t}?{qs} matches");
        assert_eq!(i, *want_included, "{t}?{qs} included");
    }
    // Included resources are the searching tenant's versions.
    let page = store
        .search(
            &a,
            &query(
                Some(rt("Observation")),
                "_id=o1&_include=Observation:subject",
            ),
        )
        .await
        .expect("search");
    assert_eq!(family(&page.included[0]), "Chalmers");
    for bad in [
        "_include=Observation",
        "_include=Observation:status",
        "_include:deep=Observation:subject",
    ] {
        assert!(
            SearchQuery::parse(Some(rt("Observation")), bad, Handling::Lenient).is_err(),
            "{bad}"
        );
    }
}

/// `_sort`: ascending and descending on every kind of key, several keys, resources without a
/// value last, and cursor paging that keeps the order across pages.
pub async fn search_sorting(store: &dyn ResourceStorage) {
    let (a, _b) = seed_search_fixture(store).await;
    let cases: &[(&str, &str, &[&str])] = &[
        ("Patient", "_sort=family", &["p2", "p1", "p3"]),
        ("Patient", "_sort=-family", &["p3", "p1", "p2"]),
        ("Patient", "_sort=birthdate", &["p1", "p2", "p3"]),
        ("Patient", "_sort=-birthdate", &["p3", "p2", "p1"]),
        ("Patient", "_sort=gender,-birthdate", &["p3", "p2", "p1"]),
        ("Patient", "_sort=general-practitioner", &["p1", "p2", "p3"]),
        (
            "Patient",
            "_sort=-general-practitioner",
            &["p1", "p2", "p3"],
        ),
        ("Patient", "_sort=-_id", &["p3", "p2", "p1"]),
        ("Patient", "_sort=-_lastUpdated", &["p3", "p2", "p1"]),
        ("Observation", "_sort=date", &["o4", "o2", "o1", "o3"]),
        (
            "Observation",
            "_sort=-value-quantity",
            &["o3", "o2", "o1", "o4"],
        ),
        ("Observation", "_sort=code,date", &["o1", "o3", "o4", "o2"]),
    ];
    for (t, qs, want) in cases {
        for count in [100, 1] {
            let q = query(Some(rt(t)), &format!("{qs}&_count={count}"));
            let got: Vec<String> = all_matches(store, &a, q)
                .await
                .into_iter()
                .map(|r| r.key.id.to_string())
                .collect();
            assert_eq!(got, *want, "{t}?{qs} with _count={count}");
        }
    }
    let tampered = query(
        Some(patient()),
        "_sort=family&_cursor=%7B%22k%22%3A%5B1%5D%7D",
    );
    assert!(matches!(
        store.search(&a, &tampered).await,
        Err(Error::InvalidSearch(_))
    ));
}

/// Token `:text` and `:of-type`, reference `:identifier`, the meta parameters (`_tag`,
/// `_profile`, `_security`), `_summary=count`, and modifiers that need terminology rejected.
pub async fn search_modifiers_and_meta(store: &dyn ResourceStorage) {
    let ctx = random_tenant();
    let docs = [
        json!({"resourceType": "Condition", "id": "c1",
            "code": {"text": "Héart attack", "coding": [{"system": "http://snomed.info/sct", "code": "22298006", "display": "Myocardial infarction"}]},
            "subject": {"identifier": {"system": "urn:mrn", "value": "42"}},
            "meta": {"tag": [{"system": "urn:tags", "code": "vip"}], "profile": ["http://example.org/StructureDefinition/cond"],
                     "security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}]}}),
        json!({"resourceType": "Condition", "id": "c2",
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "38341003", "display": "Hypertension"}]},
            "subject": {"reference": "Patient/p"}}),
        json!({"resourceType": "Patient", "id": "p",
            "identifier": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
                            "system": "urn:mrn", "value": "42"}]}),
    ];
    put_all(store, &ctx, docs.to_vec()).await;
    let cases: &[(&str, &str, &[&str])] = &[
        ("Condition", "code:text=heart", &["c1"]),
        ("Condition", "code:text=myocardial", &["c1"]),
        ("Condition", "code:text=hyper", &["c2"]),
        ("Condition", "code:text=attack", &[]),
        (
            "Patient",
            "identifier:of-type=http://terminology.hl7.org/CodeSystem/v2-0203|MR|42",
            &["p"],
        ),
        (
            "Patient",
            "identifier:of-type=http://terminology.hl7.org/CodeSystem/v2-0203|MR|43",
            &[],
        ),
        ("Condition", "subject:identifier=urn:mrn|42", &["c1"]),
        ("Condition", "subject:identifier=urn:other|42", &[]),
        ("Condition", "_tag=urn:tags|vip", &["c1"]),
        (
            "Condition",
            "_profile=http://example.org/StructureDefinition/cond",
            &["c1"],
        ),
        ("Condition", "_security=R", &["c1"]),
        ("Condition", "_tag:missing=true", &["c2"]),
    ];
    expect_matches(store, &ctx, cases).await;
    let count = store
        .search(&ctx, &query(Some(rt("Condition")), "_summary=count"))
        .await
        .expect("summary count");
    assert_eq!((count.total, count.matches.len()), (Some(2), 0));
    for qs in [
        "code:in=http://x/vs",
        "code:below=http://snomed.info/sct|22298006",
    ] {
        let e = SearchQuery::parse(Some(rt("Condition")), qs, Handling::Lenient);
        assert!(matches!(e, Err(Error::Unsupported(_))), "{qs}: {e:?}");
    }
}

/// The body as the caller sent it, minus the fields the store owns, for comparing round trips.
fn without_store_fields(mut v: Value) -> Value {
    if let Some(meta) = v.get_mut("meta").and_then(Value::as_object_mut) {
        meta.remove("versionId");
        meta.remove("lastUpdated");
        if meta.is_empty() {
            if let Some(o) = v.as_object_mut() {
                o.remove("meta");
            }
        }
    }
    v
}

/// The official R4 clinical examples: every resource is stored under its own id and reads back
/// unchanged apart from the store's `meta`, every Bundle's entries go in as a batch, and spot
/// searches find what the files say (expected sets taken from the files, not from the store).
pub async fn r4_examples_round_trip(store: &dyn ResourceStorage) {
    let singles = random_tenant();
    let bundles = random_tenant();
    let mut failures = Vec::new();
    let mut stored = 0;
    for (file, body) in crate::fixtures::r4_examples() {
        let t = body["resourceType"].as_str().unwrap_or_default().to_owned();
        if t == "Bundle" {
            let ops: Vec<WriteOp> = body["entry"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e.get("resource").cloned())
                .filter_map(|r| {
                    let rtype = ResourceType::new(r["resourceType"].as_str()?).ok()?;
                    Some(
                        match r["id"].as_str().and_then(|i| LogicalId::new(i).ok()) {
                            Some(id) => WriteOp::Update {
                                resource_type: rtype,
                                id,
                                resource: r,
                                if_match: None,
                            },
                            None => WriteOp::Create {
                                resource_type: rtype,
                                resource: r,
                                if_none_exist: None,
                                full_url: None,
                            },
                        },
                    )
                })
                .collect();
            let n = ops.len();
            let results = store.batch(&bundles, ops).await.expect("batch runs");
            assert_eq!(results.len(), n);
            for (i, r) in results.iter().enumerate() {
                if let Err(e) = r {
                    failures.push(format!("{file} entry {i}: {e}"));
                }
            }
            continue;
        }
        let rtype = rt(&t);
        let rid = id(body["id"].as_str().expect("examples carry ids"));
        match store
            .update(&singles, rtype, &rid, body.clone(), None)
            .await
        {
            Ok(_) => {
                stored += 1;
                let back = store.read(&singles, rtype, &rid).await.expect("read back");
                if without_store_fields(back.content) != without_store_fields(body) {
                    failures.push(format!("{file}: read back differs"));
                }
            }
            Err(e) => failures.push(format!("{file}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(stored > 600, "only {stored} examples stored");

    let cases: &[(&str, &str, &[&str])] = &[
        ("Patient", "family=chalm", &["example"]),
        (
            "Patient",
            "birthdate=1974-12-25",
            &["ch-example", "example"],
        ),
        (
            "Patient",
            "gender=female",
            &[
                "animal",
                "genetics-example1",
                "infant-mom",
                "infant-twin-1",
                "mom",
                "pat4",
                "proband",
            ],
        ),
        ("Observation", "code=http://loinc.org|29463-7", &["example"]),
        (
            "Condition",
            "subject=Patient/f201",
            &["f201", "f202", "f203", "f204", "f205"],
        ),
    ];
    for (t, qs, want) in cases {
        assert_eq!(
            matching_ids(store, &singles, t, qs).await,
            *want,
            "{t}?{qs}"
        );
    }
    let by_subject = matching_ids(
        store,
        &singles,
        "Observation",
        "subject=Patient/example&_count=7",
    )
    .await;
    assert_eq!(by_subject.len(), 30, "paged 7 at a time: {by_subject:?}");
}

/// Composite parameters: every component must match values of the same element. Blood pressure
/// o1 (systolic 120, diastolic 80) and o2 (systolic 85, diastolic 130) hold the same codes and
/// values, only paired differently, so a search that paired across components would return both.
pub async fn search_composites(store: &dyn ResourceStorage) {
    let (ctx, other) = (random_tenant(), random_tenant());
    let bp = |id: &str, systolic: u32, diastolic: u32| {
        let component = |code: &str, v: u32| {
            json!({"code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                   "valueQuantity": {"value": v, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}})
        };
        json!({"resourceType": "Observation", "id": id, "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
            "component": [component("8480-6", systolic), component("8462-4", diastolic)]})
    };
    let coded = |id: &str, code: &str, value: (&str, Value)| {
        let mut o = json!({"resourceType": "Observation", "id": id, "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": code}]}});
        o[value.0] = value.1;
        o
    };
    let docs = vec![
        bp("o1", 120, 80),
        bp("o2", 85, 130),
        coded(
            "o3",
            "29463-7",
            (
                "valueQuantity",
                json!({"value": 70, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"}),
            ),
        ),
        coded("o4", "5778-6", ("valueString", json!("Positive, Straw"))),
        coded("o5", "11778-8", ("valueDateTime", json!("2020-05-01"))),
        coded(
            "o6",
            "5778-5",
            (
                "valueCodeableConcept",
                json!({"coding": [{"system": "http://snomed.info/sct", "code": "10828004"}]}),
            ),
        ),
    ];
    put_all(store, &ctx, docs.clone()).await;
    // The other tenant holds o1's pairing under every id, so any leak shows.
    let leaks = docs
        .iter()
        .map(|d| bp(d["id"].as_str().expect("id"), 120, 80))
        .collect();
    put_all(store, &other, leaks).await;
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "Observation",
            "component-code-value-quantity=http://loinc.org|8480-6$gt100",
            &["o1"],
        ),
        (
            "Observation",
            "component-code-value-quantity=8480-6$gt100",
            &["o1"],
        ),
        (
            "Observation",
            "component-code-value-quantity=http://loinc.org|8462-4$gt100",
            &["o2"],
        ),
        (
            "Observation",
            "component-code-value-quantity=http://other|8480-6$gt100",
            &[],
        ),
        (
            "Observation",
            "component-code-value-quantity=8480-6$gt100,8462-4$gt100",
            &["o1", "o2"],
        ),
        (
            "Observation",
            "component-code-value-quantity=8480-6$gt100&component-code-value-quantity=8462-4$lt90",
            &["o1"],
        ),
        (
            "Observation",
            "component-code-value-quantity=8480-6$120|http://unitsofmeasure.org|mm[Hg]",
            &["o1"],
        ),
        (
            "Observation",
            "component-code-value-quantity=8480-6$120|http://unitsofmeasure.org|kg",
            &[],
        ),
        (
            "Observation",
            "combo-code-value-quantity=29463-7$70|http://unitsofmeasure.org|kg",
            &["o3"],
        ),
        (
            "Observation",
            "combo-code-value-quantity=8462-4$ge130",
            &["o2"],
        ),
        ("Observation", "code-value-quantity=29463-7$lt60", &[]),
        ("Observation", "code-value-quantity=85354-9$gt0", &[]),
        ("Observation", "code-value-string=5778-6$pos", &["o4"]),
        ("Observation", "code-value-string=5778-6$straw", &[]),
        ("Observation", "code-value-date=11778-8$2020-05", &["o5"]),
        ("Observation", "code-value-date=11778-8$gt2021", &[]),
        (
            "Observation",
            "code-value-concept=5778-5$http://snomed.info/sct|10828004",
            &["o6"],
        ),
        ("Observation", "code-value-concept=5778-5$other", &[]),
        (
            "Observation",
            "code-value-quantity:missing=true",
            &["o1", "o2", "o4", "o5", "o6"],
        ),
    ];
    expect_matches(store, &ctx, cases).await;
}

/// The Synthea patients load as one transaction each, their `urn:uuid:` references resolved to
/// the ids the store assigned. Expected counts come from walking each Bundle's JSON here, not
/// from the store.
pub async fn synthea_transactions(store: &dyn ResourceStorage) {
    let ctx = random_tenant();
    let mut totals: std::collections::BTreeMap<String, u64> = Default::default();
    for (file, bundle) in crate::fixtures::synthea_bundles() {
        let entries = bundle["entry"].as_array().expect("entries");
        let patient_url = entries[0]["fullUrl"].as_str().expect("fullUrl").to_owned();
        let ident = &entries[0]["resource"]["identifier"][0];
        let observations_of_patient = entries
            .iter()
            .filter(|e| {
                e["resource"]["resourceType"] == "Observation"
                    && e["resource"]["subject"]["reference"] == patient_url.as_str()
            })
            .count() as u64;
        for e in entries {
            let t = e["resource"]["resourceType"].as_str().expect("type");
            *totals.entry(t.to_owned()).or_default() += 1;
        }
        let ops = fhirstore_core::bundle::write_ops(&bundle).expect("writes");
        let outcomes = store
            .transaction(&ctx, ops)
            .await
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(outcomes.len(), entries.len(), "{file}");
        let found = matching_ids(
            store,
            &ctx,
            "Patient",
            &format!(
                "identifier={}|{}",
                ident["system"].as_str().expect("system"),
                ident["value"].as_str().expect("value")
            ),
        )
        .await;
        let [pid] = found.as_slice() else {
            panic!("{file}: patient found as {found:?}")
        };
        let total = store
            .search(
                &ctx,
                &query(
                    Some(rt("Observation")),
                    &format!("subject=Patient/{pid}&_summary=count"),
                ),
            )
            .await
            .expect("count")
            .total;
        assert_eq!(total, Some(observations_of_patient), "{file}");
        let page = store
            .search(
                &ctx,
                &query(Some(rt("Observation")), &format!("patient={pid}&_count=3")),
            )
            .await
            .expect("search");
        assert!(!page.matches.is_empty(), "{file}");
        for m in &page.matches {
            assert_eq!(
                m.content["subject"]["reference"],
                format!("Patient/{pid}"),
                "{file}: reference not resolved"
            );
        }
    }
    for (t, n) in &totals {
        let got = store
            .count(&ctx, Some(rt(t)))
            .await
            .unwrap_or_else(|e| panic!("count {t}: {e}"));
        assert_eq!(got, *n, "{t}");
    }
}
