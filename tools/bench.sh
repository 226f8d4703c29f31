#!/bin/sh
# make bench: casdm's hot paths against PyTorch (Debian's python3-torch) in the
# same run, at 1 and 2 threads. Each case runs in its own process (ours:
# build/bench; PyTorch: ../shared/ref/unet_ref.py or tools/bench_torch.py), so
# rss is the case's own peak. Prints one machine-readable line per case and
# thread count, then a table. --quick: a reduced set in about five minutes.
# LPIPS cases: batch 16 at 32 and 64, 4 at 224 (both sides), images 32x32 resized.
# inception_fwd: fid.c's Inception-v3 against tools/inception_ref.py (pytorch-fid's
# network), batch 50 of 32x32 images resized to 299x299, no gradients.
# casdm_demo_step: the make demo training (Fashion-MNIST, casdm ch32, batch 32)
# as whole programs: ./casdm train against tools/train_ref.py from the same
# step-0 checkpoint, 30 steps each; ms per step from the last 10 steps' img/s
# in each log.csv (needs data/fashion-mnist; rss: the whole program's).
# contention_demo_step: the same training at 2 threads, 10 steps (ms per step
# from the last 5), quiet, then beside one busy loop at nice 19, then beside
# one at normal priority: each side gets its own busy loop, started before
# and killed after it (bounded by timeout). Lines contention_demo_step/quiet,
# /nice19 and /busy.
# ae_step: one casdm train-ae iteration on LDDGAN's CIFAR-10 autoencoder, batch 8
# (generator step with the GAN terms on, discriminator step, both Adam updates)
# against tools/bench_torch.py ae_step: tools/ae_ref.py's modules, or with
# LDM_DIR and TAMING_DIR set (checkouts of CompVis/latent-diffusion and
# taming-transformers) latent-diffusion's own AutoencoderKL and LPIPSWithDiscriminator.
# lddgan_d_step_r1, lddgan_g_step, lddgan_sample100: LDDGAN's stage two at its
# CIFAR-10 config (latents 4x16x16): the D step with R1, the G step with Adam and
# the EMA (batch 8 each), 100 samples with the decoder; against tools/bench_torch.py
# lddgan_*: tools/lddgan_ref.py's modules, or with LDDGAN_DIR set (a checkout of
# thanhluantrinh/LDDGAN) the official NCSNpp, Discriminator_small and diffusion.py
# (the decoder: ae_ref's AutoencoderKL, or latent-diffusion's with LDM_DIR/TAMING_DIR).
# casdm_*_step_ckpt: the Cas-DM step with every U-Net block checkpointed
# (ours: use_checkpoint on both nets; PyTorch: torch.utils.checkpoint on
# the same blocks, tools/bench_torch.py casdm_ckpt).
# *_bf16 (conv3x3_fwd, conv3x3_fwdbwd, casdm_ch64_step, casdm_ch128_step,
# ddim_ch128_step, casdm_demo_step): ours with --precision bf16 against PyTorch
# under torch.autocast bf16 with channels_last (tools/bench_torch.py --autocast,
# tools/train_ref.py --autocast), and against our float32 run of the same case in
# the same invocation (fp32_ms, vs_fp32 = fp32 time / bf16 time); peak_frac is
# against the measured peak of the bf16 back-end that runs: AMX's where the
# tiles run (bench peak_amx), else VDPBF16PS's (bench peak_bf16). A table of
# their own.
# UNET_REF=path/to/unet_ref.py overrides the reference's location.
cd "$(dirname "$0")/.." || exit 1
quick=0; [ "$1" = "--quick" ] && quick=1
ref=${UNET_REF:-../shared/ref/unet_ref.py}
py=/usr/bin/python3
torch=1
if ! $py -c "import torch" 2>/dev/null; then echo "PyTorch not installed: torch columns are '-'"; torch=0
elif [ ! -f "$ref" ]; then echo "PyTorch reference $ref not found: torch columns are '-'"; torch=0; fi

if [ $quick -eq 1 ]; then
    cases="conv3x3_fwd conv3x3_fwdbwd unet_ch64_step casdm_ch64_step"; iters=3
else
    cases="conv3x3_fwd conv3x3_fwdbwd unet_ch64_step unet_ch128_step casdm_ch64_step casdm_ch128_step casdm_ch64_step_ckpt casdm_ch128_step_ckpt lpips32_fwdbwd lpips64_fwdbwd lpips224_fwdbwd ddim_ch128_step inception_fwd ae_step lddgan_d_step_r1 lddgan_g_step lddgan_sample100 casdm_demo_step contention_demo_step conv3x3_fwd_bf16 conv3x3_fwdbwd_bf16 casdm_ch64_step_bf16 casdm_ch128_step_bf16 ddim_ch128_step_bf16 casdm_demo_step_bf16"; iters=5
fi
[ -n "${BENCH_CASES:-}" ] && cases=$BENCH_CASES   # e.g. BENCH_CASES="lpips224_fwdbwd ddim_ch128_step"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
# a peak is the best of three runs: a core taken by another guest for a moment
# would otherwise read as the machine's peak (two threads once read as one)
best_peak() {  # CASE THREADS -> the line of the fastest of three runs
    for i in 1 2 3; do build/bench $1 --threads $2; done | sort -t= -k3 -g | tail -n 1
}
gflops_of() { sed 's/.*gflops=\([0-9.]*\).*/\1/' "$1"; }  # a peak line's GFLOP/s
for th in 1 2; do best_peak peak $th > "$tmp/peak$th"; done
peak1=$(gflops_of "$tmp/peak1"); peak2=$(gflops_of "$tmp/peak2")
echo "FMA peak: $peak1 GFLOP/s on 1 thread, $peak2 on 2 ($(sed 's/.*simd=//' "$tmp/peak1"))"
for th in 1 2; do best_peak peak_bf16 $th > "$tmp/bpeak$th"; done
bpeak1=$(gflops_of "$tmp/bpeak1"); bpeak2=$(gflops_of "$tmp/bpeak2")
echo "bf16 peak (VDPBF16PS): $bpeak1 GFLOP/s on 1 thread, $bpeak2 on 2"
bf16_info=$(./casdm info 2>/dev/null | grep 'bf16:'); echo "$bf16_info"
case $bf16_info in *"precision bf16 runs on AMX"*)
    for th in 1 2; do best_peak peak_amx $th > "$tmp/bpeak$th"; done
    bpeak1=$(gflops_of "$tmp/bpeak1"); bpeak2=$(gflops_of "$tmp/bpeak2")
    echo "bf16 peak (AMX TDPBF16PS, the bf16 rows' peak_frac): $bpeak1 GFLOP/s on 1 thread, $bpeak2 on 2" ;;
esac
emulated=0; case $bf16_info in *"precision bf16 runs emulated"*) emulated=1 ;; esac

field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" "$2"; }
# json FILE KEY: a number from PyTorch's JSON line, or -
json() { $py -c "import json,sys; d=json.load(open('$1')); v=d.get('$2'); print('-' if v is None else v)" 2>/dev/null || echo -; }

torch_run() {  # case threads -> $tmp/torch.json
    case $1 in
        conv3x3_*_bf16) $py tools/bench_torch.py "$(dirname "$ref")" conv --autocast --batch 16 \
                            --threads $2 > "$tmp/torch.json" 2>/dev/null; return ;;
        casdm_ch64_step_bf16|casdm_ch128_step_bf16)
            if [ "$1" = casdm_ch64_step_bf16 ]; then m="--ch 64 --res 2 --attn 16"; else m="--ch 128 --res 3 --attn 16,8"; fi
            $py tools/bench_torch.py "$(dirname "$ref")" casdm $m --autocast --batch 16 --threads $2 --iters $iters \
                > "$tmp/torch.json" 2>/dev/null; return ;;
        ddim_ch128_step_bf16) $py tools/bench_torch.py "$(dirname "$ref")" ddim --ch 128 --res 3 --attn 16,8 --batch 16 \
                                  --autocast --threads $2 --iters $iters > "$tmp/torch.json" 2>/dev/null; return ;;
        conv3x3_*) args="conv --cin 128 --hw 32 --batch 16" ;;
        unet_ch64_step) args="unet --ch 64 --res 2 --attn 16 --batch 16" ;;
        unet_ch128_step) args="unet --ch 128 --res 3 --attn 16,8 --batch 16" ;;
        casdm_ch64_step) args="casdm --ch 64 --res 2 --attn 16 --batch 16" ;;
        casdm_ch128_step) args="casdm --ch 128 --res 3 --attn 16,8 --batch 16" ;;
        lpips224_fwdbwd) args="vgg --size 224 --batch 4" ;;
        lpips64_fwdbwd) args="vgg --size 64 --batch 16" ;;
        lpips32_fwdbwd) args="vgg --size 32 --batch 16" ;;
        casdm_ch64_step_ckpt|casdm_ch128_step_ckpt)
            if [ "$1" = casdm_ch64_step_ckpt ]; then m="--ch 64 --res 2 --attn 16"; else m="--ch 128 --res 3 --attn 16,8"; fi
            $py tools/bench_torch.py "$(dirname "$ref")" casdm_ckpt $m --batch 16 --threads $2 --iters $iters \
                > "$tmp/torch.json" 2>/dev/null; return ;;
        inception_fwd) $py tools/bench_torch.py "$(dirname "$ref")" inception --batch 50 \
                           --threads $2 --iters $iters > "$tmp/torch.json" 2>/dev/null; return ;;
        ddim_ch128_step) $py tools/bench_torch.py "$(dirname "$ref")" ddim --ch 128 --res 3 --attn 16,8 --batch 16 \
                             --threads $2 --iters $iters > "$tmp/torch.json" 2>/dev/null; return ;;
        ae_step) official=; [ -n "${LDM_DIR:-}" ] && [ -n "${TAMING_DIR:-}" ] && official="--ldm $LDM_DIR --taming $TAMING_DIR"
                 $py tools/bench_torch.py "$(dirname "$ref")" ae_step --batch 8 $official \
                     --threads $2 --iters $iters > "$tmp/torch.json" 2>/dev/null; return ;;
        lddgan_*) official=; [ -n "${LDDGAN_DIR:-}" ] && official="--lddgan $LDDGAN_DIR"
                  [ "$1" = lddgan_sample100 ] && [ -n "${LDM_DIR:-}" ] && [ -n "${TAMING_DIR:-}" ] && official="$official --ldm $LDM_DIR --taming $TAMING_DIR"
                  $py tools/bench_torch.py "$(dirname "$ref")" "$1" --batch 8 $official \
                      --threads $2 --iters $iters > "$tmp/torch.json" 2>/dev/null; return ;;
    esac
    $py "$ref" $args --threads $2 --iters $iters > "$tmp/torch.json" 2>/dev/null
}

: > "$tmp/lines"
demo_flags="--data data/fashion-mnist/train-images-idx3-ubyte --model casdm --ch 32 --res 1 --mult 1,2,2 --T 1000 --dropout 0 --batch 32 --lr 1e-3 --log-every 10 --sample-n 0"
# demo_run ours|torch threads [bf16] -> "ms rss_mib" (or "- -")
demo_run() {
    d=$tmp/demo_$1_$2_${3:-fp32}; prec=; auto=
    [ "${3:-}" = bf16 ] && { prec="--precision bf16"; auto=--autocast; }
    if [ "$1" = ours ]; then
        /usr/bin/time -f "%M" -o "$d.rss" ./casdm --threads $2 $prec train $demo_flags --attn '' --steps 30 --resume "$tmp/demo_init" --out "$d" 2>/dev/null
    else
        /usr/bin/time -f "%M" -o "$d.rss" $py tools/train_ref.py --init "$tmp/demo_init/ckpt.safetensors" $demo_flags --attn '' \
            --steps 30 --threads $2 $auto --out "$d" 2>/dev/null
    fi
    ips=$(tail -n 1 "$d/log.csv" 2>/dev/null | awk -F, '{ print $7 }')
    awk -v i="$ips" -v r="$(tail -n 1 "$d.rss" 2>/dev/null)" 'BEGIN { if (i + 0 > 0) printf "%.2f %.1f\n", 32000 / i, r / 1024; else print "- -" }'
}

# contention_run ours|torch load -> "ms rss_mib": 10 demo steps at 2 threads,
# beside a busy loop (load nice19 or busy) or alone (quiet)
contention_run() {
    d=$tmp/cont_$1_$2; pid=
    case $2 in
        nice19) nice -n 19 timeout 1200 sh -c 'while :; do :; done' & pid=$! ;;
        busy) timeout 1200 sh -c 'while :; do :; done' & pid=$! ;;
    esac
    f=$(echo "$demo_flags" | sed 's/--log-every 10/--log-every 5/')
    if [ "$1" = ours ]; then
        /usr/bin/time -f "%M" -o "$d.rss" ./casdm --threads 2 train $f --attn '' --steps 10 --resume "$tmp/demo_init" --out "$d" 2>/dev/null
    else
        /usr/bin/time -f "%M" -o "$d.rss" $py tools/train_ref.py --init "$tmp/demo_init/ckpt.safetensors" $f --attn '' \
            --steps 10 --threads 2 --out "$d" 2>/dev/null
    fi
    [ -n "$pid" ] && { kill $pid 2>/dev/null; wait $pid 2>/dev/null; }
    ips=$(tail -n 1 "$d/log.csv" 2>/dev/null | awk -F, '{ print $7 }')
    awk -v i="$ips" -v r="$(tail -n 1 "$d.rss" 2>/dev/null)" 'BEGIN { if (i + 0 > 0) printf "%.2f %.1f\n", 32000 / i, r / 1024; else print "- -" }'
}

# whole_programs NAME THREADS RUN ARG: ours and PyTorch's runs of RUN (demo_run
# or contention_run, which print "ms rss_mib") into one bench line
whole_programs() {
    set -- "$1" "$2" "$3" "$4" $($3 ours $4)
    name=$1; th=$2; run=$3; arg=$4; ours_ms=$5; rss=$6
    torch_ms=-; torch_rss=-
    [ $torch -eq 1 ] && { set -- $($run torch $arg); torch_ms=$1; torch_rss=$2; }
    ratio=$(awk -v a="$ours_ms" -v b="$torch_ms" 'BEGIN{ if (a == "-" || b == "-" || a+0 == 0) print "-"; else printf "%.2f", b/a }')
    line="bench $name threads=$th ours_ms=$ours_ms torch_ms=$torch_ms ratio=$ratio gflops=- peak_frac=- rss_mib=$rss torch_rss_mib=$torch_rss"
    echo "$line"; echo "$line" >> "$tmp/lines"
}

# torch_time CASE THREADS: PyTorch's side of a build/bench case -> torch_ms, torch_rss (or -)
torch_time() {
    torch_ms=-; torch_rss=-
    [ $torch -eq 1 ] || return
    torch_run "$1" $2
    key=step_s
    case $1 in conv3x3_fwd|conv3x3_fwd_bf16) key=fwd_s ;; lpips*) key=full_lpips_step_s ;; esac
    s=$(json "$tmp/torch.json" $key)
    [ "$s" != - ] && torch_ms=$(awk -v s="$s" 'BEGIN{printf "%.2f", s*1000}')
    torch_rss=$(json "$tmp/torch.json" peak_rss_mib)
}

# bf16_case NAME: the bf16 line of each thread count (see the header) into $tmp/bf16lines
bf16_case() {
    base=${1%_bf16}
    for th in 1 2; do
        if [ "$base" = casdm_demo_step ]; then
            if [ ! -f data/fashion-mnist/train-images-idx3-ubyte ] || [ ! -x ./casdm ]; then
                echo "$1: needs ./casdm and data/fashion-mnist (make casdm data); skipped"; return
            fi
            [ -f "$tmp/demo_init/ckpt.safetensors" ] || ./casdm train $demo_flags --attn '' --steps 0 --out "$tmp/demo_init" 2>/dev/null
            set -- "$1" $(demo_run ours $th bf16) $(demo_run ours $th); ours_ms=$2; rss=$3; fp32_ms=$4
            gflops=-; torch_ms=-; torch_rss=-
            [ $torch -eq 1 ] && { set -- "$1" $(demo_run torch $th bf16); torch_ms=$2; torch_rss=$3; }
        else
            build/bench "$base" --threads $th --iters $iters --batch 16 --precision bf16 > "$tmp/ours" 2>&1 || echo "ours failed: $(cat "$tmp/ours")"
            build/bench "$base" --threads $th --iters $iters --batch 16 > "$tmp/ours32" 2>&1 || echo "ours failed: $(cat "$tmp/ours32")"
            ours_ms=$(field ms "$tmp/ours"); gflops=$(field gflops "$tmp/ours"); rss=$(field rss_mib "$tmp/ours")
            fp32_ms=$(field ms "$tmp/ours32")
            torch_time "$1" $th
        fi
        # (the peak of the back-end that ran: VDPBF16PS's, or the FMA's where emulated)
        peak=$bpeak1; [ $th -eq 2 ] && peak=$bpeak2
        if [ "$emulated" = 1 ]; then peak=$peak1; [ $th -eq 2 ] && peak=$peak2; fi
        ratio=$(awk -v a="$ours_ms" -v b="$torch_ms" 'BEGIN{ if (a == "" || a == "-" || b == "-" || a+0 == 0) print "-"; else printf "%.2f", b/a }')
        vs32=$(awk -v a="$ours_ms" -v b="$fp32_ms" 'BEGIN{ if (a == "" || a == "-" || b == "" || b == "-" || a+0 == 0) print "-"; else printf "%.2f", b/a }')
        frac=$(awk -v g="$gflops" -v p="$peak" 'BEGIN{ if (g == "" || g == "-" || p+0 == 0) print "-"; else printf "%.2f", g/p }')
        line="bench $1 threads=$th ours_ms=${ours_ms:--} torch_ms=$torch_ms ratio=$ratio gflops=${gflops:--} peak_frac=$frac rss_mib=${rss:--} torch_rss_mib=$torch_rss fp32_ms=${fp32_ms:--} vs_fp32=$vs32"
        echo "$line"; echo "$line" >> "$tmp/bf16lines"
    done
}

: > "$tmp/bf16lines"
for c in $cases; do
    batch=16; [ "$c" = lpips224_fwdbwd ] && batch=4; [ "$c" = inception_fwd ] && batch=50; [ "$c" = ae_step ] && batch=8
    case $c in lddgan_*) batch=8 ;; esac
    case $c in *_bf16) bf16_case "$c"; continue ;; esac
    if [ "$c" = casdm_demo_step ] || [ "$c" = contention_demo_step ]; then
        if [ ! -f data/fashion-mnist/train-images-idx3-ubyte ] || [ ! -x ./casdm ]; then
            echo "$c: needs ./casdm and data/fashion-mnist (make casdm data); skipped"; continue
        fi
        [ -f "$tmp/demo_init/ckpt.safetensors" ] || ./casdm train $demo_flags --attn '' --steps 0 --out "$tmp/demo_init" 2>/dev/null
    fi
    if [ "$c" = contention_demo_step ]; then
        for load in quiet nice19 busy; do whole_programs "$c/$load" 2 contention_run $load; done
        continue
    fi
    if [ "$c" = casdm_demo_step ]; then
        for th in 1 2; do whole_programs "$c" $th demo_run $th; done
        continue
    fi
    for th in 1 2; do
        build/bench "$c" --threads $th --iters $iters --batch $batch > "$tmp/ours" 2>&1 || echo "ours failed: $(cat "$tmp/ours")"
        ours_ms=$(field ms "$tmp/ours"); gflops=$(field gflops "$tmp/ours"); rss=$(field rss_mib "$tmp/ours")
        torch_time "$c" $th
        peak=$peak1; [ $th -eq 2 ] && peak=$peak2
        ratio=$(awk -v a="$ours_ms" -v b="$torch_ms" 'BEGIN{ if (a == "" || b == "-" || a+0 == 0) print "-"; else printf "%.2f", b/a }')
        frac=$(awk -v g="$gflops" -v p="$peak" 'BEGIN{ if (g == "" || p+0 == 0) print "-"; else printf "%.2f", g/p }')
        line="bench $c threads=$th ours_ms=${ours_ms:--} torch_ms=$torch_ms ratio=$ratio gflops=${gflops:--} peak_frac=$frac rss_mib=${rss:--} torch_rss_mib=$torch_rss"
        echo "$line"; echo "$line" >> "$tmp/lines"
    done
done
echo
printf "%-21s %3s %11s %11s %7s %8s %6s %9s %9s\n" case thr "ours ms" "torch ms" ratio GFLOP/s peak "rss MiB" "torch MiB"
sed 's/bench \([^ ]*\) threads=\([^ ]*\) ours_ms=\([^ ]*\) torch_ms=\([^ ]*\) ratio=\([^ ]*\) gflops=\([^ ]*\) peak_frac=\([^ ]*\) rss_mib=\([^ ]*\) torch_rss_mib=\([^ ]*\)/\1 \2 \3 \4 \5 \6 \7 \8 \9/' "$tmp/lines" |
    while read -r c t o p r g f m pm; do printf "%-21s %3s %11s %11s %7s %8s %6s %9s %9s\n" "$c" "$t" "$o" "$p" "$r" "$g" "$f" "$m" "$pm"; done
if [ -s "$tmp/bf16lines" ]; then
    echo
    echo "bf16 (ours --precision bf16; torch: autocast bf16, channels_last; peak: $([ $emulated = 1 ] && echo "the FMA's (bf16 emulated)" || echo "VDPBF16PS's"))"
    printf "%-21s %3s %11s %11s %7s %11s %7s %8s %6s\n" case thr "ours ms" "torch ms" ratio "ours fp32" "vs fp32" GFLOP/s peak
    sed 's/bench \([^ ]*\) threads=\([^ ]*\) ours_ms=\([^ ]*\) torch_ms=\([^ ]*\) ratio=\([^ ]*\) gflops=\([^ ]*\) peak_frac=\([^ ]*\) rss_mib=[^ ]* torch_rss_mib=[^ ]* fp32_ms=\([^ ]*\) vs_fp32=\([^ ]*\)/\1 \2 \3 \4 \5 \8 \9 \6 \7/' "$tmp/bf16lines" |
        while read -r c t o p r f v g k; do printf "%-21s %3s %11s %11s %7s %11s %7s %8s %6s\n" "$c" "$t" "$o" "$p" "$r" "$f" "$v" "$g" "$k"; done
fi
