//! Digests: the root, group and segment digests the script maintains with every apply, the
//! keys of a segment, and the deep scrub that checks them against the held documents.

use super::*;

pub(crate) fn parse_digest(text: &str) -> Result<Digest> {
    match parse_words(text) {
        Some((hash, rest)) if rest.len() == 1 => Ok(Digest {
            hash,
            count: rest[0],
        }),
        _ => Err(bad_data(format!("digest {text:?}"))),
    }
}

/// What a deep scrub found wrong with one document.
pub(crate) enum Damage {
    Lost,
    Corrupted,
    Unreadable,
}

/// Checks one row of `scrub_read.lua` (`status, v, e, d, b, lu`): the element hash the body
/// hashes to again, or what is wrong with it.
pub(crate) fn scrub_row(
    tenant: &TenantId,
    rt: ResourceType,
    id: &LogicalId,
    row: &[String],
) -> std::result::Result<u128, Damage> {
    let [status, v, e, d, b, lu] = row else {
        return Err(match row.first().map(String::as_str) {
            Some("missing") => Damage::Lost,
            _ => Damage::Unreadable,
        });
    };
    if status != "ok" {
        return Err(Damage::Unreadable);
    }
    let version = parse_version(v, rt, id.as_str()).map_err(|_| Damage::Unreadable)?;
    let kept = parse_words(e)
        .filter(|(_, rest)| rest.is_empty())
        .map(|(hash, _)| hash)
        .ok_or(Damage::Unreadable)?;
    let last_updated = lu.parse::<i64>().map_err(|_| Damage::Unreadable)?;
    let content = match d.as_str() {
        "1" => None,
        "0" => Some(serde_json::from_str::<Value>(b).map_err(|_| Damage::Unreadable)?),
        _ => return Err(Damage::Unreadable),
    };
    let again = Change {
        tenant: tenant.clone(),
        key: ResourceKey {
            resource_type: rt,
            id: id.clone(),
        },
        version,
        last_updated: from_micros(last_updated),
        content,
    }
    .element_hash();
    if again == kept {
        Ok(kept)
    } else {
        Err(Damage::Corrupted)
    }
}

#[async_trait]
impl DigestView for RedisSecondary {
    async fn root_digest(&self, tenant: &TenantId, resource_type: ResourceType) -> Result<Digest> {
        let mut pipe = redis::pipe();
        pipe.cmd("HGET")
            .arg(format!("{}g:{resource_type}", self.base(tenant)))
            .arg("r");
        let replies = self.run(&pipe).await?;
        match replies.first().and_then(text) {
            None => Ok(Digest::default()),
            Some(t) => parse_digest(&t),
        }
    }

    async fn segment_digests(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
    ) -> Result<Vec<SegmentDigest>> {
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL")
            .arg(format!("{}g:{resource_type}", self.base(tenant)));
        let replies = self.run(&pipe).await?;
        let reply = replies
            .first()
            .ok_or_else(|| bad_data("segment digests reply"))?;
        Ok(hash_fields(reply)?
            .into_iter()
            .map(|(segment, digest)| SegmentDigest { segment, digest })
            .collect())
    }

    async fn group_digests(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
    ) -> Result<Vec<GroupDigest>> {
        let base = self.base(tenant);
        let digests = format!("{base}g:{resource_type}");
        let groups = format!("{base}gg:{resource_type}");
        let (root, found) = self.root_and_groups(&digests, &groups).await?;
        let mut folded = Digest::default();
        found.iter().for_each(|g| folded.merge(g.digest));
        if folded == root {
            return Ok(found);
        }
        // Groups that disagree with the root were written before groups existed, or damaged:
        // rebuild them from the segments, atomically, and read them again.
        tracing::info!(%tenant, %resource_type, "redis group digests disagree with the root; rebuilding them");
        let mut pipe = redis::pipe();
        Self::evalsha(&mut pipe, &self.regroup, &[&digests, &groups], &[]);
        self.run(&pipe).await?;
        Ok(self.root_and_groups(&digests, &groups).await?.1)
    }

    async fn segment_digests_in(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
        groups: &[u16],
    ) -> Result<Vec<SegmentDigest>> {
        if groups.is_empty() {
            return Ok(Vec::new());
        }
        let fields: Vec<u16> = groups
            .iter()
            .flat_map(|g| fhirstore_core::digest::group_segments(*g))
            .collect();
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET")
            .arg(format!("{}g:{resource_type}", self.base(tenant)))
            .arg(&fields);
        let replies = self.run(&pipe).await?;
        let Some(RValue::Array(values)) = replies.first() else {
            return Err(bad_data("segment digests reply"));
        };
        let mut out = Vec::new();
        for (segment, v) in fields.iter().zip(values) {
            if let Some(t) = text(v) {
                out.push(SegmentDigest {
                    segment: *segment,
                    digest: parse_digest(&t)?,
                });
            }
        }
        out.sort_by_key(|s| s.segment);
        Ok(out)
    }

    async fn segment_keys(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
        segments: &[u16],
    ) -> Result<Vec<KeyState>> {
        debug_assert!(segments.iter().all(|s| u32::from(*s) < SEGMENTS));
        let base = self.base(tenant);
        let mut pipe = redis::pipe();
        for s in segments {
            pipe.cmd("SMEMBERS")
                .arg(format!("{base}m:{resource_type}:{s}"));
        }
        let mut ids = BTreeSet::new();
        for r in self.run(&pipe).await? {
            let RValue::Array(members) = r else {
                return Err(bad_data("segment members"));
            };
            ids.extend(members.iter().filter_map(text));
        }
        let ids: Vec<String> = ids.into_iter().collect();
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(1000) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.cmd("HMGET")
                    .arg(format!("{base}d:{resource_type}:{id}"))
                    .arg(&["v", "e"]);
            }
            for (id, r) in chunk.iter().zip(self.run(&pipe).await?) {
                let RValue::Array(f) = r else {
                    return Err(bad_data("segment key"));
                };
                let f: Vec<Option<String>> = f.iter().map(text).collect();
                let [Some(v), Some(e)] = f.as_slice() else {
                    return Err(bad_data(format!("{resource_type}/{id} without version")));
                };
                let version = parse_version(v, resource_type, id)?;
                let e = parse_words(e)
                    .filter(|(_, rest)| rest.is_empty())
                    .ok_or_else(|| bad_data(format!("hash of {resource_type}/{id}")))?
                    .0;
                let id = LogicalId::new(id.as_str()).map_err(|_| bad_data("segment id"))?;
                out.push(KeyState { id, version, e });
            }
        }
        Ok(out)
    }
}

impl RedisSecondary {
    /// The (tenant, type) root and group digests, read atomically so no apply falls between.
    pub(crate) async fn root_and_groups(
        &self,
        digests: &str,
        groups: &str,
    ) -> Result<(Digest, Vec<GroupDigest>)> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("HGET").arg(digests).arg("r");
        pipe.cmd("HGETALL").arg(groups);
        let replies = self.run(&pipe).await?;
        let root = match replies.first().and_then(text) {
            None => Digest::default(),
            Some(t) => parse_digest(&t)?,
        };
        let fields = replies
            .get(1)
            .ok_or_else(|| bad_data("group digests reply"))?;
        let groups = hash_fields(fields)?
            .into_iter()
            .map(|(group, digest)| GroupDigest { group, digest })
            .collect();
        Ok((root, groups))
    }

    /// Scrubs one chunk of segments; see [`Secondary::scrub`].
    pub(crate) async fn scrub_chunk(
        &self,
        tenant: &TenantId,
        rt: ResourceType,
        segments: &[u16],
        fix: bool,
        out: &mut Scrub,
    ) -> Result<()> {
        let base = self.base(tenant);
        let digests = format!("{base}g:{rt}");
        let mut args = vec![base.clone(), rt.to_string()];
        args.extend(segments.iter().map(u16::to_string));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut pipe = redis::pipe();
        Self::evalsha(&mut pipe, &self.scrub_read, &[&digests], &args);
        let replies = self.run(&pipe).await?;
        let [RValue::Array(segs)] = replies.as_slice() else {
            return Err(bad_data("scrub reply"));
        };
        let mut fixes = redis::pipe();
        let mut pending = 0;
        for seg in segs {
            let RValue::Array(parts) = seg else {
                return Err(bad_data("scrub segment"));
            };
            let [number, maintained, RValue::Array(rows)] = parts.as_slice() else {
                return Err(bad_data("scrub segment"));
            };
            let number = text(number).ok_or_else(|| bad_data("scrub segment number"))?;
            let maintained = match text(maintained).as_deref() {
                None | Some("") => Digest::default(),
                // A maintained digest that does not parse is wrong by definition.
                Some(t) => parse_digest(t).unwrap_or(Digest { hash: 1, count: -1 }),
            };
            let mut held = Digest::default();
            let mut evict: Vec<String> = Vec::new();
            for row in rows {
                let RValue::Array(f) = row else {
                    return Err(bad_data("scrub row"));
                };
                let f: Vec<String> = f.iter().map(|v| text(v).unwrap_or_default()).collect();
                let Some(id) = f.first().and_then(|i| LogicalId::new(i.as_str()).ok()) else {
                    continue;
                };
                out.keys_read += 1;
                match scrub_row(tenant, rt, &id, &f[1..]) {
                    Ok(e) => held.merge(Digest { hash: e, count: 1 }),
                    Err(kind) => {
                        let seen = match kind {
                            Damage::Lost => {
                                out.lost.push(id.clone());
                                String::new()
                            }
                            Damage::Corrupted => {
                                out.corrupted.push(id.clone());
                                f.get(2).cloned().unwrap_or_default()
                            }
                            Damage::Unreadable => {
                                out.unreadable.push(id.clone());
                                f.get(2).cloned().unwrap_or_default()
                            }
                        };
                        evict.push(id.to_string());
                        evict.push(seen);
                    }
                }
            }
            if held == maintained && evict.is_empty() {
                continue;
            }
            out.segments_rewritten += 1;
            if fix {
                pending += 1;
                let mut args = vec![base.clone(), rt.to_string(), number];
                args.append(&mut evict);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                Self::evalsha(&mut fixes, &self.scrub_fix, &[&digests], &args);
            }
        }
        if pending > 0 {
            self.run(&fixes).await?;
        }
        Ok(())
    }
}
