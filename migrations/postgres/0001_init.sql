-- fhirstore primary schema, PostgreSQL dialect. Every table's key and every index leads with the
-- tenant, so the schema can be distributed by tenant (Citus) unchanged. The one exception is
-- outbox_seq (see below).

CREATE TABLE resources (
    tenant        TEXT     NOT NULL,
    resource_type TEXT     NOT NULL,
    id            TEXT     NOT NULL,
    version       BIGINT   NOT NULL,
    last_updated  BIGINT   NOT NULL, -- microseconds since the Unix epoch, UTC
    deleted       BOOLEAN  NOT NULL,
    segment       INTEGER  NOT NULL,
    e_hi          BIGINT   NOT NULL,
    e_lo          BIGINT   NOT NULL,
    PRIMARY KEY (tenant, resource_type, id)
);
CREATE INDEX resources_segment ON resources (tenant, resource_type, segment);
-- Search only ever wants live rows; the partial index also keeps it out of the planner's way
-- for primary-key lookups, which never carry this predicate.
CREATE INDEX resources_last_updated ON resources (tenant, resource_type, last_updated)
    WHERE NOT deleted;

CREATE TABLE resource_versions (
    tenant        TEXT    NOT NULL,
    resource_type TEXT    NOT NULL,
    id            TEXT    NOT NULL,
    version       BIGINT  NOT NULL,
    seq           BIGINT  NOT NULL,
    last_updated  BIGINT  NOT NULL,
    deleted       BOOLEAN NOT NULL,
    body          TEXT,
    PRIMARY KEY (tenant, resource_type, id, version)
);
CREATE INDEX resource_versions_type_seq ON resource_versions (tenant, resource_type, seq);
CREATE INDEX resource_versions_seq ON resource_versions (tenant, seq);

CREATE TABLE search_token (
    tenant        TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    param         TEXT NOT NULL,
    system        TEXT NOT NULL,
    code          TEXT NOT NULL,
    id            TEXT NOT NULL
);
CREATE INDEX search_token_lookup ON search_token (tenant, resource_type, param, code, system, id);
CREATE INDEX search_token_owner ON search_token (tenant, resource_type, id);

-- seq values are handed out in call order but become visible in commit order. txid lets the
-- outbox consumer read only below the oldest still-running transaction
-- (pg_snapshot_xmin(pg_current_snapshot())), so a slow transaction's entry is never skipped.
CREATE TABLE outbox (
    tenant        TEXT     NOT NULL,
    seq           BIGINT   GENERATED ALWAYS AS IDENTITY,
    resource_type TEXT     NOT NULL,
    id            TEXT     NOT NULL,
    version       BIGINT   NOT NULL,
    op            TEXT     NOT NULL,
    created_at    BIGINT   NOT NULL,
    txid          xid8     NOT NULL DEFAULT pg_current_xact_id(),
    PRIMARY KEY (tenant, seq)
);
-- The outbox is drained in global sequence order. This non-unique index is the one that does not
-- lead with the tenant; Citus keeps one per shard, so distribution is unaffected.
CREATE INDEX outbox_seq ON outbox (seq);

CREATE TABLE digests (
    tenant        TEXT    NOT NULL,
    resource_type TEXT    NOT NULL,
    segment       INTEGER NOT NULL,
    h_hi          BIGINT  NOT NULL,
    h_lo          BIGINT  NOT NULL,
    count         BIGINT  NOT NULL,
    PRIMARY KEY (tenant, resource_type, segment)
);
