#!/bin/bash
# API keys and tenants end to end: spool keys create / list / revoke and
# spool tenants create / list against a private PostgreSQL. Keys are stored
# only as their SHA-256 and never listed.
# Usage: keys.sh PATH-TO-SPOOL
set -euo pipefail
spool=$(realpath "$1")
tag=${SPOOL_TEST_TAG:-x}
h=$(mktemp -d "/tmp/spd-$tag-XXXXXX")
chmod 755 "$h"
export SPOOL_HOME=$h/home
trap '"$spool" dev down >/dev/null 2>&1 || true; rm -rf "$h"' EXIT
dsn=$("$spool" dev up 2>/dev/null)
export SPOOL_DSN=$dsn
q() { psql "$dsn" -XAtq -v ON_ERROR_STOP=1 -c "$1"; }
fail() { echo "FAIL: $*"; exit 1; }
json() { /usr/bin/python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
# expect_rc CODE PATTERN CMD...: exit code CODE and PATTERN in stderr
expect_rc() {
    local want=$1 pat=$2; shift 2
    set +e
    "$@" >"$h/out" 2>"$h/err"; local rc=$?
    set -e
    [ "$rc" = "$want" ] || fail "'$*' exited $rc, want $want: $(cat "$h/out" "$h/err")"
    grep -q -- "$pat" "$h/err" || fail "'$*': stderr lacks '$pat': $(cat "$h/err")"
}

# Create: the key is printed once, with its id; the database holds only its hash.
out=$("$spool" keys create --tenant acme --name ci --scopes inference --rpm 2 2>"$h/err")
echo "$out"
grep -q "not shown again" "$h/err" || fail "no warning that the key is shown once"
id=$(awk '$1 == "id" {print $2}' <<<"$out")
key=$(awk '$1 == "key" {print $2}' <<<"$out")
[[ $id =~ ^[0-9]+$ ]] || fail "no id: $out"
[[ $key =~ ^sk-spool-[0-9a-f]{64}$ ]] || fail "bad key: $key"
[ "$(awk '$1 == "tenant" {print $2}' <<<"$out")" = acme ] || fail "tenant"
hash=$(printf %s "$key" | sha256sum | cut -c1-64)
[ "$(q "SELECT format('%s|%s|%s|%s|%s', tenant, name, scopes, rpm_limit, tpm_limit IS NULL) FROM spool.api_keys WHERE id = $id AND key_hash = '$hash'")" = "acme|ci|{inference}|2|t" ] || fail "stored row"
[ "$(q "SELECT count(*) FROM spool.api_keys WHERE row_to_json(api_keys)::text LIKE '%$key%'")" = 0 ] || fail "the key itself is stored"
[ "$(q "SELECT prefix FROM spool.api_keys WHERE id = $id")" = "${key:0:16}" ] || fail "prefix"

# --json, defaults, a second tenant (created with its key).
j=$("$spool" keys create --tenant beta --tpm 5000 --json 2>/dev/null)
id2=$(json 'd["id"]' <<<"$j")
key2=$(json 'd["key"]' <<<"$j")
[ "$(json '",".join(d["scopes"]), d["rpm_limit"], d["tpm_limit"], d["tenant"], d["prefix"] == d["key"][:16]' <<<"$j")" = "inference,batch None 5000 beta True" ] || fail "json: $j"
[ "$(q "SELECT key_hash FROM spool.api_keys WHERE id = $id2")" = "$(printf %s "$key2" | sha256sum | cut -c1-64)" ] || fail "hash of the --json key"
[ "$(q "SELECT count(*) FROM spool.tenants WHERE name = 'beta'")" = 1 ] || fail "tenant not created"
id3=$("$spool" keys create --tenant acme --scopes admin,batch 2>/dev/null | awk '$1 == "id" {print $2}')

# List: every active key, never a key or a hash.
"$spool" keys list >"$h/list"
cat "$h/list"
head -1 "$h/list" | grep -q '^id  *tenant  *name  *prefix  *scopes  *rpm  *tpm  *created  *revoked$' || fail "list header"
grep -Eq "^$id +acme +ci +${key:0:16} +inference +2 +- +[0-9T:Z-]+ +-$" "$h/list" || fail "list row"
grep -Eq "^$id3 +acme +- +sk-spool-[0-9a-f]{7} +admin,batch " "$h/list" || fail "list scopes of key 3"
[ "$(wc -l <"$h/list")" = 4 ] || fail "list length"
for secret in "$key" "$hash" "$key2" "${key:16}"; do
    ! grep -q -- "$secret" "$h/list" || fail "list shows a key or hash"
done
"$spool" keys list --tenant beta | grep -c sk-spool | grep -qx 1 || fail "--tenant"
"$spool" keys list --json --tenant acme >"$h/list.json"
[ "$(json 'len(d), sorted(k["id"] for k in d) == sorted([int(x) for x in "'"$id $id3"'".split()]), all("key" not in k and "key_hash" not in k for k in d)' <"$h/list.json")" = "2 True True" ] || fail "list --json: $(cat "$h/list.json")"

# Revoke: the key leaves the list (--all still shows it, with the time).
out=$("$spool" keys revoke "$id")
[[ $out == "revoked key $id (tenant acme, ${key:0:16}...)" ]] || fail "revoke: $out"
[ "$(q "SELECT revoked_at IS NOT NULL FROM spool.api_keys WHERE id = $id")" = t ] || fail "not revoked"
! "$spool" keys list | grep -q "^$id " || fail "revoked key still listed"
"$spool" keys list --all | grep -Eq "^$id +acme .* [0-9T:Z-]+ +[0-9T:Z-]+$" || fail "--all"
out=$("$spool" keys revoke "$id")
[[ $out == "key $id (tenant acme) was already revoked at "* ]] || fail "revoke twice: $out"
expect_rc 1 "no API key has id 999999" "$spool" keys revoke 999999

# Tenants: create with a weight, give one a database role, list.
out=$("$spool" tenants create gamma --weight 2.5)
[ "$out" = "created tenant gamma (weight 2.5)" ] || fail "tenants create: $out"
q "CREATE ROLE spool_cli_test_$$ LOGIN"
out=$("$spool" tenants create gamma --role "spool_cli_test_$$")
[ "$out" = "updated tenant gamma (weight 2.5); database role spool_cli_test_$$ sees only its rows" ] || fail "tenants create --role: $out"
[ "$(psql "$dsn user=spool_cli_test_$$" -XAtq -c 'SELECT spool.session_tenant()')" = gamma ] || fail "role is not the tenant's"
"$spool" tenants list | grep -Eq "^gamma +2.5 +spool_cli_test_$$ +0 +0$" || fail "tenants list: $("$spool" tenants list)"
"$spool" tenants list | grep -Eq "^acme +1 +- +1 +0$" || fail "tenants list keys"
expect_rc 1 "CREATE ROLE it first" "$spool" tenants create delta --role no_such_role_here
[ "$(q "SELECT count(*) FROM spool.tenants WHERE name = 'delta'")" = 0 ] || fail "a failed create left the tenant"

# Usage errors name what was wrong.
expect_rc 2 "tenant is required" "$spool" keys create
expect_rc 2 "tenant name 'a b' is invalid" "$spool" keys create --tenant "a b"
expect_rc 2 "'foo' is not a scope" "$spool" keys create --tenant x --scopes inference,foo
expect_rc 2 "'batch' is not a scope, or is given twice" "$spool" keys create --tenant x --scopes batch,batch
expect_rc 2 "--rpm wants a whole number" "$spool" keys create --tenant x --rpm 0
expect_rc 2 "--tpm wants a whole number" "$spool" keys create --tenant x --tpm 1.5
expect_rc 2 "not a key id" "$spool" keys revoke abc
expect_rc 2 "exactly one key id" "$spool" keys revoke
expect_rc 2 "--weight wants a number" "$spool" tenants create t --weight 0
[ "$(q "SELECT count(*) FROM spool.tenants WHERE name = 'x'")" = 0 ] || fail "a refused create touched the database"
echo ok
