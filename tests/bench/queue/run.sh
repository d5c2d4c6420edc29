#!/bin/bash
# The batch lane's own throughput, end to end: requests per second from the
# submission (one SQL transaction) to the last stored result, with the real
# scheduler and two workers on the engine's null backend (no arithmetic), so
# that the queue, the wire protocol and the result writes are what is
# measured. Then tests/bench/queue/baseline.sh's raw PostgreSQL figure, in the
# same run, for comparison, over the same number of requests. Prints figures;
# asserts nothing.
#
# usage: tests/bench/queue/run.sh [BUILD-DIR] [REQUESTS] [WORKERS]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
build=$(realpath "${1:-$here/../../../build}")
n=${2:-20000}
n_workers=${3:-2}
spool=$build/clients/spool

h=$(mktemp -d /tmp/spq-XXXXXX)
chmod 755 "$h"
export SPOOL_HOME=$h/home SPOOL_MODEL_STORE=$h/store
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    "$spool" dev down >/dev/null 2>&1 || true
    rm -rf "$h"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
dsn=$("$spool" dev up 2>/dev/null)
export SPOOL_DSN=$dsn
q() { psql "$dsn" -XAtq -v ON_ERROR_STOP=1 -c "$1"; }
"$spool" models push "$build/tests/models/llama-f32" --name bench --alias prod >/dev/null

"$build/scheduler/spool-scheduler" --listen 127.0.0.1:0 --port-file "$h/port" \
    --heartbeat-ms 1000 --lease-ttl-ms 10000 --sweep-ms 200 --shard-size 256 \
    >"$h/scheduler.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 300); do [ -s "$h/port" ] && break; sleep 0.1; done
port=$(cat "$h/port")
for i in $(seq 1 "$n_workers"); do
    "$build/worker/spool-worker" --scheduler "127.0.0.1:$port" --name "null-$i" --backend null \
        --max-batch 256 --threads 1 --model-cache "$h/cache-$i" >"$h/worker-$i.log" 2>&1 &
    pids+=($!)
done
# Let the workers register and fetch the model before the clock starts.
for _ in $(seq 1 300); do
    [ "$(q "SELECT count(*) FROM spool.workers WHERE state = 'active'")" -ge "$n_workers" ] && break
    sleep 0.1
done

t0=$(date +%s.%N)
job=$(psql "$dsn" -XAtq -v ON_ERROR_STOP=1 <<SQL | tail -1
BEGIN;
SELECT spool.submit_job('bench@prod', 'bench', '{"max_tokens": 4, "temperature": 0}') AS job \gset
INSERT INTO spool.requests (job_id, custom_id, prompt)
SELECT :job, 'r' || i, 'prompt text of a typical short request ' || i FROM generate_series(1, $n) i;
SELECT spool.seal_job(:job);
COMMIT;
SELECT :job;
SQL
)
# Wait on one connection (a new psql every 50 ms would take CPU from the
# measured processes: about a process and a backend start per poll).
psql "$dsn" -XAtq -v ON_ERROR_STOP=1 >/dev/null <<SQL
DO \$\$ BEGIN
    WHILE (SELECT state FROM spool.jobs WHERE id = $job) NOT IN ('succeeded', 'failed', 'cancelled') LOOP
        PERFORM pg_sleep(0.02);
    END LOOP;
END \$\$;
SQL
t1=$(date +%s.%N)
st=$(q "SELECT state FROM spool.job_status WHERE job_id = $job")
ok=$(q "SELECT succeeded FROM spool.job_status WHERE job_id = $job")
rate=$(awk -v n="$ok" -v a="$t0" -v b="$t1" 'BEGIN {printf "%.0f", n / (b - a)}')
echo "spool: $n requests (max_tokens 4, null backend, $n_workers workers): job $st," \
    "$ok succeeded in $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}') s"
echo "spool_requests_per_s $rate"
cleanup
trap - EXIT
base=$("$here/baseline.sh" "$spool" "$n" 2>/dev/null | awk '/baseline_requests_per_s/ {print $2}')
echo "baseline_requests_per_s $base"
awk -v s="$rate" -v b="$base" 'BEGIN {printf "spool/baseline %.2f\n", s / b}'
