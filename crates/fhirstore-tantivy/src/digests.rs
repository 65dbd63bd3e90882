//! Digests: the segment and root digests the reconciler compares, computed from the held
//! documents' columns, and the keys of a segment.

use super::*;

/// Folds the matching documents' element hashes into digest segments from the three digest fast
/// fields alone: the cold computation of a type's digests reads no ids and no bodies. The fruit
/// is one digest per digest segment (all 65,536) and the number of documents lacking a field.
pub(crate) struct DigestCollector;

/// [`DigestCollector`] over one index segment.
pub(crate) struct DigestSegmentCollector {
    segment: tantivy::columnar::Column<u64>,
    e_hi: tantivy::columnar::Column<u64>,
    e_lo: tantivy::columnar::Column<u64>,
    by: Vec<Digest>,
    missing: u64,
}

impl tantivy::collector::Collector for DigestCollector {
    type Fruit = (Vec<Digest>, u64);
    type Child = DigestSegmentCollector;

    fn for_segment(
        &self,
        _ord: tantivy::SegmentOrdinal,
        reader: &tantivy::SegmentReader,
    ) -> tantivy::Result<DigestSegmentCollector> {
        let ff = reader.fast_fields();
        Ok(DigestSegmentCollector {
            segment: ff.u64("segment")?,
            e_hi: ff.u64("e_hi")?,
            e_lo: ff.u64("e_lo")?,
            by: vec![Digest::default(); fhirstore_core::digest::SEGMENTS as usize],
            missing: 0,
        })
    }

    fn requires_scoring(&self) -> bool {
        false
    }

    fn merge_fruits(&self, fruits: Vec<(Vec<Digest>, u64)>) -> tantivy::Result<(Vec<Digest>, u64)> {
        let mut out = vec![Digest::default(); fhirstore_core::digest::SEGMENTS as usize];
        let mut missing = 0;
        for (by, m) in fruits {
            missing += m;
            for (o, d) in out.iter_mut().zip(by) {
                o.merge(d);
            }
        }
        Ok((out, missing))
    }
}

impl tantivy::collector::SegmentCollector for DigestSegmentCollector {
    type Fruit = (Vec<Digest>, u64);

    fn collect(&mut self, doc: tantivy::DocId, _score: tantivy::Score) {
        let (Some(s), Some(hi), Some(lo)) = (
            self.segment.first(doc),
            self.e_hi.first(doc),
            self.e_lo.first(doc),
        ) else {
            self.missing += 1;
            return;
        };
        match self.by.get_mut(s as usize) {
            Some(d) => d.add((u128::from(hi) << 64) | u128::from(lo)),
            None => self.missing += 1,
        }
    }

    fn harvest(self) -> (Vec<Digest>, u64) {
        (self.by, self.missing)
    }
}

#[async_trait]
impl DigestView for TantivySecondary {
    async fn root_digest(&self, tenant: &TenantId, resource_type: ResourceType) -> Result<Digest> {
        let tenant = tenant.clone();
        self.blocking(move |inner| {
            let mut d = Digest::default();
            for s in inner.type_digests(&tenant, resource_type)?.into_values() {
                d.merge(s);
            }
            Ok(d)
        })
        .await
    }

    async fn segment_digests(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
    ) -> Result<Vec<SegmentDigest>> {
        let tenant = tenant.clone();
        self.blocking(move |inner| {
            Ok(inner
                .type_digests(&tenant, resource_type)?
                .into_iter()
                .map(|(segment, digest)| SegmentDigest { segment, digest })
                .collect())
        })
        .await
    }

    async fn segment_keys(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
        segments: &[u16],
    ) -> Result<Vec<KeyState>> {
        let tenant = tenant.clone();
        let segments = segments.to_vec();
        self.blocking(move |inner| {
            let mut out = inner
                .all_of_type(&tenant, resource_type, Some(&segments))?
                .into_iter()
                .map(|m| {
                    Ok(KeyState {
                        id: LogicalId::new(m.id.as_str()).map_err(index_err)?,
                        version: VersionId::new(m.version).ok_or_else(|| index_err("version 0"))?,
                        e: m.e,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            out.sort();
            Ok(out)
        })
        .await
    }
}

impl Inner {
    /// Every document of a tenant's type, tombstones included.
    pub(crate) fn all_of_type(
        &self,
        tenant: &TenantId,
        rt: ResourceType,
        segments: Option<&[u16]>,
    ) -> Result<Vec<Meta>> {
        self.commit_if_pending()?;
        self.scan_type(tenant, rt, segments)
    }

    /// The (tenant, type) segment digests: kept, or computed by one scan and kept.
    pub(crate) fn type_digests(
        &self,
        tenant: &TenantId,
        rt: ResourceType,
    ) -> Result<BTreeMap<u16, Digest>> {
        let mut w = self.writer.lock();
        let key = (tenant.clone(), rt);
        if let Some(d) = self.digests.lock().get(&key) {
            return Ok(d.clone());
        }
        if !w.pending.is_empty() {
            self.commit(&mut w)?;
        }
        let scope: Vec<(Occur, Box<dyn Query>)> = self
            .scope(tenant, rt)
            .into_iter()
            .map(|q| (Occur::Must, q))
            .collect();
        let (segments, missing) = self
            .searcher()
            .search(&BooleanQuery::new(scope), &DigestCollector)
            .map_err(index_err)?;
        if missing > 0 {
            return Err(index_err(format!(
                "{missing} documents of {tenant}/{rt} lack their digest fast fields"
            )));
        }
        let by: BTreeMap<u16, Digest> = segments
            .into_iter()
            .enumerate()
            .filter(|(_, d)| d.count != 0)
            .filter_map(|(s, d)| Some((u16::try_from(s).ok()?, d)))
            .collect();
        self.digests.lock().insert(key, by.clone());
        Ok(by)
    }

    /// [`Self::all_of_type`] over what is committed.
    pub(crate) fn scan_type(
        &self,
        tenant: &TenantId,
        rt: ResourceType,
        segments: Option<&[u16]>,
    ) -> Result<Vec<Meta>> {
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = self
            .scope(tenant, rt)
            .into_iter()
            .map(|q| (Occur::Must, q))
            .collect();
        if let Some(segs) = segments {
            clauses.push((
                Occur::Must,
                any_of(
                    segs.iter()
                        .map(|s| term_query(Term::from_field_u64(self.f.segment, u64::from(*s))))
                        .collect(),
                ),
            ));
        }
        let searcher = self.searcher();
        let cols = columns(&searcher)?;
        if segments.is_some_and(<[u16]>::is_empty) {
            return Ok(Vec::new());
        }
        searcher
            .search(&BooleanQuery::new(clauses), &DocSetCollector)
            .map_err(index_err)?
            .into_iter()
            .map(|a| meta(&cols, a))
            .collect()
    }
}
