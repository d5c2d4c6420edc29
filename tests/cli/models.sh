#!/bin/bash
# spool models inspect: a real model directory, and clear failures (exit 1, no crash)
# for a missing directory, malformed config.json, a missing tensor and a truncated file.
set -uo pipefail
spool=$1
models=$2
fail=0
tmp=$(mktemp -d /tmp/spool-models-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
check() { # check CODE PATTERN CMD...
    local want=$1 pat=$2; shift 2
    "$@" >"$tmp/out" 2>&1
    local got=$?
    if [ "$got" != "$want" ] || ! grep -q -- "$pat" "$tmp/out"; then
        echo "FAIL: '$*' exited $got (want $want), output lacks '$pat':"; cat "$tmp/out"; fail=1
    fi
}
check 0 'parameters      72.0K (72048)' "$spool" models inspect "$models/llama3-bf16"
check 0 'llama3 scaling' "$spool" models inspect "$models/llama3-bf16"
check 0 '"architecture":"Qwen2ForCausalLM"' "$spool" models inspect --json "$models/qwen2-f16"
check 0 '"tied_embeddings":true' "$spool" models inspect --json "$models/qwen2-f16"
check 0 'vocabulary      32000' "$spool" models inspect "$models/mistral-f32"
check 1 'No such file' "$spool" models inspect "$tmp/none"
check 2 'expected one model directory' "$spool" models inspect
cp -r "$models/llama-f32" "$tmp/bad"
echo '{"architectures": ["LlamaForCausalLM"], "hidden_size": ' >"$tmp/bad/config.json"
check 1 'config.json:2:' "$spool" models inspect "$tmp/bad"
cp "$models/llama-f32/config.json" "$tmp/bad/config.json"
sed -i 's/"LlamaForCausalLM"/"FalconForCausalLM"/' "$tmp/bad/config.json"
check 1 'FalconForCausalLM is not supported' "$spool" models inspect "$tmp/bad"
cp "$models/llama-f32/config.json" "$tmp/bad/config.json"
sed -i 's/"num_hidden_layers": 2/"num_hidden_layers": 3/' "$tmp/bad/config.json"
check 1 'missing tensor model.layers.2.input_layernorm.weight' "$spool" models inspect "$tmp/bad"
cp "$models/llama-f32/config.json" "$tmp/bad/config.json"
size=$(stat -c %s "$tmp/bad/model.safetensors")
truncate -s $((size - 100)) "$tmp/bad/model.safetensors"
check 1 'truncated' "$spool" models inspect "$tmp/bad"
[ $fail = 0 ] && echo ok
exit $fail
