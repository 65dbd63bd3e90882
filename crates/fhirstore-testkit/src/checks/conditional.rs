//! Conditional create, update and delete.

use super::*;

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
