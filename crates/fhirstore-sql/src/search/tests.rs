//! Snapshot tests of the planned SQL, per dialect: a planner change shows its SQL diff in
//! review. `cargo insta review` (or `INSTA_UPDATE=always cargo test -p fhirstore-sql`) accepts
//! a deliberate change; the snapshots live in `src/search/snapshots/`.
//!
//! Every criterion type and modifier, chains, `_has`, compartments, `_type`, includes, sorts and
//! both cursor shapes are planned here for SQLite and PostgreSQL.

use fhirstore_core::compartment::CompartmentScope;
use fhirstore_core::search::{Handling, SearchQuery};
use fhirstore_core::{LogicalId, ResourceKey, ResourceType, TenantId};

use super::{Bind, KeyValue, Sql, Strategy};
use crate::Syntax;

/// A fixed "now", for `ap` and anything relative to the present.
const NOW: i64 = 1_700_000_000_000_000;

fn tenant() -> TenantId {
    TenantId::new("t1").expect("tenant")
}

fn rt(t: &str) -> ResourceType {
    ResourceType::new(t).expect("type")
}

fn query(t: Option<&str>, qs: &str) -> SearchQuery {
    SearchQuery::parse(t.map(rt), qs, Handling::Strict).expect(qs)
}

/// The statement, one clause per line and indented by nesting, then its binds: a diff shows
/// which clause of which subquery changed.
fn render(sql: &Sql) -> String {
    const BREAKS: [&str; 8] = [
        " FROM ",
        " WHERE ",
        " AND ",
        " OR ",
        " ORDER BY ",
        " LIMIT ",
        " JOIN ",
        " CROSS JOIN ",
    ];
    let text = sql.text();
    let mut out = String::new();
    let mut depth = 0usize;
    let mut quote: Option<char> = None;
    let mut i = 0;
    while i < text.len() {
        let rest = &text[i..];
        let c = rest.chars().next().unwrap_or(' ');
        if let Some(q) = quote {
            quote = (c != q).then_some(q);
        } else if c == '\'' || c == '"' {
            quote = Some(c);
        } else if c == '(' {
            depth += 1;
        } else if c == ')' {
            depth = depth.saturating_sub(1);
        } else if let Some(b) = BREAKS.iter().find(|b| rest.starts_with(**b)) {
            out.push('\n');
            out.push_str(&"  ".repeat(depth));
            out.push_str(&b[1..]);
            i += b.len();
            continue;
        }
        out.push(c);
        i += c.len_utf8();
    }
    out.push_str("\n--");
    for (n, b) in sql.binds().iter().enumerate() {
        let v = match b {
            Bind::Text(t) => format!("{t:?}"),
            Bind::Int(n) => n.to_string(),
            Bind::Real(x) => format!("{x:?}"),
            other => format!("{other:?}"),
        };
        out.push_str(&format!("\n-- {} = {v}", n + 1));
    }
    out
}

/// A search page's statement for `qs` over `t` (all types when `None`).
fn page(dialect: Syntax, t: Option<&str>, qs: &str) -> String {
    let q = query(t, qs);
    render(
        &super::page(dialect, &tenant(), &q, NOW, Strategy::Gather)
            .expect(qs)
            .sql
            .expect("statement"),
    )
}

/// The searches whose page statements are snapshotted: (name, type, query string).
const PAGES: &[(&str, Option<&str>, &str)] = &[
    // Tokens.
    ("token", Some("Patient"), "gender=female"),
    (
        "token_system_code",
        Some("Patient"),
        "identifier=http://sys|123",
    ),
    (
        "token_system_only",
        Some("Patient"),
        "identifier=http://sys|",
    ),
    ("token_no_system", Some("Patient"), "identifier=|123"),
    ("token_many_codes", Some("Observation"), "code=a,b,c"),
    ("token_not", Some("Patient"), "gender:not=male"),
    ("token_text", Some("Observation"), "code:text=heart"),
    (
        "token_of_type",
        Some("Patient"),
        "identifier:of-type=http://t|MR|123",
    ),
    // Strings.
    ("string_starts_with", Some("Patient"), "family=Smi"),
    ("string_exact", Some("Patient"), "family:exact=Smith"),
    ("string_contains", Some("Patient"), "family:contains=m%t_h"),
    ("string_or", Some("Patient"), "family=Smith,Jones"),
    // Dates, every prefix.
    ("date_eq", Some("Patient"), "birthdate=1970"),
    ("date_ne", Some("Patient"), "birthdate=ne1970-01-01"),
    ("date_gt", Some("Patient"), "birthdate=gt1970-01-01"),
    ("date_lt", Some("Patient"), "birthdate=lt1970-01-01"),
    ("date_ge", Some("Patient"), "birthdate=ge1970-01-01"),
    ("date_le", Some("Patient"), "birthdate=le1970-01-01"),
    ("date_sa", Some("Patient"), "birthdate=sa1970-01-01"),
    ("date_eb", Some("Patient"), "birthdate=eb1970-01-01"),
    ("date_ap", Some("Patient"), "birthdate=ap1970-01-01"),
    (
        "date_range_and",
        Some("Observation"),
        "date=ge2020&date=lt2021",
    ),
    // Numbers and quantities.
    ("number_eq", Some("RiskAssessment"), "probability=0.8"),
    ("number_gt", Some("RiskAssessment"), "probability=gt0.8"),
    ("number_ap", Some("RiskAssessment"), "probability=ap0.8"),
    (
        "quantity_system_code",
        Some("Observation"),
        "value-quantity=5.4|http://unitsofmeasure.org|mg",
    ),
    (
        "quantity_code_only",
        Some("Observation"),
        "value-quantity=5.4||mg",
    ),
    (
        "quantity_number_only",
        Some("Observation"),
        "value-quantity=le5.4",
    ),
    // References.
    ("reference_local", Some("Observation"), "subject=Patient/p1"),
    (
        "reference_typed_modifier",
        Some("Observation"),
        "subject:Patient=p1",
    ),
    ("reference_id_only", Some("Observation"), "subject=p1"),
    (
        "reference_url",
        Some("Observation"),
        "subject=http://other/fhir/Patient/p1",
    ),
    (
        "reference_identifier",
        Some("Observation"),
        "subject:identifier=http://mrn|42",
    ),
    (
        "reference_canonical_version",
        Some("QuestionnaireResponse"),
        "questionnaire=http://q/Questionnaire/x|1.0",
    ),
    // Uris.
    ("uri_eq", Some("ValueSet"), "url=http://x.org/vs"),
    ("uri_below", Some("ValueSet"), "url:below=http://x.org/"),
    (
        "uri_above",
        Some("ValueSet"),
        "url:above=http://x.org/vs/a/b",
    ),
    // Missing.
    ("missing_true", Some("Patient"), "birthdate:missing=true"),
    ("missing_false", Some("Patient"), "birthdate:missing=false"),
    ("missing_id", Some("Patient"), "_id:missing=false"),
    // Composites.
    (
        "composite",
        Some("Observation"),
        "code-value-quantity=http://loinc.org|8480-6$gt100",
    ),
    // Rows shared with other parameters: the parts' rows are read instead.
    (
        "shared_composite",
        Some("Observation"),
        "combo-code-value-quantity=8480-6$gt100",
    ),
    (
        "shared_token_text",
        Some("Observation"),
        "combo-code:text=blood",
    ),
    (
        "shared_sort",
        Some("Observation"),
        "_sort=combo-value-quantity",
    ),
    (
        "shared_untyped_chain",
        Some("Observation"),
        "has-member.combo-code=x",
    ),
    // The resources table's own columns.
    ("id", Some("Patient"), "_id=a,b"),
    ("last_updated", Some("Patient"), "_lastUpdated=gt2020-01-01"),
    (
        "last_updated_eq",
        Some("Patient"),
        "_lastUpdated=2020-01-01",
    ),
    // Chains and _has.
    ("chain", Some("Observation"), "subject:Patient.name=peter"),
    (
        "chain_two_links",
        Some("Observation"),
        "subject:Patient.organization.name=acme",
    ),
    (
        "has",
        Some("Patient"),
        "_has:Observation:patient:code=1234-5",
    ),
    (
        "has_nested",
        Some("Patient"),
        "_has:Observation:patient:_has:AuditEvent:entity:agent=Practitioner/x",
    ),
    // Several criteria, system-wide searches.
    // Several selective criteria (intersected into one id set on PostgreSQL), a negated one
    // and `_id`, which stay apart.
    (
        "selective_criteria_with_not",
        Some("Patient"),
        "family=smith&gender=female&identifier:not=http://sys|1&_id=p1,p2&address-city=x",
    ),
    (
        "and_of_criteria",
        Some("Patient"),
        "family=Smith&gender=female&birthdate=ge1970",
    ),
    ("system", None, "_id=a"),
    (
        "system_types",
        None,
        "_type=Patient,Observation&_lastUpdated=gt2020",
    ),
    // Sorts.
    ("sort_string", Some("Patient"), "_sort=family"),
    ("sort_date_desc", Some("Observation"), "code=x&_sort=-date"),
    ("sort_native", Some("Patient"), "_sort=_lastUpdated,-_id"),
    ("sort_quantity", Some("Observation"), "_sort=value-quantity"),
    ("sort_reference", Some("Observation"), "_sort=subject"),
    ("sort_token", Some("Patient"), "_sort=-gender"),
    ("count", Some("Patient"), "gender=female&_count=7"),
];

fn plans(dialect: Syntax) {
    let name = match dialect {
        Syntax::Sqlite => "sqlite",
        Syntax::Postgres => "postgres",
    };
    let snap = |case: &str, body: String| {
        insta::assert_snapshot!(format!("{name}__{case}"), body);
    };
    for (case, t, qs) in PAGES {
        snap(case, page(dialect, *t, qs));
    }
    let t = tenant();
    // The strategies the store picks from the criteria's counts (see `Strategy`).
    let strategy = |case: &str, ty: &str, qs: &str, strategy: Strategy| {
        let q = query(Some(ty), qs);
        let plan = super::page(dialect, &t, &q, NOW, strategy).expect(qs);
        snap(case, render(&plan.sql.expect("statement")));
    };
    strategy("walk_by_id", "Patient", "gender=female", Strategy::Walk);
    strategy(
        "walk_sorted",
        "Observation",
        "code=http://loinc.org|8867-4&_sort=-date",
        Strategy::Walk,
    );
    strategy(
        "walk_sorted_string",
        "Patient",
        "_sort=family",
        Strategy::Walk,
    );
    strategy(
        "drive_smallest",
        "Observation",
        "code=http://loinc.org|8867-4&subject=Patient/p1&_sort=-date",
        Strategy::Drive(1),
    );
    // Chains checked per resource while walking: `_has` through the references pointing at
    // each Patient, a forward chain through each Observation's own.
    strategy(
        "has_walks",
        "Patient",
        "_has:Condition:subject:code=44054006&_count=20",
        Strategy::Walk,
    );
    strategy(
        "chain_probed_beside_a_driver",
        "Observation",
        "subject:Patient.identifier=urn:x|1&code=8867-4",
        Strategy::Drive(1),
    );
    let chained = query(Some("Observation"), "code=x&subject:Patient.name=smith");
    let sets = super::chain_sets(dialect, &t, &chained, NOW).expect("chains");
    assert_eq!(sets.len(), 1);
    assert_eq!(sets[0].0, 1, "counted by the chain's position");
    assert!(
        sets[0]
            .1
            .text()
            .starts_with("SELECT h1.id FROM search_reference h1"),
        "{}",
        sets[0].1.text()
    );
    // Two criteria bounding one date parameter's rows: one index range, with the longest
    // span read in the statement, and every resource with a row when some has two.
    strategy(
        "range_drives",
        "Patient",
        "birthdate=ge1980-01-01&birthdate=lt1981-01-01&gender=female",
        Strategy::Range(0),
    );
    let year = query(Some("Patient"), "birthdate=1980&_sort=-birthdate");
    let sets = super::range_sets(dialect, &t, &year, NOW).expect("ranges");
    assert_eq!(sets.len(), 1, "an eq date bounds its rows on both sides");
    assert_eq!(sets[0].0, vec![0]);
    snap("range_one_criterion", render(&sets[0].1));
    // ne, :missing, a chain and one open side bound nothing.
    for open in [
        "birthdate=ne1980",
        "birthdate=ge1980",
        "birthdate:missing=true",
        "link:Patient.birthdate=1980",
        "birthdate=ge1980&death-date=lt1990",
    ] {
        let q = query(Some("Patient"), open);
        let sets = super::range_sets(dialect, &t, &q, NOW).expect("ranges");
        assert!(sets.is_empty(), "{open}: {}", sets.len());
    }
    // A split search's id set: one bound list, driving when it is the smallest set.
    let mut among = query(Some("Patient"), "gender=female&_sort=birthdate");
    among.among = Some(
        ["p1", "p2"]
            .map(|i| LogicalId::new(i).expect("id"))
            .as_slice()
            .into(),
    );
    let plan = super::page(dialect, &t, &among, NOW, Strategy::Among).expect("among");
    snap("among_drives", render(&plan.sql.expect("statement")));
    let count = super::count(dialect, &t, &among, NOW).expect("count");
    snap("among_count", render(&count));
    let mut q = query(Some("Observation"), "code=x&_sort=date");
    let key = ResourceKey::new(rt("Observation"), LogicalId::new("o9").expect("id"));
    q.cursor = Some(super::sorted_cursor(&[KeyValue::Int(5)], &key));
    let plan = super::page(dialect, &t, &q, NOW, Strategy::Walk).expect("walk");
    snap("walk_cursor", render(&plan.sql.expect("statement")));
    assert_eq!(plan.then_missing, Some(None));
    // A cursor among the resources without a value: only those remain.
    q.cursor = Some(super::sorted_cursor(&[KeyValue::Int(i64::MAX)], &key));
    let plan = super::page(dialect, &t, &q, NOW, Strategy::Walk).expect("walk");
    assert!(plan.sql.is_none());
    let after = plan.then_missing.flatten();
    assert_eq!(after.as_ref().map(|i| i.as_str()), Some("o9"));
    snap(
        "walk_missing",
        render(&super::missing_page(dialect, &t, &q, NOW, after.as_ref(), 3).expect("missing")),
    );
    let q = query(
        Some("Observation"),
        "code=x&subject=Patient/p1&subject:Patient.name=y&date=ge2020",
    );
    let (sql, which) = super::selectivity(dialect, &t, &q, NOW, 1000)
        .expect("probe")
        .expect("index criteria");
    assert_eq!(which, [0, 1], "chains and ranges are not counted");
    snap("selectivity", render(&sql));
    // Cursors: after a key, and after a sorted key with its values.
    let mut q = query(Some("Patient"), "gender=female");
    q.cursor = Some(crate::search_cursor("Patient", "p5"));
    snap(
        "cursor",
        render(
            &super::page(dialect, &t, &q, NOW, Strategy::Gather)
                .expect("page")
                .sql
                .expect("statement"),
        ),
    );
    let mut q = query(Some("Observation"), "_sort=-date,subject");
    let key = ResourceKey::new(rt("Observation"), LogicalId::new("o9").expect("id"));
    q.cursor = Some(super::sorted_cursor(
        &[KeyValue::Int(5), KeyValue::Text("p1".into())],
        &key,
    ));
    snap(
        "cursor_sorted",
        render(
            &super::page(dialect, &t, &q, NOW, Strategy::Gather)
                .expect("page")
                .sql
                .expect("statement"),
        ),
    );
    // Compartments: one type, and every member type.
    let mut q = query(Some("Observation"), "code=x");
    q.compartment = Some(
        CompartmentScope::new(
            rt("Patient"),
            Some(LogicalId::new("p1").expect("id")),
            Some(&[rt("Observation")]),
        )
        .expect("scope"),
    );
    snap(
        "compartment_one_type",
        render(
            &super::page(dialect, &t, &q, NOW, Strategy::Gather)
                .expect("page")
                .sql
                .expect("statement"),
        ),
    );
    let mut q = query(None, "");
    q.compartment = Some(
        CompartmentScope::new(
            rt("Encounter"),
            Some(LogicalId::new("e1").expect("id")),
            None,
        )
        .expect("scope"),
    );
    snap(
        "compartment_every_type",
        render(
            &super::page(dialect, &t, &q, NOW, Strategy::Gather)
                .expect("page")
                .sql
                .expect("statement"),
        ),
    );
    // The other statements over the same criteria.
    let q = query(Some("Patient"), "family=Smith");
    snap(
        "summary_count",
        render(&super::count(dialect, &t, &q, NOW).expect("count")),
    );
    // Counts from the index tables alone: two sets intersected; and one that must join back to
    // the resources (a range criterion and `_id` are not index-table sets).
    let q2 = query(Some("Patient"), "family=Smith&gender=female");
    snap(
        "summary_count_two_sets",
        render(&super::count(dialect, &t, &q2, NOW).expect("count")),
    );
    let q3 = query(Some("Patient"), "gender=female&birthdate=ge1970&_id=a,b");
    snap(
        "summary_count_joined",
        render(&super::count(dialect, &t, &q3, NOW).expect("count")),
    );
    snap(
        "estimate",
        render(&super::estimate(dialect, "EXPLAIN SELECT 1", &t, &q, NOW).expect("estimate")),
    );
    snap(
        "conditional_keys",
        render(&super::keys(dialect, &t, &q, 2, NOW).expect("keys")),
    );
    // Includes: forward with a target, forward wildcard, reverse, and the fetch.
    let ids = ["o1", "o2"];
    let inc = query(
        Some("Observation"),
        "_include=Observation:subject:Patient&_include=*&_revinclude=Provenance:target",
    );
    let linked = |inc: &fhirstore_core::search::Include, reverse: bool| {
        super::linked(dialect, &t, rt("Observation"), &ids, inc, reverse)
            .map_or_else(|| "(not applicable)".to_owned(), |s| render(&s))
    };
    snap("include", linked(&inc.includes[0], false));
    snap("include_wildcard", linked(&inc.includes[1], false));
    snap("revinclude", linked(&inc.revincludes[0], true));
    snap(
        "include_fetch",
        render(&super::current(dialect, &t, rt("Patient"), &["p1", "p2"])),
    );
}

#[test]
fn sqlite_plans() {
    plans(Syntax::Sqlite);
}

#[test]
fn postgres_plans() {
    plans(Syntax::Postgres);
}

/// A forward include from another source type plans nothing.
#[test]
fn includes_from_another_type_plan_nothing() {
    let q = query(Some("Observation"), "_include=Encounter:subject");
    let plan = super::linked(
        Syntax::Sqlite,
        &tenant(),
        rt("Observation"),
        &["o1"],
        &q.includes[0],
        false,
    );
    assert!(plan.is_none());
}

/// Placeholders follow each dialect's style and count every bind, in order.
#[test]
fn placeholders_match_binds() {
    for (dialect, mark) in [(Syntax::Sqlite, "?"), (Syntax::Postgres, "$")] {
        let every = [Strategy::Gather, Strategy::Walk, Strategy::Drive(0)];
        for ((case, t, qs), strategy) in PAGES.iter().flat_map(|p| every.map(|s| (p, s))) {
            let plan = super::page(dialect, &tenant(), &query(*t, qs), NOW, strategy).expect(qs);
            let sql = plan.sql.expect("statement");
            let marks = sql.text().matches(mark).count();
            assert_eq!(marks, sql.binds().len(), "{case} on {dialect:?}");
            if dialect == Syntax::Postgres {
                // `$1` … `$n`, each once, in order: parts appended to a statement were
                // renumbered.
                let numbers: Vec<usize> = sql
                    .text()
                    .split('$')
                    .skip(1)
                    .map(|rest| {
                        let digits: String =
                            rest.chars().take_while(char::is_ascii_digit).collect();
                        digits.parse().expect("a placeholder number")
                    })
                    .collect();
                let expected: Vec<usize> = (1..=sql.binds().len()).collect();
                assert_eq!(numbers, expected, "{case}");
            }
        }
    }
}

/// Tampered or mismatched cursors are search errors, never SQL.
#[test]
fn bad_cursors_are_refused() {
    let mut q = query(Some("Observation"), "_sort=-date");
    for bad in [
        "not json",
        r#"{"k":["text"],"t":"Observation","i":"o1"}"#,
        r#"{"k":[1,2],"t":"Observation","i":"o1"}"#,
        r#"{"k":[1],"t":"Nope","i":"o1"}"#,
        r#"{"k":[1],"t":"Observation","i":"bad id!"}"#,
    ] {
        q.cursor = Some(bad.to_owned());
        let err = super::page(Syntax::Postgres, &tenant(), &q, NOW, Strategy::Gather).err();
        assert!(
            matches!(err, Some(fhirstore_core::Error::InvalidSearch(_))),
            "{bad}: {err:?}"
        );
    }
    let mut q = query(Some("Patient"), "");
    q.cursor = Some("Patient/'; DROP TABLE resources; --".to_owned());
    assert!(super::page(Syntax::Sqlite, &tenant(), &q, NOW, Strategy::Gather).is_err());
}

/// A part built apart keeps its binds, with PostgreSQL placeholders moved up past the
/// statement's own; quoted text is left alone.
#[test]
fn appended_parts_are_renumbered() {
    for (dialect, want) in [
        (
            Syntax::Postgres,
            "SELECT 1 WHERE x = $1 AND y = $2 AND z = '$1' AND w = $3",
        ),
        (
            Syntax::Sqlite,
            "SELECT 1 WHERE x = ? AND y = ? AND z = '$1' AND w = ?",
        ),
    ] {
        let mut a = Sql::new(dialect, "SELECT 1 WHERE x = ");
        a.push_bind("a");
        let mut b = a.empty();
        b.push(" AND y = ");
        b.push_bind(2i64);
        b.push(" AND z = '$1' AND w = ");
        b.push_bind("c");
        a.append(b);
        assert_eq!(a.text(), want);
        assert_eq!(
            a.binds(),
            [Bind::Text("a".into()), Bind::Int(2), Bind::Text("c".into())]
        );
    }
}

/// Only a statement that is wholly one wrapped set is unwrapped.
#[test]
fn inside_unwraps_only_a_whole_set() {
    let sql = |text: &str| Sql::new(Syntax::Postgres, text);
    let open = " AND r.id = ANY(ARRAY(";
    let got = sql(" AND r.id = ANY(ARRAY(SELECT t.id FROM a t WHERE (t.x = $1)))")
        .inside(open, "))")
        .map(|s| s.text().to_owned());
    assert_eq!(
        got.as_deref(),
        Some("SELECT t.id FROM a t WHERE (t.x = $1)")
    );
    for not_whole in [
        " AND r.id = ANY(ARRAY(SELECT t.id FROM a t)) AND (r.x = (1))",
        " AND r.id <> ALL(ARRAY(SELECT t.id FROM a t))",
        " AND EXISTS (SELECT 1 FROM a t WHERE (t.x = 1))",
    ] {
        assert!(sql(not_whole).inside(open, "))").is_none(), "{not_whole}");
    }
}

/// A query within every search limit may still need more bound values than the database takes
/// in one statement: it is refused as too costly, naming the count and the database's limit,
/// on every statement the store plans from it; a query just within the limit is planned.
#[test]
fn statements_beyond_the_bind_limit_are_refused() {
    let many = |criteria: usize, values: usize| {
        let one = format!(
            "name:contains={}",
            (0..values)
                .map(|i| format!("v{i}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        query(Some("Patient"), &vec![one; criteria].join("&"))
    };
    let huge = many(100, 1_000);
    for syntax in [Syntax::Sqlite, Syntax::Postgres] {
        let refused = [
            super::page(syntax, &tenant(), &huge, NOW, Strategy::Gather).and_then(|p| {
                p.sql
                    .ok_or_else(|| fhirstore_core::Error::InvalidSearch("no statement".into()))
            }),
            super::count(syntax, &tenant(), &huge, NOW),
            super::keys(syntax, &tenant(), &huge, 2, NOW),
            super::estimate(syntax, "EXPLAIN SELECT 1", &tenant(), &huge, NOW),
        ];
        for r in refused {
            match r {
                Err(fhirstore_core::Error::TooCostly(m)) => {
                    assert!(m.contains(&syntax.max_binds().to_string()), "{m}");
                }
                other => panic!("{syntax:?}: expected too costly, got {other:?}"),
            }
        }
        let fits = super::page(syntax, &tenant(), &many(20, 1_000), NOW, Strategy::Gather)
            .expect("planned");
        assert!(fits.sql.expect("statement").binds().len() > 20_000);
    }
}

/// The store's choice follows the counts: the smallest set under the cap drives, criteria all
/// at the cap walk an order that has an index, anything else gathers.
#[test]
fn strategies_follow_the_counts() {
    let q = query(Some("Observation"), "code=x&subject=Patient/p1&_sort=-date");
    assert_eq!(
        super::choose(&q, &[(0, 1000), (1, 3)], &[], 1000),
        Strategy::Drive(1)
    );
    assert_eq!(
        super::choose(&q, &[(0, 1000), (1, 1000)], &[], 1000),
        Strategy::Walk
    );
    let by_id = query(Some("Patient"), "gender=female");
    assert_eq!(super::choose(&by_id, &[(0, 5)], &[], 0), Strategy::Walk);
    assert_eq!(super::choose(&by_id, &[(0, 5)], &[], 6), Strategy::Drive(0));
    let two_keys = query(Some("Observation"), "code=x&_sort=-date,subject");
    assert_eq!(
        super::choose(&two_keys, &[(0, 1000)], &[], 1000),
        Strategy::Gather
    );
    // Token codes compare bytewise, their index by the database's collation.
    let token = query(Some("Patient"), "gender=female&_sort=gender");
    assert_eq!(
        super::choose(&token, &[(0, 1000)], &[], 1000),
        Strategy::Gather
    );
    // No index lists strings highest first with ties by id ascending.
    let descending_string = query(Some("Patient"), "gender=female&_sort=-family");
    assert_eq!(
        super::choose(&descending_string, &[(0, 1000)], &[], 1000),
        Strategy::Gather
    );
    let no_criteria = query(Some("Observation"), "_sort=date");
    assert_eq!(super::choose(&no_criteria, &[], &[], 1000), Strategy::Walk);
    let chain = query(Some("Observation"), "subject:Patient.name=x");
    assert_eq!(super::choose(&chain, &[], &[], 1000), Strategy::Gather);
    let every_type = query(None, "_sort=_lastUpdated");
    assert_eq!(super::choose(&every_type, &[], &[], 0), Strategy::Gather);
    // A split search's id set drives when it is smaller than every criterion's count and
    // below the threshold; otherwise the counts decide as before.
    let mut among = query(Some("Patient"), "gender=female");
    among.among = Some(
        ["p1", "p2", "p3"]
            .map(|i| LogicalId::new(i).expect("id"))
            .as_slice()
            .into(),
    );
    assert_eq!(
        super::choose(&among, &[(0, 900)], &[], 1000),
        Strategy::Among
    );
    assert_eq!(
        super::choose(&among, &[(0, 2)], &[], 1000),
        Strategy::Drive(0)
    );
    assert_eq!(super::choose(&among, &[(0, 900)], &[], 3), Strategy::Walk);
    // A date range drives when it is smaller than every index criterion and under the cap.
    let year = query(
        Some("Patient"),
        "birthdate=ge1980&birthdate=lt1981&gender=female",
    );
    assert_eq!(
        super::choose(&year, &[(2, 1000)], &[(0, 40)], 1000),
        Strategy::Range(0)
    );
    assert_eq!(
        super::choose(&year, &[(2, 10)], &[(0, 40)], 1000),
        Strategy::Drive(2)
    );
    assert_eq!(
        super::choose(&year, &[(2, 1000)], &[(0, 1000)], 1000),
        Strategy::Walk
    );
}

/// Across types, shared rows are read through their parts only on the types that share them:
/// another type may have its own rows under the same name (a tenant's own parameter).
#[test]
fn shared_rows_across_types_read_parts_only_where_shared() {
    let mut qb = Sql::new(Syntax::Sqlite, "SELECT 1 WHERE ");
    super::criteria::push_param(&mut qb, "t", None, "combo-code");
    assert_eq!(
        qb.text(),
        "SELECT 1 WHERE (t.param = ? OR (t.resource_type = ? AND t.param IN (?, ?)))"
    );
    let mut own = Sql::new(Syntax::Sqlite, "SELECT 1 WHERE ");
    super::criteria::push_param(&mut own, "t", None, "gender");
    assert_eq!(own.text(), "SELECT 1 WHERE t.param = ?");
    let mut typed = Sql::new(Syntax::Sqlite, "SELECT 1 WHERE ");
    super::criteria::push_param(&mut typed, "t", Some(rt("Condition")), "combo-code");
    assert_eq!(typed.text(), "SELECT 1 WHERE t.param = ?");
}
