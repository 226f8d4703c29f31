// fid.c: scoring samples as the papers' evaluators do.
//
//   Inception-v3 as pytorch-fid runs it (mseitzer/pytorch-fid, inception.py:
//   fid_inception_v3 with FIDInceptionA/C/E_1/E_2; the weights of
//   TensorFlow's 2015-12-05 graph that TTUR's and guided-diffusion's FID
//   use), giving per image
//     pool_3   2048 features (FID)
//     spatial  Mixed_6d.branch1x1 after its ReLU, channels 0-6, as
//              (17, 17, 7) in HWC order: TensorFlow's "mixed_6/conv:0"[..., :7]
//              that guided-diffusion's evaluations/evaluator.py uses (sFID)
//     logits   pool_3 @ fc.weight^T, without fc.bias: the graph's
//              "softmax/logits/MatMul" that improved-gan's inception score
//              and guided-diffusion's evaluator take (IS)
//   FeatStats        mean and covariance of features, streamed in double
//   frechet_distance ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), with the
//                    trace of the square root from symmetric eigenproblems
//   inception_score  exp(E_x KL(p(y|x) || p(y))) over splits (improved-gan)
//
// Inference only, on the engine's kernels (tensor.h): the convolutions are
// conv2d_rect_forward with the batch norms folded into their weights.
#include "casdm.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

// ---------------------------------------------------------------------------
// the network: 94 BasicConv2d units (conv without bias, BatchNorm eps 1e-3,
// ReLU), in the order the forward below runs them. Names are pytorch-fid's
// state_dict keys without ".conv.weight" / ".bn.*".
// ---------------------------------------------------------------------------
typedef struct { const char *name; int ic, oc, kh, kw, stride, ph, pw; } IncSpec;

#define A_BLOCK(m, ic, pool)                                                                    \
    {m ".branch1x1", ic, 64, 1, 1, 1, 0, 0}, {m ".branch5x5_1", ic, 48, 1, 1, 1, 0, 0},         \
    {m ".branch5x5_2", 48, 64, 5, 5, 1, 2, 2}, {m ".branch3x3dbl_1", ic, 64, 1, 1, 1, 0, 0},    \
    {m ".branch3x3dbl_2", 64, 96, 3, 3, 1, 1, 1}, {m ".branch3x3dbl_3", 96, 96, 3, 3, 1, 1, 1}, \
    {m ".branch_pool", ic, pool, 1, 1, 1, 0, 0}
#define C_BLOCK(m, c7)                                                                          \
    {m ".branch1x1", 768, 192, 1, 1, 1, 0, 0}, {m ".branch7x7_1", 768, c7, 1, 1, 1, 0, 0},      \
    {m ".branch7x7_2", c7, c7, 1, 7, 1, 0, 3}, {m ".branch7x7_3", c7, 192, 7, 1, 1, 3, 0},      \
    {m ".branch7x7dbl_1", 768, c7, 1, 1, 1, 0, 0}, {m ".branch7x7dbl_2", c7, c7, 7, 1, 1, 3, 0},\
    {m ".branch7x7dbl_3", c7, c7, 1, 7, 1, 0, 3}, {m ".branch7x7dbl_4", c7, c7, 7, 1, 1, 3, 0}, \
    {m ".branch7x7dbl_5", c7, 192, 1, 7, 1, 0, 3}, {m ".branch_pool", 768, 192, 1, 1, 1, 0, 0}
#define E_BLOCK(m, ic)                                                                          \
    {m ".branch1x1", ic, 320, 1, 1, 1, 0, 0}, {m ".branch3x3_1", ic, 384, 1, 1, 1, 0, 0},       \
    {m ".branch3x3_2a", 384, 384, 1, 3, 1, 0, 1}, {m ".branch3x3_2b", 384, 384, 3, 1, 1, 1, 0}, \
    {m ".branch3x3dbl_1", ic, 448, 1, 1, 1, 0, 0}, {m ".branch3x3dbl_2", 448, 384, 3, 3, 1, 1, 1},\
    {m ".branch3x3dbl_3a", 384, 384, 1, 3, 1, 0, 1},                                            \
    {m ".branch3x3dbl_3b", 384, 384, 3, 1, 1, 1, 0}, {m ".branch_pool", ic, 192, 1, 1, 1, 0, 0}

static const IncSpec inc_spec[INCEPTION_CONVS] = {
    {"Conv2d_1a_3x3", 3, 32, 3, 3, 2, 0, 0},
    {"Conv2d_2a_3x3", 32, 32, 3, 3, 1, 0, 0},
    {"Conv2d_2b_3x3", 32, 64, 3, 3, 1, 1, 1},
    {"Conv2d_3b_1x1", 64, 80, 1, 1, 1, 0, 0},
    {"Conv2d_4a_3x3", 80, 192, 3, 3, 1, 0, 0},
    A_BLOCK("Mixed_5b", 192, 32),
    A_BLOCK("Mixed_5c", 256, 64),
    A_BLOCK("Mixed_5d", 288, 64),
    {"Mixed_6a.branch3x3", 288, 384, 3, 3, 2, 0, 0},  // InceptionB
    {"Mixed_6a.branch3x3dbl_1", 288, 64, 1, 1, 1, 0, 0},
    {"Mixed_6a.branch3x3dbl_2", 64, 96, 3, 3, 1, 1, 1},
    {"Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3, 2, 0, 0},
    C_BLOCK("Mixed_6b", 128),
    C_BLOCK("Mixed_6c", 160),
    C_BLOCK("Mixed_6d", 160),
    C_BLOCK("Mixed_6e", 192),
    {"Mixed_7a.branch3x3_1", 768, 192, 1, 1, 1, 0, 0},  // InceptionD
    {"Mixed_7a.branch3x3_2", 192, 320, 3, 3, 2, 0, 0},
    {"Mixed_7a.branch7x7x3_1", 768, 192, 1, 1, 1, 0, 0},
    {"Mixed_7a.branch7x7x3_2", 192, 192, 1, 7, 1, 0, 3},
    {"Mixed_7a.branch7x7x3_3", 192, 192, 7, 1, 1, 3, 0},
    {"Mixed_7a.branch7x7x3_4", 192, 192, 3, 3, 2, 0, 0},
    E_BLOCK("Mixed_7b", 1280),
    E_BLOCK("Mixed_7c", 2048),
};
#undef A_BLOCK
#undef C_BLOCK
#undef E_BLOCK

const char *inception_conv_name(int i, int *ic, int *oc, int *kh, int *kw) {
    const IncSpec *s = &inc_spec[i];
    *ic = s->ic; *oc = s->oc; *kh = s->kh; *kw = s->kw;
    return s->name;
}

// The converted file holds pytorch-fid's tensors as they are: for unit u,
// u.conv.weight (oc, ic, kh, kw), u.bn.{weight, bias, running_mean,
// running_var}; fc.weight (1008, 2048), fc.bias. The batch norm (eval mode,
// eps 1e-3 as torchvision's BasicConv2d) is folded into the convolution:
//   w' = w * gamma / sqrt(var + eps),  b' = beta - mean * gamma / sqrt(var + eps)
static const StEntry *want_tensor(const StFile *f, const char *path, const char *name, int ndim,
                                  const int *shape, char *err, size_t errlen) {
    const StEntry *e = st_find(f, name);
    if (!e) {
        snprintf(err, errlen, "%s: no tensor '%s' (write the file with tools/convert_inception.py)",
                 path, name);
        return NULL;
    }
    int same = e->ndim == ndim;
    for (int d = 0; same && d < ndim; d++) same = e->shape[d] == shape[d];
    if (!same) {
        snprintf(err, errlen, "%s: tensor '%s' has the wrong shape (want %d-d, [%d, ...])", path,
                 name, ndim, shape[0]);
        return NULL;
    }
    return e;
}

// one allocation: unit i's folded weights (oc, ic, kh, kw) then its bias, then fc.weight
size_t inception_alloc(Inception *m) {
    memset(m, 0, sizeof *m);
    size_t total = (size_t)INCEPTION_LOGITS * INCEPTION_POOL;
    for (int i = 0; i < INCEPTION_CONVS; i++) {
        const IncSpec *s = &inc_spec[i];
        total += (size_t)s->oc * s->ic * s->kh * s->kw + (size_t)s->oc;
    }
    m->mem = mallocCheck(total * sizeof(float));
    float *p = m->mem;
    for (int i = 0; i < INCEPTION_CONVS; i++) {
        const IncSpec *s = &inc_spec[i];
        m->w[i] = p;
        m->b[i] = p + (size_t)s->oc * s->ic * s->kh * s->kw;
        p = m->b[i] + s->oc;
    }
    m->fc_w = p;
    return total;
}

int inception_load(Inception *m, const char *path, char *err, size_t errlen) {
    memset(m, 0, sizeof *m);
    StFile f;
    if (st_read(path, &f, err, errlen) != 0) return -1;
    inception_alloc(m);
    int rc = 0;
    for (int i = 0; i < INCEPTION_CONVS && rc == 0; i++) {
        const IncSpec *s = &inc_spec[i];
        char name[128];
        int wshape[4] = {s->oc, s->ic, s->kh, s->kw}, vshape[1] = {s->oc};
        const StEntry *w, *bn[4];
        static const char *bn_names[4] = {"weight", "bias", "running_mean", "running_var"};
        snprintf(name, sizeof name, "%s.conv.weight", s->name);
        if (!(w = want_tensor(&f, path, name, 4, wshape, err, errlen))) { rc = -1; break; }
        for (int k = 0; k < 4 && rc == 0; k++) {
            snprintf(name, sizeof name, "%s.bn.%s", s->name, bn_names[k]);
            if (!(bn[k] = want_tensor(&f, path, name, 1, vshape, err, errlen))) rc = -1;
        }
        if (rc) break;
        size_t per = (size_t)s->ic * s->kh * s->kw;
        for (int o = 0; o < s->oc; o++) {
            double var = bn[3]->data[o];
            if (!(var >= 0.0) || !isfinite(var)) {
                snprintf(err, errlen, "%s: '%s.bn.running_var' has a negative or non-finite value",
                         path, s->name);
                rc = -1;
                break;
            }
            double k = bn[0]->data[o] / sqrt(var + 1e-3);
            for (size_t j = 0; j < per; j++)
                m->w[i][o * per + j] = (float)(w->data[o * per + j] * k);
            m->b[i][o] = (float)(bn[1]->data[o] - bn[2]->data[o] * k);
        }
    }
    if (rc == 0) {
        int fw[2] = {INCEPTION_LOGITS, INCEPTION_POOL}, fb[1] = {INCEPTION_LOGITS};
        const StEntry *w = want_tensor(&f, path, "fc.weight", 2, fw, err, errlen);
        // fc.bias is checked (the layout is pytorch-fid's) but not used: see logits above
        const StEntry *b = w ? want_tensor(&f, path, "fc.bias", 1, fb, err, errlen) : NULL;
        if (!w || !b) rc = -1;
        else memcpy(m->fc_w, w->data, w->size * sizeof(float));
    }
    st_free(&f);
    if (rc) inception_free(m);
    return rc;
}

void inception_free(Inception *m) {
    free(m->mem);
    memset(m, 0, sizeof *m);
}

// ---------------------------------------------------------------------------
// the forward. Activations (N, C, H, W) live in two arenas used in turn (a
// stage's input in one, its output in the other) and a scratch arena for
// the branches and the convolutions' scratch, reset after every stage.
// ---------------------------------------------------------------------------
typedef struct { float *d; int n, c, h, w; } Map;
typedef struct {
    const Inception *m;
    Arena out[2], scratch;
    int cur;              // the arena the last stage wrote
    int next;             // the next unit of inc_spec
} Run;

static Map map_in(Arena *a, int n, int c, int h, int w) {
    Map y = {NULL, n, c, h, w};
    y.d = arena_floats(a, (size_t)n * c * h * w);
    return y;
}

// a stage's output, in the arena its input is not in
static Map stage_output(Run *r, int c, int h, int w, int n) {
    r->cur ^= 1;
    arena_reset(&r->out[r->cur]);
    return map_in(&r->out[r->cur], n, c, h, w);
}

static int out_size(int in, int k, int stride, int pad) { return (in + 2 * pad - k) / stride + 1; }

// the next BasicConv2d on x, its output in arena a
static Map conv_unit(Run *r, Arena *a, Map x) {
    const IncSpec *s = &inc_spec[r->next];
    if (s->ic != x.c) fatal("fid.c: unit %s expects %d channels, got %d", s->name, s->ic, x.c);
    Map y = map_in(a, x.n, s->oc, out_size(x.h, s->kh, s->stride, s->ph),
                   out_size(x.w, s->kw, s->stride, s->pw));
    ArenaMark mk = arena_mark(&r->scratch);
    float *col = arena_floats(&r->scratch, conv2d_rect_forward_scratch(x.n, x.c, x.h, x.w, s->oc,
                                                                        s->kh, s->kw, s->stride,
                                                                        s->ph, s->pw) + 1);
    conv2d_rect_forward(y.d, x.d, r->m->w[r->next], r->m->b[r->next], col, x.n, x.c, x.h, x.w,
                        s->oc, s->kh, s->kw, s->stride, s->ph, s->pw, 1);
    if (a != &r->scratch) arena_release(&r->scratch, mk);
    r->next++;
    return y;
}

// a stem unit: a stage of its own
static Map stem_conv(Run *r, Map x) {
    r->cur ^= 1;
    arena_reset(&r->out[r->cur]);
    Map y = conv_unit(r, &r->out[r->cur], x);
    arena_reset(&r->scratch);
    return y;
}

static Map pool_map(Arena *a, Map x, int k, int stride, int pad, int max) {
    Map y = map_in(a, x.n, x.c, out_size(x.h, k, stride, pad), out_size(x.w, k, stride, pad));
    if (max) maxpool2d_forward(y.d, x.d, (size_t)x.n * x.c, x.h, x.w, k, stride, pad);
    else avgpool2d_valid_forward(y.d, x.d, (size_t)x.n * x.c, x.h, x.w, k, stride, pad);
    return y;
}

// copies x into channels [c0, c0 + x.c) of y (torch.cat(outputs, 1))
static int put_channels(Map y, Map x, int c0) {
    size_t hw = (size_t)x.h * x.w;
    for (int n = 0; n < x.n; n++)
        memcpy(y.d + ((size_t)n * y.c + c0) * hw, x.d + (size_t)n * x.c * hw,
               (size_t)x.c * hw * sizeof(float));
    return c0 + x.c;
}

static Map max_pool_stage(Run *r, Map x) {  // nn.MaxPool2d(kernel_size=3, stride=2)
    r->cur ^= 1;
    arena_reset(&r->out[r->cur]);
    return pool_map(&r->out[r->cur], x, 3, 2, 0, 1);
}

// FIDInceptionA: 1x1 | 1x1, 5x5 | 1x1, 3x3, 3x3 | avg pool 3x3 (valid pixels), 1x1
static Map block_a(Run *r, Map x, int pool_features) {
    Arena *s = &r->scratch;
    Map y = stage_output(r, 224 + pool_features, x.h, x.w, x.n);
    int c = put_channels(y, conv_unit(r, s, x), 0);
    c = put_channels(y, conv_unit(r, s, conv_unit(r, s, x)), c);
    c = put_channels(y, conv_unit(r, s, conv_unit(r, s, conv_unit(r, s, x))), c);
    put_channels(y, conv_unit(r, s, pool_map(s, x, 3, 1, 1, 0)), c);
    arena_reset(s);
    return y;
}

// InceptionB (Mixed_6a): 3x3 stride 2 | 1x1, 3x3, 3x3 stride 2 | max pool 3x3 stride 2
static Map block_b(Run *r, Map x) {
    Arena *s = &r->scratch;
    Map y = stage_output(r, 384 + 96 + x.c, out_size(x.h, 3, 2, 0), out_size(x.w, 3, 2, 0), x.n);
    int c = put_channels(y, conv_unit(r, s, x), 0);
    c = put_channels(y, conv_unit(r, s, conv_unit(r, s, conv_unit(r, s, x))), c);
    put_channels(y, pool_map(s, x, 3, 2, 0, 1), c);
    arena_reset(s);
    return y;
}

// FIDInceptionC: 1x1 | 1x1, 1x7, 7x1 | 1x1, 7x1, 1x7, 7x1, 1x7 | avg pool, 1x1.
// spatial (not NULL for Mixed_6d): the 1x1 branch's first 7 channels, HWC
static Map block_c(Run *r, Map x, float *spatial) {
    Arena *s = &r->scratch;
    Map y = stage_output(r, 768, x.h, x.w, x.n);
    Map b1 = conv_unit(r, s, x);
    if (spatial) {
        size_t hw = (size_t)x.h * x.w;
        for (int n = 0; n < x.n; n++)
            for (size_t p = 0; p < hw; p++)
                for (int ch = 0; ch < INCEPTION_SPATIAL_CH; ch++)
                    spatial[((size_t)n * hw + p) * INCEPTION_SPATIAL_CH + ch] =
                        b1.d[((size_t)n * b1.c + ch) * hw + p];
    }
    int c = put_channels(y, b1, 0);
    Map t = conv_unit(r, s, x);
    for (int k = 0; k < 2; k++) t = conv_unit(r, s, t);
    c = put_channels(y, t, c);
    t = conv_unit(r, s, x);
    for (int k = 0; k < 4; k++) t = conv_unit(r, s, t);
    c = put_channels(y, t, c);
    put_channels(y, conv_unit(r, s, pool_map(s, x, 3, 1, 1, 0)), c);
    arena_reset(s);
    return y;
}

// InceptionD (Mixed_7a): 1x1, 3x3 s2 | 1x1, 1x7, 7x1, 3x3 s2 | max pool 3x3 s2
static Map block_d(Run *r, Map x) {
    Arena *s = &r->scratch;
    Map y = stage_output(r, 320 + 192 + x.c, out_size(x.h, 3, 2, 0), out_size(x.w, 3, 2, 0), x.n);
    int c = put_channels(y, conv_unit(r, s, conv_unit(r, s, x)), 0);
    Map t = conv_unit(r, s, x);
    for (int k = 0; k < 3; k++) t = conv_unit(r, s, t);
    c = put_channels(y, t, c);
    put_channels(y, pool_map(s, x, 3, 2, 0, 1), c);
    arena_reset(s);
    return y;
}

// FIDInceptionE_1 / _2: 1x1 | 1x1, (1x3 | 3x1) | 1x1, 3x3, (1x3 | 3x1) | pool, 1x1;
// the pool is the valid-pixel average in E_1 and a 3x3 stride-1 max pool in
// E_2 (pytorch-fid: "likely an error in this specific Inception
// implementation", kept because the FID weights were trained with it)
static Map block_e(Run *r, Map x, int max_pool) {
    Arena *s = &r->scratch;
    Map y = stage_output(r, 2048, x.h, x.w, x.n);
    int c = put_channels(y, conv_unit(r, s, x), 0);
    Map t = conv_unit(r, s, x);
    c = put_channels(y, conv_unit(r, s, t), c);
    c = put_channels(y, conv_unit(r, s, t), c);
    t = conv_unit(r, s, conv_unit(r, s, x));
    c = put_channels(y, conv_unit(r, s, t), c);
    c = put_channels(y, conv_unit(r, s, t), c);
    put_channels(y, conv_unit(r, s, pool_map(s, x, 3, 1, 1, max_pool)), c);
    arena_reset(s);
    return y;
}

void inception_forward(const Inception *m, const float *images, int N, int H, int W, float *pool3,
                       float *spatial, float *logits) {
    Run r = {.m = m};
    for (int k = 0; k < 2; k++) arena_init(&r.out[k], "inception activations", 64 << 20, 0);
    arena_init(&r.scratch, "inception scratch", 64 << 20, 0);
    // InceptionV3.forward: F.interpolate(size=(299, 299), mode="bilinear",
    // align_corners=False), then 2x - 1 (inputs in [0, 1])
    Map x = map_in(&r.out[0], N, 3, INCEPTION_SIZE, INCEPTION_SIZE);
    size_t n = x.d ? (size_t)N * 3 * INCEPTION_SIZE * INCEPTION_SIZE : 0;
    if (H == INCEPTION_SIZE && W == INCEPTION_SIZE) memcpy(x.d, images, n * sizeof(float));
    else resize_bilinear_forward(x.d, images, (size_t)N * 3, H, W, INCEPTION_SIZE, INCEPTION_SIZE);
    for (size_t i = 0; i < n; i++) x.d[i] = 2.0f * x.d[i] - 1.0f;
    // block 0: three convolutions, max pool; block 1: two, max pool
    for (int k = 0; k < 3; k++) x = stem_conv(&r, x);
    x = max_pool_stage(&r, x);
    for (int k = 0; k < 2; k++) x = stem_conv(&r, x);
    x = max_pool_stage(&r, x);
    // block 2: Mixed_5b-5d, 6a, 6b-6e (the spatial features in 6d)
    x = block_a(&r, x, 32);
    x = block_a(&r, x, 64);
    x = block_a(&r, x, 64);
    x = block_b(&r, x);
    for (int k = 0; k < 4; k++) x = block_c(&r, x, k == 2 ? spatial : NULL);
    // block 3: Mixed_7a-7c, the global average pool
    x = block_d(&r, x);
    x = block_e(&r, x, 0);
    x = block_e(&r, x, 1);
    if (r.next != INCEPTION_CONVS) fatal("fid.c: ran %d of %d units", r.next, INCEPTION_CONVS);
    size_t hw = (size_t)x.h * x.w;
    for (int i = 0; i < N; i++)
        for (int c = 0; c < x.c; c++) {
            double sum = 0.0;
            for (size_t p = 0; p < hw; p++) sum += x.d[((size_t)i * x.c + c) * hw + p];
            pool3[(size_t)i * INCEPTION_POOL + c] = (float)(sum / (double)hw);
        }
    if (logits)  // (N, 1008) = pool3 (N, 2048) @ fc.weight^T
        sgemm(0, 1, (size_t)N, INCEPTION_LOGITS, INCEPTION_POOL, pool3, INCEPTION_POOL, m->fc_w,
              INCEPTION_POOL, 0, logits, INCEPTION_LOGITS);
    for (int k = 0; k < 2; k++) arena_free(&r.out[k]);
    arena_free(&r.scratch);
}

// ---------------------------------------------------------------------------
// feature statistics: mu = shift + sum / n, sigma = (sxx - sum sum^T / n) / (n - 1),
// sums of x - shift in double with shift = the first batch's mean (so the
// products stay small next to the mean, as a two-pass np.cov would have them)
// ---------------------------------------------------------------------------
void featstats_init(FeatStats *s, int d) {
    memset(s, 0, sizeof *s);
    s->d = d;
    s->shift = callocCheck((size_t)d, sizeof(double));
    s->sum = callocCheck((size_t)d, sizeof(double));
    s->sxx = callocCheck((size_t)d * d, sizeof(double));
}

void featstats_free(FeatStats *s) {
    free(s->shift);
    free(s->sum);
    free(s->sxx);
    memset(s, 0, sizeof *s);
}

typedef struct { double *sxx; const double *xc; int d, rows; } Syrk;

static void syrk_range(void *arg, size_t i0, size_t i1) {  // rows i0..i1 of sxx += xc^T xc
    const Syrk *a = arg;
    for (size_t i = i0; i < i1; i++) {
        double *row = a->sxx + i * a->d;
        for (int b = 0; b < a->rows; b++) {
            const double *x = a->xc + (size_t)b * a->d;
            double xi = x[i];
            for (int j = 0; j < a->d; j++) row[j] += xi * x[j];
        }
    }
}

void featstats_add(FeatStats *s, const float *x, int rows) {
    if (rows <= 0) return;
    int d = s->d;
    if (s->n == 0) {
        for (int j = 0; j < d; j++) {
            double m = 0.0;
            for (int b = 0; b < rows; b++) m += x[(size_t)b * d + j];
            s->shift[j] = m / rows;
        }
    }
    double *xc = mallocCheck((size_t)rows * d * sizeof(double));
    for (int b = 0; b < rows; b++)
        for (int j = 0; j < d; j++) {
            double v = (double)x[(size_t)b * d + j] - s->shift[j];
            xc[(size_t)b * d + j] = v;
            s->sum[j] += v;
        }
    Syrk a = {s->sxx, xc, d, rows};
    parallel_for((size_t)d, 16, syrk_range, &a);
    free(xc);
    s->n += rows;
}

int featstats_result(const FeatStats *s, double *mu, double *sigma) {
    if (s->n < 2) return -1;
    int d = s->d;
    double n = (double)s->n;
    for (int j = 0; j < d; j++) mu[j] = s->shift[j] + s->sum[j] / n;
    for (int i = 0; i < d; i++)
        for (int j = 0; j < d; j++)
            sigma[(size_t)i * d + j] =
                (s->sxx[(size_t)i * d + j] - s->sum[i] * s->sum[j] / n) / (n - 1.0);
    return 0;
}

// ---------------------------------------------------------------------------
// symmetric eigenproblems in double: Householder reduction to tridiagonal
// form, then the implicit QL method with Wilkinson shifts (Golub & Van Loan,
// "Matrix Computations", 4th ed., 8.3.1 and 8.3.3; the EISPACK tred2 / tql2
// pair does the same)
// ---------------------------------------------------------------------------
// sum a[j] b[j] in eight interleaved partial sums (a fixed order that the
// compiler can vectorise; one sum in sequence cannot be reordered)
static double dot8(const double *a, const double *b, int n) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int j = 0;
    for (; j + 8 <= n; j += 8)
        for (int q = 0; q < 8; q++) acc[q] += a[j + q] * b[j + q];
    double s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; j < n; j++) s += a[j] * b[j];
    return s;
}

typedef struct { double *a; const double *v; double *w; int n, k; } Reflector;

// w[I] = A[I, k+1:] v[k+1:] for the trailing rows I = k + 1 + i
static void mat_vec_range(void *arg, size_t i0, size_t i1) {
    const Reflector *t = arg;
    int k = t->k, n = t->n;
    for (size_t i = i0; i < i1; i++) {
        size_t I = (size_t)k + 1 + i;
        const double *row = t->a + I * n;
        t->w[I] = dot8(row + k + 1, t->v + k + 1, n - k - 1);
    }
}

// A[I, J] -= 2 (v_I w_J + w_I v_J) over the trailing block
static void rank2_range(void *arg, size_t i0, size_t i1) {
    const Reflector *t = arg;
    int k = t->k, n = t->n;
    const double *v = t->v, *w = t->w;
    for (size_t i = i0; i < i1; i++) {
        size_t I = (size_t)k + 1 + i;
        double *row = t->a + I * n, vi = 2.0 * v[I], wi = 2.0 * w[I];
        for (int j = k + 1; j < n; j++) row[j] -= vi * w[j] + wi * v[j];
    }
}

// rows r of Q <- rows of Q H, H = I - 2 v v^T (v zero up to k)
static void reflect_range(void *arg, size_t r0, size_t r1) {
    const Reflector *t = arg;
    int k = t->k, n = t->n;
    for (size_t r = r0; r < r1; r++) {
        double *q = t->a + r * n, s = 2.0 * dot8(q + k + 1, t->v + k + 1, n - k - 1);
        for (int j = k + 1; j < n; j++) q[j] -= s * t->v[j];
    }
}

// A (n x n, symmetric, destroyed) -> diagonal d, off-diagonal e (e[i]
// couples i and i+1, e[n-1] = 0) and, if zt is not NULL, Q^T (row-major)
// with A = Q T Q^T, Q = H_0 H_1 ... H_{n-3}
static void tridiagonalise(double *a, int n, double *d, double *e, double *zt) {
    double *v = callocCheck((size_t)n, sizeof(double)), *w = callocCheck((size_t)n, sizeof(double));
    if (zt) {
        memset(zt, 0, (size_t)n * n * sizeof(double));
        for (int i = 0; i < n; i++) zt[(size_t)i * n + i] = 1.0;
    }
    for (int k = 0; k + 2 < n; k++) {
        d[k] = a[(size_t)k * n + k];
        // the reflector that zeroes A[k+2:, k]: v = x - alpha e1, normalised,
        // alpha = -sign(x0) ||x|| (no cancellation in x0 - alpha)
        double norm = 0.0;
        for (int i = k + 1; i < n; i++) norm += a[(size_t)i * n + k] * a[(size_t)i * n + k];
        norm = sqrt(norm);
        double x0 = a[(size_t)(k + 1) * n + k], alpha = x0 > 0 ? -norm : norm;
        double vnorm2 = norm * norm - x0 * x0 + (x0 - alpha) * (x0 - alpha);
        if (norm == 0.0 || !(vnorm2 > 0.0)) { e[k] = x0; continue; }
        e[k] = alpha;
        double inv = 1.0 / sqrt(vnorm2);
        for (int i = 0; i <= k; i++) v[i] = 0.0;
        v[k + 1] = (x0 - alpha) * inv;
        for (int i = k + 2; i < n; i++) v[i] = a[(size_t)i * n + k] * inv;
        // H A H = A - 2 v w^T - 2 w v^T with p = A v, w = p - (v^T p) v
        Reflector t = {a, v, w, n, k};
        size_t rows = (size_t)(n - k - 1);
        parallel_for(rows, 32, mat_vec_range, &t);
        double vp = 0.0;
        for (int i = k + 1; i < n; i++) vp += v[i] * w[i];
        for (int i = k + 1; i < n; i++) w[i] -= vp * v[i];
        parallel_for(rows, 32, rank2_range, &t);
        if (zt) {
            Reflector q = {zt, v, NULL, n, k};
            parallel_for((size_t)n, 32, reflect_range, &q);
        }
    }
    if (n >= 2) {
        d[n - 2] = a[(size_t)(n - 2) * n + n - 2];
        e[n - 2] = a[(size_t)(n - 1) * n + n - 2];
    }
    if (n >= 1) { d[n - 1] = a[(size_t)(n - 1) * n + n - 1]; e[n - 1] = 0.0; }
    if (zt)  // Q's rows were updated; QL wants Q^T's rows
        for (int i = 0; i < n; i++)
            for (int j = i + 1; j < n; j++) {
                double t = zt[(size_t)i * n + j];
                zt[(size_t)i * n + j] = zt[(size_t)j * n + i];
                zt[(size_t)j * n + i] = t;
            }
    free(v);
    free(w);
}

// The implicit QL method with Wilkinson shifts on (d, e): d becomes the
// eigenvalues; each plane rotation of rows i, i+1 of zt (if not NULL) makes
// zt's rows the eigenvectors of the original matrix. -1 if an eigenvalue
// took more than 60 iterations.
// rows i, i+1 of zt rotated by (c_i, s_i) for i = m-1 down to first, on
// columns [k0, k1): each thread applies the whole sweep to its columns
typedef struct { double *zt; const double *rot; int n, first, m; } Rotations;

static void rotate_range(void *arg, size_t k0, size_t k1) {
    const Rotations *r = arg;
    for (int i = r->m - 1; i >= r->first; i--) {
        double c = r->rot[2 * i], s = r->rot[2 * i + 1];
        double *zi = r->zt + (size_t)i * r->n, *zj = zi + r->n;
        for (size_t k = k0; k < k1; k++) {
            double t = zj[k];
            zj[k] = s * zi[k] + c * t;
            zi[k] = c * zi[k] - s * t;
        }
    }
}

static int tridiagonal_ql(double *d, double *e, int n, double *zt) {
    // a coupling is negligible next to its two diagonal entries, or next to
    // the matrix's norm (a covariance of fewer samples than dimensions has
    // many eigenvalues at rounding level, whose couplings never become small
    // relative to themselves)
    double norm = 0.0;
    for (int i = 0; i < n; i++) norm = fmax(norm, fabs(d[i]) + fabs(e[i]));
    double tiny = DBL_EPSILON * norm;
    double *rot = mallocCheck(((size_t)2 * n + 2) * sizeof(double));
    for (int l = 0; l < n; l++) {
        for (int iter = 0;; iter++) {
            int m = l;
            for (; m < n - 1; m++) {  // the first negligible coupling below l
                double dd = fabs(d[m]) + fabs(d[m + 1]);
                if (fabs(e[m]) <= DBL_EPSILON * dd || fabs(e[m]) <= tiny) break;
            }
            if (m == l) break;
            if (iter == 60) { free(rot); return -1; }
            // the shift: the eigenvalue of the leading 2x2 nearer d[l]
            double g = (d[l + 1] - d[l]) / (2.0 * e[l]), r = hypot(g, 1.0);
            g = d[m] - d[l] + e[l] / (g + (g >= 0 ? r : -r));
            double s = 1.0, c = 1.0, p = 0.0;
            int i = m - 1, deflated = 0, first = m;
            for (; i >= l; i--) {  // chase the bulge from m up to l
                double f = s * e[i], b = c * e[i];
                r = hypot(f, g);
                e[i + 1] = r;
                if (r == 0.0) {  // underflow: split here and start again
                    d[i + 1] -= p;
                    e[m] = 0.0;
                    deflated = 1;
                    break;
                }
                s = f / r;
                c = g / r;
                g = d[i + 1] - p;
                r = (d[i] - g) * s + 2.0 * c * b;
                p = s * r;
                d[i + 1] = g + p;
                g = c * r - b;
                rot[2 * i] = c;
                rot[2 * i + 1] = s;
                first = i;
            }
            if (zt && first < m) {  // the sweep's rotations, on column blocks in parallel
                Rotations rs = {zt, rot, n, first, m};
                parallel_for((size_t)n, 64, rotate_range, &rs);
            }
            if (deflated) continue;
            d[l] -= p;
            e[l] = g;
            e[m] = 0.0;
        }
    }
    free(rot);
    return 0;
}

int sym_eigen(double *a, int n, double *lambda, double *vt) {
    double *e = callocCheck((size_t)n + 1, sizeof(double));
    tridiagonalise(a, n, lambda, e, vt);
    int rc = tridiagonal_ql(lambda, e, n, vt);
    free(e);
    return rc;
}

// C = A B (n x n, row-major, double) in tiles of 32 rows x 256 columns of C:
// each row k of B's tile is loaded once for the tile's 32 rows (axpy form,
// which the compiler vectorises)
#define DG_ROWS 32
#define DG_COLS 256
typedef struct { double *c; const double *a, *b; int n, col_tiles; } Dgemm;

static void dgemm_range(void *arg, size_t t0, size_t t1) {
    const Dgemm *g = arg;
    int n = g->n;
    for (size_t t = t0; t < t1; t++) {
        int i0 = (int)(t / g->col_tiles) * DG_ROWS, j0 = (int)(t % g->col_tiles) * DG_COLS;
        int i1 = i0 + DG_ROWS < n ? i0 + DG_ROWS : n, j1 = j0 + DG_COLS < n ? j0 + DG_COLS : n;
        for (int i = i0; i < i1; i++)
            for (int j = j0; j < j1; j++) g->c[(size_t)i * n + j] = 0.0;
        for (int k = 0; k < n; k++) {
            const double *bk = g->b + (size_t)k * n;
            for (int i = i0; i < i1; i++) {
                double aik = g->a[(size_t)i * n + k];
                double *ci = g->c + (size_t)i * n;
                for (int j = j0; j < j1; j++) ci[j] += aik * bk[j];
            }
        }
    }
}

static void dgemm(double *c, const double *a, const double *b, int n) {
    int rt = (n + DG_ROWS - 1) / DG_ROWS, ct = (n + DG_COLS - 1) / DG_COLS;
    Dgemm g = {c, a, b, n, ct};
    parallel_for((size_t)rt * ct, 1, dgemm_range, &g);
}

// tr((S1 S2)^1/2) = sum of sqrt(eigenvalues of S1^1/2 S2 S1^1/2): with
// S1 = V diag(l) V^T that matrix is similar to diag(sqrt l) V^T S2 V diag(sqrt l),
// symmetric positive semi-definite; eigenvalues below 0 (rounding, or a
// singular covariance) count as 0
int trace_sqrt_product(const double *s1, const double *s2, int n, double *out) {
    size_t nn = (size_t)n * n;
    double *a = mallocCheck(nn * sizeof(double)), *vt = mallocCheck(nn * sizeof(double));
    double *t = mallocCheck(nn * sizeof(double)), *lambda = mallocCheck((size_t)n * sizeof(double));
    memcpy(a, s1, nn * sizeof(double));
    int rc = sym_eigen(a, n, lambda, vt);
    if (rc == 0) {
        dgemm(t, vt, s2, n);           // V^T S2 (the rows of vt are the v_i)
        for (int i = 0; i < n; i++)    // a = V (vt transposed)
            for (int j = 0; j < n; j++) a[(size_t)j * n + i] = vt[(size_t)i * n + j];
        dgemm(vt, t, a, n);            // B = V^T S2 V, into vt (no longer needed)
        memcpy(a, vt, nn * sizeof(double));
        for (int i = 0; i < n; i++) lambda[i] = lambda[i] > 0 ? sqrt(lambda[i]) : 0.0;
        for (int i = 0; i < n; i++)
            for (int j = 0; j < n; j++) a[(size_t)i * n + j] *= lambda[i] * lambda[j];
        // symmetrise what rounding left uneven, then the eigenvalues alone
        for (int i = 0; i < n; i++)
            for (int j = i + 1; j < n; j++) {
                double m = 0.5 * (a[(size_t)i * n + j] + a[(size_t)j * n + i]);
                a[(size_t)i * n + j] = a[(size_t)j * n + i] = m;
            }
        rc = sym_eigen(a, n, lambda, NULL);
        double sum = 0.0;
        for (int i = 0; i < n; i++) sum += lambda[i] > 0 ? sqrt(lambda[i]) : 0.0;
        *out = sum;
    }
    free(a);
    free(vt);
    free(t);
    free(lambda);
    return rc;
}

// ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2)  (Heusel et al. 2017,
// "GANs trained by a two time-scale update rule...", Eq. 6)
int frechet_distance(const double *mu1, const double *s1, const double *mu2, const double *s2,
                     int n, double *out) {
    double tr_sqrt;
    if (trace_sqrt_product(s1, s2, n, &tr_sqrt) != 0) return -1;
    double diff = 0.0, tr = 0.0;
    for (int i = 0; i < n; i++) {
        diff += (mu1[i] - mu2[i]) * (mu1[i] - mu2[i]);
        tr += s1[(size_t)i * n + i] + s2[(size_t)i * n + i];
    }
    *out = diff + tr - 2.0 * tr_sqrt;
    return 0;
}

// improved-gan's inception score (openai/improved-gan, inception_score/
// model.py): p(y|x) = softmax(logits) per image; for each of `splits`
// parts [i N / splits, (i+1) N / splits) the score exp(mean_x KL(p(y|x) ||
// p(y))) with p(y) the part's mean; the mean and standard deviation of the parts
int inception_score(const float *logits, int N, int classes, int splits, double *mean,
                    double *std) {
    if (splits < 1 || N < splits) return -1;
    double *p = mallocCheck((size_t)N * classes * sizeof(double));
    for (int i = 0; i < N; i++) {
        const float *l = logits + (size_t)i * classes;
        double mx = -INFINITY, z = 0.0;
        for (int c = 0; c < classes; c++) mx = l[c] > mx ? l[c] : mx;
        for (int c = 0; c < classes; c++) z += exp((double)l[c] - mx);
        for (int c = 0; c < classes; c++) p[(size_t)i * classes + c] = exp((double)l[c] - mx) / z;
    }
    double *py = mallocCheck((size_t)classes * sizeof(double)), s1 = 0.0, s2 = 0.0;
    for (int k = 0; k < splits; k++) {
        int a = (int)((long long)k * N / splits), b = (int)((long long)(k + 1) * N / splits);
        for (int c = 0; c < classes; c++) py[c] = 0.0;
        for (int i = a; i < b; i++)
            for (int c = 0; c < classes; c++) py[c] += p[(size_t)i * classes + c];
        for (int c = 0; c < classes; c++) py[c] /= (b - a);
        double kl = 0.0;
        for (int i = a; i < b; i++)
            for (int c = 0; c < classes; c++) {
                double q = p[(size_t)i * classes + c];
                if (q > 0) kl += q * (log(q) - log(py[c]));
            }
        double score = exp(kl / (b - a));
        s1 += score;
        s2 += score * score;
    }
    *mean = s1 / splits;
    double var = s2 / splits - *mean * *mean;
    *std = var > 0 ? sqrt(var) : 0.0;  // np.std: over the parts, ddof 0
    free(p);
    free(py);
    return 0;
}

// ---------------------------------------------------------------------------
// the FD-classifier's network: a small VGG-style CNN that casdm trains itself
// (casdm train-classifier), for a Frechet distance where Inception's features
// mean little (28x28 clothing, as papers on MNIST-like data report it):
//   conv1 3x3 C->32, ReLU, conv2 32->32, ReLU, 2x2 average pool,
//   conv3 32->64, ReLU, conv4 64->64, ReLU, 2x2 average pool,
//   fc1 64 (S/4)^2 -> 128, ReLU (the features), fc2 128 -> 10
// Inputs are (N, C, S, S) in [-1, 1], S a multiple of 4.
// ---------------------------------------------------------------------------
static const char *clf_names[CLF_LAYERS] = {"conv1", "conv2", "conv3", "conv4", "fc1", "fc2"};

void classifier_init(Classifier *c, int channels, int size) {
    memset(c, 0, sizeof *c);
    c->channels = channels;
    c->size = size;
    params_init(&c->params);
    int cin[4] = {channels, 32, 32, 64}, cout[4] = {32, 32, 64, 64};
    size_t idx[2 * CLF_LAYERS];
    char name[64];
    for (int l = 0; l < CLF_LAYERS; l++) {
        int ws[4], bs[1], nd;
        if (l < 4) {
            ws[0] = cout[l], ws[1] = cin[l], ws[2] = ws[3] = 3, nd = 4;
        } else {
            ws[0] = l == 4 ? CLF_FEATURES : CLF_CLASSES;
            ws[1] = l == 4 ? 64 * (size / 4) * (size / 4) : CLF_FEATURES;
            nd = 2;
        }
        bs[0] = ws[0];
        snprintf(name, sizeof name, "%s.weight", clf_names[l]);
        idx[2 * l] = params_add(&c->params, name, nd, ws);
        snprintf(name, sizeof name, "%s.bias", clf_names[l]);
        idx[2 * l + 1] = params_add(&c->params, name, 1, bs);
    }
    params_alloc(&c->params, 1);
    for (int l = 0; l < CLF_LAYERS; l++) {
        c->w[l] = params_get(&c->params, idx[2 * l]);
        c->b[l] = params_get(&c->params, idx[2 * l + 1]);
    }
}

// He-normal weights (torch's kaiming_normal_, fan_in), zero biases
void classifier_init_random(Classifier *c, Rng *rng) {
    for (int l = 0; l < CLF_LAYERS; l++) {
        Tensor *w = c->w[l];
        float std = sqrtf(2.0f / (float)(w->size / w->shape[0]));
        rng_fill_normal(rng, w->data, w->size, 0.0f, std);
        memset(c->b[l]->data, 0, c->b[l]->size * sizeof(float));
    }
}

void classifier_free(Classifier *c) { params_free(&c->params); }

Tensor *classifier_forward(Graph *g, Classifier *c, Tensor *x, Tensor **features) {
    Tensor *h = x;
    for (int l = 0; l < 4; l++) {
        h = conv2d_relu(g, h, c->w[l], c->b[l], 1, 1);
        if (l == 1 || l == 3) h = avgpool2x2(g, h);
    }
    int flat[2] = {h->shape[0], (int)(h->size / h->shape[0])};
    Tensor *f = relu(g, linear(g, reshape(g, h, 2, flat), c->w[4], c->b[4]));
    if (features) *features = f;
    return linear(g, f, c->w[5], c->b[5]);
}

int classifier_save(const Classifier *c, const char *path, char *err, size_t errlen) {
    StWrite *w = mallocCheck(c->params.count * sizeof *w);
    for (size_t i = 0; i < c->params.count; i++) {
        const Tensor *t = &c->params.t[i];
        w[i] = (StWrite){t->name, t->ndim, t->shape, t->data};
    }
    char ch[16], sz[16];
    snprintf(ch, sizeof ch, "%d", c->channels);
    snprintf(sz, sizeof sz, "%d", c->size);
    const char *meta[] = {"format", "casdm-classifier-1", "channels", ch, "size", sz, NULL};
    int rc = st_write(path, w, c->params.count, meta, err, errlen);
    free(w);
    return rc;
}

int classifier_load(Classifier *c, const char *path, char *err, size_t errlen) {
    memset(c, 0, sizeof *c);
    StFile f;
    if (st_read(path, &f, err, errlen) != 0) return -1;
    char fmt[64] = "", ch[16] = "", sz[16] = "";
    if (st_meta(&f, "format", fmt, sizeof fmt) != 0 || strcmp(fmt, "casdm-classifier-1") != 0 ||
        st_meta(&f, "channels", ch, sizeof ch) != 0 || st_meta(&f, "size", sz, sizeof sz) != 0) {
        st_free(&f);
        return errorf(err, errlen, "%s: not a classifier written by casdm train-classifier", path);
    }
    int channels = atoi(ch), size = atoi(sz);
    if ((channels != 1 && channels != 3) || size < 4 || size > 1024 || size % 4) {
        st_free(&f);
        return errorf(err, errlen, "%s: channels %s, size %s: want 1 or 3, a multiple of 4", path,
                      ch, sz);
    }
    classifier_init(c, channels, size);
    int rc = 0;
    for (size_t i = 0; i < c->params.count && rc == 0; i++) {
        Tensor *t = &c->params.t[i];
        const StEntry *e = st_find(&f, t->name);
        int same = e && e->ndim == t->ndim && e->size == t->size;
        for (int d = 0; same && d < t->ndim; d++) same = e->shape[d] == t->shape[d];
        if (!same)
            rc = errorf(err, errlen, "%s: tensor '%s' %s", path, t->name,
                        e ? "has the wrong shape" : "is missing");
        else
            memcpy(t->data, e->data, t->size * sizeof(float));
    }
    st_free(&f);
    if (rc) classifier_free(c);
    return rc;
}
