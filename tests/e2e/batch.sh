#!/bin/bash
# The batch lane end to end with the real daemons: a private PostgreSQL
# (spool dev up), the registry (spool models push), spool-scheduler and
# spool-worker processes, a job submitted through SQL. Every scenario checks
# that each request has exactly one stored result (state succeeded, output and
# token ids non-null) and that all outputs equal `spool generate --prompts
# --json` for the same prompts and parameters (compared request by request,
# all of them).
#
# Usage: batch.sh SCENARIO SPOOL SCHEDULER WORKER MODELS-DIR
#   plain  2,000 requests over two workers, undisturbed.
#   kill   kill -9 of a random worker at seeded random moments, five times,
#          a replacement started each time; from the workers' progress traces
#          (SPOOL_WORKER_TRACE), every sequence a kill interrupted recomputes
#          at most --checkpoint-tokens generated tokens.
#   stop   a worker frozen (SIGSTOP) past its lease, then SIGCONT: it writes
#          nothing more for the shards it lost.
#   cancel spool.cancel_job mid-job: no request changes state afterwards
#          except to cancelled, and finished results are kept.
#   preempt  three workers preempted in turn while w2 runs throughout: w1 by
#          SIGTERM, w3 by its notice file, w4 by a fake AWS metadata endpoint
#          (fake_aws.py); each must exit 0 within its --drain-deadline, and
#          spool.preemptions must hold its row with that source.
#   failover  kill -9 of the active scheduler with a standby running.
#   pgrestart PostgreSQL stopped and started again mid-job.
set -euo pipefail
scenario=$1
spool=$(realpath "$2")
scheduler=$(realpath "$3")
worker=$(realpath "$4")
models=$(realpath "$5")
tag=${SPOOL_TEST_TAG:-x}
h=$(mktemp -d "/tmp/spd-$tag-XXXXXX")
chmod 755 "$h"
export SPOOL_HOME=$h/home SPOOL_MODEL_STORE=$h/store
pids=()
cleanup() {
    local rc=$?
    trap - EXIT
    # Every daemon this test started, by pid: a stopped one is continued so
    # that it can die.
    for p in "${pids[@]}"; do kill -CONT "$p" 2>/dev/null || true; kill -KILL "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ $rc != 0 ]; then
        for f in "$h"/*.log; do [ -f "$f" ] && { echo "== $f"; tail -25 "$f"; }; done
    fi
    "$spool" dev down >/dev/null 2>&1 || true
    rm -rf "$h"
    exit $rc
}
trap cleanup EXIT
trap 'exit 143' TERM INT
fail() { echo "FAIL ($scenario): $*"; exit 1; }
dsn=$("$spool" dev up 2>/dev/null)
export SPOOL_DSN=$dsn
q() { psql "$dsn" -XAtq -v ON_ERROR_STOP=1 -c "$1"; }

"$spool" models push "$models/llama-f32" --name tiny --alias prod >/dev/null

# Short heartbeats and leases so that a dead or frozen worker's shards come
# back within seconds. With a standby (failover) both listen on one fixed
# port: only the active one opens it.
listen=127.0.0.1:0
if [ "$scenario" = failover ]; then
    listen=127.0.0.1:$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
start_scheduler() { # start_scheduler NAME: its pid in spid[NAME]; writes $h/NAME.port when active
    "$scheduler" --listen "$listen" --port-file "$h/$1.port" --heartbeat-ms 200 \
        --lease-ttl-ms 2000 --sweep-ms 200 --lock-retry-ms 100 --shard-size 50 --log-level info \
        >"$h/$1.log" 2>&1 &
    pids+=($!)
    spid[$1]=$!
}
declare -A spid
wait_port() { # wait_port NAME
    for _ in $(seq 1 600); do [ -s "$h/$1.port" ] && return 0; sleep 0.1; done
    fail "scheduler $1 did not become active"
}
start_scheduler scheduler
wait_port scheduler
port=$(cat "$h/scheduler.port")
if [ "$scenario" = failover ]; then
    start_scheduler standby
fi

n_workers=0
declare -A wpid
ckpt_tokens=2
start_worker() { # start_worker NAME [ARGS...]: starts a worker, records its pid in wpid[NAME]
    SPOOL_WORKER_TRACE=$h/trace-$1.txt "$worker" --scheduler "127.0.0.1:$port" --name "$1" --threads 1 \
        --checkpoint-tokens $ckpt_tokens --checkpoint-seconds 1 --model-cache "$h/cache-$1" "${@:2}" \
        >"$h/worker-$1.log" 2>&1 &
    pids+=($!)
    wpid[$1]=$!
    n_workers=$((n_workers + 1))
}

n=2000
if [ "$scenario" != plain ]; then
    # Fewer, slower steps, so that the disturbances land mid-job.
    n=600
    export SPOOL_WORKER_STEP_DELAY_MS=30
    # Five kills, each followed by a 2 s lease expiry, or three preemptions
    # one after the other, must land mid-job.
    case $scenario in kill | preempt) export SPOOL_WORKER_STEP_DELAY_MS=60 ;; esac
    case $scenario in kill | preempt) n=900 ;; esac
fi
params='{"max_tokens": 8, "temperature": 0.8, "top_p": 0.95, "seed": 42}'
job=$(q "SELECT spool.submit_job('tiny@prod', 'e2e', '$params')")
q "INSERT INTO spool.requests (job_id, custom_id, prompt)
   SELECT $job, 'r' || i, 'request ' || i || ' about ' ||
          (ARRAY['tea', 'a lighthouse', 'ships at sea', 'the quick brown fox'])[i % 4 + 1]
     FROM generate_series(1, $n) i" >/dev/null
q "SELECT state FROM spool.seal_job($job)" >/dev/null

# The reference: the same prompts through spool generate, in request id order.
q "SELECT json_build_object('prompt', prompt) FROM spool.requests WHERE job_id = $job ORDER BY id" \
    >"$h/prompts.jsonl"
"$spool" generate --model "$models/llama-f32" --prompts "$h/prompts.jsonl" --json \
    --max-tokens 8 --temperature 0.8 --top-p 0.95 --seed 42 >"$h/reference.jsonl" &
ref_pid=$!
pids+=($ref_pid)

start_worker w1
start_worker w2
t0=$(date +%s)
state() { q "SELECT state FROM spool.job_status WHERE job_id = $job"; }
finished() { case $(state) in succeeded | failed | cancelled) return 0 ;; esac; return 1; }
count_done() { q "SELECT count(*) FROM spool.requests WHERE job_id = $job AND state = 'succeeded'"; }
wait_done() { # wait_done N: until N requests succeeded (or the job finished)
    for _ in $(seq 1 1200); do
        finished && return 0
        [ "$(count_done)" -ge "$1" ] && return 0
        sleep 0.1
    done
    fail "timed out waiting for $1 finished requests (have $(count_done))"
}

case $scenario in
plain) ;;
kill)
    RANDOM=20261128
    wait_done 1
    kills=0
    for k in 1 2 3 4 5; do
        sleep "0.$((RANDOM % 7 + 3))"
        victim=w$((RANDOM % 2 + 1))
        for name in "${!wpid[@]}"; do [[ $name == "$victim"* ]] && victim=$name; done
        finished && break
        echo "kill -9 $victim after $(count_done) requests"
        kill -KILL "${wpid[$victim]}"
        echo "${wpid[$victim]}" >>"$h/killed"
        unset "wpid[$victim]"
        start_worker "$victim-$k"
        kills=$((kills + 1))
    done
    [ $kills = 5 ] || fail "the job finished after only $kills kills"
    ;;
preempt)
    drain=5
    worker_id() { q "SELECT coalesce(max(id), 0) FROM spool.workers WHERE name = '$1'"; }
    wait_holding() { # wait_holding NAME: until the worker holds a leased shard of the job
        for _ in $(seq 1 600); do
            [ "$(q "SELECT count(*) FROM spool.shards WHERE job_id = $job AND state = 'leased'
                     AND worker_id = $(worker_id "$1")")" -gt 0 ] && return 0
            finished && fail "the job finished before $1 was preempted"
            sleep 0.05
        done
        fail "$1 never held a shard"
    }
    preempt() { # preempt NAME SOURCE SLACK ACTION...: runs ACTION, then waits for NAME to exit
        local name=$1 source=$2 slack=$3 rc=0
        shift 3
        wait_holding "$name"
        local t0 t1
        t0=$(date +%s.%N)
        "$@"
        wait "${wpid[$name]}" || rc=$?
        t1=$(date +%s.%N)
        unset "wpid[$name]"
        local took
        took=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}')
        echo "$name preempted by $source after $(count_done) requests: exited $rc in $took s"
        [ $rc = 0 ] || fail "$name exited $rc after its $source notice (1: drain deadline missed)"
        # The notice is seen within the source's polling period (slack), the
        # drain must end within the deadline after that.
        awk -v t="$took" -v d="$drain" -v s="$slack" 'BEGIN {exit !(t <= d + s)}' ||
            fail "$name took $took s to exit, past its $drain s drain deadline"
        preempted+=("$name:$source")
    }
    preempted=()
    python3 "$(dirname "$0")/fake_aws.py" "$h/aws-notice" "$h/aws.port" >"$h/fake-aws.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 1 100); do [ -s "$h/aws.port" ] && break; sleep 0.1; done
    [ -s "$h/aws.port" ] || fail "the fake AWS endpoint did not start"
    wait_done $((n / 10))
    preempt w1 sigterm 0 kill -TERM "${wpid[w1]}"
    start_worker w3 --drain-deadline $drain --preempt-notice "file:$h/notice-w3"
    preempt w3 notice-file 0.25 touch "$h/notice-w3"
    start_worker w4 --drain-deadline $drain --preempt-notice "aws:http://127.0.0.1:$(cat "$h/aws.port")"
    preempt w4 aws 1 touch "$h/aws-notice"
    ;;
stop)
    wait_done $((n / 5))
    # Freeze w1 while it holds shards (frozen first, then asked, so that it
    # cannot release them in between), well past its 2 s lease.
    held=
    for _ in $(seq 1 300); do
        w1_id=$(q "SELECT coalesce(max(id), 0) FROM spool.workers WHERE name = 'w1'")
        kill -STOP "${wpid[w1]}"
        frozen_at=$(q "SELECT clock_timestamp()")
        held=$(q "SELECT string_agg(id::text, ',') FROM spool.shards
                   WHERE job_id = $job AND state = 'leased' AND worker_id = $w1_id")
        [ -n "$held" ] && break
        kill -CONT "${wpid[w1]}"
        finished && fail "the job finished before w1 could be frozen holding a shard"
        sleep 0.05
    done
    [ -n "$held" ] || fail "w1 never held a shard"
    # How often each was assigned to w1 so far (the scheduler logs each ASSIGN).
    declare -A assigned
    for sh in ${held//,/ }; do
        assigned[$sh]=$(grep -c "assigned shard $sh of job $job to worker $w1_id " "$h/scheduler.log" || true)
    done
    sleep 6
    kill -CONT "${wpid[w1]}"
    ;;
failover)
    wait_done $((n / 4))
    kill -KILL "${spid[scheduler]}"
    wait_port standby
    [ "$(cat "$h/standby.port")" = "$port" ] || fail "the standby listens elsewhere"
    echo "scheduler killed after $(count_done) requests; the standby took over"
    ;;
pgrestart)
    wait_done $((n / 4))
    echo "stopping PostgreSQL after $(count_done) requests"
    "$spool" dev down >/dev/null 2>&1
    sleep 1
    [ "$("$spool" dev up 2>/dev/null)" = "$dsn" ] || fail "the DSN changed across a restart"
    ;;
cancel)
    wait_done $((n / 4))
    q "SELECT spool.cancel_job($job)" >/dev/null
    cancelled_at=$(q "SELECT clock_timestamp()")
    # Snapshot after the cancel: requests finished by then keep their state.
    q "CREATE TABLE e2e_snap AS SELECT id, state FROM spool.requests WHERE job_id = $job"
    sleep 2
    ;;
esac

for _ in $(seq 1 1200); do finished && break; sleep 0.1; done
finished || fail "job $job did not finish: $(q "SELECT state, succeeded, failed, cancelled, total FROM spool.job_status WHERE job_id = $job")"
echo "job $job ($n requests, $scenario) finished $(state) in $(($(date +%s) - t0)) s"
for p in "${!wpid[@]}"; do kill -0 "${wpid[$p]}" 2>/dev/null || fail "worker $p died"; done
wait $ref_pid || fail "spool generate failed"

q "SELECT json_build_object('id', id, 'state', state, 'output', output, 'tokens', output_tokens,
                            'worker', worker_id, 'finished_at', finished_at)
     FROM spool.requests WHERE job_id = $job ORDER BY id" >"$h/results.jsonl"

if [ "$scenario" = cancel ]; then
    [ "$(state)" = cancelled ] || fail "job state $(state) after cancel"
    # Nothing that was pending or running at the cancel became succeeded or
    # failed after it; what had finished stays.
    bad=$(q "SELECT count(*) FROM spool.requests r JOIN e2e_snap s USING (id)
              WHERE r.state <> s.state AND r.state <> 'cancelled'")
    [ "$bad" = 0 ] || fail "$bad requests changed state after the cancel"
    kept=$(q "SELECT count(*) FROM e2e_snap WHERE state = 'succeeded'")
    [ "$kept" -gt 0 ] && [ "$(count_done)" = "$kept" ] || fail "finished results not kept: $kept then $(count_done)"
    left=$(q "SELECT count(*) FROM spool.requests WHERE job_id = $job AND state NOT IN ('succeeded', 'cancelled')")
    [ "$left" = 0 ] || fail "$left requests neither succeeded nor cancelled"
    late=$(q "SELECT count(*) FROM spool.requests WHERE job_id = $job AND state = 'succeeded'
               AND finished_at > '$cancelled_at'::timestamptz + interval '1 second'")
    [ "$late" = 0 ] || fail "$late requests succeeded more than a second after the cancel"
    echo "cancel kept $kept finished requests, cancelled $(q "SELECT count(*) FROM spool.requests WHERE job_id = $job AND state = 'cancelled'")"
else
    [ "$(state)" = succeeded ] || fail "job state $(state)"
fi

if [ "$scenario" = stop ]; then
    # The frozen worker lost its shards; whatever it had in flight was resumed
    # elsewhere, and it wrote nothing for them after waking.
    # A shard leased to w1 again after it woke may rightly carry its results;
    # any other shard it held must have no result of w1 stored after the freeze.
    checked=0
    for sh in ${held//,/ }; do
        again=$(grep -c "assigned shard $sh of job $job to worker $w1_id " "$h/scheduler.log" || true)
        [ "$again" -gt "${assigned[$sh]}" ] && continue
        late=$(q "SELECT count(*) FROM spool.shards s JOIN spool.requests r
                    ON r.id BETWEEN s.first_request_id AND s.last_request_id
                   WHERE s.id = $sh AND r.worker_id = $w1_id AND r.finished_at > '$frozen_at'::timestamptz")
        [ "$late" = 0 ] || fail "the frozen worker stored $late results for shard $sh after losing it"
        checked=$((checked + 1))
    done
    grep -q "lease lost" "$h/worker-w1.log" || fail "the frozen worker never saw 'lease lost'"
    echo "w1 held shards $held when frozen; $checked checked (not leased to it again), 'lease lost' logged"
fi

# The job's counters count every result once (a write applied twice would
# count twice).
counts=$(q "SELECT j.succeeded = (SELECT count(*) FROM spool.requests WHERE job_id = $job AND state = 'succeeded')
               AND j.tokens_out = (SELECT coalesce(sum(tokens_out), 0) FROM spool.requests
                                    WHERE job_id = $job AND state = 'succeeded')
              FROM spool.jobs j WHERE j.id = $job")
[ "$counts" = t ] || fail "job counters disagree with the requests: $(q "SELECT succeeded, tokens_out FROM spool.jobs WHERE id = $job")"

python3 - "$h/results.jsonl" "$h/reference.jsonl" "$scenario" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
ref = {}
for l in open(sys.argv[2]):
    o = json.loads(l)
    ref[o["index"]] = o
scenario = sys.argv[3]
bad = 0
compared = 0
for i, r in enumerate(rows):
    if scenario == "cancel" and r["state"] == "cancelled":
        continue
    want = ref.get(i)
    if r["state"] != "succeeded" or r["output"] is None or r["tokens"] is None:
        print(f"request {r['id']}: state {r['state']}, output {r['output']!r}")
        bad += 1
    # The worker stores a NUL byte as U+FFFD (PostgreSQL text cannot hold it).
    elif (want is None or r["tokens"] != want["token_ids"]
          or r["output"] != want["text"].replace("\x00", "\ufffd")):
        print(f"request {r['id']}: {r['output']!r} {r['tokens']} != reference {want}")
        bad += 1
    compared += 1
    if bad > 10:
        break
if len(ref) != len(rows):
    print(f"reference has {len(ref)} results for {len(rows)} requests")
    bad += 1
print(f"{compared} outputs compared with spool generate, {bad} differ")
sys.exit(1 if bad else 0)
EOF
if [ "$scenario" = preempt ]; then
    # Each preempted worker recorded its preemption with its source, having
    # released shards and checkpointed every sequence it had (nothing lost);
    # the scheduler's own row for the DRAIN frame may stand beside it.
    seqs=0
    for p in "${preempted[@]}"; do
        name=${p%%:*} source=${p#*:}
        row=$(q "SELECT p.shards_released || ' ' || p.sequences || ' ' || p.tokens_lost
                   FROM spool.preemptions p JOIN spool.workers w ON w.id = p.worker_id
                  WHERE w.name = '$name' AND p.source = '$source' ORDER BY p.id DESC LIMIT 1")
        [ -n "$row" ] || fail "no preemption row for $name with source $source: $(q "SELECT
            string_agg(p.source, ', ') FROM spool.preemptions p JOIN spool.workers w ON w.id = p.worker_id
            WHERE w.name = '$name'")"
        read -r shards n_seq lost <<<"$row"
        [ "$shards" -ge 1 ] && [ "$lost" = 0 ] ||
            fail "$name's preemption row: $shards shards released, $lost tokens lost"
        echo "preemption of $name ($source): $shards shards released, $n_seq sequences checkpointed"
        seqs=$((seqs + n_seq))
    done
    [ "$seqs" -gt 0 ] || fail "no preemption interrupted a sequence"
    # Requests that entered an engine with checkpointed tokens (trace lines "S N", N > 0).
    resumed=$(cat "$h"/trace-*.txt | awk '$4 == "S" && $5 > 0 {print $3}' | sort -u | wc -l)
    [ "$resumed" -gt 0 ] || fail "no request was resumed from a checkpoint"
    on_w2=$(q "SELECT count(*) FROM spool.requests WHERE job_id = $job AND worker_id = $(worker_id w2)")
    [ "$on_w2" -gt 0 ] || fail "w2 finished nothing"
    echo "$resumed requests resumed from checkpoints; w2 finished $on_w2 requests"
fi
if [ "$scenario" = kill ]; then
    # Recomputed tokens, per interrupted sequence, from the progress traces:
    # an attempt a of a request on a killed worker, followed by attempt b
    # (the next start of that request, on any worker), had generated g tokens
    # by the time b started (its last G line before b's S line) and b resumed
    # from the checkpoint c (b's S line): b recomputes g - c tokens. A worker
    # writes a sequence's checkpoint in the same loop turn as the step that
    # takes it to checkpoint-tokens unsaved tokens, before its next step, and
    # a step adds at most one token per sequence; so at any instant at most
    # checkpoint-tokens tokens are unsaved (that many only between that step
    # and the checkpoint's commit), and g - c <= checkpoint-tokens is what is
    # asserted. A finished sequence whose result was not yet written is
    # covered too: its last step came at most checkpoint-tokens tokens after
    # its last checkpoint. Every request's last attempt must also reach
    # exactly its stored output's length, or the traces are incomplete.
    python3 - "$h" "$ckpt_tokens" "$h/results.jsonl" <<'EOF'
import glob, json, os, sys
h, K, results = sys.argv[1], int(sys.argv[2]), sys.argv[3]
killed = {int(l) for l in open(os.path.join(h, "killed"))}
attempts = {}  # request id -> [{"pid", "t", "n", "g": [(t, n)]}]
bad = 0
for path in glob.glob(os.path.join(h, "trace-*.txt")):
    cur = {}
    for line in open(path):
        f = line.split()
        if len(f) != 5:
            continue  # cannot happen: each step's lines go out in one write(2)
        t, pid, req, kind, n = int(f[0]), int(f[1]), int(f[2]), f[3], int(f[4])
        if kind == "S":
            a = cur[(pid, req)] = {"pid": pid, "t": t, "n": n, "g": []}
            attempts.setdefault(req, []).append(a)
        elif (pid, req) in cur:
            cur[(pid, req)]["g"].append((t, n))
        else:
            print(f"{path}: progress of request {req} before its start")
            bad += 1
interrupted = moved = total = worst = 0
for r in map(json.loads, open(results)):
    at = sorted(attempts.get(r["id"], []), key=lambda a: a["t"])
    if not at:
        print(f"request {r['id']}: no trace")
        bad += 1
        continue
    last = at[-1]
    if max([n for _, n in last["g"]] + [last["n"]]) != len(r["tokens"] or []):
        print(f"request {r['id']}: last attempt {last} does not reach {len(r['tokens'] or [])} tokens")
        bad += 1
    for a, b in zip(at, at[1:]):
        if a["pid"] not in killed:
            continue
        g = max([n for t, n in a["g"] if t < b["t"]] + [a["n"]])
        lost = g - b["n"]
        interrupted += 1
        moved += g > a["n"]
        total += lost
        worst = max(worst, lost)
        if lost < 0 or lost > K:
            print(f"request {r['id']}: generated {g} tokens on killed pid {a['pid']}, "
                  f"resumed from {b['n']} on pid {b['pid']}: {lost} recomputed (bound {K})")
            bad += 1
print(f"{interrupted} sequences interrupted by the kills ({moved} had generated tokens there): "
      f"{total} tokens recomputed, at most {worst} per sequence (bound: checkpoint-tokens = {K})")
if interrupted == 0:
    print("no kill interrupted a sequence: nothing was measured")
    bad += 1
sys.exit(1 if bad else 0)
EOF
fi
# In the sanitizer build a daemon's report is a failure too.
if grep -l "runtime error:\|AddressSanitizer\|LeakSanitizer" "$h"/*.log; then
    fail "sanitizer report in the logs above"
fi
echo ok
