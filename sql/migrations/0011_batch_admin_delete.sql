-- The OpenAI Batch API, continued (0009): an operator's view of every tenant,
-- deleting files, and bad chat messages named by index (3., below).
--
-- 1. Reads and cancels take tenant NULL as "every tenant": the scheduler
--    passes NULL for an admin key (scope admin), so that an operator lists,
--    reads and cancels any tenant's batches and files. Other keys pass their
--    tenant, as before. A tenant's database role is still confined to its
--    rows by row-level security whatever it passes (these functions are not
--    SECURITY DEFINER).
--
-- 2. spool.delete_file(tenant, id) deletes a file, as OpenAI's
--    DELETE /v1/files/{id} does, unless it is the input of a batch that has
--    not ended (object_in_use). A batch keeps naming the files it used or
--    made after they are deleted (as OpenAI's do), so the foreign keys from
--    spool.batches to spool.files are dropped. The one check they did that
--    still matters, that a new batch's input file exists, is now a trigger
--    that also takes the file row's KEY SHARE lock, as the foreign key did:
--    a delete_file (which locks the row FOR UPDATE) and a create_batch of the
--    same file then run one after the other, so a batch never starts on a
--    file deleted under it and a file is never deleted under a new batch.

ALTER TABLE spool.batches DROP CONSTRAINT batches_input_file_id_fkey,
                          DROP CONSTRAINT batches_output_file_id_fkey,
                          DROP CONSTRAINT batches_error_file_id_fkey;

CREATE FUNCTION spool.batches_check_input() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM spool.files f WHERE f.id = NEW.input_file_id FOR KEY SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no file with id "%" (was it deleted?)', NEW.input_file_id
            USING ERRCODE = 'no_data_found', COLUMN = 'input_file_id';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER batches_check_input BEFORE INSERT ON spool.batches
    FOR EACH ROW EXECUTE FUNCTION spool.batches_check_input();

GRANT DELETE ON spool.files TO PUBLIC;

-- Deletes a tenant's file (tenant NULL: any tenant's). Returns OpenAI's
-- deletion object, or NULL when there is no such file; raises object_in_use
-- (COLUMN id) when a batch that has not ended reads it.
CREATE FUNCTION spool.delete_file(tenant text, id text) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    f spool.files;
    b spool.batches;
BEGIN
    SELECT * INTO f FROM spool.files x
     WHERE x.id = delete_file.id AND (delete_file.tenant IS NULL OR x.tenant = delete_file.tenant)
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT * INTO b FROM spool.batches x
     WHERE x.input_file_id = f.id AND x.status IN ('validating', 'in_progress', 'finalizing', 'cancelling')
     ORDER BY x.seq LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'file "%" is the input of batch "%", which is still %; cancel the batch or wait '
                        'until it has ended, then delete the file', f.id, b.id, b.status
            USING ERRCODE = 'object_in_use', COLUMN = 'id';
    END IF;
    DELETE FROM spool.files x WHERE x.id = f.id;
    RETURN jsonb_build_object('id', f.id, 'object', 'file', 'deleted', true);
END $$;

-- 3. A bad chat message in a batch input line is named by its index and field
--    (line 4: body.messages[1].content must be a string ...), instead of one
--    message for every kind of bad message. Otherwise batch_lines is 0009's.
CREATE OR REPLACE FUNCTION spool.batch_lines(content text, endpoint text, all_json boolean DEFAULT true)
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
               CASE WHEN jsonb_typeof(p.j) = 'object' THEN p.j -> 'body' END AS body,
               -- The first chat message that is not {"role": string, "content": string}, named.
               CASE WHEN endpoint = '/v1/chat/completions' AND jsonb_typeof(p.j) = 'object'
                         AND jsonb_typeof(p.j -> 'body' -> 'messages') = 'array' THEN
                   (SELECT format('body.messages[%s]%s', m.i - 1,
                                  CASE WHEN jsonb_typeof(m.v) <> 'object'
                                         THEN ' must be an object with string "role" and "content"'
                                       WHEN jsonb_typeof(m.v -> 'role') IS DISTINCT FROM 'string'
                                         THEN '.role must be a string'
                                       ELSE '.content must be a string (content parts are not supported)'
                                  END)
                      FROM jsonb_array_elements(p.j -> 'body' -> 'messages') WITH ORDINALITY m(v, i)
                     WHERE jsonb_typeof(m.v) <> 'object'
                        OR jsonb_typeof(m.v -> 'role') IS DISTINCT FROM 'string'
                        OR jsonb_typeof(m.v -> 'content') IS DISTINCT FROM 'string'
                     ORDER BY m.i LIMIT 1)
               END AS bad_message
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
                 WHEN endpoint = '/v1/chat/completions' AND f.bad_message IS NOT NULL
                   THEN ARRAY['invalid_request', f.bad_message]
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

-- The reads and cancel of 0009, with tenant NULL for every tenant.

CREATE OR REPLACE FUNCTION spool.file_get(tenant text, id text) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT spool.file_json(f) FROM spool.files f
     WHERE (file_get.tenant IS NULL OR f.tenant = file_get.tenant) AND f.id = file_get.id
$$;

CREATE OR REPLACE FUNCTION spool.file_content(tenant text, id text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT f.content FROM spool.files f
     WHERE (file_content.tenant IS NULL OR f.tenant = file_content.tenant) AND f.id = file_content.id
$$;

CREATE OR REPLACE FUNCTION spool.file_list(tenant text, purpose text DEFAULT NULL,
                                           lim int DEFAULT 10000, after text DEFAULT NULL)
RETURNS jsonb
LANGUAGE sql STABLE AS $$
    WITH l AS (
        SELECT greatest(1, least(coalesce(lim, 10000), 10000)) AS n
    ), page AS (
        SELECT spool.file_json(f) AS o, f.id, row_number() OVER (ORDER BY f.seq DESC) AS n
          FROM spool.files f
         WHERE (file_list.tenant IS NULL OR f.tenant = file_list.tenant)
           AND (file_list.purpose IS NULL OR f.purpose = file_list.purpose)
           AND (file_list.after IS NULL OR f.seq < (SELECT a.seq FROM spool.files a
                                                    WHERE a.id = file_list.after
                                                      AND (file_list.tenant IS NULL
                                                           OR a.tenant = file_list.tenant)))
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

CREATE OR REPLACE FUNCTION spool.batch_get(tenant text, id text) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    b spool.batches;
BEGIN
    SELECT * INTO b FROM spool.batches x
     WHERE x.id = batch_get.id AND (batch_get.tenant IS NULL OR x.tenant = batch_get.tenant);
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF b.status IN ('in_progress', 'cancelling') AND spool.finalize_batch(b.id) THEN
        SELECT * INTO b FROM spool.batches x WHERE x.id = batch_get.id;
    END IF;
    RETURN spool.batch_json(b);
END $$;

CREATE OR REPLACE FUNCTION spool.batch_list(tenant text, lim int DEFAULT 20, after text DEFAULT NULL)
RETURNS jsonb
LANGUAGE sql STABLE AS $$
    WITH l AS (
        SELECT greatest(1, least(coalesce(lim, 20), 100)) AS n
    ), page AS (
        SELECT spool.batch_json(b) AS o, b.id, row_number() OVER (ORDER BY b.seq DESC) AS n
          FROM spool.batches b
         WHERE (batch_list.tenant IS NULL OR b.tenant = batch_list.tenant)
           AND (batch_list.after IS NULL OR b.seq < (SELECT a.seq FROM spool.batches a
                                                     WHERE a.id = batch_list.after
                                                       AND (batch_list.tenant IS NULL
                                                            OR a.tenant = batch_list.tenant)))
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

CREATE OR REPLACE FUNCTION spool.cancel_batch(tenant text, id text) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    b spool.batches;
BEGIN
    SELECT * INTO b FROM spool.batches x
     WHERE x.id = cancel_batch.id AND (cancel_batch.tenant IS NULL OR x.tenant = cancel_batch.tenant)
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
