-- The claim and completion paths of the batch lane, as functions so that each
-- step is one round trip and one transaction. The scheduler plans shards,
-- leases them to workers and expires leases; workers write results fenced by
-- their lease token: a worker that lost its lease writes nothing.

-- Cuts a queued job's pending requests into shards of at most shard_size
-- consecutive requests (by id). Returns the number of shards created. A job
-- left with nothing to run is finished at once.
CREATE FUNCTION spool.plan_shards(job bigint, shard_size int) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    n int;
BEGIN
    IF shard_size IS NULL OR shard_size < 1 THEN
        RAISE EXCEPTION 'shard_size must be at least 1, got %', shard_size
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM 1 FROM spool.jobs WHERE id = job AND state = 'queued' FOR UPDATE;
    IF NOT FOUND OR EXISTS (SELECT 1 FROM spool.shards s WHERE s.job_id = job) THEN
        RETURN 0;
    END IF;
    INSERT INTO spool.shards (job_id, first_request_id, last_request_id, n_requests)
    SELECT job, min(id), max(id), count(*)
      FROM (SELECT id, (row_number() OVER (ORDER BY id) - 1) / shard_size AS g
              FROM spool.requests r WHERE r.job_id = job AND r.state = 'pending') q
     GROUP BY g ORDER BY g;
    GET DIAGNOSTICS n = ROW_COUNT;
    UPDATE spool.jobs SET state = 'running', started_at = coalesce(started_at, now()) WHERE id = job;
    IF n = 0 THEN
        PERFORM spool.finish_job_if_done(job);
    END IF;
    RETURN n;
END $$;

-- Finishes a job whose requests have all ended: succeeded when at least one
-- request succeeded (or none were left to run), failed when every request
-- failed. Returns true when the job is (now) finished.
CREATE FUNCTION spool.finish_job_if_done(job bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    j spool.jobs;
BEGIN
    SELECT * INTO j FROM spool.jobs WHERE id = job FOR UPDATE;
    IF j.state IN ('succeeded', 'failed', 'cancelled') THEN
        RETURN true;
    END IF;
    IF j.state = 'open' OR EXISTS (SELECT 1 FROM spool.requests r
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

-- Leases a pending shard to a worker; returns the fencing token, or NULL when
-- the shard is no longer pending (or not yet due for retry).
CREATE FUNCTION spool.lease_shard(shard bigint, worker bigint, ttl interval) RETURNS bigint
LANGUAGE sql AS $$
    UPDATE spool.shards
       SET state = 'leased', worker_id = worker, lease_token = nextval('spool.lease_tokens'),
           lease_expires_at = now() + ttl, attempts = attempts + 1
     WHERE id = shard AND state = 'pending'
    RETURNING lease_token
$$;

-- Extends every lease a worker holds (its heartbeat). Returns how many.
CREATE FUNCTION spool.renew_leases(worker bigint, ttl interval) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    n int;
BEGIN
    UPDATE spool.shards SET lease_expires_at = now() + ttl
     WHERE worker_id = worker AND state = 'leased';
    GET DIAGNOSTICS n = ROW_COUNT;
    UPDATE spool.workers SET heartbeat_at = now() WHERE id = worker;
    RETURN n;
END $$;

-- Checks a lease and locks the shard row against a concurrent re-lease for
-- the rest of the caller's transaction. Raises 'lease lost' otherwise.
CREATE FUNCTION spool.check_lease(shard bigint, token bigint) RETURNS spool.shards
LANGUAGE plpgsql AS $$
DECLARE
    s spool.shards;
BEGIN
    SELECT * INTO s FROM spool.shards WHERE id = shard FOR SHARE;
    IF NOT FOUND OR s.state <> 'leased' OR s.lease_token IS DISTINCT FROM token THEN
        RAISE EXCEPTION 'lease lost: shard % is no longer leased with token %', shard, token
            USING ERRCODE = 'lock_not_available',
                  HINT = 'the shard was released, expired or given to another worker; its results are discarded';
    END IF;
    RETURN s;
END $$;

-- Marks requests of a leased shard as running (the worker started them).
-- A request waiting out a retry backoff (next_attempt_at) is not started.
CREATE FUNCTION spool.start_requests(shard bigint, token bigint, ids bigint[]) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    s spool.shards := spool.check_lease(shard, token);
    n int;
BEGIN
    UPDATE spool.requests r
       SET state = 'running', attempts = attempts + 1, worker_id = s.worker_id
     WHERE r.id = ANY (ids) AND r.job_id = s.job_id
       AND r.id BETWEEN s.first_request_id AND s.last_request_id AND r.state = 'pending'
       AND (r.next_attempt_at IS NULL OR r.next_attempt_at <= now());
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

-- Writes finished requests of a leased shard, in one transaction fenced by
-- the lease token. results is a JSON array of objects:
--   {"id": bigint, "state": "succeeded"|"failed"|"retry", "output": text,
--    "output_tokens": [int], "finish_reason": text, "tokens_in": int,
--    "tokens_out": int, "gpu_seconds": float, "cost": numeric, "error": text,
--    "model_id": bigint, "retry_after_ms": int}
-- "retry" puts the request back to pending (attempts count) to be run again
-- after retry_after_ms, unless it has reached max_attempts, in which case it
-- fails with its error. Requests already finished are left alone, so a
-- result is stored exactly once. Returns the number of requests written.
CREATE FUNCTION spool.complete_requests(shard bigint, token bigint, results jsonb,
                                        max_attempts int DEFAULT 3) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    s spool.shards := spool.check_lease(shard, token);
    n int;
BEGIN
    WITH res AS (
        SELECT * FROM jsonb_to_recordset(results) AS x(
            id bigint, state text, output text, output_tokens int[], finish_reason text,
            tokens_in int, tokens_out int, gpu_seconds double precision, cost numeric,
            error text, model_id bigint, retry_after_ms int)
    ), upd AS (
        UPDATE spool.requests r
           SET state = CASE WHEN res.state = 'retry' AND r.attempts < max_attempts THEN 'pending'
                            WHEN res.state = 'retry' THEN 'failed'
                            ELSE res.state END,
               next_attempt_at = CASE WHEN res.state = 'retry'
                                      THEN now() + make_interval(secs => coalesce(res.retry_after_ms, 1000) / 1000.0) END,
               output = res.output, output_tokens = res.output_tokens,
               finish_reason = res.finish_reason, tokens_in = res.tokens_in,
               tokens_out = res.tokens_out, gpu_seconds = res.gpu_seconds, cost = res.cost,
               error = CASE WHEN res.state = 'retry' AND r.attempts >= max_attempts
                            THEN res.error || ' (gave up after ' || r.attempts || ' attempts)'
                            ELSE res.error END,
               model_id = coalesce(res.model_id, r.model_id),
               checkpoint = CASE WHEN res.state = 'retry' THEN r.checkpoint END,
               finished_at = CASE WHEN res.state = 'retry' AND r.attempts < max_attempts THEN NULL ELSE now() END
          FROM res
         WHERE r.id = res.id AND r.job_id = s.job_id
           AND r.id BETWEEN s.first_request_id AND s.last_request_id
           AND r.state IN ('pending', 'running')
           AND res.state IN ('succeeded', 'failed', 'retry')
        RETURNING r.state, r.tokens_in, r.tokens_out
    ), agg AS (
        SELECT count(*) AS n,
               count(*) FILTER (WHERE state = 'succeeded') AS ok,
               count(*) FILTER (WHERE state = 'failed') AS bad,
               coalesce(sum(tokens_in) FILTER (WHERE state <> 'pending'), 0) AS tin,
               coalesce(sum(tokens_out) FILTER (WHERE state <> 'pending'), 0) AS tout
          FROM upd
    ), counters AS (
        UPDATE spool.jobs j
           SET succeeded = j.succeeded + agg.ok, failed = j.failed + agg.bad,
               tokens_in = j.tokens_in + agg.tin, tokens_out = j.tokens_out + agg.tout
          FROM agg
         WHERE j.id = s.job_id AND agg.n > 0
    )
    SELECT agg.n INTO n FROM agg;
    RETURN n;
END $$;

-- Saves the tokens generated so far for in-flight requests, fenced by the
-- lease. checkpoints: JSON array of {"id": bigint, "tokens": [int]}.
CREATE FUNCTION spool.checkpoint_requests(shard bigint, token bigint, checkpoints jsonb) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    s spool.shards := spool.check_lease(shard, token);
    n int;
BEGIN
    UPDATE spool.requests r
       SET checkpoint = x.tokens, checkpoint_at = now()
      FROM jsonb_to_recordset(checkpoints) AS x(id bigint, tokens int[])
     WHERE r.id = x.id AND r.job_id = s.job_id
       AND r.id BETWEEN s.first_request_id AND s.last_request_id AND r.state = 'running';
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

-- Ends a lease: the shard is done when none of its requests is left to run,
-- otherwise it goes back to pending (its running requests too, keeping their
-- checkpoints) for another worker. Returns the shard's new state.
CREATE FUNCTION spool.release_shard(shard bigint, token bigint, reason text DEFAULT 'done') RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    s spool.shards := spool.check_lease(shard, token);
    left_ int;
    st text;
BEGIN
    UPDATE spool.requests r SET state = 'pending'
     WHERE r.job_id = s.job_id AND r.id BETWEEN s.first_request_id AND s.last_request_id
       AND r.state = 'running';
    SELECT count(*) INTO left_ FROM spool.requests r
     WHERE r.job_id = s.job_id AND r.id BETWEEN s.first_request_id AND s.last_request_id
       AND r.state = 'pending';
    st := CASE WHEN left_ = 0 THEN 'done' ELSE 'pending' END;
    UPDATE spool.shards
       SET state = st, worker_id = NULL, lease_token = NULL, lease_expires_at = NULL,
           finished_at = CASE WHEN st = 'done' THEN now() END
     WHERE id = shard;
    IF st = 'done' THEN
        PERFORM spool.finish_job_if_done(s.job_id);
    ELSE
        PERFORM pg_notify('spool_jobs', s.job_id::text);
    END IF;
    RETURN st;
END $$;

-- Takes back every lease that expired (a worker died or froze). Their
-- running requests return to pending with their checkpoints. Returns the
-- shards taken back.
CREATE FUNCTION spool.expire_leases() RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
DECLARE
    s spool.shards;
BEGIN
    FOR s IN SELECT * FROM spool.shards
              WHERE state = 'leased' AND lease_expires_at < now()
              FOR UPDATE SKIP LOCKED
    LOOP
        UPDATE spool.requests r SET state = 'pending'
         WHERE r.job_id = s.job_id AND r.id BETWEEN s.first_request_id AND s.last_request_id
           AND r.state = 'running';
        UPDATE spool.shards
           SET state = 'pending', worker_id = NULL, lease_token = NULL, lease_expires_at = NULL
         WHERE id = s.id;
        -- Tokens generated since the last checkpoint died with the worker;
        -- the worker that resumes the shard reports what it recomputes.
        INSERT INTO spool.preemptions (worker_id, source, shards_released)
        SELECT s.worker_id, 'lease-expired', 1
         WHERE EXISTS (SELECT 1 FROM spool.workers w WHERE w.id = s.worker_id);
        RETURN NEXT s.id;
    END LOOP;
END $$;
