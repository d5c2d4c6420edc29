# Sourced by the end-to-end scripts after they set $spool: a private
# directory $h (under /tmp, named for $SPOOL_TEST_TAG so the leftover check
# finds it), a private PostgreSQL (spool dev up) with SPOOL_DSN exported, and
# a cleanup on exit that kills every pid in $pids, prints the tail of each log
# in $h when the script failed, stops PostgreSQL and removes $h.
#
# Usage: e2e_setup PREFIX   (PREFIX: the directory name's start, e.g. spl)
# Gives: h, pids, dsn, fail MESSAGE, q SQL (one value, unaligned).
e2e_setup() {
    h=$(mktemp -d "/tmp/$1-${SPOOL_TEST_TAG:-x}-XXXXXX")
    chmod 755 "$h"
    export SPOOL_HOME=$h/home SPOOL_MODEL_STORE=$h/store
    pids=()
    trap e2e_cleanup EXIT
    trap 'exit 143' TERM INT
    dsn=$("$spool" dev up 2>/dev/null)
    export SPOOL_DSN=$dsn
}

e2e_cleanup() {
    local rc=$?
    trap - EXIT
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ $rc != 0 ]; then
        for f in "$h"/*.log; do [ -f "$f" ] && { echo "== $f"; tail -30 "$f"; }; done
    fi
    "$spool" dev down >/dev/null 2>&1 || true
    rm -rf "$h"
    exit $rc
}

fail() { echo "FAIL: $*"; exit 1; }
q() { psql "$dsn" -XAtq -v ON_ERROR_STOP=1 -c "$1"; }
