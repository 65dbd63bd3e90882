-- Rows one parameter shares with others are no longer stored: a search for the parameter reads
-- its parts' rows instead (see `SharedRows` in fhirstore-core). R4's Observation combo-*
-- parameters are the union of their plain and component parameters, and phonetic the same
-- rows as name; what earlier writes stored under these names goes. The list is what
-- `SharedRows::r4()` derives from the R4 definitions, which a test checks.
DELETE FROM search_token WHERE resource_type = 'Observation' AND param IN (
    'combo-code', 'combo-data-absent-reason', 'combo-value-concept',
    'combo-code:of-type', 'combo-data-absent-reason:of-type', 'combo-value-concept:of-type');
DELETE FROM search_token WHERE resource_type = 'CapabilityStatement' AND param IN (
    'version', 'version:of-type');
DELETE FROM search_string WHERE resource_type = 'Observation' AND param IN (
    'combo-code:text', 'combo-data-absent-reason:text', 'combo-value-concept:text');
DELETE FROM search_string WHERE resource_type = 'CapabilityStatement' AND param = 'version:text';
DELETE FROM search_string WHERE resource_type IN ('Patient', 'Person', 'Practitioner', 'RelatedPerson')
    AND param = 'phonetic';
DELETE FROM search_quantity WHERE resource_type = 'Observation' AND param = 'combo-value-quantity';
DELETE FROM search_uri WHERE resource_type = 'CodeSystem' AND param = 'url';
DELETE FROM search_composite WHERE resource_type = 'Observation' AND param IN (
    'combo-code-value-concept', 'combo-code-value-quantity');
