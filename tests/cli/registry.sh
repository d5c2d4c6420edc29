#!/bin/bash
# The model registry end to end: spool models push / list / show / alias
# against a private PostgreSQL, pinning of jobs, and refusal of a damaged bundle.
# Usage: registry.sh PATH-TO-SPOOL MODELS-DIR
set -euo pipefail
spool=$(realpath "$1")
models=$(realpath "$2")
tag=${SPOOL_TEST_TAG:-x}
h=$(mktemp -d "/tmp/spd-$tag-XXXXXX")
chmod 755 "$h"
export SPOOL_HOME=$h/home SPOOL_MODEL_STORE=$h/store
trap '"$spool" dev down >/dev/null 2>&1 || true; rm -rf "$h"' EXIT
dsn=$("$spool" dev up 2>/dev/null)
export SPOOL_DSN=$dsn
q() { psql "$dsn" -XAtq -v ON_ERROR_STOP=1 -c "$1"; }
fail() { echo "FAIL: $*"; exit 1; }

out=$("$spool" models push "$models/llama-f32" --name tiny --alias prod)
echo "$out"
[[ $out == "registered tiny@1 sha256:"* ]] || fail "first push: $out"
digest1=$(sed -E 's/.*sha256:([0-9a-f]{64}).*/\1/' <<<"$out")
[ -f "$h/store/sha256/$digest1.tar.zst" ] || fail "bundle not in the store"
[ "$(sha256sum "$h/store/sha256/$digest1.tar.zst" | cut -c1-64)" = "$digest1" ] || fail "store digest"

# The same bytes again: no new version.
out=$("$spool" models push "$models/llama-f32" --name tiny)
[[ $out == "already registered as tiny@1 "* ]] || fail "re-push: $out"

# Another model under the same name: version 2.
out=$("$spool" models push "$models/llama-bf16" --name tiny)
[[ $out == "registered tiny@2 "* ]] || fail "second version: $out"
[ "$(q "SELECT dtype || ' ' || architecture FROM spool.models WHERE name = 'tiny' AND version = 2")" = "bfloat16 LlamaForCausalLM" ] || fail "metadata"

"$spool" models list | grep -Eq '^tiny +2 +2 +prod=1' || { "$spool" models list; fail "list"; }
"$spool" models show tiny | grep -c LlamaForCausalLM | grep -q 2 || fail "show"
"$spool" models show tiny@prod | grep -q "$digest1" || fail "show @prod"

# A job pinned now keeps its version when the alias moves.
job=$(q "SELECT spool.submit_job('tiny@prod')")
"$spool" models alias tiny prod 2 >/dev/null
[ "$(q "SELECT model_version FROM spool.job_status WHERE job_id = $job")" = 1 ] || fail "pin moved"
[ "$(q "SELECT version FROM spool.models WHERE id = spool.resolve_model('tiny')")" = 2 ] || fail "prod not moved"
who=$(q "SELECT moved_by FROM spool.model_alias_history ORDER BY id DESC LIMIT 1")
[[ $who == "$(id -un) (postgres)" ]] || fail "alias move not recorded with the user: $who"

# Errors are clear and exit 1; usage errors exit 2.
set +e
"$spool" models push "$h/nope" --name tiny >/dev/null 2>"$h/err"; rc=$?
set -e
[ $rc = 1 ] && grep -q "does not load as a model" "$h/err" || fail "bad dir: rc=$rc $(cat "$h/err")"
set +e
"$spool" models alias tiny prod 9 >/dev/null 2>"$h/err"; rc=$?
"$spool" models push "$models/llama-f32" >/dev/null 2>&1; rc2=$?
set -e
[ $rc = 1 ] && grep -q "has no version 9" "$h/err" || fail "bad alias: $(cat "$h/err")"
[ $rc2 = 2 ] || fail "push without --name should be a usage error"
echo ok
