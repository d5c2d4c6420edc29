-- The worker's side of a preemption. On a notice (SIGTERM, a notice file, a
-- cloud metadata endpoint) the worker checkpoints and releases its shards,
-- then records what the preemption cost: shards released, sequences
-- interrupted, generated tokens it could not checkpoint. The scheduler may
-- already have recorded the notice when the worker's DRAIN arrived (a row
-- with nothing counted yet, a few minutes old at most): that row is completed
-- instead of adding a second one. Returns the row's id, or NULL when the
-- worker has no row in spool.workers.
CREATE FUNCTION spool.record_preemption(worker bigint, source text, shards int, sequences int,
                                        tokens_lost bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    pid bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM spool.workers w WHERE w.id = worker) THEN
        RETURN NULL;
    END IF;
    UPDATE spool.workers SET state = 'draining' WHERE id = worker AND state = 'active';
    SELECT p.id INTO pid FROM spool.preemptions p
     WHERE p.worker_id = worker AND p.noticed_at > now() - interval '5 minutes'
       AND p.shards_released = 0 AND p.sequences = 0 AND p.tokens_lost = 0
       AND p.source <> 'lease-expired'
     ORDER BY p.id DESC LIMIT 1 FOR UPDATE;
    IF pid IS NULL THEN
        INSERT INTO spool.preemptions (worker_id, source, shards_released, sequences, tokens_lost)
        VALUES (worker, coalesce(nullif(source, ''), 'unknown'), shards, sequences, tokens_lost)
        RETURNING id INTO pid;
    ELSE
        UPDATE spool.preemptions
           SET source = coalesce(nullif(record_preemption.source, ''), preemptions.source),
               shards_released = shards, sequences = record_preemption.sequences,
               tokens_lost = record_preemption.tokens_lost
         WHERE id = pid;
    END IF;
    RETURN pid;
END $$;
