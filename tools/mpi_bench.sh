#!/bin/sh
# make bench-mpi: the throughput of data-parallel training on this machine
# (README, "Training on several machines"): the make demo model (Cas-DM
# ch 32 on Fashion-MNIST, batch 32) as one process with one thread, two
# ranks with one thread each (mpirun -np 2, build/mpi/casdm), and one
# process with two threads; img/s of the logged rows after the first, and
# each rank's time in its collectives per step (the allreduce of the
# gradients, and the wait for the slower rank in it). STEPS (default 40)
# sets the length. Run nothing else heavy beside it.
set -e
STEPS=${STEPS:-40}
data=data/fashion-mnist/train-images-idx3-ubyte
out=build/mpi-bench
rm -rf "$out" && mkdir -p "$out"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
F="--data $data --model casdm --ch 32 --res 1 --attn '' --mult 1,2,2 --T 1000 --dropout 0 \
   --batch 32 --lr 1e-3 --log-every 10 --sample-n 0 --ckpt-every 0 --steps $STEPS"
# img/s: the mean of log.csv's rows after the first (start-up, first-touch)
ips() { awk -F, 'NR > 2 { s += $7; n++ } END { printf "%.1f", s / n }' "$1/log.csv"; }
eval "./casdm --threads 1 train $F --out $out/one1" 2>"$out/one1.err"
eval "mpirun --oversubscribe --mca btl self,vader -np 2 build/mpi/casdm --threads 1 train $F --out $out/two" \
    >"$out/two.err" 2>&1
eval "./casdm --threads 2 train $F --out $out/one2" 2>"$out/one2.err"
comm=$(grep 'a step in their collectives' "$out/two.err" | tail -n +2 |
       awk '{ s += $3; n++ } END { printf "%.1f", s / n }')
bytes=$(awk '/parameters/ { for (i = 1; i <= NF; i++) if ($i == "theta") print $(i + 1) }' "$out/one1.err")
echo "casdm train, the make demo model (batch 32, $STEPS steps), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
printf "| run | img/s |\n|---|---|\n"
printf "| one process, 1 thread | %s |\n" "$(ips $out/one1)"
printf "| 2 ranks (mpirun -np 2), 1 thread each | %s |\n" "$(ips $out/two)"
printf "| one process, 2 threads | %s |\n" "$(ips $out/one2)"
echo "2 ranks: ${comm} ms a step in the collectives (rank 0; theta $bytes parameters, theta and phi's gradients in one allreduce)"
