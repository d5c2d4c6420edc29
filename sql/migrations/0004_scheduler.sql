-- The scheduler's side of the batch lane: worker registration and state,
-- planning every queued job, the placement snapshot, and the leases a
-- cancelled job leaves behind. spool-scheduler calls only these functions
-- and those of 0003; the placement decision itself is made in C
-- (scheduler/placement.c) from the rows placement_candidates returns.
--
-- workers.state: active --worker_draining--> draining --worker_gone--> gone
--                active --worker_gone--> gone;  gone|draining --register_worker--> active

-- Registers a worker, or re-registers the one whose id it quotes (a
-- reconnect) when that row exists under the same name. models is a JSON
-- array of {"name", "version", "digest"}. Returns the worker's id.
CREATE FUNCTION spool.register_worker(worker bigint, name text, gpu_type text, gpu_memory bigint,
                                      capacity text, price double precision, backend text,
                                      models jsonb) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    wid bigint;
BEGIN
    IF worker IS NOT NULL THEN
        UPDATE spool.workers w
           SET gpu_type = register_worker.gpu_type, gpu_memory_bytes = gpu_memory,
               capacity_type = capacity, price_per_hour = price, backend = register_worker.backend,
               models = register_worker.models, state = 'active', gone_at = NULL, heartbeat_at = now()
         WHERE w.id = worker AND w.name = register_worker.name
        RETURNING w.id INTO wid;
    END IF;
    IF wid IS NULL THEN
        INSERT INTO spool.workers (name, gpu_type, gpu_memory_bytes, capacity_type, price_per_hour,
                                   backend, models)
        VALUES (name, gpu_type, gpu_memory, capacity, price, backend, models)
        RETURNING id INTO wid;
    END IF;
    RETURN wid;
END $$;

-- A worker announced its preemption (DRAIN): it takes no more work, and the
-- notice is recorded with its source ("spot notice", "sigterm", ...).
CREATE FUNCTION spool.worker_draining(worker bigint, source text) RETURNS void
LANGUAGE sql AS $$
    UPDATE spool.workers SET state = 'draining' WHERE id = worker AND state = 'active';
    INSERT INTO spool.preemptions (worker_id, source)
    SELECT worker, coalesce(nullif(source, ''), 'unknown')
     WHERE EXISTS (SELECT 1 FROM spool.workers WHERE id = worker);
$$;

-- A worker said GOODBYE or its connection ended. Its leases are left to
-- expire: a worker that merely lost its connection may still be writing,
-- and its lease token keeps that safe.
CREATE FUNCTION spool.worker_gone(worker bigint) RETURNS void
LANGUAGE sql AS $$
    UPDATE spool.workers SET state = 'gone', gone_at = now() WHERE id = worker AND state <> 'gone';
$$;

-- Plans every queued job (oldest first) into shards of at most shard_size
-- requests. Returns the number of shards created.
CREATE FUNCTION spool.plan_queued(shard_size int) RETURNS int
LANGUAGE sql AS $$
    SELECT coalesce(sum(spool.plan_shards(j.id, shard_size)), 0)::int
      FROM (SELECT id FROM spool.jobs WHERE state = 'queued' ORDER BY id) j
$$;

-- Requests currently leased to each of the given workers.
CREATE FUNCTION spool.worker_load(workers bigint[])
RETURNS TABLE (worker_id bigint, leased_requests bigint)
LANGUAGE sql STABLE AS $$
    SELECT s.worker_id, sum(s.n_requests)::bigint
      FROM spool.shards s
     WHERE s.state = 'leased' AND s.worker_id = ANY (workers)
     GROUP BY s.worker_id
$$;

-- The shards waiting for a worker, in the order placement considers them
-- within a tenant: higher job priority first, then earlier deadline (none
-- last), then older job, then shard order. Each row carries what placement
-- needs: the tenant, its weight and the requests it has leased now (for
-- weighted fair share), and the pinned model (for affinity). Only shards of
-- queued or running batch jobs; a cancelled job's shards are cancelled too.
CREATE FUNCTION spool.placement_candidates(max_rows int)
RETURNS TABLE (shard_id bigint, job_id bigint, n_requests int, priority int,
               deadline_epoch double precision, tenant text, tenant_weight double precision,
               tenant_leased bigint, model_name text, model_version int, model_digest text)
LANGUAGE sql STABLE AS $$
    WITH leased AS (
        SELECT j.tenant, sum(s.n_requests)::bigint AS n
          FROM spool.shards s JOIN spool.jobs j ON j.id = s.job_id
         WHERE s.state = 'leased'
         GROUP BY j.tenant
    )
    SELECT s.id, s.job_id, s.n_requests, j.priority, extract(epoch FROM j.deadline)::double precision,
           j.tenant, t.weight, coalesce(l.n, 0), m.name, m.version, 'sha256:' || m.digest
      FROM spool.jobs j
      JOIN spool.shards s ON s.job_id = j.id AND s.state = 'pending'
      JOIN spool.tenants t ON t.name = j.tenant
      JOIN spool.models m ON m.id = j.model_id
      LEFT JOIN leased l ON l.tenant = j.tenant
     WHERE j.state IN ('queued', 'running') AND j.lane = 'batch'
     ORDER BY j.priority DESC, j.deadline ASC NULLS LAST, j.id, s.id
     LIMIT max_rows
$$;

-- The leases a cancelled job's shards still name: the workers holding them
-- are told to stop (REVOKE). cancel_job keeps worker_id and lease_token on
-- the cancelled shards, which is what this reads.
CREATE FUNCTION spool.cancelled_leases(job bigint)
RETURNS TABLE (shard_id bigint, worker_id bigint, lease_token bigint)
LANGUAGE sql STABLE AS $$
    SELECT s.id, s.worker_id, s.lease_token
      FROM spool.shards s
     WHERE s.job_id = job AND s.state = 'cancelled' AND s.worker_id IS NOT NULL
       AND s.lease_token IS NOT NULL
$$;
