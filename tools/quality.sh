#!/bin/sh
# make quality: ddpm-eps and casdm trained with identical settings and seed on
# Fashion-MNIST for the same wall time (QUALITY_SECONDS each, default 300),
# then held-out denoising losses (casdm eval: epsilon-MSE and x0-MSE at 10
# values of t, fixed noise) on the first QUALITY_N (2000) test images, and the
# FD-classifier: QUALITY_SAMPLES (500) DDIM-25 samples of each model against the
# 10,000 test images, in the penultimate features of a classifier casdm trains
# on the labelled training split ($QUALITY_CLF, or runs/quality/clf.safetensors;
# made once, about 3 minutes; its test accuracy is printed). Prints a table.
cd "$(dirname "$0")/.." || exit 1
secs=${QUALITY_SECONDS:-300}
out=${QUALITY_OUT:-runs/quality}
train=data/fashion-mnist/train-images-idx3-ubyte
test=data/fashion-mnist/t10k-images-idx3-ubyte
mkdir -p "$out"
labels=data/fashion-mnist/train-labels-idx1-ubyte
test_labels=data/fashion-mnist/t10k-labels-idx1-ubyte
clf=${QUALITY_CLF:-$out/clf.safetensors}  # (make quality: the Makefile's FMNIST_CLF)
if [ ! -f "$clf" ]; then
    ./casdm train-classifier --data "$train" --labels "$labels" --out "$clf" \
        --test-data "$test" --test-labels "$test_labels" | tee "${clf%.safetensors}.txt" || exit 1
fi
for m in ddpm-eps casdm; do
    ./casdm train --data "$train" --model $m --ch 32 --res 1 --attn '' --mult 1,2,2 --T 1000 --dropout 0 \
        --batch 32 --lr 1e-3 --steps 1000000 --time-limit "$secs" --seed 1 --log-every 10 --sample-n 36 \
        --sample-steps 25 --out "$out/$m" || exit 1
    ./casdm eval --ckpt "$out/$m/ckpt.safetensors" --data "$test" --n "${QUALITY_N:-2000}" > "$out/$m/eval.csv" || exit 1
    n=${QUALITY_SAMPLES:-500}
    ./casdm sample --ckpt "$out/$m/ckpt.safetensors" --n "$n" --steps 25 --batch 50 --out "$out/$m/samples" || exit 1
    ./casdm fid "$out/$m/samples/samples_${n}x32x32x1.npz" "$test" --features "$clf" > "$out/$m/fd.txt" || exit 1
done
printf "\n%-10s %8s %12s %12s %14s\n" model steps eps_mse x0_mse FD-classifier
for m in ddpm-eps casdm; do
    steps=$(tail -n 1 "$out/$m/log.csv" | cut -d, -f1)
    fd=$(awk '/^FD-classifier/ { print $2 }' "$out/$m/fd.txt")
    tail -n 1 "$out/$m/eval.csv" | awk -F, -v m=$m -v s="$steps" -v fd="$fd" '{ printf "%-10s %8s %12s %12s %14s\n", m, s, $2, $3, fd }'
done
echo "(FD-classifier: ${QUALITY_SAMPLES:-500} samples vs the test split; classifier: $(grep '^test accuracy' "${clf%.safetensors}.txt" 2>/dev/null))"
echo "(per-t values: $out/*/eval.csv; loss plots: $out/*/loss.svg)"
