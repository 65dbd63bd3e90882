//! Searching: FHIR criteria as tantivy queries, with full text, sorts and cursors.

use super::*;

/// A range over one parameter's terms in a raw field; an open end stays within the parameter.
pub(crate) fn term_range(
    field: Field,
    param: &str,
    lo: Bound<String>,
    hi: Bound<String>,
) -> Box<dyn Query> {
    let at = |v: String| term(field, param, &v);
    let lo = match lo {
        Bound::Included(v) => Bound::Included(at(v)),
        Bound::Excluded(v) => Bound::Excluded(at(v)),
        Bound::Unbounded => Bound::Included(at(String::new())),
    };
    let hi = match hi {
        Bound::Included(v) => Bound::Included(at(v)),
        Bound::Excluded(v) => Bound::Excluded(at(v)),
        Bound::Unbounded => Bound::Included(at("~".to_owned())),
    };
    Box::new(RangeQuery::new(lo, hi))
}

/// A search ready to run: its query, the date checks after it, and a searcher.
struct Prepared {
    q: BooleanQuery,
    verify: Vec<Verify>,
    searcher: Searcher,
    cols: Vec<Columns>,
    now: i64,
}

/// A date criterion (parameter, values) that the index's candidates must be checked against.
type Verify = (String, Vec<DateValue>);

pub(crate) fn any_of(mut qs: Vec<Box<dyn Query>>) -> Box<dyn Query> {
    if qs.len() == 1 {
        return qs.remove(0);
    }
    Box::new(BooleanQuery::new(
        qs.into_iter().map(|q| (Occur::Should, q)).collect(),
    ))
}

pub(crate) fn all_of(qs: Vec<Box<dyn Query>>) -> Box<dyn Query> {
    Box::new(BooleanQuery::new(
        qs.into_iter().map(|q| (Occur::Must, q)).collect(),
    ))
}

pub(crate) fn term_query(t: Term) -> Box<dyn Query> {
    Box::new(TermQuery::new(t, IndexRecordOption::Basic))
}

/// Whether a stored range matches any of a criterion's date values, by the core's rule.
pub(crate) fn dates_match(e: &IndexEntries, param: &str, values: &[DateValue], now: i64) -> bool {
    e.dates.iter().filter(|d| d.param == param).any(|d| {
        let stored = DateRange {
            low: d.low,
            high: d.high,
        };
        values.iter().any(|v| v.matches(stored, now))
    })
}

/// The documents whose date values could match: a necessary condition on the stored range's
/// low or high end for each prefix (exact for the one-sided prefixes), verified afterwards.
pub(crate) fn date_candidates(f: &Fields, param: &str, d: &DateValue, now: i64) -> Box<dyn Query> {
    let q = d.range;
    let lo =
        |b: Bound<i64>, c: Bound<i64>| term_range(f.dlo, param, b.map(ord_i64), c.map(ord_i64));
    let hi =
        |b: Bound<i64>, c: Bound<i64>| term_range(f.dhi, param, b.map(ord_i64), c.map(ord_i64));
    use Bound::{Excluded as Ex, Included as In, Unbounded as Un};
    match d.prefix {
        Prefix::Eq => all_of(vec![lo(In(q.low), Un), hi(Un, In(q.high))]),
        Prefix::Ne => any_of(vec![lo(Un, Ex(q.low)), hi(Ex(q.high), Un)]),
        Prefix::Gt => hi(Ex(q.high), Un),
        Prefix::Lt => lo(Un, Ex(q.low)),
        Prefix::Ge => any_of(vec![hi(Ex(q.high), Un), lo(In(q.low), Un)]),
        Prefix::Le => any_of(vec![lo(Un, Ex(q.low)), hi(Un, In(q.high))]),
        Prefix::Sa => lo(In(q.high), Un),
        Prefix::Eb => hi(Un, In(q.low)),
        Prefix::Ap => {
            let a = d.approximate_bounds(now);
            all_of(vec![lo(Un, Ex(a.high)), hi(Ex(a.low), Un)])
        }
    }
}

/// A number criterion, exactly as the primary evaluates it against the stored value.
pub(crate) fn number_query(f: &Fields, param: &str, n: &NumberValue) -> Box<dyn Query> {
    use Bound::{Excluded as Ex, Included as In, Unbounded as Un};
    let r = |a: Bound<f64>, b: Bound<f64>| term_range(f.nv, param, a.map(ord_f64), b.map(ord_f64));
    match n.prefix {
        Prefix::Eq => r(In(n.low), Ex(n.high)),
        Prefix::Ne => any_of(vec![r(Un, Ex(n.low)), r(In(n.high), Un)]),
        Prefix::Ap => {
            let pad = (n.value.abs() * 0.1).max(n.high - n.low);
            r(In(n.value - pad), In(n.value + pad))
        }
        Prefix::Gt | Prefix::Sa => r(Ex(n.value), Un),
        Prefix::Lt | Prefix::Eb => r(Un, Ex(n.value)),
        Prefix::Ge => r(In(n.value), Un),
        Prefix::Le => r(Un, In(n.value)),
    }
}

/// This backend's cursor: an offset into the ordered matches.
pub(crate) const CURSOR_PREFIX: &str = "tantivy:";

impl Inner {
    pub(crate) fn criterion_query(
        &self,
        c: &Criterion,
        now: i64,
        verify: &mut Vec<(String, Vec<DateValue>)>,
    ) -> Result<(Occur, Box<dyn Query>)> {
        let f = &self.f;
        let p = c.param.as_str();
        let unsupported = || Error::Unsupported(format!("tantivy cannot answer {p} this way"));
        let must = |q| Ok((Occur::Must, q));
        match (p, c.modifier, &c.values) {
            ("_text" | "_content", None, CriterionValues::String(texts)) => {
                let field = if p == "_text" { f.text } else { f.content };
                let mut analyzer = self
                    .engine()
                    .index
                    .tokenizer_for_field(field)
                    .map_err(index_err)?;
                let alts = texts
                    .iter()
                    .map(|text| {
                        let mut words: Vec<Box<dyn Query>> = Vec::new();
                        let mut stream = analyzer.token_stream(text);
                        while let Some(tok) = stream.next() {
                            words.push(Box::new(TermQuery::new(
                                Term::from_field_text(field, &tok.text),
                                IndexRecordOption::WithFreqs,
                            )));
                        }
                        if words.is_empty() {
                            Box::new(BooleanQuery::new(Vec::new())) as Box<dyn Query>
                        } else {
                            all_of(words)
                        }
                    })
                    .collect();
                must(any_of(alts))
            }
            ("_id", None, CriterionValues::Token(tokens)) => {
                let alts = tokens
                    .iter()
                    .map(|t| match (&t.system, &t.code) {
                        (None, Some(id)) => Ok(term_query(Term::from_field_text(f.id, id))),
                        _ => Err(unsupported()),
                    })
                    .collect::<Result<Vec<_>>>()?;
                must(any_of(alts))
            }
            ("_lastUpdated", None, CriterionValues::Date(dates)) => {
                let alts = dates
                    .iter()
                    .map(|d| {
                        let ip = d.instant_predicate(now);
                        let b = |v: Option<i64>, incl: bool| match v {
                            None => Bound::Unbounded,
                            Some(v) if incl => Bound::Included(Term::from_field_i64(f.lu, v)),
                            Some(v) => Bound::Excluded(Term::from_field_i64(f.lu, v)),
                        };
                        let range = |lo, hi| -> Box<dyn Query> {
                            match (&lo, &hi) {
                                (Bound::Unbounded, Bound::Unbounded) => Box::new(AllQuery),
                                _ => Box::new(RangeQuery::new(lo, hi)),
                            }
                        };
                        if ip.negated {
                            let mut parts = Vec::new();
                            if ip.ge.is_some() {
                                parts.push(range(Bound::Unbounded, b(ip.ge, false)));
                            }
                            if ip.lt.is_some() {
                                parts.push(range(b(ip.lt, true), Bound::Unbounded));
                            }
                            any_of(parts)
                        } else {
                            range(b(ip.ge, true), b(ip.lt, false))
                        }
                    })
                    .collect();
                must(any_of(alts))
            }
            (_, None, CriterionValues::Token(tokens)) => {
                let alts = tokens
                    .iter()
                    .map(|t| token_term(t).map(|x| term_query(term(f.tok, p, &x))))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(unsupported)?;
                must(any_of(alts))
            }
            (_, Some(Modifier::Not), CriterionValues::Token(tokens)) => {
                let alts = tokens
                    .iter()
                    .map(|t| token_term(t).map(|x| term_query(term(f.tok, p, &x))))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(unsupported)?;
                Ok((Occur::MustNot, any_of(alts)))
            }
            (_, None, CriterionValues::Reference(refs)) => must(any_of(
                refs.iter()
                    .map(|r| term_query(term(f.rf, p, &reference_term(r))))
                    .collect(),
            )),
            (_, None, CriterionValues::Uri(uris)) => must(any_of(
                uris.iter().map(|u| term_query(term(f.uri, p, u))).collect(),
            )),
            (_, None, CriterionValues::String(strings)) => must(any_of(
                strings
                    .iter()
                    .map(|s| {
                        let folded = index::fold(s);
                        term_range(
                            f.st,
                            p,
                            Bound::Included(folded.clone()),
                            Bound::Excluded(format!("{folded}\u{10FFFF}")),
                        )
                    })
                    .collect(),
            )),
            (_, Some(Modifier::Exact), CriterionValues::String(strings)) => must(any_of(
                strings
                    .iter()
                    .map(|s| term_query(term(f.sx, p, s)))
                    .collect(),
            )),
            (_, None, CriterionValues::Date(dates)) => {
                verify.push((p.to_owned(), dates.clone()));
                must(any_of(
                    dates
                        .iter()
                        .map(|d| date_candidates(f, p, d, now))
                        .collect(),
                ))
            }
            (_, None, CriterionValues::Number(numbers)) => must(any_of(
                numbers.iter().map(|n| number_query(f, p, n)).collect(),
            )),
            (_, _, CriterionValues::Missing(missing, _)) => {
                let has = term_query(Term::from_field_text(f.has, p));
                Ok((
                    if *missing {
                        Occur::MustNot
                    } else {
                        Occur::Must
                    },
                    has,
                ))
            }
            _ => Err(unsupported()),
        }
    }

    /// The query matching `query`'s criteria in the tenant (within its `among` set), with the
    /// date criteria that candidates must be checked against once found.
    fn matcher(
        &self,
        tenant: &TenantId,
        rt: ResourceType,
        query: &SearchQuery,
        now: i64,
    ) -> Result<(BooleanQuery, Vec<Verify>)> {
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = self
            .scope(tenant, rt)
            .into_iter()
            .map(|q| (Occur::Must, q))
            .collect();
        clauses.push((
            Occur::Must,
            term_query(Term::from_field_u64(self.f.deleted, 0)),
        ));
        if let Some(ids) = &query.among {
            let keys = ids
                .iter()
                .map(|id| Term::from_field_text(self.f.key, &key_of(tenant, rt, id.as_str())));
            clauses.push((Occur::Must, Box::new(TermSetQuery::new(keys))));
        }
        let mut verify = Vec::new();
        for c in &query.criteria {
            if !c.chain.is_empty() {
                return Err(Error::Unsupported("tantivy does not chain".to_owned()));
            }
            clauses.push(self.criterion_query(c, now, &mut verify)?);
        }
        Ok((BooleanQuery::new(clauses), verify))
    }

    /// Every match of `q` that passes `verify`, in `query`'s order (ties by id).
    fn ordered(
        &self,
        searcher: &Searcher,
        cols: &[Columns],
        q: &BooleanQuery,
        verify: &[Verify],
        query: &SearchQuery,
        now: i64,
    ) -> Result<Vec<(f32, Meta, DocAddress)>> {
        let by_score = query.sort.first().is_some_and(|k| k.param == "_score");
        let mut hits: Vec<(f32, DocAddress)> = if by_score {
            let n = searcher
                .search(q, &tantivy::collector::Count)
                .map_err(index_err)?;
            if n == 0 {
                Vec::new()
            } else {
                searcher
                    .search(q, &TopDocs::with_limit(n))
                    .map_err(index_err)?
            }
        } else {
            searcher
                .search(q, &DocSetCollector)
                .map_err(index_err)?
                .into_iter()
                .map(|a| (0.0, a))
                .collect()
        };
        if !verify.is_empty() {
            let mut kept = Vec::with_capacity(hits.len());
            for (score, a) in hits {
                let doc: TantivyDocument = searcher.doc(a).map_err(index_err)?;
                let body: Value = doc
                    .get_first(self.f.body)
                    .and_then(|v| v.as_str())
                    .and_then(|s| serde_json::from_str(s).ok())
                    .unwrap_or(Value::Null);
                let e = index::extract(&body);
                if verify.iter().all(|(p, ds)| dates_match(&e, p, ds, now)) {
                    kept.push((score, a));
                }
            }
            hits = kept;
        }
        let mut rows: Vec<(f32, Meta, DocAddress)> = hits
            .into_iter()
            .map(|(s, a)| meta(cols, a).map(|m| (s, m, a)))
            .collect::<Result<_>>()?;
        rows.sort_by(|x, y| {
            for k in &query.sort {
                let o = match k.param.as_str() {
                    "_score" => y.0.total_cmp(&x.0),
                    "_lastUpdated" => x.1.lu.cmp(&y.1.lu),
                    _ => x.1.id.cmp(&y.1.id),
                };
                let o = if k.descending && k.param != "_score" {
                    o.reverse()
                } else {
                    o
                };
                if o.is_ne() {
                    return o;
                }
            }
            x.1.id.cmp(&y.1.id)
        });
        Ok(rows)
    }

    /// See [`fhirstore_core::secondary::Secondary::search_ids`].
    pub(crate) fn search_ids(
        &self,
        tenant: &TenantId,
        query: &SearchQuery,
        limit: usize,
    ) -> Result<Vec<LogicalId>> {
        let p = self.prepare(tenant, query)?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        // A side past the caller's bound is not materialised: it is counted, and `limit` ids
        // (a bounded top-k) stand for it. Date criteria are checked per document, so there
        // the count is only an upper bound and every candidate is looked at.
        if p.verify.is_empty() {
            let n = p
                .searcher
                .search(&p.q, &tantivy::collector::Count)
                .map_err(index_err)?;
            if n > limit {
                let top = p
                    .searcher
                    .search(&p.q, &TopDocs::with_limit(limit))
                    .map_err(index_err)?;
                return top
                    .into_iter()
                    .map(|(_, a)| {
                        let m = meta(&p.cols, a)?;
                        LogicalId::new(m.id.as_str()).map_err(index_err)
                    })
                    .collect();
            }
        }
        let rows = self.ordered(&p.searcher, &p.cols, &p.q, &p.verify, query, p.now)?;
        rows.into_iter()
            .take(limit)
            .map(|(_, m, _)| LogicalId::new(m.id.as_str()).map_err(index_err))
            .collect()
    }

    /// The matcher of `query` with a searcher to run it on.
    fn prepare(&self, tenant: &TenantId, query: &SearchQuery) -> Result<Prepared> {
        let Some(rt) = query.resource_type else {
            return Err(Error::Unsupported("tantivy searches one type".to_owned()));
        };
        let now = now_micros();
        let (q, verify) = self.matcher(tenant, rt, query, now)?;
        let searcher = self.searcher();
        let cols = columns(&searcher)?;
        Ok(Prepared {
            q,
            verify,
            searcher,
            cols,
            now,
        })
    }

    pub(crate) fn search(&self, tenant: &TenantId, query: &SearchQuery) -> Result<SearchPage> {
        let rt = query
            .resource_type
            .ok_or_else(|| Error::Unsupported("tantivy searches one type".to_owned()))?;
        let Prepared {
            q,
            verify,
            searcher,
            cols,
            now,
        } = self.prepare(tenant, query)?;
        let count_only = query.summary == Some(Summary::Count);
        if count_only && verify.is_empty() {
            let total = searcher
                .search(&q, &tantivy::collector::Count)
                .map_err(index_err)?;
            return Ok(SearchPage {
                matches: Vec::new(),
                included: Vec::new(),
                total: Some(total as u64),
                next_cursor: None,
            });
        }
        let rows = self.ordered(&searcher, &cols, &q, &verify, query, now)?;
        let total = rows.len() as u64;
        let page = if count_only {
            0
        } else {
            query.page_size() as usize
        };
        let offset = match &query.cursor {
            None => 0,
            Some(c) => c
                .strip_prefix(CURSOR_PREFIX)
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| Error::InvalidSearch(format!("not a tantivy cursor: {c}")))?,
        };
        let mut matches = Vec::new();
        for (_, m, a) in rows.iter().skip(offset).take(page) {
            let doc: TantivyDocument = searcher.doc(*a).map_err(index_err)?;
            let body = doc
                .get_first(self.f.body)
                .and_then(|v| v.as_str())
                .ok_or_else(|| index_err("a live document without a body"))?;
            matches.push(StoredResource {
                tenant: tenant.clone(),
                key: ResourceKey {
                    resource_type: rt,
                    id: LogicalId::new(m.id.as_str()).map_err(index_err)?,
                },
                version: VersionId::new(m.version).ok_or_else(|| index_err("version 0"))?,
                last_updated: from_micros(m.lu),
                deleted: false,
                content: serde_json::from_str(body).map_err(index_err)?,
            });
        }
        // An offset from a client's cursor can be anything up to usize::MAX.
        let next = offset.saturating_add(page);
        Ok(SearchPage {
            matches,
            included: Vec::new(),
            total: (count_only || query.total != TotalMode::None).then_some(total),
            next_cursor: (!count_only && next < rows.len())
                .then(|| format!("{CURSOR_PREFIX}{next}")),
        })
    }
}
