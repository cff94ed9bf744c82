-- Exact payloads: `payload` and `metadata` keep the producer's JSON text
-- byte for byte (json, not jsonb: jsonb re-encodes numbers, orders keys and
-- cannot hold \u0000). PostgreSQL still checks that each is valid JSON and
-- its json operators (->, ->>, json_each) work on them; cast to jsonb in a
-- query for containment and indexing. Existing rows keep their jsonb text.
ALTER TABLE events
    ALTER COLUMN payload TYPE json USING payload::json,
    ALTER COLUMN metadata TYPE json USING metadata::json;
