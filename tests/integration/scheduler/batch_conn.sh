#!/bin/bash
# The Batch API runs on its own database connection in the real
# spool-scheduler: a POST /v1/batches held up inside create_batch (another
# session holds its input file's row lock, so the stall is deterministic,
# as a 50,000-line file's seconds of work would be) does not hold up the
# sweep (a job sealed meanwhile is planned into shards), key checks or
# GET /v1/models; once the lock goes, the batch is made correctly. Then admin
# keys see every tenant's batches and files, other keys only their own, and
# DELETE /v1/files/{id} refuses a file an open batch reads (409).
# Usage: batch_conn.sh PATH-TO-SPOOL PATH-TO-SPOOL-SCHEDULER
set -euo pipefail
spool=$(realpath "$1")
sched=$(realpath "$2")
tag=${SPOOL_TEST_TAG:-x}
h=$(mktemp -d "/tmp/spd-$tag-XXXXXX")
chmod 755 "$h"
export SPOOL_HOME=$h/home
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    "$spool" dev down >/dev/null 2>&1 || true
    rm -rf "$h"
}
trap cleanup EXIT
fail() {
    echo "FAIL: $*"
    echo "--- scheduler log"
    tail -40 "$h/sched.log" 2>/dev/null || true
    exit 1
}
dsn=$("$spool" dev up 2>/dev/null)
export SPOOL_DSN=$dsn
q() { psql "$dsn" -XAtq -v ON_ERROR_STOP=1 -c "$1"; }
json() { /usr/bin/python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print($2)" "$1"; }

q "INSERT INTO spool.models (name, version, digest, uri, size_bytes, architecture, dtype, n_params,
   context_length) VALUES ('tiny', 1, repeat('1', 64), 'file:///x', 1, 'LlamaForCausalLM', 'f32', 1, 256)"
key_a=$(q "SELECT key FROM spool.create_api_key('tenant-a')")
key_b=$(q "SELECT key FROM spool.create_api_key('tenant-b')")
key_c=$(q "SELECT key FROM spool.create_api_key('tenant-c')")
key_ops=$(q "SELECT key FROM spool.create_api_key('ops', 'operator', '{admin}')")

"$sched" --dsn "$dsn" --listen 127.0.0.1:0 --port-file "$h/port" --http-listen 127.0.0.1:0 \
    --http-port-file "$h/http-port" --lock-retry-ms 100 --sweep-ms 200 >"$h/sched.log" 2>&1 &
pids+=($!)
for _ in $(seq 200); do
    [ -s "$h/http-port" ] && [ -s "$h/port" ] && break
    sleep 0.1
done
[ -s "$h/http-port" ] && [ -s "$h/port" ] || fail "the scheduler did not become active"
url=http://127.0.0.1:$(cat "$h/http-port")

# call KEY METHOD PATH [CURL-ARGS...]: prints the status; the body lands in $h/body.
call() {
    local key=$1 method=$2 path=$3
    shift 3
    curl -s -o "$h/body" -w '%{http_code}' --max-time 30 -X "$method" \
        -H "Authorization: Bearer $key" "$@" "$url$path"
}

line() { printf '{"custom_id": "%s", "method": "POST", "url": "/v1/completions", "body": {"model": "tiny", "prompt": "p%s", "max_tokens": 4}}\n' "$1" "$1"; }
{ line r1; echo 'not json'; line r2; } >"$h/in.jsonl"
st=$(call "$key_a" POST "/v1/files?purpose=batch&filename=in.jsonl" --data-binary "@$h/in.jsonl")
[ "$st" = 200 ] || fail "upload: $st $(cat "$h/body")"
file=$(json "$h/body" "d['id']")

# Hold the file's row lock in another session; create_batch will wait for it.
PGAPPNAME=spool-test-locker psql "$dsn" -XAtq -v ON_ERROR_STOP=1 \
    -c "BEGIN; SELECT 1 FROM spool.files WHERE id = '$file' FOR UPDATE; SELECT pg_sleep(120)" \
    >/dev/null 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    [ "$(q "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'spool-test-locker'
            AND query LIKE '%pg_sleep%' AND state = 'active'")" = 1 ] && break
    sleep 0.1
done
curl -s -o "$h/create" -w '%{http_code}' --max-time 60 -X POST -H "Authorization: Bearer $key_a" \
    -H 'Content-Type: application/json' \
    --data-binary "{\"input_file_id\": \"$file\", \"endpoint\": \"/v1/completions\"}" \
    "$url/v1/batches" >"$h/create.status" &
create_pid=$!
pids+=($create_pid)
waiting() {
    q "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'
        AND query LIKE '%spool.create_batch(%'"
}
for _ in $(seq 100); do [ "$(waiting)" = 1 ] && break; sleep 0.1; done
[ "$(waiting)" = 1 ] || fail "create_batch is not waiting for the file's lock"

# While it waits: a fresh key is checked and the models listed (work
# connection), and a sweep plans a newly sealed job.
t0=$(date +%s%N)
st=$(call "$key_b" GET /v1/models --max-time 5) || true
ms=$((($(date +%s%N) - t0) / 1000000))
[ "$st" = 200 ] || fail "GET /v1/models during the stalled create: $st $(cat "$h/body")"
[ "$ms" -lt 2000 ] || fail "GET /v1/models took $ms ms during the stalled create"
job=$(q "SELECT spool.submit_job('tiny', 'tenant-b')")
q "INSERT INTO spool.requests (job_id, custom_id, prompt) VALUES ($job, 'x', 'hello');
   SELECT 1 FROM spool.seal_job($job)" >/dev/null
for _ in $(seq 50); do
    [ "$(q "SELECT count(*) FROM spool.shards WHERE job_id = $job")" -gt 0 ] && break
    sleep 0.1
done
[ "$(q "SELECT count(*) FROM spool.shards WHERE job_id = $job")" -gt 0 ] ||
    fail "no sweep planned job $job while create_batch waited"
[ "$(waiting)" = 1 ] || fail "create_batch stopped waiting before the lock went"
kill -0 $create_pid 2>/dev/null || fail "POST /v1/batches answered while its query waited"
echo "GET /v1/models answered in $ms ms; job $job planned, while create_batch waited"

# Release the lock: the batch is made, with the bad line counted.
q "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'spool-test-locker'" >/dev/null
wait $create_pid || true
[ "$(cat "$h/create.status")" = 200 ] || fail "create: $(cat "$h/create.status") $(cat "$h/create")"
[ "$(json "$h/create" "d['status'], d['request_counts']['total'], d['request_counts']['failed']")" = \
    "in_progress 3 1" ] || fail "create answered $(cat "$h/create")"
batch=$(json "$h/create" "d['id']")

# Admin keys see every tenant's batches and files; B sees none of A's.
st=$(call "$key_ops" GET /v1/batches)
[ "$st" = 200 ] && json "$h/body" "[b['id'] for b in d['data']]" | grep -q "$batch" ||
    fail "the admin key does not list A's batch: $st $(cat "$h/body")"
st=$(call "$key_ops" GET "/v1/files/$file")
[ "$st" = 200 ] || fail "the admin key cannot read A's file: $st"
st=$(call "$key_b" GET /v1/batches)
[ "$st" = 200 ] && ! grep -q "$batch" "$h/body" || fail "B lists A's batch: $(cat "$h/body")"
st=$(call "$key_b" GET "/v1/batches/$batch")
[ "$st" = 404 ] || fail "B reads A's batch: $st"

# DELETE: 409 while the batch is open, 404 for another tenant, then gone.
st=$(call "$key_a" DELETE "/v1/files/$file")
[ "$st" = 409 ] && grep -q "$batch" "$h/body" || fail "deleting an open batch's input: $st $(cat "$h/body")"
st=$(call "$key_c" DELETE "/v1/files/$file")
[ "$st" = 404 ] || fail "C deletes A's file: $st"
st=$(call "$key_a" POST "/v1/batches/$batch/cancel")
[ "$st" = 200 ] || fail "cancel: $st"
for _ in $(seq 50); do
    call "$key_a" GET "/v1/batches/$batch" >/dev/null
    [ "$(json "$h/body" "d['status']")" = cancelled ] && break
    sleep 0.1
done
errf=$(json "$h/body" "d['error_file_id']")
st=$(call "$key_a" DELETE "/v1/files/$file")
[ "$st" = 200 ] && [ "$(json "$h/body" "d['id'], d['object'], d['deleted']")" = "$file file True" ] ||
    fail "delete: $st $(cat "$h/body")"
st=$(call "$key_a" GET "/v1/files/$file")
[ "$st" = 404 ] || fail "a deleted file reads as $st"

# As the tenants' database roles: B's cannot delete A's file even passing
# NULL (every tenant); A's can.
q "CREATE ROLE tb_role; CREATE ROLE ta_role;
   SELECT spool.grant_tenant_role('tenant-b', 'tb_role');
   SELECT spool.grant_tenant_role('tenant-a', 'ta_role')" >/dev/null
[ "$(q "SET ROLE tb_role; SELECT spool.delete_file(NULL, '$errf') IS NULL")" = t ] ||
    fail "tenant B's role deleted A's file"
[ "$(q "SELECT count(*) FROM spool.files WHERE id = '$errf'")" = 1 ] || fail "A's error file is gone"
[ "$(q "SET ROLE ta_role; SELECT spool.delete_file('tenant-a', '$errf') ->> 'deleted'")" = true ] ||
    fail "tenant A's role cannot delete its file"
echo "ok"
