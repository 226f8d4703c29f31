#!/bin/sh
# make demo-bf16: the make demo training (Fashion-MNIST, casdm ch32, batch 32,
# seed 1) for BF16_STEPS steps (default 300) twice from the same seed, float32
# and --precision bf16 (the same batches, timesteps and noise), then casdm eval
# of both (float32, the first 2000 test images, 10 values of t, fixed noise).
# Prints the logged losses side by side and the held-out MSEs, draws both loss
# curves in one plot (runs/demo-bf16/fp32_vs_bf16.svg), and exits 1 unless the
# mean training loss of the last 50 steps agrees within 3% and the held-out
# eps- and x0-MSE within 5% (issue 22's check).
cd "$(dirname "$0")/.." || exit 1
steps=${BF16_STEPS:-300}
out=${BF16_OUT:-runs/demo-bf16}
train=data/fashion-mnist/train-images-idx3-ubyte
test=data/fashion-mnist/t10k-images-idx3-ubyte
mkdir -p "$out"
for p in fp32 bf16; do
    ./casdm --precision $p train --data "$train" --model casdm --ch 32 --res 1 --attn '' --mult 1,2,2 \
        --T 1000 --dropout 0 --batch 32 --lr 1e-3 --log-every 10 --seed 1 --sample-n 0 \
        --steps "$steps" --out "$out/$p" || exit 1
    ./casdm eval --ckpt "$out/$p/ckpt.safetensors" --data "$test" --n 2000 > "$out/$p/eval.csv" || exit 1
done
./casdm plot --title "make demo, float32 and bf16 (seed 1)" --out "$out/fp32_vs_bf16.svg" \
    float32="$out/fp32/log.csv" bf16="$out/bf16/log.csv" || exit 1
echo "step  loss fp32  loss bf16  rel diff   (rows of log.csv, means over 10 steps)"
paste -d, "$out/fp32/log.csv" "$out/bf16/log.csv" |
    awk -F, 'NR > 1 { d = ($10 - $2) / $2; printf "%4d  %9.5f  %9.5f  %+8.2f%%\n", $1, $2, $10, 100 * d }'
tail -n 1 "$out/fp32/eval.csv" > "$out/means"; tail -n 1 "$out/bf16/eval.csv" >> "$out/means"
paste -d, "$out/fp32/log.csv" "$out/bf16/log.csv" | tail -n 5 | awk -F, -v means="$out/means" '
    { a += $2; b += $10 }
    END {
        getline f < means; getline g < means; split(f, F, ","); split(g, G, ",")
        dl = (b - a) / a; de = (G[2] - F[2]) / F[2]; dx = (G[3] - F[3]) / F[3]
        printf "last 50 steps, mean loss: fp32 %.5f, bf16 %.5f (%+.2f%%, tol 3%%)\n", a / 5, b / 5, 100 * dl
        printf "held-out eps-MSE: fp32 %s, bf16 %s (%+.2f%%, tol 5%%)\n", F[2], G[2], 100 * de
        printf "held-out x0-MSE:  fp32 %s, bf16 %s (%+.2f%%, tol 5%%)\n", F[3], G[3], 100 * dx
        bad = (dl < 0 ? -dl : dl) > 0.03 || (de < 0 ? -de : de) > 0.05 || (dx < 0 ? -dx : dx) > 0.05
        print bad ? "FAIL: bf16 is further from float32 than the tolerances" : "PASS: bf16 agrees with float32 within the tolerances"
        exit bad
    }'
