-- Index tables for the remaining R4 search parameter types. Rows belong to current versions
-- only; each write replaces its resource's rows. Every table and index leads with the tenant.

CREATE TABLE search_string (
    tenant        TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    param         TEXT NOT NULL,
    folded        TEXT COLLATE "C" NOT NULL, -- lower case, accents removed; bytewise for prefix ranges
    exact         TEXT NOT NULL, -- as written: :exact
    id            TEXT NOT NULL
);
CREATE INDEX search_string_lookup ON search_string (tenant, resource_type, param, folded, id);
CREATE INDEX search_string_owner ON search_string (tenant, resource_type, id);

CREATE TABLE search_date (
    tenant        TEXT    NOT NULL,
    resource_type TEXT    NOT NULL,
    param         TEXT    NOT NULL,
    low           BIGINT  NOT NULL, -- microseconds, inclusive
    high          BIGINT  NOT NULL, -- microseconds, exclusive
    id            TEXT    NOT NULL
);
CREATE INDEX search_date_lookup ON search_date (tenant, resource_type, param, low, high, id);
CREATE INDEX search_date_owner ON search_date (tenant, resource_type, id);

-- Numbers (system, code and unit empty) and quantities.
CREATE TABLE search_quantity (
    tenant        TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    param         TEXT NOT NULL,
    value         DOUBLE PRECISION NOT NULL,
    low           DOUBLE PRECISION NOT NULL,
    high          DOUBLE PRECISION NOT NULL,
    system        TEXT NOT NULL,
    code          TEXT NOT NULL,
    unit          TEXT NOT NULL,
    id            TEXT NOT NULL
);
CREATE INDEX search_quantity_lookup ON search_quantity (tenant, resource_type, param, value, id);
CREATE INDEX search_quantity_owner ON search_quantity (tenant, resource_type, id);

CREATE TABLE search_reference (
    tenant        TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    param         TEXT NOT NULL,
    target_type   TEXT NOT NULL, -- '' when the reference names no type
    target_id     TEXT NOT NULL, -- '' for non-literal references
    url           TEXT NOT NULL,
    version       TEXT NOT NULL,
    id            TEXT NOT NULL
);
CREATE INDEX search_reference_lookup ON search_reference (tenant, resource_type, param, target_id, target_type, id);
CREATE INDEX search_reference_url ON search_reference (tenant, resource_type, param, url, id);
-- Reverse lookups (_revinclude, _has): who points at this resource?
CREATE INDEX search_reference_target ON search_reference (tenant, target_type, target_id);
CREATE INDEX search_reference_owner ON search_reference (tenant, resource_type, id);

CREATE TABLE search_uri (
    tenant        TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    param         TEXT NOT NULL,
    uri           TEXT COLLATE "C" NOT NULL,
    id            TEXT NOT NULL
);
CREATE INDEX search_uri_lookup ON search_uri (tenant, resource_type, param, uri, id);
CREATE INDEX search_uri_owner ON search_uri (tenant, resource_type, id);
