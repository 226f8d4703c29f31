#!/bin/sh
# make cross: build casdm for other compilers, word sizes, architectures and
# byte orders, and run the fast part of the test suite on each (under
# qemu-user for foreign CPUs). One PASS/FAIL line per target.
#   gcc, clang   x86-64, -std=c99 -pedantic -Wall -Wextra -Werror, SIMD and threads
#   tcc          x86-64, SIMD=0 THREADS=0
#   i386         32-bit size_t and long: gcc-i686-linux-gnu under qemu-i386, THREADS=0
#                (Debian's gcc-multilib, for gcc -m32, conflicts with the
#                cross compilers below, so the i686 cross gcc stands in)
#   aarch64      NEON path, qemu-aarch64
#   s390x        big-endian, scalar, qemu-s390x
#   riscv64      scalar, qemu-riscv64
# Then a checkpoint written on x86-64 must load on s390x and come back
# byte-identical when saved there, and the reverse.
# Missing toolchains are installed with apt when running as root (or with
# password-less sudo); otherwise the target reports SKIP.
cd "$(dirname "$0")/.." || exit 1
root=$(pwd)
work=${CROSS_DIR:-/tmp/casdm-cross}
[ -z "${CROSS_TARGETS:-}" ] && rm -rf "$work"
mkdir -p "$work"
fails=0
pkgs="clang tcc gcc-i686-linux-gnu gcc-aarch64-linux-gnu gcc-s390x-linux-gnu gcc-riscv64-linux-gnu qemu-user"
missing=""
for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
    echo "installing:$missing"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null 2>&1 ||
        { $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null 2>&1; } ||
        echo "could not install:$missing (targets that need them will SKIP)"
fi

# target NAME CC RUNNER MAKEFLAGS...: copy the tree, build, run the quick tests
# (CROSS_TARGETS="s390x riscv64" runs only those)
target() {
    name=$1; cc=$2; runner=$3; shift 3
    limit=${TARGET_TIMEOUT:-1200}
    case " ${CROSS_TARGETS:-$name} " in *" $name "*) ;; *) return ;; esac
    if ! command -v "$cc" >/dev/null 2>&1; then echo "SKIP $name: $cc not installed"; return; fi
    if [ -n "$runner" ] && ! command -v "${runner%% *}" >/dev/null 2>&1; then echo "SKIP $name: ${runner%% *} not installed"; return; fi
    d="$work/$name"
    mkdir -p "$d"
    (cd "$root" && git ls-files -z | xargs -0 tar cf - 2>/dev/null) | (cd "$d" && tar xf -)
    if ! (cd "$d" && make -s -j"$(nproc 2>/dev/null || echo 2)" CC="$cc" CFLAGS="-O2 -Werror" "$@" casdm build/test_tensor build/test_unet build/check_files) \
            > "$d/build.log" 2>&1; then
        echo "FAIL $name: build (see $d/build.log)"; sed 's/^/  /' "$d/build.log" | head -20; fails=$((fails + 1)); return
    fi
    start=$(date +%s)
    level=--quick; [ -n "$runner" ] && level=--emulated
    # (a timeout, so that a hang under emulation fails the target instead of CI)
    if (cd "$d" && timeout "$limit" $runner ./build/test_tensor $level && timeout "$limit" $runner ./build/test_unet $level) \
            > "$d/test.log" 2>&1; then
        n=$(grep -c '^PASS' "$d/test.log"); s=$(grep -c '^SKIP' "$d/test.log")
        echo "PASS $name: $n tests passed, $s skipped ($(($(date +%s) - start)) s; $(grep -m1 -o 'avx512\|avx2\|neon\|scalar' "$d/test.log"))"
    else
        echo "FAIL $name: tests (see $d/test.log)"; grep '^FAIL' "$d/test.log" | head -10; fails=$((fails + 1))
    fi
}

strict="-std=c99 -pedantic -Wall -Wextra"
target gcc-x86_64 gcc "" SIMD=1 THREADS=1
target clang-x86_64 clang "" SIMD=1 THREADS=1
target tcc-x86_64 tcc "" SIMD=0 THREADS=0
# THREADS=0: Debian 12's qemu-i386 (7.2) hangs in pthread_create with the i386
# glibc 2.36 (a two-line pthread program hangs too); aarch64 etc. are fine
# It is also the slowest target (x87 arithmetic under TCG: 26 min of 55 on the
# Intel guest) and single-threaded, so it runs in the background beside the
# others, on the core they leave idle, with a longer hang timeout since it
# shares the machine; its lines are printed when it ends.
TARGET_TIMEOUT=2400 target i386 i686-linux-gnu-gcc "qemu-i386 -L /usr/i686-linux-gnu" SIMD=0 THREADS=0 ARCHFLAGS= \
    > "$work/i386.out" 2>&1 &
i386_pid=$!
target aarch64 aarch64-linux-gnu-gcc "qemu-aarch64 -L /usr/aarch64-linux-gnu" SIMD=1 THREADS=1 ARCHFLAGS=
target s390x s390x-linux-gnu-gcc "qemu-s390x -L /usr/s390x-linux-gnu" SIMD=0 THREADS=1
target riscv64 riscv64-linux-gnu-gcc "qemu-riscv64 -L /usr/riscv64-linux-gnu" SIMD=0 THREADS=1

# checkpoints across byte orders: train 2 steps on one machine, load on the
# other (train --resume to the same step saves without a step in between)
if [ -x "$work/gcc-x86_64/casdm" ] && [ -x "$work/s390x/casdm" ]; then
    q="timeout 1200 qemu-s390x -L /usr/s390x-linux-gnu"
    d=$work/endian; mkdir -p "$d"
    awk 'BEGIN { for (i = 0; i < 8; i++) { printf "%c", i; for (k = 0; k < 3072; k++) printf "%c", (k * 7 + i * 31) % 251 } }' > "$d/data.bin"
    opts="--data $d/data.bin --model casdm --ch 32 --res 1 --mult 1,2 --attn 16 --batch 2 --T 100 --steps 2 --sample-n 0"
    ok=1
    (cd "$work/gcc-x86_64" && ./casdm train $opts --out "$d/x86" 2>/dev/null) || ok=0
    mkdir -p "$d/on_s390x" && cp "$d/x86/ckpt.safetensors" "$d/on_s390x/"
    (cd "$work/s390x" && $q ./casdm train $opts --resume "$d/on_s390x" --out "$d/on_s390x" 2>/dev/null) || ok=0
    cmp -s "$d/x86/ckpt.safetensors" "$d/on_s390x/ckpt.safetensors" || ok=0
    (cd "$work/s390x" && $q ./casdm train $opts --out "$d/s390x" 2>/dev/null) || ok=0
    mkdir -p "$d/on_x86" && cp "$d/s390x/ckpt.safetensors" "$d/on_x86/"
    (cd "$work/gcc-x86_64" && ./casdm train $opts --resume "$d/on_x86" --out "$d/on_x86" 2>/dev/null) || ok=0
    cmp -s "$d/s390x/ckpt.safetensors" "$d/on_x86/ckpt.safetensors" || ok=0
    # the same checkpoint samples the same images on both (scalar x86 build vs s390x)
    (cd "$work/tcc-x86_64" 2>/dev/null && ./casdm sample --ckpt "$d/x86/ckpt.safetensors" --n 2 --steps 3 --out "$d/smp_x86" >/dev/null 2>&1) || ok=0
    (cd "$work/s390x" && $q ./casdm sample --ckpt "$d/x86/ckpt.safetensors" --n 2 --steps 3 --out "$d/smp_s390x" >/dev/null 2>&1) || ok=0
    diffmax=$(cmp -l "$d/smp_x86/samples_2x32x32x3.npz" "$d/smp_s390x/samples_2x32x32x3.npz" 2>/dev/null |
              awk 'function oct(s,  n, i) { n = 0; for (i = 1; i <= length(s); i++) n = n * 8 + substr(s, i, 1); return n }
                   { a = oct($2); b = oct($3); d = a > b ? a - b : b - a; if (d > m) m = d } END { print m + 0 }')  # cmp -l prints octal
    [ "${diffmax:-99}" -le 1 ] || ok=0
    if [ $ok -eq 1 ]; then
        echo "PASS checkpoints across byte orders: x86-64 -> s390x -> identical bytes, and back; samples agree (max pixel difference $diffmax)"
    else
        echo "FAIL checkpoints across byte orders (files in $d; max pixel difference ${diffmax:-?})"; fails=$((fails + 1))
    fi
else
    echo "SKIP checkpoints across byte orders: needs the x86-64 and s390x builds"
fi
wait "$i386_pid"
cat "$work/i386.out"
grep -q '^FAIL' "$work/i386.out" && fails=$((fails + 1))
[ $fails -eq 0 ]
