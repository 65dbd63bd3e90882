-- Sync consumers (one per secondary): the durable cursor into the outbox, the lease that lets
-- one process at a time drain it, and a backfill in progress (JSON).
CREATE TABLE sync_consumers (
    name        TEXT    PRIMARY KEY,
    major       BIGINT  NOT NULL DEFAULT 0,
    minor       BIGINT  NOT NULL DEFAULT 0,
    holder      TEXT,
    lease_until BIGINT  NOT NULL DEFAULT 0,
    backfill    TEXT,
    updated_at  BIGINT  NOT NULL DEFAULT 0
);

-- Changes a consumer refused for good and set aside, so it could go on. `seq` is 0 for a
-- change met during a backfill, which streams current rows rather than outbox entries.
CREATE TABLE sync_dead_letters (
    consumer      TEXT    NOT NULL,
    seq           BIGINT  NOT NULL,
    tenant        TEXT    NOT NULL,
    resource_type TEXT    NOT NULL,
    id            TEXT    NOT NULL,
    version       BIGINT  NOT NULL,
    error         TEXT    NOT NULL,
    created_at    BIGINT  NOT NULL,
    PRIMARY KEY (consumer, tenant, resource_type, id, version)
);

-- The log is read in (transaction id, seq) order below the oldest running transaction.
CREATE INDEX outbox_log ON outbox (txid, seq);
