#!/bin/bash
# The spool CLI: --help on every command, --version, exit codes 0/1/2.
set -uo pipefail
spool=$1
fail=0
expect() { # expect CODE CMD...
    local want=$1; shift
    "$@" >/tmp/cli.$$.out 2>&1
    local got=$?
    if [ "$got" != "$want" ]; then
        echo "FAIL: '$*' exited $got, want $want:"; cat /tmp/cli.$$.out; fail=1
    fi
}
expect 0 "$spool" --version
"$spool" --version | grep -Eq '^spool [0-9]+\.[0-9]+\.[0-9]+$' || { echo "bad --version"; fail=1; }
expect 0 "$spool" --help
expect 2 "$spool"
expect 2 "$spool" no-such-command
for group in $("$spool" --help | awk '/^commands:/{on=1;next} on && NF && !/^Run/ {print $1}'); do
    expect 0 "$spool" "$group" --help
    # a group's subcommands, where it has any
    for sub in $("$spool" "$group" --help | awk '/^commands:/{on=1;next} on && NF && !/^Run/ {print $1}'); do
        expect 0 "$spool" "$group" "$sub" --help
        "$spool" "$group" "$sub" --help | grep -q '^usage: ' || { echo "FAIL: $group $sub --help has no usage line"; fail=1; }
    done
done
expect 2 "$spool" dev bogus
expect 2 "$spool" db migrate --bogus
expect 2 "$spool" dev up extra-arg
# no database reachable: a clear failure, exit 1
SPOOL_HOME=/tmp/spool-cli-none-$$ SPOOL_DSN= expect 1 "$spool" db migrate
grep -q 'no database' /tmp/cli.$$.out || { echo "FAIL: no clear message"; cat /tmp/cli.$$.out; fail=1; }
rm -rf /tmp/spool-cli-none-$$
SPOOL_DSN='host=/nonexistent dbname=x' expect 1 "$spool" db migrate
grep -q 'cannot connect' /tmp/cli.$$.out || { echo "FAIL: no clear message"; fail=1; }
for d in spool-scheduler spool-worker; do
    exe=$(dirname "$spool")/../$( [ $d = spool-scheduler ] && echo scheduler || echo worker )/$d
    expect 0 "$exe" --help
    expect 0 "$exe" --version
    expect 2 "$exe" --bogus
    SPOOL_DSN= expect 2 "$exe"
done
rm -f /tmp/cli.$$.out
[ $fail = 0 ] && echo ok
exit $fail
