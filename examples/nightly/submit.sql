-- A nightly batch submitted through SQL, in one transaction: nothing is
-- visible to the scheduler until COMMIT.
--
--   psql "$SPOOL_DSN" -v prompts="$PWD/examples/nightly/prompts.jsonl" -f examples/nightly/submit.sql
--
-- prompts.jsonl has one JSON object per line: custom_id, and prompt (text)
-- or messages (chat). A line with neither fails alone, with an error on its
-- request; the rest run. Resubmitting on the same day returns the same job
-- (idempotency key).
\set ON_ERROR_STOP on
BEGIN;
CREATE TEMP TABLE nightly_input (line jsonb) ON COMMIT DROP;
-- CSV with quote and delimiter characters that never occur in JSON lines, so
-- that backslashes in the JSON reach PostgreSQL untouched.
\set copy_cmd '\\copy nightly_input (line) FROM ' :'prompts' ' WITH (FORMAT csv, QUOTE e''\\x01'', DELIMITER e''\\x02'')'
:copy_cmd
SELECT spool.submit_job('demo@prod', 'demo',
                        '{"max_tokens": 24, "temperature": 0.8, "top_p": 0.95, "seed": 42}',
                        idempotency_key => 'nightly-' || current_date) AS job \gset
INSERT INTO spool.requests (job_id, custom_id, prompt, messages)
SELECT :job, line->>'custom_id', line->>'prompt', line->'messages'
  FROM nightly_input
 WHERE NOT EXISTS (SELECT 1 FROM spool.requests r WHERE r.job_id = :job);
SELECT id AS job, state, total, failed FROM spool.seal_job(:job);
COMMIT;
