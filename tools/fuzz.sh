#!/bin/sh
# make fuzz: tools/fuzz.sh SECONDS TARGET... runs build/fuzz/fuzz_TARGET for
# SECONDS each, one after the other, on build/fuzz/corpus/TARGET (the seeds
# of tests/fuzz/TARGET/ copied in; what libFuzzer adds stays in build/).
# One line per target; a crash, leak, sanitizer report, timeout or
# out-of-memory prints the end of the log, keeps the input as
# build/fuzz/<target>-crash-... (or -leak-, -timeout-, -oom-) and makes the
# script exit 1. A single allocation above -malloc_limit_mb is a finding:
# every reader bounds what it allocates by the size of its input. The
# timeout leaves room for the slowest legitimate input: a 64 KB PNG of 2^26
# pixels takes about 6 s to decode under the sanitizers.
cd "$(dirname "$0")/.." || exit 1
secs=${1:-10}
shift
fails=0
for t in "$@"; do
    bin=build/fuzz/fuzz_$t corpus=build/fuzz/corpus/$t log=build/fuzz/$t.log
    mkdir -p "$corpus"
    cp tests/fuzz/"$t"/* "$corpus"/
    start=$(date +%s)
    "./$bin" "$corpus" -max_len=65536 -rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=25 \
        -max_total_time="$secs" -close_fd_mask=3 -print_final_stats=1 \
        -artifact_prefix="build/fuzz/$t-" >"$log" 2>&1
    rc=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    if [ "$rc" -eq 0 ] && ! grep -q 'ERROR: \|runtime error:\|^SUMMARY: ' "$log"; then
        echo "PASS fuzz $t: ${runs:-?} runs in $(($(date +%s) - start)) s, corpus $(ls "$corpus" | wc -l) inputs"
    else
        echo "FAIL fuzz $t (exit $rc; log $log):"
        grep -v '^#[0-9]' "$log" | tail -n 40 | cut -c1-300 | sed 's/^/  /'
        fails=$((fails + 1))
    fi
done
[ "$fails" -eq 0 ]
