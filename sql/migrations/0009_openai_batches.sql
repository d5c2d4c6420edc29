-- The OpenAI Batch API, backed by batch-lane jobs: uploaded files and batches.
--
-- A batch is made from an uploaded JSONL file (one request a line:
-- {"custom_id", "method": "POST", "url", "body"}) by spool.create_batch, in
-- one transaction: every valid line becomes a spool.requests row of one new
-- job (sealed at once), every bad line is kept in batches.input_errors with its
-- 1-based line number and goes to the error file; the rest run. When the job
-- has finished (or was cancelled, or the completion window passed),
-- spool.finalize_batches writes the output file (OpenAI's batch output lines,
-- in request order) and the error file (failed and cancelled requests, then
-- the bad input lines). The scheduler's sweep calls finalize_batches; reading
-- a batch (spool.batch_get) also finalizes it when due, so a batch is never
-- seen stale when no scheduler is active.
--
-- The objects the HTTP API returns are rendered here (spool.file_json,
-- spool.batch_json, the *_list functions), so that the SQL API and the HTTP
-- API show the same thing.
--
-- Tenants: every function takes the tenant explicitly and touches only that
-- tenant's rows (the scheduler connects as the owner, which row-level
-- security does not restrict). Row-level security on both tables makes a
-- tenant's database role (0007) see and write only its own files and
-- batches. The tables are granted to PUBLIC: only roles with USAGE on schema
-- spool (tenant roles, from spool.grant_tenant_role) can reach them, and the
-- policies give a role that is no tenant's (session_tenant() NULL) no rows.
--
-- States of spool.batches.status (the functions here are its only writers):
--   in_progress --job finished, finalize_batches--> completed
--   in_progress --cancel_batch--> cancelling --finalize_batches--> cancelled
--   in_progress --expires_at passed, finalize_batches--> expired
--   (created) --no valid line, or the model is unknown--> failed
-- "validating" and "finalizing" are never seen outside a transaction:
-- creation validates, and finalizing happens in one transaction (its time is
-- recorded in finalizing_at).

-- A random id with a prefix: 'file-' or 'batch_' and hex digits.
CREATE FUNCTION spool.random_id(prefix text, n_hex int DEFAULT 24) RETURNS text
LANGUAGE sql VOLATILE AS $$
    SELECT prefix || left(replace(gen_random_uuid()::text, '-', '')
                          || replace(gen_random_uuid()::text, '-', ''), n_hex)
$$;

CREATE TABLE spool.files (
    id          text PRIMARY KEY DEFAULT spool.random_id('file-'),
    seq         bigserial UNIQUE,               -- creation order, for listings
    tenant      text NOT NULL REFERENCES spool.tenants (name),
    purpose     text NOT NULL CHECK (purpose IN ('batch', 'batch_output')),
    filename    text NOT NULL,
    bytes       bigint NOT NULL CHECK (bytes >= 0),  -- octet_length(content)
    content     text NOT NULL,                  -- JSONL, UTF-8 (TOAST compresses it)
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX files_tenant ON spool.files (tenant, seq);

CREATE TABLE spool.batches (
    id                 text PRIMARY KEY DEFAULT spool.random_id('batch_', 32),
    seq                bigserial UNIQUE,
    tenant             text NOT NULL REFERENCES spool.tenants (name),
    job_id             bigint REFERENCES spool.jobs (id),   -- NULL when no line was valid
    input_file_id      text NOT NULL REFERENCES spool.files (id),
    endpoint           text NOT NULL CHECK (endpoint IN ('/v1/chat/completions', '/v1/completions')),
    completion_window  text NOT NULL DEFAULT '24h',
    metadata           jsonb,
    model              text,                 -- as the lines name it
    status             text NOT NULL
                       CHECK (status IN ('validating', 'failed', 'in_progress', 'finalizing', 'completed',
                                         'expired', 'cancelling', 'cancelled')),
    input_errors       jsonb NOT NULL DEFAULT '[]',  -- [{line, custom_id, code, message}]
    errors             jsonb,                -- batch-level errors (a failed batch)
    output_file_id     text REFERENCES spool.files (id),
    error_file_id      text REFERENCES spool.files (id),
    created_at         timestamptz NOT NULL DEFAULT now(),
    in_progress_at     timestamptz,
    expires_at         timestamptz,
    finalizing_at      timestamptz,
    completed_at       timestamptz,
    failed_at          timestamptz,
    expired_at         timestamptz,
    cancelling_at      timestamptz,
    cancelled_at       timestamptz
);
CREATE INDEX batches_tenant ON spool.batches (tenant, seq);
CREATE INDEX batches_open ON spool.batches (seq) WHERE status IN ('in_progress', 'cancelling');

ALTER TABLE spool.files ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_own ON spool.files
    USING (tenant = spool.session_tenant()) WITH CHECK (tenant = spool.session_tenant());
ALTER TABLE spool.batches ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_own ON spool.batches
    USING (tenant = spool.session_tenant()) WITH CHECK (tenant = spool.session_tenant());
GRANT SELECT, INSERT, UPDATE ON spool.files, spool.batches TO PUBLIC;
GRANT USAGE ON SEQUENCE spool.files_seq_seq, spool.batches_seq_seq TO PUBLIC;

CREATE FUNCTION spool.epoch(t timestamptz) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$ SELECT floor(extract(epoch FROM t))::bigint $$;

-- The OpenAI file object.
CREATE FUNCTION spool.file_json(f spool.files) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('id', f.id, 'object', 'file', 'bytes', f.bytes,
                              'created_at', spool.epoch(f.created_at), 'filename', f.filename,
                              'purpose', f.purpose, 'status', 'processed', 'status_details', NULL)
$$;

-- Stores an uploaded or generated file; returns its file object.
CREATE FUNCTION spool.create_file(tenant text, purpose text, filename text, content text)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    f spool.files;
BEGIN
    IF purpose IS NULL OR purpose NOT IN ('batch', 'batch_output') THEN
        RAISE EXCEPTION 'purpose must be "batch", got %', coalesce('"' || purpose || '"', 'nothing')
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'purpose';
    END IF;
    IF content IS NULL THEN
        RAISE EXCEPTION 'the file has no content' USING ERRCODE = 'invalid_parameter_value',
              COLUMN = 'file';
    END IF;
    -- (Tenant roles may read spool.tenants but not write it.)
    IF NOT EXISTS (SELECT 1 FROM spool.tenants t WHERE t.name = create_file.tenant) THEN
        INSERT INTO spool.tenants (name) VALUES (create_file.tenant) ON CONFLICT DO NOTHING;
    END IF;
    INSERT INTO spool.files (tenant, purpose, filename, bytes, content)
    VALUES (create_file.tenant, create_file.purpose, coalesce(nullif(filename, ''), 'upload.jsonl'),
            octet_length(content), content)
    RETURNING * INTO f;
    RETURN spool.file_json(f);
END $$;

-- A tenant's file object, or NULL.
CREATE FUNCTION spool.file_get(tenant text, id text) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT spool.file_json(f) FROM spool.files f WHERE f.tenant = file_get.tenant AND f.id = file_get.id
$$;

-- A tenant's file content, or NULL.
CREATE FUNCTION spool.file_content(tenant text, id text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT f.content FROM spool.files f WHERE f.tenant = file_content.tenant AND f.id = file_content.id
$$;

-- A tenant's files, newest first, as an OpenAI list: at most lim (1..10000)
-- after the file `after` (NULL: from the newest), of one purpose or all.
CREATE FUNCTION spool.file_list(tenant text, purpose text DEFAULT NULL, lim int DEFAULT 10000,
                                after text DEFAULT NULL) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    WITH l AS (
        SELECT greatest(1, least(coalesce(lim, 10000), 10000)) AS n
    ), page AS (
        SELECT spool.file_json(f) AS o, f.id, row_number() OVER (ORDER BY f.seq DESC) AS n
          FROM spool.files f
         WHERE f.tenant = file_list.tenant
           AND (file_list.purpose IS NULL OR f.purpose = file_list.purpose)
           AND (file_list.after IS NULL OR f.seq < (SELECT a.seq FROM spool.files a
                                                    WHERE a.id = file_list.after
                                                      AND a.tenant = file_list.tenant))
         ORDER BY f.seq DESC
         LIMIT (SELECT n + 1 FROM l)
    )
    SELECT jsonb_build_object(
        'object', 'list',
        'data', coalesce((SELECT jsonb_agg(o ORDER BY n) FROM page WHERE n <= l.n), '[]'),
        'first_id', (SELECT id FROM page WHERE n = 1),
        'last_id', (SELECT id FROM page WHERE n = least(l.n, (SELECT count(*) FROM page))),
        'has_more', (SELECT count(*) FROM page) > l.n)
      FROM l
$$;

-- The OpenAI batch object. request_counts come from the job's counters plus
-- the bad input lines (counted as failed).
CREATE FUNCTION spool.batch_json(b spool.batches) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'id', b.id, 'object', 'batch', 'endpoint', b.endpoint, 'errors', b.errors,
        'input_file_id', b.input_file_id, 'completion_window', b.completion_window,
        'status', b.status, 'output_file_id', b.output_file_id, 'error_file_id', b.error_file_id,
        'created_at', spool.epoch(b.created_at), 'in_progress_at', spool.epoch(b.in_progress_at),
        'expires_at', spool.epoch(b.expires_at), 'finalizing_at', spool.epoch(b.finalizing_at),
        'completed_at', spool.epoch(b.completed_at), 'failed_at', spool.epoch(b.failed_at),
        'expired_at', spool.epoch(b.expired_at), 'cancelling_at', spool.epoch(b.cancelling_at),
        'cancelled_at', spool.epoch(b.cancelled_at),
        'request_counts', jsonb_build_object(
            'total', coalesce(j.total, 0) + jsonb_array_length(b.input_errors),
            'completed', coalesce(j.succeeded, 0),
            'failed', coalesce(j.failed, 0) + jsonb_array_length(b.input_errors)),
        'model', b.model,
        'metadata', b.metadata)
      FROM (SELECT 1) one LEFT JOIN spool.jobs j ON j.id = b.job_id
$$;

-- text -> jsonb, or NULL with the parser's message in msg. Each call is a
-- subtransaction (about 50 us), so batch_lines uses it only for a file in
-- which some line is not JSON.
CREATE FUNCTION spool.try_jsonb(t text, OUT j jsonb, OUT msg text)
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    detail text;
BEGIN
    j := t::jsonb;
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS detail = PG_EXCEPTION_DETAIL;
    msg := SQLERRM || coalesce(' (' || nullif(detail, '') || ')', '');
END $$;

-- The lines of a batch input file, checked, one row per non-blank line
-- (n: 1-based line number). A good line has problem NULL and its request:
-- custom_id, prompt (completions) or messages (chat), and params: the body
-- without model, messages, prompt, n and stream, with max_completion_tokens
-- (OpenAI's newer name) as max_tokens. The worker reads the keys it knows
-- (worker/params.c), ignores the others (user, logit_bias...), and checks
-- types and ranges, failing that request alone. A bad
-- line has code and problem. The batch's model is the model of the first
-- line that is otherwise good; a line naming another is bad. Set-based, so
-- that a 50,000-line file takes seconds, not minutes; all_json false (some
-- line is not JSON) parses each line in a subtransaction instead.
CREATE FUNCTION spool.batch_lines(content text, endpoint text, all_json boolean DEFAULT true)
RETURNS TABLE (n bigint, custom_id text, code text, problem text, model text, prompt text,
               messages jsonb, params jsonb)
LANGUAGE sql STABLE AS $$
    WITH raw AS (
        SELECT t.o AS n, rtrim(t.raw, E'\r') AS line
          FROM string_to_table(content, E'\n') WITH ORDINALITY AS t(raw, o)
         WHERE btrim(rtrim(t.raw, E'\r'), E' \t') <> ''
    ), parsed AS (
        SELECT r.n, p.j, p.msg FROM raw r
         CROSS JOIN LATERAL (SELECT r.line::jsonb AS j, NULL::text AS msg WHERE all_json
                             UNION ALL
                             SELECT x.j, x.msg FROM spool.try_jsonb(r.line) x WHERE NOT all_json) p
    ), fields AS (
        SELECT p.n, p.j, p.msg,
               CASE WHEN jsonb_typeof(p.j) = 'object' AND jsonb_typeof(p.j -> 'custom_id') = 'string'
                         AND p.j ->> 'custom_id' <> '' THEN p.j ->> 'custom_id' END AS cid,
               CASE WHEN jsonb_typeof(p.j) = 'object' THEN p.j -> 'body' END AS body
          FROM parsed p
    ), checked AS (
        SELECT f.n, f.cid, f.body,
               CASE
                 WHEN f.j IS NULL THEN ARRAY['invalid_json', 'not valid JSON: ' || f.msg]
                 WHEN jsonb_typeof(f.j) <> 'object'
                   THEN ARRAY['invalid_json', 'a line must be a JSON object, got ' || jsonb_typeof(f.j)]
                 WHEN f.cid IS NULL
                   THEN ARRAY['missing_required_parameter', 'custom_id must be a non-empty string']
                 WHEN min(f.n) OVER (PARTITION BY f.cid) < f.n
                   THEN ARRAY['duplicate_custom_id', format('custom_id "%s" was already used on line %s',
                                                            f.cid, min(f.n) OVER (PARTITION BY f.cid))]
                 WHEN f.j ->> 'method' IS DISTINCT FROM 'POST'
                   THEN ARRAY['invalid_request', format('method must be "POST", got %s',
                                                        coalesce((f.j -> 'method')::text, 'nothing'))]
                 WHEN f.j ->> 'url' IS DISTINCT FROM endpoint
                   THEN ARRAY['invalid_request', format('url must be "%s" (the batch''s endpoint), got %s',
                                                        endpoint, coalesce((f.j -> 'url')::text, 'nothing'))]
                 WHEN jsonb_typeof(f.body) IS DISTINCT FROM 'object'
                   THEN ARRAY['missing_required_parameter', 'body must be a JSON object']
                 WHEN jsonb_typeof(f.body -> 'model') IS DISTINCT FROM 'string' OR f.body ->> 'model' = ''
                   THEN ARRAY['missing_required_parameter', 'body.model must be a non-empty string']
                 WHEN endpoint = '/v1/chat/completions'
                      AND (jsonb_typeof(f.body -> 'messages') IS DISTINCT FROM 'array'
                           OR jsonb_array_length(f.body -> 'messages') = 0)
                   THEN ARRAY['missing_required_parameter',
                              'body.messages must be a non-empty array of {"role", "content"} objects']
                 WHEN endpoint = '/v1/chat/completions' AND EXISTS (
                        SELECT 1 FROM jsonb_array_elements(f.body -> 'messages') m
                         WHERE jsonb_typeof(m) <> 'object'
                            OR jsonb_typeof(m -> 'role') IS DISTINCT FROM 'string'
                            OR jsonb_typeof(m -> 'content') IS DISTINCT FROM 'string')
                   THEN ARRAY['invalid_request', 'body.messages: each message needs string "role" and "content"']
                 WHEN endpoint = '/v1/completions' AND jsonb_typeof(f.body -> 'prompt') IS DISTINCT FROM 'string'
                   THEN ARRAY['missing_required_parameter', 'body.prompt must be a string']
                 WHEN f.body ? 'n' AND f.body -> 'n' NOT IN ('null'::jsonb, '1'::jsonb)
                   THEN ARRAY['unsupported_parameter', 'body.n must be 1']
                 WHEN f.body ? 'stream' AND f.body -> 'stream' NOT IN ('null'::jsonb, 'false'::jsonb)
                   THEN ARRAY['unsupported_parameter', 'body.stream is not supported in a batch']
               END AS bad
          FROM fields f
    ), batch_model AS (
        SELECT c.body ->> 'model' AS model FROM checked c WHERE c.bad IS NULL ORDER BY c.n LIMIT 1
    ), final AS (
        SELECT c.n, c.cid, c.body,
               coalesce(c.bad, CASE WHEN c.body ->> 'model' <> m.model THEN
                   ARRAY['model_mismatch', format('body.model is "%s" but earlier lines name "%s"; '
                                                  'one batch runs one model', c.body ->> 'model', m.model)]
                   END) AS bad
          FROM checked c LEFT JOIN batch_model m ON true
    )
    SELECT f.n, f.cid, f.bad[1], CASE WHEN f.bad IS NOT NULL THEN format('line %s: %s', f.n, f.bad[2]) END,
           CASE WHEN f.bad IS NULL THEN f.body ->> 'model' END,
           CASE WHEN f.bad IS NULL AND endpoint = '/v1/completions' THEN f.body ->> 'prompt' END,
           CASE WHEN f.bad IS NULL AND endpoint = '/v1/chat/completions' THEN f.body -> 'messages' END,
           CASE WHEN f.bad IS NULL THEN
               CASE WHEN jsonb_typeof(f.body -> 'max_completion_tokens') IS DISTINCT FROM 'null'
                         AND f.body ? 'max_completion_tokens'
                    THEN (f.body - '{model,messages,prompt,n,stream,max_tokens,max_completion_tokens}'::text[])
                         || jsonb_build_object('max_tokens', f.body -> 'max_completion_tokens')
                    ELSE f.body - '{model,messages,prompt,n,stream,max_completion_tokens}'::text[] END
           END
      FROM final f
     ORDER BY f.n
$$;

-- batch_lines gathered for create_batch: the model, the bad lines as a JSON
-- array of {line, custom_id, code, message}, and the good lines' requests as
-- parallel arrays.
CREATE FUNCTION spool.batch_collect(content text, endpoint text, all_json boolean,
                                    OUT model text, OUT bad jsonb, OUT ids text[], OUT prompts text[],
                                    OUT msgs jsonb[], OUT params jsonb[])
LANGUAGE sql STABLE AS $$
    SELECT min(l.model),
           coalesce(jsonb_agg(jsonb_build_object('line', l.n, 'custom_id', l.custom_id, 'code', l.code,
                                                 'message', l.problem) ORDER BY l.n)
                    FILTER (WHERE l.problem IS NOT NULL), '[]'),
           coalesce(array_agg(l.custom_id ORDER BY l.n) FILTER (WHERE l.problem IS NULL), '{}'),
           array_agg(l.prompt ORDER BY l.n) FILTER (WHERE l.problem IS NULL),
           array_agg(l.messages ORDER BY l.n) FILTER (WHERE l.problem IS NULL),
           array_agg(l.params ORDER BY l.n) FILTER (WHERE l.problem IS NULL)
      FROM spool.batch_lines(content, endpoint, all_json) l
$$;

-- Creates a batch from an uploaded file (purpose "batch") of the tenant:
-- checks each line (batch_lines), makes one sealed job of the valid ones,
-- and returns the batch object. Raises (no batch made) when the file or a
-- parameter is wrong; a batch with no valid line, or whose model is
-- unknown, is made as "failed" with the reasons in its errors and error
-- file.
CREATE FUNCTION spool.create_batch(tenant text, input_file_id text, endpoint text,
                                   completion_window text DEFAULT '24h', metadata jsonb DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    f spool.files;
    b spool.batches;
    problem text;
    model_name text;
    bad jsonb;
    ids text[];
    prompts text[];
    msgs jsonb[];
    params jsonb[];
    job bigint;
BEGIN
    IF endpoint IS NULL OR endpoint NOT IN ('/v1/chat/completions', '/v1/completions') THEN
        RAISE EXCEPTION 'endpoint must be "/v1/chat/completions" or "/v1/completions", got %',
              coalesce('"' || endpoint || '"', 'nothing')
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'endpoint';
    END IF;
    IF completion_window IS DISTINCT FROM '24h' THEN
        RAISE EXCEPTION 'completion_window must be "24h", got %',
              coalesce('"' || completion_window || '"', 'nothing')
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'completion_window';
    END IF;
    IF metadata IS NOT NULL AND jsonb_typeof(metadata) NOT IN ('object', 'null') THEN
        RAISE EXCEPTION 'metadata must be an object of strings'
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'metadata';
    END IF;
    IF jsonb_typeof(metadata) = 'null' THEN
        metadata := NULL;
    END IF;
    SELECT * INTO f FROM spool.files x WHERE x.id = input_file_id AND x.tenant = create_batch.tenant;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no file with id "%"', input_file_id
            USING ERRCODE = 'no_data_found', COLUMN = 'input_file_id';
    END IF;
    IF f.purpose <> 'batch' THEN
        RAISE EXCEPTION 'file "%" has purpose "%"; a batch needs a file uploaded with purpose "batch"',
              f.id, f.purpose
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'input_file_id';
    END IF;

    -- Every line is parsed once; only when some line is not JSON (the first
    -- attempt fails) again, line by line, keeping each line's error.
    BEGIN
        SELECT * INTO model_name, bad, ids, prompts, msgs, params
          FROM spool.batch_collect(f.content, endpoint, true);
    EXCEPTION WHEN OTHERS THEN
        SELECT * INTO model_name, bad, ids, prompts, msgs, params
          FROM spool.batch_collect(f.content, endpoint, false);
    END;

    INSERT INTO spool.batches (tenant, input_file_id, endpoint, completion_window, metadata, model,
                               status, input_errors, in_progress_at, expires_at)
    VALUES (create_batch.tenant, f.id, endpoint, completion_window, metadata, model_name,
            'validating', bad, now(), now() + interval '24 hours')
    RETURNING * INTO b;

    IF cardinality(ids) = 0 THEN
        problem := CASE WHEN jsonb_array_length(bad) = 0 THEN 'the input file has no requests'
                        ELSE 'no line of the input file is a valid request' END;
        UPDATE spool.batches x
           SET status = 'failed', failed_at = now(),
               errors = jsonb_build_object('object', 'list', 'data',
                   jsonb_build_array(jsonb_build_object('code', 'empty_batch', 'message', problem,
                                                        'param', 'input_file_id', 'line', NULL))
                   || coalesce((SELECT jsonb_agg(jsonb_build_object('code', e ->> 'code',
                                     'message', e ->> 'message', 'param', NULL, 'line', (e -> 'line')::int))
                                  FROM (SELECT e FROM jsonb_array_elements(bad) e LIMIT 100) q), '[]'))
         WHERE x.id = b.id;
        PERFORM spool.finalize_batch(b.id);
        SELECT * INTO b FROM spool.batches x WHERE x.id = b.id;
        RETURN spool.batch_json(b);
    END IF;

    BEGIN
        job := spool.submit_job(model_name, create_batch.tenant);
    EXCEPTION WHEN no_data_found OR invalid_parameter_value THEN
        UPDATE spool.batches x
           SET status = 'failed', failed_at = now(),
               errors = jsonb_build_object('object', 'list', 'data', jsonb_build_array(
                   jsonb_build_object('code', 'model_not_found', 'message', SQLERRM,
                                      'param', 'body.model', 'line', NULL)))
         WHERE x.id = b.id;
        PERFORM spool.finalize_batch(b.id);
        SELECT * INTO b FROM spool.batches x WHERE x.id = b.id;
        RETURN spool.batch_json(b);
    END;
    INSERT INTO spool.requests (job_id, custom_id, prompt, messages, params)
    SELECT job, u.cid, u.p, u.m, u.prm FROM unnest(ids, prompts, msgs, params) AS u(cid, p, m, prm);
    PERFORM spool.seal_job(job);
    UPDATE spool.batches x SET job_id = job, status = 'in_progress' WHERE x.id = b.id
    RETURNING * INTO b;
    RETURN spool.batch_json(b);
END $$;

-- Writes a batch's output and error files and moves it to its final state,
-- when due: its job has ended (completed; cancelling -> cancelled), its
-- completion window has passed (the job is cancelled: expired), or it failed
-- without files yet. Returns true when it finalized the batch now. Safe to
-- call at any time and concurrently (the batch row is locked; a batch
-- already final is left alone).
CREATE FUNCTION spool.finalize_batch(batch text) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    b spool.batches;
    jb spool.jobs;
    final text;
    kind text;
    mname text;
    out_text text;
    err_text text;
BEGIN
    SELECT * INTO b FROM spool.batches WHERE id = batch FOR UPDATE SKIP LOCKED;
    IF NOT FOUND OR b.status IN ('completed', 'cancelled', 'expired')
       OR (b.status = 'failed' AND b.error_file_id IS NOT NULL) THEN
        RETURN false;
    END IF;
    IF b.job_id IS NOT NULL THEN
        SELECT * INTO jb FROM spool.jobs WHERE id = b.job_id;
    END IF;
    IF b.status = 'failed' THEN
        final := 'failed';
    ELSIF b.status IN ('in_progress', 'validating') AND b.expires_at < now()
          AND jb.state NOT IN ('succeeded', 'failed', 'cancelled') THEN
        PERFORM spool.cancel_job(b.job_id);
        SELECT * INTO jb FROM spool.jobs WHERE id = b.job_id;
        final := 'expired';
    ELSIF jb.state IN ('succeeded', 'failed', 'cancelled') THEN
        final := CASE WHEN b.status = 'cancelling' OR jb.state = 'cancelled' THEN 'cancelled'
                      ELSE 'completed' END;
    ELSE
        RETURN false;
    END IF;

    kind := CASE b.endpoint WHEN '/v1/chat/completions' THEN 'chat' ELSE 'completion' END;
    IF b.job_id IS NOT NULL THEN
        SELECT m.name || '@' || m.version INTO mname FROM spool.models m WHERE m.id = jb.model_id;
        SELECT string_agg(jsonb_build_object(
                   'id', 'batch_req_' || md5(b.id || ':' || r.id),
                   'custom_id', r.custom_id,
                   'response', jsonb_build_object(
                       'status_code', 200,
                       'request_id', 'req_' || left(md5('req:' || b.id || ':' || r.id), 24),
                       'body', CASE WHEN kind = 'chat' THEN jsonb_build_object(
                           'id', 'chatcmpl-' || left(md5('c:' || b.id || ':' || r.id), 24),
                           'object', 'chat.completion',
                           'created', spool.epoch(r.finished_at),
                           'model', coalesce(mm.name || '@' || mm.version, mname),
                           'choices', jsonb_build_array(jsonb_build_object(
                               'index', 0,
                               'message', jsonb_build_object('role', 'assistant', 'content', r.output,
                                                             'refusal', NULL),
                               'logprobs', NULL,
                               'finish_reason', CASE WHEN r.finish_reason = 'length' THEN 'length' ELSE 'stop' END)),
                           'usage', jsonb_build_object('prompt_tokens', r.tokens_in,
                               'completion_tokens', r.tokens_out,
                               'total_tokens', coalesce(r.tokens_in, 0) + coalesce(r.tokens_out, 0)))
                       ELSE jsonb_build_object(
                           'id', 'cmpl-' || left(md5('c:' || b.id || ':' || r.id), 24),
                           'object', 'text_completion',
                           'created', spool.epoch(r.finished_at),
                           'model', coalesce(mm.name || '@' || mm.version, mname),
                           'choices', jsonb_build_array(jsonb_build_object(
                               'text', r.output, 'index', 0, 'logprobs', NULL,
                               'finish_reason', CASE WHEN r.finish_reason = 'length' THEN 'length' ELSE 'stop' END)),
                           'usage', jsonb_build_object('prompt_tokens', r.tokens_in,
                               'completion_tokens', r.tokens_out,
                               'total_tokens', coalesce(r.tokens_in, 0) + coalesce(r.tokens_out, 0)))
                       END),
                   'error', NULL)::text || E'\n', '' ORDER BY r.id)
          INTO out_text
          FROM spool.requests r LEFT JOIN spool.models mm ON mm.id = r.model_id
         WHERE r.job_id = b.job_id AND r.state = 'succeeded';
        SELECT string_agg(jsonb_build_object(
                   'id', 'batch_req_' || md5(b.id || ':' || r.id),
                   'custom_id', r.custom_id,
                   'response', NULL,
                   'error', jsonb_build_object(
                       'code', CASE WHEN r.state = 'failed' THEN 'request_failed'
                                    WHEN final = 'expired' THEN 'batch_expired'
                                    ELSE 'batch_cancelled' END,
                       'message', CASE WHEN r.state = 'failed' THEN coalesce(r.error, 'the request failed')
                                       WHEN final = 'expired' THEN 'the batch expired before this request ran'
                                       ELSE 'the batch was cancelled before this request ran' END))::text
                   || E'\n', '' ORDER BY r.id)
          INTO err_text
          FROM spool.requests r
         WHERE r.job_id = b.job_id AND r.state IN ('failed', 'cancelled', 'pending', 'running');
    END IF;
    SELECT coalesce(err_text, '') || coalesce(string_agg(jsonb_build_object(
               'id', 'batch_req_' || md5(b.id || ':line:' || (e ->> 'line')),
               'custom_id', e -> 'custom_id',
               'response', NULL,
               'error', jsonb_build_object('code', e ->> 'code', 'message', e ->> 'message',
                                           'line', (e -> 'line')::int))::text || E'\n', ''
               ORDER BY (e -> 'line')::int), '')
      INTO err_text
      FROM jsonb_array_elements(b.input_errors) e;

    UPDATE spool.batches
       SET status = final,
           finalizing_at = CASE WHEN final <> 'failed' THEN now() END,
           completed_at = CASE WHEN final = 'completed' THEN now() END,
           cancelled_at = CASE WHEN final = 'cancelled' THEN now() END,
           expired_at = CASE WHEN final = 'expired' THEN now() END,
           output_file_id = CASE WHEN out_text IS NOT NULL THEN
               (spool.create_file(b.tenant, 'batch_output', b.id || '_output.jsonl', out_text)) ->> 'id' END,
           error_file_id = CASE WHEN err_text <> '' THEN
               (spool.create_file(b.tenant, 'batch_output', b.id || '_error.jsonl', err_text)) ->> 'id' END
     WHERE id = b.id;
    RETURN true;
END $$;

-- Finalizes every batch that is due (see finalize_batch); returns how many.
-- The scheduler's sweep calls it.
CREATE FUNCTION spool.finalize_batches() RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    n int := 0;
    bid text;
BEGIN
    FOR bid IN
        SELECT b.id FROM spool.batches b LEFT JOIN spool.jobs j ON j.id = b.job_id
         WHERE b.status IN ('in_progress', 'cancelling')
           AND (j.state IN ('succeeded', 'failed', 'cancelled') OR b.expires_at < now())
         ORDER BY b.seq
    LOOP
        IF spool.finalize_batch(bid) THEN
            n := n + 1;
        END IF;
    END LOOP;
    RETURN n;
END $$;

-- A tenant's batch object, finalized first when due; NULL when there is none.
CREATE FUNCTION spool.batch_get(tenant text, id text) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    b spool.batches;
BEGIN
    SELECT * INTO b FROM spool.batches x WHERE x.id = batch_get.id AND x.tenant = batch_get.tenant;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF b.status IN ('in_progress', 'cancelling') AND spool.finalize_batch(b.id) THEN
        SELECT * INTO b FROM spool.batches x WHERE x.id = batch_get.id;
    END IF;
    RETURN spool.batch_json(b);
END $$;

-- A tenant's batches, newest first, as an OpenAI list (limit 1..100, after a batch id).
CREATE FUNCTION spool.batch_list(tenant text, lim int DEFAULT 20, after text DEFAULT NULL)
RETURNS jsonb
LANGUAGE sql STABLE AS $$
    WITH l AS (
        SELECT greatest(1, least(coalesce(lim, 20), 100)) AS n
    ), page AS (
        SELECT spool.batch_json(b) AS o, b.id, row_number() OVER (ORDER BY b.seq DESC) AS n
          FROM spool.batches b
         WHERE b.tenant = batch_list.tenant
           AND (batch_list.after IS NULL OR b.seq < (SELECT a.seq FROM spool.batches a
                                                     WHERE a.id = batch_list.after
                                                       AND a.tenant = batch_list.tenant))
         ORDER BY b.seq DESC
         LIMIT (SELECT n + 1 FROM l)
    )
    SELECT jsonb_build_object(
        'object', 'list',
        'data', coalesce((SELECT jsonb_agg(o ORDER BY n) FROM page WHERE n <= l.n), '[]'),
        'first_id', (SELECT id FROM page WHERE n = 1),
        'last_id', (SELECT id FROM page WHERE n = least(l.n, (SELECT count(*) FROM page))),
        'has_more', (SELECT count(*) FROM page) > l.n)
      FROM l
$$;

-- Cancels a tenant's batch: its job is cancelled (finished results are kept)
-- and the batch is "cancelling" until finalize_batches writes its files and
-- makes it "cancelled". A batch already final is returned unchanged. NULL
-- when the tenant has no such batch.
CREATE FUNCTION spool.cancel_batch(tenant text, id text) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    b spool.batches;
BEGIN
    SELECT * INTO b FROM spool.batches x WHERE x.id = cancel_batch.id AND x.tenant = cancel_batch.tenant
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF b.status IN ('in_progress', 'validating') THEN
        UPDATE spool.batches x SET status = 'cancelling', cancelling_at = now() WHERE x.id = b.id
        RETURNING * INTO b;
        IF b.job_id IS NOT NULL THEN
            PERFORM spool.cancel_job(b.job_id);
        END IF;
    END IF;
    RETURN spool.batch_json(b);
END $$;
