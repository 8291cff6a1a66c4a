#!/bin/sh
# The new domains benchmarks/retrain_search.py and benchmarks/demo_loop.py are run on besides the
# demo's own shift: text on every Debian machine that nobody here chose or tuned for.
#   licences.txt: every package's copyright file, concatenated (legal English);
#   manpages.txt: the first 600 section-1 manual pages, rendered as plain text (terse technical English).
# Usage: sh benchmarks/shifts.sh [FOLDER]   (default /tmp/shifts)
set -eu
out=${1:-/tmp/shifts}
mkdir -p "$out"
cat /usr/share/doc/*/copyright > "$out/licences.txt"
: > "$out/manpages.txt"
for page in $(ls /usr/share/man/man1/*.gz | LC_ALL=C sort | head -n 600); do
    zcat "$page" | groff -man -Tutf8 -P-cbou 2>/dev/null >> "$out/manpages.txt" || true
    printf '\n\n' >> "$out/manpages.txt"
done
wc -c "$out/licences.txt" "$out/manpages.txt"
