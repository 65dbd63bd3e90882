-- Bounded date ranges. A row's span (high - low) bounds how far before a searched range a
-- matching row can start, so `date=ge…&date=lt…` on one parameter reads one range of
-- `search_date_lookup` instead of every row after its lower bound. Halves, because open
-- periods run from i64::MIN or to i64::MAX and the whole difference would overflow.
CREATE INDEX search_date_span ON search_date (tenant, resource_type, param, (high / 2 - low / 2));

-- The parameters for which some resource has more than one date row. Only where none does can
-- several criteria on one parameter be taken as one row's range; a flag is set by the write that
-- makes it true and never cleared.
CREATE TABLE search_date_multi (
    tenant        TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    param         TEXT NOT NULL,
    PRIMARY KEY (tenant, resource_type, param)
) WITHOUT ROWID;
INSERT INTO search_date_multi (tenant, resource_type, param)
    SELECT DISTINCT tenant, resource_type, param FROM search_date
    GROUP BY tenant, resource_type, id, param HAVING COUNT(*) > 1;
