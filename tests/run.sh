#!/bin/sh
# Runs each test binary, passes its PASS/FAIL/SKIP lines through, and ends
# with the summary line "N passed, N failed[, N skipped]". A binary that
# crashes or exits non-zero without a FAIL line counts as one failure.
# When valgrind is present and the build has no AVX-512 (valgrind cannot
# decode it), the quick subset also runs under valgrind's leak checker.
passed=0; failed=0; skipped=0
out=$(mktemp)
trap 'rm -f "$out"' EXIT

for t in "$@"; do
    "./$t" >"$out" 2>"$out.err"; rc=$?
    cat "$out"
    p=$(grep -c '^PASS ' "$out"); f=$(grep -c '^FAIL ' "$out"); s=$(grep -c '^SKIP ' "$out")
    passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
        echo "FAIL $t: exited with status $rc"; cat "$out.err"; failed=$((failed + 1))
    elif [ "$f" -ne 0 ]; then
        sed 's/^/  /' "$out.err"
    fi
    rm -f "$out.err"
done

name="valgrind memcheck (leaks, invalid accesses) on the quick tests"
if ! command -v valgrind >/dev/null 2>&1; then
    echo "SKIP $name: valgrind not installed"; skipped=$((skipped + 1))
elif grep -q 'avx512\|march=native' build/.flags 2>/dev/null; then
    echo "SKIP $name: SIMD build uses instructions valgrind cannot run; the SIMD=0 run and make asan cover it"
    skipped=$((skipped + 1))
else
    for t in "$@"; do
        case "$t" in *.sh) continue ;; esac
        if valgrind -q --error-exitcode=3 --leak-check=full --errors-for-leak-kinds=definite,indirect \
                "./$t" --quick >/dev/null 2>"$out"; then
            echo "PASS $name: $t"; passed=$((passed + 1))
        else
            echo "FAIL $name: $t"; sed 's/^/  /' "$out" | head -40; failed=$((failed + 1))
        fi
    done
fi

if [ "$skipped" -gt 0 ]; then
    echo "$passed passed, $failed failed, $skipped skipped"
else
    echo "$passed passed, $failed failed"
fi
[ "$failed" -eq 0 ]
