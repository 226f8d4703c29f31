#!/bin/sh
# test_mpi.sh: data-parallel training over MPI (README, "Training on several
# machines"), with the MPI build build/mpi/casdm under
# `mpirun --oversubscribe -np 2` (OpenMPI): two ranks with --batch B are
# bitwise the run of one process with --microbatch B/2 and, to float
# rounding, the run of one process with batch B; a run resumes across a
# change of the rank count; a rank that dies or hangs stops the others with
# a message instead of a hang; a signal to one rank stops all after the
# same step; casdm sample and casdm fid split their images. The default
# build has no MPI in it. SKIP lines where MPI is not installed.
export LC_ALL=C
dir=build/mpi-test
rm -rf "$dir" && mkdir -p "$dir"
pass() { echo "PASS $1"; }
fail() { echo "FAIL $1"; }
skip() { echo "SKIP $1"; }

# the default build: not one MPI symbol, one process
if nm casdm | grep -qi 'mpi_\|ompi'; then
    fail "the default build has MPI symbols"; nm casdm | grep -i 'mpi_\|ompi' | head -5 | sed 's/^/  /'
elif ./casdm info | grep -q 'processes: 1 (MPI: none'; then
    pass "the default build has no MPI symbol and runs as one process (casdm info)"
else
    fail "casdm info does not say the default build has no MPI"; ./casdm info | sed 's/^/  /'
fi

names="equivalence to one process (bitwise, float rounding); resume across rank counts; a dead or hung rank; casdm sample over ranks"
if ! command -v mpirun >/dev/null 2>&1 || [ ! -x build/mpi/casdm ]; then
    skip "MPI tests ($names): mpirun or build/mpi/casdm missing (apt-get install openmpi-bin libopenmpi-dev)"
    exit 0
fi
# (OpenMPI refuses root without these; CI runs as root)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# vader: shared memory, no network probing on a machine without one
mpi2() { timeout 300 mpirun --oversubscribe --mca btl self,vader -np 2 build/mpi/casdm "$@"; }

# 16 CIFAR-10 records of deterministic gradients (label i mod 10)
awk 'BEGIN { for (i = 0; i < 16; i++) { printf "%c", i % 10
    for (j = 0; j < 3072; j++) printf "%c", (i * 37 + j * (i % 5 + 1)) % 256 } }' > "$dir/data_batch_1.bin"
# Cas-DM with attention and dropout (each rank draws its rows of the masks)
F="--data $dir --model casdm --ch 32 --res 1 --attn 16 --mult 1,2 --T 100 --dropout 0.1 --batch 8
   --lr 1e-3 --log-every 1 --sample-n 40 --sample-steps 2"
losses() { cut -d, -f1-6 "$1/log.csv"; }

./casdm --threads 2 train $F --steps 4 --out "$dir/one" 2>"$dir/one.err"
./casdm --threads 2 train $F --steps 4 --microbatch 4 --out "$dir/micro" 2>"$dir/micro.err"
mpi2 train $F --steps 4 --out "$dir/two" >"$dir/two.err" 2>&1
if [ -s "$dir/two/ckpt.safetensors" ] && cmp -s "$dir/micro/ckpt.safetensors" "$dir/two/ckpt.safetensors" &&
   [ "$(losses "$dir/micro")" = "$(losses "$dir/two")" ] &&
   cmp -s "$dir/micro/samples_000004.png" "$dir/two/samples_000004.png"; then
    pass "2 ranks x 4 images: the checkpoint, log.csv's losses and the sample grid bitwise those of one process with --batch 8 --microbatch 4"
else
    fail "2 ranks against one process with --microbatch 4"; sed 's/^/  /' "$dir/two.err" | tail -20
fi
ok=1
for name in theta.input_blocks.0.0.weight theta.out.2.weight phi.out.2.weight ema.theta.out.2.weight; do
    build/check_files --close "$dir/two/ckpt.safetensors" "$dir/one/ckpt.safetensors" "$name" 1e-4 \
        >>"$dir/close.txt" 2>&1 || ok=0
done
rel=$(paste -d, "$dir/one/log.csv" "$dir/two/log.csv" | awk -F, 'NR > 1 { for (i = 2; i <= 5; i++) {
    d = $i - $(i + 8); if (d < 0) d = -d; r = d / ($i < 0 ? -$i : $i); if (r > m) m = r } } END { print m + 0 }')
if [ "$ok" = 1 ] && awk -v r="$rel" 'BEGIN { exit !(r <= 1e-5) }'; then
    pass "2 ranks against one process with --batch 8: losses within $rel relative, weights within 1e-4 ($(awk '{ printf "%s ", $NF }' "$dir/close.txt"))"
else
    fail "2 ranks against one process with --batch 8: loss difference $rel"; sed 's/^/  /' "$dir/close.txt"
fi

# resume with another rank count, both ways: the same bits as uninterrupted
mpi2 train $F --steps 2 --sample-n 0 --out "$dir/r2" >"$dir/r2.err" 2>&1
./casdm train $F --steps 4 --microbatch 4 --resume "$dir/r2" --out "$dir/r2to1" 2>"$dir/r2to1.err"
./casdm train $F --steps 2 --microbatch 4 --sample-n 0 --out "$dir/r1" 2>"$dir/r1.err"
mpi2 train $F --steps 4 --resume "$dir/r1" --out "$dir/r1to2" >"$dir/r1to2.err" 2>&1
if cmp -s "$dir/r2to1/ckpt.safetensors" "$dir/micro/ckpt.safetensors" &&
   cmp -s "$dir/r1to2/ckpt.safetensors" "$dir/micro/ckpt.safetensors" &&
   [ "$(losses "$dir/r1to2")" = "$(losses "$dir/micro")" ]; then
    pass "a run resumes across a change of the rank count (2 -> 1 and 1 -> 2): bitwise the uninterrupted run"
else
    fail "resume across rank counts"; tail -5 "$dir/r2to1.err" "$dir/r1to2.err" | sed 's/^/  /'
fi

# a batch that does not split, and a --microbatch that does not divide the share
mpi2 train $F --batch 7 --steps 1 --out "$dir/bad" >"$dir/bad.err" 2>&1; rc=$?
if [ $rc -ne 0 ] && grep -q -- '--batch 7 does not split over 2 processes' "$dir/bad.err" &&
   ./casdm train $F --microbatch 3 --steps 1 --out "$dir/bad" 2>"$dir/bad1.err"; [ $? -eq 2 ] &&
   grep -q -- "--microbatch 3 does not divide each process's 8 images" "$dir/bad1.err"; then
    pass "--batch that does not split over the ranks, --microbatch that does not divide: a message naming the flag"
else
    fail "batch split messages"; sed 's/^/  /' "$dir/bad.err" "$dir/bad1.err" | tail -8
fi

# rank 1 exits in step 2: the job ends (non-zero) instead of hanging
t0=$(date +%s)
CASDM_TEST_FAULT=rank-exit:2:1 mpi2 --dist-timeout 60 train $F --steps 4 --sample-n 0 --out "$dir/dead" >"$dir/dead.err" 2>&1; rc=$?
t1=$(date +%s)
if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $((t1 - t0)) -lt 60 ] && grep -q 'rank 1 exits at step 2' "$dir/dead.err"; then
    pass "a rank that dies mid-step: the job stops in $((t1 - t0)) s with status $rc"
else
    fail "a dead rank: status $rc after $((t1 - t0)) s"; sed 's/^/  /' "$dir/dead.err" | tail -10
fi
# rank 1 hangs in step 2: rank 0's allreduce times out and names it
t0=$(date +%s)
CASDM_TEST_FAULT=rank-hang:2:1 mpi2 --dist-timeout 3 train $F --steps 4 --sample-n 0 --out "$dir/hung" >"$dir/hung.err" 2>&1; rc=$?
t1=$(date +%s)
if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $((t1 - t0)) -lt 60 ] &&
   grep -q "rank 0 of 2: the gradients' allreduce of step 2: no answer from the other ranks in 3 s" "$dir/hung.err"; then
    pass "a rank that hangs mid-step: rank 0 stops the job after --dist-timeout 3 ($((t1 - t0)) s, status $rc)"
else
    fail "a hung rank: status $rc after $((t1 - t0)) s"; sed 's/^/  /' "$dir/hung.err" | tail -10
fi

# SIGTERM to rank 1 alone: voted in the step's allreduce, so both ranks stop
# after the same step and rank 0 saves a checkpoint of that step (exit 143)
mpi2 --threads 1 train $F --steps 100000 --sample-n 0 --out "$dir/sig" >"$dir/sig.err" 2>&1 &
job=$!
rank1=""
for i in $(seq 1 600); do   # (up to 60 s for two logged steps)
    [ -f "$dir/sig/log.csv" ] && [ "$(wc -l < "$dir/sig/log.csv")" -ge 3 ] && break; sleep 0.1
done
for p in $(pgrep -f "casdm --threads 1 train .*--out $dir/sig"); do
    tr '\0' '\n' < /proc/$p/environ 2>/dev/null | grep -qx 'OMPI_COMM_WORLD_RANK=1' && rank1=$p
done
[ -n "$rank1" ] && kill -TERM "$rank1"
wait $job; rc=$?
saved=$(sed -n 's/.*interrupted (SIGTERM) at step \([0-9]*\): wrote.*/\1/p' "$dir/sig.err")
last=$(tail -n 1 "$dir/sig/log.csv" 2>/dev/null | cut -d, -f1)
if [ -n "$rank1" ] && [ $rc -eq 143 ] && [ -n "$saved" ] && [ "$saved" = "$last" ] &&
   ./casdm train $F --steps $((saved + 1)) --microbatch 4 --sample-n 0 --resume "$dir/sig" --out "$dir/sig1" 2>"$dir/sig1.err"; then
    pass "SIGTERM to rank 1 alone: both ranks stop after step $saved, rank 0 saves it, exit 143, the checkpoint resumes"
else
    fail "SIGTERM to one rank: rank 1 pid '$rank1', status $rc, saved '$saved', last logged '$last'"; sed 's/^/  /' "$dir/sig.err" | grep -v '^  step' | tail -10
fi

# casdm sample: batches of 2 round robin over the ranks, the same images
./casdm sample --ckpt "$dir/one/ckpt.safetensors" --n 6 --batch 2 --steps 3 --out "$dir/s1" >/dev/null 2>"$dir/s1.err"
mpi2 sample --ckpt "$dir/one/ckpt.safetensors" --n 6 --batch 2 --steps 3 --out "$dir/s2" >/dev/null 2>"$dir/s2.err"
if [ -s "$dir/s2/samples_6x32x32x3.npz" ] &&
   cmp -s "$dir/s1/samples_6x32x32x3.npz" "$dir/s2/samples_6x32x32x3.npz"; then
    pass "casdm sample over 2 ranks: bitwise the images of one process"
else
    fail "casdm sample over 2 ranks"; sed 's/^/  /' "$dir/s2.err" | tail -10
fi

# casdm fid: Inception batches round robin over the ranks, features merged
# in order: the same scores and the same saved statistics (the random test
# weights test_fid writes)
iw=build/inception_test.safetensors
if [ -f "$iw" ]; then
    ./casdm --threads 2 fid "$dir/s1/samples_6x32x32x3.npz" "$dir" --weights "$iw" --batch 2 --splits 1 \
        --save-stats "$dir/f1.npz" >"$dir/f1.out" 2>"$dir/f1.err"
    mpi2 fid "$dir/s1/samples_6x32x32x3.npz" "$dir" --weights "$iw" --batch 2 --splits 1 \
        --save-stats "$dir/f2.npz" >"$dir/f2.out" 2>"$dir/f2.err"
    if [ -s "$dir/f2.npz" ] && cmp -s "$dir/f1.npz" "$dir/f2.npz" && grep -q '^FID' "$dir/f2.out" &&
       cmp -s "$dir/f1.out" "$dir/f2.out"; then
        pass "casdm fid over 2 ranks: bitwise the statistics and the scores of one process ($(tr '\n' ' ' < "$dir/f2.out"))"
    else
        fail "casdm fid over 2 ranks"; sed 's/^/  /' "$dir/f1.out" "$dir/f2.out" "$dir/f2.err" | tail -12
    fi
else
    skip "casdm fid over 2 ranks: $iw (written by build/test_fid) missing"
fi

# the commands that do not share work refuse several ranks (rather than K
# copies writing the same files)
mpi2 train-ae --data "$dir" --out "$dir/ae" >"$dir/ae.err" 2>&1; rc=$?
if [ $rc -ne 0 ] && grep -q 'casdm train-ae: runs as one process' "$dir/ae.err" && [ ! -e "$dir/ae" ]; then
    pass "casdm train-ae under mpirun -np 2: a message and no output"
else
    fail "train-ae under mpirun: status $rc"; sed 's/^/  /' "$dir/ae.err" | head -5
fi
