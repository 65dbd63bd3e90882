//! Transactions and batches: atomicity, entry order, `urn:uuid:` and conditional references.

use super::*;

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
