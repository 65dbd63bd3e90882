-- Per-resource checks (a walk, or the criteria beside a driving set) probe an index table by
-- the resource's key and the parameter. The owner indexes held only (tenant, type, id), so
-- PostgreSQL preferred an index-only scan of the lookup index, reading every entry of the
-- value for each resource (`family=smith` with `gender=female` at 100k resources: 29-50 ms
-- for a page). Covering, they answer a probe from a handful of entries (1.5 ms), as SQLite's
-- tables clustered by owner do.
DROP INDEX search_token_owner;
CREATE INDEX search_token_owner ON search_token (tenant, resource_type, id, param, code, system);
DROP INDEX search_string_owner;
CREATE INDEX search_string_owner ON search_string (tenant, resource_type, id, param, folded, exact);
DROP INDEX search_date_owner;
CREATE INDEX search_date_owner ON search_date (tenant, resource_type, id, param, low, high);
DROP INDEX search_quantity_owner;
CREATE INDEX search_quantity_owner ON search_quantity
    (tenant, resource_type, id, param, value, system, code, unit, low, high);
DROP INDEX search_reference_owner;
CREATE INDEX search_reference_owner ON search_reference
    (tenant, resource_type, id, param, target_type, target_id, url, version);
DROP INDEX search_uri_owner;
CREATE INDEX search_uri_owner ON search_uri (tenant, resource_type, id, param, uri);
