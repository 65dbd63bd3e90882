-- Cross-process read fences. A process that failed to apply a change synchronously raises the
-- consumer's fence to that change's log position; every process serving reads from the
-- secondary holds a short lease, renewed by acknowledging the fence, and serves no reads while
-- its known cursor is behind it.
CREATE TABLE sync_read_fences (
    consumer TEXT    PRIMARY KEY,
    major    INTEGER NOT NULL,
    minor    INTEGER NOT NULL
);

CREATE TABLE sync_readers (
    consumer   TEXT    NOT NULL,
    holder     TEXT    NOT NULL,
    expires_at INTEGER NOT NULL,
    seen_major INTEGER NOT NULL,
    seen_minor INTEGER NOT NULL,
    PRIMARY KEY (consumer, holder)
);
