-- Sorts by a date walk its index in the sort's own order and stop when the page is full: the
-- lowest instants ascending with ties by id, the highest descending with ties by id ascending.
-- Range criteria read the same columns.
DROP INDEX search_date_lookup;
CREATE INDEX search_date_lookup ON search_date (tenant, resource_type, param, low, id, high);
CREATE INDEX search_date_high ON search_date (tenant, resource_type, param, high DESC, id);
