// test_fid.c: fid.c against tests/goldens/fid.safetensors (tools/make_fid_goldens.py:
// tools/inception_ref.py in float64, scipy's sqrtm, improved-gan's IS) and
// against closed forms; the NPZ reader against files numpy wrote.
#include "test_util.h"

#include <stdlib.h>

static StFile goldens;

static const StEntry *golden(const char *key) {
    const StEntry *e = st_find(&goldens, key);
    if (!e) fatal("golden file lacks '%s' (regenerate with tools/make_fid_goldens.py)", key);
    return e;
}

// inception_ref.test_values: the test weights of a state_dict key
static void test_values(const char *key, float *out, size_t n, const int *shape) {
    char name[160];
    snprintf(name, sizeof name, "inception.%s", key);
    uint64_t h = test_name_hash(name);
    size_t len = strlen(key);
#define ENDS(s) (len >= strlen(s) && strcmp(key + len - strlen(s), s) == 0)
    for (size_t i = 0; i < n; i++) {
        double b = test_base(h, i), v;
        if (ENDS("conv.weight")) v = b * sqrt(6.0 / ((double)shape[1] * shape[2] * shape[3]));
        else if (ENDS("bn.weight") || ENDS("bn.running_var")) v = 1.0 + 0.2 * b;
        else if (ENDS("bn.bias") || ENDS("bn.running_mean")) v = 0.1 * b;
        else if (strcmp(key, "fc.weight") == 0) v = b * sqrt(6.0 / 2048);
        else v = 0.01 * b;
        out[i] = (float)v;
    }
#undef ENDS
}

// the test weights in pytorch-fid's layout, as tools/convert_inception.py writes
// them; skip (a name) leaves one tensor out, bad_shape gives fc.bias 1007 rows
#define WEIGHTS_PATH "build/inception_test.safetensors"
static void write_test_weights(const char *path, const char *skip, int bad_shape) {
    enum { MAXT = INCEPTION_CONVS * 5 + 2 };
    static char names[MAXT][128];
    static int shapes[MAXT][4];
    StWrite *w = mallocCheck(MAXT * sizeof *w);
    float **data = mallocCheck(MAXT * sizeof *data);
    size_t n = 0;
    static const char *bn[4] = {"weight", "bias", "running_mean", "running_var"};
    for (int i = 0; i < INCEPTION_CONVS; i++) {
        int ic, oc, kh, kw;
        const char *unit = inception_conv_name(i, &ic, &oc, &kh, &kw);
        for (int k = -1; k < 4; k++) {
            if (k < 0) {
                snprintf(names[n], sizeof names[n], "%s.conv.weight", unit);
                int s[4] = {oc, ic, kh, kw};
                memcpy(shapes[n], s, sizeof s);
            } else {
                snprintf(names[n], sizeof names[n], "%s.bn.%s", unit, bn[k]);
                shapes[n][0] = oc;
            }
            w[n] = (StWrite){names[n], k < 0 ? 4 : 1, shapes[n], NULL};
            n++;
        }
    }
    snprintf(names[n], sizeof names[n], "fc.weight");
    shapes[n][0] = INCEPTION_LOGITS, shapes[n][1] = INCEPTION_POOL;
    w[n] = (StWrite){names[n], 2, shapes[n], NULL};
    n++;
    snprintf(names[n], sizeof names[n], "fc.bias");
    shapes[n][0] = INCEPTION_LOGITS - (bad_shape ? 1 : 0);
    w[n] = (StWrite){names[n], 1, shapes[n], NULL};
    n++;
    size_t kept = 0;
    for (size_t i = 0; i < n; i++) {
        size_t size = shape_size(w[i].ndim, w[i].shape);
        data[i] = mallocCheck(size * sizeof(float));
        test_values(w[i].name, data[i], size, w[i].shape);
        w[i].data = data[i];
        if (!skip || strcmp(w[i].name, skip) != 0) w[kept++] = w[i];
    }
    char err[512];
    const char *meta[] = {"format", "casdm-inception-fid-1", "producer", "tests/test_fid.c", NULL};
    if (st_write(path, w, kept, meta, err, sizeof err) != 0) fatal("%s", err);
    for (size_t i = 0; i < n; i++) free(data[i]);
    free(data);
    free(w);
}

static float *test_images(const char *c, int n, int h, int w) {
    char name[128];
    snprintf(name, sizeof name, "inception.images.%s", c);
    uint64_t hh = test_name_hash(name);
    size_t count = (size_t)n * 3 * h * w;
    float *x = mallocCheck(count * sizeof(float));
    for (size_t i = 0; i < count; i++) x[i] = (float)((test_base(hh, i) + 1.0) * 0.5);
    return x;
}

// max |got - ref| / max |ref|
static double rel_err(const float *got, const StEntry *ref) {
    double worst = 0.0, scale = 0.0;
    for (size_t i = 0; i < ref->size; i++) {
        scale = fmax(scale, fabs(ref->data[i]));
        double d = fabs((double)got[i] - ref->data[i]);
        if (!(d <= worst)) worst = d;
    }
    return worst / scale;
}

static void test_inception(void) {
    write_test_weights(WEIGHTS_PATH, NULL, 0);
    Inception m;
    char err[512];
    if (inception_load(&m, WEIGHTS_PATH, err, sizeof err) != 0) fatal("%s", err);
    static const struct { const char *name; int n, h, w; } cases[] = {
        {"c32", 2, 32, 32}, {"c45x37", 1, 45, 37}, {"c299", 1, 299, 299}};
    double worst[3] = {0, 0, 0};
    int ncase = test_quick ? 1 : 3;
    for (int threads = 1; threads <= 2; threads++) {
        pool_init(threads);
        for (int c = 0; c < ncase; c++) {
            int n = cases[c].n;
            float *x = test_images(cases[c].name, n, cases[c].h, cases[c].w);
            float *pool3 = mallocCheck((size_t)n * INCEPTION_POOL * sizeof(float));
            float *spatial = mallocCheck((size_t)n * INCEPTION_SPATIAL * sizeof(float));
            float *logits = mallocCheck((size_t)n * INCEPTION_LOGITS * sizeof(float));
            inception_forward(&m, x, n, cases[c].h, cases[c].w, pool3, spatial, logits);
            char key[64];
            snprintf(key, sizeof key, "%s/pool3", cases[c].name);
            worst[0] = fmax(worst[0], rel_err(pool3, golden(key)));
            snprintf(key, sizeof key, "%s/spatial", cases[c].name);
            worst[1] = fmax(worst[1], rel_err(spatial, golden(key)));
            snprintf(key, sizeof key, "%s/logits", cases[c].name);
            worst[2] = fmax(worst[2], rel_err(logits, golden(key)));
            free(x); free(pool3); free(spatial); free(logits);
        }
    }
    pool_init(0);
    int ok = worst[0] <= 1e-4 && worst[1] <= 1e-4 && worst[2] <= 1e-4;
    test_result(ok, "Inception-v3 (pytorch-fid) pool3, sFID spatial and logits vs PyTorch",
                "%d image sizes (32x32, 45x37 resized, 299x299) x 1 and 2 threads, max error / "
                "max |ref|: pool3 %.1e, spatial %.1e, logits %.1e, tol 1e-4, %s",
                ncase, worst[0], worst[1], worst[2], simd_name());
    inception_free(&m);

    // a file without one tensor, one with a tensor of the wrong shape
    write_test_weights("build/inception_missing.safetensors", "Mixed_6d.branch1x1.bn.running_var",
                       0);
    write_test_weights("build/inception_shape.safetensors", NULL, 1);
    int rc1 = inception_load(&m, "build/inception_missing.safetensors", err, sizeof err);
    int named1 = rc1 != 0 && strstr(err, "Mixed_6d.branch1x1.bn.running_var") != NULL;
    int rc2 = inception_load(&m, "build/inception_shape.safetensors", err, sizeof err);
    int named2 = rc2 != 0 && strstr(err, "fc.bias") != NULL && strstr(err, "shape") != NULL;
    test_result(named1 && named2, "Inception weights: a missing or misshapen tensor is named",
                "%s", err);
}

// tools/make_fid_goldens.py's feature_set: the same double operations in the same order
static float *feature_set(const char *name, int n, int d, double offset) {
    enum { L = 16 };
    char key[64];
    snprintf(key, sizeof key, "fid.latent.%s", name);
    uint64_t hz = test_name_hash(key);
    snprintf(key, sizeof key, "fid.mix.%d", d);
    uint64_t hm = test_name_hash(key);
    snprintf(key, sizeof key, "fid.noise.%s", name);
    uint64_t hn = test_name_hash(key);
    float *x = mallocCheck((size_t)n * d * sizeof(float));
    for (int b = 0; b < n; b++)
        for (int j = 0; j < d; j++) {
            double acc = offset;
            for (int k = 0; k < L; k++)
                acc = acc + test_base(hz, (size_t)b * L + k) *
                                (test_base(hm, (size_t)k * d + j) * (1.0 / (1 + k)));
            acc = acc + 0.3 * test_base(hn, (size_t)b * d + j);
            x[(size_t)b * d + j] = (float)(acc > 0.0 ? acc : 0.0);
        }
    return x;
}

// mu, sigma of a feature set, streamed in batches of 50 as casdm fid does
static void set_stats(const char *name, int n, int d, double offset, double **mu, double **sigma) {
    float *x = feature_set(name, n, d, offset);
    FeatStats s;
    featstats_init(&s, d);
    for (int b = 0; b < n; b += 50) featstats_add(&s, x + (size_t)b * d, n - b < 50 ? n - b : 50);
    *mu = mallocCheck((size_t)d * sizeof(double));
    *sigma = mallocCheck((size_t)d * d * sizeof(double));
    featstats_result(&s, *mu, *sigma);
    featstats_free(&s);
    free(x);
}

static void test_frechet(void) {
    static const struct { const char *a, *b, *key; int na, nb, d; double oa, ob; } pairs[] = {
        {"a", "b", "fd/ab", 300, 200, 64, 0.2, 0.25},
        {"A", "B", "fd/AB", 3000, 2500, 2048, 0.2, 0.3},
        {"A", "C", "fd/AC", 3000, 1000, 2048, 0.2, 0.2}};
    int npairs = test_quick ? 1 : 3;
    for (int p = 0; p < npairs; p++) {
        double *m1, *s1, *m2, *s2, fd = NAN, self = NAN;
        set_stats(pairs[p].a, pairs[p].na, pairs[p].d, pairs[p].oa, &m1, &s1);
        set_stats(pairs[p].b, pairs[p].nb, pairs[p].d, pairs[p].ob, &m2, &s2);
        double t0 = now_seconds();
        int rc = frechet_distance(m1, s1, m2, s2, pairs[p].d, &fd);
        double secs = now_seconds() - t0;
        double fd1 = NAN;
        if (p == 0) {  // against itself; and on one thread: the same bits
            frechet_distance(m1, s1, m1, s1, pairs[p].d, &self);
            pool_init(1);
            frechet_distance(m1, s1, m2, s2, pairs[p].d, &fd1);
            pool_init(0);
            if (pool_threads() > 1 && fd1 != fd) rc = -2;
        }
        double want = golden(pairs[p].key)->data[0];
        char key2[32];
        snprintf(key2, sizeof key2, "%s_eig", pairs[p].key);
        double want2 = golden(key2)->data[0];
        char name[160];
        snprintf(name, sizeof name, "Frechet distance, %d-d, %d vs %d samples%s, vs scipy sqrtm",
                 pairs[p].d, pairs[p].na, pairs[p].nb,
                 pairs[p].nb < pairs[p].d ? " (singular covariance)" : "");
        int ok = rc == 0 && fabs(fd - want) <= 1e-3 && (p > 0 || fabs(self) <= 1e-6);
        test_result(ok, name,
                    "ours %.6f, scipy %.6f, numpy eigvals %.6f, |diff| %.1e, tol 1e-3; %.1f s%s",
                    fd, want, want2, fabs(fd - want), secs,
                    p == 0 ? (self == self ? ", FD(a, a) ~ 0, 1 thread = 2 threads bitwise" : "")
                           : "");
        if (p == 0 && !(fabs(self) <= 1e-6)) fprintf(stderr, "  FD(a, a) = %g\n", self);
        free(m1); free(s1); free(m2); free(s2);
    }
}

// sym_eigen on a random symmetric matrix: A v_i = lambda_i v_i, V orthonormal,
// sum of lambda = trace (closed-form properties, no reference needed)
static void test_eigen(void) {
    int n = 37;
    double *a = mallocCheck((size_t)n * n * sizeof(double)), *a0 = mallocCheck((size_t)n * n * 8);
    double *vt = mallocCheck((size_t)n * n * sizeof(double)), *lam = mallocCheck((size_t)n * 8);
    uint64_t h = test_name_hash("fid.eigen");
    for (int i = 0; i < n; i++)
        for (int j = 0; j <= i; j++)
            a[i * n + j] = a[j * n + i] = test_base(h, (size_t)i * n + j) + (i == j ? 0.5 : 0.0);
    a[5 * n + 5] = a[6 * n + 6];  // a repeated diagonal entry
    memcpy(a0, a, (size_t)n * n * sizeof(double));
    int rc = sym_eigen(a, n, lam, vt);
    double resid = 0.0, orth = 0.0, tr = 0.0, sum = 0.0;
    for (int i = 0; i < n; i++) {
        tr += a0[i * n + i];
        sum += lam[i];
        for (int r = 0; r < n; r++) {
            double av = 0.0;
            for (int k = 0; k < n; k++) av += a0[r * n + k] * vt[i * n + k];
            resid = fmax(resid, fabs(av - lam[i] * vt[i * n + r]));
        }
        for (int j = 0; j < n; j++) {
            double dot = 0.0;
            for (int k = 0; k < n; k++) dot += vt[i * n + k] * vt[j * n + k];
            orth = fmax(orth, fabs(dot - (i == j)));
        }
    }
    int ok = rc == 0 && resid < 1e-12 && orth < 1e-12 && fabs(tr - sum) < 1e-12;
    test_result(ok, "symmetric eigendecomposition (Householder + implicit QL)",
                "n %d: max |A v - l v| %.1e, max |V V^T - I| %.1e, |trace - sum l| %.1e, tol 1e-12",
                n, resid, orth, fabs(tr - sum));
    free(a); free(a0); free(vt); free(lam);
}

static void test_inception_score(void) {
    int n = 500, classes = 1008;
    uint64_t h = test_name_hash("fid.is.logits");
    float *logits = mallocCheck((size_t)n * classes * sizeof(float));
    for (size_t i = 0; i < (size_t)n * classes; i++) logits[i] = (float)(test_base(h, i) * 4.0);
    double mean, std;
    int rc = inception_score(logits, n, classes, 10, &mean, &std);
    double wm = golden("is/mean")->data[0], ws = golden("is/std")->data[0];
    // one class certain for every image, a different class per image: IS = number of images
    float *onehot = callocCheck((size_t)10 * 10, sizeof(float));
    for (int i = 0; i < 10; i++) onehot[i * 10 + i] = 80.0f;
    double m1, s1;
    inception_score(onehot, 10, 10, 1, &m1, &s1);
    int ok = rc == 0 && fabs(mean - wm) <= 1e-5 * wm && fabs(std - ws) <= 1e-4 && fabs(m1 - 10) < 1e-6;
    test_result(ok, "inception score vs improved-gan's formula (numpy)",
                "500 images, 10 splits: ours %.6f +- %.6f, numpy %.6f +- %.6f; 10 certain "
                "distinct classes: %.6f (want 10)",
                mean, std, wm, ws, m1);
    free(logits);
    free(onehot);
}

// the NPZ reader on numpy's own files (np.savez: stored with zip64 extras,
// np.savez_compressed: deflated), and our writer read back
static void test_npz(void) {
    char err[512];
    NpzArray mu[2], sigma[2];
    const char *files[2] = {"tests/goldens/stats_savez.npz", "tests/goldens/stats_compressed.npz"};
    int ok = 1;
    for (int f = 0; f < 2; f++) {
        if (npz_read(files[f], "mu", &mu[f], err, sizeof err) != 0 ||
            npz_read(files[f], "sigma", &sigma[f], err, sizeof err) != 0) {
            fprintf(stderr, "  %s\n", err);
            ok = 0;
            continue;
        }
        ok &= mu[f].kind == NPY_F64 && mu[f].ndim == 1 && mu[f].shape[0] == 8 &&
              sigma[f].ndim == 2 && sigma[f].shape[0] == 8 && sigma[f].shape[1] == 8;
    }
    // values printed by tools/make_fid_goldens.py (repr of the float64s)
    ok &= ok && mu[0].f64[0] == 0.40053604346855232 && sigma[0].f64[1] == 0.10359182919286825;
    ok &= ok && memcmp(mu[0].f64, mu[1].f64, 8 * sizeof(double)) == 0 &&
          memcmp(sigma[0].f64, sigma[1].f64, 64 * sizeof(double)) == 0;
    // write and read back; a missing member and a non-zip are named
    if (ok) {
        NpzWrite w[2] = {{"mu", NPY_F64, 1, {8}, mu[0].f64}, {"sigma", NPY_F64, 2, {8, 8}, sigma[0].f64}};
        if (npz_write("build/stats_roundtrip.npz", w, 2, err, sizeof err) != 0) fatal("%s", err);
        NpzArray back;
        ok &= npz_read("build/stats_roundtrip.npz", "sigma", &back, err, sizeof err) == 0 &&
              back.count == 64 && memcmp(back.f64, sigma[0].f64, 64 * sizeof(double)) == 0;
        npz_free(&back);
        ok &= npz_read("build/stats_roundtrip.npz", "mu_s", &back, err, sizeof err) != 0 &&
              strstr(err, "mu_s") != NULL;
        ok &= npz_read("tests/goldens/image.png", "mu", &back, err, sizeof err) != 0 &&
              strstr(err, "not a zip") != NULL;
    }
    for (int f = 0; f < 2; f++) { npz_free(&mu[f]); npz_free(&sigma[f]); }
    test_result(ok, "NPZ: numpy's np.savez and np.savez_compressed files read, ours read back",
                "float64 mu (8) and sigma (8,8) bitwise; missing member and non-zip named");
}

// files for tests/test_cli.sh's casdm fid checks: statistics of 64-d
// features and a copy with mu shifted by 0.5 everywhere (FID = 64 * 0.25 =
// 16 exactly), a sigma of the wrong shape, and sample sets of 1 and 0 images
static void write_cli_files(void) {
    double *mu, *sigma;
    set_stats("a", 300, 64, 0.2, &mu, &sigma);
    char err[512];
    NpzWrite w[2] = {{"mu", NPY_F64, 1, {64}, mu}, {"sigma", NPY_F64, 2, {64, 64}, sigma}};
    if (npz_write("build/fid_stats_a.npz", w, 2, err, sizeof err) != 0) fatal("%s", err);
    for (int i = 0; i < 64; i++) mu[i] += 0.5;
    if (npz_write("build/fid_stats_shift.npz", w, 2, err, sizeof err) != 0) fatal("%s", err);
    w[1].shape[1] = 63;
    if (npz_write("build/fid_stats_bad.npz", w, 2, err, sizeof err) != 0) fatal("%s", err);
    unsigned char img[32 * 32 * 3] = {0};
    if (write_npz("build/fid_one.npz", img, 1, 32, 32, 3, err, sizeof err) != 0 ||
        write_npz("build/fid_none.npz", img, 0, 32, 32, 3, err, sizeof err) != 0)
        fatal("%s", err);
    free(mu);
    free(sigma);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--quick") == 0) test_quick = 1;
        else { fprintf(stderr, "usage: %s [--quick]\n", argv[0]); return 2; }
    }
    char err[512];
    if (st_read("tests/goldens/fid.safetensors", &goldens, err, sizeof err) != 0) fatal("%s", err);
    pool_init(0);
    test_npz();
    test_eigen();
    test_inception_score();
    test_frechet();
    if (test_quick)  // under valgrind and emulators: 11 GFLOP an image is too slow there
        test_skip("Inception-v3 against PyTorch", "--quick (the full run has it)");
    else
        test_inception();
    write_cli_files();
    st_free(&goldens);
    pool_shutdown();
    sgemm_free_buffers();
    return test_failed_count ? 1 : 0;
}
