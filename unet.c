// unet.c: the U-Net of improved-diffusion (openai/improved-diffusion,
// improved_diffusion/unet.py, UNetModel with use_scale_shift_norm=True),
// used by Cas-DM for both networks (arXiv 2401.02414, "Implementation"):
// theta predicts epsilon, phi has one more output channel for r_t.
//
// Sections: configuration, parameter declaration (names are improved-
// diffusion's state_dict keys, so checkpoints move to and from PyTorch),
// initialisation, forward. The backward comes from the tape.
#define _POSIX_C_SOURCE 200809L
#include "casdm.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

// ---------------------------------------------------------------------------
// ---- configuration ----
// ---------------------------------------------------------------------------
void unet_default_config(UNetConfig *c, int image_size, int in_channels, int out_channels) {
    memset(c, 0, sizeof *c);
    c->image_size = image_size;
    c->in_channels = in_channels;
    c->out_channels = out_channels;
    c->model_channels = 128;
    c->num_res_blocks = 3;
    c->num_heads = 4;
    c->groups = 32;
    c->dropout = 0.1f;
    static const int m256[6] = {1, 1, 2, 2, 4, 4}, m64[4] = {1, 2, 3, 4}, m32[4] = {1, 2, 2, 2};
    const int *m = image_size == 256 ? m256 : image_size == 64 ? m64 : m32;
    c->n_levels = image_size == 256 ? 6 : 4;
    memcpy(c->channel_mult, m, c->n_levels * sizeof(int));
    unet_parse_attention(c, "16,8");
}

// improved-diffusion's script_util: attention_ds.append(image_size // int(res))
int unet_parse_attention(UNetConfig *c, const char *resolutions) {
    c->n_attention = 0;
    const char *p = resolutions;
    while (*p) {
        char *end;
        long r = strtol(p, &end, 10);
        if (end == p || r < 1 || c->image_size % r || c->n_attention == UNET_MAX_LEVELS) return -1;
        c->attention_ds[c->n_attention++] = c->image_size / (int)r;
        p = end;
        if (*p == ',') p++;
        else if (*p) return -1;
    }
    return 0;
}

int unet_parse_channel_mult(UNetConfig *c, const char *list) {
    int n = 0;
    const char *p = list;
    while (*p) {
        char *end;
        long m = strtol(p, &end, 10);
        if (end == p || m < 1 || m > 64 || n == UNET_MAX_LEVELS) return -1;
        c->channel_mult[n++] = (int)m;
        p = end;
        if (*p == ',') p++;
        else if (*p) return -1;
    }
    if (n == 0) return -1;
    c->n_levels = n;
    return 0;
}

static int has_attention(const UNetConfig *c, int ds) {
    for (int i = 0; i < c->n_attention; i++)
        if (c->attention_ds[i] == ds) return 1;
    return 0;
}

// ---------------------------------------------------------------------------
// ---- parameters ----
// Declared before the single allocation (tensor.h's ParamDecl), in
// UNetModel's order.
// ---------------------------------------------------------------------------
typedef struct { UNet *u; ParamDecl pd; } Decl;

static void declare_norm(Decl *d, Tensor **w, Tensor **b, const char *prefix, int ch) {
    param_declare_weight_bias(&d->pd, w, b, prefix, 1, ch, 0, 0, 0);
}

static void declare_conv(Decl *d, Tensor **w, Tensor **b, const char *prefix, int out, int in,
                         int k) {
    param_declare_weight_bias(&d->pd, w, b, prefix, 4, out, in, k, k);
}

// Conv1d weights are (out, in, 1) in PyTorch; we keep that shape so that
// state_dicts load strictly, and view them as (out, in, 1, 1) in forward.
static void declare_conv1d(Decl *d, Tensor **w, Tensor **b, const char *prefix, int out, int in) {
    param_declare_weight_bias(&d->pd, w, b, prefix, 3, out, in, 1, 0);
}

static void declare_linear(Decl *d, Tensor **w, Tensor **b, const char *prefix, int out, int in) {
    param_declare_weight_bias(&d->pd, w, b, prefix, 2, out, in, 0, 0);
}

static void declare_resblock(Decl *d, ResBlock *r, const char *prefix, int in_ch, int out_ch,
                             int emb_ch) {
    char p[160];
    r->in_ch = in_ch;
    r->out_ch = out_ch;
    snprintf(p, sizeof p, "%s.in_layers.0", prefix);
    declare_norm(d, &r->in_norm_w, &r->in_norm_b, p, in_ch);
    snprintf(p, sizeof p, "%s.in_layers.2", prefix);
    declare_conv(d, &r->in_conv_w, &r->in_conv_b, p, out_ch, in_ch, 3);
    snprintf(p, sizeof p, "%s.emb_layers.1", prefix);
    declare_linear(d, &r->emb_w, &r->emb_b, p, 2 * out_ch, emb_ch);
    snprintf(p, sizeof p, "%s.out_layers.0", prefix);
    declare_norm(d, &r->out_norm_w, &r->out_norm_b, p, out_ch);
    snprintf(p, sizeof p, "%s.out_layers.3", prefix);
    declare_conv(d, &r->out_conv_w, &r->out_conv_b, p, out_ch, out_ch, 3);
    r->skip_w = r->skip_b = NULL;
    if (in_ch != out_ch) {
        snprintf(p, sizeof p, "%s.skip_connection", prefix);
        declare_conv(d, &r->skip_w, &r->skip_b, p, out_ch, in_ch, 1);
    }
}

static void declare_attention(Decl *d, AttnBlock *a, const char *prefix, int ch) {
    char p[160];
    a->ch = ch;
    snprintf(p, sizeof p, "%s.norm", prefix);
    declare_norm(d, &a->norm_w, &a->norm_b, p, ch);
    snprintf(p, sizeof p, "%s.qkv", prefix);
    declare_conv1d(d, &a->qkv_w, &a->qkv_b, p, 3 * ch, ch);
    snprintf(p, sizeof p, "%s.proj_out", prefix);
    declare_conv1d(d, &a->proj_w, &a->proj_b, p, ch, ch);
}

// The block structure of UNetModel.__init__, step by step.
static void unet_declare(Decl *d) {
    UNet *u = d->u;
    const UNetConfig *c = &u->cfg;
    int mc = c->model_channels, emb = 4 * mc;
    char p[160];
    declare_linear(d, &u->temb0_w, &u->temb0_b, "time_embed.0", emb, mc);
    declare_linear(d, &u->temb2_w, &u->temb2_b, "time_embed.2", emb, emb);

    int chans[UNET_MAX_BLOCKS], nch = 0;  // input_block_chans
    int ch = mc, ds = 1, nb = 0;
    UNetBlock *b = &u->input[nb];
    b->conv_kind = CONV_INPUT;
    declare_conv(d, &b->conv_w, &b->conv_b, "input_blocks.0.0", mc, c->in_channels, 3);
    chans[nch++] = ch;
    nb++;
    for (int level = 0; level < c->n_levels; level++) {
        for (int i = 0; i < c->num_res_blocks; i++) {
            if (nb >= UNET_MAX_BLOCKS) fatal("unet: too many blocks");
            b = &u->input[nb];
            int out = c->channel_mult[level] * mc;
            snprintf(p, sizeof p, "input_blocks.%d.0", nb);
            b->has_res = 1;
            declare_resblock(d, &b->res, p, ch, out, emb);
            ch = out;
            if (has_attention(c, ds)) {
                snprintf(p, sizeof p, "input_blocks.%d.1", nb);
                b->has_attn = 1;
                declare_attention(d, &b->attn, p, ch);
            }
            chans[nch++] = ch;
            nb++;
        }
        if (level != c->n_levels - 1) {
            if (nb >= UNET_MAX_BLOCKS) fatal("unet: too many blocks");
            b = &u->input[nb];
            snprintf(p, sizeof p, "input_blocks.%d.0.op", nb);
            b->conv_kind = CONV_DOWN;
            declare_conv(d, &b->conv_w, &b->conv_b, p, ch, ch, 3);
            chans[nch++] = ch;
            ds *= 2;
            nb++;
        }
    }
    u->n_input = nb;

    b = &u->middle;
    b->has_res = b->has_attn = b->has_res2 = 1;
    declare_resblock(d, &b->res, "middle_block.0", ch, ch, emb);
    declare_attention(d, &b->attn, "middle_block.1", ch);
    declare_resblock(d, &b->res2, "middle_block.2", ch, ch, emb);

    nb = 0;
    for (int level = c->n_levels - 1; level >= 0; level--) {
        for (int i = 0; i < c->num_res_blocks + 1; i++) {
            if (nb >= UNET_MAX_BLOCKS) fatal("unet: too many blocks");
            b = &u->output[nb];
            int out = c->channel_mult[level] * mc, skip = chans[--nch];
            snprintf(p, sizeof p, "output_blocks.%d.0", nb);
            b->has_res = 1;
            declare_resblock(d, &b->res, p, ch + skip, out, emb);
            ch = out;
            int layer = 1;
            if (has_attention(c, ds)) {
                snprintf(p, sizeof p, "output_blocks.%d.%d", nb, layer++);
                b->has_attn = 1;
                declare_attention(d, &b->attn, p, ch);
            }
            if (level && i == c->num_res_blocks) {
                snprintf(p, sizeof p, "output_blocks.%d.%d.conv", nb, layer);
                b->conv_kind = CONV_UP;
                declare_conv(d, &b->conv_w, &b->conv_b, p, ch, ch, 3);
                ds /= 2;
            }
            nb++;
        }
    }
    u->n_output = nb;
    declare_norm(d, &u->out_norm_w, &u->out_norm_b, "out.0", ch);
    declare_conv(d, &u->out_conv_w, &u->out_conv_b, "out.2", c->out_channels, mc, 3);
}

// PyTorch's default for Conv, Linear and GroupNorm (params_init_torch), but
// improved-diffusion's zero_module layers (out_layers.3, proj_out, out.2)
static int unet_zero_layer(const char *name) {
    return strstr(name, "out_layers.3.") || strstr(name, "proj_out.") ||
           strncmp(name, "out.2.", 6) == 0;
}

// Everything unet_init needs of a configuration, as a message (a checkpoint's
// metadata arrives here from a file, so nothing is assumed).
int unet_check_config(const UNetConfig *c, char *err, size_t errlen) {
    const char *bad = NULL;
    if (c->image_size < 1 || c->image_size > 4096) bad = "image_size must be 1..4096";
    else if (c->in_channels < 1 || c->in_channels > 4 || c->out_channels < 1 ||
             c->out_channels > 16)
        bad = "in_channels must be 1..4 (out_channels 1..16)";
    else if (c->model_channels < 1 || c->model_channels > 4096)
        bad = "model_channels must be 1..4096";
    else if (c->n_levels < 1 || c->n_levels > UNET_MAX_LEVELS)
        bad = "channel_mult needs 1..8 levels";
    else if (c->num_res_blocks < 1 || c->n_levels * (c->num_res_blocks + 1) > UNET_MAX_BLOCKS)
        bad = "num_res_blocks must be at least 1, and levels x (num_res_blocks + 1) at most 64";
    else if (c->num_heads < 1 || c->num_heads > 64) bad = "num_heads must be 1..64";
    else if (c->groups < 1) bad = "groups must be positive";
    else if (c->image_size % (1 << (c->n_levels - 1)))
        bad = "image_size does not halve once per level of channel_mult";
    if (bad) { snprintf(err, errlen, "%s", bad); return -1; }
    for (int l = 0; l < c->n_levels; l++) {
        int ch = c->channel_mult[l] * c->model_channels;
        if (c->channel_mult[l] < 1 || ch % c->groups) {
            snprintf(
                err, errlen,
                "%d channels (model_channels %d x channel_mult %d) do not split into %d GroupNorm groups",
                ch, c->model_channels, c->channel_mult[l], c->groups);
            return -1;
        }
        // the middle block attends at the last level
        int attn = l == c->n_levels - 1 || has_attention(c, 1 << l);
        if (attn && ch % c->num_heads) {
            snprintf(err, errlen, "%d channels do not split into %d attention heads", ch,
                     c->num_heads);
            return -1;
        }
    }
    return 0;
}

// the parameter layout of c, declared but not allocated; the caller frees
// the returned declaration list
static Decl *unet_layout(UNet *u, const UNetConfig *c) {
    memset(u, 0, sizeof *u);
    u->cfg = *c;
    char err[256];
    if (unet_check_config(c, err, sizeof err) != 0) fatal("unet: %s", err);
    params_init(&u->params);
    Decl *d = mallocCheck(sizeof *d);
    d->u = u;
    param_decl_init(&d->pd, &u->params);
    unet_declare(d);
    return d;
}

size_t unet_param_count(const UNetConfig *c) {
    UNet *u = mallocCheck(sizeof *u);
    Decl *d = unet_layout(u, c);
    param_decl_free(&d->pd);
    free(d);
    size_t total = u->params.total;
    params_free(&u->params);
    free(u);
    return total;
}

// A measure of one image's activations, in floats: for each ResBlock its
// input and output, for each attention block its qkv and output, for each
// resampling its output, at that block's resolution. casdm.c scales it by
// factors measured on real steps to estimate a step's memory.
double unet_activation_floats(const UNetConfig *c) {
    int mc = c->model_channels, ch = mc, chans[UNET_MAX_BLOCKS], nch = 0;
    double r2 = (double)c->image_size * c->image_size, total = (double)mc * r2;
    chans[nch++] = ch;
    for (int level = 0; level < c->n_levels; level++) {
        for (int i = 0; i < c->num_res_blocks; i++) {
            int out = c->channel_mult[level] * mc;
            total += (double)(ch + out) * r2 +
                     (has_attention(c, 1 << level) ? 4.0 * out * r2 : 0.0);
            ch = chans[nch++] = out;
        }
        if (level != c->n_levels - 1) { r2 /= 4.0; total += (double)ch * r2; chans[nch++] = ch; }
    }
    total += 4.0 * ch * r2 + 4.0 * ch * r2;  // the middle block: two ResBlocks and attention
    for (int level = c->n_levels - 1; level >= 0; level--) {
        for (int i = 0; i < c->num_res_blocks + 1; i++) {
            int out = c->channel_mult[level] * mc, in = ch + chans[--nch];
            total += (double)(in + out) * r2 +
                     (has_attention(c, 1 << level) ? 4.0 * out * r2 : 0.0);
            ch = out;
            if (level && i == c->num_res_blocks) { r2 *= 4.0; total += (double)ch * r2; }
        }
    }
    return total + (double)(mc + c->out_channels) * r2;
}

void unet_init(UNet *u, const UNetConfig *c, int trainable, Rng *rng) {
    Decl *d = unet_layout(u, c);
    params_alloc(&u->params, trainable);
    param_decl_fill(&d->pd);
    free(d);
    if (rng) params_init_torch(&u->params, rng, unet_zero_layer);
}

void unet_free(UNet *u) { params_free(&u->params); }

// ---------------------------------------------------------------------------
// ---- forward ----
// ---------------------------------------------------------------------------

// improved-diffusion nn.py timestep_embedding: freqs_i = exp(-ln(10000) i/half),
// [cos(t f), sin(t f)], a zero column when dim is odd. Float32 throughout,
// in PyTorch's order of operations, since cos(t f) at t ~ 1000 amplifies
// any difference in f.
void timestep_embedding(float *out, const float *t, int n, int dim) {
    int half = dim / 2;
    float c = (float)(-log(10000.0));
    for (int b = 0; b < n; b++) {
        float *e = out + (size_t)b * dim;
        for (int i = 0; i < half; i++) {
            float f = expf(c * (float)i / (float)half);
            float a = t[b] * f;
            e[i] = cosf(a);
            e[half + i] = sinf(a);
        }
        if (dim % 2) e[dim - 1] = 0.0f;
    }
}

static Tensor *view4(Graph *g, Tensor *t, int n, int c, int h, int w) {
    int s[4] = {n, c, h, w};
    return reshape(g, t, 4, s);
}

// improved-diffusion's ResBlock with use_scale_shift_norm:
//   in_layers:  GroupNorm, SiLU, conv3x3
//   emb_layers: SiLU, Linear -> scale, shift (chunk, scale first)
//   out_layers: GroupNorm * (1 + scale) + shift, SiLU, dropout, conv3x3
//   out = skip(x) + out_layers(...)   (skip: identity or 1x1 conv)
// Each norm (with FiLM, SiLU and dropout) and the convolution after it are
// one node (norm_conv2d) that keeps only its input: backward recomputes the
// norm's output. The residual sum is done by the last convolution.
// silu_emb = SiLU(emb), the same for every block, computed once.
static Tensor *resblock_forward(Graph *g, const UNetConfig *c, ResBlock *r, Tensor *x,
                                Tensor *silu_emb) {
    int N = x->shape[0], out = r->out_ch;
    NormSpec in_norm = {.gamma = r->in_norm_w, .beta = r->in_norm_b, .silu = 1, .groups = c->groups,
                        .eps = 1e-5f};
    Tensor *h = norm_conv2d(g, x, &in_norm, r->in_conv_w, r->in_conv_b, NULL, 1);
    Tensor *e = view4(g, linear(g, silu_emb, r->emb_w, r->emb_b), N, 2 * out, 1, 1);
    Tensor *scale = slice_channels(g, e, 0, out), *shift = slice_channels(g, e, out, 2 * out);
    Tensor *skip = r->skip_w ? conv2d(g, x, r->skip_w, r->skip_b, 1, 0) : x;
    NormSpec out_norm = {.gamma = r->out_norm_w, .beta = r->out_norm_b, .scale = scale,
                         .shift = shift, .silu = 1, .groups = c->groups, .dropout = c->dropout,
                         .eps = 1e-5f};
    return norm_conv2d(g, h, &out_norm, r->out_conv_w, r->out_conv_b, skip, 1);
}

// QKVAttention (legacy): qkv (B, 3C, T) viewed as (B*heads, 3C/heads, T);
// each head's block splits into q, k, v of C/heads rows; q and k are each
// scaled by (C/heads)^(-1/4); weights softmax(q^T k) over the last axis.
static Tensor *attention_forward(Graph *g, const UNetConfig *c, AttnBlock *a, Tensor *x) {
    int B = x->shape[0], C = x->shape[1], H = x->shape[2], W = x->shape[3], T = H * W;
    int heads = c->num_heads, ch = C / heads;
    if (C % heads) fatal("attention: %d channels do not split into %d heads", C, heads);
    NormSpec norm = {.gamma = a->norm_w, .beta = a->norm_b, .groups = c->groups, .eps = 1e-5f};
    // (B, 3C, H, W)
    Tensor *qkv = norm_conv2d(g, x, &norm, view4(g, a->qkv_w, 3 * C, C, 1, 1), a->qkv_b, NULL, 0);
    int s3[3] = {B * heads, 3 * ch, T};
    // improved-diffusion scales q and k by ch^(-1/4) each; here the product by ch^(-1/2)
    // (BH, ch, T)
    Tensor *o = qkv_attention(g, reshape(g, qkv, 3, s3), (float)(1.0 / sqrt((double)ch)));
    o = view4(g, o, B, C, H, W);
    // x + proj(o)
    return conv2d_add(g, o, view4(g, a->proj_w, C, C, 1, 1), a->proj_b, NULL, x, 1, 0);
}

static Tensor *block_forward(Graph *g, const UNetConfig *c, UNetBlock *b, Tensor *h, Tensor *emb) {
    if (b->conv_kind == CONV_INPUT) return conv2d(g, h, b->conv_w, b->conv_b, 1, 1);
    if (b->conv_kind == CONV_DOWN) return conv2d(g, h, b->conv_w, b->conv_b, 2, 1);
    if (b->has_res) h = resblock_forward(g, c, &b->res, h, emb);
    if (b->has_attn) h = attention_forward(g, c, &b->attn, h);
    if (b->has_res2) h = resblock_forward(g, c, &b->res2, h, emb);
    if (b->conv_kind == CONV_UP) h = conv2d(g, upsample2x(g, h), b->conv_w, b->conv_b, 1, 1);
    return h;
}

// A block under checkpoint(): in = {h, emb} or, on the way up, {h, skip,
// emb}, the concatenation done inside so that it is not kept either.
typedef struct { const UNetConfig *c; UNetBlock *b; } BlockCtx;

static Tensor *block_checkpointed(Graph *g, const void *ctx, Tensor **in) {
    const BlockCtx *k = ctx;
    return block_forward(g, k->c, k->b, in[0], in[1]);
}

static Tensor *up_block_checkpointed(Graph *g, const void *ctx, Tensor **in) {
    const BlockCtx *k = ctx;
    return block_forward(g, k->c, k->b, concat_channels(g, in[0], in[1]), in[2]);
}

// the input convolution and a Downsample are a single conv: nothing to save
static Tensor *run_block(Graph *g, UNet *u, UNetBlock *b, Tensor *h, Tensor *skip, Tensor *emb) {
    BlockCtx k = {&u->cfg, b};
    if (u->use_checkpoint && (b->conv_kind == CONV_NONE || b->conv_kind == CONV_UP)) {
        Tensor *in[3] = {h, skip ? skip : emb, emb};
        return checkpoint(g, skip ? up_block_checkpointed : block_checkpointed, &k, sizeof k,
                          skip ? 3 : 2, in);
    }
    return block_forward(g, &u->cfg, b, skip ? concat_channels(g, h, skip) : h, emb);
}

Tensor *unet_forward(Graph *g, UNet *u, Tensor *x, const float *t) {
    const UNetConfig *c = &u->cfg;
    int N = x->shape[0], mc = c->model_channels;
    if (x->ndim != 4 || x->shape[1] != c->in_channels || x->shape[2] % (1 << (c->n_levels - 1)) ||
        x->shape[3] % (1 << (c->n_levels - 1))) {
        char s[64];
        shape_str(x, s, sizeof s);
        fatal("unet: input %s does not fit (%d channels, sides divisible by %d)", s, c->in_channels,
              1 << (c->n_levels - 1));
    }
    int se[2] = {N, mc};
    Tensor *temb = tensor_new(g, 2, se);
    timestep_embedding(temb->data, t, N, mc);
    Tensor *emb = linear(g, silu(g, linear(g, temb, u->temb0_w, u->temb0_b)), u->temb2_w,
                         u->temb2_b);
    emb = silu(g, emb);  // the first layer of every ResBlock's emb_layers

    Tensor *hs[UNET_MAX_BLOCKS];
    Tensor *h = x;
    // graph_keep: without the tape (sampling) a block's temporaries are freed
    // as soon as it is done. Going down, each output stays (a skip
    // connection); from the middle block on, each output replaces the last.
    for (int i = 0; i < u->n_input; i++) {
        ArenaMark m = arena_mark(&g->arena);
        hs[i] = h = graph_keep(g, m, run_block(g, u, &u->input[i], h, NULL, emb));
    }
    ArenaMark m = arena_mark(&g->arena);
    h = graph_keep(g, m, run_block(g, u, &u->middle, h, NULL, emb));
    int top = u->n_input;
    for (int i = 0; i < u->n_output; i++)
        h = graph_keep(g, m, run_block(g, u, &u->output[i], h, hs[--top], emb));
    NormSpec out_norm = {.gamma = u->out_norm_w, .beta = u->out_norm_b, .silu = 1,
                         .groups = c->groups, .eps = 1e-5f};
    return graph_keep(g, m, norm_conv2d(g, h, &out_norm, u->out_conv_w, u->out_conv_b, NULL, 1));
}
