#!/bin/bash
# Runs last: no harness cluster directory and no PostgreSQL server of the
# harness may be left behind by this build's tests (reapers clean up
# asynchronously, so wait a little). Covers /tmp/spt-TAG-* (pgtest) and
# /tmp/spd-TAG-* (CLI tests).
tag=${SPOOL_TEST_TAG:?}
for _ in $(seq 1 100); do
    dirs=$(ls -d /tmp/spt-"$tag"-* /tmp/spd-"$tag"-* 2>/dev/null)
    procs=$(pgrep -af "postgres.*-D /tmp/sp[td]-$tag-" 2>/dev/null)
    [ -z "$dirs$procs" ] && { echo "no leftovers"; exit 0; }
    sleep 0.2
done
echo "left behind by the test harness:"
[ -n "$dirs" ] && echo "directories: $dirs"
[ -n "$procs" ] && echo "processes: $procs"
exit 1
