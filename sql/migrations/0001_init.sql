-- Spool's schema lives in "spool". The migrator creates the schema and
-- spool.schema_migrations before it applies this file.
COMMENT ON SCHEMA spool IS 'Spool: batch and live LLM inference jobs, model registry and cost ledger';

-- spool.version() tells clients which schema generation they talk to.
CREATE OR REPLACE FUNCTION spool.schema_version() RETURNS text
LANGUAGE sql STABLE AS $$
  SELECT max(name) FROM spool.schema_migrations
$$;
