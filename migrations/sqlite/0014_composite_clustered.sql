-- search_composite was a rowid table with an owner index and a lookup index: three copies of
-- each row. Clustered by its owner like the other index tables (WITHOUT ROWID), it keeps two.
-- The key is the whole row, which is unique but for values that differ only in a precision
-- range the table does not keep; such rows are inserted once (INSERT OR IGNORE).
CREATE TABLE search_composite_clustered (
    tenant        TEXT    NOT NULL,
    resource_type TEXT    NOT NULL,
    id            TEXT    NOT NULL,
    param         TEXT    NOT NULL,
    grp           INTEGER NOT NULL,
    comp          INTEGER NOT NULL,
    system        TEXT    NOT NULL, -- token, quantity
    code          TEXT    NOT NULL, -- token, quantity
    folded        TEXT    NOT NULL, -- string
    exact         TEXT    NOT NULL, -- string
    low           INTEGER NOT NULL, -- date
    high          INTEGER NOT NULL, -- date
    value         REAL    NOT NULL, -- number, quantity
    unit          TEXT    NOT NULL, -- quantity
    target_type   TEXT    NOT NULL, -- reference
    target_id     TEXT    NOT NULL, -- reference
    url           TEXT    NOT NULL, -- reference
    version       TEXT    NOT NULL, -- reference
    uri           TEXT    NOT NULL, -- uri
    PRIMARY KEY (tenant, resource_type, id, param, grp, comp, system, code, folded, exact, low,
                 high, value, unit, target_type, target_id, url, version, uri)
) WITHOUT ROWID;
INSERT OR IGNORE INTO search_composite_clustered
    SELECT tenant, resource_type, id, param, grp, comp, system, code, folded, exact, low, high,
           value, unit, target_type, target_id, url, version, uri
    FROM search_composite;
DROP TABLE search_composite;
ALTER TABLE search_composite_clustered RENAME TO search_composite;
-- The first component is a token in every R4 composite but one.
CREATE INDEX search_composite_lookup ON search_composite (tenant, resource_type, param, comp, code, id);
