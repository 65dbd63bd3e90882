//! The official R4 examples and the Synthea patients, stored and read back.

use super::*;

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
