// ddim.c: noise schedules, P2 loss weighting, the training losses of the
// four models the Cas-DM paper compares (arXiv 2401.02414, Table 1), and
// DDPM / DDIM sampling with respacing and the Cas-DM mixing (Eq. 16-17).
//
// Notation: abar_t = prod_{s<=t} (1 - beta_s) (Eq. 2), x_t = sqrt(abar_t) x0 +
// sqrt(1 - abar_t) eps (Eq. 3). Steps are 0-based as in improved-diffusion:
// t = 0 .. T-1, abar_prev of step 0 is 1.
#define _POSIX_C_SOURCE 200809L
#include "casdm.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

// ---------------------------------------------------------------------------
// ---- schedules ----
// ---------------------------------------------------------------------------
static double cosine_abar(double s) {
    double c = cos((s + 0.008) / 1.008 * 3.14159265358979323846 / 2.0);
    return c * c;
}

static void schedule_alloc(Schedule *s, int T) {
    s->T = T;
    s->beta = mallocCheck((size_t)T * sizeof(double));
    s->alpha = mallocCheck((size_t)T * sizeof(double));
    s->abar = mallocCheck((size_t)T * sizeof(double));
    s->abar_prev = mallocCheck((size_t)T * sizeof(double));
    s->timestep = mallocCheck((size_t)T * sizeof(int));
}

// alphas, cumulative products and abar_prev from the betas, in double
static void schedule_finish(Schedule *s) {
    double prod = 1.0;
    for (int t = 0; t < s->T; t++) {
        s->alpha[t] = 1.0 - s->beta[t];
        s->abar_prev[t] = prod;
        prod *= s->alpha[t];
        s->abar[t] = prod;
    }
}

void schedule_init(Schedule *s, int kind, int T) {
    if (T < 1) fatal("schedule: T=%d must be at least 1", T);
    memset(s, 0, sizeof *s);
    schedule_alloc(s, T);
    s->T_train = T;
    s->kind = kind;
    for (int t = 0; t < T; t++) {
        if (kind == SCHEDULE_LINEAR) {  // numpy.linspace(scale*1e-4, scale*0.02, T)
            double scale = 1000.0 / T, lo = scale * 1e-4, hi = scale * 0.02;
            s->beta[t] = T == 1 ? lo : lo + (hi - lo) * t / (T - 1);
        } else {
            double b = 1.0 - cosine_abar((double)(t + 1) / T) / cosine_abar((double)t / T);
            s->beta[t] = b < 0.999 ? b : 0.999;
        }
        s->timestep[t] = t;
    }
    schedule_finish(s);
}

void schedule_free(Schedule *s) {
    free(s->beta);
    free(s->alpha);
    free(s->abar);
    free(s->abar_prev);
    free(s->timestep);
    memset(s, 0, sizeof *s);
}

int schedule_parse(const char *name) {
    if (strcmp(name, "linear") == 0) return SCHEDULE_LINEAR;
    if (strcmp(name, "cosine") == 0) return SCHEDULE_COSINE;
    return -1;
}

float schedule_model_t(const Schedule *s, int t) {
    return (float)((double)s->timestep[t] * 1000.0 / (double)s->T_train);
}

double p2_weight(const Schedule *s, int t, double gamma, double k) {
    if (gamma == 0.0) return 1.0;
    double snr = 1.0 / (1.0 - s->abar[t]) - 1.0;  // P2-weighting's form of abar/(1-abar)
    return 1.0 / pow(k + snr, gamma);
}

// ---------------------------------------------------------------------------
// ---- models ----
// ---------------------------------------------------------------------------
static const char *model_names[4] = {"ddpm-eps", "ddpm-x0", "dual", "casdm"};

int model_parse(const char *name) {
    for (int i = 0; i < 4; i++)
        if (strcmp(name, model_names[i]) == 0) return i;
    return -1;
}

const char *model_name(int kind) { return kind >= 0 && kind < 4 ? model_names[kind] : "?"; }

// dual diffusion: [x0 (C), eps (C), r logit (1)]; the others predict C channels
int model_theta_out(int kind, int C) { return kind == MODEL_DUAL ? 2 * C + 1 : C; }

// ---------------------------------------------------------------------------
// ---- training losses ----
// Per-sample coefficients are computed in double and applied as (N,1,1,1)
// float tensors, as our PyTorch reference (tools/casdm_ref.py) does.
// ---------------------------------------------------------------------------
typedef double (*coef_fn)(const Schedule *s, int t);

static Tensor *per_sample(Graph *g, const Schedule *s, const int *t, int N, coef_fn f) {
    Tensor *c = tensor4(g, N, 1, 1, 1);
    for (int i = 0; i < N; i++) c->data[i] = (float)f(s, t[i]);
    return c;
}

static double c_sqrt_abar(const Schedule *s, int t) { return sqrt(s->abar[t]); }
static double c_sqrt_1m_abar(const Schedule *s, int t) { return sqrt(1.0 - s->abar[t]); }
// posterior mean, Eq. 7: mu~ = c1 x0 + c2 x_t. (Eq. 10 of the paper prints
// sqrt(abar_t) for the x_t coefficient; the posterior has sqrt(alpha_t).)
static double c_post1(const Schedule *s, int t) { return sqrt(s->abar_prev[t]) * s->beta[t] / (1.0 - s->abar[t]); }
static double c_post2(const Schedule *s, int t) { return sqrt(s->alpha[t]) * (1.0 - s->abar_prev[t]) / (1.0 - s->abar[t]); }
// mean from epsilon, Eq. 9: mu = (x_t - beta / sqrt(1 - abar) eps) / sqrt(alpha) = k1 x_t - k2 eps.
// (The paper prints 1/sqrt(abar_t) for k1; DDPM's Eq. 11 and Eq. 7 with
// Eq. 8 substituted give 1/sqrt(alpha_t).) Computed directly, not through
// x0*, which is huge at large t.
static double c_eps1(const Schedule *s, int t) { return 1.0 / sqrt(s->alpha[t]); }
static double c_eps2(const Schedule *s, int t) { return s->beta[t] / (sqrt(1.0 - s->abar[t]) * sqrt(s->alpha[t])); }
// x0* from epsilon, Eq. 8: x0* = (x_t - sqrt(1 - abar) eps) / sqrt(abar) = a1 x_t - a2 eps
static double c_x0_1(const Schedule *s, int t) { return 1.0 / sqrt(s->abar[t]); }
static double c_x0_2(const Schedule *s, int t) { return sqrt(1.0 - s->abar[t]) / sqrt(s->abar[t]); }

// a x + b y with per-sample a, b
static Tensor *lin2(Graph *g, Tensor *a, Tensor *x, Tensor *b, Tensor *y) { return add(g, mul(g, a, x), mul(g, b, y)); }

// r a + (1 - r) b, r (N,1,H,W) per pixel, broadcast over channels (Eq. 11)
static Tensor *mix(Graph *g, Tensor *r, Tensor *a, Tensor *b) {
    return add(g, mul(g, r, a), mul(g, scale_shift(g, r, -1.0f, 1.0f), b));
}

// L^mu of Eq. 12: the mixing weight learns from the detached means
static Tensor *mu_loss(Graph *g, Tensor *r, Tensor *x0p, Tensor *epsp, Tensor *xt, Tensor *mu_true,
                       const Schedule *s, const int *t, int N) {
    Tensor *mu_x0 = lin2(g, per_sample(g, s, t, N, c_post1), detach(g, x0p), per_sample(g, s, t, N, c_post2), xt);
    Tensor *mu_eps = add(g, mul(g, per_sample(g, s, t, N, c_eps1), xt),
                         mul(g, scale_shift(g, per_sample(g, s, t, N, c_eps2), -1.0f, 0.0f), detach(g, epsp)));
    return mse_loss(g, mix(g, r, mu_x0, mu_eps), mu_true, NULL);
}

void diffusion_losses(Graph *g, LossTerms *out, const LossConfig *lc, const Schedule *s,
                      UNet *theta, UNet *phi, Tensor *x0, const int *t, Tensor *noise) {
    memset(out, 0, sizeof *out);
    int N = x0->shape[0], C = x0->shape[1];
    for (int i = 0; i < N; i++)
        if (t[i] < 0 || t[i] >= s->T) fatal("diffusion_losses: timestep %d outside 0..%d", t[i], s->T - 1);
    float *tm = arena_floats(&g->arena, (size_t)N), *w = arena_floats(&g->arena, (size_t)N);
    for (int i = 0; i < N; i++) {
        tm[i] = schedule_model_t(s, t[i]);
        w[i] = (float)p2_weight(s, t[i], lc->p2_gamma, lc->p2_k);
    }
    const float *p2 = lc->p2_gamma != 0.0 ? w : NULL;
    Tensor *xt = lin2(g, per_sample(g, s, t, N, c_sqrt_abar), x0, per_sample(g, s, t, N, c_sqrt_1m_abar), noise);
    out->xt = xt;
    Tensor *o = unet_forward(g, theta, xt, tm);
    out->theta_out = o;
    Tensor *x0p = NULL;  // the x0 prediction LPIPS applies to

    if (lc->kind == MODEL_DDPM_EPS) {
        out->loss = out->l_eps = mse_loss(g, o, noise, p2);
    } else if (lc->kind == MODEL_DDPM_X0) {
        x0p = o;
        out->loss = out->l_x0 = mse_loss(g, o, x0, NULL);
    } else {
        Tensor *mu_true = lin2(g, per_sample(g, s, t, N, c_post1), x0, per_sample(g, s, t, N, c_post2), xt);
        Tensor *epsp, *r;
        if (lc->kind == MODEL_DUAL) {  // Benny & Wolf: one network, [x0, eps, r]
            x0p = slice_channels(g, o, 0, C);
            epsp = slice_channels(g, o, C, 2 * C);
            r = sigmoid(g, slice_channels(g, o, 2 * C, 2 * C + 1));
        } else {  // Cas-DM, Fig. 3: theta -> eps' -> x0* (theta detached) -> phi -> x0', r
            if (!phi) fatal("diffusion_losses: casdm needs the phi network");
            epsp = o;
            Tensor *x0s = lin2(g, per_sample(g, s, t, N, c_x0_1), xt,
                               scale_shift(g, per_sample(g, s, t, N, c_x0_2), -1.0f, 0.0f), detach(g, epsp));
            out->x0_star = x0s;
            // x0* grows like 1/sqrt(abar_t) at large t (81,000x at t=3999 of
            // the paper's cosine T=4000); the paper is silent, we clip it to
            // [-1,1] as improved-diffusion clips predicted x0 (--no-clip-x0 to turn off)
            Tensor *in = lc->clip_x0 ? clamp(g, x0s, -1.0f, 1.0f) : x0s;
            Tensor *po = unet_forward(g, phi, in, tm);
            out->phi_out = po;
            x0p = slice_channels(g, po, 0, C);
            // r_t: one extra channel through a sigmoid, per pixel, as dual diffusion
            r = sigmoid(g, slice_channels(g, po, C, C + 1));
        }
        out->l_eps = mse_loss(g, epsp, noise, p2);
        out->l_x0 = mse_loss(g, x0p, x0, NULL);
        out->l_mu = mu_loss(g, r, x0p, epsp, xt, mu_true, s, t, N);
        Tensor *sum = add(g, add(g, out->l_eps, out->l_x0), out->l_mu);
        // dual diffusion averages the three terms (one MSE over the
        // concatenated channels); Cas-DM sums them with lambda = 1 (Eq. 14-15)
        out->loss = lc->kind == MODEL_DUAL ? scale_shift(g, sum, 1.0f / 3.0f, 0.0f) : sum;
    }
    if (lc->lpips && x0p) {  // Eq. 13, on the x0 prediction only
        out->l_lpips = lc->lpips(g, lc->lpips_ctx, x0p, x0);
        out->loss = add(g, out->loss, scale_shift(g, out->l_lpips, lc->lambda_lpips, 0.0f));
    }
}
