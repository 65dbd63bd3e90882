//! Applying changes: each key's hash, index entries and digest delta in one version-guarded
//! script call per batch.

use super::*;

/// The index entries one resource body contributes, as the apply script takes them.
pub(crate) fn index_ops(
    rt: ResourceType,
    id: &str,
    content: &Value,
    last_updated: i64,
) -> Vec<Value> {
    let mut set_keys = BTreeSet::new();
    let e: IndexEntries = index::extract(content);
    for t in &e.tokens {
        let p = format!("t:{rt}:{}:", t.param);
        set_keys.extend(
            token_terms(&t.system, &t.code)
                .iter()
                .map(|k| format!("{p}{k}")),
        );
    }
    for r in &e.references {
        let p = format!("r:{rt}:{}:", r.param);
        set_keys.extend(reference_terms(r).iter().map(|k| format!("{p}{k}")));
    }
    for u in &e.uris {
        set_keys.insert(format!("u:{rt}:{}:{}", u.param, u.uri));
    }
    let mut ops: Vec<Value> = set_keys.into_iter().map(|k| json!(["s", k])).collect();
    let strings: BTreeSet<(String, String)> = e
        .strings
        .iter()
        .map(|s| (format!("s:{rt}:{}", s.param), format!("{}\0{id}", s.folded)))
        .collect();
    ops.extend(strings.into_iter().map(|(k, m)| json!(["l", k, m])));
    ops.push(json!(["z", format!("lu:{rt}"), last_updated.to_string()]));
    ops.push(json!(["l", format!("ids:{rt}"), id]));
    ops
}

impl RedisSecondary {
    pub(crate) async fn apply_changes(&self, changes: &[Change], repair: bool) -> Result<Applied> {
        if changes.is_empty() {
            return Ok(Applied::default());
        }
        // One pipeline, or on a cluster one per tenant: a tenant's keys share a slot, and a
        // pipeline may not span slots there. Order matters only within a key, and a key's
        // changes stay in one pipeline, in order.
        let mut groups: Vec<(Option<&TenantId>, Pipeline)> = Vec::new();
        for c in changes {
            let group = self.is_cluster().then_some(&c.tenant);
            let at = match groups.iter().position(|(g, _)| *g == group) {
                Some(at) => at,
                None => {
                    groups.push((group, redis::pipe()));
                    groups.len() - 1
                }
            };
            let pipe = &mut groups[at].1;
            let rt = c.key.resource_type;
            let id = c.key.id.as_str();
            let lu = to_micros(c.last_updated);
            let (body, ops) = match &c.content {
                Some(v) => (
                    serde_json::to_string(v).map_err(|e| bad_data(e.to_string()))?,
                    index_ops(rt, id, v, lu),
                ),
                None => (String::new(), Vec::new()),
            };
            let ops = Value::Array(ops).to_string();
            let e = hash_words(c.element_hash()).map(|w| w.to_string());
            let args = [
                self.base(&c.tenant),
                rt.to_string(),
                id.to_owned(),
                c.version.get().to_string(),
                lu.to_string(),
                if c.content.is_some() { "0" } else { "1" }.to_owned(),
                body,
                e[0].clone(),
                e[1].clone(),
                e[2].clone(),
                e[3].clone(),
                c.segment().to_string(),
                ops,
                if repair { "1" } else { "0" }.to_owned(),
            ];
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let doc = self.doc_key(&c.tenant, rt, id);
            Self::evalsha(pipe, &self.apply, &[&doc], &args);
        }
        let replies = self
            .run_groups(groups.into_iter().map(|(_, p)| p).collect())
            .await?;
        let mut out = Applied::default();
        for r in replies.into_iter().flatten() {
            match r {
                RValue::Int(1) => out.applied += 1,
                RValue::Int(0) => out.skipped += 1,
                other => return Err(bad_data(format!("apply reply {other:?}"))),
            }
        }
        tracing::debug!(applied = out.applied, skipped = out.skipped, "redis apply");
        Ok(out)
    }
}
