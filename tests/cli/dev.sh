#!/bin/bash
# spool dev up / status / psql / down, as root (server runs as postgres) and
# as an ordinary user. Usage: dev.sh PATH-TO-SPOOL
set -euo pipefail
spool=$(realpath "$1")
tag=${SPOOL_TEST_TAG:-x}
h=$(mktemp -d "/tmp/spd-$tag-XXXXXX")
chmod 755 "$h"
cleanup() {
    SPOOL_HOME=$h/a "$spool" dev down >/dev/null 2>&1 || true
    if [ "$(id -u)" = 0 ] && [ -d "$h/b" ]; then
        runuser -u nobody -- env SPOOL_HOME="$h/b" "$spool" dev down >/dev/null 2>&1 || true
    fi
    rm -rf "$h"
}
trap cleanup EXIT

run_cycle() { # $1: SPOOL_HOME; the rest: command prefix (e.g. runuser ...)
    local home=$1; shift
    "$@" env SPOOL_HOME="$home" "$spool" dev status >/dev/null && { echo "status before up should fail"; exit 1; }
    dsn=$("$@" env SPOOL_HOME="$home" "$spool" dev up)
    echo "dsn: $dsn"
    [[ $dsn == host=*dbname=spool* ]]
    # up is idempotent
    "$@" env SPOOL_HOME="$home" "$spool" dev up >/dev/null
    "$@" env SPOOL_HOME="$home" "$spool" dev status | grep -q '^cluster: running'
    v=$("$@" env SPOOL_HOME="$home" "$spool" dev psql -XAtc 'SELECT spool.schema_version()')
    [[ $v == [0-9][0-9][0-9][0-9]_*.sql ]] || { echo "unexpected schema version '$v'"; exit 1; }
    "$@" env SPOOL_HOME="$home" SPOOL_DSN="$dsn" "$spool" db migrate | grep -q '^0 migration(s) applied'
    "$@" env SPOOL_HOME="$home" "$spool" dev down
    if "$@" env SPOOL_HOME="$home" "$spool" dev status >/dev/null; then echo "status after down should fail"; exit 1; fi
}

run_cycle "$h/a"
if [ "$(id -u)" = 0 ]; then
    # As root the server runs as postgres; the data directory belongs to it.
    [ "$(stat -c %U "$h/a/data")" = postgres ]
    mkdir "$h/b" && chown nobody "$h/b"
    run_cycle "$h/b" runuser -u nobody --
    [ "$(stat -c %U "$h/b/data")" = nobody ]
fi
echo ok
