-- Reconcile jobs: the resolved plan (secondary, tenant, type steps, mode and cap), the next step
-- to run and the report so far, so a job stopped by a crash or a cancellation resumes.
CREATE TABLE reconcile_jobs (
    id         TEXT    PRIMARY KEY,
    plan       TEXT    NOT NULL,
    next_step  INTEGER NOT NULL,
    report     TEXT    NOT NULL,
    state      TEXT    NOT NULL,
    updated_at INTEGER NOT NULL
);
