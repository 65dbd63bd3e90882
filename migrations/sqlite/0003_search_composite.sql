-- Composite parameters (R4 search §3.1.1.4.9): one row per value of one component, with the
-- element it came from (`grp`), so a search joins the components of the same element. Columns
-- carry the names of the per-type tables' columns, so each component is matched by the same
-- predicate as a plain parameter of its type; the columns a type does not use stay empty.
-- Rows are replaced as a whole with their resource's current version, like the other tables,
-- and exact duplicates are removed before insertion, so no key is needed beyond the indexes.
CREATE TABLE search_composite (
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
    uri           TEXT    NOT NULL  -- uri
);
-- The owner: replacing a resource's rows, and joining a group's other components.
CREATE INDEX search_composite_owner ON search_composite (tenant, resource_type, id, param, grp, comp);
-- The first component is a token in every R4 composite but one.
CREATE INDEX search_composite_lookup ON search_composite (tenant, resource_type, param, comp, code, id);
