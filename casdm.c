// casdm.c: the program. Today: build information and the option plumbing;
// train, sample and lpips land here as the U-Net, LPIPS and sampler do.
#define _POSIX_C_SOURCE 200809L
#include <stdlib.h>
#include <string.h>

#include "tensor.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: casdm [--threads N] COMMAND [options]\n"
            "\n"
            "commands:\n"
            "  info       print how this binary was built (SIMD path, threads)\n"
            "\n"
            "global options:\n"
            "  --threads N   worker threads (default: CASDM_THREADS, else the number of cores)\n"
            "  --help        this text\n"
            "\n"
            "train, sample and lpips are not implemented yet.\n");
}

static int parse_int(const char *flag, const char *s, int lo, int hi) {
    char *end;
    long v = strtol(s, &end, 10);
    if (!*s || *end || v < lo || v > hi) {
        fprintf(stderr, "casdm: %s expects an integer in %d..%d, got '%s'\n", flag, lo, hi, s);
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
            threads = parse_int("--threads", argv[++i], 1, 64);
            continue;
        }
        fprintf(stderr, "casdm: unknown option '%s' (see casdm --help)\n", argv[i]);
        return 2;
    }
    if (i >= argc) { usage(stderr); return 2; }
    pool_init(threads);
    int rc = 0;
    if (strcmp(argv[i], "info") == 0) {
        printf("casdm: simd %s, threads %d\n", simd_name(), pool_threads());
    } else {
        fprintf(stderr, "casdm: unknown command '%s' (see casdm --help)\n", argv[i]);
        rc = 2;
    }
    pool_shutdown();
    return rc;
}
