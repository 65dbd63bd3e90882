//! Search: every parameter type, prefix and modifier, paging, includes, sorting,
//! composites and compartments, on hand-built data whose matches were worked out by hand.

use super::*;

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
    // Birth dates for three in four (the rest sort last), spread so that later writes land
    // before and after any page's cursor.
    let body = |n: usize, family: &str| {
        let mut b = patient_body(None, family);
        if n % 4 != 0 {
            b["birthDate"] = json!(format!("19{:02}-0{}-15", (n * 37) % 100, 1 + n % 9));
        }
        b
    };
    let mut ids = Vec::new();
    for i in 0..23 {
        let w = store
            .create(&ctx, patient(), body(i, &format!("P{i:02}")))
            .await
            .expect("seed");
        want.insert(w.resource.key.id.to_string());
        ids.push(w.resource.key.id.clone());
    }
    // Each walk writes a new match between pages, and rewrites an existing one without moving
    // its sort keys: the new one may or may not appear, but nothing repeats and nothing that
    // existed before is skipped, in key order and in sorted orders walked both ways along a
    // date index (keyset cursors, not offsets).
    for qs in [
        "_count=5&_total=accurate",
        "_count=5&_sort=family&_total=estimate",
        "_count=4&_sort=-_lastUpdated,family&_total=accurate",
        "_count=6&_sort=-family,_id",
        "_count=5&_sort=birthdate",
        "_count=5&_sort=-birthdate",
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
                    body(want.len(), &format!("Late{}", want.len())),
                )
                .await
                .expect("write between pages");
            want.insert(late.resource.key.id.to_string());
            // The same name and birth date, a new version (which moves `_lastUpdated`).
            let n = seen.len() % ids.len();
            let mut same = body(n, &format!("P{n:02}"));
            same["id"] = json!(ids[n].as_str());
            same["active"] = json!(seen.len() % 2 == 0);
            if !qs.contains("_lastUpdated") {
                store
                    .update(&ctx, patient(), &ids[n], same, None)
                    .await
                    .expect("rewrite between pages");
            }
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
                   "subject": {"reference": "Patient/p2"},
                   "performer": {"reference": "http://other.org/fhir/Practitioner/gp9"}, "prediction": [{"probabilityDecimal": 0.8}]}),
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
        (
            "RiskAssessment",
            "performer=http://other.org/fhir/Practitioner/gp9",
            &["ra2"],
        ),
        (
            "RiskAssessment",
            "performer=http://other.org/fhir/Practitioner/gp1",
            &[],
        ),
        (
            "Patient",
            "general-practitioner=http://x.org/Practitioner/gp1",
            &[],
        ),
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
        // combo-* cover the Observation and each of its components, as one parameter.
        ("Observation", "combo-code=8480-6", &["o1", "o2"]),
        (
            "Observation",
            "combo-code=29463-7,85354-9",
            &["o1", "o2", "o3"],
        ),
        ("Observation", "combo-value-quantity=gt100", &["o1", "o2"]),
        (
            "Observation",
            "combo-value-quantity=lt90",
            &["o1", "o2", "o3"],
        ),
        ("Observation", "combo-value-concept=10828004", &["o6"]),
        (
            "Observation",
            "combo-code-value-quantity=8480-6$gt100",
            &["o1"],
        ),
        (
            "Observation",
            "combo-code-value-quantity=8462-4$gt100&combo-code=8480-6",
            &["o2"],
        ),
        (
            "Observation",
            "combo-value-quantity:missing=true",
            &["o4", "o5", "o6"],
        ),
        (
            "Observation",
            "combo-code:missing=false&combo-code:not=8480-6",
            &["o3", "o4", "o5", "o6"],
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

/// `_summary=count` and `_total=accurate` agree with the matches paged through, whatever the
/// criteria: several index rows of one resource for a parameter (two names), deleted
/// resources, a value an update took away, another tenant holding the same data, negations,
/// and criteria that only the resources can answer (`_id`, date ranges).
pub async fn counts_agree_with_the_matches(store: &dyn ResourceStorage) {
    let (ctx, other) = (random_tenant(), random_tenant());
    for i in 0..24u32 {
        let key = format!("c{i}");
        let body = json!({
            "resourceType": "Patient",
            "id": key,
            "gender": if i % 3 == 0 { "male" } else { "female" },
            "birthDate": format!("19{}-01-01", 50 + i),
            "name": [
                {"family": "Counted", "given": ["Ann"]},
                // A second row of the same resource that `family=Counted` (a prefix) matches.
                {"family": if i % 2 == 0 { "Countedson" } else { "Other" }}
            ]
        });
        for tenant in [&ctx, &other] {
            store
                .update(tenant, patient(), &id(&key), body.clone(), None)
                .await
                .expect("seed");
        }
    }
    for gone in ["c1", "c2", "c3"] {
        store
            .delete(&ctx, patient(), &id(gone))
            .await
            .expect("delete");
    }
    let renamed = json!({"resourceType": "Patient", "id": "c4", "gender": "male",
        "name": [{"family": "Renamed"}]});
    store
        .update(&ctx, patient(), &id("c4"), renamed, None)
        .await
        .expect("rename");
    let ctx = &ctx;
    let count = |qs: String| async move {
        store
            .search(ctx, &query(Some(patient()), &qs))
            .await
            .expect("count")
            .total
    };
    // 24 seeded, 3 deleted, 1 renamed: an anchor no shared mistake of both paths can move.
    assert_eq!(
        count("family=Counted&_summary=count".to_owned()).await,
        Some(20)
    );
    for qs in [
        "family=Counted",
        "gender=female",
        "family=Counted&gender=female",
        "family=counted&gender=male&given=Ann",
        "gender=female&birthdate=ge1960",
        "family=Counted&_id=c0,c3,c5,c6",
        "gender:not=male&family=Counted",
        "family:missing=false&gender=male",
    ] {
        let mut seen = Vec::new();
        let mut q = query(Some(patient()), &format!("{qs}&_count=5"));
        loop {
            let page = store.search(ctx, &q).await.expect(qs);
            seen.extend(page.matches.iter().map(|m| m.key.id.to_string()));
            match page.next_cursor {
                Some(c) => q.cursor = Some(c),
                None => break,
            }
        }
        let want = Some(seen.len() as u64);
        assert_eq!(
            count(format!("{qs}&_summary=count")).await,
            want,
            "{qs}: _summary=count, the matches being {seen:?}"
        );
        assert_eq!(
            count(format!("{qs}&_total=accurate&_count=2")).await,
            want,
            "{qs}: _total=accurate"
        );
    }
}
