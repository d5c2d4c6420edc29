-- The batch lane's data model: tenants, the model registry with aliases,
-- jobs, requests, shards with fenced leases, workers and preemptions.
--
-- States (each an explicit CHECK; one SQL function or one C function changes
-- each, see docs/architecture.md):
--   jobs.state:     open -> queued -> running -> succeeded | failed | cancelled
--                   (open and queued may go straight to cancelled)
--   requests.state: pending -> running -> succeeded | failed | cancelled
--                   (running -> pending again when its shard's lease is lost)
--   shards.state:   pending -> leased -> done   (leased -> pending on release
--                   or lease expiry; any -> cancelled)
--   workers.state:  active -> draining -> gone

CREATE TABLE spool.tenants (
    name        text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_.-]{1,64}$'),
    weight      double precision NOT NULL DEFAULT 1 CHECK (weight > 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO spool.tenants (name) VALUES ('default');

-- A registered model version: an immutable bundle addressed by its sha256.
CREATE TABLE spool.models (
    id              bigserial PRIMARY KEY,
    name            text NOT NULL CHECK (name ~ '^[A-Za-z0-9_.-]{1,128}$'),
    version         int NOT NULL CHECK (version > 0),
    digest          text NOT NULL CHECK (digest ~ '^[0-9a-f]{64}$'),
    uri             text NOT NULL,
    size_bytes      bigint NOT NULL CHECK (size_bytes >= 0),
    architecture    text NOT NULL,
    dtype           text NOT NULL,
    n_params        bigint NOT NULL,
    context_length  int NOT NULL,
    metadata        jsonb NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    created_by      text NOT NULL DEFAULT current_user,
    UNIQUE (name, version)
);
CREATE INDEX models_digest ON spool.models (digest);

CREATE TABLE spool.model_aliases (
    name        text NOT NULL,
    alias       text NOT NULL CHECK (alias ~ '^[A-Za-z][A-Za-z0-9_.-]{0,63}$'),
    version     int NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    updated_by  text NOT NULL DEFAULT current_user,
    PRIMARY KEY (name, alias),
    FOREIGN KEY (name, version) REFERENCES spool.models (name, version)
);

-- Every alias move, with who and when.
CREATE TABLE spool.model_alias_history (
    id           bigserial PRIMARY KEY,
    name         text NOT NULL,
    alias        text NOT NULL,
    old_version  int,
    new_version  int NOT NULL,
    moved_at     timestamptz NOT NULL DEFAULT now(),
    moved_by     text NOT NULL DEFAULT current_user
);

CREATE TABLE spool.jobs (
    id               bigserial PRIMARY KEY,
    tenant           text NOT NULL REFERENCES spool.tenants (name),
    model_id         bigint NOT NULL REFERENCES spool.models (id),
    model_ref        text NOT NULL,          -- what the submitter asked for
    lane             text NOT NULL DEFAULT 'batch' CHECK (lane IN ('batch', 'live')),
    priority         int NOT NULL DEFAULT 0,
    deadline         timestamptz,
    params           jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(params) = 'object'),
    state            text NOT NULL DEFAULT 'open'
                     CHECK (state IN ('open', 'queued', 'running', 'succeeded', 'failed', 'cancelled')),
    idempotency_key  text,
    total            int NOT NULL DEFAULT 0,
    succeeded        int NOT NULL DEFAULT 0,
    failed           int NOT NULL DEFAULT 0,
    cancelled        int NOT NULL DEFAULT 0,
    tokens_in        bigint NOT NULL DEFAULT 0,
    tokens_out       bigint NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    sealed_at        timestamptz,
    started_at       timestamptz,
    finished_at      timestamptz,
    UNIQUE (tenant, idempotency_key)
);
CREATE INDEX jobs_active ON spool.jobs (priority DESC, id) WHERE state IN ('queued', 'running');

-- One row per prompt. Hot columns are updated by workers in batches; rows
-- leave the claim path once finished (shards, not requests, are claimed).
CREATE TABLE spool.requests (
    id              bigserial PRIMARY KEY,
    job_id          bigint NOT NULL REFERENCES spool.jobs (id) ON DELETE CASCADE,
    custom_id       text,
    prompt          text,
    messages        jsonb,
    params          jsonb NOT NULL DEFAULT '{}',
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')),
    attempts        int NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    output          text,
    output_tokens   int[],
    finish_reason   text,
    tokens_in       int,
    tokens_out      int,
    gpu_seconds     double precision,
    cost            numeric(20, 10),
    error           text,
    checkpoint      int[],                  -- generated tokens so far (resume point)
    checkpoint_at   timestamptz,
    model_id        bigint,                 -- the exact version that produced output
    worker_id       bigint,
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
) WITH (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.05,
        autovacuum_analyze_scale_factor = 0.05);
CREATE INDEX requests_job ON spool.requests (job_id, id);

-- A slice of a job's requests (an id range) with a lease. lease_token is a
-- fencing token: strictly increasing across all leases, so a worker that
-- lost its lease can be told apart from the one holding it now.
CREATE SEQUENCE spool.lease_tokens;
CREATE TABLE spool.shards (
    id                bigserial PRIMARY KEY,
    job_id            bigint NOT NULL REFERENCES spool.jobs (id) ON DELETE CASCADE,
    first_request_id  bigint NOT NULL,
    last_request_id   bigint NOT NULL,
    n_requests        int NOT NULL,
    state             text NOT NULL DEFAULT 'pending'
                      CHECK (state IN ('pending', 'leased', 'done', 'cancelled')),
    worker_id         bigint,
    lease_token       bigint,
    lease_expires_at  timestamptz,
    attempts          int NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    CHECK (first_request_id <= last_request_id)
) WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.02);
CREATE INDEX shards_claim ON spool.shards (job_id, id) WHERE state = 'pending';
CREATE INDEX shards_leases ON spool.shards (lease_expires_at) WHERE state = 'leased';

CREATE TABLE spool.workers (
    id               bigserial PRIMARY KEY,
    name             text NOT NULL,
    gpu_type         text NOT NULL DEFAULT 'cpu',
    gpu_memory_bytes bigint NOT NULL DEFAULT 0,
    capacity_type    text NOT NULL DEFAULT 'on-demand' CHECK (capacity_type IN ('spot', 'on-demand')),
    price_per_hour   numeric(12, 6) NOT NULL DEFAULT 0 CHECK (price_per_hour >= 0),
    backend          text NOT NULL DEFAULT 'cpu',
    models           jsonb NOT NULL DEFAULT '[]',
    state            text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'draining', 'gone')),
    registered_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at     timestamptz NOT NULL DEFAULT now(),
    gone_at          timestamptz
);

CREATE TABLE spool.preemptions (
    id               bigserial PRIMARY KEY,
    worker_id        bigint NOT NULL REFERENCES spool.workers (id),
    source           text NOT NULL,          -- sigterm, notice-file, aws, gcp, lease-expired
    noticed_at       timestamptz NOT NULL DEFAULT now(),
    shards_released  int NOT NULL DEFAULT 0,
    sequences        int NOT NULL DEFAULT 0,
    tokens_lost      bigint NOT NULL DEFAULT 0,   -- generated tokens that must be recomputed
    gpu_seconds_lost double precision NOT NULL DEFAULT 0
);

-- Resolves a model reference once: "name" (its prod alias, else the newest
-- version), "name@alias", "name@N" or "name@sha256:HEX". Raises a clear error
-- for anything unknown.
CREATE FUNCTION spool.resolve_model(ref text) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    base  text := split_part(ref, '@', 1);
    sel   text := CASE WHEN position('@' IN ref) > 0 THEN substr(ref, position('@' IN ref) + 1) END;
    found bigint;
BEGIN
    IF ref IS NULL OR base = '' THEN
        RAISE EXCEPTION 'model reference is empty'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'use name, name@alias, name@VERSION or name@sha256:DIGEST';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM spool.models WHERE name = base) THEN
        RAISE EXCEPTION 'unknown model "%"', base
            USING ERRCODE = 'no_data_found', HINT = 'spool models list shows the registered models';
    END IF;
    IF sel IS NULL THEN
        SELECT m.id INTO found FROM spool.model_aliases a
          JOIN spool.models m ON m.name = a.name AND m.version = a.version
         WHERE a.name = base AND a.alias = 'prod';
        IF found IS NULL THEN
            SELECT id INTO found FROM spool.models WHERE name = base ORDER BY version DESC LIMIT 1;
        END IF;
    ELSIF sel ~ '^[0-9]+$' THEN
        SELECT id INTO found FROM spool.models WHERE name = base AND version = sel::int;
    ELSIF sel LIKE 'sha256:%' THEN
        SELECT id INTO found FROM spool.models WHERE name = base AND digest = substr(sel, 8);
    ELSE
        SELECT m.id INTO found FROM spool.model_aliases a
          JOIN spool.models m ON m.name = a.name AND m.version = a.version
         WHERE a.name = base AND a.alias = sel;
    END IF;
    IF found IS NULL THEN
        RAISE EXCEPTION 'model "%" has no version or alias "%"', base, sel
            USING ERRCODE = 'no_data_found', HINT = 'spool models show ' || base || ' lists its versions and aliases';
    END IF;
    RETURN found;
END $$;

-- Who is acting: the session setting spool.actor (the CLI sets it to the OS
-- user) with the database role, or the role alone.
CREATE FUNCTION spool.actor() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN coalesce(current_setting('spool.actor', true), '') = '' THEN current_user::text
                ELSE current_setting('spool.actor', true) || ' (' || current_user || ')' END
$$;

-- Points alias at a version, recording the move.
CREATE FUNCTION spool.set_alias(model text, alias_name text, new_version int) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    old int;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM spool.models WHERE name = model AND version = new_version) THEN
        RAISE EXCEPTION 'model "%" has no version %', model, new_version USING ERRCODE = 'no_data_found';
    END IF;
    SELECT version INTO old FROM spool.model_aliases WHERE name = model AND alias = alias_name FOR UPDATE;
    INSERT INTO spool.model_aliases (name, alias, version, updated_by)
    VALUES (model, alias_name, new_version, spool.actor())
    ON CONFLICT (name, alias) DO UPDATE
       SET version = EXCLUDED.version, updated_at = now(), updated_by = EXCLUDED.updated_by;
    INSERT INTO spool.model_alias_history (name, alias, old_version, new_version, moved_by)
    VALUES (model, alias_name, old, new_version, spool.actor());
END $$;

-- Creates an open job pinned to the resolved model version. With an
-- idempotency key already used by the tenant, returns that job instead.
CREATE FUNCTION spool.submit_job(model text, tenant text DEFAULT 'default', params jsonb DEFAULT '{}',
                                 priority int DEFAULT 0, deadline timestamptz DEFAULT NULL,
                                 idempotency_key text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    job bigint;
    mid bigint;
BEGIN
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
    IF tenant IS NULL OR tenant !~ '^[A-Za-z0-9_.-]{1,64}$' THEN
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

-- Requests may only be added to an open job.
CREATE FUNCTION spool.requests_check_open() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    st text;
BEGIN
    SELECT state INTO st FROM spool.jobs WHERE id = NEW.job_id;
    IF st IS NULL THEN
        RAISE EXCEPTION 'job % does not exist', NEW.job_id USING ERRCODE = 'foreign_key_violation';
    ELSIF st <> 'open' THEN
        RAISE EXCEPTION 'job % is %; requests can only be added to an open job', NEW.job_id, st
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'submit a new job with spool.submit_job()';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER requests_check_open BEFORE INSERT ON spool.requests
    FOR EACH ROW EXECUTE FUNCTION spool.requests_check_open();

-- Hands an open job to the scheduler: requests without any input fail at
-- once with a clear error; the rest wait for a worker. Nothing is visible to
-- the scheduler before the caller's transaction commits (NOTIFY is
-- transactional too).
CREATE FUNCTION spool.seal_job(job bigint) RETURNS spool.jobs
LANGUAGE plpgsql AS $$
DECLARE
    j spool.jobs;
    n_bad int;
BEGIN
    SELECT * INTO j FROM spool.jobs WHERE id = job FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'job % does not exist', job USING ERRCODE = 'no_data_found';
    END IF;
    IF j.state <> 'open' THEN
        RETURN j;  -- sealing twice is harmless
    END IF;
    UPDATE spool.requests
       SET state = 'failed', finished_at = now(),
           error = CASE
             WHEN messages IS NOT NULL AND jsonb_typeof(messages) <> 'array'
               THEN 'messages must be a JSON array of {"role", "content"} objects'
             ELSE 'request has no input: set prompt (text) or messages (a JSON array)' END
     WHERE requests.job_id = job
       AND ((prompt IS NULL AND messages IS NULL)
            OR (messages IS NOT NULL AND jsonb_typeof(messages) <> 'array'));
    GET DIAGNOSTICS n_bad = ROW_COUNT;
    UPDATE spool.jobs
       SET state = 'queued', sealed_at = now(),
           total = (SELECT count(*) FROM spool.requests r WHERE r.job_id = job),
           failed = n_bad
     WHERE id = job
    RETURNING * INTO j;
    PERFORM pg_notify('spool_jobs', job::text);
    RETURN j;
END $$;

-- Cancels a job: work not yet finished is cancelled, finished results stay.
CREATE FUNCTION spool.cancel_job(job bigint) RETURNS spool.jobs
LANGUAGE plpgsql AS $$
DECLARE
    j spool.jobs;
    n int;
BEGIN
    SELECT * INTO j FROM spool.jobs WHERE id = job FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'job % does not exist', job USING ERRCODE = 'no_data_found';
    END IF;
    IF j.state IN ('succeeded', 'failed', 'cancelled') THEN
        RETURN j;
    END IF;
    UPDATE spool.requests SET state = 'cancelled', finished_at = now()
     WHERE requests.job_id = job AND state IN ('pending', 'running');
    GET DIAGNOSTICS n = ROW_COUNT;
    UPDATE spool.shards SET state = 'cancelled', finished_at = now()
     WHERE shards.job_id = job AND state IN ('pending', 'leased');
    UPDATE spool.jobs SET state = 'cancelled', cancelled = cancelled + n, finished_at = now()
     WHERE id = job RETURNING * INTO j;
    PERFORM pg_notify('spool_cancel', job::text);
    RETURN j;
END $$;

CREATE VIEW spool.job_status AS
SELECT j.id AS job_id, j.tenant, m.name AS model, m.version AS model_version, j.state,
       j.total, j.succeeded, j.failed, j.cancelled, j.tokens_in, j.tokens_out,
       j.created_at, j.finished_at
  FROM spool.jobs j JOIN spool.models m ON m.id = j.model_id;
