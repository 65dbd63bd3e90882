-- Index tables for the remaining R4 search parameter types. Rows belong to current versions
-- only; each write replaces its resource's rows. Every table and index leads with the tenant.
-- Like search_token, each is clustered by its owner (see 0001).

CREATE TABLE search_string (
    tenant        TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    id            TEXT NOT NULL,
    param         TEXT NOT NULL,
    folded        TEXT NOT NULL, -- lower case, accents removed: default and :contains
    exact         TEXT NOT NULL, -- as written: :exact
    PRIMARY KEY (tenant, resource_type, id, param, folded, exact)
) WITHOUT ROWID;
CREATE INDEX search_string_lookup ON search_string (tenant, resource_type, param, folded, id);

CREATE TABLE search_date (
    tenant        TEXT    NOT NULL,
    resource_type TEXT    NOT NULL,
    id            TEXT    NOT NULL,
    param         TEXT    NOT NULL,
    low           INTEGER NOT NULL, -- microseconds, inclusive
    high          INTEGER NOT NULL, -- microseconds, exclusive
    PRIMARY KEY (tenant, resource_type, id, param, low, high)
) WITHOUT ROWID;
CREATE INDEX search_date_lookup ON search_date (tenant, resource_type, param, low, high, id);

-- Numbers (system, code and unit empty) and quantities.
CREATE TABLE search_quantity (
    tenant        TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    id            TEXT NOT NULL,
    param         TEXT NOT NULL,
    value         REAL NOT NULL,
    low           REAL NOT NULL,
    high          REAL NOT NULL,
    system        TEXT NOT NULL,
    code          TEXT NOT NULL,
    unit          TEXT NOT NULL,
    PRIMARY KEY (tenant, resource_type, id, param, value, low, high, system, code, unit)
) WITHOUT ROWID;
CREATE INDEX search_quantity_lookup ON search_quantity (tenant, resource_type, param, value, id);

CREATE TABLE search_reference (
    tenant        TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    id            TEXT NOT NULL,
    param         TEXT NOT NULL,
    target_type   TEXT NOT NULL, -- '' when the reference names no type
    target_id     TEXT NOT NULL, -- '' for non-literal references
    url           TEXT NOT NULL,
    version       TEXT NOT NULL,
    PRIMARY KEY (tenant, resource_type, id, param, target_type, target_id, url, version)
) WITHOUT ROWID;
CREATE INDEX search_reference_lookup ON search_reference (tenant, resource_type, param, target_id, target_type, id);
CREATE INDEX search_reference_url ON search_reference (tenant, resource_type, param, url, id);
-- Reverse lookups (_revinclude, _has): who points at this resource?
CREATE INDEX search_reference_target ON search_reference (tenant, target_type, target_id);

CREATE TABLE search_uri (
    tenant        TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    id            TEXT NOT NULL,
    param         TEXT NOT NULL,
    uri           TEXT NOT NULL,
    PRIMARY KEY (tenant, resource_type, id, param, uri)
) WITHOUT ROWID;
CREATE INDEX search_uri_lookup ON search_uri (tenant, resource_type, param, uri, id);
