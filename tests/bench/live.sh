#!/bin/bash
# Live-lane latency through HTTP (prints, asserts nothing): TTFT p50/p99 of
# streamed completions on an idle worker and on the same worker saturated by
# a batch job, and the HTTP lane's own overhead: TTFT seen by the HTTP client
# minus the engine's own time to first token for the same request (the
# worker logs it: from the LIVE_REQUEST's arrival to its first token).
#
# The daemons are real: spool dev up, spool-scheduler, one spool-worker
# --model (CPU, the tiny test model). The client is a plain socket per
# request (connect + request + first SSE event).
#
# Usage: live.sh SPOOL SCHEDULER WORKER MODELS-DIR [N]
set -euo pipefail
spool=$(realpath "$1")
scheduler=$(realpath "$2")
worker=$(realpath "$3")
models=$(realpath "$4")
n=${5:-100}
h=$(mktemp -d "/tmp/spb-${SPOOL_TEST_TAG:-x}-XXXXXX")
chmod 755 "$h"
export SPOOL_HOME=$h/home SPOOL_MODEL_STORE=$h/store
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    "$spool" dev down >/dev/null 2>&1 || true
    [ -n "${KEEP:-}" ] && cp "$h"/*.log "$KEEP"/ 2>/dev/null
    rm -rf "$h"
}
trap cleanup EXIT
dsn=$("$spool" dev up 2>/dev/null)
export SPOOL_DSN=$dsn
q() { psql "$dsn" -XAtq -v ON_ERROR_STOP=1 -c "$1"; }
"$spool" models push "$models/llama-f32" --name tiny --alias prod >/dev/null
"$scheduler" --listen 127.0.0.1:0 --port-file "$h/sched.port" --http-listen 127.0.0.1:0 \
    --http-port-file "$h/http.port" --heartbeat-ms 200 --sweep-ms 100 --log-level debug \
    >"$h/scheduler.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 300); do [ -s "$h/sched.port" ] && [ -s "$h/http.port" ] && break; sleep 0.1; done
hport=$(cat "$h/http.port")
"$worker" --scheduler "127.0.0.1:$(cat "$h/sched.port")" --name w1 --model tiny \
    --model-cache "$h/cache" --log-level info >"$h/worker.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 600); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$hport/readyz")" = 200 ] && break
    sleep 0.1
done
key=$(q "SELECT key FROM spool.create_api_key('bench', 'bench', '{inference}')")

client() { # client N OUT: N sequential streamed completions; one TTFT (ms) per line
    python3 - "$hport" "$key" "$1" >"$2" <<'PY'
import json, socket, sys, time
port, key, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
body = json.dumps({"model": "tiny", "prompt": "the quick brown fox", "max_tokens": 4,
                   "temperature": 0, "stream": True}).encode()
req = (b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer " + key.encode() +
       b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() +
       b"\r\n\r\n" + body)
for _ in range(n):
    t0 = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(req)
    buf, ttft = b"", None
    while True:
        d = s.recv(65536)
        if not d:
            break
        buf += d
        if ttft is None and b"data: {" in buf:
            ttft = time.perf_counter() - t0
        if b"data: [DONE]" in buf:
            break
    s.close()
    print("%.3f" % (ttft * 1e3 if ttft is not None else -1))
PY
}

# Idle: warm up, then measure.
client 10 "$h/warm.txt"
client "$n" "$h/idle.txt"

# Saturated: a batch job on the same model keeps every engine slot busy.
job=$(q "SELECT spool.submit_job('tiny@prod', 'bench', '{\"max_tokens\": 64, \"ignore_eos\": true}')")
q "INSERT INTO spool.requests (job_id, prompt) SELECT $job, 'batch request ' || i
   FROM generate_series(1, 20000) i" >/dev/null
q "SELECT state FROM spool.seal_job($job)" >/dev/null
for _ in $(seq 1 300); do
    [ "$(q "SELECT count(*) FROM spool.requests WHERE job_id = $job AND state = 'succeeded'")" -gt 0 ] && break
    sleep 0.1
done
client "$n" "$h/load.txt"
q "SELECT spool.cancel_job($job)" >/dev/null || true

# The worker's own TTFT per live request, in request order (ids count from 1).
grep -o 'live request [0-9]* [a-z]*: .*first token after [0-9]* steps ([0-9.]* ms)' "$h/worker.log" |
    sed -E 's/live request ([0-9]+) .*\(([0-9.]+) ms\)/\1 \2/' | sort -n >"$h/engine.txt"
# The scheduler's view (debug log): headers in -> LIVE_REQUEST sent, and sent -> first TOKENS.
grep -o 'live [0-9]* /v1/completions .*sent after [0-9.]* ms, first token [0-9.-]* ms' "$h/scheduler.log" |
    sed -E 's/live ([0-9]+) .*sent after ([0-9.]+) ms, first token ([0-9.-]+) ms/\1 \2 \3/' |
    sort -n >"$h/sched.txt"
python3 - "$h" "$n" <<'PY'
import sys
h, n = sys.argv[1], int(sys.argv[2])
def load(f):
    return [float(x) for x in open(f"{h}/{f}") if x.strip()]
idle, load_ = load("idle.txt"), load("load.txt")
eng = {}
for line in open(f"{h}/engine.txt"):
    i, ms = line.split()
    eng[int(i)] = float(ms)
def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")
# Request ids: 10 warm-up, then idle, then load.
def over(xs, first):
    return [x - eng[first + k] for k, x in enumerate(xs) if first + k in eng and x >= 0]
oi, ol = over(idle, 11), over(load_, 11 + n)
ei = [eng[11 + k] for k in range(n) if 11 + k in eng]
el = [eng[11 + n + k] for k in range(n) if 11 + n + k in eng]
print(f"live TTFT through HTTP, {n} streamed completions each (ms):")
print(f"  {'':28s} {'p50':>8s} {'p99':>8s}")
print(f"  {'idle worker':28s} {pct(idle, 50):8.2f} {pct(idle, 99):8.2f}")
print(f"  {'saturated by a batch job':28s} {pct(load_, 50):8.2f} {pct(load_, 99):8.2f}")
print(f"  p99 under load / p99 idle: {pct(load_, 99) / pct(idle, 99):.2f} (goal <= 1.5)")
print(f"engine's own TTFT (worker log) (ms):")
print(f"  {'idle':28s} {pct(ei, 50):8.2f} {pct(ei, 99):8.2f}")
print(f"  {'saturated':28s} {pct(el, 50):8.2f} {pct(el, 99):8.2f}")
print(f"HTTP lane overhead = HTTP TTFT - engine TTFT (ms), {len(oi)}+{len(ol)} matched:")
print(f"  {'idle':28s} {pct(oi, 50):8.3f} {pct(oi, 99):8.3f}")
print(f"  {'saturated':28s} {pct(ol, 50):8.3f} {pct(ol, 99):8.3f}")
print("  (goal: <= 1 ms at p50 on loopback; includes the client's connect and Python's own time)")
sched = {}
for line in open(f"{h}/sched.txt"):
    i, d, f = line.split()
    sched[int(i)] = (float(d), float(f))
def part(first, k):
    ids = [first + j for j in range(n) if first + j in sched and first + j in eng]
    if k == 0:
        return [sched[i][0] for i in ids]
    return [sched[i][1] - eng[i] for i in ids]
print("the scheduler's own share (its debug log) (ms):")
print(f"  {'headers in -> LIVE_REQUEST, idle':34s} {pct(part(11, 0), 50):8.3f} {pct(part(11, 0), 99):8.3f}")
print(f"  {'headers in -> LIVE_REQUEST, load':34s} {pct(part(11 + n, 0), 50):8.3f} {pct(part(11 + n, 0), 99):8.3f}")
print(f"  {'sent -> first TOKENS minus engine TTFT, idle':34s} {pct(part(11, 1), 50):8.3f} {pct(part(11, 1), 99):8.3f}")
print(f"  {'the same, load':34s} {pct(part(11 + n, 1), 50):8.3f} {pct(part(11 + n, 1), 99):8.3f}")
PY
