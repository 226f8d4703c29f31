// test_util.h: what every casdm test binary shares. Each test prints one line,
// "PASS name ...", "FAIL name: ..." or "SKIP name: ...", which tests/run.sh
// counts; a binary exits non-zero if anything failed.
#ifndef CASDM_TEST_UTIL_H
#define CASDM_TEST_UTIL_H

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdint.h>
#include <string.h>

#include "../casdm.h"  // the engine (tensor.h), the models and formats.c

static int test_failed_count = 0;
static int test_quick = 0;  // --quick: the subset run under valgrind / emulation

static inline void test_result(int ok, const char *name, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("%s %s", ok ? "PASS" : "FAIL", name);
    if (fmt && *fmt) { printf(ok ? " (" : ": "); vprintf(fmt, ap); if (ok) printf(")"); }
    printf("\n");
    fflush(stdout);
    va_end(ap);
    if (!ok) test_failed_count++;
}

static inline void test_skip(const char *name, const char *why) {
    printf("SKIP %s: %s\n", name, why);
    fflush(stdout);
}

// why a VDPBF16PS test cannot run here
static inline const char *bf16_native_missing(void) {
    return cpu_has_avx512_bf16() ? "this build has no AVX512-BF16 kernel (not an AVX-512 build, "
                                   "or the compiler predates the instruction)"
                                 : "this CPU has no AVX512-BF16";
}

// why the AMX hardware test cannot run here
static inline const char *amx_missing(void) {
    return cpu_has_amx_bf16() ? gemm_bf16_why() : "this CPU has no AMX-BF16 (or its virtual machine hides it)";
}

// 1: the AMX model runs in this build (AVX-512's 32-column panels)
static inline int amx_model_here(void) {
    gemm_set_precision(GEMM_BF16_AMX_MODEL);
    int here = strstr(gemm_backend_name(), "amx-model") != NULL;
    gemm_set_precision(GEMM_FP32);
    return here;
}

// Compares got with ref element by element: err = |got - ref| / max(1, |ref|),
// i.e. absolute below 1 and relative above. Returns the max error and prints
// the first offending values to stderr when it exceeds tol.
static inline double compare(const char *what, const float *got, const float *ref, size_t n,
                             double tol) {
    double worst = 0.0;
    size_t shown = 0;
    for (size_t i = 0; i < n; i++) {
        double r = ref[i], d = fabs((double)got[i] - r) / (fabs(r) > 1.0 ? fabs(r) : 1.0);
        if (!(d <= worst)) worst = d;  // also catches NaN
        if (!(d <= tol) && shown < 4) {
            fprintf(stderr, "  %s[%zu]: got %.8g, want %.8g\n", what, i, got[i], ref[i]);
            shown++;
        }
    }
    if (worst != worst) worst = INFINITY;
    return worst;
}

// The test weights of tools/lpips_ref.py (lpips_test_values) and
// tools/inception_ref.py (test_values): h = FNV-1a 64 of a name; element i:
// splitmix64 of h + (i+1) * golden ratio, top 24 bits, as base in [-1, 1)
static inline uint64_t test_name_hash(const char *name) {
    uint64_t h = 14695981039346656037ULL;
    for (const char *c = name; *c; c++) h = (h ^ (unsigned char)*c) * 1099511628211ULL;
    return h;
}
static inline double test_base(uint64_t h, size_t i) {
    uint64_t z = h + ((uint64_t)i + 1) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return ((double)(z >> 40) / 16777216.0 - 0.5) * 2.0;
}

// tools/lpips_ref.py's lpips_test_values on every LPIPS weight: FNV-1a of
// "vgg.<name>", splitmix64 of h + (i+1) * golden ratio, >> 40; conv weights
// base * sqrt(6 / fan_in), biases 0.01 base, heads |base|
static inline void lpips_test_init(Lpips *l) {
    for (size_t p = 0; p < l->params.count; p++) {
        Tensor *t = params_get(&l->params, p);
        char name[128];
        snprintf(name, sizeof name, "vgg.%s", t->name);
        uint64_t h = test_name_hash(name);
        size_t len = strlen(t->name);
        int head = strncmp(t->name, "lin", 3) == 0,
            bias = len > 5 && strcmp(t->name + len - 5, ".bias") == 0;
        double fan_in = t->ndim == 4 ? (double)t->shape[1] * t->shape[2] * t->shape[3] : 1.0;
        for (size_t i = 0; i < t->size; i++) {
            double base = test_base(h, i), v;
            if (head) v = fabs(base);
            else if (bias) v = 0.01 * base;
            else v = base * sqrt(6.0 / fan_in);
            t->data[i] = (float)v;
        }
    }
}

#endif
