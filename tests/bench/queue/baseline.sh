#!/bin/bash
# The raw PostgreSQL baseline for tests/bench/queue: how many requests per
# second this machine's PostgreSQL can claim (FOR UPDATE SKIP LOCKED) and
# complete on Spool's own schema, with pgbench, in batches like a worker's.
# Prints "baseline_requests_per_s N". Spool's own end-to-end figure (with the
# null backend) is measured against this in the same run by the queue benchmark.
#
# The clients work through exactly REQUESTS rows (the same number Spool gets
# in run.sh, so that both see a table of one size: the claim's cost grows
# with the dead index entries ahead of the first pending row, 5 ms per 64
# rows on 200,000 against 26 ms on 500,000), and the figure is REQUESTS over
# the time pgbench took to store them all.
#
# usage: tests/bench/queue/baseline.sh [SPOOL-BINARY] [REQUESTS] [BATCH] [CLIENTS]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
spool=${1:-$here/../../../build/clients/spool}
n=${2:-20000}
batch=${3:-64}
clients=${4:-2}
pgbench=/usr/lib/postgresql/15/bin/pgbench

home=$(mktemp -d /tmp/spq-XXXXXX)
chmod 755 "$home"
trap 'SPOOL_HOME=$home "$spool" dev down >/dev/null 2>&1; rm -rf "$home"' EXIT
dsn=$(SPOOL_HOME=$home "$spool" dev up 2>/dev/null)
psql() { command psql "$dsn" -XAtq -v ON_ERROR_STOP=1 "$@"; }

psql >/dev/null <<SQL
INSERT INTO spool.models (name, version, digest, uri, size_bytes, architecture, dtype, n_params, context_length)
VALUES ('bench', 1, repeat('b', 64), 'file:///bench', 1, 'null', 'f32', 1, 4096);
SELECT spool.submit_job('bench') AS job \gset
COPY spool.requests (job_id, custom_id, prompt) FROM PROGRAM 'seq 1 $n | sed "s/^/1\tr/; s/\$/\tprompt text of a typical short request/"';
SELECT spool.seal_job(1);
-- A raw queue claims rows by state, so it needs what Spool's schema leaves out
-- on purpose (Spool claims shards, not requests): an index on the unfinished
-- rows. It leads with job_id so that it matches the claim's whole WHERE
-- clause: with an index on (id) alone, fresh statistics (25% of the rows
-- pending, say) make the planner prefer requests_job (job_id, id) and
-- filter state, walking over every finished row of the job before the
-- first pending one (EXPLAIN ANALYZE at 150,000 of 200,000 done: 261 ms per
-- claim, against 0.2 ms through this index).
CREATE INDEX requests_bench_pending ON spool.requests (job_id, id) WHERE state = 'pending';
-- ... and autovacuum tuned for a queue table, so that the planner keeps
-- seeing how few rows are still pending.
ALTER TABLE spool.requests SET (autovacuum_vacuum_threshold = 2000, autovacuum_vacuum_scale_factor = 0,
                                autovacuum_analyze_threshold = 2000, autovacuum_analyze_scale_factor = 0);
ALTER SYSTEM SET autovacuum_naptime = '1s';
SELECT pg_reload_conf();
VACUUM ANALYZE spool.requests;
SQL

# A worker's cycle: claim a batch (one transaction), then store its results
# by id (another), as River/Oban/pgmq-style queues do.
cat > "$home/claim_complete.sql" <<SQL
WITH c AS (
  SELECT id FROM spool.requests WHERE job_id = 1 AND state = 'pending'
  ORDER BY id LIMIT $batch FOR UPDATE SKIP LOCKED),
u AS (
  UPDATE spool.requests r SET state = 'running', worker_id = :client_id, attempts = attempts + 1
    FROM c WHERE r.id = c.id RETURNING r.id)
SELECT 'ARRAY[' || coalesce(string_agg(id::text, ','), '') || ']' AS ids FROM u \\gset
UPDATE spool.requests SET state = 'succeeded', output = 'generated text of a typical answer',
       finish_reason = 'stop', tokens_in = 12, tokens_out = 24, finished_at = now()
 WHERE id = ANY (:ids::bigint[]);
SQL
host=$(sed -E 's/.*host=([^ ]+).*/\1/' <<<"$dsn")
# Each client runs enough transactions for its share and one more (SKIP
# LOCKED hands out every row exactly once; a claim that finds nothing left
# costs next to nothing).
per_client=$(( (n + batch * clients - 1) / (batch * clients) + 1 ))
t0=$(date +%s.%N)
out=$("$pgbench" -n -h "$host" -U postgres -d spool -c "$clients" -j "$clients" -t "$per_client" \
      -r -f "$home/claim_complete.sql" 2>&1)
t1=$(date +%s.%N)
echo "$out" | grep -A12 "statement latencies" >&2
done_=$(psql -c "SELECT count(*) FROM spool.requests WHERE state = 'succeeded'")
[ "$done_" = "$n" ] || echo "warning: $done_ of $n requests stored" >&2
secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}')
rate=$(awk -v d="$done_" -v s="$secs" 'BEGIN {printf "%.0f", d / s}')
echo "pgbench: $clients clients, batches of $batch: $done_ requests in $secs s"
echo "baseline_requests_per_s $rate"
