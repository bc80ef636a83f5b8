#!/bin/sh
# Runs every fuzz target for a bounded time (seconds, default 60) and
# prints libFuzzer's final stats line of each. Needs nightly (or see
# README.md for RUSTC_BOOTSTRAP=1 on stable).
set -u
secs=${1:-60}
cd "$(dirname "$0")"
mkdir -p logs
for t in kallsyms btf orc page_tables dump_image ko_module; do
    case $t in
        orc) len=40000 ;;
        kallsyms|page_tables) len=65536 ;;
        *) len=16384 ;;
    esac
    cargo +nightly fuzz run "$t" -- -max_total_time="$secs" -timeout=10 \
        -rss_limit_mb=4096 -malloc_limit_mb=2048 -max_len="$len" >"logs/$t.log" 2>&1
    echo "$t: exit $? $(grep -E '^(#[0-9]+\s+DONE|Done [0-9]+ runs)' "logs/$t.log" | tr '\n' ' ')"
    ls artifacts/"$t" 2>/dev/null | sed "s/^/  artifact: /"
done
