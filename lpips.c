// lpips.c: LPIPS (Zhang et al. 2018) with a VGG16 trunk, as the Cas-DM paper
// uses it (arXiv 2401.02414, Eq. 13 and "Metric Function"): taken from piq
// with replace_pooling=True, i.e. every max-pool a 2x2 average pool.
//
// What we match (photosynthesis-team/piq LPIPS and richzhang/
// PerceptualSimilarity lpips agree on all of it):
//   T(x): bilinear resize to size x size (align_corners=False, no
//         antialias), then [-1,1] -> [0,1];
//   ImageNet normalisation (x - mean) / std, mean (0.485, 0.456, 0.406),
//         std (0.229, 0.224, 0.225) (piq's form; lpips' shift/scale on
//         [-1,1] inputs is the same map);
//   VGG16 features (torchvision layout) to relu5_3, taps after relu1_2,
//         relu2_2, relu3_3, relu4_3, relu5_3 (features indices 3, 8, 15, 22, 29);
//   per tap: f / (sqrt(sum_c f^2) + 1e-10) per pixel, squared difference,
//         a 1x1 conv without bias (the learned head), spatial mean;
//   distance: the sum over taps.
// Where they differ: lpips puts Dropout(0.5) in its heads in train mode; we
// never apply it (piq has none). The paper's LPIPS is piq's.
//
// taming-transformers' LPIPS (taming/modules/losses/lpips.py), which
// latent-diffusion's LPIPSWithDiscriminator and so LDDGAN's autoencoder
// train with, is the same but for two things (max_pool = 1, size = 0): VGG16
// keeps its max pools, and nothing is resized. Its ScalingLayer (x - shift)
// / scale on [-1, 1] inputs is the ImageNet map above, exactly.
#define _POSIX_C_SOURCE 200809L
#include "casdm.h"

#include <stdlib.h>
#include <string.h>

// torchvision vgg16().features: the out-channels of each conv, 0 = 2x2 pool
static const int vgg_cfg[] = {64, 64,  0,   128, 128, 0,   256, 256, 256,
                              0,  512, 512, 512, 0,   512, 512, 512};
// relu1_2 ... relu5_3 by conv number
static const int tap_after_conv[LPIPS_TAPS] = {1, 3, 6, 9, 12};
static const int tap_channels[LPIPS_TAPS] = {64, 128, 256, 512, 512};

void lpips_init(Lpips *l) {
    memset(l, 0, sizeof *l);
    params_init(&l->params);
    size_t idx_w[LPIPS_CONVS], idx_b[LPIPS_CONVS], idx_l[LPIPS_TAPS];
    int in = 3, module = 0, k = 0;
    char name[64];
    for (size_t i = 0; i < sizeof vgg_cfg / sizeof vgg_cfg[0]; i++) {
        if (vgg_cfg[i] == 0) { module += 1; continue; }  // pool: one module
        int ws[4] = {vgg_cfg[i], in, 3, 3}, bs[1] = {vgg_cfg[i]};
        snprintf(name, sizeof name, "features.%d.weight", module);
        idx_w[k] = params_add(&l->params, name, 4, ws);
        snprintf(name, sizeof name, "features.%d.bias", module);
        idx_b[k] = params_add(&l->params, name, 1, bs);
        in = vgg_cfg[i];
        module += 2;  // conv + ReLU
        k++;
    }
    for (int t = 0; t < LPIPS_TAPS; t++) {
        int ls[4] = {1, tap_channels[t], 1, 1};
        snprintf(name, sizeof name, "lin%d.weight", t);
        idx_l[t] = params_add(&l->params, name, 4, ls);
    }
    params_alloc(&l->params, 0);  // frozen: no gradient buffers
    for (int i = 0; i < LPIPS_CONVS; i++) {
        l->conv_w[i] = params_get(&l->params, idx_w[i]);
        l->conv_b[i] = params_get(&l->params, idx_b[i]);
    }
    for (int t = 0; t < LPIPS_TAPS; t++) l->lin[t] = params_get(&l->params, idx_l[t]);
    l->size = 224;
}

void lpips_free(Lpips *l) { params_free(&l->params); }

int lpips_load(Lpips *l, const char *path, char *err, size_t errlen) {
    StFile f;
    if (st_read(path, &f, err, errlen) != 0) return -1;
    int rc = 0;
    for (size_t i = 0; i < l->params.count && rc == 0; i++) {
        Tensor *t = params_get(&l->params, i);
        const StEntry *e = st_find(&f, t->name);
        if (!e) {
            snprintf(err, errlen, "%s: no tensor '%s' (write the file with tools/convert_lpips.py)",
                     path, t->name);
            rc = -1;
            break;
        }
        int same = e->ndim == t->ndim && e->size == t->size;
        for (int d = 0; same && d < t->ndim; d++) same = e->shape[d] == t->shape[d];
        if (!same) {
            char want[64];
            shape_str(t, want, sizeof want);
            snprintf(err, errlen, "%s: tensor '%s' has the wrong shape (want %s)", path, t->name,
                     want);
            rc = -1;
            break;
        }
        memcpy(t->data, e->data, t->size * sizeof(float));
    }
    st_free(&f);
    return rc;
}

// T and the ImageNet normalisation: one per-channel affine map after the resize
static Tensor *lpips_input(Graph *g, Lpips *l, Tensor *x) {
    if (x->ndim != 4 || x->shape[1] != 3) {
        char s[64];
        shape_str(x, s, sizeof s);
        fatal("lpips: images must be (N,3,H,W), got %s", s);
    }
    if (l->size > 0 && (x->shape[2] != l->size || x->shape[3] != l->size))
        x = resize_bilinear(g, x, l->size, l->size);
    static const float mean[3] = {0.485f, 0.456f, 0.406f}, std[3] = {0.229f, 0.224f, 0.225f};
    Tensor *a = tensor4(g, 1, 3, 1, 1), *b = tensor4(g, 1, 3, 1, 1);
    for (int c = 0; c < 3; c++) {  // ((x + 1) / 2 - mean) / std = a x + b
        a->data[c] = 0.5f / std[c];
        b->data[c] = (0.5f - mean[c]) / std[c];
    }
    return add(g, mul(g, x, a), b);
}

// the five normalised tap activations of one image batch
static void lpips_features(Graph *g, Lpips *l, Tensor *x, Tensor **taps) {
    Tensor *h = lpips_input(g, l, x);
    int k = 0, t = 0;
    for (size_t i = 0; i < sizeof vgg_cfg / sizeof vgg_cfg[0]; i++) {
        if (vgg_cfg[i] == 0) {
            h = l->max_pool ? maxpool2x2(g, h) : avgpool2x2(g, h);
            continue;
        }
        h = conv2d_relu(g, h, l->conv_w[k], l->conv_b[k], 1, 1);
        if (t < LPIPS_TAPS && k == tap_after_conv[t]) taps[t++] = l2norm_channels(g, h, 1e-10f);
        k++;
    }
}

Tensor *lpips_distance(Graph *g, Lpips *l, Tensor *x, Tensor *y, Tensor **taps) {
    if (!same_shape(x, y)) fatal("lpips: the two image batches differ in shape");
    Tensor *fx[LPIPS_TAPS], *fy[LPIPS_TAPS];
    int saved = g->grad_enabled;
    g->grad_enabled = 0;  // the target's branch keeps no tape
    lpips_features(g, l, y, fy);
    g->grad_enabled = saved;
    lpips_features(g, l, x, fx);
    Tensor *d = NULL;
    for (int t = 0; t < LPIPS_TAPS; t++) {
        Tensor *diff = sub(g, fx[t], fy[t]);
        Tensor *sq = dropout(g, mul(g, diff, diff), l->head_dropout);  // identity unless training
        Tensor *v = mean_hw(g, conv2d(g, sq, l->lin[t], NULL, 1, 0));  // (N,1,1,1)
        if (taps) taps[t] = v;
        d = d ? add(g, d, v) : v;
    }
    return d;
}

Tensor *lpips_loss(Graph *g, void *lpips, Tensor *pred, Tensor *target) {
    return mean_all(g, lpips_distance(g, (Lpips *)lpips, pred, target, NULL));
}
