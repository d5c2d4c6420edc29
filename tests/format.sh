#!/bin/bash
# Every C, header and CUDA file follows .clang-format (clang-format 14, Debian's).
# Fix with: git ls-files '*.c' '*.h' '*.cu' '*.cuh' | xargs clang-format -i
cd "$(dirname "$0")/.." || exit 1
command -v clang-format >/dev/null || { echo "clang-format is missing (ops/setup installs it)"; exit 77; }
files=$(git ls-files '*.c' '*.h' '*.cu' '*.cuh' 2>/dev/null)
[ -n "$files" ] || { echo "not a git checkout: nothing to check"; exit 77; }
bad=0
for f in $files; do
    if ! clang-format --dry-run --Werror "$f" >/dev/null 2>&1; then
        echo "not formatted: $f"
        bad=1
    fi
done
[ $bad = 0 ] && echo "all $(wc -w <<<"$files") files formatted"
exit $bad
