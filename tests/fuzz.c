// tests/fuzz.c: libFuzzer harnesses for every reader of casdm (make fuzz;
// tools/fuzz.sh runs them). One binary per target, chosen at compile time:
//   clang -fsanitize=fuzzer,address,undefined -DFUZZ_TARGET=fuzz_image ...
// Targets: image (PNG with its inflate, PPM, PGM), idx, cifar, safetensors,
// csv (log.csv and the loss plot), checkpoint (a checkpoint's metadata, as
// casdm sample / eval / train --resume check it) and options (the train and
// sample option tables, train_config, --steps respacing, --mult / --attn).
// The readers return errors instead of exiting, so each harness calls them
// on memory; anything that exits (fatal) on an input is a finding.
//
// casdm.c's statics (options, checkpoint metadata) are reached the way
// fuzzers usually reach a program's internals: its main is renamed and the
// whole file included here.
#define _POSIX_C_SOURCE 200809L
#define main casdm_main
#include "../casdm.c"
#undef main

#include <sanitizer/common_interface_defs.h>
#include <stdint.h>

#ifndef FUZZ_TARGET
#error "compile with -DFUZZ_TARGET=fuzz_<target> (see the Makefile's fuzz rule)"
#endif

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int fuzz_image(const uint8_t *data, size_t size);
int fuzz_idx(const uint8_t *data, size_t size);
int fuzz_cifar(const uint8_t *data, size_t size);
int fuzz_safetensors(const uint8_t *data, size_t size);
int fuzz_csv(const uint8_t *data, size_t size);
int fuzz_checkpoint(const uint8_t *data, size_t size);
int fuzz_options(const uint8_t *data, size_t size);

// Reads every byte of a result, so that ASan sees a buffer shorter than its
// reader claims; the sum is kept so the reads are not optimised away.
static volatile unsigned fuzz_sink;
static void touch(const unsigned char *p, size_t n) {
    unsigned s = 0;
    for (size_t i = 0; i < n; i++) s += p[i];
    fuzz_sink += s;
}

// a property the reader promises does not hold: a finding like a crash
// (reported through the sanitizer, whose output survives -close_fd_mask)
static void fuzz_check(int ok, const char *what) {
    if (!ok) {
        char msg[200];
        snprintf(msg, sizeof msg, "fuzz: broken promise: %s", what);
        __sanitizer_report_error_summary(msg);
        abort();
    }
}

// The file's own channels, then grey and RGB. Those two differ from the first
// only after every check has passed, so they run when it succeeded, and only
// on images of at most 2^20 pixels: a 64 KB PNG can hold 2^26 (deflate packs
// ~1000:1), which takes seconds under the sanitizers, once is enough.
int fuzz_image(const uint8_t *data, size_t size) {
    static const int want[3] = {0, 1, 3};
    for (int k = 0; k < 3; k++) {
        int W = -1, H = -1, C = want[k];
        char err[600];
        unsigned char *img = decode_image(data, size, "fuzz", &W, &H, &C, err, sizeof err);
        if (!img) break;
        fuzz_check(W >= 1 && H >= 1 && W <= IMAGE_MAX_SIDE && H <= IMAGE_MAX_SIDE &&
                   (uint64_t)W * H <= IMAGE_MAX_PIXELS, "decode_image: size in range");
        fuzz_check(want[k] ? C == want[k] : (C == 1 || C == 3), "decode_image: channels as asked");
        touch(img, (size_t)W * H * C);
        free(img);
        if ((uint64_t)W * H > (1u << 20)) break;
    }
    return 0;
}

int fuzz_idx(const uint8_t *data, size_t size) {
    Images im;
    char err[600];
    if (idx_decode(data, size, "fuzz", &im, err, sizeof err) == 0) {
        fuzz_check(im.n >= 1 && im.c == 1 && im.h == im.w && im.h % 8 == 0, "idx_decode: shape");
        touch(im.pixels, (size_t)im.n * im.c * im.h * im.w);
        images_free(&im);
    } else {
        fuzz_check(im.pixels == NULL, "idx_decode: nothing kept on error");
    }
    // the same bytes as a label file for as many images as it claims (and for 3)
    Images lab = {0};
    lab.n = size >= 8 ? (int)(((uint32_t)data[4] << 24 | (uint32_t)data[5] << 16 |
                               (uint32_t)data[6] << 8 | data[7]) & 0x7fffffff) : 3;
    for (int k = 0; k < 2; k++) {
        if (idx_labels_decode(data, size, "fuzz", &lab, err, sizeof err) == 0)
            touch(lab.labels, (size_t)lab.n);
        images_free(&lab);
        lab.n = 3;
    }
    return 0;
}

int fuzz_cifar(const uint8_t *data, size_t size) {
    Images im = {0};
    char err[600];
    if (cifar_decode(data, size, "fuzz", &im, err, sizeof err) == 0) {
        fuzz_check(im.n >= 1 && im.c == 3 && im.h == 32 && im.w == 32, "cifar_decode: shape");
        touch(im.pixels, (size_t)im.n * 3072);
        // appending a second batch, as load_dataset does for data_batch_1..5
        if (size <= 4 * 3073 && cifar_decode(data, size, "fuzz", &im, err, sizeof err) == 0)
            touch(im.pixels, (size_t)im.n * 3072);
    }
    images_free(&im);
    return 0;
}

// the lookups a checkpoint reader makes, and st_find's promise: every entry
// is found under its own name
static void st_exercise(const StFile *f) {
    static const char *names[] = {"a", "theta.out.2.bias", "ema.theta.time_embed.0.weight", ""};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        const StEntry *e = st_find(f, names[i]);
        if (e) fuzz_check(strcmp(e->name, names[i]) == 0, "st_find: right name");
    }
    for (size_t i = 0; i < f->count; i++) {
        fuzz_check(st_find(f, f->e[i].name) == &f->e[i], "st_find: each entry under its name");
        touch((const unsigned char *)f->e[i].data, f->e[i].size * sizeof(float));
    }
    static const char *keys[] = {"format", "step", "model", "x", ""};
    char small[4], big[256];
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        int found = st_meta(f, keys[i], big, sizeof big) == 0;
        if (found) fuzz_check(strlen(big) < sizeof big, "st_meta: terminated");
        if (st_meta(f, keys[i], small, sizeof small) == 0)
            fuzz_check(strlen(small) < sizeof small, "st_meta: fits");
        // a short value is found whatever the length of the other values
        else if (found)
            fuzz_check(strlen(big) >= sizeof small,
                       "st_meta: a short value found with a small buffer");
    }
}

int fuzz_safetensors(const uint8_t *data, size_t size) {
    StFile f;
    char err[600];
    if (st_parse(data, size, "fuzz", &f, err, sizeof err) == 0) {
        st_exercise(&f);
        st_free(&f);
    } else {
        fuzz_check(err[0] != 0, "st_parse: a message on error");
    }
    return 0;
}

int fuzz_csv(const uint8_t *data, size_t size) {
    History h[2] = {{0}, {0}};
    history_parse(&h[0], (const char *)data, size);
    if (size) (void)log_row_step((const char *)data, size);
    Bytes o = {0};
    loss_svg(&o, h, NULL, 1, "fuzz <&> title");
    free(o.b);
    // two runs, labelled (casdm plot A=x B=y)
    history_parse(&h[1], (const char *)data, size / 2);
    static const char *const labels[2] = {"a<b", "c&d"};
    Bytes o2 = {0};
    loss_svg(&o2, h, labels, 2, "");
    free(o2.b);
    history_free(&h[0]);
    history_free(&h[1]);
    return 0;
}

int fuzz_checkpoint(const uint8_t *data, size_t size) {
    StFile f;
    char err[600];
    if (st_parse(data, size, "fuzz", &f, err, sizeof err) != 0) return 0;
    CkptInfo ci;
    if (checkpoint_info(&f, "fuzz", &ci, err, sizeof err) == 0) {
        (void)checkpoint_sizes(&f, "fuzz", &ci, "ema.", err, sizeof err);
        (void)checkpoint_sizes(&f, "fuzz", &ci, "", err, sizeof err);
        (void)unet_activation_floats(&ci.cfg);
    }
    st_free(&f);
    return 0;
}

// the input split at NUL bytes: at most FUZZ_MAX_ARGS strings (a trailing
// NUL ends the last one); the strings live in buf
#define FUZZ_MAX_ARGS 32
static int split_args(char *buf, size_t size, char **argv) {
    int argc = 0;
    size_t i = 0;
    while (i < size && argc < FUZZ_MAX_ARGS) {
        argv[argc++] = buf + i;
        while (i < size && buf[i]) i++;
        i++;
    }
    return argc;
}

static void fuzz_train_options(int argc, char **argv) {
    TrainOpts o;
    define_train_options(&o);
    if (parse_options("train", train_opts_table, train_opts_n, argc, argv, train_help) != 0) return;
    static const int shapes[3][2] = {{3, 32}, {1, 28}, {1, 64}};
    for (int k = 0; k < 3; k++) {
        UNetConfig cfg;
        int kind, sk;
        char err[600];
        if (train_config(&o, shapes[k][0], shapes[k][1], &cfg, &kind, &sk, err, sizeof err) != 0)
            continue;
        // what trainer_init does before it allocates
        (void)train_memory_check(&cfg, kind == MODEL_CASDM, &o, err, sizeof err);
    }
}

static void fuzz_sample_options(int argc, char **argv) {
    SampleOpts o;
    define_sample_options(&o);
    if (parse_options("sample", sample_opts_table, sample_opts_n, argc, argv, sample_help) != 0)
        return;
    enum { T = 1000 };
    static int kept[T];
    char err[600];
    int nk = sample_steps(o.steps, T, kept, err, sizeof err);
    if (nk < 0) return;
    fuzz_check(nk >= 1 && nk <= T, "sample_steps: count in 1..T");
    for (int i = 0; i < nk; i++)
        fuzz_check(kept[i] >= 0 && kept[i] < T, "sample_steps: steps in 0..T-1");
    Schedule base, rs;
    schedule_init(&base, SCHEDULE_COSINE, T);
    schedule_respace(&rs, &base, kept, nk);
    schedule_free(&rs);
    schedule_free(&base);
}

int fuzz_options(const uint8_t *data, size_t size) {
    char *buf = mallocCheck(size + 1);
    if (size) memcpy(buf, data, size);
    buf[size] = 0;
    char *argv[FUZZ_MAX_ARGS + 1];
    int argc = split_args(buf, size, argv);
    argv[argc] = NULL;
    fuzz_train_options(argc, argv);
    fuzz_sample_options(argc, argv);

    // the whole input as one string (up to its first NUL): --steps, --mult, --attn
    static const int Ts[4] = {1, 7, 1000, 4000};
    static int kept[4000];
    for (int k = 0; k < 4; k++) {
        char err[600];
        int nk = space_timesteps(Ts[k], buf, kept, err, sizeof err);
        if (nk >= 0) {
            fuzz_check(nk >= 1 && nk <= Ts[k], "space_timesteps: count in 1..T");
            for (int i = 0; i < nk; i++)
                fuzz_check(kept[i] >= 0 && kept[i] < Ts[k], "space_timesteps: steps in 0..T-1");
        }
        nk = sample_steps(buf, Ts[k], kept, err, sizeof err);
        if (nk >= 0) fuzz_check(nk >= 1 && nk <= Ts[k], "sample_steps: count in 1..T");
    }
    static const int sizes[4] = {28, 32, 64, 256};
    for (int k = 0; k < 4; k++) {
        UNetConfig c;
        char why[256];
        unet_default_config(&c, sizes[k], 3, 3);
        if (unet_parse_channel_mult(&c, buf) == 0)
            fuzz_check(c.n_levels >= 1 && c.n_levels <= UNET_MAX_LEVELS, "mult: levels");
        if (unet_parse_attention(&c, buf) == 0)
            fuzz_check(c.n_attention <= UNET_MAX_LEVELS, "attn: count");
        (void)unet_check_config(&c, why, sizeof why);
    }
    free(buf);
    return 0;
}

// NPZ: any member the three names casdm fid asks for; what parses has the
// element count its shape says and data of that many elements
int fuzz_npz(const uint8_t *data, size_t size) {
    static const char *members[3] = {"arr_0", "mu", "sigma"};
    for (int k = 0; k < 3; k++) {
        NpzArray a;
        char err[600];
        err[0] = 0;
        if (npz_parse(data, size, "fuzz", members[k], &a, err, sizeof err) == 0) {
            size_t count = 1;
            for (int d = 0; d < a.ndim; d++) count *= (size_t)a.shape[d];
            fuzz_check(count == a.count, "npz_parse: count = product of the shape");
            fuzz_check(a.kind == NPY_U8 ? a.u8 != NULL : a.f64 != NULL, "npz_parse: data");
            volatile double sum = 0.0;  // every element readable
            for (size_t i = 0; i < a.count; i++) sum += a.kind == NPY_U8 ? a.u8[i] : a.f64[i];
            (void)sum;
            npz_free(&a);
        } else {
            fuzz_check(err[0] != 0, "npz_parse: a message on error");
            fuzz_check(a.u8 == NULL && a.f64 == NULL, "npz_parse: nothing kept on error");
        }
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) { return FUZZ_TARGET(data, size); }
