#!/bin/bash
# The live lane end to end with the real daemons: a private PostgreSQL
# (spool dev up), a model pushed to the registry, spool-scheduler serving
# HTTP, spool-worker --model serving it live. Greedy answers through HTTP
# (curl, and the openai npm client) must equal `spool generate` for the same
# prompt; a streamed chat must be well-formed SSE ending in [DONE]; a client
# that disconnects mid-stream must get its sequence cancelled on the worker.
#
# Usage: live.sh SPOOL SCHEDULER WORKER MODELS-DIR NODE-DIR
set -euo pipefail
spool=$(realpath "$1")
scheduler=$(realpath "$2")
worker=$(realpath "$3")
models=$(realpath "$4")
nodedir=$(realpath "$5")
. "$(dirname "$(realpath "$0")")/lib.sh"
e2e_setup spl

model=$models/llama-f32
"$spool" models push "$model" --name tiny --alias prod >/dev/null

"$scheduler" --listen 127.0.0.1:0 --port-file "$h/sched.port" --http-listen 127.0.0.1:0 \
    --http-port-file "$h/http.port" --heartbeat-ms 200 --sweep-ms 200 --log-level info \
    >"$h/scheduler.log" 2>&1 &
pids+=($!)
spid=$!
for _ in $(seq 1 300); do [ -s "$h/sched.port" ] && [ -s "$h/http.port" ] && break; sleep 0.1; done
[ -s "$h/sched.port" ] || fail "the scheduler did not become active"
url=http://127.0.0.1:$(cat "$h/http.port")
# Slow steps, so that a stream is still running when its client leaves.
SPOOL_WORKER_STEP_DELAY_MS=20 "$worker" --scheduler "127.0.0.1:$(cat "$h/sched.port")" --name w1 \
    --threads 1 --model tiny --model-cache "$h/cache" --log-level info >"$h/worker.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 600); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$url/readyz")" = 200 ] && break
    sleep 0.1
done
[ "$(curl -s -o /dev/null -w '%{http_code}' "$url/readyz")" = 200 ] || fail "not ready"
key=$(q "SELECT key FROM spool.create_api_key('e2e', 'e2e', '{inference}')")
post() { # post PATH JSON [curl args]
    local p=$1 d=$2
    shift 2
    curl -s "$@" -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
        --data-binary "$d" "$url$p"
}

# 1. A completion, greedy, equals spool generate.
prompt="the quick brown fox"
ref=$("$spool" generate --model "$model" --prompt "$prompt" --max-tokens 8 --temperature 0 --json)
got=$(post /v1/completions "{\"model\": \"tiny\", \"prompt\": \"$prompt\", \"max_tokens\": 8, \"temperature\": 0}")
[ "$(jq -r .model <<<"$got")" = tiny@1 ] || fail "model: $got"
[ "$(jq -r '.choices[0].text' <<<"$got")" = "$(jq -r .text <<<"$ref")" ] || fail "text: $got vs $ref"
[ "$(jq -r .usage.completion_tokens <<<"$got")" = "$(jq -r .completion_tokens <<<"$ref")" ] ||
    fail "usage: $got vs $ref"
[ "$(jq -r .usage.prompt_tokens <<<"$got")" = "$(jq -r .prompt_tokens <<<"$ref")" ] ||
    fail "prompt tokens: $got vs $ref"

# 2. A streamed chat: the deltas put together equal spool generate --chat.
chat='[{"role": "user", "content": "tell me about tea"}]'
ref=$("$spool" generate --model "$model" --chat "$chat" --max-tokens 8 --temperature 0 --json)
post /v1/chat/completions "{\"model\": \"tiny@prod\", \"messages\": $chat, \"max_tokens\": 8,
    \"temperature\": 0, \"stream\": true, \"stream_options\": {\"include_usage\": true}}" -N \
    >"$h/stream.txt"
last=$(grep -v '^$' "$h/stream.txt" | tail -1)
[ "$last" = "data: [DONE]" ] || fail "stream does not end with [DONE]: $(cat "$h/stream.txt")"
text=$(grep '^data: {' "$h/stream.txt" | sed 's/^data: //' | jq -j '.choices[0].delta.content // empty')
[ "$text" = "$(jq -r .text <<<"$ref")" ] || fail "streamed chat '$text' vs $ref"
usage=$(grep '^data: {' "$h/stream.txt" | sed 's/^data: //' | jq -s 'map(select(.usage != null)) | .[0].usage.completion_tokens')
[ "$usage" = "$(jq -r .completion_tokens <<<"$ref")" ] || fail "streamed usage $usage vs $ref"

# Log-probabilities: one per generated token, none positive.
got=$(post /v1/chat/completions "{\"model\": \"tiny\", \"messages\": $chat, \"max_tokens\": 8,
    \"temperature\": 0, \"logprobs\": true}")
[ "$(jq '.choices[0].logprobs.content | length' <<<"$got")" = "$(jq -r .usage.completion_tokens <<<"$got")" ] ||
    fail "logprobs: $got"
[ "$(jq '[.choices[0].logprobs.content[].logprob | select(. > 0)] | length' <<<"$got")" = 0 ] ||
    fail "positive logprob: $got"

# 3. The openai npm client, greedy chat, equals spool generate --chat.
got=$(cd "$nodedir" && node --input-type=module -e "
import OpenAI from 'openai';
const c = new OpenAI({ apiKey: '$key', baseURL: '$url/v1', maxRetries: 0 });
const r = await c.chat.completions.create({ model: 'tiny', messages: $chat, max_tokens: 8, temperature: 0 });
let s = '';
for await (const ch of await c.chat.completions.create({ model: 'tiny', messages: $chat, max_tokens: 8,
    temperature: 0, stream: true })) s += ch.choices[0]?.delta?.content ?? '';
console.log(JSON.stringify({ text: r.choices[0].message.content, stream: s, model: r.model }));
")
[ "$(jq -r .text <<<"$got")" = "$(jq -r .text <<<"$ref")" ] || fail "openai chat: $got vs $ref"
[ "$(jq -r .stream <<<"$got")" = "$(jq -r .text <<<"$ref")" ] || fail "openai stream: $got vs $ref"
[ "$(jq -r .model <<<"$got")" = tiny@1 ] || fail "openai model: $got"

# 4. A client that leaves mid-stream: the worker cancels its sequence.
post /v1/completions "{\"model\": \"tiny\", \"prompt\": \"$prompt\", \"max_tokens\": 1000,
    \"ignore_eos\": true, \"stream\": true}" -N --max-time 1 >/dev/null || true
for _ in $(seq 1 100); do grep -q 'live request [0-9]* cancelled' "$h/worker.log" && break; sleep 0.1; done
grep -q 'live request [0-9]* cancelled' "$h/worker.log" || fail "no cancellation on the worker"
# 4b. 64 concurrent streaming clients all complete, each with the greedy text.
ref=$("$spool" generate --model "$model" --prompt "$prompt" --max-tokens 6 --temperature 0 --json)
cpids=()
for i in $(seq 1 64); do
    post /v1/completions "{\"model\": \"tiny\", \"prompt\": \"$prompt\", \"max_tokens\": 6,
        \"temperature\": 0, \"stream\": true}" -N --max-time 60 >"$h/c$i.txt" &
    cpids+=($!)
done
for p in "${cpids[@]}"; do wait "$p" || fail "a concurrent stream failed (curl exit)"; done
for i in $(seq 1 64); do
    [ "$(grep -v '^$' "$h/c$i.txt" | tail -1)" = "data: [DONE]" ] || fail "stream $i: $(cat "$h/c$i.txt")"
    text=$(grep '^data: {' "$h/c$i.txt" | sed 's/^data: //' | jq -j '.choices[0].text // empty')
    [ "$text" = "$(jq -r .text <<<"$ref")" ] || fail "stream $i: '$text' vs $ref"
done
# The left client's sequence and the 64 are freed: the worker reports nothing running.
running=
for _ in $(seq 1 50); do
    running=$(curl -s "$url/metrics" | awk '/^spool_worker_running_sequences\{/ { n++; s += $2 }
        END { print n ? s : "absent" }')
    [ "$running" = 0 ] && break
    sleep 0.1
done
[ "$running" = 0 ] || fail "the worker still runs $running sequences"

# 5. An orderly stop: exit status 0 (under ASan, no leaks), no sanitizer report anywhere.
kill -TERM "$spid"
st=0
wait "$spid" || st=$?
[ "$st" = 0 ] || fail "the scheduler exited with $st after SIGTERM"
if grep -l -E 'AddressSanitizer|LeakSanitizer|runtime error:' "$h"/*.log; then
    fail "a sanitizer report in a daemon's log"
fi
echo "live e2e: ok"
