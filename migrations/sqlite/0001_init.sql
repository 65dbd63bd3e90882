-- fhirstore primary schema, SQLite dialect. Every table leads with the tenant.

-- The current state of each resource: which version is live, and its digest element.
-- The body lives only in resource_versions; reads fetch it by primary key there.
CREATE TABLE resources (
    tenant        TEXT    NOT NULL,
    resource_type TEXT    NOT NULL,
    id            TEXT    NOT NULL,
    version       INTEGER NOT NULL,
    last_updated  INTEGER NOT NULL, -- microseconds since the Unix epoch, UTC
    deleted       INTEGER NOT NULL,
    segment       INTEGER NOT NULL, -- digest segment, 0..65535
    e_hi          INTEGER NOT NULL, -- element hash, high 64 bits
    e_lo          INTEGER NOT NULL, -- element hash, low 64 bits
    PRIMARY KEY (tenant, resource_type, id)
) WITHOUT ROWID;
CREATE INDEX resources_segment ON resources (tenant, resource_type, segment);
-- Search only ever wants live rows; the partial index also keeps it out of the planner's way
-- for primary-key lookups, which never carry this predicate.
CREATE INDEX resources_last_updated ON resources (tenant, resource_type, last_updated)
    WHERE NOT deleted;

-- Every version, tombstones included (body NULL). seq is the outbox sequence number of the
-- write that produced the version: a total order for history paging.
CREATE TABLE resource_versions (
    tenant        TEXT    NOT NULL,
    resource_type TEXT    NOT NULL,
    id            TEXT    NOT NULL,
    version       INTEGER NOT NULL,
    seq           INTEGER NOT NULL,
    last_updated  INTEGER NOT NULL,
    deleted       INTEGER NOT NULL,
    body          TEXT,
    PRIMARY KEY (tenant, resource_type, id, version)
);
CREATE INDEX resource_versions_type_seq ON resource_versions (tenant, resource_type, seq);
CREATE INDEX resource_versions_seq ON resource_versions (tenant, seq);

-- Token search index (system|code) of current versions. Index tables are clustered by their
-- owning resource (WITHOUT ROWID, key leading with tenant, type, id): a write replaces its rows
-- through the key, and each row costs two B-tree entries instead of three.
CREATE TABLE search_token (
    tenant        TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    id            TEXT NOT NULL,
    param         TEXT NOT NULL,
    system        TEXT NOT NULL, -- '' when the value has no system
    code          TEXT NOT NULL,
    PRIMARY KEY (tenant, resource_type, id, param, system, code)
) WITHOUT ROWID;
CREATE INDEX search_token_lookup ON search_token (tenant, resource_type, param, code, system, id);

-- The transactional outbox: one row per written version, in commit order. Secondaries learn of
-- changes only from here.
CREATE TABLE outbox (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant        TEXT    NOT NULL,
    resource_type TEXT    NOT NULL,
    id            TEXT    NOT NULL,
    version       INTEGER NOT NULL,
    op            TEXT    NOT NULL, -- 'create' | 'update' | 'delete'
    created_at    INTEGER NOT NULL
);

-- XOR segment digests of current versions, maintained in every write transaction.
CREATE TABLE digests (
    tenant        TEXT    NOT NULL,
    resource_type TEXT    NOT NULL,
    segment       INTEGER NOT NULL,
    h_hi          INTEGER NOT NULL,
    h_lo          INTEGER NOT NULL,
    count         INTEGER NOT NULL,
    PRIMARY KEY (tenant, resource_type, segment)
) WITHOUT ROWID;
