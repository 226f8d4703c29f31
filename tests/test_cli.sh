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
# and the thread count does not change the result
./casdm --threads 1 train --data "$dir" $opts --steps 4 --out "$dir/one" 2>/dev/null
if cmp -s "$dir/straight/ckpt.safetensors" "$dir/one/ckpt.safetensors"; then
    pass "training with 1 and 2 threads gives bitwise identical checkpoints"
else
    fail "training with 1 and 2 threads differs"
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

# held-out losses: one CSV line per t of the grid plus the means
if ./casdm eval --ckpt "$dir/straight/ckpt.safetensors" --data "$dir/data_batch_1.bin" --n 6 --t-grid 4 > "$dir/eval.csv" 2>"$dir/eval.err" &&
   [ "$(wc -l < "$dir/eval.csv")" -eq 6 ] && grep -q '^mean,[0-9.]*,[0-9.]*$' "$dir/eval.csv"; then
    pass "casdm eval writes epsilon and x0 MSE per t and their means"
else
    fail "casdm eval"; sed 's/^/  /' "$dir/eval.err" "$dir/eval.csv"
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
# vs a CIFAR-10 file with the same images (both flip by default), and PGM
# files with a zero border vs a 28x28 IDX file (--flip there) give
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
./casdm train --data "$dir/pgm" $tiny --attn '' --out "$dir/f_pgm" 2>>"$dir/folder.err" || ok=0
./casdm train --data "$dir/four-idx3-ubyte" --flip $tiny --attn '' --out "$dir/f_idx" 2>>"$dir/folder.err" || ok=0
if [ $ok -eq 1 ] && cmp -s "$dir/f_ppm/ckpt.safetensors" "$dir/f_bin/ckpt.safetensors" &&
   cmp -s "$dir/f_pgm/ckpt.safetensors" "$dir/f_idx/ckpt.safetensors" &&
   ! cmp -s "$dir/f_ppm/ckpt.safetensors" "$dir/f_pgm/ckpt.safetensors"; then
    pass "a folder of PPM (PGM) images trains exactly as the same pixels in CIFAR (IDX) format"
else
    fail "image folder vs CIFAR / IDX"; sed 's/^/  /' "$dir/folder.err"
fi
cp "$dir/ppm/img0.ppm" "$dir/pgm/g0.pgm" "$dir/mixed/"

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
expect 2 "--steps expects an integer" ./casdm train --data "$dir" --steps ten
expect 2 "--lr expects a number" ./casdm train --data "$dir" --lr -1
expect 2 "--data is required" ./casdm train
expect 2 "--model 'ddpm'" ./casdm train --data "$dir" --model ddpm
expect 2 "--attn '7'" ./casdm train --data "$dir" --attn 7
expect 2 "unknown command" ./casdm frobnicate
expect 2 "--threads expects" ./casdm --threads 0 info
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
expect 2 "--method 'euler'" ./casdm sample --ckpt "$dir/half/ckpt.safetensors" --method euler
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
expect 1 "all images must match" ./casdm train --data "$dir/mixed" --steps 1
expect 1 "no .png/.ppm/.pgm images" ./casdm train --data "$dir/empty" --steps 1
expect 2 "--flip and --no-flip" ./casdm train --data "$dir/ppm" --flip --no-flip --steps 1
[ "$fails" -eq 0 ]
