// casdm.c: the program. `casdm train` trains one of the four models of the
// Cas-DM paper (arXiv 2401.02414, Table 1) on CIFAR-10 binaries, IDX files or
// image folders; `casdm sample`, `eval`, `lpips` and `plot` use its
// checkpoints and logs; `casdm info` reports the build.
//
// Sections: options; data; training state and checkpoints; memory (what a
// step will need, checked before anything is allocated); reading a
// checkpoint's metadata; signals, time, directories; training (train_step,
// then cmd_train's loop); lpips; sampling; evaluation; plot; main. The bytes
// of every file format are in formats.c.
#define _POSIX_C_SOURCE 200809L
#include "casdm.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

// ---------------------------------------------------------------------------
// ---- options ----
// One table gives each option its type, default and help; parsing, defaults
// and --help all come from it.
// ---------------------------------------------------------------------------
enum { OPT_INT, OPT_FLOAT, OPT_STR, OPT_FLAG };
typedef struct {
    const char *name;     // "--steps"
    int type;
    void *dest;
    const char *def;      // default as text (NULL: none)
    const char *help;
    double lo, hi;        // allowed range for numbers
} Option;

static void usage_options(FILE *f, const Option *opts, int n) {
    for (int i = 0; i < n; i++) {
        char left[48];
        snprintf(left, sizeof left, "%s%s", opts[i].name,
                 opts[i].type == OPT_FLAG ? "" : opts[i].type == OPT_STR ? " S" : " N");
        fprintf(f, "  %-22s %s", left, opts[i].help);
        if (opts[i].def && opts[i].type != OPT_FLAG)
            fprintf(f, " [default: %s]", opts[i].def[0] ? opts[i].def : "none");
        fprintf(f, "\n");
    }
}

static int set_option(const Option *o, const char *value) {
    char *end;
    switch (o->type) {
    case OPT_INT: {
        long v = strtol(value, &end, 10);
        if (!*value || *end || v < o->lo || v > o->hi) {
            fprintf(stderr, "casdm: %s expects an integer in %.0f..%.0f, got '%s'\n", o->name,
                    o->lo, o->hi, value);
            return -1;
        }
        *(int *)o->dest = (int)v;
        return 0;
    }
    case OPT_FLOAT: {
        double v = strtod(value, &end);
        if (!*value || *end || !(v >= o->lo && v <= o->hi)) {
            fprintf(stderr, "casdm: %s expects a number in %g..%g, got '%s'\n", o->name, o->lo,
                    o->hi, value);
            return -1;
        }
        *(double *)o->dest = v;
        return 0;
    }
    case OPT_STR: *(const char **)o->dest = value; return 0;
    default: *(int *)o->dest = 1; return 0;
    }
}

// --precision fp32|bf16: the matrix products' precision (tensor.h,
// gemm_set_precision), taken by every command, before or after its name
static int set_precision_option(const char *value) {
    if (strcmp(value, "fp32") == 0) { gemm_set_precision(GEMM_FP32); return 0; }
    if (strcmp(value, "bf16") != 0) {
        fprintf(stderr, "casdm: --precision expects fp32 or bf16, got '%s'\n", value);
        return -1;
    }
    gemm_set_precision(GEMM_BF16);
    if (!gemm_bf16_native())
        fprintf(stderr, "casdm: --precision bf16: %s; bf16 is emulated on the float32 kernels "
                "(the same rounding, no faster)\n", gemm_bf16_why());
    return 0;
}

// Sets the defaults, then parses argv[0..argc). Returns 0, 1 when --help
// was printed, or -1 after a message naming the option; the command returns
// PARSED_EXIT(rc): 0 for help, 2 for a bad option.
#define PARSED_EXIT(rc) ((rc) > 0 ? 0 : 2)
static int parse_options(const char *cmd, const Option *opts, int n, int argc, char **argv,
                         void (*help)(FILE *)) {
    for (int i = 0; i < n; i++) {
        if (opts[i].type == OPT_FLAG) *(int *)opts[i].dest = 0;
        else if (opts[i].def && set_option(&opts[i], opts[i].def) != 0)
            fatal("bad default for %s", opts[i].name);
        else if (!opts[i].def && opts[i].type == OPT_STR) *(const char **)opts[i].dest = NULL;
    }
    for (int a = 0; a < argc; a++) {
        if (strcmp(argv[a], "--help") == 0 || strcmp(argv[a], "-h") == 0) {
            help(stdout);
            printf("  %-22s %s\n", "--precision S",
                   "fp32 or bf16 (bf16 x bf16 -> fp32 convolutions, linears, attention) "
                   "[default: fp32]");
            return 1;
        }
        if (strcmp(argv[a], "--precision") == 0) {
            if (a + 1 >= argc) {
                fprintf(stderr, "casdm %s: --precision needs a value\n", cmd);
                return -1;
            }
            if (set_precision_option(argv[++a]) != 0) return -1;
            continue;
        }
        const Option *o = NULL;
        for (int i = 0; i < n; i++)
            if (strcmp(argv[a], opts[i].name) == 0) o = &opts[i];
        if (!o) {
            fprintf(stderr, "casdm %s: unknown option '%s' (see casdm %s --help)\n", cmd, argv[a],
                    cmd);
            return -1;
        }
        if (o->type == OPT_FLAG) { set_option(o, NULL); continue; }
        if (a + 1 >= argc) {
            fprintf(stderr, "casdm %s: %s needs a value\n", cmd, o->name);
            return -1;
        }
        if (set_option(o, argv[++a]) != 0) return -1;
    }
    return 0;
}

// ---------------------------------------------------------------------------
// ---- data ----
// A dataset is N images of uint8 pixels, (N, C, H, W), held in memory.
// ---------------------------------------------------------------------------
typedef struct {
    Images img;           // (n, c, h, w) uint8
    const char *source;
} Dataset;

// a CIFAR-10 batch (appended) or an IDX file, through its decoder in formats.c
// what data-loading messages name: the flag (train, eval) or the command (fid)
static const char *data_label = "--data";

typedef int (*images_decoder)(const unsigned char *, size_t, const char *, Images *, char *,
                              size_t);
static void load_data_file(Dataset *d, const char *path, images_decoder decode) {
    char err[600];
    size_t size;
    unsigned char *b = read_file(path, DATA_MAX_FILE, &size, err, sizeof err);
    if (!b || decode(b, size, path, &d->img, err, sizeof err) != 0) fatal("%s: %s", data_label, err);
    free(b);
}

static int image_name(const char *s) {
    return ends_with(s, ".png") || ends_with(s, ".ppm") || ends_with(s, ".pgm") ||
           ends_with(s, ".PNG") || ends_with(s, ".PPM") || ends_with(s, ".PGM");
}

static int compare_names(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

// the image file names of a folder, sorted; *n their number
static char **folder_image_names(const char *path, size_t *count) {
    DIR *dir = opendir(path);
    if (!dir) fatal("%s '%s': %s", data_label, path, strerror(errno));
    char **names = NULL;
    size_t n = 0, cap = 0;
    for (struct dirent *e; (e = readdir(dir));) {
        if (e->d_name[0] == '.' || !image_name(e->d_name)) continue;
        if (n == 0x7fffffff) fatal("%s '%s': too many images", data_label, path);
        if (n == cap) {
            cap = cap ? 2 * cap : 1024;
            char **nn = mallocCheck(cap * sizeof *nn);
            if (n) memcpy(nn, names, n * sizeof *nn);
            free(names);
            names = nn;
        }
        size_t len = strlen(e->d_name) + 1;
        names[n] = mallocCheck(len);
        memcpy(names[n++], e->d_name, len);
    }
    closedir(dir);
    if (n == 0)
        fatal(
            "%s '%s': no CIFAR-10 data_batch_N.bin files and no .png/.ppm/.pgm images in this directory "
            "(CIFAR-10's binary version: https://www.cs.toronto.edu/~kriz/cifar.html)",
            data_label, path);
    qsort(names, n, sizeof *names, compare_names);
    *count = n;
    return names;
}

// A folder of images (8-bit PNG, binary PPM P6 or PGM P5), all of the same
// size and kind (all grey or all colour), read in name order.
static void load_image_folder(Dataset *d, const char *path) {
    size_t n;
    char **names = folder_image_names(path, &n);
    char file[4096], err[600];
    Images *im = &d->img;
    for (size_t i = 0; i < n; i++) {
        snprintf(file, sizeof file, "%s/%s", path, names[i]);
        int w, h, c = 0;
        unsigned char *img = read_image(file, &w, &h, &c, err, sizeof err);
        if (!img) fatal("%s: %s", data_label, err);
        if (i == 0) {
            im->c = c;
            im->h = h;
            im->w = w;
            uint64_t bytes = (uint64_t)w * h * c * n;  // 64-bit: size_t may be 32
            if (bytes > DATA_MAX_FILE || (size_t)bytes != bytes)
                fatal("%s '%s': %zu images of %dx%d do not fit in memory", data_label, path, n, w, h);
            im->pixels = mallocCheck(n * (size_t)w * h * c);
        } else if (w != im->w || h != im->h || c != im->c) {
            fatal(
                "%s '%s': '%s' is %dx%d with %d channel(s), but '%s' is %dx%d with %d; all images must match",
                data_label, path, names[i], w, h, c, names[0], im->w, im->h, im->c);
        }
        unsigned char *dst = im->pixels + i * (size_t)w * h * c;  // HWC -> CHW
        for (int ch = 0; ch < c; ch++)
            for (size_t k = 0; k < (size_t)w * h; k++)
                dst[(size_t)ch * w * h + k] = img[k * c + ch];
        free(img);
    }
    for (size_t i = 0; i < n; i++) free(names[i]);
    free(names);
    im->n = (int)n;
}

// PATH: a CIFAR-10 directory (data_batch_1..5.bin), a CIFAR .bin file, an
// IDX image file (*-idx3-ubyte), or a directory of PNG/PPM/PGM images.
static void load_dataset(Dataset *d, const char *path) {
    memset(d, 0, sizeof *d);
    d->source = path;
    struct stat st;
    if (stat(path, &st) != 0) fatal("%s '%s': %s", data_label, path, strerror(errno));
    if (S_ISDIR(st.st_mode)) {
        char p[4096];
        for (int i = 1; i <= 5; i++) {
            snprintf(p, sizeof p, "%s/data_batch_%d.bin", path, i);
            if (stat(p, &st) == 0) load_data_file(d, p, cifar_decode);
        }
        if (d->img.n == 0) load_image_folder(d, path);
    } else if (ends_with(path, ".bin")) {
        load_data_file(d, path, cifar_decode);
    } else if (strstr(path, "idx3-ubyte")) {
        load_data_file(d, path, idx_decode);
    } else {
        fatal(
            "%s '%s': not a CIFAR-10 directory or .bin file, an IDX *-idx3-ubyte file, nor a directory of images",
            data_label, path);
    }
}

// x0 (B,C,H,W) in [-1,1] from random images, flipped left-right at random
// image i of d in [-1, 1], mirrored when flip
static void image_to_float(const Images *d, uint32_t i, int flip, float *dst) {
    size_t plane = (size_t)d->h * d->w;
    const unsigned char *src = d->pixels + (size_t)i * d->c * plane;
    for (int c = 0; c < d->c; c++)
        for (int y = 0; y < d->h; y++)
            for (int x = 0; x < d->w; x++) {
                int sx = flip ? d->w - 1 - x : x;
                dst[(size_t)c * plane + (size_t)y * d->w + x] =
                    src[(size_t)c * plane + (size_t)y * d->w + sx] / 127.5f - 1.0f;
            }
}

static void draw_batch(const Dataset *ds, Rng *rng, float *x0, int B, int flip) {
    const Images *d = &ds->img;
    for (int b = 0; b < B; b++) {
        uint32_t i = rng_below(rng, (uint32_t)d->n);
        int fl = flip ? (int)(rng_u32(rng) & 1) : 0;
        image_to_float(d, i, fl, x0 + (size_t)b * d->c * d->h * d->w);
    }
}

// ---------------------------------------------------------------------------
// ---- training state and checkpoints ----
// ---------------------------------------------------------------------------
typedef struct {
    // data and model
    const char *data, *model, *schedule, *attn, *mult, *out, *resume, *lpips, *ema_warmup, *preset;
    int no_flip, flip, ch, res, heads, T, no_clip_x0, lpips_size, grad_checkpoint;
    double dropout, p2_gamma, p2_k, lambda_eps, lambda_x0, lambda_mu, lambda_lpips;
    // optimisation
    int steps, batch, microbatch, seed;
    double lr, ema, grad_clip;
    // output
    int log_every, ckpt_every, keep_every, sample_every, sample_n, sample_steps;
    int eval_every, eval_n, eval_ref_n;
    const char *eval_features;
    double time_limit;
} TrainOpts;

typedef struct {
    int kind;
    UNetConfig theta_cfg, phi_cfg;
    UNet theta, phi;             // phi used by casdm only
    int has_phi;
    float *ema_theta, *ema_phi;  // EMA copies of the parameters
    Adam adam_theta, adam_phi;
    Schedule sched;
    Rng rng;
    long step;
} Trainer;

// theta's configuration, the model kind and the schedule that the options
// ask for, for images of C channels and side image_size; -1 with a message
// naming the flag
static int train_config(const TrainOpts *o, int C, int image_size, UNetConfig *c, int *kind,
                        int *sk, char *err, size_t errlen) {
    *kind = model_parse(o->model);
    if (*kind < 0)
        return errorf(err, errlen, "--model '%s' is not ddpm-eps, ddpm-x0, dual or casdm",
                      o->model);
    if (strcmp(o->ema_warmup, "on") != 0 && strcmp(o->ema_warmup, "off") != 0)
        return errorf(err, errlen, "--ema-warmup '%s' is not on or off", o->ema_warmup);
    *sk = schedule_parse(o->schedule);
    if (*sk < 0) return errorf(err, errlen, "--schedule '%s' is not linear or cosine", o->schedule);
    if (*kind == MODEL_DDPM_X0 && o->p2_gamma != 0.0)
        return errorf(err, errlen, "--p2-gamma weights the epsilon loss; ddpm-x0 has none");
    if (o->lpips && *kind == MODEL_DDPM_EPS)
        return errorf(err, errlen, "--lpips applies to an x0 prediction; ddpm-eps has none");
    unet_default_config(c, image_size, C, model_theta_out(*kind, C));
    c->model_channels = o->ch;
    c->num_res_blocks = o->res;
    c->num_heads = o->heads;
    c->dropout = (float)o->dropout;
    if (o->mult[0] && unet_parse_channel_mult(c, o->mult) != 0)
        return errorf(err, errlen, "--mult '%s' is not a list such as 1,2,2,2", o->mult);
    if (unet_parse_attention(c, o->attn) != 0)
        return errorf(err, errlen,
                      "--attn '%s' is not a list of resolutions dividing %d, such as 16,8", o->attn,
                      image_size);
    for (int l = 0; l < c->n_levels; l++)
        if ((c->channel_mult[l] * c->model_channels) % c->groups)
            return errorf(err, errlen,
                          "--ch %d x mult %d is not a multiple of 32 (GroupNorm groups)", o->ch,
                          c->channel_mult[l]);
    if (image_size % (1 << (c->n_levels - 1)))
        return errorf(err, errlen,
                      "images of %d pixels do not halve %d times (--mult has %d levels)",
                      image_size, c->n_levels - 1, c->n_levels);
    char why[256];
    if (unet_check_config(c, why, sizeof why) != 0)
        return errorf(err, errlen, "--ch/--res/--mult/--heads: %s", why);
    return 0;
}

// ---- memory: what a step will need, before anything is allocated ----
// Parameters: each float of a trained network has its value, gradient, EMA
// and two Adam moments (5 copies); sampling keeps one. Activations: per
// image, a multiple of the U-Net's block outputs (unet_activation_floats),
// the multiples measured with peak RSS on ch 32-128 models (within ~10%
// for training, an upper bound for sampling).
#define ACT_PER_FLOAT_TRAIN 2.2
#define ACT_PER_FLOAT_TRAIN_CKPT 1.0
#define ACT_PER_FLOAT_SAMPLE 0.8

static double machine_bytes(void) {
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGESIZE)
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (pages > 0 && page > 0) return (double)pages * (double)page;
#endif
    return 0.0;  // unknown: no check
}

// 0 when the estimate fits in the machine's memory, else -1 with the figure
static int check_memory(const char *what, double params, double acts, char *err, size_t errlen) {
    double have = machine_bytes(), need = params + acts, gb = 1024.0 * 1024.0 * 1024.0;
    if (have <= 0.0 || need <= have) return 0;
    return errorf(
        err, errlen,
        "%s needs ~%.1f GB (parameters and optimiser %.1f GB, activations %.1f GB); the machine has "
        "%.1f GB: lower --batch or --ch%s",
        what, need / gb, params / gb, acts / gb, have / gb,
        strstr(what, "train") ? ", or add --grad-checkpoint" : "");
}

static int train_memory_check(const UNetConfig *theta, int has_phi, const TrainOpts *o, char *err,
                              size_t errlen) {
    double params = 5.0 * 4.0 * (double)unet_param_count(theta) * (has_phi ? 2 : 1);
    double per = o->grad_checkpoint ? ACT_PER_FLOAT_TRAIN_CKPT : ACT_PER_FLOAT_TRAIN;
    int micro = o->microbatch > 0 ? o->microbatch : o->batch / dist_size();  // one forward's images
    double acts = per * 4.0 * unet_activation_floats(theta) * (has_phi ? 2 : 1) * micro;
    return check_memory("casdm train with these options", params, acts, err, errlen);
}

static void trainer_init(Trainer *tr, const TrainOpts *o, int C, int image_size) {
    memset(tr, 0, sizeof *tr);
    char err[600];
    int sk = 0;
    UNetConfig *c = &tr->theta_cfg;
    if (train_config(o, C, image_size, c, &tr->kind, &sk, err, sizeof err) != 0 ||
        train_memory_check(c, tr->kind == MODEL_CASDM, o, err, sizeof err) != 0) {
        fprintf(stderr, "casdm train: %s\n", err);
        exit(2);
    }
    rng_seed(&tr->rng, (uint64_t)o->seed, 0);
    unet_init(&tr->theta, c, 1, &tr->rng);
    tr->ema_theta = mallocCheck(tr->theta.params.total * sizeof(float));
    memcpy(tr->ema_theta, tr->theta.params.data, tr->theta.params.total * sizeof(float));
    adam_init(&tr->adam_theta, tr->theta.params.total, (float)o->lr);
    if (tr->kind == MODEL_CASDM) {
        tr->has_phi = 1;
        tr->phi_cfg = *c;
        tr->phi_cfg.in_channels = C;
        tr->phi_cfg.out_channels = C + 1;  // x0' and the r_t logit
        unet_init(&tr->phi, &tr->phi_cfg, 1, &tr->rng);
        tr->ema_phi = mallocCheck(tr->phi.params.total * sizeof(float));
        memcpy(tr->ema_phi, tr->phi.params.data, tr->phi.params.total * sizeof(float));
        adam_init(&tr->adam_phi, tr->phi.params.total, (float)o->lr);
    }
    schedule_init(&tr->sched, sk, o->T);
}

static void trainer_free(Trainer *tr) {
    unet_free(&tr->theta);
    free(tr->ema_theta);
    adam_free(&tr->adam_theta);
    if (tr->has_phi) {
        unet_free(&tr->phi);
        free(tr->ema_phi);
        adam_free(&tr->adam_phi);
    }
    schedule_free(&tr->sched);
}

// Names in the file: "<net>.<improved-diffusion key>" for the raw weights,
// "ema.<net>.<key>", "adam_m.<net>.<key>", "adam_v.<net>.<key>", net being
// theta or phi. `tools/casdm_ref.py` strips the prefix to load a network
// into PyTorch with load_state_dict(strict=True).
static const char *kinds_of_copy[4] = {"", "ema.", "adam_m.", "adam_v."};

static const float *copy_data(const Trainer *tr, int net, int copy) {
    const UNet *u = net ? &tr->phi : &tr->theta;
    const Adam *a = net ? &tr->adam_phi : &tr->adam_theta;
    switch (copy) {
    case 0: return u->params.data;
    case 1: return net ? tr->ema_phi : tr->ema_theta;
    case 2: return a->m;
    default: return a->v;
    }
}

static size_t first_nonfinite(const float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return i;
    return n;
}

// the first buffer of the training state with a NaN or Inf, or NULL
static const char *trainer_nonfinite(const Trainer *tr) {
    static const char *what[2][4] = {{"theta", "ema.theta", "adam_m.theta", "adam_v.theta"},
                                     {"phi", "ema.phi", "adam_m.phi", "adam_v.phi"}};
    for (int net = 0; net < (tr->has_phi ? 2 : 1); net++) {
        size_t n = (net ? tr->phi : tr->theta).params.total;
        for (int copy = 0; copy < 4; copy++)
            if (first_nonfinite(copy_data(tr, net, copy), n) < n) return what[net][copy];
    }
    return NULL;
}

#define CKPT_META_MAX 48  // metadata entries of a casdm-checkpoint-1 file
static void config_metadata(char kv[][2][128], int *n, const char *key, const char *fmt, ...) {
    if (*n >= CKPT_META_MAX) fatal("config_metadata: more than %d entries", CKPT_META_MAX);
    va_list ap;
    va_start(ap, fmt);
    snprintf(kv[*n][0], 128, "%s", key);
    vsnprintf(kv[*n][1], 128, fmt, ap);
    va_end(ap);
    (*n)++;
}

static void join_ints(char *buf, size_t len, const int *v, int n) {
    size_t k = 0;
    buf[0] = 0;
    for (int i = 0; i < n && k < len; i++)
        k += (size_t)snprintf(buf + k, len - k, i ? ",%d" : "%d", v[i]);
}

// Writes the whole training state atomically; -1 with a message, leaving
// the file at path as it was, on a write error or when any value is not
// finite (a checkpoint that cannot be resumed never replaces one that can).
static int save_checkpoint(const Trainer *tr, const TrainOpts *o, const char *path, char *err,
                           size_t errlen) {
    const char *bad = trainer_nonfinite(tr);
    if (bad)
        return errorf(err, errlen, "not saving step %ld: '%s' holds NaN or Inf values", tr->step,
                      bad);
    int nets = tr->has_phi ? 2 : 1;
    size_t count = 0;
    for (int net = 0; net < nets; net++) count += (net ? tr->phi : tr->theta).params.count * 4;
    StWrite *w = mallocCheck(count * sizeof *w);
    char **names = mallocCheck(count * sizeof *names);
    size_t k = 0;
    for (int copy = 0; copy < 4; copy++)
        for (int net = 0; net < nets; net++) {
            const UNet *u = net ? &tr->phi : &tr->theta;
            const float *base = copy_data(tr, net, copy);
            size_t off = 0;
            for (size_t i = 0; i < u->params.count; i++) {
                const Tensor *t = &u->params.t[i];
                size_t len = strlen(t->name) + 16;
                names[k] = mallocCheck(len);
                snprintf(names[k], len, "%s%s.%s", kinds_of_copy[copy], net ? "phi" : "theta",
                         t->name);
                w[k] = (StWrite){names[k], t->ndim, t->shape, base + off};
                off += t->size;
                k++;
            }
        }
    const UNetConfig *c = &tr->theta_cfg;
    char kv[CKPT_META_MAX][2][128], list[128];
    int n = 0;
    config_metadata(kv, &n, "format", "casdm-checkpoint-1");
    config_metadata(kv, &n, "model", "%s", model_name(tr->kind));
    config_metadata(kv, &n, "step", "%ld", tr->step);
    config_metadata(kv, &n, "image_size", "%d", c->image_size);
    config_metadata(kv, &n, "in_channels", "%d", c->in_channels);
    config_metadata(kv, &n, "model_channels", "%d", c->model_channels);
    join_ints(list, sizeof list, c->channel_mult, c->n_levels);
    config_metadata(kv, &n, "channel_mult", "%s", list);
    config_metadata(kv, &n, "num_res_blocks", "%d", c->num_res_blocks);
    config_metadata(kv, &n, "attention_resolutions", "%s", o->attn);
    config_metadata(kv, &n, "num_heads", "%d", c->num_heads);
    config_metadata(kv, &n, "dropout", "%.9g", c->dropout);
    config_metadata(kv, &n, "diffusion_steps", "%d", tr->sched.T_train);
    config_metadata(kv, &n, "noise_schedule", "%s",
                    tr->sched.kind == SCHEDULE_LINEAR ? "linear" : "cosine");
    config_metadata(kv, &n, "rescale_timesteps", "true");
    config_metadata(kv, &n, "p2_gamma", "%.17g", o->p2_gamma);
    config_metadata(kv, &n, "p2_k", "%.17g", o->p2_k);
    config_metadata(kv, &n, "clip_x0", "%d", !o->no_clip_x0);
    // the rest of what defines the loss (checked on --resume), then the
    // optimisation's settings (a notice on --resume when they change)
    config_metadata(kv, &n, "lambda_eps", "%.9g", o->lambda_eps);
    config_metadata(kv, &n, "lambda_x0", "%.9g", o->lambda_x0);
    config_metadata(kv, &n, "lambda_mu", "%.9g", o->lambda_mu);
    config_metadata(kv, &n, "lpips", "%d", o->lpips != NULL);
    config_metadata(kv, &n, "lpips_weight", "%.9g", o->lambda_lpips);
    config_metadata(kv, &n, "lpips_size", "%d", o->lpips_size);
    config_metadata(kv, &n, "lr", "%.9g", o->lr);
    config_metadata(kv, &n, "batch", "%d", o->batch);
    config_metadata(kv, &n, "ema_rate", "%.9g", o->ema);
    config_metadata(kv, &n, "grad_clip", "%.9g", o->grad_clip);
    config_metadata(kv, &n, "ema_warmup", "%d", strcmp(o->ema_warmup, "on") == 0);
    config_metadata(kv, &n, "flip", "%d", o->flip);
    config_metadata(kv, &n, "lpips_file", "%s", o->lpips ? o->lpips : "");
    config_metadata(kv, &n, "rng_state", "%016llx", (unsigned long long)tr->rng.state);
    config_metadata(kv, &n, "rng_inc", "%016llx", (unsigned long long)tr->rng.inc);
    config_metadata(kv, &n, "adam_step", "%ld", tr->adam_theta.step);
    const char *meta[2 * CKPT_META_MAX + 1];
    for (int i = 0; i < n; i++) { meta[2 * i] = kv[i][0]; meta[2 * i + 1] = kv[i][1]; }
    meta[2 * n] = NULL;
    int rc = st_write(path, w, k, meta, err, errlen);
    for (size_t i = 0; i < k; i++) free(names[i]);
    free(names);
    free(w);
    return rc;
}

// ---- reading a checkpoint's metadata: every value checked before use ----
typedef struct {
    int kind, schedule, T, clip_x0;
    UNetConfig cfg;            // theta's; phi (casdm) has out_channels = in_channels + 1
    int has_train_state;       // step, adam_step and the RNG are present
    long step, adam_step;
    uint64_t rng_state, rng_inc;
} CkptInfo;

static int meta_string(const StFile *f, const char *path, const char *key, char *buf, size_t len,
                       char *err, size_t errlen) {
    if (st_meta(f, key, buf, len) != 0)
        return errorf(err, errlen, "checkpoint '%s' has no '%s' in its metadata", path, key);
    return 0;
}

// a decimal integer in lo..hi (no sign games, no truncation to int)
static int meta_long(const StFile *f, const char *path, const char *key, long lo, long hi, long *v,
                     char *err, size_t errlen) {
    char buf[128], *end;
    if (meta_string(f, path, key, buf, sizeof buf, err, errlen)) return -1;
    errno = 0;
    long x = strtol(buf, &end, 10);
    // no spaces, no '+'
    int plain = (buf[0] >= '0' && buf[0] <= '9') ||
                (buf[0] == '-' && buf[1] >= '0' && buf[1] <= '9');
    if (!plain || *end || errno == ERANGE || x < lo || x > hi)
        return errorf(err, errlen,
                      "checkpoint '%s': metadata '%s' = '%s' is not an integer in %ld..%ld", path,
                      key, buf, lo, hi);
    *v = x;
    return 0;
}

static int meta_int(const StFile *f, const char *path, const char *key, int lo, int hi, int *v,
                    char *err, size_t errlen) {
    long x;
    if (meta_long(f, path, key, lo, hi, &x, err, errlen)) return -1;
    *v = (int)x;
    return 0;
}

static int meta_hex64(const StFile *f, const char *path, const char *key, uint64_t *v, char *err,
                      size_t errlen) {
    char buf[128];
    if (meta_string(f, path, key, buf, sizeof buf, err, errlen)) return -1;
    size_t n = strlen(buf);
    uint64_t x = 0;
    for (size_t i = 0; i < n; i++) {
        int d = buf[i] >= '0' && buf[i] <= '9'   ? buf[i] - '0'
                : buf[i] >= 'a' && buf[i] <= 'f' ? buf[i] - 'a' + 10
                                                 : -1;
        if (d < 0) n = 0;
        x = x << 4 | (uint64_t)(d < 0 ? 0 : d);
    }
    if (n != 16)
        return errorf(err, errlen, "checkpoint '%s': metadata '%s' = '%s' is not 16 hex digits",
                      path, key, buf);
    *v = x;
    return 0;
}

// The training state (step, Adam's step, PCG32 state): a stream increment
// must be odd (PCG32's rule; an even one can lock rng_below in a loop).
static int checkpoint_train_state(const StFile *f, const char *path, CkptInfo *ci, char *err,
                                  size_t errlen) {
    if (meta_long(f, path, "step", 0, LOG_MAX_STEP, &ci->step, err, errlen) ||
        meta_long(f, path, "adam_step", 0, ci->step, &ci->adam_step, err, errlen) ||
        meta_hex64(f, path, "rng_state", &ci->rng_state, err, errlen) ||
        meta_hex64(f, path, "rng_inc", &ci->rng_inc, err, errlen))
        return -1;
    if (!(ci->rng_inc & 1))
        return errorf(err, errlen,
                      "checkpoint '%s': rng_inc %016llx is even; a PCG32 stream increment is odd",
                      path, (unsigned long long)ci->rng_inc);
    ci->has_train_state = 1;
    return 0;
}

// the floats of the tensors whose names start with prefix
static size_t floats_with_prefix(const StFile *f, const char *prefix) {
    size_t n = 0, len = strlen(prefix);
    for (size_t i = 0; i < f->count; i++)
        if (strncmp(f->e[i].name, prefix, len) == 0) n += f->e[i].size;
    return n;
}

// the networks a checkpoint's metadata describes must have exactly as many
// parameters as the file holds under prefix ("ema." or ""): what is then
// allocated is bounded by the file
static int checkpoint_sizes(const StFile *f, const char *path, const CkptInfo *ci,
                            const char *prefix, char *err, size_t errlen) {
    for (int net = 0; net < (ci->kind == MODEL_CASDM ? 2 : 1); net++) {
        UNetConfig c = ci->cfg;
        if (net) c.out_channels = c.in_channels + 1;
        char p[32];
        snprintf(p, sizeof p, "%s%s.", prefix, net ? "phi" : "theta");
        size_t want = unet_param_count(&c), have = floats_with_prefix(f, p);
        if (want != have)
            return errorf(
                err, errlen,
                "checkpoint '%s': its metadata describes %zu parameters under '%s', the file "
                "holds %zu",
                path, want, p, have);
    }
    return 0;
}

static int checkpoint_info(const StFile *f, const char *path, CkptInfo *ci, char *err,
                           size_t errlen) {
    char buf[256];
    memset(ci, 0, sizeof *ci);
    if (meta_string(f, path, "format", buf, sizeof buf, err, errlen)) return -1;
    if (strcmp(buf, "casdm-checkpoint-1") != 0)
        return errorf(err, errlen,
                      "'%s' has format '%s', not a casdm checkpoint (casdm-checkpoint-1)", path,
                      buf);
    if (meta_string(f, path, "model", buf, sizeof buf, err, errlen)) return -1;
    ci->kind = model_parse(buf);
    if (ci->kind < 0) return errorf(err, errlen, "checkpoint '%s': unknown model '%s'", path, buf);
    int S, C, mc, res, heads, clip = 1;
    if (meta_int(f, path, "image_size", 1, 4096, &S, err, errlen) ||
        meta_int(f, path, "in_channels", 1, 4, &C, err, errlen) ||
        meta_int(f, path, "model_channels", 1, 4096, &mc, err, errlen) ||
        meta_int(f, path, "num_res_blocks", 1, UNET_MAX_BLOCKS, &res, err, errlen) ||
        meta_int(f, path, "num_heads", 1, 64, &heads, err, errlen) ||
        meta_int(f, path, "diffusion_steps", 1, 100000, &ci->T, err, errlen))
        return -1;
    if (st_meta(f, "clip_x0", buf, sizeof buf) == 0 &&
        meta_int(f, path, "clip_x0", 0, 1, &clip, err, errlen))
        return -1;
    ci->clip_x0 = clip;
    UNetConfig *c = &ci->cfg;
    unet_default_config(c, S, C, model_theta_out(ci->kind, C));
    c->model_channels = mc;
    c->num_res_blocks = res;
    c->num_heads = heads;
    c->dropout = 0.0f;
    if (meta_string(f, path, "channel_mult", buf, sizeof buf, err, errlen)) return -1;
    if (unet_parse_channel_mult(c, buf) != 0)
        return errorf(err, errlen, "checkpoint '%s': bad channel_mult '%s'", path, buf);
    if (meta_string(f, path, "attention_resolutions", buf, sizeof buf, err, errlen)) return -1;
    if (unet_parse_attention(c, buf) != 0)
        return errorf(err, errlen, "checkpoint '%s': bad attention_resolutions '%s'", path, buf);
    if (meta_string(f, path, "noise_schedule", buf, sizeof buf, err, errlen)) return -1;
    ci->schedule = schedule_parse(buf);
    if (ci->schedule < 0)
        return errorf(err, errlen, "checkpoint '%s': unknown noise_schedule '%s'", path, buf);
    char why[256];
    if (unet_check_config(c, why, sizeof why) != 0)
        return errorf(err, errlen, "checkpoint '%s': %s", path, why);
    if (st_meta(f, "step", buf, sizeof buf) == 0)
        return checkpoint_train_state(f, path, ci, err, errlen);
    return 0;
}

// copies the tensors "<prefix><key>" of f, for every parameter of ps, into
// dst (laid out as ps->data; NULL: ps->data), checking every shape and that
// every value is finite
static int load_tensors(const ParamSet *ps, const StFile *f, const char *path, const char *prefix,
                        float *dst, char *err, size_t errlen) {
    size_t off = 0;
    for (size_t i = 0; i < ps->count; i++) {
        const Tensor *t = &ps->t[i];
        char name[300];
        snprintf(name, sizeof name, "%s%s", prefix, t->name);
        const StEntry *e = st_find(f, name);
        if (!e)
            return errorf(
                err, errlen,
                "checkpoint '%s' lacks tensor '%s' (was it written with other --ch/--res/--attn/--mult?)",
                path, name);
        int same = e->ndim == t->ndim && e->size == t->size;
        for (int d = 0; same && d < t->ndim; d++) same = e->shape[d] == t->shape[d];
        if (!same)
            return errorf(err, errlen,
                          "checkpoint '%s': tensor '%s' has another shape than this model's", path,
                          name);
        if (first_nonfinite(e->data, e->size) < e->size)
            return errorf(err, errlen, "checkpoint '%s': tensor '%s' holds NaN or Inf values", path,
                          name);
        memcpy((dst ? dst : ps->data) + off, e->data, t->size * sizeof(float));
        off += t->size;
    }
    return 0;
}

// ---- options a checkpoint records: on --resume, a change in one that
// defines the loss is an error naming the flag; in one that may change
// within a run (the learning rate, say), a notice ----
typedef struct { const char *key, *flag; double value; } RunOption;

// How a recorded option is held to this run's value: RESUME_STRICT (train-ae,
// the GANs: a key must be there and equal), RESUME_LOSS (casdm train: equal;
// a key an older checkpoint lacks gets a notice, as its run used the value of
// that version, which this run cannot know), RESUME_NOTICE (a change is
// reported and allowed).
enum { RESUME_STRICT, RESUME_LOSS, RESUME_NOTICE };

static void resume_compare_options(const StFile *f, const char *path, const RunOption *ro, int n,
                                   int mode, const char *what) {
    char buf[64];
    for (int i = 0; i < n; i++) {
        char *end;
        if (st_meta(f, ro[i].key, buf, sizeof buf) != 0) {
            if (mode == RESUME_STRICT)
                fatal("--resume: '%s' has no '%s' in its metadata", path, ro[i].key);
            fprintf(stderr, "note: '%s' does not record %s (an older casdm); assuming %g\n", path,
                    ro[i].flag, ro[i].value);
            continue;
        }
        double v = strtod(buf, &end);
        if (!*end && (float)v == (float)ro[i].value) continue;
        if (mode == RESUME_NOTICE) {
            fprintf(stderr, "note: --resume: %s was %s, now %g\n", ro[i].flag, buf, ro[i].value);
            continue;
        }
        fatal("--resume: '%s' was trained with %s %s; this run asks for %g (%s must not change "
              "within a run)", path, ro[i].flag, buf, ro[i].value, what);
    }
}

static void resume_check_options(const StFile *f, const char *path, const RunOption *ro, int n,
                                 const char *what) {
    resume_compare_options(f, path, ro, n, RESUME_STRICT, what);
}

// what defines a casdm train run's loss and model, and what may change
static void train_resume_options(const StFile *f, const char *path, const TrainOpts *o) {
    const RunOption loss[] = {
        {"diffusion_steps", "--T", o->T},
        {"p2_gamma", "--p2-gamma", o->p2_gamma},
        {"p2_k", "--p2-k", o->p2_k},
        {"clip_x0", "--no-clip-x0 (absent: 1)", !o->no_clip_x0},
        {"dropout", "--dropout", (float)o->dropout},
        {"lambda_eps", "--lambda-eps", o->lambda_eps},
        {"lambda_x0", "--lambda-x0", o->lambda_x0},
        {"lambda_mu", "--lambda-mu", o->lambda_mu},
        {"lpips", "--lpips (1: given)", o->lpips != NULL},
        {"lpips_weight", "--lpips-weight", o->lambda_lpips},
        {"lpips_size", "--lpips-size", o->lpips_size},
    };
    const RunOption run[] = {
        {"lr", "--lr", o->lr},
        {"batch", "--batch", o->batch},
        {"ema_rate", "--ema", o->ema},
        {"grad_clip", "--grad-clip", o->grad_clip},
        {"ema_warmup", "--ema-warmup (1: on)", strcmp(o->ema_warmup, "on") == 0},
        {"flip", "--flip (1: given)", o->flip},
    };
    resume_compare_options(f, path, loss, (int)(sizeof loss / sizeof loss[0]), RESUME_LOSS,
                           "it changes the loss, so it");
    resume_compare_options(f, path, run, (int)(sizeof run / sizeof run[0]), RESUME_NOTICE, "");
    char buf[128];
    // the LPIPS weights: a path may move between machines, so another one is a notice
    if (o->lpips && st_meta(f, "lpips_file", buf, sizeof buf) == 0 && strcmp(buf, o->lpips) != 0)
        fprintf(stderr, "note: --resume: --lpips was '%s', now '%s' (the same weights?)\n", buf,
                o->lpips);
    if (st_meta(f, "noise_schedule", buf, sizeof buf) == 0 && strcmp(buf, o->schedule) != 0)
        fatal("--resume: '%s' was trained with --schedule %s; this run asks for %s (it changes "
              "the loss, so it must not change within a run)", path, buf, o->schedule);
}

// Restores every tensor and the step, RNG and Adam state. The trainer was
// built from the same options; any difference in shapes is an error naming
// the tensor.
static void load_checkpoint(Trainer *tr, const TrainOpts *o, const char *path) {
    StFile f;
    CkptInfo ci;
    char err[600];
    if (st_read(path, &f, err, sizeof err) != 0) fatal("%s", err);
    if (checkpoint_info(&f, path, &ci, err, sizeof err) != 0) fatal("%s", err);
    if (ci.kind != tr->kind)
        fatal("checkpoint '%s' holds a %s model, not %s", path, model_name(ci.kind),
              model_name(tr->kind));
    if (!ci.has_train_state)
        fatal("checkpoint '%s' has no 'step' in its metadata: it cannot be resumed", path);
    int nets = tr->has_phi ? 2 : 1;
    for (int copy = 0; copy < 4; copy++)
        for (int net = 0; net < nets; net++) {
            char prefix[32];
            snprintf(prefix, sizeof prefix, "%s%s.", kinds_of_copy[copy], net ? "phi" : "theta");
            if (load_tensors(&(net ? &tr->phi : &tr->theta)->params, &f, path, prefix,
                             (float *)copy_data(tr, net, copy), err, sizeof err) != 0)
                fatal("%s", err);
        }
    train_resume_options(&f, path, o);  // (after the shapes: an architecture error is named first)
    tr->step = ci.step;
    tr->adam_theta.step = tr->adam_phi.step = ci.adam_step;
    tr->rng.state = ci.rng_state;
    tr->rng.inc = ci.rng_inc;
    st_free(&f);
}

// ---------------------------------------------------------------------------
// ---- signals, time, directories ----
// SIGINT (Ctrl-C) and SIGTERM (kill, systemd, batch schedulers) both ask the
// run to stop at the next step: it saves and exits 128 + the signal. Later
// signals change nothing (the handler stays installed: sigaction, not the
// one-shot System V signal()), and SA_RESTART lets a checkpoint being
// written finish.
// ---------------------------------------------------------------------------
static volatile sig_atomic_t interrupted = 0;
static void on_signal(int sig) { interrupted = sig; }

static void catch_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

static int interrupted_status(void) { return 128 + (int)interrupted; }

// The progress of a long job on stderr: on a tty one line rewritten in place
// (at most 10 times a second), otherwise (a log file) a line every 30 s and
// at the end; -1 is silent. `what` says where the job is ("step 3/50").
typedef struct {
    int mode;  // 1 in place, 0 lines, -1 silent
    double t0, shown;
    int open;  // an in-place line is on screen
} Progress;

static void progress_start(Progress *p, int mode) {
    p->mode = mode;
    p->t0 = now_seconds();
    p->shown = -1e30;
    p->open = 0;
}

static void progress_show(Progress *p, const char *unit, double done, double total,
                          const char *what) {
    double now = now_seconds(), el = now - p->t0;
    int last = done >= total;
    if (p->mode < 0 || (!last && now - p->shown < (p->mode ? 0.1 : 30.0))) return;
    p->shown = now;
    double rate = el > 0 ? done / el : 0.0, eta = done > 0 ? el / done * (total - done) : 0.0;
    fprintf(stderr, "%s%.0f/%.0f %s, %s | %.2f %s/s | %.0fs elapsed, ETA %.0fs%s",
            p->mode ? "\r" : "", done, total, unit, what, rate, unit, el, eta,
            p->mode ? "   " : "\n");
    p->open = p->mode > 0;
}

// ends the in-place line, so what follows starts on a line of its own
static void progress_end(Progress *p) {
    if (p->open) fprintf(stderr, "\n");
    p->open = 0;
}

// mkdir -p
static void make_dir(const char *path) {
    char p[4096];
    snprintf(p, sizeof p, "%s", path);
    for (char *c = p + 1; *c; c++) {
        if (*c != '/') continue;
        *c = 0;
        if (mkdir(p, 0777) != 0 && errno != EEXIST)
            fatal("cannot create directory '%s': %s", p, strerror(errno));
        *c = '/';
    }
    if (mkdir(p, 0777) != 0 && errno != EEXIST)
        fatal("cannot create directory '%s': %s", path, strerror(errno));
    struct stat st;
    if (stat(p, &st) != 0 || !S_ISDIR(st.st_mode))
        fatal("--out '%s' exists and is not a directory", path);
}

// ---------------------------------------------------------------------------
// ---- training ----
// ---------------------------------------------------------------------------
typedef struct {
    int kind;
    UNet theta, phi;
    int has_phi;
    Schedule sched;  // as trained
    int clip_x0;
} Model;
static int sample_images(Model *m, const SampleConfig *sc, const Schedule *rs, Rng *rng, int n,
                         int batch, unsigned char *out, int tty);
static void write_grid_png(const char *path, const unsigned char *img, int N, int H, int W, int C);

// EMA with warm-up: improved-diffusion uses a fixed rate (0.9999), which on a
// short CPU run leaves the EMA at its random start; the rate ramps up as
// min(rate, (1 + s) / (10 + s)) with s the number of steps before this one.
// At 0.9999 the ramp lasts ~90 k steps, so a paper-length run that should
// match improved-diffusion's EMA turns it off (--ema-warmup off).
static float ema_rate(double rate, long s, int warmup) {
    double warm = (1.0 + (double)s) / (10.0 + (double)s);
    return (float)(warmup && warm < rate ? warm : rate);
}

static double nonfinite_or(double v) { return isfinite(v) ? v : NAN; }

// log.csv of a resumed run: the header and the rows up to the checkpoint's
// step, from DIR/log.csv of the run resumed (in place or not), written
// atomically to path; rows past the checkpoint (after a hard kill) are gone.
// The kept rows also go into hist for the plot.
static void carry_log(const char *from, const char *path, long max_step, History *hist,
                      const LogLayout *layout) {
    char err[600];
    size_t n = 0;
    char *text = from ? (char *)read_file(from, LOG_MAX_FILE, &n, err, sizeof err) : NULL;
    Bytes kept = {0};
    bytes_put(&kept, layout->header, strlen(layout->header));
    bytes_put(&kept, "\n", 1);
    for (size_t p = 0; text && p < n;) {
        const char *line = text + p, *nl = memchr(line, '\n', n - p);
        size_t len = nl ? (size_t)(nl - line) : n - p;
        long step = log_row_step(line, len);
        if (step >= 0 && step <= max_step) {
            bytes_put(&kept, line, len);
            bytes_put(&kept, "\n", 1);
        }
        p += len + 1;
    }
    free(text);
    history_parse(hist, (const char *)kept.b, kept.len);
    if (write_file_atomically(path, kept.b, kept.len, err, sizeof err) != 0) fatal("%s", err);
    free(kept.b);
}

// one row of log.csv (fd: the step's evaluation, NAN for none: an empty
// field); a failed write (a full disk) stops the run
static void log_row(FILE *log, const char *path, long step, const double *sums, int nsum,
                    const int *has, double ips, double fd) {
    fprintf(log, "%ld", step);
    for (int i = 0; i < 5; i++) {
        if (has[i]) fprintf(log, ",%.6g", nonfinite_or(sums[i] / nsum));
        else fprintf(log, ",");
    }
    fprintf(log, ",%.3f,", ips);
    if (isfinite(fd)) fprintf(log, "%.6g", fd);
    fprintf(log, "\n");
    if (fflush(log) != 0 || ferror(log)) fatal("cannot write '%s': %s", path, strerror(errno));
}

// Fault injection for the tests (tests/test_cli.sh), from the environment:
// CASDM_TEST_FAULT=grad-inf:N puts +Inf into one gradient at step N;
// param-nan:N puts a NaN into one weight after step N's update.
// rank-exit:N:R and rank-hang:N:R: rank R exits, or hangs, in step N.
typedef struct { int kind; long step; int rank; } Fault;
enum { FAULT_NONE, FAULT_GRAD_INF, FAULT_PARAM_NAN, FAULT_RANK_EXIT, FAULT_RANK_HANG };

static Fault fault_from_env(void) {
    Fault f = {FAULT_NONE, 0, -1};
    const char *s = getenv("CASDM_TEST_FAULT");
    if (!s) return f;
    char *end = NULL;
    if (strncmp(s, "grad-inf:", 9) == 0) f.kind = FAULT_GRAD_INF, f.step = strtol(s + 9, NULL, 10);
    else if (strncmp(s, "param-nan:", 10) == 0)
        f.kind = FAULT_PARAM_NAN, f.step = strtol(s + 10, NULL, 10);
    else if (strncmp(s, "rank-exit:", 10) == 0)
        f.kind = FAULT_RANK_EXIT, f.step = strtol(s + 10, &end, 10);
    else if (strncmp(s, "rank-hang:", 10) == 0)
        f.kind = FAULT_RANK_HANG, f.step = strtol(s + 10, &end, 10);
    if (end && *end == ':') f.rank = (int)strtol(end + 1, NULL, 10);
    return f;
}

static const char *train_help_text =
    "usage: casdm train --data PATH [options]\n"
    "\n"
    "Trains one of the Cas-DM paper's models and writes DIR/ckpt.safetensors\n"
    "(every --ckpt-every steps and at the end), DIR/log.csv, DIR/loss.svg (the loss\n"
    "plot) and sample grids DIR/samples_STEP.png from the EMA weights (DDIM, eta 0).\n"
    "Ctrl-C saves a checkpoint and stops; --resume DIR continues. --eval-every N\n"
    "scores EMA samples every N steps (log.csv's fd column, the plot, and\n"
    "DIR/ckpt_best.safetensors).\n"
    "PATH: a CIFAR-10 binary directory (data_batch_1..5.bin) or .bin file, or an\n"
    "IDX image file such as train-images-idx3-ubyte (28x28 is zero-padded to 32x32).\n"
    "\n"
    "options:\n";

static Option train_opts_table[64];
static int train_opts_n;

static void train_help(FILE *f) {
    fputs(train_help_text, f);
    usage_options(f, train_opts_table, train_opts_n);
}

static void define_train_options(TrainOpts *o) {
    const Option opts[] = {
        {"--data", OPT_STR, &o->data, NULL, "training images (see above)", 0, 0},
        {"--model", OPT_STR, &o->model, "casdm",
         "ddpm-eps, ddpm-x0, dual or casdm; lddgan and ddgan have their own options (casdm "
         "train --model lddgan --help)", 0, 0},
        {"--preset", OPT_STR, &o->preset, NULL,
         "cifar10-paper: the paper's CIFAR-10 run as the defaults (ch 128, res 3, attn 16,8, "
         "dropout 0.3, T 4000 cosine, batch 128, lr 1e-4, EMA 0.9999 without warm-up, 400000 "
         "steps, a kept checkpoint every 20000); flags beside it override", 0, 0},
        {"--ch", OPT_INT, &o->ch, "64",
         "U-Net model_channels (casdm's CPU default; the paper and improved-diffusion: 128)", 32,
         1024},
        {"--res", OPT_INT, &o->res, "2",
         "ResBlocks per level (improved-diffusion's default; the paper: 3)", 1, 16},
        {"--attn", OPT_STR, &o->attn, "16",
         "attention resolutions (casdm's CPU default; improved-diffusion's default U-Net, which "
         "the paper uses: 16,8); '' for none", 0, 0},
        {"--mult", OPT_STR, &o->mult, "",
         "channel_mult, e.g. 1,2,2,2; '' = improved-diffusion's default for the size", 0, 0},
        {"--heads", OPT_INT, &o->heads, "4", "attention heads (improved-diffusion's default)", 1,
         64},
        {"--dropout", OPT_FLOAT, &o->dropout, "0",
         "dropout in ResBlocks (improved-diffusion's default; its CIFAR-10 recipe: 0.3)", 0,
         0.99},
        {"--T", OPT_INT, &o->T, "4000", "diffusion steps (the paper, Sec. 5)", 1, 100000},
        {"--schedule", OPT_STR, &o->schedule, "cosine",
         "noise schedule: cosine (the paper, Sec. 5) or linear (improved-diffusion's default)", 0,
         0},
        {"--p2-gamma", OPT_FLOAT, &o->p2_gamma, "0",
         "P2 weighting gamma on the epsilon loss (0 = off; paper 0.5 or 1)", 0, 10},
        {"--p2-k", OPT_FLOAT, &o->p2_k, "1", "P2 weighting k", 1e-6, 1e6},
        {"--no-clip-x0", OPT_FLAG, &o->no_clip_x0, NULL, "casdm: feed x0* to phi unclipped", 0, 0},
        {"--lpips", OPT_STR, &o->lpips, NULL,
         "LPIPS weights (tools/convert_lpips.py); adds L^lpips on the x0 prediction", 0, 0},
        {"--lpips-size", OPT_INT, &o->lpips_size, "224",
         "LPIPS input size (images are resized; the paper: 224)", 16, 1024},
        {"--lpips-weight", OPT_FLOAT, &o->lambda_lpips, "0.1", "lambda of L^lpips (Eq. 15)", 0,
         1e6},
        {"--lambda-eps", OPT_FLOAT, &o->lambda_eps, "1",
         "weight of L^eps (Eq. 15, every model; dual diffusion's own code: 1/3)", 0, 1e6},
        {"--lambda-x0", OPT_FLOAT, &o->lambda_x0, "1",
         "weight of L^x0 (Eq. 15, every model; dual diffusion's own code: 1/3)", 0, 1e6},
        {"--lambda-mu", OPT_FLOAT, &o->lambda_mu, "1",
         "weight of L^mu (Eq. 15; dual and casdm; dual diffusion's own code: 1/3)", 0, 1e6},
        {"--steps", OPT_INT, &o->steps, "1000", "training steps (total, counting resumed ones)", 0,
         1000000000},
        {"--time-limit", OPT_FLOAT, &o->time_limit, "0",
         "stop after this many seconds of training (0 = no limit)", 0, 1e9},
        {"--batch", OPT_INT, &o->batch, "16",
         "batch size (casdm's CPU default; the paper: 128, 16 on each of 8 GPUs); under mpirun "
         "the whole batch, split over the processes", 1, 4096},
        {"--microbatch", OPT_INT, &o->microbatch, "0",
         "images per forward and backward: each process's share of --batch in parts of this "
         "many, their gradients summed (less memory, the same step; improved-diffusion's "
         "--microbatch; 0 = the whole share)", 0, 4096},
        {"--lr", OPT_FLOAT, &o->lr, "1e-4",
         "Adam learning rate, constant (the paper and improved-diffusion)", 0, 1},
        {"--ema-warmup", OPT_STR, &o->ema_warmup, "on",
         "on: the EMA rate is min(rate, (1+s)/(10+s)) at step s; off: the rate itself "
         "(improved-diffusion)", 0, 0},
        {"--ema", OPT_FLOAT, &o->ema, "0.9999", "EMA rate (improved-diffusion's; see --ema-warmup)",
         0, 1},
        {"--grad-clip", OPT_FLOAT, &o->grad_clip, "0",
         "clip each network's gradient norm to this (theta and phi apart; 0 = off)", 0, 1e9},
        {"--seed", OPT_INT, &o->seed, "0", "random seed", 0, 2147483647},
        {"--grad-checkpoint", OPT_FLAG, &o->grad_checkpoint, NULL,
         "recompute each U-Net block in backward instead of keeping its activations (about half the memory, a third more time; same numbers)",
         0, 0},
        {"--no-flip", OPT_FLAG, &o->no_flip, NULL,
         "no random horizontal flips (the default: improved-diffusion's loader has none)", 0, 0},
        {"--flip", OPT_FLAG, &o->flip, NULL, "random horizontal flips of the training images", 0,
         0},
        {"--out", OPT_STR, &o->out, "runs/train", "output directory", 0, 0},
        {"--resume", OPT_STR, &o->resume, NULL, "continue from DIR/ckpt.safetensors", 0, 0},
        {"--log-every", OPT_INT, &o->log_every, "10", "steps per line of log.csv", 1, 1000000},
        {"--ckpt-every", OPT_INT, &o->ckpt_every, "1000",
         "steps between checkpoints (0 = only at the end)", 0, 1000000000},
        {"--keep-every", OPT_INT, &o->keep_every, "0",
         "steps between kept snapshots DIR/ckpt_STEP.safetensors besides the rolling one (0 = none)",
         0, 1000000000},
        {"--sample-every", OPT_INT, &o->sample_every, "0",
         "steps between sample grids DIR/samples_STEP.png (0 = only at the end)", 0, 1000000000},
        {"--sample-n", OPT_INT, &o->sample_n, "36", "images in each sample grid (0 = none)", 0,
         4096},
        {"--sample-steps", OPT_INT, &o->sample_steps, "50",
         "DDIM steps for the sample grids and --eval-every", 1, 100000},
        {"--eval-every", OPT_INT, &o->eval_every, "0",
         "steps between scorings of --eval-n EMA samples (log.csv fd, ckpt_best; 0 = none)", 0,
         1000000000},
        {"--eval-n", OPT_INT, &o->eval_n, "500", "samples per scoring", 2, 1000000},
        {"--eval-features", OPT_STR, &o->eval_features, NULL,
         "a classifier (casdm train-classifier) or Inception weights to score with", 0, 0},
        {"--eval-ref-n", OPT_INT, &o->eval_ref_n, "10000",
         "training images whose statistics are the reference", 2, 100000000},
    };
    train_opts_n = (int)(sizeof opts / sizeof opts[0]);
    memcpy(train_opts_table, opts, sizeof opts);
}

// DIR/samples_STEP.png from the EMA weights; its own RNG, so the training
// stream (and a resumed run) is the same with or without grids. A signal
// stops it between steps (no grid is written then).
// the EMA weights into ema, and the DDIM sampler of --sample-steps (rs: the
// caller frees it): what the sample grids and --eval-every sample with
static SampleConfig ema_sampler(Trainer *tr, Model *ema, const TrainOpts *o, Schedule *rs) {
    memcpy(ema->theta.params.data, tr->ema_theta, tr->theta.params.total * sizeof(float));
    if (tr->has_phi)
        memcpy(ema->phi.params.data, tr->ema_phi, tr->phi.params.total * sizeof(float));
    ema->sched = tr->sched;
    int *kept = mallocCheck((size_t)tr->sched.T * sizeof *kept);
    char err[128], spec[32];
    snprintf(spec, sizeof spec, "%d",
             o->sample_steps < tr->sched.T ? o->sample_steps : tr->sched.T);
    int nk = space_timesteps(tr->sched.T, spec, kept, err, sizeof err);
    if (nk < 0) fatal("--sample-steps: %s", err);
    schedule_respace(rs, &tr->sched, kept, nk);
    free(kept);
    SampleConfig sc = {.kind = tr->kind, .method = SAMPLER_DDIM, .eta = 0.0f, .clip = 1,
                       .clip_x0 = ema->clip_x0};
    return sc;
}

static void train_sample_grid(Trainer *tr, Model *ema, const TrainOpts *o, int C, int S, int tty) {
    Schedule rs;
    SampleConfig sc = ema_sampler(tr, ema, o, &rs);
    Rng rng;
    rng_seed(&rng, (uint64_t)o->seed, 7);  // the same noise at every grid: progress is easy to see
    unsigned char *img = mallocCheck((size_t)o->sample_n * C * S * S);
    int rc = sample_images(ema, &sc, &rs, &rng, o->sample_n, o->sample_n < 36 ? o->sample_n : 36,
                           img, tty ? 1 : 0);
    char path[4200];
    snprintf(path, sizeof path, "%s/samples_%06ld.png", o->out, tr->step);
    if (dist_rank() != 0) rc = 2;  // (rank 0 writes the grid)
    if (rc == 0) {
        write_grid_png(path, img, o->sample_n, S, S, C);
        fprintf(stderr, "samples: %s\n", path);
    } else if (rc == 1) {
        fprintf(stderr,
                "samples: the EMA weights give NaN or Inf pixels at step %ld; %s not written\n",
                tr->step, path);
    }
    free(img);
    schedule_free(&rs);
}

// the global gradient norm over both networks (NaN or Inf if any gradient is)
// --grad-clip: each network by its own gradient norm (torch's
// clip_grad_norm_ on each module's parameters: g * max / (norm + 1e-6) when
// norm > max). One norm over theta and phi together would let phi's losses
// (LPIPS among them) scale theta's update, against Fig. 3: "all the
// gradients of other losses are blocked for theta".
static void clip_grads(ParamSet *p, double norm, double max_norm) {
    if (max_norm <= 0 || norm <= max_norm) return;
    float k = (float)(max_norm / (norm + 1e-6));
    for (size_t i = 0; i < p->total; i++) p->grad[i] *= k;
}

// A step's loss terms, the mean over the whole batch (every rank's share
// and micro-batch): loss, l_eps, l_x0, l_mu, l_lpips; has[i] 0 where the
// model has no such term.
enum { LOSS_TERMS = 5 };
typedef struct { float v[LOSS_TERMS]; int has[LOSS_TERMS]; } StepLosses;

// This process's share of a step (README, "Training on several machines"):
// rows first .. first+share-1 of the --batch B images, in micro-batches of
// `micro` (--microbatch). B = share on one process without --microbatch.
typedef struct { int B, share, first, micro, parts; } BatchShare;

static int batch_share(const TrainOpts *o, BatchShare *bs, char *err, size_t errlen) {
    int K = dist_size();
    bs->B = o->batch;
    if (o->batch % K != 0)
        return errorf(err, errlen, "--batch %d does not split over %d processes (a multiple of %d)",
                      o->batch, K, K);
    bs->share = o->batch / K;
    bs->first = dist_rank() * bs->share;
    bs->micro = o->microbatch > 0 ? o->microbatch : bs->share;
    if (bs->share % bs->micro != 0)
        return errorf(err, errlen,
                      "--microbatch %d does not divide each process's %d images of --batch %d",
                      o->microbatch, bs->share, o->batch);
    bs->parts = K * (bs->share / bs->micro);
    return 0;
}

// what one allreduce per step sums over the ranks: theta's and phi's
// gradients (summed over this rank's micro-batches), the loss terms, and
// the vote to stop (a signal or --time-limit on any rank stops them all
// after the same step)
static size_t reduce_floats(const Trainer *tr) {
    return tr->theta.params.total + (tr->has_phi ? tr->phi.params.total : 0) + LOSS_TERMS + 1;
}

// grads into the sum (the first micro-batch sets it)
static void add_grads(float *sum, const ParamSet *p, int first) {
    if (first) memcpy(sum, p->grad, p->total * sizeof(float));
    else
        for (size_t i = 0; i < p->total; i++) sum[i] += p->grad[i];
}

// the mean gradient back into the parameters' buffers
static void take_grads(ParamSet *p, const float *sum, float scale) {
    for (size_t i = 0; i < p->total; i++) p->grad[i] = sum[i] * scale;
}

// CASDM_TEST_FAULT=rank-exit:N:R and rank-hang:N:R (tests/test_mpi.sh):
// rank R exits, or stops answering, in step N before the gradients' allreduce
static void rank_fault(Fault fault, long step) {
    if (fault.step != step || fault.rank != dist_rank()) return;
    if (fault.kind == FAULT_RANK_EXIT) {
        fprintf(stderr, "casdm train: rank %d exits at step %ld (CASDM_TEST_FAULT)\n",
                dist_rank(), step);
        _exit(4);
    }
    if (fault.kind == FAULT_RANK_HANG)
        for (;;) pause();
}

// One training step: a batch, x_t and the losses (Eq. 3, Eq. 8-15),
// backward, the gradient's check and clip, Adam and the EMA (as
// improved-diffusion's TrainLoop.run_step). Every rank draws the whole
// batch's random numbers in one process's order (tools/train_ref.py
// replays it) and keeps its rows: the images, timesteps, noise and dropout
// masks of an image do not depend on how the batch is split. The gradient
// is the mean over the whole batch: each share's (micro-batch's) mean
// gradient, summed over shares in a fixed order (micro-batches in turn,
// then one allreduce over ranks), over the number of shares. Returns 0, or
// -1 with a message when the loss or the gradient is not finite: then
// nothing was updated (on any rank: they all see the same sums).
static int train_step(Trainer *tr, Graph *g, const LossConfig *lc, const Dataset *data,
                      const TrainOpts *o, const BatchShare *bs, int flip, float *x0buf, int *t,
                      float *sum, Fault fault, float stop_vote, int *stop, StepLosses *sl,
                      char *err, size_t errlen) {
    const Images *im = &data->img;
    int B = bs->B, M = bs->micro, split = bs->parts > 1;
    size_t per = (size_t)im->c * im->h * im->w;
    draw_batch(data, &tr->rng, x0buf, B, flip);
    for (int i = 0; i < B; i++) t[i] = (int)rng_below(&tr->rng, (uint32_t)tr->sched.T);
    Rng noise_rng = tr->rng;                       // the whole batch's noise,
    rng_advance(&tr->rng, 4 * (uint64_t)B * per);  // (rng_fill_normal: 4 words a value)
    Rng masks_rng = tr->rng;                       // then the dropout masks
    float *grad_theta = sum, *grad_phi = sum + tr->theta.params.total;
    float *terms = grad_phi + (tr->has_phi ? tr->phi.params.total : 0);
    float local[LOSS_TERMS] = {0};
    for (int row = bs->first; row < bs->first + bs->share; row += M) {
        graph_reset(g);
        tr->rng = masks_rng;  // each micro-batch draws its rows of the same masks
        g->batch_first = split ? row : 0;
        g->batch_total = split ? B : 0;
        Tensor *x0 = tensor4(g, M, im->c, im->h, im->w);
        memcpy(x0->data, x0buf + (size_t)row * per, x0->size * sizeof(float));
        Tensor *noise = tensor4(g, M, im->c, im->h, im->w);
        Rng nr = noise_rng;
        rng_fill_normal_part(&nr, noise->data, (size_t)row * per, noise->size, (size_t)B * per,
                             0.0f, 1.0f);
        LossTerms lt;
        diffusion_losses(g, &lt, lc, &tr->sched, &tr->theta, tr->has_phi ? &tr->phi : NULL, x0,
                         t + row, noise);
        Tensor *tt[LOSS_TERMS] = {lt.loss, lt.l_eps, lt.l_x0, lt.l_mu, lt.l_lpips};
        for (int i = 0; i < LOSS_TERMS; i++) {
            sl->has[i] = tt[i] != NULL;
            local[i] += tt[i] ? tt[i]->data[0] : 0.0f;
        }
        params_zero_grad(&tr->theta.params);
        if (tr->has_phi) params_zero_grad(&tr->phi.params);
        graph_backward(g, lt.loss, NULL);
        if (split) {
            add_grads(grad_theta, &tr->theta.params, row == bs->first);
            if (tr->has_phi) add_grads(grad_phi, &tr->phi.params, row == bs->first);
        }
    }
    rank_fault(fault, tr->step + 1);
    float scale = 1.0f / (float)bs->parts;
    if (split) {
        memcpy(terms, local, sizeof local);
        terms[LOSS_TERMS] = stop_vote;
        char what[64];
        snprintf(what, sizeof what, "the gradients' allreduce of step %ld", tr->step + 1);
        dist_sum_floats(sum, reduce_floats(tr), what);
        take_grads(&tr->theta.params, grad_theta, scale);
        if (tr->has_phi) take_grads(&tr->phi.params, grad_phi, scale);
        memcpy(local, terms, sizeof local);
        stop_vote = terms[LOSS_TERMS];
    }
    *stop = stop_vote >= 1000.0f ? 2 : stop_vote > 0.0f;  // 2: a signal, 1: --time-limit
    for (int i = 0; i < LOSS_TERMS; i++) sl->v[i] = local[i] * scale;
    if (!isfinite(sl->v[0]))
        return errorf(err, errlen, "loss is %g at step %ld", sl->v[0], tr->step + 1);
    if (fault.kind == FAULT_GRAD_INF && fault.step == tr->step + 1)
        tr->theta.params.grad[0] = INFINITY;
    // a non-finite gradient would make Adam's moments, and then every
    // weight, NaN: stop before the update
    double norm_theta = sqrt(grad_norm_sq(tr->theta.params.grad, tr->theta.params.total));
    double norm_phi =
        tr->has_phi ? sqrt(grad_norm_sq(tr->phi.params.grad, tr->phi.params.total)) : 0.0;
    if (!isfinite(norm_theta) || !isfinite(norm_phi))
        return errorf(err, errlen, "the gradient norm of %s is %g at step %ld",
                      isfinite(norm_theta) ? "phi" : "theta",
                      isfinite(norm_theta) ? norm_phi : norm_theta, tr->step + 1);
    clip_grads(&tr->theta.params, norm_theta, o->grad_clip);
    if (tr->has_phi) clip_grads(&tr->phi.params, norm_phi, o->grad_clip);
    adam_step(&tr->adam_theta, tr->theta.params.data, tr->theta.params.grad);
    float rate = ema_rate(o->ema, tr->step, strcmp(o->ema_warmup, "on") == 0);
    ema_update(tr->ema_theta, tr->theta.params.data, tr->theta.params.total, rate);
    if (tr->has_phi) {
        adam_step(&tr->adam_phi, tr->phi.params.data, tr->phi.params.grad);
        ema_update(tr->ema_phi, tr->phi.params.data, tr->phi.params.total, rate);
    }
    tr->step++;
    if (fault.kind == FAULT_PARAM_NAN && fault.step == tr->step) tr->theta.params.data[0] = NAN;
    return 0;
}

// the progress line (in place on a tty) with the ETA from this run's pace,
// never past --time-limit
static void progress_line(const TrainOpts *o, long step, long step0, double elapsed, double ips,
                          const double *sums, int nsum, const int *has, int tty) {
    double eta = elapsed / (double)(step - step0) * (double)(o->steps - step);
    if (o->time_limit > 0 && eta > o->time_limit - elapsed)
        eta = fmax(0.0, o->time_limit - elapsed);
    fprintf(stderr, "%sstep %ld/%d loss %.4f", tty ? "\r" : "", step, o->steps, sums[0] / nsum);
    const char *nm[5] = {"", "eps", "x0", "mu", "lpips"};
    for (int i = 1; i < 5; i++)
        if (has[i]) fprintf(stderr, " %s %.4f", nm[i], sums[i] / nsum);
    fprintf(stderr, " | %.2f img/s | %.0fs elapsed, ETA %.0fs%s", ips, elapsed, eta,
            tty ? "   " : "\n");
}

// a message and exit 1 that names the last good checkpoint (saved_step < 0: none)
static void stop_run(const char *why, const char *ckpt, long saved_step) {
    if (saved_step >= 0) fatal("%s; %s (step %ld) is untouched", why, ckpt, saved_step);
    fatal("%s; nothing was saved", why);
}

static void save_or_die(const Trainer *tr, const TrainOpts *o, const char *ckpt, long saved_step) {
    char err[600];
    if (save_checkpoint(tr, o, ckpt, err, sizeof err) != 0) stop_run(err, ckpt, saved_step);
}

// FNV-1a over the bit patterns of the parameters, in order: the autoencoder a
// run was trained with (a checkpoint names it by path and by this)
static uint64_t params_hash(const ParamSet *ps) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < ps->total; i++) {
        uint32_t u;
        memcpy(&u, &ps->data[i], 4);
        for (int b = 0; b < 4; b++) {
            h ^= (u >> (8 * b)) & 0xff;
            h *= 1099511628211ull;
        }
    }
    return h;
}

// Every rank starts from rank 0's state (its initialisation or the
// checkpoint it resumed from): weights, EMA, Adam's moments, step, RNG.
static void trainer_broadcast(Trainer *tr) {
    if (dist_size() == 1) return;
    for (int net = 0; net < (tr->has_phi ? 2 : 1); net++)
        for (int copy = 0; copy < 4; copy++)
            dist_broadcast((float *)copy_data(tr, net, copy),
                           (net ? tr->phi : tr->theta).params.total * sizeof(float),
                           "the broadcast of rank 0's weights");
    long st[3] = {tr->step, tr->adam_theta.step, tr->adam_phi.step};
    dist_broadcast(st, sizeof st, "the broadcast of rank 0's step");
    tr->step = st[0], tr->adam_theta.step = st[1], tr->adam_phi.step = st[2];
    dist_broadcast(&tr->rng, sizeof tr->rng, "the broadcast of rank 0's RNG");
}

// Before a checkpoint: the ranks' weights must be the same bits (the same
// summed gradients and the same Adam step on each); a rank that differs
// from rank 0 stops the run rather than let rank 0's file stand for it.
static void trainer_check_same(const Trainer *tr) {
    if (dist_size() == 1) return;
    uint64_t h[2] = {params_hash(&tr->theta.params),
                     tr->has_phi ? params_hash(&tr->phi.params) : 0}, h0[2];
    memcpy(h0, h, sizeof h);
    dist_broadcast(h0, sizeof h0, "the check that the ranks' weights agree");
    float differs = memcmp(h, h0, sizeof h) != 0;
    if (differs)
        fprintf(stderr, "casdm train: rank %d: the weights differ from rank 0's at step %ld\n",
                dist_rank(), tr->step);
    dist_sum_floats(&differs, 1, "the check that the ranks' weights agree");
    if (differs > 0) {
        if (dist_rank() == 0)
            fprintf(stderr, "casdm train: the ranks' weights diverged at step %ld (see the ranks' "
                            "messages); stopping without saving\n", tr->step);
        dist_abort(1);
    }
}

// What a run writes besides the weights: log.csv (rows of means over
// --log-every steps), the loss plot, the progress line; and which
// checkpoint on disk a failure leaves untouched.
typedef struct {
    char ckpt[4200], log_path[4200], svg_path[4200], title[256];
    FILE *log;
    History hist;         // every logged row, for the plot
    long saved_step;      // the step of the checkpoint on disk this run may replace (-1: none)
    long saved_here;      // the last step this run saved (-1: none)
    long step0;           // the step this run started from
    double t0, t_row;     // start of the run, of the current row
    double sums[5];       // loss, l_eps, l_x0, l_mu, l_lpips summed over the row's steps
    double comm_row;      // dist_comm_seconds() at the start of the row
    int nsum, tty;
    int writer;           // rank 0: writes log.csv, the plot, checkpoints and grids
} Run;

// the output directory, a resume, and log.csv carried over to the resumed
// step (in place or into a new directory)
static void run_open(Run *r, Trainer *tr, const TrainOpts *o) {
    memset(r, 0, sizeof *r);
    r->writer = dist_rank() == 0;
    if (r->writer) make_dir(o->out);
    snprintf(r->ckpt, sizeof r->ckpt, "%s/ckpt.safetensors", o->out);
    snprintf(r->log_path, sizeof r->log_path, "%s/log.csv", o->out);
    snprintf(r->svg_path, sizeof r->svg_path, "%s/loss.svg", o->out);
    snprintf(r->title, sizeof r->title, "casdm train --model %s (%s)", model_name(tr->kind),
             o->data);
    r->saved_step = r->saved_here = -1;
    char from[4200];
    if (o->resume) {
        snprintf(from, sizeof from, "%s/ckpt.safetensors", o->resume);
        load_checkpoint(tr, o, from);
        if (r->writer) fprintf(stderr, "resumed from %s at step %ld\n", from, tr->step);
        if (strcmp(from, r->ckpt) == 0) r->saved_step = tr->step;
        snprintf(from, sizeof from, "%s/log.csv", o->resume);
    }
    trainer_broadcast(tr);
    r->step0 = tr->step;
    r->tty = r->writer && isatty(2);
    if (!r->writer) return;
    carry_log(o->resume ? from : NULL, r->log_path, tr->step, &r->hist, &log_layout_diffusion);
    r->log = fopen(r->log_path, "a");
    if (!r->log) fatal("cannot write '%s': %s", r->log_path, strerror(errno));
}

static int out_of_time(const Run *r, const TrainOpts *o) {
    return o->time_limit > 0 && now_seconds() - r->t0 >= o->time_limit;
}

// a step's losses into the row; at the end of a row: log.csv, the plot, the
// progress line. A step with an evaluation (fd not NAN) ends a row.
static void run_log(Run *r, const TrainOpts *o, long step, const StepLosses *sl, double fd) {
    for (int i = 0; i < LOSS_TERMS; i++) r->sums[i] += sl->has[i] ? sl->v[i] : 0.0;
    r->nsum++;
    if (step % o->log_every != 0 && step != o->steps && !out_of_time(r, o) && isnan(fd)) return;
    double now = now_seconds(), ips = (double)r->nsum * o->batch / (now - r->t_row);
    if (!r->writer) {  // (another rank: rank 0 writes the row)
        memset(r->sums, 0, sizeof r->sums);
        r->nsum = 0;
        r->t_row = now;
        return;
    }
    log_row(r->log, r->log_path, step, r->sums, r->nsum, sl->has, ips, fd);
    double row[HISTORY_COLS];
    for (int i = 0; i < PLOT_TERMS; i++) row[i] = sl->has[i] ? r->sums[i] / r->nsum : NAN;
    row[HISTORY_FD] = fd;
    history_add(&r->hist, step, row);
    char err[600];
    if (write_loss_svg(r->svg_path, &r->hist, NULL, 1, r->title, err, sizeof err) != 0)
        fatal("%s", err);
    progress_line(o, step, r->step0, now - r->t0, ips, r->sums, r->nsum, sl->has, r->tty);
    if (dist_size() > 1 && !r->tty)
        fprintf(stderr, "  (%d ranks: %.1f ms a step in their collectives)\n", dist_size(),
                1e3 * (dist_comm_seconds() - r->comm_row) / r->nsum);
    r->comm_row = dist_comm_seconds();
    memset(r->sums, 0, sizeof r->sums);
    r->nsum = 0;
    r->t_row = now;
}

static void run_save(Run *r, const Trainer *tr, const TrainOpts *o) {
    trainer_check_same(tr);
    if (r->writer) save_or_die(tr, o, r->ckpt, r->saved_step);
    r->saved_step = r->saved_here = tr->step;
}

// --keep-every: DIR/ckpt_STEP.safetensors, a whole checkpoint (resumable,
// the EMA in it) that later saves leave alone: the paper reports the best of
// its evaluated checkpoints, which a single rolling file cannot give
static void run_keep(Run *r, const Trainer *tr, const TrainOpts *o) {
    char path[4200], err[600];
    if (!r->writer) return;
    snprintf(path, sizeof path, "%s/ckpt_%06ld.safetensors", o->out, tr->step);
    if (save_checkpoint(tr, o, path, err, sizeof err) != 0) stop_run(err, r->ckpt, r->saved_step);
}

static void run_close(Run *r) {
    if (r->hist.n) fprintf(stderr, "loss plot: %s\n", r->svg_path);
    history_free(&r->hist);
    if (r->log) fclose(r->log);
}

// the networks the sample grids use (the EMA weights are copied in for each grid)
static void ema_model_init(Model *ema, const Trainer *tr, const TrainOpts *o) {
    memset(ema, 0, sizeof *ema);
    ema->kind = tr->kind;
    ema->has_phi = tr->has_phi;
    ema->clip_x0 = !o->no_clip_x0;
    if (o->sample_n <= 0 && o->eval_every <= 0) return;  // no sampling in this run
    unet_init(&ema->theta, &tr->theta_cfg, 0, NULL);
    if (tr->has_phi) unet_init(&ema->phi, &tr->phi_cfg, 0, NULL);
}

static void ema_model_free(Model *ema, const TrainOpts *o) {
    if (o->sample_n <= 0 && o->eval_every <= 0) return;
    unet_free(&ema->theta);
    if (ema->has_phi) unet_free(&ema->phi);
}

// the options that no single option's range can check; the LPIPS file
// first, so that a bad one is an error before anything slow
static int check_train_options(const TrainOpts *o, Lpips *lpips) {
    if (!o->data) {
        fprintf(stderr, "casdm train: --data is required (see casdm train --help)\n");
        return 2;
    }
    if (o->flip && o->no_flip) {
        fprintf(stderr, "casdm train: --flip and --no-flip contradict each other\n");
        return 2;
    }
    if (o->eval_every > 0 && !o->eval_features) {
        fprintf(stderr, "casdm train: --eval-every needs --eval-features (a classifier from casdm "
                        "train-classifier, or Inception weights)\n");
        return 2;
    }
    if (o->lpips) {
        char err[512];
        lpips_init(lpips);
        lpips->size = o->lpips_size;
        if (lpips_load(lpips, o->lpips, err, sizeof err) != 0) fatal("--lpips: %s", err);
    }
    return 0;
}

// ---------------------------------------------------------------------------
// ---- casdm train-classifier --data PATH [--labels PATH] --out FILE ----
// fid.c's FD-classifier network trained with Adam on cross-entropy; the
// test accuracy is printed when --test-data is given
// ---------------------------------------------------------------------------
static Option clf_opts_table[12];
static int clf_opts_n;

static void clf_help(FILE *f) {
    fputs(
        "usage: casdm train-classifier --data PATH [--labels PATH] --out clf.safetensors [options]\n\n"
        "Trains the small CNN whose penultimate features `casdm fid --features` uses (the\n"
        "FD-classifier). --data: an IDX image file with --labels its IDX label file\n"
        "(train-labels-idx1-ubyte), or CIFAR-10 (labels from the records).\n\noptions:\n",
        f);
    usage_options(f, clf_opts_table, clf_opts_n);
}

// the labels of a data set: from --labels (IDX) or the data's own (CIFAR)
static void attach_labels(Dataset *d, const char *labels, const char *flag) {
    if (labels) {
        char err[600];
        size_t size;
        unsigned char *b = read_file(labels, DATA_MAX_FILE, &size, err, sizeof err);
        if (!b || idx_labels_decode(b, size, labels, &d->img, err, sizeof err) != 0)
            fatal("%s: %s", flag, err);
        free(b);
    }
    if (!d->img.labels)
        fatal("'%s' has no labels: give them with %s (an IDX label file)", d->source, flag);
    for (int i = 0; i < d->img.n; i++)
        if (d->img.labels[i] >= CLF_CLASSES)
            fatal("%s: label %d of image %d is outside 0..%d", labels ? labels : d->source,
                  d->img.labels[i], i, CLF_CLASSES - 1);
}

// images idx[0..B) of im -> x (B, C, S, S) in [-1, 1] and their labels
static void classifier_batch(const Images *im, const int *idx, int B, float *x, int *labels) {
    size_t per = (size_t)im->c * im->h * im->w;
    for (int b = 0; b < B; b++) {
        const unsigned char *src = im->pixels + (size_t)idx[b] * per;
        for (size_t k = 0; k < per; k++) x[(size_t)b * per + k] = src[k] / 127.5f - 1.0f;
        if (labels) labels[b] = im->labels[idx[b]];
    }
}

// the share of the first n images of im the classifier labels right
static double classifier_accuracy(Classifier *c, const Images *im, int n) {
    Graph g;
    graph_init(&g, 0, 0);
    g.grad_enabled = 0;
    int B = 100, right = 0, shape[4] = {0, im->c, im->h, im->w};
    float *x = mallocCheck((size_t)B * im->c * im->h * im->w * sizeof(float));
    int *idx = mallocCheck((size_t)B * sizeof(int)), *lab = mallocCheck((size_t)B * sizeof(int));
    for (int i0 = 0; i0 < n; i0 += B) {
        int nb = n - i0 < B ? n - i0 : B;
        for (int b = 0; b < nb; b++) idx[b] = i0 + b;
        classifier_batch(im, idx, nb, x, lab);
        graph_reset(&g);
        shape[0] = nb;
        Tensor *logits = classifier_forward(&g, c, tensor_from(&g, 4, shape, x), NULL);
        for (int b = 0; b < nb; b++) {
            const float *l = logits->data + (size_t)b * CLF_CLASSES;
            int best = 0;
            for (int k = 1; k < CLF_CLASSES; k++) best = l[k] > l[best] ? k : best;
            right += best == lab[b];
        }
    }
    graph_free(&g);
    free(x); free(idx); free(lab);
    return n ? (double)right / n : 0.0;
}

static int cmd_train_classifier(int argc, char **argv) {
    const char *data_path = NULL, *labels = NULL, *out = NULL, *test_data = NULL,
               *test_labels = NULL;
    int steps, batch, seed, test_n;
    double lr;
    const Option opts[] = {
        {"--data", OPT_STR, &data_path, NULL, "training images (IDX or CIFAR-10)", 0, 0},
        {"--labels", OPT_STR, &labels, NULL, "their IDX label file (IDX data)", 0, 0},
        {"--out", OPT_STR, &out, NULL, "the classifier to write (safetensors)", 0, 0},
        {"--steps", OPT_INT, &steps, "2000", "Adam steps", 1, 10000000},
        {"--batch", OPT_INT, &batch, "64", "images per step", 1, 4096},
        {"--lr", OPT_FLOAT, &lr, "1e-3", "Adam learning rate, decayed linearly to 0", 1e-8, 1.0},
        {"--seed", OPT_INT, &seed, "0", "initialisation and batch seed", 0, 2147483647},
        {"--test-data", OPT_STR, &test_data, NULL, "held-out images for the accuracy", 0, 0},
        {"--test-labels", OPT_STR, &test_labels, NULL, "their IDX label file", 0, 0},
        {"--test-n", OPT_INT, &test_n, "0", "score only the first N held-out images (0: all)",
         0, 1e9},
    };
    clf_opts_n = (int)(sizeof opts / sizeof opts[0]);
    memcpy(clf_opts_table, opts, sizeof opts);
    int pr = parse_options("train-classifier", clf_opts_table, clf_opts_n, argc, argv, clf_help);
    if (pr) return PARSED_EXIT(pr);
    if (!data_path || !out) {
        fprintf(stderr, "casdm train-classifier: --data and --out are required\n");
        return 2;
    }
    Dataset d, td;
    load_dataset(&d, data_path);
    attach_labels(&d, labels, "--labels");
    const Images *im = &d.img;
    if (im->h != im->w || im->h % 4 || im->h > 1024)
        fatal("--data '%s': images are %dx%d; square, a multiple of 4", data_path, im->h, im->w);
    if (test_data) {
        data_label = "--test-data";
        load_dataset(&td, test_data);
        attach_labels(&td, test_labels, "--test-labels");
        if (td.img.c != im->c || td.img.h != im->h || td.img.w != im->w)
            fatal("--test-data '%s' has %dx%dx%d images, --data %dx%dx%d", test_data, td.img.c,
                  td.img.h, td.img.w, im->c, im->h, im->w);
    }
    Classifier c;
    Rng rng;
    rng_seed(&rng, (uint64_t)seed, 7);
    classifier_init(&c, im->c, im->h);
    classifier_init_random(&c, &rng);
    Adam adam;
    adam_init(&adam, c.params.total, (float)lr);
    Graph g;
    graph_init(&g, 0, 0);
    size_t per = (size_t)im->c * im->h * im->w;
    float *x = mallocCheck((size_t)batch * per * sizeof(float));
    int *idx = mallocCheck((size_t)batch * sizeof(int)), *lab = mallocCheck((size_t)batch * sizeof(int));
    int shape[4] = {batch, im->c, im->h, im->w};
    Progress prog;
    progress_start(&prog, isatty(2));
    double loss_avg = 0.0;
    char what[96];
    for (int step = 1; step <= steps && !interrupted; step++) {
        for (int b = 0; b < batch; b++) idx[b] = (int)rng_below(&rng, (uint32_t)im->n);
        classifier_batch(im, idx, batch, x, lab);
        graph_reset(&g);
        Tensor *logits = classifier_forward(&g, &c, tensor_from(&g, 4, shape, x), NULL);
        Tensor *loss = cross_entropy(&g, logits, lab);
        params_zero_grad(&c.params);
        graph_backward(&g, loss, NULL);
        adam.lr = (float)(lr * (1.0 - (step - 1.0) / steps));  // linear decay to 0
        adam_step(&adam, c.params.data, c.params.grad);
        loss_avg = step == 1 ? loss->data[0] : 0.98 * loss_avg + 0.02 * loss->data[0];
        snprintf(what, sizeof what, "step %d/%d, loss %.4f", step, steps, loss_avg);
        progress_show(&prog, "img", (double)step * batch, (double)steps * batch, what);
    }
    progress_end(&prog);
    graph_free(&g);
    char err[600];
    if (classifier_save(&c, out, err, sizeof err) != 0) fatal("--out: %s", err);
    printf("wrote %s (%d steps of %d, loss %.4f)\n", out, steps, batch, loss_avg);
    if (test_data) {
        int n = test_n > 0 && test_n < td.img.n ? test_n : td.img.n;
        printf("test accuracy %.2f%% (%d images of %s)\n", 100.0 * classifier_accuracy(&c, &td.img, n),
               n, test_data);
        images_free(&td.img);
    }
    fflush(stdout);
    free(x); free(idx); free(lab);
    adam_free(&adam);
    classifier_free(&c);
    images_free(&d.img);
    return interrupted ? interrupted_status() : 0;
}

// ---------------------------------------------------------------------------
// ---- casdm fid SAMPLES [REF] --weights FILE ----
// Each side is images (a samples .npz with arr_0 uint8 (N,H,W[,C]), a
// CIFAR-10 directory or .bin, an IDX file, an image folder) or statistics
// (an .npz with mu and sigma, pytorch-fid's --save-stats layout, and
// optionally mu_s / sigma_s for sFID, guided-diffusion's reference batches).
// ---------------------------------------------------------------------------
static Option fid_opts_table[8];
static int fid_opts_n;

static void fid_help(FILE *f) {
    fputs(
        "usage: casdm fid SAMPLES [REF] --weights inception.safetensors [options]\n\n"
        "Prints FID and sFID between SAMPLES and REF and the inception score of SAMPLES, as\n"
        "pytorch-fid / guided-diffusion's evaluator compute them (Inception-v3 with the FID\n"
        "weights, images resized to 299x299). Each side is a samples .npz (arr_0, uint8\n"
        "(N,H,W,C), as casdm sample writes), a CIFAR-10 directory or .bin file, an IDX file, a\n"
        "folder of PNG/PPM/PGM images, or a statistics .npz (mu, sigma [, mu_s, sigma_s]).\n"
        "Grey images are repeated to three channels. Weights: tools/convert_inception.py.\n\n"
        "options:\n",
        f);
    usage_options(f, fid_opts_table, fid_opts_n);
}

typedef struct {
    const char *path;
    int have_spatial;           // mu_s / sigma_s known
    double *mu, *sigma, *mu_s, *sigma_s;
    int d;                      // feature dimensions of mu
    long n;                     // images scored (0 for a statistics file)
    float *logits;              // (n, 1008), for the inception score
} FidSide;

static int is_stats_npz(const char *path) {
    return ends_with(path, ".npz") && npz_has(path, "mu");
}

// mu (d) and sigma (d, d) from a statistics file; d = 0 asks for any size
static void read_stats_pair(const char *path, const char *mu_name, const char *sigma_name, int d,
                            double **mu, double **sigma, int *dim) {
    NpzArray m, s;
    char err[600];
    if (npz_read(path, mu_name, &m, err, sizeof err) != 0) fatal("%s", err);
    if (npz_read(path, sigma_name, &s, err, sizeof err) != 0) fatal("%s", err);
    if (m.kind == NPY_U8 || s.kind == NPY_U8)
        fatal("'%s': %s and %s must be float arrays", path, mu_name, sigma_name);
    if (m.ndim != 1 || m.shape[0] < 1 || m.shape[0] > 65536)
        fatal("'%s': %s must be a vector, not of %d dimension(s)", path, mu_name, m.ndim);
    int n = (int)m.shape[0];
    if (s.ndim != 2 || s.shape[0] != n || s.shape[1] != n)
        fatal("'%s': %s must be %dx%d to match %s", path, sigma_name, n, n, mu_name);
    if (d && n != d)
        fatal("'%s': %s has %d dimensions, the features have %d", path, mu_name, n, d);
    *mu = m.f64;
    *sigma = s.f64;
    m.f64 = s.f64 = NULL;
    *dim = n;
    npz_free(&m);
    npz_free(&s);
}

// images of one side -> uint8 (n, c, h, w); an npz's arr_0 is (N,H,W[,C])
static void load_fid_images(const char *path, Images *im) {
    memset(im, 0, sizeof *im);
    if (!ends_with(path, ".npz")) {
        Dataset d;
        load_dataset(&d, path);
        *im = d.img;
        return;
    }
    NpzArray a;
    char err[600];
    if (npz_read(path, "arr_0", &a, err, sizeof err) != 0) fatal("%s", err);
    int C = a.ndim == 4 ? (int)a.shape[3] : 1;
    if (a.kind != NPY_U8 || (a.ndim != 3 && a.ndim != 4) || (C != 1 && C != 3))
        fatal("'%s': arr_0 must be uint8 (N, H, W) or (N, H, W, 1 or 3)", path);
    if (a.shape[1] < 1 || a.shape[2] < 1 || a.shape[1] > IMAGE_MAX_SIDE ||
        a.shape[2] > IMAGE_MAX_SIDE || a.shape[0] > 0x7fffffff)
        fatal("'%s': arr_0 has a bad shape", path);
    im->n = (int)a.shape[0], im->h = (int)a.shape[1], im->w = (int)a.shape[2], im->c = C;
    size_t hw = (size_t)im->h * im->w;
    im->pixels = mallocCheck(a.count ? a.count : 1);
    for (int i = 0; i < im->n; i++)  // HWC -> CHW
        for (int c = 0; c < C; c++)
            for (size_t p = 0; p < hw; p++)
                im->pixels[((size_t)i * C + c) * hw + p] = a.u8[((size_t)i * hw + p) * C + c];
    npz_free(&a);
}

// Inception features of every image of one side, streamed into the statistics
// the features of the first B images from `first` of im with the classifier
// (at the images' own size, in [-1, 1]; grey repeated for a colour network)
static void classifier_features(Classifier *c, const Images *im, long first, int B, float *x,
                                float *out) {
    int S = c->size, C = c->channels;
    size_t hw = (size_t)S * S;
    for (int b = 0; b < B; b++)
        for (int ch = 0; ch < C; ch++) {
            const unsigned char *src =
                im->pixels + ((size_t)(first + b) * im->c + (im->c == C ? ch : 0)) * hw;
            for (size_t p = 0; p < hw; p++) x[((size_t)b * C + ch) * hw + p] = src[p] / 127.5f - 1.0f;
        }
    Graph g;
    graph_init(&g, 0, 0);
    g.grad_enabled = 0;
    int shape[4] = {B, C, S, S};
    Tensor *f;
    classifier_forward(&g, c, tensor_from(&g, 4, shape, x), &f);
    memcpy(out, f->data, (size_t)B * CLF_FEATURES * sizeof(float));
    graph_free(&g);
}

static void images_stats(FidSide *side, const Images *imp, const Inception *net, Classifier *clf,
                         int batch, int want_logits, long n);

static void score_images(FidSide *side, const Inception *net, Classifier *clf, int batch,
                         int want_logits, int limit) {
    Images im;
    load_fid_images(side->path, &im);
    long n = im.n;
    if (limit > 0 && limit < n) n = limit;
    images_stats(side, &im, net, clf, batch, want_logits, n);
    images_free(&im);
}

// the statistics of the first n images of im: the classifier's features, or
// Inception's pool_3 and sFID features (and logits for IS when asked)
static void images_stats(FidSide *side, const Images *imp, const Inception *net, Classifier *clf,
                         int batch, int want_logits, long n) {
    const Images im = *imp;
    if (n < 2) fatal("'%s': %ld image(s); a covariance needs at least 2", side->path, n);
    if (clf && (im.h != clf->size || im.w != clf->size || (im.c == 3 && clf->channels == 1)))
        fatal("'%s' has %dx%dx%d images; the classifier (--features) takes %dx%dx%d", side->path,
              im.c, im.h, im.w, clf->channels, clf->size, clf->size);
    size_t hw = (size_t)im.h * im.w;
    // Several ranks: batch k is rank k mod K's; a round's K batches of
    // features are merged into every rank, which adds them to the statistics
    // in order, so the sums are those of one process.
    int K = dist_size(), me = dist_rank();
    long round = (long)K * batch;
    if (clf) {  // FD-classifier: the 128 penultimate features, no sFID, no IS
        float *x = mallocCheck((size_t)batch * clf->channels * hw * sizeof(float));
        float *f = mallocCheck((size_t)K * batch * CLF_FEATURES * sizeof(float));
        FeatStats fs;
        featstats_init(&fs, CLF_FEATURES);
        for (long r0 = 0; r0 < n && !interrupted; r0 += round) {
            long mine = r0 + (long)me * batch;
            memset(f, 0, (size_t)K * batch * CLF_FEATURES * sizeof(float));
            if (mine < n)
                classifier_features(clf, &im, mine, n - mine < batch ? (int)(n - mine) : batch, x,
                                    f + (size_t)me * batch * CLF_FEATURES);
            dist_merge_bytes((unsigned char *)f, (size_t)K * batch * CLF_FEATURES * sizeof(float),
                             "the gathering of the classifier's features");
            for (long done = r0; done < n && done < r0 + round; done += batch)
                featstats_add(&fs, f + (size_t)(done - r0) * CLF_FEATURES,
                              n - done < batch ? (int)(n - done) : batch);
        }
        if (interrupted) fatal("fid: interrupted");
        side->n = n;
        side->d = CLF_FEATURES;
        side->mu = mallocCheck(CLF_FEATURES * sizeof(double));
        side->sigma = mallocCheck((size_t)CLF_FEATURES * CLF_FEATURES * sizeof(double));
        featstats_result(&fs, side->mu, side->sigma);
        featstats_free(&fs);
        free(x);
        free(f);
        return;
    }
    float *x = mallocCheck((size_t)batch * 3 * hw * sizeof(float));
    float *pool3 = mallocCheck((size_t)round * INCEPTION_POOL * sizeof(float));
    float *spatial = mallocCheck((size_t)round * INCEPTION_SPATIAL * sizeof(float));
    side->logits = want_logits ? callocCheck((size_t)n * INCEPTION_LOGITS, sizeof(float)) : NULL;
    FeatStats fs, ss;
    featstats_init(&fs, INCEPTION_POOL);
    featstats_init(&ss, INCEPTION_SPATIAL);
    Progress pr;
    progress_start(&pr, side->path ? isatty(2) : -1);
    char what[64];
    snprintf(what, sizeof what, "Inception on %.40s", side->path ? side->path : "");
    for (long r0 = 0; r0 < n && !interrupted; r0 += round) {
        long done = r0 + (long)me * batch;
        int B = done >= n ? 0 : n - done < batch ? (int)(n - done) : batch;
        memset(pool3, 0, (size_t)round * INCEPTION_POOL * sizeof(float));
        memset(spatial, 0, (size_t)round * INCEPTION_SPATIAL * sizeof(float));
        for (int b = 0; b < B; b++)  // uint8 -> [0, 1] as ToTensor; grey to three channels
            for (int c = 0; c < 3; c++) {
                const unsigned char *src =
                    im.pixels + ((size_t)(done + b) * im.c + (im.c == 3 ? c : 0)) * hw;
                float *dst = x + ((size_t)b * 3 + c) * hw;
                for (size_t p = 0; p < hw; p++) dst[p] = src[p] / 255.0f;
            }
        if (B > 0)
            inception_forward(net, x, B, im.h, im.w, pool3 + (size_t)me * batch * INCEPTION_POOL,
                              spatial + (size_t)me * batch * INCEPTION_SPATIAL,
                              side->logits ? side->logits + (size_t)done * INCEPTION_LOGITS
                                           : NULL);
        dist_merge_bytes((unsigned char *)pool3, (size_t)round * INCEPTION_POOL * sizeof(float),
                         "the gathering of the Inception features");
        dist_merge_bytes((unsigned char *)spatial,
                         (size_t)round * INCEPTION_SPATIAL * sizeof(float),
                         "the gathering of the Inception features");
        long end = r0 + round < n ? r0 + round : n;
        for (long b0 = r0; b0 < end; b0 += batch) {  // batch by batch, as one process adds them
            int nb = end - b0 < batch ? (int)(end - b0) : batch;
            featstats_add(&fs, pool3 + (size_t)(b0 - r0) * INCEPTION_POOL, nb);
            featstats_add(&ss, spatial + (size_t)(b0 - r0) * INCEPTION_SPATIAL, nb);
        }
        progress_show(&pr, "img", (double)end, (double)n, what);
    }
    progress_end(&pr);
    if (side->logits)
        dist_merge_bytes((unsigned char *)side->logits, (size_t)n * INCEPTION_LOGITS * sizeof(float),
                         "the gathering of the Inception logits");
    if (interrupted) fatal("fid: interrupted");
    side->n = n;
    side->d = INCEPTION_POOL;
    side->have_spatial = 1;
    side->mu = mallocCheck(INCEPTION_POOL * sizeof(double));
    side->sigma = mallocCheck((size_t)INCEPTION_POOL * INCEPTION_POOL * sizeof(double));
    side->mu_s = mallocCheck(INCEPTION_SPATIAL * sizeof(double));
    side->sigma_s = mallocCheck((size_t)INCEPTION_SPATIAL * INCEPTION_SPATIAL * sizeof(double));
    featstats_result(&fs, side->mu, side->sigma);
    featstats_result(&ss, side->mu_s, side->sigma_s);
    featstats_free(&fs);
    featstats_free(&ss);
    free(x);
    free(pool3);
    free(spatial);
}

static void load_fid_side(FidSide *side, const char *path, const Inception *net, Classifier *clf,
                          int batch, int want_logits, int limit) {
    memset(side, 0, sizeof *side);
    side->path = path;
    if (is_stats_npz(path)) {
        read_stats_pair(path, "mu", "sigma", 0, &side->mu, &side->sigma, &side->d);
        if (npz_has(path, "mu_s")) {
            int ds;
            read_stats_pair(path, "mu_s", "sigma_s", 0, &side->mu_s, &side->sigma_s, &ds);
            side->have_spatial = ds == INCEPTION_SPATIAL;
            if (!side->have_spatial)
                fatal("'%s': mu_s has %d dimensions, sFID's features have %d", path, ds,
                      INCEPTION_SPATIAL);
        }
        return;
    }
    if (!net && !clf) fatal("fid: '%s' holds images: --weights or --features is needed", path);
    score_images(side, net, clf, batch, want_logits, limit);
}

static void free_fid_side(FidSide *s) {
    free(s->mu); free(s->sigma); free(s->mu_s); free(s->sigma_s); free(s->logits);
}

static int cmd_fid(int argc, char **argv) {
    const char *weights = NULL, *save_stats = NULL, *features = NULL;
    int batch, limit, splits;
    const Option opts[] = {
        {"--weights", OPT_STR, &weights, NULL,
         "Inception-v3 FID weights (safetensors from tools/convert_inception.py)", 0, 0},
        {"--features", OPT_STR, &features, NULL,
         "a classifier from casdm train-classifier: FD in its 128 features instead", 0, 0},
        {"--save-stats", OPT_STR, &save_stats, NULL,
         "write SAMPLES' mu, sigma, mu_s, sigma_s (float64) to this .npz", 0, 0},
        {"--batch", OPT_INT, &batch, "50", "images per Inception forward", 1, 4096},
        {"--n", OPT_INT, &limit, "0", "score only the first N images of each side (0: all)", 0,
         1e9},
        {"--splits", OPT_INT, &splits, "10", "inception score splits", 1, 1000},
    };
    fid_opts_n = (int)(sizeof opts / sizeof opts[0]);
    memcpy(fid_opts_table, opts, sizeof opts);
    const char *files[2];
    int nf = 0, nr = 0;
    char *rest[32];
    for (int i = 0; i < argc; i++) {  // positional names; every option here takes a value
        int is_value = i > 0 && argv[i - 1][0] == '-' && strcmp(argv[i - 1], "--help") != 0;
        if (argv[i][0] != '-' && !is_value) {
            if (nf == 2) {
                fprintf(stderr, "casdm fid: more than two inputs ('%s')\n", argv[i]);
                return 2;
            }
            files[nf++] = argv[i];
        } else if (nr < 32) {
            rest[nr++] = argv[i];
        }
    }
    int pr = parse_options("fid", fid_opts_table, fid_opts_n, nr, rest, fid_help);
    if (pr) return PARSED_EXIT(pr);
    if (nf == 0 || (nf == 1 && !save_stats)) {
        fprintf(stderr, "casdm fid: needs SAMPLES and REF, or SAMPLES and --save-stats "
                        "(see casdm fid --help)\n");
        return 2;
    }
    data_label = "casdm fid";
    Inception net;
    Classifier clf;
    char err[600];
    int have_net = 0, have_clf = 0, dim = INCEPTION_POOL;
    if (weights && features) {
        fprintf(stderr, "casdm fid: --weights or --features, not both\n");
        return 2;
    }
    if (weights) {
        if (inception_load(&net, weights, err, sizeof err) != 0) fatal("--weights: %s", err);
        have_net = 1;
    } else if (features) {
        if (classifier_load(&clf, features, err, sizeof err) != 0) fatal("--features: %s", err);
        have_clf = 1;
        dim = CLF_FEATURES;
    } else if (!is_stats_npz(files[0]) || (nf == 2 && !is_stats_npz(files[1]))) {
        fprintf(stderr, "casdm fid: --weights (or --features) is needed to score images (see "
                        "casdm fid --help)\n");
        return 2;
    }
    FidSide side[2];
    int stats[2] = {0, 0};
    for (int k = 0; k < nf; k++) stats[k] = is_stats_npz(files[k]);
    for (int k = 0; k < nf; k++)  // statistics first: a mismatch is found before any scoring
        if (stats[k]) load_fid_side(&side[k], files[k], NULL, NULL, batch, 0, limit);
    for (int k = 0; k < nf; k++)
        if (stats[k] && side[k].d != dim && nf == 2 && !stats[1 - k])
            fatal("'%s' has %d-dimensional statistics, %s %d: not the same features", files[k],
                  side[k].d, have_clf ? "the classifier's features" : "Inception's pool_3", dim);
    for (int k = 0; k < nf; k++)
        if (!stats[k])
            load_fid_side(&side[k], files[k], have_net ? &net : NULL, have_clf ? &clf : NULL,
                          batch, k == 0 && !have_clf, limit);
    int rc = 0;
    int report = dist_rank() == 0;  // (every rank has the statistics; rank 0 reports)
    if (save_stats && report) {
        if (!side[0].have_spatial && side[0].n == 0 && !side[0].mu_s && !have_clf)
            fprintf(stderr, "casdm fid: '%s' has no sFID statistics; writing mu and sigma only\n",
                    files[0]);
        int64_t d = side[0].d, ds = INCEPTION_SPATIAL;
        NpzWrite w[4] = {{"mu", NPY_F64, 1, {d}, side[0].mu},
                         {"sigma", NPY_F64, 2, {d, d}, side[0].sigma},
                         {"mu_s", NPY_F64, 1, {ds}, side[0].mu_s},
                         {"sigma_s", NPY_F64, 2, {ds, ds}, side[0].sigma_s}};
        if (npz_write(save_stats, w, side[0].have_spatial ? 4 : 2, err, sizeof err) != 0)
            fatal("--save-stats: %s", err);
        fprintf(stderr, "casdm fid: wrote %s (%ld images)\n", save_stats, side[0].n);
    }
    if (nf == 2 && report) {
        if (side[0].d != side[1].d)
            fatal("'%s' has %d-dimensional statistics, '%s' %d-dimensional: not the same features",
                  files[0], side[0].d, files[1], side[1].d);
        double fid, sfid;
        if (frechet_distance(side[0].mu, side[0].sigma, side[1].mu, side[1].sigma, side[0].d,
                             &fid) != 0)
            fatal("fid: the eigenvalue iteration did not converge");
        int clf_stats = side[0].d == CLF_FEATURES;
        printf("%s %.4f\n", clf_stats ? "FD-classifier" : "FID  ", fid);
        if (side[0].have_spatial && side[1].have_spatial &&
            frechet_distance(side[0].mu_s, side[0].sigma_s, side[1].mu_s, side[1].sigma_s,
                             INCEPTION_SPATIAL, &sfid) == 0)
            printf("sFID  %.4f\n", sfid);
        else if (!clf_stats)
            printf("sFID  n/a (a statistics file without mu_s / sigma_s)\n");
    }
    if (side[0].logits && report) {
        double mean, std;
        if (side[0].n >= splits &&
            inception_score(side[0].logits, (int)side[0].n, INCEPTION_LOGITS, splits, &mean,
                            &std) == 0)
            printf("IS    %.4f +- %.4f (%d splits of %ld images)\n", mean, std, splits,
                   side[0].n);
        else
            printf("IS    n/a (%ld images for %d splits)\n", side[0].n, splits);
    }
    fflush(stdout);
    for (int k = 0; k < nf; k++) free_fid_side(&side[k]);
    if (have_net) inception_free(&net);
    if (have_clf) classifier_free(&clf);
    return rc;
}


// ---------------------------------------------------------------------------
// ---- training-time evaluation: --eval-every N --eval-n M --eval-features FILE ----
// M samples of the EMA weights (DDIM, --sample-steps, a fixed seed) scored
// every N steps against the training data (its first --eval-ref-n images)
// in the features of FILE: a classifier (FD-classifier) or Inception (FID).
// The score goes into the fd column of that step's row of DIR/log.csv (and
// so into the plot); the best step's checkpoint is DIR/ckpt_best.safetensors
// (Cas-DM reports the best evaluated checkpoint).
// ---------------------------------------------------------------------------
typedef struct {
    Inception net;
    Classifier clf;
    int is_clf;
    FidSide ref;
    double best;
    char best_path[4200];
} TrainEval;

// hist: the rows of log.csv carried over from a resumed run (their best fd)
static void train_eval_open(TrainEval *e, const TrainOpts *o, const Images *data,
                            const History *hist) {
    memset(e, 0, sizeof *e);
    StFile f;
    char err[600], fmt[64] = "";
    if (st_read(o->eval_features, &f, err, sizeof err) != 0) fatal("--eval-features: %s", err);
    st_meta(&f, "format", fmt, sizeof fmt);
    st_free(&f);
    e->is_clf = strcmp(fmt, "casdm-classifier-1") == 0;
    if (e->is_clf ? classifier_load(&e->clf, o->eval_features, err, sizeof err)
                  : inception_load(&e->net, o->eval_features, err, sizeof err))
        fatal("--eval-features: %s", err);
    if (e->is_clf && (e->clf.size != data->h || e->clf.channels != data->c))
        fatal("--eval-features: the classifier takes %dx%dx%d images; --data has %dx%dx%d",
              e->clf.channels, e->clf.size, e->clf.size, data->c, data->h, data->w);
    long n = data->n < o->eval_ref_n ? data->n : o->eval_ref_n;
    if (dist_rank() == 0) fprintf(stderr, "eval: reference statistics of %ld training images\n", n);
    images_stats(&e->ref, data, e->is_clf ? NULL : &e->net, e->is_clf ? &e->clf : NULL, 50, 0, n);
    snprintf(e->best_path, sizeof e->best_path, "%s/ckpt_best.safetensors", o->out);
    e->best = INFINITY;
    for (size_t i = 0; i < hist->n; i++) {
        double v = hist->v[i * HISTORY_COLS + HISTORY_FD];
        if (v < e->best) e->best = v;  // (false for NAN)
    }
}

// the score of the EMA weights now; NAN when the samples were not finite
static double train_eval_run(TrainEval *e, Trainer *tr, Model *ema, const TrainOpts *o, int C,
                             int S, int tty) {
    Schedule rs;
    SampleConfig sc = ema_sampler(tr, ema, o, &rs);
    char err[600];
    Rng rng;
    rng_seed(&rng, (uint64_t)o->seed, 11);  // the same noise at every evaluation
    size_t hw = (size_t)S * S;
    unsigned char *hwc = mallocCheck((size_t)o->eval_n * C * hw);
    int rc = sample_images(ema, &sc, &rs, &rng, o->eval_n, 50, hwc, tty ? 1 : 0);
    schedule_free(&rs);
    if (rc != 0) {
        free(hwc);
        if (rc == 1 && dist_rank() == 0)
            fprintf(stderr, "eval: NaN or Inf pixels at step %ld; not scored\n", tr->step);
        return NAN;
    }
    Images im = {o->eval_n, C, S, S, mallocCheck((size_t)o->eval_n * C * hw), NULL};
    for (int i = 0; i < im.n; i++)  // (N,H,W,C) -> (N,C,H,W)
        for (int c = 0; c < C; c++)
            for (size_t p = 0; p < hw; p++)
                im.pixels[((size_t)i * C + c) * hw + p] = hwc[((size_t)i * hw + p) * C + c];
    free(hwc);
    FidSide side = {0};
    images_stats(&side, &im, e->is_clf ? NULL : &e->net, e->is_clf ? &e->clf : NULL, 50, 0, im.n);
    images_free(&im);
    double fd;
    if (frechet_distance(side.mu, side.sigma, e->ref.mu, e->ref.sigma, side.d, &fd) != 0)
        fatal("eval: the eigenvalue iteration did not converge");
    free_fid_side(&side);
    // (every rank scores the same merged samples; rank 0 reports and saves)
    int better = fd < e->best;
    if (dist_rank() == 0)
        fprintf(stderr, "eval: step %ld, %s %.4f%s\n", tr->step,
                e->is_clf ? "FD-classifier" : "FID", fd, better ? " (best so far)" : "");
    if (better) {
        trainer_check_same(tr);
        e->best = fd;
        if (dist_rank() == 0 && save_checkpoint(tr, o, e->best_path, err, sizeof err) != 0)
            fatal("eval: %s", err);
    }
    return fd;
}

static void train_eval_close(TrainEval *e) {
    free_fid_side(&e->ref);
    if (e->is_clf) classifier_free(&e->clf);
    else inception_free(&e->net);
}

static int cmd_train_gan(int argc, char **argv);

// --preset cifar10-paper: Sec. 5 of the paper ("the default U-Net
// architecture with 128 channels, 3 ResNet blocks", 4000 cosine steps, batch
// 16 on each of 8 GPUs, lr 1e-4 without decay, 400k iterations, evaluated
// every 20k) and, where it is silent, improved-diffusion's CIFAR-10 recipe
// (dropout 0.3) and default U-Net (attention at 16 and 8, 4 heads) and EMA
// (0.9999, no warm-up). The values become the options' defaults, so a flag
// given beside the preset wins.
static const char *const preset_cifar10_paper[][2] = {
    {"--ch", "128"},      {"--res", "3"},          {"--attn", "16,8"},  {"--heads", "4"},
    {"--dropout", "0.3"}, {"--T", "4000"},         {"--schedule", "cosine"},
    {"--batch", "128"},   {"--lr", "1e-4"},        {"--ema", "0.9999"}, {"--ema-warmup", "off"},
    {"--steps", "400000"}, {"--keep-every", "20000"},
};

static int apply_preset(Option *table, int n, int argc, char **argv) {
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--preset") != 0 || i + 1 >= argc) continue;
        if (strcmp(argv[i + 1], "cifar10-paper") != 0) {
            fprintf(stderr, "casdm train: --preset '%s' is not cifar10-paper\n", argv[i + 1]);
            return -1;
        }
        size_t np = sizeof preset_cifar10_paper / sizeof preset_cifar10_paper[0];
        for (size_t k = 0; k < np; k++)
            for (int j = 0; j < n; j++)
                if (strcmp(table[j].name, preset_cifar10_paper[k][0]) == 0)
                    table[j].def = preset_cifar10_paper[k][1];
    }
    return 0;
}

static int cmd_train(int argc, char **argv) {
    for (int i = 0; i + 1 < argc; i++)  // stage two of LDDGAN has its own options
        if (strcmp(argv[i], "--model") == 0 &&
            (strcmp(argv[i + 1], "lddgan") == 0 || strcmp(argv[i + 1], "ddgan") == 0)) {
            if (dist_size() == 1) return cmd_train_gan(argc, argv);
            if (dist_rank() == 0)
                fprintf(stderr, "casdm train --model %s: runs as one process (not under mpirun "
                                "with several ranks)\n", argv[i + 1]);
            return 2;
        }
    TrainOpts o;
    define_train_options(&o);
    if (apply_preset(train_opts_table, train_opts_n, argc, argv) != 0) return 2;
    int pr = parse_options("train", train_opts_table, train_opts_n, argc, argv, train_help);
    if (pr) return PARSED_EXIT(pr);
    Lpips lpips;
    int bad = check_train_options(&o, &lpips);
    if (bad) return bad;
    Dataset data;
    load_dataset(&data, o.data);
    const Images *im = &data.img;
    if (o.lpips && im->c != 3)
        fatal("--lpips needs RGB images; '%s' has %d channel(s)", o.data, im->c);
    if (im->h != im->w)
        fatal("--data '%s': images are %dx%d; square images only", o.data, im->h, im->w);
    int flip = o.flip;  // (improved-diffusion's ImageDataset does not flip; --flip to)
    BatchShare share = {0, 0, 0, 0, 0};
    char share_err[200];
    if (batch_share(&o, &share, share_err, sizeof share_err) != 0) {
        fprintf(stderr, "casdm train: %s\n", share_err);
        return 2;
    }
    Trainer tr;
    trainer_init(&tr, &o, im->c, im->h);
    Run run;
    run_open(&run, &tr, &o);
    Model ema;
    ema_model_init(&ema, &tr, &o);
    if (run.writer)
        fprintf(stderr,
                "casdm train: %s on %d images %dx%dx%d from %s; theta %zu parameters%s; %s, %d "
                "threads\n",
                model_name(tr.kind), im->n, im->c, im->h, im->w, o.data, tr.theta.params.total,
                tr.has_phi ? " (+ phi)" : "", gemm_backend_name(), pool_threads());
    if (run.writer && share.parts > 1)
        fprintf(stderr,
                "casdm train: --batch %d over %d process%s (%s): %d images each, in %d "
                "micro-batch%s of %d\n",
                o.batch, dist_size(), dist_size() > 1 ? "es" : "", dist_name(), share.share,
                share.share / share.micro, share.share / share.micro > 1 ? "es" : "", share.micro);
    tr.theta.use_checkpoint = tr.phi.use_checkpoint = o.grad_checkpoint;
    LossConfig lc;
    loss_config_default(&lc, tr.kind);
    lc.p2_gamma = o.p2_gamma;
    lc.p2_k = o.p2_k;
    lc.clip_x0 = !o.no_clip_x0;
    lc.lambda_eps = (float)o.lambda_eps;
    lc.lambda_x0 = (float)o.lambda_x0;
    lc.lambda_mu = (float)o.lambda_mu;
    lc.lambda_lpips = (float)o.lambda_lpips;
    lc.lpips = o.lpips ? lpips_loss : NULL;
    lc.lpips_ctx = o.lpips ? &lpips : NULL;
    Graph g;
    graph_init(&g, 0, 0);
    g.rng = &tr.rng;
    g.training = 1;
    float *x0buf = mallocCheck((size_t)o.batch * im->c * im->h * im->w * sizeof(float));
    int *t = mallocCheck((size_t)o.batch * sizeof(int));
    float *sum = share.parts > 1 ? mallocCheck(reduce_floats(&tr) * sizeof(float)) : NULL;
    TrainEval ev;
    if (o.eval_every > 0) train_eval_open(&ev, &o, im, &run.hist);
    Fault fault = fault_from_env();
    catch_signals();
    int timed_out = 0, stop = 0;
    run.t0 = run.t_row = now_seconds();  // the clock of --time-limit, the ETA and img/s
    // (several ranks stop together on the votes of the step's allreduce)
    while (tr.step < o.steps && !stop &&
           !(dist_size() == 1 && (interrupted || (timed_out = out_of_time(&run, &o))))) {
        StepLosses sl;
        char err[600];
        float vote = interrupted ? 1000.0f : out_of_time(&run, &o) ? 1.0f : 0.0f;
        if (train_step(&tr, &g, &lc, &data, &o, &share, flip, x0buf, t, sum, fault, vote, &stop,
                       &sl, err, sizeof err) != 0) {
            if (run.tty) fprintf(stderr, "\n");
            strncat(err, ": stopping (lower --lr, or set --grad-clip)",
                    sizeof err - strlen(err) - 1);
            stop_run(err, run.ckpt, run.saved_step);
        }
        // the evaluation first, so that its score goes into this step's row;
        // the time of evaluations and grids is kept out of the rows' img/s
        double fd = NAN, t_aside = now_seconds();
        int halted = dist_size() > 1 ? stop == 2 : interrupted != 0;  // (the same on every rank)
        if (o.eval_every > 0 && tr.step % o.eval_every == 0 && !halted) {
            if (run.tty) fprintf(stderr, "\n");
            fd = train_eval_run(&ev, &tr, &ema, &o, im->c, im->h, run.tty);
        }
        run.t_row += now_seconds() - t_aside;
        run_log(&run, &o, tr.step, &sl, fd);
        int more = tr.step < o.steps;
        if (o.ckpt_every > 0 && tr.step % o.ckpt_every == 0 && more) run_save(&run, &tr, &o);
        if (o.keep_every > 0 && tr.step % o.keep_every == 0) run_keep(&run, &tr, &o);
        if (o.sample_n > 0 && o.sample_every > 0 && tr.step % o.sample_every == 0 && more &&
            !halted) {
            if (run.tty) fprintf(stderr, "\n");
            t_aside = now_seconds();
            train_sample_grid(&tr, &ema, &o, im->c, im->h, run.tty);
            run.t_row += now_seconds() - t_aside;
        }
    }
    // several ranks: a signal stops them all after the step whose allreduce
    // first saw it (one that came later, to one rank only, is not taken)
    if (dist_size() > 1) interrupted = stop == 2 ? (interrupted ? interrupted : SIGTERM) : 0;
    if (stop == 1) timed_out = 1;
    if (run.tty) fprintf(stderr, "\n");
    // (a signal during a periodic save: that one holds this step already; a
    // resume to the same step does save, which tools/cross.sh relies on)
    if (run.saved_here != tr.step) run_save(&run, &tr, &o);
    if (!run.writer);
    else if (interrupted)
        fprintf(stderr, "interrupted (%s) at step %ld: wrote %s\n",
                interrupted == SIGTERM ? "SIGTERM" : "SIGINT", tr.step, run.ckpt);
    else
        fprintf(stderr, "%s at step %ld: wrote %s\n", timed_out ? "time limit reached" : "done",
                tr.step, run.ckpt);
    if (o.sample_n > 0 && !interrupted) train_sample_grid(&tr, &ema, &o, im->c, im->h, run.tty);
    run_close(&run);
    if (o.eval_every > 0) train_eval_close(&ev);
    ema_model_free(&ema, &o);
    free(x0buf);
    free(t);
    free(sum);
    graph_free(&g);
    trainer_free(&tr);
    if (o.lpips) lpips_free(&lpips);
    images_free(&data.img);
    return interrupted ? interrupted_status() : 0;
}

// images (N, H, W, C) bytes -> a grid with 2-pixel borders, cols columns
static void write_grid_png_cols(const char *path, const unsigned char *img, int N, int cols,
                                int H, int W, int C) {
    int rows = (N + cols - 1) / cols, pad = 2;
    int GW = cols * (W + pad) + pad, GH = rows * (H + pad) + pad;
    unsigned char *g = callocCheck((size_t)GW * GH * C, 1);
    for (int n = 0; n < N; n++) {
        int ox = pad + (n % cols) * (W + pad), oy = pad + (n / cols) * (H + pad);
        for (int y = 0; y < H; y++)
            memcpy(g + ((size_t)(oy + y) * GW + ox) * C, img + (((size_t)n * H + y) * W) * C,
                   (size_t)W * C);
    }
    char err[600];
    if (write_png(path, g, GW, GH, C, err, sizeof err) != 0) fatal("%s", err);
    free(g);
}

// ceil(sqrt(N)) columns
static void write_grid_png(const char *path, const unsigned char *img, int N, int H, int W, int C) {
    write_grid_png_cols(path, img, N, (int)ceil(sqrt((double)N)), H, W, C);
}

// ---------------------------------------------------------------------------
// ---- casdm lpips A B --weights FILE ----
static Option lpips_opts_table[8];
static int lpips_opts_n;

static void lpips_help(FILE *f) {
    fputs(
        "usage: casdm lpips A.png B.png --weights FILE [--size N]\n\n"
        "Prints the LPIPS distance (VGG16, average pooling) between two images of the same size\n"
        "(8-bit PNG or binary PPM/PGM). Weights: tools/convert_lpips.py (see README).\n\noptions:\n",
        f);
    usage_options(f, lpips_opts_table, lpips_opts_n);
}

static int cmd_lpips(int argc, char **argv) {
    const char *weights = NULL;
    int size;
    const Option opts[] = {
        {"--weights", OPT_STR, &weights, NULL,
         "LPIPS weights (safetensors from tools/convert_lpips.py)", 0, 0},
        {"--size", OPT_INT, &size, "224", "resize both images to this size first (0: as they are)",
         0, 4096},
    };
    lpips_opts_n = 2;
    memcpy(lpips_opts_table, opts, sizeof opts);
    const char *files[2];
    int nf = 0;
    char *rest[16];
    int nr = 0;
    for (int i = 0; i < argc; i++) {  // positional file names, options as usual
        int is_value = i > 0 && (strcmp(argv[i - 1], "--weights") == 0 ||
                                 strcmp(argv[i - 1], "--size") == 0);
        if (argv[i][0] != '-' && nf < 2 && !is_value)
            files[nf++] = argv[i];
        else if (nr < 16) rest[nr++] = argv[i];
    }
    int pr = parse_options("lpips", lpips_opts_table, lpips_opts_n, nr, rest, lpips_help);
    if (pr) return PARSED_EXIT(pr);
    if (nf != 2 || !weights) {
        fprintf(stderr, "casdm lpips: needs two images and --weights (see casdm lpips --help)\n");
        return 2;
    }
    Lpips l;
    char err[512];
    lpips_init(&l);
    l.size = size;
    if (lpips_load(&l, weights, err, sizeof err) != 0) fatal("--weights: %s", err);
    int w[2], h[2];
    unsigned char *img[2];
    for (int i = 0; i < 2; i++) {
        int rgb = 3;
        img[i] = read_image(files[i], &w[i], &h[i], &rgb, err, sizeof err);
        if (!img[i]) fatal("%s", err);
    }
    if (w[0] != w[1] || h[0] != h[1])
        fatal("'%s' is %dx%d but '%s' is %dx%d: the images must have the same size", files[0], w[0],
              h[0], files[1], w[1], h[1]);
    Graph g;
    graph_init(&g, 0, 0);
    g.grad_enabled = 0;
    Tensor *t[2];
    for (int i = 0; i < 2; i++) {
        t[i] = tensor4(&g, 1, 3, h[0], w[0]);
        for (int c = 0; c < 3; c++)
            for (int k = 0; k < w[0] * h[0]; k++)
                t[i]->data[(size_t)c * w[0] * h[0] + k] = img[i][(size_t)k * 3 + c] / 127.5f - 1.0f;
        free(img[i]);
    }
    Tensor *d = lpips_distance(&g, &l, t[0], t[1], NULL);
    printf("%.6f\n", d->data[0]);
    graph_free(&g);
    lpips_free(&l);
    return 0;
}

// ---------------------------------------------------------------------------
// ---- sampling ----
// ---------------------------------------------------------------------------

// builds the networks a checkpoint describes and loads its EMA (or raw)
// weights; the metadata is checked first, and the parameter count it implies
// against the file, so nothing larger than the file is allocated
static void load_model(Model *m, const char *path, int use_ema) {
    StFile f;
    CkptInfo ci;
    char err[600];
    memset(m, 0, sizeof *m);
    const char *prefix = use_ema ? "ema." : "";
    if (st_read(path, &f, err, sizeof err) != 0 ||
        checkpoint_info(&f, path, &ci, err, sizeof err) != 0 ||
        checkpoint_sizes(&f, path, &ci, prefix, err, sizeof err) != 0)
        fatal("%s", err);
    m->kind = ci.kind;
    m->clip_x0 = ci.clip_x0;
    schedule_init(&m->sched, ci.schedule, ci.T);
    unet_init(&m->theta, &ci.cfg, 0, NULL);
    char net_prefix[32];
    snprintf(net_prefix, sizeof net_prefix, "%stheta.", prefix);
    int rc = load_tensors(&m->theta.params, &f, path, net_prefix, NULL, err, sizeof err);
    if (rc == 0 && m->kind == MODEL_CASDM) {
        UNetConfig c = ci.cfg;
        c.out_channels = c.in_channels + 1;
        unet_init(&m->phi, &c, 0, NULL);
        m->has_phi = 1;
        snprintf(net_prefix, sizeof net_prefix, "%sphi.", prefix);
        rc = load_tensors(&m->phi.params, &f, path, net_prefix, NULL, err, sizeof err);
    }
    if (rc != 0) fatal("%s", err);
    st_free(&f);
}

static void free_model(Model *m) {
    unet_free(&m->theta);
    if (m->has_phi) unet_free(&m->phi);
    schedule_free(&m->sched);
}

// x in [-1,1] -> uint8 as improved-diffusion: ((x + 1) * 127.5).clamp(0, 255),
// truncated; the caller has checked that x is finite
static unsigned char to_u8(float v) {
    float s = (v + 1.0f) * 127.5f;
    return (unsigned char)(s < 0.0f ? 0.0f : (s > 255.0f ? 255.0f : s));
}

// n images (N,C,H,W) in [-1,1] -> uint8 (N,H,W,C) into out; progress on
// stderr in place (tty 1), as lines (0) or not at all (-1). Returns 0, 1
// when a sample is not finite (broken weights), or -1 when a signal asked
// to stop (checked after every step).
// Under several ranks, batch k of the n images is rank k mod K's; each rank
// moves the RNG past the others' batches (their noise: the start and every
// noisy step's), so the images are those one process would make, and
// merges them into every rank's `out`.
static int sample_images(Model *m, const SampleConfig *sc, const Schedule *rs, Rng *rng, int n,
                         int batch, unsigned char *out, int tty) {
    int C = m->theta.cfg.in_channels, S = m->theta.cfg.image_size, rc = 0;
    int K = dist_size(), me = dist_rank();
    size_t per = (size_t)C * S * S;
    float *x = mallocCheck((size_t)batch * per * sizeof(float)),
          *xp = mallocCheck((size_t)batch * per * sizeof(float));
    float *z = mallocCheck((size_t)batch * per * sizeof(float));
    uint64_t draws = 1;  // normal fills of an image: its start, and each noisy step's
    for (int j = rs->T - 1; j >= 0; j--) draws += (uint64_t)sample_step_noisy(sc, j);
    if (K > 1) memset(out, 0, (size_t)n * per);
    Graph g;
    graph_init(&g, 0, 0);
    Progress pr;
    progress_start(&pr, tty);
    for (int done = 0, k = 0; done < n && rc == 0; done += batch, k++) {
        int B = n - done < batch ? n - done : batch;
        if (k % K != me) {
            rng_advance(rng, 4 * draws * (uint64_t)B * per);  // (rng_fill_normal: 4 words a value)
            continue;
        }
        rng_fill_normal(rng, x, (size_t)B * per, 0.0f, 1.0f);
        for (int j = rs->T - 1; j >= 0 && rc == 0; j--) {
            int noisy = sample_step_noisy(sc, j);
            if (noisy) rng_fill_normal(rng, z, (size_t)B * per, 0.0f, 1.0f);
            sample_step(&g, sc, rs, &m->theta, m->has_phi ? &m->phi : NULL, x, xp, B, C, S, S, j,
                        noisy ? z : NULL);
            float *tmp = x; x = xp; xp = tmp;
            char what[64];
            snprintf(what, sizeof what, "images %d-%d at step %d/%d", done + 1, done + B,
                     rs->T - j, rs->T);
            progress_show(&pr, "img", done + (double)B * (rs->T - j) / rs->T, n, what);
            if (interrupted) rc = -1;
        }
        if (rc == 0 && first_nonfinite(x, (size_t)B * per) < (size_t)B * per) rc = 1;
        for (int b = 0; b < B && rc == 0; b++)
            for (int c = 0; c < C; c++)
                for (int i = 0; i < S * S; i++)
                    out[(((size_t)(done + b) * S * S) + i) * C + c] = to_u8(
                        x[(size_t)b * per + (size_t)c * S * S + i]);
    }
    progress_end(&pr);
    if (K > 1) {  // every rank the same outcome: interrupted (-1) before broken (1) before 0
        float bad[2] = {rc < 0, rc > 0};
        dist_sum_floats(bad, 2, "the sampled images' outcome");
        rc = bad[0] > 0 ? -1 : bad[1] > 0 ? 1 : 0;
        if (rc == 0) dist_merge_bytes(out, (size_t)n * per, "the gathering of the sampled images");
    }
    graph_free(&g);
    free(x); free(xp); free(z);
    return rc;
}

typedef struct {
    const char *ckpt, *out, *steps, *method, *ae, *sigma;
    int n, batch, seed, each, no_ema, no_clip;
    double eta, scale_factor;
} SampleOpts;

static Option sample_opts_table[32];
static int sample_opts_n;

static void sample_help(FILE *f) {
    fputs(
        "usage: casdm sample --ckpt FILE [options]\n\n"
        "Samples with the checkpoint's EMA weights and writes DIR/grid.png, DIR/samples_NxHxWxC.npz\n"
        "(a checkpoint of casdm train --model lddgan/ddgan, or a converted netG_*.pth: its T\n"
        "generator steps, then the autoencoder's decoder for lddgan; --steps, --method, --eta\n"
        "and --no-clip do not apply)\n"
        "(uint8 NHWC as arr_0, the layout of improved-diffusion's image_sample.py) and, with --each,\n"
        "DIR/sample_00000.png ... Ctrl-C (or SIGTERM) stops between steps and writes nothing.\n\noptions:\n",
        f);
    usage_options(f, sample_opts_table, sample_opts_n);
}

static void define_sample_options(SampleOpts *o) {
    const Option opts[] = {
        {"--ckpt", OPT_STR, &o->ckpt, NULL, "checkpoint written by casdm train", 0, 0},
        {"--n", OPT_INT, &o->n, "64", "number of images", 1, 1000000},
        {"--steps", OPT_STR, &o->steps, "100",
         "sampling steps: N (evenly strided, improved-diffusion's ddimN) or sections '10,10'", 0,
         0},
        {"--method", OPT_STR, &o->method, "ddim", "ddim or ddpm", 0, 0},
        {"--sigma", OPT_STR, &o->sigma, "large",
         "ddpm's variance: large (beta_t, improved-diffusion's default) or small (the "
         "posterior's)", 0, 0},
        {"--eta", OPT_FLOAT, &o->eta, "0", "DDIM eta (0 = deterministic)", 0, 1},
        {"--seed", OPT_INT, &o->seed, "0", "random seed", 0, 2147483647},
        {"--batch", OPT_INT, &o->batch, "16", "images per batch", 1, 4096},
        {"--out", OPT_STR, &o->out, "samples", "output directory", 0, 0},
        {"--each", OPT_FLAG, &o->each, NULL, "also write each image as a PNG", 0, 0},
        {"--no-ema", OPT_FLAG, &o->no_ema, NULL, "use the raw weights instead of the EMA", 0, 0},
        {"--no-clip", OPT_FLAG, &o->no_clip, NULL, "do not clip predicted x0 to [-1,1]", 0, 0},
        {"--ae", OPT_STR, &o->ae, NULL,
         "LDDGAN checkpoints: the autoencoder (default: the one the checkpoint names)", 0, 0},
        {"--scale-factor", OPT_FLOAT, &o->scale_factor, "0",
         "LDDGAN checkpoints: the latent scale (0: the checkpoint's, else the autoencoder's)", 0,
         1e9},
    };
    sample_opts_n = (int)(sizeof opts / sizeof opts[0]);
    memcpy(sample_opts_table, opts, sizeof opts);
}

// --steps against a chain of T steps: the kept steps (kept has room for T),
// their number, or -1 with a message
static int sample_steps(const char *steps, int T, int *kept, char *err, size_t errlen) {
    char spec[1100];
    if (strlen(steps) > 1000) return errorf(err, errlen, "longer than 1000 characters");
    // a bare N means N evenly strided steps ("ddimN") when that stride exists
    int all_digits = steps[0] != 0 && strlen(steps) < 20;
    for (const char *p = steps; *p; p++) all_digits &= (*p >= '0' && *p <= '9');
    snprintf(spec, sizeof spec, "%s%s", all_digits ? "ddim" : "", steps);
    int nk = space_timesteps(T, spec, kept, err, errlen);
    if (nk < 0 && all_digits) nk = space_timesteps(T, steps, kept, err, errlen);
    return nk;
}

static int sample_gan(const SampleOpts *o, StFile *f);

static int cmd_sample(int argc, char **argv) {
    SampleOpts o;
    define_sample_options(&o);
    int pr = parse_options("sample", sample_opts_table, sample_opts_n, argc, argv, sample_help);
    if (pr) return PARSED_EXIT(pr);
    if (!o.ckpt) {
        fprintf(stderr, "casdm sample: --ckpt is required (see casdm sample --help)\n");
        return 2;
    }
    {
        StFile f;
        char err[600], fmt[64];
        if (st_read(o.ckpt, &f, err, sizeof err) != 0) fatal("--ckpt: %s", err);
        if (st_meta(&f, "format", fmt, sizeof fmt) == 0 && strcmp(fmt, "casdm-ddgan-1") == 0) {
            if (dist_size() > 1)
                fatal("--ckpt '%s': a GAN's samples are made by one process (not under mpirun "
                      "with several ranks)", o.ckpt);
            return sample_gan(&o, &f);
        }
        st_free(&f);
        if (o.ae || o.scale_factor > 0)
            fatal("--ae and --scale-factor are for LDDGAN checkpoints; '%s' is not one", o.ckpt);
    }
    SampleConfig sc = {.method = SAMPLER_DDIM, .eta = (float)o.eta, .clip = !o.no_clip,
                       .clip_x0 = 1};
    if (strcmp(o.method, "ddpm") == 0) sc.method = SAMPLER_DDPM;
    else if (strcmp(o.method, "ddim") != 0) {
        fprintf(stderr, "casdm sample: --method '%s' is not ddim or ddpm\n", o.method);
        return 2;
    }
    if (strcmp(o.sigma, "large") != 0 && strcmp(o.sigma, "small") != 0) {
        fprintf(stderr, "casdm sample: --sigma '%s' is not large or small\n", o.sigma);
        return 2;
    }
    sc.sigma_large = strcmp(o.sigma, "large") == 0;
    Model m;
    load_model(&m, o.ckpt, !o.no_ema);
    sc.kind = m.kind;
    sc.clip_x0 = m.clip_x0;
    int *kept = mallocCheck((size_t)m.sched.T * sizeof(int));
    char err[600];
    int nk = sample_steps(o.steps, m.sched.T, kept, err, sizeof err);
    int C = m.theta.cfg.in_channels, S = m.theta.cfg.image_size, bad = nk < 0;
    if (bad) fprintf(stderr, "casdm sample: --steps '%s': %s\n", o.steps, err);
    double params = 4.0 * (double)(m.theta.params.total + (m.has_phi ? m.phi.params.total : 0));
    double acts = ACT_PER_FLOAT_SAMPLE * 4.0 * unet_activation_floats(&m.theta.cfg) * o.batch +
                  3.0 * 4.0 * o.batch * C * S * S;
    if (!bad &&
        check_memory("casdm sample with this --batch", params, acts, err, sizeof err) != 0) {
        fprintf(stderr, "casdm sample: %s\n", err);
        bad = 1;
    }
    if (!bad && (uint64_t)o.n * S * S * C > DATA_MAX_FILE) {
        fprintf(stderr,
                "casdm sample: --n %d images of %dx%dx%d do not fit in one NPZ file; lower --n\n",
                o.n, C, S, S);
        bad = 1;
    }
    if (bad) {
        free(kept);
        free_model(&m);
        return 2;
    }
    Schedule rs;
    schedule_respace(&rs, &m.sched, kept, nk);
    free(kept);
    if (dist_rank() == 0) make_dir(o.out);
    unsigned char *img = mallocCheck((size_t)o.n * S * S * C);
    Rng rng;
    rng_seed(&rng, (uint64_t)o.seed, 1);
    if (dist_rank() == 0)
        fprintf(stderr,
                "casdm sample: %s, %d images %dx%dx%d, %s %d steps (eta %g), %s weights, %d "
                "threads%s\n",
                model_name(m.kind), o.n, C, S, S, sc.method == SAMPLER_DDIM ? "DDIM" : "DDPM", nk,
                o.eta, o.no_ema ? "raw" : "EMA", pool_threads(),
                dist_size() > 1 ? " on each rank, its batches of --batch" : "");
    double t0 = now_seconds();
    catch_signals();
    int rc = sample_images(&m, &sc, &rs, &rng, o.n, o.batch, img, dist_rank() == 0 && isatty(2));
    double dt = now_seconds() - t0;
    if (rc == 0 && dist_rank() != 0) {  // (rank 0 writes the merged images)
    } else if (rc == 0) {
        char path[4200];
        snprintf(path, sizeof path, "%s/grid.png", o.out);
        write_grid_png(path, img, o.n, S, S, C);
        printf("%s\n", path);
        snprintf(path, sizeof path, "%s/samples_%dx%dx%dx%d.npz", o.out, o.n, S, S, C);
        if (write_npz(path, img, o.n, S, S, C, err, sizeof err) != 0) fatal("%s", err);
        printf("%s\n", path);
        for (int i = 0; o.each && i < o.n; i++) {
            snprintf(path, sizeof path, "%s/sample_%05d.png", o.out, i);
            if (write_png(path, img + (size_t)i * S * S * C, S, S, C, err, sizeof err) != 0)
                fatal("%s", err);
        }
        fprintf(stderr, "%d images in %.1fs (%.2f img/s%s)\n", o.n, dt, o.n / dt,
                dist_size() > 1 ? ", all ranks" : "");
    } else if (rc > 0) {
        fprintf(
            stderr,
            "casdm sample: '%s' gives NaN or Inf pixels: its weights are broken; nothing written\n",
            o.ckpt);
    } else {
        fprintf(stderr, "casdm sample: interrupted after %.1fs; nothing written\n", dt);
    }
    free(img);
    schedule_free(&rs);
    free_model(&m);
    return rc == 0 ? 0 : rc > 0 ? 1 : interrupted_status();
}

// ---------------------------------------------------------------------------
// ---- evaluation: held-out denoising losses ----
// For each t of a fixed grid and every image of the data, x_t from fixed
// noise; the model's epsilon and x0 estimates against the truth. Cas-DM: the
// epsilon of theta and the x0' of phi; dual: its two heads; ddpm-eps: x0 from
// epsilon (Eq. 8, clipped); ddpm-x0: epsilon from x0. Same noise for every
// model given --seed, so the numbers compare.
// ---------------------------------------------------------------------------
static Option eval_opts_table[8];
static int eval_opts_n;

static void eval_help(FILE *f) {
    fputs(
        "usage: casdm eval --ckpt FILE --data PATH [options]\n\n"
        "Held-out denoising losses: epsilon-MSE and x0-MSE at a fixed grid of t, with fixed noise,\n"
        "as CSV on stdout (t,eps_mse,x0_mse; a last line with the means).\n\noptions:\n",
        f);
    usage_options(f, eval_opts_table, eval_opts_n);
}

// one batch of held-out images at timestep t: x_t from fixed noise, the
// model's eps and x0 (each derived from the other where the model predicts
// only one; casdm's phi on its x0*), their squared errors added to se, sx
static void eval_batch(Graph *g, Model *m, const Dataset *d, int b0, int B, int t, Rng *rng,
                       double *se, double *sx) {
    int C = m->theta.cfg.in_channels, S = m->theta.cfg.image_size;
    size_t per = (size_t)C * S * S;
    double ab = m->sched.abar[t], a1 = 1.0 / sqrt(ab), a2 = sqrt(1.0 / ab - 1.0);
    graph_reset(g);
    Tensor *x0 = tensor4(g, B, C, S, S), *eps = tensor4(g, B, C, S, S),
           *xt = tensor4(g, B, C, S, S);
    for (size_t i = 0; i < (size_t)B * per; i++)
        x0->data[i] = d->img.pixels[(size_t)b0 * per + i] / 127.5f - 1.0f;
    rng_fill_normal(rng, eps->data, eps->size, 0.0f, 1.0f);
    for (size_t i = 0; i < xt->size; i++)
        xt->data[i] = (float)(sqrt(ab) * x0->data[i] + sqrt(1.0 - ab) * eps->data[i]);
    float *tm = arena_floats(&g->arena, (size_t)B);
    for (int i = 0; i < B; i++) tm[i] = schedule_model_t(&m->sched, t);
    Tensor *o = unet_forward(g, &m->theta, xt, tm);
    size_t so = (size_t)o->shape[1] * S * S;
    const float *pe = NULL, *px = NULL;
    size_t sx0 = so;
    if (m->kind == MODEL_DDPM_EPS || m->kind == MODEL_CASDM) pe = o->data;
    if (m->kind == MODEL_DDPM_X0) px = o->data;
    if (m->kind == MODEL_DUAL) { px = o->data; pe = o->data + per; }
    if (m->kind == MODEL_CASDM) {
        Tensor *x0s = tensor4(g, B, C, S, S);
        for (int i = 0; i < B; i++)
            for (size_t q = 0; q < per; q++) {
                float v = (float)(a1 * xt->data[i * per + q] - a2 * o->data[i * so + q]);
                x0s->data[i * per + q] = m->clip_x0 ? (v < -1 ? -1 : v > 1 ? 1 : v) : v;
            }
        Tensor *po = unet_forward(g, &m->phi, x0s, tm);
        px = po->data;
        sx0 = (size_t)po->shape[1] * S * S;
    }
    for (int i = 0; i < B; i++)
        for (size_t q = 0; q < per; q++) {
            double xv = xt->data[i * per + q], e = 0.0, x = 0.0;
            if (pe) e = pe[i * so + q];
            if (px) x = px[i * sx0 + q];
            if (!pe) e = (a1 * xv - x) / a2;  // epsilon from x0
            // x0 from epsilon, clipped
            if (!px) { x = a1 * xv - a2 * e; x = x < -1 ? -1 : x > 1 ? 1 : x; }
            double de = e - eps->data[i * per + q], dx = x - x0->data[i * per + q];
            *se += de * de;
            *sx += dx * dx;
        }
}

static int cmd_eval(int argc, char **argv) {
    const char *ckpt = NULL, *data_path = NULL;
    int n, grid, seed, batch, no_ema;
    const Option opts[] = {
        {"--ckpt", OPT_STR, &ckpt, NULL, "checkpoint written by casdm train", 0, 0},
        {"--data", OPT_STR, &data_path, NULL,
         "held-out images (e.g. t10k-images-idx3-ubyte, test_batch.bin)", 0, 0},
        {"--n", OPT_INT, &n, "1000", "images (the first N)", 1, 10000000},
        {"--t-grid", OPT_INT, &grid, "10", "timesteps t = (k + 0.5) T / grid, k = 0 .. grid-1", 1,
         1000},
        {"--seed", OPT_INT, &seed, "0", "noise seed", 0, 2147483647},
        {"--batch", OPT_INT, &batch, "64", "images per batch", 1, 4096},
        {"--no-ema", OPT_FLAG, &no_ema, NULL, "the raw weights instead of the EMA", 0, 0},
    };
    eval_opts_n = (int)(sizeof opts / sizeof opts[0]);
    memcpy(eval_opts_table, opts, sizeof opts);
    int pr = parse_options("eval", eval_opts_table, eval_opts_n, argc, argv, eval_help);
    if (pr) return PARSED_EXIT(pr);
    if (!ckpt || !data_path) {
        fprintf(stderr, "casdm eval: --ckpt and --data are required\n");
        return 2;
    }
    Model m;
    load_model(&m, ckpt, !no_ema);
    Dataset d;
    load_dataset(&d, data_path);
    int C = m.theta.cfg.in_channels, S = m.theta.cfg.image_size;
    if (d.img.c != C || d.img.h != S || d.img.w != S)
        fatal("--data '%s' has %dx%dx%d images; the model takes %dx%dx%d", data_path, d.img.c,
              d.img.h, d.img.w, C, S, S);
    if (n > d.img.n) n = d.img.n;
    size_t per = (size_t)C * S * S;
    Graph g;
    graph_init(&g, 0, 0);
    g.grad_enabled = 0;
    printf("t,eps_mse,x0_mse\n");
    double tot_e = 0.0, tot_x = 0.0;
    catch_signals();
    Progress prog;
    progress_start(&prog, isatty(2));
    for (int k = 0; k < grid && !interrupted; k++) {
        int t = (int)(((double)k + 0.5) * m.sched.T / grid);
        Rng rng;
        rng_seed(&rng, (uint64_t)seed, 1000 + (uint64_t)k);
        double se = 0.0, sx = 0.0;
        for (int b0 = 0; b0 < n && !interrupted; b0 += batch) {
            int B = n - b0 < batch ? n - b0 : batch;
            eval_batch(&g, &m, &d, b0, B, t, &rng, &se, &sx);
            char what[64];
            snprintf(what, sizeof what, "t = %d (%d of %d)", t, k + 1, grid);
            progress_show(&prog, "img", (double)k * n + b0 + B, (double)grid * n, what);
        }
        se /= (double)n * per;
        sx /= (double)n * per;
        tot_e += se;
        tot_x += sx;
        printf("%d,%.6f,%.6f\n", t, se, sx);
    }
    progress_end(&prog);
    if (!interrupted) printf("mean,%.6f,%.6f\n", tot_e / grid, tot_x / grid);
    else fprintf(stderr, "casdm eval: interrupted; the rows above are the grid points done\n");
    graph_free(&g);
    images_free(&d.img);
    free_model(&m);
    return interrupted ? interrupted_status() : 0;
}

// ---------------------------------------------------------------------------
// ---- ae: the LDDGAN autoencoder's encode and decode ----
// encode: images -> "latents" (N, embed_dim, h, w) float32 in an .npz, the
// posterior's mean or a sample of it, divided by the scale factor as LDDGAN
// feeds its GAN (train_ldgan.py: posterior.sample() / scale_factor);
// decode: latents times the scale -> the decoder's images in [-1, 1] ->
// uint8, as a samples .npz (improved-diffusion's layout) and a grid PNG.
// ---------------------------------------------------------------------------
static void ae_help(FILE *f) {
    fprintf(f,
            "usage: casdm ae encode IMAGES --weights AE --out LATENTS.npz [options]\n"
            "       casdm ae decode LATENTS.npz --weights AE --out DIR [options]\n\n"
            "AE: an autoencoder file (tools/convert_autoencoder.py). IMAGES: a CIFAR-10\n"
            "directory or .bin, an IDX file, an image folder or a samples .npz.\n"
            "  --mode S          encode: mean (the posterior's mode) or sample [default: mean]\n"
            "  --scale N         latents = z / N; decode multiplies back [default: the file's\n"
            "                    scale_factor, 1 if it has none]\n"
            "  --batch N         images per forward [default: 32]\n"
            "  --n N             encode only the first N images [default: all]\n"
            "  --seed N          the noise of --mode sample [default: 0]\n");
}

static void ae_load_or_die(Autoencoder *a, const char *weights) {
    char err[600];
    if (!weights) fatal("ae: --weights is required (see casdm ae --help)");
    if (ae_load(a, weights, 0, err, sizeof err) != 0) fatal("--weights: %s", err);
}

static int ae_encode_images(const char *in, const char *out, Autoencoder *a, int sample,
                            float scale, int batch, int limit, int seed) {
    Images im;
    load_fid_images(in, &im);
    const AEConfig *c = &a->cfg;
    int f = 1 << (c->n_levels - 1);
    if (im.c != c->in_channels)
        fatal("ae: '%s' has %d-channel images; the autoencoder takes %d", in, im.c, c->in_channels);
    if (im.h % f || im.w % f)
        fatal("ae: '%s' has %dx%d images; the autoencoder needs sides divisible by %d", in, im.h,
              im.w, f);
    long n = limit > 0 && limit < im.n ? limit : im.n;
    if (n < 1) fatal("ae: '%s' holds no images", in);
    int lh = im.h / f, lw = im.w / f, E = c->embed_dim;
    size_t per = (size_t)im.c * im.h * im.w, lper = (size_t)E * lh * lw;
    float *lat = mallocCheck((size_t)n * lper * sizeof(float));
    Rng rng;
    rng_seed(&rng, (uint64_t)seed, 13);
    Progress pr;
    progress_start(&pr, isatty(2));
    for (long done = 0; done < n && !interrupted; done += batch) {
        int B = n - done < batch ? (int)(n - done) : batch;
        Graph g;
        graph_init(&g, 0, 0);
        g.grad_enabled = 0;
        g.rng = &rng;
        int s[4] = {B, im.c, im.h, im.w};
        Tensor *x = tensor_new(&g, 4, s);
        for (size_t k = 0; k < (size_t)B * per; k++)
            x->data[k] = im.pixels[(size_t)done * per + k] / 127.5f - 1.0f;
        Tensor *m = ae_encode(&g, a, x);
        Tensor *z = sample ? gaussian_sample(&g, m, NULL) : NULL;
        for (int b = 0; b < B; b++)  // the mean: the first embed_dim channels of the moments
            for (size_t k = 0; k < lper; k++)
                lat[(size_t)(done + b) * lper + k] =
                    (z ? z->data[(size_t)b * lper + k] : m->data[(size_t)b * 2 * lper + k]) / scale;
        graph_free(&g);
        progress_show(&pr, "img", (double)(done + B), (double)n, "encoding");
    }
    progress_end(&pr);
    images_free(&im);
    if (interrupted) fatal("ae: interrupted");
    for (size_t k = 0; k < (size_t)n * lper; k++)
        if (!isfinite(lat[k])) fatal("ae: the latents are not finite (broken weights?)");
    NpzWrite w = {"latents", NPY_F32, 4, {n, E, lh, lw}, lat};
    char err[600];
    if (npz_write(out, &w, 1, err, sizeof err) != 0) fatal("%s", err);
    free(lat);
    printf("%s\n", out);
    return 0;
}

static int ae_decode_latents(const char *in, const char *dir, Autoencoder *a, float scale,
                             int batch) {
    NpzArray arr;
    char err[600];
    if (npz_read(in, "latents", &arr, err, sizeof err) != 0) fatal("%s", err);
    const AEConfig *c = &a->cfg;
    if (arr.ndim != 4 || !arr.f64 || arr.shape[1] != c->embed_dim || arr.shape[0] < 1 ||
        arr.shape[2] < 1 || arr.shape[3] < 1 || arr.shape[0] > 0x7fffffff ||
        arr.shape[2] > IMAGE_MAX_SIDE || arr.shape[3] > IMAGE_MAX_SIDE)
        fatal("ae: '%s': latents must be float (N, %d, h, w)", in, c->embed_dim);
    int f = 1 << (c->n_levels - 1), n = (int)arr.shape[0], lh = (int)arr.shape[2],
        lw = (int)arr.shape[3], H = lh * f, W = lw * f, C = c->out_ch;
    if ((int64_t)H * W > IMAGE_MAX_PIXELS) fatal("ae: '%s': %dx%d images are too large", in, H, W);
    size_t lper = (size_t)c->embed_dim * lh * lw, hw = (size_t)H * W;
    unsigned char *img = mallocCheck((size_t)n * hw * C);
    Progress pr;
    progress_start(&pr, isatty(2));
    for (int done = 0; done < n && !interrupted; done += batch) {
        int B = n - done < batch ? n - done : batch;
        Graph g;
        graph_init(&g, 0, 0);
        g.grad_enabled = 0;
        int s[4] = {B, c->embed_dim, lh, lw};
        Tensor *z = tensor_new(&g, 4, s);
        for (size_t k = 0; k < (size_t)B * lper; k++)
            z->data[k] = (float)(arr.f64[(size_t)done * lper + k] * scale);
        Tensor *y = ae_decode(&g, a, z);
        for (size_t k = 0; k < y->size; k++)
            if (!isfinite(y->data[k])) fatal("ae: decoded pixels are not finite (broken weights?)");
        for (int b = 0; b < B; b++)  // (C,H,W) -> (H,W,C)
            for (int ch = 0; ch < C; ch++)
                for (size_t p = 0; p < hw; p++)
                    img[((size_t)(done + b) * hw + p) * C + ch] =
                        to_u8(y->data[((size_t)b * C + ch) * hw + p]);
        graph_free(&g);
        progress_show(&pr, "img", (double)(done + B), (double)n, "decoding");
    }
    progress_end(&pr);
    npz_free(&arr);
    if (interrupted) fatal("ae: interrupted");
    make_dir(dir);
    char path[4200];
    snprintf(path, sizeof path, "%s/samples_%dx%dx%dx%d.npz", dir, n, H, W, C);
    if (write_npz(path, img, n, H, W, C, err, sizeof err) != 0) fatal("%s", err);
    char grid[4200];
    snprintf(grid, sizeof grid, "%s/grid.png", dir);
    write_grid_png(grid, img, n < 64 ? n : 64, H, W, C);
    free(img);
    printf("%s\n", path);
    return 0;
}

static int cmd_ae(int argc, char **argv) {
    if (argc >= 1 && (strcmp(argv[0], "--help") == 0 || strcmp(argv[0], "-h") == 0)) {
        ae_help(stdout);
        return 0;
    }
    if (argc < 2 || (strcmp(argv[0], "encode") != 0 && strcmp(argv[0], "decode") != 0)) {
        fprintf(stderr, "casdm ae: encode IMAGES or decode LATENTS.npz (see casdm ae --help)\n");
        return 2;
    }
    int encode = strcmp(argv[0], "encode") == 0;
    const char *in = argv[1], *weights = NULL, *out = NULL, *mode = NULL;
    double scale;
    int batch, limit, seed;
    const Option opts[] = {
        {"--weights", OPT_STR, &weights, NULL, "", 0, 0},
        {"--out", OPT_STR, &out, NULL, "", 0, 0},
        {"--mode", OPT_STR, &mode, "mean", "", 0, 0},
        {"--scale", OPT_FLOAT, &scale, "0", "", 0, 1e9},
        {"--batch", OPT_INT, &batch, "32", "", 1, 4096},
        {"--n", OPT_INT, &limit, "0", "", 0, 2147483647},
        {"--seed", OPT_INT, &seed, "0", "", 0, 2147483647},
    };
    int pr = parse_options("ae", opts, (int)(sizeof opts / sizeof opts[0]), argc - 2, argv + 2,
                           ae_help);
    if (pr) return PARSED_EXIT(pr);
    if (!out) {
        fprintf(stderr, "casdm ae: --out is required (see casdm ae --help)\n");
        return 2;
    }
    if (strcmp(mode, "mean") != 0 && strcmp(mode, "sample") != 0) {
        fprintf(stderr, "casdm ae: --mode is mean or sample, got '%s'\n", mode);
        return 2;
    }
    Autoencoder a;
    ae_load_or_die(&a, weights);
    catch_signals();
    float s = scale > 0.0 ? (float)scale : a.scale_factor;
    int rc = encode ? ae_encode_images(in, out, &a, strcmp(mode, "sample") == 0, s, batch, limit, seed)
                    : ae_decode_latents(in, out, &a, s, batch);
    ae_free(&a);
    return rc;
}

// ---------------------------------------------------------------------------
// ---- resuming casdm train-ae and casdm train --model lddgan/ddgan ----
// The options that define a run's loss (or its data order), as its
// checkpoint records them; a resume with other values is an error naming the
// flag. The step counters and the RNG, every value checked.
// ---------------------------------------------------------------------------
static long resume_meta_long(const StFile *f, const char *path, const char *key, long lo, long hi) {
    long v;
    char err[600];
    if (meta_long(f, path, key, lo, hi, &v, err, sizeof err) != 0) fatal("--resume: %s", err);
    return v;
}

static void resume_rng(const StFile *f, const char *path, Rng *r) {
    char err[600];
    if (meta_hex64(f, path, "rng_state", &r->state, err, sizeof err) ||
        meta_hex64(f, path, "rng_inc", &r->inc, err, sizeof err))
        fatal("--resume: %s", err);
    if (!(r->inc & 1)) fatal("--resume: '%s': rng_inc is even (not a PCG32 stream)", path);
}

// ---------------------------------------------------------------------------
// ---- casdm train-ae --data PATH --lpips FILE: the LDDGAN autoencoder ----
// latent-diffusion's AutoencoderKL.training_step as Lightning runs it
// (ldm/models/autoencoder.py): per iteration a generator step (encoder,
// decoder, quant_conv, post_quant_conv) and then a discriminator step, each
// with its own Adam (betas 0.5, 0.9, configure_optimizers) at base_lr *
// batch (main.py's scale_lr on one GPU); the loss is lddgan.c's
// LPIPSWithDiscriminator. The checkpoint is an autoencoder file (casdm ae
// and tools/convert_autoencoder.py read it) that also holds the
// discriminator under the official names (loss.discriminator.*), both
// Adam states (adam_m.*, adam_v.*) and the run's step and RNG.
// ---------------------------------------------------------------------------
typedef struct {
    const char *data, *eval_data, *config, *mult, *attn, *lpips, *out, *resume;
    int ch, res, z, flip, steps, batch, seed, disc_start, disc_ndf, disc_layers;
    double dropout, kl_weight, disc_weight, disc_factor, perceptual_weight, lpips_dropout;
    double base_lr, lr, time_limit;
    int log_every, ckpt_every, sample_every, sample_n, eval_n, scale_n;
} AEOpts;

typedef struct {
    Autoencoder ae;
    PatchGAN disc;
    Adam adam_ae, adam_disc;
    Rng rng;
    long step;
} AEState;

static Option ae_opts_table[48];
static int ae_opts_n;

static void train_ae_help(FILE *f) {
    fputs("usage: casdm train-ae --data PATH --lpips FILE [options]\n\n"
          "Trains LDDGAN's KL autoencoder (latent-diffusion's AutoencoderKL) with its loss,\n"
          "L1 + LPIPS + KL + the adaptive PatchGAN term, and the PatchGAN on the hinge loss.\n"
          "Writes DIR/ckpt.safetensors (an autoencoder file for casdm ae; every --ckpt-every\n"
          "steps and at the end, with the latent scale measured on --scale-n images),\n"
          "DIR/log.csv, DIR/loss.svg and DIR/recon_STEP.png (inputs, then their\n"
          "reconstructions). Ctrl-C saves and stops; --resume DIR continues bit for bit.\n"
          "The architecture defaults to LDDGAN's CIFAR-10 config (--config cifar10:\n"
          "ch 128, mult 1,2, res 2, attn 16, z 4, dropout 0.2); PATH as for casdm train.\n"
          "--lpips: VGG16 + LPIPS heads from tools/convert_lpips.py (taming's vgg.pth is\n"
          "LPIPS v0.1's), run with max pools and no resize as taming's LPIPS.\n\noptions:\n",
          f);
    usage_options(f, ae_opts_table, ae_opts_n);
}

static void define_ae_options(AEOpts *o) {
    const Option opts[] = {
        {"--data", OPT_STR, &o->data, NULL, "training images (CIFAR-10, IDX or an image folder)",
         0, 0},
        {"--eval-data", OPT_STR, &o->eval_data, NULL,
         "held-out images: their L1 and LPIPS at every grid and at the end", 0, 0},
        {"--eval-n", OPT_INT, &o->eval_n, "1000", "held-out images scored", 1, 100000000},
        {"--lpips", OPT_STR, &o->lpips, NULL, "LPIPS weights (tools/convert_lpips.py)", 0, 0},
        {"--config", OPT_STR, &o->config, NULL,
         "cifar10: LDDGAN's autoencoder/config/cifar10_16x16x4.yaml (the defaults)", 0, 0},
        {"--ch", OPT_INT, &o->ch, "0", "base channels (0: the config's, 128)", 0, 4096},
        {"--mult", OPT_STR, &o->mult, "", "channel multipliers per level (the config's: 1,2)", 0,
         0},
        {"--res", OPT_INT, &o->res, "0", "ResnetBlocks per level (0: the config's, 2)", 0,
         AE_MAX_BLOCKS - 1},
        {"--attn", OPT_STR, &o->attn, "",
         "sides with attention, e.g. 16, or none (the config's: 16)", 0, 0},
        {"--z", OPT_INT, &o->z, "0", "latent channels, z_channels = embed_dim (0: the config's, 4)",
         0, 1024},
        {"--dropout", OPT_FLOAT, &o->dropout, "-1", "dropout in the ResnetBlocks (-1: the config's, 0.2)",
         -1, 0.99},
        {"--disc-start", OPT_INT, &o->disc_start, "50001",
         "iteration from which the GAN terms are on (the config's 50001)", 0, 1000000000},
        {"--kl-weight", OPT_FLOAT, &o->kl_weight, "1e-6", "weight of the KL term", 0, 1e6},
        {"--disc-weight", OPT_FLOAT, &o->disc_weight, "0.5", "scale of the adaptive d_weight", 0,
         1e6},
        {"--disc-factor", OPT_FLOAT, &o->disc_factor, "1", "factor of the GAN terms once on", 0,
         1e6},
        {"--perceptual-weight", OPT_FLOAT, &o->perceptual_weight, "1", "weight of LPIPS in rec",
         0, 1e6},
        {"--lpips-dropout", OPT_FLOAT, &o->lpips_dropout, "0.5",
         "dropout on the LPIPS heads' inputs while training (taming's NetLinLayer)", 0, 0.99},
        {"--disc-ndf", OPT_INT, &o->disc_ndf, "64", "PatchGAN base width", 1, 4096},
        {"--disc-layers", OPT_INT, &o->disc_layers, "3", "PatchGAN stride-2 layers", 1,
         PATCHGAN_MAX_CONVS - 2},
        {"--steps", OPT_INT, &o->steps, "1000", "iterations (total, counting resumed ones)", 0,
         1000000000},
        {"--batch", OPT_INT, &o->batch, "12", "batch size", 1, 4096},
        {"--base-lr", OPT_FLOAT, &o->base_lr, "4.5e-6",
         "learning rate per image: lr = base-lr x batch (scale_lr)", 0, 1},
        {"--lr", OPT_FLOAT, &o->lr, "0", "Adam learning rate (0: base-lr x batch)", 0, 1},
        {"--seed", OPT_INT, &o->seed, "0", "random seed", 0, 2147483647},
        {"--flip", OPT_FLAG, &o->flip, NULL, "random horizontal flips (default: none)", 0, 0},
        {"--time-limit", OPT_FLOAT, &o->time_limit, "0",
         "stop after this many seconds of training (0 = no limit)", 0, 1e9},
        {"--out", OPT_STR, &o->out, "runs/train-ae", "output directory", 0, 0},
        {"--resume", OPT_STR, &o->resume, NULL, "continue from DIR/ckpt.safetensors", 0, 0},
        {"--log-every", OPT_INT, &o->log_every, "10", "iterations per line of log.csv", 1,
         1000000},
        {"--ckpt-every", OPT_INT, &o->ckpt_every, "1000",
         "iterations between checkpoints (0 = only at the end)", 0, 1000000000},
        {"--sample-every", OPT_INT, &o->sample_every, "0",
         "iterations between reconstruction grids and held-out scores (0 = only at the end)", 0,
         1000000000},
        {"--sample-n", OPT_INT, &o->sample_n, "8", "images in each reconstruction grid (0 = none)",
         0, 1024},
        {"--scale-n", OPT_INT, &o->scale_n, "1000",
         "training images whose latents set scale_factor at the end (0 = keep 1)", 0, 100000000},
    };
    ae_opts_n = (int)(sizeof opts / sizeof opts[0]);
    memcpy(ae_opts_table, opts, sizeof opts);
}

// "1,2,2" -> {1,2,2}; the count, or -1
static int int_list_parse(const char *s, int *out, int max) {
    int n = 0;
    for (const char *p = s; *p;) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 1 || v > 65536 || n == max || (*end && *end != ',')) return -1;
        out[n++] = (int)v;
        p = *end ? end + 1 : end;
    }
    return n;
}

// the architecture the options give for images of C channels, side S
static void ae_config_from(const AEOpts *o, int C, int S, AEConfig *c) {
    int custom = o->ch || o->mult[0] || o->res || o->attn[0] || o->z || o->dropout >= 0;
    if (o->config && strcmp(o->config, "cifar10") != 0)
        fatal("--config '%s': the preset is cifar10 (others through --ch/--mult/--res/--attn/--z)",
              o->config);
    if (o->config && custom)
        fatal("--config cifar10 fixes the architecture: leave out --ch/--mult/--res/--attn/--z/--dropout");
    ae_cifar10_config(c);
    c->resolution = S;
    c->in_channels = c->out_ch = C;
    if (o->ch) c->ch = o->ch;
    if (o->res) c->num_res_blocks = o->res;
    if (o->z) c->z_channels = c->embed_dim = o->z;
    if (o->dropout >= 0) c->dropout = (float)o->dropout;
    if (o->mult[0]) {
        int m[AE_MAX_LEVELS], n = int_list_parse(o->mult, m, AE_MAX_LEVELS);
        if (n < 1) fatal("--mult '%s' is not a list such as 1,2,2 (at most %d levels)", o->mult,
                         AE_MAX_LEVELS);
        memset(c->ch_mult, 0, sizeof c->ch_mult);
        memcpy(c->ch_mult, m, (size_t)n * sizeof *m);
        c->n_levels = n;
    }
    if (strcmp(o->attn, "none") == 0) {
        c->n_attn = 0;
    } else if (o->attn[0]) {
        int a[AE_MAX_LEVELS], n = int_list_parse(o->attn, a, AE_MAX_LEVELS);
        if (n < 1) fatal("--attn '%s' is not a list of sides such as 16, or none", o->attn);
        memcpy(c->attn_resolutions, a, (size_t)n * sizeof *a);
        c->n_attn = n;
    }
    char why[256];
    if (ae_check_config(c, why, sizeof why) != 0)
        fatal("--data images %dx%dx%d with --ch/--mult/--res/--attn/--z: %s", C, S, S, why);
}

// the PatchGAN's logit map side for images of side S (< 1: too small)
static int patchgan_side(int S, int layers) {
    int s = (S + 2 - 4) / 2 + 1;                        // the first conv, stride 2
    for (int n = 1; n <= layers; n++) s = (s + 2 - 4) / (n < layers ? 2 : 1) + 1;
    return s + 2 - 4 + 1;                               // the last conv, stride 1
}

static void ae_adam(Adam *a, size_t n, float lr) {
    adam_init(a, n, lr);
    a->beta1 = 0.5f;  // AutoencoderKL.configure_optimizers: betas=(0.5, 0.9) for both
    a->beta2 = 0.9f;
}

static void ae_state_init(AEState *s, const AEConfig *c, const AEOpts *o) {
    memset(s, 0, sizeof *s);
    rng_seed(&s->rng, (uint64_t)o->seed, 0);
    ae_init(&s->ae, c, 1, &s->rng);
    patchgan_init(&s->disc, c->in_channels, o->disc_ndf, o->disc_layers, 1, &s->rng);
    float lr = (float)(o->lr > 0 ? o->lr : o->base_lr * o->batch);
    ae_adam(&s->adam_ae, s->ae.params.total, lr);
    ae_adam(&s->adam_disc, s->disc.params.total, lr);
}

static void ae_state_free(AEState *s) {
    ae_free(&s->ae);
    patchgan_free(&s->disc);
    adam_free(&s->adam_ae);
    adam_free(&s->adam_disc);
}

// the options that define the loss (RunOption: checked on resume)
static int ae_loss_options(const AEOpts *o, RunOption *out) {
    const RunOption v[] = {
        {"kl_weight", "--kl-weight", o->kl_weight},
        {"disc_weight", "--disc-weight", o->disc_weight},
        {"disc_factor", "--disc-factor", o->disc_factor},
        {"disc_start", "--disc-start", o->disc_start},
        {"perceptual_weight", "--perceptual-weight", o->perceptual_weight},
        {"lpips_dropout", "--lpips-dropout", o->lpips_dropout},
        {"disc_ndf", "--disc-ndf", o->disc_ndf},
        {"disc_layers", "--disc-layers", o->disc_layers},
    };
    memcpy(out, v, sizeof v);
    return (int)(sizeof v / sizeof v[0]);
}

// Everything the run needs to go on, atomically; -1 with a message (the
// file at path untouched) on a write error or a value that is not finite
static int ae_state_save(const AEState *s, const AEOpts *o, const char *path, char *err,
                         size_t errlen) {
    const ParamSet *sets[2] = {&s->ae.params, &s->disc.params};
    const Adam *adams[2] = {&s->adam_ae, &s->adam_disc};
    for (int k = 0; k < 2; k++) {
        const float *bufs[3] = {sets[k]->data, adams[k]->m, adams[k]->v};
        for (int b = 0; b < 3; b++)
            if (first_nonfinite(bufs[b], sets[k]->total) < sets[k]->total)
                return errorf(err, errlen, "not saving step %ld: the %s holds NaN or Inf values",
                              s->step, k ? "discriminator" : "autoencoder");
    }
    const PatchGAN *d = &s->disc;
    size_t n = d->params.count + d->buffers.count + 2 * (s->ae.params.count + d->params.count);
    StWrite *w = mallocCheck(n * sizeof *w);
    char *names = mallocCheck(n * 320), *nm = names;
    size_t k = 0;
    // (name, tensor, data) for the discriminator's weights and buffers, then the moments
    const char *dprefix = "loss.discriminator.";
    for (int b = 0; b < 2; b++) {
        const ParamSet *ps = b ? &d->buffers : &d->params;
        for (size_t i = 0; i < ps->count; i++, k++, nm += 320) {
            snprintf(nm, 320, "%s%s", dprefix, ps->t[i].name);
            w[k] = (StWrite){nm, ps->t[i].ndim, ps->t[i].shape, ps->t[i].data};
        }
    }
    for (int m = 0; m < 2; m++)
        for (int net = 0; net < 2; net++) {
            const ParamSet *ps = sets[net];
            const float *base = m ? adams[net]->v : adams[net]->m;
            size_t off = 0;
            for (size_t i = 0; i < ps->count; i++, k++, nm += 320) {
                snprintf(nm, 320, "%s%s%s", m ? "adam_v." : "adam_m.", net ? dprefix : "",
                         ps->t[i].name);
                w[k] = (StWrite){nm, ps->t[i].ndim, ps->t[i].shape, base + off};
                off += ps->t[i].size;
            }
        }
    RunOption lo[16];
    int nlo = ae_loss_options(o, lo);
    char kv[32][2][64];
    const char *meta[2 * 32 + 1];
    int nm_kv = 0;
#define AE_META(key, ...)                                          \
    do {                                                           \
        snprintf(kv[nm_kv][0], 64, "%s", key);                     \
        snprintf(kv[nm_kv][1], 64, __VA_ARGS__);                   \
        nm_kv++;                                                   \
    } while (0)
    AE_META("checkpoint", "casdm-train-ae-1");
    AE_META("step", "%ld", s->step);
    AE_META("adam_step_ae", "%ld", s->adam_ae.step);
    AE_META("adam_step_disc", "%ld", s->adam_disc.step);
    AE_META("lr", "%.9g", s->adam_ae.lr);
    AE_META("rng_state", "%016llx", (unsigned long long)s->rng.state);
    AE_META("rng_inc", "%016llx", (unsigned long long)s->rng.inc);
    AE_META("disc_batches_tracked", "%ld", d->num_batches_tracked);
    AE_META("logvar", "0");
    for (int i = 0; i < nlo; i++) AE_META(lo[i].key, "%.9g", lo[i].value);
#undef AE_META
    for (int i = 0; i < nm_kv; i++) { meta[2 * i] = kv[i][0]; meta[2 * i + 1] = kv[i][1]; }
    meta[2 * nm_kv] = NULL;
    int rc = ae_save_with(&s->ae, path, w, k, meta, err, errlen);
    free(names);
    free(w);
    return rc;
}

// The run in a checkpoint of casdm train-ae; the options must give the same
// architecture and loss
static void ae_state_load(AEState *s, const AEOpts *o, const AEConfig *want, const char *path) {
    char err[600], buf[64];
    StFile f;
    if (st_read(path, &f, err, sizeof err) != 0) fatal("--resume: %s", err);
    if (st_meta(&f, "checkpoint", buf, sizeof buf) != 0 || strcmp(buf, "casdm-train-ae-1") != 0)
        fatal("--resume: '%s' is not a casdm train-ae checkpoint (weights alone cannot be resumed)",
              path);
    RunOption lo[16];
    resume_check_options(&f, path, lo, ae_loss_options(o, lo), "the loss");
    memset(s, 0, sizeof *s);
    if (ae_load(&s->ae, path, 1, err, sizeof err) != 0) fatal("--resume: %s", err);
    AEConfig got = s->ae.cfg, w = *want;
    for (int l = w.n_levels; l < AE_MAX_LEVELS; l++) w.ch_mult[l] = 0;
    for (int l = w.n_attn; l < AE_MAX_LEVELS; l++) w.attn_resolutions[l] = 0;
    for (int l = got.n_attn; l < AE_MAX_LEVELS; l++) got.attn_resolutions[l] = 0;
    if (memcmp(&got, &w, sizeof w) != 0)
        fatal("--resume: '%s' holds another architecture than --ch/--mult/--res/--attn/--z/"
              "--dropout and the data give (ch %d, %d levels, z %d, side %d)",
              path, got.ch, got.n_levels, got.z_channels, got.resolution);
    patchgan_init(&s->disc, want->in_channels, o->disc_ndf, o->disc_layers, 1, NULL);
    float lr = (float)(o->lr > 0 ? o->lr : o->base_lr * o->batch);
    ae_adam(&s->adam_ae, s->ae.params.total, lr);
    ae_adam(&s->adam_disc, s->disc.params.total, lr);
    const char *dprefix = "loss.discriminator.";
    char pm[64];
    int rc = load_tensors(&s->disc.params, &f, path, dprefix, NULL, err, sizeof err);
    if (!rc) rc = load_tensors(&s->disc.buffers, &f, path, dprefix, NULL, err, sizeof err);
    if (!rc) rc = load_tensors(&s->ae.params, &f, path, "adam_m.", s->adam_ae.m, err, sizeof err);
    if (!rc) rc = load_tensors(&s->ae.params, &f, path, "adam_v.", s->adam_ae.v, err, sizeof err);
    snprintf(pm, sizeof pm, "adam_m.%s", dprefix);
    if (!rc) rc = load_tensors(&s->disc.params, &f, path, pm, s->adam_disc.m, err, sizeof err);
    snprintf(pm, sizeof pm, "adam_v.%s", dprefix);
    if (!rc) rc = load_tensors(&s->disc.params, &f, path, pm, s->adam_disc.v, err, sizeof err);
    if (rc) fatal("--resume: %s", err);
    s->step = resume_meta_long(&f, path, "step", 0, LOG_MAX_STEP);
    s->adam_ae.step = resume_meta_long(&f, path, "adam_step_ae", 0, s->step);
    s->adam_disc.step = resume_meta_long(&f, path, "adam_step_disc", 0, s->step);
    s->disc.num_batches_tracked = resume_meta_long(&f, path, "disc_batches_tracked", 0, 3 * s->step);
    resume_rng(&f, path, &s->rng);
    st_free(&f);
}

// One iteration: a batch, the generator step and its Adam update, then the
// discriminator step on the updated autoencoder (Lightning's order). 0, or
// -1 with a message when a loss or a gradient is not finite (then the
// network of that step is not updated).
static int ae_train_step(AEState *s, AETrainer *t, const Dataset *d, const AEOpts *o, int flip,
                         float *x, AELossTerms *lt, char *err, size_t errlen) {
    int B = o->batch;
    draw_batch(d, &s->rng, x, B, flip);
    params_zero_grad(&s->ae.params);
    ae_generator_grads(t, x, B, s->step, NULL, lt);
    double gn = sqrt(grad_norm_sq(s->ae.params.grad, s->ae.params.total));
    if (!isfinite(lt->loss) || !isfinite(gn))
        return errorf(err, errlen, "the autoencoder's loss is %g, its gradient norm %g at step %ld",
                      lt->loss, gn, s->step + 1);
    adam_step(&s->adam_ae, s->ae.params.data, s->ae.params.grad);
    params_zero_grad(&s->disc.params);
    if (ae_discriminator_grads(t, x, B, s->step, NULL, lt)) {
        double dn = sqrt(grad_norm_sq(s->disc.params.grad, s->disc.params.total));
        if (!isfinite(lt->d_loss) || !isfinite(dn))
            return errorf(err, errlen, "the discriminator's loss is %g, its gradient norm %g at "
                          "step %ld", lt->d_loss, dn, s->step + 1);
        adam_step(&s->adam_disc, s->disc.params.data, s->disc.params.grad);
    } else {
        s->adam_disc.step++;  // the official optimiser stepped on a zero gradient (see lddgan.c)
    }
    s->step++;
    return 0;
}

// images [i0, i0 + n) of im in [-1, 1]
static void images_slice(const Images *im, int i0, int n, float *x) {
    size_t per = (size_t)im->c * im->h * im->w;
    for (size_t k = 0; k < (size_t)n * per; k++) x[k] = im->pixels[(size_t)i0 * per + k] / 127.5f - 1.0f;
}

// reconstructions from the posterior's mean, no dropout: rec (n, C, S, S)
static void ae_reconstruct(Autoencoder *a, const float *x, int n, float *rec) {
    const AEConfig *c = &a->cfg;
    int S = c->resolution, shape[4] = {n, c->in_channels, S, S};
    Graph g;
    graph_init(&g, 0, 0);
    g.grad_enabled = 0;
    Tensor *m = ae_encode(&g, a, tensor_from(&g, 4, shape, x));
    int zs[4] = {n, c->embed_dim, m->shape[2], m->shape[3]};
    Tensor *z = tensor_new(&g, 4, zs);
    size_t lper = (size_t)c->embed_dim * zs[2] * zs[3];
    for (int b = 0; b < n; b++)
        memcpy(z->data + b * lper, m->data + (size_t)b * 2 * lper, lper * sizeof(float));
    Tensor *y = ae_decode(&g, a, z);
    memcpy(rec, y->data, y->size * sizeof(float));
    graph_free(&g);
}

// held-out L1 per pixel and LPIPS per image of the reconstructions
// (lp NULL: *lpips = NAN)
static void ae_heldout(Autoencoder *a, Lpips *lp, const Images *im, int n, double *l1,
                       double *lpips) {
    int B = 32;
    size_t per = (size_t)im->c * im->h * im->w;
    float *x = mallocCheck((size_t)B * per * sizeof(float)), *r = mallocCheck((size_t)B * per * sizeof(float));
    double s1 = 0.0, sp = 0.0;
    Graph g;
    graph_init(&g, 0, 0);
    g.grad_enabled = 0;
    for (int i0 = 0; i0 < n; i0 += B) {
        int nb = n - i0 < B ? n - i0 : B, shape[4] = {nb, im->c, im->h, im->w};
        images_slice(im, i0, nb, x);
        ae_reconstruct(a, x, nb, r);
        for (size_t k = 0; k < (size_t)nb * per; k++) s1 += fabs((double)r[k] - x[k]);
        if (!lp) continue;
        graph_reset(&g);
        Tensor *tx = tensor_from(&g, 4, shape, x), *tr = tensor_from(&g, 4, shape, r);
        if (im->c == 1) {
            tx = concat_channels(&g, tx, concat_channels(&g, tx, tx));
            tr = concat_channels(&g, tr, concat_channels(&g, tr, tr));
        }
        Tensor *dist = lpips_distance(&g, lp, tr, tx, NULL);
        for (int b = 0; b < nb; b++) sp += dist->data[b];
    }
    graph_free(&g);
    free(x);
    free(r);
    *l1 = s1 / ((double)n * per);
    *lpips = lp ? sp / n : NAN;
}

// DIR/recon_STEP.png: n images of src in rows of up to 16, then their
// reconstructions in the same places below
static void ae_recon_grid(Autoencoder *a, const Images *src, int n, const char *dir, long step) {
    if (n > src->n) n = src->n;
    int C = src->c, S = src->h;
    size_t per = (size_t)C * S * S, hw = (size_t)S * S;
    float *x = mallocCheck((size_t)n * per * sizeof(float)), *r = mallocCheck((size_t)n * per * sizeof(float));
    images_slice(src, 0, n, x);
    ae_reconstruct(a, x, n, r);
    unsigned char *img = mallocCheck(2 * (size_t)n * per);
    for (int half = 0; half < 2; half++)
        for (int b = 0; b < n; b++)
            for (int c = 0; c < C; c++)
                for (size_t p = 0; p < hw; p++)
                    img[(((size_t)half * n + b) * hw + p) * C + c] =
                        to_u8((half ? r : x)[((size_t)b * C + c) * hw + p]);
    char path[4200];
    snprintf(path, sizeof path, "%s/recon_%06ld.png", dir, step);
    int cols = n < 16 ? n : 16;
    if (n % cols) {  // a partial row: the reconstructions start on a row of their own
        int rows = (n + cols - 1) / cols;
        unsigned char *padded = callocCheck(2 * (size_t)rows * cols * per, 1);
        memcpy(padded, img, (size_t)n * per);
        memcpy(padded + (size_t)rows * cols * per, img + (size_t)n * per, (size_t)n * per);
        free(img);
        img = padded;
        n = rows * cols;
    }
    write_grid_png_cols(path, img, 2 * n, cols, S, S, C);
    fprintf(stderr, "reconstructions: %s\n", path);
    free(x);
    free(r);
    free(img);
}

// scale_factor: the largest |z| of posterior samples of n training images,
// so that z / scale_factor lies in [-1, 1] (LDDGAN divides its latents by
// it, 105 for its CIFAR-10 model: the GAN's generator ends in tanh)
static float ae_measure_scale(Autoencoder *a, const Images *im, int n, Rng *rng, double *std) {
    if (n > im->n) n = im->n;
    int B = 32;
    size_t per = (size_t)im->c * im->h * im->w;
    float *x = mallocCheck((size_t)B * per * sizeof(float));
    double mx = 0.0, s = 0.0, s2 = 0.0, cnt = 0.0;
    Graph g;
    graph_init(&g, 0, 0);
    g.grad_enabled = 0;
    g.rng = rng;
    for (int i0 = 0; i0 < n; i0 += B) {
        int nb = n - i0 < B ? n - i0 : B, shape[4] = {nb, im->c, im->h, im->w};
        images_slice(im, i0, nb, x);
        graph_reset(&g);
        Tensor *z = gaussian_sample(&g, ae_encode(&g, a, tensor_from(&g, 4, shape, x)), NULL);
        for (size_t k = 0; k < z->size; k++) {
            double v = z->data[k];
            mx = fmax(mx, fabs(v));
            s += v;
            s2 += v * v;
            cnt += 1.0;
        }
    }
    graph_free(&g);
    free(x);
    double mean = s / cnt;
    *std = sqrt(fmax(0.0, s2 / cnt - mean * mean));
    return mx > 0.0 && isfinite(mx) ? (float)mx : 1.0f;
}

static void ae_log_row(FILE *log, const char *path, long step, const double *sum, int n,
                       double ips, double val_l1, double val_lpips) {
    fprintf(log, "%ld", step);
    for (int i = 0; i < 11; i++) {  // (no LPIPS: an empty field)
        if (isfinite(sum[i])) fprintf(log, ",%.6g", sum[i] / n);
        else fprintf(log, ",");
    }
    fprintf(log, ",%.3f,", ips);
    if (isfinite(val_l1)) fprintf(log, "%.6g,", val_l1);
    else fprintf(log, ",");
    if (isfinite(val_lpips)) fprintf(log, "%.6g", val_lpips);
    fprintf(log, "\n");
    if (fflush(log) != 0 || ferror(log)) fatal("cannot write '%s': %s", path, strerror(errno));
}

static int cmd_train_ae(int argc, char **argv) {
    AEOpts o;
    define_ae_options(&o);
    int pr = parse_options("train-ae", ae_opts_table, ae_opts_n, argc, argv, train_ae_help);
    if (pr) return PARSED_EXIT(pr);
    if (!o.data || (!o.lpips && o.perceptual_weight > 0)) {
        fprintf(stderr, "casdm train-ae: --data and --lpips are required (--lpips may be left out "
                        "with --perceptual-weight 0; see casdm train-ae --help)\n");
        return 2;
    }
    Lpips lpips;
    char err[600];
    lpips_init(&lpips);
    if (o.lpips && lpips_load(&lpips, o.lpips, err, sizeof err) != 0) fatal("--lpips: %s", err);
    lpips.max_pool = 1;  // taming's LPIPS: VGG16's own max pools, no resize
    lpips.size = 0;
    Dataset data, held;
    load_dataset(&data, o.data);
    const Images *im = &data.img;
    if (im->h != im->w || (im->c != 1 && im->c != 3))
        fatal("--data '%s': %dx%dx%d images; square, 1 or 3 channels", o.data, im->c, im->h, im->w);
    if (o.eval_data) {
        data_label = "--eval-data";
        load_dataset(&held, o.eval_data);
        if (held.img.c != im->c || held.img.h != im->h || held.img.w != im->w)
            fatal("--eval-data '%s' has %dx%dx%d images, --data %dx%dx%d", o.eval_data,
                  held.img.c, held.img.h, held.img.w, im->c, im->h, im->w);
    }
    if (patchgan_side(im->h, o.disc_layers) < 1)
        fatal("--disc-layers %d: %dx%d images are too small for so many stride-2 layers", o.disc_layers,
              im->h, im->w);
    AEConfig cfg;
    ae_config_from(&o, im->c, im->h, &cfg);
    AEState s;
    char ckpt[4200], log_path[4200], svg_path[4200], from[4200];
    make_dir(o.out);
    snprintf(ckpt, sizeof ckpt, "%s/ckpt.safetensors", o.out);
    snprintf(log_path, sizeof log_path, "%s/log.csv", o.out);
    snprintf(svg_path, sizeof svg_path, "%s/loss.svg", o.out);
    long saved_step = -1;
    if (o.resume) {
        snprintf(from, sizeof from, "%s/ckpt.safetensors", o.resume);
        ae_state_load(&s, &o, &cfg, from);
        fprintf(stderr, "resumed from %s at step %ld\n", from, s.step);
        if (strcmp(from, ckpt) == 0) saved_step = s.step;
        snprintf(from, sizeof from, "%s/log.csv", o.resume);
    } else {
        ae_state_init(&s, &cfg, &o);
    }
    History hist = {0};
    hist.layout = &log_layout_ae;
    carry_log(o.resume ? from : NULL, log_path, s.step, &hist, &log_layout_ae);
    FILE *log = fopen(log_path, "a");
    if (!log) fatal("cannot write '%s': %s", log_path, strerror(errno));
    AELossConfig lc;
    ae_loss_default(&lc);
    lc.kl_weight = (float)o.kl_weight;
    lc.disc_weight = (float)o.disc_weight;
    lc.disc_factor = (float)o.disc_factor;
    lc.disc_start = o.disc_start;
    lc.perceptual_weight = (float)o.perceptual_weight;
    lpips.head_dropout = (float)o.lpips_dropout;
    AETrainer t;
    ae_trainer_init(&t, &s.ae, &s.disc, o.lpips ? &lpips : NULL, &lc, &s.rng);
    fprintf(stderr,
            "casdm train-ae: %d images %dx%dx%d from %s; autoencoder %zu parameters (latent "
            "%dx%dx%d), discriminator %zu; lr %.3g; GAN terms from step %d; %s, %d threads\n",
            im->n, im->c, im->h, im->w, o.data, s.ae.params.total, cfg.embed_dim,
            im->h >> (cfg.n_levels - 1), im->h >> (cfg.n_levels - 1), s.disc.params.total,
            s.adam_ae.lr, o.disc_start, gemm_backend_name(), pool_threads());
    float *x = mallocCheck((size_t)o.batch * im->c * im->h * im->w * sizeof(float));
    const Images *grid_src = o.eval_data ? &held.img : im;
    int eval_n = o.eval_data ? (o.eval_n < held.img.n ? o.eval_n : held.img.n) : 0;
    catch_signals();
    int tty = isatty(2), timed_out = 0, nsum = 0;
    long step0 = s.step;
    double sums[11] = {0}, t0 = now_seconds(), t_row = t0, final_l1 = NAN, final_lpips = NAN;
    while (s.step < o.steps && !interrupted &&
           !(timed_out = o.time_limit > 0 && now_seconds() - t0 >= o.time_limit)) {
        AELossTerms lt;
        if (ae_train_step(&s, &t, &data, &o, o.flip, x, &lt, err, sizeof err) != 0) {
            if (tty) fprintf(stderr, "\n");
            stop_run(err, ckpt, saved_step);
        }
        double v[11] = {lt.loss, lt.l1, lt.lpips, lt.nll, lt.kl, lt.logvar, lt.g_loss, lt.d_weight,
                        lt.d_loss, lt.logits_real, lt.logits_fake};
        for (int i = 0; i < 11; i++) sums[i] += v[i];
        nsum++;
        int more = s.step < o.steps;
        // grids and held-out scores every --sample-every steps and at the last
        int grid = !interrupted &&
                   ((o.sample_every > 0 && s.step % o.sample_every == 0) || s.step == o.steps);
        double val_l1 = NAN, val_lpips = NAN, t_aside = now_seconds();
        if (grid) {
            if (tty) fprintf(stderr, "\n");
            if (o.sample_n > 0) ae_recon_grid(&s.ae, grid_src, o.sample_n, o.out, s.step);
            if (eval_n > 0) {
                ae_heldout(&s.ae, o.lpips ? &lpips : NULL, &held.img, eval_n, &val_l1, &val_lpips);
                fprintf(stderr, "held-out (%d images): L1 %.4f, LPIPS %.4f\n", eval_n, val_l1,
                        val_lpips);  // (nan without --lpips)
                final_l1 = val_l1;
                final_lpips = val_lpips;
            }
        }
        t_row += now_seconds() - t_aside;
        int last = s.step == o.steps || interrupted ||
                   (o.time_limit > 0 && now_seconds() - t0 >= o.time_limit);
        if (s.step % o.log_every == 0 || last || isfinite(val_l1)) {
            double now = now_seconds(), ips = nsum * o.batch / (now - t_row);
            ae_log_row(log, log_path, s.step, sums, nsum, ips, val_l1, val_lpips);
            double row[HISTORY_COLS] = {sums[3] / nsum, sums[4] / nsum, sums[1] / nsum,
                                        sums[2] / nsum, s.step > o.disc_start ? sums[8] / nsum : NAN,
                                        val_l1};
            history_add(&hist, s.step, row);
            char title[300];
            snprintf(title, sizeof title, "casdm train-ae (%s)", o.data);
            if (write_loss_svg(svg_path, &hist, NULL, 1, title, err, sizeof err) != 0)
                fatal("%s", err);
            double el = now - t0, eta = el / (double)(s.step - step0) * (double)(o.steps - s.step);
            fprintf(stderr,
                    "%sstep %ld/%d nll %.2f l1 %.4f lpips %.4f kl %.1f g %.3f d_weight %.3g "
                    "d_loss %.4f | %.2f img/s | %.0fs elapsed, ETA %.0fs%s",
                    tty ? "\r" : "", s.step, o.steps, sums[3] / nsum, sums[1] / nsum,
                    sums[2] / nsum, sums[4] / nsum, sums[6] / nsum, sums[7] / nsum,
                    sums[8] / nsum, ips, el, eta, tty ? "   " : "\n");
            memset(sums, 0, sizeof sums);
            nsum = 0;
            t_row = now;
        }
        if (o.ckpt_every > 0 && s.step % o.ckpt_every == 0 && more) {
            if (ae_state_save(&s, &o, ckpt, err, sizeof err) != 0) stop_run(err, ckpt, saved_step);
            saved_step = s.step;
        }
    }
    if (tty) fprintf(stderr, "\n");
    if (timed_out && !interrupted) {  // --time-limit: the last step had no grid
        if (o.sample_n > 0) ae_recon_grid(&s.ae, grid_src, o.sample_n, o.out, s.step);
        if (eval_n > 0) ae_heldout(&s.ae, o.lpips ? &lpips : NULL, &held.img, eval_n, &final_l1,
                                   &final_lpips);
    }
    if (!interrupted && o.scale_n > 0) {
        double std;
        Rng scale_rng;  // its own stream: the training one (and a resume) stays as it was
        rng_seed(&scale_rng, (uint64_t)o.seed, 11);
        s.ae.scale_factor = ae_measure_scale(&s.ae, im, o.scale_n, &scale_rng, &std);
        fprintf(stderr, "latent scale: max |z| %.4g over %d images (std %.4g): scale_factor %.4g\n",
                s.ae.scale_factor, o.scale_n < im->n ? o.scale_n : im->n, std, s.ae.scale_factor);
    }
    // (always: the scale factor was just measured, and a resume to the same step saves too)
    if (ae_state_save(&s, &o, ckpt, err, sizeof err) != 0) stop_run(err, ckpt, saved_step);
    if (interrupted)
        fprintf(stderr, "interrupted (%s) at step %ld: wrote %s\n",
                interrupted == SIGTERM ? "SIGTERM" : "SIGINT", s.step, ckpt);
    else
        fprintf(stderr, "%s at step %ld: wrote %s\n", timed_out ? "time limit reached" : "done",
                s.step, ckpt);
    if (isfinite(final_l1)) {
        if (o.lpips)
            printf("held-out L1 %.4f, LPIPS %.4f (%d images of %s)\n", final_l1, final_lpips,
                   eval_n, o.eval_data);
        else
            printf("held-out L1 %.4f (%d images of %s)\n", final_l1, eval_n, o.eval_data);
        fflush(stdout);
    }
    if (hist.n) fprintf(stderr, "loss plot: %s\n", svg_path);
    history_free(&hist);
    fclose(log);
    free(x);
    ae_trainer_free(&t);
    ae_state_free(&s);
    lpips_free(&lpips);
    images_free(&data.img);
    if (o.eval_data) images_free(&held.img);
    return interrupted ? interrupted_status() : 0;
}

// ---------------------------------------------------------------------------
// ---- casdm train --model lddgan --ae FILE | --model ddgan: stage two ----
// train_ldgan.py (LDDGAN) and train_ddgan.py (DDGAN) as one GPU runs them:
// each iteration a D step (R1 on every --lazy-reg-th) and a G step on the
// same batch, Adam (0.5, 0.9) for each, the EMA of G after its step
// (lddgan.c's gan_iteration). lddgan trains on the frozen autoencoder's
// posterior samples / scale_factor, drawn per batch as the code does; ddgan
// on the pixels. An epoch is a fresh permutation of the data in floor(N /
// batch) iterations (drop_last); Weighted Learning's alpha is the epoch's.
// Noise in the code's order (facts 4.3): the latent's sample, then per step
// t, eps1, eps2, z and the posterior's eps.
// The checkpoint holds the EMA generator at the top level (what casdm sample
// uses: netG_*.pth's role), the raw one under netG., D under netD., both
// Adam states, the step and RNG, and names the autoencoder by path and hash.
// ---------------------------------------------------------------------------
typedef struct {
    const char *model, *data, *ae, *ch_mult, *attn, *rec_loss, *out, *resume;
    int nf, res, nz, zdim, n_mlp, ngf, t_emb_dim, disc_layers, T;
    int epochs, steps, batch, seed, lazy_reg, flip;
    double scale_factor, r1_gamma, lr_g, lr_d, ema, beta_min, beta_max, time_limit;
    int log_every, ckpt_every, sample_every, sample_n;
} GanOpts;

typedef struct {
    int lddgan;               // latent space (else pixels)
    GanConfig cfg;
    GanSchedule sched;
    GanGen G;
    GanDisc D;
    GanOptim opt;
    Rng rng;
    long step;
    int iters_per_epoch;
    Autoencoder ae;           // lddgan: frozen, eval mode
    float scale;              // latents = posterior sample / scale
    uint64_t ae_hash;
    const char *ae_path;      // as given, or as the resumed checkpoint names it
} GanState;

static Option gan_opts_table[48];
static int gan_opts_n;

static void train_gan_help(FILE *f) {
    fputs("usage: casdm train --model lddgan --data PATH --ae FILE [options]\n"
          "       casdm train --model ddgan --data PATH [options]\n\n"
          "Trains LDDGAN's denoising-diffusion GAN: a conditional generator that makes T large\n"
          "denoising steps (T = 4), against a time-conditioned discriminator, in the latent\n"
          "space of an autoencoder from casdm train-ae (lddgan), or in pixel space as DDGAN,\n"
          "the paper's baseline (ddgan). The defaults are the papers' CIFAR-10 settings\n"
          "(LDDGAN's run.sh; DDGAN's readme for ddgan), adapted to the data's shape.\n"
          "Writes DIR/ckpt.safetensors (for casdm sample; the EMA generator, and all to go\n"
          "on), DIR/log.csv, DIR/loss.svg and DIR/sample_STEP.png (the raw generator, as the\n"
          "official per-epoch samples). Ctrl-C saves and stops; --resume DIR continues bit\n"
          "for bit.\n\noptions:\n",
          f);
    usage_options(f, gan_opts_table, gan_opts_n);
}

static void define_gan_options(GanOpts *o) {
    const Option opts[] = {
        {"--model", OPT_STR, &o->model, NULL, "lddgan or ddgan", 0, 0},
        {"--data", OPT_STR, &o->data, NULL, "training images (CIFAR-10, IDX or an image folder)",
         0, 0},
        {"--ae", OPT_STR, &o->ae, NULL,
         "lddgan: the autoencoder (casdm train-ae, tools/convert_autoencoder.py)", 0, 0},
        {"--scale-factor", OPT_FLOAT, &o->scale_factor, "0",
         "lddgan: latents = sample / this (0: the autoencoder file's; LDDGAN CIFAR-10 105)", 0,
         1e9},
        {"--nf", OPT_INT, &o->nf, "0", "generator base channels, num_channels_dae (0: 128)", 0,
         4096},
        {"--ch-mult", OPT_STR, &o->ch_mult, "", "generator multipliers (lddgan 1,2,2; ddgan 1,2,2,2)",
         0, 0},
        {"--num-res-blocks", OPT_INT, &o->res, "0", "ResBlocks per level (0: 2)", 0, 8},
        {"--attn", OPT_STR, &o->attn, "",
         "sides with attention, or none (lddgan: none, 32 in run.sh; ddgan 16); the middle "
         "block always has it", 0, 0},
        {"--nz", OPT_INT, &o->nz, "0", "latent z size (0: lddgan 50, ddgan 100)", 0, 4096},
        {"--z-emb-dim", OPT_INT, &o->zdim, "0", "z embedding size (0: 256)", 0, 4096},
        {"--n-mlp", OPT_INT, &o->n_mlp, "-1", "z mapping layers after the first (-1: 4)", -1,
         GAN_GEN_MAX_MLP - 1},
        {"--ngf", OPT_INT, &o->ngf, "0", "discriminator base channels (0: 64)", 0, 4096},
        {"--t-emb-dim", OPT_INT, &o->t_emb_dim, "0", "discriminator time embedding (0: 256)", 0,
         4096},
        {"--disc-layers", OPT_INT, &o->disc_layers, "0",
         "discriminator blocks (0: lddgan 3, ddgan 4)", 0, GAN_DISC_MAX_BLOCKS},
        {"--T", OPT_INT, &o->T, "4", "denoising steps, num_timesteps", 1, GAN_MAX_T},
        {"--beta-min", OPT_FLOAT, &o->beta_min, "0.1", "VP schedule beta_min", 1e-6, 1000},
        {"--beta-max", OPT_FLOAT, &o->beta_max, "20", "VP schedule beta_max", 1e-6, 1000},
        {"--epochs", OPT_INT, &o->epochs, "0",
         "Weighted Learning's E (0: lddgan 2000, ddgan 1800); the run is epochs 0..E", 0,
         1000000},
        {"--steps", OPT_INT, &o->steps, "0", "iterations in all (0: E + 1 epochs)", 0,
         1000000000},
        {"--batch", OPT_INT, &o->batch, "256", "batch size", 1, 4096},
        {"--lr-g", OPT_FLOAT, &o->lr_g, "1.6e-4", "generator Adam learning rate", 0, 1},
        {"--lr-d", OPT_FLOAT, &o->lr_d, "1.25e-4", "discriminator Adam learning rate", 0, 1},
        {"--r1-gamma", OPT_FLOAT, &o->r1_gamma, "0.02", "R1 penalty weight gamma", 0, 1e6},
        {"--lazy-reg", OPT_INT, &o->lazy_reg, "15", "R1 on iterations 0, N, 2N, ...", 1,
         1000000},
        {"--ema", OPT_FLOAT, &o->ema, "0.9999", "EMA decay of the generator", 0, 1},
        {"--rec-loss", OPT_STR, &o->rec_loss, NULL,
         "sigmoid (Weighted Learning's L1, lddgan's default) or none (ddgan's)", 0, 0},
        {"--seed", OPT_INT, &o->seed, "0", "random seed", 0, 2147483647},
        {"--flip", OPT_FLAG, &o->flip, NULL, "random horizontal flips (the CIFAR-10 recipe)", 0,
         0},
        {"--time-limit", OPT_FLOAT, &o->time_limit, "0",
         "stop after this many seconds of training (0 = no limit)", 0, 1e9},
        {"--out", OPT_STR, &o->out, "runs/train-gan", "output directory", 0, 0},
        {"--resume", OPT_STR, &o->resume, NULL, "continue from DIR/ckpt.safetensors", 0, 0},
        {"--log-every", OPT_INT, &o->log_every, "10", "iterations per line of log.csv", 1,
         1000000},
        {"--ckpt-every", OPT_INT, &o->ckpt_every, "1000",
         "iterations between checkpoints (0 = only at the end)", 0, 1000000000},
        {"--sample-every", OPT_INT, &o->sample_every, "0",
         "iterations between sample grids (0 = only at the end)", 0, 1000000000},
        {"--sample-n", OPT_INT, &o->sample_n, "16", "images in each grid (0 = none)", 0, 1024},
    };
    gan_opts_n = (int)(sizeof opts / sizeof opts[0]);
    memcpy(gan_opts_table, opts, sizeof opts);
}

// the configuration the options give for images of C channels, side S (the
// latent's for lddgan)
static void gan_config_from(const GanOpts *o, int lddgan, int C, int S, GanConfig *c) {
    if (lddgan) gan_config_lddgan_cifar10(c);
    else gan_config_ddgan_cifar10(c);
    GanGenConfig *g = &c->gen;
    g->channels = C;
    g->image_size = S;
    if (o->nf) g->nf = o->nf;
    if (o->res) g->num_res_blocks = o->res;
    if (o->nz) g->nz = o->nz;
    if (o->zdim) g->zdim = o->zdim;
    if (o->n_mlp >= 0) g->n_mlp = o->n_mlp;
    if (o->ngf) c->ngf = o->ngf;
    if (o->t_emb_dim) c->t_emb_dim = o->t_emb_dim;
    if (o->disc_layers) c->disc_layers = o->disc_layers;
    c->T = o->T;
    c->beta_min = o->beta_min;
    c->beta_max = o->beta_max;
    if (o->ch_mult[0]) {
        int m[GAN_GEN_MAX_LEVELS], n = int_list_parse(o->ch_mult, m, GAN_GEN_MAX_LEVELS);
        if (n < 1) fatal("--ch-mult '%s' is not a list such as 1,2,2 (at most %d levels)",
                         o->ch_mult, GAN_GEN_MAX_LEVELS);
        memset(g->ch_mult, 0, sizeof g->ch_mult);
        memcpy(g->ch_mult, m, (size_t)n * sizeof *m);
        g->n_levels = n;
    }
    if (strcmp(o->attn, "none") == 0) {
        g->n_attn = 0;
    } else if (o->attn[0]) {
        int a[GAN_GEN_MAX_LEVELS], n = int_list_parse(o->attn, a, GAN_GEN_MAX_LEVELS);
        if (n < 1) fatal("--attn '%s' is not a list of sides such as 16, or none", o->attn);
        memset(g->attn_resolutions, 0, sizeof g->attn_resolutions);
        memcpy(g->attn_resolutions, a, (size_t)n * sizeof *a);
        g->n_attn = n;
    }
    char why[256];
    if (gan_config_check(c, why, sizeof why) != 0)
        fatal("%s %dx%dx%d with --nf/--ch-mult/--num-res-blocks/--disc-layers...: %s",
              lddgan ? "latents" : "--data images", C, S, S, why);
}

static int rec_loss_on(const GanOpts *o, int lddgan) {
    if (!o->rec_loss) return lddgan;
    if (strcmp(o->rec_loss, "sigmoid") == 0) return 1;
    if (strcmp(o->rec_loss, "none") == 0) return 0;
    fatal("--rec-loss '%s' is not sigmoid or none", o->rec_loss);
    return 0;
}

static int gan_epochs(const GanOpts *o, int lddgan) {
    return o->epochs ? o->epochs : lddgan ? 2000 : 1800;  // run.sh; DDGAN's readme
}

// the options that define the run's loss and data order (RunOption: checked on resume)
static int gan_run_options(const GanOpts *o, int lddgan, RunOption *out) {
    const RunOption v[] = {
        {"r1_gamma", "--r1-gamma", o->r1_gamma},
        {"lazy_reg", "--lazy-reg", o->lazy_reg},
        {"rec_loss", "--rec-loss", rec_loss_on(o, lddgan)},
        {"num_epoch", "--epochs", gan_epochs(o, lddgan)},
        {"ema_decay", "--ema", o->ema},
        {"batch_size", "--batch", o->batch},
        {"seed", "--seed", o->seed},
        {"flip", "--flip", o->flip},
    };
    memcpy(out, v, sizeof v);
    return (int)(sizeof v / sizeof v[0]);
}

// Everything the run needs to go on, atomically; -1 with a message (the file
// at path untouched) on a write error or a value that is not finite
static int gan_state_save(const GanState *s, const GanOpts *o, const char *path, char *err,
                          size_t errlen) {
    const ParamSet *G = &s->G.params, *D = &s->D.params;
    const float *ema = s->opt.ema ? s->opt.ema : G->data;  // (before the first step: G itself)
    const float *gbufs[4] = {G->data, ema, s->opt.adam_g.m, s->opt.adam_g.v};
    const float *dbufs[3] = {D->data, s->opt.adam_d.m, s->opt.adam_d.v};
    for (int b = 0; b < 4; b++)
        if (first_nonfinite(gbufs[b], G->total) < G->total)
            return errorf(err, errlen, "not saving step %ld: the generator holds NaN or Inf values",
                          s->step);
    for (int b = 0; b < 3; b++)
        if (first_nonfinite(dbufs[b], D->total) < D->total)
            return errorf(err, errlen,
                          "not saving step %ld: the discriminator holds NaN or Inf values", s->step);
    // the EMA generator, then netG., netD., and the moments of each
    struct { const ParamSet *ps; const float *base; const char *prefix; } parts[7] = {
        {G, ema, ""},           {G, G->data, "netG."},          {D, D->data, "netD."},
        {G, s->opt.adam_g.m, "adam_m.netG."}, {G, s->opt.adam_g.v, "adam_v.netG."},
        {D, s->opt.adam_d.m, "adam_m.netD."}, {D, s->opt.adam_d.v, "adam_v.netD."}};
    size_t n = 4 * G->count + 3 * D->count, k = 0;
    StWrite *w = mallocCheck(n * sizeof *w);
    char *names = mallocCheck(n * 320), *nm = names;
    for (int p = 0; p < 7; p++) {
        size_t off = 0;
        for (size_t i = 0; i < parts[p].ps->count; i++, k++, nm += 320) {
            const Tensor *t = &parts[p].ps->t[i];
            snprintf(nm, 320, "%s%s", parts[p].prefix, t->name);
            w[k] = (StWrite){nm, t->ndim, t->shape, parts[p].base + off};
            off += t->size;
        }
    }
    char kv[GAN_CONFIG_KEYS + 40][2][64];
    int m = gan_config_meta(&s->cfg, kv);
#define GAN_META(key, ...)                            \
    do {                                              \
        snprintf(kv[m][0], 64, "%s", key);            \
        snprintf(kv[m][1], 64, __VA_ARGS__);          \
        m++;                                          \
    } while (0)
    GAN_META("checkpoint", "casdm-train-gan-1");
    GAN_META("model", "%s", s->lddgan ? "lddgan" : "ddgan");
    GAN_META("step", "%ld", s->step);
    GAN_META("adam_step_g", "%ld", s->opt.adam_g.step);
    GAN_META("adam_step_d", "%ld", s->opt.adam_d.step);
    GAN_META("lr_g", "%.9g", s->opt.adam_g.lr);
    GAN_META("lr_d", "%.9g", s->opt.adam_d.lr);
    GAN_META("ema_started", "%d", s->opt.ema != NULL);
    GAN_META("rng_state", "%016llx", (unsigned long long)s->rng.state);
    GAN_META("rng_inc", "%016llx", (unsigned long long)s->rng.inc);
    GAN_META("iters_per_epoch", "%d", s->iters_per_epoch);
    if (s->lddgan) {
        GAN_META("scale_factor", "%.9g", s->scale);
        GAN_META("ae_hash", "%016llx", (unsigned long long)s->ae_hash);
    }
    RunOption ro[16];
    int nro = gan_run_options(o, s->lddgan, ro);
    for (int i = 0; i < nro; i++) GAN_META(ro[i].key, "%.9g", ro[i].value);
#undef GAN_META
    const char *meta[2 * (GAN_CONFIG_KEYS + 40) + 3];
    int nmeta = 0;
    for (int i = 0; i < m; i++) {
        meta[nmeta++] = kv[i][0];
        meta[nmeta++] = kv[i][1];
    }
    if (s->lddgan) {  // (a path may be longer than the 64 of the others)
        meta[nmeta++] = "ae_file";
        meta[nmeta++] = s->ae_path;
    }
    meta[nmeta] = NULL;
    int rc = st_write(path, w, k, meta, err, errlen);
    free(names);
    free(w);
    return rc;
}

// a resumed run's options against its checkpoint: the configuration (T
// named), the loss and data options; the learning rates may change (a notice)
static void gan_check_resume(const StFile *f, const char *path, const GanOpts *o, int lddgan,
                             const GanConfig *want) {
    char err[600];
    GanConfig got;
    if (gan_config_read(f, path, &got, err, sizeof err) != 0) fatal("--resume: %s", err);
    if (got.T != want->T)
        fatal("--resume: '%s' was trained with --T %d; this run asks for --T %d", path, got.T,
              want->T);
    GanConfig w = *want;  // (unused list entries compared as zero)
    for (int l = w.gen.n_levels; l < GAN_GEN_MAX_LEVELS; l++) w.gen.ch_mult[l] = 0;
    for (int l = w.gen.n_attn; l < GAN_GEN_MAX_LEVELS; l++) w.gen.attn_resolutions[l] = 0;
    for (int l = got.gen.n_attn; l < GAN_GEN_MAX_LEVELS; l++) got.gen.attn_resolutions[l] = 0;
    if (memcmp(&got.gen, &w.gen, sizeof w.gen) != 0 || got.ngf != w.ngf ||
        got.t_emb_dim != w.t_emb_dim || got.disc_layers != w.disc_layers ||
        (float)got.beta_min != (float)w.beta_min || (float)got.beta_max != (float)w.beta_max)
        fatal("--resume: '%s' holds another architecture or schedule than the options and the "
              "data give (generator nf %d, %d levels, nz %d on %dx%dx%d; discriminator ngf %d, "
              "%d layers)", path, got.gen.nf, got.gen.n_levels, got.gen.nz, got.gen.channels,
              got.gen.image_size, got.gen.image_size, got.ngf, got.disc_layers);
    RunOption ro[16];
    resume_check_options(f, path, ro, gan_run_options(o, lddgan, ro), "the loss and the data order");
}

static void gan_state_init(GanState *s, const GanOpts *o) {
    rng_seed(&s->rng, (uint64_t)o->seed, 0);
    gan_gen_init(&s->G, &s->cfg.gen, 1, &s->rng);
    gan_disc_init(&s->D, 2 * s->cfg.gen.channels, s->cfg.ngf, s->cfg.t_emb_dim,
                  s->cfg.disc_layers, 1, &s->rng);
    gan_optim_init(&s->opt, &s->G, &s->D, o->lr_g, o->lr_d, o->ema);
}

// the run in a checkpoint of casdm train --model lddgan/ddgan (checked by
// gan_check_resume); every tensor is checked on its layout before loading
static void gan_state_load(GanState *s, const GanOpts *o, const StFile *f, const char *path) {
    char err[600];
    int rc = gan_gen_load_st(&s->G, &s->cfg, 1, f, path, "netG.", err, sizeof err);
    if (!rc) rc = gan_disc_load_st(&s->D, &s->cfg, 1, f, path, "netD.", err, sizeof err);
    if (rc) fatal("--resume: %s", err);
    gan_optim_init(&s->opt, &s->G, &s->D, o->lr_g, o->lr_d, o->ema);
    s->step = resume_meta_long(f, path, "step", 0, LOG_MAX_STEP);
    if (resume_meta_long(f, path, "ema_started", 0, 1)) {
        s->opt.ema = mallocCheck(s->G.params.total * sizeof(float));
        rc = load_tensors(&s->G.params, f, path, "", s->opt.ema, err, sizeof err);
    }
    if (!rc) rc = load_tensors(&s->G.params, f, path, "adam_m.netG.", s->opt.adam_g.m, err, sizeof err);
    if (!rc) rc = load_tensors(&s->G.params, f, path, "adam_v.netG.", s->opt.adam_g.v, err, sizeof err);
    if (!rc) rc = load_tensors(&s->D.params, f, path, "adam_m.netD.", s->opt.adam_d.m, err, sizeof err);
    if (!rc) rc = load_tensors(&s->D.params, f, path, "adam_v.netD.", s->opt.adam_d.v, err, sizeof err);
    if (rc) fatal("--resume: %s", err);
    s->opt.adam_g.step = resume_meta_long(f, path, "adam_step_g", 0, s->step);
    s->opt.adam_d.step = resume_meta_long(f, path, "adam_step_d", 0, s->step);
    resume_rng(f, path, &s->rng);
    char buf[64];
    if (st_meta(f, "lr_g", buf, sizeof buf) == 0 && (float)strtod(buf, NULL) != (float)o->lr_g)
        fprintf(stderr, "notice: --lr-g %g (the checkpoint's run had %s)\n", o->lr_g, buf);
    if (st_meta(f, "lr_d", buf, sizeof buf) == 0 && (float)strtod(buf, NULL) != (float)o->lr_d)
        fprintf(stderr, "notice: --lr-d %g (the checkpoint's run had %s)\n", o->lr_d, buf);
}

static void gan_state_free(GanState *s) {
    gan_gen_free(&s->G);
    gan_disc_free(&s->D);
    gan_optim_free(&s->opt);
    if (s->lddgan) ae_free(&s->ae);
}

// lddgan's autoencoder: from --ae, or the one the resumed checkpoint names
// (whose hash it must have); its images must be the data's. Sets the latent
// scale: --scale-factor, the checkpoint's, the file's, or (a file without
// one) max |z| measured on the data as casdm train-ae does.
static void gan_open_ae(GanState *s, const GanOpts *o, const StFile *ck, const char *ck_path,
                        const Images *im) {
    char err[600], buf[4200];
    s->ae_path = o->ae;
    if (!s->ae_path && ck && st_meta(ck, "ae_file", buf, sizeof buf) == 0) {
        static char named[4200];
        snprintf(named, sizeof named, "%s", buf);
        s->ae_path = named;
    }
    if (!s->ae_path)
        fatal("--model lddgan needs --ae FILE: the autoencoder of casdm train-ae (or "
              "tools/convert_autoencoder.py) whose latent space the GAN learns");
    if (ae_load(&s->ae, s->ae_path, 0, err, sizeof err) != 0) fatal("--ae: %s", err);
    const AEConfig *c = &s->ae.cfg;
    if (c->in_channels != im->c || c->resolution != im->h)
        fatal("--ae '%s' takes %dx%dx%d images; --data has %dx%dx%d", s->ae_path, c->in_channels,
              c->resolution, c->resolution, im->c, im->h, im->w);
    s->ae_hash = params_hash(&s->ae.params);
    if (ck) {
        uint64_t want;
        if (meta_hex64(ck, ck_path, "ae_hash", &want, err, sizeof err) != 0) fatal("--resume: %s", err);
        if (want != s->ae_hash)
            fatal("--ae '%s' is not the autoencoder '%s' was trained with (its weights differ)",
                  s->ae_path, ck_path);
        if (st_meta(ck, "scale_factor", buf, 64) != 0 || !(strtod(buf, NULL) > 0))
            fatal("--resume: '%s' has no positive scale_factor", ck_path);
        s->scale = (float)strtod(buf, NULL);
        if (o->scale_factor > 0 && (float)o->scale_factor != s->scale)
            fatal("--resume: '%s' was trained with --scale-factor %s; this run asks for %g",
                  ck_path, buf, o->scale_factor);
        return;
    }
    s->scale = o->scale_factor > 0 ? (float)o->scale_factor : s->ae.scale_factor;
    if (o->scale_factor == 0 && s->ae.scale_factor == 1.0f) {
        Rng r;
        double sd;
        rng_seed(&r, (uint64_t)o->seed, 11);
        s->scale = ae_measure_scale(&s->ae, im, 1000, &r, &sd);
        fprintf(stderr, "--ae '%s' has no scale_factor: max |z| over 1000 images, %.4g\n",
                s->ae_path, s->scale);
    }
}

// The iteration's x0: batch (step mod epoch) of the epoch's permutation of
// the data (its own stream per epoch, so a resume rebuilds it), flips from
// the run's stream; for lddgan encoded, sampled and divided by the scale
typedef struct {
    uint32_t *perm;
    long epoch;               // of perm (-1: none yet)
    float *x;                 // (B, C, H, W) images
    Graph g;                  // the encoder's, no tape
} GanData;

static void gan_batch(GanState *s, const Images *im, const GanOpts *o, GanData *d, float *x0) {
    long epoch = s->step / s->iters_per_epoch;
    int k = (int)(s->step % s->iters_per_epoch), B = o->batch;
    if (d->epoch != epoch) {  // Fisher-Yates on stream 2^32 + epoch
        Rng pr;
        rng_seed(&pr, (uint64_t)o->seed, (1ull << 32) + (uint64_t)epoch);
        for (uint32_t i = 0; i < (uint32_t)im->n; i++) d->perm[i] = i;
        for (uint32_t i = (uint32_t)im->n - 1; i > 0; i--) {
            uint32_t j = rng_below(&pr, i + 1), t = d->perm[i];
            d->perm[i] = d->perm[j];
            d->perm[j] = t;
        }
        d->epoch = epoch;
    }
    size_t per = (size_t)im->c * im->h * im->w;
    float *dst = s->lddgan ? d->x : x0;
    for (int b = 0; b < B; b++) {
        int fl = o->flip ? (int)(rng_u32(&s->rng) & 1) : 0;
        image_to_float(im, d->perm[(size_t)k * B + b], fl, dst + (size_t)b * per);
    }
    if (!s->lddgan) return;
    int xs[4] = {B, im->c, im->h, im->w};
    graph_reset(&d->g);
    d->g.rng = &s->rng;  // train_ldgan.py:204-208: AE.encode(x).sample() / scale_factor
    Tensor *z = gaussian_sample(&d->g, ae_encode(&d->g, &s->ae, tensor_from(&d->g, 4, xs, d->x)),
                                NULL);
    for (size_t i = 0; i < z->size; i++) x0[i] = z->data[i] / s->scale;
}

// one step's t and noise, in the code's order (:215-236)
typedef struct {
    int *t;
    float *eps1, *eps2, *z, *eps_post;
} GanDraw;

static void gan_draw_alloc(GanDraw *d, int n, size_t per, int nz) {
    d->t = mallocCheck((size_t)n * sizeof(int));
    d->eps1 = mallocCheck(((size_t)n * (3 * per + (size_t)nz)) * sizeof(float));
    d->eps2 = d->eps1 + (size_t)n * per;
    d->z = d->eps2 + (size_t)n * per;
    d->eps_post = d->z + (size_t)n * nz;
}

static void gan_draw_free(GanDraw *d) {
    free(d->t);
    free(d->eps1);
}

static GanNoise gan_draw(GanDraw *d, Rng *r, int T, int n, size_t per, int nz) {
    for (int i = 0; i < n; i++) d->t[i] = (int)rng_below(r, (uint32_t)T);
    rng_fill_normal(r, d->eps1, (size_t)n * per, 0.0f, 1.0f);
    rng_fill_normal(r, d->eps2, (size_t)n * per, 0.0f, 1.0f);
    rng_fill_normal(r, d->z, (size_t)n * nz, 0.0f, 1.0f);
    rng_fill_normal(r, d->eps_post, (size_t)n * per, 0.0f, 1.0f);
    return (GanNoise){d->eps1, d->eps2, d->z, d->eps_post};
}

// n images from G (EMA or raw weights in G) into out, uint8 (N, H, W, C):
// sample_from_model's T calls from x_T ~ N(0, I), then for lddgan
// decode(x * scale) (test_ldgan.py), clamped to [-1, 1]. Noise: x_T, then
// per call z and eps. Progress per batch (tty as sample_images); 0, 1 when
// an image is not finite, -1 when a signal asked to stop.
static int gan_generate(GanGen *G, const GanSchedule *sch, Autoencoder *ae, float scale,
                        Rng *rng, int n, int batch, unsigned char *out, int tty) {
    const GanGenConfig *c = &G->cfg;
    int T = sch->T, rc = 0;
    size_t per = (size_t)c->channels * c->image_size * c->image_size;
    int C = ae ? ae->cfg.out_ch : c->channels, S = ae ? ae->cfg.resolution : c->image_size;
    size_t pix = (size_t)C * S * S;
    float *x = mallocCheck((size_t)batch * per * sizeof(float));
    float *z = mallocCheck((size_t)T * batch * c->nz * sizeof(float));
    float *eps = mallocCheck((size_t)T * batch * per * sizeof(float));
    Graph g;
    graph_init(&g, 0, 0);
    g.grad_enabled = 0;
    Progress pr;
    progress_start(&pr, tty);
    for (int done = 0; done < n && rc == 0; done += batch) {
        int B = n - done < batch ? n - done : batch;
        rng_fill_normal(rng, x, (size_t)B * per, 0.0f, 1.0f);
        for (int k = 0; k < T; k++) {
            rng_fill_normal(rng, z + (size_t)k * B * c->nz, (size_t)B * c->nz, 0.0f, 1.0f);
            rng_fill_normal(rng, eps + (size_t)k * B * per, (size_t)B * per, 0.0f, 1.0f);
        }
        graph_reset(&g);
        gan_sample(&g, G, sch, x, B, z, eps, x);
        const float *img = x;
        if (ae) {
            int zs[4] = {B, c->channels, c->image_size, c->image_size};
            Tensor *lat = tensor_from(&g, 4, zs, x);
            for (size_t i = 0; i < lat->size; i++) lat->data[i] *= scale;
            img = ae_decode(&g, ae, lat)->data;
        }
        if (first_nonfinite(img, (size_t)B * pix) < (size_t)B * pix) rc = 1;
        for (int b = 0; b < B && rc == 0; b++)
            for (int ch = 0; ch < C; ch++)
                for (int i = 0; i < S * S; i++) {
                    float v = img[(size_t)b * pix + (size_t)ch * S * S + i];
                    v = v < -1.0f ? -1.0f : v > 1.0f ? 1.0f : v;
                    out[((size_t)(done + b) * S * S + i) * C + ch] = to_u8(v);
                }
        char what[64];
        snprintf(what, sizeof what, "images %d-%d", done + 1, done + B);
        progress_show(&pr, "img", done + B, n, what);
        if (interrupted) rc = -1;
    }
    progress_end(&pr);
    graph_free(&g);
    free(x);
    free(z);
    free(eps);
    return rc;
}

// DIR/sample_STEP.png from the raw generator, the same noise every time (its
// own stream: the run's stays as it was)
static void gan_sample_grid(GanState *s, const GanOpts *o, int tty) {
    if (o->sample_n <= 0) return;
    int C = s->lddgan ? s->ae.cfg.out_ch : s->cfg.gen.channels;
    int S = s->lddgan ? s->ae.cfg.resolution : s->cfg.gen.image_size;
    unsigned char *img = mallocCheck((size_t)o->sample_n * C * S * S);
    Rng r;
    rng_seed(&r, (uint64_t)o->seed, 12);
    int rc = gan_generate(&s->G, &s->sched, s->lddgan ? &s->ae : NULL, s->scale, &r, o->sample_n,
                          o->sample_n < 64 ? o->sample_n : 64, img, tty ? 1 : -1);
    if (rc == 0) {
        char path[4200];
        snprintf(path, sizeof path, "%s/sample_%06ld.png", o->out, s->step);
        write_grid_png(path, img, o->sample_n, S, S, C);
        fprintf(stderr, "samples: %s\n", path);
    } else if (rc > 0) {
        fprintf(stderr, "warning: the generator gives NaN or Inf at step %ld: no grid\n", s->step);
    }
    free(img);
}

static void gan_log_row(FILE *log, const char *path, long step, long epoch, const double *sum,
                        int n, int n_r1, double ips) {
    fprintf(log, "%ld,%ld", step, epoch);
    for (int i = 0; i < 8; i++) {  // d_real, d_fake, r1 (over its steps), g_adv, rec, alpha, logits
        int cnt = i == 2 ? n_r1 : n;
        if (cnt > 0) fprintf(log, ",%.6g", nonfinite_or(sum[i] / cnt));
        else fprintf(log, ",");
    }
    fprintf(log, ",%.3f\n", ips);
    if (fflush(log) != 0 || ferror(log)) fatal("cannot write '%s': %s", path, strerror(errno));
}

static int cmd_train_gan(int argc, char **argv) {
    GanOpts o;
    define_gan_options(&o);
    int pr = parse_options("train", gan_opts_table, gan_opts_n, argc, argv, train_gan_help);
    if (pr) return PARSED_EXIT(pr);
    int lddgan = strcmp(o.model, "lddgan") == 0;
    if (!o.data) {
        fprintf(stderr, "casdm train --model %s: --data is required (see casdm train --model %s "
                        "--help)\n", o.model, o.model);
        return 2;
    }
    if (!lddgan && o.ae) fatal("--ae is for --model lddgan (ddgan trains on the pixels)");
    if (!lddgan && o.scale_factor > 0) fatal("--scale-factor is for --model lddgan");
    GanState s;
    memset(&s, 0, sizeof s);
    s.lddgan = lddgan;
    Dataset data;
    load_dataset(&data, o.data);
    const Images *im = &data.img;
    if (im->h != im->w) fatal("--data '%s': %dx%d images; square only", o.data, im->h, im->w);
    if (im->n < o.batch)
        fatal("--batch %d: --data '%s' has %d images, fewer than one batch (epochs drop the last "
              "partial batch)", o.batch, o.data, im->n);
    s.iters_per_epoch = im->n / o.batch;
    char ckpt[4200], log_path[4200], svg_path[4200], from[4200], err[600];
    StFile ck;
    int resumed = o.resume != NULL;
    if (resumed) {
        char buf[64];
        snprintf(from, sizeof from, "%s/ckpt.safetensors", o.resume);
        if (st_read(from, &ck, err, sizeof err) != 0) fatal("--resume: %s", err);
        if (st_meta(&ck, "checkpoint", buf, sizeof buf) != 0 ||
            strcmp(buf, "casdm-train-gan-1") != 0)
            fatal("--resume: '%s' is not a checkpoint of casdm train --model lddgan/ddgan", from);
        if (st_meta(&ck, "model", buf, sizeof buf) != 0 || strcmp(buf, o.model) != 0)
            fatal("--resume: '%s' is a --model %s run; this one asks for --model %s", from, buf,
                  o.model);
    }
    int C = im->c, S = im->h;
    if (lddgan) {
        gan_open_ae(&s, &o, resumed ? &ck : NULL, from, im);
        C = s.ae.cfg.embed_dim;
        S = s.ae.cfg.resolution >> (s.ae.cfg.n_levels - 1);
    }
    gan_config_from(&o, lddgan, C, S, &s.cfg);
    {  // the weights, their gradients, Adam's moments and G's EMA, before any is allocated
        size_t nd, ng = gan_param_count(&s.cfg, &nd);
        double need = 4.0 * (5.0 * (double)ng + 4.0 * (double)nd), have = machine_bytes();
        if (have > 0.0 && need > have)
            fatal("this configuration's generator (%zu parameters) and discriminator (%zu) need "
                  "~%.1f GB for weights and optimiser state alone; the machine has %.1f GB: "
                  "lower --nf/--ngf or --ch-mult", ng, nd, need / 1073741824.0,
                  have / 1073741824.0);
    }
    gan_schedule_init(&s.sched, s.cfg.T, s.cfg.beta_min, s.cfg.beta_max);
    int E = gan_epochs(&o, lddgan), rec = rec_loss_on(&o, lddgan);
    long steps = o.steps ? o.steps : (long)(E + 1) * s.iters_per_epoch;
    if (steps > LOG_MAX_STEP) fatal("--epochs %d: %ld iterations, more than %ld", E, steps,
                                    (long)LOG_MAX_STEP);
    make_dir(o.out);
    snprintf(ckpt, sizeof ckpt, "%s/ckpt.safetensors", o.out);
    snprintf(log_path, sizeof log_path, "%s/log.csv", o.out);
    snprintf(svg_path, sizeof svg_path, "%s/loss.svg", o.out);
    long saved_step = -1;
    if (resumed) {
        gan_check_resume(&ck, from, &o, lddgan, &s.cfg);
        if (resume_meta_long(&ck, from, "iters_per_epoch", 1, LOG_MAX_STEP) != s.iters_per_epoch)
            fatal("--resume: '%s' had another number of images per epoch than --data '%s' (%d "
                  "images, batch %d)", from, o.data, im->n, o.batch);
        gan_state_load(&s, &o, &ck, from);
        st_free(&ck);
        fprintf(stderr, "resumed from %s at step %ld\n", from, s.step);
        if (strcmp(from, ckpt) == 0) saved_step = s.step;
        snprintf(from, sizeof from, "%s/log.csv", o.resume);
    } else {
        gan_state_init(&s, &o);
    }
    History hist = {0};
    hist.layout = &log_layout_gan;
    carry_log(resumed ? from : NULL, log_path, s.step, &hist, &log_layout_gan);
    FILE *log = fopen(log_path, "a");
    if (!log) fatal("cannot write '%s': %s", log_path, strerror(errno));
    GanTrainer tr;
    gan_trainer_init(&tr, &s.G, &s.D, &s.sched);
    const GanGenConfig *gc = &s.cfg.gen;
    size_t per = (size_t)gc->channels * gc->image_size * gc->image_size;
    fprintf(stderr,
            "casdm train: %s on %d images %dx%dx%d from %s%s; %s %dx%dx%d; generator %zu "
            "parameters, discriminator %zu; T %d; %d iterations an epoch, %ld in all (E %d, "
            "rec loss %s); R1 %g every %d; %s, %d threads\n",
            o.model, im->n, im->c, im->h, im->w, o.data, lddgan ? " through --ae" : "",
            lddgan ? "latents" : "pixels", gc->channels, gc->image_size, gc->image_size,
            s.G.params.total, s.D.params.total, s.cfg.T, s.iters_per_epoch, steps, E,
            rec ? "sigmoid" : "none", o.r1_gamma, o.lazy_reg, gemm_backend_name(), pool_threads());
    if (lddgan) fprintf(stderr, "latent scale 1/%.6g (autoencoder %s)\n", s.scale, s.ae_path);
    GanData gd;
    gd.perm = mallocCheck((size_t)im->n * sizeof(uint32_t));
    gd.epoch = -1;
    gd.x = mallocCheck((size_t)o.batch * im->c * im->h * im->w * sizeof(float));
    graph_init(&gd.g, 0, 0);
    gd.g.grad_enabled = 0;
    float *x0 = mallocCheck((size_t)o.batch * per * sizeof(float));
    GanDraw dd, dg;
    gan_draw_alloc(&dd, o.batch, per, gc->nz);
    gan_draw_alloc(&dg, o.batch, per, gc->nz);
    catch_signals();
    int tty = isatty(2), timed_out = 0, nsum = 0, n_r1 = 0;
    long step0 = s.step;
    double sums[8] = {0}, t0 = now_seconds(), t_row = t0;
    while (s.step < steps && !interrupted &&
           !(timed_out = o.time_limit > 0 && now_seconds() - t0 >= o.time_limit)) {
        long epoch = s.step / s.iters_per_epoch;
        float alpha = rec ? (float)gan_weighted_alpha(epoch < E ? epoch : E, E) : 0.0f;
        float r1 = s.step % o.lazy_reg == 0 ? (float)o.r1_gamma : 0.0f;
        gan_batch(&s, im, &o, &gd, x0);
        GanNoise nd = gan_draw(&dd, &s.rng, s.cfg.T, o.batch, per, gc->nz);
        GanNoise ng = gan_draw(&dg, &s.rng, s.cfg.T, o.batch, per, gc->nz);
        GanTerms lt;
        if (gan_iteration(&tr, &s.opt, x0, o.batch, dd.t, &nd, dg.t, &ng, r1, alpha, &lt, err,
                          sizeof err) != 0) {
            if (tty) fprintf(stderr, "\n");
            char why[700];
            snprintf(why, sizeof why, "%s at step %ld", err, s.step + 1);
            stop_run(why, ckpt, saved_step);
        }
        s.step++;
        double v[8] = {lt.d_real, lt.d_fake, lt.r1, lt.g_adv, lt.rec, lt.alpha, lt.logit_real,
                       lt.logit_fake};
        for (int i = 0; i < 8; i++)
            if (i != 2 || r1 > 0.0f) sums[i] += v[i];
        n_r1 += r1 > 0.0f;
        nsum++;
        int more = s.step < steps;
        int last = !more || interrupted || (o.time_limit > 0 && now_seconds() - t0 >= o.time_limit);
        if (s.step % o.log_every == 0 || last) {
            double now = now_seconds(), ips = nsum * o.batch / (now - t_row);
            gan_log_row(log, log_path, s.step, epoch, sums, nsum, n_r1, ips);
            double row[HISTORY_COLS] = {sums[0] / nsum, sums[1] / nsum, sums[3] / nsum,
                                        rec ? sums[4] / nsum : NAN, n_r1 ? sums[2] / n_r1 : NAN,
                                        sums[5] / nsum};
            history_add(&hist, s.step, row);
            char title[300];
            snprintf(title, sizeof title, "casdm train --model %s (%s)", o.model, o.data);
            if (write_loss_svg(svg_path, &hist, NULL, 1, title, err, sizeof err) != 0)
                fatal("%s", err);
            double el = now - t0, eta = el / (double)(s.step - step0) * (double)(steps - s.step);
            if (o.time_limit > 0 && eta > o.time_limit - el) eta = fmax(0.0, o.time_limit - el);
            fprintf(stderr,
                    "%sstep %ld/%ld epoch %ld D real %.4f fake %.4f R1 %.3g G adv %.4f rec %.4f "
                    "(alpha %.3f) logits %+.2f %+.2f | %.2f img/s | %.0fs elapsed, ETA %.0fs%s",
                    tty ? "\r" : "", s.step, steps, epoch, sums[0] / nsum, sums[1] / nsum,
                    n_r1 ? sums[2] / n_r1 : 0.0, sums[3] / nsum, sums[4] / nsum, sums[5] / nsum,
                    sums[6] / nsum, sums[7] / nsum, ips, el, eta, tty ? "   " : "\n");
            memset(sums, 0, sizeof sums);
            nsum = n_r1 = 0;
            t_row = now;
        }
        int grid = more && !interrupted && o.sample_every > 0 && s.step % o.sample_every == 0;
        if (grid) {
            double t_aside = now_seconds();
            if (tty) fprintf(stderr, "\n");
            gan_sample_grid(&s, &o, tty);
            t_row += now_seconds() - t_aside;
        }
        if (o.ckpt_every > 0 && s.step % o.ckpt_every == 0 && more && !interrupted) {
            if (gan_state_save(&s, &o, ckpt, err, sizeof err) != 0) stop_run(err, ckpt, saved_step);
            saved_step = s.step;
        }
    }
    if (tty) fprintf(stderr, "\n");
    if (gan_state_save(&s, &o, ckpt, err, sizeof err) != 0) stop_run(err, ckpt, saved_step);
    if (!interrupted) gan_sample_grid(&s, &o, tty);
    if (interrupted)
        fprintf(stderr, "interrupted (%s) at step %ld: wrote %s\n",
                interrupted == SIGTERM ? "SIGTERM" : "SIGINT", s.step, ckpt);
    else
        fprintf(stderr, "%s at step %ld: wrote %s\n", timed_out ? "time limit reached" : "done",
                s.step, ckpt);
    if (hist.n) fprintf(stderr, "loss plot: %s\n", svg_path);
    history_free(&hist);
    fclose(log);
    free(x0);
    free(gd.perm);
    free(gd.x);
    graph_free(&gd.g);
    gan_draw_free(&dd);
    gan_draw_free(&dg);
    gan_trainer_free(&tr);
    gan_state_free(&s);
    images_free(&data.img);
    return interrupted ? interrupted_status() : 0;
}

// casdm sample on a GAN file (f, consumed): its EMA generator (netG. with
// --no-ema), T steps from N(0, I) and, for lddgan, the autoencoder's decoder;
// the grid, the NPZ, and the seconds per 100 images (the paper's Table 2
// measure: generator and decoder)
static int sample_gan(const SampleOpts *o, StFile *f) {
    char err[600], buf[4200];
    if (strcmp(o->steps, "100") != 0 || strcmp(o->method, "ddim") != 0 || o->eta != 0 ||
        o->no_clip)
        fatal("--steps/--method/--eta/--no-clip: '%s' is a GAN of its own T steps; leave them out",
              o->ckpt);
    GanConfig cfg;
    if (gan_config_read(f, o->ckpt, &cfg, err, sizeof err) != 0) fatal("--ckpt: %s", err);
    int lddgan = st_meta(f, "model", buf, 64) == 0 && strcmp(buf, "lddgan") == 0;
    GanGen G;
    if (gan_gen_load_st(&G, &cfg, 0, f, o->ckpt, o->no_ema ? "netG." : "", err, sizeof err) != 0)
        fatal("--ckpt: %s%s", err, o->no_ema ? " (--no-ema: the raw generator is only in "
                                               "checkpoints of casdm train)" : "");
    Autoencoder ae;
    float scale = 1.0f;
    const char *ae_path = o->ae;
    if (lddgan) {
        if (!ae_path && st_meta(f, "ae_file", buf, sizeof buf) == 0) ae_path = buf;
        if (!ae_path)
            fatal("--ckpt '%s' is an LDDGAN generator: give its autoencoder with --ae", o->ckpt);
        if (ae_load(&ae, ae_path, 0, err, sizeof err) != 0) fatal("--ae: %s", err);
        uint64_t want;
        if (st_meta(f, "ae_hash", err, 64) == 0 &&
            meta_hex64(f, o->ckpt, "ae_hash", &want, err, sizeof err) == 0 &&
            want != params_hash(&ae.params))
            fatal("--ae '%s' is not the autoencoder '%s' was trained with (its weights differ)",
                  ae_path, o->ckpt);
        int lat = ae.cfg.resolution >> (ae.cfg.n_levels - 1);
        if (ae.cfg.embed_dim != cfg.gen.channels || lat != cfg.gen.image_size)
            fatal("--ae '%s' has %dx%dx%d latents; the generator of '%s' makes %dx%dx%d", ae_path,
                  ae.cfg.embed_dim, lat, lat, o->ckpt, cfg.gen.channels, cfg.gen.image_size,
                  cfg.gen.image_size);
        scale = ae.scale_factor;
        if (st_meta(f, "scale_factor", buf, 64) == 0 && strtod(buf, NULL) > 0)
            scale = (float)strtod(buf, NULL);
        if (o->scale_factor > 0) scale = (float)o->scale_factor;
    } else if (o->ae || o->scale_factor > 0) {
        fatal("--ae and --scale-factor: '%s' is a pixel-space DDGAN", o->ckpt);
    }
    st_free(f);
    GanSchedule sch;
    gan_schedule_init(&sch, cfg.T, cfg.beta_min, cfg.beta_max);
    int C = lddgan ? ae.cfg.out_ch : cfg.gen.channels;
    int S = lddgan ? ae.cfg.resolution : cfg.gen.image_size;
    if ((uint64_t)o->n * S * S * C > DATA_MAX_FILE)
        fatal("--n %d images of %dx%dx%d do not fit in one NPZ file; lower --n", o->n, C, S, S);
    make_dir(o->out);
    unsigned char *img = mallocCheck((size_t)o->n * S * S * C);
    Rng rng;
    rng_seed(&rng, (uint64_t)o->seed, 1);
    fprintf(stderr, "casdm sample: %s, %d images %dx%dx%d, %d generator steps%s, %s weights, %d "
            "threads\n", lddgan ? "LDDGAN" : "DDGAN", o->n, C, S, S, cfg.T,
            lddgan ? " and the decoder" : "", o->no_ema ? "raw" : "EMA", pool_threads());
    double t0 = now_seconds();
    catch_signals();
    int rc = gan_generate(&G, &sch, lddgan ? &ae : NULL, scale, &rng, o->n, o->batch, img,
                          isatty(2));
    double dt = now_seconds() - t0;
    if (rc == 0) {
        char path[4200];
        snprintf(path, sizeof path, "%s/grid.png", o->out);
        write_grid_png(path, img, o->n, S, S, C);
        printf("%s\n", path);
        snprintf(path, sizeof path, "%s/samples_%dx%dx%dx%d.npz", o->out, o->n, S, S, C);
        if (write_npz(path, img, o->n, S, S, C, err, sizeof err) != 0) fatal("%s", err);
        printf("%s\n", path);
        for (int i = 0; o->each && i < o->n; i++) {
            snprintf(path, sizeof path, "%s/sample_%05d.png", o->out, i);
            if (write_png(path, img + (size_t)i * S * S * C, S, S, C, err, sizeof err) != 0)
                fatal("%s", err);
        }
        fprintf(stderr, "%d images in %.2fs: %.3f s per 100 images (batch %d, %d threads)\n",
                o->n, dt, 100.0 * dt / o->n, o->batch, pool_threads());
    } else if (rc > 0) {
        fprintf(stderr, "casdm sample: '%s' gives NaN or Inf pixels: its weights are broken; "
                "nothing written\n", o->ckpt);
    } else {
        fprintf(stderr, "casdm sample: interrupted after %.1fs; nothing written\n", dt);
    }
    free(img);
    gan_gen_free(&G);
    if (lddgan) ae_free(&ae);
    return rc == 0 ? 0 : rc > 0 ? 1 : interrupted_status();
}

// ---------------------------------------------------------------------------
// ---- plot: several log.csv files in one SVG ----
// E.g. the C run and tools/train_ref.py's PyTorch run of the same command.
// ---------------------------------------------------------------------------
static Option plot_opts_table[2];
static int plot_opts_n;

static void plot_help(FILE *f) {
    fputs(
        "usage: casdm plot --out FILE.svg [--title S] [LABEL=]LOG.csv ...\n\n"
        "Draws the loss terms of one or more log.csv files (casdm train's, or tools/train_ref.py's)\n"
        "in one SVG: a colour per term, a dash pattern per file. LABEL names a file in the legend\n"
        "(default: its path).\n\noptions:\n",
        f);
    usage_options(f, plot_opts_table, plot_opts_n);
}

static int cmd_plot(int argc, char **argv) {
    const char *out, *title;
    const Option opts[] = {
        {"--out", OPT_STR, &out, NULL, "the SVG to write", 0, 0},
        {"--title", OPT_STR, &title, "training loss", "the plot's title", 0, 0},
    };
    plot_opts_n = (int)(sizeof opts / sizeof opts[0]);
    memcpy(plot_opts_table, opts, sizeof opts);
    // options first, then the files: split argv at the first argument that is not an option or its
    // value
    int a = 0;
    while (a < argc && argv[a][0] == '-')
        a += (strcmp(argv[a], "--help") == 0 || strcmp(argv[a], "-h") == 0) ? 1 : 2;
    if (a > argc) a = argc;
    int pr = parse_options("plot", opts, plot_opts_n, a, argv, plot_help);
    if (pr) return PARSED_EXIT(pr);
    if (!out) {
        fprintf(stderr, "casdm plot: --out is required (see casdm plot --help)\n");
        return 2;
    }
    int nruns = argc - a;
    if (nruns < 1) {
        fprintf(stderr, "casdm plot: no log.csv given (see casdm plot --help)\n");
        return 2;
    }
    History *runs = calloc((size_t)nruns, sizeof *runs);
    const char **labels = calloc((size_t)nruns, sizeof *labels);
    if (!runs || !labels) fatal("out of memory");
    int rc = 0;
    for (int r = 0; r < nruns && rc == 0; r++) {
        const char *arg = argv[a + r], *eq = strchr(arg, '=');
        const char *path = eq ? eq + 1 : arg;
        labels[r] = arg;
        if (eq) {  // "LABEL=PATH": the label is the part before '='
            char *l = mallocCheck((size_t)(eq - arg) + 1);
            memcpy(l, arg, (size_t)(eq - arg));
            l[eq - arg] = 0;
            labels[r] = l;
        }
        char err[600];
        if (history_load(&runs[r], path, err, sizeof err) != 0) {
            fprintf(stderr, "casdm plot: %s\n", err);
            rc = 1;
        } else if (runs[r].n == 0) {
            fprintf(stderr, "casdm plot: %s has no rows of a casdm log.csv\n", path);
            rc = 1;
        }
    }
    char err[600];
    if (rc == 0 && write_loss_svg(out, runs, labels, nruns, title, err, sizeof err) != 0) {
        fprintf(stderr, "casdm plot: %s\n", err);
        rc = 1;
    } else if (rc == 0) {
        fprintf(stderr, "wrote %s (%d run%s)\n", out, nruns, nruns > 1 ? "s" : "");
    }
    for (int r = 0; r < nruns; r++) {
        if (labels[r] && labels[r] != argv[a + r]) free((char *)labels[r]);
        history_free(&runs[r]);
    }
    free(runs);
    free(labels);
    return rc;
}

// ---------------------------------------------------------------------------
// ---- main ----
// ---------------------------------------------------------------------------
static void usage(FILE *f) {
    fprintf(f,
            "usage: casdm [--threads N] COMMAND [options]\n"
            "\n"
            "commands:\n"
            "  train      train ddpm-eps, ddpm-x0, dual or casdm (casdm train --help)\n"
            "  sample     sample images from a checkpoint (casdm sample --help)\n"
            "  lpips      LPIPS distance between two images (casdm lpips --help)\n"
            "  eval       held-out denoising losses of a checkpoint (casdm eval --help)\n"
            "  fid        FID, sFID and IS of samples (casdm fid --help)\n"
            "  train-classifier  the FD-classifier's network (casdm train-classifier --help)\n"
            "  plot       loss curves of one or more log.csv files in one SVG (casdm plot --help)\n"
            "  ae         the LDDGAN autoencoder: encode images to latents, decode them (casdm ae --help)\n"
            "  train-ae   train that autoencoder with its adversarial loss (casdm train-ae --help)\n"
            "  info       print how this binary was built (SIMD path, threads)\n"
            "\n"
            "global options:\n"
            "  --threads N   worker threads (default: CASDM_THREADS, else the number of cores,\n"
            "                shared among the processes of an mpirun on this machine)\n"
            "  --precision S fp32 or bf16: the precision of every convolution, linear layer and\n"
            "                attention product (bf16 operands, float32 sums; the rest and the\n"
            "                weights float32); every command also takes it after its name\n"
            "  --dist-timeout S  under mpirun (make MPI=1): seconds a rank waits for the others\n"
            "                in a collective before it stops the run (default 600)\n"
            "  --help        this text\n");
}

static int parse_threads(const char *s) {
    char *end;
    long v = strtol(s, &end, 10);
    if (!*s || *end || v < 1 || v > 64) {
        fprintf(stderr, "casdm: --threads expects an integer in 1..64, got '%s'\n", s);
        exit(2);
    }
    return (int)v;
}

static int run_command(int argc, char **argv);

static int one_of(const char *s, const char *a, const char *b, const char *c, const char *d) {
    return !strcmp(s, a) || !strcmp(s, b) || !strcmp(s, c) || !strcmp(s, d);
}

int main(int argc, char **argv) {
    if (dist_init(&argc, &argv) != 0) return 2;
    int rc = run_command(argc, argv);
    dist_finalize();
    return rc;
}

static int run_command(int argc, char **argv) {
    int threads = 0, i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            return 0;
        }
        if (strcmp(argv[i], "--threads") == 0) {
            if (i + 1 >= argc) { fprintf(stderr, "casdm: --threads needs a value\n"); return 2; }
            threads = parse_threads(argv[++i]);
            continue;
        }
        if (strcmp(argv[i], "--precision") == 0) {
            if (i + 1 >= argc) { fprintf(stderr, "casdm: --precision needs a value\n"); return 2; }
            if (set_precision_option(argv[++i]) != 0) return 2;
            continue;
        }
        if (strcmp(argv[i], "--dist-timeout") == 0) {
            char *end = NULL;
            double v = i + 1 < argc ? strtod(argv[i + 1], &end) : 0.0;
            if (i + 1 >= argc || end == argv[i + 1] || *end || !(v >= 1 && v <= 1e6)) {
                fprintf(stderr, "casdm: --dist-timeout needs seconds in 1..1e6\n");
                return 2;
            }
            dist_set_timeout(v);
            i++;
            continue;
        }
        fprintf(stderr, "casdm: unknown option '%s' (see casdm --help)\n", argv[i]);
        return 2;
    }
    if (i >= argc) { usage(stderr); return 2; }
    // ranks on one machine share its cores: by default each takes its part
    if (threads <= 0 && !getenv("CASDM_THREADS") && dist_local_size() > 1) {
        long cores = sysconf(_SC_NPROCESSORS_ONLN);
        threads = cores / dist_local_size() > 1 ? (int)(cores / dist_local_size()) : 1;
    }
    pool_init(threads);
    int rc;
    if (dist_size() > 1 && !one_of(argv[i], "info", "train", "sample", "fid")) {
        if (dist_rank() == 0)
            fprintf(stderr, "casdm %s: runs as one process; under mpirun only train (the four "
                            "diffusion models), sample and fid share their work\n", argv[i]);
        rc = 2;
    } else if (strcmp(argv[i], "info") == 0) {
        printf("casdm: simd %s, threads %d, matrix products %s\n", simd_name(), pool_threads(),
               gemm_backend_name());
        int native = gemm_bf16_native();
        printf("casdm: bf16: AVX512-BF16 %s, AMX-BF16 %s; --precision bf16 runs %s%s%s%s\n",
               cpu_has_avx512_bf16() ? "yes" : "no",
               !cpu_has_amx_bf16() ? "no" : gemm_bf16_amx() ? "yes" : "yes (tiles not granted)",
               !native ? "emulated on the float32 kernels" : gemm_bf16_amx() ? "on AMX tiles" : "on VDPBF16PS",
               native ? "" : " (", gemm_bf16_why(), native ? "" : ")");
        printf("casdm: processes: %d (MPI: %s)\n", dist_size(), dist_name());
        rc = 0;
    } else if (strcmp(argv[i], "train") == 0) {
        rc = cmd_train(argc - i - 1, argv + i + 1);
    } else if (strcmp(argv[i], "sample") == 0) {
        rc = cmd_sample(argc - i - 1, argv + i + 1);
    } else if (strcmp(argv[i], "lpips") == 0) {
        rc = cmd_lpips(argc - i - 1, argv + i + 1);
    } else if (strcmp(argv[i], "eval") == 0) {
        rc = cmd_eval(argc - i - 1, argv + i + 1);
    } else if (strcmp(argv[i], "train-classifier") == 0) {
        rc = cmd_train_classifier(argc - i - 1, argv + i + 1);
    } else if (strcmp(argv[i], "fid") == 0) {
        rc = cmd_fid(argc - i - 1, argv + i + 1);
    } else if (strcmp(argv[i], "plot") == 0) {
        rc = cmd_plot(argc - i - 1, argv + i + 1);
    } else if (strcmp(argv[i], "ae") == 0) {
        rc = cmd_ae(argc - i - 1, argv + i + 1);
    } else if (strcmp(argv[i], "train-ae") == 0) {
        rc = cmd_train_ae(argc - i - 1, argv + i + 1);
    } else {
        fprintf(stderr, "casdm: unknown command '%s' (see casdm --help)\n", argv[i]);
        rc = 2;
    }
    pool_shutdown();
    sgemm_free_buffers();
    return rc;
}
