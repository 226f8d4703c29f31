// bench.c: the speed of casdm's hot paths, one case per process (so the peak
// RSS is the case's own). Driven by tools/bench.sh (make bench), which runs
// the same cases in PyTorch and prints both side by side.
//   bench peak --threads N             FMA peak of this machine (GFLOP/s)
//   bench CASE --threads N [--iters K] one case; prints "ours CASE ..."
// Cases: conv3x3_fwd conv3x3_fwdbwd unet_ch64_step unet_ch128_step
//        casdm_ch64_step casdm_ch128_step lpips224_fwdbwd ddim_ch128_step
//        (casdm_ch64_step_ckpt, casdm_ch128_step_ckpt: with U-Net checkpointing)
//        lpips32_fwdbwd lpips64_fwdbwd (LPIPS at the sizes people train small models at)
//        demo_step (the make demo model in one process: Cas-DM ch32, mult 1,2,2,
//        one ResBlock a level, no attention, 1x28x28, batch 32)
//        inception_fwd (fid.c's Inception-v3 on a batch of 32x32 images resized
//        to 299x299, pool_3, sFID features and logits; --batch, default 50)
//        ae_step (one casdm train-ae iteration on LDDGAN's CIFAR-10 autoencoder:
//        generator and discriminator steps, GAN terms on; --batch, bench.sh: 8)
//        lddgan_d_step_r1, lddgan_g_step (LDDGAN's stage two at its CIFAR-10
//        config, latents 4x16x16: the D step with R1 and its Adam update; the G
//        step, its Adam update and the EMA; --batch, bench.sh: 8)
//        lddgan_sample100 (100 CIFAR-10 samples: 4 generator calls and the
//        autoencoder's decoder, as casdm sample)
// --winograd 0: same 3x3 convolutions without the Winograd path (to compare)
#define _POSIX_C_SOURCE 200809L
#include "casdm.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

typedef void (*step_fn)(void *ctx);

// median seconds of `iters` runs after `warmup` runs
static double time_median(step_fn f, void *ctx, int warmup, int iters) {
    for (int i = 0; i < warmup; i++) f(ctx);
    double *t = mallocCheck((size_t)iters * sizeof(double));
    for (int i = 0; i < iters; i++) {
        double t0 = now_seconds();
        f(ctx);
        t[i] = now_seconds() - t0;
    }
    qsort(t, (size_t)iters, sizeof(double), cmp_double);
    double m = iters % 2 ? t[iters / 2] : 0.5 * (t[iters / 2 - 1] + t[iters / 2]);
    free(t);
    return m;
}

static void peak_task(void *arg, int ith, int nth) {
    (void)nth;
    double *out = arg;
    out[ith] = simd_fma_loop(200000000L / 16);
}

static void peak_bf16_task(void *arg, int ith, int nth) {
    (void)nth;
    double *out = arg;
    out[ith] = simd_bf16_loop(200000000L / 16);
}

static void peak_amx_task(void *arg, int ith, int nth) {  // four TDPBF16PS an iteration
    (void)nth;
    double *out = arg;
    out[ith] = simd_amx_loop(200000000L / 16 / 4);
}

// ---- the cases ----
typedef struct {
    Graph g;
    Rng rng;
    // conv
    float *x, *w, *b, *y, *col, *dx, *dw, *db, *dy;
    // models
    UNet theta, phi;
    Adam at, ap;
    Schedule sched;
    LossConfig lc;
    Lpips lpips;
    Inception inception;
    float *pool3, *spatial, *logits;
    // ae_step
    Autoencoder ae;
    PatchGAN disc;
    AETrainer aet;
    Adam adam_disc;
    // lddgan_*
    GanGen gen;
    GanDisc gdisc;
    GanSchedule gsched;
    GanTrainer gtr;
    GanOptim gopt;
    float *gnoise;
    int *gt;
    int kind, B, C, S;  // model kind, batch, image channels and size
    double flops_mult;  // total FLOPs of a step = counted forward FLOPs x this
} Bench;

static const int CB = 16, CC = 128, CHW = 32;  // conv case: (16,128,32,32), 3x3, 128 -> 128

static void conv_fwd(void *ctx) {
    Bench *b = ctx;
    conv2d_forward(b->y, b->x, b->w, b->b, b->col, CB, CC, CHW, CHW, CC, 3, 1, 1);
}

static void conv_fwdbwd(void *ctx) {
    Bench *b = ctx;
    conv_fwd(ctx);
    memset(b->dx, 0, (size_t)CB * CC * CHW * CHW * 4);
    memset(b->dw, 0, (size_t)CC * CC * 9 * 4);
    memset(b->db, 0, CC * 4);
    conv2d_backward(b->dx, b->dw, b->db, b->dy, b->x, b->w, b->col, CB, CC, CHW, CHW, CC, 3, 1, 1);
}

// one training step: batch, losses, backward, Adam (EMA is left out, as in
// the PyTorch reference)
static void train_step(void *ctx) {
    Bench *b = ctx;
    graph_reset(&b->g);
    Tensor *x0 = tensor4(&b->g, b->B, b->C, b->S, b->S),
           *noise = tensor4(&b->g, b->B, b->C, b->S, b->S);
    rng_fill_uniform(&b->rng, x0->data, x0->size, -1.0f, 1.0f);
    rng_fill_normal(&b->rng, noise->data, noise->size, 0.0f, 1.0f);
    int t[64];
    for (int i = 0; i < b->B; i++) t[i] = (int)rng_below(&b->rng, (uint32_t)b->sched.T);
    LossTerms lt;
    diffusion_losses(&b->g, &lt, &b->lc, &b->sched, &b->theta,
                     b->kind == MODEL_CASDM ? &b->phi : NULL, x0, t, noise);
    params_zero_grad(&b->theta.params);
    if (b->kind == MODEL_CASDM) params_zero_grad(&b->phi.params);
    graph_backward(&b->g, lt.loss, NULL);
    adam_step(&b->at, b->theta.params.data, b->theta.params.grad);
    if (b->kind == MODEL_CASDM) adam_step(&b->ap, b->phi.params.data, b->phi.params.grad);
}

static void lpips_step(void *ctx) {
    Bench *b = ctx;
    graph_reset(&b->g);
    Tensor *x = tensor4(&b->g, b->B, 3, 32, 32), *y = tensor4(&b->g, b->B, 3, 32, 32);
    rng_fill_uniform(&b->rng, x->data, x->size, -1.0f, 1.0f);
    rng_fill_uniform(&b->rng, y->data, y->size, -1.0f, 1.0f);
    x->requires_grad = 1;
    graph_backward(&b->g, lpips_loss(&b->g, &b->lpips, x, y), NULL);
}

static void ddim_step(void *ctx) {
    Bench *b = ctx;
    size_t n = (size_t)b->B * 3 * 32 * 32;
    SampleConfig sc = {.kind = MODEL_CASDM, .method = SAMPLER_DDIM, .eta = 0.0f, .clip = 1,
                       .clip_x0 = 1};
    rng_fill_normal(&b->rng, b->x, n, 0.0f, 1.0f);
    sample_step(&b->g, &sc, &b->sched, &b->theta, &b->phi, b->x, b->y, b->B, 3, 32, 32,
                b->sched.T / 2, NULL);
}

static void setup_models(Bench *b, int kind, int ch, int res, const char *attn, int trainable) {
    if (!b->C) { b->C = 3; b->S = 32; }
    UNetConfig c;
    unet_default_config(&c, b->S, b->C, model_theta_out(kind, b->C));
    c.model_channels = ch;
    c.num_res_blocks = res;
    c.dropout = b->S == 28 ? 0.0f : 0.1f;  // the demo trains without dropout
    if (b->S == 28) unet_parse_channel_mult(&c, "1,2,2");
    unet_parse_attention(&c, attn);
    b->kind = kind;
    unet_init(&b->theta, &c, trainable, &b->rng);
    if (trainable) adam_init(&b->at, b->theta.params.total, 1e-4f);
    if (kind == MODEL_CASDM) {
        c.out_channels = b->C + 1;
        unet_init(&b->phi, &c, trainable, &b->rng);
        if (trainable) adam_init(&b->ap, b->phi.params.total, 1e-4f);
    }
    schedule_init(&b->sched, SCHEDULE_LINEAR, 1000);  // as ../shared/ref/unet_ref.py
    loss_config_default(&b->lc, kind);
}

static void setup_conv(Bench *b) {
    size_t nx = (size_t)CB * CC * CHW * CHW, nw = (size_t)CC * CC * 9;
    b->x = mallocCheck(nx * 4);
    b->y = mallocCheck(nx * 4);
    b->dx = mallocCheck(nx * 4);
    b->dy = mallocCheck(nx * 4);
    b->w = mallocCheck(nw * 4);
    b->dw = mallocCheck(nw * 4);
    b->b = mallocCheck(CC * 4);
    b->db = mallocCheck(CC * 4);
    size_t sf = conv2d_forward_scratch(CB, CC, CHW, CHW, CC, 3, 1, 1),
           sb = conv2d_backward_scratch(CB, CC, CHW, CHW, CC, 3, 1, 1);
    b->col = mallocCheck((sf > sb ? sf : sb) * 4);
    rng_fill_normal(&b->rng, b->x, nx, 0, 1);
    rng_fill_normal(&b->rng, b->dy, nx, 0, 1);
    rng_fill_normal(&b->rng, b->w, nw, 0, 0.03f);
    rng_fill_normal(&b->rng, b->b, CC, 0, 0.1f);
}

// random frozen weights: the speed does not depend on them
static void setup_lpips(Bench *b, int size) {
    lpips_init(&b->lpips);
    for (size_t i = 0; i < b->lpips.params.count; i++) {
        Tensor *t = params_get(&b->lpips.params, i);
        float s = t->ndim == 4 && t->shape[0] > 1 ? sqrtf(2.0f / (float)(t->size / t->shape[0]))
                                                  : 0.1f;
        rng_fill_normal(&b->rng, t->data, t->size, 0, s);
    }
    b->lpips.size = size;
}

// one iteration of casdm train-ae: the generator step (GAN terms on, so the
// adaptive weight and the discriminator's gradient at x_rec are in it) and
// its Adam update, then the discriminator step and its update
static void ae_step(void *ctx) {
    Bench *b = ctx;
    size_t n = (size_t)b->B * 3 * 32 * 32;
    rng_fill_uniform(&b->rng, b->x, n, -1.0f, 1.0f);
    AELossTerms lt;
    params_zero_grad(&b->ae.params);
    ae_generator_grads(&b->aet, b->x, b->B, 1, NULL, &lt);
    adam_step(&b->at, b->ae.params.data, b->ae.params.grad);
    params_zero_grad(&b->disc.params);
    ae_discriminator_grads(&b->aet, b->x, b->B, 1, NULL, &lt);
    adam_step(&b->adam_disc, b->disc.params.data, b->disc.params.grad);
}

// LDDGAN's CIFAR-10 autoencoder (PyTorch's default initialisation), the
// PatchGAN of ndf 64 and 3 layers, taming's LPIPS on random weights without
// head dropout (tools/bench_torch.py ae_step runs its LPIPS in eval mode)
static void setup_ae(Bench *b) {
    AEConfig c;
    ae_cifar10_config(&c);
    ae_init(&b->ae, &c, 1, &b->rng);
    patchgan_init(&b->disc, 3, 64, 3, 1, &b->rng);
    setup_lpips(b, 0);
    b->lpips.max_pool = 1;
    AELossConfig lc;
    ae_loss_default(&lc);
    lc.disc_start = 0;
    ae_trainer_init(&b->aet, &b->ae, &b->disc, &b->lpips, &lc, &b->rng);
    float lr = 4.5e-6f * (float)b->B;
    adam_init(&b->at, b->ae.params.total, lr);
    adam_init(&b->adam_disc, b->disc.params.total, lr);
    b->at.beta1 = b->adam_disc.beta1 = 0.5f;
    b->at.beta2 = b->adam_disc.beta2 = 0.9f;
    b->x = mallocCheck((size_t)b->B * 3 * 1024 * sizeof(float));
}

// one D step of train_ldgan.py with R1 (every lazy_reg-th step's): fresh t and
// noise, D on real and fake pairs, R1 by double backward, Adam
static GanNoise gan_bench_noise(Bench *b) {
    size_t per = 4 * 16 * 16, n = (size_t)b->B;
    for (int i = 0; i < b->B; i++) b->gt[i] = (int)rng_below(&b->rng, 4);
    rng_fill_normal(&b->rng, b->gnoise, n * (3 * per + 50), 0.0f, 1.0f);
    return (GanNoise){b->gnoise, b->gnoise + n * per, b->gnoise + 2 * n * per,
                      b->gnoise + 2 * n * per + n * 50};
}

static void lddgan_d_step(void *ctx) {
    Bench *b = ctx;
    GanNoise nz = gan_bench_noise(b);
    GanTerms terms;
    params_zero_grad(&b->gdisc.params);
    gan_d_grads(&b->gtr, b->x, b->B, b->gt, &nz, 0.02f, &terms);
    adam_step(&b->gopt.adam_d, b->gdisc.params.data, b->gdisc.params.grad);
}

// one G step: G forward and backward through the frozen D, Adam, the EMA
static void lddgan_g_step(void *ctx) {
    Bench *b = ctx;
    GanNoise nz = gan_bench_noise(b);
    GanTerms terms;
    params_zero_grad(&b->gen.params);
    gan_g_grads(&b->gtr, b->x, b->B, b->gt, &nz, 0.5f, &terms);
    adam_step(&b->gopt.adam_g, b->gen.params.data, b->gen.params.grad);
    gan_ema_update(b->gopt.ema, b->gen.params.data, b->gen.params.total, 0.9999);
}

// 100 samples as casdm sample makes them: x_T, 4 generator calls with their
// posterior samples, decode(x * 105), no gradients
static void lddgan_sample(void *ctx) {
    Bench *b = ctx;
    size_t per = 4 * 16 * 16, n = 100;
    float *x = b->x, *z = b->gnoise, *eps = z + 4 * n * 50;
    rng_fill_normal(&b->rng, x, n * per, 0.0f, 1.0f);
    rng_fill_normal(&b->rng, z, 4 * n * 50 + 4 * n * per, 0.0f, 1.0f);
    graph_reset(&b->g);
    gan_sample(&b->g, &b->gen, &b->gsched, x, (int)n, z, eps, x);
    int zs[4] = {(int)n, 4, 16, 16};
    Tensor *lat = tensor_from(&b->g, 4, zs, x);
    for (size_t i = 0; i < lat->size; i++) lat->data[i] *= 105.0f;
    ae_decode(&b->g, &b->ae, lat);
}

// LDDGAN's CIFAR-10 networks with the official initialisation, latents
// uniform in [-1, 1] (the scaled latent's range)
static void setup_lddgan(Bench *b, int sample) {
    GanGenConfig c;
    gan_gen_cifar10_config(&c);
    gan_gen_init(&b->gen, &c, !sample, &b->rng);
    gan_schedule_init(&b->gsched, 4, 0.1, 20.0);
    size_t per = 4 * 16 * 16, n = sample ? 100 : (size_t)b->B;
    b->x = mallocCheck(n * per * sizeof(float));
    rng_fill_uniform(&b->rng, b->x, n * per, -1.0f, 1.0f);
    b->gnoise = mallocCheck(4 * n * (per + 50) * sizeof(float));
    b->gt = mallocCheck(n * sizeof(int));
    b->g.training = 0;
    if (sample) {
        b->B = 100;
        b->g.grad_enabled = 0;
        AEConfig ac;
        ae_cifar10_config(&ac);
        ae_init(&b->ae, &ac, 0, &b->rng);
        return;
    }
    gan_disc_init(&b->gdisc, 8, 64, 256, 3, 1, &b->rng);
    gan_trainer_init(&b->gtr, &b->gen, &b->gdisc, &b->gsched);
    gan_optim_init(&b->gopt, &b->gen, &b->gdisc, 1.6e-4, 1.25e-4, 0.9999);
    b->gopt.ema = mallocCheck(b->gen.params.total * sizeof(float));
    memcpy(b->gopt.ema, b->gen.params.data, b->gen.params.total * sizeof(float));
}

static void inception_step(void *ctx) {
    Bench *b = ctx;
    inception_forward(&b->inception, b->x, b->B, 32, 32, b->pool3, b->spatial, b->logits);
}

// random weights (He-scaled, small biases), images in [0, 1]
static void setup_inception(Bench *b) {
    size_t n = inception_alloc(&b->inception);
    rng_fill_normal(&b->rng, b->inception.mem, n, 0.0f, 0.05f);
    b->x = mallocCheck((size_t)b->B * 3 * 1024 * sizeof(float));
    rng_fill_uniform(&b->rng, b->x, (size_t)b->B * 3 * 1024, 0.0f, 1.0f);
    b->pool3 = mallocCheck((size_t)b->B * INCEPTION_POOL * sizeof(float));
    b->spatial = mallocCheck((size_t)b->B * INCEPTION_SPATIAL * sizeof(float));
    b->logits = mallocCheck((size_t)b->B * INCEPTION_LOGITS * sizeof(float));
}

// the case's inputs and step function (NULL: unknown case); the FLOPs the
// step does per counted forward FLOP go in b->flops_mult
static step_fn setup_case(Bench *b, const char *cs, int *warmup, int *iters) {
    if (!strncmp(cs, "conv3x3", 7)) {
        setup_conv(b);
        int both = strstr(cs, "fwdbwd") != NULL;
        b->flops_mult = both ? 3.0 : 1.0;
        if (!both) { *warmup = 3; *iters = *iters < 20 ? 20 : *iters; }
        return both ? conv_fwdbwd : conv_fwd;
    }
    int big = strstr(cs, "128") != NULL;
    if (!strcmp(cs, "unet_ch64_step") || !strcmp(cs, "unet_ch128_step")) {
        setup_models(b, MODEL_DDPM_EPS, big ? 128 : 64, big ? 3 : 2, big ? "16,8" : "16", 1);
        b->flops_mult = 3.0;
        return train_step;
    }
    if (!strcmp(cs, "casdm_ch64_step") || !strcmp(cs, "casdm_ch128_step") ||
        !strcmp(cs, "casdm_ch64_step_ckpt") || !strcmp(cs, "casdm_ch128_step_ckpt")) {
        setup_models(b, MODEL_CASDM, big ? 128 : 64, big ? 3 : 2, big ? "16,8" : "16", 1);
        b->theta.use_checkpoint = b->phi.use_checkpoint = strstr(cs, "ckpt") != NULL;
        b->flops_mult = 3.0;
        return train_step;
    }
    if (!strcmp(cs, "demo_step")) {
        b->C = 1;
        b->S = 28;
        b->B = 32;
        setup_models(b, MODEL_CASDM, 32, 1, "", 1);
        b->flops_mult = 3.0;
        return train_step;
    }
    if (!strcmp(cs, "lpips224_fwdbwd") || !strcmp(cs, "lpips64_fwdbwd") ||
        !strcmp(cs, "lpips32_fwdbwd")) {
        setup_lpips(b, atoi(cs + 5));  // lpipsN_fwdbwd: resized from 32x32 to N
        b->flops_mult = 1.5;  // both branches forward (counted) + the input gradient of one
        return lpips_step;
    }
    if (!strcmp(cs, "inception_fwd")) {
        setup_inception(b);
        b->flops_mult = 1.0;
        *warmup = 1;
        return inception_step;
    }
    if (!strcmp(cs, "ae_step")) {
        setup_ae(b);
        b->flops_mult = 1.0;  // (forward FLOPs of every graph in the iteration; backward not counted)
        return ae_step;
    }
    if (!strcmp(cs, "lddgan_d_step_r1") || !strcmp(cs, "lddgan_g_step") ||
        !strcmp(cs, "lddgan_sample100")) {
        int sample = !strcmp(cs, "lddgan_sample100");
        setup_lddgan(b, sample);
        b->flops_mult = 1.0;  // (forward FLOPs of every graph in the step; backward not counted)
        if (sample) *warmup = 1;
        return sample ? lddgan_sample : cs[7] == 'd' ? lddgan_d_step : lddgan_g_step;
    }
    if (!strcmp(cs, "ddim_ch128_step")) {
        setup_models(b, MODEL_CASDM, 128, 3, "16,8", 0);
        b->x = mallocCheck((size_t)b->B * 3 * 1024 * 4);
        b->y = mallocCheck((size_t)b->B * 3 * 1024 * 4);
        b->flops_mult = 1.0;
        return ddim_step;
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: bench peak|CASE [--threads N] [--iters K] [--batch B] [--winograd 0|1] [--precision fp32|bf16|bf16-emulated|bf16-vdpbf16ps|bf16-amx]\n");
        return 2;
    }
    const char *cs = argv[1];
    int threads = 0, iters = 5, warmup = 2, batch = 16;
    for (int i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--threads")) threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--iters")) iters = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--warmup")) warmup = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--batch")) batch = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--winograd")) conv_winograd = atoi(argv[i + 1]) != 0;
        else if (!strcmp(argv[i], "--precision") && !strcmp(argv[i + 1], "bf16"))
            gemm_set_precision(GEMM_BF16);
        else if (!strcmp(argv[i], "--precision") && !strcmp(argv[i + 1], "bf16-emulated"))
            gemm_set_precision(GEMM_BF16_EMULATED);
        else if (!strcmp(argv[i], "--precision") && !strcmp(argv[i + 1], "bf16-vdpbf16ps"))
            gemm_set_precision(GEMM_BF16_VDPBF16PS);
        else if (!strcmp(argv[i], "--precision") && !strcmp(argv[i + 1], "bf16-amx"))
            gemm_set_precision(GEMM_BF16_AMX);
        else if (!strcmp(argv[i], "--precision") && !strcmp(argv[i + 1], "fp32"))
            gemm_set_precision(GEMM_FP32);
        else { fprintf(stderr, "bench: unknown option %s\n", argv[i]); return 2; }
    }
    pool_init(threads);
    if (!strcmp(cs, "peak") || !strcmp(cs, "peak_bf16") || !strcmp(cs, "peak_amx")) {
        double fl[64] = {0}, t0 = now_seconds();
        int amx = !strcmp(cs, "peak_amx");
        pool_run(amx ? peak_amx_task : cs[4] ? peak_bf16_task : peak_task, fl);
        double dt = now_seconds() - t0, total = 0.0;
        for (int i = 0; i < pool_threads(); i++) total += fl[i];
        printf("%s threads=%d gflops=%.1f simd=%s\n", cs, pool_threads(), total / dt / 1e9,
               amx ? (total > 0 ? "amx" : "none") : cs[4] ? (total > 0 ? "avx512-bf16" : "none") : simd_name());
        pool_shutdown();
        return 0;
    }
    Bench b;
    memset(&b, 0, sizeof b);
    graph_init(&b.g, 0, 0);
    b.g.training = 1;
    b.g.rng = &b.rng;
    rng_seed(&b.rng, 1, 1);
    b.B = batch;
    step_fn f = setup_case(&b, cs, &warmup, &iters);
    if (!f) {
        fprintf(stderr, "bench: unknown case '%s'\n", cs);
        return 2;
    }
    flops_forward = 0.0;
    f(&b);  // one run to count the FLOPs
    double flops = flops_forward * b.flops_mult;
    double med = time_median(f, &b, warmup > 0 ? warmup - 1 : 0, iters);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf(
        "ours %s threads=%d batch=%d ms=%.2f gflops=%.1f rss_mib=%.1f simd=%s precision=%s arena_peak_mib=%.1f grad_peak_mib=%.1f\n",
        cs, pool_threads(), !strncmp(cs, "conv", 4) ? CB : b.B, med * 1e3, flops / med / 1e9,
        ru.ru_maxrss / 1024.0, simd_name(),
        gemm_precision() == GEMM_FP32 ? "fp32" : strstr(gemm_backend_name(), "emulated") ? "bf16-emulated"
                                      : strstr(gemm_backend_name(), "amx") ? "bf16-amx" : "bf16",
        (b.g.arena.peak + (b.g.sub ? b.g.sub->arena.peak : 0)) / 1048576.0,
        (b.g.grad_peak + (b.g.sub ? b.g.sub->grad_peak : 0)) / 1048576.0);
    pool_shutdown();
    sgemm_free_buffers();
    return 0;  // the process ends here; its memory goes with it
}
