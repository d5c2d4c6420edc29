#!/bin/bash
# spool generate on mkmodel.py's tiny models: JSON output, seeded repeats, chat,
# several prompts in one batch, and clear failures (never a crash) for bad input.
set -uo pipefail
spool=$1
models=$2
fail=0
tmp=$(mktemp -d /tmp/spool-generate-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
check() { # check CODE PATTERN CMD...
    local want=$1 pat=$2; shift 2
    "$@" >"$tmp/out" 2>&1
    local got=$?
    if [ "$got" != "$want" ] || ! grep -q -- "$pat" "$tmp/out"; then
        echo "FAIL: '$*' exited $got (want $want), output lacks '$pat':"; cat "$tmp/out"; fail=1
    fi
}
m=$models/llama-f32
check 0 '"finish_reason":"length","prompt_tokens":[0-9]*,"completion_tokens":8}' \
    "$spool" generate --model "$m" --prompt "the quick brown fox" --max-tokens 8 --temperature 0 --json
# Seeded sampling repeats; the text mode prints the same text as --json.
"$spool" generate --model "$m" --prompt "hello there" --max-tokens 12 --temperature 0.9 --top-p 0.9 --seed 7 --json >"$tmp/a" 2>&1
"$spool" generate --model "$m" --prompt "hello there" --max-tokens 12 --temperature 0.9 --top-p 0.9 --seed 7 --json >"$tmp/b" 2>&1
cmp -s "$tmp/a" "$tmp/b" || { echo "FAIL: seeded runs differ"; cat "$tmp/a" "$tmp/b"; fail=1; }
grep -q '"completion_tokens":12' "$tmp/a" || { echo "FAIL: seeded run: $(cat "$tmp/a")"; fail=1; }
check 0 '"finish_reason"' "$spool" generate --model "$models/mistral-f32" --json \
    --chat '[{"role": "user", "content": "Hi!"}]' --max-tokens 4
check 0 '"finish_reason"' "$spool" generate --model "$models/qwen2-bf16" --json \
    --chat '[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]' --max-tokens 4
check 0 '"finish_reason"' "$spool" generate --model "$models/llama3-f16" --json \
    --chat '[{"role": "user", "content": "Hi!"}]' --max-tokens 4
printf '%s\n' '{"prompt": "one"}' '' '{"prompt": "two two", "max_tokens": 3}' \
    '{"messages": [{"role": "user", "content": "three"}], "max_tokens": 5}' >"$tmp/p.jsonl"
check 0 '"index":2' "$spool" generate --model "$m" --prompts "$tmp/p.jsonl" --json --temperature 0
[ "$(grep -c '"index"' "$tmp/out")" = 3 ] || { echo "FAIL: expected 3 results"; cat "$tmp/out"; fail=1; }
grep '"index":1' "$tmp/out" | grep -q '"completion_tokens":3' || { echo "FAIL: per-line max_tokens"; fail=1; }
# A tiny KV budget and two at a time (preemption, recompute) prints the same results.
"$spool" generate --model "$m" --prompts "$tmp/p.jsonl" --json --temperature 0 --max-tokens 20 \
    | sort >"$tmp/big" 2>&1
"$spool" generate --model "$m" --prompts "$tmp/p.jsonl" --json --temperature 0 --max-tokens 20 \
    --max-batch 2 --kv-memory 24K | sort >"$tmp/small" 2>&1
cmp -s "$tmp/big" "$tmp/small" && [ "$(wc -l <"$tmp/big")" = 3 ] \
    || { echo "FAIL: small KV budget changed results"; cat "$tmp/big" "$tmp/small"; fail=1; }
check 0 '"completion_tokens":3' "$spool" generate --model "$m" --prompts "$tmp/p.jsonl" --json \
    --backend null --max-batch 2
check 2 'backend' "$spool" generate --model "$m" --prompt hi --backend tpu
check 2 'kv-memory' "$spool" generate --model "$m" --prompt hi --kv-memory 12X

# Bad input: clear messages, exit 1 (runtime) or 2 (usage).
check 1 'prompt 1 is empty' "$spool" generate --model "$m" --prompt ""
long=$(for i in $(seq 400); do printf 'the cat sat '; done)
check 1 'context' "$spool" generate --model "$m" --prompt "$long"
check 1 'No such file' "$spool" generate --model "$tmp/none" --prompt hi
cp -r "$m" "$tmp/bad"
echo '{"architectures": ["LlamaForCausalLM"], "hidden_size": [' >"$tmp/bad/config.json"
check 1 'config.json:' "$spool" generate --model "$tmp/bad" --prompt hi
check 2 'required' "$spool" generate --prompt hi
check 2 'exactly one' "$spool" generate --model "$m" --prompt hi --chat '[]'
check 2 'top-p' "$spool" generate --model "$m" --prompt hi --top-p 1.5
check 2 'max-tokens' "$spool" generate --model "$m" --prompt hi --max-tokens 0
check 1 'invalid JSON' "$spool" generate --model "$m" --chat '[{"role": '
check 1 'role' "$spool" generate --model "$m" --chat '[{"content": "x"}]'
echo '{"prompt": 5}' >"$tmp/bad.jsonl"
check 1 'bad.jsonl:1' "$spool" generate --model "$m" --prompts "$tmp/bad.jsonl"
echo 'nope' >"$tmp/bad.jsonl"
check 1 'bad.jsonl:1: not a JSON object' "$spool" generate --model "$m" --prompts "$tmp/bad.jsonl"
# One bad line fails that line only: the others run and print, the bad ones
# are reported in their place, and the exit status is 1.
printf '%s\n' '{"prompt": "one"}' '{"prompt": 5}' 'garbage' '{"prompt": ""}' '{"prompt": "four"}' >"$tmp/mixed.jsonl"
"$spool" generate --model "$m" --prompts "$tmp/mixed.jsonl" --json --max-tokens 3 --temperature 0 >"$tmp/out" 2>"$tmp/err"
rc=$?
[ $rc = 1 ] || { echo "FAIL: mixed file exited $rc"; fail=1; }
for i in 0 4; do grep -q "\"index\":$i,\"text\"" "$tmp/out" || { echo "FAIL: good line $i did not run"; cat "$tmp/out"; fail=1; }; done
grep -q '"index":1,"error":".*mixed.jsonl:2: needs' "$tmp/out" || { echo "FAIL: line 2 error"; cat "$tmp/out"; fail=1; }
grep -q '"index":2,"error":".*mixed.jsonl:3: not a JSON object' "$tmp/out" || { echo "FAIL: line 3 error"; fail=1; }
grep -q '"index":3,"error":"prompt 4 is empty' "$tmp/out" || { echo "FAIL: empty prompt error"; fail=1; }
grep -q '3 of 5 prompts failed' "$tmp/err" || { echo "FAIL: summary"; cat "$tmp/err"; fail=1; }
# A malformed tokenizer.json is a clear error naming the file.
cp -rL "$m" "$tmp/badtok"
echo '{"model": {"type": "BPE", "vocab": [' >"$tmp/badtok/tokenizer.json"
check 1 'badtok/tokenizer.json: invalid JSON at line' "$spool" generate --model "$tmp/badtok" --prompt hi
[ $fail = 0 ] && echo ok
exit $fail
