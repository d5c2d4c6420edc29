#!/bin/bash
# Per-key rate limits and the live-request log through the real
# spool-scheduler's HTTP front, with keys made by `spool keys create` on a
# private PostgreSQL. No worker runs, so an admitted request for the
# registered model gets 503 (no worker): enough to see admission, refusal
# (429 with Retry-After), the token refund when nothing was generated, 401
# for missing, invalid and revoked keys, and every answered request in
# spool.live_requests.
# Usage: http_limits.sh PATH-TO-SPOOL PATH-TO-SPOOL-SCHEDULER
set -euo pipefail
spool=$(realpath "$1")
sched=$(realpath "$2")
tag=${SPOOL_TEST_TAG:-x}
h=$(mktemp -d "/tmp/spd-$tag-XXXXXX")
chmod 755 "$h"
export SPOOL_HOME=$h/home
spid=
cleanup() {
    if [ -n "$spid" ]; then kill -9 "$spid" 2>/dev/null || true; fi
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
key_of() { awk '$1 == "key" {print $2}'; }
id_of() { awk '$1 == "id" {print $2}'; }

q "INSERT INTO spool.models (name, version, digest, uri, size_bytes, architecture, dtype, n_params,
   context_length) VALUES ('tiny', 1, repeat('1', 64), 'file:///x', 1, 'LlamaForCausalLM', 'f32', 1, 256)"
model_id=$(q "SELECT id FROM spool.models WHERE name = 'tiny'")

"$sched" --dsn "$dsn" --listen 127.0.0.1:0 --port-file "$h/port" --http-listen 127.0.0.1:0 \
    --http-port-file "$h/http-port" --lock-retry-ms 100 >"$h/sched.log" 2>&1 &
spid=$!
for _ in $(seq 200); do
    [ -s "$h/http-port" ] && [ -s "$h/port" ] && break
    kill -0 "$spid" 2>/dev/null || fail "the scheduler exited"
    sleep 0.1
done
[ -s "$h/http-port" ] && [ -s "$h/port" ] || fail "the scheduler did not become active"
port=$(cat "$h/http-port")

# post KEY BODY: prints the status; the headers land in $h/hdr, the body in $h/body.
post() {
    local args=(-s -o "$h/body" -D "$h/hdr" -w '%{http_code}' --max-time 30 -X POST
        -H 'Content-Type: application/json' --data-binary "$2")
    [ -n "$1" ] && args+=(-H "Authorization: Bearer $1")
    curl "${args[@]}" "http://127.0.0.1:$port/v1/completions"
}
body='{"model": "tiny", "prompt": "hello there", "max_tokens": 8}'
field() { /usr/bin/python3 -c "import json,sys; print(json.load(open('$h/body'))['error']['$1'])"; }
retry_after() { tr -d '\r' <"$h/hdr" | awk -F': ' 'tolower($1) == "retry-after" {print $2}'; }

# Two requests per minute: the third is refused with Retry-After.
out=$("$spool" keys create --tenant acme --name limited --rpm 2 2>/dev/null)
key=$(key_of <<<"$out")
kid=$(id_of <<<"$out")
s=$(post "$key" "$body")
[ "$s" = 503 ] || fail "first request: $s $(cat "$h/body")"
s=$(post "$key" "$body")
[ "$s" = 503 ] || fail "second request: $s $(cat "$h/body")"
s=$(post "$key" "$body")
[ "$s" = 429 ] || fail "third request: $s $(cat "$h/body")"
ra=$(retry_after)
[[ $ra =~ ^[0-9]+$ ]] && [ "$ra" -ge 20 ] && [ "$ra" -le 30 ] || fail "Retry-After '$ra' (want about 30 s)"
[ "$(field type)" = rate_limit_error ] || fail "error type: $(cat "$h/body")"
[ "$(field code)" = rate_limit_exceeded ] || fail "error code: $(cat "$h/body")"
field message | grep -q "2 requests per minute" || fail "message: $(cat "$h/body")"
# Another key of the same tenant has buckets of its own.
other=$("$spool" keys create --tenant acme 2>/dev/null | key_of)
s=$(post "$other" "$body")
[ "$s" = 503 ] || fail "an unlimited key: $s"

# 100 tokens per minute, 8 + 3 expected per request: admitted again and again,
# because a request that generated nothing gives its tokens back.
tkey=$("$spool" keys create --tenant acme --tpm 100 2>/dev/null | key_of)
for i in 1 2 3 4 5; do
    s=$(post "$tkey" '{"model": "tiny", "prompt": "hello there", "max_tokens": 80}')
    [ "$s" = 503 ] || fail "tpm request $i: $s $(cat "$h/body")"
done

# Keys: missing, invalid, revoked.
s=$(post "" "$body")
[ "$s" = 401 ] || fail "no key: $s"
s=$(post "sk-spool-$(printf '0%.0s' $(seq 64))" "$body")
[ "$s" = 401 ] || fail "unknown key: $s"
rkey=$("$spool" keys create --tenant beta 2>/dev/null | key_of)
rid=$(q "SELECT id FROM spool.api_keys WHERE prefix = '${rkey:0:16}'")
s=$(post "$rkey" "$body")
[ "$s" = 503 ] || fail "before revoking: $s"
"$spool" keys revoke "$rid" >/dev/null
for _ in $(seq 50); do
    s=$(post "$rkey" "$body")
    [ "$s" = 401 ] && break
    sleep 0.1
done
[ "$s" = 401 ] || fail "a revoked key: $s"

# Every answered live request is in spool.live_requests, written in batches.
want="$kid|acme|$model_id|503|2
$kid|acme||429|1"
for _ in $(seq 100); do
    got=$(q "SELECT key_id, tenant, model_id, status, count(*) FROM spool.live_requests
             WHERE key_id = $kid GROUP BY 1, 2, 3, 4 ORDER BY status DESC")
    [ "$got" = "$want" ] && break
    sleep 0.1
done
[ "$got" = "$want" ] || fail "live_requests for key $kid: '$got', want '$want'"
[ "$(q "SELECT count(*) FROM spool.live_requests WHERE endpoint <> '/v1/completions' OR latency_ms <= 0 OR tokens_out <> 0 OR ttft_ms IS NOT NULL")" = 0 ] || fail "live_requests fields"
[ "$(q "SELECT count(*) > 0 FROM spool.live_requests WHERE tenant = 'beta' AND status = 503")" = t ] || fail "beta's record"

# A request just before SIGTERM is written by the shutdown flush; exit 0.
s=$(post "$other" "$body")
[ "$s" = 503 ] || fail "last request: $s"
kill -TERM "$spid"
rc=0
wait "$spid" || rc=$?
spid=
[ "$rc" = 0 ] || fail "the scheduler exited $rc after SIGTERM"
n=$(q "SELECT count(*) FROM spool.live_requests WHERE tenant = 'acme' AND key_id <> $kid AND status = 503")
[ "$n" = 7 ] || fail "records of the other keys: $n, want 7 (1 + 5 + the last)"
! grep -Eq "runtime error|AddressSanitizer|LeakSanitizer" "$h/sched.log" || fail "sanitizer report"
echo ok
