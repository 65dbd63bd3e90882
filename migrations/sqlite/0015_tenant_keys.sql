-- Search-index rows hold a short key for their tenant instead of its name. The name was the
-- widest column of every index row, stored in both copies of each (the table and its lookup
-- index): 30 of 85 bytes of a token row with the bench's tenants, about a quarter of the file.
-- A key is `.` and a number, which no tenant name can equal (names are letters, digits and
-- `-`), so keys and names never collide, here or in the index tables while this runs.
-- `resources`, `resource_versions` and the other tables keep the name. PostgreSQL keeps the
-- name in index rows too: its schema is distributed by tenant, and a row must sit in its
-- resource's shard.
CREATE TABLE tenant_keys (
    tenant TEXT NOT NULL PRIMARY KEY,
    key    TEXT NOT NULL UNIQUE
) WITHOUT ROWID;

INSERT INTO tenant_keys (tenant, key)
    SELECT tenant, '.' || ROW_NUMBER() OVER (ORDER BY tenant)
    FROM (SELECT tenant FROM resources UNION SELECT tenant FROM search_parameters);

UPDATE search_token SET tenant = (SELECT k.key FROM tenant_keys k WHERE k.tenant = search_token.tenant);
UPDATE search_string SET tenant = (SELECT k.key FROM tenant_keys k WHERE k.tenant = search_string.tenant);
UPDATE search_date SET tenant = (SELECT k.key FROM tenant_keys k WHERE k.tenant = search_date.tenant);
UPDATE search_quantity SET tenant = (SELECT k.key FROM tenant_keys k WHERE k.tenant = search_quantity.tenant);
UPDATE search_reference SET tenant = (SELECT k.key FROM tenant_keys k WHERE k.tenant = search_reference.tenant);
UPDATE search_uri SET tenant = (SELECT k.key FROM tenant_keys k WHERE k.tenant = search_uri.tenant);
UPDATE search_composite SET tenant = (SELECT k.key FROM tenant_keys k WHERE k.tenant = search_composite.tenant);
