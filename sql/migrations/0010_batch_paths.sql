-- Cheaper claim and completion paths for the batch lane, found with
-- EXPLAIN ANALYZE and pg_stat_statements on tests/bench/queue (see
-- docs/architecture.md, "The queue benchmark").
--
-- 1. finish_job_if_done ran on every shard release and asked whether any of
--    the job's requests was still pending or running. Requests finish in
--    about id order, so that EXISTS walked over every finished request of
--    the job before finding an unfinished one (or chose a sequential scan
--    from stale statistics): 24-29 ms per shard at 150,000 of 200,000
--    finished, quadratic over a job. A shard still pending or leased is
--    proof of work left, found with one probe of a partial index
--    (shards_claim, shards_leases); the requests are looked at only once
--    every shard has ended, i.e. about once per job. The answer is the
--    same: a shard is released as done only when none of its requests is
--    pending or running, and only a worker holding its lease can change
--    them again.
--
-- 2. The check that requests go only into an open job ran a query per
--    inserted row (BEFORE INSERT ... FOR EACH ROW), about doubling the cost
--    of INSERT ... SELECT and COPY (50,000 rows: 4.3-4.9 s against
--    2.1-2.5 s without it, on a loaded machine). It now runs once per
--    statement over the inserted rows (a transition table), with the same
--    error. A job that does not exist is still refused, by the foreign key,
--    before this check runs.
--
-- 3. A request row is updated twice (start_requests, complete_requests),
--    the second time growing by its output. With fillfactor 80 a page had
--    room for few new versions, so most updates were not HOT and inserted
--    into both indexes: 20% HOT on the queue benchmark (20,000 requests).
--    At fillfactor 50, 51% HOT and 15-25% less PostgreSQL CPU for the same
--    work (4.6 -> 4.2 s and 3.9 -> 3.0 s in two paired runs). It costs heap
--    space for pending rows; it applies to pages written from now on.

CREATE OR REPLACE FUNCTION spool.finish_job_if_done(job bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    j spool.jobs;
BEGIN
    SELECT * INTO j FROM spool.jobs WHERE id = job FOR UPDATE;
    IF j.state IN ('succeeded', 'failed', 'cancelled') THEN
        RETURN true;
    END IF;
    IF j.state = 'open'
       OR EXISTS (SELECT 1 FROM spool.shards s WHERE s.job_id = job AND s.state = 'pending')
       OR EXISTS (SELECT 1 FROM spool.shards s WHERE s.job_id = job AND s.state = 'leased')
       OR EXISTS (SELECT 1 FROM spool.requests r
                   WHERE r.job_id = job AND r.state IN ('pending', 'running')) THEN
        RETURN false;
    END IF;
    UPDATE spool.jobs
       SET state = CASE WHEN j.total > 0 AND j.failed >= j.total THEN 'failed' ELSE 'succeeded' END,
           finished_at = now()
     WHERE id = job;
    UPDATE spool.shards SET state = 'done', finished_at = now()
     WHERE shards.job_id = job AND state IN ('pending', 'leased');
    PERFORM pg_notify('spool_job_done', job::text);
    RETURN true;
END $$;

CREATE FUNCTION spool.requests_check_open_stmt() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bad record;
BEGIN
    SELECT n.job_id, j.state INTO bad
      FROM (SELECT DISTINCT job_id FROM new_requests) n
      LEFT JOIN spool.jobs j ON j.id = n.job_id
     WHERE j.state IS DISTINCT FROM 'open'
     LIMIT 1;
    IF NOT FOUND THEN
        RETURN NULL;
    ELSIF bad.state IS NULL THEN
        RAISE EXCEPTION 'job % does not exist', bad.job_id USING ERRCODE = 'foreign_key_violation';
    ELSE
        RAISE EXCEPTION 'job % is %; requests can only be added to an open job', bad.job_id, bad.state
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'submit a new job with spool.submit_job()';
    END IF;
END $$;

DROP TRIGGER requests_check_open ON spool.requests;
CREATE TRIGGER requests_check_open AFTER INSERT ON spool.requests
    REFERENCING NEW TABLE AS new_requests
    FOR EACH STATEMENT EXECUTE FUNCTION spool.requests_check_open_stmt();

ALTER TABLE spool.requests SET (fillfactor = 50);
