-- Coarse digests: the XOR and count of each group of 16 digest segments (segment >> 4), kept in
-- the same write as the segment's. The reconciler compares these 4,096 rows per (tenant, type)
-- before it reads any segment. PostgreSQL computes them at read time with bit_xor; SQLite has
-- no XOR aggregate, so it keeps them. The store fills the table from `digests` when it opens a
-- database written before this table existed (SQL alone cannot fold XOR).
CREATE TABLE digest_groups (
    tenant        TEXT    NOT NULL,
    resource_type TEXT    NOT NULL,
    grp           INTEGER NOT NULL, -- 0..4095
    h_hi          INTEGER NOT NULL,
    h_lo          INTEGER NOT NULL,
    count         INTEGER NOT NULL,
    PRIMARY KEY (tenant, resource_type, grp)
) WITHOUT ROWID;
