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
static double c_post1(const Schedule *s, int t) {
    return sqrt(s->abar_prev[t]) * s->beta[t] / (1.0 - s->abar[t]);
}
static double c_post2(const Schedule *s, int t) {
    return sqrt(s->alpha[t]) * (1.0 - s->abar_prev[t]) / (1.0 - s->abar[t]);
}
// mean from epsilon, Eq. 9: mu = (x_t - beta / sqrt(1 - abar) eps) / sqrt(alpha) = k1 x_t - k2 eps.
// (The paper prints 1/sqrt(abar_t) for k1; DDPM's Eq. 11 and Eq. 7 with
// Eq. 8 substituted give 1/sqrt(alpha_t).) Computed directly, not through
// x0*, which is huge at large t.
static double c_eps1(const Schedule *s, int t) { return 1.0 / sqrt(s->alpha[t]); }
static double c_eps2(const Schedule *s, int t) {
    return s->beta[t] / (sqrt(1.0 - s->abar[t]) * sqrt(s->alpha[t]));
}
// x0* from epsilon, Eq. 8: x0* = (x_t - sqrt(1 - abar) eps) / sqrt(abar) = a1 x_t - a2 eps
static double c_x0_1(const Schedule *s, int t) { return 1.0 / sqrt(s->abar[t]); }
static double c_x0_2(const Schedule *s, int t) { return sqrt(1.0 - s->abar[t]) / sqrt(s->abar[t]); }

// a x + b y with per-sample a, b
static Tensor *lin2(Graph *g, Tensor *a, Tensor *x, Tensor *b, Tensor *y) {
    return add(g, mul(g, a, x), mul(g, b, y));
}

// r a + (1 - r) b, r (N,1,H,W) per pixel, broadcast over channels (Eq. 11)
static Tensor *mix(Graph *g, Tensor *r, Tensor *a, Tensor *b) {
    return add(g, mul(g, r, a), mul(g, scale_shift(g, r, -1.0f, 1.0f), b));
}

// L^mu of Eq. 12: the mixing weight learns from the detached means
static Tensor *mu_loss(Graph *g, Tensor *r, Tensor *x0p, Tensor *epsp, Tensor *xt, Tensor *mu_true,
                       const Schedule *s, const int *t, int N) {
    Tensor *mu_x0 = lin2(g, per_sample(g, s, t, N, c_post1), detach(g, x0p),
                         per_sample(g, s, t, N, c_post2), xt);
    Tensor *mu_eps = add(
        g, mul(g, per_sample(g, s, t, N, c_eps1), xt),
        mul(g, scale_shift(g, per_sample(g, s, t, N, c_eps2), -1.0f, 0.0f), detach(g, epsp)));
    return mse_loss(g, mix(g, r, mu_x0, mu_eps), mu_true, NULL);
}

void loss_config_default(LossConfig *lc, int kind) {
    memset(lc, 0, sizeof *lc);
    lc->kind = kind;
    lc->p2_k = 1.0;
    lc->clip_x0 = 1;
    lc->lambda_eps = lc->lambda_x0 = lc->lambda_mu = 1.0f;
    lc->lambda_lpips = 0.1f;
}

// lambda * term (lambda 1: the term itself, so the default adds no rounding)
static Tensor *weighted(Graph *g, Tensor *term, float lambda) {
    return lambda == 1.0f ? term : scale_shift(g, term, lambda, 0.0f);
}

void diffusion_losses(Graph *g, LossTerms *out, const LossConfig *lc, const Schedule *s,
                      UNet *theta, UNet *phi, Tensor *x0, const int *t, Tensor *noise) {
    memset(out, 0, sizeof *out);
    int N = x0->shape[0], C = x0->shape[1];
    for (int i = 0; i < N; i++)
        if (t[i] < 0 || t[i] >= s->T)
            fatal("diffusion_losses: timestep %d outside 0..%d", t[i], s->T - 1);
    float *tm = arena_floats(&g->arena, (size_t)N), *w = arena_floats(&g->arena, (size_t)N);
    for (int i = 0; i < N; i++) {
        tm[i] = schedule_model_t(s, t[i]);
        w[i] = (float)p2_weight(s, t[i], lc->p2_gamma, lc->p2_k);
    }
    const float *p2 = lc->p2_gamma != 0.0 ? w : NULL;
    Tensor *xt = lin2(g, per_sample(g, s, t, N, c_sqrt_abar), x0,
                      per_sample(g, s, t, N, c_sqrt_1m_abar), noise);
    out->xt = xt;
    Tensor *o = unet_forward(g, theta, xt, tm);
    out->theta_out = o;
    Tensor *x0p = NULL;  // the x0 prediction LPIPS applies to

    if (lc->kind == MODEL_DDPM_EPS) {
        out->l_eps = mse_loss(g, o, noise, p2);
        out->loss = weighted(g, out->l_eps, lc->lambda_eps);
    } else if (lc->kind == MODEL_DDPM_X0) {
        x0p = o;
        out->l_x0 = mse_loss(g, o, x0, NULL);
        out->loss = weighted(g, out->l_x0, lc->lambda_x0);
    } else {
        Tensor *mu_true = lin2(g, per_sample(g, s, t, N, c_post1), x0,
                               per_sample(g, s, t, N, c_post2), xt);
        Tensor *epsp, *r;
        if (lc->kind == MODEL_DUAL) {  // Benny & Wolf: one network, [x0, eps, r]
            x0p = slice_channels(g, o, 0, C);
            epsp = slice_channels(g, o, C, 2 * C);
            r = sigmoid(g, slice_channels(g, o, 2 * C, 2 * C + 1));
        } else {  // Cas-DM, Fig. 3: theta -> eps' -> x0* (theta detached) -> phi -> x0', r
            if (!phi) fatal("diffusion_losses: casdm needs the phi network");
            epsp = o;
            Tensor *x0s = lin2(g, per_sample(g, s, t, N, c_x0_1), xt,
                               scale_shift(g, per_sample(g, s, t, N, c_x0_2), -1.0f, 0.0f),
                               detach(g, epsp));
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
        // Eq. 14-15: lambda-weighted sum (Cas-DM: 1 each). Dual diffusion's
        // code averages the three (one MSE over the concatenated channels),
        // which with LPIPS at 0.1 would make LPIPS three times stronger
        // against them than in Cas-DM; by default dual is trained as the
        // paper trains its baselines, with Eq. 15's weights
        out->loss = add(g, add(g, weighted(g, out->l_eps, lc->lambda_eps),
                                   weighted(g, out->l_x0, lc->lambda_x0)),
                        weighted(g, out->l_mu, lc->lambda_mu));
    }
    if (lc->lpips && x0p) {  // Eq. 13, on the x0 prediction only
        out->l_lpips = lc->lpips(g, lc->lpips_ctx, x0p, x0);
        out->loss = add(g, out->loss, scale_shift(g, out->l_lpips, lc->lambda_lpips, 0.0f));
    }
}

// ---------------------------------------------------------------------------
// ---- respacing ----
// ---------------------------------------------------------------------------
static int cmp_int(const void *a, const void *b) {
    return (*(const int *)a > *(const int *)b) - (*(const int *)a < *(const int *)b);
}

int space_timesteps(int T, const char *spec, int *kept, char *err, size_t errlen) {
    if (strncmp(spec, "ddim", 4) == 0) {
        char *end;
        long want = strtol(spec + 4, &end, 10);
        if (end == spec + 4 || *end || want < 1) {
            snprintf(err, errlen, "bad respacing '%s'", spec);
            return -1;
        }
        if (want > T) {
            snprintf(err, errlen, "%ld steps is more than the %d of the chain", want, T);
            return -1;
        }
        for (int stride = 1; stride < T; stride++) {
            int n = (T + stride - 1) / stride;  // len(range(0, T, stride))
            if (n == want) {
                for (int i = 0; i < n; i++) kept[i] = i * stride;
                return n;
            }
        }
        snprintf(err, errlen, "cannot create exactly %ld steps with an integer stride from %d",
                 want, T);
        return -1;
    }
    int counts[256], ns = 0;
    const char *p = spec;
    while (*p) {
        char *end;
        long c = strtol(p, &end, 10);
        if (end == p || c < 1 || ns == 256) {
            snprintf(err, errlen, "bad respacing '%s'", spec);
            return -1;
        }
        // a count is at most T (strtol saturates; a cast to int would wrap)
        if (c > T) {
            snprintf(err, errlen, "a section of %ld steps is more than the %d of the chain", c, T);
            return -1;
        }
        counts[ns++] = (int)c;
        p = end;
        if (*p == ',') p++;
        else if (*p) { snprintf(err, errlen, "bad respacing '%s'", spec); return -1; }
    }
    if (ns == 0) { snprintf(err, errlen, "empty respacing"); return -1; }
    int size_per = T / ns, extra = T % ns, start = 0, n = 0;
    for (int i = 0; i < ns; i++) {
        int size = size_per + (i < extra ? 1 : 0);
        if (size < counts[i]) {
            snprintf(err, errlen, "cannot divide a section of %d steps into %d", size, counts[i]);
            return -1;
        }
        // offsets round(j * (size-1)/(count-1)); numpy/Python round halves to even
        double frac = counts[i] <= 1 ? 1.0 : (double)(size - 1) / (double)(counts[i] - 1);
        double cur = 0.0;
        for (int j = 0; j < counts[i]; j++) {
            kept[n++] = start + (int)nearbyint(cur);
            cur += frac;
        }
        start += size;
    }
    qsort(kept, (size_t)n, sizeof(int), cmp_int);
    int m = 0;  // a set: drop repeats
    for (int i = 0; i < n; i++)
        if (m == 0 || kept[m - 1] != kept[i]) kept[m++] = kept[i];
    return m;
}

void schedule_respace(Schedule *out, const Schedule *base, const int *kept, int n) {
    memset(out, 0, sizeof *out);
    schedule_alloc(out, n);
    out->T_train = base->T_train;
    out->kind = base->kind;
    double last = 1.0;
    for (int j = 0; j < n; j++) {
        double ab = base->abar[kept[j]];
        out->beta[j] = 1.0 - ab / last;
        last = ab;
        out->timestep[j] = base->timestep[kept[j]];
    }
    schedule_finish(out);
}

// ---------------------------------------------------------------------------
// ---- sampling ----
// Each model gives an x0 branch (from a predicted x0), an epsilon branch
// (from a predicted epsilon) or both. A branch's x0 is clipped (when
// sc->clip) and its epsilon re-derived from the clipped x0, as
// improved-diffusion's p_mean_variance / _predict_eps_from_xstart. The step's
// mean comes from each branch by DDIM (Song et al., Eq. 12) or the DDPM
// posterior (Eq. 7); Cas-DM mixes the two means per pixel with r_t (dual
// diffusion mixes the unclipped x0s instead, as its own sampler does)
// (Cas-DM Eq. 16-17; Eq. 17's 1/sqrt(alpha_t) is sqrt(abar_prev)/sqrt(abar_t)
// of the respaced chain, which is what the x0 form below computes).
// ---------------------------------------------------------------------------
int sample_step_noisy(const SampleConfig *sc, int j) {
    return j > 0 && (sc->method == SAMPLER_DDPM || sc->eta > 0.0f);
}

static float clip1(float v, int on) { return on ? (v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v)) : v; }

// The step from the networks' outputs. eps, x0, r: the epsilon prediction,
// the x0 prediction and the r_t logit (each may be NULL), with per-sample
// strides se, sx, sr in floats. x, x_prev, z: (N,C,H,W).
void sample_update(const SampleConfig *sc, const Schedule *s, int j, const float *x, float *x_prev,
                   int N, int C, size_t hw, const float *eps, size_t se, const float *x0, size_t sx,
                   const float *r_logit, size_t sr, const float *z) {
    // per-step coefficients, in double then float (as the PyTorch reference)
    double ab = s->abar[j], abp = s->abar_prev[j];
    float a1 = (float)(1.0 / sqrt(ab)), a2 = (float)sqrt(1.0 / ab - 1.0), cx, ce, sigma;
    if (sc->method == SAMPLER_DDIM) {
        double sg = sc->eta * sqrt((1.0 - abp) / (1.0 - ab)) * sqrt(1.0 - ab / abp);
        double rest = 1.0 - abp - sg * sg;  // can round below 0 at eta 1
        cx = (float)sqrt(abp);                              // x0 coefficient
        ce = (float)sqrt(rest > 0.0 ? rest : 0.0);          // epsilon coefficient
        sigma = (float)sg;
    } else {
        cx = (float)(sqrt(abp) * s->beta[j] / (1.0 - ab));           // posterior mean, x0 term
        ce = (float)(sqrt(s->alpha[j]) * (1.0 - abp) / (1.0 - ab));  // x_t term
        // FIXED_LARGE: beta_t (improved-diffusion gives t = 0 beta~_1, where
        // no noise is added); FIXED_SMALL: the posterior variance (DDPM Eq. 7)
        sigma = (float)sqrt(sc->sigma_large ? s->beta[j] : s->beta[j] * (1.0 - abp) / (1.0 - ab));
    }
    int noisy = sample_step_noisy(sc, j);
    if (noisy && !z) fatal("sample_update: step %d needs noise", j);
    size_t per = (size_t)C * hw;
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++)
            for (size_t p = 0; p < hw; p++) {
                size_t i = n * per + (size_t)c * hw + p, k = (size_t)c * hw + p;
                float xv = x[i], me = 0.0f, mx = 0.0f;
                if (eps) {
                    float x0e = clip1(a1 * xv - a2 * eps[n * se + k], sc->clip);
                    float epse = (a1 * xv - x0e) / a2;
                    me = sc->method == SAMPLER_DDIM ? cx * x0e + ce * epse : cx * x0e + ce * xv;
                }
                if (x0) {
                    float x0x = clip1(x0[n * sx + k], sc->clip);
                    float epsx = (a1 * xv - x0x) / a2;
                    mx = sc->method == SAMPLER_DDIM ? cx * x0x + ce * epsx : cx * x0x + ce * xv;
                }
                float mean;
                if (r_logit && sc->kind == MODEL_DUAL) {
                    // Benny & Wolf's sampler: the unclipped x0s mixed, eps
                    // from that mix, then the mixed x0 clipped (per-branch
                    // clipping above is improved-diffusion's, for casdm)
                    float r = 1.0f / (1.0f + expf(-r_logit[n * sr + p]));
                    float x0m = r * x0[n * sx + k] + (1.0f - r) * (a1 * xv - a2 * eps[n * se + k]);
                    float epsm = (a1 * xv - x0m) / a2, x0c = clip1(x0m, sc->clip);
                    mean = sc->method == SAMPLER_DDIM ? cx * x0c + ce * epsm : cx * x0c + ce * xv;
                } else if (r_logit) {
                    float r = 1.0f / (1.0f + expf(-r_logit[n * sr + p]));
                    mean = r * mx + (1.0f - r) * me;
                } else {
                    mean = eps ? me : mx;
                }
                x_prev[i] = noisy ? mean + sigma * z[i] : mean;
            }
}

void sample_step(Graph *g, const SampleConfig *sc, const Schedule *s, UNet *theta, UNet *phi,
                 const float *x, float *x_prev, int N, int C, int H, int W, int j, const float *z) {
    graph_reset(g);
    int saved = g->grad_enabled, saved_training = g->training;
    g->grad_enabled = 0;
    g->training = 0;
    size_t hw = (size_t)H * W, per = (size_t)C * hw;
    float *tm = arena_floats(&g->arena, (size_t)N);
    for (int i = 0; i < N; i++) tm[i] = schedule_model_t(s, j);
    Tensor *xt = tensor4(g, N, C, H, W);
    memcpy(xt->data, x, (size_t)N * per * sizeof(float));
    Tensor *o = unet_forward(g, theta, xt, tm);
    size_t so = (size_t)o->shape[1] * hw;  // stride of one sample in o
    switch (sc->kind) {
    case MODEL_DDPM_EPS:
        sample_update(sc, s, j, x, x_prev, N, C, hw, o->data, so, NULL, 0, NULL, 0, z);
        break;
    case MODEL_DDPM_X0:
        sample_update(sc, s, j, x, x_prev, N, C, hw, NULL, 0, o->data, so, NULL, 0, z);
        break;
    case MODEL_DUAL:  // [x0, eps, r]
        sample_update(sc, s, j, x, x_prev, N, C, hw, o->data + per, so, o->data, so,
                      o->data + 2 * per, so, z);
        break;
    default: {  // casdm: phi refines x0* = (x_t - sqrt(1-abar) eps') / sqrt(abar)
        if (!phi) fatal("sample_step: casdm needs phi");
        double ab = s->abar[j];
        float a1 = (float)(1.0 / sqrt(ab)), a2 = (float)sqrt(1.0 / ab - 1.0);
        Tensor *x0s = tensor4(g, N, C, H, W);
        for (int n = 0; n < N; n++)
            for (size_t i = 0; i < per; i++)
                x0s->data[n * per + i] = clip1(a1 * x[n * per + i] - a2 * o->data[n * so + i],
                                               sc->clip_x0);
        Tensor *po = unet_forward(g, phi, x0s, tm);
        size_t sp = (size_t)po->shape[1] * hw;
        sample_update(sc, s, j, x, x_prev, N, C, hw, o->data, so, po->data, sp, po->data + per, sp,
                      z);
    }
    }
    g->grad_enabled = saved;
    g->training = saved_training;
}
