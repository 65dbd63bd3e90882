-- A tenant's own SearchParameters, each with its reindex job. A SearchParameter resource with
-- status active registers here in the same transaction that writes it; retiring or deleting it
-- turns its row to 'removing'. Writes index 'reindexing' and 'active' parameters; searches see
-- 'active' ones only, so a parameter is never searched before every resource has its rows.
CREATE TABLE search_parameters (
    tenant      TEXT    NOT NULL,
    url         TEXT    NOT NULL,
    code        TEXT    NOT NULL,
    resource_id TEXT    NOT NULL, -- the SearchParameter resource that registered it
    body        TEXT    NOT NULL, -- that resource, as JSON
    state       TEXT    NOT NULL, -- 'reindexing' | 'active' | 'removing'
    pos_type    TEXT    NOT NULL, -- the job's position: the last (type, id) done; '' before any
    pos_id      TEXT    NOT NULL,
    processed   BIGINT  NOT NULL, -- resources the job has rewritten
    total       BIGINT  NOT NULL, -- live resources of its base types when the job started
    PRIMARY KEY (tenant, url)
);
CREATE INDEX search_parameters_resource ON search_parameters (tenant, resource_id);

-- Moves whenever a tenant's parameters change, so a process knows its cached copy is stale.
CREATE TABLE search_parameter_generation (
    tenant      TEXT    NOT NULL PRIMARY KEY,
    generation  BIGINT  NOT NULL
);
