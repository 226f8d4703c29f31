// casdm.c: the program. `casdm train` trains one of the four models of the
// Cas-DM paper (arXiv 2401.02414, Table 1) on CIFAR-10 binaries or IDX files;
// `casdm info` reports the build.
//
// Sections: options, data, checkpoints, training, main.
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
        if (opts[i].def && opts[i].type != OPT_FLAG) fprintf(f, " [default: %s]", opts[i].def[0] ? opts[i].def : "none");
        fprintf(f, "\n");
    }
}

static int set_option(const Option *o, const char *value) {
    char *end;
    switch (o->type) {
    case OPT_INT: {
        long v = strtol(value, &end, 10);
        if (!*value || *end || v < o->lo || v > o->hi) {
            fprintf(stderr, "casdm: %s expects an integer in %.0f..%.0f, got '%s'\n", o->name, o->lo, o->hi, value);
            return -1;
        }
        *(int *)o->dest = (int)v;
        return 0;
    }
    case OPT_FLOAT: {
        double v = strtod(value, &end);
        if (!*value || *end || !(v >= o->lo && v <= o->hi)) {
            fprintf(stderr, "casdm: %s expects a number in %g..%g, got '%s'\n", o->name, o->lo, o->hi, value);
            return -1;
        }
        *(double *)o->dest = v;
        return 0;
    }
    case OPT_STR: *(const char **)o->dest = value; return 0;
    default: *(int *)o->dest = 1; return 0;
    }
}

// Sets the defaults, then parses argv[0..argc); exits 2 on anything wrong.
static void parse_options(const char *cmd, const Option *opts, int n, int argc, char **argv,
                          void (*help)(FILE *)) {
    for (int i = 0; i < n; i++) {
        if (opts[i].type == OPT_FLAG) *(int *)opts[i].dest = 0;
        else if (opts[i].def && set_option(&opts[i], opts[i].def) != 0) fatal("bad default for %s", opts[i].name);
        else if (!opts[i].def && opts[i].type == OPT_STR) *(const char **)opts[i].dest = NULL;
    }
    for (int a = 0; a < argc; a++) {
        if (strcmp(argv[a], "--help") == 0 || strcmp(argv[a], "-h") == 0) { help(stdout); exit(0); }
        const Option *o = NULL;
        for (int i = 0; i < n; i++)
            if (strcmp(argv[a], opts[i].name) == 0) o = &opts[i];
        if (!o) {
            fprintf(stderr, "casdm %s: unknown option '%s' (see casdm %s --help)\n", cmd, argv[a], cmd);
            exit(2);
        }
        if (o->type == OPT_FLAG) { set_option(o, NULL); continue; }
        if (a + 1 >= argc) { fprintf(stderr, "casdm %s: %s needs a value\n", cmd, o->name); exit(2); }
        if (set_option(o, argv[++a]) != 0) exit(2);
    }
}

// ---------------------------------------------------------------------------
// ---- data ----
// A dataset is N images of uint8 pixels, (N, C, H, W), held in memory.
// ---------------------------------------------------------------------------
typedef struct {
    int n, c, h, w;
    unsigned char *pixels;
    const char *source;
    int flip;             // random horizontal flips by default (CIFAR, image folders; not IDX)
} Dataset;

static unsigned char *read_image(const char *path, int *W, int *H, int *C);  // with PNG, below

static unsigned char *read_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) fatal("cannot open '%s': %s", path, strerror(errno));
    if (fseek(f, 0, SEEK_END) != 0) fatal("cannot seek in '%s'", path);
    long n = ftell(f);
    if (n < 0) fatal("cannot size '%s'", path);
    rewind(f);
    unsigned char *b = mallocCheck((size_t)n + 1);
    if (fread(b, 1, (size_t)n, f) != (size_t)n) fatal("cannot read '%s': %s", path, strerror(errno));
    fclose(f);
    *size = (size_t)n;
    return b;
}

static uint32_t be32(const unsigned char *b) {
    return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | (uint32_t)b[3];
}

// CIFAR-10 binary version: records of 1 label byte + 3072 bytes (R, G, B
// planes of 32x32). Appends to d.
static void load_cifar_file(Dataset *d, const char *path) {
    size_t size;
    unsigned char *b = read_file(path, &size);
    const size_t rec = 1 + 3 * 32 * 32;
    if (size == 0 || size % rec)
        fatal("'%s' is not a CIFAR-10 binary batch: %zu bytes is not a multiple of %zu (1 label + 3072 pixels)",
              path, size, rec);
    size_t n = size / rec;
    unsigned char *p = mallocCheck(((size_t)d->n + n) * 3072);
    if (d->n) memcpy(p, d->pixels, (size_t)d->n * 3072);
    for (size_t i = 0; i < n; i++) {
        if (b[i * rec] > 9) fatal("'%s': record %zu has label %d; CIFAR-10 labels are 0..9", path, i, b[i * rec]);
        memcpy(p + ((size_t)d->n + i) * 3072, b + i * rec + 1, 3072);
    }
    free(d->pixels);
    free(b);
    d->pixels = p;
    d->n += (int)n;
    d->c = 3;
    d->h = d->w = 32;
}

// IDX (MNIST / Fashion-MNIST images): magic 0x00000803, then N, rows, cols
// (big-endian), then N*rows*cols bytes. Images are zero-padded to a side that
// is a multiple of 8 (28 -> 32), centred, so that three halvings fit.
static void load_idx(Dataset *d, const char *path) {
    size_t size;
    unsigned char *b = read_file(path, &size);
    if (size >= 2 && b[0] == 0x1f && b[1] == 0x8b)
        fatal("'%s' is gzip-compressed: gunzip it first (make data does)", path);
    if (size < 16 || be32(b) != 0x00000803)
        fatal("'%s' is not an IDX image file (magic %08x, want 00000803)", path, size >= 4 ? be32(b) : 0);
    uint32_t n = be32(b + 4), rows = be32(b + 8), cols = be32(b + 12);
    if (rows == 0 || cols == 0 || rows > 4096 || cols > 4096 || n == 0 || (uint64_t)n * rows * cols != size - 16)
        fatal("'%s': header says %u images of %ux%u but the file has %zu pixel bytes", path, n, rows, cols, size - 16);
    int side = (int)(rows > cols ? rows : cols);
    side = (side + 7) / 8 * 8;
    d->n = (int)n;
    d->c = 1;
    d->h = d->w = side;
    d->pixels = callocCheck((size_t)n * side * side, 1);
    int oy = (side - (int)rows) / 2, ox = (side - (int)cols) / 2;
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t y = 0; y < rows; y++)
            memcpy(d->pixels + ((size_t)i * side + oy + y) * side + ox, b + 16 + ((size_t)i * rows + y) * cols, cols);
    free(b);
}

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

static int image_name(const char *s) {
    return ends_with(s, ".png") || ends_with(s, ".ppm") || ends_with(s, ".pgm") ||
           ends_with(s, ".PNG") || ends_with(s, ".PPM") || ends_with(s, ".PGM");
}

static int compare_names(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

// A folder of images (8-bit PNG, binary PPM P6 or PGM P5), all of the same
// size and kind (all grey or all colour), read in name order.
static void load_image_folder(Dataset *d, const char *path) {
    DIR *dir = opendir(path);
    if (!dir) fatal("--data '%s': %s", path, strerror(errno));
    char **names = NULL;
    size_t n = 0, cap = 0;
    for (struct dirent *e; (e = readdir(dir));) {
        if (e->d_name[0] == '.' || !image_name(e->d_name)) continue;
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
        fatal("--data '%s': no CIFAR-10 data_batch_N.bin files and no .png/.ppm/.pgm images in this directory "
              "(CIFAR-10's binary version: https://www.cs.toronto.edu/~kriz/cifar.html)", path);
    if (n > 0x7fffffff) fatal("--data '%s': too many images", path);
    qsort(names, n, sizeof *names, compare_names);
    char file[4096];
    for (size_t i = 0; i < n; i++) {
        snprintf(file, sizeof file, "%s/%s", path, names[i]);
        int w, h, c = 0;
        unsigned char *img = read_image(file, &w, &h, &c);
        if (i == 0) {
            d->c = c;
            d->h = h;
            d->w = w;
            uint64_t bytes = (uint64_t)w * h * c * n;  // 64-bit: size_t may be 32
            if (bytes > ((uint64_t)1 << 34) || (size_t)bytes != bytes)
                fatal("--data '%s': %zu images of %dx%d do not fit in memory", path, n, w, h);
            d->pixels = mallocCheck(n * (size_t)w * h * c);
        } else if (w != d->w || h != d->h || c != d->c) {
            fatal("--data '%s': '%s' is %dx%d with %d channel(s), but '%s' is %dx%d with %d; all images must match",
                  path, names[i], w, h, c, names[0], d->w, d->h, d->c);
        }
        unsigned char *dst = d->pixels + i * (size_t)w * h * c;  // HWC -> CHW
        for (int ch = 0; ch < c; ch++)
            for (size_t k = 0; k < (size_t)w * h; k++) dst[(size_t)ch * w * h + k] = img[k * c + ch];
        free(img);
    }
    for (size_t i = 0; i < n; i++) free(names[i]);
    free(names);
    d->n = (int)n;
}

// PATH: a CIFAR-10 directory (data_batch_1..5.bin), a CIFAR .bin file, an
// IDX image file (*-idx3-ubyte), or a directory of PNG/PPM/PGM images.
static void load_dataset(Dataset *d, const char *path) {
    memset(d, 0, sizeof *d);
    d->source = path;
    struct stat st;
    if (stat(path, &st) != 0) fatal("--data '%s': %s", path, strerror(errno));
    if (S_ISDIR(st.st_mode)) {
        char p[4096];
        for (int i = 1; i <= 5; i++) {
            snprintf(p, sizeof p, "%s/data_batch_%d.bin", path, i);
            if (stat(p, &st) == 0) load_cifar_file(d, p);
        }
        if (d->n == 0) load_image_folder(d, path);
        d->flip = 1;
    } else if (ends_with(path, ".bin")) {
        load_cifar_file(d, path);
        d->flip = 1;
    } else if (strstr(path, "idx3-ubyte")) {
        load_idx(d, path);  // digits and letters are not mirror-symmetric: no flips by default
    } else {
        fatal("--data '%s': not a CIFAR-10 directory or .bin file, an IDX *-idx3-ubyte file, nor a directory of images", path);
    }
}

// x0 (B,C,H,W) in [-1,1] from random images, flipped left-right at random
static void sample_batch(const Dataset *d, Rng *rng, float *x0, int B, int flip) {
    size_t plane = (size_t)d->h * d->w;
    for (int b = 0; b < B; b++) {
        uint32_t i = rng_below(rng, (uint32_t)d->n);
        int fl = flip ? (int)(rng_u32(rng) & 1) : 0;
        const unsigned char *src = d->pixels + (size_t)i * d->c * plane;
        float *dst = x0 + (size_t)b * d->c * plane;
        for (int c = 0; c < d->c; c++)
            for (int y = 0; y < d->h; y++)
                for (int x = 0; x < d->w; x++) {
                    int sx = fl ? d->w - 1 - x : x;
                    dst[(size_t)c * plane + (size_t)y * d->w + x] =
                        src[(size_t)c * plane + (size_t)y * d->w + sx] / 127.5f - 1.0f;
                }
    }
}

// ---------------------------------------------------------------------------
// ---- training state and checkpoints ----
// ---------------------------------------------------------------------------
typedef struct {
    // data and model
    const char *data, *model, *schedule, *attn, *mult, *out, *resume, *lpips;
    int no_flip, flip, ch, res, heads, T, no_clip_x0, lpips_size, grad_checkpoint;
    double dropout, p2_gamma, p2_k, lambda_lpips;
    // optimisation
    int steps, batch, seed;
    double lr, ema, grad_clip;
    // output
    int log_every, ckpt_every, sample_every, sample_n, sample_steps;
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

static void trainer_init(Trainer *tr, const TrainOpts *o, int C, int image_size) {
    memset(tr, 0, sizeof *tr);
    tr->kind = model_parse(o->model);
    if (tr->kind < 0) { fprintf(stderr, "casdm train: --model '%s' is not ddpm-eps, ddpm-x0, dual or casdm\n", o->model); exit(2); }
    int sk = schedule_parse(o->schedule);
    if (sk < 0) { fprintf(stderr, "casdm train: --schedule '%s' is not linear or cosine\n", o->schedule); exit(2); }
    if (tr->kind == MODEL_DDPM_X0 && o->p2_gamma != 0.0) {
        fprintf(stderr, "casdm train: --p2-gamma weights the epsilon loss; ddpm-x0 has none\n");
        exit(2);
    }
    UNetConfig *c = &tr->theta_cfg;
    unet_default_config(c, image_size, C, model_theta_out(tr->kind, C));
    c->model_channels = o->ch;
    c->num_res_blocks = o->res;
    c->num_heads = o->heads;
    c->dropout = (float)o->dropout;
    if (o->mult[0] && unet_parse_channel_mult(c, o->mult) != 0) {
        fprintf(stderr, "casdm train: --mult '%s' is not a list such as 1,2,2,2\n", o->mult);
        exit(2);
    }
    if (unet_parse_attention(c, o->attn) != 0) {
        fprintf(stderr, "casdm train: --attn '%s' is not a list of resolutions dividing %d, such as 16,8\n", o->attn, image_size);
        exit(2);
    }
    for (int l = 0; l < c->n_levels; l++)
        if ((c->channel_mult[l] * c->model_channels) % c->groups) {
            fprintf(stderr, "casdm train: --ch %d x mult %d is not a multiple of 32 (GroupNorm groups)\n", o->ch, c->channel_mult[l]);
            exit(2);
        }
    if (image_size % (1 << (c->n_levels - 1))) {
        fprintf(stderr, "casdm train: images of %d pixels do not halve %d times (--mult has %d levels)\n",
                image_size, c->n_levels - 1, c->n_levels);
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

static void config_metadata(char kv[][2][128], int *n, const char *key, const char *fmt, ...) {
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
    for (int i = 0; i < n && k < len; i++) k += (size_t)snprintf(buf + k, len - k, i ? ",%d" : "%d", v[i]);
}

static void save_checkpoint(const Trainer *tr, const TrainOpts *o, const char *path) {
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
                snprintf(names[k], len, "%s%s.%s", kinds_of_copy[copy], net ? "phi" : "theta", t->name);
                w[k] = (StWrite){names[k], t->ndim, t->shape, base + off};
                off += t->size;
                k++;
            }
        }
    const UNetConfig *c = &tr->theta_cfg;
    char kv[32][2][128], list[128];
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
    config_metadata(kv, &n, "noise_schedule", "%s", tr->sched.kind == SCHEDULE_LINEAR ? "linear" : "cosine");
    config_metadata(kv, &n, "rescale_timesteps", "true");
    config_metadata(kv, &n, "p2_gamma", "%.17g", o->p2_gamma);
    config_metadata(kv, &n, "p2_k", "%.17g", o->p2_k);
    config_metadata(kv, &n, "clip_x0", "%d", !o->no_clip_x0);
    config_metadata(kv, &n, "rng_state", "%016llx", (unsigned long long)tr->rng.state);
    config_metadata(kv, &n, "rng_inc", "%016llx", (unsigned long long)tr->rng.inc);
    config_metadata(kv, &n, "adam_step", "%ld", tr->adam_theta.step);
    const char *meta[2 * 32 + 1];
    for (int i = 0; i < n; i++) { meta[2 * i] = kv[i][0]; meta[2 * i + 1] = kv[i][1]; }
    meta[2 * n] = NULL;
    char err[512];
    if (st_write(path, w, k, meta, err, sizeof err) != 0) fatal("saving checkpoint: %s", err);
    for (size_t i = 0; i < k; i++) free(names[i]);
    free(names);
    free(w);
}

static void meta_or_die(const StFile *f, const char *path, const char *key, char *buf, size_t len) {
    if (st_meta(f, key, buf, len) != 0) fatal("checkpoint '%s' has no '%s' in its metadata", path, key);
}

// Restores every tensor and the step, RNG and Adam state. The trainer was
// built from the same options; any difference in shapes is an error naming
// the tensor.
static void load_checkpoint(Trainer *tr, const char *path) {
    StFile f;
    char err[512], buf[256];
    if (st_read(path, &f, err, sizeof err) != 0) fatal("%s", err);
    meta_or_die(&f, path, "format", buf, sizeof buf);
    if (strcmp(buf, "casdm-checkpoint-1") != 0) fatal("checkpoint '%s' has format '%s', want casdm-checkpoint-1", path, buf);
    meta_or_die(&f, path, "model", buf, sizeof buf);
    if (strcmp(buf, model_name(tr->kind)) != 0) fatal("checkpoint '%s' holds a %s model, not %s", path, buf, model_name(tr->kind));
    int nets = tr->has_phi ? 2 : 1;
    for (int copy = 0; copy < 4; copy++)
        for (int net = 0; net < nets; net++) {
            UNet *u = net ? &tr->phi : &tr->theta;
            float *base = (float *)copy_data(tr, net, copy);
            size_t off = 0;
            for (size_t i = 0; i < u->params.count; i++) {
                const Tensor *t = &u->params.t[i];
                char name[300];
                snprintf(name, sizeof name, "%s%s.%s", kinds_of_copy[copy], net ? "phi" : "theta", t->name);
                const StEntry *e = st_find(&f, name);
                if (!e) fatal("checkpoint '%s' lacks tensor '%s' (was it written with other --ch/--res/--attn/--mult?)", path, name);
                int same = e->ndim == t->ndim && e->size == t->size;
                for (int d = 0; same && d < t->ndim; d++) same = e->shape[d] == t->shape[d];
                if (!same) fatal("checkpoint '%s': tensor '%s' has another shape than this model's", path, name);
                memcpy(base + off, e->data, t->size * sizeof(float));
                off += t->size;
            }
        }
    meta_or_die(&f, path, "step", buf, sizeof buf);
    tr->step = strtol(buf, NULL, 10);
    meta_or_die(&f, path, "adam_step", buf, sizeof buf);
    tr->adam_theta.step = tr->adam_phi.step = strtol(buf, NULL, 10);
    meta_or_die(&f, path, "rng_state", buf, sizeof buf);
    tr->rng.state = strtoull(buf, NULL, 16);
    meta_or_die(&f, path, "rng_inc", buf, sizeof buf);
    tr->rng.inc = strtoull(buf, NULL, 16);
    st_free(&f);
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
static void sample_images(Model *m, const SampleConfig *sc, const Schedule *rs, Rng *rng, int n, int batch,
                          unsigned char *out, int tty);
static void write_grid_png(const char *path, const unsigned char *img, int N, int H, int W, int C);
typedef struct { unsigned char *b; size_t len, cap; } Bytes;
static void bytes_put(Bytes *o, const void *p, size_t n);
static void write_atomically(const char *path, const Bytes *data);

// ---- the loss plot: log.csv drawn as an SVG, log-scale y ----
#define PLOT_TERMS 5
typedef struct { long *step; double *v; size_t n, cap; } History;  // v: n x PLOT_TERMS, NAN = absent

static void history_add(History *h, long step, const double *v) {
    if (h->n == h->cap) {
        h->cap = h->cap ? 2 * h->cap : 256;
        long *s = mallocCheck(h->cap * sizeof *s);
        double *nv = mallocCheck(h->cap * PLOT_TERMS * sizeof *nv);
        if (h->n) { memcpy(s, h->step, h->n * sizeof *s); memcpy(nv, h->v, h->n * PLOT_TERMS * sizeof *nv); }
        free(h->step);
        free(h->v);
        h->step = s;
        h->v = nv;
    }
    h->step[h->n] = step;
    memcpy(h->v + h->n * PLOT_TERMS, v, PLOT_TERMS * sizeof *v);
    h->n++;
}

// the rows of an existing log.csv (when resuming, and for casdm plot);
// -1 when the file cannot be opened
static int history_load(History *h, const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        if (line[0] < '0' || line[0] > '9') continue;
        char *p = line, *end;
        long step = strtol(p, &end, 10);
        double v[PLOT_TERMS];
        for (int i = 0; i < PLOT_TERMS; i++) {
            p = strchr(end, ',');
            if (!p) { v[i] = NAN; end = line + strlen(line); continue; }
            p++;
            v[i] = (*p == ',' || *p == '\n' || !*p) ? NAN : strtod(p, &end);
            if (p == end) v[i] = NAN;
            end = p;
        }
        history_add(h, step, v);
    }
    fclose(f);
    return 0;
}

static void svg_add(Bytes *o, const char *fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    bytes_put(o, buf, (size_t)(n < (int)sizeof buf ? n : (int)sizeof buf - 1));
}

// One or more runs (log.csv histories) in one plot: a colour per loss term,
// a dash pattern per run (labels name the runs; NULL for a single run).
static void write_loss_svg(const History *runs, const char *const *labels, int nruns, const char *path,
                           const char *title) {
    static const char *names[PLOT_TERMS] = {"loss", "L_eps", "L_x0", "L_mu", "L_lpips"};
    static const char *colors[PLOT_TERMS] = {"#000000", "#1f77b4", "#d62728", "#2ca02c", "#9467bd"};
    static const char *dashes[4] = {"", "7,4", "2,3", "10,3,2,3"};
    const double W = 800, H = 420, L = 70, R = 170, T = 40, B = 50;
    double lo = INFINITY, hi = -INFINITY;
    long s0 = LONG_MAX, s1 = LONG_MIN;
    for (int r = 0; r < nruns; r++) {
        const History *h = &runs[r];
        if (h->n) { s0 = h->step[0] < s0 ? h->step[0] : s0; s1 = h->step[h->n - 1] > s1 ? h->step[h->n - 1] : s1; }
        for (size_t i = 0; i < h->n * PLOT_TERMS; i++)
            if (h->v[i] > 0 && isfinite(h->v[i])) { lo = fmin(lo, h->v[i]); hi = fmax(hi, h->v[i]); }
    }
    if (s0 > s1) { s0 = 0; s1 = 1; }
    if (!(lo < hi)) { lo = 1e-3; hi = 1.0; }
    double dlo = floor(log10(lo)), dhi = ceil(log10(hi));
    if (dhi <= dlo) dhi = dlo + 1;
    if (s1 <= s0) s1 = s0 + 1;
    Bytes o = {0};
    svg_add(&o, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" font-family=\"sans-serif\" font-size=\"12\">\n", W, H);
    svg_add(&o, "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n<text x=\"%.0f\" y=\"24\" font-size=\"15\">%s</text>\n", L, title);
    for (double d = dlo; d <= dhi; d++) {  // decades
        double y = T + (H - T - B) * (dhi - d) / (dhi - dlo);
        svg_add(&o, "<line x1=\"%.0f\" y1=\"%.1f\" x2=\"%.0f\" y2=\"%.1f\" stroke=\"#ddd\"/><text x=\"%.0f\" y=\"%.1f\" text-anchor=\"end\">1e%d</text>\n",
                L, y, W - R, y, L - 6, y + 4, (int)d);
    }
    for (int k = 0; k <= 4; k++) {
        double x = L + (W - L - R) * k / 4.0;
        svg_add(&o, "<text x=\"%.1f\" y=\"%.0f\" text-anchor=\"middle\">%ld</text>\n", x, H - B + 18, s0 + (long)((s1 - s0) * k / 4.0));
    }
    svg_add(&o, "<text x=\"%.0f\" y=\"%.0f\" text-anchor=\"middle\">step</text>\n", (L + W - R) / 2, H - 10);
    svg_add(&o, "<rect x=\"%.0f\" y=\"%.0f\" width=\"%.0f\" height=\"%.0f\" fill=\"none\" stroke=\"#444\"/>\n", L, T, W - L - R, H - T - B);
    int legend = 0;
    for (int t = 0; t < PLOT_TERMS; t++) {
        int shown = 0;
        for (int r = 0; r < nruns; r++) {
            const History *h = &runs[r];
            int any = 0;
            for (size_t i = 0; i < h->n; i++) {
                double v = h->v[i * PLOT_TERMS + t];
                if (!(v > 0) || !isfinite(v)) continue;
                double x = L + (W - L - R) * (double)(h->step[i] - s0) / (double)(s1 - s0);
                double y = T + (H - T - B) * (dhi - log10(v)) / (dhi - dlo);
                if (!any)
                    svg_add(&o, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\"%s%s%s points=\"", colors[t],
                            r ? " stroke-dasharray=\"" : "", dashes[r % 4], r ? "\"" : "");
                svg_add(&o, "%.1f,%.1f ", x, y);
                any = 1;
            }
            if (any) svg_add(&o, "\"/>\n");
            shown |= any;
        }
        if (shown) {
            double y = T + 14 + 18 * legend++;
            svg_add(&o, "<line x1=\"%.0f\" y1=\"%.0f\" x2=\"%.0f\" y2=\"%.0f\" stroke=\"%s\" stroke-width=\"2\"/><text x=\"%.0f\" y=\"%.0f\">%s</text>\n",
                    W - R + 12, y, W - R + 32, y, colors[t], W - R + 38, y + 4, names[t]);
        }
    }
    for (int r = 0; labels && r < nruns; r++) {  // which dash is which run
        double y = T + 14 + 18 * legend++ + 8;
        svg_add(&o, "<line x1=\"%.0f\" y1=\"%.0f\" x2=\"%.0f\" y2=\"%.0f\" stroke=\"#444\" stroke-width=\"2\"%s%s%s/>",
                W - R + 12, y, W - R + 32, y, r ? " stroke-dasharray=\"" : "", dashes[r % 4], r ? "\"" : "");
        svg_add(&o, "<text x=\"%.0f\" y=\"%.0f\">", W - R + 38, y + 4);
        for (const char *c = labels[r]; *c; c++) {  // the label is user text: escape it
            if (*c == '<') svg_add(&o, "&lt;");
            else if (*c == '>') svg_add(&o, "&gt;");
            else if (*c == '&') svg_add(&o, "&amp;");
            else bytes_put(&o, c, 1);
        }
        svg_add(&o, "</text>\n");
    }
    svg_add(&o, "</svg>\n");
    write_atomically(path, &o);
    free(o.b);
}

static volatile sig_atomic_t interrupted = 0;
static void on_sigint(int sig) { (void)sig; interrupted = 1; }

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// mkdir -p
static void make_dir(const char *path) {
    char p[4096];
    snprintf(p, sizeof p, "%s", path);
    for (char *c = p + 1; *c; c++) {
        if (*c != '/') continue;
        *c = 0;
        if (mkdir(p, 0777) != 0 && errno != EEXIST) fatal("cannot create directory '%s': %s", p, strerror(errno));
        *c = '/';
    }
    if (mkdir(p, 0777) != 0 && errno != EEXIST) fatal("cannot create directory '%s': %s", path, strerror(errno));
}

// EMA with warm-up: improved-diffusion uses a fixed rate (0.9999), which on a
// short CPU run leaves the EMA at its random start; the rate ramps up as
// min(rate, (1 + s) / (10 + s)) with s the number of steps before this one.
static float ema_rate(double rate, long s) {
    double warm = (1.0 + (double)s) / (10.0 + (double)s);
    return (float)(rate < warm ? rate : warm);
}

static double nonfinite_or(double v) { return isfinite(v) ? v : NAN; }

static const char *train_help_text =
    "usage: casdm train --data PATH [options]\n"
    "\n"
    "Trains one of the Cas-DM paper's models and writes DIR/ckpt.safetensors\n"
    "(every --ckpt-every steps and at the end), DIR/log.csv, DIR/loss.svg (the loss\n"
    "plot) and sample grids DIR/samples_STEP.png from the EMA weights (DDIM, eta 0).\n"
    "Ctrl-C saves a checkpoint and stops; --resume DIR continues.\n"
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
        {"--model", OPT_STR, &o->model, "casdm", "ddpm-eps, ddpm-x0, dual or casdm", 0, 0},
        {"--ch", OPT_INT, &o->ch, "64", "U-Net model_channels (the paper: 128)", 32, 1024},
        {"--res", OPT_INT, &o->res, "2", "ResBlocks per level (the paper: 3)", 1, 16},
        {"--attn", OPT_STR, &o->attn, "16", "attention resolutions, e.g. 16,8 (the paper); '' for none", 0, 0},
        {"--mult", OPT_STR, &o->mult, "", "channel_mult, e.g. 1,2,2,2; '' = improved-diffusion's default for the size", 0, 0},
        {"--heads", OPT_INT, &o->heads, "4", "attention heads", 1, 64},
        {"--dropout", OPT_FLOAT, &o->dropout, "0.1", "dropout in ResBlocks", 0, 0.99},
        {"--T", OPT_INT, &o->T, "4000", "diffusion steps (the paper: 4000)", 1, 100000},
        {"--schedule", OPT_STR, &o->schedule, "cosine", "noise schedule: cosine or linear", 0, 0},
        {"--p2-gamma", OPT_FLOAT, &o->p2_gamma, "0", "P2 weighting gamma on the epsilon loss (0 = off; paper 0.5 or 1)", 0, 10},
        {"--p2-k", OPT_FLOAT, &o->p2_k, "1", "P2 weighting k", 1e-6, 1e6},
        {"--no-clip-x0", OPT_FLAG, &o->no_clip_x0, NULL, "casdm: feed x0* to phi unclipped", 0, 0},
        {"--lpips", OPT_STR, &o->lpips, NULL, "LPIPS weights (tools/convert_lpips.py); adds L^lpips on the x0 prediction", 0, 0},
        {"--lpips-size", OPT_INT, &o->lpips_size, "224", "LPIPS input size (images are resized; the paper: 224)", 16, 1024},
        {"--lpips-weight", OPT_FLOAT, &o->lambda_lpips, "0.1", "lambda of L^lpips (Eq. 15)", 0, 1e6},
        {"--steps", OPT_INT, &o->steps, "1000", "training steps (total, counting resumed ones)", 0, 1000000000},
        {"--time-limit", OPT_FLOAT, &o->time_limit, "0", "stop after this many seconds of training (0 = no limit)", 0, 1e9},
        {"--batch", OPT_INT, &o->batch, "16", "batch size", 1, 4096},
        {"--lr", OPT_FLOAT, &o->lr, "1e-4", "Adam learning rate", 0, 1},
        {"--ema", OPT_FLOAT, &o->ema, "0.9999", "EMA rate (warmed up as min(rate, (1+s)/(10+s)))", 0, 1},
        {"--grad-clip", OPT_FLOAT, &o->grad_clip, "0", "clip the global gradient norm to this (0 = off)", 0, 1e9},
        {"--seed", OPT_INT, &o->seed, "0", "random seed", 0, 2147483647},
        {"--grad-checkpoint", OPT_FLAG, &o->grad_checkpoint, NULL,
         "recompute each U-Net block in backward instead of keeping its activations (about half the memory, a third more time; same numbers)", 0, 0},
        {"--no-flip", OPT_FLAG, &o->no_flip, NULL, "no random horizontal flips (default for CIFAR-10 and image folders: flips)", 0, 0},
        {"--flip", OPT_FLAG, &o->flip, NULL, "random horizontal flips also for IDX data (default there: none)", 0, 0},
        {"--out", OPT_STR, &o->out, "runs/train", "output directory", 0, 0},
        {"--resume", OPT_STR, &o->resume, NULL, "continue from DIR/ckpt.safetensors", 0, 0},
        {"--log-every", OPT_INT, &o->log_every, "10", "steps per line of log.csv", 1, 1000000},
        {"--ckpt-every", OPT_INT, &o->ckpt_every, "1000", "steps between checkpoints (0 = only at the end)", 0, 1000000000},
        {"--sample-every", OPT_INT, &o->sample_every, "0", "steps between sample grids DIR/samples_STEP.png (0 = only at the end)", 0, 1000000000},
        {"--sample-n", OPT_INT, &o->sample_n, "36", "images in each sample grid (0 = none)", 0, 4096},
        {"--sample-steps", OPT_INT, &o->sample_steps, "50", "DDIM steps for the sample grids", 1, 100000},
    };
    train_opts_n = (int)(sizeof opts / sizeof opts[0]);
    memcpy(train_opts_table, opts, sizeof opts);
}

// DIR/samples_STEP.png from the EMA weights; its own RNG, so the training
// stream (and a resumed run) is the same with or without grids
static void train_sample_grid(Trainer *tr, Model *ema, const TrainOpts *o, int C, int S) {
    memcpy(ema->theta.params.data, tr->ema_theta, tr->theta.params.total * sizeof(float));
    if (tr->has_phi) memcpy(ema->phi.params.data, tr->ema_phi, tr->phi.params.total * sizeof(float));
    ema->sched = tr->sched;
    int kept[100000];
    char err[128], spec[32];
    snprintf(spec, sizeof spec, "%d", o->sample_steps < tr->sched.T ? o->sample_steps : tr->sched.T);
    int nk = space_timesteps(tr->sched.T, spec, kept, err, sizeof err);
    if (nk < 0) fatal("--sample-steps: %s", err);
    Schedule rs;
    schedule_respace(&rs, &tr->sched, kept, nk);
    SampleConfig sc = {tr->kind, SAMPLER_DDIM, 0.0f, 1, ema->clip_x0};
    Rng rng;
    rng_seed(&rng, (uint64_t)o->seed, 7);  // the same noise at every grid: progress is easy to see
    unsigned char *img = mallocCheck((size_t)o->sample_n * C * S * S);
    sample_images(ema, &sc, &rs, &rng, o->sample_n, o->sample_n < 36 ? o->sample_n : 36, img, -1);  // quietly
    char path[4200];
    snprintf(path, sizeof path, "%s/samples_%06ld.png", o->out, tr->step);
    write_grid_png(path, img, o->sample_n, S, S, C);
    fprintf(stderr, "samples: %s\n", path);
    free(img);
    schedule_free(&rs);
}

static int cmd_train(int argc, char **argv) {
    TrainOpts o;
    define_train_options(&o);
    parse_options("train", train_opts_table, train_opts_n, argc, argv, train_help);
    if (!o.data) { fprintf(stderr, "casdm train: --data is required (see casdm train --help)\n"); return 2; }
    if (o.flip && o.no_flip) { fprintf(stderr, "casdm train: --flip and --no-flip contradict each other\n"); return 2; }

    Lpips lpips;
    int use_lpips = o.lpips != NULL;
    if (use_lpips) {  // before anything slow: a bad file is an error at once
        char err[512];
        lpips_init(&lpips);
        lpips.size = o.lpips_size;
        if (lpips_load(&lpips, o.lpips, err, sizeof err) != 0) fatal("--lpips: %s", err);
    }
    Dataset data;
    load_dataset(&data, o.data);
    if (use_lpips && data.c != 3) fatal("--lpips needs RGB images; '%s' has %d channel(s)", o.data, data.c);
    if (data.h != data.w) fatal("--data '%s': images are %dx%d; square images only", o.data, data.h, data.w);
    int flip = o.flip || (data.flip && !o.no_flip);
    Trainer tr;
    trainer_init(&tr, &o, data.c, data.h);
    make_dir(o.out);
    char ckpt[4096], logpath[4096];
    snprintf(ckpt, sizeof ckpt, "%s/ckpt.safetensors", o.out);
    snprintf(logpath, sizeof logpath, "%s/log.csv", o.out);
    if (o.resume) {
        char from[4096];
        snprintf(from, sizeof from, "%s/ckpt.safetensors", o.resume);
        load_checkpoint(&tr, from);
        fprintf(stderr, "resumed from %s at step %ld\n", from, tr.step);
    }
    History hist = {0};
    char svgpath[4096], title[256];
    snprintf(svgpath, sizeof svgpath, "%s/loss.svg", o.out);
    snprintf(title, sizeof title, "casdm train --model %s (%s)", model_name(tr.kind), o.data);
    // the log continues: resuming in place appends; resuming into a new
    // directory starts its log with the old run's rows up to the resumed step
    struct stat st;
    int new_log = stat(logpath, &st) != 0;
    if (o.resume && new_log) {
        char from[4096];
        snprintf(from, sizeof from, "%s/log.csv", o.resume);
        history_load(&hist, from);
        while (hist.n && hist.step[hist.n - 1] > tr.step) hist.n--;
    } else if (o.resume) {
        history_load(&hist, logpath);
    }
    // the networks the sample grids use: EMA weights copied in when needed
    Model ema = {0};
    ema.kind = tr.kind;
    ema.has_phi = tr.has_phi;
    ema.clip_x0 = !o.no_clip_x0;
    if (o.sample_n > 0) {
        unet_init(&ema.theta, &tr.theta_cfg, 0, NULL);
        if (tr.has_phi) unet_init(&ema.phi, &tr.phi_cfg, 0, NULL);
    }
    FILE *log = fopen(logpath, o.resume && !new_log ? "a" : "w");
    if (!log) fatal("cannot write '%s': %s", logpath, strerror(errno));
    if (!o.resume || new_log) {
        fprintf(log, "step,loss,l_eps,l_x0,l_mu,l_lpips,img_per_s\n");
        for (size_t i = 0; i < hist.n; i++) {  // rows carried over from --resume DIR (img/s unknown: empty)
            fprintf(log, "%ld", hist.step[i]);
            for (int k = 0; k < PLOT_TERMS; k++)
                if (isnan(hist.v[i * PLOT_TERMS + k])) fprintf(log, ",");
                else fprintf(log, ",%.6g", hist.v[i * PLOT_TERMS + k]);
            fprintf(log, ",\n");
        }
    }
    fprintf(stderr, "casdm train: %s on %d images %dx%dx%d from %s; theta %zu parameters%s; %s, %d threads\n",
            model_name(tr.kind), data.n, data.c, data.h, data.w, o.data, tr.theta.params.total,
            tr.has_phi ? " (+ phi)" : "", simd_name(), pool_threads());

    tr.theta.use_checkpoint = tr.phi.use_checkpoint = o.grad_checkpoint;
    LossConfig lc = {tr.kind, o.p2_gamma, o.p2_k, !o.no_clip_x0, (float)o.lambda_lpips,
                     use_lpips ? lpips_loss : NULL, use_lpips ? &lpips : NULL};
    if (use_lpips && tr.kind == MODEL_DDPM_EPS) fatal("--lpips applies to an x0 prediction; ddpm-eps has none");
    Graph g;
    graph_init(&g, 0, 0);
    g.rng = &tr.rng;
    g.training = 1;
    int B = o.batch;
    size_t img = (size_t)data.c * data.h * data.w;
    float *x0buf = mallocCheck((size_t)B * img * sizeof(float));
    int *t = mallocCheck((size_t)B * sizeof(int));
    double sums[5] = {0}, t0 = now_seconds(), tlog = t0;
    int nsum = 0, tty = isatty(2);
    signal(SIGINT, on_sigint);
    int out_of_time = 0;
    long step0 = tr.step;
    while (tr.step < o.steps && !interrupted && !out_of_time) {
        out_of_time = o.time_limit > 0 && now_seconds() - t0 >= o.time_limit;
        if (out_of_time) break;
        graph_reset(&g);
        sample_batch(&data, &tr.rng, x0buf, B, flip);
        for (int i = 0; i < B; i++) t[i] = (int)rng_below(&tr.rng, (uint32_t)tr.sched.T);
        Tensor *x0 = tensor4(&g, B, data.c, data.h, data.w);
        memcpy(x0->data, x0buf, (size_t)B * img * sizeof(float));
        Tensor *noise = tensor4(&g, B, data.c, data.h, data.w);
        rng_fill_normal(&tr.rng, noise->data, noise->size, 0.0f, 1.0f);
        LossTerms lt;
        diffusion_losses(&g, &lt, &lc, &tr.sched, &tr.theta, tr.has_phi ? &tr.phi : NULL, x0, t, noise);
        if (!isfinite(lt.loss->data[0]))
            fatal("loss is %g at step %ld: stopping (lower --lr, or set --grad-clip)", lt.loss->data[0], tr.step + 1);
        params_zero_grad(&tr.theta.params);
        if (tr.has_phi) params_zero_grad(&tr.phi.params);
        graph_backward(&g, lt.loss, NULL);
        if (o.grad_clip > 0) {  // one global norm over both networks
            double sq = grad_norm_sq(tr.theta.params.grad, tr.theta.params.total);
            if (tr.has_phi) sq += grad_norm_sq(tr.phi.params.grad, tr.phi.params.total);
            double norm = sqrt(sq);
            if (norm > o.grad_clip) {
                float k = (float)(o.grad_clip / (norm + 1e-6));
                for (size_t i = 0; i < tr.theta.params.total; i++) tr.theta.params.grad[i] *= k;
                if (tr.has_phi) for (size_t i = 0; i < tr.phi.params.total; i++) tr.phi.params.grad[i] *= k;
            }
        }
        adam_step(&tr.adam_theta, tr.theta.params.data, tr.theta.params.grad);
        float rate = ema_rate(o.ema, tr.step);
        ema_update(tr.ema_theta, tr.theta.params.data, tr.theta.params.total, rate);
        if (tr.has_phi) {
            adam_step(&tr.adam_phi, tr.phi.params.data, tr.phi.params.grad);
            ema_update(tr.ema_phi, tr.phi.params.data, tr.phi.params.total, rate);
        }
        tr.step++;

        Tensor *terms[5] = {lt.loss, lt.l_eps, lt.l_x0, lt.l_mu, lt.l_lpips};
        for (int i = 0; i < 5; i++) sums[i] += terms[i] ? terms[i]->data[0] : 0.0;
        nsum++;
        if (tr.step % o.log_every == 0 || tr.step == o.steps || (o.time_limit > 0 && now_seconds() - t0 >= o.time_limit)) {
            double now = now_seconds(), ips = (double)nsum * B / (now - tlog);
            fprintf(log, "%ld", tr.step);
            for (int i = 0; i < 5; i++) {
                if (terms[i]) fprintf(log, ",%.6g", nonfinite_or(sums[i] / nsum));
                else fprintf(log, ",");
            }
            fprintf(log, ",%.3f\n", ips);
            fflush(log);
            double row[PLOT_TERMS];
            for (int i = 0; i < PLOT_TERMS; i++) row[i] = terms[i] ? sums[i] / nsum : NAN;
            history_add(&hist, tr.step, row);
            write_loss_svg(&hist, NULL, 1, svgpath, title);
            // ETA from this run's pace (a resumed run starts at step0), and
            // never past --time-limit
            double elapsed = now - t0, eta = elapsed / (double)(tr.step - step0) * (double)(o.steps - tr.step);
            if (o.time_limit > 0 && eta > o.time_limit - elapsed) eta = fmax(0.0, o.time_limit - elapsed);
            fprintf(stderr, "%sstep %ld/%d loss %.4f", tty ? "\r" : "", tr.step, o.steps, sums[0] / nsum);
            const char *nm[5] = {"", "eps", "x0", "mu", "lpips"};
            for (int i = 1; i < 5; i++)
                if (terms[i]) fprintf(stderr, " %s %.4f", nm[i], sums[i] / nsum);
            fprintf(stderr, " | %.2f img/s | %.0fs elapsed, ETA %.0fs%s", ips, elapsed, eta, tty ? "   " : "\n");
            memset(sums, 0, sizeof sums);
            nsum = 0;
            tlog = now;
        }
        if (o.ckpt_every > 0 && tr.step % o.ckpt_every == 0 && tr.step < o.steps) save_checkpoint(&tr, &o, ckpt);
        if (o.sample_n > 0 && o.sample_every > 0 && tr.step % o.sample_every == 0 && tr.step < o.steps) {
            if (tty) fprintf(stderr, "\n");
            train_sample_grid(&tr, &ema, &o, data.c, data.h);
        }
    }
    if (tty) fprintf(stderr, "\n");
    save_checkpoint(&tr, &o, ckpt);
    fprintf(stderr, "%s at step %ld: wrote %s\n", interrupted ? "interrupted" : out_of_time ? "time limit reached" : "done",
            tr.step, ckpt);
    if (o.sample_n > 0 && !interrupted) train_sample_grid(&tr, &ema, &o, data.c, data.h);
    if (hist.n) fprintf(stderr, "loss plot: %s\n", svgpath);
    free(hist.step);
    free(hist.v);
    if (o.sample_n > 0) {
        unet_free(&ema.theta);
        if (tr.has_phi) unet_free(&ema.phi);
    }
    fclose(log);
    free(x0buf);
    free(t);
    graph_free(&g);
    trainer_free(&tr);
    if (use_lpips) lpips_free(&lpips);
    free(data.pixels);
    return interrupted ? 130 : 0;
}

// ---------------------------------------------------------------------------
// ---- image files: PNG and NPZ, no zlib ----
// PNG (RFC 2083 / ISO 15948): zlib stream of "stored" deflate blocks (RFC
// 1950/1951), so no compressor is needed; CRC-32 per chunk, Adler-32 per
// stream. NPZ: an uncompressed zip holding arr_0.npy (NPY format 1.0), the
// layout improved-diffusion's image_sample.py writes with np.savez.
// Everything goes to a temp file first, then fsync and rename.
// ---------------------------------------------------------------------------
static uint32_t crc_table[256];

static void crc_init(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
        crc_table[n] = c;
    }
}

static uint32_t crc32_update(uint32_t crc, const unsigned char *b, size_t n) {
    if (!crc_table[1]) crc_init();
    crc = ~crc;
    for (size_t i = 0; i < n; i++) crc = crc_table[(crc ^ b[i]) & 0xff] ^ (crc >> 8);
    return ~crc;
}

// a byte buffer that grows (Bytes is declared with the training section)
static void bytes_put(Bytes *o, const void *p, size_t n) {
    if (o->len + n > o->cap) {
        size_t cap = o->cap ? o->cap * 2 : 4096;
        while (cap < o->len + n) cap *= 2;
        unsigned char *nb = mallocCheck(cap);
        if (o->len) memcpy(nb, o->b, o->len);
        free(o->b);
        o->b = nb;
        o->cap = cap;
    }
    memcpy(o->b + o->len, p, n);
    o->len += n;
}

static void bytes_u32be(Bytes *o, uint32_t v) {
    unsigned char b[4] = {(unsigned char)(v >> 24), (unsigned char)(v >> 16), (unsigned char)(v >> 8), (unsigned char)v};
    bytes_put(o, b, 4);
}

static void bytes_u16le(Bytes *o, uint32_t v) {
    unsigned char b[2] = {(unsigned char)v, (unsigned char)(v >> 8)};
    bytes_put(o, b, 2);
}

static void bytes_u32le(Bytes *o, uint32_t v) {
    unsigned char b[4] = {(unsigned char)v, (unsigned char)(v >> 8), (unsigned char)(v >> 16), (unsigned char)(v >> 24)};
    bytes_put(o, b, 4);
}

static void write_atomically(const char *path, const Bytes *data) {
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) fatal("cannot create '%s': %s", tmp, strerror(errno));
    int ok = fwrite(data->b, 1, data->len, f) == data->len && fflush(f) == 0 && fsync(fileno(f)) == 0;
    if (fclose(f) != 0) ok = 0;
    if (!ok || rename(tmp, path) != 0) {
        remove(tmp);
        fatal("cannot write '%s': %s", path, strerror(errno));
    }
}

static void png_chunk(Bytes *o, const char *type, const unsigned char *data, size_t n) {
    bytes_u32be(o, (uint32_t)n);
    size_t start = o->len;
    bytes_put(o, type, 4);
    if (n) bytes_put(o, data, n);
    bytes_u32be(o, crc32_update(0, o->b + start, n + 4));
}

// pixels: (H, W, C) bytes, C = 1 (grey) or 3 (RGB)
static void write_png(const char *path, const unsigned char *pixels, int W, int H, int C) {
    Bytes raw = {0}, z = {0}, o = {0};
    size_t row = (size_t)W * C;
    for (int y = 0; y < H; y++) {  // filter type 0 on every row
        unsigned char f0 = 0;
        bytes_put(&raw, &f0, 1);
        bytes_put(&raw, pixels + (size_t)y * row, row);
    }
    unsigned char zh[2] = {0x78, 0x01};  // deflate, 32K window, no dictionary, check bits
    bytes_put(&z, zh, 2);
    uint32_t a = 1, b = 0;  // Adler-32 of the uncompressed data
    for (size_t i = 0; i < raw.len; i++) { a = (a + raw.b[i]) % 65521u; b = (b + a) % 65521u; }
    for (size_t off = 0; off < raw.len || off == 0; off += 65535) {
        size_t n = raw.len - off < 65535 ? raw.len - off : 65535;
        unsigned char hdr[5] = {(unsigned char)(off + n == raw.len), (unsigned char)n, (unsigned char)(n >> 8),
                                (unsigned char)~n, (unsigned char)(~n >> 8)};
        bytes_put(&z, hdr, 5);
        bytes_put(&z, raw.b + off, n);
        if (raw.len == 0) break;
    }
    bytes_u32be(&z, (b << 16) | a);
    static const unsigned char sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    bytes_put(&o, sig, 8);
    unsigned char ihdr[13] = {(unsigned char)(W >> 24), (unsigned char)(W >> 16), (unsigned char)(W >> 8), (unsigned char)W,
                              (unsigned char)(H >> 24), (unsigned char)(H >> 16), (unsigned char)(H >> 8), (unsigned char)H,
                              8, (unsigned char)(C == 1 ? 0 : 2), 0, 0, 0};
    png_chunk(&o, "IHDR", ihdr, 13);
    png_chunk(&o, "IDAT", z.b, z.len);
    png_chunk(&o, "IEND", NULL, 0);
    write_atomically(path, &o);
    free(raw.b);
    free(z.b);
    free(o.b);
}

// x in [-1,1] -> uint8 as improved-diffusion: ((x + 1) * 127.5).clamp(0, 255), truncated
static unsigned char to_u8(float v) {
    float s = (v + 1.0f) * 127.5f;
    return (unsigned char)(s < 0.0f ? 0.0f : (s > 255.0f ? 255.0f : s));
}

// images (N, H, W, C) bytes -> a grid with 2-pixel borders, ceil(sqrt(N)) columns
static void write_grid_png(const char *path, const unsigned char *img, int N, int H, int W, int C) {
    int cols = (int)ceil(sqrt((double)N)), rows = (N + cols - 1) / cols, pad = 2;
    int GW = cols * (W + pad) + pad, GH = rows * (H + pad) + pad;
    unsigned char *g = callocCheck((size_t)GW * GH * C, 1);
    for (int n = 0; n < N; n++) {
        int ox = pad + (n % cols) * (W + pad), oy = pad + (n / cols) * (H + pad);
        for (int y = 0; y < H; y++)
            memcpy(g + ((size_t)(oy + y) * GW + ox) * C, img + (((size_t)n * H + y) * W) * C, (size_t)W * C);
    }
    write_png(path, g, GW, GH, C);
    free(g);
}

// NPZ with one member arr_0.npy of uint8 (N, H, W, C)
static void write_npz(const char *path, const unsigned char *img, int N, int H, int W, int C) {
    Bytes npy = {0}, o = {0};
    char dict[256];
    int dl = snprintf(dict, sizeof dict, "{'descr': '|u1', 'fortran_order': False, 'shape': (%d, %d, %d, %d), }", N, H, W, C);
    int total = 10 + dl + 1, padn = (64 - total % 64) % 64;  // header padded to 64 bytes, ends in \n
    static const unsigned char magic[8] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0};
    bytes_put(&npy, magic, 8);
    bytes_u16le(&npy, (uint32_t)(dl + padn + 1));
    bytes_put(&npy, dict, (size_t)dl);
    for (int i = 0; i < padn; i++) bytes_put(&npy, " ", 1);
    bytes_put(&npy, "\n", 1);
    bytes_put(&npy, img, (size_t)N * H * W * C);
    if (npy.len > 0xffffffffu) fatal("'%s': %zu bytes is beyond a plain zip (no zip64)", path, npy.len);
    uint32_t crc = crc32_update(0, npy.b, npy.len);
    const char *name = "arr_0.npy";
    uint16_t nl = (uint16_t)strlen(name);
    // local file header: stored (method 0), no data descriptor
    bytes_u32le(&o, 0x04034b50); bytes_u16le(&o, 20); bytes_u16le(&o, 0); bytes_u16le(&o, 0);
    bytes_u16le(&o, 0); bytes_u16le(&o, 0x21);  // time 0, date 1980-01-01
    bytes_u32le(&o, crc); bytes_u32le(&o, (uint32_t)npy.len); bytes_u32le(&o, (uint32_t)npy.len);
    bytes_u16le(&o, nl); bytes_u16le(&o, 0);
    bytes_put(&o, name, nl);
    bytes_put(&o, npy.b, npy.len);
    uint32_t cd = (uint32_t)o.len;
    // central directory entry, then the end record
    bytes_u32le(&o, 0x02014b50); bytes_u16le(&o, 20); bytes_u16le(&o, 20); bytes_u16le(&o, 0); bytes_u16le(&o, 0);
    bytes_u16le(&o, 0); bytes_u16le(&o, 0x21);
    bytes_u32le(&o, crc); bytes_u32le(&o, (uint32_t)npy.len); bytes_u32le(&o, (uint32_t)npy.len);
    bytes_u16le(&o, nl); bytes_u16le(&o, 0); bytes_u16le(&o, 0); bytes_u16le(&o, 0); bytes_u16le(&o, 0);
    bytes_u32le(&o, 0); bytes_u32le(&o, 0);  // attributes, local header at offset 0
    bytes_put(&o, name, nl);
    uint32_t cdlen = (uint32_t)o.len - cd;
    bytes_u32le(&o, 0x06054b50); bytes_u16le(&o, 0); bytes_u16le(&o, 0); bytes_u16le(&o, 1); bytes_u16le(&o, 1);
    bytes_u32le(&o, cdlen); bytes_u32le(&o, cd); bytes_u16le(&o, 0);
    write_atomically(path, &o);
    free(npy.b);
    free(o.b);
}

// ---- reading images: PNG (8-bit grey, grey+alpha, RGB, RGBA; all filters;
// no interlace) through a small inflate (RFC 1951), and binary PPM/PGM ----
typedef struct {
    const unsigned char *in;
    size_t len, pos;
    uint32_t bits;
    int nbits;
    Bytes *out;
} Inflate;

static int inf_bits(Inflate *s, int n) {  // n bits, LSB first; -1 past the end
    while (s->nbits < n) {
        if (s->pos >= s->len) return -1;
        s->bits |= (uint32_t)s->in[s->pos++] << s->nbits;
        s->nbits += 8;
    }
    int v = (int)(s->bits & ((1u << n) - 1));
    s->bits >>= n;
    s->nbits -= n;
    return v;
}

typedef struct { short count[16], symbol[320]; } Huffman;

static int huff_build(Huffman *h, const unsigned char *lengths, int n) {
    short offs[16];
    memset(h->count, 0, sizeof h->count);
    for (int i = 0; i < n; i++) h->count[lengths[i]]++;
    h->count[0] = 0;
    offs[1] = 0;
    for (int i = 1; i < 15; i++) offs[i + 1] = (short)(offs[i] + h->count[i]);
    for (int i = 0; i < n; i++)
        if (lengths[i]) h->symbol[offs[lengths[i]]++] = (short)i;
    return 0;
}

static int huff_decode(Inflate *s, const Huffman *h) {  // canonical code, bit by bit
    int code = 0, first = 0, index = 0;
    for (int len = 1; len < 16; len++) {
        int b = inf_bits(s, 1);
        if (b < 0) return -1;
        code |= b;
        int count = h->count[len];
        if (code - count < first) return h->symbol[index + (code - first)];
        index += count;
        first = (first + count) << 1;
        code <<= 1;
    }
    return -1;
}

static const short len_base[29] = {3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258};
static const short len_extra[29] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0};
static const short dist_base[30] = {1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577};
static const short dist_extra[30] = {0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13};

static int inf_codes(Inflate *s, const Huffman *lit, const Huffman *dist) {
    for (;;) {
        int sym = huff_decode(s, lit);
        if (sym < 0) return -1;
        if (sym < 256) { unsigned char c = (unsigned char)sym; bytes_put(s->out, &c, 1); continue; }
        if (sym == 256) return 0;
        sym -= 257;
        if (sym >= 29) return -1;
        int e = inf_bits(s, len_extra[sym]);
        if (e < 0) return -1;
        int len = len_base[sym] + e, ds = huff_decode(s, dist);
        if (ds < 0 || ds >= 30) return -1;
        e = inf_bits(s, dist_extra[ds]);
        if (e < 0) return -1;
        size_t d = (size_t)dist_base[ds] + (size_t)e;
        if (d > s->out->len) return -1;
        for (int i = 0; i < len; i++) {
            unsigned char c = s->out->b[s->out->len - d];
            bytes_put(s->out, &c, 1);
        }
    }
}

static int inflate_zlib(const unsigned char *in, size_t len, Bytes *out) {
    if (len < 6 || (in[0] & 0x0f) != 8 || ((in[0] << 8) | in[1]) % 31 || (in[1] & 0x20)) return -1;
    Inflate s = {in, len - 4, 2, 0, 0, out};
    int last = 0;
    while (!last) {
        last = inf_bits(&s, 1);
        int type = inf_bits(&s, 2);
        if (last < 0 || type < 0) return -1;
        if (type == 0) {  // stored
            s.bits = 0;
            s.nbits = 0;
            if (s.pos + 4 > s.len) return -1;
            unsigned n = s.in[s.pos] | (unsigned)s.in[s.pos + 1] << 8, nn = s.in[s.pos + 2] | (unsigned)s.in[s.pos + 3] << 8;
            s.pos += 4;
            if ((n ^ 0xffffu) != nn || s.pos + n > s.len) return -1;
            bytes_put(out, s.in + s.pos, n);
            s.pos += n;
        } else if (type == 1 || type == 2) {
            unsigned char lengths[320];
            Huffman lit, dist;
            int nlen = 288, ndist = 30;
            if (type == 1) {  // fixed codes
                for (int i = 0; i < 144; i++) lengths[i] = 8;
                for (int i = 144; i < 256; i++) lengths[i] = 9;
                for (int i = 256; i < 280; i++) lengths[i] = 7;
                for (int i = 280; i < 288; i++) lengths[i] = 8;
                for (int i = 0; i < 30; i++) lengths[288 + i] = 5;
            } else {          // dynamic codes
                static const unsigned char order[19] = {16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15};
                nlen = inf_bits(&s, 5) + 257;
                ndist = inf_bits(&s, 5) + 1;
                int ncode = inf_bits(&s, 4) + 4;
                if (nlen > 286 || ndist > 30 || ncode < 4) return -1;
                unsigned char cl[19] = {0};
                for (int i = 0; i < ncode; i++) {
                    int v = inf_bits(&s, 3);
                    if (v < 0) return -1;
                    cl[order[i]] = (unsigned char)v;
                }
                Huffman lencode;
                huff_build(&lencode, cl, 19);
                for (int i = 0; i < nlen + ndist;) {
                    int sym = huff_decode(&s, &lencode), rep = 0;
                    unsigned char val = 0;
                    if (sym < 0) return -1;
                    if (sym < 16) { lengths[i++] = (unsigned char)sym; continue; }
                    if (sym == 16) { if (i == 0) return -1; val = lengths[i - 1]; rep = 3 + inf_bits(&s, 2); }
                    else if (sym == 17) rep = 3 + inf_bits(&s, 3);
                    else rep = 11 + inf_bits(&s, 7);
                    if (rep < 3 || i + rep > nlen + ndist) return -1;
                    while (rep--) lengths[i++] = val;
                }
                if (nlen < 288) memmove(lengths + 288, lengths + nlen, (size_t)ndist);
                for (int i = nlen; i < 288; i++) lengths[i] = 0;
            }
            huff_build(&lit, lengths, 288);
            huff_build(&dist, lengths + 288, ndist);
            if (inf_codes(&s, &lit, &dist) != 0) return -1;
        } else {
            return -1;
        }
    }
    return 0;
}

static int paeth(int a, int b, int c) {
    int p = a + b - c, pa = abs(p - a), pb = abs(p - b), pc = abs(p - c);
    return pa <= pb && pa <= pc ? a : (pb <= pc ? b : c);
}

// an 8-bit PNG or a binary PPM/PGM -> bytes (H,W,C). *C = 3 asks for RGB
// (grey repeated); *C = 0 keeps the file's own: 1 for grey, 3 for colour
// (alpha is dropped).
static unsigned char *read_image(const char *path, int *W, int *H, int *C) {
    size_t n;
    unsigned char *b = read_file(path, &n);
    unsigned char *rgb = NULL;
    if (n >= 2 && b[0] == 'P' && (b[1] == '5' || b[1] == '6')) {
        int ch = b[1] == '6' ? 3 : 1, vals[3], k = 0;
        size_t p = 2;
        while (k < 3) {  // width, height, maxval with whitespace and comments
            while (p < n && (b[p] == ' ' || b[p] == '\t' || b[p] == '\n' || b[p] == '\r' || b[p] == '#'))
                if (b[p++] == '#') while (p < n && b[p] != '\n') p++;
            if (p >= n || b[p] < '0' || b[p] > '9') fatal("'%s': bad PNM header", path);
            long v = 0;
            while (p < n && b[p] >= '0' && b[p] <= '9') v = v * 10 + (b[p++] - '0');
            vals[k++] = (int)(v > 100000 ? 100000 : v);
        }
        p++;
        if (vals[2] != 255) fatal("'%s': only 8-bit PNM (maxval 255) is supported", path);
        *W = vals[0];
        *H = vals[1];
        if (*W < 1 || *H < 1 || n - p < (size_t)*W * *H * ch) fatal("'%s': truncated PNM data", path);
        int oc = *C ? *C : ch;
        rgb = mallocCheck((size_t)*W * *H * oc);
        for (size_t i = 0; i < (size_t)*W * *H; i++)
            for (int c = 0; c < oc; c++) rgb[i * oc + c] = b[p + i * ch + (ch == 3 ? c : 0)];
        free(b);
        *C = oc;
        return rgb;
    }
    static const unsigned char sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    if (n < 8 || memcmp(b, sig, 8)) fatal("'%s' is neither a PNG nor a binary PPM/PGM file", path);
    Bytes z = {0}, raw = {0};
    size_t p = 8;
    int depth = 0, ctype = -1, interlace = 0;
    while (p + 12 <= n) {
        uint32_t len = be32(b + p);
        if (len > n - p - 12) fatal("'%s': truncated PNG chunk", path);
        if (crc32_update(0, b + p + 4, len + 4) != be32(b + p + 8 + len)) fatal("'%s': PNG chunk CRC mismatch", path);
        const unsigned char *d = b + p + 8;
        if (!memcmp(b + p + 4, "IHDR", 4) && len == 13) {
            *W = (int)be32(d);
            *H = (int)be32(d + 4);
            depth = d[8];
            ctype = d[9];
            interlace = d[12];
        } else if (!memcmp(b + p + 4, "IDAT", 4)) {
            bytes_put(&z, d, len);
        } else if (!memcmp(b + p + 4, "IEND", 4)) {
            break;
        }
        p += 12 + len;
    }
    int ch = ctype == 0 ? 1 : ctype == 4 ? 2 : ctype == 2 ? 3 : ctype == 6 ? 4 : 0;
    if (depth != 8 || ch == 0 || interlace || *W < 1 || *H < 1 || *W > 16384 || *H > 16384)
        fatal("'%s': only 8-bit, non-interlaced grey/RGB(A) PNGs are supported", path);
    if (inflate_zlib(z.b, z.len, &raw) != 0) fatal("'%s': corrupt PNG image data", path);
    size_t stride = (size_t)*W * ch;
    if (raw.len < (size_t)*H * (stride + 1)) fatal("'%s': PNG image data too short", path);
    unsigned char *img = mallocCheck((size_t)*H * stride);
    for (int y = 0; y < *H; y++) {  // undo the row filters
        const unsigned char *src = raw.b + (size_t)y * (stride + 1) + 1;
        unsigned char *row = img + (size_t)y * stride, *up = y ? row - stride : NULL;
        int f = src[-1];
        for (size_t i = 0; i < stride; i++) {
            int a = i >= (size_t)ch ? row[i - ch] : 0, u = up ? up[i] : 0, c = (up && i >= (size_t)ch) ? up[i - ch] : 0, v = 0;
            switch (f) {
            case 0: v = src[i]; break;
            case 1: v = src[i] + a; break;
            case 2: v = src[i] + u; break;
            case 3: v = src[i] + ((a + u) >> 1); break;
            case 4: v = src[i] + paeth(a, u, c); break;
            default: fatal("'%s': bad PNG filter type %d", path, f);
            }
            row[i] = (unsigned char)v;
        }
    }
    int oc = *C ? *C : ch >= 3 ? 3 : 1;
    rgb = mallocCheck((size_t)*W * *H * oc);
    for (size_t i = 0; i < (size_t)*W * *H; i++)
        for (int c = 0; c < oc; c++) rgb[i * oc + c] = img[i * ch + (ch >= 3 ? c : 0)];
    *C = oc;
    free(img);
    free(raw.b);
    free(z.b);
    free(b);
    return rgb;
}

// ---- casdm lpips A B --weights FILE ----
static Option lpips_opts_table[8];
static int lpips_opts_n;

static void lpips_help(FILE *f) {
    fputs("usage: casdm lpips A.png B.png --weights FILE [--size N]\n\n"
          "Prints the LPIPS distance (VGG16, average pooling) between two images of the same size\n"
          "(8-bit PNG or binary PPM/PGM). Weights: tools/convert_lpips.py (see README).\n\noptions:\n", f);
    usage_options(f, lpips_opts_table, lpips_opts_n);
}

static int cmd_lpips(int argc, char **argv) {
    const char *weights = NULL;
    int size;
    const Option opts[] = {
        {"--weights", OPT_STR, &weights, NULL, "LPIPS weights (safetensors from tools/convert_lpips.py)", 0, 0},
        {"--size", OPT_INT, &size, "224", "resize both images to this size first (0: as they are)", 0, 4096},
    };
    lpips_opts_n = 2;
    memcpy(lpips_opts_table, opts, sizeof opts);
    const char *files[2];
    int nf = 0;
    char *rest[16];
    int nr = 0;
    for (int i = 0; i < argc; i++) {  // positional file names, options as usual
        int is_value = i > 0 && (strcmp(argv[i - 1], "--weights") == 0 || strcmp(argv[i - 1], "--size") == 0);
        if (argv[i][0] != '-' && nf < 2 && !is_value)
            files[nf++] = argv[i];
        else if (nr < 16) rest[nr++] = argv[i];
    }
    parse_options("lpips", lpips_opts_table, lpips_opts_n, nr, rest, lpips_help);
    if (nf != 2 || !weights) { fprintf(stderr, "casdm lpips: needs two images and --weights (see casdm lpips --help)\n"); return 2; }
    Lpips l;
    char err[512];
    lpips_init(&l);
    l.size = size;
    if (lpips_load(&l, weights, err, sizeof err) != 0) fatal("--weights: %s", err);
    int w[2], h[2];
    unsigned char *img[2];
    for (int i = 0; i < 2; i++) {
        int rgb = 3;
        img[i] = read_image(files[i], &w[i], &h[i], &rgb);
    }
    if (w[0] != w[1] || h[0] != h[1])
        fatal("'%s' is %dx%d but '%s' is %dx%d: the images must have the same size", files[0], w[0], h[0], files[1], w[1], h[1]);
    Graph g;
    graph_init(&g, 0, 0);
    g.grad_enabled = 0;
    Tensor *t[2];
    for (int i = 0; i < 2; i++) {
        t[i] = tensor4(&g, 1, 3, h[0], w[0]);
        for (int c = 0; c < 3; c++)
            for (int k = 0; k < w[0] * h[0]; k++) t[i]->data[(size_t)c * w[0] * h[0] + k] = img[i][(size_t)k * 3 + c] / 127.5f - 1.0f;
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

static int meta_int(const StFile *f, const char *path, const char *key) {
    char buf[128];
    meta_or_die(f, path, key, buf, sizeof buf);
    char *end;
    long v = strtol(buf, &end, 10);
    if (!*buf || *end) fatal("checkpoint '%s': metadata '%s' = '%s' is not an integer", path, key, buf);
    return (int)v;
}

// copies "<prefix><net>.<key>" tensors of f into u, checking every shape
static void load_net(UNet *u, const StFile *f, const char *path, const char *prefix, const char *net) {
    for (size_t i = 0; i < u->params.count; i++) {
        Tensor *t = &u->params.t[i];
        char name[300];
        snprintf(name, sizeof name, "%s%s.%s", prefix, net, t->name);
        const StEntry *e = st_find(f, name);
        if (!e) fatal("checkpoint '%s' lacks tensor '%s'", path, name);
        int same = e->ndim == t->ndim && e->size == t->size;
        for (int d = 0; same && d < t->ndim; d++) same = e->shape[d] == t->shape[d];
        if (!same) fatal("checkpoint '%s': tensor '%s' does not have the shape its metadata implies", path, name);
        memcpy(t->data, e->data, t->size * sizeof(float));
    }
}

// builds the networks a checkpoint describes and loads its EMA (or raw) weights
static void load_model(Model *m, const char *path, int use_ema) {
    StFile f;
    char err[512], buf[256];
    memset(m, 0, sizeof *m);
    if (st_read(path, &f, err, sizeof err) != 0) fatal("%s", err);
    meta_or_die(&f, path, "format", buf, sizeof buf);
    if (strcmp(buf, "casdm-checkpoint-1") != 0) fatal("'%s' has format '%s', not a casdm checkpoint", path, buf);
    meta_or_die(&f, path, "model", buf, sizeof buf);
    m->kind = model_parse(buf);
    if (m->kind < 0) fatal("checkpoint '%s': unknown model '%s'", path, buf);
    int S = meta_int(&f, path, "image_size"), C = meta_int(&f, path, "in_channels");
    UNetConfig c;
    unet_default_config(&c, S, C, model_theta_out(m->kind, C));
    c.model_channels = meta_int(&f, path, "model_channels");
    c.num_res_blocks = meta_int(&f, path, "num_res_blocks");
    c.num_heads = meta_int(&f, path, "num_heads");
    c.dropout = 0.0f;
    meta_or_die(&f, path, "channel_mult", buf, sizeof buf);
    if (unet_parse_channel_mult(&c, buf) != 0) fatal("checkpoint '%s': bad channel_mult '%s'", path, buf);
    meta_or_die(&f, path, "attention_resolutions", buf, sizeof buf);
    if (unet_parse_attention(&c, buf) != 0) fatal("checkpoint '%s': bad attention_resolutions '%s'", path, buf);
    meta_or_die(&f, path, "noise_schedule", buf, sizeof buf);
    int sk = schedule_parse(buf);
    if (sk < 0) fatal("checkpoint '%s': unknown noise_schedule '%s'", path, buf);
    schedule_init(&m->sched, sk, meta_int(&f, path, "diffusion_steps"));
    m->clip_x0 = st_meta(&f, "clip_x0", buf, sizeof buf) == 0 ? atoi(buf) : 1;
    const char *prefix = use_ema ? "ema." : "";
    unet_init(&m->theta, &c, 0, NULL);
    load_net(&m->theta, &f, path, prefix, "theta");
    if (m->kind == MODEL_CASDM) {
        c.out_channels = C + 1;
        unet_init(&m->phi, &c, 0, NULL);
        load_net(&m->phi, &f, path, prefix, "phi");
        m->has_phi = 1;
    }
    st_free(&f);
}

static void free_model(Model *m) {
    unet_free(&m->theta);
    if (m->has_phi) unet_free(&m->phi);
    schedule_free(&m->sched);
}

// n images (N,C,H,W) in [-1,1] -> uint8 (N,H,W,C) into out; progress on
// stderr in place (tty 1), as lines (0) or not at all (-1)
static void sample_images(Model *m, const SampleConfig *sc, const Schedule *rs, Rng *rng, int n, int batch,
                          unsigned char *out, int tty) {
    int C = m->theta.cfg.in_channels, S = m->theta.cfg.image_size;
    size_t per = (size_t)C * S * S;
    float *x = mallocCheck((size_t)batch * per * sizeof(float)), *xp = mallocCheck((size_t)batch * per * sizeof(float));
    float *z = mallocCheck((size_t)batch * per * sizeof(float));
    Graph g;
    graph_init(&g, 0, 0);
    double t0 = now_seconds();
    for (int done = 0; done < n; done += batch) {
        int B = n - done < batch ? n - done : batch;
        rng_fill_normal(rng, x, (size_t)B * per, 0.0f, 1.0f);
        for (int j = rs->T - 1; j >= 0; j--) {
            int noisy = sample_step_noisy(sc, j);
            if (noisy) rng_fill_normal(rng, z, (size_t)B * per, 0.0f, 1.0f);
            sample_step(&g, sc, rs, &m->theta, m->has_phi ? &m->phi : NULL, x, xp, B, C, S, S, j, noisy ? z : NULL);
            float *tmp = x; x = xp; xp = tmp;
            double el = now_seconds() - t0;
            double frac = ((double)done + (double)B * (rs->T - j) / rs->T) / n;
            if (tty >= 0) fprintf(stderr, "%simages %d-%d of %d, step %d/%d | %.1fs elapsed, ETA %.0fs%s", tty ? "\r" : "",
                    done + 1, done + B, n, rs->T - j, rs->T, el, el / frac * (1 - frac), tty ? "   " : "\n");
        }
        for (int b = 0; b < B; b++)
            for (int c = 0; c < C; c++)
                for (int i = 0; i < S * S; i++)
                    out[(((size_t)(done + b) * S * S) + i) * C + c] = to_u8(x[(size_t)b * per + (size_t)c * S * S + i]);
    }
    if (tty > 0) fprintf(stderr, "\n");
    graph_free(&g);
    free(x); free(xp); free(z);
}

typedef struct {
    const char *ckpt, *out, *steps, *method;
    int n, batch, seed, each, no_ema, no_clip;
    double eta;
} SampleOpts;

static Option sample_opts_table[32];
static int sample_opts_n;

static void sample_help(FILE *f) {
    fputs("usage: casdm sample --ckpt FILE [options]\n\n"
          "Samples with the checkpoint's EMA weights and writes DIR/grid.png, DIR/samples_NxHxWxC.npz\n"
          "(uint8 NHWC as arr_0, the layout of improved-diffusion's image_sample.py) and, with --each,\n"
          "DIR/sample_00000.png ...\n\noptions:\n", f);
    usage_options(f, sample_opts_table, sample_opts_n);
}

static int cmd_sample(int argc, char **argv) {
    SampleOpts o;
    const Option opts[] = {
        {"--ckpt", OPT_STR, &o.ckpt, NULL, "checkpoint written by casdm train", 0, 0},
        {"--n", OPT_INT, &o.n, "64", "number of images", 1, 1000000},
        {"--steps", OPT_STR, &o.steps, "100", "sampling steps: N (evenly strided, improved-diffusion's ddimN) or sections '10,10'", 0, 0},
        {"--method", OPT_STR, &o.method, "ddim", "ddim or ddpm", 0, 0},
        {"--eta", OPT_FLOAT, &o.eta, "0", "DDIM eta (0 = deterministic)", 0, 1},
        {"--seed", OPT_INT, &o.seed, "0", "random seed", 0, 2147483647},
        {"--batch", OPT_INT, &o.batch, "16", "images per batch", 1, 4096},
        {"--out", OPT_STR, &o.out, "samples", "output directory", 0, 0},
        {"--each", OPT_FLAG, &o.each, NULL, "also write each image as a PNG", 0, 0},
        {"--no-ema", OPT_FLAG, &o.no_ema, NULL, "use the raw weights instead of the EMA", 0, 0},
        {"--no-clip", OPT_FLAG, &o.no_clip, NULL, "do not clip predicted x0 to [-1,1]", 0, 0},
    };
    sample_opts_n = (int)(sizeof opts / sizeof opts[0]);
    memcpy(sample_opts_table, opts, sizeof opts);
    parse_options("sample", sample_opts_table, sample_opts_n, argc, argv, sample_help);
    if (!o.ckpt) { fprintf(stderr, "casdm sample: --ckpt is required (see casdm sample --help)\n"); return 2; }
    SampleConfig sc = {0, SAMPLER_DDIM, (float)o.eta, !o.no_clip, 1};
    if (strcmp(o.method, "ddpm") == 0) sc.method = SAMPLER_DDPM;
    else if (strcmp(o.method, "ddim") != 0) { fprintf(stderr, "casdm sample: --method '%s' is not ddim or ddpm\n", o.method); return 2; }
    Model m;
    load_model(&m, o.ckpt, !o.no_ema);
    sc.kind = m.kind;
    sc.clip_x0 = m.clip_x0;
    int *kept = mallocCheck((size_t)m.sched.T * sizeof(int));
    char err[256], spec[64];
    // a bare N means N evenly strided steps ("ddimN") when that stride exists
    int all_digits = o.steps[0] != 0;
    for (const char *p = o.steps; *p; p++) all_digits &= (*p >= '0' && *p <= '9');
    snprintf(spec, sizeof spec, "%s%s", all_digits ? "ddim" : "", o.steps);
    int nk = space_timesteps(m.sched.T, spec, kept, err, sizeof err);
    if (nk < 0 && all_digits) nk = space_timesteps(m.sched.T, o.steps, kept, err, sizeof err);
    if (nk < 0) {
        fprintf(stderr, "casdm sample: --steps '%s': %s\n", o.steps, err);
        free(kept);
        free_model(&m);
        return 2;
    }
    Schedule rs;
    schedule_respace(&rs, &m.sched, kept, nk);
    free(kept);
    make_dir(o.out);
    int C = m.theta.cfg.in_channels, S = m.theta.cfg.image_size;
    unsigned char *img = mallocCheck((size_t)o.n * S * S * C);
    Rng rng;
    rng_seed(&rng, (uint64_t)o.seed, 1);
    fprintf(stderr, "casdm sample: %s, %d images %dx%dx%d, %s %d steps (eta %g), %s weights, %d threads\n",
            model_name(m.kind), o.n, C, S, S, sc.method == SAMPLER_DDIM ? "DDIM" : "DDPM", nk, o.eta,
            o.no_ema ? "raw" : "EMA", pool_threads());
    double t0 = now_seconds();
    sample_images(&m, &sc, &rs, &rng, o.n, o.batch, img, isatty(2));
    double dt = now_seconds() - t0;
    char path[4200];
    snprintf(path, sizeof path, "%s/grid.png", o.out);
    write_grid_png(path, img, o.n, S, S, C);
    printf("%s\n", path);
    snprintf(path, sizeof path, "%s/samples_%dx%dx%dx%d.npz", o.out, o.n, S, S, C);
    write_npz(path, img, o.n, S, S, C);
    printf("%s\n", path);
    if (o.each)
        for (int i = 0; i < o.n; i++) {
            snprintf(path, sizeof path, "%s/sample_%05d.png", o.out, i);
            write_png(path, img + (size_t)i * S * S * C, S, S, C);
        }
    fprintf(stderr, "%d images in %.1fs (%.2f img/s)\n", o.n, dt, o.n / dt);
    free(img);
    schedule_free(&rs);
    free_model(&m);
    return 0;
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
    fputs("usage: casdm eval --ckpt FILE --data PATH [options]\n\n"
          "Held-out denoising losses: epsilon-MSE and x0-MSE at a fixed grid of t, with fixed noise,\n"
          "as CSV on stdout (t,eps_mse,x0_mse; a last line with the means).\n\noptions:\n", f);
    usage_options(f, eval_opts_table, eval_opts_n);
}

static int cmd_eval(int argc, char **argv) {
    const char *ckpt = NULL, *data_path = NULL;
    int n, grid, seed, batch, no_ema;
    const Option opts[] = {
        {"--ckpt", OPT_STR, &ckpt, NULL, "checkpoint written by casdm train", 0, 0},
        {"--data", OPT_STR, &data_path, NULL, "held-out images (e.g. t10k-images-idx3-ubyte, test_batch.bin)", 0, 0},
        {"--n", OPT_INT, &n, "1000", "images (the first N)", 1, 10000000},
        {"--t-grid", OPT_INT, &grid, "10", "timesteps t = (k + 0.5) T / grid, k = 0 .. grid-1", 1, 1000},
        {"--seed", OPT_INT, &seed, "0", "noise seed", 0, 2147483647},
        {"--batch", OPT_INT, &batch, "64", "images per batch", 1, 4096},
        {"--no-ema", OPT_FLAG, &no_ema, NULL, "the raw weights instead of the EMA", 0, 0},
    };
    eval_opts_n = (int)(sizeof opts / sizeof opts[0]);
    memcpy(eval_opts_table, opts, sizeof opts);
    parse_options("eval", eval_opts_table, eval_opts_n, argc, argv, eval_help);
    if (!ckpt || !data_path) { fprintf(stderr, "casdm eval: --ckpt and --data are required\n"); return 2; }
    Model m;
    load_model(&m, ckpt, !no_ema);
    Dataset d;
    load_dataset(&d, data_path);
    int C = m.theta.cfg.in_channels, S = m.theta.cfg.image_size;
    if (d.c != C || d.h != S || d.w != S) fatal("--data '%s' has %dx%dx%d images; the model takes %dx%dx%d", data_path, d.c, d.h, d.w, C, S, S);
    if (n > d.n) n = d.n;
    size_t per = (size_t)C * S * S;
    Graph g;
    graph_init(&g, 0, 0);
    g.grad_enabled = 0;
    printf("t,eps_mse,x0_mse\n");
    double tot_e = 0.0, tot_x = 0.0;
    for (int k = 0; k < grid; k++) {
        int t = (int)(((double)k + 0.5) * m.sched.T / grid);
        double ab = m.sched.abar[t], a1 = 1.0 / sqrt(ab), a2 = sqrt(1.0 / ab - 1.0);
        Rng rng;
        rng_seed(&rng, (uint64_t)seed, 1000 + (uint64_t)k);
        double se = 0.0, sx = 0.0;
        for (int b0 = 0; b0 < n; b0 += batch) {
            int B = n - b0 < batch ? n - b0 : batch;
            graph_reset(&g);
            Tensor *x0 = tensor4(&g, B, C, S, S), *eps = tensor4(&g, B, C, S, S), *xt = tensor4(&g, B, C, S, S);
            for (size_t i = 0; i < (size_t)B * per; i++) x0->data[i] = d.pixels[(size_t)b0 * per + i] / 127.5f - 1.0f;
            rng_fill_normal(&rng, eps->data, eps->size, 0.0f, 1.0f);
            for (size_t i = 0; i < xt->size; i++) xt->data[i] = (float)(sqrt(ab) * x0->data[i] + sqrt(1.0 - ab) * eps->data[i]);
            float *tm = arena_floats(&g.arena, (size_t)B);
            for (int i = 0; i < B; i++) tm[i] = schedule_model_t(&m.sched, t);
            Tensor *o = unet_forward(&g, &m.theta, xt, tm);
            size_t so = (size_t)o->shape[1] * S * S;
            const float *pe = NULL, *px = NULL;
            size_t sx0 = so;
            if (m.kind == MODEL_DDPM_EPS || m.kind == MODEL_CASDM) pe = o->data;
            if (m.kind == MODEL_DDPM_X0) px = o->data;
            if (m.kind == MODEL_DUAL) { px = o->data; pe = o->data + per; }
            if (m.kind == MODEL_CASDM) {
                Tensor *x0s = tensor4(&g, B, C, S, S);
                for (int i = 0; i < B; i++)
                    for (size_t q = 0; q < per; q++) {
                        float v = (float)(a1 * xt->data[i * per + q] - a2 * o->data[i * so + q]);
                        x0s->data[i * per + q] = m.clip_x0 ? (v < -1 ? -1 : v > 1 ? 1 : v) : v;
                    }
                Tensor *po = unet_forward(&g, &m.phi, x0s, tm);
                px = po->data;
                sx0 = (size_t)po->shape[1] * S * S;
            }
            for (int i = 0; i < B; i++)
                for (size_t q = 0; q < per; q++) {
                    double xv = xt->data[i * per + q], e = 0.0, x = 0.0;
                    if (pe) e = pe[i * so + q];
                    if (px) x = px[i * sx0 + q];
                    if (!pe) e = (a1 * xv - x) / a2;                    // epsilon from x0
                    if (!px) { x = a1 * xv - a2 * e; x = x < -1 ? -1 : x > 1 ? 1 : x; }  // x0 from epsilon, clipped
                    double de = e - eps->data[i * per + q], dx = x - x0->data[i * per + q];
                    se += de * de;
                    sx += dx * dx;
                }
        }
        se /= (double)n * per;
        sx /= (double)n * per;
        tot_e += se;
        tot_x += sx;
        printf("%d,%.6f,%.6f\n", t, se, sx);
    }
    printf("mean,%.6f,%.6f\n", tot_e / grid, tot_x / grid);
    graph_free(&g);
    free(d.pixels);
    free_model(&m);
    return 0;
}

// ---------------------------------------------------------------------------
// ---- plot: several log.csv files in one SVG ----
// E.g. the C run and tools/train_ref.py's PyTorch run of the same command.
// ---------------------------------------------------------------------------
static Option plot_opts_table[2];
static int plot_opts_n;

static void plot_help(FILE *f) {
    fputs("usage: casdm plot --out FILE.svg [--title S] [LABEL=]LOG.csv ...\n\n"
          "Draws the loss terms of one or more log.csv files (casdm train's, or tools/train_ref.py's)\n"
          "in one SVG: a colour per term, a dash pattern per file. LABEL names a file in the legend\n"
          "(default: its path).\n\noptions:\n", f);
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
    // options first, then the files: split argv at the first argument that is not an option or its value
    int a = 0;
    while (a < argc && argv[a][0] == '-') a += (strcmp(argv[a], "--help") == 0 || strcmp(argv[a], "-h") == 0) ? 1 : 2;
    if (a > argc) a = argc;
    parse_options("plot", opts, plot_opts_n, a, argv, plot_help);
    if (!out) { fprintf(stderr, "casdm plot: --out is required (see casdm plot --help)\n"); return 2; }
    int nruns = argc - a;
    if (nruns < 1) { fprintf(stderr, "casdm plot: no log.csv given (see casdm plot --help)\n"); return 2; }
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
        if (history_load(&runs[r], path) != 0) {
            fprintf(stderr, "casdm plot: cannot read %s: %s\n", path, strerror(errno));
            rc = 1;
        } else if (runs[r].n == 0) {
            fprintf(stderr, "casdm plot: %s has no rows of a casdm log.csv\n", path);
            rc = 1;
        }
    }
    if (rc == 0) {
        write_loss_svg(runs, labels, nruns, out, title);
        fprintf(stderr, "wrote %s (%d run%s)\n", out, nruns, nruns > 1 ? "s" : "");
    }
    for (int r = 0; r < nruns; r++) {
        if (labels[r] && labels[r] != argv[a + r]) free((char *)labels[r]);
        free(runs[r].step);
        free(runs[r].v);
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
            "  plot       loss curves of one or more log.csv files in one SVG (casdm plot --help)\n"
            "  info       print how this binary was built (SIMD path, threads)\n"
            "\n"
            "global options:\n"
            "  --threads N   worker threads (default: CASDM_THREADS, else the number of cores)\n"
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

int main(int argc, char **argv) {
    int threads = 0, i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) { usage(stdout); return 0; }
        if (strcmp(argv[i], "--threads") == 0) {
            if (i + 1 >= argc) { fprintf(stderr, "casdm: --threads needs a value\n"); return 2; }
            threads = parse_threads(argv[++i]);
            continue;
        }
        fprintf(stderr, "casdm: unknown option '%s' (see casdm --help)\n", argv[i]);
        return 2;
    }
    if (i >= argc) { usage(stderr); return 2; }
    pool_init(threads);
    int rc;
    if (strcmp(argv[i], "info") == 0) {
        printf("casdm: simd %s, threads %d\n", simd_name(), pool_threads());
        rc = 0;
    } else if (strcmp(argv[i], "train") == 0) {
        rc = cmd_train(argc - i - 1, argv + i + 1);
    } else if (strcmp(argv[i], "sample") == 0) {
        rc = cmd_sample(argc - i - 1, argv + i + 1);
    } else if (strcmp(argv[i], "lpips") == 0) {
        rc = cmd_lpips(argc - i - 1, argv + i + 1);
    } else if (strcmp(argv[i], "eval") == 0) {
        rc = cmd_eval(argc - i - 1, argv + i + 1);
    } else if (strcmp(argv[i], "plot") == 0) {
        rc = cmd_plot(argc - i - 1, argv + i + 1);
    } else {
        fprintf(stderr, "casdm: unknown command '%s' (see casdm --help)\n", argv[i]);
        rc = 2;
    }
    pool_shutdown();
    return rc;
}
