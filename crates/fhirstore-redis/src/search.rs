//! Searching: FHIR criteria as index-set alternatives for the search script, with cursors.

use super::*;

/// One criterion's alternatives, as the search script takes them.
pub(crate) fn alternatives(
    rt: ResourceType,
    param: &str,
    values: &CriterionValues,
    now: i64,
) -> Result<Vec<Value>> {
    let unsupported = || Error::Unsupported(format!("redis cannot answer {param} this way"));
    let alts = match (param, values) {
        ("_id", CriterionValues::Token(tokens)) => tokens
            .iter()
            .map(|t| match (&t.system, &t.code) {
                (None, Some(code)) => Ok(json!({ "id": code })),
                _ => Err(unsupported()),
            })
            .collect::<Result<Vec<_>>>()?,
        ("_lastUpdated", CriterionValues::Date(dates)) => {
            let key = format!("lu:{rt}");
            let mut out = Vec::new();
            for d in dates {
                let InstantPredicate { ge, lt, negated } = d.instant_predicate(now);
                let lo = |v: Option<i64>| v.map_or("-inf".to_owned(), |v| v.to_string());
                let hi = |v: Option<i64>| v.map_or("+inf".to_owned(), |v| format!("({v}"));
                if negated {
                    // Outside [ge, lt): below ge, or at or above lt.
                    if let Some(ge) = ge {
                        out.push(json!({"z": key, "min": "-inf", "max": format!("({ge}")}));
                    }
                    if let Some(lt) = lt {
                        out.push(json!({"z": key, "min": lt.to_string(), "max": "+inf"}));
                    }
                } else {
                    out.push(json!({"z": key, "min": lo(ge), "max": hi(lt)}));
                }
            }
            out
        }
        (_, CriterionValues::Token(tokens)) => tokens
            .iter()
            .map(|t| token_key(rt, param, t).map(|k| json!({ "s": k })))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(unsupported)?,
        (_, CriterionValues::Reference(refs)) => refs
            .iter()
            .map(|r| json!({ "s": format!("r:{rt}:{param}:{}", reference_term(r)) }))
            .collect(),
        (_, CriterionValues::Uri(uris)) => uris
            .iter()
            .map(|u| json!({ "s": format!("u:{rt}:{param}:{u}") }))
            .collect(),
        (_, CriterionValues::String(strings)) => strings
            .iter()
            .map(|s| {
                let folded = index::fold(s);
                json!({
                    "l": format!("s:{rt}:{param}"),
                    "min": format!("[{folded}"),
                    "max": format!("({folded}\u{10FFFF}"),
                })
            })
            .collect(),
        _ => return Err(unsupported()),
    };
    Ok(alts)
}

pub(crate) fn token_key(rt: ResourceType, param: &str, t: &TokenValue) -> Option<String> {
    token_term(t).map(|term| format!("t:{rt}:{param}:{term}"))
}

/// This backend's cursor: the last id of the page, marked so another backend's cursor is not
/// mistaken for one.
pub(crate) const CURSOR_PREFIX: &str = "redis:";

impl RedisSecondary {
    /// Runs a search whose every criterion the capabilities accept.
    pub(crate) async fn search_page(
        &self,
        ctx: &TenantContext,
        query: &SearchQuery,
    ) -> Result<SearchPage> {
        ctx.require(Permission::Read)?;
        if !self.capabilities().can_search(query) {
            return Err(Error::Unsupported(
                "redis cannot answer this search (see its capabilities)".to_owned(),
            ));
        }
        let Some(rt) = query.resource_type else {
            return Err(Error::Unsupported("redis searches one type".to_owned()));
        };
        let now = now_micros();
        let criteria = query
            .criteria
            .iter()
            .map(|c| alternatives(rt, &c.param, &c.values, now).map(Value::Array))
            .collect::<Result<Vec<_>>>()?;
        let after = match &query.cursor {
            None => String::new(),
            Some(c) => c
                .strip_prefix(CURSOR_PREFIX)
                .filter(|id| LogicalId::new(*id).is_ok())
                .ok_or_else(|| Error::InvalidSearch(format!("not a redis cursor: {c}")))?
                .to_owned(),
        };
        let count_only = query.summary == Some(Summary::Count);
        let page = if count_only { 0 } else { query.page_size() };
        let plan = json!({
            "rt": rt.as_str(),
            "criteria": criteria,
            "after": after,
            // One more than the page, to know whether another page follows.
            "limit": if count_only { 0 } else { page + 1 },
        });
        let base = self.base(ctx.tenant());
        let live = format!("{base}lu:{rt}");
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(self.built_key(ctx.tenant()));
        Self::evalsha(
            &mut pipe,
            &self.search,
            &[&live],
            &[&base, &plan.to_string()],
        );
        let replies = self.run(&pipe).await?;
        let [marker, RValue::Array(reply)] = replies.as_slice() else {
            return Err(bad_data("search reply"));
        };
        Self::check_built(marker)?;
        let total = match reply.first() {
            Some(RValue::Int(n)) => u64::try_from(*n).unwrap_or(0),
            _ => return Err(bad_data("search total")),
        };
        let mut matches = Vec::new();
        for row in reply[1..].chunks(4) {
            let fields: Vec<Option<String>> = row.iter().map(text).collect();
            let [Some(id), Some(v), Some(lu), body] = fields.as_slice() else {
                return Err(bad_data("search row"));
            };
            let id = LogicalId::new(id.as_str()).map_err(|_| bad_data("search id"))?;
            matches.push(Self::stored(
                ctx.tenant(),
                rt,
                id,
                v,
                lu,
                false,
                body.clone(),
            )?);
        }
        let next_cursor = if matches.len() > page as usize {
            matches.truncate(page as usize);
            matches
                .last()
                .map(|r| format!("{CURSOR_PREFIX}{}", r.key.id))
        } else {
            None
        };
        Ok(SearchPage {
            matches,
            included: Vec::new(),
            total: (count_only || query.total != TotalMode::None).then_some(total),
            next_cursor,
        })
    }
}
