#!/bin/sh
# test_cli.sh: the casdm program end to end, on small CIFAR-10-format files
# this script writes: every --model trains, a resumed run is bitwise identical
# to an uninterrupted one, and bad flags, data and checkpoints fail with a
# clear message and a non-zero status. Prints PASS/FAIL lines for run.sh.
export LC_ALL=C
dir=build/cli
rm -rf "$dir" && mkdir -p "$dir"
fails=0
pass() { echo "PASS $1"; }
fail() { echo "FAIL $1"; fails=$((fails + 1)); }
# wait_for FILE PATTERN SECONDS: until FILE has a line matching PATTERN
wait_for() {
    i=0
    while ! grep -q -- "$2" "$1" 2>/dev/null; do
        i=$((i + 1)); [ $i -gt $(($3 * 20)) ] && return 1; sleep 0.05
    done
}
now() { date +%s.%N; }

# CIFAR-10 binary records: label byte + 3x32x32 pixels; smooth blobs whose
# position and colour vary with the record number (deterministic)
awk 'BEGIN {
    n = 24
    for (i = 0; i < n; i++) {
        printf "%c", i % 10
        cx = 8 + (i * 7) % 16; cy = 8 + (i * 5) % 16
        for (c = 0; c < 3; c++) for (y = 0; y < 32; y++) for (x = 0; x < 32; x++) {
            d = (x - cx) * (x - cx) + (y - cy) * (y - cy)
            v = int(255 * exp(-d / (40 + 20 * c)) * ((i + c) % 3 + 1) / 3)
            printf "%c", v
        }
    }
}' > "$dir/data_batch_1.bin"

small="--ch 32 --res 1 --attn 16 --batch 2 --T 100 --log-every 1 --sample-n 0"

# every model trains and writes a checkpoint and a log
for m in ddpm-eps ddpm-x0 dual casdm; do
    if ./casdm --threads 2 train --data "$dir" --model "$m" $small --steps 2 --out "$dir/$m" 2>"$dir/$m.err" &&
       [ -s "$dir/$m/ckpt.safetensors" ] && [ "$(wc -l < "$dir/$m/log.csv")" -eq 3 ]; then
        pass "casdm train --model $m runs (2 steps on CIFAR-format data)"
    else
        fail "casdm train --model $m"; sed 's/^/  /' "$dir/$m.err"
    fi
done

# sample grids during training and the loss plot
if ./casdm train --data "$dir" --model dual --ch 32 --res 1 --attn 16 --batch 2 --T 100 --log-every 1 --steps 4 \
       --sample-every 2 --sample-n 4 --sample-steps 3 --out "$dir/grids" 2>"$dir/grids.err" &&
   build/check_files "$dir/grids/samples_000002.png" 70 70 3 && build/check_files "$dir/grids/samples_000004.png" 70 70 3 &&
   grep -q '<polyline' "$dir/grids/loss.svg" && grep -q '</svg>' "$dir/grids/loss.svg"; then
    pass "training writes sample grids every --sample-every steps and the loss plot (SVG)"
else
    fail "sample grids / loss plot"; sed 's/^/  /' "$dir/grids.err"
fi

# casdm plot: two runs in one SVG, a polyline per term and run (casdm: loss,
# eps, x0, mu; ddpm-eps: loss, eps), two points each (2 logged steps), the
# second run dashed, user labels escaped; a missing log is named
if ./casdm plot --out "$dir/both.svg" --title "two runs" C="$dir/casdm/log.csv" 'b<&>'="$dir/ddpm-eps/log.csv" 2>"$dir/plot.err" &&
   [ "$(grep -c '<polyline' "$dir/both.svg")" -eq 6 ] &&
   [ "$(grep '<polyline' "$dir/both.svg" | grep -c 'points="[0-9.]*,[0-9.]* [0-9.]*,[0-9.]* "')" -eq 6 ] &&
   [ "$(grep '<polyline' "$dir/both.svg" | grep -c 'stroke-dasharray')" -eq 2 ] &&
   grep -q '>b&lt;&amp;&gt;</text>' "$dir/both.svg" && grep -q '>C</text>' "$dir/both.svg"; then
    pass "casdm plot draws several log.csv files in one SVG"
else
    fail "casdm plot"; sed 's/^/  /' "$dir/plot.err"
fi
./casdm plot --out "$dir/none.svg" "$dir/no-such/log.csv" 2>"$dir/plot.err"; rc=$?
if [ $rc -eq 1 ] && grep -q "no-such/log.csv" "$dir/plot.err" && [ ! -e "$dir/none.svg" ]; then
    pass "casdm plot names a missing log.csv and writes nothing"
else
    fail "casdm plot with a missing file (exit $rc)"; sed 's/^/  /' "$dir/plot.err"
fi

# resume: 4 steps straight == 2 steps, then resumed to 4 (dropout on, P2 on)
opts="--model casdm $small --p2-gamma 1 --dropout 0.1"
./casdm train --data "$dir" $opts --steps 4 --out "$dir/straight" 2>/dev/null  # (parents are created: see nested/ below)
./casdm train --data "$dir" $opts --steps 2 --out "$dir/half" 2>/dev/null
./casdm train --data "$dir" $opts --steps 4 --out "$dir/half" --resume "$dir/half" 2>/dev/null
if cmp -s "$dir/straight/ckpt.safetensors" "$dir/half/ckpt.safetensors"; then
    pass "resumed training is bitwise identical to an uninterrupted run"
else
    fail "resumed training differs from an uninterrupted run"
fi
# resuming into a new directory: its log starts with the old run's rows
./casdm train --data "$dir" $opts --steps 6 --out "$dir/moved" --resume "$dir/half" 2>/dev/null
if [ "$(head -1 "$dir/moved/log.csv")" = "$(head -1 "$dir/half/log.csv")" ] &&
   [ "$(cut -d, -f1 "$dir/moved/log.csv" | tr '\n' ' ')" = "step 1 2 3 4 5 6 " ] &&
   [ "$(sed -n 2,5p "$dir/moved/log.csv" | cut -d, -f1-6)" = "$(sed -n 2,5p "$dir/half/log.csv" | cut -d, -f1-6)" ]; then
    pass "--resume into a new --out carries the log over (header, old rows, new rows)"
else
    fail "--resume into a new --out: log.csv is"; sed 's/^/  /' "$dir/moved/log.csv"
fi
# resuming to the step a checkpoint holds saves it again, bytes unchanged
# (tools/cross.sh moves checkpoints between byte orders this way)
mkdir -p "$dir/resave" && cp "$dir/half/ckpt.safetensors" "$dir/resave/"
ino0=$(ls -i "$dir/resave/ckpt.safetensors" | cut -d' ' -f1)
./casdm train --data "$dir" $opts --steps 4 --out "$dir/resave" --resume "$dir/resave" 2>/dev/null
ino1=$(ls -i "$dir/resave/ckpt.safetensors" | cut -d' ' -f1)
if [ "$ino0" != "$ino1" ] && cmp -s "$dir/half/ckpt.safetensors" "$dir/resave/ckpt.safetensors"; then
    pass "resuming to the checkpoint's own step writes it again, byte for byte"
else fail "resume to the same step (inode $ino0 -> $ino1)"; fi
# --keep-every 2: whole checkpoints at steps 2 and 4 besides the rolling one,
# byte for byte those of the 2- and 4-step runs
./casdm train --data "$dir" $opts --steps 4 --keep-every 2 --out "$dir/keep" 2>/dev/null
./casdm train --data "$dir" $opts --steps 2 --out "$dir/keep2" 2>/dev/null
if cmp -s "$dir/keep2/ckpt.safetensors" "$dir/keep/ckpt_000002.safetensors" &&
   cmp -s "$dir/straight/ckpt.safetensors" "$dir/keep/ckpt_000004.safetensors" &&
   cmp -s "$dir/straight/ckpt.safetensors" "$dir/keep/ckpt.safetensors" &&
   [ "$(ls "$dir/keep" | grep -c '^ckpt_[0-9]*\.safetensors$')" -eq 2 ]; then
    pass "--keep-every 2 keeps ckpt_000002 and ckpt_000004, the checkpoints of those steps"
else
    fail "--keep-every: $(ls "$dir/keep" | tr '\n' ' ')"
fi
# and the thread count does not change the result
./casdm --threads 1 train --data "$dir" $opts --steps 4 --out "$dir/one" 2>/dev/null
if cmp -s "$dir/straight/ckpt.safetensors" "$dir/one/ckpt.safetensors"; then
    pass "training with 1 and 2 threads gives bitwise identical checkpoints"
else
    fail "training with 1 and 2 threads differs"
fi
# --precision bf16 (every matrix product on bf16 operands): 1 and 2 threads
# bitwise equal, the losses within a few per cent of float32's (the first
# steps: the same batches, noise and weights), the back-end named by info
./casdm --threads 2 train --data "$dir" $opts --steps 4 --precision bf16 --out "$dir/bf16" 2>"$dir/bf16.err"
./casdm --threads 1 --precision bf16 train --data "$dir" $opts --steps 4 --out "$dir/bf16one" 2>/dev/null
if cmp -s "$dir/bf16/ckpt.safetensors" "$dir/bf16one/ckpt.safetensors" &&
   ! cmp -s "$dir/bf16/ckpt.safetensors" "$dir/straight/ckpt.safetensors" &&
   grep -q ' bf16 ' "$dir/bf16.err" && ./casdm --precision bf16 info | grep -q 'matrix products bf16' &&
   { ./casdm info | grep -q 'bf16 runs on VDPBF16PS\|bf16 runs on AMX tiles' || grep -q 'emulated on the float32 kernels (the same rounding, no faster)' "$dir/bf16.err"; } &&
   paste -d, "$dir/bf16/log.csv" "$dir/straight/log.csv" | awk -F, 'NR > 1 { d = $2 - $10; if (d < 0) d = -d; if (d > 0.05 * $10) bad = 1 } END { exit bad }'; then
    pass "--precision bf16: 1 and 2 threads bitwise equal, losses within 5% of float32's, info names it (without VDPBF16PS: the emulation's warning)"
else
    fail "--precision bf16"; sed 's/^/  /' "$dir/bf16.err"; paste -d, "$dir/bf16/log.csv" "$dir/straight/log.csv" | sed 's/^/  /'
fi
# and neither does recomputing the U-Net blocks in backward
./casdm train --data "$dir" $opts --steps 4 --grad-checkpoint --out "$dir/gc" 2>/dev/null
if cmp -s "$dir/straight/ckpt.safetensors" "$dir/gc/ckpt.safetensors"; then
    pass "training with --grad-checkpoint gives a bitwise identical checkpoint"
else
    fail "training with --grad-checkpoint differs"
fi

# sampling from a trained checkpoint: grid PNG, NPZ and one PNG per image,
# each checked by tests/check_files.c (its own CRC, zlib, zip and npy parsing)
if ./casdm sample --ckpt "$dir/straight/ckpt.safetensors" --n 5 --steps 4 --batch 3 --each --out "$dir/samples" \
       >"$dir/sample.out" 2>"$dir/sample.err" &&
   build/check_files "$dir/samples/grid.png" 104 70 3 &&
   build/check_files "$dir/samples/samples_5x32x32x3.npz" 5 32 32 3 &&
   build/check_files "$dir/samples/sample_00004.png" 32 32 3 &&
   grep -q "samples_5x32x32x3.npz" "$dir/sample.out"; then
    pass "casdm sample writes a valid grid PNG, per-image PNGs and an improved-diffusion NPZ"
else
    fail "casdm sample output"; sed 's/^/  /' "$dir/sample.err"
fi
for m in ddpm-eps ddpm-x0 dual; do
    if ./casdm sample --ckpt "$dir/$m/ckpt.safetensors" --n 2 --steps 3 --method ddpm --out "$dir/s_$m" >/dev/null 2>"$dir/s.err" &&
       build/check_files "$dir/s_$m/samples_2x32x32x3.npz" 2 32 32 3; then
        pass "casdm sample --method ddpm from a $m checkpoint"
    else
        fail "casdm sample from $m"; sed 's/^/  /' "$dir/s.err"
    fi
done

# casdm lpips: the same pixels through the PNG reader (every row filter,
# dynamic Huffman) and the PPM reader give distance 0; grey vs colour do not.
# casdm fid on the test Inception weights test_fid wrote (random, pytorch-fid's
# layout): a set against itself scores 0, a statistics file saved from a set
# gives the same FID as the set, the shifted statistics test_fid wrote give
# ||0.5||^2 * 64 = 16, and bad inputs are named
iw=build/inception_test.safetensors
if [ -f "$iw" ]; then
    if ./casdm --threads 2 fid "$dir" "$dir" --weights "$iw" --n 6 --splits 2 >"$dir/fid.out" 2>"$dir/fid.err" &&
       awk '/^FID /{f=$2} /^sFID /{s=$2} /^IS /{i=$2} END {exit !(f+0 < 1e-3 && f+0 > -1e-3 && s+0 < 1e-3 && s+0 > -1e-3 && i+0 >= 1)}' "$dir/fid.out"; then
        pass "casdm fid: a set against itself gives FID 0 and sFID 0 ($(tr '\n' ' ' < "$dir/fid.out"))"
    else
        fail "casdm fid, a set against itself"; sed 's/^/  /' "$dir/fid.out" "$dir/fid.err"
    fi
    if ./casdm fid "$dir" --save-stats "$dir/ref.npz" --weights "$iw" --n 6 2>"$dir/fid2.err" >/dev/null &&
       ./casdm fid "$dir/samples/samples_5x32x32x3.npz" "$dir/ref.npz" --weights "$iw" --splits 1 >"$dir/fid_a.out" 2>>"$dir/fid2.err" &&
       ./casdm fid "$dir/samples/samples_5x32x32x3.npz" "$dir" --weights "$iw" --n 6 --splits 1 >"$dir/fid_b.out" 2>>"$dir/fid2.err" &&
       cmp -s "$dir/fid_a.out" "$dir/fid_b.out" && grep -q '^FID ' "$dir/fid_a.out" && grep -q 'images' "$dir/fid2.err"; then
        pass "casdm fid --save-stats: the saved statistics score as the images do ($(head -1 "$dir/fid_a.out"))"
    else
        fail "casdm fid --save-stats"; sed 's/^/  /' "$dir/fid_a.out" "$dir/fid_b.out" "$dir/fid2.err"
    fi
    if ./casdm fid build/fid_stats_a.npz build/fid_stats_shift.npz >"$dir/fid_s.out" 2>&1 &&
       grep -q '^FID   16.0000$' "$dir/fid_s.out" && grep -q '^sFID  n/a' "$dir/fid_s.out"; then
        pass "casdm fid: statistics with mu shifted by 0.5 in 64 dimensions give FID 16"
    else
        fail "casdm fid, shifted statistics"; sed 's/^/  /' "$dir/fid_s.out"
    fi
    ok=1
    # name: what must be named; then the command
    check_fid() {
        want=$1; shift
        if ./casdm fid "$@" >/dev/null 2>"$dir/fid_bad.err"; then ok=0; echo "  accepted: $*";
        elif ! grep -q -- "$want" "$dir/fid_bad.err" || [ "$(wc -l < "$dir/fid_bad.err")" -ne 1 ]; then
            ok=0; echo "  $*:"; sed 's/^/    /' "$dir/fid_bad.err"; fi
    }
    check_fid "not the same features" build/fid_stats_a.npz "$dir" --weights "$iw" --n 4
    check_fid "sigma must be 64x64" build/fid_stats_bad.npz build/fid_stats_a.npz
    check_fid "at least 2" build/fid_one.npz "$dir" --weights "$iw"
    check_fid "at least 2" build/fid_none.npz "$dir" --weights "$iw"
    check_fid "no-such.safetensors" "$dir" "$dir" --weights "$dir/no-such.safetensors"
    check_fid "is needed to score images" "$dir" build/fid_stats_a.npz
    if [ $ok -eq 1 ]; then
        pass "casdm fid: mismatched dimensions, a misshapen sigma, 0 or 1 images, missing weights give one clear line"
    else
        fail "casdm fid bad inputs"
    fi
else
    echo "SKIP casdm fid: $iw not written (test_fid did not run)"
fi

# casdm train-classifier on a learnable IDX set this script writes (class k:
# a bright 6x6 square at column 2k, row 2 + (i % 5) * 4, on noise), then the
# FD-classifier of casdm fid --features: a set against itself 0, against
# the other split a positive number; colour images for a grey classifier named
idx_set() {  # idx_set N SEED -> images on stdout; labels into $dir/labels_SEED
    awk -v n="$1" -v seed="$2" -v lab="$dir/labels_$2" 'BEGIN {
        srand(seed)
        printf "%c%c%c%c", 0, 0, 8, 3
        printf "%c%c%c%c", int(n / 16777216) % 256, int(n / 65536) % 256, int(n / 256) % 256, n % 256
        printf "%c%c%c%c%c%c%c%c", 0, 0, 0, 28, 0, 0, 0, 28
        printf "%c%c%c%c", 0, 0, 8, 1 > lab
        printf "%c%c%c%c", int(n / 16777216) % 256, int(n / 65536) % 256, int(n / 256) % 256, n % 256 > lab
        for (i = 0; i < n; i++) {
            k = i % 10; r = 2 + (int(i / 10) % 5) * 4
            printf "%c", k > lab
            for (y = 0; y < 28; y++) for (x = 0; x < 28; x++) {
                v = int(rand() * 60)
                if (x >= 2 * k && x < 2 * k + 6 && y >= r && y < r + 6) v = 200 + int(rand() * 50)
                printf "%c", v
            }
        }
    }'
}
idx_set 300 1 > "$dir/clf-train-idx3-ubyte"; idx_set 100 2 > "$dir/clf-test-idx3-ubyte"
if ./casdm train-classifier --data "$dir/clf-train-idx3-ubyte" --labels "$dir/labels_1" --out "$dir/clf.safetensors" \
       --steps 60 --batch 16 --lr 3e-3 --test-data "$dir/clf-test-idx3-ubyte" --test-labels "$dir/labels_2" \
       >"$dir/clf.out" 2>"$dir/clf.err" &&
   awk '/^test accuracy/ { a = $3 + 0 } END { exit !(a >= 90) }' "$dir/clf.out"; then
    pass "casdm train-classifier learns a labelled IDX set ($(grep '^test accuracy' "$dir/clf.out"))"
else
    fail "casdm train-classifier"; sed 's/^/  /' "$dir/clf.out" "$dir/clf.err"
fi
if ./casdm fid "$dir/clf-test-idx3-ubyte" "$dir/clf-test-idx3-ubyte" --features "$dir/clf.safetensors" >"$dir/fdc0.out" 2>&1 &&
   ./casdm fid "$dir/clf-test-idx3-ubyte" "$dir/clf-train-idx3-ubyte" --features "$dir/clf.safetensors" >"$dir/fdc1.out" 2>&1 &&
   awk '/^FD-classifier/ { v = $2 + 0 } END { exit !(v > -1e-6 && v < 1e-6) }' "$dir/fdc0.out" &&
   awk '/^FD-classifier/ { v = $2 + 0 } END { exit !(v > 1e-3) }' "$dir/fdc1.out" &&
   ! grep -q '^IS\|^sFID' "$dir/fdc1.out" &&
   ! ./casdm fid "$dir" "$dir/clf-test-idx3-ubyte" --features "$dir/clf.safetensors" >/dev/null 2>"$dir/fdc2.err" &&
   grep -q "the classifier (--features) takes 1x32x32" "$dir/fdc2.err"; then
    pass "casdm fid --features: FD-classifier 0 for a set against itself, $(cut -c15- "$dir/fdc1.out") between the splits"
else
    fail "casdm fid --features"; sed 's/^/  /' "$dir/fdc0.out" "$dir/fdc1.out" "$dir/fdc2.err"
fi

# training-time evaluation: FD-classifier of 8 EMA samples every 2 steps in
# the fd column of log.csv (rows of steps 2 and 4 although --log-every is 3)
# and in the plot's FD panel (a point per evaluation), the best checkpoint
# kept and loadable; --eval-every alone refused
if ./casdm train --data "$dir/clf-train-idx3-ubyte" --model ddpm-eps --ch 32 --res 1 --attn 16 --batch 2 --T 100 \
       --log-every 3 --sample-n 0 --steps 4 --eval-every 2 --eval-n 8 --eval-features "$dir/clf.safetensors" \
       --sample-steps 2 --eval-ref-n 50 --out "$dir/evalrun" 2>"$dir/evalrun.err" &&
   [ "$(head -1 "$dir/evalrun/log.csv")" = "step,loss,l_eps,l_x0,l_mu,l_lpips,img_per_s,fd" ] &&
   [ "$(awk -F, 'NR > 1 { printf "%s:%s ", $1, ($8 > 0) }' "$dir/evalrun/log.csv")" = "2:1 3:0 4:1 " ] &&
   [ "$(grep -c '^eval: step [24], FD-classifier [0-9.]*' "$dir/evalrun.err")" -eq 2 ] &&
   [ "$(awk -F, '$1 == 2 { print $8 }' "$dir/evalrun/log.csv")" = "$(sed -n 's/^eval: step 2, FD-classifier \([0-9.]*\).*/\1/p' "$dir/evalrun.err" | awk '{ printf "%.6g", $1 }')" ] &&
   grep -q '>FD (eval)</text>' "$dir/evalrun/loss.svg" && [ "$(grep -o '<circle' "$dir/evalrun/loss.svg" | wc -l)" -eq 2 ] &&
   ./casdm sample --ckpt "$dir/evalrun/ckpt_best.safetensors" --n 1 --steps 1 --out "$dir/evalrun/s" 2>/dev/null >/dev/null &&
   ! ./casdm train --data "$dir/clf-train-idx3-ubyte" --eval-every 2 --out "$dir/evalbad" 2>"$dir/evalbad.err" &&
   grep -q -- "--eval-every needs --eval-features" "$dir/evalbad.err"; then
    pass "casdm train --eval-every: FD-classifier in log.csv and the plot at steps 2 and 4, ckpt_best.safetensors loads; --eval-features required"
else
    fail "casdm train --eval-every"; sed 's/^/  /' "$dir/evalrun.err" "$dir/evalrun/log.csv" "$dir/evalbad.err"
fi

# casdm plot with an fd column: the run with evaluations gets its FD points
# (2), a log without the column (older casdm, tools/train_ref.py) none, and a
# field that is not a number is absent: 2 loss + 1 FD polylines, 2 + 0 + 0
printf 'step,loss,l_eps,l_x0,l_mu,l_lpips,img_per_s,fd\n1,0.5,0.5,,,,10,x1\n2,0.4,0.4,,,,10,\n' > "$dir/fdbad.csv"
if ./casdm plot --out "$dir/fd.svg" E="$dir/evalrun/log.csv" D="$dir/ddpm-eps/log.csv" B="$dir/fdbad.csv" 2>"$dir/fdplot.err" &&
   [ "$(grep -c '<polyline' "$dir/fd.svg")" -eq 7 ] && [ "$(grep -o '<circle' "$dir/fd.svg" | wc -l)" -eq 2 ] &&
   [ "$(grep '#ff7f0e' "$dir/fd.svg" | grep -c '<polyline')" -eq 1 ] && grep -q 'height="620"' "$dir/fd.svg" &&
   ./casdm plot --out "$dir/nofd.svg" "$dir/ddpm-eps/log.csv" "$dir/fdbad.csv" 2>>"$dir/fdplot.err" &&
   ! grep -q 'FD (eval)' "$dir/nofd.svg" && grep -q 'height="420"' "$dir/nofd.svg"; then
    pass "casdm plot: an FD panel for the runs whose log.csv has fd values, none otherwise"
else
    fail "casdm plot with fd"; sed 's/^/  /' "$dir/fdplot.err"
fi

# The next two train for a minute or two in a SIMD build; the scalar build
# (make test SIMD=0) would take half an hour, so it skips them (the kernels
# they run are checked against the SIMD ones in test_tensor).
scalar=0
./casdm info | grep -q 'simd scalar' && scalar=1

# the classifier on real data: Fashion-MNIST (data/ after make data, or
# Debian's dataset-fashion-mnist, which .ci/run installs), 300 steps of 64
# (a third of an epoch, about 25 s), scored on the first 2000 test images:
# at least 85% (the default 2000 steps give 91%)
fm=""
for d in data/fashion-mnist /usr/share/datasets/fashion-mnist; do
    if [ -f "$d/train-labels-idx1-ubyte" ] || [ -f "$d/train-labels-idx1-ubyte.gz" ]; then fm=$d; break; fi
done
if [ "$scalar" -eq 1 ]; then
    echo "SKIP casdm train-classifier on Fashion-MNIST: a scalar build (SIMD=0); the SIMD build runs it"
elif [ -n "$fm" ]; then
    mkdir -p "$dir/fm"
    for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
        if [ -f "$fm/$f" ]; then ln -sf "$(cd "$fm" && pwd)/$f" "$dir/fm/$f"; else gunzip -c "$fm/$f.gz" > "$dir/fm/$f"; fi
    done
    if ./casdm train-classifier --data "$dir/fm/train-images-idx3-ubyte" --labels "$dir/fm/train-labels-idx1-ubyte" \
           --out "$dir/fm_clf.safetensors" --steps 300 --test-data "$dir/fm/t10k-images-idx3-ubyte" \
           --test-labels "$dir/fm/t10k-labels-idx1-ubyte" --test-n 2000 >"$dir/fm_clf.out" 2>"$dir/fm_clf.err" &&
       awk '/^test accuracy/ { a = $3 + 0 } END { exit !(a >= 85) }' "$dir/fm_clf.out"; then
        pass "casdm train-classifier on Fashion-MNIST, 300 steps: $(grep '^test accuracy' "$dir/fm_clf.out" | cut -d' ' -f1-5)"
    else
        fail "casdm train-classifier on Fashion-MNIST"; sed 's/^/  /' "$dir/fm_clf.out" "$dir/fm_clf.err"
    fi
else
    echo "SKIP casdm train-classifier on Fashion-MNIST: not found (apt-get install dataset-fashion-mnist, or make data)"
fi

# FD-classifier falls as a demo run trains: casdm (the demo's model, smaller:
# mult 1,2 at 16x16) on a clean 16x16 set this script writes (class k: a 4x4
# square at one of 3 places of column 3(k % 5), row 8(k / 5)), scored every
# 100 steps on 200 EMA samples (the same noise each time) in the features of
# a classifier trained on that set; the samples of step 400 score at least
# 20% better than those of step 100 (about 1 minute)
sq_set() {  # sq_set N SEED -> images on stdout; labels into $dir/sq_labels_SEED
    awk -v n="$1" -v lab="$dir/sq_labels_$2" 'BEGIN {
        printf "%c%c%c%c", 0, 0, 8, 3
        printf "%c%c%c%c", int(n / 16777216) % 256, int(n / 65536) % 256, int(n / 256) % 256, n % 256
        printf "%c%c%c%c%c%c%c%c", 0, 0, 0, 16, 0, 0, 0, 16
        printf "%c%c%c%c", 0, 0, 8, 1 > lab
        printf "%c%c%c%c", int(n / 16777216) % 256, int(n / 65536) % 256, int(n / 256) % 256, n % 256 > lab
        for (i = 0; i < n; i++) {
            k = i % 10; cx = (k % 5) * 3; cy = int(k / 5) * 8 + int(i / 10) % 3 * 2
            printf "%c", k > lab
            for (y = 0; y < 16; y++) for (x = 0; x < 16; x++)
                printf "%c", (x >= cx && x < cx + 4 && y >= cy && y < cy + 4) ? 230 : 20
        }
    }'
}
sq_set 600 1 > "$dir/sq-idx3-ubyte"
if [ "$scalar" -eq 1 ]; then
    echo "SKIP FD-classifier falls as a casdm run trains: a scalar build (SIMD=0); the SIMD build runs it"
elif ./casdm train-classifier --data "$dir/sq-idx3-ubyte" --labels "$dir/sq_labels_1" --out "$dir/sq_clf.safetensors" \
       --steps 60 --batch 16 --lr 3e-3 >"$dir/sq_clf.out" 2>"$dir/sq_clf.err" &&
   ./casdm train --data "$dir/sq-idx3-ubyte" --model casdm --ch 32 --res 1 --attn '' --mult 1,2 --T 1000 --dropout 0 \
       --batch 16 --lr 2e-3 --steps 400 --log-every 100 --sample-n 0 --eval-every 100 --eval-n 200 --sample-steps 10 \
       --eval-features "$dir/sq_clf.safetensors" --out "$dir/sq_run" 2>"$dir/sq_run.err" &&
   awk -F, '$1 == 100 { a = $8 } $1 == 400 { b = $8 } END { exit !(a > 0 && b > 0 && b < 0.8 * a) }' "$dir/sq_run/log.csv"; then
    pass "FD-classifier falls as a casdm run trains ($(awk -F, 'NR > 1 { printf "step %s %.1f; ", $1, $8 }' "$dir/sq_run/log.csv"))"
else
    fail "FD-classifier over a casdm run"; sed 's/^/  /' "$dir/sq_clf.err" "$dir/sq_run.err" "$dir/sq_run/log.csv"
fi

# build/lpips_test.safetensors holds the test weights test_unet wrote.
w=build/lpips_test.safetensors
d0=$(./casdm lpips tests/goldens/image.png tests/goldens/image.ppm --weights $w --size 32 2>"$dir/lp.err")
d1=$(./casdm lpips tests/goldens/image.png tests/goldens/image_grey.png --weights $w 2>>"$dir/lp.err")
if [ "$d0" = "0.000000" ] && awk -v d="$d1" 'BEGIN { exit !(d > 0.1) }'; then
    pass "casdm lpips: PNG and PPM of the same image at distance 0, colour vs grey at $d1"
else
    fail "casdm lpips: got '$d0' and '$d1'"; sed 's/^/  /' "$dir/lp.err"
fi
# training with LPIPS on one image: the LPIPS term falls
mkdir -p "$dir/one"
head -c 3073 "$dir/data_batch_1.bin" > "$dir/one/data_batch_1.bin"
./casdm train --data "$dir/one" --model casdm --lpips $w --lpips-size 32 --ch 32 --res 1 --attn 16 --batch 2 \
    --T 100 --steps 20 --lr 1e-3 --dropout 0 --log-every 5 --sample-n 0 --out "$dir/lp" 2>"$dir/lp.err"
first=$(sed -n 2p "$dir/lp/log.csv" | cut -d, -f6); last=$(tail -n 1 "$dir/lp/log.csv" | cut -d, -f6)
if [ -n "$first" ] && awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < 0.5 * a) }'; then
    pass "casdm training with --lpips: the LPIPS term falls on one image ($first -> $last in 20 steps)"
else
    fail "training with --lpips: LPIPS '$first' -> '$last'"; sed 's/^/  /' "$dir/lp.err"
fi

# --grad-clip clips theta and phi each by its own norm: with clipping always
# on (1e-3), theta's first update is bitwise the same with and without
# LPIPS (which reaches phi alone), while phi's differs
clipo="--model casdm --ch 32 --res 1 --attn 16 --batch 2 --T 100 --steps 1 --dropout 0 --grad-clip 1e-3 --sample-n 0"
./casdm train --data "$dir/one" $clipo --out "$dir/clip_a" 2>/dev/null
./casdm train --data "$dir/one" $clipo --lpips $w --lpips-size 32 --out "$dir/clip_b" 2>/dev/null
if build/check_files --same-tensor "$dir/clip_a/ckpt.safetensors" "$dir/clip_b/ckpt.safetensors" theta.out.2.weight &&
   build/check_files --same-tensor "$dir/clip_a/ckpt.safetensors" "$dir/clip_b/ckpt.safetensors" theta.input_blocks.0.0.weight &&
   ! build/check_files --same-tensor "$dir/clip_a/ckpt.safetensors" "$dir/clip_b/ckpt.safetensors" phi.out.2.weight 2>/dev/null; then
    pass "--grad-clip clips each network by its own norm: theta's update is the same with and without LPIPS, phi's is not"
else
    fail "--grad-clip: theta's update depends on the LPIPS term (or phi's does not)"
fi

# --ema-warmup off: the EMA rate itself from step 0 (at rate 1 the EMA keeps
# the initial weights bit for bit); on (the default), the warm-up moves it
emao="--model casdm --ch 32 --res 1 --attn 16 --batch 2 --T 100 --dropout 0 --sample-n 0"
./casdm train --data "$dir/one" $emao --steps 0 --out "$dir/ema0" 2>/dev/null
./casdm train --data "$dir/one" $emao --steps 1 --ema 1 --ema-warmup off --out "$dir/ema_off" 2>/dev/null
./casdm train --data "$dir/one" $emao --steps 1 --ema 1 --out "$dir/ema_on" 2>/dev/null
same_init() { build/check_files --same-tensor "$dir/$1/ckpt.safetensors" "$dir/ema0/ckpt.safetensors" \
    ema.theta.input_blocks.0.0.weight theta.input_blocks.0.0.weight 2>/dev/null; }
if same_init ema_off && ! same_init ema_on; then
    pass "--ema-warmup off uses the EMA rate itself from the first step; on warms it up"
else
    fail "--ema-warmup: the EMA after one step at rate 1 (off: the initial weights; on: moved)"
fi

# --preset cifar10-paper sets the paper's configuration as defaults, which
# flags beside it override (the checkpoint's metadata says what ran)
./casdm train --preset cifar10-paper --data "$dir/one" --ch 32 --res 1 --attn 16 --batch 2 --T 100 \
    --steps 1 --sample-n 0 --out "$dir/preset" 2>"$dir/preset.err"
meta=$(head -c 65536 "$dir/preset/ckpt.safetensors" | tr -d '\000')
ok=1
for kv in '"dropout":"0.300000012"' '"ema_warmup":"0"' '"noise_schedule":"cosine"' '"lr":"0.0001"' \
          '"model_channels":"32"' '"num_res_blocks":"1"' '"diffusion_steps":"100"' '"batch":"2"' '"num_heads":"4"'; do
    case "$meta" in *"$kv"*) ;; *) ok=0; echo "  missing $kv" ;; esac
done
if [ $ok -eq 1 ] && [ ! -e "$dir/preset/ckpt_000001.safetensors" ]; then
    pass "--preset cifar10-paper: dropout 0.3, cosine, lr 1e-4, EMA without warm-up; --ch/--res/--T/--batch given beside it win"
else
    fail "--preset cifar10-paper"; sed 's/^/  /' "$dir/preset.err" | tail -3
fi

# held-out losses: one CSV line per t of the grid plus the means
if ./casdm eval --ckpt "$dir/straight/ckpt.safetensors" --data "$dir/data_batch_1.bin" --n 6 --t-grid 4 > "$dir/eval.csv" 2>"$dir/eval.err" &&
   [ "$(wc -l < "$dir/eval.csv")" -eq 6 ] && grep -q '^mean,[0-9.]*,[0-9.]*$' "$dir/eval.csv"; then
    pass "casdm eval writes epsilon and x0 MSE per t and their means"
else
    fail "casdm eval"; sed 's/^/  /' "$dir/eval.err" "$dir/eval.csv"
fi
# progress: eval, sample and the training grid end with a line of images
# done, img/s and ETA (lines in a log; on a tty one line rewritten with \r)
if grep -q '^24/24 img, t = 87 (4 of 4) | [0-9.]* img/s | [0-9]*s elapsed, ETA 0s$' "$dir/eval.err" &&
   grep -q '^5/5 img, images 4-5 at step 4/4 | [0-9.]* img/s' "$dir/sample.err" &&
   grep -q '^4/4 img, images 1-4 at step 3/3 | ' "$dir/grids.err"; then
    pass "casdm eval, casdm sample and the training grid show images done, img/s and ETA"
else
    fail "progress lines"; sed 's/^/  /' "$dir/eval.err" "$dir/sample.err" "$dir/grids.err"
fi
if command -v script >/dev/null 2>&1; then
    script -qec "./casdm eval --ckpt $dir/straight/ckpt.safetensors --data $dir/data_batch_1.bin --n 6 --t-grid 4 >/dev/null" \
        /dev/null > "$dir/eval.tty" 2>&1
    if tr '\r' '\n' < "$dir/eval.tty" | grep -q '^24/24 img, t = 87 (4 of 4) | .*ETA 0s   $' &&
       [ "$(grep -c 'img/s' "$dir/eval.tty")" -eq 1 ]; then
        pass "on a tty the progress line is rewritten in place"
    else
        fail "progress on a tty"; cat -A "$dir/eval.tty" | sed 's/^/  /'
    fi
else
    echo "SKIP progress on a tty: no script(1)"
fi
# --time-limit stops a long run early and still writes the checkpoint (into a
# directory whose parents do not exist yet)
if ./casdm train --data "$dir" $small --steps 100000 --time-limit 1 --sample-n 0 --out "$dir/nested/tl" 2>"$dir/tl.err" &&
   grep -q "time limit reached" "$dir/tl.err" && [ -s "$dir/nested/tl/ckpt.safetensors" ] &&
   grep -q 'ETA [0-9]*s' "$dir/tl.err" &&
   grep -o 'ETA [0-9]*s' "$dir/tl.err" | tr -dc '0-9\n' | awk '$1 > 1 { bad = 1 } END { exit bad }'; then
    pass "casdm train --time-limit stops early with a checkpoint (ETA never past the limit)"
else
    fail "casdm train --time-limit"; sed 's/^/  /' "$dir/tl.err"
fi

# A folder of images loads the same pixels as the other formats: PPM files
# vs a CIFAR-10 file with the same images (no flips, the default), and PGM
# files with a zero border vs a 28x28 IDX file (both with --flip) give
# bitwise identical checkpoints.
pix='function p(i, c, y, x) { return (i * 37 + c * 11 + y * 5 + x * 3 + int(x * y / 7)) % 256 }'
mkdir -p "$dir/ppm" "$dir/pgm" "$dir/mixed" "$dir/empty"
awk "$pix"' BEGIN { for (i = 0; i < 4; i++) { printf "%c", i; for (c = 0; c < 3; c++) for (y = 0; y < 32; y++) for (x = 0; x < 32; x++) printf "%c", p(i, c, y, x) } }' > "$dir/four.bin"
for i in 0 1 2 3; do
    awk -v i=$i "$pix"' BEGIN { printf "P6\n# a comment\n32 32\n255\n"; for (y = 0; y < 32; y++) for (x = 0; x < 32; x++) for (c = 0; c < 3; c++) printf "%c", p(i, c, y, x) }' > "$dir/ppm/img$i.ppm"
    awk -v i=$i "$pix"' BEGIN { printf "P5 32 32 255\n"; for (y = 0; y < 32; y++) for (x = 0; x < 32; x++) printf "%c", (y < 2 || y >= 30 || x < 2 || x >= 30) ? 0 : p(i, 0, y - 2, x - 2) }' > "$dir/pgm/g$i.pgm"
done
awk "$pix"' BEGIN { printf "%c%c%c%c%c%c%c%c%c%c%c%c%c%c%c%c", 0, 0, 8, 3, 0, 0, 0, 4, 0, 0, 0, 28, 0, 0, 0, 28;
                    for (i = 0; i < 4; i++) for (y = 0; y < 28; y++) for (x = 0; x < 28; x++) printf "%c", p(i, 0, y, x) }' > "$dir/four-idx3-ubyte"
tiny="--model ddpm-eps --ch 32 --res 1 --mult 1,2 --batch 3 --T 100 --steps 2 --sample-n 0"
ok=1
./casdm train --data "$dir/ppm" $tiny --attn '' --out "$dir/f_ppm" 2>"$dir/folder.err" || ok=0
./casdm train --data "$dir/four.bin" $tiny --attn '' --out "$dir/f_bin" 2>>"$dir/folder.err" || ok=0
./casdm train --data "$dir/pgm" --flip $tiny --attn '' --out "$dir/f_pgm" 2>>"$dir/folder.err" || ok=0
./casdm train --data "$dir/four-idx3-ubyte" --flip $tiny --attn '' --out "$dir/f_idx" 2>>"$dir/folder.err" || ok=0
if [ $ok -eq 1 ] && cmp -s "$dir/f_ppm/ckpt.safetensors" "$dir/f_bin/ckpt.safetensors" &&
   cmp -s "$dir/f_pgm/ckpt.safetensors" "$dir/f_idx/ckpt.safetensors" &&
   ! cmp -s "$dir/f_ppm/ckpt.safetensors" "$dir/f_pgm/ckpt.safetensors"; then
    pass "a folder of PPM (PGM) images trains exactly as the same pixels in CIFAR (IDX) format"
else
    fail "image folder vs CIFAR / IDX"; sed 's/^/  /' "$dir/folder.err"
fi
./casdm train --data "$dir/four.bin" $tiny --no-flip --attn '' --out "$dir/f_nof" 2>/dev/null
./casdm train --data "$dir/four.bin" $tiny --flip --attn '' --out "$dir/f_fl" 2>/dev/null
if cmp -s "$dir/f_bin/ckpt.safetensors" "$dir/f_nof/ckpt.safetensors" &&
   ! cmp -s "$dir/f_bin/ckpt.safetensors" "$dir/f_fl/ckpt.safetensors"; then
    pass "CIFAR-10 data is not flipped unless --flip (improved-diffusion's loader)"
else
    fail "flip default: CIFAR-10 without flags should equal --no-flip and differ from --flip"
fi
cp "$dir/ppm/img0.ppm" "$dir/pgm/g0.pgm" "$dir/mixed/"

# casdm ae on the test autoencoder test_lddgan wrote (random weights, 3
# channels, f = 2, scale_factor 105): encode -> (24, 4, 16, 16) latents ->
# decode -> a valid samples .npz and grid; --scale 2 on both sides gives the
# same images as --scale 1 (powers of two are exact), the scale divides the
# latents (the /2 file decodes at scale 1 to other images), and --mode
# sample is reproducible by --seed
ae=build/ae_test.safetensors
if [ -f "$ae" ]; then
    if ./casdm ae encode "$dir/data_batch_1.bin" --weights "$ae" --out "$dir/lat1.npz" --scale 1 >/dev/null 2>"$dir/ae.err" &&
       ./casdm ae decode "$dir/lat1.npz" --weights "$ae" --out "$dir/dec1" --scale 1 >/dev/null 2>>"$dir/ae.err" &&
       ./casdm ae encode "$dir/data_batch_1.bin" --weights "$ae" --out "$dir/lat2.npz" --scale 2 >/dev/null 2>>"$dir/ae.err" &&
       ./casdm ae decode "$dir/lat2.npz" --weights "$ae" --out "$dir/dec2" --scale 2 >/dev/null 2>>"$dir/ae.err" &&
       ./casdm ae decode "$dir/lat2.npz" --weights "$ae" --out "$dir/dec2at1" --scale 1 >/dev/null 2>>"$dir/ae.err" &&
       build/check_files "$dir/dec1/samples_24x32x32x3.npz" 24 32 32 3 && build/check_files "$dir/dec1/grid.png" 172 172 3 &&
       cmp -s "$dir/dec1/samples_24x32x32x3.npz" "$dir/dec2/samples_24x32x32x3.npz" &&
       ! cmp -s "$dir/dec1/samples_24x32x32x3.npz" "$dir/dec2at1/samples_24x32x32x3.npz" &&
       ./casdm ae encode "$dir/data_batch_1.bin" --weights "$ae" --out "$dir/ls1.npz" --mode sample --seed 4 >/dev/null 2>>"$dir/ae.err" &&
       ./casdm ae encode "$dir/data_batch_1.bin" --weights "$ae" --out "$dir/ls2.npz" --mode sample --seed 4 >/dev/null 2>>"$dir/ae.err" &&
       ./casdm ae encode "$dir/data_batch_1.bin" --weights "$ae" --out "$dir/ls3.npz" --mode sample --seed 5 >/dev/null 2>>"$dir/ae.err" &&
       cmp -s "$dir/ls1.npz" "$dir/ls2.npz" && ! cmp -s "$dir/ls1.npz" "$dir/ls3.npz" &&
       grep -q '^24/24 img, encoding' "$dir/ae.err"; then
        pass "casdm ae encode / decode: latents, images, the scale factor, seeded posterior samples"
    else
        fail "casdm ae encode / decode"; sed 's/^/  /' "$dir/ae.err"
    fi
else
    echo "SKIP casdm ae: $ae not written (test_lddgan did not run)"
fi

# casdm train-ae on 1-channel 28x28 images (padded to 32): log.csv's columns
# (d_loss 0 while the GAN terms are off, the held-out L1 on the grid's row),
# the reconstruction grid, the plot's held-out panel, a measured
# scale_factor that casdm ae reads; a resumed run and a one-thread run give
# bitwise the same checkpoint as a straight one; Ctrl-C saves and exits 130
lw=build/lpips_test.safetensors
if [ -f "$lw" ]; then
    idx_set 24 9 > "$dir/ae-idx3-ubyte"
    aeo="--data $dir/ae-idx3-ubyte --lpips $lw --ch 32 --mult 1,2 --res 1 --attn 16 --z 2 --disc-ndf 8 --disc-layers 2 --batch 3 --disc-start 4 --log-every 2 --scale-n 16"
    if ./casdm train-ae $aeo --steps 8 --sample-every 4 --sample-n 4 --eval-data "$dir/ae-idx3-ubyte" --eval-n 8 \
           --out "$dir/ae_run" >"$dir/ae_run.out" 2>"$dir/ae_run.err" &&
       head -1 "$dir/ae_run/log.csv" | grep -q '^step,loss,l1,lpips,nll,kl,logvar,g_loss,d_weight,d_loss,logits_real,logits_fake,img_per_s,val_l1,val_lpips$' &&
       [ "$(grep -c '^[0-9]' "$dir/ae_run/log.csv")" -eq 4 ] &&
       awk -F, '$1 == 4 { exit !($10 == 0 && $14 > 0 && $15 > 0) }' "$dir/ae_run/log.csv" &&
       awk -F, '$1 == 6 { exit !($10 > 0 && $14 == "") }' "$dir/ae_run/log.csv" &&
       build/check_files "$dir/ae_run/recon_000004.png" 138 70 1 &&
       grep -q 'held-out L1' "$dir/ae_run/loss.svg" &&
       grep -q '^held-out L1 [0-9.]*, LPIPS [0-9.]* (8 images' "$dir/ae_run.out" &&
       grep -q 'latent scale: max |z|' "$dir/ae_run.err" &&
       ./casdm ae encode "$dir/ae-idx3-ubyte" --weights "$dir/ae_run/ckpt.safetensors" --out "$dir/ae_lat.npz" >/dev/null 2>&1; then
        pass "casdm train-ae: log.csv with every term, the GAN terms from --disc-start, held-out L1/LPIPS, grids, plot, a scale_factor casdm ae reads"
    else
        fail "casdm train-ae"; sed 's/^/  /' "$dir/ae_run.err" | tail -5; cat "$dir/ae_run/log.csv" 2>/dev/null | sed 's/^/  /'
    fi
    ./casdm train-ae $aeo --steps 8 --sample-n 0 --out "$dir/ae_a" 2>/dev/null
    ./casdm train-ae $aeo --steps 4 --sample-n 0 --out "$dir/ae_b" 2>/dev/null
    ./casdm train-ae $aeo --steps 8 --sample-n 0 --out "$dir/ae_b" --resume "$dir/ae_b" 2>/dev/null
    ./casdm --threads 1 train-ae $aeo --steps 8 --sample-n 0 --out "$dir/ae_c" 2>/dev/null
    if [ -s "$dir/ae_a/ckpt.safetensors" ] && cmp -s "$dir/ae_a/ckpt.safetensors" "$dir/ae_b/ckpt.safetensors" &&
       cmp -s "$dir/ae_a/ckpt.safetensors" "$dir/ae_c/ckpt.safetensors" &&
       [ "$(cut -d, -f1-12 "$dir/ae_a/log.csv")" = "$(cut -d, -f1-12 "$dir/ae_b/log.csv")" ]; then
        pass "casdm train-ae: 4 steps + --resume to 8 and a 1-thread run give bitwise the 8-step checkpoint (both Adams, the discriminator, RNG) and log"
    else
        fail "casdm train-ae --resume / threads: checkpoints or logs differ"
    fi
    # without LPIPS (--perceptual-weight 0, no --lpips): the lpips fields stay empty
    if ./casdm train-ae --data "$dir/ae-idx3-ubyte" --perceptual-weight 0 --ch 32 --mult 1,2 --res 1 --attn none --z 2 \
           --disc-ndf 8 --disc-layers 2 --batch 2 --steps 2 --log-every 1 --sample-n 0 --scale-n 4 \
           --eval-data "$dir/ae-idx3-ubyte" --eval-n 4 --out "$dir/ae_nolp" >"$dir/ae_nolp.out" 2>"$dir/ae_nolp.err" &&
       awk -F, 'NR > 1 { if ($4 != "" || $3 == "") bad = 1 } END { exit bad }' "$dir/ae_nolp/log.csv" &&
       grep -q '^held-out L1 [0-9.]* (4 images' "$dir/ae_nolp.out"; then
        pass "casdm train-ae --perceptual-weight 0 trains without LPIPS weights (L1, KL and GAN terms)"
    else fail "casdm train-ae --perceptual-weight 0"; sed 's/^/  /' "$dir/ae_nolp.err" | tail -3; fi
    ./casdm train-ae $aeo --steps 1000000 --log-every 1 --sample-n 0 --out "$dir/ae_int" 2>"$dir/ae_int.err" &
    pid=$!
    wait_for "$dir/ae_int/log.csv" '^2,' 60; kill -INT $pid; wait $pid; rc=$?
    if [ $rc -eq 130 ] && grep -q 'interrupted (SIGINT) at step' "$dir/ae_int.err" &&
       ./casdm train-ae $aeo --steps 8 --sample-n 0 --out "$dir/ae_int" --resume "$dir/ae_int" 2>"$dir/ae_int2.err" &&
       grep -q "resumed from $dir/ae_int/ckpt.safetensors at step [1-9]" "$dir/ae_int2.err"; then
        pass "casdm train-ae: Ctrl-C saves a resumable checkpoint and exits 130"
    else fail "casdm train-ae Ctrl-C (exit $rc)"; sed 's/^/  /' "$dir/ae_int.err" | tail -3; fi
else
    echo "SKIP casdm train-ae: $lw not written (test_unet did not run)"
fi

# casdm train --model lddgan on a tiny autoencoder's latents (2x16x16), 24
# images in epochs of 6 iterations (batch 4) with E 2: the log's epochs and
# Weighted Learning's alpha (1 - sigmoid(-6), then 1 - sigmoid(0) at epoch 1),
# R1 on the even steps only (--lazy-reg 2), the grid, plot and casdm sample
# on the checkpoint (grid, NPZ, the seconds per 100 images); 4 steps +
# --resume and a 1-thread run give bitwise the 8-step checkpoint; Ctrl-C saves
# and exits 130; --model ddgan in pixel space
idx_set 24 13 > "$dir/gan-idx3-ubyte"
if ./casdm train-ae --data "$dir/gan-idx3-ubyte" --perceptual-weight 0 --ch 32 --mult 1,2 --res 1 --attn none --z 2 \
       --disc-ndf 8 --disc-layers 2 --batch 2 --steps 2 --sample-n 0 --scale-n 8 --out "$dir/gan_ae" 2>"$dir/gan_ae.err" &&
   ./casdm train-ae --data "$dir/gan-idx3-ubyte" --perceptual-weight 0 --ch 32 --mult 1,2 --res 1 --attn none --z 2 \
       --disc-ndf 8 --disc-layers 2 --batch 2 --steps 2 --sample-n 0 --scale-n 8 --seed 1 --out "$dir/gan_ae2" 2>>"$dir/gan_ae.err"; then
    gno="--data $dir/gan-idx3-ubyte --nf 32 --ch-mult 1,2 --num-res-blocks 1 --nz 4 --z-emb-dim 16 --n-mlp 1 --ngf 8 --t-emb-dim 16 --batch 4 --epochs 2 --lazy-reg 2 --log-every 1"
    gao="--model lddgan --ae $dir/gan_ae/ckpt.safetensors $gno"
    if ./casdm train $gao --steps 8 --sample-n 4 --sample-every 4 --out "$dir/gan_run" 2>"$dir/gan_run.err" &&
       head -1 "$dir/gan_run/log.csv" | grep -q '^step,epoch,d_real,d_fake,r1,g_adv,rec,alpha,logit_real,logit_fake,img_per_s$' &&
       [ "$(grep -c '^[0-9]' "$dir/gan_run/log.csv")" -eq 8 ] &&
       awk -F, 'NR > 1 { odd = $1 % 2; if ((odd && $5 == "") || (!odd && $5 != "")) bad = 1;
                          e = ($1 <= 6) ? 0 : 1; a = e ? 0.5 : 0.997527;
                          if ($2 != e || ($8 - a) > 1e-6 || (a - $8) > 1e-6 || !($3 > 0 && $4 > 0 && $6 > 0 && $7 > 0)) bad = 1 }
                END { exit bad }' "$dir/gan_run/log.csv" &&
       build/check_files "$dir/gan_run/sample_000004.png" 70 70 1 && build/check_files "$dir/gan_run/sample_000008.png" 70 70 1 &&
       grep -q 'R1' "$dir/gan_run/loss.svg" &&
       ./casdm sample --ckpt "$dir/gan_run/ckpt.safetensors" --n 6 --batch 4 --out "$dir/gan_s" >/dev/null 2>"$dir/gan_s.err" &&
       build/check_files "$dir/gan_s/samples_6x32x32x1.npz" 6 32 32 1 &&
       grep -q '^6 images in [0-9.]*s: [0-9.]* s per 100 images' "$dir/gan_s.err" &&
       ./casdm sample --ckpt "$dir/gan_run/ckpt.safetensors" --n 6 --batch 4 --no-ema --out "$dir/gan_s_raw" >/dev/null 2>&1 &&
       ! cmp -s "$dir/gan_s/samples_6x32x32x1.npz" "$dir/gan_s_raw/samples_6x32x32x1.npz"; then
        pass "casdm train --model lddgan: log.csv by epoch (alpha 0.9975 then 0.5), R1 on every --lazy-reg 2 step, grids, plot; casdm sample: EMA and raw, NPZ, s per 100 images"
    else
        fail "casdm train --model lddgan"; sed 's/^/  /' "$dir/gan_run.err" "$dir/gan_s.err" 2>/dev/null | tail -6; sed 's/^/  /' "$dir/gan_run/log.csv" 2>/dev/null
    fi
    ./casdm train $gao --steps 8 --sample-n 0 --out "$dir/gan_a" 2>/dev/null
    ./casdm train $gao --steps 4 --sample-n 0 --out "$dir/gan_b" 2>/dev/null
    ./casdm train $gno --model lddgan --steps 8 --sample-n 0 --out "$dir/gan_b" --resume "$dir/gan_b" 2>"$dir/gan_b.err"
    ./casdm --threads 1 train $gao --steps 8 --sample-n 0 --out "$dir/gan_c" 2>/dev/null
    if [ -s "$dir/gan_a/ckpt.safetensors" ] && cmp -s "$dir/gan_a/ckpt.safetensors" "$dir/gan_b/ckpt.safetensors" &&
       cmp -s "$dir/gan_a/ckpt.safetensors" "$dir/gan_c/ckpt.safetensors" &&
       [ "$(cut -d, -f1-10 "$dir/gan_a/log.csv")" = "$(cut -d, -f1-10 "$dir/gan_b/log.csv")" ]; then
        pass "casdm train --model lddgan: 4 steps + --resume (the autoencoder found from the checkpoint) and a 1-thread run give bitwise the 8-step checkpoint and log"
    else
        fail "casdm train --model lddgan --resume / threads: checkpoints or logs differ"; sed 's/^/  /' "$dir/gan_b.err" | tail -3
    fi
    ./casdm train $gao --steps 1000000 --sample-n 0 --out "$dir/gan_int" 2>"$dir/gan_int.err" &
    pid=$!
    wait_for "$dir/gan_int/log.csv" '^2,' 60; kill -INT $pid; wait $pid; rc=$?
    if [ $rc -eq 130 ] && grep -q 'interrupted (SIGINT) at step' "$dir/gan_int.err" &&
       ./casdm train $gao --steps 1000000 --time-limit 0.01 --sample-n 0 --out "$dir/gan_int" --resume "$dir/gan_int" 2>"$dir/gan_int2.err" &&
       grep -q "resumed from $dir/gan_int/ckpt.safetensors at step [1-9]" "$dir/gan_int2.err"; then
        pass "casdm train --model lddgan: Ctrl-C saves a resumable checkpoint and exits 130"
    else fail "casdm train --model lddgan Ctrl-C (exit $rc)"; sed 's/^/  /' "$dir/gan_int.err" | tail -3; fi
    if ./casdm train --model ddgan $gno --steps 2 --sample-n 4 --out "$dir/ddgan" 2>"$dir/ddgan.err" &&
       grep -q 'pixels 1x32x32' "$dir/ddgan.err" && grep -q 'rec loss none' "$dir/ddgan.err" &&
       awk -F, 'NR > 1 && $8 != 0 { bad = 1 } END { exit bad }' "$dir/ddgan/log.csv" &&
       ./casdm sample --ckpt "$dir/ddgan/ckpt.safetensors" --n 2 --out "$dir/ddgan_s" >/dev/null 2>&1 &&
       build/check_files "$dir/ddgan_s/samples_2x32x32x1.npz" 2 32 32 1; then
        pass "casdm train --model ddgan: pixel space, no reconstruction term; casdm sample on it"
    else fail "casdm train --model ddgan"; sed 's/^/  /' "$dir/ddgan.err" | tail -3; fi
    gan_ok=1
else
    fail "casdm train-ae for the GAN tests"; sed 's/^/  /' "$dir/gan_ae.err" | tail -3
    gan_ok=0
fi

# expect STATUS NEEDLE CMD...: the command fails with STATUS and says NEEDLE
expect() {
    want=$1; needle=$2; shift 2
    "$@" >"$dir/out" 2>"$dir/err"; rc=$?
    if [ "$rc" -eq "$want" ] && grep -q -- "$needle" "$dir/err"; then
        pass "rejects: $*"
    else
        fail "$* (status $rc, want $want; message should contain '$needle')"; sed 's/^/  /' "$dir/err"
    fi
}
expect 2 "unknown option '--bogus'" ./casdm train --data "$dir" --bogus
expect 2 "--preset 'cifar100' is not cifar10-paper" ./casdm train --data "$dir/one" --preset cifar100 --steps 1
expect 2 "--ema-warmup 'maybe' is not on or off" ./casdm train --data "$dir/one" $emao --ema-warmup maybe --steps 1 --out "$dir/x"
expect 2 "--steps expects an integer" ./casdm train --data "$dir" --steps ten
expect 2 "--lr expects a number" ./casdm train --data "$dir" --lr -1
expect 2 "--data is required" ./casdm train
expect 2 "--model 'ddpm'" ./casdm train --data "$dir" --model ddpm
expect 2 "--attn '7'" ./casdm train --data "$dir" --attn 7
expect 2 "unknown command" ./casdm frobnicate
expect 2 "--threads expects" ./casdm --threads 0 info
expect 2 "--precision expects fp32 or bf16, got 'fp16'" ./casdm train --data "$dir" --precision fp16
expect 2 "--precision expects fp32 or bf16, got 'half'" ./casdm --precision half info
expect 2 "--precision needs a value" ./casdm sample --precision
head -c 5000 "$dir/data_batch_1.bin" > "$dir/short.bin"
expect 1 "short.bin' is not a CIFAR-10 binary batch" ./casdm train --data "$dir/short.bin"
expect 1 "no_such_dir" ./casdm train --data "$dir/no_such_dir"
printf 'garbage-garbage-garbage' > "$dir/bad-idx3-ubyte"
expect 1 "bad-idx3-ubyte' is not an IDX image file" ./casdm train --data "$dir/bad-idx3-ubyte"
mkdir -p "$dir/trunc"
size=$(wc -c < "$dir/half/ckpt.safetensors")
head -c $((size - 100)) "$dir/half/ckpt.safetensors" > "$dir/trunc/ckpt.safetensors"
expect 1 "trunc/ckpt.safetensors: truncated" ./casdm train --data "$dir" $opts --steps 6 --out "$dir/t2" --resume "$dir/trunc"
expect 1 "lacks tensor 'theta.time_embed.0.weight'\|another shape" \
    ./casdm train --data "$dir" --model casdm --ch 64 --res 1 --attn 16 --T 100 --steps 6 --sample-n 0 --out "$dir/t3" --resume "$dir/half"
expect 1 "holds a casdm model, not dual" ./casdm train --data "$dir" --model dual $small --steps 6 --out "$dir/t4" --resume "$dir/half"
# what defines the loss is recorded and may not change on --resume; the
# learning rate may, with a notice
expect 1 "was trained with --lambda-eps 1; this run asks for 2" ./casdm train --data "$dir" $opts --lambda-eps 2 --steps 6 --out "$dir/t5" --resume "$dir/half"
expect 1 "was trained with --p2-gamma 1; this run asks for 0" ./casdm train --data "$dir" --model casdm $small --dropout 0.1 --steps 6 --out "$dir/t6" --resume "$dir/half"
expect 1 "was trained with --lpips-weight 0.1; this run asks for 0.5" ./casdm train --data "$dir" $opts --lpips-weight 0.5 --steps 6 --out "$dir/t7" --resume "$dir/half"
if ./casdm train --data "$dir" $opts --lr 2e-4 --steps 3 --out "$dir/t8" --resume "$dir/half" 2>"$dir/t8.err" &&
   grep -q "note: --resume: --lr was 0.0001, now 0.0002" "$dir/t8.err"; then
    pass "--resume with another --lr goes on with a notice"
else
    fail "--resume with another --lr"; sed 's/^/  /' "$dir/t8.err" | tail -3
fi
expect 2 "--method 'euler'" ./casdm sample --ckpt "$dir/half/ckpt.safetensors" --method euler
expect 2 "--sigma 'medium' is not large or small" ./casdm sample --ckpt "$dir/half/ckpt.safetensors" --method ddpm --sigma medium
expect 2 "--steps '500'" ./casdm sample --ckpt "$dir/half/ckpt.safetensors" --steps 500
expect 1 "trunc/ckpt.safetensors: truncated" ./casdm sample --ckpt "$dir/trunc/ckpt.safetensors"
expect 1 "cannot open" ./casdm lpips tests/goldens/image.png tests/goldens/image.ppm --weights "$dir/none.safetensors"
expect 1 "must have the same size" ./casdm lpips tests/goldens/image.png "$dir/samples/grid.png" --weights $w
expect 1 "neither a PNG nor" ./casdm lpips tests/goldens/image.png tests/test_cli.sh --weights $w
expect 1 "--lpips: " ./casdm train --data "$dir" --lpips "$dir/data_batch_1.bin" --steps 1
expect 2 "needs two images" ./casdm lpips tests/goldens/image.png --weights $w
# a valid IDX file of two 28x28 grey images (padded to 32x32): the wrong channels for the model
awk 'BEGIN { printf "%c%c%c%c%c%c%c%c%c%c%c%c%c%c%c%c", 0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28;
             for (i = 0; i < 2 * 784; i++) printf "%c", i % 256 }' > "$dir/grey-idx3-ubyte"
expect 1 "has 1x32x32 images; the model takes 3x32x32" ./casdm eval --ckpt "$dir/straight/ckpt.safetensors" --data "$dir/grey-idx3-ubyte"
if [ -f "$ae" ]; then
    expect 1 "has 1-channel images; the autoencoder takes 3" ./casdm ae encode "$dir/grey-idx3-ubyte" --weights "$ae" --out "$dir/x.npz"
    expect 1 "--weights is required" ./casdm ae encode "$dir" --out "$dir/x.npz"
    expect 1 "want casdm-autoencoder-1" ./casdm ae encode "$dir" --weights "$dir/straight/ckpt.safetensors" --out "$dir/x.npz"
    expect 1 "no tensor 'post_quant_conv.bias'" ./casdm ae encode "$dir" --weights build/ae_missing.safetensors --out "$dir/x.npz"
    expect 2 "--mode is mean or sample" ./casdm ae encode "$dir" --weights "$ae" --out "$dir/x.npz" --mode mode
    expect 1 "latents" ./casdm ae decode build/fid_stats_a.npz --weights "$ae" --out "$dir/x"
    expect 2 "encode IMAGES or decode" ./casdm ae squash "$dir"
fi
if [ -f "$lw" ]; then
    expect 2 "--data and --lpips are required" ./casdm train-ae --data "$dir/ae-idx3-ubyte"
    expect 1 "--config 'cifar100'" ./casdm train-ae $aeo --config cifar100 --steps 1 --out "$dir/x"
    expect 1 "--config cifar10 fixes the architecture" ./casdm train-ae --data "$dir/ae-idx3-ubyte" --lpips $lw --config cifar10 --ch 64 --out "$dir/x"
    expect 1 "--mult '1,,2'" ./casdm train-ae $aeo --mult 1,,2 --out "$dir/x"
    expect 1 "GroupNorm" ./casdm train-ae $aeo --ch 48 --out "$dir/x"
    expect 1 "--disc-layers 6: 32x32 images are too small" ./casdm train-ae $aeo --disc-layers 6 --out "$dir/x"
    expect 1 "was trained with --kl-weight 1e-06; this run asks for 0.001" ./casdm train-ae $aeo --kl-weight 1e-3 --steps 9 --out "$dir/x" --resume "$dir/ae_a"
    expect 1 "another architecture" ./casdm train-ae $aeo --ch 64 --steps 9 --out "$dir/x" --resume "$dir/ae_a"
    mkdir -p "$dir/ae_w" && cp "$ae" "$dir/ae_w/ckpt.safetensors"
    expect 1 "not a casdm train-ae checkpoint" ./casdm train-ae $aeo --steps 9 --out "$dir/x" --resume "$dir/ae_w"
    expect 1 "--lpips: .*cannot open" ./casdm train-ae $aeo --lpips "$dir/none.safetensors" --out "$dir/x"
fi
if [ "$gan_ok" -eq 1 ]; then
    expect 1 "--model lddgan needs --ae FILE" ./casdm train --model lddgan $gno --out "$dir/x"
    expect 1 "--ae is for --model lddgan" ./casdm train --model ddgan --ae "$dir/gan_ae/ckpt.safetensors" $gno --out "$dir/x"
    expect 1 "want casdm-autoencoder-1" ./casdm train --model lddgan --ae "$dir/gan_a/ckpt.safetensors" $gno --out "$dir/x"
    expect 1 "is not the autoencoder" ./casdm train --model lddgan --ae "$dir/gan_ae2/ckpt.safetensors" $gno --steps 9 --out "$dir/x" --resume "$dir/gan_a"
    expect 1 "was trained with --T 4; this run asks for --T 3" ./casdm train $gao --T 3 --steps 9 --out "$dir/x" --resume "$dir/gan_a"
    expect 1 "was trained with --lazy-reg 2; this run asks for 3" ./casdm train $gao --lazy-reg 3 --steps 9 --out "$dir/x" --resume "$dir/gan_a"
    expect 1 "another architecture" ./casdm train $gao --nf 64 --steps 9 --out "$dir/x" --resume "$dir/gan_a"
    expect 1 "is a --model lddgan run" ./casdm train --model ddgan $gno --steps 9 --out "$dir/x" --resume "$dir/gan_a"
    expect 1 "fewer than one batch" ./casdm train $gao --batch 25 --out "$dir/x"
    expect 1 "for weights and optimiser state alone" ./casdm train $gao --nf 4096 --ch-mult 4,4 --out "$dir/x"
    expect 1 "--rec-loss 'l2' is not sigmoid or none" ./casdm train $gao --rec-loss l2 --out "$dir/x"
    expect 1 "does not halve" ./casdm train $gao --ch-mult 1,2,2,2,2,2 --out "$dir/x"
    expect 1 "leave them out" ./casdm sample --ckpt "$dir/gan_a/ckpt.safetensors" --steps 10 --out "$dir/x"
    expect 1 "is not the autoencoder" ./casdm sample --ckpt "$dir/gan_a/ckpt.safetensors" --ae "$dir/gan_ae2/ckpt.safetensors" --out "$dir/x"
    expect 1 "are for LDDGAN checkpoints" ./casdm sample --ckpt "$dir/straight/ckpt.safetensors" --ae "$dir/gan_ae/ckpt.safetensors" --out "$dir/x"
fi
expect 1 "all images must match" ./casdm train --data "$dir/mixed" --steps 1
expect 1 "no .png/.ppm/.pgm images" ./casdm train --data "$dir/empty" --steps 1
expect 2 "--flip and --no-flip" ./casdm train --data "$dir/ppm" --flip --no-flip --steps 1

# ---------------------------------------------------------------------------
# Hostile files (each case crashed, hung, allocated gigabytes or exited 0
# before formats.c and the checks of casdm.c; make asan runs them under
# ASan and UBSan, where the undefined-behaviour cases also failed)
# ---------------------------------------------------------------------------
cf=build/check_files
mkdir -p "$dir/h_eof" "$dir/h_digits" "$dir/h_bomb" "$dir/h_idat"
printf 'P6 2000 2000 255' > "$dir/h_eof/a.ppm"       # the header ends at the end of the file
expect 1 "a.ppm': truncated PNM data" ./casdm train --data "$dir/h_eof" --steps 1
printf 'P6 99999999999999999999999 1 255\n' > "$dir/h_digits/a.ppm"  # signed overflow while parsing
expect 1 "a.ppm': PNM header number too large" ./casdm train --data "$dir/h_digits" --steps 1
$cf --craft png-bomb "$dir/h_bomb/a.png"             # 1x1, inflates to 1 MiB: stopped at 2 bytes
expect 1 "a.png': PNG image data longer than its 1x1 size" ./casdm train --data "$dir/h_bomb" --steps 1
# an empty IDAT chunk and an empty stored block are valid PNG: same pixels as the PGM twin
$cf --craft png-empty-idat "$dir/h_idat/a.png"
printf 'P5 2 2 255\n\012\024\036\050' > "$dir/h_idat/a.pgm"
d=$(./casdm lpips "$dir/h_idat/a.png" "$dir/h_idat/a.pgm" --weights $w --size 16 2>"$dir/err")
if [ "$d" = "0.000000" ]; then pass "a PNG with an empty IDAT chunk and an empty stored block decodes (distance 0 to its PGM twin)"
else fail "PNG with empty IDAT: '$d'"; sed 's/^/  /' "$dir/err"; fi
# IDX: 1x4096 images were padded to 4096x4096 (2.2 GB a step)
awk 'BEGIN { printf "%c%c%c%c%c%c%c%c%c%c%c%c%c%c%c%c", 0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 16, 0;
             for (i = 0; i < 4096; i++) printf "%c", i % 256 }' > "$dir/wide-idx3-ubyte"
expect 1 "images are 1x4096; square images" ./casdm train --data "$dir/wide-idx3-ubyte" --steps 1
# a directory where a file is expected is named as one
expect 1 "is a directory, not a file" ./casdm sample --ckpt "$dir/half"
expect 1 "is a directory, not a file" ./casdm train --data "$dir" --lpips "$dir/half" --steps 1
mkdir -p "$dir/dir.bin"
expect 1 "dir.bin.*no .png/.ppm/.pgm images" ./casdm train --data "$dir/dir.bin" --steps 1
# --steps 4294967296 wrapped to 0 steps: noise written, exit 0
expect 2 "--steps '4294967296'" ./casdm sample --ckpt "$dir/half/ckpt.safetensors" --steps 4294967296 --out "$dir/wrap"
expect 2 "--steps '10,4294967296'" ./casdm sample --ckpt "$dir/half/ckpt.safetensors" --steps 10,4294967296 --out "$dir/wrap"
# a long --steps was cut to 63 characters without a word (found by make fuzz)
expect 2 "--steps '0*5,x'" ./casdm sample --ckpt "$dir/half/ckpt.safetensors" --steps "$(printf '%062d' 0)5,x" --out "$dir/wrap"
# a step's memory is estimated before anything is allocated
expect 2 "needs ~[0-9.]* GB (parameters.*the machine has" ./casdm train --data "$dir" --batch 4096 --ch 1024 --steps 1
# loss plot: a step near LONG_MAX was a signed overflow (such rows are not data)
printf 'step,loss,l_eps,l_x0,l_mu,l_lpips,img_per_s\n9223372036854775807,0.5,0.5,,,,1\n' > "$dir/huge.csv"
expect 1 "has no rows" ./casdm plot --out "$dir/huge.svg" "$dir/huge.csv"
printf '0,0.5,0.5,,,,1\n999999999,0.25,0.25,,,,1\n9223372036854775807,0.5,0.5,,,,1\n' > "$dir/far.csv"
if ./casdm plot --out "$dir/far.svg" "$dir/far.csv" 2>"$dir/err" && grep -q '>999999999</text>' "$dir/far.svg"; then
    pass "casdm plot draws steps up to 10^9 and skips rows past it"
else fail "casdm plot with far steps"; sed 's/^/  /' "$dir/err"; fi

# Damaged checkpoint metadata: each value is checked before anything is
# allocated from it (image_size 0 was a SIGFPE; model_channels 4096 zeroed
# 11.8 GB; 4294967328 was read as 32; rng 0/0 hung; step -5 gave NaN)
ck="$dir/half/ckpt.safetensors"
meta() { $cf --set-meta "$ck" "$dir/m.safetensors" "$1" "$2"; }
meta image_size 0;             expect 1 "image_size' = '0' is not an integer in 1..4096" ./casdm sample --ckpt "$dir/m.safetensors"
meta in_channels 0;            expect 1 "in_channels' = '0'" ./casdm sample --ckpt "$dir/m.safetensors"
meta model_channels 4096;      expect 1 "describes [0-9]* parameters under 'ema.theta.', the file holds" ./casdm sample --ckpt "$dir/m.safetensors"
meta model_channels 4294967328; expect 1 "model_channels' = '4294967328' is not an integer" ./casdm sample --ckpt "$dir/m.safetensors"
meta diffusion_steps 2000000000; expect 1 "diffusion_steps' = '2000000000' is not an integer in 1..100000" ./casdm sample --ckpt "$dir/m.safetensors"
meta num_heads 3;              expect 1 "channels do not split into 3 attention heads" ./casdm sample --ckpt "$dir/m.safetensors"
meta channel_mult 1,2,2,2,2,2,2; expect 1 "image_size does not halve once per level" ./casdm sample --ckpt "$dir/m.safetensors"
# a 4096x4096 model in a small file: the sampler's memory is estimated first
meta image_size 4096; $cf --set-meta "$dir/m.safetensors" "$dir/m4k.safetensors" attention_resolutions 2048
expect 2 "casdm sample with this --batch needs ~[0-9.]* GB" ./casdm sample --ckpt "$dir/m4k.safetensors" --n 16 --out "$dir/big"
mkdir -p "$dir/bad_state"
for kv in "step -5:step' = '-5' is not an integer in 0..1000000000" "step abc:step' = 'abc' is not an integer" \
          "adam_step 9:adam_step' = '9' is not an integer in 0..4" "rng_state xyz:rng_state' = 'xyz' is not 16 hex digits" \
          "rng_inc 0000000000000000:rng_inc 0000000000000000 is even"; do
    set -- ${kv%%:*}
    $cf --set-meta "$ck" "$dir/bad_state/ckpt.safetensors" "$1" "$2"
    expect 1 "${kv#*:}" ./casdm train --data "$dir" $opts --steps 6 --out "$dir/r2" --resume "$dir/bad_state"
done
# NaN weights: refused at load (they reached the float -> uint8 conversion,
# undefined behaviour, and casdm sample exited 0 with a garbage grid)
$cf --set-floats "$ck" "$dir/m.safetensors" ema.theta.out.2.bias nan
expect 1 "tensor 'ema.theta.out.2.bias' holds NaN or Inf" ./casdm sample --ckpt "$dir/m.safetensors" --out "$dir/nan"
# finite weights whose samples are not finite: nothing written, exit 1
$cf --set-floats "$ck" "$dir/m.safetensors" ema.theta.out.0.weight 3e38
expect 1 "gives NaN or Inf pixels" ./casdm sample --ckpt "$dir/m.safetensors" --n 2 --steps 2 --out "$dir/nanpix"
[ -e "$dir/nanpix/grid.png" ] && fail "a grid was written from NaN samples"

# ---------------------------------------------------------------------------
# Interrupted and failing runs
# ---------------------------------------------------------------------------
long="--model casdm --ch 32 --res 1 --attn 16 --batch 2 --T 100 --log-every 1 --sample-n 0 --steps 1000000"

# two Ctrl-C's in a row save once (signal() under -std=c99 is one-shot: the
# second one killed the run); SIGTERM saves too
./casdm train --data "$dir" $long --out "$dir/int2" 2>"$dir/int2.err" &
pid=$!
wait_for "$dir/int2/log.csv" '^2,' 60; kill -INT $pid; kill -INT $pid; wait $pid; rc=$?
if [ $rc -eq 130 ] && [ "$(grep -c 'interrupted (SIGINT) at step' "$dir/int2.err")" -eq 1 ] &&
   ./casdm sample --ckpt "$dir/int2/ckpt.safetensors" --n 1 --steps 2 --out "$dir/int2s" >/dev/null 2>&1; then
    pass "two Ctrl-C's: one save, a loadable checkpoint, exit 130"
else fail "two Ctrl-C's (exit $rc)"; sed 's/^/  /' "$dir/int2.err" | tail -3; fi
./casdm train --data "$dir" $long --out "$dir/term" 2>"$dir/term.err" &
pid=$!
wait_for "$dir/term/log.csv" '^2,' 60; kill -TERM $pid; wait $pid; rc=$?
if [ $rc -eq 143 ] && grep -q 'interrupted (SIGTERM) at step' "$dir/term.err" && [ -s "$dir/term/ckpt.safetensors" ]; then
    pass "SIGTERM saves a checkpoint and exits 143"
else fail "SIGTERM (exit $rc)"; sed 's/^/  /' "$dir/term.err" | tail -3; fi

# Ctrl-C during the end-of-training sample grid and during casdm sample:
# out within a second or two, no grid written (small batches: a step is a
# few milliseconds, so the bound holds on a loaded machine too)
./casdm train --data "$dir" --model casdm --ch 32 --res 1 --attn 16 --batch 2 --T 1000 --steps 1 \
    --sample-n 2 --sample-steps 1000 --out "$dir/grid_int" 2>"$dir/grid_int.err" &
pid=$!
wait_for "$dir/grid_int.err" 'done at step 1' 60; sleep 0.3; t0=$(now); kill -INT $pid; wait $pid; rc=$?; t1=$(now)
if [ $rc -eq 130 ] && awk -v a="$t0" -v b="$t1" 'BEGIN { exit !(b - a < 2) }' && [ ! -e "$dir/grid_int/samples_000001.png" ]; then
    pass "Ctrl-C during the final sample grid stops within 2 s ($(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') s), no grid"
else fail "Ctrl-C during a sample grid (exit $rc)"; sed 's/^/  /' "$dir/grid_int.err" | tail -3; fi
./casdm sample --ckpt "$dir/grid_int/ckpt.safetensors" --n 64 --batch 1 --steps 1000 --out "$dir/sample_int" >/dev/null 2>"$dir/sample_int.err" &
pid=$!
wait_for "$dir/sample_int.err" 'img, images' 60; t0=$(now); kill -INT $pid; wait $pid; rc=$?; t1=$(now)
if [ $rc -eq 130 ] && awk -v a="$t0" -v b="$t1" 'BEGIN { exit !(b - a < 2) }' && [ ! -e "$dir/sample_int/grid.png" ] &&
   grep -q 'interrupted.*nothing written' "$dir/sample_int.err"; then
    pass "Ctrl-C during casdm sample stops within 2 s, nothing written"
else fail "Ctrl-C during casdm sample (exit $rc)"; sed 's/^/  /' "$dir/sample_int.err" | tail -3; fi

# kill -9 while a checkpoint is being written: the previous one stays whole
# (temp file, fsync, rename); a larger model so the write takes a while
big="--model casdm --ch 64 --res 1 --attn 16 --batch 1 --T 100 --sample-n 0 --log-every 1"
./casdm train --data "$dir" $big --steps 1 --out "$dir/k9" 2>/dev/null
cp "$dir/k9/ckpt.safetensors" "$dir/k9_ref.safetensors"
./casdm train --data "$dir" $big --steps 2 --out "$dir/k9" --resume "$dir/k9" 2>/dev/null &
pid=$!
while [ ! -e "$dir/k9/ckpt.safetensors.tmp" ] && kill -0 $pid 2>/dev/null; do :; done
kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null; rc=$?
if [ $rc -eq 137 ] && [ -e "$dir/k9/ckpt.safetensors.tmp" ] && cmp -s "$dir/k9/ckpt.safetensors" "$dir/k9_ref.safetensors" &&
   ./casdm train --data "$dir" $big --steps 2 --out "$dir/k9" --resume "$dir/k9" 2>"$dir/k9.err" &&
   [ ! -e "$dir/k9/ckpt.safetensors.tmp" ]; then
    pass "kill -9 during a checkpoint write leaves the previous checkpoint whole and resumable"
else fail "kill -9 during a checkpoint write (exit $rc)"; sed 's/^/  /' "$dir/k9.err" 2>/dev/null | tail -3; fi

# a non-finite update: stop before it is applied (grad-inf) or refuse to
# save it (param-nan); the previous checkpoint stays as it was
./casdm train --data "$dir" $opts --steps 2 --out "$dir/nan" 2>/dev/null
cp "$dir/nan/ckpt.safetensors" "$dir/nan_ref.safetensors"
CASDM_TEST_FAULT=grad-inf:3 ./casdm train --data "$dir" $opts --steps 6 --ckpt-every 1 --out "$dir/nan" --resume "$dir/nan" 2>"$dir/nan.err"; rc=$?
if [ $rc -eq 1 ] && grep -q 'gradient norm of theta is inf at step 3: stopping.*(step 2) is untouched' "$dir/nan.err" &&
   cmp -s "$dir/nan/ckpt.safetensors" "$dir/nan_ref.safetensors"; then
    pass "an Inf gradient stops the run before Adam; the step-2 checkpoint is untouched"
else fail "Inf gradient (exit $rc)"; sed 's/^/  /' "$dir/nan.err" | tail -3; fi
CASDM_TEST_FAULT=param-nan:3 ./casdm train --data "$dir" $opts --steps 6 --ckpt-every 1 --out "$dir/nan" --resume "$dir/nan" 2>"$dir/nan.err"; rc=$?
if [ $rc -eq 1 ] && grep -q "not saving step 3: 'theta' holds NaN.*(step 2) is untouched" "$dir/nan.err" &&
   cmp -s "$dir/nan/ckpt.safetensors" "$dir/nan_ref.safetensors"; then
    pass "a NaN weight is never saved over a good checkpoint"
else fail "NaN weight save (exit $rc)"; sed 's/^/  /' "$dir/nan.err" | tail -3; fi

# after a hard kill between checkpoints, log.csv holds rows past the
# checkpoint's step; resuming in place drops them (the plot zig-zagged)
./casdm train --data "$dir" $opts --steps 4 --out "$dir/zig" 2>/dev/null
for s in 5 6 7; do echo "$s,9,9,9,9,,1" >> "$dir/zig/log.csv"; done
./casdm train --data "$dir" $opts --steps 6 --out "$dir/zig" --resume "$dir/zig" 2>/dev/null
if [ "$(cut -d, -f1 "$dir/zig/log.csv" | tr '\n' ' ')" = "step 1 2 3 4 5 6 " ] && ! grep -q ',9,9,9,9,' "$dir/zig/log.csv"; then
    pass "resuming in place truncates log.csv to the checkpoint's step"
else fail "log.csv after resume in place:"; sed 's/^/  /' "$dir/zig/log.csv"; fi
# a write that fails (here: a file size limit, as a full disk) stops the run
# with the file named; the last checkpoint stays
if (trap '' XFSZ; ulimit -f 1; ./casdm train --data "$dir" $opts --steps 12 --out "$dir/zig" --resume "$dir/zig" 2>"$dir/fsz.err"); then
    fail "a run under ulimit -f 1 exited 0"
elif grep -q "cannot write '$dir/zig/[a-z.]*': File too large" "$dir/fsz.err" &&
     ./casdm sample --ckpt "$dir/zig/ckpt.safetensors" --n 1 --steps 2 --out "$dir/zig_s" >/dev/null 2>&1; then
    pass "a failed write (file size limit) names the file and exits 1; the checkpoint stays loadable"
else fail "failed write"; sed 's/^/  /' "$dir/fsz.err" | tail -3; fi

[ "$fails" -eq 0 ]
