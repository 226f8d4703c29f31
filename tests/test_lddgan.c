// test_lddgan.c: lddgan.c against PyTorch. The KL autoencoder (stage one)
// on tiny configurations with tools/ae_ref.py's test weights, regenerated
// here from the parameter names: encoder and decoder outputs, the input and
// latent gradients and every parameter's gradient against
// tests/goldens/ae.safetensors (tools/make_ae_goldens.py, float64); its
// loss (LPIPSWithDiscriminator: both steps, the GAN terms off and on); the
// CIFAR-10 configuration's parameter counts; 1 and 2 threads bitwise.
#define _POSIX_C_SOURCE 200809L
#include "../casdm.h"
#include "test_util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// ae_ref.test_values(prefix + name): splitmix64 base in [-1, 1); weights
// base * sqrt(3 / fan_in), norm gains 1 + 0.1 base, biases 0.1 base
static void test_init_params(ParamSet *ps, const char *prefix) {
    for (size_t p = 0; p < ps->count; p++) {
        Tensor *t = params_get(ps, p);
        char name[200];
        snprintf(name, sizeof name, "%s%s", prefix, t->name);
        uint64_t h = test_name_hash(name);
        double fan_in = t->ndim >= 2 ? (double)t->size / t->shape[0] : 1.0;
        int gain = t->ndim == 1 && ends_with(t->name, ".weight");
        for (size_t i = 0; i < t->size; i++) {
            double base = test_base(h, i);
            double v = t->ndim >= 2 ? base * sqrt(3.0 / fan_in) : gain ? 1.0 + 0.1 * base : 0.1 * base;
            t->data[i] = (float)v;
        }
    }
}

// tools/make_ae_goldens.py's CONFIGS
static void golden_config(AEConfig *c, int grey) {
    memset(c, 0, sizeof *c);
    c->resolution = 16;
    c->in_channels = c->out_ch = grey ? 1 : 3;
    c->ch = 32;
    c->n_levels = grey ? 3 : 2;
    c->ch_mult[0] = 1;
    c->ch_mult[1] = c->ch_mult[2] = 2;
    c->num_res_blocks = 1;
    c->attn_resolutions[0] = grey ? 16 : 8;
    c->n_attn = 1;
    c->z_channels = grey ? 3 : 4;
    c->embed_dim = grey ? 2 : 4;
    c->double_z = 1;
    c->tanh_out = !grey;
}

static StFile ag;

static const StEntry *ae_golden(const char *cfg, const char *what) {
    char key[320];
    snprintf(key, sizeof key, "%s/%s", cfg, what);
    const StEntry *e = st_find(&ag, key);
    if (!e) fatal("tests/goldens/ae.safetensors: no tensor '%s'", key);
    return e;
}

static Tensor *golden_tensor(Graph *g, const char *cfg, const char *what) {
    const StEntry *e = ae_golden(cfg, what);
    return tensor_from(g, e->ndim, e->shape, e->data);
}

// max |a - b| over max |b|
static double rel_to_max(const float *a, const float *b, size_t n) {
    double e = 0.0, m = 1e-30;
    for (size_t i = 0; i < n; i++) {
        e = fmax(e, fabs((double)a[i] - b[i]));
        m = fmax(m, fabs((double)b[i]));
    }
    return e / m;
}

// Each parameter's gradient against <prefix>gsample/<name> (256 evenly spaced
// elements, the goldens' way of keeping big gradients small) relative to the
// gradient's rms, <prefix>gnorm/<name> / sqrt(n); the worst, named. Some
// gradients are zero in exact arithmetic: a bias before a GroupNorm (with ch 32
// every group is one channel, so any per-channel constant is removed
// downstream), the key bias of an attention block (it shifts every logit of a
// query alike). There float64 leaves ~1e-16 and float32 ~1e-7 of the model's
// rms gradient: a reference rms below 1e-9 of the model's marks them, and
// they are held to 1e-5 of the model's rms instead.
static double sampled_grad_error(ParamSet *ps, const StFile *f, const char *prefix, char *worst,
                                 size_t worst_len) {
    double sq = 0.0, eg = 0.0;
    for (size_t p = 0; p < ps->count; p++) {
        char key[200];
        snprintf(key, sizeof key, "%sgnorm/%s", prefix, params_get(ps, p)->name);
        const StEntry *e = st_find(f, key);
        if (!e) fatal("gan golden: no %s", key);
        sq += (double)e->data[0] * e->data[0];
    }
    double rms_all = sqrt(sq / (double)ps->total);
    if (worst) worst[0] = 0;
    for (size_t p = 0; p < ps->count; p++) {
        Tensor *tp = params_get(ps, p);
        char key[200];
        snprintf(key, sizeof key, "%sgsample/%s", prefix, tp->name);
        const StEntry *es = st_find(f, key);
        snprintf(key, sizeof key, "%sgnorm/%s", prefix, tp->name);
        double rms = st_find(f, key)->data[0] / sqrt((double)tp->size), e = 0.0;
        size_t m = tp->size < 256 ? tp->size : 256;
        for (size_t k = 0; k < m; k++) e = fmax(e, fabs((double)tp->grad[k * tp->size / m] - es->data[k]));
        e /= rms < 1e-9 * rms_all ? 10.0 * rms_all : rms;
        if (e > eg) {
            eg = e;
            if (worst) snprintf(worst, worst_len, "%s", tp->name);
        }
    }
    return eg;
}

// Each parameter's sampled gradient against <cfg>/<sub>gsample/<name> of the
// autoencoder goldens (see sampled_grad_error)
static double grad_error(ParamSet *ps, const char *cfg, const char *sub, char *worst,
                         size_t worst_len) {
    char prefix[96];
    snprintf(prefix, sizeof prefix, "%s/%s", cfg, sub);
    return sampled_grad_error(ps, &ag, prefix, worst, worst_len);
}

typedef struct {
    double moments, y, dx, dz, grads;  // errors
    char worst[160];                    // the parameter with the worst gradient
    float *all_grads;                   // a copy of every gradient (for the thread check)
    size_t n_grads;
} AERun;

// L = sum(moments * r_moments) + sum(y * r_y), forward and backward
static void ae_run(const char *cfg, int grey, AERun *r) {
    AEConfig c;
    golden_config(&c, grey);
    Autoencoder a;
    ae_init(&a, &c, 1, NULL);
    test_init_params(&a.params, "ae.");
    Graph g;
    graph_init(&g, 0, 0);
    Tensor *x = golden_tensor(&g, cfg, "x"), *z = golden_tensor(&g, cfg, "z");
    x->requires_grad = z->requires_grad = 1;
    Tensor *moments = ae_encode(&g, &a, x), *y = ae_decode(&g, &a, z);
    Tensor *L = add(&g, sum_all(&g, mul(&g, moments, golden_tensor(&g, cfg, "r_moments"))),
                    sum_all(&g, mul(&g, y, golden_tensor(&g, cfg, "r_y"))));
    params_zero_grad(&a.params);
    graph_backward(&g, L, NULL);
    const StEntry *em = ae_golden(cfg, "moments"), *ey = ae_golden(cfg, "y");
    r->moments = moments->size == em->size ? rel_to_max(moments->data, em->data, em->size) : INFINITY;
    r->y = y->size == ey->size ? rel_to_max(y->data, ey->data, ey->size) : INFINITY;
    r->dx = rel_to_max(x->grad, ae_golden(cfg, "dx")->data, x->size);
    r->dz = rel_to_max(z->grad, ae_golden(cfg, "dz")->data, z->size);
    r->grads = grad_error(&a.params, cfg, "", r->worst, sizeof r->worst);
    r->n_grads = a.params.total;
    r->all_grads = mallocCheck(r->n_grads * sizeof(float));
    memcpy(r->all_grads, a.params.grad, r->n_grads * sizeof(float));
    graph_free(&g);
    ae_free(&a);
}

// taming's PatchGAN (ndf 8, 3 layers) on ae_ref's test weights: training
// mode (batch statistics) logits, dx and every parameter's gradient, the
// running statistics after the step, then eval-mode logits with them
static void test_patchgan(void) {
    PatchGAN d;
    patchgan_init(&d, 3, 8, 3, 1, NULL);
    test_init_params(&d.params, "disc.");
    Graph g;
    graph_init(&g, 0, 0);
    g.training = 1;
    Tensor *x = golden_tensor(&g, "disc", "x");
    x->requires_grad = 1;
    Tensor *logits = patchgan_forward(&g, &d, x);
    const StEntry *el = ae_golden("disc", "logits");
    double ef = logits->size == el->size ? rel_to_max(logits->data, el->data, el->size) : INFINITY;
    params_zero_grad(&d.params);
    graph_backward(&g, sum_all(&g, mul(&g, logits, golden_tensor(&g, "disc", "r"))), NULL);
    double eb = rel_to_max(x->grad, ae_golden("disc", "dx")->data, x->size), er = 0.0;
    for (size_t p = 0; p < d.params.count; p++) {
        Tensor *t = params_get(&d.params, p);
        char what[200];
        snprintf(what, sizeof what, "grad/%s", t->name);
        eb = fmax(eb, rel_to_max(t->grad, ae_golden("disc", what)->data, t->size));
    }
    for (size_t p = 0; p < d.buffers.count; p++) {
        Tensor *t = params_get(&d.buffers, p);
        er = fmax(er, rel_to_max(t->data, ae_golden("disc", t->name)->data, t->size));
    }
    graph_reset(&g);
    g.training = 0;
    Tensor *le = patchgan_forward(&g, &d, golden_tensor(&g, "disc", "x_eval"));
    const StEntry *ele = ae_golden("disc", "logits_eval");
    double ee = le->size == ele->size ? rel_to_max(le->data, ele->data, ele->size) : INFINITY;
    test_result(ef <= 1e-5 && eb <= 1e-4 && er <= 1e-5 && ee <= 1e-5 && d.num_batches_tracked == 1,
                "PatchGAN discriminator vs PyTorch: training-mode logits and gradients, running statistics, eval-mode logits",
                "logits %.1e, gradients %.1e of their max, running stats %.1e, eval logits %.1e",
                ef, eb, er, ee);
    graph_free(&g);
    patchgan_free(&d);
}

static void test_ae_loss(void);

static void test_autoencoder_goldens(void) {
    char err[512];
    if (st_read("tests/goldens/ae.safetensors", &ag, err, sizeof err) != 0) {
        test_result(0, "autoencoder golden file", "%s", err);
        return;
    }
    const char *cfgs[2] = {"c3", "c1"};
    for (int k = 0; k < 2; k++) {
        AERun r1, r2;
        pool_init(1);
        ae_run(cfgs[k], k, &r1);
        pool_init(2);
        ae_run(cfgs[k], k, &r2);
        pool_init(0);
        char name[160];
        snprintf(name, sizeof name,
                 "autoencoder %s vs PyTorch: moments, decoder output, dx, dz, every parameter's gradient",
                 k ? "(1 channel, ch_mult 1,2,2, attention at 16, no tanh)"
                   : "(3 channels, ch_mult 1,2, attention at 8, tanh)");
        test_result(r1.moments <= 1e-5 && r1.y <= 1e-5 && r1.dx <= 1e-4 && r1.dz <= 1e-4 &&
                        r1.grads <= 1e-4,
                    name,
                    "moments %.1e, y %.1e of their max (tol 1e-5); dx %.1e, dz %.1e (tol 1e-4); "
                    "gradients %.1e of their rms (tol 1e-4; worst %s)",
                    r1.moments, r1.y, r1.dx, r1.dz, r1.grads, r1.worst);
        int same = r1.n_grads == r2.n_grads &&
                   memcmp(r1.all_grads, r2.all_grads, r1.n_grads * sizeof(float)) == 0 &&
                   r1.moments == r2.moments && r1.y == r2.y;
        snprintf(name, sizeof name, "autoencoder %s: 1 and 2 threads give bitwise the same outputs and gradients", cfgs[k]);
        test_result(same, name, "%zu gradient values", r1.n_grads);
        free(r1.all_grads);
        free(r2.all_grads);
    }
    test_patchgan();
    test_ae_loss();
    st_free(&ag);
}

// A scalar golden <cfg>/<what>, relative error against max(|ref|, 1e-3)
static double scalar_error(const char *cfg, const char *what, double got) {
    double ref = ae_golden(cfg, what)->data[0];
    return fabs(got - ref) / fmax(fabs(ref), 1e-3);
}

// every tensor of a set against <cfg>/<sub><name>, relative to its max
static double set_error(ParamSet *ps, const char *cfg, const char *sub, int use_grad) {
    double e = 0.0;
    for (size_t p = 0; p < ps->count; p++) {
        Tensor *t = params_get(ps, p);
        char what[200];
        snprintf(what, sizeof what, "%s%s", sub, t->name);
        const StEntry *es = ae_golden(cfg, what);
        e = es->size == t->size ? fmax(e, rel_to_max(use_grad ? t->grad : t->data, es->data, t->size))
                                : INFINITY;
    }
    return e;
}

typedef struct {
    double terms, grads, stats_g, d_terms, d_grads, stats_d;
    char worst[160];
    float *all_grads;  // the generator's and discriminator's gradients (the thread check)
    size_t n_grads;
    long batches;
} LossRun;

// LPIPSWithDiscriminator against ae_ref.AELoss (tools/make_ae_goldens.py's
// loss_goldens): one generator step at step 0 (GAN terms off: d_weight is
// still computed, as in contperceptual.py:69-76) or 1 (on), and with the GAN
// on the discriminator step after it
static void loss_run(const char *cfg, int grey, int on, LossRun *r) {
    memset(r, 0, sizeof *r);
    AEConfig c;
    golden_config(&c, grey);
    Autoencoder a;
    ae_init(&a, &c, 1, NULL);
    test_init_params(&a.params, "ae.");
    Lpips lp;
    lpips_init(&lp);
    lpips_test_init(&lp);
    lp.max_pool = 1;
    lp.size = 0;
    PatchGAN d;
    patchgan_init(&d, c.in_channels, 8, 2, 1, NULL);
    test_init_params(&d.params, "disc.");
    AELossConfig lc;
    ae_loss_default(&lc);
    lc.disc_start = 1;  // make_ae_goldens.LOSS
    lc.kl_weight = 0.01f;
    lc.logvar = 0.25f;
    Rng rng;
    rng_seed(&rng, 1, 2);
    AETrainer t;
    ae_trainer_init(&t, &a, &d, &lp, &lc, &rng);
    const float *x = ae_golden(cfg, "loss_x")->data, *eps = ae_golden(cfg, "loss_eps")->data;
    const char *mode = on ? "loss_on/" : "loss_off/";
    char what[200];
    params_zero_grad(&a.params);
    params_zero_grad(&d.params);
    AELossTerms lt;
    ae_generator_grads(&t, x, 2, on, eps, &lt);
    const char *names[7] = {"loss", "l1", "lpips", "nll", "kl", "g_loss", "d_weight"};
    double got[7] = {lt.loss, lt.l1, lt.lpips, lt.nll, lt.kl, lt.g_loss, lt.d_weight};
    for (int i = 0; i < 7; i++) {
        snprintf(what, sizeof what, "%s%s", mode, names[i]);
        r->terms = fmax(r->terms, scalar_error(cfg, what, got[i]));
    }
    r->grads = grad_error(&a.params, cfg, mode, r->worst, sizeof r->worst);
    double dgrad_g = sqrt(grad_norm_sq(d.params.grad, d.params.total));  // toggle_optimizer: none
    snprintf(what, sizeof what, "%sdisc_g/", mode);
    r->stats_g = set_error(&d.buffers, cfg, what, 0) + dgrad_g;
    if (on) {
        ae_discriminator_grads(&t, x, 2, 1, eps, &lt);
        const char *dn[3] = {"d_loss", "logits_real", "logits_fake"};
        double dg[3] = {lt.d_loss, lt.logits_real, lt.logits_fake};
        for (int i = 0; i < 3; i++) {
            snprintf(what, sizeof what, "%s%s", mode, dn[i]);
            r->d_terms = fmax(r->d_terms, scalar_error(cfg, what, dg[i]));
        }
        snprintf(what, sizeof what, "%sdgrad/", mode);
        r->d_grads = set_error(&d.params, cfg, what, 1);
        snprintf(what, sizeof what, "%sdisc_d/", mode);
        r->stats_d = set_error(&d.buffers, cfg, what, 0);
    }
    r->batches = d.num_batches_tracked;
    r->n_grads = a.params.total + d.params.total;
    r->all_grads = mallocCheck(r->n_grads * sizeof(float));
    memcpy(r->all_grads, a.params.grad, a.params.total * sizeof(float));
    memcpy(r->all_grads + a.params.total, d.params.grad, d.params.total * sizeof(float));
    ae_trainer_free(&t);
    patchgan_free(&d);
    lpips_free(&lp);
    ae_free(&a);
}

static void test_ae_loss(void) {
    const char *cfgs[2] = {"c3", "c1"};
    for (int k = 0; k < 2; k++)
        for (int on = 0; on < 2; on++) {
            if (test_quick && (k || !on)) continue;
            LossRun r1, r2;
            pool_init(1);
            loss_run(cfgs[k], k, on, &r1);
            pool_init(2);
            loss_run(cfgs[k], k, on, &r2);
            pool_init(0);
            char name[200];
            if (on)
                snprintf(name, sizeof name,
                         "autoencoder loss %s, GAN on, vs PyTorch: terms, d_weight, every gradient "
                         "of both steps, BatchNorm's running statistics", cfgs[k]);
            else
                snprintf(name, sizeof name,
                         "autoencoder loss %s, GAN off, vs PyTorch: terms, d_weight, every gradient",
                         cfgs[k]);
            test_result(r1.terms <= 1e-4 && r1.grads <= 1e-4 && r1.stats_g <= 1e-5 &&
                            r1.d_terms <= 1e-4 && r1.d_grads <= 1e-4 && r1.stats_d <= 1e-5 &&
                            r1.batches == (on ? 3 : 1),
                        name,
                        "terms %.1e; gradients %.1e of their rms (worst %s); running stats %.1e; "
                        "discriminator step: terms %.1e, gradients %.1e, running stats %.1e; "
                        "%ld batches tracked (tol 1e-4, stats 1e-5)",
                        r1.terms, r1.grads, r1.worst, r1.stats_g, r1.d_terms, r1.d_grads,
                        r1.stats_d, r1.batches);
            snprintf(name, sizeof name,
                     "autoencoder loss %s, GAN %s: 1 and 2 threads give bitwise the same gradients",
                     cfgs[k], on ? "on" : "off");
            test_result(r1.n_grads == r2.n_grads &&
                            memcmp(r1.all_grads, r2.all_grads, r1.n_grads * sizeof(float)) == 0,
                        name, "%zu values", r1.n_grads);
            free(r1.all_grads);
            free(r2.all_grads);
        }
}

// The CIFAR-10 autoencoder of LDDGAN's config: ae_ref.AutoencoderKL(CIFAR10)
// has 6,015,112 encoder and 8,631,555 decoder parameters, 14,646,759 in all
// (quant_conv 72, post_quant_conv 20), as latent-diffusion's modules
static void test_param_counts(void) {
    AEConfig c;
    ae_cifar10_config(&c);
    size_t enc, dec, total = ae_param_count(&c, &enc, &dec);
    test_result(enc == 6015112 && dec == 8631555 && total == 14646759,
                "autoencoder parameter counts of LDDGAN's CIFAR-10 config",
                "encoder %zu (6015112), decoder %zu (8631555), total %zu (14646759)", enc, dec,
                total);
    char err[256];
    AEConfig bad = c;
    bad.ch = 48;  // 48 and 96 channels do not split into 32 groups
    int r1 = ae_check_config(&bad, err, sizeof err);
    int named = strstr(err, "GroupNorm") != NULL;
    bad = c;
    bad.resolution = 31;
    int r2 = ae_check_config(&bad, err, sizeof err);
    test_result(ae_check_config(&c, err, sizeof err) == 0 && r1 != 0 && named && r2 != 0,
                "autoencoder configurations: the CIFAR-10 one passes, bad widths and sides are named",
                "");
}

// the weights file: written, read back bitwise with the same configuration;
// a missing tensor, a wrong shape, a foreign file and a configuration the
// tensors cannot hold are each named
static void test_ae_file(void) {
    AEConfig c;
    golden_config(&c, 0);
    c.dropout = 0.2f;
    Autoencoder a, b;
    ae_init(&a, &c, 0, NULL);
    test_init_params(&a.params, "ae.");
    char err[512];
    a.scale_factor = 105.0f;
    const char *extra[] = {"producer", "tests/test_lddgan.c", NULL};
    int ok = ae_save(&a, "build/ae_test.safetensors", extra, err, sizeof err) == 0 &&
             ae_load(&b, "build/ae_test.safetensors", 1, err, sizeof err) == 0;
    if (ok) {
        int same_data = b.params.total == a.params.total && b.params.grad != NULL &&
                        memcmp(a.params.data, b.params.data, a.params.total * sizeof(float)) == 0;
        AEConfig want = a.cfg;  // (golden_config leaves a third ch_mult entry past n_levels)
        for (int l = want.n_levels; l < AE_MAX_LEVELS; l++) want.ch_mult[l] = 0;
        int same_cfg = memcmp(&want, &b.cfg, sizeof want) == 0;
        snprintf(err, sizeof err, "data %s, configuration %s", same_data ? "same" : "differs",
                 same_cfg ? "same" : "differs");
        ok = same_data && same_cfg && b.scale_factor == 105.0f;
        ae_free(&b);
    }
    test_result(ok, "autoencoder weights file: saved and loaded back bitwise, configuration included",
                "%s", err);
    // broken copies: a tensor left out, another shape, a bigger configuration
    StWrite *w = mallocCheck(a.params.count * sizeof *w);
    for (size_t i = 0; i < a.params.count; i++) {
        Tensor *t = &a.params.t[i];
        w[i] = (StWrite){t->name, t->ndim, t->shape, t->data};
    }
    const char *meta_ok[] = {"format", "casdm-autoencoder-1", "resolution", "16", "in_channels", "3",
                             "out_ch", "3", "ch", "32", "ch_mult", "1,2", "num_res_blocks", "1",
                             "attn_resolutions", "8", "z_channels", "4", "embed_dim", "4",
                             "double_z", "1", "tanh_out", "1", NULL};
    const char *meta_big[] = {"format", "casdm-autoencoder-1", "resolution", "16", "in_channels", "3",
                              "out_ch", "3", "ch", "4096", "ch_mult", "1,2", "num_res_blocks", "1",
                              "attn_resolutions", "8", "z_channels", "4", "embed_dim", "4",
                              "double_z", "1", "tanh_out", "1", NULL};
    int shape[4] = {7, 7, 1, 1};
    st_write("build/ae_missing.safetensors", w, a.params.count - 1, meta_ok, err, sizeof err);
    st_write("build/ae_big.safetensors", w, a.params.count, meta_big, err, sizeof err);
    w[3].shape = shape;
    w[3].ndim = 4;
    st_write("build/ae_shape.safetensors", w, a.params.count, meta_ok, err, sizeof err);
    free(w);
    struct { const char *file, *want; } cases[] = {
        {"build/ae_missing.safetensors", "no tensor 'post_quant_conv.bias'"},
        {"build/ae_shape.safetensors", "has another shape"},
        {"build/ae_big.safetensors", "has another shape"},
        {"tests/goldens/ae.safetensors", "want casdm-autoencoder-1"},
    };
    int named = 1;
    for (int i = 0; i < 4; i++) {
        err[0] = 0;
        int rc = ae_load(&b, cases[i].file, 0, err, sizeof err);
        if (rc == 0) ae_free(&b);
        if (rc == 0 || !strstr(err, cases[i].want) || !strstr(err, cases[i].file)) {
            named = 0;
            fprintf(stderr, "  %s: rc %d, '%s'\n", cases[i].file, rc, err);
        }
    }
    test_result(named, "autoencoder weights file: missing, misshapen, oversized and foreign files are named", "");
    ae_free(&a);
}

// Stage two's diffusion against tools/lddgan_ref.py (tests/goldens/gan.safetensors):
// the T = 4 schedule's every coefficient (the official float32 values:
// betas 0.478255302 ... 0.987403929, tools/lddgan_facts.md section 3), a batch
// of q_sample_pairs and of sample_posterior with torch's noise (t = 0 has no
// noise), and the posterior's gradient in x0 (coef1[t] per sample)
static void test_gan_diffusion(void) {
    StFile f;
    char err[512];
    if (st_read("tests/goldens/gan.safetensors", &f, err, sizeof err) != 0) {
        test_result(0, "GAN golden file", "%s", err);
        return;
    }
    GanSchedule s;
    gan_schedule_init(&s, 4, 0.1, 20.0);
    struct { const char *name; const float *v; int n; } arrays[] = {
        {"betas", s.betas, 5}, {"sigmas", s.sigmas, 5}, {"a_s", s.a_s, 5},
        {"a_s_cum", s.a_s_cum, 5}, {"sigmas_cum", s.sigmas_cum, 5},
        {"posterior_variance", s.post_var, 4}, {"posterior_mean_coef1", s.post_coef1, 4},
        {"posterior_mean_coef2", s.post_coef2, 4},
        {"posterior_log_variance_clipped", s.post_log_var, 4},
    };
    double es = 0.0;
    for (size_t i = 0; i < sizeof arrays / sizeof arrays[0]; i++) {
        char key[96];
        snprintf(key, sizeof key, "schedule/%s", arrays[i].name);
        const StEntry *e = st_find(&f, key);
        if (!e || (int)e->size != arrays[i].n) fatal("gan golden: %s", key);
        for (int k = 0; k < arrays[i].n; k++)  // relative, the log variance's -46 included
            es = fmax(es, fabs(arrays[i].v[k] - e->data[k]) / fmax(1.0, fabs(e->data[k])));
    }
    const StEntry *et = st_find(&f, "diffusion/t"), *x0 = st_find(&f, "diffusion/x0");
    int n = (int)et->size, t[16];
    size_t per = x0->size / (size_t)n;
    for (int i = 0; i < n; i++) t[i] = (int)et->data[i];
    float *x_t = mallocCheck(x0->size * sizeof(float)), *x_tp1 = mallocCheck(x0->size * sizeof(float));
    gan_q_sample_pairs(&s, x0->data, t, st_find(&f, "diffusion/eps1")->data,
                       st_find(&f, "diffusion/eps2")->data, n, per, x_t, x_tp1);
    double ep = fmax(rel_to_max(x_t, st_find(&f, "diffusion/x_t")->data, x0->size),
                     rel_to_max(x_tp1, st_find(&f, "diffusion/x_tp1")->data, x0->size));
    Graph g;
    graph_init(&g, 0, 0);
    const StEntry *xp = st_find(&f, "diffusion/x0_pred");
    Tensor *x0p = tensor_from(&g, xp->ndim, xp->shape, xp->data);
    x0p->requires_grad = 1;
    Tensor *post = gan_sample_posterior(&g, &s, x0p, st_find(&f, "diffusion/x_tp1")->data, t,
                                        st_find(&f, "diffusion/eps3")->data);
    double eq = rel_to_max(post->data, st_find(&f, "diffusion/posterior")->data, post->size);
    graph_backward(&g, sum_all(&g, post), NULL);
    double eg = 0.0;
    for (int i = 0; i < n; i++)
        for (size_t k = 0; k < per; k++) eg = fmax(eg, fabs(x0p->grad[i * per + k] - s.post_coef1[t[i]]));
    test_result(es <= 1e-6 && ep <= 1e-6 && eq <= 1e-6 && eg == 0.0,
                "GAN diffusion (T = 4) vs PyTorch: schedule, q_sample_pairs, sample_posterior",
                "schedule %.1e, pairs %.1e, posterior %.1e of their max (tol 1e-6); d/dx0 = coef1[t] exactly",
                es, ep, eq);
    graph_free(&g);
    free(x_t);
    free(x_tp1);
    st_free(&f);
}

// the discriminator against tools/lddgan_ref.py's DiscriminatorSmall (ngf 8,
// t_emb_dim 32, 3 layers, N = 8: two minibatch-std groups) on the test
// weights "gdisc." + key: logits, the input gradients and every parameter's
// of sum(logits * r); R1 = gamma/2 mean |d sum D / d x_t|^2 (gamma 0.02) by
// double backward against PyTorch's create_graph=True, and its gradient in
// every parameter (those that reach R1 only through LeakyReLU's masks: 0)
typedef struct { double logits, dx, grads, r1, r1_grads; float *all; size_t n; } DiscRun;

static double grads_vs(ParamSet *ps, const StFile *f, const char *prefix, double floor_frac) {
    double gmax = 1e-30, e = 0.0;
    for (size_t p = 0; p < ps->count; p++) {
        char key[200];
        snprintf(key, sizeof key, "%s%s", prefix, params_get(ps, p)->name);
        const StEntry *r = st_find(f, key);
        if (!r) fatal("gan golden: no %s", key);
        for (size_t i = 0; i < r->size; i++) gmax = fmax(gmax, fabs(r->data[i]));
    }
    for (size_t p = 0; p < ps->count; p++) {
        Tensor *t = params_get(ps, p);
        char key[200];
        snprintf(key, sizeof key, "%s%s", prefix, t->name);
        const StEntry *r = st_find(f, key);
        double m = floor_frac * gmax, d = 0.0;  // each tensor against its own max (floored)
        for (size_t i = 0; i < r->size; i++) m = fmax(m, fabs(r->data[i]));
        for (size_t i = 0; i < r->size; i++) d = fmax(d, fabs((double)t->grad[i] - r->data[i]));
        e = fmax(e, d / m);
    }
    return e;
}

static void disc_run(const StFile *f, DiscRun *r) {
    GanDisc d;
    gan_disc_init(&d, 8, 8, 32, 3, 1, NULL);
    test_init_params(&d.params, "gdisc.");
    Graph g;
    graph_init(&g, 0, 0);
    const StEntry *et = st_find(f, "disc/t"), *ex = st_find(f, "disc/x_t"), *ex1 = st_find(f, "disc/x_tp1");
    int t[8];
    for (int i = 0; i < 8; i++) t[i] = (int)et->data[i];
    Tensor *x_t = tensor_from(&g, 4, ex->shape, ex->data), *x_tp1 = tensor_from(&g, 4, ex1->shape, ex1->data);
    x_t->requires_grad = x_tp1->requires_grad = 1;
    Tensor *logits = gan_disc_forward(&g, &d, x_t, t, x_tp1);
    const StEntry *el = st_find(f, "disc/logits"), *er = st_find(f, "disc/r");
    r->logits = logits->size == el->size ? rel_to_max(logits->data, el->data, el->size) : INFINITY;
    params_zero_grad(&d.params);
    graph_backward(&g, logits, er->data);
    r->dx = fmax(rel_to_max(x_t->grad, st_find(f, "disc/dx_t")->data, x_t->size),
                 rel_to_max(x_tp1->grad, st_find(f, "disc/dx_tp1")->data, x_tp1->size));
    r->grads = grads_vs(&d.params, f, "disc/grad/", 1e-3);
    // R1 by double backward
    graph_reset(&g);
    x_t = tensor_from(&g, 4, ex->shape, ex->data);
    x_tp1 = tensor_from(&g, 4, ex1->shape, ex1->data);
    x_t->requires_grad = 1;
    Tensor *gx = graph_grad(&g, sum_all(&g, gan_disc_forward(&g, &d, x_t, t, x_tp1)), x_t);
    Tensor *r1 = scale_shift(&g, sum_all(&g, mul(&g, gx, gx)), 0.02f / 2.0f / 8.0f, 0.0f);
    params_zero_grad(&d.params);
    graph_backward(&g, r1, NULL);
    double ref = st_find(f, "disc/r1")->data[0];
    r->r1 = fabs(r1->data[0] - ref) / fabs(ref);
    r->r1_grads = grads_vs(&d.params, f, "disc/r1_grad/", 1e-3);
    r->n = d.params.total;
    r->all = mallocCheck(r->n * sizeof(float));
    memcpy(r->all, d.params.grad, r->n * sizeof(float));
    graph_free(&g);
    gan_disc_free(&d);
}

// tools/make_gan_goldens.py's small generator: nf 32, ch_mult 1,2, one ResBlock a
// level, attention at side 8, latent 4x8x8, nz 6, zdim 16, 2 mapping layers
static void small_gen_config(GanGenConfig *c) {
    memset(c, 0, sizeof *c);
    c->channels = 4;
    c->image_size = 8;
    c->nf = 32;
    c->n_levels = 2;
    c->ch_mult[0] = 1;
    c->ch_mult[1] = 2;
    c->num_res_blocks = 1;
    c->n_attn = 1;
    c->attn_resolutions[0] = 8;
    c->nz = 6;
    c->zdim = 16;
    c->n_mlp = 2;
}

// the generator against tools/lddgan_ref.py's NCSNpp (nf 32, ch_mult 1,2, one
// ResBlock a level, attention at side 8, so the pyramid, the up and down
// ResBlocks and attention in both paths are all in it) on test_values("ggen."
// + key): the output, dx, dz, and every parameter's gradient (256 samples
// each, relative to its rms; see grad_error for the ones zero in exact
// arithmetic); and the CIFAR-10 configuration's 33,329,668 parameters
static void test_gan_gen(const StFile *f) {
    GanGenConfig c;
    small_gen_config(&c);
    double ey = INFINITY, edx = INFINITY, eg = INFINITY;
    char worst[160] = "";
    float *all[2] = {NULL, NULL};
    size_t n_all = 0;
    for (int th = 1; th <= 2; th++) {
        pool_init(th);
        GanGen G;
        gan_gen_init(&G, &c, 1, NULL);
        test_init_params(&G.params, "ggen.");
        Graph g;
        graph_init(&g, 0, 0);
        const StEntry *ex = st_find(f, "gen/x"), *ez = st_find(f, "gen/z"), *et = st_find(f, "gen/t");
        int t[3] = {(int)et->data[0], (int)et->data[1], (int)et->data[2]};
        Tensor *x = tensor_from(&g, 4, ex->shape, ex->data), *z = tensor_from(&g, 2, ez->shape, ez->data);
        x->requires_grad = z->requires_grad = 1;
        Tensor *y = gan_gen_forward(&g, &G, x, t, z);
        const StEntry *eyr = st_find(f, "gen/y");
        params_zero_grad(&G.params);
        graph_backward(&g, y, st_find(f, "gen/r")->data);
        if (th == 1) {
            ey = y->size == eyr->size ? rel_to_max(y->data, eyr->data, y->size) : INFINITY;
            edx = fmax(rel_to_max(x->grad, st_find(f, "gen/dx")->data, x->size),
                       rel_to_max(z->grad, st_find(f, "gen/dz")->data, z->size));
            eg = sampled_grad_error(&G.params, f, "gen/", worst, sizeof worst);
        }
        n_all = G.params.total;
        all[th - 1] = mallocCheck(n_all * sizeof(float));
        memcpy(all[th - 1], G.params.grad, n_all * sizeof(float));
        graph_free(&g);
        gan_gen_free(&G);
    }
    pool_init(0);
    test_result(ey <= 1e-5 && edx <= 1e-4 && eg <= 1e-4,
                "GAN generator (NCSN++ with AdaGN, FIR resampling, pyramid, attention) vs PyTorch",
                "output %.1e of its max (tol 1e-5); dx, dz %.1e; parameters %.1e of their rms "
                "(tol 1e-4; worst %s)", ey, edx, eg, worst);
    test_result(memcmp(all[0], all[1], n_all * sizeof(float)) == 0,
                "GAN generator: 1 and 2 threads give bitwise the same gradients", "%zu values", n_all);
    free(all[0]);
    free(all[1]);
    GanGenConfig cc;
    gan_gen_cifar10_config(&cc);
    GanGen G;
    gan_gen_init(&G, &cc, 0, NULL);
    test_result(G.params.total == 33329668 && G.params.count == 272 && G.n_mod + 5 == 29,
                "GAN generator's size at LDDGAN's CIFAR-10 config (NCSNpp as run.sh builds it)",
                "%zu parameters (33,329,668), %zu tensors (272), %d modules (29)", G.params.total,
                G.params.count, G.n_mod + 5);
    gan_gen_free(&G);
}

// the step goldens' setting: the small generator and discriminator on
// test_values weights, the T = 4 schedule, a trainer; t and the noise of step/
typedef struct {
    GanGen G;
    GanDisc D;
    GanSchedule s;
    GanTrainer tr;
    int t[8];
    GanNoise nz;
} GanStepFixture;

static void gan_fixture_init(GanStepFixture *fx, const StFile *f) {
    GanGenConfig c;
    small_gen_config(&c);
    gan_gen_init(&fx->G, &c, 1, NULL);
    test_init_params(&fx->G.params, "ggen.");
    gan_disc_init(&fx->D, 8, 8, 32, 3, 1, NULL);
    test_init_params(&fx->D.params, "gdisc.");
    gan_schedule_init(&fx->s, 4, 0.1, 20.0);
    gan_trainer_init(&fx->tr, &fx->G, &fx->D, &fx->s);
    for (int i = 0; i < 8; i++) fx->t[i] = (int)st_find(f, "step/t")->data[i];
    fx->nz = (GanNoise){st_find(f, "step/eps1")->data, st_find(f, "step/eps2")->data,
                        st_find(f, "step/z")->data, st_find(f, "step/eps_post")->data};
}

static void gan_fixture_free(GanStepFixture *fx) {
    gan_trainer_free(&fx->tr);
    gan_gen_free(&fx->G);
    gan_disc_free(&fx->D);
}

// one iteration's gradients against lddgan_ref's d_step_loss / g_step_loss
// with the same noise: the D step with R1 (gamma 0.02), every term and every
// D gradient; the G step (alpha 0.7), its terms and every G gradient
static void test_gan_step(const StFile *f) {
    GanStepFixture fx;
    gan_fixture_init(&fx, f);
    GanGen *G = &fx.G;
    GanDisc *D = &fx.D;
    const int *t = fx.t;
    const GanNoise *nz = &fx.nz;
    const float *x0 = st_find(f, "step/x0")->data;
    GanTerms terms;
    params_zero_grad(&D->params);
    params_zero_grad(&G->params);
    gan_d_grads(&fx.tr, x0, 8, t, nz, 0.02f, &terms);
    double et = 0.0;
    const char *dn[5] = {"step/d_real", "step/d_logit_real", "step/d_r1", "step/d_fake", "step/d_logit_fake"};
    double dv[5] = {terms.d_real, terms.logit_real, terms.r1, terms.d_fake, terms.logit_fake};
    for (int i = 0; i < 5; i++) {
        double r = st_find(f, dn[i])->data[0];
        et = fmax(et, fabs(dv[i] - r) / fmax(fabs(r), 1e-6));
    }
    double ed = grads_vs(&D->params, f, "step/d_grad/", 1e-3);
    double gsum = sqrt(grad_norm_sq(G->params.grad, G->params.total));  // none in the D step
    params_zero_grad(&D->params);
    gan_g_grads(&fx.tr, x0, 8, t, nz, 0.7f, &terms);
    double dsum = sqrt(grad_norm_sq(D->params.grad, D->params.total));  // none in the G step
    const char *gn[2] = {"step/g_adv", "step/rec"};
    double gv[2] = {terms.g_adv, terms.rec};
    for (int i = 0; i < 2; i++) {
        double r = st_find(f, gn[i])->data[0];
        et = fmax(et, fabs(gv[i] - r) / fmax(fabs(r), 1e-6));
    }
    double eg = sampled_grad_error(&G->params, f, "step/g_", NULL, 0);
    // the sampler: four generator calls and posterior samples from x_T
    const StEntry *xi = st_find(f, "sample/x_init"), *so = st_find(f, "sample/out");
    float *out = mallocCheck(xi->size * sizeof(float));
    Graph gs;
    graph_init(&gs, 0, 0);
    gan_sample(&gs, G, &fx.s, xi->data, 3, st_find(f, "sample/z")->data, st_find(f, "sample/eps")->data,
               out);
    double esmp = rel_to_max(out, so->data, so->size);
    graph_free(&gs);
    free(out);
    test_result(esmp <= 1e-5, "GAN sampler (sample_from_model, T = 4) vs PyTorch with the same noise",
                "%.1e of the max (tol 1e-5)", esmp);
    test_result(et <= 1e-4 && ed <= 1e-4 && eg <= 1e-4 && gsum == 0.0 && dsum == 0.0,
                "GAN training iteration vs PyTorch: D step with R1 and G step with the L1 term, same noise",
                "terms %.1e; D gradients %.1e of their max, G gradients %.1e of their rms (tol 1e-4); "
                "the other network untouched in each step", et, ed, eg);
    gan_fixture_free(&fx);
}

// The largest |w - golden| over the sampled weights of ps (256 evenly spaced a
// tensor, as make_gan_goldens.py takes them), in units of lr: e[0] over all,
// e[1] over the elements whose first gradient (grad: the prefix of the step's
// gnorm/ and gsample/, the same elements) is at least 1/10 of its tensor's
// rms. Adam divides each element by its own size, so an element 100x below
// the rms carries float32's rounding of its gradient (1e-5 of the rms) 100x
// amplified: 1e-3 of the rate there is rounding, not a defect. (1e-3 of 1.6e-4
// is one float32 ulp of a weight near 1: the floor of the comparison.) Tensors
// whose gradient is zero in exact arithmetic are left out: attention's key
// bias (softmax ignores the constant q.b), updated from rounding noise on
// both sides. (grad NULL: every element in both.)
static void sampled_weight_error(const ParamSet *ps, const float *data, const StFile *f,
                                 const char *prefix, const char *grad, double lr, double *e,
                                 char *worst, size_t worst_len) {
    double sq = 0.0;
    size_t off = 0;
    char key[200];
    for (size_t p = 0; grad && p < ps->count; p++) {
        snprintf(key, sizeof key, "%sgnorm/%s", grad, ps->t[p].name);
        sq += pow(st_find(f, key)->data[0], 2);
    }
    double rms_all = sqrt(sq / (double)ps->total);
    e[0] = e[1] = 0.0;
    for (size_t p = 0; p < ps->count; p++) {
        const Tensor *tp = &ps->t[p];
        const float *gs = NULL;
        double rms = 0.0;
        if (grad) {
            snprintf(key, sizeof key, "%sgnorm/%s", grad, tp->name);
            rms = st_find(f, key)->data[0] / sqrt((double)tp->size);
            snprintf(key, sizeof key, "%sgsample/%s", grad, tp->name);
            gs = st_find(f, key)->data;
            if (rms < 1e-6 * rms_all) {
                off += tp->size;
                continue;
            }
        }
        snprintf(key, sizeof key, "%s%s", prefix, tp->name);
        const StEntry *es = st_find(f, key);
        if (!es) fatal("gan golden: no %s", key);
        size_t m = tp->size < 256 ? tp->size : 256;
        for (size_t k = 0; k < m; k++) {
            double d = fabs((double)data[off + k * tp->size / m] - es->data[k]) / lr;
            e[0] = fmax(e[0], d);
            if (gs && fabs(gs[k]) < 0.1 * rms) continue;
            if (d > e[1]) snprintf(worst, worst_len, "%s", tp->name);
            e[1] = fmax(e[1], d);
        }
        off += tp->size;
    }
}

// Two whole iterations (gan_iteration: D step with lazy R1, then without;
// Adam (0.5, 0.9) at lr 1.25e-4 / 1.6e-4; G step with alpha 0.7; the EMA,
// at decay 0.5 so that its blend shows) against lddgan_ref.train_iteration
// with torch.optim.Adam and EMA.py's update: every sampled weight of D, G and
// the EMA within 1e-3 of the learning rate. Weighted Learning's alpha against
// closed forms: 1 - sigmoid(phi) = sigmoid(-phi), phi = -6 + 12 epoch / E.
static void test_gan_iteration(const StFile *f) {
    GanStepFixture fx;
    gan_fixture_init(&fx, f);
    GanGen *G = &fx.G;
    GanDisc *D = &fx.D;
    GanOptim op;
    gan_optim_init(&op, G, D, 1.6e-4, 1.25e-4, 0.5);
    GanTerms terms;
    char err[256] = "";
    int rc = 0;
    for (int it = 0; it < 2; it++)
        rc |= gan_iteration(&fx.tr, &op, st_find(f, "step/x0")->data, 8, fx.t, &fx.nz, fx.t, &fx.nz,
                            it == 0 ? 0.02f : 0.0f, 0.7f, &terms, err, sizeof err);
    char wd[160] = "", wg[160] = "", we[160] = "";
    double ed[2], eg[2], ee[2] = {INFINITY, INFINITY};
    sampled_weight_error(&D->params, D->params.data, f, "iter/d/", NULL, 1.25e-4, ed, wd, sizeof wd);
    sampled_weight_error(&G->params, G->params.data, f, "iter/g/", "step/g_", 1.6e-4, eg, wg,
                         sizeof wg);
    if (op.ema)
        sampled_weight_error(&G->params, op.ema, f, "iter/ema/", "step/g_", 1.6e-4, ee, we,
                             sizeof we);
    test_result(rc == 0 && ed[0] <= 1e-3 && eg[1] <= 1e-3 && ee[1] <= 1e-3 && eg[0] <= 2e-2 &&
                    ee[0] <= 2e-2 && op.adam_d.step == 2 && op.adam_g.step == 2,
                "GAN: two full iterations (lazy R1, Adam, EMA) vs PyTorch's optimisers",
                "D %.1e (%s), G %.1e (%s), EMA %.1e (%s) of the learning rate (tol 1e-3; G and "
                "EMA with the elements of gradients < 1/10 of their rms: %.1e, %.1e, tol 2e-2)%s%s",
                ed[0], wd, eg[1], wg, ee[1], we, eg[0], ee[0], rc ? "; " : "", err);
    const double want[5][3] = {{0, 2000, 0.99752737684336534}, {500, 2000, 0.95257412682243336},
                               {950, 2000, 0.57444251681165903}, {1000, 2000, 0.5},
                               {2000, 2000, 0.0024726231566347743}};
    double ea = 0.0;
    for (int i = 0; i < 5; i++)
        ea = fmax(ea, fabs(gan_weighted_alpha((long)want[i][0], (long)want[i][1]) - want[i][2]));
    test_result(ea <= 1e-12, "GAN: Weighted Learning's alpha(epoch) (LDDGAN, E = 2000)",
                "%.1e from sigmoid(6), sigmoid(3), sigmoid(0.3), 1/2, sigmoid(-6)", ea);
    gan_optim_free(&op);
    gan_fixture_free(&fx);
}

static void test_gan_disc(void) {
    StFile f;
    char err[512];
    if (st_read("tests/goldens/gan.safetensors", &f, err, sizeof err) != 0) {
        test_result(0, "GAN golden file", "%s", err);
        return;
    }
    DiscRun a, b;
    pool_init(1);
    disc_run(&f, &a);
    pool_init(2);
    disc_run(&f, &b);
    pool_init(0);
    test_result(a.logits <= 1e-5 && a.dx <= 1e-4 && a.grads <= 1e-4,
                "GAN discriminator vs PyTorch: logits, input gradients, every parameter's gradient",
                "logits %.1e (tol 1e-5); dx %.1e, parameters %.1e of their max (tol 1e-4)", a.logits,
                a.dx, a.grads);
    test_result(a.r1 <= 1e-4 && a.r1_grads <= 1e-4,
                "R1 by double backward vs PyTorch's create_graph=True: the value and its gradient in every parameter",
                "R1 %.1e relative, gradients %.1e of their max (tol 1e-4)", a.r1, a.r1_grads);
    test_result(a.n == b.n && memcmp(a.all, b.all, a.n * sizeof(float)) == 0,
                "GAN discriminator's R1 gradients: 1 and 2 threads bitwise the same", "%zu values", a.n);
    free(a.all);
    free(b.all);
    GanDisc d;
    gan_disc_init(&d, 8, 64, 256, 3, 0, NULL);
    test_result(d.params.total == 7628545,
                "GAN discriminator parameter count of LDDGAN's CIFAR-10 config",
                "%zu (7628545, Discriminator_small(8, 64, 256, 3))", d.params.total);
    gan_disc_free(&d);
    test_gan_gen(&f);
    test_gan_step(&f);
    test_gan_iteration(&f);
    st_free(&f);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--quick") == 0 || strcmp(argv[i], "--emulated") == 0) test_quick = 1;
        else { fprintf(stderr, "usage: %s [--quick | --emulated]\n", argv[0]); return 2; }
    }
    pool_init(0);
    test_param_counts();
    test_autoencoder_goldens();
    test_ae_file();
    test_gan_diffusion();
    test_gan_disc();
    pool_shutdown();
    sgemm_free_buffers();
    return test_failed_count ? 1 : 0;
}
