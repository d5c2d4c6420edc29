-- The record of live requests, and job submission by tenant roles.
--
-- spool.live_requests holds one row per live HTTP request the scheduler
-- answered (scheduler/livelog.c writes them in batches, off the path of any
-- token). A tenant's database role sees only its own rows (row-level
-- security, as for jobs and requests in 0007); the scheduler connects as the
-- schema's owner and writes every tenant's.
--
-- spool.submit_job, called by a tenant's role, now defaults the tenant to
-- the caller's own and refuses any other with a clear error (before, it
-- defaulted to 'default' and the row-level security policy refused the row
-- with a generic message).

-- No foreign keys: a log row must never be refused (a key, model or worker
-- row is never deleted, and a request refused before its key was known has
-- no key or tenant at all).
CREATE TABLE spool.live_requests (
    id             bigserial PRIMARY KEY,
    at             timestamptz NOT NULL,   -- when the response ended (the scheduler's clock)
    key_id         bigint,                 -- spool.api_keys.id; NULL when no key was accepted
    tenant         text,                   -- NULL when no key was accepted
    model_id       bigint,                 -- the exact version that served it; NULL when none
    endpoint       text NOT NULL,          -- '/v1/chat/completions'
    status         smallint NOT NULL CHECK (status = 0 OR status BETWEEN 100 AND 599), -- 0: none sent
    tokens_in      int NOT NULL DEFAULT 0 CHECK (tokens_in >= 0),
    tokens_out     int NOT NULL DEFAULT 0 CHECK (tokens_out >= 0),
    ttft_ms        double precision,       -- time to first token; NULL when no token was sent
    latency_ms     double precision NOT NULL, -- headers in to last byte out
    worker_id      bigint,
    finish_reason  text
) WITH (autovacuum_vacuum_scale_factor = 0.05, autovacuum_analyze_scale_factor = 0.05);
-- Per-tenant time queries ("tenant X's requests over the last hour").
CREATE INDEX live_requests_tenant_at ON spool.live_requests (tenant, at);

ALTER TABLE spool.live_requests ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_own ON spool.live_requests
    USING (tenant = spool.session_tenant())
    WITH CHECK (tenant = spool.session_tenant());

-- As in 0007, plus reading the tenant's own live-request records.
CREATE OR REPLACE FUNCTION spool.grant_tenant_role(tenant text, role name) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = role) THEN
        RAISE EXCEPTION 'role "%" does not exist', role
            USING HINT = 'CREATE ROLE it first';
    END IF;
    INSERT INTO spool.tenants (name) VALUES (tenant) ON CONFLICT (name) DO NOTHING;
    UPDATE spool.tenants SET db_role = role WHERE name = tenant;
    EXECUTE format('GRANT USAGE ON SCHEMA spool TO %I', role);
    EXECUTE format('GRANT SELECT ON spool.models, spool.model_aliases, spool.tenants TO %I', role);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON spool.jobs, spool.requests TO %I', role);
    EXECUTE format('GRANT SELECT ON spool.job_status TO %I', role);
    EXECUTE format('GRANT SELECT ON spool.live_requests TO %I', role);
    EXECUTE format('GRANT USAGE ON ALL SEQUENCES IN SCHEMA spool TO %I', role);
END
$$;

-- Tenant roles granted before this migration get the new table too.
DO $$
DECLARE
    r name;
BEGIN
    FOR r IN SELECT db_role FROM spool.tenants t
              WHERE db_role IS NOT NULL AND EXISTS (SELECT 1 FROM pg_roles WHERE rolname = t.db_role)
    LOOP
        EXECUTE format('GRANT SELECT ON spool.live_requests TO %I', r);
    END LOOP;
END
$$;

-- As in 0002, except for the tenant: NULL (the new default) means the
-- caller's own tenant when the caller is a tenant's role, else 'default'. A
-- tenant's role naming another tenant is refused.
CREATE OR REPLACE FUNCTION spool.submit_job(model text, tenant text DEFAULT NULL, params jsonb DEFAULT '{}',
                                            priority int DEFAULT 0, deadline timestamptz DEFAULT NULL,
                                            idempotency_key text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    job bigint;
    mid bigint;
    own text := spool.session_tenant();
BEGIN
    IF own IS NOT NULL THEN
        IF submit_job.tenant IS NOT NULL AND submit_job.tenant <> own THEN
            RAISE EXCEPTION 'role "%" belongs to tenant "%" and cannot submit jobs for tenant "%"',
                current_user, own, submit_job.tenant
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'leave the tenant out (it defaults to your own) or connect as that tenant''s role';
        END IF;
        tenant := own;
    ELSIF submit_job.tenant IS NULL THEN
        tenant := 'default';
    END IF;
    IF idempotency_key IS NOT NULL THEN
        SELECT j.id INTO job FROM spool.jobs j
         WHERE j.tenant = submit_job.tenant AND j.idempotency_key = submit_job.idempotency_key;
        IF job IS NOT NULL THEN
            RETURN job;
        END IF;
    END IF;
    IF params IS NULL OR jsonb_typeof(params) <> 'object' THEN
        RAISE EXCEPTION 'job params must be a JSON object, got %', coalesce(jsonb_typeof(params), 'null')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF tenant !~ '^[A-Za-z0-9_.-]{1,64}$' THEN
        RAISE EXCEPTION 'tenant name "%" is invalid', tenant
            USING ERRCODE = 'invalid_parameter_value', HINT = 'use 1 to 64 letters, digits, "_", "." or "-"';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM spool.tenants t WHERE t.name = submit_job.tenant) THEN
        INSERT INTO spool.tenants (name) VALUES (submit_job.tenant) ON CONFLICT DO NOTHING;
    END IF;
    mid := spool.resolve_model(model);
    INSERT INTO spool.jobs (tenant, model_id, model_ref, params, priority, deadline, idempotency_key)
    VALUES (submit_job.tenant, mid, model, params, priority, deadline, idempotency_key)
    ON CONFLICT ON CONSTRAINT jobs_tenant_idempotency_key_key DO NOTHING
    RETURNING id INTO job;
    IF job IS NULL THEN  -- a concurrent submission with the same key won
        SELECT j.id INTO job FROM spool.jobs j
         WHERE j.tenant = submit_job.tenant AND j.idempotency_key = submit_job.idempotency_key;
    END IF;
    RETURN job;
END $$;
