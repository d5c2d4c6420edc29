-- spool.cancel_job, retried on deadlock. cancel_job locks the job, then its
-- requests, then its shards; a worker's complete_requests locks its shard,
-- then requests, then the job (for the counters). A cancel during a running
-- job could therefore deadlock with a worker writing results, and PostgreSQL
-- may pick the cancel as the victim: the caller then saw "deadlock detected"
-- and the job kept running (found by tests/e2e/batch.sh cancel). The body now
-- runs in a subtransaction that is retried (its locks are released by the
-- rollback, so the worker's write goes through first); the worker already
-- retries its own writes.
CREATE OR REPLACE FUNCTION spool.cancel_job(job bigint) RETURNS spool.jobs
LANGUAGE plpgsql AS $$
DECLARE
    j spool.jobs;
    n int;
BEGIN
    FOR attempt IN 1..20 LOOP
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
        EXCEPTION WHEN deadlock_detected THEN
            IF attempt = 20 THEN
                RAISE;
            END IF;
            PERFORM pg_sleep(0.01 * attempt);
        END;
    END LOOP;
END $$;
