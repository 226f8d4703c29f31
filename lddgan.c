// lddgan.c: the Latent Denoising Diffusion GAN (Trinh et al., arXiv
// 2406.11713; thanhluantrinh/LDDGAN). Stage one: the KL
// autoencoder whose latent space the GAN works in, latent-diffusion's
// AutoencoderKL (CompVis/latent-diffusion, ldm/models/autoencoder.py) with
// the Encoder and Decoder of ldm/modules/diffusionmodules/model.py, which
// LDDGAN ships unchanged and configures in autoencoder/config/
// cifar10_16x16x4.yaml. Parameter names are AutoencoderKL's state_dict keys
// (the loss's own keys, loss.*, aside), so checkpoints move both ways.
//
// Stage two: the denoising-diffusion GAN (score_sde's NCSNpp generator and
// DDGAN's Discriminator_small, LDDGAN's diffusion.py and train_ldgan.py's
// iteration, R1 by double backward), with the official parameter names.
//
// Sections: configuration, parameters (declared in state_dict order),
// forward: ResnetBlock, AttnBlock, resampling, Encoder, Decoder; the loss's
// PatchGAN discriminator and LPIPSWithDiscriminator; stage two's schedule,
// discriminator, generator, iteration, sampler and files. Backward comes from
// the tape (and, for R1, graph_grad's ops).
#define _POSIX_C_SOURCE 200809L
#include "casdm.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define AE_GROUPS 32          // Normalize(): GroupNorm(32, C, eps=1e-6, affine=True)
#define AE_NORM_EPS 1e-6f

// ---------------------------------------------------------------------------
// ---- configuration ----
// ---------------------------------------------------------------------------
void ae_cifar10_config(AEConfig *c) {
    memset(c, 0, sizeof *c);
    c->resolution = 32;
    c->in_channels = c->out_ch = 3;
    c->ch = 128;
    c->ch_mult[0] = 1;
    c->ch_mult[1] = 2;
    c->n_levels = 2;                 // f = 2: 32x32 images, 16x16 latents
    c->num_res_blocks = 2;
    c->attn_resolutions[0] = 16;
    c->n_attn = 1;
    c->z_channels = c->embed_dim = 4;
    c->double_z = 1;
    c->tanh_out = 1;
    c->dropout = 0.2f;
}

static int ae_has_attn(const AEConfig *c, int level) {
    for (int i = 0; i < c->n_attn; i++)
        if (c->attn_resolutions[i] == c->resolution >> level) return 1;
    return 0;
}

int ae_check_config(const AEConfig *c, char *err, size_t errlen) {
    const char *bad = NULL;
    if (c->n_levels < 1 || c->n_levels > AE_MAX_LEVELS) bad = "ch_mult needs 1..8 levels";
    else if (c->resolution < 1 || c->resolution > 4096 ||
             c->resolution % (1 << (c->n_levels - 1)))
        bad = "resolution must be 1..4096 and halve once per level but the last";
    else if (c->in_channels < 1 || c->in_channels > 16 || c->out_ch < 1 || c->out_ch > 16)
        bad = "in_channels and out_ch must be 1..16";
    else if (c->ch < 1 || c->ch > 4096) bad = "ch must be 1..4096";
    else if (c->num_res_blocks < 1 || c->num_res_blocks + 1 > AE_MAX_BLOCKS)
        bad = "num_res_blocks must be 1..7";
    else if (c->z_channels < 1 || c->z_channels > 256 || c->embed_dim < 1 || c->embed_dim > 256)
        bad = "z_channels and embed_dim must be 1..256";
    else if (!(c->dropout >= 0.0f && c->dropout < 1.0f)) bad = "dropout must be in [0, 1)";
    if (bad) { snprintf(err, errlen, "%s", bad); return -1; }
    for (int l = 0; l < c->n_levels; l++) {
        long chl = (long)c->ch * c->ch_mult[l];
        if (c->ch_mult[l] < 1 || chl > 8192 || chl % AE_GROUPS) {
            snprintf(err, errlen, "ch %d x ch_mult %d does not split into %d GroupNorm groups",
                     c->ch, c->ch_mult[l], AE_GROUPS);
            return -1;
        }
    }
    return 0;
}

// ---------------------------------------------------------------------------
// ---- parameters ----
// Declared in AutoencoderKL's state_dict order: encoder.*, decoder.*,
// quant_conv, post_quant_conv; inside a level its blocks, then their
// attention, then the resampling convolution.
// ---------------------------------------------------------------------------
static void declare_norm(ParamDecl *d, Tensor **w, Tensor **b, const char *prefix, int ch) {
    param_declare_weight_bias(d, w, b, prefix, 1, ch, 0, 0, 0);
}

static void declare_conv(ParamDecl *d, Tensor **w, Tensor **b, const char *prefix, int out,
                         int in, int k) {
    param_declare_weight_bias(d, w, b, prefix, 4, out, in, k, k);
}

// PREFIX.NAME, in a buffer of the caller's
static const char *join(char *buf, size_t n, const char *prefix, const char *name) {
    snprintf(buf, n, "%s.%s", prefix, name);
    return buf;
}

static void declare_resblock(ParamDecl *d, AEResBlock *r, const char *prefix, int in, int out) {
    char p[200];
    r->in_ch = in;
    r->out_ch = out;
    declare_norm(d, &r->norm1_w, &r->norm1_b, join(p, sizeof p, prefix, "norm1"), in);
    declare_conv(d, &r->conv1_w, &r->conv1_b, join(p, sizeof p, prefix, "conv1"), out, in, 3);
    declare_norm(d, &r->norm2_w, &r->norm2_b, join(p, sizeof p, prefix, "norm2"), out);
    declare_conv(d, &r->conv2_w, &r->conv2_b, join(p, sizeof p, prefix, "conv2"), out, out, 3);
    r->nin_w = r->nin_b = NULL;
    if (in != out)
        declare_conv(d, &r->nin_w, &r->nin_b, join(p, sizeof p, prefix, "nin_shortcut"), out, in,
                     1);
}

static void declare_attn(ParamDecl *d, AEAttn *a, const char *prefix, int ch) {
    char p[200];
    a->ch = ch;
    declare_norm(d, &a->norm_w, &a->norm_b, join(p, sizeof p, prefix, "norm"), ch);
    declare_conv(d, &a->q_w, &a->q_b, join(p, sizeof p, prefix, "q"), ch, ch, 1);
    declare_conv(d, &a->k_w, &a->k_b, join(p, sizeof p, prefix, "k"), ch, ch, 1);
    declare_conv(d, &a->v_w, &a->v_b, join(p, sizeof p, prefix, "v"), ch, ch, 1);
    declare_conv(d, &a->proj_w, &a->proj_b, join(p, sizeof p, prefix, "proj_out"), ch, ch, 1);
}

static void declare_mid(ParamDecl *d, AECoder *e, const char *coder, int ch) {
    char p[200];
    snprintf(p, sizeof p, "%s.mid.block_1", coder);
    declare_resblock(d, &e->mid_block_1, p, ch, ch);
    snprintf(p, sizeof p, "%s.mid.attn_1", coder);
    declare_attn(d, &e->mid_attn_1, p, ch);
    snprintf(p, sizeof p, "%s.mid.block_2", coder);
    declare_resblock(d, &e->mid_block_2, p, ch, ch);
}

// Encoder.__init__: conv_in; per level num_res_blocks blocks (ch*in_ch_mult
// -> ch*ch_mult), attention after each where the side is in
// attn_resolutions, a Downsample but at the last level; the middle block;
// norm_out and conv_out to 2*z_channels (double_z)
static void declare_encoder(ParamDecl *d, AECoder *e, const AEConfig *c) {
    char p[200];
    int ch = c->ch;
    declare_conv(d, &e->conv_in_w, &e->conv_in_b, "encoder.conv_in", ch, c->in_channels, 3);
    for (int l = 0; l < c->n_levels; l++) {
        AELevel *lv = &e->level[l];
        int out = c->ch * c->ch_mult[l];
        lv->n_block = c->num_res_blocks;
        lv->has_attn = ae_has_attn(c, l);
        for (int i = 0; i < lv->n_block; i++) {
            snprintf(p, sizeof p, "encoder.down.%d.block.%d", l, i);
            declare_resblock(d, &lv->block[i], p, i == 0 ? ch : out, out);
        }
        ch = out;
        for (int i = 0; lv->has_attn && i < lv->n_block; i++) {
            snprintf(p, sizeof p, "encoder.down.%d.attn.%d", l, i);
            declare_attn(d, &lv->attn[i], p, ch);
        }
        lv->resample_w = lv->resample_b = NULL;
        if (l != c->n_levels - 1) {
            snprintf(p, sizeof p, "encoder.down.%d.downsample.conv", l);
            declare_conv(d, &lv->resample_w, &lv->resample_b, p, ch, ch, 3);
        }
    }
    declare_mid(d, e, "encoder", ch);
    declare_norm(d, &e->norm_out_w, &e->norm_out_b, "encoder.norm_out", ch);
    declare_conv(d, &e->conv_out_w, &e->conv_out_b, "encoder.conv_out",
                 (c->double_z ? 2 : 1) * c->z_channels, ch, 3);
}

// Decoder.__init__: conv_in from z_channels to the last level's width; the
// middle block; per level, from the top, num_res_blocks + 1 blocks with
// their attention and an Upsample but at level 0 (up.i is level i: built
// in reverse and inserted at the front); norm_out, conv_out to out_ch
static void declare_decoder(ParamDecl *d, AECoder *e, const AEConfig *c) {
    char p[200];
    int top = c->ch * c->ch_mult[c->n_levels - 1];
    declare_conv(d, &e->conv_in_w, &e->conv_in_b, "decoder.conv_in", top, c->z_channels, 3);
    declare_mid(d, e, "decoder", top);
    for (int l = 0; l < c->n_levels; l++) {  // state_dict order: up.0 first
        AELevel *lv = &e->level[l];
        int in = l == c->n_levels - 1 ? top : c->ch * c->ch_mult[l + 1], out = c->ch * c->ch_mult[l];
        lv->n_block = c->num_res_blocks + 1;
        lv->has_attn = ae_has_attn(c, l);
        for (int i = 0; i < lv->n_block; i++) {
            snprintf(p, sizeof p, "decoder.up.%d.block.%d", l, i);
            declare_resblock(d, &lv->block[i], p, i == 0 ? in : out, out);
        }
        for (int i = 0; lv->has_attn && i < lv->n_block; i++) {
            snprintf(p, sizeof p, "decoder.up.%d.attn.%d", l, i);
            declare_attn(d, &lv->attn[i], p, out);
        }
        lv->resample_w = lv->resample_b = NULL;
        if (l != 0) {
            snprintf(p, sizeof p, "decoder.up.%d.upsample.conv", l);
            declare_conv(d, &lv->resample_w, &lv->resample_b, p, out, out, 3);
        }
    }
    declare_norm(d, &e->norm_out_w, &e->norm_out_b, "decoder.norm_out", c->ch * c->ch_mult[0]);
    declare_conv(d, &e->conv_out_w, &e->conv_out_b, "decoder.conv_out", c->out_ch,
                 c->ch * c->ch_mult[0], 3);
}

// the layout, declared but not allocated; *enc and *dec (may be NULL): the
// encoder's and the decoder's parameter counts
static void ae_layout(Autoencoder *a, const AEConfig *c, ParamDecl *d, size_t *enc, size_t *dec) {
    memset(a, 0, sizeof *a);
    char err[256];
    if (ae_check_config(c, err, sizeof err) != 0) fatal("autoencoder: %s", err);
    a->cfg = *c;
    params_init(&a->params);
    param_decl_init(d, &a->params);
    declare_encoder(d, &a->enc, c);
    size_t after_enc = a->params.total;
    declare_decoder(d, &a->dec, c);
    if (enc) *enc = after_enc;
    if (dec) *dec = a->params.total - after_enc;
    declare_conv(d, &a->quant_w, &a->quant_b, "quant_conv", 2 * c->embed_dim,
                 (c->double_z ? 2 : 1) * c->z_channels, 1);
    declare_conv(d, &a->post_quant_w, &a->post_quant_b, "post_quant_conv", c->z_channels,
                 c->embed_dim, 1);
}

// latent-diffusion initialises nothing itself: PyTorch's defaults throughout
void ae_init(Autoencoder *a, const AEConfig *c, int trainable, Rng *rng) {
    ParamDecl d;
    ae_layout(a, c, &d, NULL, NULL);
    params_alloc(&a->params, trainable);
    param_decl_fill(&d);
    if (rng) params_init_torch(&a->params, rng, NULL);
    a->scale_factor = 1.0f;
}

void ae_free(Autoencoder *a) { params_free(&a->params); }

size_t ae_param_count(const AEConfig *c, size_t *encoder, size_t *decoder) {
    Autoencoder *a = mallocCheck(sizeof *a);
    ParamDecl d;
    ae_layout(a, c, &d, encoder, decoder);
    param_decl_free(&d);
    size_t total = a->params.total;
    params_free(&a->params);
    free(a);
    return total;
}

// ---- the weights file ----
// "1,2" and the like for the metadata
static void int_list(char *buf, size_t n, const int *v, int count) {
    size_t used = 0;
    buf[0] = 0;
    for (int i = 0; i < count && used < n; i++)
        used += (size_t)snprintf(buf + used, n - used, i ? ",%d" : "%d", v[i]);
}

int ae_save(const Autoencoder *a, const char *path, const char *const *extra, char *err,
            size_t errlen) {
    return ae_save_with(a, path, NULL, 0, extra, err, errlen);
}

int ae_save_with(const Autoencoder *a, const char *path, const StWrite *more, size_t n_more,
                 const char *const *extra, char *err, size_t errlen) {
    const AEConfig *c = &a->cfg;
    char v[13][64];
    const char *meta[96];
    int m = 0;
    const char *keys[12] = {"resolution", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks",
                            "attn_resolutions", "z_channels", "embed_dim", "double_z", "tanh_out",
                            "dropout"};
    snprintf(v[0], 64, "%d", c->resolution);
    snprintf(v[1], 64, "%d", c->in_channels);
    snprintf(v[2], 64, "%d", c->out_ch);
    snprintf(v[3], 64, "%d", c->ch);
    int_list(v[4], 64, c->ch_mult, c->n_levels);
    snprintf(v[5], 64, "%d", c->num_res_blocks);
    int_list(v[6], 64, c->attn_resolutions, c->n_attn);
    snprintf(v[7], 64, "%d", c->z_channels);
    snprintf(v[8], 64, "%d", c->embed_dim);
    snprintf(v[9], 64, "%d", c->double_z);
    snprintf(v[10], 64, "%d", c->tanh_out);
    snprintf(v[11], 64, "%.9g", c->dropout);
    snprintf(v[12], 64, "%.9g", a->scale_factor);
    meta[m++] = "format";
    meta[m++] = "casdm-autoencoder-1";
    for (int i = 0; i < 12; i++) {
        meta[m++] = keys[i];
        meta[m++] = v[i];
    }
    meta[m++] = "scale_factor";
    meta[m++] = v[12];
    for (int i = 0; extra && extra[i] && m < 94; i += 2) {
        meta[m++] = extra[i];
        meta[m++] = extra[i + 1];
    }
    meta[m] = NULL;
    size_t n = a->params.count;
    StWrite *w = mallocCheck((n + n_more) * sizeof *w);
    for (size_t i = 0; i < n; i++) {
        const Tensor *t = &a->params.t[i];
        w[i] = (StWrite){t->name, t->ndim, t->shape, t->data};
    }
    for (size_t i = 0; i < n_more; i++) w[n + i] = more[i];
    int rc = st_write(path, w, n + n_more, meta, err, errlen);
    free(w);
    return rc;
}

// a metadata integer (the whole value), or -1 with the message
static int meta_int(const StFile *f, const char *path, const char *key, int *out, char *err,
                    size_t errlen) {
    char buf[64], *end;
    if (st_meta(f, key, buf, sizeof buf) != 0)
        return errorf(err, errlen, "%s: the metadata has no '%s'", path, key);
    long v = strtol(buf, &end, 10);
    if (end == buf || *end || v < 0 || v > 1 << 20)
        return errorf(err, errlen, "%s: metadata '%s' is '%s', not a count", path, key, buf);
    *out = (int)v;
    return 0;
}

static int meta_list(const StFile *f, const char *path, const char *key, int *out, int *n,
                     char *err, size_t errlen) {
    char buf[128];
    if (st_meta(f, key, buf, sizeof buf) != 0)
        return errorf(err, errlen, "%s: the metadata has no '%s'", path, key);
    *n = 0;
    for (const char *p = buf; *p;) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 1 || v > 1 << 16 || *n == AE_MAX_LEVELS)
            return errorf(err, errlen, "%s: metadata '%s' is '%s', not a list of up to %d sizes",
                          path, key, buf, AE_MAX_LEVELS);
        out[(*n)++] = (int)v;
        p = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') return errorf(err, errlen, "%s: metadata '%s' is '%s'", path, key, buf);
    }
    return 0;
}

int ae_load(Autoencoder *a, const char *path, int trainable, char *err, size_t errlen) {
    StFile f;
    if (st_read(path, &f, err, errlen) != 0) return -1;
    AEConfig c;
    memset(&c, 0, sizeof c);
    char fmt[64] = "", drop[64] = "";
    int rc = 0;
    st_meta(&f, "format", fmt, sizeof fmt);
    if (strcmp(fmt, "casdm-autoencoder-1") != 0)
        rc = errorf(err, errlen, "%s: metadata format '%s', want casdm-autoencoder-1 "
                    "(tools/convert_autoencoder.py writes it from an official checkpoint)", path, fmt);
    if (!rc) rc = meta_int(&f, path, "resolution", &c.resolution, err, errlen);
    if (!rc) rc = meta_int(&f, path, "in_channels", &c.in_channels, err, errlen);
    if (!rc) rc = meta_int(&f, path, "out_ch", &c.out_ch, err, errlen);
    if (!rc) rc = meta_int(&f, path, "ch", &c.ch, err, errlen);
    if (!rc) rc = meta_list(&f, path, "ch_mult", c.ch_mult, &c.n_levels, err, errlen);
    if (!rc) rc = meta_int(&f, path, "num_res_blocks", &c.num_res_blocks, err, errlen);
    if (!rc) rc = meta_list(&f, path, "attn_resolutions", c.attn_resolutions, &c.n_attn, err, errlen);
    if (!rc) rc = meta_int(&f, path, "z_channels", &c.z_channels, err, errlen);
    if (!rc) rc = meta_int(&f, path, "embed_dim", &c.embed_dim, err, errlen);
    if (!rc) rc = meta_int(&f, path, "double_z", &c.double_z, err, errlen);
    if (!rc) rc = meta_int(&f, path, "tanh_out", &c.tanh_out, err, errlen);
    if (!rc && st_meta(&f, "dropout", drop, sizeof drop) == 0) c.dropout = strtof(drop, NULL);
    char why[256];
    if (!rc && ae_check_config(&c, why, sizeof why) != 0)
        rc = errorf(err, errlen, "%s: its configuration: %s", path, why);
    // every tensor of the layout in the file, with its shape, before the
    // allocation: nothing is allocated that the file does not hold
    if (!rc) {
        Autoencoder *layout = mallocCheck(sizeof *layout);
        ParamDecl d;
        ae_layout(layout, &c, &d, NULL, NULL);
        param_decl_free(&d);
        rc = params_check_st(&layout->params, &f, path, "", err, errlen);
        params_free(&layout->params);
        free(layout);
    }
    float scale = 1.0f;
    char sf[64];
    if (!rc && st_meta(&f, "scale_factor", sf, sizeof sf) == 0) {
        char *end;
        scale = strtof(sf, &end);
        if (end == sf || *end || !(scale > 0.0f) || !isfinite(scale))
            rc = errorf(err, errlen, "%s: metadata scale_factor is '%s', not a positive number",
                        path, sf);
    }
    if (!rc) {
        ae_init(a, &c, trainable, NULL);
        a->scale_factor = scale;
        rc = params_load_st(&a->params, &f, path, "", err, errlen);
        if (rc) ae_free(a);
    }
    st_free(&f);
    return rc;
}

// ---- forward ----
// ---------------------------------------------------------------------------

// ResnetBlock (temb_channels 0): h = conv1(swish(norm1(x))); h =
// conv2(dropout(swish(norm2(h)))); x (or nin_shortcut(x)) + h. Each norm
// and the convolution after it are one node (norm_conv2d), as in unet.c;
// the residual sum is done by the second convolution.
static Tensor *resblock_forward(Graph *g, const AEConfig *c, const AEResBlock *r, Tensor *x) {
    NormSpec n1 = {.gamma = r->norm1_w, .beta = r->norm1_b, .silu = 1, .groups = AE_GROUPS,
                   .eps = AE_NORM_EPS};
    Tensor *h = norm_conv2d(g, x, &n1, r->conv1_w, r->conv1_b, NULL, 1);
    Tensor *skip = r->nin_w ? conv2d(g, x, r->nin_w, r->nin_b, 1, 0) : x;
    NormSpec n2 = {.gamma = r->norm2_w, .beta = r->norm2_b, .silu = 1, .groups = AE_GROUPS,
                   .dropout = c->dropout, .eps = AE_NORM_EPS};
    return norm_conv2d(g, h, &n2, r->conv2_w, r->conv2_b, skip, 1);
}

static Tensor *view4(Graph *g, Tensor *t, int n, int c, int h, int w) {
    int s[4] = {n, c, h, w};
    return reshape(g, t, 4, s);
}

// AttnBlock: q, k, v = 1x1 convolutions of norm(x); w = softmax over j of
// q_i . k_j * C^(-1/2); out_i = sum_j w_ij v_j; x + proj_out(out). The
// three weights are stacked into one (3C, C) convolution after the norm,
// whose output qkv_attention reads as q, k, v rows of one head.
static Tensor *attn_forward(Graph *g, const AEAttn *a, Tensor *x) {
    int B = x->shape[0], C = x->shape[1], H = x->shape[2], W = x->shape[3];
    Tensor *w = concat_channels(g, concat_channels(g, view4(g, a->q_w, 1, C * C, 1, 1),
                                                   view4(g, a->k_w, 1, C * C, 1, 1)),
                                view4(g, a->v_w, 1, C * C, 1, 1));
    Tensor *b = concat_channels(g, concat_channels(g, view4(g, a->q_b, 1, C, 1, 1),
                                                   view4(g, a->k_b, 1, C, 1, 1)),
                                view4(g, a->v_b, 1, C, 1, 1));
    int s1[1] = {3 * C}, s3[3] = {B, 3 * C, H * W};
    NormSpec norm = {.gamma = a->norm_w, .beta = a->norm_b, .groups = AE_GROUPS,
                     .eps = AE_NORM_EPS};
    Tensor *qkv = norm_conv2d(g, x, &norm, view4(g, w, 3 * C, C, 1, 1), reshape(g, b, 1, s1),
                              NULL, 0);
    Tensor *o = qkv_attention(g, reshape(g, qkv, 3, s3), (float)(1.0 / sqrt((double)C)));
    return conv2d_add(g, view4(g, o, B, C, H, W), a->proj_w, a->proj_b, NULL, x, 1, 0);
}

// Downsample (with_conv): F.pad(x, (0, 1, 0, 1)), then a 3x3 stride-2
// convolution without padding; Upsample: nearest x2, then a 3x3 convolution
static Tensor *downsample(Graph *g, const AELevel *lv, Tensor *x) {
    return conv2d(g, pad2d(g, x, 0, 1, 0, 1), lv->resample_w, lv->resample_b, 2, 0);
}

static Tensor *upsample(Graph *g, const AELevel *lv, Tensor *x) {
    return conv2d(g, upsample2x(g, x), lv->resample_w, lv->resample_b, 1, 1);
}

static Tensor *level_blocks(Graph *g, const AEConfig *c, const AELevel *lv, Tensor *h) {
    for (int i = 0; i < lv->n_block; i++) {
        h = resblock_forward(g, c, &lv->block[i], h);
        if (lv->has_attn) h = attn_forward(g, &lv->attn[i], h);
    }
    return h;
}

static Tensor *mid_forward(Graph *g, const AEConfig *c, const AECoder *e, Tensor *h) {
    h = resblock_forward(g, c, &e->mid_block_1, h);
    h = attn_forward(g, &e->mid_attn_1, h);
    return resblock_forward(g, c, &e->mid_block_2, h);
}

// norm_out, swish, conv_out
static Tensor *coder_out(Graph *g, const AECoder *e, Tensor *h) {
    NormSpec n = {.gamma = e->norm_out_w, .beta = e->norm_out_b, .silu = 1, .groups = AE_GROUPS,
                  .eps = AE_NORM_EPS};
    return norm_conv2d(g, h, &n, e->conv_out_w, e->conv_out_b, NULL, 1);
}

static void check_input(const Tensor *x, int channels, int multiple, const char *what) {
    if (x->ndim != 4 || x->shape[1] != channels || x->shape[2] % multiple ||
        x->shape[3] % multiple) {
        char s[64];
        shape_str(x, s, sizeof s);
        fatal("autoencoder: %s %s does not fit (%d channels, sides divisible by %d)", what, s,
              channels, multiple);
    }
}

// AutoencoderKL.encode: quant_conv(encoder(x)), the posterior's moments
Tensor *ae_encode(Graph *g, Autoencoder *a, Tensor *x) {
    const AEConfig *c = &a->cfg;
    check_input(x, c->in_channels, 1 << (c->n_levels - 1), "input");
    const AECoder *e = &a->enc;
    Tensor *h = conv2d(g, x, e->conv_in_w, e->conv_in_b, 1, 1);
    for (int l = 0; l < c->n_levels; l++) {
        h = level_blocks(g, c, &e->level[l], h);
        if (e->level[l].resample_w) h = downsample(g, &e->level[l], h);
    }
    h = coder_out(g, e, mid_forward(g, c, e, h));
    return conv2d(g, h, a->quant_w, a->quant_b, 1, 0);
}

// AutoencoderKL.decode: decoder(post_quant_conv(z)), tanh at the end when
// tanh_out; in two parts, the trunk up to norm_out's input and the head
// from there, so that the loss can take two gradients at conv_out.weight
// through the head alone (ae_generator_grads)
Tensor *ae_decode_trunk(Graph *g, Autoencoder *a, Tensor *z) {
    const AEConfig *c = &a->cfg;
    check_input(z, c->embed_dim, 1, "latent");
    const AECoder *e = &a->dec;
    Tensor *h = conv2d(g, conv2d(g, z, a->post_quant_w, a->post_quant_b, 1, 0), e->conv_in_w,
                       e->conv_in_b, 1, 1);
    h = mid_forward(g, c, e, h);
    for (int l = c->n_levels - 1; l >= 0; l--) {
        h = level_blocks(g, c, &e->level[l], h);
        if (e->level[l].resample_w) h = upsample(g, &e->level[l], h);
    }
    return h;
}

Tensor *ae_decode_head(Graph *g, Autoencoder *a, Tensor *h) {
    Tensor *y = coder_out(g, &a->dec, h);
    return a->cfg.tanh_out ? tensor_tanh(g, y) : y;
}

Tensor *ae_decode(Graph *g, Autoencoder *a, Tensor *z) {
    return ae_decode_head(g, a, ae_decode_trunk(g, a, z));
}

// ---------------------------------------------------------------------------
// ---- the PatchGAN discriminator (taming's NLayerDiscriminator) ----
// nn.Sequential "main": conv at index i, then (BatchNorm at i + 1,) LeakyReLU
// (in place, no parameters): the modules of a block take 2 or 3 indices.
// ---------------------------------------------------------------------------
void patchgan_init(PatchGAN *d, int in_channels, int ndf, int n_layers, int trainable, Rng *rng) {
    memset(d, 0, sizeof *d);
    if (n_layers < 1 || n_layers + 2 > PATCHGAN_MAX_CONVS || ndf < 1 || in_channels < 1)
        fatal("patchgan: n_layers must be 1..%d, ndf and in_channels positive",
              PATCHGAN_MAX_CONVS - 2);
    d->in_channels = in_channels;
    d->ndf = ndf;
    d->n_layers = n_layers;
    params_init(&d->params);
    params_init(&d->buffers);
    ParamDecl pd, bd;
    param_decl_init(&pd, &d->params);
    param_decl_init(&bd, &d->buffers);
    char p[64];
    int module = 0, cin = in_channels;
    for (int k = 0; k <= n_layers + 1; k++) {
        int mult = k == 0 ? 1 : (1 << (k < n_layers ? k : n_layers)), normed = k > 0 && k <= n_layers;
        if (mult > 8) mult = 8;
        int cout = k == n_layers + 1 ? 1 : ndf * mult;
        d->stride[k] = k < n_layers ? 2 : 1;
        snprintf(p, sizeof p, "main.%d.weight", module);
        param_declare(&pd, &d->conv_w[k], p, 4, cout, cin, 4, 4);
        if (!normed) {
            snprintf(p, sizeof p, "main.%d.bias", module);
            param_declare(&pd, &d->conv_b[k], p, 1, cout, 0, 0, 0);
        }
        module++;
        if (normed) {
            snprintf(p, sizeof p, "main.%d", module);
            param_declare_weight_bias(&pd, &d->bn_w[k], &d->bn_b[k], p, 1, cout, 0, 0, 0);
            snprintf(p, sizeof p, "main.%d.running_mean", module);
            param_declare(&bd, &d->running_mean[k], p, 1, cout, 0, 0, 0);
            snprintf(p, sizeof p, "main.%d.running_var", module);
            param_declare(&bd, &d->running_var[k], p, 1, cout, 0, 0, 0);
            module++;
        }
        module++;  // the LeakyReLU (the last conv has none, and nothing follows it)
        cin = cout;
    }
    d->n_conv = n_layers + 2;
    params_alloc(&d->params, trainable);
    params_alloc(&d->buffers, 0);
    param_decl_fill(&pd);
    param_decl_fill(&bd);
    for (int k = 0; k < d->n_conv; k++)  // BatchNorm2d's initial running statistics
        if (d->running_var[k])
            for (size_t i = 0; i < d->running_var[k]->size; i++) d->running_var[k]->data[i] = 1.0f;
    if (!rng) return;
    for (int k = 0; k < d->n_conv; k++) {
        Tensor *w = d->conv_w[k];
        rng_fill_normal(rng, w->data, w->size, 0.0f, 0.02f);
        if (d->conv_b[k]) {
            float bound = 1.0f / sqrtf((float)(w->size / w->shape[0]));
            rng_fill_uniform(rng, d->conv_b[k]->data, d->conv_b[k]->size, -bound, bound);
        }
        if (d->bn_w[k]) rng_fill_normal(rng, d->bn_w[k]->data, d->bn_w[k]->size, 1.0f, 0.02f);
    }
}

void patchgan_free(PatchGAN *d) {
    params_free(&d->params);
    params_free(&d->buffers);
}

Tensor *patchgan_forward(Graph *g, PatchGAN *d, Tensor *x) {
    if (x->ndim != 4 || x->shape[1] != d->in_channels) {
        char s[64];
        shape_str(x, s, sizeof s);
        fatal("patchgan: input %s, want %d channels", s, d->in_channels);
    }
    Tensor *h = x;
    for (int k = 0; k < d->n_conv; k++) {
        h = conv2d(g, h, d->conv_w[k], d->conv_b[k], d->stride[k], 1);
        if (d->bn_w[k])
            h = batchnorm2d(g, h, d->bn_w[k], d->bn_b[k], d->running_mean[k]->data,
                            d->running_var[k]->data, 0.1f, 1e-5f);
        if (k < d->n_conv - 1) h = leaky_relu(g, h, 0.2f);
    }
    if (g->training) d->num_batches_tracked++;
    return h;
}

// ---------------------------------------------------------------------------
// ---- the loss: latent-diffusion's LPIPSWithDiscriminator ----
// (ldm/modules/losses/contperceptual.py, with taming's LPIPS and PatchGAN)
// One training iteration is two optimizer steps, as Lightning runs
// AutoencoderKL.training_step (ldm/models/autoencoder.py): optimizer_idx 0
// trains encoder, decoder and the two 1x1 convolutions on
//   loss = nll + kl_weight * kl + d_weight * disc_factor * g_loss,
// then optimizer_idx 1 trains the discriminator on the hinge loss, with a
// fresh forward of the autoencoder (new dropout masks, a new posterior sample).
// ---------------------------------------------------------------------------
void ae_loss_default(AELossConfig *c) {
    memset(c, 0, sizeof *c);
    c->kl_weight = 1e-6f;        // cifar10_16x16x4.yaml lossconfig.params.kl_weight
    c->disc_weight = 0.5f;       // ... disc_weight (the scale of the adaptive weight)
    c->disc_factor = 1.0f;       // LPIPSWithDiscriminator's default
    c->disc_start = 50001;       // ... disc_start
    c->perceptual_weight = 1.0f; // LPIPSWithDiscriminator's default
    c->logvar = 0.0f;            // logvar_init; no optimiser of AutoencoderKL holds it
}

// adopt_weight: the GAN terms are off before disc_start (contperceptual.py's
// global_step is the count of iterations done, `step` here)
static float disc_factor_at(const AELossConfig *c, long step) {
    return step < c->disc_start ? 0.0f : c->disc_factor;
}

void ae_trainer_init(AETrainer *t, Autoencoder *ae, PatchGAN *disc, Lpips *lpips,
                     const AELossConfig *cfg, Rng *rng) {
    memset(t, 0, sizeof *t);
    t->ae = ae;
    t->disc = disc;
    t->lpips = lpips;
    t->cfg = *cfg;
    t->rng = rng;
    Graph *graphs[4] = {&t->trunk, &t->head, &t->rec, &t->gan};
    for (int i = 0; i < 4; i++) {
        graph_init(graphs[i], 64u << 20, 0);
        graphs[i]->training = 1;  // dropout in the autoencoder and LPIPS, BatchNorm's batch statistics
        graphs[i]->rng = rng;
    }
}

void ae_trainer_free(AETrainer *t) {
    graph_free(&t->trunk);
    graph_free(&t->head);
    graph_free(&t->rec);
    graph_free(&t->gan);
}

static void disc_trainable(PatchGAN *d, int on) {
    for (size_t i = 0; i < d->params.count; i++) d->params.t[i].requires_grad = on;
}

// LPIPS takes RGB: a one-channel image is repeated three times (our
// extension: the official loss runs on 3-channel data only)
static Tensor *as_rgb(Graph *g, Tensor *x) {
    if (x->shape[1] == 3) return x;
    if (x->shape[1] != 1) fatal("autoencoder loss: LPIPS needs 1 or 3 channels, not %d",
                                x->shape[1]);
    return concat_channels(g, x, concat_channels(g, x, x));
}

// rec = |x - x_rec| + perceptual_weight * LPIPS(x, x_rec), one LPIPS value per
// image broadcast over its pixels; nll = sum(rec / e^logvar + logvar) / N.
// With M = C*H*W: nll = M * (mean|x - x_rec| + pw * mean LPIPS) / e^logvar + M * logvar.
static Tensor *nll_loss(Graph *g, AETrainer *t, Tensor *x, Tensor *x_rec, AELossTerms *terms) {
    const AELossConfig *c = &t->cfg;
    float M = (float)(x->size / (size_t)x->shape[0]), inv_var = expf(-c->logvar);
    Tensor *l1 = mean_all(g, tensor_abs(g, sub(g, x_rec, x)));
    Tensor *nll = scale_shift(g, l1, M * inv_var, M * c->logvar);
    terms->l1 = l1->data[0];
    terms->lpips = NAN;  // (no LPIPS: perceptual_weight 0, or none given)
    if (t->lpips && c->perceptual_weight > 0.0f) {
        Tensor *p = mean_all(g, lpips_distance(g, t->lpips, as_rgb(g, x_rec), as_rgb(g, x), NULL));
        nll = add(g, nll, scale_shift(g, p, c->perceptual_weight * M * inv_var, 0.0f));
        terms->lpips = p->data[0];
    }
    terms->nll = nll->data[0];
    return nll;
}

static double head_norm(const Tensor *w) { return sqrt(grad_norm_sq(w->grad, w->size)); }

// The head's four parameters (norm_out and conv_out of the decoder)
static Tensor **head_params(Autoencoder *a, Tensor **p) {
    p[0] = a->dec.norm_out_w;
    p[1] = a->dec.norm_out_b;
    p[2] = a->dec.conv_out_w;
    p[3] = a->dec.conv_out_b;
    return p;
}

// The generator step's gradients, added into ae->params' gradient (zero it
// first). d_weight = disc_weight * clamp(||grad nll|| / (||grad g_loss|| +
// 1e-4), 0, 1e4), both gradients at decoder.conv_out.weight
// (calculate_adaptive_weight; computed even while disc_factor is 0, as there).
// Both are linear in the gradient at x_rec, and conv_out.weight lies in the
// decoder's head: so the trunk (encoder, posterior, decoder up to norm_out)
// is one graph and the head another; the head runs backward twice, once for
// nll and once for g_loss, and their sum weighted by d_weight * disc_factor
// continues into the trunk with the KL term. The discriminator's weights get
// no gradient here (Lightning's toggle_optimizer); its BatchNorm runs on
// batch statistics and updates its running ones, as in train mode there.
void ae_generator_grads(AETrainer *t, const float *x, int n, long step, const float *eps,
                        AELossTerms *terms) {
    Autoencoder *a = t->ae;
    const AEConfig *c = &a->cfg;
    int R = c->resolution, xs[4] = {n, c->in_channels, R, R};
    Graph *T = &t->trunk, *H = &t->head, *L = &t->rec, *D = &t->gan;
    graph_reset(T);
    // trunk: the posterior, z = mean + std * eps, the decoder to norm_out's input
    Tensor *xin = tensor_from(T, 4, xs, x);
    Tensor *moments = ae_encode(T, a, xin);
    Tensor *kl = mean_all(T, gaussian_kl(T, moments));  // sum(kl) / N
    Tensor *h_trunk = ae_decode_trunk(T, a, gaussian_sample(T, moments, eps));
    // head, first pass: x_rec, and the gradients of nll through it
    graph_reset(H);
    Tensor *h = tensor_from(H, h_trunk->ndim, h_trunk->shape, h_trunk->data);
    h->requires_grad = 1;
    Tensor *x_rec = ae_decode_head(H, a, h);
    graph_reset(L);
    Tensor *x_l = tensor_from(L, 4, xs, x), *x_rec_l = tensor_from(L, 4, xs, x_rec->data);
    x_rec_l->requires_grad = 1;
    Tensor *nll = nll_loss(L, t, x_l, x_rec_l, terms);
    graph_backward(L, nll, NULL);  // x_rec_l->grad: d nll / d x_rec
    // g_loss = -mean D(x_rec), its gradient at x_rec
    graph_reset(D);
    Tensor *x_rec_d = tensor_from(D, 4, xs, x_rec->data);
    x_rec_d->requires_grad = 1;
    disc_trainable(t->disc, 0);
    Tensor *g_loss = scale_shift(D, mean_all(D, patchgan_forward(D, t->disc, x_rec_d)), -1.0f, 0.0f);
    graph_backward(D, g_loss, NULL);
    disc_trainable(t->disc, 1);
    // the head's gradients from nll, kept; then from g_loss alone
    Tensor *hp[4];
    head_params(a, hp);
    size_t n_head = 0;
    for (int i = 0; i < 4; i++) n_head += hp[i]->size;
    float *keep = arena_floats(&T->arena, n_head + h->size);  // head grads, then d nll / d h
    float *keep_dh = keep + n_head;
    float *before = arena_floats(&T->arena, n_head);  // what the caller had in them
    for (size_t i = 0, o = 0; i < 4; o += hp[i]->size, i++) {
        memcpy(before + o, hp[i]->grad, hp[i]->size * sizeof(float));
        memset(hp[i]->grad, 0, hp[i]->size * sizeof(float));
    }
    graph_backward(H, x_rec, x_rec_l->grad);
    double nll_norm = head_norm(a->dec.conv_out_w);
    for (size_t i = 0, o = 0; i < 4; o += hp[i]->size, i++) {
        memcpy(keep + o, hp[i]->grad, hp[i]->size * sizeof(float));
        memset(hp[i]->grad, 0, hp[i]->size * sizeof(float));
    }
    memcpy(keep_dh, h->grad, h->size * sizeof(float));
    graph_reset(H);  // head, second pass: the same forward, backward from g_loss
    h = tensor_from(H, h_trunk->ndim, h_trunk->shape, h_trunk->data);
    h->requires_grad = 1;
    Tensor *x_rec2 = ae_decode_head(H, a, h);
    graph_backward(H, x_rec2, x_rec_d->grad);
    double g_norm = head_norm(a->dec.conv_out_w);
    double d_weight = nll_norm / (g_norm + 1e-4);
    d_weight = (d_weight < 0 ? 0 : d_weight > 1e4 ? 1e4 : d_weight) * t->cfg.disc_weight;
    float w_g = (float)d_weight * disc_factor_at(&t->cfg, step);
    // grad = before + grad nll + w_g * grad g_loss, in the head and at h
    for (size_t i = 0, o = 0; i < 4; o += hp[i]->size, i++)
        for (size_t k = 0; k < hp[i]->size; k++)
            hp[i]->grad[k] = before[o + k] + keep[o + k] + w_g * hp[i]->grad[k];
    for (size_t k = 0; k < h->size; k++) keep_dh[k] += w_g * h->grad[k];
    // the trunk: seeded at h with that sum, and at the KL term with kl_weight
    graph_seed(T, h_trunk, keep_dh);
    float kl_weight = t->cfg.kl_weight;
    graph_backward(T, kl, &kl_weight);
    terms->kl = kl->data[0];
    terms->logvar = t->cfg.logvar;
    terms->g_loss = g_loss->data[0];
    terms->d_weight = d_weight;
    terms->loss = terms->nll + t->cfg.kl_weight * terms->kl + w_g * terms->g_loss;
}

// The discriminator step: a new forward of the autoencoder (no tape), then
// d_loss = disc_factor * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec))) / 2
// (hinge_d_loss), D run on the real and the reconstructed batch separately.
// Its gradient goes into disc->params' (zero it first). Returns 0, doing
// nothing, while disc_factor is 0: there the official step's loss is 0 * hinge
// and its gradient 0, which leaves Adam's moments at 0 and the weights as
// they are; the caller still counts Adam's step (the bias correction). The
// running statistics those forwards would update are not read in training.
int ae_discriminator_grads(AETrainer *t, const float *x, int n, long step, const float *eps,
                           AELossTerms *terms) {
    float factor = disc_factor_at(&t->cfg, step);
    terms->d_loss = terms->logits_real = terms->logits_fake = 0.0;
    if (factor == 0.0f) return 0;
    Autoencoder *a = t->ae;
    const AEConfig *c = &a->cfg;
    int R = c->resolution, xs[4] = {n, c->in_channels, R, R};
    Graph *T = &t->trunk, *D = &t->gan;
    graph_reset(T);
    T->grad_enabled = 0;
    Tensor *moments = ae_encode(T, a, tensor_from(T, 4, xs, x));
    Tensor *x_rec = ae_decode(T, a, gaussian_sample(T, moments, eps));
    T->grad_enabled = 1;
    graph_reset(D);
    Tensor *real = patchgan_forward(D, t->disc, tensor_from(D, 4, xs, x));
    Tensor *fake = patchgan_forward(D, t->disc, tensor_from(D, 4, xs, x_rec->data));
    Tensor *loss_real = mean_all(D, relu(D, scale_shift(D, real, -1.0f, 1.0f)));
    Tensor *loss_fake = mean_all(D, relu(D, scale_shift(D, fake, 1.0f, 1.0f)));
    Tensor *d_loss = scale_shift(D, add(D, loss_real, loss_fake), 0.5f * factor, 0.0f);
    graph_backward(D, d_loss, NULL);
    double sr = 0, sf = 0;
    for (size_t i = 0; i < real->size; i++) sr += real->data[i];
    for (size_t i = 0; i < fake->size; i++) sf += fake->data[i];
    terms->d_loss = d_loss->data[0];
    terms->logits_real = sr / (double)real->size;
    terms->logits_fake = sf / (double)fake->size;
    return 1;
}

// ---------------------------------------------------------------------------
// ---- stage two: the denoising-diffusion GAN's diffusion ----
// LDDGAN's diffusion.py (DDGAN's train_ddgan.py): T large steps of a VP
// process; see tools/lddgan_facts.md section 3 and tools/lddgan_ref.py. The
// code computes the schedule in float64, casts the betas to float32 and
// derives everything else in float32; so do we, operation for operation.
// ---------------------------------------------------------------------------
void gan_schedule_init(GanSchedule *s, int T, double beta_min, double beta_max) {
    if (T < 1 || T > GAN_MAX_T) fatal("gan schedule: T = %d is outside 1..%d", T, GAN_MAX_T);
    memset(s, 0, sizeof *s);
    s->T = T;
    double abar[GAN_MAX_T + 1];
    for (int i = 0; i <= T; i++) {  // get_sigma_schedule: t_i = i / T * (1 - 1e-3) + 1e-3, var_func_vp
        double t = (double)i / T * (1.0 - 1e-3) + 1e-3;
        double log_mean = -0.25 * t * t * (beta_max - beta_min) - 0.5 * t * beta_min;
        abar[i] = 1.0 - (1.0 - exp(2.0 * log_mean));
    }
    s->betas[0] = 1e-8f;
    for (int i = 1; i <= T; i++) s->betas[i] = (float)(1.0 - abar[i] / abar[i - 1]);
    float cum = 1.0f;
    for (int i = 0; i <= T; i++) {  // Diffusion_Coefficients
        s->sigmas[i] = sqrtf(s->betas[i]);
        s->a_s[i] = sqrtf(1.0f - s->betas[i]);
        cum *= s->a_s[i];
        s->a_s_cum[i] = cum;
        s->sigmas_cum[i] = sqrtf(1.0f - cum * cum);
    }
    float ac_prev = 1.0f;
    for (int t = 0; t < T; t++) {  // Posterior_Coefficients, from betas[1:]
        float b = s->betas[t + 1], alpha = 1.0f - b, ac = ac_prev * alpha;
        float var = b * (1.0f - ac_prev) / (1.0f - ac);
        s->post_var[t] = var;
        s->post_coef1[t] = b * sqrtf(ac_prev) / (1.0f - ac);
        s->post_coef2[t] = (1.0f - ac_prev) * sqrtf(alpha) / (1.0f - ac);
        s->post_log_var[t] = logf(var > 1e-20f ? var : 1e-20f);
        ac_prev = ac;
    }
}

static void check_steps(const int *t, int n, int hi, const char *what) {
    for (int i = 0; i < n; i++)
        if (t[i] < 0 || t[i] > hi) fatal("%s: step %d of sample %d is outside 0..%d", what, t[i], i, hi);
}

// q_sample_pairs: x_t = a_cum[t] x0 + sigma_cum[t] eps2, x_{t+1} = a[t+1] x_t
// + sigma[t+1] eps1, t in 0..T-1 per sample (per floats each)
void gan_q_sample_pairs(const GanSchedule *s, const float *x0, const int *t, const float *eps1,
                        const float *eps2, int n, size_t per, float *x_t, float *x_tp1) {
    check_steps(t, n, s->T - 1, "q_sample_pairs");
    for (int i = 0; i < n; i++) {
        float ac = s->a_s_cum[t[i]], sc = s->sigmas_cum[t[i]], a = s->a_s[t[i] + 1],
              sg = s->sigmas[t[i] + 1];
        for (size_t k = i * per; k < (i + 1) * per; k++) {
            x_t[k] = ac * x0[k] + sc * eps2[k];
            x_tp1[k] = a * x_t[k] + sg * eps1[k];
        }
    }
}

// sample_posterior: x_t = coef1[t] x0' + coef2[t] x_{t+1} + [t != 0]
// exp(log_var[t] / 2) eps; a graph op in x0' (the G step backpropagates
// through it into the generator); x_tp1 and eps take no gradient
Tensor *gan_sample_posterior(Graph *g, const GanSchedule *s, Tensor *x0, const float *x_tp1,
                             const int *t, const float *eps) {
    int n = x0->shape[0];
    size_t per = x0->size / (size_t)n;
    check_steps(t, n, s->T - 1, "sample_posterior");
    int cs[4] = {n, 1, 1, 1};
    Tensor *c1 = tensor_new(g, 4, cs), *rest = tensor_new(g, x0->ndim, x0->shape);
    for (int i = 0; i < n; i++) {
        int ti = t[i];
        c1->data[i] = s->post_coef1[ti];
        float c2 = s->post_coef2[ti], sd = ti ? expf(0.5f * s->post_log_var[ti]) : 0.0f;
        for (size_t k = i * per; k < (i + 1) * per; k++) rest->data[k] = c2 * x_tp1[k] + sd * eps[k];
    }
    return add(g, mul(g, x0, c1), rest);
}

// ---------------------------------------------------------------------------
// ---- stage two: the time-conditioned discriminator (Discriminator_small) ----
// DDGAN's score_sde/models/discriminator.py as LDDGAN ships it (facts with
// file:line: tools/lddgan_facts.md section 2). Parameter names are its
// state_dict keys. Every op between the input x_t and the logit has a vjp,
// so graph_grad gives R1's exact gradient (double backward).
// ---------------------------------------------------------------------------
static const float fir_1331[4] = {1, 3, 3, 1};

// downsample_2d(x, [1,3,3,1]): upfirdn2d with outer(k, k) / 64, down 2, pads (1, 1)
static Tensor *fir_down(Graph *g, Tensor *x) {
    float k[16];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) k[i * 4 + j] = fir_1331[i] * fir_1331[j] / 64.0f;
    return upfirdn2d(g, x, k, 4, 1, 2, 1, 1);
}

// get_timestep_embedding (layers.py:473-484): half = dim / 2, f_k =
// exp(-k ln(10000) / (half - 1)) in float32, cat(sin(t f), cos(t f)), sin first
void gan_timestep_embedding(float *out, const int *t, int n, int dim) {
    int half = dim / 2;
    float step = (float)(log(10000.0) / (half - 1));
    for (int i = 0; i < n; i++)
        for (int k = 0; k < half; k++) {
            float a = (float)t[i] * expf((float)k * -step);
            out[(size_t)i * dim + k] = sinf(a);
            out[(size_t)i * dim + half + k] = cosf(a);
        }
}

static void declare_dense(ParamDecl *d, Tensor **w, Tensor **b, const char *prefix, int out, int in) {
    param_declare_weight_bias(d, w, b, prefix, 2, out, in, 0, 0);
}

// Discriminator_small's parameters declared in state_dict order (no allocation)
static void disc_layout(GanDisc *d, int in_channels, int ngf, int t_emb_dim, int num_layers,
                        ParamDecl *pd) {
    if (num_layers < 3 || num_layers > GAN_DISC_MAX_BLOCKS)
        fatal("gan discriminator: %d layers (3..%d)", num_layers, GAN_DISC_MAX_BLOCKS);
    memset(d, 0, sizeof *d);
    d->in_channels = in_channels;
    d->ngf = ngf;
    d->t_emb_dim = t_emb_dim;
    d->n_blocks = num_layers;
    params_init(&d->params);
    param_decl_init(pd, &d->params);
    char name[96];
    declare_dense(pd, &d->temb_w[0], &d->temb_b[0], "t_embed.main.0", t_emb_dim, t_emb_dim);
    declare_dense(pd, &d->temb_w[1], &d->temb_b[1], "t_embed.main.2", t_emb_dim, t_emb_dim);
    param_declare_weight_bias(pd, &d->start_w, &d->start_b, "start_conv", 4, 2 * ngf, in_channels, 1, 1);
    int ch = 2 * ngf;
    for (int k = 0; k < num_layers; k++) {  // conv1 keeps the size; conv2.. halve it
        GanDownBlock *b = &d->block[k];
        b->in = ch;
        b->out = k == 0 ? ch : ch * 2 > 8 * ngf ? 8 * ngf : ch * 2;
        b->down = k > 0;
        snprintf(name, sizeof name, "conv%d.conv1.0", k + 1);
        param_declare_weight_bias(pd, &b->conv1_w, &b->conv1_b, name, 4, b->out, b->in, 3, 3);
        snprintf(name, sizeof name, "conv%d.conv2.0", k + 1);
        param_declare_weight_bias(pd, &b->conv2_w, &b->conv2_b, name, 4, b->out, b->out, 3, 3);
        snprintf(name, sizeof name, "conv%d.dense_t1", k + 1);
        declare_dense(pd, &b->dense_w, &b->dense_b, name, b->out, t_emb_dim);
        snprintf(name, sizeof name, "conv%d.skip.0.weight", k + 1);
        param_declare(pd, &b->skip_w, name, 4, b->out, b->in, 1, 1);
        ch = b->out;
    }
    param_declare_weight_bias(pd, &d->final_w, &d->final_b, "final_conv", 4, ch, ch + 1, 3, 3);
    declare_dense(pd, &d->end_w, &d->end_b, "end_linear", 1, ch);
}

void gan_disc_init(GanDisc *d, int in_channels, int ngf, int t_emb_dim, int num_layers, int trainable,
                   Rng *rng) {
    ParamDecl pd;
    disc_layout(d, in_channels, ngf, t_emb_dim, num_layers, &pd);
    params_alloc(&d->params, trainable);
    param_decl_fill(&pd);
    if (!rng) return;
    // dense_layer.conv2d / dense: U(+-sqrt(3 gain / fan_out)), fan_out = out x k x k
    // (dense_layer.py:22-32, 63: its 'fan_avg' falls through to fan_out), biases 0;
    // gain 1e-10 for the blocks' conv2 and final_conv (init_scale 0, :62, 287)
    for (size_t i = 0; i < d->params.count; i++) {
        Tensor *t = params_get(&d->params, i);
        if (t->ndim == 1) continue;  // biases stay 0
        double fan_out = (double)t->size / t->shape[1];
        int tiny = strstr(t->name, ".conv2.0.") || strncmp(t->name, "final_conv.", 11) == 0;
        float bound = (float)sqrt(3.0 * (tiny ? 1e-10 : 1.0) / fan_out);
        rng_fill_uniform(rng, t->data, t->size, -bound, bound);
    }
}

void gan_disc_free(GanDisc *d) { params_free(&d->params); }

// DownConvBlock (discriminator.py:40-86): out = conv1(act(x)) + dense_t1(temb);
// act; FIR downsampling of out and x when down; (conv2(out) + skip(x)) / sqrt 2
static Tensor *down_block(Graph *g, const GanDownBlock *b, Tensor *x, Tensor *temb) {
    Tensor *shift = linear(g, temb, b->dense_w, b->dense_b);
    Tensor *h = conv2d_add(g, leaky_relu(g, x, 0.2f), b->conv1_w, b->conv1_b, shift, NULL, 1, 1);
    h = leaky_relu(g, h, 0.2f);
    if (b->down) {
        h = fir_down(g, h);
        x = fir_down(g, x);
    }
    Tensor *skip = conv2d(g, x, b->skip_w, NULL, 1, 0);
    return scale_shift(g, conv2d_add(g, h, b->conv2_w, b->conv2_b, NULL, skip, 1, 1),
                       (float)(1.0 / sqrt(2.0)), 0.0f);
}

// D(x_t, t, x_{t+1}) (discriminator.py:295-337): logits (N, 1)
Tensor *gan_disc_forward(Graph *g, GanDisc *d, Tensor *x_t, const int *t, Tensor *x_tp1) {
    int N = x_t->shape[0];
    if (x_t->ndim != 4 || !same_shape(x_t, x_tp1) || 2 * x_t->shape[1] != d->in_channels)
        fatal("gan discriminator: x_t and x_{t+1} must both be (N, %d, H, W)", d->in_channels / 2);
    int es[2] = {N, d->t_emb_dim};
    Tensor *e = tensor_new(g, 2, es);
    gan_timestep_embedding(e->data, t, N, d->t_emb_dim);
    // TimestepEmbedding: dense, act, dense; then act once more in forward (:298)
    Tensor *temb = linear(g, e, d->temb_w[0], d->temb_b[0]);
    temb = leaky_relu(g, linear(g, leaky_relu(g, temb, 0.2f), d->temb_w[1], d->temb_b[1]), 0.2f);
    Tensor *h = conv2d(g, concat_channels(g, x_t, x_tp1), d->start_w, d->start_b, 1, 0);
    for (int k = 0; k < d->n_blocks; k++) h = down_block(g, &d->block[k], h, temb);
    // minibatch std: groups of min(N, 4) (:313-321)
    h = minibatch_std(g, h, N < 4 ? N : 4);
    h = leaky_relu(g, conv2d(g, h, d->final_w, d->final_b, 1, 1), 0.2f);
    int HW = h->shape[2] * h->shape[3], s2[2] = {N, h->shape[1]};
    Tensor *sum = reshape(g, scale_shift(g, mean_hw(g, h), (float)HW, 0.0f), 2, s2);  // sum over H, W
    return linear(g, sum, d->end_w, d->end_b);
}

// ---------------------------------------------------------------------------
// ---- stage two: the generator (score_sde's NCSNpp, ncsnpp_generator_adagn.py) ----
// LDDGAN's configuration (tools/lddgan_facts.md section 1): AdaGN BigGAN
// ResBlocks with FIR resampling, the residual input pyramid, attention in the
// middle, tanh; the z mapping network and the sinusoidal time embedding.
// Parameter names are its state_dict keys (all_modules.<i>.*, z_transform.*).
// ---------------------------------------------------------------------------
void gan_gen_cifar10_config(GanGenConfig *c) {
    memset(c, 0, sizeof *c);
    c->channels = 4;        // the autoencoder's latent channels
    c->image_size = 16;     // the latent side (run.sh --current_resolution 16)
    c->nf = 128;
    c->n_levels = 3;
    c->ch_mult[0] = 1;
    c->ch_mult[1] = c->ch_mult[2] = 2;
    c->num_res_blocks = 2;
    c->n_attn = 1;
    c->attn_resolutions[0] = 32;  // run.sh's 32: no level has it, only the middle attends
    c->nz = 50;
    c->zdim = 256;
    c->n_mlp = 4;
}

static int gen_has_attn(const GanGenConfig *c, int res) {
    for (int i = 0; i < c->n_attn; i++)
        if (c->attn_resolutions[i] == res) return 1;
    return 0;
}

static int gn_groups(int c) { return c / 4 < 32 ? c / 4 : 32; }  // min(C // 4, 32)

static GanModule *gen_next(GanGen *G, int kind) {
    if (G->n_mod == GAN_GEN_MAX_MODULES) fatal("gan generator: more than %d modules", GAN_GEN_MAX_MODULES);
    GanModule *m = &G->mod[G->n_mod++];
    memset(m, 0, sizeof *m);
    m->kind = kind;
    return m;
}

static void declare_resblock_g(ParamDecl *d, GanResBlock *r, int idx, int in, int out, int tdim,
                               int zdim, int up, int down) {
    char p[64], n[96];
    snprintf(p, sizeof p, "all_modules.%d", idx);
    r->in = in;
    r->out = out;
    r->up = up;
    r->down = down;
    snprintf(n, sizeof n, "%s.GroupNorm_0.style", p);
    declare_dense(d, &r->style0_w, &r->style0_b, n, 2 * in, zdim);
    snprintf(n, sizeof n, "%s.Conv_0", p);
    param_declare_weight_bias(d, &r->conv0_w, &r->conv0_b, n, 4, out, in, 3, 3);
    snprintf(n, sizeof n, "%s.Dense_0", p);
    declare_dense(d, &r->dense0_w, &r->dense0_b, n, out, tdim);
    snprintf(n, sizeof n, "%s.GroupNorm_1.style", p);
    declare_dense(d, &r->style1_w, &r->style1_b, n, 2 * out, zdim);
    snprintf(n, sizeof n, "%s.Conv_1", p);
    param_declare_weight_bias(d, &r->conv1_w, &r->conv1_b, n, 4, out, out, 3, 3);
    if (in != out || up || down) {
        snprintf(n, sizeof n, "%s.Conv_2", p);
        param_declare_weight_bias(d, &r->conv2_w, &r->conv2_b, n, 4, out, in, 1, 1);
    }
}

static void declare_attn_g(ParamDecl *d, GanAttn *a, int idx, int c) {
    char n[96];
    a->c = c;
    snprintf(n, sizeof n, "all_modules.%d.GroupNorm_0", idx);
    param_declare_weight_bias(d, &a->gn_w, &a->gn_b, n, 1, c, 0, 0, 0);
    for (int i = 0; i < 4; i++) {
        snprintf(n, sizeof n, "all_modules.%d.NIN_%d.W", idx, i);
        param_declare(d, &a->nin_w[i], n, 2, c, c, 0, 0);
        snprintf(n, sizeof n, "all_modules.%d.NIN_%d.b", idx, i);
        param_declare(d, &a->nin_b[i], n, 1, c, 0, 0, 0);
    }
}

// the module list of NCSNpp.__init__ (ncsnpp_generator_adagn.py:122-294)
static void gen_layout(GanGen *G, ParamDecl *d) {
    const GanGenConfig *c = &G->cfg;
    int nf = c->nf, tdim = 4 * nf, zdim = c->zdim, idx = 3;
    char n[96];
    G->n_mod = 0;
    declare_dense(d, &G->temb_w[0], &G->temb_b[0], "all_modules.0", tdim, nf);
    declare_dense(d, &G->temb_w[1], &G->temb_b[1], "all_modules.1", tdim, tdim);
    param_declare_weight_bias(d, &G->conv_in_w, &G->conv_in_b, "all_modules.2", 4, nf, c->channels, 3, 3);
    int hs[2 * GAN_GEN_MAX_MODULES], nhs = 0, cin = nf, res = c->image_size, pyr = c->channels;
    hs[nhs++] = nf;
    for (int l = 0; l < c->n_levels; l++) {
        for (int i = 0; i < c->num_res_blocks; i++) {
            GanModule *m = gen_next(G, GAN_MOD_RES);
            declare_resblock_g(d, &m->rb, idx++, cin, nf * c->ch_mult[l], tdim, zdim, 0, 0);
            cin = nf * c->ch_mult[l];
            if (gen_has_attn(c, res)) declare_attn_g(d, &gen_next(G, GAN_MOD_ATTN)->at, idx++, cin);
            hs[nhs++] = cin;
        }
        if (l != c->n_levels - 1) {
            declare_resblock_g(d, &gen_next(G, GAN_MOD_RES)->rb, idx++, cin, cin, tdim, zdim, 0, 1);
            GanModule *m = gen_next(G, GAN_MOD_PYRAMID);
            snprintf(n, sizeof n, "all_modules.%d.Conv2d_0", idx++);
            param_declare_weight_bias(d, &m->pd_w, &m->pd_b, n, 4, cin, pyr, 3, 3);
            pyr = cin;
            res /= 2;
            hs[nhs++] = cin;
        }
    }
    declare_resblock_g(d, &gen_next(G, GAN_MOD_RES)->rb, idx++, cin, cin, tdim, zdim, 0, 0);
    declare_attn_g(d, &gen_next(G, GAN_MOD_ATTN)->at, idx++, cin);
    declare_resblock_g(d, &gen_next(G, GAN_MOD_RES)->rb, idx++, cin, cin, tdim, zdim, 0, 0);
    for (int l = c->n_levels - 1; l >= 0; l--) {
        for (int i = 0; i <= c->num_res_blocks; i++) {
            int out = nf * c->ch_mult[l];
            declare_resblock_g(d, &gen_next(G, GAN_MOD_RES)->rb, idx++, cin + hs[--nhs], out, tdim,
                               zdim, 0, 0);
            cin = out;
        }
        if (gen_has_attn(c, res)) declare_attn_g(d, &gen_next(G, GAN_MOD_ATTN)->at, idx++, cin);
        if (l != 0) {
            declare_resblock_g(d, &gen_next(G, GAN_MOD_RES)->rb, idx++, cin, cin, tdim, zdim, 1, 0);
            res *= 2;
        }
    }
    snprintf(n, sizeof n, "all_modules.%d", idx++);
    param_declare_weight_bias(d, &G->norm_w, &G->norm_b, n, 1, cin, 0, 0, 0);
    snprintf(n, sizeof n, "all_modules.%d", idx++);
    param_declare_weight_bias(d, &G->conv_out_w, &G->conv_out_b, n, 4, c->channels, cin, 3, 3);
    // z_transform: PixelNorm (0), dense (1), SiLU (2), then (dense, SiLU) n_mlp times
    G->n_z = c->n_mlp + 1;
    for (int i = 0; i < G->n_z; i++) {
        snprintf(n, sizeof n, "z_transform.%d", 1 + 2 * i);
        declare_dense(d, &G->z_w[i], &G->z_b[i], n, zdim, i ? zdim : c->nz);
    }
}

int gan_gen_check_config(const GanGenConfig *c, char *err, size_t errlen) {
    if (c->channels < 1 || c->nf < 4 || c->n_levels < 1 || c->n_levels > GAN_GEN_MAX_LEVELS ||
        c->num_res_blocks < 1 || c->num_res_blocks > 8 || c->nz < 1 || c->zdim < 1 ||
        c->n_mlp < 0 || c->n_mlp > GAN_GEN_MAX_MLP - 1 || c->image_size < 1)
        return errorf(err, errlen, "gan generator: a configuration value is out of range");
    if (c->image_size % (1 << (c->n_levels - 1)))
        return errorf(err, errlen, "gan generator: side %d does not halve %d times", c->image_size,
                      c->n_levels - 1);
    for (int l = 0; l < c->n_levels; l++)
        if (c->ch_mult[l] < 1 || (c->nf * c->ch_mult[l]) % 4 ||
            (c->nf * c->ch_mult[l]) % gn_groups(c->nf * c->ch_mult[l]))
            return errorf(err, errlen, "gan generator: nf %d x mult %d does not split into groups",
                          c->nf, c->ch_mult[l]);
    return 0;
}

// default_init(scale) (layers.py:68-105): U(+-sqrt(3 scale / fan_avg)), fan_avg
// = (fan_in + fan_out) / 2, 1e-10 for scale 0; dense_layer.dense (the AdaGN
// styles, z_transform): U(+-sqrt(3 / fan_out)); biases 0 but the styles'
// gamma halves, 1 (layerspp.py:52-55); GroupNorm scales 1
static void gen_init_weights(GanGen *G, Rng *rng) {
    for (size_t i = 0; i < G->params.count; i++) {
        Tensor *t = params_get(&G->params, i);
        const char *nm = t->name;
        if (t->ndim == 1) {
            if (strstr(nm, ".style.bias")) {
                for (size_t k = 0; k < t->size / 2; k++) t->data[k] = 1.0f;
            } else if (ends_with(nm, ".weight")) {
                for (size_t k = 0; k < t->size; k++) t->data[k] = 1.0f;  // GroupNorm
            }
            continue;
        }
        double rf = t->ndim == 4 ? (double)t->shape[2] * t->shape[3] : 1.0;
        double fan_in = t->shape[1] * rf, fan_out = t->shape[0] * rf, var;
        if (strstr(nm, ".style.") || strncmp(nm, "z_transform.", 12) == 0) {
            var = 1.0 / fan_out;
        } else {
            double scale = 1.0;
            if (strstr(nm, ".Conv_1.") || strstr(nm, ".NIN_3.")) scale = 1e-10;  // init_scale 0
            else if (strstr(nm, ".NIN_")) scale = 0.1;
            else if (t == G->conv_out_w) scale = 1e-10;
            var = scale / ((fan_in + fan_out) / 2.0);
        }
        float bound = (float)sqrt(3.0 * var);
        rng_fill_uniform(rng, t->data, t->size, -bound, bound);
    }
}

void gan_gen_init(GanGen *G, const GanGenConfig *c, int trainable, Rng *rng) {
    char err[256];
    if (gan_gen_check_config(c, err, sizeof err) != 0) fatal("%s", err);
    memset(G, 0, sizeof *G);
    G->cfg = *c;
    params_init(&G->params);
    ParamDecl d;
    param_decl_init(&d, &G->params);
    gen_layout(G, &d);
    params_alloc(&G->params, trainable);
    param_decl_fill(&d);
    if (rng) gen_init_weights(G, rng);
}

void gan_gen_free(GanGen *G) { params_free(&G->params); }

// FIR upsample_2d: outer([1,3,3,1]) / 64 x gain 1 x factor^2, up 2, pads (2, 1)
static Tensor *fir_up(Graph *g, Tensor *x) {
    float k[16];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) k[i * 4 + j] = fir_1331[i] * fir_1331[j] / 16.0f;
    return upfirdn2d(g, x, k, 4, 2, 1, 2, 1);
}

// SiLU(AdaGN(x)): GroupNorm without affine, gamma * GN + beta with (gamma,
// beta) = style(zemb); as FiLM: GN * (1 + (gamma - 1)) + beta
// AdaGN's norm as the engine's NormSpec: gamma (N, C) and beta from the
// style dense layer on zemb (the first half gamma), GroupNorm without affine,
// then SiLU; FiLM's scale is gamma - 1 (NormSpec's GN(x) (1 + scale) + shift)
static NormSpec adagn_spec(Graph *g, Tensor *x, Tensor *w, Tensor *b, Tensor *zemb) {
    int N = x->shape[0], C = x->shape[1], s4[4] = {N, 2 * C, 1, 1}, s2[2] = {N, C};
    Tensor *s = reshape(g, linear(g, zemb, w, b), 4, s4);
    NormSpec n = {.scale = scale_shift(g, reshape(g, slice_channels(g, s, 0, C), 2, s2), 1.0f, -1.0f),
                  .shift = reshape(g, slice_channels(g, s, C, 2 * C), 2, s2),
                  .silu = 1, .groups = gn_groups(C), .eps = 1e-6f};
    return n;
}

static Tensor *adagn_silu(Graph *g, Tensor *x, Tensor *w, Tensor *b, Tensor *zemb) {
    NormSpec n = adagn_spec(g, x, w, b, zemb);
    return groupnorm_film_silu(g, x, NULL, NULL, n.scale, n.shift, 1, 0.0f, n.groups, n.eps);
}

// ResnetBlockBigGANpp_Adagn (layerspp.py:275-344); temb_act = SiLU(temb)
static Tensor *resblock_g(Graph *g, const GanResBlock *r, Tensor *x, Tensor *temb_act, Tensor *zemb) {
    Tensor *h = adagn_silu(g, x, r->style0_w, r->style0_b, zemb);
    if (r->up) {
        h = fir_up(g, h);
        x = fir_up(g, x);
    } else if (r->down) {
        h = fir_down(g, h);
        x = fir_down(g, x);
    }
    h = conv2d_add(g, h, r->conv0_w, r->conv0_b, linear(g, temb_act, r->dense0_w, r->dense0_b),
                   NULL, 1, 1);
    // the second AdaGN, SiLU and Conv_1 with the skip added: one node (norm_conv2d)
    Tensor *skip = r->conv2_w ? conv2d(g, x, r->conv2_w, r->conv2_b, 1, 0) : x;
    NormSpec n1 = adagn_spec(g, h, r->style1_w, r->style1_b, zemb);
    return scale_shift(g, norm_conv2d(g, h, &n1, r->conv1_w, r->conv1_b, skip, 1),
                       (float)(1.0 / sqrt(2.0)), 0.0f);
}

// AttnBlockpp (layerspp.py:99-128): q, k, v = NIN(GroupNorm(x)), one head,
// scale C^-1/2; (x + NIN_3(attention)) / sqrt 2. The NIN weights (in, out)
// are transposed into one stacked 1x1 convolution, as lddgan.c's AttnBlock.
static Tensor *attn_g(Graph *g, const GanAttn *a, Tensor *x) {
    int B = x->shape[0], C = x->shape[1], H = x->shape[2], W = x->shape[3];
    Tensor *wt[4];
    for (int i = 0; i < 4; i++) wt[i] = view4(g, transpose2d(g, a->nin_w[i]), 1, C * C, 1, 1);
    Tensor *w = concat_channels(g, concat_channels(g, wt[0], wt[1]), wt[2]);
    Tensor *b = concat_channels(g, concat_channels(g, view4(g, a->nin_b[0], 1, C, 1, 1),
                                                   view4(g, a->nin_b[1], 1, C, 1, 1)),
                                view4(g, a->nin_b[2], 1, C, 1, 1));
    int s1[1] = {3 * C}, s3[3] = {B, 3 * C, H * W};
    NormSpec norm = {.gamma = a->gn_w, .beta = a->gn_b, .groups = gn_groups(C), .eps = 1e-6f};
    Tensor *qkv = norm_conv2d(g, x, &norm, view4(g, w, 3 * C, C, 1, 1), reshape(g, b, 1, s1), NULL, 0);
    Tensor *o = qkv_attention(g, reshape(g, qkv, 3, s3), (float)(1.0 / sqrt((double)C)));
    Tensor *y = conv2d_add(g, view4(g, o, B, C, H, W), view4(g, wt[3], C, C, 1, 1), a->nin_b[3],
                           NULL, x, 1, 0);
    return scale_shift(g, y, (float)(1.0 / sqrt(2.0)), 0.0f);
}

// the pyramid's Downsample (layerspp.py:176-200): a FIR blur with pads (2, 2),
// then a 3x3 stride-2 convolution without padding (conv_downsample_2d)
static Tensor *pyramid_down(Graph *g, const GanModule *m, Tensor *x) {
    float k[16];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) k[i * 4 + j] = fir_1331[i] * fir_1331[j] / 64.0f;
    return conv2d(g, upfirdn2d(g, x, k, 4, 1, 1, 2, 2), m->pd_w, m->pd_b, 2, 0);
}

// NCSNpp.forward (ncsnpp_generator_adagn.py:296-454): x0' = G(x_{t+1}, t, z)
Tensor *gan_gen_forward(Graph *g, GanGen *G, Tensor *x, const int *t, Tensor *z) {
    const GanGenConfig *c = &G->cfg;
    int N = x->shape[0];
    if (x->ndim != 4 || x->shape[1] != c->channels || x->shape[2] != c->image_size ||
        x->shape[3] != c->image_size || z->ndim != 2 || z->shape[0] != N || z->shape[1] != c->nz)
        fatal("gan generator: x must be (N, %d, %d, %d) and z (N, %d)", c->channels, c->image_size,
              c->image_size, c->nz);
    Tensor *zemb = pixel_norm(g, z);
    for (int i = 0; i < G->n_z; i++) zemb = silu(g, linear(g, zemb, G->z_w[i], G->z_b[i]));
    int es[2] = {N, c->nf};
    Tensor *e = tensor_new(g, 2, es);
    gan_timestep_embedding(e->data, t, N, c->nf);
    Tensor *temb = linear(g, silu(g, linear(g, e, G->temb_w[0], G->temb_b[0])), G->temb_w[1], G->temb_b[1]);
    Tensor *temb_act = silu(g, temb);  // (every ResBlock's Dense_0 reads SiLU(temb))
    Tensor *hs[2 * GAN_GEN_MAX_MODULES];
    int nhs = 0, i = 0;
    Tensor *pyr = x, *h;
    hs[nhs++] = conv2d(g, x, G->conv_in_w, G->conv_in_b, 1, 1);
    for (int l = 0; l < c->n_levels; l++) {
        for (int r = 0; r < c->num_res_blocks; r++) {
            h = resblock_g(g, &G->mod[i++].rb, hs[nhs - 1], temb_act, zemb);
            if (i < G->n_mod && G->mod[i].kind == GAN_MOD_ATTN) h = attn_g(g, &G->mod[i++].at, h);
            hs[nhs++] = h;
        }
        if (l != c->n_levels - 1) {
            h = resblock_g(g, &G->mod[i++].rb, hs[nhs - 1], temb_act, zemb);
            pyr = scale_shift(g, add(g, pyramid_down(g, &G->mod[i++], pyr), h),
                              (float)(1.0 / sqrt(2.0)), 0.0f);
            hs[nhs++] = pyr;
        }
    }
    h = hs[nhs - 1];
    h = resblock_g(g, &G->mod[i++].rb, h, temb_act, zemb);
    h = attn_g(g, &G->mod[i++].at, h);
    h = resblock_g(g, &G->mod[i++].rb, h, temb_act, zemb);
    for (int l = c->n_levels - 1; l >= 0; l--) {
        for (int r = 0; r <= c->num_res_blocks; r++)
            h = resblock_g(g, &G->mod[i++].rb, concat_channels(g, h, hs[--nhs]), temb_act, zemb);
        if (i < G->n_mod && G->mod[i].kind == GAN_MOD_ATTN) h = attn_g(g, &G->mod[i++].at, h);
        if (l != 0) h = resblock_g(g, &G->mod[i++].rb, h, temb_act, zemb);
    }
    NormSpec n = {.gamma = G->norm_w, .beta = G->norm_b, .silu = 1, .groups = gn_groups(h->shape[1]),
                  .eps = 1e-6f};
    return tensor_tanh(g, norm_conv2d(g, h, &n, G->conv_out_w, G->conv_out_b, NULL, 1));
}

// ---------------------------------------------------------------------------
// ---- stage two: one training iteration's gradients (train_ldgan.py:192-280) ----
// The D step, then the G step, each on its own pairs (x_t, x_{t+1}) of the same
// latents; the noise is given (the program draws it in the code's order).
// ---------------------------------------------------------------------------
void gan_trainer_init(GanTrainer *tr, GanGen *G, GanDisc *D, const GanSchedule *s) {
    memset(tr, 0, sizeof *tr);
    tr->G = G;
    tr->D = D;
    tr->s = s;
    graph_init(&tr->gd, 64u << 20, 0);
    graph_init(&tr->gg, 64u << 20, 0);
}

void gan_trainer_free(GanTrainer *tr) {
    graph_free(&tr->gd);
    graph_free(&tr->gg);
}

static void params_trainable(ParamSet *ps, int on) {
    for (size_t i = 0; i < ps->count; i++) ps->t[i].requires_grad = on;
}

static double mean_of(const Tensor *t) {
    double s = 0.0;
    for (size_t i = 0; i < t->size; i++) s += t->data[i];
    return s / (double)t->size;
}

// D's gradient (added into D->params): softplus(-D(x_t)) mean, with R1 =
// gamma / 2 mean_n |d sum D(x_t) / d x_t|^2 when r1_gamma > 0 (the lazy
// steps; not rescaled, :227-231), plus softplus(D(x'_t)) mean on the posterior
// sample of the generator's x0' (the generator takes no gradient here)
// a step's graph reset, and its pair (x_t, x_{t+1}) of the latents x0 as leaves
static Graph *gan_step_pair(GanTrainer *tr, Graph *g, const float *x0, int n, const int *t,
                            const GanNoise *nz, Tensor **x_t, Tensor **x_tp1) {
    const GanGenConfig *c = &tr->G->cfg;
    int S = c->image_size, xs[4] = {n, c->channels, S, S};
    graph_reset(g);
    *x_t = tensor_new(g, 4, xs);
    *x_tp1 = tensor_new(g, 4, xs);
    gan_q_sample_pairs(tr->s, x0, t, nz->eps1, nz->eps2, n, (size_t)c->channels * S * S,
                       (*x_t)->data, (*x_tp1)->data);
    return g;
}

void gan_d_grads(GanTrainer *tr, const float *x0, int n, const int *t, const GanNoise *nz,
                 float r1_gamma, GanTerms *terms) {
    int zs[2] = {n, tr->G->cfg.nz};
    Tensor *x_t, *x_tp1;
    Graph *g = gan_step_pair(tr, &tr->gd, x0, n, t, nz, &x_t, &x_tp1);
    x_t->requires_grad = r1_gamma > 0.0f;
    Tensor *real = gan_disc_forward(g, tr->D, x_t, t, x_tp1);
    Tensor *loss = mean_all(g, softplus(g, scale_shift(g, real, -1.0f, 0.0f)));
    terms->d_real = loss->data[0];
    terms->logit_real = mean_of(real);
    terms->r1 = 0.0;
    if (r1_gamma > 0.0f) {
        Tensor *gx = graph_grad(g, sum_all(g, real), x_t);
        Tensor *r1 = scale_shift(g, sum_all(g, mul(g, gx, gx)), r1_gamma / 2.0f / (float)n, 0.0f);
        terms->r1 = r1->data[0];
        loss = add(g, loss, r1);
    }
    int saved = g->grad_enabled;
    g->grad_enabled = 0;  // the generator's forward: no tape (requires_grad False there)
    Tensor *x0p = gan_gen_forward(g, tr->G, x_tp1, t, tensor_from(g, 2, zs, nz->z));
    Tensor *x_pos = gan_sample_posterior(g, tr->s, x0p, x_tp1->data, t, nz->eps_post);
    g->grad_enabled = saved;
    Tensor *fake = gan_disc_forward(g, tr->D, x_pos, t, x_tp1);
    Tensor *lf = mean_all(g, softplus(g, fake));
    terms->d_fake = lf->data[0];
    terms->logit_fake = mean_of(fake);
    graph_backward(g, add(g, loss, lf), NULL);
}

// G's gradient (added into G->params): softplus(-D(x'_t)) mean + alpha x mean
// |x0' - x0| (the Weighted Learning term on the scaled latents, :264-270);
// D's weights take no gradient (requires_grad False, :248-253)
void gan_g_grads(GanTrainer *tr, const float *x0, int n, const int *t, const GanNoise *nz,
                 float alpha, GanTerms *terms) {
    int zs[2] = {n, tr->G->cfg.nz};
    Tensor *x_t, *x_tp1;
    Graph *g = gan_step_pair(tr, &tr->gg, x0, n, t, nz, &x_t, &x_tp1);
    Tensor *x0p = gan_gen_forward(g, tr->G, x_tp1, t, tensor_from(g, 2, zs, nz->z));
    Tensor *x_pos = gan_sample_posterior(g, tr->s, x0p, x_tp1->data, t, nz->eps_post);
    params_trainable(&tr->D->params, 0);  // (until after backward: it reads the flags)
    Tensor *out = gan_disc_forward(g, tr->D, x_pos, t, x_tp1);
    Tensor *adv = mean_all(g, softplus(g, scale_shift(g, out, -1.0f, 0.0f)));
    Tensor *rec = mean_all(g, tensor_abs(g, sub(g, x0p, tensor_from(g, 4, x_t->shape, x0))));
    terms->g_adv = adv->data[0];
    terms->rec = rec->data[0];
    terms->alpha = alpha;
    graph_backward(g, add(g, adv, scale_shift(g, rec, alpha, 0.0f)), NULL);
    params_trainable(&tr->D->params, 1);
}

void gan_optim_init(GanOptim *o, const GanGen *G, const GanDisc *D, double lr_g, double lr_d,
                    double ema_decay) {
    memset(o, 0, sizeof *o);
    adam_init(&o->adam_g, G->params.total, (float)lr_g);
    adam_init(&o->adam_d, D->params.total, (float)lr_d);
    o->adam_g.beta1 = o->adam_d.beta1 = 0.5f;  // betas (beta1, beta2) = (0.5, 0.9), :98-101
    o->adam_g.beta2 = o->adam_d.beta2 = 0.9f;
    o->ema_decay = ema_decay;
}

void gan_optim_free(GanOptim *o) {
    adam_free(&o->adam_g);
    adam_free(&o->adam_d);
    free(o->ema);
    o->ema = NULL;
}

// EMA.py:53: ema.mul_(decay).add_(p, alpha=1 - decay), the scalars rounded to
// float as torch does for a float32 tensor
void gan_ema_update(float *ema, const float *p, size_t n, double decay) {
    ema_blend(ema, p, n, (float)decay, (float)(1.0 - decay));
}

// train_ldgan.py:184-187 (np.linspace: start + i * step, the last point exactly stop)
double gan_weighted_alpha(long epoch, long num_epoch) {
    double phi = num_epoch == 0 ? -6.0 : epoch >= num_epoch ? 6.0
                                       : -6.0 + (double)epoch * (12.0 / (double)num_epoch);
    return 1.0 - 1.0 / (1.0 + exp(-phi));
}

static int grads_finite(const ParamSet *ps, double loss, const char *what, char *err,
                        size_t errlen) {
    double gn = sqrt(grad_norm_sq(ps->grad, ps->total));
    if (isfinite(loss) && isfinite(gn)) return 0;
    return errorf(err, errlen, "the %s loss is %g, its gradient norm %g", what, loss, gn);
}

int gan_iteration(GanTrainer *tr, GanOptim *op, const float *x0, int n, const int *t_d,
                  const GanNoise *nd, const int *t_g, const GanNoise *ng, float r1_gamma,
                  float alpha, GanTerms *terms, char *err, size_t errlen) {
    ParamSet *gp = &tr->G->params, *dp = &tr->D->params;
    params_zero_grad(dp);
    gan_d_grads(tr, x0, n, t_d, nd, r1_gamma, terms);
    if (grads_finite(dp, terms->d_real + terms->d_fake + terms->r1, "discriminator's", err,
                     errlen))
        return -1;
    adam_step(&op->adam_d, dp->data, dp->grad);
    params_zero_grad(gp);
    gan_g_grads(tr, x0, n, t_g, ng, alpha, terms);
    if (grads_finite(gp, terms->g_adv + alpha * terms->rec, "generator's", err, errlen))
        return -1;
    adam_step(&op->adam_g, gp->data, gp->grad);
    if (!op->ema) {  // EMA.py:40-41: state['ema'] = p.data.clone() at the first step
        op->ema = mallocCheck(gp->total * sizeof(float));
        memcpy(op->ema, gp->data, gp->total * sizeof(float));
    }
    gan_ema_update(op->ema, gp->data, gp->total, op->ema_decay);
    return 0;
}

// sample_from_model (diffusion.py:160-172): x_T = x_init; for i = T-1 .. 0:
// x0' = G(x, i, z_i), x = sample_posterior(x0', x, i) (no noise at i = 0).
// noise: z (T, n, nz) and eps (T, n, per), step T-1 first; out (n, per) may be x_init.
void gan_sample(Graph *g, GanGen *G, const GanSchedule *s, const float *x_init, int n,
                const float *z, const float *eps, float *out) {
    const GanGenConfig *c = &G->cfg;
    int S = c->image_size, xs[4] = {n, c->channels, S, S}, zs[2] = {n, c->nz};
    size_t per = (size_t)c->channels * S * S;
    int t[4096];
    if (n > 4096) fatal("gan_sample: at most 4096 images a call");
    int saved = g->grad_enabled;
    g->grad_enabled = 0;
    memmove(out, x_init, (size_t)n * per * sizeof(float));
    for (int k = 0, i = s->T - 1; i >= 0; i--, k++) {
        ArenaMark m = arena_mark(&g->arena);
        for (int j = 0; j < n; j++) t[j] = i;
        Tensor *x = tensor_from(g, 4, xs, out);
        Tensor *x0 = gan_gen_forward(g, G, x, t, tensor_from(g, 2, zs, z + (size_t)k * n * c->nz));
        Tensor *y = gan_sample_posterior(g, s, x0, out, t, eps + (size_t)k * n * per);
        memcpy(out, y->data, (size_t)n * per * sizeof(float));
        arena_release(&g->arena, m);
    }
    g->grad_enabled = saved;
}

// ---------------------------------------------------------------------------
// ---- stage two's files: the configuration in the metadata, under the
// official code's argument names (train_ldgan.py / train_ddgan.py argparse) ----
// ---------------------------------------------------------------------------
void gan_config_lddgan_cifar10(GanConfig *c) {
    memset(c, 0, sizeof *c);
    gan_gen_cifar10_config(&c->gen);
    c->T = 4;
    c->beta_min = 0.1;
    c->beta_max = 20.0;
    c->ngf = 64;
    c->t_emb_dim = 256;
    c->disc_layers = 3;  // run.sh --num_disc_layers 3
}

// DDGAN's readme for CIFAR-10: ch_mult 1 2 2 2, attention at 16, nz 100,
// Discriminator_small with four blocks (48,432,515 + 12,741,633 parameters)
void gan_config_ddgan_cifar10(GanConfig *c) {
    gan_config_lddgan_cifar10(c);
    GanGenConfig *g = &c->gen;
    g->channels = 3;
    g->image_size = 32;
    g->n_levels = 4;
    g->ch_mult[0] = 1;
    g->ch_mult[1] = g->ch_mult[2] = g->ch_mult[3] = 2;
    g->attn_resolutions[0] = 16;
    g->nz = 100;
    c->disc_layers = 4;
}

int gan_config_check(const GanConfig *c, char *err, size_t errlen) {
    const GanGenConfig *g = &c->gen;
    if (g->channels > 64 || g->image_size > 1024 || g->nf > 4096 || g->nz > 4096 ||
        g->zdim > 4096)
        return errorf(err, errlen, "gan generator: a size is out of range (channels <= 64, side "
                      "<= 1024, num_channels_dae, nz, z_emb_dim <= 4096)");
    if (gan_gen_check_config(g, err, errlen) != 0) return -1;
    if (c->T < 1 || c->T > GAN_MAX_T)
        return errorf(err, errlen, "num_timesteps %d: 1..%d", c->T, GAN_MAX_T);
    if (!(c->beta_min > 0.0 && c->beta_max >= c->beta_min && c->beta_max <= 1000.0))
        return errorf(err, errlen, "beta_min %g, beta_max %g: 0 < beta_min <= beta_max <= 1000",
                      c->beta_min, c->beta_max);
    if (c->ngf < 1 || c->ngf > 4096 || c->t_emb_dim < 1 || c->t_emb_dim > 4096 ||
        c->disc_layers < 3 || c->disc_layers > GAN_DISC_MAX_BLOCKS)
        return errorf(err, errlen, "gan discriminator: ngf and t_emb_dim 1..4096, %d..%d layers",
                      3, GAN_DISC_MAX_BLOCKS);
    if (g->image_size >> (c->disc_layers - 1) < 1)
        return errorf(err, errlen, "gan discriminator: side %d is too small for %d layers",
                      g->image_size, c->disc_layers);
    return 0;
}

int gan_config_meta(const GanConfig *c, char kv[][2][64]) {
    const GanGenConfig *g = &c->gen;
    int n = 0;
#define GAN_KV(key, ...)                              \
    do {                                              \
        snprintf(kv[n][0], 64, "%s", key);            \
        snprintf(kv[n][1], 64, __VA_ARGS__);          \
        n++;                                          \
    } while (0)
    GAN_KV("format", "casdm-ddgan-1");
    GAN_KV("num_channels", "%d", g->channels);
    GAN_KV("image_size", "%d", g->image_size);
    GAN_KV("num_channels_dae", "%d", g->nf);
    int_list(kv[n][1], 64, g->ch_mult, g->n_levels);
    snprintf(kv[n++][0], 64, "ch_mult");
    GAN_KV("num_res_blocks", "%d", g->num_res_blocks);
    int_list(kv[n][1], 64, g->attn_resolutions, g->n_attn);
    snprintf(kv[n++][0], 64, "attn_resolutions");
    GAN_KV("nz", "%d", g->nz);
    GAN_KV("z_emb_dim", "%d", g->zdim);
    GAN_KV("n_mlp", "%d", g->n_mlp);
    GAN_KV("num_timesteps", "%d", c->T);
    GAN_KV("beta_min", "%.17g", c->beta_min);
    GAN_KV("beta_max", "%.17g", c->beta_max);
    GAN_KV("ngf", "%d", c->ngf);
    GAN_KV("t_emb_dim", "%d", c->t_emb_dim);
    GAN_KV("num_disc_layers", "%d", c->disc_layers);
#undef GAN_KV
    return n;  // GAN_CONFIG_KEYS
}

static int meta_double(const StFile *f, const char *path, const char *key, double *out, char *err,
                       size_t errlen) {
    char buf[64], *end;
    if (st_meta(f, key, buf, sizeof buf) != 0)
        return errorf(err, errlen, "%s: the metadata has no '%s'", path, key);
    *out = strtod(buf, &end);
    if (end == buf || *end || !isfinite(*out))
        return errorf(err, errlen, "%s: metadata '%s' is '%s', not a number", path, key, buf);
    return 0;
}

int gan_config_read(const StFile *f, const char *path, GanConfig *c, char *err, size_t errlen) {
    char fmt[64] = "";
    memset(c, 0, sizeof *c);
    st_meta(f, "format", fmt, sizeof fmt);
    if (strcmp(fmt, "casdm-ddgan-1") != 0)
        return errorf(err, errlen, "%s: metadata format '%s', want casdm-ddgan-1 (casdm train "
                      "--model lddgan writes it; tools/convert_ddgan.py from an official "
                      "netG_*.pth)", path, fmt);
    GanGenConfig *g = &c->gen;
    int rc = meta_int(f, path, "num_channels", &g->channels, err, errlen);
    if (!rc) rc = meta_int(f, path, "image_size", &g->image_size, err, errlen);
    if (!rc) rc = meta_int(f, path, "num_channels_dae", &g->nf, err, errlen);
    if (!rc) rc = meta_list(f, path, "ch_mult", g->ch_mult, &g->n_levels, err, errlen);
    if (!rc && g->n_levels > GAN_GEN_MAX_LEVELS)
        rc = errorf(err, errlen, "%s: ch_mult has %d levels (at most %d)", path, g->n_levels,
                    GAN_GEN_MAX_LEVELS);
    if (!rc) rc = meta_int(f, path, "num_res_blocks", &g->num_res_blocks, err, errlen);
    if (!rc)  // (an empty list: attention in the middle block only)
        rc = meta_list(f, path, "attn_resolutions", g->attn_resolutions, &g->n_attn, err, errlen);
    if (!rc && g->n_attn > GAN_GEN_MAX_LEVELS)
        rc = errorf(err, errlen, "%s: more than %d attn_resolutions", path, GAN_GEN_MAX_LEVELS);
    if (!rc) rc = meta_int(f, path, "nz", &g->nz, err, errlen);
    if (!rc) rc = meta_int(f, path, "z_emb_dim", &g->zdim, err, errlen);
    if (!rc) rc = meta_int(f, path, "n_mlp", &g->n_mlp, err, errlen);
    if (!rc) rc = meta_int(f, path, "num_timesteps", &c->T, err, errlen);
    if (!rc) rc = meta_double(f, path, "beta_min", &c->beta_min, err, errlen);
    if (!rc) rc = meta_double(f, path, "beta_max", &c->beta_max, err, errlen);
    if (!rc) rc = meta_int(f, path, "ngf", &c->ngf, err, errlen);
    if (!rc) rc = meta_int(f, path, "t_emb_dim", &c->t_emb_dim, err, errlen);
    if (!rc) rc = meta_int(f, path, "num_disc_layers", &c->disc_layers, err, errlen);
    char why[256];
    if (!rc && gan_config_check(c, why, sizeof why) != 0)
        rc = errorf(err, errlen, "%s: its configuration: %s", path, why);
    return rc;
}

// the parameter counts of a configuration, from its layout alone (nothing allocated)
size_t gan_param_count(const GanConfig *c, size_t *disc) {
    GanGen *g = mallocCheck(sizeof *g);
    memset(g, 0, sizeof *g);
    g->cfg = c->gen;
    params_init(&g->params);
    ParamDecl d;
    param_decl_init(&d, &g->params);
    gen_layout(g, &d);
    param_decl_free(&d);
    size_t n = g->params.total;
    params_free(&g->params);
    free(g);
    GanDisc *D = mallocCheck(sizeof *D);
    disc_layout(D, 2 * c->gen.channels, c->ngf, c->t_emb_dim, c->disc_layers, &d);
    param_decl_free(&d);
    *disc = D->params.total;
    params_free(&D->params);
    free(D);
    return n;
}

int gan_gen_load_st(GanGen *G, const GanConfig *c, int trainable, const StFile *f,
                    const char *path, const char *prefix, char *err, size_t errlen) {
    GanGen *layout = mallocCheck(sizeof *layout);
    memset(layout, 0, sizeof *layout);
    layout->cfg = c->gen;
    params_init(&layout->params);
    ParamDecl d;
    param_decl_init(&d, &layout->params);
    gen_layout(layout, &d);
    param_decl_free(&d);
    int rc = params_check_st(&layout->params, f, path, prefix, err, errlen);
    params_free(&layout->params);
    free(layout);
    if (rc) return rc;
    gan_gen_init(G, &c->gen, trainable, NULL);
    rc = params_load_st(&G->params, f, path, prefix, err, errlen);
    if (rc) gan_gen_free(G);
    return rc;
}

int gan_disc_load_st(GanDisc *D, const GanConfig *c, int trainable, const StFile *f,
                     const char *path, const char *prefix, char *err, size_t errlen) {
    int in = 2 * c->gen.channels;
    GanDisc *layout = mallocCheck(sizeof *layout);
    ParamDecl d;
    disc_layout(layout, in, c->ngf, c->t_emb_dim, c->disc_layers, &d);
    param_decl_free(&d);
    int rc = params_check_st(&layout->params, f, path, prefix, err, errlen);
    params_free(&layout->params);
    free(layout);
    if (rc) return rc;
    gan_disc_init(D, in, c->ngf, c->t_emb_dim, c->disc_layers, trainable, NULL);
    rc = params_load_st(&D->params, f, path, prefix, err, errlen);
    if (rc) gan_disc_free(D);
    return rc;
}
