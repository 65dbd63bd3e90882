//! Applying changes: one document per key, version-guarded, with the fields searches and
//! digests read.

use super::*;

/// The narrative's text: tags dropped, the common entities decoded.
pub(crate) fn strip_html(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                out.push(' ');
            }
            _ if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", " ")
        .replace("&amp;", "&")
}

/// Every string value of the resource, the narrative as text, for `_content`.
pub(crate) fn all_strings(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => {
            out.push_str(s);
            out.push(' ');
        }
        Value::Array(a) => a.iter().for_each(|x| all_strings(x, out)),
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("div", Value::String(html)) => {
                        out.push_str(&strip_html(html));
                        out.push(' ');
                    }
                    _ => all_strings(x, out),
                }
            }
        }
        _ => {}
    }
}

impl Inner {
    pub(crate) fn held_version(
        &self,
        searcher: &Searcher,
        cols: &[Columns],
        key: &str,
    ) -> Result<Option<(u64, u128)>> {
        let q = TermQuery::new(
            Term::from_field_text(self.f.key, key),
            IndexRecordOption::Basic,
        );
        let hits = searcher.search(&q, &DocSetCollector).map_err(index_err)?;
        let mut best: Option<(u64, u128)> = None;
        for a in hits {
            let m = meta(cols, a)?;
            if best.is_none_or(|(v, _)| m.version > v) {
                best = Some((m.version, m.e));
            }
        }
        Ok(best)
    }

    pub(crate) fn document(&self, c: &Change) -> Result<TantivyDocument> {
        let f = &self.f;
        let rt = c.key.resource_type;
        let id = c.key.id.as_str();
        let mut doc = TantivyDocument::default();
        doc.add_text(f.key, key_of(&c.tenant, rt, id));
        doc.add_text(f.tenant, c.tenant.as_str());
        doc.add_text(f.rt, rt.as_str());
        doc.add_text(f.id, id);
        doc.add_u64(f.version, c.version.get());
        doc.add_i64(f.lu, to_micros(c.last_updated));
        doc.add_u64(f.segment, u64::from(c.segment()));
        let e = c.element_hash();
        doc.add_u64(f.e_hi, (e >> 64) as u64);
        doc.add_u64(f.e_lo, e as u64);
        let Some(body) = &c.content else {
            doc.add_u64(f.deleted, 1);
            return Ok(doc);
        };
        doc.add_u64(f.deleted, 0);
        doc.add_text(f.body, serde_json::to_string(body).map_err(index_err)?);
        if let Some(div) = body.pointer("/text/div").and_then(Value::as_str) {
            doc.add_text(f.text, strip_html(div));
        }
        let mut content = String::new();
        all_strings(body, &mut content);
        doc.add_text(f.content, content);

        let e = index::extract(body);
        let mut add = |field: Field, param: &str, value: &str| {
            let t = format!("{param}{SEP}{value}");
            if t.len() <= MAX_TERM_BYTES {
                doc.add_text(field, t);
            }
        };
        // Every resource has an id and a lastUpdated, for `:missing`.
        let mut present: HashSet<&str> = HashSet::from(["_id", "_lastUpdated"]);
        for t in &e.tokens {
            present.insert(t.param);
            for term in token_terms(&t.system, &t.code) {
                add(f.tok, t.param, &term);
            }
        }
        for r in &e.references {
            present.insert(r.param);
            for term in reference_terms(r) {
                add(f.rf, r.param, &term);
            }
        }
        for u in &e.uris {
            present.insert(u.param);
            add(f.uri, u.param, &u.uri);
        }
        for s in &e.strings {
            present.insert(s.param);
            add(f.st, s.param, &s.folded);
            add(f.sx, s.param, &s.exact);
        }
        for d in &e.dates {
            present.insert(d.param);
            add(f.dlo, d.param, &ord_i64(d.low));
            add(f.dhi, d.param, &ord_i64(d.high));
        }
        for n in &e.numbers {
            present.insert(n.param);
            add(f.nv, n.param, &ord_f64(n.value));
        }
        for q in &e.quantities {
            present.insert(q.param);
        }
        for p in present {
            doc.add_text(f.has, p);
        }
        Ok(doc)
    }

    pub(crate) fn apply(&self, changes: &[Change], repair: bool) -> Result<Applied> {
        let mut w = self.writer.lock();
        let searcher = self.searcher();
        let cols = columns(&searcher)?;
        let mut out = Applied::default();
        for c in changes {
            let key = key_of(&c.tenant, c.key.resource_type, c.key.id.as_str());
            let held = match w.pending.get(&key) {
                Some(v) => Some(*v),
                None => self.held_version(&searcher, &cols, &key)?,
            };
            let (version, e) = (c.version.get(), c.element_hash());
            let keep = held.is_some_and(|(v, held_e)| {
                v > version || (v == version && (!repair || held_e == e))
            });
            if keep {
                out.skipped += 1;
                continue;
            }
            if let Some(segs) = self
                .digests
                .lock()
                .get_mut(&(c.tenant.clone(), c.key.resource_type))
            {
                let d = segs.entry(c.segment()).or_default();
                if let Some((_, old)) = held {
                    d.remove(old);
                }
                d.add(e);
                if d.count == 0 {
                    segs.remove(&c.segment());
                }
            }
            // The delete takes effect on documents added before it only, so the new version
            // survives it.
            w.writer
                .delete_term(Term::from_field_text(self.f.key, &key));
            w.writer
                .add_document(self.document(c)?)
                .map_err(index_err)?;
            w.pending.insert(key, (version, e));
            out.applied += 1;
        }
        if w.pending.len() >= self.config.commit_every {
            self.commit(&mut w)?;
        }
        Ok(out)
    }
}
