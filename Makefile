# casdm: plain targets, C99, libc + libm (+ pthreads unless THREADS=0).
#   make                 build the program (./casdm) and the library objects
#   make test            build and run every test; ends with "N passed, N failed"
#   make asan            the tests under AddressSanitizer + UBSan (LeakSanitizer on)
#   make tsan            the engine's tests under ThreadSanitizer
#   make MPI=1           ./casdm with mpicc: data-parallel training under mpirun
#   make fuzz            libFuzzer harnesses of every reader (clang), each run
#                        FUZZ_SECONDS (default 10) on its seeds in tests/fuzz/
#   make clean
# Options: CC=..., CFLAGS=... (default -O2 -g), SIMD=0 (portable scalar C only),
# THREADS=0 (no pthreads, everything on the calling thread), ARCHFLAGS=...
# (default -march=native -fvect-cost-model=dynamic when SIMD=1, each if the
# compiler accepts it).

CC      ?= cc
CFLAGS  ?= -O2 -g
SIMD    ?= 1
THREADS ?= 1
# MPI=1: data-parallel training over MPI (dist.c, README "Training on several
# machines"), built with mpicc; the default build has no MPI in it
MPI     ?= 0
MPICC   ?= mpicc
ifeq ($(MPI),1)
CC = $(MPICC)
endif
STD      = -std=c99 -pedantic
WARN     = -Wall -Wextra

# the compiler is probed once: does it take -march=native?
# And does it take -fvect-cost-model=dynamic (GCC)? GCC's -O2 vectorises only
# loops that need no run-time alias check, and nearly every elementwise loop
# here needs one (an output may be its input): with the dynamic cost model
# they are vectorised, the demo training step 10% faster (Intel Xeon).
probe = $(shell echo 'int main(void){return 0;}' | $(CC) -Werror $(1) -x c - -o /dev/null 2>/dev/null && echo $(1))
ifeq ($(SIMD),1)
ARCHFLAGS ?= $(call probe,-march=native) $(call probe,-fvect-cost-model=dynamic)
else
ARCHFLAGS ?=
endif

LDLIBS = -lm
ifeq ($(THREADS),1)
LDLIBS += -lpthread
endif

ALL_CFLAGS = $(STD) $(WARN) $(CFLAGS) $(ARCHFLAGS) -DCASDM_SIMD=$(SIMD) -DCASDM_THREADS=$(THREADS) \
             -DCASDM_MPI=$(MPI)

# Objects remember the flags they were built with: a change of SIMD, THREADS,
# CC or CFLAGS rebuilds everything, so `make test SIMD=0` never links stale code.
FLAGS_FILE := build/.flags
$(shell mkdir -p build; echo '$(CC) $(ALL_CFLAGS) $(LDLIBS)' | cmp -s - $(FLAGS_FILE) || echo '$(CC) $(ALL_CFLAGS) $(LDLIBS)' > $(FLAGS_FILE))

LIB_OBJS = build/tensor.o build/formats.o build/unet.o build/ddim.o build/lpips.o build/fid.o build/lddgan.o \
           build/dist.o
TESTS    = build/test_tensor build/test_unet build/test_fid build/test_lddgan

.PHONY: all test asan tsan clean bench bench-mpi data demo demo-bf16 demo-ae demo-lddgan demo-torch cross quality fuzz

all: casdm $(LIB_OBJS)

build/%.o: %.c tensor.h casdm.h $(FLAGS_FILE)
	$(CC) $(ALL_CFLAGS) -c $< -o $@

casdm: build/casdm.o $(LIB_OBJS)
	$(CC) $(ALL_CFLAGS) $^ -o $@ $(LDLIBS)

build/test_%: tests/test_%.c tests/test_util.h tensor.h casdm.h $(LIB_OBJS)
	$(CC) $(ALL_CFLAGS) $< $(LIB_OBJS) -o $@ $(LDLIBS)

build/check_files: tests/check_files.c $(FLAGS_FILE)
	$(CC) $(ALL_CFLAGS) $< -o $@ -lm

# (tests/test_mpi.sh: an MPI build beside the default one, build/mpi/casdm,
# when mpicc is installed; a SKIP line otherwise)
HAVE_MPICC := $(shell command -v $(MPICC) 2>/dev/null)
test: $(TESTS) casdm build/check_files $(if $(HAVE_MPICC),build/mpi/casdm)
	@sh tests/run.sh $(TESTS) tests/test_cli.sh tests/test_mpi.sh

MPI_OBJS = $(patsubst build/%,build/mpi/%,build/casdm.o $(LIB_OBJS))
build/mpi/%.o: %.c tensor.h casdm.h $(FLAGS_FILE)
	@mkdir -p build/mpi
	$(MPICC) $(subst -DCASDM_MPI=$(MPI),-DCASDM_MPI=1,$(ALL_CFLAGS)) -c $< -o $@
build/mpi/casdm: $(MPI_OBJS)
	$(MPICC) $(ALL_CFLAGS) $^ -o $@ $(LDLIBS)

build/bench: bench.c $(LIB_OBJS)
	$(CC) $(ALL_CFLAGS) $< $(LIB_OBJS) -o $@ $(LDLIBS)

# ours and PyTorch's (../shared/ref/unet_ref.py) side by side; QUICK=1 for a short run
bench: build/bench casdm
	@sh tools/bench.sh $(if $(QUICK),--quick)

# data-parallel training on this machine: one process, two ranks, two threads
# (tools/mpi_bench.sh; needs OpenMPI: apt-get install openmpi-bin libopenmpi-dev)
bench-mpi: casdm build/mpi/casdm $(FMNIST)
	@sh tools/mpi_bench.sh

# ---- the README's first command ----
# A small Cas-DM on Fashion-MNIST (28x28 zero-padded to 32x32), about seven
# minutes on 2 cores. DEMO_STEPS changes the length; the config is in README.md.
DEMO_STEPS ?= 400
DEMO_OUT   ?= runs/demo
FMNIST      = data/fashion-mnist/train-images-idx3-ubyte
FMNIST_LABELS = data/fashion-mnist/train-labels-idx1-ubyte
FMNIST_TEST = data/fashion-mnist/t10k-images-idx3-ubyte
FMNIST_TEST_LABELS = data/fashion-mnist/t10k-labels-idx1-ubyte
# the FD-classifier's network (casdm train-classifier, 2000 steps, about 3
# minutes; 91% test accuracy): made once, used by make demo and make quality
FMNIST_CLF  = runs/fmnist-classifier.safetensors

data: $(FMNIST)

# ddpm-eps vs casdm, same settings and wall time; held-out losses and the
# FD-classifier of their samples (README table)
quality: casdm $(FMNIST_CLF)
	@QUALITY_CLF=$(FMNIST_CLF) sh tools/quality.sh

$(FMNIST) $(FMNIST_LABELS) $(FMNIST_TEST) $(FMNIST_TEST_LABELS):
	@sh tools/get_fashion_mnist.sh

$(FMNIST_CLF): | casdm $(FMNIST) $(FMNIST_LABELS) $(FMNIST_TEST) $(FMNIST_TEST_LABELS)
	@mkdir -p $(dir $@)
	./casdm train-classifier --data $(FMNIST) --labels $(FMNIST_LABELS) --test-data $(FMNIST_TEST) \
	    --test-labels $(FMNIST_TEST_LABELS) --out $@ > $(@:.safetensors=.txt) && cat $(@:.safetensors=.txt)

DEMO_FLAGS = --data $(FMNIST) --model casdm --ch 32 --res 1 --attn '' --mult 1,2,2 --T 1000 \
             --dropout 0 --batch 32 --lr 1e-3 --log-every 10

# (every 100 steps: a sample grid, and the FD-classifier of 200 EMA samples
# against the first 10,000 training images in log.csv and the plot)
demo: casdm $(FMNIST) $(FMNIST_CLF)
	./casdm train $(DEMO_FLAGS) --steps $(DEMO_STEPS) \
	    --ckpt-every 100 --sample-every 100 --sample-n 36 --sample-steps 25 \
	    --eval-every 100 --eval-n 200 --eval-features $(FMNIST_CLF) --out $(DEMO_OUT)

# the make demo training in float32 and in --precision bf16 from the same seed,
# 300 steps each (about 5 minutes on 2 cores), their losses and held-out MSEs
# compared and plotted together (tools/bf16_demo.sh; README, Speed)
demo-bf16: casdm $(FMNIST) $(FMNIST_TEST)
	@sh tools/bf16_demo.sh

# LDDGAN's autoencoder on Fashion-MNIST (casdm train-ae, about five minutes on
# 2 cores): ch 32, mult 1,2,2 (latent 4x8x8), the GAN terms from step 500 of
# 1000; no LPIPS term (--perceptual-weight 0): its pretrained VGG16 cannot be
# downloaded here (give --lpips and drop that flag where it can)
AE_DEMO_OUT = runs/fmnist-ae
demo-ae: casdm $(FMNIST) $(FMNIST_TEST)
	./casdm train-ae --data $(FMNIST) --eval-data $(FMNIST_TEST) --eval-n 1000 \
	    --perceptual-weight 0 --ch 32 --mult 1,2,2 --res 1 --attn none --z 4 --batch 16 --lr 5e-4 \
	    --steps 1000 --disc-start 500 --sample-every 250 --sample-n 16 --out $(AE_DEMO_OUT)

# LDDGAN on Fashion-MNIST, both stages: the autoencoder of make demo-ae (made
# first when missing; latents 4x8x8, scale 14.67), then the GAN in its latent
# space (casdm train --model lddgan: generator nf 64, ch_mult 1,2, one ResBlock
# a level, nz 32; discriminator ngf 32; batch 32, 1200 iterations, EMA 0.999
# for so short a run; R1 and the learning rates as the paper's), then 1000
# samples from the EMA generator and their FD-classifier against the 10,000
# test images. About 5 minutes for the GAN stage on 2 cores (README).
LDDGAN_DEMO_OUT = runs/fmnist-lddgan
LDDGAN_DEMO_FLAGS = --data $(FMNIST) --ae $(AE_DEMO_OUT)/ckpt.safetensors --nf 64 --ch-mult 1,2 \
             --num-res-blocks 1 --nz 32 --z-emb-dim 128 --n-mlp 2 --ngf 32 --t-emb-dim 128 \
             --batch 32 --ema 0.999
demo-lddgan: casdm $(FMNIST) $(FMNIST_TEST) $(FMNIST_CLF)
	@test -f $(AE_DEMO_OUT)/ckpt.safetensors || $(MAKE) demo-ae
	./casdm train --model lddgan $(LDDGAN_DEMO_FLAGS) --steps 1200 --log-every 50 \
	    --sample-every 400 --sample-n 36 --out $(LDDGAN_DEMO_OUT)
	./casdm sample --ckpt $(LDDGAN_DEMO_OUT)/ckpt.safetensors --n 1000 --batch 100 \
	    --out $(LDDGAN_DEMO_OUT)/samples
	./casdm fid $(LDDGAN_DEMO_OUT)/samples/samples_1000x32x32x1.npz $(FMNIST_TEST) \
	    --features $(FMNIST_CLF)

# after make demo: the same command replayed in PyTorch (tools/train_ref.py,
# needs Debian's python3-torch): same initial weights, batches and noise;
# both loss curves in one SVG
demo-torch: casdm $(FMNIST)
	@test -f $(DEMO_OUT)/log.csv || { echo "run make demo first"; exit 1; }
	./casdm train $(DEMO_FLAGS) --steps 0 --sample-n 0 --out $(DEMO_OUT)-init
	/usr/bin/python3 tools/train_ref.py --init $(DEMO_OUT)-init/ckpt.safetensors $(DEMO_FLAGS) \
	    --steps $(DEMO_STEPS) --out $(DEMO_OUT)-torch
	./casdm plot --out $(DEMO_OUT)/c_vs_pytorch.svg --title "make demo: casdm (C) and tools/train_ref.py (PyTorch)" \
	    C=$(DEMO_OUT)/log.csv PyTorch=$(DEMO_OUT)-torch/log.csv

# other compilers, 32-bit, aarch64 (NEON), s390x (big-endian), riscv64 under qemu-user
cross:
	@sh tools/cross.sh

asan:
	$(MAKE) clean
	$(MAKE) test MPICC=none CFLAGS="-O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"  # (MPI's own allocations would read as leaks: no MPI build)

# the engine's tests under ThreadSanitizer: the pool's protocol and every
# threaded kernel; any report fails it (halt_on_error)
tsan:
	$(MAKE) clean
	$(MAKE) build/test_tensor CFLAGS="-O1 -g -fsanitize=thread" LDLIBS="-lm -lpthread -fsanitize=thread"
	TSAN_OPTIONS=halt_on_error=1 setarch $$(uname -m) -R ./build/test_tensor --quick  # -R: no ASLR, which gcc 12's TSan needs on new kernels
	$(MAKE) clean

# ---- fuzzing: tests/fuzz.c, one libFuzzer binary per reader (ASan + UBSan) ----
# `make fuzz FUZZ_SECONDS=N` runs each target N seconds on a copy of its seeds
# (tests/fuzz/<target>/) in build/fuzz/corpus/; any crash, leak, sanitizer
# report, timeout or out-of-memory fails it, with the input in build/fuzz/.
FUZZ_CC      ?= clang
FUZZ_SECONDS ?= 10
FUZZ_TARGETS  = image idx cifar safetensors csv checkpoint options npz
FUZZ_CFLAGS   = $(STD) $(WARN) -O1 -g -fno-omit-frame-pointer -DCASDM_SIMD=0 -DCASDM_THREADS=0 \
                -fsanitize=address,undefined -fno-sanitize-recover=undefined
FUZZ_OBJS     = $(LIB_OBJS:build/%=build/fuzz/%)

$(FUZZ_OBJS): build/fuzz/%.o: %.c tensor.h casdm.h
	@mkdir -p build/fuzz
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link -c $< -o $@

build/fuzz/fuzz_%: tests/fuzz.c casdm.c tensor.h casdm.h $(FUZZ_OBJS)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer -DFUZZ_TARGET=fuzz_$* $< $(FUZZ_OBJS) -o $@ -lm

fuzz: $(FUZZ_TARGETS:%=build/fuzz/fuzz_%)
	@sh tools/fuzz.sh $(FUZZ_SECONDS) $(FUZZ_TARGETS)

clean:
	rm -rf build casdm
