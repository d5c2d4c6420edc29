#!/bin/bash
# The OpenAI Batch API end to end: a private PostgreSQL (spool dev up), the
# tiny llama-f32 model in the registry, spool-scheduler serving HTTP and one
# spool-worker, API keys for two tenants; then openai_batch.js drives the
# official openai npm client (tests/node) through files and batches and
# compares every output with spool generate.
#
# Usage: openai_batch.sh SPOOL SCHEDULER WORKER MODELS-DIR NODE-DIR
set -euo pipefail
spool=$(realpath "$1")
scheduler=$(realpath "$2")
worker=$(realpath "$3")
models=$(realpath "$4")
node_dir=$(realpath "$5")
here=$(dirname "$(realpath "$0")")
command -v node >/dev/null || { echo "node is not installed"; exit 77; }
[ -d "$node_dir/node_modules/openai" ] || { echo "no openai client in $node_dir"; exit 77; }
. "$(dirname "$(realpath "$0")")/lib.sh"
e2e_setup spd

"$spool" models push "$models/llama-f32" --name tiny --alias prod >/dev/null
key_a=$(q "SELECT key FROM spool.create_api_key('tenant-a')")
key_b=$(q "SELECT key FROM spool.create_api_key('tenant-b')")
key_ops=$(q "SELECT key FROM spool.create_api_key('ops', 'operator', '{admin}')")

"$scheduler" --listen 127.0.0.1:0 --port-file "$h/sched.port" --http-listen 127.0.0.1:0 \
    --http-port-file "$h/http.port" --heartbeat-ms 200 --lease-ttl-ms 2000 --sweep-ms 200 \
    --shard-size 50 --log-level info >"$h/scheduler.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 600); do [ -s "$h/sched.port" ] && [ -s "$h/http.port" ] && break; sleep 0.1; done
[ -s "$h/sched.port" ] && [ -s "$h/http.port" ] || fail "the scheduler did not start"
"$worker" --scheduler "127.0.0.1:$(cat "$h/sched.port")" --name w1 --threads 1 \
    --model-cache "$h/cache" >"$h/worker.log" 2>&1 &
pids+=($!)

mkdir -p "$h/work"
node "$here/openai_batch.js" "$node_dir" "http://127.0.0.1:$(cat "$h/http.port")" "$key_a" "$key_b" \
    "$spool" "$models/llama-f32" "$h/work" "$key_ops"

# Row-level security as the tenants' database roles: A's role sees A's
# batches and files only, B's role none of them.
q "CREATE ROLE tenant_a_role; CREATE ROLE tenant_b_role;
   SELECT spool.grant_tenant_role('tenant-a', 'tenant_a_role');
   SELECT spool.grant_tenant_role('tenant-b', 'tenant_b_role')" >/dev/null
total=$(q "SELECT count(*) FROM spool.batches WHERE tenant = 'tenant-a'")
[ "$total" -ge 3 ] || fail "expected tenant-a's batches, found $total"
as_a=$(q "SET ROLE tenant_a_role; SELECT count(*) FROM spool.batches")
as_b=$(q "SET ROLE tenant_b_role; SELECT count(*) FROM spool.batches; ")
files_b=$(q "SET ROLE tenant_b_role; SELECT count(*) FROM spool.files")
[ "$as_a" = "$total" ] || fail "tenant A's role sees $as_a batches, want $total"
[ "$as_b" = 0 ] && [ "$files_b" = 0 ] || fail "tenant B's role sees $as_b batches and $files_b files of A"
if grep -E "ERROR: (Address|Undefined|Leak)Sanitizer|runtime error:" "$h"/*.log; then
    fail "a sanitizer report in a daemon's log"
fi
echo "ok"
