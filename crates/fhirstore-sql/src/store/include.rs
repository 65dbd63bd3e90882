//! `_include` and `_revinclude`: the resources a page of matches links to, or is linked from.

use super::*;

impl<D: Dialect> Store<D> {
    /// Keys of resources linked to `from` by one include (forward) or revinclude (reverse).
    pub(super) async fn linked_keys(
        conn: &mut Conn<D>,
        tenant: &TenantId,
        from: &[ResourceKey],
        inc: &fhirstore_core::search::Include,
        reverse: bool,
    ) -> Result<Vec<ResourceKey>> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        // One statement per type among `from`, each with its ids in an IN list.
        let mut by_type: std::collections::BTreeMap<ResourceType, Vec<&str>> = Default::default();
        for k in from {
            by_type
                .entry(k.resource_type)
                .or_default()
                .push(k.id.as_str());
        }
        for (rt, ids) in by_type {
            let Some(sql) = search::linked(D::SYNTAX, tenant, rt, &ids, inc, reverse) else {
                continue;
            };
            for mut row in sql.fetch_all(&mut *conn).await? {
                let t: String = row.get(0)?;
                let id: String = row.get(1)?;
                // A reference to a type or id that is not valid cannot name a stored resource.
                if let (Ok(t), Ok(id)) = (ResourceType::new(&t), LogicalId::new(id)) {
                    let key = ResourceKey::new(t, id);
                    if seen.insert(key.clone()) {
                        out.push(key);
                    }
                }
            }
        }
        Ok(out)
    }

    /// The live current versions of `keys`, in key order.
    pub(super) async fn fetch_current(
        conn: &mut Conn<D>,
        tenant: &TenantId,
        keys: &[ResourceKey],
    ) -> Result<Vec<StoredResource>> {
        let mut by_type: std::collections::BTreeMap<ResourceType, Vec<&str>> = Default::default();
        for k in keys {
            by_type
                .entry(k.resource_type)
                .or_default()
                .push(k.id.as_str());
        }
        let mut out = Vec::with_capacity(keys.len());
        for (rt, ids) in by_type {
            let sql = search::current(D::SYNTAX, tenant, rt, &ids);
            for mut row in sql.fetch_all(&mut *conn).await? {
                let key = key_from_row(rt.as_str(), row.get(0)?)?;
                out.push(stored(
                    tenant,
                    key,
                    row.get(1)?,
                    row.get(2)?,
                    false,
                    row.get(3)?,
                )?);
            }
        }
        Ok(out)
    }

    /// Resolves `_include` and `_revinclude` for a page of matches: each round follows the links
    /// from the previous round's resources (the matches first; later rounds only for `:iterate`).
    pub(super) async fn resolve_includes(
        conn: &mut Conn<D>,
        tenant: &TenantId,
        query: &SearchQuery,
        matches: &[StoredResource],
    ) -> Result<Vec<StoredResource>> {
        if query.includes.is_empty() && query.revincludes.is_empty() {
            return Ok(Vec::new());
        }
        let mut seen: HashSet<ResourceKey> = matches.iter().map(|m| m.key.clone()).collect();
        let mut frontier: Vec<ResourceKey> = matches.iter().map(|m| m.key.clone()).collect();
        let mut included = Vec::new();
        for round in 0..MAX_INCLUDE_ROUNDS {
            let mut found = Vec::new();
            let specs = query
                .includes
                .iter()
                .map(|i| (i, false))
                .chain(query.revincludes.iter().map(|i| (i, true)));
            for (inc, reverse) in specs {
                if round == 0 || inc.iterate {
                    found.extend(Self::linked_keys(conn, tenant, &frontier, inc, reverse).await?);
                }
            }
            found.retain(|k| seen.insert(k.clone()));
            if found.is_empty() {
                break;
            }
            found.truncate(MAX_INCLUDED.saturating_sub(included.len()));
            let resources = Self::fetch_current(conn, tenant, &found).await?;
            frontier = resources.iter().map(|r| r.key.clone()).collect();
            included.extend(resources);
            if included.len() >= MAX_INCLUDED {
                break;
            }
        }
        Ok(included)
    }
}
