-- R4 Subscriptions: each one's spec as the matcher last read it, its event counter and
-- delivery progress, and the lease that lets one process at a time deliver it (which keeps its
-- events in order).
CREATE TABLE subscription_state (
    tenant        TEXT    NOT NULL,
    id            TEXT    NOT NULL,
    version       BIGINT  NOT NULL,
    status        TEXT    NOT NULL,
    spec          TEXT    NOT NULL,
    events        BIGINT  NOT NULL DEFAULT 0,
    delivered     BIGINT  NOT NULL DEFAULT 0,
    failures      BIGINT  NOT NULL DEFAULT 0,
    failing_since BIGINT  NOT NULL DEFAULT 0,
    next_attempt  BIGINT  NOT NULL DEFAULT 0,
    last_sent     BIGINT  NOT NULL DEFAULT 0,
    heartbeat_due BIGINT  NOT NULL DEFAULT 0,
    last_error    TEXT,
    holder        TEXT,
    lease_until   BIGINT  NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, id)
);

-- Deliveries look for active subscriptions with something due.
CREATE INDEX subscription_due ON subscription_state (status, next_attempt);

-- Each subscription's events, numbered from 1 without gaps, so a notification sent again
-- carries the same number and `$events` replays any range.
CREATE TABLE subscription_events (
    tenant        TEXT    NOT NULL,
    id            TEXT    NOT NULL,
    number        BIGINT  NOT NULL,
    resource_type TEXT    NOT NULL,
    resource_id   TEXT    NOT NULL,
    version       BIGINT  NOT NULL,
    deleted       BOOLEAN NOT NULL,
    at            BIGINT  NOT NULL,
    recorded_at   BIGINT  NOT NULL,
    PRIMARY KEY (tenant, id, number)
);
