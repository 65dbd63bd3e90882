//! Create, read, update and delete: ids, versions, meta, tombstones, bad input, counts.

use super::*;

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
