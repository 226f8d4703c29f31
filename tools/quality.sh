#!/bin/sh
# make quality: ddpm-eps and casdm trained with identical settings and seed on
# Fashion-MNIST for the same wall time (QUALITY_SECONDS each, default 300),
# then held-out denoising losses (casdm eval: epsilon-MSE and x0-MSE at 10
# values of t, fixed noise) on the first QUALITY_N (2000) test images. Prints a table.
cd "$(dirname "$0")/.." || exit 1
secs=${QUALITY_SECONDS:-300}
out=${QUALITY_OUT:-runs/quality}
train=data/fashion-mnist/train-images-idx3-ubyte
test=data/fashion-mnist/t10k-images-idx3-ubyte
mkdir -p "$out"
for m in ddpm-eps casdm; do
    ./casdm train --data "$train" --model $m --ch 32 --res 1 --attn '' --mult 1,2,2 --T 1000 --dropout 0 \
        --batch 32 --lr 1e-3 --steps 1000000 --time-limit "$secs" --seed 1 --log-every 10 --sample-n 36 \
        --sample-steps 25 --out "$out/$m" || exit 1
    ./casdm eval --ckpt "$out/$m/ckpt.safetensors" --data "$test" --n "${QUALITY_N:-2000}" > "$out/$m/eval.csv" || exit 1
done
printf "\n%-10s %8s %12s %12s\n" model steps eps_mse x0_mse
for m in ddpm-eps casdm; do
    steps=$(tail -n 1 "$out/$m/log.csv" | cut -d, -f1)
    tail -n 1 "$out/$m/eval.csv" | awk -F, -v m=$m -v s="$steps" '{ printf "%-10s %8s %12s %12s\n", m, s, $2, $3 }'
done
echo "(per-t values: $out/*/eval.csv; loss plots: $out/*/loss.svg)"
