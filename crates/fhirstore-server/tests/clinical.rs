//! Clinical access over HTTP: compartment searches and `$everything`, under two tenants that
//! share ids.

mod support;

use std::collections::{BTreeMap, BTreeSet};

use axum::http::StatusCode;
use serde_json::{json, Value};
use support::{open_server, Srv};

/// Writes `resources` in transactions of 200 entries under `tenant`.
async fn put_all(s: &Srv, tenant: &str, resources: Vec<Value>) {
    for chunk in resources.chunks(200) {
        let entries: Vec<Value> = chunk
            .iter()
            .map(|r| {
                let url = format!(
                    "{}/{}",
                    r["resourceType"].as_str().unwrap_or(""),
                    r["id"].as_str().unwrap_or("")
                );
                json!({"resource": r, "request": {"method": "PUT", "url": url}})
            })
            .collect();
        let r = s
            .post(
                &format!("/fhir/{tenant}"),
                &json!({"resourceType": "Bundle", "type": "transaction", "entry": entries}),
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&r.body)
        );
    }
}

fn obs(id: &str, subject: &str, code: &str, extra: Value) -> Value {
    let mut o = json!({"resourceType": "Observation", "id": id, "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": subject}});
    if let (Some(o), Some(extra)) = (o.as_object_mut(), extra.as_object()) {
        o.extend(extra.clone());
    }
    o
}

/// Every page of a searchset from `uri`, following `next`: (mode, `Type/id`) per entry.
async fn all_entries(s: &Srv, uri: &str) -> Vec<(String, String)> {
    s.all_entries(uri)
        .await
        .into_iter()
        .map(|(mode, r)| {
            let key = format!(
                "{}/{}",
                r["resourceType"].as_str().unwrap_or(""),
                r["id"].as_str().unwrap_or("")
            );
            (mode, key)
        })
        .collect()
}

fn matches(entries: &[(String, String)]) -> Vec<String> {
    entries
        .iter()
        .filter(|(m, _)| m == "match")
        .map(|(_, k)| k.clone())
        .collect()
}

/// `Patient/p1/Observation?…` answers what `Observation?…` answers for the compartment's
/// parameters, with every search feature; `Patient/p1/*` the whole compartment; a type that
/// is never in it is a 400, a type without a compartment a 404; tenants never mix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compartment_searches() {
    let s = open_server().await;
    for (tenant, family) in [("t", "Tee"), ("u", "You")] {
        let mut data = vec![
            json!({"resourceType": "Patient", "id": "p1", "name": [{"family": family}]}),
            json!({"resourceType": "Patient", "id": "p2", "name": [{"family": "Two"}]}),
            json!({"resourceType": "Organization", "id": "org1", "name": "Clinic"}),
            json!({"resourceType": "Encounter", "id": "e1", "status": "finished",
                   "class": {"code": "AMB"}, "subject": {"reference": "Patient/p1"},
                   "serviceProvider": {"reference": "Organization/org1"}}),
            json!({"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"}}),
            obs("o2", "Patient/p2", "x", json!({})),
            obs(
                "o3",
                "Patient/p2",
                "x",
                json!({"performer": [{"reference": "Patient/p1"}]}),
            ),
        ];
        if tenant == "t" {
            for i in 0..5 {
                data.push(obs(
                    &format!("t{i}"),
                    "Patient/p1",
                    if i % 2 == 0 { "x" } else { "y" },
                    json!({"effectiveDateTime": format!("2020-0{}-01", i + 1),
                           "encounter": {"reference": "Encounter/e1"}}),
                ));
            }
        } else {
            data.push(obs("u0", "Patient/p1", "x", json!({})));
        }
        put_all(&s, tenant, data).await;
    }
    let set = |v: Vec<String>| v.into_iter().collect::<BTreeSet<_>>();
    let ids = |keys: &[&str]| keys.iter().map(|k| k.to_string()).collect::<BTreeSet<_>>();

    let x = matches(&all_entries(&s, "/fhir/t/Patient/p1/Observation?code=x").await);
    assert_eq!(
        set(x),
        ids(&[
            "Observation/t0",
            "Observation/t2",
            "Observation/t4",
            "Observation/o3"
        ])
    );
    // The same as the searches by each compartment parameter.
    let mut by_params = set(matches(
        &all_entries(&s, "/fhir/t/Observation?code=x&subject=Patient/p1").await,
    ));
    by_params.extend(matches(
        &all_entries(&s, "/fhir/t/Observation?code=x&performer=Patient/p1").await,
    ));
    assert_eq!(
        set(matches(
            &all_entries(&s, "/fhir/t/Patient/p1/Observation?code=x").await
        )),
        by_params
    );
    // Sort, paging, total and include work within it.
    let sorted = all_entries(
        &s,
        "/fhir/t/Patient/p1/Observation?_sort=-date&_count=2&_include=Observation:encounter",
    )
    .await;
    assert_eq!(
        matches(&sorted)[..3],
        ["Observation/t4", "Observation/t3", "Observation/t2"]
    );
    assert!(sorted
        .iter()
        .any(|(m, k)| m == "include" && k == "Encounter/e1"));
    let total = s
        .get("/fhir/t/Patient/p1/Observation?_total=accurate&_count=1")
        .await
        .json();
    assert_eq!(total["total"], 6);
    // The whole compartment: the patient, its Encounter, Condition and Observations.
    let whole = set(matches(
        &all_entries(&s, "/fhir/t/Patient/p1/*?_count=3").await,
    ));
    let mut want = ids(&[
        "Patient/p1",
        "Encounter/e1",
        "Condition/c1",
        "Observation/o3",
    ]);
    want.extend((0..5).map(|i| format!("Observation/t{i}")));
    assert_eq!(whole, want);
    // Tenant u: the same ids, its own data only.
    let u = set(matches(
        &all_entries(&s, "/fhir/u/Patient/p1/Observation").await,
    ));
    assert_eq!(u, ids(&["Observation/u0", "Observation/o3"]));
    let r = s.get("/fhir/t/Patient/p1/Organization").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&r.body).contains("Organization"));
    assert_eq!(
        s.get("/fhir/t/Observation/o2/Patient").await.status,
        StatusCode::NOT_FOUND
    );
    let caps = s.get("/fhir/t/metadata").await.json();
    let compartments = caps["rest"][0]["compartment"].to_string();
    assert!(
        compartments.contains("CompartmentDefinition/patient"),
        "{compartments}"
    );
}

/// `Patient/[id]/$everything` over a record of thousands of resources pages to its end with
/// every member exactly once, the patient first, and the resources they reference included;
/// `_type`, `_since` and `_count` narrow it; another tenant's patient of the same id has its
/// own record only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_pages_a_whole_record() {
    let s = open_server().await;
    let mut data = vec![
        json!({"resourceType": "Patient", "id": "big", "name": [{"family": "Large"}]}),
        json!({"resourceType": "Practitioner", "id": "doc", "name": [{"family": "Doc"}]}),
        json!({"resourceType": "Medication", "id": "med",
               "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "1"}]}}),
        json!({"resourceType": "MedicationRequest", "id": "mr", "status": "active",
               "intent": "order", "subject": {"reference": "Patient/big"},
               "medicationReference": {"reference": "Medication/med"}}),
    ];
    for i in 0..40 {
        data.push(json!({"resourceType": "Encounter", "id": format!("e{i}"),
            "status": "finished", "class": {"code": "AMB"},
            "subject": {"reference": "Patient/big"}}));
    }
    for i in 0..1_500 {
        data.push(obs(
            &format!("o{i:04}"),
            "Patient/big",
            "8867-4",
            json!({"performer": [{"reference": "Practitioner/doc"}],
                   "encounter": {"reference": format!("Encounter/e{}", i % 40)}}),
        ));
    }
    put_all(&s, "t", data).await;
    put_all(
        &s,
        "u",
        vec![
            json!({"resourceType": "Patient", "id": "big", "name": [{"family": "Other"}]}),
            obs("other", "Patient/big", "x", json!({})),
        ],
    )
    .await;

    let entries = all_entries(&s, "/fhir/t/Patient/big/$everything?_count=100").await;
    let found = matches(&entries);
    assert_eq!(found.first().map(String::as_str), Some("Patient/big"));
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for k in &found {
        *counts.entry(k.as_str()).or_default() += 1;
    }
    assert!(counts.values().all(|n| *n == 1), "a member came twice");
    assert_eq!(found.len(), 1 + 40 + 1_500 + 1, "every member once");
    let included: BTreeSet<&str> = entries
        .iter()
        .filter(|(m, _)| m == "include")
        .map(|(_, k)| k.as_str())
        .collect();
    assert!(included.contains("Practitioner/doc"), "{included:?}");
    assert!(included.contains("Medication/med"), "{included:?}");
    assert!(!found.iter().any(|k| k == "Observation/other"));

    let encounters =
        matches(&all_entries(&s, "/fhir/t/Patient/big/$everything?_type=Encounter").await);
    assert_eq!(encounters.len(), 40);
    assert!(encounters.iter().all(|k| k.starts_with("Encounter/")));
    let later = all_entries(
        &s,
        "/fhir/t/Patient/big/$everything?_since=2999-01-01T00:00:00Z",
    )
    .await;
    assert!(matches(&later).is_empty());
    let other = matches(&all_entries(&s, "/fhir/u/Patient/big/$everything").await);
    assert_eq!(
        other.into_iter().collect::<BTreeSet<_>>(),
        ["Observation/other", "Patient/big"]
            .iter()
            .map(|k| k.to_string())
            .collect()
    );
    assert_eq!(
        s.get("/fhir/t/Patient/nobody/$everything").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        s.get("/fhir/t/Patient/big/$everything?_cursor=99:x")
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    // Encounter $everything: the encounter and what points at it.
    let enc = matches(&all_entries(&s, "/fhir/t/Encounter/e1/$everything").await);
    assert_eq!(enc.first().map(String::as_str), Some("Encounter/e1"));
    assert_eq!(enc.len(), 1 + (0..1_500).filter(|i| i % 40 == 1).count());
}

/// `GET [base]?_type=…` searches those types only (one type: with that type's parameters);
/// a transaction's conditional reference that matches nothing is a 412 naming the entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_search_by_type_and_conditional_references() {
    let s = open_server().await;
    put_all(
        &s,
        "t",
        vec![
            json!({"resourceType": "Patient", "id": "p1", "name": [{"family": "Typed"}],
                   "identifier": [{"system": "urn:mrn", "value": "42"}]}),
            obs("o1", "Patient/p1", "x", json!({})),
            json!({"resourceType": "Organization", "id": "org", "name": "Clinic"}),
        ],
    )
    .await;
    let keys = |e: Vec<(String, String)>| -> BTreeSet<String> { matches(&e).into_iter().collect() };
    assert_eq!(
        keys(all_entries(&s, "/fhir/t?_type=Patient,Observation").await),
        ["Observation/o1", "Patient/p1"]
            .iter()
            .map(|k| k.to_string())
            .collect()
    );
    assert_eq!(
        keys(all_entries(&s, "/fhir/t?_type=Patient&family=typ").await),
        ["Patient/p1".to_string()].into_iter().collect()
    );
    assert_eq!(
        s.get("/fhir/t?_type=Nope").await.status,
        StatusCode::BAD_REQUEST
    );

    let tx = |reference: &str| {
        json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": {"resourceType": "Organization", "name": "Side"},
             "request": {"method": "POST", "url": "Organization"}},
            {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "y"},
                          "subject": {"reference": reference}},
             "request": {"method": "POST", "url": "Observation"}}]})
    };
    let r = s
        .post("/fhir/t", &tx("Patient?identifier=urn:mrn|42"))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let created = &r.json()["entry"][1]["resource"];
    assert_eq!(created["subject"]["reference"], "Patient/p1");
    let r = s
        .post("/fhir/t", &tx("Patient?identifier=urn:mrn|nobody"))
        .await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    let text = String::from_utf8_lossy(&r.body);
    assert!(
        text.contains("entry 1") && text.contains("matches no resource"),
        "{text}"
    );
}

/// A Binary is written and read in its own media type (R4 binary.html); other types keep
/// answering 406 for a media type that is not FHIR JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binaries_in_their_own_media_type() {
    use axum::body::Body;
    use axum::http::Method;
    let s = open_server().await;
    let pdf: &[u8] = b"%PDF-1.4\n\x00\xff binary \x01 bytes";
    let r = s
        .call(
            Method::POST,
            "/fhir/t/Binary",
            &[("content-type", "application/pdf")],
            pdf.to_vec(),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let location = r.header("location").expect("location").to_owned();
    let id = location.split('/').nth_back(2).expect("id").to_owned();
    let raw = s
        .call(
            Method::GET,
            &format!("/fhir/t/Binary/{id}"),
            &[("accept", "application/pdf")],
            Body::empty(),
        )
        .await;
    assert_eq!(raw.status, StatusCode::OK);
    assert_eq!(raw.header("content-type"), Some("application/pdf"));
    assert_eq!(raw.body, pdf);
    let resource = s.get(&format!("/fhir/t/Binary/{id}")).await.json();
    assert_eq!(resource["resourceType"], "Binary");
    assert_eq!(resource["contentType"], "application/pdf");
    let r = s
        .call(
            Method::PUT,
            "/fhir/t/Binary/b1",
            &[("content-type", "image/png")],
            b"\x89PNG".to_vec(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let missing = s
        .call(
            Method::GET,
            "/fhir/t/Binary/none",
            &[("accept", "application/pdf")],
            Body::empty(),
        )
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let other = s
        .call(
            Method::GET,
            "/fhir/t/Patient/x",
            &[("accept", "application/pdf")],
            Body::empty(),
        )
        .await;
    assert_eq!(other.status, StatusCode::NOT_ACCEPTABLE);
    // `near` has no search behind it, so it is not advertised.
    let caps = s.get("/fhir/t/metadata").await.json();
    let location = caps["rest"][0]["resource"]
        .as_array()
        .expect("resources")
        .iter()
        .find(|r| r["type"] == "Location")
        .expect("Location")
        .to_string();
    assert!(!location.contains("\"near\""), "{location}");
}

/// `_summary=true|text|data|false` on reads and searches, from the definitions' `isSummary`
/// flags and mandatory elements, tagged `SUBSETTED` when cut down; `_elements` still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summary_modes_follow_the_definitions() {
    let s = open_server().await;
    let text = json!({"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">x</div>"});
    put_all(
        &s,
        "t",
        vec![
            json!({"resourceType": "Patient", "id": "p", "text": text, "gender": "female",
                   "name": [{"family": "Summary"}], "maritalStatus": {"text": "single"},
                   "contact": [{"name": {"family": "Kin"}}], "deceasedBoolean": false}),
            obs(
                "o",
                "Patient/p",
                "x",
                json!({"text": text, "valueQuantity": {"value": 1}}),
            ),
        ],
    )
    .await;
    let keys = |v: &Value| -> BTreeSet<String> {
        v.as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };
    let subsetted = |v: &Value| v["meta"]["tag"].to_string().contains("SUBSETTED");
    let set = |k: &[&str]| k.iter().map(|k| k.to_string()).collect::<BTreeSet<_>>();

    let p = s.get("/fhir/t/Patient/p?_summary=true").await.json();
    assert_eq!(
        keys(&p),
        set(&[
            "resourceType",
            "id",
            "meta",
            "gender",
            "name",
            "deceasedBoolean"
        ])
    );
    assert!(subsetted(&p));
    let p = s.get("/fhir/t/Patient/p?_summary=text").await.json();
    assert_eq!(keys(&p), set(&["resourceType", "id", "meta", "text"]));
    let o = s.get("/fhir/t/Observation/o?_summary=text").await.json();
    assert_eq!(
        keys(&o),
        set(&["resourceType", "id", "meta", "text", "status", "code"])
    );
    let o = s.get("/fhir/t/Observation/o?_summary=data").await.json();
    assert!(!keys(&o).contains("text") && keys(&o).contains("valueQuantity"));
    let p = s.get("/fhir/t/Patient/p?_summary=false").await.json();
    assert!(keys(&p).contains("contact") && !subsetted(&p));
    let b = s.get("/fhir/t/Patient?_summary=true").await.json();
    let entry = &b["entry"][0]["resource"];
    assert!(!keys(entry).contains("contact") && subsetted(entry));
    let p = s.get("/fhir/t/Patient/p?_elements=gender").await.json();
    assert_eq!(keys(&p), set(&["resourceType", "id", "meta", "gender"]));
}
