-- A descending sort by a date walks its resources' highest instants in order (the lookup index
-- leads with the lowest, which an ascending sort walks).
CREATE INDEX search_date_high ON search_date (tenant, resource_type, param, high, id);
