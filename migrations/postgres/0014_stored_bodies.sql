-- Bodies are stored as bytes: deflated against a fixed dictionary behind a format byte, or the
-- JSON text itself (see the `body` module). Existing bodies become the bytes of their text,
-- which reads as the second form.
ALTER TABLE resource_versions ALTER COLUMN body TYPE bytea USING convert_to(body, 'UTF8');
