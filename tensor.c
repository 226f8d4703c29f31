// tensor.c: the casdm tensor engine. See tensor.h for the overview.
//
// Sections, in order: errors and allocation, arena, RNG, thread pool, SIMD
// layer, matrix multiply (the infrastructure); tensors and the tape; then one
// section per op (convolution, linear, batched matmul, group norm and its
// fused forms, L2 norm, activations, softmax, QKV attention, upsample,
// average pool, bilinear resize, add/sub/mul, scale_shift, concat/slice,
// reductions, MSE loss, dropout, clamp), each holding its kernels, reference
// kernels, tape node and graph op; parameters; Adam. File formats are in
// formats.c.
#define _POSIX_C_SOURCE 200809L
#define _FILE_OFFSET_BITS 64
#include "tensor.h"

#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifndef CASDM_THREADS
#define CASDM_THREADS 1
#endif
#ifndef CASDM_SIMD
#define CASDM_SIMD 1
#endif
#if CASDM_THREADS
#include <pthread.h>
#endif

// ---------------------------------------------------------------------------
// ---- errors, allocation, small helpers ----
// ---------------------------------------------------------------------------
void fatal(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "casdm: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

void *malloc_check(size_t size, const char *file, int line) {
    void *p = malloc(size ? size : 1);
    if (!p) fatal("out of memory: malloc of %zu bytes failed at %s:%d", size, file, line);
    return p;
}

void *calloc_check(size_t n, size_t size, const char *file, int line) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) fatal("out of memory: calloc of %zu x %zu bytes failed at %s:%d", n, size, file, line);
    return p;
}

FILE *fopen_check(const char *path, const char *mode, const char *file, int line) {
    FILE *f = fopen(path, mode);
    if (!f)
        fatal("cannot open '%s' (mode %s): %s [%s:%d]", path, mode, strerror(errno), file, line);
    return f;
}

// 64-byte aligned memory from plain malloc (C99 has no aligned_alloc): 64 +
// sizeof(void *) bytes more than asked, the pointer rounded up to 64, and
// the raw pointer stored in the bytes just below it for aligned_free.
static void *aligned_malloc(size_t bytes) {
    unsigned char *raw = mallocCheck(bytes + 64 + sizeof(void *));
    uintptr_t p = (uintptr_t)(raw + sizeof(void *));
    p = (p + 63) & ~(uintptr_t)63;
    memcpy((unsigned char *)p - sizeof(void *), &raw, sizeof(void *));
    return (void *)p;
}

static void aligned_free(void *p) {
    if (!p) return;
    void *raw;
    memcpy(&raw, (unsigned char *)p - sizeof(void *), sizeof(void *));
    free(raw);
}

double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

// ---------------------------------------------------------------------------
// ---- arena ----
// ---------------------------------------------------------------------------
struct ArenaBlock {
    ArenaBlock *next;
    unsigned char *mem;   // 64-byte aligned
    size_t cap, used;
};

void arena_init(Arena *a, const char *name, size_t block_size, size_t limit) {
    memset(a, 0, sizeof *a);
    a->name = name;
    a->block_size = block_size ? block_size : ((size_t)64 << 20);
    a->limit = limit;
}

static ArenaBlock *arena_new_block(Arena *a, size_t need) {
    size_t cap = need > a->block_size ? need : a->block_size;
    if (a->limit && a->reserved + cap > a->limit)
        fatal("arena '%s' is full: needed %zu more bytes, have %zu of %zu in use "
              "(raise the memory limit or lower the batch size)",
              a->name, cap, a->reserved, a->limit);
    ArenaBlock *b = mallocCheck(sizeof *b);
    b->mem = aligned_malloc(cap);
    b->cap = cap;
    b->used = 0;
    b->next = NULL;
    a->reserved += cap;
    return b;
}

void *arena_alloc(Arena *a, size_t bytes) {
    size_t need = (bytes + 63) & ~(size_t)63;
    if (need == 0) need = 64;
    if (!a->head) a->head = a->cur = arena_new_block(a, need);
    while (a->cur->cap - a->cur->used < need) {
        ArenaBlock *next = a->cur->next;
        if (next && next->cap >= need) {
            next->used = 0;
        } else {  // insert a fresh block after the current one
            ArenaBlock *b = arena_new_block(a, need);
            b->next = next;
            a->cur->next = b;
            next = b;
        }
        a->cur = next;
    }
    void *p = a->cur->mem + a->cur->used;
    a->cur->used += need;
    a->used += need;
    if (a->used > a->peak) a->peak = a->used;
    return p;
}

float *arena_floats(Arena *a, size_t n) { return arena_alloc(a, n * sizeof(float)); }

float *arena_zeros(Arena *a, size_t n) {
    float *p = arena_floats(a, n);
    memset(p, 0, n * sizeof(float));
    return p;
}

void arena_reset(Arena *a) {
    for (ArenaBlock *b = a->head; b; b = b->next) b->used = 0;
    a->cur = a->head;
    a->used = 0;
}

ArenaMark arena_mark(Arena *a) {
    ArenaMark m = {a->cur, a->cur ? a->cur->used : 0, a->used};
    return m;
}

void arena_release(Arena *a, ArenaMark m) {
    if (!m.block) { arena_reset(a); return; }
    for (ArenaBlock *b = m.block->next; b; b = b->next) b->used = 0;
    a->cur = m.block;
    a->cur->used = m.offset;
    a->used = m.used;
}

void arena_free(Arena *a) {
    ArenaBlock *b = a->head;
    while (b) {
        ArenaBlock *next = b->next;
        aligned_free(b->mem);
        free(b);
        b = next;
    }
    a->head = a->cur = NULL;
    a->reserved = a->used = 0;
}

// ---------------------------------------------------------------------------
// ---- RNG: PCG32 (pcg-random.org, "XSH RR" output on a 64-bit LCG) ----
// ---------------------------------------------------------------------------
void rng_seed(Rng *r, uint64_t seed, uint64_t stream) {
    r->state = 0;
    r->inc = (stream << 1) | 1u;
    rng_u32(r);
    r->state += seed;
    rng_u32(r);
}

uint32_t rng_u32(Rng *r) {
    uint64_t old = r->state;
    r->state = old * 6364136223846793005ULL + r->inc;
    uint32_t xorshifted = (uint32_t)(((old >> 18) ^ old) >> 27);
    uint32_t rot = (uint32_t)(old >> 59);
    return (xorshifted >> rot) | (xorshifted << ((32 - rot) & 31));
}

float rng_uniform(Rng *r) { return (float)(rng_u32(r) >> 8) * (1.0f / 16777216.0f); }

uint32_t rng_below(Rng *r, uint32_t n) {
    // Lemire-free rejection: unbiased, simple
    uint32_t threshold = (uint32_t)(-n) % n;
    for (;;) {
        uint32_t x = rng_u32(r);
        if (x >= threshold) return x % n;
    }
}

static double rng_uniform_open(Rng *r) {  // (0, 1), 53 bits
    uint64_t hi = rng_u32(r), lo = rng_u32(r);
    uint64_t bits = ((hi << 32) | lo) >> 11;
    return ((double)bits + 0.5) * (1.0 / 9007199254740992.0);
}

float rng_normal(Rng *r) {
    // Box-Muller; one of the pair is dropped so every call costs the same
    // two words, which keeps streams easy to reason about.
    double u1 = rng_uniform_open(r), u2 = rng_uniform_open(r);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

// Skip delta outputs in O(log delta) steps: the LCG's n-step map is again
// affine, state -> A*state + C, built by repeated squaring (Brown, "Random
// number generation with arbitrary strides", 1994; as pcg_advance in the
// PCG library). It lets threads fill one stream in slices.
void rng_advance(Rng *r, uint64_t delta) {
    uint64_t mul = 6364136223846793005ULL, add = r->inc, A = 1, C = 0;
    while (delta) {
        if (delta & 1) { A *= mul; C = C * mul + add; }
        add = (mul + 1) * add;
        mul *= mul;
        delta >>= 1;
    }
    r->state = A * r->state + C;
}

// Fills that take the same numbers as the one-at-a-time loop, split between
// the threads: each slice starts from a copy advanced to its first word.
typedef struct { Rng start; float *x; unsigned char *keep; float a, b; } RngFill;
static void fill_normal_range(void *arg, size_t i0, size_t i1) {
    const RngFill *f = arg;
    Rng r = f->start;
    rng_advance(&r, 4 * (uint64_t)i0);  // a normal takes four words
    for (size_t i = i0; i < i1; i++) f->x[i] = f->a + f->b * rng_normal(&r);
}

void rng_fill_normal(Rng *r, float *x, size_t n, float mean, float std) {
    RngFill f = {*r, x, NULL, mean, std};
    parallel_for(n, 4096, fill_normal_range, &f);
    rng_advance(r, 4 * (uint64_t)n);
}

// values first .. first+n-1 of a fill of `total` (one rank's, or one
// micro-batch's, rows of a batch); r moves past the whole fill, as every
// other rank's does
void rng_fill_normal_part(Rng *r, float *x, size_t first, size_t n, size_t total, float mean,
                          float std) {
    if (first + n > total) fatal("rng_fill_normal_part: %zu + %zu > %zu", first, n, total);
    Rng part = *r;
    rng_advance(&part, 4 * (uint64_t)first);
    rng_fill_normal(&part, x, n, mean, std);
    rng_advance(r, 4 * (uint64_t)total);
}

static void fill_keep_range(void *arg, size_t i0, size_t i1) {
    const RngFill *f = arg;
    Rng r = f->start;
    rng_advance(&r, i0);                // a uniform takes one word
    for (size_t i = i0; i < i1; i++) f->keep[i] = rng_uniform(&r) >= f->a;
}

// keep[i] = 1 with probability 1-p: the dropout mask, one uniform an element
void rng_fill_keep(Rng *r, unsigned char *keep, size_t n, float p) {
    RngFill f = {*r, NULL, keep, p, 0.0f};
    parallel_for(n, 16384, fill_keep_range, &f);
    rng_advance(r, n);
}

// as rng_fill_normal_part: elements first .. first+n-1 of a mask of `total`
void rng_fill_keep_part(Rng *r, unsigned char *keep, size_t first, size_t n, size_t total,
                        float p) {
    if (first + n > total) fatal("rng_fill_keep_part: %zu + %zu > %zu", first, n, total);
    Rng part = *r;
    rng_advance(&part, first);
    rng_fill_keep(&part, keep, n, p);
    rng_advance(r, total);
}

void rng_fill_uniform(Rng *r, float *x, size_t n, float lo, float hi) {
    for (size_t i = 0; i < n; i++) x[i] = lo + (hi - lo) * rng_uniform(r);
}

// ---------------------------------------------------------------------------
// ---- thread pool ----
// A job is fn(arg, c, nchunks) for chunks c = 0 .. nchunks-1. Each thread
// has a home range of the chunks (as a static split would give it, so the
// same thread tends to touch the same data from one job to the next) and
// claims them one at a time; a thread whose range is done takes the chunks
// nobody has started from the others' ranges. So nobody waits for a chunk
// that no thread has started: when a worker is slow to wake, or its core is
// busy with another process, the caller does the chunks itself, instead of
// stalling on every one of the thousands of jobs of a training step. The
// caller then waits only for chunks in progress: it polls for
// POOL_WAIT_SPIN_NS, then sleeps (so the OS can run the late worker on the
// caller's core). Workers poll for the next job for POOL_SPIN_NS, then sleep
// on a condition variable.
// When the other cores are taken by other processes, a worker can still be
// preempted in the middle of a chunk, and the caller then waits a scheduler
// time slice for it, job after job. The pool measures that: if over a
// window of POOL_GUARD_WINDOW_S the caller spent more than POOL_GUARD_WAIT
// of its jobs' time waiting for workers, the next POOL_GUARD_SERIAL_S of
// jobs run on the caller alone (the same chunks, so the same numbers), then
// the workers are tried again. So a busy machine costs at most the speed of
// one thread, never less.
// Kernels make each output element in one chunk, in a fixed order, so the
// numbers do not depend on which thread ran which chunk, nor on how many
// threads there are. Atomics are GCC/Clang builtins; other compilers get
// the same protocol under the mutex.
// ---------------------------------------------------------------------------
void slice(size_t n, int ith, int nth, size_t *begin, size_t *end) {
    size_t base = n / (size_t)nth, rem = n % (size_t)nth, i = (size_t)ith;
    *begin = i * base + (i < rem ? i : rem);
    *end = *begin + base + (i < rem ? 1 : 0);
}

#if CASDM_THREADS
#define MAX_THREADS 64
#define POOL_MAX_CHUNKS 65536  // a home word keeps chunk numbers in 20 bits
#ifndef POOL_SPIN_NS
#define POOL_SPIN_NS 100000    // a worker polls this long for the next job, then sleeps
#endif
#ifndef POOL_WAIT_SPIN_NS
#define POOL_WAIT_SPIN_NS 1000000  // the caller polls this long for the last chunks, then sleeps
#endif
#define POOL_GUARD_WINDOW_S 0.05   // the contention guard judges 50 ms of jobs at a time,
#ifndef POOL_GUARD_WAIT
#define POOL_GUARD_WAIT 0.3        // and when the caller waited for more than 30% of it,
#endif
#define POOL_GUARD_SERIAL_S 0.25   // runs the jobs of the next 250 ms alone
#if defined(__GNUC__)
#define POOL_ATOMICS 1
#define LOAD(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)
#define FETCH_ADD(p, v) __atomic_fetch_add((p), (v), __ATOMIC_SEQ_CST)
#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#else
#define CPU_RELAX() ((void)0)
#endif
#else
#define POOL_ATOMICS 0
#endif

typedef struct { pool_fn fn; void *arg; } PoolJob;

static struct {
    int nthreads;              // 0 until pool_init
    pthread_t threads[MAX_THREADS];
    pthread_mutex_t mu;
    pthread_cond_t work, done; // workers wait for a job; the caller for the last chunks
    unsigned long generation;  // of the current job; workers wait for it to change
    // Each thread's home chunks: generation << 40 | end << 20 | next chunk.
    // A thread claims its own first (so a thread works on the same part of
    // the data from one job to the next, as its cache would have it), then
    // the others'. One fetch_add claims a chunk and says of which job and
    // where that home range ends, so a claim is right even by a thread that
    // is still sweeping the job before.
    struct { uint64_t v; char pad[56]; } home[MAX_THREADS];
    PoolJob job[2];            // by generation & 1: the current job, and the one before
    int job_chunks[2];         // their chunk counts
    int finished[2];           // chunks finished, by generation & 1
    int sleepers;              // workers waiting on `work`
    int caller_sleeping;       // the caller waits on `done`
    int quit;
    int busy;                  // a job is in progress: nested calls run serially
    pthread_key_t id_key;      // worker index + 1 of the calling thread (main: unset)
    int key_made;
    // the contention guard (the caller's alone): the window's start, its
    // jobs' time and the caller's waits in them; serial until this time
    double guard_t0, guard_jobs, guard_waits, serial_until;
} pool;

// Which OS thread is this (0 = the main thread)? Scratch buffers are per OS
// thread: a thread runs one chunk at a time, and a nested call runs serially.
int pool_thread_id(void) {
    if (!pool.key_made) return 0;
    void *v = pthread_getspecific(pool.id_key);
    return v ? (int)(intptr_t)v - 1 : 0;
}

#if POOL_ATOMICS
static unsigned long pool_generation(void) { return LOAD(&pool.generation); }
static uint64_t pool_claim(int i) { return FETCH_ADD(&pool.home[i].v, 1); }
static int pool_finish(int slot) { return FETCH_ADD(&pool.finished[slot], 1) + 1; }
static int pool_finished(int slot) { return LOAD(&pool.finished[slot]); }
#else
static uint64_t pool_locked_add(uint64_t *p, uint64_t v) {
    pthread_mutex_lock(&pool.mu);
    uint64_t old = *p;
    *p += v;
    pthread_mutex_unlock(&pool.mu);
    return old;
}
static unsigned long pool_generation(void) {
    pthread_mutex_lock(&pool.mu);
    unsigned long g = pool.generation;
    pthread_mutex_unlock(&pool.mu);
    return g;
}
static uint64_t pool_claim(int i) { return pool_locked_add(&pool.home[i].v, 1); }
static int pool_finish(int slot) {
    pthread_mutex_lock(&pool.mu);
    int n = ++pool.finished[slot];
    pthread_mutex_unlock(&pool.mu);
    return n;
}
static int pool_finished(int slot) {
    pthread_mutex_lock(&pool.mu);
    int n = pool.finished[slot];
    pthread_mutex_unlock(&pool.mu);
    return n;
}
#endif

// the same, for code that holds pool.mu
#if POOL_ATOMICS
static unsigned long pool_generation_locked(void) { return LOAD(&pool.generation); }
static int pool_quit_locked(void) { return LOAD(&pool.quit); }
#else
static unsigned long pool_generation_locked(void) { return pool.generation; }
static int pool_quit_locked(void) { return pool.quit; }
#endif

// Claims and runs chunks until none is left, its own home range first
// (self), then the others'. A claim below its range's end is a chunk nobody
// else has, of a job whose caller is still waiting for it: that job's
// PoolJob is still in place.
static void pool_work(int self) {
    int nth = pool.nthreads;
    for (int k = 0; k < nth; k++) {
        int i = (self + k) % nth;
        for (;;) {
            uint64_t t = pool_claim(i);
            int slot = (int)(t >> 40 & 1), end = (int)(t >> 20 & 0xfffff), c = (int)(t & 0xfffff);
            if (c >= end) break;
            PoolJob job = pool.job[slot];
            int nchunks = pool.job_chunks[slot];
            job.fn(job.arg, c, nchunks);
            if (pool_finish(slot) == nchunks) {
#if POOL_ATOMICS
                if (LOAD(&pool.caller_sleeping))
#endif
                {
                    pthread_mutex_lock(&pool.mu);
                    pthread_cond_signal(&pool.done);
                    pthread_mutex_unlock(&pool.mu);
                }
            }
        }
    }
}

// polls until cond(arg) holds or about ns nanoseconds have passed; returns cond(arg)
static int pool_poll(int (*cond)(void *), void *arg, double ns) {
#if POOL_ATOMICS
    double until = now_seconds() + ns * 1e-9;
    for (int i = 1;; i++) {
        if (cond(arg)) return 1;
        CPU_RELAX();
        if (i % 64 == 0 && now_seconds() > until) return cond(arg);
    }
#else
    (void)ns;
    return cond(arg);
#endif
}

static int new_job(void *seen) {
#if POOL_ATOMICS
    if (LOAD(&pool.quit)) return 1;
#endif
    return pool_generation() != *(const unsigned long *)seen;
}

static void *pool_worker(void *p) {
    int ith = (int)(intptr_t)p;
    pthread_setspecific(pool.id_key, (void *)(intptr_t)(ith + 1));
    unsigned long seen = 0;
    for (;;) {
        if (!pool_poll(new_job, &seen, POOL_SPIN_NS)) {
            pthread_mutex_lock(&pool.mu);
#if POOL_ATOMICS
            FETCH_ADD(&pool.sleepers, 1);  // before the check: pool_run_chunks reads it after publishing
#else
            pool.sleepers++;
#endif
            while (pool_generation_locked() == seen && !pool_quit_locked())
                pthread_cond_wait(&pool.work, &pool.mu);
#if POOL_ATOMICS
            FETCH_ADD(&pool.sleepers, -1);
#else
            pool.sleepers--;
#endif
            pthread_mutex_unlock(&pool.mu);
        }
#if POOL_ATOMICS
        if (LOAD(&pool.quit)) break;
#else
        pthread_mutex_lock(&pool.mu);
        int quit = pool.quit;
        pthread_mutex_unlock(&pool.mu);
        if (quit) break;
#endif
        seen = pool_generation();
        pool_work(ith);
    }
    return NULL;
}

static int default_threads(void) {
    const char *env = getenv("CASDM_THREADS");
    if (env && *env) {
        char *end;
        long v = strtol(env, &end, 10);
        if (*end || v < 1 || v > MAX_THREADS)
            fatal("CASDM_THREADS='%s' is not a thread count in 1..%d", env, MAX_THREADS);
        return (int)v;
    }
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (n > MAX_THREADS ? MAX_THREADS : (int)n);
}

static void pool_stop_workers(void) {
    if (pool.nthreads == 0) return;
    pthread_mutex_lock(&pool.mu);
#if POOL_ATOMICS
    STORE(&pool.quit, 1);
#else
    pool.quit = 1;
#endif
    pthread_cond_broadcast(&pool.work);
    pthread_mutex_unlock(&pool.mu);
    for (int i = 1; i < pool.nthreads; i++) pthread_join(pool.threads[i], NULL);
    pthread_mutex_destroy(&pool.mu);
    pthread_cond_destroy(&pool.work);
    pthread_cond_destroy(&pool.done);
    pool.nthreads = 0;
}

void pool_init(int nthreads) {
    if (nthreads <= 0) nthreads = default_threads();
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    pool_stop_workers();
    pool.quit = pool.busy = pool.sleepers = pool.caller_sleeping = 0;
    pool.guard_t0 = pool.guard_jobs = pool.guard_waits = pool.serial_until = 0.0;
    pool.generation = 0;
    for (int i = 0; i < MAX_THREADS; i++) pool.home[i].v = 0;  // generation 0, empty ranges
    pool.finished[0] = pool.finished[1] = 0;
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.work, NULL);
    pthread_cond_init(&pool.done, NULL);
    if (!pool.key_made && pthread_key_create(&pool.id_key, NULL) == 0) pool.key_made = 1;
    pool.nthreads = nthreads;
    for (int i = 1; i < nthreads; i++)
        if (pthread_create(&pool.threads[i], NULL, pool_worker, (void *)(intptr_t)i) != 0)
            fatal("pthread_create failed for worker %d of %d", i, nthreads);
}

int pool_threads(void) {
    if (pool.nthreads == 0) pool_init(0);
    return pool.nthreads;
}

// one parallel job, from t0 (published) over t1 (the caller out of chunks)
// to t2 (all done), into the contention guard's window
static void pool_guard(double t0, double t1, double t2) {
    pool.guard_jobs += t2 - t0;
    pool.guard_waits += t2 - t1;
    if (t2 - pool.guard_t0 < POOL_GUARD_WINDOW_S) return;
    if (pool.guard_waits > POOL_GUARD_WAIT * pool.guard_jobs)
        pool.serial_until = t2 + POOL_GUARD_SERIAL_S;
    pool.guard_t0 = t2;
    pool.guard_jobs = pool.guard_waits = 0.0;
}

static int job_done(void *slot) {
    int s = *(int *)slot;
    return pool_finished(s) >= pool.job_chunks[s];
}

void pool_run_chunks(pool_fn fn, void *arg, int nchunks) {
    if (nchunks <= 0) return;
    if (nchunks > POOL_MAX_CHUNKS) fatal("pool_run_chunks: %d chunks (at most %d)", nchunks, POOL_MAX_CHUNKS);
    if (pool.nthreads == 0) pool_init(0);
    double t0 = pool.nthreads > 1 && !pool.busy && nchunks > 1 ? now_seconds() : 0.0;
    if (pool.nthreads == 1 || pool.busy || nchunks == 1 || t0 < pool.serial_until) {
        for (int c = 0; c < nchunks; c++) fn(arg, c, nchunks);
        return;
    }
    pool.busy = 1;
    uint64_t gen = (uint64_t)(pool.generation + 1) & 0xffffff;  // 24 bits in a home word
    int slot = (int)(gen & 1);
    pool.job[slot].fn = fn;
    pool.job[slot].arg = arg;
    pool.job_chunks[slot] = nchunks;
    pool.finished[slot] = 0;  // nobody touches this slot: its last job finished before the one before us began
#if POOL_ATOMICS
    for (int i = 0; i < pool.nthreads; i++) {
        size_t b, e;
        slice((size_t)nchunks, i, pool.nthreads, &b, &e);
        STORE(&pool.home[i].v, gen << 40 | (uint64_t)e << 20 | (uint64_t)b);
    }
    STORE(&pool.generation, (unsigned long)gen);  // the job is published with its ranges
    if (LOAD(&pool.sleepers)) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.work);
        pthread_mutex_unlock(&pool.mu);
    }
#else
    pthread_mutex_lock(&pool.mu);
    for (int i = 0; i < pool.nthreads; i++) {
        size_t b, e;
        slice((size_t)nchunks, i, pool.nthreads, &b, &e);
        pool.home[i].v = gen << 40 | (uint64_t)e << 20 | (uint64_t)b;
    }
    pool.generation = (unsigned long)gen;
    pthread_cond_broadcast(&pool.work);
    pthread_mutex_unlock(&pool.mu);
#endif
    pool_work(0);
    double t1 = now_seconds();
    if (!pool_poll(job_done, &slot, POOL_WAIT_SPIN_NS)) {
        pthread_mutex_lock(&pool.mu);
#if POOL_ATOMICS
        STORE(&pool.caller_sleeping, 1);  // before the check: a finishing worker reads it after counting
        while (LOAD(&pool.finished[slot]) < nchunks) pthread_cond_wait(&pool.done, &pool.mu);
        STORE(&pool.caller_sleeping, 0);
#else
        while (pool.finished[slot] < nchunks) pthread_cond_wait(&pool.done, &pool.mu);
#endif
        pthread_mutex_unlock(&pool.mu);
    }
    pool.busy = 0;
    pool_guard(t0, t1, now_seconds());
}

void pool_run(pool_fn fn, void *arg) { pool_run_chunks(fn, arg, pool_threads()); }

// the main thread, no job in progress: no other thread can be in a caller of
// this (process-wide scratch may be used)
static int pool_outside_jobs(void) { return pool_thread_id() == 0 && !pool.busy; }

void pool_shutdown(void) { pool_stop_workers(); }
#else  // THREADS=0: everything on the calling thread
void pool_init(int nthreads) { (void)nthreads; }
int pool_threads(void) { return 1; }
void pool_run_chunks(pool_fn fn, void *arg, int nchunks) {
    for (int c = 0; c < nchunks; c++) fn(arg, c, nchunks);
}
void pool_run(pool_fn fn, void *arg) { fn(arg, 0, 1); }
void pool_shutdown(void) {}
int pool_thread_id(void) { return 0; }
static int pool_outside_jobs(void) { return 1; }
#endif

// parallel_for: fn(ctx, begin, end) over contiguous ranges of [0, n), up to
// POOL_CHUNKS_PER_THREAD per thread (small enough that a thread that is late
// or preempted holds back little), each of at least min_per_chunk items;
// on the calling thread alone when there is too little work to share.
#ifndef POOL_CHUNKS_PER_THREAD
#define POOL_CHUNKS_PER_THREAD 4
#endif
typedef struct { range_fn fn; void *ctx; size_t n; } RangeTask;

static void range_task(void *arg, int c, int nchunks) {
    RangeTask *t = arg;
    size_t b, e;
    slice(t->n, c, nchunks, &b, &e);
    if (b < e) t->fn(t->ctx, b, e);
}

void parallel_for(size_t n, size_t min_per_chunk, range_fn fn, void *ctx) {
    if (n == 0) return;
    int nth = pool_threads();
    size_t most = (size_t)nth * POOL_CHUNKS_PER_THREAD, chunks = n / (min_per_chunk ? min_per_chunk : 1);
    if (chunks > most) chunks = most;
    if (chunks < 2 || nth == 1) { fn(ctx, 0, n); return; }
    RangeTask t = {fn, ctx, n};
    pool_run_chunks(range_task, &t, (int)chunks);
}

// ---------------------------------------------------------------------------
// ---- SIMD layer ----
// One vector type and a dozen operations, chosen at build time; the scalar
// version is the same code with VLEN 1. Used by the GEMM micro-kernel and by
// the exponential (SiLU, sigmoid, softmax: libm's expf is one call per
// element); elsewhere plain loops, which the compiler vectorises.
// ---------------------------------------------------------------------------
#if CASDM_SIMD && defined(__AVX512F__)
#include <immintrin.h>
#define SIMD_NAME "avx512"
#define VLEN 16
#define GEMM_MR 12
typedef __m512 vfloat;
static inline vfloat v_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void v_store(float *p, vfloat x) { _mm512_storeu_ps(p, x); }
static inline vfloat v_set1(float x) { return _mm512_set1_ps(x); }
static inline vfloat v_zero(void) { return _mm512_setzero_ps(); }
static inline vfloat v_add(vfloat a, vfloat b) { return _mm512_add_ps(a, b); }
// a*b+c
static inline vfloat v_fma(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); }
static inline vfloat v_mul(vfloat a, vfloat b) { return _mm512_mul_ps(a, b); }
static inline vfloat v_div(vfloat a, vfloat b) { return _mm512_div_ps(a, b); }
static inline vfloat v_sqrt(vfloat x) { return _mm512_sqrt_ps(x); }
// min/max return the second operand when either is NaN: pass x second
static inline vfloat v_min(vfloat a, vfloat b) { return _mm512_min_ps(a, b); }
static inline vfloat v_max(vfloat a, vfloat b) { return _mm512_max_ps(a, b); }
static inline vfloat v_round(vfloat x) {
    return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
// p * 2^n, n a whole number in [-126, 127]
static inline vfloat v_ldexp(vfloat p, vfloat n) { return _mm512_scalef_ps(p, n); }
// dst[c * ldd + r] = src[r * lds + c] for r < rows (rows past them read as
// 0), c < 16; of each dst row the first `keep` floats are written. The
// packing of K-major GEMM panels from K-contiguous sources (the weight
// gradient's columns, the forward's weights) is a transpose, and written an
// element at a time with a stride it costs more than the GEMM it feeds.
// Three rounds of in-lane and cross-lane shuffles, as in any 16x16 transpose.
#define HAVE_TRANSPOSE16 1
static void transpose16(float *dst, size_t ldd, const float *src, size_t lds, int rows, int keep) {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; i++)
        r[i] = i < rows ? _mm512_loadu_ps(src + (size_t)i * lds) : _mm512_setzero_ps();
    for (int i = 0; i < 8; i++) {  // pairs of rows interleaved within 128-bit lanes
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int g = 0; g < 4; g++) {  // r[4g+k], lane L: column 4L+k of rows 4g..4g+3
        __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 1]);
        __m512d c = _mm512_castps_pd(t[4 * g + 2]), d = _mm512_castps_pd(t[4 * g + 3]);
        r[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        r[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    __mmask16 m = (__mmask16)((1u << keep) - 1u);
    for (int k = 0; k < 4; k++) {  // gather the four lanes of column 4L+k
        __m512 v = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88),
               w = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xdd);
        __m512 v2 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88),
               w2 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xdd);
        _mm512_mask_storeu_ps(dst + (size_t)k * ldd, m, _mm512_shuffle_f32x4(v, v2, 0x88));
        _mm512_mask_storeu_ps(dst + (size_t)(8 + k) * ldd, m, _mm512_shuffle_f32x4(v, v2, 0xdd));
        _mm512_mask_storeu_ps(dst + (size_t)(4 + k) * ldd, m, _mm512_shuffle_f32x4(w, w2, 0x88));
        _mm512_mask_storeu_ps(dst + (size_t)(12 + k) * ldd, m, _mm512_shuffle_f32x4(w, w2, 0xdd));
    }
}
#elif CASDM_SIMD && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SIMD_NAME "avx2"
#define VLEN 8
#define GEMM_MR 12
typedef __m256 vfloat;
static inline vfloat v_load(const float *p) { return _mm256_loadu_ps(p); }
static inline void v_store(float *p, vfloat x) { _mm256_storeu_ps(p, x); }
static inline vfloat v_set1(float x) { return _mm256_set1_ps(x); }
static inline vfloat v_zero(void) { return _mm256_setzero_ps(); }
static inline vfloat v_add(vfloat a, vfloat b) { return _mm256_add_ps(a, b); }
static inline vfloat v_fma(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }
static inline vfloat v_mul(vfloat a, vfloat b) { return _mm256_mul_ps(a, b); }
static inline vfloat v_div(vfloat a, vfloat b) { return _mm256_div_ps(a, b); }
static inline vfloat v_sqrt(vfloat x) { return _mm256_sqrt_ps(x); }
static inline vfloat v_min(vfloat a, vfloat b) { return _mm256_min_ps(a, b); }
static inline vfloat v_max(vfloat a, vfloat b) { return _mm256_max_ps(a, b); }
static inline vfloat v_round(vfloat x) {
    return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static inline vfloat v_ldexp(vfloat p, vfloat n) {  // 2^n built in the exponent bits
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#elif CASDM_SIMD && defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define SIMD_NAME "neon"
#define VLEN 4
#define GEMM_MR 12
typedef float32x4_t vfloat;
static inline vfloat v_load(const float *p) { return vld1q_f32(p); }
static inline void v_store(float *p, vfloat x) { vst1q_f32(p, x); }
static inline vfloat v_set1(float x) { return vdupq_n_f32(x); }
static inline vfloat v_zero(void) { return vdupq_n_f32(0.0f); }
static inline vfloat v_add(vfloat a, vfloat b) { return vaddq_f32(a, b); }
static inline vfloat v_fma(vfloat a, vfloat b, vfloat c) { return vfmaq_f32(c, a, b); }
static inline vfloat v_mul(vfloat a, vfloat b) { return vmulq_f32(a, b); }
static inline vfloat v_div(vfloat a, vfloat b) { return vdivq_f32(a, b); }
static inline vfloat v_sqrt(vfloat x) { return vsqrtq_f32(x); }
static inline vfloat v_min(vfloat a, vfloat b) { return vminq_f32(a, b); }
static inline vfloat v_max(vfloat a, vfloat b) { return vmaxq_f32(a, b); }
static inline vfloat v_round(vfloat x) { return vrndnq_f32(x); }
static inline vfloat v_ldexp(vfloat p, vfloat n) {
    int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(p, vreinterpretq_f32_s32(e));
}
#else
#define SIMD_NAME "scalar"
#define VLEN 1
#define GEMM_MR 12
typedef float vfloat;
static inline vfloat v_load(const float *p) { return *p; }
static inline void v_store(float *p, vfloat x) { *p = x; }
static inline vfloat v_set1(float x) { return x; }
static inline vfloat v_zero(void) { return 0.0f; }
static inline vfloat v_add(vfloat a, vfloat b) { return a + b; }
static inline vfloat v_fma(vfloat a, vfloat b, vfloat c) { return a * b + c; }
static inline vfloat v_mul(vfloat a, vfloat b) { return a * b; }
static inline vfloat v_div(vfloat a, vfloat b) { return a / b; }
static inline vfloat v_sqrt(vfloat x) { return sqrtf(x); }
#endif

#if VLEN > 1
// exp(x) as libm computes it, a vector at a time (within 2 ulp of expf; the
// test sweeps it): n = round(x log2 e), r = x - n ln 2 in two parts (ln 2 =
// 0.693359375 - 2.12194440e-4, the first exact in few bits, so n * it is
// exact), exp(r) = 1 + r + r^2 P(r) on |r| <= ln2 / 2 with Cephes' degree-5
// minimax P, then times 2^n. x is clamped to [-87, 88] so 2^n stays a normal
// float (e^-87 = 1.6e-38 stands for anything smaller); NaN passes through.
static inline vfloat v_exp(vfloat x) {
    x = v_max(v_set1(-87.0f), v_min(v_set1(88.0f), x));
    vfloat n = v_round(v_mul(x, v_set1(1.44269504088896341f)));
    vfloat r = v_fma(n, v_set1(-0.693359375f), x);
    r = v_fma(n, v_set1(2.12194440e-4f), r);
    vfloat p = v_set1(1.9875691500e-4f);
    p = v_fma(p, r, v_set1(1.3981999507e-3f));
    p = v_fma(p, r, v_set1(8.3334519073e-3f));
    p = v_fma(p, r, v_set1(4.1665795894e-2f));
    p = v_fma(p, r, v_set1(1.6666665459e-1f));
    p = v_fma(p, r, v_set1(5.0000001201e-1f));
    p = v_fma(p, v_mul(r, r), v_add(r, v_set1(1.0f)));
    return v_ldexp(p, n);
}
#else
static inline vfloat v_exp(vfloat x) { return expf(x); }  // the scalar build: libm itself
#endif

const char *simd_name(void) { return SIMD_NAME; }

// ---- the exponential and its users, a vector at a time ----
// Each maps whole vectors, then the tail through one zero-padded vector; the
// output may be the input (in place). Scalar builds run libm's expf.
void exp_array(float *y, const float *x, size_t n) {
    size_t i = 0;
    for (; i + VLEN <= n; i += VLEN) v_store(y + i, v_exp(v_load(x + i)));
    if (i < n) {
        float t[VLEN] = {0};
        memcpy(t, x + i, (n - i) * sizeof(float));
        v_store(t, v_exp(v_load(t)));
        memcpy(y + i, t, (n - i) * sizeof(float));
    }
}

static inline vfloat v_sigmoid(vfloat x) {  // 1 / (1 + e^-x)
    vfloat one = v_set1(1.0f);
    return v_div(one, v_add(one, v_exp(v_mul(x, v_set1(-1.0f)))));
}

// y = x * sigmoid(x)
static void silu_array(float *y, const float *x, size_t n) {
    size_t i = 0;
    for (; i + VLEN <= n; i += VLEN) {
        vfloat v = v_load(x + i);
        v_store(y + i, v_mul(v, v_sigmoid(v)));
    }
    if (i < n) {
        float t[VLEN] = {0};
        memcpy(t, x + i, (n - i) * sizeof(float));
        vfloat v = v_load(t);
        v_store(t, v_mul(v, v_sigmoid(v)));
        memcpy(y + i, t, (n - i) * sizeof(float));
    }
}

// y = sigmoid(x)
static void sigmoid_array(float *y, const float *x, size_t n) {
    size_t i = 0;
    for (; i + VLEN <= n; i += VLEN) v_store(y + i, v_sigmoid(v_load(x + i)));
    if (i < n) {
        float t[VLEN] = {0};
        memcpy(t, x + i, (n - i) * sizeof(float));
        v_store(t, v_sigmoid(v_load(t)));
        memcpy(y + i, t, (n - i) * sizeof(float));
    }
}

// dx = dy * silu'(x), silu' = s (1 + x (1 - s)), s = sigmoid(x); dx may be x
static inline vfloat v_silu_grad(vfloat dy, vfloat x) {
    vfloat s = v_sigmoid(x), one = v_set1(1.0f);
    vfloat oms = v_add(one, v_mul(s, v_set1(-1.0f)));  // 1 - s
    return v_mul(dy, v_mul(s, v_fma(x, oms, one)));
}

static void silu_grad_array(float *dx, const float *dy, const float *x, size_t n) {
    size_t i = 0;
    for (; i + VLEN <= n; i += VLEN) v_store(dx + i, v_silu_grad(v_load(dy + i), v_load(x + i)));
    if (i < n) {
        float t[VLEN] = {0}, u[VLEN] = {0};
        memcpy(t, dy + i, (n - i) * sizeof(float));
        memcpy(u, x + i, (n - i) * sizeof(float));
        v_store(t, v_silu_grad(v_load(t), v_load(u)));
        memcpy(dx + i, t, (n - i) * sizeof(float));
    }
}

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols (r < keep_rows
// written; rows past `rows` as 0): 16x16 blocks by transpose16 where it
// exists, the rest element by element
static void transpose_block(float *dst, size_t ldd, const float *src, size_t lds, int rows,
                            int keep, size_t cols) {
    size_t c = 0;
#ifdef HAVE_TRANSPOSE16
    if (rows <= 16 && keep <= 16)
        for (; c + 16 <= cols; c += 16) transpose16(dst + c * ldd, ldd, src + c, lds, rows, keep);
#endif
    for (; c < cols; c++)
        for (int r = 0; r < keep; r++)
            dst[c * ldd + (size_t)r] = r < rows ? src[(size_t)r * lds + c] : 0.0f;
}

// complete unrolling of short constant loops, so accumulators stay in registers
#if defined(__clang__)
#define UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define UNROLL _Pragma("GCC unroll 16")
#else
#define UNROLL
#endif

double flops_forward = 0.0;

// 16 independent accumulator chains keep both FMA pipes busy through the
// 4-cycle latency; the sum is returned so the loop cannot be removed
double simd_fma_loop(long iters) {
    vfloat acc[16], m = v_set1(0.999999f), a = v_set1(1e-7f);
    for (int i = 0; i < 16; i++) acc[i] = v_set1((float)i);
    for (long it = 0; it < iters; it++) {
        UNROLL
        for (int i = 0; i < 16; i++) acc[i] = v_fma(acc[i], m, a);
    }
    float out[VLEN], s = 0.0f;
    for (int i = 0; i < 16; i++) {
        v_store(out, acc[i]);
        for (int k = 0; k < VLEN; k++) s += out[k];
    }
    return s == 12345.0f ? 0.0 : 2.0 * 16 * VLEN * (double)iters;
}

// ---------------------------------------------------------------------------
// ---- matrix multiply ----
// Goto/BLIS structure: for each block of NC columns and KC depth, pack B into
// NR-wide panels; for each block of MC rows, pack A into MR-tall panels; an
// MR x NR register tile accumulates over the KC depth. Threads own disjoint
// column ranges (or row ranges when N is small), never a share of the k sum.
// ---------------------------------------------------------------------------
#if VLEN == 1
#define GEMM_NV 4           // scalar: a 4x4 tile of plain floats
#else
#define GEMM_NV 2           // vectors per tile row
#endif
#define GEMM_NR (GEMM_NV * VLEN)
#define GEMM_KC 256
#define GEMM_MC (GEMM_MR * 16)
#define GEMM_NC (GEMM_NR * 64)

// reference: the definition, summed in float in k order
void sgemm_naive(int transA, int transB, size_t M, size_t N, size_t K,
                 const float *A, size_t lda, const float *B, size_t ldb,
                 int accumulate, float *C, size_t ldc) {
    for (size_t i = 0; i < M; i++) {
        for (size_t j = 0; j < N; j++) {
            float s = 0.0f;
            for (size_t p = 0; p < K; p++) {
                float a = transA ? A[p * lda + i] : A[i * lda + p];
                float b = transB ? B[j * ldb + p] : B[p * ldb + j];
                s += a * b;
            }
            C[i * ldc + j] = accumulate ? C[i * ldc + j] + s : s;
        }
    }
}

// Ap: panels of MR rows, each (kc, MR) with rows past m zero-filled. The
// loops follow the source's contiguous direction (a transposed source is
// read along i, a plain one along p); the panel itself is small enough to
// stay in L1 while it is written with a stride.
static void pack_A(float *Ap, int transA, const float *A, size_t lda,
                   size_t i0, size_t m, size_t p0, size_t kc) {
    for (size_t ir = 0; ir < m; ir += GEMM_MR) {
        size_t mr = m - ir < GEMM_MR ? m - ir : GEMM_MR;
        float *panel = Ap + ir * kc;
        if (transA) {         // A'(i, p) = A[p][i]: rows of A are contiguous in i
            for (size_t p = 0; p < kc; p++) {
                const float *src = A + (p0 + p) * lda + i0 + ir;
                float *dst = panel + p * GEMM_MR;
                for (size_t i = 0; i < mr; i++) dst[i] = src[i];
                for (size_t i = mr; i < GEMM_MR; i++) dst[i] = 0.0f;
            }
        } else {              // A'(i, p) = A[i][p]: contiguous in p, a transpose
            transpose_block(panel, GEMM_MR, A + (i0 + ir) * lda + p0, lda, (int)mr, GEMM_MR, kc);
        }
    }
}

// One B panel (kc, NR) from nr rows of kc floats, lds apart: panel[p*NR + j]
// = rows[j*lds + p], columns past nr zero. A K-major pack of K-contiguous
// rows, in transposes of 16 columns.
static void transpose_to_panel(float *panel, const float *rows, size_t lds, size_t nr, size_t kc) {
    for (size_t jb = 0; jb < GEMM_NR; jb += 16) {
        int in = nr > jb ? (int)(nr - jb < 16 ? nr - jb : 16) : 0;
        int width = GEMM_NR - jb < 16 ? (int)(GEMM_NR - jb) : 16;
        transpose_block(panel + jb, GEMM_NR, in ? rows + jb * lds : rows, lds, in, width, kc);
    }
}

// Bp: panels of NR columns, each (kc, NR) with columns past n zero-filled
static void pack_B(float *Bp, int transB, const float *B, size_t ldb,
                   size_t p0, size_t kc, size_t j0, size_t n) {
    for (size_t jr = 0; jr < n; jr += GEMM_NR) {
        size_t nr = n - jr < GEMM_NR ? n - jr : GEMM_NR;
        float *panel = Bp + jr * kc;
        if (!transB) {        // B'(p, j) = B[p][j]: contiguous in j
            for (size_t p = 0; p < kc; p++) {
                const float *src = B + (p0 + p) * ldb + j0 + jr;
                float *dst = panel + p * GEMM_NR;
                if (nr == GEMM_NR) { memcpy(dst, src, GEMM_NR * sizeof(float)); continue; }
                for (size_t j = 0; j < nr; j++) dst[j] = src[j];
                for (size_t j = nr; j < GEMM_NR; j++) dst[j] = 0.0f;
            }
        } else {              // B'(p, j) = B[j][p]: contiguous in p, a transpose
            transpose_to_panel(panel, B + (j0 + jr) * ldb + p0, ldb, nr, kc);
        }
    }
}

// the register tile: c (MR, NR) (+)= a (kc, MR)^T @ b (kc, NR)
static void gemm_micro_kernel(size_t kc, const float *a, const float *b,
                              float *c, size_t ldc, int accumulate) {
    // The accumulators must live in registers: the loops over i and j are
    // unrolled completely (the pragma; -O2 alone would leave them as loops
    // over a stack array, at half the speed).
    vfloat acc[GEMM_MR][GEMM_NV];
    UNROLL
    for (int i = 0; i < GEMM_MR; i++)
        UNROLL
        for (int j = 0; j < GEMM_NV; j++) acc[i][j] = v_zero();
    for (size_t p = 0; p < kc; p++) {
        vfloat bv[GEMM_NV];
        UNROLL
        for (int j = 0; j < GEMM_NV; j++) bv[j] = v_load(b + j * VLEN);
        UNROLL
        for (int i = 0; i < GEMM_MR; i++) {
            vfloat ai = v_set1(a[i]);
            UNROLL
            for (int j = 0; j < GEMM_NV; j++) acc[i][j] = v_fma(ai, bv[j], acc[i][j]);
        }
        a += GEMM_MR;
        b += GEMM_NR;
    }
    UNROLL
    for (int i = 0; i < GEMM_MR; i++)
        UNROLL
        for (int j = 0; j < GEMM_NV; j++) {
            float *cp = c + i * ldc + j * VLEN;
            v_store(cp, accumulate ? v_add(v_load(cp), acc[i][j]) : acc[i][j]);
        }
}

// ---- bf16 operands (gemm_set_precision) ----
// With GEMM_BF16 the packed panels are lowered once per block, after packing
// and before the register tiles read them: on CPUs with AVX512-BF16 to pairs
// of bf16 (VDPBF16PS multiplies two bf16 pairs per 32-bit lane and adds both
// products to a float32), elsewhere to floats rounded to bf16 for the float32
// tile. A bf16 product is exact in float32 (8 + 8 significant bits), so the
// two differ only in the order of the float32 additions. Packing is the only
// place that rounds: every caller of the GEMM, and every way of making B
// (a matrix, an im2col function, shared panels), gets bf16 the same way.
static GemmPrecision gemm_prec = GEMM_FP32;
static int gemm_use_dpbf16;  // GEMM_BF16 on VDPBF16PS now
enum { AMX_OFF, AMX_TILES, AMX_MODEL };
static int gemm_use_amx;     // GEMM_BF16 on AMX tiles now, or on their software model

// float32 -> bf16 bits as VCVTNE2PS2BF16 rounds (Intel SDM): to nearest even,
// zero and subnormal inputs to a zero of their sign, NaN to a quiet NaN
static uint16_t bf16_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u);
    if ((u & 0x7f800000u) == 0) return (uint16_t)((u >> 16) & 0x8000u);
    u += 0x7fffu + ((u >> 16) & 1u);  // a carry into the exponent rounds up, to inf at the top
    return (uint16_t)(u >> 16);
}

static float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

float bf16_round(float x) { return bf16_to_float(bf16_bits(x)); }

// a packed panel (kc, w) of floats -> (ceil(kc/2), w, 2) bf16: each 32-bit word
// holds one row's (or column's) operands k = 2q and 2q + 1, VDPBF16PS's pairs;
// an odd kc's last pair is padded with a zero
// (the AVX-512 build's, below, 16 words at a time; the plain loop elsewhere)
#if VLEN == 16
// bf16_bits of 16 floats at once, in the low half of each 32-bit lane: the
// same integer steps (bit for bit the scalar's), a lane at a time they cost
// more than the GEMM they feed
static inline __m512i bf16_bits16(__m512 x) {
    __m512i u = _mm512_castps_si512(x), hi = _mm512_srli_epi32(u, 16);
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000));
    __mmask16 tiny = _mm512_testn_epi32_mask(u, _mm512_set1_epi32(0x7f800000));
    __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(hi, _mm512_set1_epi32(1)));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x0040)));
    return _mm512_mask_mov_epi32(r, tiny, _mm512_and_si512(hi, _mm512_set1_epi32(0x8000)));
}

// the panel's pairs 16 words at a time: word j = bf16(second[j]) << 16 | bf16(first[j])
static void bf16_pair_panel(uint16_t *dst, const float *src, size_t kc, size_t w) {
    for (size_t p = 0; p < kc; p += 2, dst += 2 * w, src += 2 * w) {
        int second = p + 1 < kc;
        for (size_t j = 0; j < w; j += 16) {
            __mmask16 m = w - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (w - j)) - 1u);
            __m512i lo = bf16_bits16(_mm512_maskz_loadu_ps(m, src + j));
            __m512i hi = second ? bf16_bits16(_mm512_maskz_loadu_ps(m, src + w + j)) : _mm512_setzero_si512();
            _mm512_mask_storeu_epi32(dst + 2 * j, m, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
    }
}

// n values to bf16 bits, 16 at a time
static void bf16_bits_array(uint16_t *dst, const float *src, size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(dst + i), _mm512_cvtepi32_epi16(bf16_bits16(_mm512_loadu_ps(src + i))));
    for (; i < n; i++) dst[i] = bf16_bits(src[i]);
}

static void bf16_round_array(float *dst, const float *src, size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_si512(dst + i, _mm512_slli_epi32(bf16_bits16(_mm512_loadu_ps(src + i)), 16));
    for (; i < n; i++) dst[i] = bf16_round(src[i]);
}
#else
static void bf16_pair_panel(uint16_t *dst, const float *src, size_t kc, size_t w) {
    for (size_t p = 0; p < kc; p += 2, dst += 2 * w, src += 2 * w) {
        const float *second = p + 1 < kc ? src + w : NULL;
        for (size_t j = 0; j < w; j++) {
            dst[2 * j] = bf16_bits(src[j]);
            dst[2 * j + 1] = second ? bf16_bits(second[j]) : 0;
        }
    }
}

static void bf16_round_array(float *dst, const float *src, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] = bf16_round(src[i]);
}
#endif

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__TINYC__)
#include <cpuid.h>  // GCC's and clang's (tcc has none: it reports no bf16)
// CPUID leaf 7: subleaf 1 EAX bit 5 AVX512_BF16; subleaf 0 EDX bit 22
// AMX-BF16, bit 24 AMX-TILE
int cpu_has_avx512_bf16(void) {
    unsigned a = 0, b = 0, c = 0, d = 0;  // (GCC -O1 cannot see __get_cpuid set them)
    return __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a >> 5 & 1u);
}
int cpu_has_amx_bf16(void) {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 22 & 1u) && (d >> 24 & 1u);
}
// CPUID leaf 0's vendor string (EBX, EDX, ECX) is "GenuineIntel"
static int cpu_is_intel(void) {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid(0, &a, &b, &c, &d) && b == 0x756e6547u && d == 0x49656e69u &&
           c == 0x6c65746eu;
}
#else
int cpu_has_avx512_bf16(void) { return 0; }
int cpu_has_amx_bf16(void) { return 0; }
static int cpu_is_intel(void) { return 0; }
#endif

// The VDPBF16PS tile, compiled for AVX512-BF16 whatever -march says (the
// function is only called after CPUID has said yes), in AVX-512 builds with
// a compiler that knows the instruction (GCC 10, clang 9 on).
#if VLEN == 16 && GEMM_NV == 2 && (defined(__x86_64__) || defined(__i386__)) &&             \
    (defined(__AVX512BF16__) || (defined(__clang__) && __clang_major__ >= 9) ||             \
     (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10))
#define HAVE_DPBF16 1
// c (MR, NR) (+)= a^T @ b over kc, a and b bf16 pair panels (bf16_pair_panel)
__attribute__((target("avx512f,avx512bw,avx512bf16")))
static void gemm_micro_kernel_bf16(size_t kc, const uint16_t *a, const uint16_t *b,
                                   float *c, size_t ldc, int accumulate) {
    __m512 acc[GEMM_MR][2];
    UNROLL
    for (int i = 0; i < GEMM_MR; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (size_t p = 0; p < kc; p += 2) {
        __m512bh b0 = (__m512bh)_mm512_loadu_si512(b), b1 = (__m512bh)_mm512_loadu_si512(b + 32);
        UNROLL
        for (int i = 0; i < GEMM_MR; i++) {
            int32_t pair;
            memcpy(&pair, a + 2 * i, sizeof pair);
            __m512bh ai = (__m512bh)_mm512_set1_epi32(pair);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], ai, b0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], ai, b1);
        }
        a += 2 * GEMM_MR;
        b += 2 * GEMM_NR;
    }
    UNROLL
    for (int i = 0; i < GEMM_MR; i++)
        UNROLL
        for (int j = 0; j < 2; j++) {
            float *cp = c + i * ldc + j * 16;
            _mm512_storeu_ps(cp, accumulate ? _mm512_add_ps(_mm512_loadu_ps(cp), acc[i][j]) : acc[i][j]);
        }
}
// the bf16 peak: 16 independent VDPBF16PS chains, registers only (as
// simd_fma_loop); 64 FLOPs each (16 lanes, 2 products, multiply and add)
__attribute__((target("avx512f,avx512bw,avx512bf16")))
static double dpbf16_loop(long iters) {
    __m512 acc[16];
    __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = (__m512bh)_mm512_set1_epi32(0x33d633d6);
    for (int i = 0; i < 16; i++) acc[i] = _mm512_set1_ps((float)i);
    for (long it = 0; it < iters; it++) {
        UNROLL
        for (int i = 0; i < 16; i++) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
    }
    float out[16], s = 0.0f;
    for (int i = 0; i < 16; i++) {
        _mm512_storeu_ps(out, acc[i]);
        for (int k = 0; k < 16; k++) s += out[k];
    }
    return s == 12345.0f ? 0.0 : 64.0 * 16 * (double)iters;
}
#endif

double simd_bf16_loop(long iters) {
#ifdef HAVE_DPBF16
    if (cpu_has_avx512_bf16()) return dpbf16_loop(iters);
#endif
    (void)iters;
    return 0.0;
}

// ---- AMX tiles (TDPBF16PS) ----
// Intel's matrix unit (Sapphire Rapids on): eight tile registers of up to 16
// rows of 64 bytes. TDPBF16PS adds to a float32 tile C (16 x 16) the product
// of a bf16 tile A (16 rows x 32 k) and a bf16 tile B (16 rows of k pairs x
// 16 columns x 2): B's pairs are VDPBF16PS's, so the B panels bf16_pair_panel
// writes (32 columns, a pair row of 128 bytes) are two B tiles each, read at
// a 128-byte stride. An A tile row is 32 consecutive k of one row of A, so A
// is packed to row-major bf16 instead (amx_pack_a). The register tile is
// 32 x 32: C in tiles 0-3 (rows 0-15 and 16-31, columns 0-15 and 16-31), A's
// rows in tiles 4 and 5, B's columns in 6 and 7; the depth runs 32 at a time,
// padded with zeros to a multiple of 32. Every tile is configured full size
// (16 rows of 64 bytes), which is all the kernel needs.
// The tiles exist only in AVX-512 builds (the GEMM's 32-column panels);
// the kernel runs the hardware where the CPU has AMX-BF16 and Linux grants
// the process the tile state, and the software model below where a test
// asks for it (GEMM_BF16_AMX_MODEL), so the lowering, the strides and the
// tile loop are tested on every AVX-512 machine.
#if GEMM_NR == 32
#define HAVE_AMX_LAYOUT 1
#define AMX_MN 32  // the register tile's rows and columns
#define AMX_K 32   // an A tile's depth

static size_t amx_depth(size_t kc) { return (kc + AMX_K - 1) / AMX_K * AMX_K; }
static size_t amx_rows(size_t m) { return (m + AMX_MN - 1) / AMX_MN * AMX_MN; }

// A's block, rows i0.. and depth p0.., straight from the matrix into
// row-major bf16 (amx_rows(mc), amx_depth(kc)), zeros past mc and kc: a
// plain A's rows are converted as they are, a transposed A goes through
// `tmp` (amx_rows(mc) * amx_depth(kc) floats) in 16 x 16 transposes
static void amx_pack_a(uint16_t *dst, float *tmp, int transA, const float *A, size_t lda,
                       size_t i0, size_t mc, size_t p0, size_t kc) {
    size_t kc32 = amx_depth(kc), rows = amx_rows(mc);
    if (transA)  // tmp[i * kc32 + p] = A[p0 + p][i0 + i]
        for (size_t p = 0; p < kc; p += 16) {
            int n = kc - p < 16 ? (int)(kc - p) : 16;
            transpose_block(tmp + p, kc32, A + (p0 + p) * lda + i0, lda, n, n, mc);
        }
    for (size_t i = 0; i < rows; i++) {
        uint16_t *d = dst + i * kc32;
        if (i >= mc) { memset(d, 0, kc32 * sizeof(uint16_t)); continue; }
        bf16_bits_array(d, transA ? tmp + i * kc32 : A + (i0 + i) * lda + p0, kc);
        memset(d + kc, 0, (kc32 - kc) * sizeof(uint16_t));
    }
}

// the same from A given packed (Ap_all: mc rows in panels of MR, each (kc,
// MR), as pack_A writes them). Only the Winograd path gives A packed, and
// bf16 turns it off: a fallback, so that no caller of the GEMM can miss AMX.
static void amx_lower_a(uint16_t *dst, const float *Ap, size_t mc, size_t kc) {
    size_t kc32 = amx_depth(kc), rows = amx_rows(mc);
    for (size_t i = 0; i < rows; i++) {
        uint16_t *d = dst + i * kc32;
        memset(d, 0, kc32 * sizeof(uint16_t));
        if (i >= mc) continue;
        const float *panel = Ap + i / GEMM_MR * GEMM_MR * kc + i % GEMM_MR;
        for (size_t p = 0; p < kc; p++) d[p] = bf16_bits(panel[p * GEMM_MR]);
    }
}

// B's packed block (ncp columns, panels of 32, each (kc, 32)) -> pair panels
// of amx_depth(kc) / 2 pair rows, the pair rows past kc zero
static void amx_lower_b(uint16_t *dst, const float *Bp, size_t ncp, size_t kc) {
    size_t kc32 = amx_depth(kc), kcp = (kc + 1) / 2 * 2;
    for (size_t jr = 0; jr < ncp; jr += AMX_MN) {
        uint16_t *panel = dst + jr * kc32;
        bf16_pair_panel(panel, Bp + jr * kc, kc, AMX_MN);
        memset(panel + kcp * AMX_MN, 0, (kc32 - kcp) * AMX_MN * sizeof(uint16_t));
    }
}

// The tiles in software, as Intel's SDM defines TILEZERO, TILELOADD,
// TILESTORED and TDPBF16PS for full-size tiles: the plain reference beside
// the hardware kernel. TDPBF16PS, per row m of C: for each pair k of A's row,
// for each column n, two float32 additions of exact bf16 products (A's
// 2k-th element times B's (k, n) first, then the 2k+1-th times the second),
// subnormal inputs read as zero, subnormal results flushed to zero. Elements
// are read and written as the host's uint16 and float (the hardware is
// little-endian; the model is endian-neutral, as the lowering is).
typedef struct { unsigned char row[16][64]; } AmxTile;

static void amx_model_zero(AmxTile *t) { memset(t, 0, sizeof *t); }

static void amx_model_load(AmxTile *t, const void *base, size_t stride) {
    for (int r = 0; r < 16; r++) memcpy(t->row[r], (const char *)base + r * stride, 64);
}

static void amx_model_store(const AmxTile *t, void *base, size_t stride) {
    for (int r = 0; r < 16; r++) memcpy((char *)base + r * stride, t->row[r], 64);
}

static float amx_model_bf16(const unsigned char *p) {  // subnormals read as zero
    uint16_t h;
    memcpy(&h, p, sizeof h);
    float x = bf16_to_float(h);
    return fabsf(x) < FLT_MIN ? 0.0f * x : x;
}

static float amx_model_ftz(float x) { return fabsf(x) < FLT_MIN ? 0.0f * x : x; }

static void amx_model_dpbf16ps(AmxTile *c, const AmxTile *a, const AmxTile *b) {
    for (int m = 0; m < 16; m++) {
        float acc[16];
        memcpy(acc, c->row[m], sizeof acc);
        for (int k = 0; k < 16; k++) {
            float a0 = amx_model_bf16(a->row[m] + 4 * k), a1 = amx_model_bf16(a->row[m] + 4 * k + 2);
            for (int n = 0; n < 16; n++) {
                acc[n] = amx_model_ftz(acc[n] + a0 * amx_model_bf16(b->row[k] + 4 * n));
                acc[n] = amx_model_ftz(acc[n] + a1 * amx_model_bf16(b->row[k] + 4 * n + 2));
            }
        }
        memcpy(c->row[m], acc, sizeof acc);
    }
}

// the 32 x 32 register tile on the model: c (32 x 32, ldc apart) = a @ b
// over kc32, a row-major (32, kc32) bf16, b a pair panel (kc32 / 2, 32, 2);
// line for line amx_kernel_tiles
static void amx_kernel_model(size_t kc32, const uint16_t *a, const uint16_t *b, float *c,
                             size_t ldc) {
    AmxTile t[8];
    size_t lda = kc32 * sizeof(uint16_t), ldcb = ldc * sizeof(float);
    amx_model_zero(&t[0]); amx_model_zero(&t[1]); amx_model_zero(&t[2]); amx_model_zero(&t[3]);
    for (size_t k = 0; k < kc32; k += AMX_K) {
        amx_model_load(&t[4], a + k, lda);
        amx_model_load(&t[5], a + 16 * kc32 + k, lda);
        amx_model_load(&t[6], b + k * AMX_MN, 128);  // pair rows k/2.., 64 words each
        amx_model_load(&t[7], b + k * AMX_MN + 32, 128);
        amx_model_dpbf16ps(&t[0], &t[4], &t[6]);
        amx_model_dpbf16ps(&t[1], &t[4], &t[7]);
        amx_model_dpbf16ps(&t[2], &t[5], &t[6]);
        amx_model_dpbf16ps(&t[3], &t[5], &t[7]);
    }
    amx_model_store(&t[0], c, ldcb);
    amx_model_store(&t[1], c + 16, ldcb);
    amx_model_store(&t[2], c + 16 * ldc, ldcb);
    amx_model_store(&t[3], c + 16 * ldc + 16, ldcb);
}

// The hardware: x86-64 Linux (the tile state must be requested from the
// kernel) with a compiler that has the AMX intrinsics (GCC 11, clang 12 on).
#if defined(__x86_64__) && defined(__linux__) && !defined(__TINYC__) &&                      \
    ((defined(__clang__) && __clang_major__ >= 12) ||                                         \
     (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define HAVE_AMX_TILES 1
#include <sys/syscall.h>
long syscall(long number, ...);  // <unistd.h> declares it only for _DEFAULT_SOURCE

// Linux (5.16 on) gives a process the 8 KB of tile data in its saved state
// only when asked: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA). A
// kernel that refuses (an older one, a VM without it) leaves AMX unused;
// the first tile instruction without it would kill the process (SIGILL).
static int amx_request_tiles(void) {
    const long arch_req_xcomp_perm = 0x1023, xfeature_xtiledata = 18;
    return syscall(SYS_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) == 0;
}

// palette 1, every tile 16 rows of 64 bytes (bytes 16-47: each tile's bytes
// per row, 16-bit; bytes 48-63: its rows), loaded by each thread that runs tiles
static void amx_config(unsigned char cfg[64]) {
    memset(cfg, 0, 64);
    cfg[0] = 1;
    for (int t = 0; t < 8; t++) {
        cfg[16 + 2 * t] = 64;  // little-endian 64
        cfg[48 + t] = 16;
    }
}

__attribute__((target("amx-tile")))
static void amx_begin(void) {
    unsigned char cfg[64];
    amx_config(cfg);
    _tile_loadconfig(cfg);
}

// back to the init state: the next context switch saves no tile data
__attribute__((target("amx-tile")))
static void amx_end(void) { _tile_release(); }

__attribute__((target("amx-tile,amx-bf16")))
static void amx_kernel_tiles(size_t kc32, const uint16_t *a, const uint16_t *b, float *c,
                             size_t ldc) {
    size_t lda = kc32 * sizeof(uint16_t), ldcb = ldc * sizeof(float);
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (size_t k = 0; k < kc32; k += AMX_K) {
        _tile_loadd(4, a + k, lda);
        _tile_loadd(5, a + 16 * kc32 + k, lda);
        _tile_loadd(6, b + k * AMX_MN, 128);
        _tile_loadd(7, b + k * AMX_MN + 32, 128);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, c, ldcb);
    _tile_stored(1, c + 16, ldcb);
    _tile_stored(2, c + 16 * ldc, ldcb);
    _tile_stored(3, c + 16 * ldc + 16, ldcb);
}

// the AMX peak: four independent TDPBF16PS chains on tiles loaded once
// (registers only, as simd_fma_loop); 16 * 16 * 32 * 2 FLOPs each
__attribute__((target("amx-tile,amx-bf16")))
static double amx_loop(long iters) {
    uint16_t one[16 * 32], tiny[16 * 32];  // 1 and 1e-7 (as dpbf16_loop): the sums stay finite
    float out[16 * 16];
    for (int i = 0; i < 16 * 32; i++) one[i] = 0x3f80, tiny[i] = 0x33d6;
    amx_begin();
    _tile_loadd(4, one, 64); _tile_loadd(5, one, 64); _tile_loadd(6, tiny, 64); _tile_loadd(7, tiny, 64);
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (long it = 0; it < iters; it++) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, out, 64);
    amx_end();
    return out[0] == 12345.0f ? 0.0 : 4.0 * 16 * 16 * 32 * 2 * (double)iters;
}
#endif  // HAVE_AMX_TILES

// 1: the tiles can run here (CPUID says AMX-BF16, the kernel granted the
// state); asked once, the answer kept
static int amx_tiles_usable(void) {
#ifdef HAVE_AMX_TILES
    static int usable = -1;
    if (usable < 0) usable = cpu_has_amx_bf16() && amx_request_tiles();
    return usable;
#else
    return 0;
#endif
}

// C (mc x nc, ldc apart) (+)= the lowered blocks' product, 32 x 32 at a time,
// a partial tile through a buffer. A tile's sums never see C: it is added
// after, on every path, so that the bits do not depend on where a thread's
// rows begin.
static void amx_block(size_t kc, const uint16_t *Ak, const uint16_t *Bk, size_t mc, size_t nc,
                      float *C, size_t ldc, int accumulate) {
    size_t kc32 = amx_depth(kc);
    float tile[AMX_MN * AMX_MN];
#ifdef HAVE_AMX_TILES
    if (gemm_use_amx == AMX_TILES) amx_begin();
#endif
    for (size_t jr = 0; jr < nc; jr += AMX_MN) {
        size_t nr = nc - jr < AMX_MN ? nc - jr : AMX_MN;
        for (size_t ir = 0; ir < mc; ir += AMX_MN) {
            size_t mr = mc - ir < AMX_MN ? mc - ir : AMX_MN;
            const uint16_t *a = Ak + ir * kc32, *b = Bk + jr * kc32;
            float *c = C + ir * ldc + jr;
            int direct = mr == AMX_MN && nr == AMX_MN && !accumulate;
            float *out = direct ? c : tile;
            size_t ldo = direct ? ldc : AMX_MN;
#ifdef HAVE_AMX_TILES
            if (gemm_use_amx == AMX_TILES) amx_kernel_tiles(kc32, a, b, out, ldo);
            else
#endif
                amx_kernel_model(kc32, a, b, out, ldo);
            if (direct) continue;
            for (size_t i = 0; i < mr; i++)
                for (size_t j = 0; j < nr; j++)
                    c[i * ldc + j] = accumulate ? c[i * ldc + j] + tile[i * AMX_MN + j] : tile[i * AMX_MN + j];
        }
    }
#ifdef HAVE_AMX_TILES
    if (gemm_use_amx == AMX_TILES) amx_end();
#endif
}
#else
static int amx_tiles_usable(void) { return 0; }
#endif  // GEMM_NR == 32

double simd_amx_loop(long iters) {
#ifdef HAVE_AMX_TILES
    if (amx_tiles_usable()) return amx_loop(iters);
#endif
    (void)iters;
    return 0.0;
}

int gemm_bf16_vdpbf16ps(void) {
#ifdef HAVE_DPBF16
    return cpu_has_avx512_bf16();
#else
    return 0;
#endif
}

// VDPBF16PS pays only where it runs at the float32 FMA's rate per instruction
// (so at twice its FLOPs): AMD Zen 5 reads 485 GFLOP/s in dpbf16_loop against
// 223 in simd_fma_loop on one core. Intel's cores run it at half that rate:
// 85 against 174 on a Xeon with AVX512-FP16 (Sapphire Rapids or later, AMX
// hidden by its virtual machine), where the convolutions in bf16 took twice
// their float32 time (README, "bf16"); Intel meant AMX for bf16. There the
// rounded operands go to the float32 kernels instead, unless the AMX tiles
// can run. The choice is by CPUID (and the kernel's grant of the tile
// state), not by a timing at start-up, so that a machine always gives the
// same bits.
int gemm_bf16_amx(void) { return amx_tiles_usable(); }

int gemm_bf16_native(void) {
    return gemm_bf16_amx() || (gemm_bf16_vdpbf16ps() && !cpu_is_intel());
}

const char *gemm_bf16_why(void) {
    if (gemm_bf16_native()) return "";
    if (cpu_has_amx_bf16()) {
#ifdef HAVE_AMX_TILES
        return "this CPU has AMX-BF16 but the kernel did not grant the tile state "
               "(arch_prctl ARCH_REQ_XCOMP_PERM)";
#else
        return "this CPU has AMX-BF16 but this build has no AMX kernels";
#endif
    }
    if (gemm_bf16_vdpbf16ps())
        return "this Intel CPU has no AMX (or its virtual machine hides it) and runs VDPBF16PS "
               "at half the float32 FMA's rate";
    if (cpu_has_avx512_bf16()) return "this build has no VDPBF16PS kernels";
    return "this CPU has no AVX512-BF16";
}

void gemm_set_precision(GemmPrecision p) {
    gemm_prec = p;
    gemm_use_amx = (p == GEMM_BF16 || p == GEMM_BF16_AMX) && gemm_bf16_amx() ? AMX_TILES : AMX_OFF;
#ifdef HAVE_AMX_LAYOUT
    if (p == GEMM_BF16_AMX_MODEL) gemm_use_amx = AMX_MODEL;
#endif
    gemm_use_dpbf16 = !gemm_use_amx && ((p == GEMM_BF16 && gemm_bf16_native()) ||
                                        (p == GEMM_BF16_VDPBF16PS && gemm_bf16_vdpbf16ps()));
}

GemmPrecision gemm_precision(void) { return gemm_prec == GEMM_FP32 ? GEMM_FP32 : GEMM_BF16; }

const char *gemm_backend_name(void) {
    if (gemm_prec == GEMM_FP32) return "fp32 " SIMD_NAME;
    if (gemm_use_amx == AMX_TILES) return "bf16 amx";
    if (gemm_use_amx == AMX_MODEL) return "bf16 amx-model (tiles in software)";
    return gemm_use_dpbf16 ? "bf16 avx512-bf16" : "bf16 emulated on " SIMD_NAME;
}

// a packed block of A (mc rows, in panels of MR) or of B (nc columns, in
// panels of NR) by kc, in the form the tiles read: pair panels for
// VDPBF16PS (and for AMX's B, of a depth rounded to 32; AMX's A is packed
// by amx_pack_a), rounded floats for the emulation
static const float *gemm_lower_a(float *dst, const float *Ap, size_t mc, size_t kc) {
    size_t count = (mc + GEMM_MR - 1) / GEMM_MR * GEMM_MR;
    if (!gemm_use_dpbf16) { bf16_round_array(dst, Ap, count * kc); return dst; }
    size_t kcp = (kc + 1) / 2 * 2;
    for (size_t r = 0; r < count; r += GEMM_MR)
        bf16_pair_panel((uint16_t *)dst + r * kcp, Ap + r * kc, kc, GEMM_MR);
    return dst;
}

static const float *gemm_lower_b(float *dst, const float *Bp, size_t nc, size_t kc) {
    size_t count = (nc + GEMM_NR - 1) / GEMM_NR * GEMM_NR;
#ifdef HAVE_AMX_LAYOUT
    if (gemm_use_amx) { amx_lower_b((uint16_t *)dst, Bp, count, kc); return dst; }
#endif
    if (!gemm_use_dpbf16) { bf16_round_array(dst, Bp, count * kc); return dst; }
    size_t kcp = (kc + 1) / 2 * 2;
    for (size_t r = 0; r < count; r += GEMM_NR)
        bf16_pair_panel((uint16_t *)dst + r * kcp, Bp + r * kc, kc, GEMM_NR);
    return dst;
}

// one register tile from the (lowered) blocks: rows ir.. of A's, columns jr.. of B's
static void gemm_tile(size_t kc, const float *Ak, const float *Bk, size_t ir, size_t jr,
                      float *c, size_t ldc, int accumulate) {
#ifdef HAVE_DPBF16
    if (gemm_use_dpbf16) {
        size_t kcp = (kc + 1) / 2 * 2;
        gemm_micro_kernel_bf16(kc, (const uint16_t *)Ak + ir * kcp, (const uint16_t *)Bk + jr * kcp,
                               c, ldc, accumulate);
        return;
    }
#endif
    gemm_micro_kernel(kc, Ak + ir * kc, Bk + jr * kc, c, ldc, accumulate);
}

// per-thread pack buffers, made on first use and kept until sgemm_free_buffers
#ifndef MAX_THREADS
#define MAX_THREADS 1
#endif
static float *gemm_pack_a[MAX_THREADS], *gemm_pack_b[MAX_THREADS];
static float *gemm_lo_a[MAX_THREADS], *gemm_lo_b[MAX_THREADS];  // their bf16 forms (gemm_lower)
// planes_conv_bf16's pair planes (bytes), made on first use, grown as needed,
// kept until sgemm_free_buffers: a fresh buffer each call cost its page faults
static void *planes_bf16;
static size_t planes_bf16_cap;
static float *gemm_shared_b;      // all of B's panels, packed once (gemm_run)
static size_t gemm_shared_b_cap;  // its floats

void sgemm_free_buffers(void) {
    for (int i = 0; i < MAX_THREADS; i++) {
        aligned_free(gemm_pack_a[i]);
        aligned_free(gemm_pack_b[i]);
        aligned_free(gemm_lo_a[i]);
        aligned_free(gemm_lo_b[i]);
        gemm_pack_a[i] = gemm_pack_b[i] = gemm_lo_a[i] = gemm_lo_b[i] = NULL;
    }
    aligned_free(gemm_shared_b);
    gemm_shared_b = NULL;
    aligned_free(planes_bf16);
    planes_bf16 = NULL;
    planes_bf16_cap = 0;
    gemm_shared_b_cap = 0;
}

typedef struct {
    int transA, transB;
    size_t M, N, K;
    const float *A, *B;
    size_t lda, ldb, ldc;
    int accumulate;
    float *C;
    int split_n;          // threads split columns (1) or rows (0)
    // pack_b writes B already lowered (VDPBF16PS's pair panels, each at
    // kc rounded up to even bf16 per column): gemm_block skips gemm_lower for it
    int b_lowered;
    // B given by a function instead of a matrix (B, ldb, transB unused):
    // pack_b(ctx, Bp, p0, kc, j0, n) writes what pack_B would
    void (*pack_b)(const void *ctx, float *Bp, size_t p0, size_t kc, size_t j0, size_t n);
    const void *pack_b_ctx;
    // B packed before the threads start (NULL: each packs its own): KC block
    // pc at Bp_all + pc * Npad, its panel of columns j at + j * kc
    const float *Bp_all;
    size_t Npad;
    // A given packed by its producer (NULL: packed here; A, lda, transA
    // unused), laid out as gemm_a_packed_index says, M rounded up to Mpad
    const float *Ap_all;
    size_t Mpad;
} GemmTask;

// A packed ahead of the GEMM: KC block pc at pc * Mpad, its panel of rows i
// (a multiple of MR) at + i * kc, element (i + r, pc + p) at + p * MR + r,
// with Mpad = M rounded up to MR and the rows past M zero: the layout pack_A
// writes, for the whole matrix at once. A producer that writes A in it
// directly (the Winograd kernel transform) saves the GEMM its packing pass.
static size_t gemm_rows_padded(size_t M) { return (M + GEMM_MR - 1) / GEMM_MR * GEMM_MR; }

static size_t gemm_a_packed_index(size_t i, size_t k, size_t M, size_t K) {
    size_t pc = k / GEMM_KC * GEMM_KC, kc = K - pc < GEMM_KC ? K - pc : GEMM_KC;
    return pc * gemm_rows_padded(M) + i / GEMM_MR * GEMM_MR * kc + (k - pc) * GEMM_MR +
           i % GEMM_MR;
}

// B's panels j0.. of depth block pc..pc+kc into Bp, as gemm_block packs them
static void gemm_pack_b_block(const GemmTask *t, float *Bp, size_t pc, size_t kc, size_t j0,
                              size_t n) {
    if (t->pack_b) t->pack_b(t->pack_b_ctx, Bp, pc, kc, j0, n);
    else pack_B(Bp, t->transB, t->B, t->ldb, pc, kc, j0, n);
}

// C[i0:i1, j0:j1] for one thread
static void gemm_block(const GemmTask *t, size_t i0, size_t i1, size_t j0, size_t j1) {
    int ith = pool_thread_id();
    if (!gemm_pack_a[ith]) {
        gemm_pack_a[ith] = aligned_malloc(GEMM_MC * GEMM_KC * sizeof(float));
        gemm_pack_b[ith] = aligned_malloc(GEMM_KC * GEMM_NC * sizeof(float));
    }
    int lower = gemm_prec != GEMM_FP32;
    if (lower && !gemm_lo_a[ith]) {
        gemm_lo_a[ith] = aligned_malloc(GEMM_MC * GEMM_KC * sizeof(float));
        gemm_lo_b[ith] = aligned_malloc(GEMM_KC * GEMM_NC * sizeof(float));
    }
    float *Ap = gemm_pack_a[ith], *Bp = gemm_pack_b[ith];
    const float *Ak, *Bk;  // what the tiles read: the packed blocks, or their bf16 forms
    float tile[GEMM_MR * GEMM_NR];
    for (size_t jc = j0; jc < j1; jc += GEMM_NC) {
        size_t nc = j1 - jc < GEMM_NC ? j1 - jc : GEMM_NC;
        for (size_t pc = 0; pc < t->K; pc += GEMM_KC) {
            size_t kc = t->K - pc < GEMM_KC ? t->K - pc : GEMM_KC;
            int acc = t->accumulate || pc > 0;
            if (t->Bp_all) Bp = (float *)t->Bp_all + pc * t->Npad + jc * kc;
            else gemm_pack_b_block(t, Bp, pc, kc, jc, nc);
            Bk = lower && !t->b_lowered ? gemm_lower_b(gemm_lo_b[ith], Bp, nc, kc) : Bp;
            for (size_t ic = i0; ic < i1; ic += GEMM_MC) {
                size_t mc = i1 - ic < GEMM_MC ? i1 - ic : GEMM_MC;
#ifdef HAVE_AMX_LAYOUT
                if (gemm_use_amx) {  // A packed as the tiles read it (Ap, unused here, is the scratch)
                    uint16_t *a16 = (uint16_t *)gemm_lo_a[ith];
                    if (t->Ap_all) amx_lower_a(a16, t->Ap_all + pc * t->Mpad + ic * kc, mc, kc);
                    else amx_pack_a(a16, Ap, t->transA, t->A, t->lda, ic, mc, pc, kc);
                    amx_block(kc, a16, (const uint16_t *)Bk, mc, nc, t->C + ic * t->ldc + jc, t->ldc, acc);
                    continue;
                }
#endif
                if (t->Ap_all) Ap = (float *)t->Ap_all + pc * t->Mpad + ic * kc;
                else pack_A(Ap, t->transA, t->A, t->lda, ic, mc, pc, kc);
                Ak = lower ? gemm_lower_a(gemm_lo_a[ith], Ap, mc, kc) : Ap;
                for (size_t jr = 0; jr < nc; jr += GEMM_NR) {
                    size_t nr = nc - jr < GEMM_NR ? nc - jr : GEMM_NR;
                    for (size_t ir = 0; ir < mc; ir += GEMM_MR) {
                        size_t mr = mc - ir < GEMM_MR ? mc - ir : GEMM_MR;
                        float *c = t->C + (ic + ir) * t->ldc + jc + jr;
                        if (mr == GEMM_MR && nr == GEMM_NR) {
                            gemm_tile(kc, Ak, Bk, ir, jr, c, t->ldc, acc);
                        } else {  // edge: full tile into a buffer, copy the valid part
                            gemm_tile(kc, Ak, Bk, ir, jr, tile, GEMM_NR, 0);
                            for (size_t i = 0; i < mr; i++)
                                for (size_t j = 0; j < nr; j++) {
                                    float v = tile[i * GEMM_NR + j];
                                    c[i * t->ldc + j] = acc ? c[i * t->ldc + j] + v : v;
                                }
                        }
                    }
                }
            }
        }
    }
}

static void gemm_thread(void *arg, int ith, int nth) {
    const GemmTask *t = arg;
    size_t b, e;
    if (t->split_n) {  // column ranges in whole NR panels
        size_t panels = (t->N + GEMM_NR - 1) / GEMM_NR;
        slice(panels, ith, nth, &b, &e);
        b *= GEMM_NR;
        e = e * GEMM_NR < t->N ? e * GEMM_NR : t->N;
        if (b < e) gemm_block(t, 0, t->M, b, e);
    } else {           // row ranges in whole MR panels
        size_t panels = (t->M + GEMM_MR - 1) / GEMM_MR;
        slice(panels, ith, nth, &b, &e);
        b *= GEMM_MR;
        e = e * GEMM_MR < t->M ? e * GEMM_MR : t->M;
        if (b < e) gemm_block(t, b, e, 0, t->N);
    }
}

// GEMM_CHUNKS_PER_THREAD chunks per thread, claimed as the threads come
// (see the thread pool): a thread that is late leaves its chunk to the
// caller. Each chunk packs its own B columns (split_n) or A rows and all of
// the other operand, so more chunks would repack that more often.
#ifndef GEMM_CHUNKS_PER_THREAD
#define GEMM_CHUNKS_PER_THREAD 1  // measured: 4 repacks enough to cost 10-40% on small maps
#endif

// Threads that split the rows would each pack all of B: for the few columns
// of a small map's convolution (4x4 maps of a batch of 8: 128 columns of an
// im2col) that copy costs a third of each thread's GEMM. Then (for B packed
// by a function or transposed; plain rows are memcpy's) the threads
// pack B's panels once, together, into gemm_shared_b (at most
// GEMM_SHARED_B_MAX floats), and the GEMM reads them from there. Packing
// moves data and sums nothing: results are the same either way.
#define GEMM_SHARED_B_MAX ((size_t)1 << 22)

static void gemm_pack_all_range(void *arg, size_t i0, size_t i1) {  // item: (KC block, panel)
    const GemmTask *t = arg;
    size_t panels = t->Npad / GEMM_NR;
    for (size_t i = i0; i < i1; i++) {
        size_t pc = i / panels * GEMM_KC, j = i % panels * GEMM_NR;
        size_t kc = t->K - pc < GEMM_KC ? t->K - pc : GEMM_KC;
        size_t n = t->N - j < GEMM_NR ? t->N - j : GEMM_NR;
        gemm_pack_b_block(t, (float *)t->Bp_all + pc * t->Npad + j * kc, pc, kc, j, n);
    }
}

static void gemm_share_b(GemmTask *t) {
    t->Npad = (t->N + GEMM_NR - 1) / GEMM_NR * GEMM_NR;
    size_t need = t->K * t->Npad;
    if (need > GEMM_SHARED_B_MAX || !pool_outside_jobs()) return;
    if (need > gemm_shared_b_cap) {
        aligned_free(gemm_shared_b);
        gemm_shared_b = aligned_malloc(need * sizeof(float));
        gemm_shared_b_cap = need;
    }
    t->Bp_all = gemm_shared_b;
    size_t blocks = (t->K + GEMM_KC - 1) / GEMM_KC;
    parallel_for(blocks * (t->Npad / GEMM_NR), 1, gemm_pack_all_range, t);
}

static void gemm_run(GemmTask *t) {
    int nth = pool_threads();
    t->split_n = t->N >= (size_t)nth * GEMM_NR * 4 || t->M < (size_t)nth * GEMM_MR * 2;
    if ((double)t->M * t->N * t->K < 64.0 * 64 * 64) nth = 1;  // not worth waking threads
    size_t panels = t->split_n ? (t->N + GEMM_NR - 1) / GEMM_NR : (t->M + GEMM_MR - 1) / GEMM_MR;
    size_t chunks = (size_t)nth * GEMM_CHUNKS_PER_THREAD;
    if (chunks > panels) chunks = panels;
    if (nth == 1 || chunks < 2) { gemm_thread(t, 0, 1); return; }
    if (!t->split_n && (t->pack_b || t->transB) && !t->b_lowered)
        gemm_share_b(t);  // (plain B: memcpy's; lowered panels keep their own layout)
    pool_run_chunks(gemm_thread, t, (int)chunks);
}

static void gemm_zero_or_keep(size_t M, size_t N, int accumulate, float *C, size_t ldc) {  // K == 0
    if (!accumulate)
        for (size_t i = 0; i < M; i++) memset(C + i * ldc, 0, N * sizeof(float));
}

void sgemm(int transA, int transB, size_t M, size_t N, size_t K,
           const float *A, size_t lda, const float *B, size_t ldb,
           int accumulate, float *C, size_t ldc) {
    if (M == 0 || N == 0) return;
    if (K == 0) { gemm_zero_or_keep(M, N, accumulate, C, ldc); return; }
    GemmTask t = {.transA = transA, .transB = transB, .M = M, .N = N, .K = K, .A = A, .B = B,
                  .lda = lda, .ldb = ldb, .ldc = ldc, .accumulate = accumulate, .C = C,
                  .split_n = 1};
    gemm_run(&t);
}

// C (+)= A @ op(B) with A (M, K) given packed (gemm_a_packed_index)
static void sgemm_packed_a(size_t M, size_t N, size_t K, const float *Ap, int transB,
                           const float *B, size_t ldb, int accumulate, float *C, size_t ldc) {
    if (M == 0 || N == 0) return;
    if (K == 0) { gemm_zero_or_keep(M, N, accumulate, C, ldc); return; }
    GemmTask t = {.transB = transB, .M = M, .N = N, .K = K, .B = B, .ldb = ldb, .ldc = ldc,
                  .accumulate = accumulate, .C = C, .split_n = 1, .Ap_all = Ap,
                  .Mpad = gemm_rows_padded(M)};
    gemm_run(&t);
}

// C (+)= op(A) @ B with B (K, N) made panel by panel by pack_b (see GemmTask)
static void sgemm_pack_b(int transA, size_t M, size_t N, size_t K, const float *A, size_t lda,
                         void (*pack_b)(const void *, float *, size_t, size_t, size_t, size_t),
                         const void *ctx, int accumulate, float *C, size_t ldc) {
    if (M == 0 || N == 0) return;
    if (K == 0) { gemm_zero_or_keep(M, N, accumulate, C, ldc); return; }
    GemmTask t = {.transA = transA, .M = M, .N = N, .K = K, .A = A, .lda = lda, .ldc = ldc,
                  .accumulate = accumulate, .C = C, .split_n = 1, .pack_b = pack_b,
                  .pack_b_ctx = ctx};
    gemm_run(&t);
}

// ---------------------------------------------------------------------------
// ---- graph: tensors and the tape ----
// ---------------------------------------------------------------------------
void graph_init(Graph *g, size_t block_size, size_t limit) {
    memset(g, 0, sizeof *g);
    arena_init(&g->arena, "activations", block_size, limit);
    g->grad_enabled = 1;
}

// ---- the gradient pool ----
// A tensor's gradient is needed from the moment its first consumer's
// backward writes to it until its producer's backward has read it; keeping
// all of them to the end of the step would double the memory of a training
// step. Buffers are malloc'd once and reused (best fit by size) from step to
// step, so after the first step nothing is allocated from libc. PyTorch's
// autograd frees gradients at the same point.
struct GradBuf {
    GradBuf *next;
    size_t cap;           // floats
    int in_use;
    float *data;          // 64-byte aligned
};

static float *grad_take(Graph *g, size_t n) {
    GradBuf *best = NULL;
    for (GradBuf *b = g->grad_bufs; b; b = b->next)
        if (!b->in_use && b->cap >= n && (!best || b->cap < best->cap)) best = b;
    if (!best) {
        best = mallocCheck(sizeof *best);
        best->cap = n ? n : 1;
        best->data = aligned_malloc(best->cap * sizeof(float));
        best->next = g->grad_bufs;
        g->grad_bufs = best;
        g->grad_bytes += best->cap * sizeof(float);
    }
    best->in_use = 1;
    g->grad_live += best->cap * sizeof(float);
    if (g->grad_live > g->grad_peak) g->grad_peak = g->grad_live;
    return best->data;
}

static void grad_give(Graph *g, float *data) {
    for (GradBuf *b = g->grad_bufs; b; b = b->next)
        if (b->data == data) {
            b->in_use = 0;
            g->grad_live -= b->cap * sizeof(float);
            return;
        }
    fatal("grad_give: %p is not a pooled gradient", (void *)data);
}

void graph_reset(Graph *g) {
    arena_reset(&g->arena);
    for (GradBuf *b = g->grad_bufs; b; b = b->next) b->in_use = 0;
    g->grad_live = 0;
    g->last = NULL;
    g->n_nodes = 0;
}

void graph_free(Graph *g) {
    arena_free(&g->arena);
    while (g->grad_bufs) {
        GradBuf *next = g->grad_bufs->next;
        aligned_free(g->grad_bufs->data);
        free(g->grad_bufs);
        g->grad_bufs = next;
    }
    g->grad_bytes = g->grad_live = 0;
    g->last = NULL;
    g->n_nodes = 0;
    if (g->sub) {
        graph_free(g->sub);
        free(g->sub);
        g->sub = NULL;
    }
}

size_t shape_size(int ndim, const int *shape) {
    size_t n = 1;
    for (int i = 0; i < ndim; i++) n *= (size_t)shape[i];
    return n;
}

Tensor *tensor_new(Graph *g, int ndim, const int *shape) {
    if (ndim < 1 || ndim > MAX_DIMS)
        fatal("tensor_new: %d dimensions (1..%d allowed)", ndim, MAX_DIMS);
    Tensor *t = arena_alloc(&g->arena, sizeof *t);
    memset(t, 0, sizeof *t);
    t->ndim = ndim;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0) fatal("tensor_new: negative dimension %d", shape[i]);
        t->shape[i] = shape[i];
    }
    t->size = shape_size(ndim, shape);
    t->data = arena_floats(&g->arena, t->size);
    return t;
}

// In no-grad mode nothing is needed later but a block's output: release
// everything allocated since mark m except y, which moves down to the mark.
// The move is safe: y was allocated after m, so its new place is at a lower
// address of the same block or in another block (memmove for the overlap).
// With the tape on, nothing may be released and y is returned as it is.
Tensor *graph_keep(Graph *g, ArenaMark m, Tensor *y) {
    if (g->grad_enabled) return y;
    Tensor t = *y;
    arena_release(&g->arena, m);
    Tensor *k = arena_alloc(&g->arena, sizeof *k);
    *k = t;
    k->data = arena_floats(&g->arena, t.size);
    if (k->data != t.data) memmove(k->data, t.data, t.size * sizeof(float));
    return k;
}

Tensor *tensor4(Graph *g, int n, int c, int h, int w) {
    int s[4] = {n, c, h, w};
    return tensor_new(g, 4, s);
}

Tensor *tensor_zeros(Graph *g, int ndim, const int *shape) {
    Tensor *t = tensor_new(g, ndim, shape);
    memset(t->data, 0, t->size * sizeof(float));
    return t;
}

Tensor *tensor_from(Graph *g, int ndim, const int *shape, const float *data) {
    Tensor *t = tensor_new(g, ndim, shape);
    memcpy(t->data, data, t->size * sizeof(float));
    return t;
}

float *tensor_grad(Graph *g, Tensor *t) {
    if (!t->grad) {
        t->grad = grad_take(g, t->size);
        memset(t->grad, 0, t->size * sizeof(float));
        t->grad_pooled = 1;
    }
    return t->grad;
}

int same_shape(const Tensor *a, const Tensor *b) {
    if (a->ndim != b->ndim) return 0;
    for (int i = 0; i < a->ndim; i++)
        if (a->shape[i] != b->shape[i]) return 0;
    return 1;
}

void shape_str(const Tensor *t, char *buf, size_t n) {
    size_t used = 0;
    used += (size_t)snprintf(buf, n, "(");
    for (int i = 0; i < t->ndim && used < n; i++)
        used += (size_t)snprintf(buf + used, n - used, i ? ",%d" : "%d", t->shape[i]);
    if (used < n) snprintf(buf + used, n - used, ")");
}

static void check_4d(const Tensor *x, const char *op) {
    if (x->ndim != 4) {
        char s[64];
        shape_str(x, s, sizeof s);
        fatal("%s: expected an (N,C,H,W) tensor, got %s", op, s);
    }
}

static int wants_grad(Graph *g, const Tensor *a, const Tensor *b, const Tensor *c) {
    return g->grad_enabled &&
           ((a && a->requires_grad) || (b && b->requires_grad) || (c && c->requires_grad));
}

// push a node; the output now requires a gradient
static TapeNode *record(Graph *g, const char *op, backward_fn bw, Tensor *out,
                        Tensor *a, Tensor *b, Tensor *c) {
    TapeNode *n = arena_alloc(&g->arena, sizeof *n);
    memset(n, 0, sizeof *n);
    n->op = op;
    n->backward = bw;
    n->out = out;
    n->in[0] = a;
    n->in[1] = b;
    n->in[2] = c;
    n->prev = g->last;
    g->last = n;
    g->n_nodes++;
    out->requires_grad = 1;
    return n;
}

// the gradient buffer of input i of a node, or NULL if it needs none
static float *input_grad(Graph *g, TapeNode *n, int i) {
    Tensor *t = n->in[i];
    return (t && t->requires_grad) ? tensor_grad(g, t) : NULL;
}

// Keep an op's saved state (a small struct declared next to its backward)
// in the arena, for the node's backward to read as n->state.
static void save_state(Graph *g, TapeNode *n, const void *state, size_t bytes) {
    void *copy = arena_alloc(&g->arena, bytes);
    memcpy(copy, state, bytes);
    n->state = copy;
}

// an optional tensor's data
static const float *data_of(const Tensor *t) { return t ? t->data : NULL; }

static void tape_backward(Graph *g, Tensor *out);

void graph_seed(Graph *g, Tensor *t, const float *dt) {
    float *gt = tensor_grad(g, t);
    for (size_t i = 0; i < t->size; i++) gt[i] += dt[i];
}

void graph_backward(Graph *g, Tensor *out, const float *dout) {
    float *go = tensor_grad(g, out);
    if (dout) {
        for (size_t i = 0; i < out->size; i++) go[i] += dout[i];
    } else {
        if (out->size != 1) fatal("graph_backward: output has %zu elements; pass dout", out->size);
        go[0] += 1.0f;
    }
    tape_backward(g, out);
}

// ---- double backward ----
// graph_grad: which tensors depend on x (a pass over the tape in creation
// order), then the tape from its last node back, each node on that path
// adding its inputs' gradient tensors through its vjp, which records graph
// ops (appended to the same tape: its first pass ends where it began).
static Tensor *base_of(Tensor *t) {
    while (t->view_of) t = t->view_of;
    return t;
}

void node_vjp_add(Graph *g, Tensor *t, Tensor *d) {
    Tensor *b = base_of(t);
    if (!b->on_path) return;
    if (d->size != b->size) fatal("graph_grad: a gradient of %zu elements for %zu", d->size, b->size);
    if (!same_shape(d, b)) d = reshape(g, d, b->ndim, b->shape);
    b->dgraph = b->dgraph ? add(g, b->dgraph, d) : d;
}

Tensor *graph_grad(Graph *g, Tensor *out, Tensor *x) {
    if (out->size != 1) fatal("graph_grad: the output has %zu elements; it must be a scalar", out->size);
    size_t n = 0;
    for (TapeNode *nd = g->last; nd; nd = nd->prev) n++;
    TapeNode **order = arena_alloc(&g->arena, (n ? n : 1) * sizeof *order);
    size_t k = n;
    for (TapeNode *nd = g->last; nd; nd = nd->prev) order[--k] = nd;
    base_of(x)->on_path = 1;
    for (size_t i = 0; i < n; i++)  // creation order: a node's inputs before it
        for (int j = 0; j < 5; j++)
            if (order[i]->in[j] && base_of(order[i]->in[j])->on_path) order[i]->out->on_path = 1;
    Tensor *o = base_of(out);
    if (!o->on_path) return tensor_zeros(g, x->ndim, x->shape);
    o->dgraph = scale_shift(g, tensor_zeros(g, o->ndim, o->shape), 0.0f, 1.0f);  // d out / d out = 1
    for (size_t i = n; i-- > 0;) {
        TapeNode *nd = order[i];
        Tensor *dy = nd->out->dgraph;
        if (!nd->out->on_path || !dy) continue;
        if (!nd->vjp) fatal("graph_grad: op '%s' has no differentiable backward (vjp)", nd->op);
        nd->vjp(g, nd, dy);
    }
    Tensor *d = base_of(x)->dgraph;
    if (!d) return tensor_zeros(g, x->ndim, x->shape);
    return same_shape(d, x) ? d : reshape(g, d, x->ndim, x->shape);
}

// the tape from its last node back, out->grad seeded
static void tape_backward(Graph *g, Tensor *out) {
    // Nodes run in reverse order of creation, so when a tensor's producer
    // runs, every consumer has already added to its gradient: after the
    // producer, nothing reads it again and the buffer goes back to the pool.
    for (TapeNode *n = g->last; n; n = n->prev) {
        if (!n->out->grad) continue;  // no gradient reached it: nothing to do
        n->backward(g, n);
        if (n->out != out && n->out->grad_pooled) {
            grad_give(g, n->out->grad);
            n->out->grad = NULL;
            n->out->grad_pooled = 0;
        }
    }
}

// ---- checkpoint ----
typedef struct {
    checkpoint_fn fn;
    void *ctx;            // the caller's context, copied into the arena
    Rng rng;              // g->rng before the first run
    int has_rng, n_in;
} Checkpoint;

static void checkpoint_node_backward(Graph *g, TapeNode *n) {
    const Checkpoint *ck = n->state;
    if (!g->sub) {
        g->sub = mallocCheck(sizeof *g->sub);
        graph_init(g->sub, g->arena.block_size, g->arena.limit);
    }
    Graph *sub = g->sub;
    graph_reset(sub);
    Rng rng = ck->rng;
    sub->training = g->training;
    sub->rng = ck->has_rng ? &rng : NULL;
    sub->batch_first = g->batch_first;
    sub->batch_total = g->batch_total;
    // The inputs are leaves of the sub-graph that share data and gradient
    // buffers with the outer inputs: the recomputed ops add into the outer
    // gradients directly, in the order the outer tape would have.
    Tensor *in[5];
    for (int i = 0; i < ck->n_in; i++) {
        in[i] = arena_alloc(&sub->arena, sizeof *in[i]);
        *in[i] = *n->in[i];
        in[i]->grad = input_grad(g, n, i);
        in[i]->grad_pooled = 0;
        in[i]->name = NULL;
    }
    double counted = flops_forward;  // the model's forward FLOPs: the rerun is not counted twice
    Tensor *y = ck->fn(sub, ck->ctx, in);
    flops_forward = counted;
    if (y->size != n->out->size)
        fatal("checkpoint: the second run made %zu elements, the first %zu", y->size, n->out->size);
    y->grad = n->out->grad;   // seeded with the outer gradient, not copied
    y->grad_pooled = 0;
    tape_backward(sub, y);
}

Tensor *checkpoint(Graph *g, checkpoint_fn fn, const void *ctx, size_t ctx_bytes, int n_in,
                   Tensor **in) {
    if (n_in < 1 || n_in > 5) fatal("checkpoint: %d inputs (1 to 5)", n_in);
    if (!g->grad_enabled) return fn(g, ctx, in);
    Checkpoint ck = {.fn = fn, .has_rng = g->rng != NULL, .n_in = n_in};
    if (g->rng) ck.rng = *g->rng;
    ArenaMark m = arena_mark(&g->arena);
    g->grad_enabled = 0;
    Tensor *y = graph_keep(g, m, fn(g, ctx, in));  // the temporaries are freed
    g->grad_enabled = 1;
    ck.ctx = arena_alloc(&g->arena, ctx_bytes);
    memcpy(ck.ctx, ctx, ctx_bytes);
    TapeNode *nd = record(g, "checkpoint", checkpoint_node_backward, y, NULL, NULL, NULL);
    for (int i = 0; i < n_in; i++) nd->in[i] = in[i];
    save_state(g, nd, &ck, sizeof ck);
    return y;
}

// ---------------------------------------------------------------------------
// ---- ops ----
// One section per op, each in the same order: the kernel forward and
// backward on raw pointers (backward accumulates, +=, into gradients and
// skips a NULL one), the plain reference kernels where a fast one needs a
// witness, the tape node's backward, then the graph op on Tensors.
// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// ---- op: convolution ----
// conv2d, conv2d_add (+ per-channel shift + residual), conv2d_relu
// ---------------------------------------------------------------------------

// col (C*K*K, OH*OW): row (c, ky, kx) holds inp[c] shifted by (ky, kx)
typedef struct {
    float *col; const float *img;
    int C, H, W, K, stride, pad, OH, OW;
    size_t ld;            // row stride of col (OH*OW, or more when images share a column block)
} Im2col;

// output columns ox whose input column ox*stride - pad + kx lies in [0, W)
static void valid_cols(int OW, int W, int stride, int pad, int kx, int *lo, int *hi) {
    int a = pad - kx, b = W - 1 + pad - kx;  // need a <= ox*stride <= b
    *lo = a <= 0 ? 0 : (a + stride - 1) / stride;
    *hi = b < 0 ? 0 : b / stride + 1;
    if (*hi > OW) *hi = OW;
    if (*lo > *hi) *lo = *hi;
}

// The columns matrix of a group of G images, never stored: row (c, ky, kx),
// column (i, oy, ox) holds img[i][c][oy*stride - PH + ky][ox*stride - PW + kx]
// (0 outside the image). The GEMM packs its B panels straight from the
// images (an implicit im2col): no matrix K*K times the input's size is
// written and read back, and the threads share the packing.
typedef struct {
    const float *img;     // G images (C, H, W), img_stride floats apart
    size_t img_stride;
    int C, H, W;
    int KH, KW, stride, PH, PW;  // a KH x KW kernel, padding PH rows and PW columns
    int OH, OW;
} ConvCols;

// One row (c, ky, kx) of the columns matrix, decomposed once
typedef struct { const float *plane; int ky, kx, lo, hi; } ConvRow;

static ConvRow conv_row(const ConvCols *v, size_t row) {
    size_t kk = (size_t)v->KH * v->KW;
    ConvRow r;
    r.plane = v->img + (row / kk) * v->H * v->W;
    r.ky = (int)(row % kk) / v->KW;
    r.kx = (int)(row % kk) % v->KW;
    // ox in [lo, hi): inside the image
    valid_cols(v->OW, v->W, v->stride, v->PW, r.kx, &r.lo, &r.hi);
    return r;
}

// d[k * dstride] = cols[row][(i, oy, ox + k)] for k < run, within one output row
static void conv_run(const ConvCols *v, const ConvRow *r, size_t i, int oy, int ox, int run,
                     float *d, size_t dstride) {
    int iy = oy * v->stride - v->PH + r->ky, end = ox + run;
    if (iy < 0 || iy >= v->H) {
        for (int k = 0; k < run; k++, d += dstride) *d = 0.0f;
        return;
    }
    const float *src = r->plane + i * v->img_stride + (size_t)iy * v->W;
    int a = ox > r->lo ? ox : r->lo, b = end < r->hi ? end : r->hi;
    if (a > end) a = end;
    if (b < a) b = a;
    for (int x = ox; x < a; x++, d += dstride) *d = 0.0f;
    if (dstride == 1 && v->stride == 1) {
        memcpy(d, src + a - v->PW + r->kx, (size_t)(b - a) * sizeof(float));
        d += b - a;
    } else {
        for (int x = a; x < b; x++, d += dstride) *d = src[x * v->stride - v->PW + r->kx];
    }
    for (int x = b; x < end; x++, d += dstride) *d = 0.0f;
}

// B = cols, as pack_B with transB 0 (the forward: weight @ cols). Each row
// is walked once across all its panels, a run ending at an output row or a
// panel's edge; no division per element or per run.
static void pack_conv_cols(const void *ctx, float *Bp, size_t p0, size_t kc, size_t j0, size_t n) {
    const ConvCols *v = ctx;
    size_t ohw = (size_t)v->OH * v->OW;
    for (size_t p = 0; p < kc; p++) {
        ConvRow r = conv_row(v, p0 + p);
        size_t i = j0 / ohw, q = j0 % ohw;
        int oy = (int)(q / v->OW), ox = (int)(q % v->OW);
        for (size_t j = 0; j < n;) {
            size_t in_panel = GEMM_NR - j % GEMM_NR, run = (size_t)(v->OW - ox);
            if (run > in_panel) run = in_panel;
            if (run > n - j) run = n - j;
            conv_run(v, &r, i, oy, ox, (int)run,
                     Bp + (j / GEMM_NR) * GEMM_NR * kc + p * GEMM_NR + j % GEMM_NR, 1);
            j += run;
            ox += (int)run;
            if (ox == v->OW) { ox = 0; if (++oy == v->OH) { oy = 0; i++; } }
        }
        if (n % GEMM_NR) {  // the last panel's columns past n
            float *dst = Bp + (n / GEMM_NR) * GEMM_NR * kc + p * GEMM_NR;
            for (size_t j = n % GEMM_NR; j < GEMM_NR; j++) dst[j] = 0.0f;
        }
    }
}

// B = cols^T, as pack_B with transB 1 (the weight gradient: dy @ cols^T):
// panel column j is row j0+jr+j of cols over the pixels p0..p0+kc. The rows
// are copied out contiguously (runs), then transposed 16x16 into the panel.
static void pack_conv_cols_t(const void *ctx, float *Bp, size_t p0, size_t kc, size_t j0,
                             size_t n) {
    const ConvCols *v = ctx;
    size_t ohw = (size_t)v->OH * v->OW;
    size_t i0 = p0 / ohw, q0 = p0 % ohw;
    int oy0 = (int)(q0 / v->OW), ox0 = (int)(q0 % v->OW);
    float rows[GEMM_NR * GEMM_KC];  // (nr, kc): rows of cols
    for (size_t jr = 0; jr < n; jr += GEMM_NR) {
        size_t nr = n - jr < GEMM_NR ? n - jr : GEMM_NR;
        for (size_t j = 0; j < nr; j++) {
            ConvRow r = conv_row(v, j0 + jr + j);
            size_t i = i0;
            int oy = oy0, ox = ox0;
            for (size_t p = 0; p < kc;) {
                size_t run = (size_t)(v->OW - ox);
                if (run > kc - p) run = kc - p;
                conv_run(v, &r, i, oy, ox, (int)run, rows + j * kc + p, 1);
                p += run;
                ox += (int)run;
                if (ox == v->OW) { ox = 0; if (++oy == v->OH) { oy = 0; i++; } }
            }
        }
        transpose_to_panel(Bp + jr * kc, rows, kc, nr, kc);
    }
}

// the adjoint of im2col: img += fold(col); a thread owns whole channels
static void col2im_range(void *arg, size_t c0, size_t c1) {
    const Im2col *a = arg;
    float *img = (float *)a->img;
    for (size_t c = c0; c < c1; c++) {
        float *plane = img + c * (size_t)a->H * a->W;
        for (int ky = 0; ky < a->K; ky++)
            for (int kx = 0; kx < a->K; kx++) {
                const float *src = a->col + ((c * a->K + ky) * a->K + kx) * a->ld;
                int lo, hi;
                valid_cols(a->OW, a->W, a->stride, a->pad, kx, &lo, &hi);
                for (int oy = 0; oy < a->OH; oy++) {
                    int iy = oy * a->stride - a->pad + ky;
                    if (iy < 0 || iy >= a->H) continue;
                    float *drow = plane + (size_t)iy * a->W - a->pad + kx;
                    const float *sr = src + (size_t)oy * a->OW;
                    if (a->stride == 1) for (int ox = lo; ox < hi; ox++) drow[ox] += sr[ox];
                    else for (int ox = lo; ox < hi; ox++) drow[ox * a->stride] += sr[ox];
                }
            }
    }
}

static int conv_out_size(int in, int k, int stride, int pad) {
    return (in + 2 * pad - k) / stride + 1;
}
static int conv_is_pointwise(int K, int stride, int pad) {
    return K == 1 && stride == 1 && pad == 0;
}

// Images per GEMM. A GEMM per image is poorly shaped when the maps are small
// (8x8: 64 columns, two register tiles; VGG at 2x2: 4 columns in a 32-wide
// tile), so small images are processed in groups whose columns sit side by
// side: col (rows, G*OH*OW), one GEMM, then the result is scattered back to
// NCHW. The group size depends only on the shapes, never on the thread
// count, so results stay bitwise the same for any number of threads.
static int conv_group(size_t ohw, int N) {
    size_t g = (1024 + ohw - 1) / ohw;
    return g > (size_t)N ? N : (int)g;
}

// (N,C,P) planes <-> (C, G*P) column blocks, for a group of G images
typedef struct { float *blk; float *nchw; size_t C, P; int G, add; } Regroup;

static void gather_range(void *arg, size_t c0, size_t c1) {  // blk[c][i*P+p] = nchw[i][c][p]
    const Regroup *r = arg;
    for (size_t c = c0; c < c1; c++)
        for (int i = 0; i < r->G; i++)
            memcpy(r->blk + c * r->G * r->P + i * r->P, r->nchw + ((size_t)i * r->C + c) * r->P,
                   r->P * sizeof(float));
}

static void scatter_range(void *arg, size_t c0, size_t c1) {  // nchw[i][c][p] (+)= blk[c][i*P+p]
    const Regroup *r = arg;
    for (size_t c = c0; c < c1; c++)
        for (int i = 0; i < r->G; i++) {
            const float *src = r->blk + c * r->G * r->P + i * r->P;
            float *dst = r->nchw + ((size_t)i * r->C + c) * r->P;
            if (r->add) for (size_t p = 0; p < r->P; p++) dst[p] += src[p];
            else memcpy(dst, src, r->P * sizeof(float));
        }
}

static void regroup(int scatter, float *blk, float *nchw, size_t C, size_t P, int G, int add) {
    Regroup r = {blk, nchw, C, P, G, add};
    parallel_for(C, 1, scatter ? scatter_range : gather_range, &r);
}

// The convolution's additive terms, per (image, output channel) plane:
//   out[n,oc,:] = blk[oc][i*P:(i+1)*P] (or 0 without blk) + bias[oc] + shift[n,oc] +
//   residual[n,oc,:]
// with n = n0 + i. Without blk it initialises the output before a GEMM that
// accumulates; with blk it is the scatter of a group's GEMM result.
typedef struct {
    const float *blk; float *out;
    const float *bias, *shift, *residual;
    size_t OC, P; int G, n0;
} ConvEpilogue;

static void conv_epilogue_range(void *arg, size_t k0, size_t k1) {
    const ConvEpilogue *e = arg;
    for (size_t k = k0; k < k1; k++) {
        size_t i = k / e->OC, oc = k % e->OC, r = ((size_t)e->n0 + i) * e->OC + oc;
        float c = (e->bias ? e->bias[oc] : 0.0f) + (e->shift ? e->shift[r] : 0.0f);
        float *dst = e->out + r * e->P;
        const float *src = e->blk ? e->blk + oc * e->G * e->P + i * e->P : NULL;
        const float *res = e->residual ? e->residual + r * e->P : NULL;
        if (src && res) for (size_t p = 0; p < e->P; p++) dst[p] = src[p] + (res[p] + c);
        else if (src)   for (size_t p = 0; p < e->P; p++) dst[p] = src[p] + c;
        else if (res)   for (size_t p = 0; p < e->P; p++) dst[p] = res[p] + c;
        else            for (size_t p = 0; p < e->P; p++) dst[p] = c;
    }
}

// A "same" convolution: stride 1, odd K, pad (K-1)/2, so the output has the input's size
static int conv_is_same(int K, int stride, int pad) {
    return stride == 1 && K % 2 == 1 && pad == (K - 1) / 2 && K > 1;
}

// Same convolutions run on padded planes (below) unless the border they
// compute and drop is more than 35% of the map: from 7x7 up (31% at 7x7,
// 56% at 4x4). Measured (Intel Xeon, 1 thread): with 7x7 on planes the
// demo step is 5% faster, with 4x4 and 2x2 on planes LPIPS at 32 is 10%
// slower than on the GEMM path. In bf16 (gemm_set_precision) they run on
// bf16 planes (planes_conv_bf16); the Winograd path is off, its transforms
// would round other operands than the convolution's. On AMX tiles they take
// the GEMM path: the planes' tile is AVX-512's, the tiles read the GEMM's
// blocks (not yet measured against planes in the emulation: no machine of
// ours has shown its AMX yet).
static int conv_on_planes(int H, int W, int K, int stride, int pad) {
    return conv_is_same(K, stride, pad) && !gemm_use_amx &&
           (double)(H + pad) * (W + pad) <= 1.35 * (double)H * W;
}

// ---- the padded-plane path: "same" convolutions (stride 1, odd K, pad (K-1)/2) ----
// With channels outermost, the images of a channel one after another, each
// image row followed by `pad` zeros and each image by `pad` zero rows, every
// tap of the kernel is one constant offset: the zeros after a row are the
// right border of that row and the left border of the next, the zero rows
// after an image the bottom of that image and the top of the next. Output
// position p (the same layout) reads tap (c, ky, kx) at
//     in[c * ld + lead + p + (ky - pad) * W1 + (kx - pad)],   W1 = W + pad,
// contiguous in p, so the micro-kernel loads its B vectors straight from the
// input: no im2col, no packed B panels (which, with 32-64 output channels,
// cost as much as the GEMM they fed). Outputs at border positions are
// computed and dropped: 7%, 13% and 23% more work at 28, 14 and 7 pixels.
// The weight gradient is the same sum read the other way (a GEMM over p,
// planes_dweight), the input gradient the same convolution of dy with the flipped
// kernel. Every output is one thread's, summed in a fixed order.
// The register tile: PL_MR output channels by PL_NV vectors of positions.
// 8 x 3 vectors with 32 registers: the U-Net's 32, 64, 128 channels are
// whole panels, and a tap costs 3 loads and 8 broadcasts for 24 FMAs.
#if VLEN == 1
#define PL_MR 4
#define PL_NV 4
#elif VLEN == 8               // AVX2: 16 registers
#define PL_MR 4
#define PL_NV 3
#else
#define PL_MR 8
#define PL_NV 3
#endif
#define PL_NR (PL_NV * VLEN)

typedef struct {
    int N, C, H, W, pad;
    size_t W1, plane, npos;  // positions per row, per image, in all
    size_t lead, ld;         // zeros before position 0; floats per channel
} ConvPlanes;

static ConvPlanes planes_of(int N, int C, int H, int W, int pad) {
    ConvPlanes g = {.N = N, .C = C, .H = H, .W = W, .pad = pad};
    g.W1 = (size_t)W + pad;
    g.plane = ((size_t)H + pad) * g.W1;
    g.npos = (size_t)N * g.plane;
    g.lead = pad * g.W1 + pad;  // the farthest tap back; and forward, past the last tile
    g.ld = g.lead + (g.npos + PL_NR - 1) / PL_NR * PL_NR + g.lead;
    return g;
}

// Images whose planes are made at once: as many as keep one planes buffer
// within conv_planes_max_floats (16 MiB), at least one, so the scratch of a
// convolution of large maps stays bounded (LPIPS at 224). The shapes alone
// decide it, never the thread count.
size_t conv_planes_max_floats = (size_t)4 << 20;
static int planes_images(int N, int C, int OC, int H, int W, int pad) {
    size_t per = (size_t)(C > OC ? C : OC) * ((size_t)H + pad) * ((size_t)W + pad);
    size_t g = conv_planes_max_floats / per;
    return g < 1 ? 1 : g > (size_t)N ? N : (int)g;
}

// NCHW <-> planes, a channel per item
typedef struct {
    float *planes; float *nchw;
    const ConvPlanes *g;
    // from_planes: nchw[n,c] = planes + bias[c] + shift[n,c] + residual[n,c], or += planes (add)
    const float *bias, *shift, *residual;
    int add;
} ConvPlanesCopy;

static void to_planes_range(void *arg, size_t c0, size_t c1) {
    const ConvPlanesCopy *t = arg;
    const ConvPlanes *g = t->g;
    for (size_t c = c0; c < c1; c++) {
        float *d = t->planes + c * g->ld;
        memset(d, 0, g->lead * sizeof(float));
        d += g->lead;
        for (int n = 0; n < g->N; n++) {
            const float *s = t->nchw + ((size_t)n * g->C + c) * g->H * g->W;
            for (int y = 0; y < g->H; y++, d += g->W1, s += g->W) {
                memcpy(d, s, (size_t)g->W * sizeof(float));
                memset(d + g->W, 0, (size_t)g->pad * sizeof(float));
            }
            memset(d, 0, (size_t)g->pad * g->W1 * sizeof(float));
            d += (size_t)g->pad * g->W1;
        }
        memset(d, 0, (g->ld - g->lead - g->npos) * sizeof(float));
    }
}

static void to_planes(float *planes, const float *nchw, const ConvPlanes *g) {
    ConvPlanesCopy t = {.planes = planes, .nchw = (float *)nchw, .g = g};
    parallel_for((size_t)g->C, 1, to_planes_range, &t);
}

static void from_planes_range(void *arg, size_t c0, size_t c1) {
    const ConvPlanesCopy *t = arg;
    const ConvPlanes *g = t->g;
    size_t hw = (size_t)g->H * g->W;
    for (size_t c = c0; c < c1; c++)
        for (int n = 0; n < g->N; n++) {
            size_t r = (size_t)n * g->C + c;
            const float *s = t->planes + c * g->ld + g->lead + (size_t)n * g->plane;
            float *d = t->nchw + r * hw;
            const float *res = t->residual ? t->residual + r * hw : NULL;
            float k = (t->bias ? t->bias[c] : 0.0f) + (t->shift ? t->shift[r] : 0.0f);
            for (int y = 0; y < g->H; y++, s += g->W1, d += g->W) {
                if (t->add) for (int x = 0; x < g->W; x++) d[x] += s[x];
                else if (res) for (int x = 0; x < g->W; x++) d[x] = s[x] + (res[x] + k);
                else for (int x = 0; x < g->W; x++) d[x] = s[x] + k;
                if (res) res += g->W;
            }
        }
}

// off[(c * K + ky) * K + kx]: tap (c, ky, kx) relative to the output position
static void planes_offsets(ptrdiff_t *off, const ConvPlanes *g, int K) {
    for (int c = 0; c < g->C; c++)
        for (int ky = 0; ky < K; ky++)
            for (int kx = 0; kx < K; kx++)
                off[((size_t)c * K + ky) * K + kx] = (ptrdiff_t)(c * g->ld) +
                                                     (ptrdiff_t)(ky - g->pad) * (ptrdiff_t)g->W1 +
                                                     (kx - g->pad);
}

// the register tile: c (mr <= MR rows, NR) (+)= A rows (mr, kc) @ B, B row p
// = in + off[p]. A is read where it lies: element (i, p) at a[i * lda +
// aoff[p]], so per tap the MR broadcasts come from MR rows walked in order
// (streams the prefetcher follows) and no packed copy of the weights is
// made; aoff also reads the flipped, transposed kernel of the input gradient
// straight from the weights. Rows past mr repeat the last one, not stored.
static void planes_micro_kernel(size_t kc, const float *a, size_t lda, const ptrdiff_t *aoff,
                                int mr, const float *in, const ptrdiff_t *off, float *c,
                                size_t ldc, int accumulate) {
    const float *row[PL_MR];
    vfloat acc[PL_MR][PL_NV];
    UNROLL
    for (int i = 0; i < PL_MR; i++) {
        row[i] = a + (size_t)(i < mr ? i : mr - 1) * lda;
        UNROLL
        for (int j = 0; j < PL_NV; j++) acc[i][j] = v_zero();
    }
    for (size_t p = 0; p < kc; p++) {
        const float *b = in + off[p];
        ptrdiff_t ap = aoff[p];
        vfloat bv[PL_NV];
        UNROLL
        for (int j = 0; j < PL_NV; j++) bv[j] = v_load(b + j * VLEN);
        UNROLL
        for (int i = 0; i < PL_MR; i++) {
            vfloat ai = v_set1(row[i][ap]);
            UNROLL
            for (int j = 0; j < PL_NV; j++) acc[i][j] = v_fma(ai, bv[j], acc[i][j]);
        }
    }
    UNROLL
    for (int i = 0; i < PL_MR; i++)
        if (i < mr)
            UNROLL
            for (int j = 0; j < PL_NV; j++) {
                float *cp = c + i * ldc + j * VLEN;
                v_store(cp, accumulate ? v_add(v_load(cp), acc[i][j]) : acc[i][j]);
            }
}

// out planes (M, ld) = A (M, depth) * taps of in planes, A(i, p) = A[i * lda
// + aoff[p]], a tile of NR positions per item
typedef struct {
    float *out; const float *in, *A;
    const ptrdiff_t *off, *aoff;
    size_t M, depth, lda, ld, lead;
} PlanesConv;

static void planes_conv_range(void *arg, size_t t0, size_t t1) {
    const PlanesConv *t = arg;
    for (size_t tp = t0; tp < t1; tp++) {
        size_t p = tp * PL_NR;
        const float *in = t->in + t->lead + p;
        for (size_t pc = 0; pc < t->depth; pc += GEMM_KC) {
            size_t kc = t->depth - pc < GEMM_KC ? t->depth - pc : GEMM_KC;
            for (size_t ir = 0; ir < t->M; ir += PL_MR) {
                int mr = t->M - ir < PL_MR ? (int)(t->M - ir) : PL_MR;
                planes_micro_kernel(kc, t->A + ir * t->lda, t->lda, t->aoff + pc, mr, in,
                                    t->off + pc, t->out + ir * t->ld + t->lead + p, t->ld, pc > 0);
            }
        }
    }
}

// ---- bf16 on the planes (gemm_set_precision) ----
// The same convolution with its operands in bf16: the input planes as
// channel pairs, word (q, position) = bf16 of channels 2q and 2q + 1 there
// (VDPBF16PS's pairs: the inner dimension runs over (channel pair, tap)),
// and the weights as the same pairs, (M, pairs * K * K) words in order. The
// emulation rounds copies of both and runs the float32 kernel on them.
#ifdef HAVE_DPBF16
// the pair planes' buffer (planes_bf16), grown to `bytes`
static void *planes_bf16_buffer(size_t bytes) {
    if (bytes > planes_bf16_cap) {
        aligned_free(planes_bf16);
        planes_bf16 = aligned_malloc(bytes);
        planes_bf16_cap = bytes;
    }
    return planes_bf16;
}

static void planes_weights_bf16(uint16_t *a2, const float *weight, size_t M, int C, int K,
                                int flip) {  // A(m, (c, tap)) in pairs over c
    size_t kk = (size_t)K * K, pairs = ((size_t)C + 1) / 2;
    for (size_t m = 0; m < M; m++)
        for (size_t q = 0; q < pairs; q++)
            for (size_t k = 0; k < kk; k++)
                for (size_t h = 0; h < 2; h++) {
                    size_t c = 2 * q + h;
                    float w = c >= (size_t)C ? 0.0f
                              : flip ? weight[(c * M + m) * kk + (kk - 1 - k)]
                                     : weight[(m * C + c) * kk + k];
                    a2[((m * pairs + q) * kk + k) * 2 + h] = bf16_bits(w);
                }
}

typedef struct { uint16_t *x2; const float *in; const ConvPlanes *g; } PlanesPairs;


static void planes_pairs_range(void *arg, size_t q0, size_t q1) {  // item: a channel pair
    const PlanesPairs *t = arg;
    size_t ld = t->g->ld;
    for (size_t q = q0; q < q1; q++) {
        const float *first = t->in + 2 * q * ld;
        int second = 2 * q + 1 < (size_t)t->g->C;
        uint16_t *d = t->x2 + 2 * q * ld;
        size_t p = 0;
#if VLEN == 16  // 16 words at a time, as bf16_pair_panel
        for (; p + 16 <= ld; p += 16) {
            __m512i lo = bf16_bits16(_mm512_loadu_ps(first + p));
            __m512i hi = second ? bf16_bits16(_mm512_loadu_ps(first + ld + p)) : _mm512_setzero_si512();
            _mm512_storeu_si512(d + 2 * p, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
#endif
        for (; p < ld; p++) {
            d[2 * p] = bf16_bits(first[p]);
            d[2 * p + 1] = second ? bf16_bits(first[ld + p]) : 0;
        }
    }
}

// planes_micro_kernel's tile on pairs: c (mr, NR) (+)= A2 rows (mr, kc pairs)
// @ B, B's pair p the 16-word vectors at x2 + 2 * off[p]
__attribute__((target("avx512f,avx512bw,avx512bf16")))
static void planes_micro_kernel_bf16(size_t kc, const uint16_t *a, size_t lda, int mr,
                                     const uint16_t *x2, const ptrdiff_t *off, float *c,
                                     size_t ldc, int accumulate) {
    const uint16_t *row[PL_MR];
    __m512 acc[PL_MR][PL_NV];
    UNROLL
    for (int i = 0; i < PL_MR; i++) {
        row[i] = a + (size_t)(i < mr ? i : mr - 1) * lda * 2;
        UNROLL
        for (int j = 0; j < PL_NV; j++) acc[i][j] = _mm512_setzero_ps();
    }
    for (size_t p = 0; p < kc; p++) {
        const uint16_t *b = x2 + 2 * off[p];
        __m512bh bv[PL_NV];
        UNROLL
        for (int j = 0; j < PL_NV; j++) bv[j] = (__m512bh)_mm512_loadu_si512(b + 32 * j);
        UNROLL
        for (int i = 0; i < PL_MR; i++) {
            int32_t pair;
            memcpy(&pair, row[i] + 2 * p, sizeof pair);
            __m512bh ai = (__m512bh)_mm512_set1_epi32(pair);
            UNROLL
            for (int j = 0; j < PL_NV; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], ai, bv[j]);
        }
    }
    UNROLL
    for (int i = 0; i < PL_MR; i++)
        if (i < mr)
            UNROLL
            for (int j = 0; j < PL_NV; j++) {
                float *cp = c + i * ldc + j * 16;
                _mm512_storeu_ps(cp, accumulate ? _mm512_add_ps(_mm512_loadu_ps(cp), acc[i][j])
                                                : acc[i][j]);
            }
}

typedef struct {
    float *out; const uint16_t *x2, *a2;
    const ptrdiff_t *off;
    size_t M, depth, ld, lead;  // depth: pairs * K * K
} PlanesConvBf16;

static void planes_conv_bf16_range(void *arg, size_t t0, size_t t1) {
    const PlanesConvBf16 *t = arg;
    for (size_t tp = t0; tp < t1; tp++) {
        size_t p = tp * PL_NR;
        const uint16_t *x2 = t->x2 + 2 * (t->lead + p);
        for (size_t pc = 0; pc < t->depth; pc += GEMM_KC) {
            size_t kc = t->depth - pc < GEMM_KC ? t->depth - pc : GEMM_KC;
            for (size_t ir = 0; ir < t->M; ir += PL_MR) {
                int mr = t->M - ir < PL_MR ? (int)(t->M - ir) : PL_MR;
                planes_micro_kernel_bf16(kc, t->a2 + (ir * t->depth + pc) * 2, t->depth, mr, x2,
                                         t->off + pc, t->out + ir * t->ld + t->lead + p, t->ld,
                                         pc > 0);
            }
        }
    }
}

static void planes_conv_bf16(float *out, const float *in, const float *weight, size_t M,
                             const ConvPlanes *g, int K, int flip) {
    size_t kk = (size_t)K * K, pairs = ((size_t)g->C + 1) / 2, depth = pairs * kk;
    uint16_t *a2 = mallocCheck(M * depth * 2 * sizeof *a2);
    uint16_t *x2 = planes_bf16_buffer(pairs * g->ld * 2 * sizeof(uint16_t));
    ptrdiff_t *off = mallocCheck(depth * sizeof *off);
    planes_weights_bf16(a2, weight, M, g->C, K, flip);
    PlanesPairs pp = {x2, in, g};
    parallel_for(pairs, 1, planes_pairs_range, &pp);
    for (size_t q = 0; q < pairs; q++)  // in words of x2: pair q's plane, then the tap
        for (int ky = 0; ky < K; ky++)
            for (int kx = 0; kx < K; kx++)
                off[(q * K + ky) * K + kx] = (ptrdiff_t)(q * g->ld) +
                                             (ptrdiff_t)(ky - g->pad) * (ptrdiff_t)g->W1 + (kx - g->pad);
    PlanesConvBf16 t = {out, x2, a2, off, M, depth, g->ld, g->lead};
    parallel_for((g->ld - 2 * g->lead) / PL_NR, 1, planes_conv_bf16_range, &t);
    free(off);
    free(a2);
}
#endif

static void planes_conv_fp32(float *out, const float *in, const float *weight, size_t M,
                             const ConvPlanes *g, int K, int flip);

// out planes (M channels) = the taps of in planes (g: its geometry, K x K)
// against weights: flip 0, weight (M, C, K, K), the forward; flip 1, weight
// (C, M, K, K) read as its flipped transpose A(m, (c, ky, kx)) =
// weight[c, m, K-1-ky, K-1-kx], the input gradient. In bf16: on pairs
// (VDPBF16PS), or the float32 kernel on rounded copies (the emulation).
static void planes_conv(float *out, const float *in, const float *weight, size_t M,
                        const ConvPlanes *g, int K, int flip) {
#ifdef HAVE_DPBF16
    if (gemm_use_dpbf16) { planes_conv_bf16(out, in, weight, M, g, K, flip); return; }
#endif
    if (gemm_prec == GEMM_FP32) { planes_conv_fp32(out, in, weight, M, g, K, flip); return; }
    size_t nw = M * (size_t)g->C * K * K, nx = (size_t)g->C * g->ld;
    float *w = mallocCheck(nw * sizeof *w), *x = aligned_malloc(nx * sizeof *x);
    bf16_round_array(w, weight, nw);
    bf16_round_array(x, in, nx);
    planes_conv_fp32(out, x, w, M, g, K, flip);
    aligned_free(x);
    free(w);
}

static void planes_conv_fp32(float *out, const float *in, const float *weight, size_t M,
                             const ConvPlanes *g, int K, int flip) {
    size_t kk = (size_t)K * K, depth = (size_t)g->C * kk;
    ptrdiff_t *off = mallocCheck(2 * depth * sizeof *off), *aoff = off + depth;
    planes_offsets(off, g, K);
    for (size_t p = 0; p < depth; p++)
        aoff[p] = flip ? (ptrdiff_t)((p / kk) * M * kk + (kk - 1 - p % kk)) : (ptrdiff_t)p;
    PlanesConv t = {out, in, weight, off, aoff, M, depth, flip ? kk : depth, g->ld, g->lead};
    parallel_for((g->ld - 2 * g->lead) / PL_NR, 1, planes_conv_range, &t);
    free(off);
}

// dW (M, C*K*K) += sum_p dy[m][p] x[p + off_k]: the GEMM dy planes (M, P) @
// taps (P, C*K*K), P every plane position (dy is zero at the border ones).
// Tap k over positions p0.. is one contiguous run of x's planes, so a B
// panel is packed from plain copies. Measured (AMD EPYC Zen 5, 1 and 2
// threads): twice the speed of the inner-product kernel this replaced, whose
// unaligned loads from 10 rows at a time ran from L2 (62-88 GFLOP/s on one
// thread against 90-180 for this GEMM, at 32 to 512 channels).
typedef struct {
    const float *x;       // the planes, from position 0
    const ptrdiff_t *off; // planes_offsets
} PlanesTaps;

static void pack_planes_taps_t(const void *ctx, float *Bp, size_t p0, size_t kc, size_t j0,
                               size_t n) {
    const PlanesTaps *v = ctx;
    float rows[GEMM_NR * GEMM_KC];  // (nr, kc): the taps' runs
    for (size_t jr = 0; jr < n; jr += GEMM_NR) {
        size_t nr = n - jr < GEMM_NR ? n - jr : GEMM_NR;
        for (size_t j = 0; j < nr; j++)
            memcpy(rows + j * kc, v->x + v->off[j0 + jr + j] + p0, kc * sizeof(float));
        transpose_to_panel(Bp + jr * kc, rows, kc, nr, kc);
    }
}

#ifdef HAVE_DPBF16
// pack_planes_taps_t for VDPBF16PS, from x's planes in bf16 (x16, uint16
// per value): a tap's run of kc positions is kc / 2 words, each the pair
// (p, p + 1) that VDPBF16PS multiplies, so the words are transposed into the
// pair panel as they are (half the bytes of the float32 copy, no lowering)
static void pack_planes_taps_pairs(const void *ctx, float *Bp, size_t p0, size_t kc, size_t j0,
                                   size_t n) {
    const PlanesTaps *v = ctx;
    const uint16_t *x16 = (const uint16_t *)v->x;
    size_t words = (kc + 1) / 2;
    float rows[GEMM_NR * GEMM_KC / 2];  // (nr, words): the taps' runs, as 32-bit words
    for (size_t jr = 0; jr < n; jr += GEMM_NR) {
        size_t nr = n - jr < GEMM_NR ? n - jr : GEMM_NR;
        for (size_t j = 0; j < nr; j++) {
            uint16_t *r = (uint16_t *)(rows + j * words);
            memcpy(r, x16 + v->off[j0 + jr + j] + p0, kc * sizeof(uint16_t));
            if (kc % 2) r[kc] = 0;  // an odd depth's last pair: (p, 0)
        }
        transpose_to_panel(Bp + jr * words, rows, words, nr, words);
    }
}
#endif

// dw (M, C*K*K) += dy planes (M channels) against the taps of x planes (g)
static void planes_dweight(float *dw, const float *dy, const float *x, size_t M, const ConvPlanes *g,
                           int K) {
    size_t depth = (size_t)g->C * K * K;
    ptrdiff_t *off = mallocCheck(depth * sizeof *off);
    planes_offsets(off, g, K);
#ifdef HAVE_DPBF16
    if (gemm_use_dpbf16) {  // x's planes in bf16 once, then B's pair panels straight from them
        uint16_t *x16 = planes_bf16_buffer((size_t)g->C * g->ld * sizeof(uint16_t));
        bf16_bits_array(x16, x, (size_t)g->C * g->ld);
        PlanesTaps v = {(const float *)(x16 + g->lead), off};
        size_t P = g->ld - 2 * g->lead;
        GemmTask t = {.M = M, .N = depth, .K = P, .A = dy + g->lead, .lda = g->ld, .ldc = depth,
                      .accumulate = 1, .C = dw, .split_n = 1, .pack_b = pack_planes_taps_pairs,
                      .pack_b_ctx = &v, .b_lowered = 1};
        gemm_run(&t);
        free(off);
        return;
    }
#endif
    PlanesTaps v = {x + g->lead, off};
    sgemm_pack_b(0, M, depth, g->ld - 2 * g->lead, dy + g->lead, g->ld, pack_planes_taps_t, &v, 1,
                 dw, depth);
    free(off);
}

// ---- the Winograd path: 3x3 same convolutions as F(2x2, 3x3) ----
// Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR
// 2016), Sec. 4.1. A 2x2 tile of the output is
//     Y = A^T [ (G g G^T) ⊙ (B^T d B) ] A
// for the 3x3 kernel g and the 4x4 input patch d that starts one pixel up and
// left of the tile (zeros outside the image). Summed over the input channels,
// each of the 16 points xi of the 4x4 transformed tile is one GEMM over tiles,
//     M_xi (OC, P) = U_xi (OC, C) @ V_xi (C, P),    U = G g G^T, V = B^T d B,
// so a same 3x3 convolution costs 4 multiplies per output and channel instead
// of 9 (2.25x fewer), plus transforms that only add. The backward is this
// computation's exact adjoint, with DY = A dy A^T (the tile's output gradient
// carried back through A):
//     dV_xi = U_xi^T @ DY_xi,  the input patch's gradient B dV B^T (the
//                               patches overlap: each pixel sums its four)
//     dU_xi = DY_xi @ V_xi^T,  the kernel's gradient G^T dU G (over tiles
//                               and images: the GEMM's inner dimension)
// The matrices' entries are 0, ±1 and ±1/2 (Lavin & Gray's F(2x2,3x3)), so the
// rounding is a few ulps from the direct sum's (the tests' 1e-4 holds with
// room); every output is one GEMM element or one thread's transform, summed in
// a fixed order, so results do not depend on the thread count.
// Used for stride 1, pad 1, at least WINO_MIN_CH channels in and out and
// WINO_MIN_POSITIONS output positions in the batch: with fewer channels the
// transforms cost more than the multiplies they save (the make demo model's
// 64 channels: 8-20% slower), with fewer positions the kernel's transform
// (16/9 of the weights, written and read back) does (LDDGAN's 4x4 maps at
// batch 8). Measured on an AMD EPYC (Zen 5), 2 threads: LDDGAN's G step 15%
// faster, the Cas-DM ch128 step 10-15%, a 128-channel 32x32 convolution the
// same as on planes. Images are grouped as planes_images groups them.
int conv_winograd = 1;
#define WINO_MIN_CH 128
#define WINO_MIN_POSITIONS 512

static int conv_on_winograd(int N, int C, int OC, int H, int W, int K, int stride, int pad) {
    return conv_winograd && gemm_prec == GEMM_FP32 && K == 3 && stride == 1 && pad == 1 &&
           C >= WINO_MIN_CH &&
           OC >= WINO_MIN_CH && H >= 2 && W >= 2 &&
           (size_t)N * H * W >= WINO_MIN_POSITIONS;
}

typedef struct {
    int N, C, OC, H, W;
    int TH, TW;          // tiles per column and row: ceil(H / 2), ceil(W / 2)
    size_t tiles;        // per image
} Wino;

static Wino wino_of(int N, int C, int OC, int H, int W) {
    Wino z = {N, C, OC, H, W, (H + 1) / 2, (W + 1) / 2, 0};
    z.tiles = (size_t)z.TH * z.TW;
    return z;
}

// images per pass: as many as keep V, M (or DY) within conv_planes_max_floats
static int wino_images(const Wino *z) {
    size_t per = 16 * (size_t)(z->C > z->OC ? z->C : z->OC) * z->tiles;
    size_t g = conv_planes_max_floats / per;
    return g < 1 ? 1 : g > (size_t)z->N ? z->N : (int)g;
}

// The 16 matrices of a transform lie one after another, each 16 floats
// longer than its elements: with a power-of-two size (256 x 256 channels)
// the 16 points of one tile would otherwise fall in the same cache set and
// evict each other at every store (a transform then cost more than its GEMMs)
static size_t wino_stride(size_t elements) { return elements + 16; }

// U_xi = (G g G^T)_xi, G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1], written
// as the GEMM's packed A (gemm_a_packed_index) of M_xi = U_xi V_xi, rows oc,
// or `transposed` as that of dV_xi = U_xi^T DY_xi, rows c. Written straight
// in the panels, the 16 matrices skip the GEMMs' packing pass (a transpose
// for the forward: 8% of LDDGAN's G step was packing).
typedef struct { float *U; const float *w; size_t OC, C; int transposed; } WinoKernel;

static size_t wino_kernel_floats(size_t OC, size_t C, int transposed) {
    return wino_stride(gemm_rows_padded(transposed ? C : OC) * (transposed ? OC : C));
}

// The 16 values of G g G^T for one panel's MR kernels at once: g[k][q] is
// tap k of the panel's kernel q (0 for the padding rows), u[xi * n + q] the
// result. Loops over q, so they vectorise and each store is a panel's run.
static void wino_kernel_panel(float *u, size_t n, float g[9][GEMM_MR]) {
    float r[4][3][GEMM_MR];  // G g: the rows
    for (int k = 0; k < 3; k++)
        for (int q = 0; q < GEMM_MR; q++) {
            float g0 = g[k][q], g1 = g[3 + k][q], g2 = g[6 + k][q];
            r[0][k][q] = g0;
            r[1][k][q] = 0.5f * (g0 + g1 + g2);
            r[2][k][q] = 0.5f * (g0 - g1 + g2);
            r[3][k][q] = g2;
        }
    for (int i = 0; i < 4; i++)  // (G g) G^T: the columns
        for (int q = 0; q < GEMM_MR; q++) {
            float r0 = r[i][0][q], r1 = r[i][1][q], r2 = r[i][2][q];
            u[(i * 4 + 0) * n + q] = r0;
            u[(i * 4 + 1) * n + q] = 0.5f * (r0 + r1 + r2);
            u[(i * 4 + 2) * n + q] = 0.5f * (r0 - r1 + r2);
            u[(i * 4 + 3) * n + q] = r2;
        }
}

// Items: panels of MR rows of the packed A (output channels for the forward,
// input channels transposed), each for every k (the other channel).
static void wino_kernel_range(void *arg, size_t i0, size_t i1) {
    const WinoKernel *t = arg;
    size_t OC = t->OC, C = t->C, M = t->transposed ? C : OC, K = t->transposed ? OC : C;
    size_t n = wino_kernel_floats(OC, C, t->transposed);
    float g[9][GEMM_MR];
    for (size_t item = i0; item < i1; item++)
        for (size_t k = 0; k < K; k++) {
            for (int q = 0; q < GEMM_MR; q++) {
                size_t i = item * GEMM_MR + (size_t)q;
                const float *w = t->w + (t->transposed ? k * C + i : i * C + k) * 9;
                for (int tap = 0; tap < 9; tap++) g[tap][q] = i < M ? w[tap] : 0.0f;
            }
            wino_kernel_panel(t->U + gemm_a_packed_index(item * GEMM_MR, k, M, K), n, g);
        }
}

// all 16 U_xi, their padding rows included
static void wino_kernel(float *U, const float *weight, size_t OC, size_t C, int transposed) {
    WinoKernel k = {U, weight, OC, C, transposed};
    parallel_for(gemm_rows_padded(transposed ? C : OC) / GEMM_MR, 1, wino_kernel_range, &k);
}

// dw[oc][c] += G^T dU G, the adjoint of the kernel transform
typedef struct { float *dw; const float *dU; size_t OC, C; } WinoKernelGrad;

static void wino_kernel_grad_range(void *arg, size_t oc0, size_t oc1) {
    const WinoKernelGrad *t = arg;
    size_t n = wino_stride(t->OC * t->C);
    for (size_t oc = oc0; oc < oc1; oc++)
        for (size_t c = 0; c < t->C; c++) {
            const float *m = t->dU + oc * t->C + c;
            float r[4][3];  // dU G: the columns, G^T m = (m0 + (m1+m2)/2, (m1-m2)/2, (m1+m2)/2 + m3)
            for (int i = 0; i < 4; i++) {
                float m0 = m[(i * 4) * n], m1 = m[(i * 4 + 1) * n], m2 = m[(i * 4 + 2) * n],
                      m3 = m[(i * 4 + 3) * n];
                r[i][0] = m0 + 0.5f * (m1 + m2);
                r[i][1] = 0.5f * (m1 - m2);
                r[i][2] = 0.5f * (m1 + m2) + m3;
            }
            float *g = t->dw + (oc * t->C + c) * 9;
            for (int k = 0; k < 3; k++) {  // G^T (dU G): the rows
                g[k] += r[0][k] + 0.5f * (r[1][k] + r[2][k]);
                g[3 + k] += 0.5f * (r[1][k] - r[2][k]);
                g[6 + k] += 0.5f * (r[1][k] + r[2][k]) + r[3][k];
            }
        }
}

// The four tile transforms work a row of tiles at a time, on the even and odd
// columns of the rows involved held apart (e[m], o[m]), so that every loop
// runs over tiles with unit stride and vectorises. A thread's stage:
static size_t wino_stage_floats(const Wino *z) {
    return (size_t)(2 * (2 * z->TH + 2) + 48) * (z->TW + 1);
}

// V_xi[c][p] = (B^T d B)_xi for the patches of g images (p = (i*TH + ty)*TW + tx),
// B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]. The patch of tile (ty, tx)
// covers rows 2ty-1 .. 2ty+2 and columns 2tx-1 .. 2tx+2: columns e[tx], o[tx],
// e[tx+1], o[tx+1] with e[m] = x[2m-1], o[m] = x[2m] (0 outside the image).
typedef struct { float *V; const float *x; const Wino *z; int g; float *stage; } WinoInput;

static void wino_input_range(void *arg, size_t c0, size_t c1) {
    const WinoInput *t = arg;
    const Wino *z = t->z;
    int TW = z->TW, W = z->W, L = TW + 1;
    size_t P = (size_t)t->g * z->tiles, np = wino_stride((size_t)z->C * P), hw = (size_t)z->H * W;
    float *e = t->stage + (size_t)pool_thread_id() * wino_stage_floats(z), *o = e + 4 * L;
    float *te = o + 4 * L, *to = te + 4 * L;
    for (size_t c = c0; c < c1; c++)
        for (int i = 0; i < t->g; i++) {
            const float *x = t->x + ((size_t)i * z->C + c) * hw;
            for (int ty = 0; ty < z->TH; ty++) {
                for (int r = 0; r < 4; r++) {  // input rows 2ty-1 .. 2ty+2
                    int y = 2 * ty - 1 + r, m = 0;
                    float *er = e + r * L, *od = o + r * L;
                    if (y >= 0 && y < z->H) {
                        const float *row = x + (size_t)y * W;
                        er[0] = 0.0f;
                        for (m = 1; 2 * m - 1 < W; m++) er[m] = row[2 * m - 1];
                        for (; m < L; m++) er[m] = 0.0f;
                        for (m = 0; 2 * m < W; m++) od[m] = row[2 * m];
                        for (; m < L; m++) od[m] = 0.0f;
                    } else {
                        for (m = 0; m < L; m++) er[m] = od[m] = 0.0f;
                    }
                }
                for (int h = 0; h < 2; h++) {  // B^T over the rows, of the even then the odd columns
                    const float *d = h ? o : e;
                    float *tt = h ? to : te;
                    for (int m = 0; m < L; m++) {
                        float d0 = d[m], d1 = d[L + m], d2 = d[2 * L + m], d3 = d[3 * L + m];
                        tt[m] = d0 - d2;
                        tt[L + m] = d1 + d2;
                        tt[2 * L + m] = d2 - d1;
                        tt[3 * L + m] = d1 - d3;
                    }
                }
                float *v = t->V + c * P + ((size_t)i * z->TH + ty) * TW;
                for (int a = 0; a < 4; a++) {  // then B over the patches' columns
                    const float *ea = te + a * L, *oa = to + a * L;
                    float *v0 = v + (a * 4) * np, *v1 = v0 + np, *v2 = v1 + np, *v3 = v2 + np;
                    for (int tx = 0; tx < TW; tx++) {
                        v0[tx] = ea[tx] - ea[tx + 1];
                        v1[tx] = oa[tx] + ea[tx + 1];
                        v2[tx] = ea[tx + 1] - oa[tx];
                        v3[tx] = oa[tx] - oa[tx + 1];
                    }
                }
            }
        }
}

// the output of g images: out = A^T M A (+ bias, shift, residual as
// conv_epilogue_range), A^T = [1 1 1 0; 0 1 -1 -1]
typedef struct {
    float *out; const float *M; const Wino *z; int g, n0;
    const float *bias, *shift, *residual;
    float *stage;
} WinoOutput;

static void wino_output_range(void *arg, size_t oc0, size_t oc1) {
    const WinoOutput *t = arg;
    const Wino *z = t->z;
    int TW = z->TW, W = z->W;
    size_t P = (size_t)t->g * z->tiles, np = wino_stride((size_t)z->OC * P), hw = (size_t)z->H * W;
    float *s = t->stage + (size_t)pool_thread_id() * wino_stage_floats(z), *q = s + 8 * TW;
    for (size_t oc = oc0; oc < oc1; oc++)
        for (int i = 0; i < t->g; i++) {
            size_t r = ((size_t)t->n0 + i) * z->OC + oc;
            float cst = (t->bias ? t->bias[oc] : 0.0f) + (t->shift ? t->shift[r] : 0.0f);
            float *y = t->out + r * hw;
            const float *res = t->residual ? t->residual + r * hw : NULL;
            for (int ty = 0; ty < z->TH; ty++) {
                const float *m = t->M + oc * P + ((size_t)i * z->TH + ty) * TW;
                for (int b = 0; b < 4; b++) {  // A^T over the rows: s[a][b] per tile
                    const float *m0 = m + b * np, *m1 = m0 + 4 * np, *m2 = m1 + 4 * np,
                                *m3 = m2 + 4 * np;
                    float *s0 = s + b * TW, *s1 = s + (4 + b) * TW;
                    for (int tx = 0; tx < TW; tx++) {
                        s0[tx] = m0[tx] + m1[tx] + m2[tx];
                        s1[tx] = m1[tx] - m2[tx] - m3[tx];
                    }
                }
                for (int a = 0; a < 2; a++) {  // then over the columns: output row 2ty + a
                    int oy = 2 * ty + a;
                    if (oy >= z->H) break;
                    const float *sa = s + 4 * a * TW;
                    float *q0 = q, *q1 = q + TW;
                    for (int tx = 0; tx < TW; tx++) {
                        q0[tx] = sa[tx] + sa[TW + tx] + sa[2 * TW + tx];
                        q1[tx] = sa[TW + tx] - sa[2 * TW + tx] - sa[3 * TW + tx];
                    }
                    float *yr = y + (size_t)oy * W;
                    const float *rr = res ? res + (size_t)oy * W : NULL;
                    for (int ox = 0; ox < W; ox++) {
                        float v = ox % 2 ? q1[ox / 2] : q0[ox / 2];
                        yr[ox] = rr ? v + (rr[ox] + cst) : v + cst;
                    }
                }
            }
        }
}

// DY_xi[oc][p] = (A dy A^T)_xi for the output tiles of g images (zero past
// the map's edge), A = [1 0; 1 1; 1 -1; 0 -1]
typedef struct { float *DY; const float *dy; const Wino *z; int g; float *stage; } WinoDout;

static void wino_dout_range(void *arg, size_t oc0, size_t oc1) {
    const WinoDout *t = arg;
    const Wino *z = t->z;
    int TW = z->TW, W = z->W;
    size_t P = (size_t)t->g * z->tiles, np = wino_stride((size_t)z->OC * P), hw = (size_t)z->H * W;
    float *e = t->stage + (size_t)pool_thread_id() * wino_stage_floats(z), *o = e + 4 * TW;
    for (size_t oc = oc0; oc < oc1; oc++)
        for (int i = 0; i < t->g; i++) {
            const float *dy = t->dy + ((size_t)i * z->OC + oc) * hw;
            for (int ty = 0; ty < z->TH; ty++) {
                for (int a = 0; a < 2; a++) {  // the tile rows, even and odd columns
                    int oy = 2 * ty + a, in = oy < z->H;
                    const float *row = dy + (size_t)oy * W;
                    for (int tx = 0; tx < TW; tx++) {
                        e[a * TW + tx] = in ? row[2 * tx] : 0.0f;
                        o[a * TW + tx] = in && 2 * tx + 1 < W ? row[2 * tx + 1] : 0.0f;
                    }
                }
                for (int tx = 0; tx < TW; tx++) {  // A over the rows: rows 2, 3 from 0, 1
                    float e0 = e[tx], e1 = e[TW + tx], o0 = o[tx], o1 = o[TW + tx];
                    e[TW + tx] = e0 + e1;
                    o[TW + tx] = o0 + o1;
                    e[2 * TW + tx] = e0 - e1;
                    o[2 * TW + tx] = o0 - o1;
                    e[3 * TW + tx] = -e1;
                    o[3 * TW + tx] = -o1;
                }
                float *d = t->DY + oc * P + ((size_t)i * z->TH + ty) * TW;
                for (int a = 0; a < 4; a++) {  // then over the columns
                    const float *ea = e + a * TW, *oa = o + a * TW;
                    float *d0 = d + (a * 4) * np, *d1 = d0 + np, *d2 = d1 + np, *d3 = d2 + np;
                    for (int tx = 0; tx < TW; tx++) {
                        d0[tx] = ea[tx];
                        d1[tx] = ea[tx] + oa[tx];
                        d2[tx] = ea[tx] - oa[tx];
                        d3[tx] = -oa[tx];
                    }
                }
            }
        }
}

// dx of g images (+)= the patches' gradients B dV B^T, B = (B^T)^T. The
// patches overlap, so they are summed, in a fixed order, into the channel's
// padded plane (even and odd columns apart, as the input transform reads
// them) and the plane's interior is then the image's gradient.
typedef struct { float *dx; const float *dV; const Wino *z; int g, add; float *stage; } WinoDinp;

static void wino_dinp_range(void *arg, size_t c0, size_t c1) {
    const WinoDinp *t = arg;
    const Wino *z = t->z;
    int TW = z->TW, W = z->W, L = TW + 1, HP = 2 * z->TH + 2;
    size_t P = (size_t)t->g * z->tiles, np = wino_stride((size_t)z->C * P), hw = (size_t)z->H * W;
    float *E = t->stage + (size_t)pool_thread_id() * wino_stage_floats(z), *O = E + (size_t)HP * L;
    float *r = O + (size_t)HP * L;  // r[a][b][tx]: B over the columns of row a
    for (size_t c = c0; c < c1; c++)
        for (int i = 0; i < t->g; i++) {
            memset(E, 0, 2 * (size_t)HP * L * sizeof(float));
            for (int ty = 0; ty < z->TH; ty++) {
                const float *v = t->dV + c * P + ((size_t)i * z->TH + ty) * TW;
                for (int a = 0; a < 4; a++) {
                    const float *v0 = v + (a * 4) * np, *v1 = v0 + np, *v2 = v1 + np, *v3 = v2 + np;
                    float *r0 = r + (a * 4) * TW, *r1 = r0 + TW, *r2 = r1 + TW, *r3 = r2 + TW;
                    for (int tx = 0; tx < TW; tx++) {
                        r0[tx] = v0[tx];
                        r1[tx] = v1[tx] - v2[tx] + v3[tx];
                        r2[tx] = -v0[tx] + v1[tx] + v2[tx];
                        r3[tx] = -v3[tx];
                    }
                }
                for (int k = 0; k < 4; k++) {  // then B over the rows: patch row k, column k'
                    float *Er = E + (size_t)(2 * ty + k) * L, *Or = O + (size_t)(2 * ty + k) * L;
                    for (int b = 0; b < 4; b++) {
                        const float *p0 = r + b * TW, *p1 = r + (4 + b) * TW,
                                    *p2 = r + (8 + b) * TW, *p3 = r + (12 + b) * TW;
                        float *dst = (b % 2 ? Or : Er) + b / 2;  // columns e[tx], o[tx], e[tx+1], o[tx+1]
                        for (int tx = 0; tx < TW; tx++)
                            dst[tx] += k == 0 ? p0[tx]
                                     : k == 1 ? p1[tx] - p2[tx] + p3[tx]
                                     : k == 2 ? -p0[tx] + p1[tx] + p2[tx]
                                              : -p3[tx];
                    }
                }
            }
            float *dx = t->dx + ((size_t)i * z->C + c) * hw;
            for (int y = 0; y < z->H; y++) {  // the plane's interior: column 2m-1 in E, 2m in O
                const float *Er = E + (size_t)(y + 1) * L, *Or = O + (size_t)(y + 1) * L;
                float *d = dx + (size_t)y * W;
                for (int xx = 0; xx < W; xx++) {
                    float s = xx % 2 ? Er[(xx + 1) / 2] : Or[xx / 2];
                    d[xx] = t->add ? d[xx] + s : s;
                }
            }
        }
}

// scratch floats: U | dU (backward) | V | M or DY | (backward) dV
static size_t wino_scratch(const Wino *z, int backward) {
    size_t P = (size_t)wino_images(z) * z->tiles;
    size_t uc = 16 * wino_kernel_floats((size_t)z->OC, (size_t)z->C, backward);
    size_t duc = 16 * wino_stride((size_t)z->OC * z->C);
    size_t vc = 16 * wino_stride((size_t)z->C * P), mc = 16 * wino_stride((size_t)z->OC * P);
    size_t stage = (size_t)pool_threads() * wino_stage_floats(z);
    return backward ? uc + duc + 2 * vc + mc + stage : uc + vc + mc + stage;
}

// The 16 GEMMs of a transform, C_xi = op(A_xi) @ op(B_xi) (+ C_xi), as one
// pool job whose items are whole GEMMs: each runs on one thread (a GEMM
// inside a job does not split), with its operands in that core's cache, and
// the job waits once instead of 16 times. A GEMM's sums do not depend on
// which thread ran it.
// packed_a: A is a kernel transform's packed U (transA, lda unused).
typedef struct {
    int packed_a, transA, transB, accumulate;
    size_t M, N, K, lda, ldb, ldc, sa, sb, sc;  // sa, sb, sc: from one xi's matrix to the next
    const float *A, *B;
    float *C;
} WinoGemms;

static void wino_gemms_range(void *arg, size_t x0, size_t x1) {
    const WinoGemms *t = arg;
    for (size_t xi = x0; xi < x1; xi++) {
        const float *A = t->A + xi * t->sa, *B = t->B + xi * t->sb;
        float *C = t->C + xi * t->sc;
        if (t->packed_a) sgemm_packed_a(t->M, t->N, t->K, A, t->transB, B, t->ldb, t->accumulate, C, t->ldc);
        else sgemm(t->transA, t->transB, t->M, t->N, t->K, A, t->lda, B, t->ldb, t->accumulate, C, t->ldc);
    }
}

static void wino_gemms(WinoGemms t) { parallel_for(16, 1, wino_gemms_range, &t); }

static void wino_forward(float *out, const float *inp, const float *weight, const float *bias,
                         const float *shift, const float *residual, float *col, int N, int C,
                         int H, int W, int OC) {
    Wino z = wino_of(N, C, OC, H, W);
    int G = wino_images(&z);
    size_t Pmax = (size_t)G * z.tiles, su = wino_kernel_floats((size_t)OC, (size_t)C, 0);
    float *U = col, *V = U + 16 * su, *M = V + 16 * wino_stride((size_t)C * Pmax),
          *stage = M + 16 * wino_stride((size_t)OC * Pmax);
    flops_forward += 2.0 * OC * (double)N * H * W * C * 9;  // nominal: the direct convolution's
    wino_kernel(U, weight, (size_t)OC, (size_t)C, 0);
    for (int n0 = 0; n0 < N; n0 += G) {
        int g = N - n0 < G ? N - n0 : G;
        size_t P = (size_t)g * z.tiles;
        WinoInput in = {V, inp + (size_t)n0 * C * H * W, &z, g, stage};
        parallel_for((size_t)C, 1, wino_input_range, &in);
        size_t sv = wino_stride((size_t)C * P), sm = wino_stride((size_t)OC * P);
        wino_gemms((WinoGemms){1, 0, 0, 0, (size_t)OC, P, (size_t)C, 0, P, P, su, sv, sm,
                               U, V, M});
        WinoOutput o = {out, M, &z, g, n0, bias, shift, residual, stage};
        parallel_for((size_t)OC, 1, wino_output_range, &o);
    }
}

// dinp (written when dx_overwrite, else +=) and dweight (+=); either may be NULL
static void wino_backward(float *dinp, int dx_overwrite, float *dweight, const float *dout,
                          const float *inp, const float *weight, float *col, int N, int C, int H,
                          int W, int OC) {
    Wino z = wino_of(N, C, OC, H, W);
    int G = wino_images(&z);
    size_t Pmax = (size_t)G * z.tiles, su = wino_kernel_floats((size_t)OC, (size_t)C, 1);
    size_t sdu = wino_stride((size_t)OC * C), vc = 16 * wino_stride((size_t)C * Pmax);
    float *U = col, *dU = U + 16 * su, *V = dU + 16 * sdu, *DY = V + vc,
          *dV = DY + 16 * wino_stride((size_t)OC * Pmax), *stage = dV + vc;
    if (dinp) wino_kernel(U, weight, (size_t)OC, (size_t)C, 1);
    for (int n0 = 0; n0 < N; n0 += G) {
        int g = N - n0 < G ? N - n0 : G;
        size_t P = (size_t)g * z.tiles;
        size_t sv = wino_stride((size_t)C * P), sm = wino_stride((size_t)OC * P);
        WinoDout d = {DY, dout + (size_t)n0 * OC * H * W, &z, g, stage};
        parallel_for((size_t)OC, 1, wino_dout_range, &d);
        if (dweight) {  // dU_xi (OC, C) (+)= DY_xi (OC, P) @ V_xi^T (P, C), over the passes in order
            WinoInput in = {V, inp + (size_t)n0 * C * H * W, &z, g, stage};
            parallel_for((size_t)C, 1, wino_input_range, &in);
            wino_gemms((WinoGemms){0, 0, 1, n0 > 0, (size_t)OC, (size_t)C, P, P, P, (size_t)C,
                                   sm, sv, sdu, DY, V, dU});
        }
        if (dinp) {  // dV_xi (C, P) = U_xi^T (C, OC) @ DY_xi (OC, P), then the patches
            wino_gemms((WinoGemms){1, 0, 0, 0, (size_t)C, P, (size_t)OC, 0, P, P, su, sm, sv, U,
                                   DY, dV});
            WinoDinp b = {dinp + (size_t)n0 * C * H * W, dV, &z, g, !dx_overwrite, stage};
            parallel_for((size_t)C, 1, wino_dinp_range, &b);
        }
    }
    if (dweight) {
        WinoKernelGrad k = {dweight, dU, (size_t)OC, (size_t)C};
        parallel_for((size_t)OC, 1, wino_kernel_grad_range, &k);
    }
}

// scratch floats of conv2d_add_forward / conv2d_forward: a "same"
// convolution's planes (input, output, packed weights), else the GEMM result
// of a group of images (none for one image a GEMM)
size_t conv2d_forward_scratch(int N, int C, int H, int W, int OC, int K, int stride, int pad) {
    if (conv_on_winograd(N, C, OC, H, W, K, stride, pad)) {
        Wino z = wino_of(N, C, OC, H, W);
        return wino_scratch(&z, 0);
    }
    if (conv_on_planes(H, W, K, stride, pad)) {
        ConvPlanes g = planes_of(planes_images(N, C, OC, H, W, pad), C, H, W, pad);
        return ((size_t)C + OC) * g.ld;
    }
    int OH = conv_out_size(H, K, stride, pad), OW = conv_out_size(W, K, stride, pad);
    size_t ohw = (size_t)OH * OW;
    int G = conv_group(ohw, N);
    return G == 1 ? 0 : (size_t)OC * G * ohw;
}

// out (NCHW) = the same convolution of the planes at the start of col (the
// caller's) + bias, shift and residual; col: conv2d_forward_scratch floats
static void conv_forward_on_planes(float *out, float *col, const float *weight, const float *bias,
                                   const float *shift, const float *residual, int N, int C, int H,
                                   int W, int OC, int K, int pad) {
    ConvPlanes g = planes_of(N, C, H, W, pad), go = planes_of(N, OC, H, W, pad);
    float *outp = col + (size_t)C * g.ld;
    flops_forward += 2.0 * OC * (double)N * H * W * C * K * K;
    planes_conv(outp, col, weight, (size_t)OC, &g, K, 0);
    ConvPlanesCopy t = {.planes = outp, .nchw = out, .g = &go, .bias = bias, .shift = shift,
                        .residual = residual};
    parallel_for((size_t)OC, 1, from_planes_range, &t);
}

// The GEMM path of the forward, for a KH x KW kernel with padding (PH, PW):
// images grouped as conv_group says, B packed straight from them
static void conv_gemm_forward(float *out, const float *inp, const float *weight, const float *bias,
                              const float *shift, const float *residual, float *col, int N, int C,
                              int H, int W, int OC, int KH, int KW, int stride, int PH, int PW) {
    int OH = conv_out_size(H, KH, stride, PH), OW = conv_out_size(W, KW, stride, PW);
    size_t ohw = (size_t)OH * OW, ckk = (size_t)C * KH * KW;
    int init = bias || shift || residual, G = conv_group(ohw, N);
    int pointwise = KH == 1 && KW == 1 && stride == 1 && PH == 0 && PW == 0;
    for (int n0 = 0; n0 < N; n0 += G) {
        int g = N - n0 < G ? N - n0 : G;  // images in this group
        const float *x = inp + (size_t)n0 * C * H * W;
        float *y = out + (size_t)n0 * OC * ohw;
        // the GEMM's output: y itself for one image, else a block to scatter
        float *Y = G > 1 ? col : y;
        size_t ncols = (size_t)g * ohw;
        ConvEpilogue e = {NULL, out, bias, shift, residual, (size_t)OC, ohw, g, n0};
        if (G == 1 && init) parallel_for((size_t)OC, 1, conv_epilogue_range, &e);
        // Y (OC, g*OH*OW) (+)= weight (OC, C*KH*KW) @ cols (C*KH*KW, g*OH*OW)
        flops_forward += 2.0 * OC * (double)ncols * (double)ckk;
        if (G == 1 && pointwise) {  // cols = x
            sgemm(0, 0, (size_t)OC, ncols, ckk, weight, ckk, x, ncols, init, Y, ncols);
        } else {
            ConvCols v = {x, (size_t)C * H * W, C, H, W, KH, KW, stride, PH, PW, OH, OW};
            sgemm_pack_b(0, (size_t)OC, ncols, ckk, weight, ckk, pack_conv_cols, &v, G == 1 && init,
                         Y, ncols);
        }
        if (G > 1) {  // scatter the block to NCHW, adding the extra terms on the way
            e.blk = Y;
            parallel_for((size_t)g * OC, 1, conv_epilogue_range, &e);
        }
    }
}


// out (N,OC,OH,OW) = inp (N,C,H,W) * weight (OC,C,K,K) + bias (OC)
//                    + shift (N,OC) broadcast over OH,OW + residual (N,OC,OH,OW)
// bias, shift and residual may each be NULL. The U-Net's ResBlock adds its
// time embedding (shift) after the first convolution and the skip path
// (residual) after the second; doing it here means neither sum is stored.
// col: conv2d_forward_scratch(...) floats.
void conv2d_add_forward(float *out, const float *inp, const float *weight, const float *bias,
                        const float *shift, const float *residual, float *col,
                        int N, int C, int H, int W, int OC, int K, int stride, int pad) {
    if (conv_on_winograd(N, C, OC, H, W, K, stride, pad)) {
        wino_forward(out, inp, weight, bias, shift, residual, col, N, C, H, W, OC);
        return;
    }
    if (conv_on_planes(H, W, K, stride, pad)) {  // a group of images at a time
        int G = planes_images(N, C, OC, H, W, pad);
        size_t hw = (size_t)H * W;
        for (int n0 = 0; n0 < N; n0 += G) {
            int g = N - n0 < G ? N - n0 : G;
            ConvPlanes gp = planes_of(g, C, H, W, pad);
            to_planes(col, inp + (size_t)n0 * C * hw, &gp);
            conv_forward_on_planes(out + (size_t)n0 * OC * hw, col, weight, bias,
                                   shift ? shift + (size_t)n0 * OC : NULL,
                                   residual ? residual + (size_t)n0 * OC * hw : NULL, g, C, H, W,
                                   OC, K, pad);
        }
        return;
    }
    conv_gemm_forward(out, inp, weight, bias, shift, residual, col, N, C, H, W, OC, K, K, stride,
                      pad, pad);
}

// out (N,OC,OH,OW) = inp (N,C,H,W) * weight (OC,C,K,K) + bias (OC) (bias may be NULL)
void conv2d_forward(float *out, const float *inp, const float *weight, const float *bias,
                    float *col, int N, int C, int H, int W, int OC, int K, int stride, int pad) {
    conv2d_add_forward(out, inp, weight, bias, NULL, NULL, col, N, C, H, W, OC, K, stride, pad);
}

// The backward. Same convolutions on planes get their input gradient as the
// convolution of dy with the flipped, transposed kernel (conv_backward_planes
// below); the others, small maps included, as weight^T @ dy folded back by
// col2im (1x1: the GEMM alone).

// The backward scratch, in floats. Same convolutions: [x planes | dy planes |
// dx planes] (the flipped kernel is read from the weights, planes_conv); the others: [dy block |
// columns | dx block].
typedef struct { size_t dy, cols, dx, total; } ConvScratch;

static ConvScratch conv_backward_layout(int N, int C, int H, int W, int OC, int K, int stride,
                                        int pad) {
    ConvScratch s;
    if (conv_on_planes(H, W, K, stride, pad)) {
        ConvPlanes g = planes_of(planes_images(N, C, OC, H, W, pad), C, H, W, pad);
        s.cols = (size_t)C * g.ld;   // x
        s.dy = (size_t)OC * g.ld;
        s.dx = (size_t)C * g.ld;
        s.total = s.cols + s.dy + s.dx;
        return s;
    }
    int OH = conv_out_size(H, K, stride, pad), OW = conv_out_size(W, K, stride, pad);
    size_t ohw = (size_t)OH * OW, hw = (size_t)H * W, ckk = (size_t)C * K * K;
    int G = conv_group(ohw, N), pointwise = conv_is_pointwise(K, stride, pad);
    s.dy = G > 1 ? (size_t)OC * G * ohw : 0;
    // dcol for col2im (im2col(x) is packed directly)
    s.cols = !pointwise ? ckk * G * ohw : 0;
    s.dx = (G > 1 && pointwise) ? (size_t)C * G * hw : 0;
    s.total = s.dy + s.cols + s.dx;
    return s;
}

size_t conv2d_backward_scratch(int N, int C, int H, int W, int OC, int K, int stride, int pad) {
    if (conv_on_winograd(N, C, OC, H, W, K, stride, pad)) {
        Wino z = wino_of(N, C, OC, H, W);
        return wino_scratch(&z, 1);
    }
    return conv_backward_layout(N, C, H, W, OC, K, stride, pad).total;
}

// the bias gradient, split over channels
typedef struct {
    float *dbias; const float *dout;
    int N, OC; size_t ohw;
} ConvSmall;

static void conv_dbias_range(void *arg, size_t oc0,
                             size_t oc1) {  // dbias[oc] += sum over n, pixels of dout
    const ConvSmall *t = arg;
    for (size_t oc = oc0; oc < oc1; oc++)
        for (int n = 0; n < t->N; n++) {  // in 16 lanes (vectorised), added in order
            const float *d = t->dout + ((size_t)n * t->OC + oc) * t->ohw;
            float l[16] = {0}, s = 0.0f;
            size_t i = 0;
            for (; i + 16 <= t->ohw; i += 16)
                for (int k = 0; k < 16; k++) l[k] += d[i + k];
            for (; i < t->ohw; i++) l[i % 16] += d[i];
            for (int k = 0; k < 16; k++) s += l[k];
            t->dbias[oc] += s;
        }
}

// A same convolution's backward on planes: dW from the planes of x and dy,
// dx as the convolution of dy's planes with the flipped, transposed kernel
//   dx[c,i,j] = sum_{oc,ky,kx} w[oc,c,K-1-ky,K-1-kx] dy[oc, i+ky-pad, j+kx-pad]
// inp NULL: x's planes are already at the start of col (norm_conv2d's norm
// wrote them). The input gradient is added to dinp, written to it, or (for
// norm_conv2d's norm backward) left in its planes, which are returned.
enum { DX_NONE, DX_ADD, DX_WRITE, DX_PLANES };

static float *conv_backward_planes(float *dinp, int dx_mode, float *dweight, const float *dout,
                                   const float *inp, const float *weight, float *col, int N, int C,
                                   int H, int W, int OC, int K, int pad) {
    ConvScratch L = conv_backward_layout(N, C, H, W, OC, K, 1, pad);
    float *xp = col, *dyp = xp + L.cols, *dxp = dyp + L.dy;
    int G = planes_images(N, C, OC, H, W, pad);
    size_t hw = (size_t)H * W;
    for (int n0 = 0; n0 < N; n0 += G) {  // a group of images at a time, in order
        int g = N - n0 < G ? N - n0 : G;
        ConvPlanes gx = planes_of(g, C, H, W, pad), gy = planes_of(g, OC, H, W, pad);
        to_planes(dyp, dout + (size_t)n0 * OC * hw, &gy);
        if (dweight) {
            if (inp) to_planes(xp, inp + (size_t)n0 * C * hw, &gx);  // else one group: N
            planes_dweight(dweight, dyp, xp, (size_t)OC, &gx, K);
        }
        if (dx_mode == DX_NONE) continue;
        planes_conv(dxp, dyp, weight, (size_t)C, &gy, K, 1);
        if (dx_mode == DX_PLANES) return dxp;  // one group: N (norm_conv_on_planes)
        ConvPlanesCopy t = {.planes = dxp, .nchw = dinp + (size_t)n0 * C * hw, .g = &gx,
                            .add = dx_mode == DX_ADD};
        parallel_for((size_t)C, 1, from_planes_range, &t);
    }
    return NULL;
}

// dinp = (dx_overwrite) or += the input gradient; dweight, dbias +=
static void conv_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                          const float *inp, const float *weight, float *col, int N, int C, int H,
                          int W, int OC, int K, int stride, int pad, int dx_overwrite) {
    int OH = conv_out_size(H, K, stride, pad), OW = conv_out_size(W, K, stride, pad);
    size_t ohw = (size_t)OH * OW, hw = (size_t)H * W, ckk = (size_t)C * K * K;
    int pointwise = conv_is_pointwise(K, stride, pad);
    ConvSmall cs = {dbias, dout, N, OC, ohw};
    if (dbias) parallel_for((size_t)OC, 1, conv_dbias_range, &cs);
    if (conv_on_winograd(N, C, OC, H, W, K, stride, pad)) {
        wino_backward(dinp, dx_overwrite, dweight, dout, inp, weight, col, N, C, H, W, OC);
        return;
    }
    if (conv_on_planes(H, W, K, stride, pad)) {
        conv_backward_planes(dinp, !dinp ? DX_NONE : dx_overwrite ? DX_WRITE : DX_ADD, dweight,
                             dout, inp, weight, col, N, C, H, W, OC, K, pad);
        return;
    }
    if (dinp && dx_overwrite) memset(dinp, 0, (size_t)N * C * hw * sizeof(float));
    int G = conv_group(ohw, N);
    ConvScratch L = conv_backward_layout(N, C, H, W, OC, K, stride, pad);
    float *dyblk = col, *cols = col + L.dy, *dxblk = cols + L.cols;
    for (int n0 = 0; n0 < N; n0 += G) {
        int g = N - n0 < G ? N - n0 : G;
        // columns of the output and input blocks
        size_t nco = (size_t)g * ohw, nci = (size_t)g * hw;
        const float *x = inp + (size_t)n0 * C * hw;
        const float *dy = dout + (size_t)n0 * OC * ohw;
        float *dx = dinp ? dinp + (size_t)n0 * C * hw : NULL;
        const float *DY = dy;  // (OC, g*OH*OW)
        if (G > 1) { regroup(0, dyblk, (float *)dy, (size_t)OC, ohw, g, 0); DY = dyblk; }
        if (dweight) {  // dweight (OC, CKK) += dy (OC, g*OHW) @ cols(x)^T (g*OHW, CKK)
            if (G == 1 && pointwise) {
                sgemm(0, 1, (size_t)OC, ckk, nco, DY, nco, x, nco, 1, dweight, ckk);
            } else {
                ConvCols v = {x, (size_t)C * hw, C, H, W, K, K, stride, pad, pad, OH, OW};
                sgemm_pack_b(0, (size_t)OC, ckk, nco, DY, nco, pack_conv_cols_t, &v, 1, dweight,
                             ckk);
            }
        }
        if (!dx) continue;
        if (pointwise) {  // dx (C, HW) (+)= weight^T (C, OC) @ dy (OC, HW)
            float *DX = G > 1 ? dxblk : dx;  // (C, g*H*W)
            sgemm(1, 0, (size_t)C, nci, (size_t)OC, weight, ckk, DY, nco, G == 1, DX, nci);
            if (G > 1) regroup(1, dxblk, dx, (size_t)C, hw, g, 1);
        } else {              // dcol = weight^T @ dy, then fold each image back
            sgemm(1, 0, ckk, nco, (size_t)OC, weight, ckk, DY, nco, 0, cols, nco);
            for (int i = 0; i < g; i++) {
                Im2col a = {
                    cols + i * ohw, dx + (size_t)i * C * hw, C, H, W, K, stride, pad, OH, OW, nco};
                parallel_for((size_t)C, 1, col2im_range, &a);
            }
        }
    }
}

void conv2d_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                     const float *inp, const float *weight, float *col,
                     int N, int C, int H, int W, int OC, int K, int stride, int pad) {
    conv_backward(dinp, dweight, dbias, dout, inp, weight, col, N, C, H, W, OC, K, stride, pad, 0);
}

// ---- reference: the convolution as its definition, direct loops in double ----
// out[n,o,y,x] = bias[o] + sum_{c,i,j} w[o,c,i,j] * inp[n, c, y*stride - pad + i, x*stride - pad +
// j] (zero outside the image). Backward gathers each gradient element's own sum: no GEMM, no
// im2col, no grouping of images; the tests' witness.
static int in_image(int v, int size) { return v >= 0 && v < size; }

void conv2d_forward_ref(float *out, const float *inp, const float *weight, const float *bias,
                        int N, int C, int H, int W, int OC, int K, int stride, int pad) {
    conv2d_rect_forward_ref(out, inp, weight, bias, N, C, H, W, OC, K, K, stride, pad, pad, 0);
}

// dinp[n,c,iy,ix] += sum over the (o, i, j) whose output pixel
// ((iy + pad - i) / stride, (ix + pad - j) / stride) exists of dout * w
static void conv2d_dinp_ref(float *dinp, const float *dout, const float *weight,
                            int N, int C, int H, int W, int OC, int K, int stride, int pad) {
    int OH = conv_out_size(H, K, stride, pad), OW = conv_out_size(W, K, stride, pad);
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++)
            for (int iy = 0; iy < H; iy++)
                for (int ix = 0; ix < W; ix++) {
                    double acc = 0.0;
                    for (int o = 0; o < OC; o++)
                        for (int i = 0; i < K; i++)
                            for (int j = 0; j < K; j++) {
                                int ty = iy + pad - i, tx = ix + pad - j;
                                if (ty < 0 || tx < 0 || ty % stride || tx % stride) continue;
                                if (ty / stride >= OH || tx / stride >= OW) continue;
                                acc += (double)dout[((size_t)(n * OC + o) * OH + ty / stride) * OW +
                                                    tx / stride] *
                                       weight[((size_t)(o * C + c) * K + i) * K + j];
                            }
                    dinp[((size_t)(n * C + c) * H + iy) * W + ix] += (float)acc;
                }
}

// dweight[o,c,i,j] += sum over n and output pixels of dout * the input pixel under tap (i, j)
static void conv2d_dweight_ref(float *dweight, const float *dout, const float *inp,
                               int N, int C, int H, int W, int OC, int K, int stride, int pad) {
    int OH = conv_out_size(H, K, stride, pad), OW = conv_out_size(W, K, stride, pad);
    for (int o = 0; o < OC; o++)
        for (int c = 0; c < C; c++)
            for (int i = 0; i < K; i++)
                for (int j = 0; j < K; j++) {
                    double acc = 0.0;
                    for (int n = 0; n < N; n++)
                        for (int y = 0; y < OH; y++)
                            for (int x = 0; x < OW; x++) {
                                int iy = y * stride - pad + i, ix = x * stride - pad + j;
                                if (!in_image(iy, H) || !in_image(ix, W)) continue;
                                acc += (double)dout[((size_t)(n * OC + o) * OH + y) * OW + x] *
                                       inp[((size_t)(n * C + c) * H + iy) * W + ix];
                            }
                    dweight[((size_t)(o * C + c) * K + i) * K + j] += (float)acc;
                }
}

void conv2d_backward_ref(float *dinp, float *dweight, float *dbias, const float *dout,
                         const float *inp, const float *weight,
                         int N, int C, int H, int W, int OC, int K, int stride, int pad) {
    size_t ohw = (size_t)conv_out_size(H, K, stride, pad) * conv_out_size(W, K, stride, pad);
    if (dinp) conv2d_dinp_ref(dinp, dout, weight, N, C, H, W, OC, K, stride, pad);
    if (dweight) conv2d_dweight_ref(dweight, dout, inp, N, C, H, W, OC, K, stride, pad);
    if (dbias)
        for (int o = 0; o < OC; o++) {
            double acc = 0.0;
            for (int n = 0; n < N; n++)
                for (size_t p = 0; p < ohw; p++) acc += dout[(size_t)(n * OC + o) * ohw + p];
            dbias[o] += (float)acc;
        }
}

// conv2d: x (N,C,H,W), w (OC,C,K,K), b (OC) or NULL
typedef struct { int stride, pad; } ConvState;

static void conv2d_node_backward(Graph *g, TapeNode *n) {
    const ConvState *s = n->state;
    Tensor *x = n->in[0], *w = n->in[1];
    int stride = s->stride, pad = s->pad, K = w->shape[2];
    float *dx = input_grad(g, n, 0), *dw = input_grad(g, n, 1), *db = input_grad(g, n, 2);
    ArenaMark m = arena_mark(&g->arena);
    float *col = NULL;
    if (dx || dw)
        col = arena_floats(&g->arena,
                           conv2d_backward_scratch(x->shape[0], x->shape[1], x->shape[2],
                                                   x->shape[3], w->shape[0], K, stride, pad));
    conv2d_backward(dx, dw, db, n->out->grad, x->data, w->data, col, x->shape[0], x->shape[1],
                    x->shape[2], x->shape[3], w->shape[0], K, stride, pad);
    arena_release(&g->arena, m);
}

// conv2d_add's extra inputs: dshift (N,OC) = dy summed over OH,OW; dresidual = dy
static void conv2d_add_node_backward(Graph *g, TapeNode *n) {
    conv2d_node_backward(g, n);
    Tensor *shift = n->in[3], *res = n->in[4];
    const float *dy = n->out->grad;
    size_t NOC = (size_t)n->out->shape[0] * n->out->shape[1],
           ohw = (size_t)n->out->shape[2] * n->out->shape[3];
    if (shift && shift->requires_grad) {
        float *ds = tensor_grad(g, shift);
        for (size_t r = 0; r < NOC; r++) {
            float acc = 0.0f;
            for (size_t i = 0; i < ohw; i++) acc += dy[r * ohw + i];
            ds[r] += acc;
        }
    }
    if (res && res->requires_grad) {
        float *dr = tensor_grad(g, res);
        for (size_t i = 0; i < n->out->size; i++) dr[i] += dy[i];
    }
}

// conv2d as graph ops (graph_grad): dx = conv2d_transpose(dy, w), the
// residual's gradient dy; a weight, bias or shift that depends on the
// input is not supported (no model needs it)
static void conv2d_vjp(Graph *g, TapeNode *n, Tensor *dy) {
    const ConvState *s = n->state;
    Tensor *x = n->in[0], *w = n->in[1];
    if (base_of(w)->on_path || (n->in[2] && base_of(n->in[2])->on_path) ||
        (n->in[3] && base_of(n->in[3])->on_path))
        fatal("graph_grad: %s with a weight, bias or shift that depends on the input", n->op);
    if (base_of(x)->on_path)
        node_vjp_add(g, x, conv2d_transpose(g, dy, w, x->shape[2], x->shape[3], s->stride, s->pad));
    if (n->in[4]) node_vjp_add(g, n->in[4], dy);
}

Tensor *conv2d_add(Graph *g, Tensor *x, Tensor *w, Tensor *b, Tensor *shift, Tensor *residual,
                   int stride, int pad) {
    check_4d(x, "conv2d");
    if (w->ndim != 4 || w->shape[1] != x->shape[1] || w->shape[2] != w->shape[3] ||
        (b && (int)b->size != w->shape[0])) {
        char sx[64], sw[64];
        shape_str(x, sx, sizeof sx);
        shape_str(w, sw, sizeof sw);
        fatal("conv2d: input %s does not fit weight %s%s", sx, sw, b ? " and bias" : "");
    }
    int N = x->shape[0], C = x->shape[1], H = x->shape[2], W = x->shape[3];
    int OC = w->shape[0], K = w->shape[2];
    int OH = conv_out_size(H, K, stride, pad), OW = conv_out_size(W, K, stride, pad);
    if (shift && shift->size != (size_t)N * OC)
        fatal("conv2d_add: shift must have N*OC = %d elements", N * OC);
    if (residual && (residual->ndim != 4 || residual->shape[0] != N || residual->shape[1] != OC ||
                     residual->shape[2] != OH || residual->shape[3] != OW))
        fatal("conv2d_add: residual must be (%d,%d,%d,%d)", N, OC, OH, OW);
    Tensor *y = tensor4(g, N, OC, OH, OW);
    ArenaMark m = arena_mark(&g->arena);
    float *col = arena_floats(&g->arena, conv2d_forward_scratch(N, C, H, W, OC, K, stride, pad));
    conv2d_add_forward(y->data, x->data, w->data, data_of(b), data_of(shift),
                       data_of(residual), col, N, C, H, W, OC, K, stride, pad);
    arena_release(&g->arena, m);
    int extra = g->grad_enabled &&
                ((shift && shift->requires_grad) || (residual && residual->requires_grad));
    if (wants_grad(g, x, w, b) || extra) {
        TapeNode *nd = record(g, shift || residual ? "conv2d_add" : "conv2d",
                              conv2d_add_node_backward, y, x, w, b);
        ConvState s = {.stride = stride, .pad = pad};
        save_state(g, nd, &s, sizeof s);
        nd->in[3] = shift;
        nd->in[4] = residual;
        nd->vjp = conv2d_vjp;
    }
    return y;
}

// ---- conv2d_transpose: conv2d's input gradient as an op of its own ----
// z = J^T dy, linear in dy and in w. Its backward: d(dy) = conv2d(dz, w) (the
// convolution itself) and dw[o,c,k] = sum_p dy[o,p] dz[c, p s + k - pad],
// conv2d's weight gradient with dz in the input's place.
static void conv2d_transpose_node_backward(Graph *g, TapeNode *n) {
    const ConvState *s = n->state;
    Tensor *dy = n->in[0], *w = n->in[1];
    int N = dy->shape[0], OC = w->shape[0], C = w->shape[1], K = w->shape[2],
        H = n->out->shape[2], W = n->out->shape[3];
    float *ddy = input_grad(g, n, 0), *dw = input_grad(g, n, 1);
    const float *dz = n->out->grad;
    ArenaMark m = arena_mark(&g->arena);
    if (ddy) {
        float *t = arena_floats(&g->arena, dy->size);
        float *col = arena_floats(&g->arena, conv2d_forward_scratch(N, C, H, W, OC, K, s->stride, s->pad));
        conv2d_forward(t, dz, w->data, NULL, col, N, C, H, W, OC, K, s->stride, s->pad);
        for (size_t i = 0; i < dy->size; i++) ddy[i] += t[i];
    }
    if (dw) {
        float *col = arena_floats(&g->arena, conv2d_backward_scratch(N, C, H, W, OC, K, s->stride, s->pad));
        conv2d_backward(NULL, dw, NULL, dy->data, dz, w->data, col, N, C, H, W, OC, K, s->stride,
                        s->pad);
    }
    arena_release(&g->arena, m);
}

Tensor *conv2d_transpose(Graph *g, Tensor *dy, Tensor *w, int H, int W, int stride, int pad) {
    check_4d(dy, "conv2d_transpose");
    int N = dy->shape[0], OC = w->shape[0], C = w->shape[1], K = w->shape[2];
    if (w->ndim != 4 || dy->shape[1] != OC || dy->shape[2] != conv_out_size(H, K, stride, pad) ||
        dy->shape[3] != conv_out_size(W, K, stride, pad))
        fatal("conv2d_transpose: dy does not fit the weight and a %dx%d input", H, W);
    Tensor *z = tensor_zeros(g, 4, (int[4]){N, C, H, W});
    ArenaMark m = arena_mark(&g->arena);
    float *col = arena_floats(&g->arena, conv2d_backward_scratch(N, C, H, W, OC, K, stride, pad));
    // (no weight gradient asked for: the input pointer is not read)
    conv2d_backward(z->data, NULL, NULL, dy->data, z->data, w->data, col, N, C, H, W, OC, K,
                    stride, pad);
    arena_release(&g->arena, m);
    if (wants_grad(g, dy, w, NULL)) {
        ConvState s = {.stride = stride, .pad = pad};
        save_state(g, record(g, "conv2d_transpose", conv2d_transpose_node_backward, z, dy, w, NULL),
                   &s, sizeof s);
    }
    return z;
}

// relu(conv2d(x)): the ReLU works in place on the convolution's output and
// its backward reads that output (relu' = [y > 0]), so the pre-activation is
// never stored: one activation fewer per VGG layer in LPIPS.
static void conv2d_relu_node_backward(Graph *g, TapeNode *n) {
    float *dy = n->out->grad;  // this node's own gradient: nobody reads it after us
    const float *y = n->out->data;
    for (size_t i = 0; i < n->out->size; i++) if (!(y[i] > 0.0f)) dy[i] = 0.0f;
    conv2d_node_backward(g, n);
}

Tensor *conv2d_relu(Graph *g, Tensor *x, Tensor *w, Tensor *b, int stride, int pad) {
    int taping = g->grad_enabled;
    g->grad_enabled = 0;  // the plain convolution, untaped
    Tensor *y = conv2d(g, x, w, b, stride, pad);
    g->grad_enabled = taping;
    for (size_t i = 0; i < y->size; i++) y->data[i] = y->data[i] > 0.0f ? y->data[i] : 0.0f;
    if (wants_grad(g, x, w, b)) {
        TapeNode *nd = record(g, "conv2d_relu", conv2d_relu_node_backward, y, x, w, b);
        ConvState s = {.stride = stride, .pad = pad};
        save_state(g, nd, &s, sizeof s);
    }
    return y;
}

Tensor *conv2d(Graph *g, Tensor *x, Tensor *w, Tensor *b, int stride, int pad) {
    return conv2d_add(g, x, w, b, NULL, NULL, stride, pad);
}

// ---------------------------------------------------------------------------
// ---- inference only: rectangular convolutions and pooling (fid.c) ----
// Inception-v3 factorises its 7x7 and 3x3 convolutions into 1x7, 7x1, 1x3
// and 3x1 ones, pools 3x3 with stride 2 (max) or 1 (max, or TensorFlow's
// average that counts only the pixels inside the image), and is only ever
// run forward: the evaluator does not train, so these have no backward and
// no tape node. Each has its direct-loop reference; tests hold them to it.
// ---------------------------------------------------------------------------

// scratch floats of conv2d_rect_forward
size_t conv2d_rect_forward_scratch(int N, int C, int H, int W, int OC, int KH, int KW, int stride,
                                   int PH, int PW) {
    if (KH == KW && PH == PW) return conv2d_forward_scratch(N, C, H, W, OC, KH, stride, PH);
    size_t ohw = (size_t)conv_out_size(H, KH, stride, PH) * conv_out_size(W, KW, stride, PW);
    int G = conv_group(ohw, N);
    return G == 1 ? 0 : (size_t)OC * G * ohw;
}

// out (N,OC,OH,OW) = inp (N,C,H,W) * weight (OC,C,KH,KW) + bias (OC), padding
// PH rows above and below, PW columns left and right; then max(0, .) when
// relu. Square kernels with equal padding take conv2d_forward's paths.
void conv2d_rect_forward(float *out, const float *inp, const float *weight, const float *bias,
                         float *col, int N, int C, int H, int W, int OC, int KH, int KW,
                         int stride, int PH, int PW, int relu) {
    if (KH == KW && PH == PW)
        conv2d_add_forward(out, inp, weight, bias, NULL, NULL, col, N, C, H, W, OC, KH, stride, PH);
    else
        conv_gemm_forward(out, inp, weight, bias, NULL, NULL, col, N, C, H, W, OC, KH, KW, stride,
                          PH, PW);
    if (relu) {
        size_t n = (size_t)N * OC * conv_out_size(H, KH, stride, PH) * conv_out_size(W, KW, stride, PW);
        activation_forward(out, out, n, ACT_RELU);
    }
}

void conv2d_rect_forward_ref(float *out, const float *inp, const float *weight, const float *bias,
                             int N, int C, int H, int W, int OC, int KH, int KW, int stride, int PH,
                             int PW, int relu) {
    int OH = conv_out_size(H, KH, stride, PH), OW = conv_out_size(W, KW, stride, PW);
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OC; o++)
            for (int y = 0; y < OH; y++)
                for (int x = 0; x < OW; x++) {
                    double acc = bias ? bias[o] : 0.0;
                    for (int c = 0; c < C; c++)
                        for (int i = 0; i < KH; i++)
                            for (int j = 0; j < KW; j++) {
                                int iy = y * stride - PH + i, ix = x * stride - PW + j;
                                if (!in_image(iy, H) || !in_image(ix, W)) continue;
                                acc += (double)weight[((size_t)(o * C + c) * KH + i) * KW + j] *
                                       inp[((size_t)(n * C + c) * H + iy) * W + ix];
                            }
                    if (relu && acc < 0) acc = 0;
                    out[((size_t)(n * OC + o) * OH + y) * OW + x] = (float)acc;
                }
}

// K x K pooling of P planes (H,W) with the given stride and zero padding:
// POOL_MAX the largest pixel inside the image (torch's max_pool2d pads with
// -inf), POOL_AVG_VALID the mean of the pixels inside the image
// (avg_pool2d with count_include_pad=False, TensorFlow's SAME average)
enum { POOL_MAX, POOL_AVG_VALID };
typedef struct {
    float *out; const float *inp;
    int H, W, K, stride, pad, OH, OW, kind;
} Pool2d;

// Separable: each input row is reduced across the window's columns (hrow:
// H rows of OW), then each output pixel across the window's rows; the mean
// divides by the pixels inside, (rows inside) x (columns inside).
static void pool2d_range(void *arg, size_t p0, size_t p1) {
    const Pool2d *a = arg;
    int H = a->H, W = a->W, OH = a->OH, OW = a->OW, K = a->K, S = a->stride, pad = a->pad;
    int max = a->kind == POOL_MAX;
    float *hrow = mallocCheck((size_t)H * OW * sizeof(float));
    int *x0 = mallocCheck((size_t)OW * 2 * sizeof(int)), *x1 = x0 + OW;
    int lo = OW, hi = 0;  // [lo, hi): the windows wholly inside
    for (int ox = 0; ox < OW; ox++) {  // the window's columns inside the image
        x0[ox] = ox * S - pad < 0 ? 0 : ox * S - pad;
        x1[ox] = ox * S - pad + K > W ? W : ox * S - pad + K;
        if (ox * S - pad >= 0 && ox * S - pad + K <= W) { lo = ox < lo ? ox : lo; hi = ox + 1; }
    }
    for (size_t p = p0; p < p1; p++) {
        const float *src = a->inp + p * H * W;
        float *dst = a->out + p * OH * OW;
        for (int y = 0; y < H; y++) {
            const float *row = src + (size_t)y * W;
            float *h = hrow + (size_t)y * OW;
            if (K == 3)  // Inception's pools: the windows inside the row in one loop
                for (int ox = lo; ox < hi; ox++) {
                    const float *q = row + ox * S - pad;
                    float m = q[0] > q[1] ? q[0] : q[1];
                    h[ox] = max ? (q[2] > m ? q[2] : m) : (q[0] + q[1]) + q[2];
                }
            for (int ox = 0; ox < OW; ox++) {
                if (K == 3 && ox >= lo && ox < hi) continue;
                float m = row[x0[ox]], sum = 0.0f;
                for (int x = x0[ox]; x < x1[ox]; x++) {
                    m = row[x] > m ? row[x] : m;
                    sum += row[x];
                }
                h[ox] = max ? m : sum;
            }
        }
        for (int oy = 0; oy < OH; oy++) {
            int y0 = oy * S - pad < 0 ? 0 : oy * S - pad;
            int y1 = oy * S - pad + K > H ? H : oy * S - pad + K;
            float *d = dst + (size_t)oy * OW;
            memcpy(d, hrow + (size_t)y0 * OW, (size_t)OW * sizeof(float));
            for (int y = y0 + 1; y < y1; y++) {
                const float *h = hrow + (size_t)y * OW;
                if (max) for (int ox = 0; ox < OW; ox++) d[ox] = h[ox] > d[ox] ? h[ox] : d[ox];
                else     for (int ox = 0; ox < OW; ox++) d[ox] += h[ox];
            }
            if (!max)
                for (int ox = 0; ox < OW; ox++) d[ox] /= (float)((y1 - y0) * (x1[ox] - x0[ox]));
        }
    }
    free(x0);
    free(hrow);
}

static void pool2d(float *out, const float *inp, size_t P, int H, int W, int K, int stride,
                   int pad, int kind) {
    Pool2d a = {out, inp, H, W, K, stride, pad, conv_out_size(H, K, stride, pad),
                conv_out_size(W, K, stride, pad), kind};
    parallel_for(P, 1, pool2d_range, &a);
}

// out (P, OH, OW), OH = (H + 2 pad - K) / stride + 1
void maxpool2d_forward(float *out, const float *inp, size_t P, int H, int W, int K, int stride,
                       int pad) {
    pool2d(out, inp, P, H, W, K, stride, pad, POOL_MAX);
}
void avgpool2d_valid_forward(float *out, const float *inp, size_t P, int H, int W, int K,
                             int stride, int pad) {
    pool2d(out, inp, P, H, W, K, stride, pad, POOL_AVG_VALID);
}

// ---------------------------------------------------------------------------
// ---- op: linear ----
// ---------------------------------------------------------------------------

// out (N,OUT) = inp (N,IN) @ weight (OUT,IN)^T + bias (OUT)
void linear_forward(float *out, const float *inp, const float *weight, const float *bias,
                    int N, int IN, int OUT) {
    flops_forward += 2.0 * N * (double)IN * OUT;
    if (bias)
        for (int n = 0; n < N; n++) memcpy(out + (size_t)n * OUT, bias, OUT * sizeof(float));
    sgemm(0, 1, (size_t)N, (size_t)OUT, (size_t)IN, inp, IN, weight, IN, bias != NULL, out, OUT);
}

void linear_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                     const float *inp, const float *weight, int N, int IN, int OUT) {
    if (dinp) sgemm(0, 0, (size_t)N, (size_t)IN, (size_t)OUT, dout, OUT, weight, IN, 1, dinp, IN);
    if (dweight)
        sgemm(1, 0, (size_t)OUT, (size_t)IN, (size_t)N, dout, OUT, inp, IN, 1, dweight, IN);
    if (dbias)
        for (int o = 0; o < OUT; o++) {
            float s = 0.0f;
            for (int n = 0; n < N; n++) s += dout[(size_t)n * OUT + o];
            dbias[o] += s;
        }
}

// linear: x (N,IN), w (OUT,IN), b (OUT) or NULL
static void linear_node_backward(Graph *g, TapeNode *n) {
    Tensor *x = n->in[0], *w = n->in[1];
    linear_backward(input_grad(g, n, 0), input_grad(g, n, 1), input_grad(g, n, 2), n->out->grad,
                    x->data, w->data, x->shape[0], w->shape[1], w->shape[0]);
}

// as graph ops: dx (N,IN) = dy (N,OUT) @ w (OUT,IN), a matmul
static void linear_vjp(Graph *g, TapeNode *n, Tensor *dy) {
    Tensor *x = n->in[0], *w = n->in[1];
    if (base_of(w)->on_path || (n->in[2] && base_of(n->in[2])->on_path))
        fatal("graph_grad: linear with a weight or bias that depends on the input");
    int sd[3] = {1, dy->shape[0], dy->shape[1]}, sw[3] = {1, w->shape[0], w->shape[1]};
    node_vjp_add(g, x, matmul(g, reshape(g, dy, 3, sd), reshape(g, w, 3, sw), 0, 0));
}

Tensor *linear(Graph *g, Tensor *x, Tensor *w, Tensor *b) {
    if (x->ndim != 2 || w->ndim != 2 || w->shape[1] != x->shape[1] ||
        (b && (int)b->size != w->shape[0])) {
        char sx[64], sw[64];
        shape_str(x, sx, sizeof sx);
        shape_str(w, sw, sizeof sw);
        fatal("linear: input %s does not fit weight %s", sx, sw);
    }
    int s[2] = {x->shape[0], w->shape[0]};
    Tensor *y = tensor_new(g, 2, s);
    linear_forward(y->data, x->data, w->data, data_of(b), x->shape[0], x->shape[1], w->shape[0]);
    if (wants_grad(g, x, w, b)) record(g, "linear", linear_node_backward, y, x, w, b)->vjp = linear_vjp;
    return y;
}

// ---------------------------------------------------------------------------
// ---- op: batched matmul ----
// ---------------------------------------------------------------------------

// out[b] (M,N) = op(a[b]) (M,K) @ op(b[b]) (K,N); a[b] is (M,K), or (K,M) if transA
typedef struct {
    float *out; const float *a, *b;
    int transA, transB, M, N, K;
    // backward
    float *da, *db; const float *dout;
} Matmul;

static void matmul_forward_range(void *arg, size_t b0, size_t b1) {
    const Matmul *m = arg;
    size_t sa = (size_t)m->M * m->K, sb = (size_t)m->K * m->N, so = (size_t)m->M * m->N;
    for (size_t i = b0; i < b1; i++)
        sgemm(m->transA, m->transB, m->M, m->N, m->K, m->a + i * sa, m->transA ? m->M : m->K,
              m->b + i * sb, m->transB ? m->K : m->N, 0, m->out + i * so, m->N);
}

void matmul_forward(float *out, const float *a, const float *b, int batch, int M, int N, int K,
                    int transA, int transB) {
    Matmul m = {.out = out, .a = a, .b = b, .transA = transA, .transB = transB, .M = M, .N = N,
                .K = K};
    flops_forward += 2.0 * batch * (double)M * N * K;
    parallel_for((size_t)batch, 1, matmul_forward_range, &m);
}

static void matmul_backward_range(void *arg, size_t b0, size_t b1) {
    const Matmul *m = arg;
    size_t M = m->M, N = m->N, K = m->K;
    size_t lda = m->transA ? M : K, ldb = m->transB ? K : N;
    for (size_t i = b0; i < b1; i++) {
        const float *a = m->a + i * M * K, *b = m->b + i * K * N, *dc = m->dout + i * M * N;
        if (m->da) {
            float *da = m->da + i * M * K;
            if (!m->transA)  // dA (M,K) += dC (M,N) @ op(B)^T (N,K)
                sgemm(0, !m->transB, M, K, N, dc, N, b, ldb, 1, da, lda);
            else             // dA (K,M) += op(B) (K,N) @ dC^T (N,M)
                sgemm(m->transB, 1, K, M, N, b, ldb, dc, N, 1, da, lda);
        }
        if (m->db) {
            float *db = m->db + i * K * N;
            if (!m->transB)  // dB (K,N) += op(A)^T (K,M) @ dC (M,N)
                sgemm(!m->transA, 0, K, N, M, a, lda, dc, N, 1, db, ldb);
            else             // dB (N,K) += dC^T (N,M) @ op(A) (M,K)
                sgemm(1, m->transA, N, K, M, dc, N, a, lda, 1, db, ldb);
        }
    }
}

void matmul_backward(float *da, float *db, const float *dout, const float *a, const float *b,
                     int batch, int M, int N, int K, int transA, int transB) {
    Matmul m = {.a = a, .b = b, .transA = transA, .transB = transB, .M = M, .N = N, .K = K,
                .da = da, .db = db, .dout = dout};
    parallel_for((size_t)batch, 1, matmul_backward_range, &m);
}

// matmul: a (B,M,K) or (B,K,M) if transA; b (B,K,N) or (B,N,K) if transB; 2-D = batch 1
static void matmul_dims(const Tensor *t, int *batch, int *r, int *c) {
    if (t->ndim == 2) { *batch = 1; *r = t->shape[0]; *c = t->shape[1]; }
    else if (t->ndim == 3) { *batch = t->shape[0]; *r = t->shape[1]; *c = t->shape[2]; }
    else fatal("matmul: expected a 2-D or 3-D tensor, got %d-D", t->ndim);
}

typedef struct { int transA, transB, batch, M, N, K; } MatmulState;

static void matmul_node_backward(Graph *g, TapeNode *n) {
    const MatmulState *s = n->state;
    matmul_backward(input_grad(g, n, 0), input_grad(g, n, 1), n->out->grad, n->in[0]->data,
                    n->in[1]->data, s->batch, s->M, s->N, s->K, s->transA, s->transB);
}

Tensor *matmul(Graph *g, Tensor *a, Tensor *b, int transA, int transB) {
    int ba, ar, ac, bb, br, bc;
    matmul_dims(a, &ba, &ar, &ac);
    matmul_dims(b, &bb, &br, &bc);
    int M = transA ? ac : ar, K = transA ? ar : ac, K2 = transB ? bc : br, N = transB ? br : bc;
    if (ba != bb || K != K2) {
        char sa[64], sb[64];
        shape_str(a, sa, sizeof sa);
        shape_str(b, sb, sizeof sb);
        fatal("matmul: %s%s @ %s%s do not fit", sa, transA ? "^T" : "", sb, transB ? "^T" : "");
    }
    int s[3] = {ba, M, N};
    Tensor *y = a->ndim == 3 ? tensor_new(g, 3, s) : tensor_new(g, 2, s + 1);
    matmul_forward(y->data, a->data, b->data, ba, M, N, K, transA, transB);
    if (wants_grad(g, a, b, NULL)) {
        TapeNode *nd = record(g, "matmul", matmul_node_backward, y, a, b, NULL);
        MatmulState s = {.transA = transA, .transB = transB, .batch = ba, .M = M, .N = N, .K = K};
        save_state(g, nd, &s, sizeof s);
    }
    return y;
}

// ---------------------------------------------------------------------------
// ---- op: group norm and its fused forms ----
// groupnorm; groupnorm_film_silu (the norm, FiLM, SiLU and dropout in one pass);
// norm_conv2d (that, then a convolution, the norm's output not kept)
// ---------------------------------------------------------------------------

// out (N,C,HW) = (inp - mean[n,g]) * rstd[n,g] * gamma[c] + beta[c]
// Statistics in double over the (C/G)*HW elements of a group, variance
// biased, as torch.nn.GroupNorm (eps inside the square root).
//
// The same kernels also do the U-Net's fused form (improved-diffusion's
// ResBlock with use_scale_shift_norm, and the plain norm + SiLU):
//   z = GN(x) * (1 + scale[n,c]) + shift[n,c]   (FiLM; scale, shift (N,C), optional)
//   out = silu(z)                               (optional)
// in one pass. Backward recomputes GN(x) and z from x and the statistics, so
// neither is stored: two activations fewer per ResBlock.
typedef struct {
    float *out, *mean, *rstd; const float *inp, *gamma, *beta;
    float *dinp, *dgamma, *dbeta; const float *dout;
    int N, C, HW, G; float eps;
    const float *scale, *shift;   // FiLM (N,C) or NULL
    float *dscale, *dshift;       // their gradients (N,C) or NULL
    int silu;                     // out = silu(z)
    float *dz;                    // fused backward: scratch of C*HW floats (one group per thread)
    // dropout after the silu: 1 = kept (scaled by keep_scale), or NULL
    const unsigned char *keep;
    float keep_scale;
    // norm_conv2d: out (forward) or dout (backward) are a same convolution's
    // padded planes instead of NCHW, a channel at a time through `stage`
    // (HW floats per thread), so the norm's output is never stored twice
    const ConvPlanes *planes;
    float *stage;
} GroupNorm;

// a channel of image n, HW floats, into its planes: W values and `pad`
// zeros a row, then `pad` zero rows (the margins are planes_zero_margins')
static void planes_put(float *planes, const ConvPlanes *g, int n, int c, const float *src) {
    float *d = planes + (size_t)c * g->ld + g->lead + (size_t)n * g->plane;
    for (int y = 0; y < g->H; y++, d += g->W1, src += g->W) {
        memcpy(d, src, (size_t)g->W * sizeof(float));
        memset(d + g->W, 0, (size_t)g->pad * sizeof(float));
    }
    memset(d, 0, (size_t)g->pad * g->W1 * sizeof(float));
}

static void planes_get(float *dst, const float *planes, const ConvPlanes *g, int n, int c) {
    const float *s = planes + (size_t)c * g->ld + g->lead + (size_t)n * g->plane;
    for (int y = 0; y < g->H; y++, s += g->W1, dst += g->W)
        memcpy(dst, s, (size_t)g->W * sizeof(float));
}

static void planes_zero_margins(float *planes, const ConvPlanes *g) {
    for (int c = 0; c < g->C; c++) {
        float *d = planes + (size_t)c * g->ld;
        memset(d, 0, g->lead * sizeof(float));
        memset(d + g->lead + g->npos, 0, (g->ld - g->lead - g->npos) * sizeof(float));
    }
}

// Sums in double over 8 interleaved lanes, then the lanes in order: the
// same result on every machine and thread count, and the compiler can keep
// the lanes in one vector register instead of waiting on one long chain of
// dependent adds (a double sum cannot otherwise be vectorised without
// reordering, which C forbids).
#define LANES 8
static double combine_lanes(const double *l) {
    double s = 0.0;
    for (int k = 0; k < LANES; k++) s += l[k];
    return s;
}

static double sum_lanes(const float *x, size_t n) {
    double l[LANES] = {0};
    size_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int k = 0; k < LANES; k++) l[k] += x[i + k];
    for (; i < n; i++) l[i % LANES] += x[i];
    return combine_lanes(l);
}

static double sum_sq_dev_lanes(const float *x, size_t n, double mean) {  // sum (x - mean)^2
    double l[LANES] = {0};
    size_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int k = 0; k < LANES; k++) { double d = x[i + k] - mean; l[k] += d * d; }
    for (; i < n; i++) { double d = x[i] - mean; l[i % LANES] += d * d; }
    return combine_lanes(l);
}

// sum dz, sum dz * xhat and sum dz * gn over one channel, xhat = (x - m) * rs
// and gn = x * sc + sh (the norm's output as the forward made it)
static void dz_sums_lanes(const float *dz, const float *x, size_t n, float m, float rs, float sc,
                          float sh, double *sum_dz, double *sum_dz_xhat, double *sum_dz_gn) {
    double a[LANES] = {0}, b[LANES] = {0}, c[LANES] = {0};
    size_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int k = 0; k < LANES; k++) {
            float xhat = (x[i + k] - m) * rs, gn = x[i + k] * sc + sh;
            a[k] += dz[i + k];
            b[k] += (double)dz[i + k] * xhat;
            c[k] += (double)dz[i + k] * gn;
        }
    for (; i < n; i++) {
        float xhat = (x[i] - m) * rs, gn = x[i] * sc + sh;
        a[i % LANES] += dz[i];
        b[i % LANES] += (double)dz[i] * xhat;
        c[i % LANES] += (double)dz[i] * gn;
    }
    *sum_dz = combine_lanes(a);
    *sum_dz_xhat = combine_lanes(b);
    *sum_dz_gn = combine_lanes(c);
}

// sum dy and sum dy * xhat, xhat = (x - m) * rs, over one channel
static void dy_sums_lanes(const float *dy, const float *x, size_t n, float m, float rs,
                          double *sum_dy, double *sum_dy_xhat) {
    double a[LANES] = {0}, b[LANES] = {0};
    size_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int k = 0; k < LANES; k++) {
            float xhat = (x[i + k] - m) * rs;
            a[k] += dy[i + k];
            b[k] += (double)dy[i + k] * xhat;
        }
    for (; i < n; i++) {
        float xhat = (x[i] - m) * rs;
        a[i % LANES] += dy[i];
        b[i % LANES] += (double)dy[i] * xhat;
    }
    *sum_dy = combine_lanes(a);
    *sum_dy_xhat = combine_lanes(b);
}

static void groupnorm_forward_range(void *arg, size_t r0, size_t r1) {
    const GroupNorm *a = arg;
    int cpg = a->C / a->G;
    size_t len = (size_t)cpg * a->HW;
    for (size_t r = r0; r < r1; r++) {  // r = n*G + g; the group is contiguous
        const float *x = a->inp + r * len;
        float *y = a->planes ? NULL : a->out + r * len;
        double mean = sum_lanes(x, len) / (double)len;
        double v = sum_sq_dev_lanes(x, len, mean);
        float m = (float)mean, rs = (float)(1.0 / sqrt(v / (double)len + a->eps));
        a->mean[r] = m;
        a->rstd[r] = rs;
        size_t n = r / (size_t)a->G;
        int c0 = (int)(r % (size_t)a->G) * cpg;
        for (int c = 0; c < cpg; c++) {
            float ga = a->gamma ? a->gamma[c0 + c] : 1.0f, be = a->beta ? a->beta[c0 + c] : 0.0f;
            float sc = rs * ga, sh = be - m * sc;
            const float *xc = x + (size_t)c * a->HW;
            float *yc = a->planes ? a->stage + (size_t)pool_thread_id() * a->HW
                                  : y + (size_t)c * a->HW;
            if (!a->scale && !a->shift && !a->silu && !a->keep) {  // the plain norm
                for (int i = 0; i < a->HW; i++) yc[i] = xc[i] * sc + sh;
            } else {
                size_t nc = n * (size_t)a->C + (size_t)(c0 + c);
                float s1 = a->scale ? 1.0f + a->scale[nc] : 1.0f,
                      t = a->shift ? a->shift[nc] : 0.0f;
                for (int i = 0; i < a->HW; i++) yc[i] = (xc[i] * sc + sh) * s1 + t;
                if (a->silu) silu_array(yc, yc, (size_t)a->HW);
                if (a->keep) {
                    const unsigned char *kc = a->keep + r * len + (size_t)c * a->HW;
                    for (int i = 0; i < a->HW; i++) yc[i] = kc[i] ? yc[i] * a->keep_scale : 0.0f;
                }
            }
            if (a->planes) planes_put(a->out, a->planes, (int)n, c0 + c, yc);
        }
    }
}

void groupnorm_forward(float *out, float *mean, float *rstd, const float *inp, const float *gamma,
                       const float *beta, int N, int C, int HW, int G, float eps) {
    GroupNorm a = {.out = out, .mean = mean, .rstd = rstd, .inp = inp, .gamma = gamma, .beta = beta,
                   .N = N, .C = C, .HW = HW, .G = G, .eps = eps, .keep_scale = 1.0f};
    parallel_for((size_t)N * G, 1, groupnorm_forward_range, &a);
}

// dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dy * gamma.
// A thread owns whole groups across the batch, so dgamma/dbeta sums over n
// are private and in order (and so are the (n,c) entries of dscale/dshift).
static void groupnorm_backward_range(void *arg, size_t g0, size_t g1) {
    const GroupNorm *a = arg;
    int cpg = a->C / a->G;
    size_t len = (size_t)cpg * a->HW;
    int fused = a->scale || a->silu || a->keep || a->planes;
    for (size_t g = g0; g < g1; g++) {
        for (int n = 0; n < a->N; n++) {
            size_t r = (size_t)n * a->G + g;
            const float *x = a->inp + r * len, *dy = a->planes ? NULL : a->dout + r * len;
            float m = a->mean[r], rs = a->rstd[r];
            // the gradient at the norm's output is buf * s1 (s1 = 1 unfused)
            const float *buf = dy;
            if (fused) {  // through dropout, silu and FiLM: dz at the FiLM output, z as the forward
                          // made it
                float *d = a->dz + g * len;
                for (int c = 0; c < cpg; c++) {
                    size_t ch = g * cpg + c, nc = (size_t)n * a->C + ch;
                    float ga = a->gamma ? a->gamma[ch] : 1.0f, be = a->beta ? a->beta[ch] : 0.0f;
                    float sc = rs * ga, sh = be - m * sc;
                    float s1 = a->scale ? 1.0f + a->scale[nc] : 1.0f,
                          t = a->shift ? a->shift[nc] : 0.0f;
                    const float *xc = x + (size_t)c * a->HW;
                    const unsigned char *kc = a->keep ? a->keep + r * len + (size_t)c * a->HW
                                                      : NULL;
                    float *dc = d + (size_t)c * a->HW;
                    const float *dyc = dy ? dy + (size_t)c * a->HW : dc;
                    if (!dy && a->silu) {  // dy out of the planes, beside dc
                        float *st = a->stage + (size_t)pool_thread_id() * a->HW;
                        planes_get(st, a->dout, a->planes, n, (int)ch);
                        dyc = st;
                    } else if (!dy) {
                        planes_get(dc, a->dout, a->planes, n, (int)ch);
                    }
                    if (a->silu) {  // dz = dy silu'(z), z remade in dc first
                        for (int i = 0; i < a->HW; i++) dc[i] = (xc[i] * sc + sh) * s1 + t;
                        silu_grad_array(dc, dyc, dc, (size_t)a->HW);
                    } else if (dyc != dc) {
                        memcpy(dc, dyc, (size_t)a->HW * sizeof(float));
                    }
                    if (kc)
                        for (int i = 0; i < a->HW; i++) dc[i] = kc[i] ? dc[i] * a->keep_scale : 0.0f;
                }
                buf = d;
            }
            // per channel, one pass: db = sum dy, dg = sum dy xhat (dy = buf * s1), and
            // for FiLM dshift = sum dz, dscale = sum dz gn. dxhat = dy * gamma, so
            // sum dxhat = gamma db and sum dxhat xhat = gamma dg.
            double sum_dxhat = 0.0, sum_dxhat_xhat = 0.0;
            for (int c = 0; c < cpg; c++) {
                size_t ch = g * cpg + c, nc = (size_t)n * a->C + ch;
                float ga = a->gamma ? a->gamma[ch] : 1.0f;
                float s1 = fused && a->scale ? 1.0f + a->scale[nc] : 1.0f;
                double sb, sbx;
                if (fused) {
                    float be = a->beta ? a->beta[ch] : 0.0f, sc = rs * ga, sh = be - m * sc;
                    double sbgn;
                    dz_sums_lanes(buf + (size_t)c * a->HW, x + (size_t)c * a->HW, (size_t)a->HW, m,
                                  rs, sc, sh, &sb, &sbx, &sbgn);
                    if (a->dscale) a->dscale[nc] += (float)sbgn;
                    if (a->dshift) a->dshift[nc] += (float)sb;
                } else {
                    dy_sums_lanes(buf + (size_t)c * a->HW, x + (size_t)c * a->HW, (size_t)a->HW, m,
                                  rs, &sb, &sbx);
                }
                double db = s1 * sb, dg = s1 * sbx;
                sum_dxhat += ga * db;
                sum_dxhat_xhat += ga * dg;
                if (a->dgamma) a->dgamma[ch] += (float)dg;
                if (a->dbeta) a->dbeta[ch] += (float)db;
            }
            if (!a->dinp) continue;
            float *dx = a->dinp + r * len;
            float mdx = (float)(sum_dxhat / (double)len),
                  mdxx = (float)(sum_dxhat_xhat / (double)len);
            for (int c = 0; c < cpg; c++) {
                size_t ch = g * cpg + c, nc = (size_t)n * a->C + ch;
                float ga = a->gamma ? a->gamma[ch] : 1.0f;
                float f = (fused && a->scale ? 1.0f + a->scale[nc] : 1.0f) * ga;
                const float *bc = buf + (size_t)c * a->HW, *xc = x + (size_t)c * a->HW;
                float *dxc = dx + (size_t)c * a->HW;
                for (int i = 0; i < a->HW; i++) {
                    float xhat = (xc[i] - m) * rs;
                    dxc[i] += rs * (bc[i] * f - mdx - xhat * mdxx);
                }
            }
        }
    }
}

void groupnorm_backward(float *dinp, float *dgamma, float *dbeta, const float *dout,
                        const float *inp, const float *mean, const float *rstd, const float *gamma,
                        int N, int C, int HW, int G) {
    GroupNorm a = {.mean = (float *)mean, .rstd = (float *)rstd, .inp = inp, .gamma = gamma,
                   .dinp = dinp, .dgamma = dgamma, .dbeta = dbeta, .dout = dout,
                   .N = N, .C = C, .HW = HW, .G = G, .keep_scale = 1.0f};
    parallel_for((size_t)G, 1, groupnorm_backward_range, &a);
}

// the fused form: out = [silu](GN(x) * (1 + scale) + shift); scale, shift (N,C) may be NULL
void groupnorm_film_silu_forward(float *out, float *mean, float *rstd, const float *inp,
                                 const float *gamma, const float *beta, const float *scale,
                                 const float *shift, int silu, const unsigned char *keep,
                                 float keep_scale, int N, int C, int HW, int G, float eps) {
    GroupNorm a = {.out = out, .mean = mean, .rstd = rstd, .inp = inp, .gamma = gamma, .beta = beta,
                   .N = N, .C = C, .HW = HW, .G = G, .eps = eps, .scale = scale, .shift = shift,
                   .silu = silu, .keep = keep, .keep_scale = keep_scale};
    parallel_for((size_t)N * G, 1, groupnorm_forward_range, &a);
}

// dz: scratch of C*HW floats
void groupnorm_film_silu_backward(float *dinp, float *dgamma, float *dbeta, float *dscale,
                                  float *dshift, const float *dout, const float *inp,
                                  const float *mean, const float *rstd, const float *gamma,
                                  const float *beta, const float *scale, const float *shift,
                                  int silu, const unsigned char *keep, float keep_scale, float *dz,
                                  int N, int C, int HW, int G) {
    GroupNorm a = {.mean = (float *)mean, .rstd = (float *)rstd, .inp = inp, .gamma = gamma,
                   .beta = beta, .dinp = dinp, .dgamma = dgamma, .dbeta = dbeta, .dout = dout,
                   .N = N, .C = C, .HW = HW, .G = G, .scale = scale, .shift = shift,
                   .dscale = dscale, .dshift = dshift, .silu = silu, .dz = dz, .keep = keep,
                   .keep_scale = keep_scale};
    parallel_for((size_t)G, 1, groupnorm_backward_range, &a);
}

// ---- reference: group norm with FiLM, SiLU and dropout, one element at a time in double ----
// Per (n, group): mean m and biased variance v over its C/G channels x HW
// pixels, xhat = (x - m) / sqrt(v + eps), y = xhat * gamma + beta,
// z = y * (1 + scale[n,c]) + shift[n,c], out = keep * (silu ? z sigmoid(z) : z).
// Backward: dz by the chain rule, then the normalisation's own backward
// dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) over the group.
// The statistics are computed here, not taken from the fast forward.
typedef struct {
    const float *inp, *gamma, *beta, *scale, *shift;
    int silu; const unsigned char *keep; float keep_scale;
    int C, HW, G; float eps;
} NormRef;

static void norm_ref_stats(const NormRef *r, int n, int grp, double *mean, double *rstd) {
    int cg = r->C / r->G;
    size_t len = (size_t)cg * r->HW;
    const float *x = r->inp + ((size_t)n * r->C + (size_t)grp * cg) * r->HW;
    double s = 0.0, s2 = 0.0;
    for (size_t i = 0; i < len; i++) s += x[i];
    *mean = s / (double)len;
    for (size_t i = 0; i < len; i++) s2 += (x[i] - *mean) * (x[i] - *mean);
    *rstd = 1.0 / sqrt(s2 / (double)len + r->eps);
}

// element i of channel c of image n: y (after the affine), z (after FiLM), the factor 1 + scale
static void norm_ref_point(const NormRef *r, int n, int c, size_t i, double mean, double rstd,
                           double *xhat, double *y, double *z, double *film) {
    size_t nc = (size_t)n * r->C + c;
    *xhat = (r->inp[nc * r->HW + i] - mean) * rstd;
    *y = *xhat * (r->gamma ? r->gamma[c] : 1.0) + (r->beta ? r->beta[c] : 0.0);
    *film = 1.0 + (r->scale ? r->scale[nc] : 0.0);
    *z = *y * *film + (r->shift ? r->shift[nc] : 0.0);
}

static double norm_ref_keep(const NormRef *r, size_t at) {
    return r->keep ? (r->keep[at] ? r->keep_scale : 0.0) : 1.0;
}

void groupnorm_film_silu_forward_ref(float *out, const float *inp, const float *gamma,
                                     const float *beta, const float *scale, const float *shift,
                                     int silu, const unsigned char *keep, float keep_scale, int N,
                                     int C, int HW, int G, float eps) {
    NormRef r = {inp, gamma, beta, scale, shift, silu, keep, keep_scale, C, HW, G, eps};
    int cg = C / G;
    for (int n = 0; n < N; n++)
        for (int grp = 0; grp < G; grp++) {
            double mean, rstd, xhat, y, z, film;
            norm_ref_stats(&r, n, grp, &mean, &rstd);
            for (int c = grp * cg; c < (grp + 1) * cg; c++)
                for (size_t i = 0; i < (size_t)HW; i++) {
                    size_t at = ((size_t)n * C + c) * HW + i;
                    norm_ref_point(&r, n, c, i, mean, rstd, &xhat, &y, &z, &film);
                    double a = silu ? z / (1.0 + exp(-z)) : z;
                    out[at] = (float)(a * norm_ref_keep(&r, at));
                }
        }
}

void groupnorm_film_silu_backward_ref(float *dinp, float *dgamma, float *dbeta, float *dscale,
                                      float *dshift, const float *dout, const float *inp,
                                      const float *gamma, const float *beta, const float *scale,
                                      const float *shift, int silu, const unsigned char *keep,
                                      float keep_scale, int N, int C, int HW, int G, float eps) {
    NormRef r = {inp, gamma, beta, scale, shift, silu, keep, keep_scale, C, HW, G, eps};
    int cg = C / G;
    size_t len = (size_t)cg * HW;
    double *dxhat = mallocCheck(len * sizeof(double)), *xh = mallocCheck(len * sizeof(double));
    double *dg = callocCheck((size_t)C, sizeof(double)),
           *db = callocCheck((size_t)C, sizeof(double));
    for (int n = 0; n < N; n++)
        for (int grp = 0; grp < G; grp++) {
            double mean, rstd, xhat, y, z, film, sum_d = 0.0, sum_dx = 0.0;
            norm_ref_stats(&r, n, grp, &mean, &rstd);
            for (int c = grp * cg; c < (grp + 1) * cg; c++) {
                size_t nc = (size_t)n * C + c;
                double ds = 0.0, dt = 0.0;
                for (size_t i = 0; i < (size_t)HW; i++) {
                    size_t at = nc * HW + i, k = (size_t)(c - grp * cg) * HW + i;
                    norm_ref_point(&r, n, c, i, mean, rstd, &xhat, &y, &z, &film);
                    double sg = 1.0 / (1.0 + exp(-z));
                    double dz = dout[at] * norm_ref_keep(&r, at) *
                                (silu ? sg * (1.0 + z * (1.0 - sg)) : 1.0);
                    dt += dz;                          // d shift
                    ds += dz * y;                      // d scale
                    double dy = dz * film;
                    dg[c] += dy * xhat;
                    db[c] += dy;
                    dxhat[k] = dy * (gamma ? gamma[c] : 1.0);
                    xh[k] = xhat;
                    sum_d += dxhat[k];
                    sum_dx += dxhat[k] * xhat;
                }
                if (dscale) dscale[nc] += (float)ds;
                if (dshift) dshift[nc] += (float)dt;
            }
            if (!dinp) continue;
            float *dx = dinp + ((size_t)n * C + (size_t)grp * cg) * HW;
            for (size_t k = 0; k < len; k++)
                dx[k] += (float)(rstd *
                                 (dxhat[k] - sum_d / (double)len - xh[k] * sum_dx / (double)len));
        }
    for (int c = 0; c < C; c++) {
        if (dgamma) dgamma[c] += (float)dg[c];
        if (dbeta) dbeta[c] += (float)db[c];
    }
    free(dxhat); free(xh); free(dg); free(db);
}

// groupnorm: x (N,C,H,W), gamma and beta (C) or NULL
typedef struct {
    int groups;
    float *mean, *rstd;   // (N, groups), from forward
} GroupNormState;

static void groupnorm_node_backward(Graph *g, TapeNode *n) {
    const GroupNormState *s = n->state;
    Tensor *x = n->in[0], *gamma = n->in[1];
    groupnorm_backward(input_grad(g, n, 0), input_grad(g, n, 1), input_grad(g, n, 2), n->out->grad,
                       x->data, s->mean, s->rstd, data_of(gamma), x->shape[0],
                       x->shape[1], x->shape[2] * x->shape[3], s->groups);
}

Tensor *groupnorm(Graph *g, Tensor *x, Tensor *gamma, Tensor *beta, int groups, float eps) {
    check_4d(x, "groupnorm");
    int N = x->shape[0], C = x->shape[1];
    if (groups < 1 || C % groups)
        fatal("groupnorm: %d channels do not split into %d groups", C, groups);
    if ((gamma && (int)gamma->size != C) || (beta && (int)beta->size != C))
        fatal("groupnorm: affine parameters must have %d elements", C);
    Tensor *y = tensor_new(g, 4, x->shape);
    int rec = wants_grad(g, x, gamma, beta);
    ArenaMark m = arena_mark(&g->arena);
    float *mean = arena_floats(&g->arena, (size_t)N * groups),
          *rstd = arena_floats(&g->arena, (size_t)N * groups);
    groupnorm_forward(y->data, mean, rstd, x->data, data_of(gamma), data_of(beta),
                      N, C, x->shape[2] * x->shape[3], groups, eps);
    if (rec) {
        TapeNode *nd = record(g, "groupnorm", groupnorm_node_backward, y, x, gamma, beta);
        GroupNormState s = {.groups = groups, .mean = mean, .rstd = rstd};
        save_state(g, nd, &s, sizeof s);
    } else {
        arena_release(&g->arena, m);  // no-grad: the statistics are not kept
    }
    return y;
}

// [silu](groupnorm(x) * (1 + scale) + shift): one node; in[3], in[4] = scale, shift
typedef struct {
    int groups, silu;
    float *mean, *rstd;   // (N, groups), from forward
    unsigned char *keep;  // dropout mask or NULL
    float keep_scale;     // 1 / (1 - p)
} FilmNormState;

static void groupnorm_film_silu_node_backward(Graph *g, TapeNode *n) {
    const FilmNormState *s = n->state;
    Tensor *x = n->in[0], *gamma = n->in[1], *beta = n->in[2], *scale = n->in[3], *shift = n->in[4];
    float *dx = input_grad(g, n, 0), *dgamma = input_grad(g, n, 1), *dbeta = input_grad(g, n, 2);
    float *dscale = input_grad(g, n, 3), *dshift = input_grad(g, n, 4);
    ArenaMark m = arena_mark(&g->arena);
    float *dz = arena_floats(&g->arena, x->size / (size_t)x->shape[0]);
    groupnorm_film_silu_backward(dx, dgamma, dbeta, dscale, dshift, n->out->grad, x->data, s->mean,
                                 s->rstd, data_of(gamma), data_of(beta), data_of(scale),
                                 data_of(shift), s->silu, s->keep, s->keep_scale, dz, x->shape[0],
                                 x->shape[1], x->shape[2] * x->shape[3], s->groups);
    arena_release(&g->arena, m);
}

// What groupnorm_film_silu and norm_conv2d share: the shape checks, and the
// dropout mask (training only), drawn first, one uniform per element in
// order (as the dropout op), kept as bytes for backward; NULL without dropout.
static void check_norm(const char *op, const Tensor *x, const Tensor *gamma, const Tensor *beta,
                       const Tensor *scale, const Tensor *shift, int groups) {
    check_4d(x, op);
    int N = x->shape[0], C = x->shape[1];
    if (groups < 1 || C % groups)
        fatal("%s: %d channels do not split into %d groups", op, C, groups);
    if ((gamma && (int)gamma->size != C) || (beta && (int)beta->size != C))
        fatal("%s: affine parameters must have %d elements", op, C);
    if ((scale && scale->size != (size_t)N * C) || (shift && shift->size != (size_t)N * C))
        fatal("%s: scale and shift must have N*C = %d elements", op, N * C);
}

// a dropout mask of n elements over `rows` batch rows; when the graph's
// batch is rows batch_first.. of a batch of batch_total (a rank's share, a
// micro-batch), the mask is those rows of the whole batch's mask, so the
// same image gets the same mask however the batch is split
static void graph_fill_keep(Graph *g, unsigned char *keep, size_t n, int rows, float p) {
    if (g->batch_total <= 0) {
        rng_fill_keep(g->rng, keep, n, p);
        return;
    }
    if (rows <= 0 || n % (size_t)rows != 0 || g->batch_first + rows > g->batch_total)
        fatal("dropout: %zu elements over %d rows is not rows %d.. of a batch of %d", n, rows,
              g->batch_first, g->batch_total);
    size_t per = n / (size_t)rows;
    rng_fill_keep_part(g->rng, keep, per * (size_t)g->batch_first, n, per * (size_t)g->batch_total,
                       p);
}

static unsigned char *norm_dropout_mask(Graph *g, const char *op, size_t n, int rows, float p,
                                        float *keep_scale) {
    *keep_scale = 1.0f;
    if (!g->training || p <= 0.0f) return NULL;
    if (p >= 1.0f) fatal("%s: dropout p=%g must be below 1", op, p);
    if (!g->rng) fatal("%s: the graph has no RNG while training", op);
    unsigned char *keep = arena_alloc(&g->arena, n);
    *keep_scale = 1.0f / (1.0f - p);
    graph_fill_keep(g, keep, n, rows, p);
    return keep;
}

Tensor *groupnorm_film_silu(Graph *g, Tensor *x, Tensor *gamma, Tensor *beta, Tensor *scale,
                            Tensor *shift, int silu_after, float dropout_p, int groups, float eps) {
    check_norm("groupnorm_film_silu", x, gamma, beta, scale, shift, groups);
    int N = x->shape[0], C = x->shape[1];
    Tensor *y = tensor_new(g, 4, x->shape);
    int rec = wants_grad(g, x, gamma, beta) ||
              (g->grad_enabled &&
               ((scale && scale->requires_grad) || (shift && shift->requires_grad)));
    float keep_scale;
    unsigned char *keep = norm_dropout_mask(g, "groupnorm_film_silu", x->size, N, dropout_p,
                                            &keep_scale);
    ArenaMark m = arena_mark(&g->arena);
    float *mean = arena_floats(&g->arena, (size_t)N * groups),
          *rstd = arena_floats(&g->arena, (size_t)N * groups);
    groupnorm_film_silu_forward(y->data, mean, rstd, x->data, data_of(gamma), data_of(beta),
                                data_of(scale), data_of(shift), silu_after, keep, keep_scale,
                                N, C, x->shape[2] * x->shape[3], groups, eps);
    if (rec) {
        TapeNode *nd = record(g, "groupnorm_film_silu", groupnorm_film_silu_node_backward, y, x,
                              gamma, beta);
        nd->in[3] = scale;
        nd->in[4] = shift;
        FilmNormState s = {.groups = groups, .silu = silu_after, .mean = mean, .rstd = rstd,
                           .keep = keep, .keep_scale = keep_scale};
        save_state(g, nd, &s, sizeof s);
    } else {
        arena_release(&g->arena, m);  // no-grad: the statistics are not kept
    }
    return y;
}

Tensor *groupnorm_silu(Graph *g, Tensor *x, Tensor *gamma, Tensor *beta, int groups, float eps) {
    return groupnorm_film_silu(g, x, gamma, beta, NULL, NULL, 1, 0.0f, groups, eps);
}

// norm_conv2d: what the node keeps besides x, w, b and the residual (in[0..3])
typedef struct {
    NormSpec ns;
    int pad;
    unsigned char *keep;  // dropout mask or NULL (the statistics are recomputed with the output)
    float keep_scale;
} NormConv;

// norm_conv2d writes its norm's output into the planes when its convolution
// runs on them with the whole batch in one group of images
static int norm_conv_on_planes(int N, int C, int OC, int H, int W, int K, int pad) {
    return conv_on_planes(H, W, K, 1, pad) && planes_images(N, C, OC, H, W, pad) == N &&
           !conv_on_winograd(N, C, OC, H, W, K, 1, pad);
}

// the norm of norm_conv2d straight into its convolution's planes (the
// margins zeroed here, the rest written by the norm); stage from the arena
static void norm_into_planes(Graph *g, float *planes, const ConvPlanes *gp, float *mean,
                             float *rstd, const Tensor *x, const NormSpec *ns,
                             const NormConv *nc) {
    int N = x->shape[0], C = x->shape[1], HW = x->shape[2] * x->shape[3];
    planes_zero_margins(planes, gp);
    GroupNorm a = {.out = planes, .mean = mean, .rstd = rstd, .inp = x->data,
                   .gamma = data_of(ns->gamma), .beta = data_of(ns->beta), .N = N, .C = C,
                   .HW = HW, .G = ns->groups, .eps = ns->eps, .scale = data_of(ns->scale),
                   .shift = data_of(ns->shift), .silu = ns->silu, .keep = nc->keep,
                   .keep_scale = nc->keep_scale, .planes = gp,
                   .stage = arena_floats(&g->arena, (size_t)pool_threads() * HW)};
    parallel_for((size_t)N * ns->groups, 1, groupnorm_forward_range, &a);
}

// norm_conv2d's backward when its convolution runs on planes: the norm's
// output remade into x's planes (the same kernel on the same x: the same
// bits), the convolution's input gradient left in its planes and read from
// there by the norm's backward
static void norm_conv2d_backward_planes(Graph *g, TapeNode *n, float *dx, float *dw, float *db,
                                        float *dgamma, float *dbeta, float *dscale,
                                        float *dshift) {
    const NormConv *nc = n->state;
    const NormSpec *ns = &nc->ns;
    Tensor *x = n->in[0], *w = n->in[1];
    int N = x->shape[0], C = x->shape[1], H = x->shape[2], W = x->shape[3], OC = w->shape[0],
        K = w->shape[2], pad = nc->pad;
    int need_dh = dx || dgamma || dbeta || dscale || dshift;
    float *mean = arena_floats(&g->arena, (size_t)N * ns->groups),
          *rstd = arena_floats(&g->arena, (size_t)N * ns->groups);
    float *col = arena_floats(&g->arena, conv2d_backward_scratch(N, C, H, W, OC, K, 1, pad));
    ConvPlanes gx = planes_of(N, C, H, W, pad);
    norm_into_planes(g, col, &gx, mean, rstd, x, ns, nc);
    if (db) {
        ConvSmall cs = {db, n->out->grad, N, OC, (size_t)H * W};
        parallel_for((size_t)OC, 1, conv_dbias_range, &cs);
    }
    float *dhp = conv_backward_planes(NULL, need_dh ? DX_PLANES : DX_NONE, dw, n->out->grad, NULL,
                                      w->data, col, N, C, H, W, OC, K, pad);
    if (!need_dh) return;
    GroupNorm a = {.mean = mean, .rstd = rstd, .inp = x->data, .gamma = data_of(ns->gamma),
                   .beta = data_of(ns->beta), .dinp = dx, .dgamma = dgamma, .dbeta = dbeta,
                   .dout = dhp, .N = N, .C = C, .HW = H * W, .G = ns->groups,
                   .scale = data_of(ns->scale), .shift = data_of(ns->shift), .dscale = dscale,
                   .dshift = dshift, .silu = ns->silu,
                   .dz = arena_floats(&g->arena, x->size / (size_t)N), .keep = nc->keep,
                   .keep_scale = nc->keep_scale, .planes = &gx,
                   .stage = arena_floats(&g->arena, (size_t)pool_threads() * H * W)};
    parallel_for((size_t)ns->groups, 1, groupnorm_backward_range, &a);
}

static void norm_conv2d_node_backward(Graph *g, TapeNode *n) {
    const NormConv *nc = n->state;
    const NormSpec *ns = &nc->ns;
    Tensor *x = n->in[0], *w = n->in[1], *res = n->in[3];
    int N = x->shape[0], C = x->shape[1], H = x->shape[2], W = x->shape[3], OC = w->shape[0],
        K = w->shape[2];
    int HW = H * W, pad = nc->pad;
    float *dx = input_grad(g, n, 0), *dw = input_grad(g, n, 1), *db = input_grad(g, n, 2);
    float *dgamma = ns->gamma && ns->gamma->requires_grad ? tensor_grad(g, ns->gamma) : NULL;
    float *dbeta = ns->beta && ns->beta->requires_grad ? tensor_grad(g, ns->beta) : NULL;
    float *dscale = ns->scale && ns->scale->requires_grad ? tensor_grad(g, ns->scale) : NULL;
    float *dshift = ns->shift && ns->shift->requires_grad ? tensor_grad(g, ns->shift) : NULL;
    int need_dh = dx || dgamma || dbeta || dscale || dshift;
    ArenaMark m = arena_mark(&g->arena);
    if (res && res->requires_grad) {
        float *dr = tensor_grad(g, res);
        for (size_t i = 0; i < n->out->size; i++) dr[i] += n->out->grad[i];
    }
    if (norm_conv_on_planes(N, C, OC, H, W, K, pad)) {
        norm_conv2d_backward_planes(g, n, dx, dw, db, dgamma, dbeta, dscale, dshift);
        arena_release(&g->arena, m);
        return;
    }
    // the norm's output and statistics again: the same kernel on the same x, so the same bits
    float *h = arena_floats(&g->arena, x->size);
    float *mean = arena_floats(&g->arena, (size_t)N * ns->groups),
          *rstd = arena_floats(&g->arena, (size_t)N * ns->groups);
    groupnorm_film_silu_forward(h, mean, rstd, x->data, data_of(ns->gamma),
                                data_of(ns->beta), data_of(ns->scale),
                                data_of(ns->shift), ns->silu, nc->keep, nc->keep_scale,
                                N, C, HW, ns->groups, ns->eps);
    float *dh = need_dh ? arena_floats(&g->arena, x->size) : NULL;  // written, not added to
    float *col = arena_floats(&g->arena, conv2d_backward_scratch(N, C, H, W, OC, K, 1, pad));
    conv_backward(dh, dw, db, n->out->grad, h, w->data, col, N, C, H, W, OC, K, 1, pad, 1);
    if (need_dh) {
        float *dz = arena_floats(&g->arena, x->size / (size_t)N);
        groupnorm_film_silu_backward(dx, dgamma, dbeta, dscale, dshift, dh, x->data, mean, rstd,
                                     data_of(ns->gamma), data_of(ns->beta),
                                     data_of(ns->scale), data_of(ns->shift),
                                     ns->silu, nc->keep, nc->keep_scale, dz, N, C, HW, ns->groups);
    }
    arena_release(&g->arena, m);
}

Tensor *norm_conv2d(Graph *g, Tensor *x, const NormSpec *ns, Tensor *w, Tensor *b, Tensor *residual,
                    int pad) {
    check_norm("norm_conv2d", x, ns->gamma, ns->beta, ns->scale, ns->shift, ns->groups);
    int N = x->shape[0], C = x->shape[1], H = x->shape[2], W = x->shape[3];
    if (w->ndim != 4 || w->shape[1] != C || w->shape[2] != w->shape[3] ||
        (b && (int)b->size != w->shape[0]))
        fatal("norm_conv2d: weight does not fit %d input channels", C);
    int OC = w->shape[0], K = w->shape[2], OH = conv_out_size(H, K, 1, pad),
        OW = conv_out_size(W, K, 1, pad);
    if (residual && (residual->ndim != 4 || residual->shape[0] != N || residual->shape[1] != OC ||
                     residual->shape[2] != OH || residual->shape[3] != OW))
        fatal("norm_conv2d: residual must be (%d,%d,%d,%d)", N, OC, OH, OW);
    Tensor *y = tensor4(g, N, OC, OH, OW);  // first, so that the norm's output can go after it
    int rec = g->grad_enabled &&
              (x->requires_grad || w->requires_grad || (b && b->requires_grad) ||
               (residual && residual->requires_grad) || (ns->gamma && ns->gamma->requires_grad) ||
               (ns->beta && ns->beta->requires_grad) || (ns->scale && ns->scale->requires_grad) ||
               (ns->shift && ns->shift->requires_grad));
    NormConv nc = {.ns = *ns, .pad = pad, .keep = NULL, .keep_scale = 1.0f};
    nc.keep = norm_dropout_mask(g, "norm_conv2d", x->size, x->shape[0], ns->dropout,
                                &nc.keep_scale);
    ArenaMark m = arena_mark(&g->arena);
    float *mean = arena_floats(&g->arena, (size_t)N * ns->groups),
          *rstd = arena_floats(&g->arena, (size_t)N * ns->groups);
    float *col = arena_floats(&g->arena, conv2d_forward_scratch(N, C, H, W, OC, K, 1, pad));
    if (norm_conv_on_planes(N, C, OC, H, W, K, pad)) {  // the norm writes the conv's planes
        ConvPlanes gp = planes_of(N, C, H, W, pad);
        norm_into_planes(g, col, &gp, mean, rstd, x, ns, &nc);
        conv_forward_on_planes(y->data, col, w->data, data_of(b), NULL, data_of(residual), N, C,
                               H, W, OC, K, pad);
    } else {
        float *h = arena_floats(&g->arena, x->size);
        groupnorm_film_silu_forward(h, mean, rstd, x->data, data_of(ns->gamma),
                                    data_of(ns->beta), data_of(ns->scale),
                                    data_of(ns->shift), ns->silu, nc.keep, nc.keep_scale,
                                    N, C, H * W, ns->groups, ns->eps);
        conv2d_add_forward(y->data, h, w->data, data_of(b), NULL, data_of(residual), col,
                           N, C, H, W, OC, K, 1, pad);
    }
    arena_release(&g->arena, m);  // the norm's output and statistics are gone
    if (!rec) return y;
    TapeNode *nd = record(g, "norm_conv2d", norm_conv2d_node_backward, y, x, w, b);
    nd->in[3] = residual;
    save_state(g, nd, &nc, sizeof nc);
    return y;
}

// ---------------------------------------------------------------------------
// ---- op: batch norm (torch.nn.BatchNorm2d) ----
// taming's PatchGAN discriminator. y = (x - mean_c) * rstd_c * gamma_c + beta_c.
// Training: mean and biased variance of channel c over (N, H, W), and the
// running statistics move towards the mean and the unbiased variance (times
// M / (M - 1), M = N*H*W): r = (1 - momentum) r + momentum * batch, as torch.
// Eval: the running statistics normalise, and backward is the affine map.
// Sums in double, a channel per job: the same numbers at any thread count.
// ---------------------------------------------------------------------------
typedef struct {
    float *out, *mean, *rstd, *running_mean, *running_var;
    const float *inp, *gamma, *beta;
    int N, C, HW, training;
    float momentum, eps;
} BatchNormFwd;

static void batchnorm_forward_range(void *arg, size_t c0, size_t c1) {
    const BatchNormFwd *t = arg;
    size_t HW = (size_t)t->HW, M = (size_t)t->N * HW;
    for (size_t c = c0; c < c1; c++) {
        double mean, var;
        if (t->training) {
            double s = 0.0, ss = 0.0;
            for (int n = 0; n < t->N; n++) {
                const float *x = t->inp + ((size_t)n * t->C + c) * HW;
                for (size_t i = 0; i < HW; i++) s += x[i];
            }
            mean = s / (double)M;
            for (int n = 0; n < t->N; n++) {  // two passes: no cancellation
                const float *x = t->inp + ((size_t)n * t->C + c) * HW;
                for (size_t i = 0; i < HW; i++) ss += (x[i] - mean) * (x[i] - mean);
            }
            var = ss / (double)M;
            float m = t->momentum;
            t->running_mean[c] = (1.0f - m) * t->running_mean[c] + m * (float)mean;
            t->running_var[c] =
                (1.0f - m) * t->running_var[c] + m * (float)(ss / (double)(M - 1));
        } else {
            mean = t->running_mean[c];
            var = t->running_var[c];
        }
        float mu = (float)mean, r = (float)(1.0 / sqrt(var + (double)t->eps));
        float gm = t->gamma ? t->gamma[c] : 1.0f, bt = t->beta ? t->beta[c] : 0.0f;
        t->mean[c] = mu;
        t->rstd[c] = r;
        for (int n = 0; n < t->N; n++) {
            const float *x = t->inp + ((size_t)n * t->C + c) * HW;
            float *y = t->out + ((size_t)n * t->C + c) * HW;
            for (size_t i = 0; i < HW; i++) y[i] = (x[i] - mu) * r * gm + bt;
        }
    }
}

void batchnorm_forward(float *out, float *mean, float *rstd, const float *inp, const float *gamma,
                       const float *beta, float *running_mean, float *running_var, int N, int C,
                       int HW, float momentum, float eps, int training) {
    if (training && (size_t)N * HW < 2)
        fatal("batchnorm: training needs more than one value per channel (N*H*W = %d)", N * HW);
    BatchNormFwd t = {out, mean, rstd, running_mean, running_var, inp, gamma, beta,
                      N, C, HW, training, momentum, eps};
    parallel_for((size_t)C, 1, batchnorm_forward_range, &t);
}

typedef struct {
    float *dinp, *dgamma, *dbeta;
    const float *dout, *inp, *mean, *rstd, *gamma;
    int N, C, HW, training;
} BatchNormBwd;

// with xhat = (x - mean) rstd and g = dy gamma: training, dx = rstd (g -
// mean(g) - xhat mean(g xhat)) over the channel's M values; eval, dx = g rstd
static void batchnorm_backward_range(void *arg, size_t c0, size_t c1) {
    const BatchNormBwd *t = arg;
    size_t HW = (size_t)t->HW, M = (size_t)t->N * HW;
    for (size_t c = c0; c < c1; c++) {
        float mu = t->mean[c], r = t->rstd[c], gm = t->gamma ? t->gamma[c] : 1.0f;
        double sdy = 0.0, sdyx = 0.0;
        for (int n = 0; n < t->N; n++) {
            const float *x = t->inp + ((size_t)n * t->C + c) * HW;
            const float *dy = t->dout + ((size_t)n * t->C + c) * HW;
            for (size_t i = 0; i < HW; i++) {
                sdy += dy[i];
                sdyx += (double)dy[i] * ((x[i] - mu) * r);
            }
        }
        if (t->dgamma) t->dgamma[c] += (float)sdyx;
        if (t->dbeta) t->dbeta[c] += (float)sdy;
        if (!t->dinp) continue;
        float mg = t->training ? (float)(gm * sdy / (double)M) : 0.0f;
        float mgx = t->training ? (float)(gm * sdyx / (double)M) : 0.0f;
        for (int n = 0; n < t->N; n++) {
            const float *x = t->inp + ((size_t)n * t->C + c) * HW;
            const float *dy = t->dout + ((size_t)n * t->C + c) * HW;
            float *dx = t->dinp + ((size_t)n * t->C + c) * HW;
            for (size_t i = 0; i < HW; i++)
                dx[i] += r * (dy[i] * gm - mg - (x[i] - mu) * r * mgx);
        }
    }
}

void batchnorm_backward(float *dinp, float *dgamma, float *dbeta, const float *dout,
                        const float *inp, const float *mean, const float *rstd, const float *gamma,
                        int N, int C, int HW, int training) {
    BatchNormBwd t = {dinp, dgamma, dbeta, dout, inp, mean, rstd, gamma, N, C, HW, training};
    parallel_for((size_t)C, 1, batchnorm_backward_range, &t);
}

typedef struct { float *mean, *rstd; int training; } BatchNormState;

static void batchnorm_node_backward(Graph *g, TapeNode *n) {
    const BatchNormState *s = n->state;
    Tensor *x = n->in[0];
    batchnorm_backward(input_grad(g, n, 0), input_grad(g, n, 1), input_grad(g, n, 2),
                       n->out->grad, x->data, s->mean, s->rstd, data_of(n->in[1]), x->shape[0],
                       x->shape[1], x->shape[2] * x->shape[3], s->training);
}

Tensor *batchnorm2d(Graph *g, Tensor *x, Tensor *gamma, Tensor *beta, float *running_mean,
                    float *running_var, float momentum, float eps) {
    check_4d(x, "batchnorm2d");
    int N = x->shape[0], C = x->shape[1], HW = x->shape[2] * x->shape[3];
    if ((gamma && gamma->size != (size_t)C) || (beta && beta->size != (size_t)C))
        fatal("batchnorm2d: gamma and beta need %d values", C);
    Tensor *y = tensor_new(g, 4, x->shape);
    BatchNormState s = {arena_floats(&g->arena, C), arena_floats(&g->arena, C), g->training};
    batchnorm_forward(y->data, s.mean, s.rstd, x->data, data_of(gamma), data_of(beta),
                      running_mean, running_var, N, C, HW, momentum, eps, g->training);
    if (wants_grad(g, x, gamma, beta))
        save_state(g, record(g, "batchnorm2d", batchnorm_node_backward, y, x, gamma, beta), &s,
                   sizeof s);
    return y;
}

// ---------------------------------------------------------------------------
// ---- op: L2 normalisation over channels (LPIPS' normalize_tensor) ----
// ---------------------------------------------------------------------------

// out[n,c,p] = inp[n,c,p] / (sqrt(sum_c inp^2) + eps); norm (N,HW) saved
// Each position's sum runs over c in order, but c is the outer loop and the
// positions the inner one, so the loads are contiguous and the compiler
// vectorises across positions (a position at a time, the channel stride made
// this 15% of an LPIPS step at 32); images are shared among the threads.
typedef struct {
    float *out, *norm;
    const float *inp, *dout;
    int C, HW;
    float eps;
} L2NormTask;

static void l2norm_forward_range(void *arg, size_t n0, size_t n1) {
    const L2NormTask *t = arg;
    size_t HW = (size_t)t->HW;
    for (size_t n = n0; n < n1; n++) {
        const float *x = t->inp + n * t->C * HW;
        float *y = t->out + n * t->C * HW, *s = t->norm + n * HW;
        memset(s, 0, HW * sizeof(float));
        for (int c = 0; c < t->C; c++)
            for (size_t p = 0; p < HW; p++) s[p] += x[c * HW + p] * x[c * HW + p];
        for (size_t p = 0; p < HW; p++) s[p] = sqrtf(s[p]);
        for (int c = 0; c < t->C; c++)
            for (size_t p = 0; p < HW; p++) y[c * HW + p] = x[c * HW + p] * (1.0f / (s[p] + t->eps));
    }
}

void l2norm_forward(float *out, float *norm, const float *inp, int N, int C, int HW, float eps) {
    L2NormTask t = {out, norm, inp, NULL, C, HW, eps};
    parallel_for((size_t)N, 1, l2norm_forward_range, &t);
}

// with d = s + eps, s = ||x||: dx_c = dy_c / d - x_c * (sum_k dy_k x_k) / (d^2 s)
static void l2norm_backward_range(void *arg, size_t n0, size_t n1) {
    const L2NormTask *t = arg;
    size_t HW = (size_t)t->HW;
    float *k = mallocCheck(HW * sizeof(float));  // per position: dot / (d^2 s)
    for (size_t n = n0; n < n1; n++) {
        const float *x = t->inp + n * t->C * HW, *dy = t->dout + n * t->C * HW;
        const float *s = t->norm + n * HW;
        float *dx = t->out + n * t->C * HW;
        memset(k, 0, HW * sizeof(float));
        for (int c = 0; c < t->C; c++)
            for (size_t p = 0; p < HW; p++) k[p] += dy[c * HW + p] * x[c * HW + p];
        for (size_t p = 0; p < HW; p++) {
            float d = s[p] + t->eps;
            k[p] = s[p] > 0.0f ? k[p] / (d * d * s[p]) : 0.0f;
        }
        for (int c = 0; c < t->C; c++)
            for (size_t p = 0; p < HW; p++) {
                size_t i = c * HW + p;
                dx[i] += dy[i] / (s[p] + t->eps) - x[i] * k[p];
            }
    }
    free(k);
}

void l2norm_backward(float *dinp, const float *dout, const float *inp, const float *norm,
                     int N, int C, int HW, float eps) {
    L2NormTask t = {dinp, (float *)norm, inp, dout, C, HW, eps};
    parallel_for((size_t)N, 1, l2norm_backward_range, &t);
}

// l2norm over channels
typedef struct {
    float *norm;          // (N, HW), from forward
    float eps;
} L2NormState;

static void l2norm_node_backward(Graph *g, TapeNode *n) {
    const L2NormState *s = n->state;
    Tensor *x = n->in[0];
    l2norm_backward(input_grad(g, n, 0), n->out->grad, x->data, s->norm, x->shape[0], x->shape[1],
                    x->shape[2] * x->shape[3], s->eps);
}

Tensor *l2norm_channels(Graph *g, Tensor *x, float eps) {
    check_4d(x, "l2norm_channels");
    Tensor *y = tensor_new(g, 4, x->shape);
    int hw = x->shape[2] * x->shape[3];
    ArenaMark m = arena_mark(&g->arena);
    float *norm = arena_floats(&g->arena, (size_t)x->shape[0] * hw);
    l2norm_forward(y->data, norm, x->data, x->shape[0], x->shape[1], hw, eps);
    if (wants_grad(g, x, NULL, NULL)) {
        TapeNode *nd = record(g, "l2norm_channels", l2norm_node_backward, y, x, NULL, NULL);
        L2NormState s = {.norm = norm, .eps = eps};
        save_state(g, nd, &s, sizeof s);
    } else {
        arena_release(&g->arena, m);
    }
    return y;
}

// ---------------------------------------------------------------------------
// ---- op: pointwise functions: SiLU, ReLU, sigmoid, tanh, exp, abs, LeakyReLU, softplus ----
// ---------------------------------------------------------------------------

typedef struct {
    float *out;
    const float *inp;
    float *dinp;
    const float *dout;
    int act;
    float slope;  // LeakyReLU's negative slope
} Act;

static void act_forward_range(void *arg, size_t i0, size_t i1) {
    const Act *a = arg;
    const float *x = a->inp;
    float *y = a->out;
    switch (a->act) {
    case ACT_SILU: silu_array(y + i0, x + i0, i1 - i0); break;
    case ACT_SIGMOID: sigmoid_array(y + i0, x + i0, i1 - i0); break;
    case ACT_EXP: exp_array(y + i0, x + i0, i1 - i0); break;
    case ACT_RELU:
        for (size_t i = i0; i < i1; i++) y[i] = x[i] > 0.0f ? x[i] : 0.0f;
        break;
    case ACT_TANH:
        for (size_t i = i0; i < i1; i++) y[i] = tanhf(x[i]);
        break;
    case ACT_ABS:
        for (size_t i = i0; i < i1; i++) y[i] = fabsf(x[i]);
        break;
    case ACT_LEAKY_RELU:
        for (size_t i = i0; i < i1; i++) y[i] = x[i] > 0.0f ? x[i] : a->slope * x[i];
        break;
    case ACT_SOFTPLUS:  // F.softplus (beta 1, threshold 20): x itself above 20
        for (size_t i = i0; i < i1; i++) y[i] = x[i] > 20.0f ? x[i] : log1pf(expf(x[i]));
        break;
    }
}

static void act_forward(float *out, const float *inp, size_t n, int act, float slope) {
    Act a = {out, inp, NULL, NULL, act, slope};
    parallel_for(n, 1 << 14, act_forward_range, &a);
}

void activation_forward(float *out, const float *inp, size_t n, int act) {
    if (act == ACT_LEAKY_RELU) fatal("activation_forward: LeakyReLU takes leaky_relu_forward");
    act_forward(out, inp, n, act, 0.0f);
}

void leaky_relu_forward(float *out, const float *inp, size_t n, float slope) {
    act_forward(out, inp, n, ACT_LEAKY_RELU, slope);
}

// silu' = s (1 + x (1 - s)); relu' = [x > 0]; from the output y: sigmoid' =
// y (1 - y), tanh' = 1 - y^2, exp' = y; abs' = sign(x) (0 at 0, as torch);
// leaky' = 1 for x > 0, else the slope; softplus' = e^x / (e^x + 1), 1 above
// the threshold (torch's softplus_backward)
static float act_grad(const Act *a, size_t i) {
    float x = a->inp[i], y = a->out ? a->out[i] : 0.0f;
    switch (a->act) {
    case ACT_RELU: return x > 0.0f ? 1.0f : 0.0f;
    case ACT_SIGMOID: return y * (1.0f - y);
    case ACT_TANH: return 1.0f - y * y;
    case ACT_EXP: return y;
    case ACT_ABS: return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f);
    case ACT_LEAKY_RELU: return x > 0.0f ? 1.0f : a->slope;
    case ACT_SOFTPLUS: {
        if (x > 20.0f) return 1.0f;
        float z = expf(x);
        return z / (z + 1.0f);
    }
    }
    return 0.0f;
}

static void act_backward_range(void *arg, size_t i0, size_t i1) {
    const Act *a = arg;
    if (a->act == ACT_SILU) {  // through a block on the stack, since dinp accumulates
        float d[256];
        for (size_t i = i0; i < i1; i += 256) {
            size_t m = i1 - i < 256 ? i1 - i : 256;
            silu_grad_array(d, a->dout + i, a->inp + i, m);
            for (size_t k = 0; k < m; k++) a->dinp[i + k] += d[k];
        }
        return;
    }
    for (size_t i = i0; i < i1; i++) a->dinp[i] += a->dout[i] * act_grad(a, i);
}

static void act_backward(float *dinp, const float *dout, const float *inp, const float *out,
                         size_t n, int act, float slope) {
    Act a = {(float *)out, inp, dinp, dout, act, slope};
    parallel_for(n, 1 << 14, act_backward_range, &a);
}

void activation_backward(float *dinp, const float *dout, const float *inp, const float *out,
                         size_t n, int act) {
    act_backward(dinp, dout, inp, out, n, act, 0.0f);
}

void leaky_relu_backward(float *dinp, const float *dout, const float *inp, size_t n, float slope) {
    act_backward(dinp, dout, inp, NULL, n, ACT_LEAKY_RELU, slope);
}

// the tape node of every pointwise function
typedef struct { int act; float slope; } ActState;

static void activation_node_backward(Graph *g, TapeNode *n) {
    const ActState *s = n->state;
    act_backward(input_grad(g, n, 0), n->out->grad, n->in[0]->data, n->out->data, n->out->size,
                 s->act, s->slope);
}

// as graph ops, for the piecewise-linear ones: dx = dy * f'(x), f'(x) a
// constant (1, 0 or the slope) wherever it is defined
static void activation_vjp(Graph *g, TapeNode *n, Tensor *dy) {
    const ActState *s = n->state;
    Tensor *x = n->in[0], *mask = tensor_new(g, x->ndim, x->shape);
    Act a = {NULL, x->data, NULL, NULL, s->act, s->slope};
    for (size_t i = 0; i < x->size; i++) mask->data[i] = act_grad(&a, i);
    node_vjp_add(g, x, mul(g, dy, mask));
}

static Tensor *activation(Graph *g, Tensor *x, int act, float slope, const char *name) {
    Tensor *y = tensor_new(g, x->ndim, x->shape);
    act_forward(y->data, x->data, x->size, act, slope);
    if (wants_grad(g, x, NULL, NULL)) {
        ActState s = {.act = act, .slope = slope};
        TapeNode *nd = record(g, name, activation_node_backward, y, x, NULL, NULL);
        save_state(g, nd, &s, sizeof s);
        if (act == ACT_RELU || act == ACT_LEAKY_RELU) nd->vjp = activation_vjp;
    }
    return y;
}

Tensor *silu(Graph *g, Tensor *x) { return activation(g, x, ACT_SILU, 0.0f, "silu"); }
Tensor *relu(Graph *g, Tensor *x) { return activation(g, x, ACT_RELU, 0.0f, "relu"); }
Tensor *sigmoid(Graph *g, Tensor *x) { return activation(g, x, ACT_SIGMOID, 0.0f, "sigmoid"); }
Tensor *tensor_tanh(Graph *g, Tensor *x) { return activation(g, x, ACT_TANH, 0.0f, "tanh"); }
Tensor *tensor_exp(Graph *g, Tensor *x) { return activation(g, x, ACT_EXP, 0.0f, "exp"); }
Tensor *tensor_abs(Graph *g, Tensor *x) { return activation(g, x, ACT_ABS, 0.0f, "abs"); }
Tensor *leaky_relu(Graph *g, Tensor *x, float slope) {
    return activation(g, x, ACT_LEAKY_RELU, slope, "leaky_relu");
}
Tensor *softplus(Graph *g, Tensor *x) { return activation(g, x, ACT_SOFTPLUS, 0.0f, "softplus"); }

// ---------------------------------------------------------------------------
// ---- op: softmax over the last axis ----
// ---------------------------------------------------------------------------

typedef struct {
    float *out;
    const float *inp;
    float *dinp;
    const float *dout;
    size_t len;
} Softmax;

static void softmax_forward_range(void *arg, size_t r0, size_t r1) {
    const Softmax *a = arg;
    for (size_t r = r0; r < r1; r++) {
        const float *x = a->inp + r * a->len;
        float *y = a->out + r * a->len;
        float mx = -FLT_MAX;
        for (size_t i = 0; i < a->len; i++) mx = x[i] > mx ? x[i] : mx;
        for (size_t i = 0; i < a->len; i++) y[i] = x[i] - mx;
        exp_array(y, y, a->len);
        float s = 0.0f;
        for (size_t i = 0; i < a->len; i++) s += y[i];
        float inv = 1.0f / s;
        for (size_t i = 0; i < a->len; i++) y[i] *= inv;
    }
}

void softmax_forward(float *out, const float *inp, size_t rows, size_t len) {
    Softmax a = {out, inp, NULL, NULL, len};
    parallel_for(rows, 16, softmax_forward_range, &a);
}

// dx = y * (dy - sum(dy * y))
static void softmax_backward_range(void *arg, size_t r0, size_t r1) {
    const Softmax *a = arg;
    for (size_t r = r0; r < r1; r++) {
        const float *y = a->out + r * a->len, *dy = a->dout + r * a->len;
        float *dx = a->dinp + r * a->len;
        float dot = 0.0f;
        for (size_t i = 0; i < a->len; i++) dot += dy[i] * y[i];
        for (size_t i = 0; i < a->len; i++) dx[i] += y[i] * (dy[i] - dot);
    }
}

void softmax_backward(float *dinp, const float *dout, const float *out, size_t rows, size_t len) {
    Softmax a = {(float *)out, NULL, dinp, dout, len};
    parallel_for(rows, 16, softmax_backward_range, &a);
}

// softmax over the last axis
static void softmax_node_backward(Graph *g, TapeNode *n) {
    size_t len = (size_t)n->out->shape[n->out->ndim - 1];
    softmax_backward(input_grad(g, n, 0), n->out->grad, n->out->data, n->out->size / len, len);
}

Tensor *softmax(Graph *g, Tensor *x) {
    size_t len = (size_t)x->shape[x->ndim - 1];
    Tensor *y = tensor_new(g, x->ndim, x->shape);
    softmax_forward(y->data, x->data, x->size / len, len);
    if (wants_grad(g, x, NULL, NULL)) record(g, "softmax", softmax_node_backward, y, x, NULL, NULL);
    return y;
}

// ---------------------------------------------------------------------------
// ---- op: QKV attention (improved-diffusion's QKVAttentionLegacy) ----
// ---------------------------------------------------------------------------

// qkv (BH, 3*ch, T): per head, q = rows 0..ch, k = ch..2ch, v = 2ch..3ch.
//   w = softmax(scale * q^T k) over the last axis   (T, T) per head
//   out = v @ w^T                                   (BH, ch, T)
// q, k and v are read in place (no copies). The weights of all heads would
// be BH*T*T floats (16 MiB a layer for 64 heads at 16x16), more than the
// layer's activations: each thread keeps one head's in scratch, and backward
// computes them again (the same code, so the same bits) before using them.
typedef struct {
    const float *qkv; float *scratch, *out;
    float *dqkv; const float *dout;
    int ch, T; float scale;
} Attention;

size_t qkv_attention_scratch(int T) { return (size_t)pool_threads() * 2 * T * T; }

// w (T,T) = softmax(scale * q^T k) of head b
static void attention_weights(const Attention *a, size_t b, float *w) {
    size_t T = (size_t)a->T, ch = (size_t)a->ch;
    const float *q = a->qkv + b * 3 * ch * T, *k = q + ch * T;
    sgemm(1, 0, T, T, ch, q, T, k, T, 0, w, T);  // w (T,T) = q^T (T,ch) @ k (ch,T)
    for (size_t i = 0; i < T * T; i++) w[i] *= a->scale;
    softmax_forward(w, w, T, T);
}

static void qkv_attention_forward_range(void *arg, size_t b0, size_t b1) {
    const Attention *a = arg;
    size_t T = (size_t)a->T, ch = (size_t)a->ch;
    float *w = a->scratch + (size_t)pool_thread_id() * 2 * T * T;
    for (size_t b = b0; b < b1; b++) {
        const float *v = a->qkv + b * 3 * ch * T + 2 * ch * T;
        attention_weights(a, b, w);
        sgemm(0, 1, ch, T, T, v, T, w, T, 0, a->out + b * ch * T, T);  // out = v @ w^T
    }
}

void qkv_attention_forward(float *out, const float *qkv, float *scratch, int BH, int ch, int T,
                           float scale) {
    Attention a = {.qkv = qkv, .scratch = scratch, .out = out, .ch = ch, .T = T, .scale = scale};
    flops_forward += 4.0 * BH * (double)ch * T * T;
    parallel_for((size_t)BH, 1, qkv_attention_forward_range, &a);
}

static void qkv_attention_backward_range(void *arg, size_t b0, size_t b1) {
    const Attention *a = arg;
    size_t T = (size_t)a->T, ch = (size_t)a->ch;
    // softmax' overwrites dw
    float *w = a->scratch + (size_t)pool_thread_id() * 2 * T * T, *dw = w + T * T, *ds = dw;
    for (size_t b = b0; b < b1; b++) {
        const float *q = a->qkv + b * 3 * ch * T, *k = q + ch * T, *v = k + ch * T;
        const float *dout = a->dout + b * ch * T;
        float *dq = a->dqkv + b * 3 * ch * T, *dk = dq + ch * T, *dv = dk + ch * T;
        attention_weights(a, b, w);
        sgemm(0, 0, ch, T, T, dout, T, w, T, 1, dv, T);   // dv += dout @ w
        sgemm(1, 0, T, T, ch, dout, T, v, T, 0, dw, T);   // dw = dout^T @ v
        for (size_t t = 0; t < T; t++) {                   // ds = scale * softmax'(dw), in place
            const float *wr = w + t * T;
            float *dr = ds + t * T, dot = 0.0f;
            for (size_t i = 0; i < T; i++) dot += dr[i] * wr[i];
            for (size_t i = 0; i < T; i++) dr[i] = a->scale * wr[i] * (dr[i] - dot);
        }
        sgemm(0, 1, ch, T, T, k, T, ds, T, 1, dq, T);     // dq += k @ ds^T
        sgemm(0, 0, ch, T, T, q, T, ds, T, 1, dk, T);     // dk += q @ ds
    }
}

// dqkv += the gradient
void qkv_attention_backward(float *dqkv, const float *dout, const float *qkv, float *scratch,
                            int BH, int ch, int T, float scale) {
    Attention a = {.qkv = qkv, .scratch = scratch, .dqkv = dqkv, .dout = dout, .ch = ch, .T = T,
                   .scale = scale};
    parallel_for((size_t)BH, 1, qkv_attention_backward_range, &a);
}

// ---- reference: attention head by head, direct loops in double ----
// per head: s[t][u] = scale * sum_c q[c][t] k[c][u], w = softmax_u(s),
// out[c][t] = sum_u w[t][u] v[c][u]. Backward: dv[c][u] += sum_t dout[c][t] w[t][u],
// dw[t][u] = sum_c dout[c][t] v[c][u], ds = w (dw - sum_u dw w) (the
// softmax's backward), dq[c][t] += scale sum_u ds[t][u] k[c][u],
// dk[c][u] += scale sum_t ds[t][u] q[c][t].
static void attention_weights_ref(const float *q, const float *k, int ch, int T, float scale,
                                  double *w) {
    for (int t = 0; t < T; t++) {
        double *row = w + (size_t)t * T, top = -INFINITY, sum = 0.0;
        for (int u = 0; u < T; u++) {
            double dot = 0.0;
            for (int c = 0; c < ch; c++) dot += (double)q[(size_t)c * T + t] * k[(size_t)c * T + u];
            row[u] = scale * dot;
            if (row[u] > top) top = row[u];
        }
        for (int u = 0; u < T; u++) sum += (row[u] = exp(row[u] - top));
        for (int u = 0; u < T; u++) row[u] /= sum;
    }
}

void qkv_attention_forward_ref(float *out, const float *qkv, int BH, int ch, int T, float scale) {
    double *w = mallocCheck((size_t)T * T * sizeof(double));
    for (int b = 0; b < BH; b++) {
        const float *q = qkv + (size_t)b * 3 * ch * T, *k = q + (size_t)ch * T,
                    *v = k + (size_t)ch * T;
        attention_weights_ref(q, k, ch, T, scale, w);
        for (int c = 0; c < ch; c++)
            for (int t = 0; t < T; t++) {
                double acc = 0.0;
                for (int u = 0; u < T; u++) acc += w[(size_t)t * T + u] * v[(size_t)c * T + u];
                out[((size_t)b * ch + c) * T + t] = (float)acc;
            }
    }
    free(w);
}

void qkv_attention_backward_ref(float *dqkv, const float *dout, const float *qkv, int BH, int ch,
                                int T, float scale) {
    double *w = mallocCheck((size_t)T * T * sizeof(double)),
           *ds = mallocCheck((size_t)T * T * sizeof(double));
    for (int b = 0; b < BH; b++) {
        const float *q = qkv + (size_t)b * 3 * ch * T, *k = q + (size_t)ch * T,
                    *v = k + (size_t)ch * T;
        const float *dy = dout + (size_t)b * ch * T;
        float *dq = dqkv + (size_t)b * 3 * ch * T, *dk = dq + (size_t)ch * T,
              *dv = dk + (size_t)ch * T;
        attention_weights_ref(q, k, ch, T, scale, w);
        for (int t = 0; t < T; t++) {
            double dot = 0.0;
            for (int u = 0; u < T; u++) {
                double dw = 0.0;
                for (int c = 0; c < ch; c++)
                    dw += (double)dy[(size_t)c * T + t] * v[(size_t)c * T + u];
                ds[(size_t)t * T + u] = dw;
                dot += dw * w[(size_t)t * T + u];
            }
            for (int u = 0; u < T; u++)
                ds[(size_t)t * T + u] = w[(size_t)t * T + u] * (ds[(size_t)t * T + u] - dot);
        }
        for (int c = 0; c < ch; c++) {
            for (int u = 0; u < T; u++) {
                double av = 0.0, ak = 0.0;
                for (int t = 0; t < T; t++) {
                    av += (double)dy[(size_t)c * T + t] * w[(size_t)t * T + u];
                    ak += ds[(size_t)t * T + u] * q[(size_t)c * T + t];
                }
                dv[(size_t)c * T + u] += (float)av;
                dk[(size_t)c * T + u] += (float)(scale * ak);
            }
            for (int t = 0; t < T; t++) {
                double aq = 0.0;
                for (int u = 0; u < T; u++) aq += ds[(size_t)t * T + u] * k[(size_t)c * T + u];
                dq[(size_t)c * T + t] += (float)(scale * aq);
            }
        }
    }
    free(w);
    free(ds);
}

typedef struct { float scale; } AttentionState;

static void qkv_attention_node_backward(Graph *g, TapeNode *n) {
    const AttentionState *s = n->state;
    Tensor *qkv = n->in[0];
    float *dqkv = input_grad(g, n, 0);
    int BH = qkv->shape[0], ch = qkv->shape[1] / 3, T = qkv->shape[2];
    ArenaMark m = arena_mark(&g->arena);
    float *scratch = arena_floats(&g->arena, qkv_attention_scratch(T));
    qkv_attention_backward(dqkv, n->out->grad, qkv->data, scratch, BH, ch, T, s->scale);
    arena_release(&g->arena, m);
}

Tensor *qkv_attention(Graph *g, Tensor *qkv, float scale) {
    if (qkv->ndim != 3 || qkv->shape[1] % 3)
        fatal("qkv_attention: expected (BH, 3*ch, T), got %d-D with %d rows", qkv->ndim,
              qkv->ndim > 1 ? qkv->shape[1] : 0);
    int BH = qkv->shape[0], ch = qkv->shape[1] / 3, T = qkv->shape[2];
    int s[3] = {BH, ch, T};
    Tensor *y = tensor_new(g, 3, s);
    ArenaMark m = arena_mark(&g->arena);
    float *scratch = arena_floats(&g->arena, qkv_attention_scratch(T));
    qkv_attention_forward(y->data, qkv->data, scratch, BH, ch, T, scale);
    arena_release(&g->arena, m);
    if (wants_grad(g, qkv, NULL, NULL)) {
        AttentionState s = {.scale = scale};
        save_state(g, record(g, "qkv_attention", qkv_attention_node_backward, y, qkv, NULL, NULL),
                   &s, sizeof s);
    }
    return y;
}

// ---------------------------------------------------------------------------
// ---- op: nearest 2x upsample ----
// ---------------------------------------------------------------------------

// out (P, 2H, 2W)[y][x] = inp (P, H, W)[y/2][x/2]; P = N*C planes, split
// between the threads (as the 2x2 average pool below)
typedef struct { float *out; const float *inp; int H, W; } Planes;

static void upsample2x_forward_range(void *arg, size_t p0, size_t p1) {
    const Planes *t = arg;
    int H = t->H, W = t->W;
    for (size_t p = p0; p < p1; p++) {
        const float *x = t->inp + p * H * W;
        float *y = t->out + p * 4 * H * W;
        for (int oy = 0; oy < 2 * H; oy++)
            for (int ox = 0; ox < 2 * W; ox++)
                y[(size_t)oy * 2 * W + ox] = x[(size_t)(oy / 2) * W + ox / 2];
    }
}

void upsample2x_forward(float *out, const float *inp, size_t P, int H, int W) {
    Planes t = {out, inp, H, W};
    parallel_for(P, 8, upsample2x_forward_range, &t);
}

static void upsample2x_backward_range(void *arg, size_t p0, size_t p1) {  // out: dinp, inp: dout
    const Planes *t = arg;
    int H = t->H, W = t->W;
    for (size_t p = p0; p < p1; p++) {
        float *dx = t->out + p * H * W;
        const float *dy = t->inp + p * 4 * H * W;
        for (int iy = 0; iy < H; iy++)
            for (int ix = 0; ix < W; ix++) {
                const float *d = dy + (size_t)(2 * iy) * 2 * W + 2 * ix;
                dx[(size_t)iy * W + ix] += d[0] + d[1] + d[2 * W] + d[2 * W + 1];
            }
    }
}

void upsample2x_backward(float *dinp, const float *dout, size_t P, int H, int W) {
    Planes t = {dinp, dout, H, W};
    parallel_for(P, 8, upsample2x_backward_range, &t);
}

// nearest 2x upsample
static void upsample2x_node_backward(Graph *g, TapeNode *n) {
    Tensor *x = n->in[0];
    upsample2x_backward(input_grad(g, n, 0), n->out->grad, (size_t)x->shape[0] * x->shape[1],
                        x->shape[2], x->shape[3]);
}

Tensor *upsample2x(Graph *g, Tensor *x) {
    check_4d(x, "upsample2x");
    Tensor *y = tensor4(g, x->shape[0], x->shape[1], 2 * x->shape[2], 2 * x->shape[3]);
    upsample2x_forward(y->data, x->data, (size_t)x->shape[0] * x->shape[1], x->shape[2],
                       x->shape[3]);
    if (wants_grad(g, x, NULL, NULL))
        record(g, "upsample2x", upsample2x_node_backward, y, x, NULL, NULL);
    return y;
}

// ---------------------------------------------------------------------------
// ---- op: 2x2 average pool, stride 2 ----
// ---------------------------------------------------------------------------

// out (P, H/2, W/2) = mean of each 2x2 window, summed row by row as PyTorch
static void avgpool2x2_forward_range(void *arg, size_t p0, size_t p1) {
    const Planes *t = arg;
    int H = t->H, W = t->W, OH = H / 2, OW = W / 2;
    for (size_t p = p0; p < p1; p++) {
        const float *x = t->inp + p * H * W;
        float *y = t->out + p * OH * OW;
        for (int oy = 0; oy < OH; oy++)
            for (int ox = 0; ox < OW; ox++) {
                const float *a = x + (size_t)(2 * oy) * W + 2 * ox;
                y[(size_t)oy * OW + ox] = (a[0] + a[1] + a[W] + a[W + 1]) / 4.0f;
            }
    }
}

void avgpool2x2_forward(float *out, const float *inp, size_t P, int H, int W) {
    Planes t = {out, inp, H, W};
    parallel_for(P, 8, avgpool2x2_forward_range, &t);
}

static void avgpool2x2_backward_range(void *arg, size_t p0, size_t p1) {  // out: dinp, inp: dout
    const Planes *t = arg;
    int H = t->H, W = t->W, OH = H / 2, OW = W / 2;
    for (size_t p = p0; p < p1; p++) {
        float *dx = t->out + p * H * W;
        const float *dy = t->inp + p * OH * OW;
        for (int oy = 0; oy < OH; oy++)
            for (int ox = 0; ox < OW; ox++) {
                float g = dy[(size_t)oy * OW + ox] / 4.0f;
                float *a = dx + (size_t)(2 * oy) * W + 2 * ox;
                a[0] += g; a[1] += g; a[W] += g; a[W + 1] += g;
            }
    }
}

void avgpool2x2_backward(float *dinp, const float *dout, size_t P, int H, int W) {
    Planes t = {dinp, dout, H, W};
    parallel_for(P, 8, avgpool2x2_backward_range, &t);
}

// 2x2 average pool
static void avgpool2x2_node_backward(Graph *g, TapeNode *n) {
    Tensor *x = n->in[0];
    avgpool2x2_backward(input_grad(g, n, 0), n->out->grad, (size_t)x->shape[0] * x->shape[1],
                        x->shape[2], x->shape[3]);
}

Tensor *avgpool2x2(Graph *g, Tensor *x) {
    check_4d(x, "avgpool2x2");
    Tensor *y = tensor4(g, x->shape[0], x->shape[1], x->shape[2] / 2, x->shape[3] / 2);
    avgpool2x2_forward(y->data, x->data, (size_t)x->shape[0] * x->shape[1], x->shape[2],
                       x->shape[3]);
    if (wants_grad(g, x, NULL, NULL))
        record(g, "avgpool2x2", avgpool2x2_node_backward, y, x, NULL, NULL);
    return y;
}

// ---------------------------------------------------------------------------
// ---- op: 2x2 max pool, stride 2 ----
// torch's max_pool2d(x, 2) (taming's LPIPS VGG16). Odd sizes drop the last
// row or column, as torch's floor mode. Backward sends each gradient to the
// window's largest pixel, found again from the input: the first in row
// order on ties, and a NaN wins, as torch's CPU kernel (val > max || isnan).
// ---------------------------------------------------------------------------
static size_t max2x2_offset(const float *a, int W) {
    const size_t off[4] = {0, 1, (size_t)W, (size_t)W + 1};
    size_t best = 0;
    for (int k = 1; k < 4; k++)
        if (a[off[k]] > a[best] || isnan(a[off[k]])) best = off[k];
    return best;
}

static void maxpool2x2_forward_range(void *arg, size_t p0, size_t p1) {
    const Planes *t = arg;
    int H = t->H, W = t->W, OH = H / 2, OW = W / 2;
    for (size_t p = p0; p < p1; p++) {
        const float *x = t->inp + p * H * W;
        float *y = t->out + p * OH * OW;
        for (int oy = 0; oy < OH; oy++)
            for (int ox = 0; ox < OW; ox++) {
                const float *a = x + (size_t)(2 * oy) * W + 2 * ox;
                y[(size_t)oy * OW + ox] = a[max2x2_offset(a, W)];
            }
    }
}

void maxpool2x2_forward(float *out, const float *inp, size_t P, int H, int W) {
    Planes t = {out, inp, H, W};
    parallel_for(P, 8, maxpool2x2_forward_range, &t);
}

typedef struct { float *dinp; const float *dout, *inp; int H, W; } MaxPoolGrad;

static void maxpool2x2_backward_range(void *arg, size_t p0, size_t p1) {
    const MaxPoolGrad *t = arg;
    int H = t->H, W = t->W, OH = H / 2, OW = W / 2;
    for (size_t p = p0; p < p1; p++) {
        const float *x = t->inp + p * H * W, *dy = t->dout + p * OH * OW;
        float *dx = t->dinp + p * H * W;
        for (int oy = 0; oy < OH; oy++)
            for (int ox = 0; ox < OW; ox++) {
                size_t at = (size_t)(2 * oy) * W + 2 * ox;
                dx[at + max2x2_offset(x + at, W)] += dy[(size_t)oy * OW + ox];
            }
    }
}

void maxpool2x2_backward(float *dinp, const float *dout, const float *inp, size_t P, int H, int W) {
    MaxPoolGrad t = {dinp, dout, inp, H, W};
    parallel_for(P, 8, maxpool2x2_backward_range, &t);
}

static void maxpool2x2_node_backward(Graph *g, TapeNode *n) {
    Tensor *x = n->in[0];
    maxpool2x2_backward(input_grad(g, n, 0), n->out->grad, x->data,
                        (size_t)x->shape[0] * x->shape[1], x->shape[2], x->shape[3]);
}

Tensor *maxpool2x2(Graph *g, Tensor *x) {
    check_4d(x, "maxpool2x2");
    Tensor *y = tensor4(g, x->shape[0], x->shape[1], x->shape[2] / 2, x->shape[3] / 2);
    maxpool2x2_forward(y->data, x->data, (size_t)x->shape[0] * x->shape[1], x->shape[2],
                       x->shape[3]);
    if (wants_grad(g, x, NULL, NULL))
        record(g, "maxpool2x2", maxpool2x2_node_backward, y, x, NULL, NULL);
    return y;
}

// ---------------------------------------------------------------------------
// ---- op: zero padding, its own amount on each side ----
// torch's F.pad(x, (left, right, top, bottom)) with zeros: latent-diffusion's
// Downsample pads (0, 1, 0, 1), right and bottom only, before its 3x3
// stride-2 convolution without padding.
// ---------------------------------------------------------------------------
// forward: out = the padded planes, inp = x; backward: out = dx, inp = the padded gradient
typedef struct { float *out; const float *inp; int H, W, top, bottom, left, right; } Pad;

static void pad2d_forward_range(void *arg, size_t p0, size_t p1) {
    const Pad *t = arg;
    int OW = t->W + t->left + t->right, OH = t->H + t->top + t->bottom;
    for (size_t p = p0; p < p1; p++) {
        float *y = t->out + p * OH * OW;
        memset(y, 0, (size_t)OH * OW * sizeof(float));
        for (int r = 0; r < t->H; r++)
            memcpy(y + (size_t)(r + t->top) * OW + t->left, t->inp + (p * t->H + r) * t->W,
                   (size_t)t->W * sizeof(float));
    }
}

void pad2d_forward(float *out, const float *inp, size_t P, int H, int W, int top, int bottom,
                   int left, int right) {
    Pad t = {out, inp, H, W, top, bottom, left, right};
    parallel_for(P, 8, pad2d_forward_range, &t);
}

static void pad2d_backward_range(void *arg, size_t p0, size_t p1) {
    const Pad *t = arg;
    int OW = t->W + t->left + t->right, OH = t->H + t->top + t->bottom;
    for (size_t p = p0; p < p1; p++)
        for (int r = 0; r < t->H; r++) {
            const float *dy = t->inp + p * OH * OW + (size_t)(r + t->top) * OW + t->left;
            float *dx = t->out + (p * t->H + r) * t->W;
            for (int c = 0; c < t->W; c++) dx[c] += dy[c];
        }
}

void pad2d_backward(float *dinp, const float *dout, size_t P, int H, int W, int top, int bottom,
                    int left, int right) {
    Pad t = {dinp, dout, H, W, top, bottom, left, right};
    parallel_for(P, 8, pad2d_backward_range, &t);
}

typedef struct { int top, bottom, left, right; } PadState;

static void pad2d_node_backward(Graph *g, TapeNode *n) {
    const PadState *s = n->state;
    Tensor *x = n->in[0];
    pad2d_backward(input_grad(g, n, 0), n->out->grad, (size_t)x->shape[0] * x->shape[1],
                   x->shape[2], x->shape[3], s->top, s->bottom, s->left, s->right);
}

Tensor *pad2d(Graph *g, Tensor *x, int top, int bottom, int left, int right) {
    check_4d(x, "pad2d");
    if (top < 0 || bottom < 0 || left < 0 || right < 0)
        fatal("pad2d: padding (%d, %d, %d, %d) must not be negative", top, bottom, left, right);
    Tensor *y = tensor4(g, x->shape[0], x->shape[1], x->shape[2] + top + bottom,
                        x->shape[3] + left + right);
    pad2d_forward(y->data, x->data, (size_t)x->shape[0] * x->shape[1], x->shape[2], x->shape[3],
                  top, bottom, left, right);
    if (wants_grad(g, x, NULL, NULL)) {
        PadState s = {top, bottom, left, right};
        save_state(g, record(g, "pad2d", pad2d_node_backward, y, x, NULL, NULL), &s, sizeof s);
    }
    return y;
}

// ---------------------------------------------------------------------------
// ---- op: bilinear resize, align_corners=False ----
// ---------------------------------------------------------------------------

// As PyTorch's upsample_bilinear2d: src = (dst + 0.5) * in/out - 0.5, clamped
// at 0; the second tap is clamped at the last row/column.
typedef struct { int i0, i1; float l0, l1; } Tap;

static Tap bilinear_tap(int dst, int in, int out) {
    float scale = (float)in / (float)out;
    float src = scale * ((float)dst + 0.5f) - 0.5f;
    if (src < 0.0f) src = 0.0f;
    Tap t;
    t.i0 = (int)src;
    t.i1 = t.i0 < in - 1 ? t.i0 + 1 : t.i0;
    t.l1 = src - (float)t.i0;
    t.l0 = 1.0f - t.l1;
    return t;
}

typedef struct { float *out; const float *inp; int H, W, OH, OW; } Resize;

static void resize_forward_range(void *arg, size_t p0, size_t p1) {
    const Resize *a = arg;
    for (size_t p = p0; p < p1; p++) {
        const float *x = a->inp + p * a->H * a->W;
        float *y = a->out + p * a->OH * a->OW;
        for (int oy = 0; oy < a->OH; oy++) {
            Tap ty = bilinear_tap(oy, a->H, a->OH);
            const float *r0 = x + (size_t)ty.i0 * a->W, *r1 = x + (size_t)ty.i1 * a->W;
            for (int ox = 0; ox < a->OW; ox++) {
                Tap tx = bilinear_tap(ox, a->W, a->OW);
                y[(size_t)oy * a->OW + ox] = ty.l0 * (tx.l0 * r0[tx.i0] + tx.l1 * r0[tx.i1]) +
                                             ty.l1 * (tx.l0 * r1[tx.i0] + tx.l1 * r1[tx.i1]);
            }
        }
    }
}

void resize_bilinear_forward(float *out, const float *inp, size_t P, int H, int W, int OH, int OW) {
    Resize a = {out, inp, H, W, OH, OW};
    parallel_for(P, 1, resize_forward_range, &a);
}

// the adjoint: each output scatters its gradient to its four taps
static void resize_backward_range(void *arg, size_t p0, size_t p1) {
    const Resize *a = arg;  // out = dout, inp = dinp
    for (size_t p = p0; p < p1; p++) {
        float *dx = (float *)a->inp + p * a->H * a->W;
        const float *dy = a->out + p * a->OH * a->OW;
        for (int oy = 0; oy < a->OH; oy++) {
            Tap ty = bilinear_tap(oy, a->H, a->OH);
            float *r0 = dx + (size_t)ty.i0 * a->W, *r1 = dx + (size_t)ty.i1 * a->W;
            for (int ox = 0; ox < a->OW; ox++) {
                Tap tx = bilinear_tap(ox, a->W, a->OW);
                float g = dy[(size_t)oy * a->OW + ox];
                r0[tx.i0] += ty.l0 * tx.l0 * g;
                r0[tx.i1] += ty.l0 * tx.l1 * g;
                r1[tx.i0] += ty.l1 * tx.l0 * g;
                r1[tx.i1] += ty.l1 * tx.l1 * g;
            }
        }
    }
}

void resize_bilinear_backward(float *dinp, const float *dout, size_t P, int H, int W, int OH,
                              int OW) {
    Resize a = {(float *)dout, dinp, H, W, OH, OW};
    parallel_for(P, 1, resize_backward_range, &a);
}

// bilinear resize
static void resize_node_backward(Graph *g, TapeNode *n) {
    Tensor *x = n->in[0], *y = n->out;
    resize_bilinear_backward(input_grad(g, n, 0), y->grad, (size_t)x->shape[0] * x->shape[1],
                             x->shape[2], x->shape[3], y->shape[2], y->shape[3]);
}

Tensor *resize_bilinear(Graph *g, Tensor *x, int out_h, int out_w) {
    check_4d(x, "resize_bilinear");
    if (out_h < 1 || out_w < 1) fatal("resize_bilinear: bad output size %dx%d", out_h, out_w);
    Tensor *y = tensor4(g, x->shape[0], x->shape[1], out_h, out_w);
    resize_bilinear_forward(y->data, x->data, (size_t)x->shape[0] * x->shape[1], x->shape[2],
                            x->shape[3], out_h, out_w);
    if (wants_grad(g, x, NULL, NULL))
        record(g, "resize_bilinear", resize_node_backward, y, x, NULL, NULL);
    return y;
}

// ---------------------------------------------------------------------------
// ---- op: add, sub, mul with broadcasting ----
// ---------------------------------------------------------------------------

// Both shapes are aligned to the right and padded to 4-D; a dimension of 1
// broadcasts (stride 0). Same-shape operands take a flat, threaded loop.
enum { BIN_ADD, BIN_SUB, BIN_MUL };
typedef struct {
    int shape[4];          // output
    size_t sa[4], sb[4];   // element strides of a and b over the output index
} Bcast;

static int bcast_plan(const Tensor *a, const Tensor *b, Bcast *p, int *ndim) {
    int as[4], bs[4];
    *ndim = a->ndim > b->ndim ? a->ndim : b->ndim;
    for (int i = 0; i < 4; i++) {
        int ia = i - (4 - a->ndim), ib = i - (4 - b->ndim);
        as[i] = ia >= 0 ? a->shape[ia] : 1;
        bs[i] = ib >= 0 ? b->shape[ib] : 1;
        if (as[i] != bs[i] && as[i] != 1 && bs[i] != 1) return 0;
        p->shape[i] = as[i] > bs[i] ? as[i] : bs[i];
    }
    size_t ra = 1, rb = 1;
    for (int i = 3; i >= 0; i--) {
        p->sa[i] = as[i] == 1 ? 0 : ra;
        p->sb[i] = bs[i] == 1 ? 0 : rb;
        ra *= (size_t)as[i];
        rb *= (size_t)bs[i];
    }
    return 1;
}

typedef struct { float *out; const float *a, *b; int op; } Binary;

static void binary_flat_range(void *arg, size_t i0, size_t i1) {
    const Binary *t = arg;
    for (size_t i = i0; i < i1; i++) {
        float x = t->a[i], y = t->b[i];
        t->out[i] = t->op == BIN_ADD ? x + y : t->op == BIN_SUB ? x - y : x * y;
    }
}

static void binary_forward(float *out, const float *a, const float *b, const Bcast *p, int op,
                           int flat) {
    size_t n = (size_t)p->shape[0] * p->shape[1] * p->shape[2] * p->shape[3];
    if (flat) {
        Binary t = {out, a, b, op};
        parallel_for(n, 1 << 14, binary_flat_range, &t);
        return;
    }
    size_t o = 0;
    for (int i0 = 0; i0 < p->shape[0]; i0++)
        for (int i1 = 0; i1 < p->shape[1]; i1++)
            for (int i2 = 0; i2 < p->shape[2]; i2++) {
                const float *pa = a + i0 * p->sa[0] + i1 * p->sa[1] + i2 * p->sa[2];
                const float *pb = b + i0 * p->sb[0] + i1 * p->sb[1] + i2 * p->sb[2];
                for (int i3 = 0; i3 < p->shape[3]; i3++, o++) {
                    float x = pa[i3 * p->sa[3]], y = pb[i3 * p->sb[3]];
                    out[o] = op == BIN_ADD ? x + y : op == BIN_SUB ? x - y : x * y;
                }
            }
}

// da += dout * d(out)/da summed over a's broadcast dimensions; same for db.
// Serial and in output order, so the sums do not depend on threads.
static void binary_backward(float *da, float *db, const float *dout, const float *a, const float *b,
                            const Bcast *p, int op) {
    size_t o = 0;
    for (int i0 = 0; i0 < p->shape[0]; i0++)
        for (int i1 = 0; i1 < p->shape[1]; i1++)
            for (int i2 = 0; i2 < p->shape[2]; i2++) {
                size_t oa = i0 * p->sa[0] + i1 * p->sa[1] + i2 * p->sa[2];
                size_t ob = i0 * p->sb[0] + i1 * p->sb[1] + i2 * p->sb[2];
                for (int i3 = 0; i3 < p->shape[3]; i3++, o++) {
                    size_t ia = oa + i3 * p->sa[3], ib = ob + i3 * p->sb[3];
                    float g = dout[o];
                    if (da) da[ia] += op == BIN_MUL ? g * b[ib] : g;
                    if (db) db[ib] += op == BIN_MUL ? g * a[ia] : (op == BIN_SUB ? -g : g);
                }
            }
}

// same shapes: a flat loop over elements, threaded
typedef struct { float *da, *db; const float *dout, *a, *b; int op; } BinaryGrad;

static void binary_grad_flat_range(void *arg, size_t i0, size_t i1) {
    const BinaryGrad *t = arg;
    for (size_t i = i0; i < i1; i++) {
        float g = t->dout[i];
        if (t->da) t->da[i] += t->op == BIN_MUL ? g * t->b[i] : g;
        if (t->db) t->db[i] += t->op == BIN_MUL ? g * t->a[i] : (t->op == BIN_SUB ? -g : g);
    }
}

// b broadcast over the last two dims (FiLM: (N,C,H,W) op (N,C,1,1)): a
// thread owns whole (n, c) planes, and b's gradient is one sum per plane
typedef struct { float *da, *db; const float *dout, *a, *b; int op; size_t plane; } PlaneGrad;

static void binary_grad_plane_range(void *arg, size_t p0, size_t p1) {
    const PlaneGrad *t = arg;
    for (size_t p = p0; p < p1; p++) {
        const float *g = t->dout + p * t->plane, *a = t->a + p * t->plane;
        float bv = t->b[p], sb = 0.0f;
        float *da = t->da ? t->da + p * t->plane : NULL;
        for (size_t i = 0; i < t->plane; i++) {
            if (da) da[i] += t->op == BIN_MUL ? g[i] * bv : g[i];
            sb += t->op == BIN_MUL ? g[i] * a[i] : g[i];
        }
        if (t->db) t->db[p] += t->op == BIN_SUB ? -sb : sb;
    }
}

typedef struct { int op; } BinaryState;  // BIN_ADD, BIN_SUB or BIN_MUL

static void binary_node_backward(Graph *g, TapeNode *n) {
    Tensor *a = n->in[0], *b = n->in[1];
    float *da = input_grad(g, n, 0), *db = input_grad(g, n, 1);
    int op = ((const BinaryState *)n->state)->op;
    if (a->size == n->out->size && b->size == n->out->size) {
        BinaryGrad t = {da, db, n->out->grad, a->data, b->data, op};
        parallel_for(a->size, 1 << 14, binary_grad_flat_range, &t);
        return;
    }
    if (a->ndim == 4 && b->ndim == 4 && a->size == n->out->size && b->shape[0] == a->shape[0] &&
        b->shape[1] == a->shape[1] && b->shape[2] == 1 && b->shape[3] == 1) {
        PlaneGrad t = {
            da, db, n->out->grad, a->data, b->data, op, (size_t)a->shape[2] * a->shape[3]};
        parallel_for(b->size, 4, binary_grad_plane_range, &t);
        return;
    }
    Bcast p;
    int nd;
    bcast_plan(a, b, &p, &nd);
    binary_backward(da, db, n->out->grad, a->data, b->data, &p, op);
}

// as graph ops: da = dy (or dy * b), db = dy, -dy (or dy * a); an operand
// that is broadcast must not depend on graph_grad's input
static void binary_vjp(Graph *g, TapeNode *n, Tensor *dy) {
    Tensor *a = n->in[0], *b = n->in[1];
    int op = ((const BinaryState *)n->state)->op, pa = base_of(a)->on_path, pb = base_of(b)->on_path;
    if ((pa && a->size != dy->size) || (pb && b->size != dy->size))
        fatal("graph_grad: %s of a broadcast operand that depends on the input", n->op);
    if (pa) node_vjp_add(g, a, op == BIN_MUL ? mul(g, dy, b) : dy);
    if (pb) node_vjp_add(g, b, op == BIN_MUL ? mul(g, dy, a) : op == BIN_SUB ? scale_shift(g, dy, -1.0f, 0.0f) : dy);
}

static Tensor *binary(Graph *g, Tensor *a, Tensor *b, int op, const char *name) {
    Bcast p;
    int nd;
    if (!bcast_plan(a, b, &p, &nd)) {
        char sa[64], sb[64];
        shape_str(a, sa, sizeof sa);
        shape_str(b, sb, sizeof sb);
        fatal("%s: shapes %s and %s do not broadcast", name, sa, sb);
    }
    Tensor *y = tensor_new(g, nd, p.shape + (4 - nd));
    binary_forward(y->data, a->data, b->data, &p, op, a->size == y->size && b->size == y->size);
    if (wants_grad(g, a, b, NULL)) {
        BinaryState s = {.op = op};
        TapeNode *nd = record(g, name, binary_node_backward, y, a, b, NULL);
        save_state(g, nd, &s, sizeof s);
        nd->vjp = binary_vjp;
    }
    return y;
}

Tensor *add(Graph *g, Tensor *a, Tensor *b) { return binary(g, a, b, BIN_ADD, "add"); }
Tensor *sub(Graph *g, Tensor *a, Tensor *b) { return binary(g, a, b, BIN_SUB, "sub"); }
Tensor *mul(Graph *g, Tensor *a, Tensor *b) { return binary(g, a, b, BIN_MUL, "mul"); }

// ---------------------------------------------------------------------------
// ---- op: scale_shift ----
// ---------------------------------------------------------------------------

// scale_shift: y = scale * x + shift
typedef struct { float scale; } ScaleShiftState;

static void scale_shift_node_backward(Graph *g, TapeNode *n) {
    float *dx = input_grad(g, n, 0), s = ((const ScaleShiftState *)n->state)->scale;
    for (size_t i = 0; i < n->out->size; i++) dx[i] += s * n->out->grad[i];
}

static void scale_shift_vjp(Graph *g, TapeNode *n, Tensor *dy) {
    node_vjp_add(g, n->in[0], scale_shift(g, dy, ((const ScaleShiftState *)n->state)->scale, 0.0f));
}

Tensor *scale_shift(Graph *g, Tensor *x, float scale, float shift) {
    Tensor *y = tensor_new(g, x->ndim, x->shape);
    for (size_t i = 0; i < x->size; i++) y->data[i] = scale * x->data[i] + shift;
    if (wants_grad(g, x, NULL, NULL)) {
        ScaleShiftState s = {.scale = scale};
        TapeNode *nd = record(g, "scale_shift", scale_shift_node_backward, y, x, NULL, NULL);
        save_state(g, nd, &s, sizeof s);
        nd->vjp = scale_shift_vjp;
    }
    return y;
}

// ---------------------------------------------------------------------------
// ---- op: concat and slice along channels, reshape, detach ----
// ---------------------------------------------------------------------------

// concat along channels: a (N,Ca,H,W), b (N,Cb,H,W) -> (N,Ca+Cb,H,W);
// images are split between the threads
typedef struct { float *y; const float *dy; float *a, *b; size_t ca, cb; } Concat;

static void concat_forward_range(void *arg, size_t i0, size_t i1) {
    const Concat *t = arg;
    for (size_t i = i0; i < i1; i++) {
        memcpy(t->y + i * (t->ca + t->cb), t->a + i * t->ca, t->ca * sizeof(float));
        memcpy(t->y + i * (t->ca + t->cb) + t->ca, t->b + i * t->cb, t->cb * sizeof(float));
    }
}

static void concat_backward_range(void *arg, size_t i0, size_t i1) {
    const Concat *t = arg;
    for (size_t i = i0; i < i1; i++) {
        const float *dy = t->dy + i * (t->ca + t->cb);
        if (t->a) for (size_t k = 0; k < t->ca; k++) t->a[i * t->ca + k] += dy[k];
        if (t->b) for (size_t k = 0; k < t->cb; k++) t->b[i * t->cb + k] += dy[t->ca + k];
    }
}

static void concat_node_backward(Graph *g, TapeNode *n) {
    Tensor *a = n->in[0], *b = n->in[1];
    Concat t = {NULL, n->out->grad, input_grad(g, n, 0), input_grad(g, n, 1),
                a->size / a->shape[0], b->size / b->shape[0]};
    parallel_for((size_t)a->shape[0], 1, concat_backward_range, &t);
}

static void concat_vjp(Graph *g, TapeNode *n, Tensor *dy) {
    int ca = n->in[0]->shape[1];
    if (base_of(n->in[0])->on_path) node_vjp_add(g, n->in[0], slice_channels(g, dy, 0, ca));
    if (base_of(n->in[1])->on_path)
        node_vjp_add(g, n->in[1], slice_channels(g, dy, ca, ca + n->in[1]->shape[1]));
}

Tensor *concat_channels(Graph *g, Tensor *a, Tensor *b) {
    check_4d(a, "concat_channels");
    check_4d(b, "concat_channels");
    if (a->shape[0] != b->shape[0] || a->shape[2] != b->shape[2] || a->shape[3] != b->shape[3])
        fatal("concat_channels: batch or spatial sizes differ");
    Tensor *y = tensor4(g, a->shape[0], a->shape[1] + b->shape[1], a->shape[2], a->shape[3]);
    Concat t = {y->data, NULL, a->data, b->data, a->size / a->shape[0], b->size / b->shape[0]};
    parallel_for((size_t)a->shape[0], 1, concat_forward_range, &t);
    if (wants_grad(g, a, b, NULL))
        record(g, "concat_channels", concat_node_backward, y, a, b, NULL)->vjp = concat_vjp;
    return y;
}

// slice along channels: x[:, c0:c1]
typedef struct { int c0, c1; } SliceState;

static void slice_node_backward(Graph *g, TapeNode *n) {
    const SliceState *s = n->state;
    Tensor *x = n->in[0];
    float *dx = input_grad(g, n, 0);
    size_t hw = (size_t)x->shape[2] * x->shape[3], len = (size_t)(s->c1 - s->c0) * hw;
    for (int i = 0; i < x->shape[0]; i++) {
        float *d = dx + (size_t)i * x->shape[1] * hw + (size_t)s->c0 * hw;
        const float *dy = n->out->grad + i * len;
        for (size_t k = 0; k < len; k++) d[k] += dy[k];
    }
}

Tensor *slice_channels(Graph *g, Tensor *x, int c0, int c1) {
    check_4d(x, "slice_channels");
    if (c0 < 0 || c1 > x->shape[1] || c0 >= c1)
        fatal("slice_channels: [%d,%d) of %d channels", c0, c1, x->shape[1]);
    Tensor *y = tensor4(g, x->shape[0], c1 - c0, x->shape[2], x->shape[3]);
    size_t hw = (size_t)x->shape[2] * x->shape[3], len = (size_t)(c1 - c0) * hw;
    for (int i = 0; i < x->shape[0]; i++)
        memcpy(y->data + i * len, x->data + (size_t)i * x->shape[1] * hw + (size_t)c0 * hw,
               len * sizeof(float));
    if (wants_grad(g, x, NULL, NULL)) {
        TapeNode *nd = record(g, "slice_channels", slice_node_backward, y, x, NULL, NULL);
        SliceState s = {.c0 = c0, .c1 = c1};
        save_state(g, nd, &s, sizeof s);
    }
    return y;
}

// transpose of a matrix: y (C, R) = x (R, C)^T (score_sde's NIN keeps its
// weight as (in, out), the transpose of a 1x1 convolution's)
static void transpose_node_backward(Graph *g, TapeNode *n) {
    float *dx = input_grad(g, n, 0);
    int R = n->in[0]->shape[0], C = n->in[0]->shape[1];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) dx[(size_t)r * C + c] += n->out->grad[(size_t)c * R + r];
}

Tensor *transpose2d(Graph *g, Tensor *x) {
    if (x->ndim != 2) fatal("transpose2d: a matrix, not %d dims", x->ndim);
    int R = x->shape[0], C = x->shape[1], s[2] = {C, R};
    Tensor *y = tensor_new(g, 2, s);
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) y->data[(size_t)c * R + r] = x->data[(size_t)r * C + c];
    if (wants_grad(g, x, NULL, NULL)) record(g, "transpose2d", transpose_node_backward, y, x, NULL, NULL);
    return y;
}

// reshape: a view that shares data and gradient with x, so it needs no node
Tensor *reshape(Graph *g, Tensor *x, int ndim, const int *shape) {
    if (ndim < 1 || ndim > MAX_DIMS || shape_size(ndim, shape) != x->size)
        fatal("reshape: %zu elements cannot take the new shape", x->size);
    Tensor *y = arena_alloc(&g->arena, sizeof *y);
    *y = *x;
    y->ndim = ndim;
    for (int i = 0; i < MAX_DIMS; i++) y->shape[i] = i < ndim ? shape[i] : 0;
    y->name = NULL;
    y->view_of = x;       // (graph_grad follows views back to what they view)
    y->dgraph = NULL;
    y->grad_pooled = 0;   // a view of x's gradient: x gives it back
    if (x->requires_grad && g->grad_enabled) y->grad = tensor_grad(g, x);
    else { y->grad = NULL; y->requires_grad = 0; }
    return y;
}

// detach: same data, cut from the tape
Tensor *detach(Graph *g, Tensor *x) {
    Tensor *y = arena_alloc(&g->arena, sizeof *y);
    *y = *x;
    y->view_of = y->dgraph = NULL;
    y->on_path = 0;
    y->grad = NULL;
    y->grad_pooled = 0;
    y->requires_grad = 0;
    y->name = NULL;
    return y;
}

// ---------------------------------------------------------------------------
// ---- op: reductions ----
// ---------------------------------------------------------------------------

// reductions: sums in double, in index order
typedef struct { float k; } SumState;  // 1 for a sum, 1/size for a mean

static void sum_all_node_backward(Graph *g, TapeNode *n) {
    float *dx = input_grad(g, n, 0), d = n->out->grad[0] * ((const SumState *)n->state)->k;
    for (size_t i = 0; i < n->in[0]->size; i++) dx[i] += d;
}

// as graph ops: dx = ones * (k dy), dy broadcast from its one element
static Tensor *ones_like(Graph *g, const Tensor *x) {
    Tensor *o = tensor_new(g, x->ndim, x->shape);
    for (size_t i = 0; i < o->size; i++) o->data[i] = 1.0f;
    return o;
}

static void sum_all_vjp(Graph *g, TapeNode *n, Tensor *dy) {
    float k = ((const SumState *)n->state)->k;
    node_vjp_add(g, n->in[0], mul(g, ones_like(g, n->in[0]), scale_shift(g, dy, k, 0.0f)));
}

static Tensor *reduce_all(Graph *g, Tensor *x, int mean) {
    int one = 1;
    Tensor *y = tensor_new(g, 1, &one);
    double s = 0.0;
    for (size_t i = 0; i < x->size; i++) s += x->data[i];
    float k = mean ? 1.0f / (float)x->size : 1.0f;
    y->data[0] = (float)(mean ? s / (double)x->size : s);
    if (wants_grad(g, x, NULL, NULL)) {
        SumState s = {.k = k};
        TapeNode *nd = record(g, mean ? "mean_all" : "sum_all", sum_all_node_backward, y, x, NULL, NULL);
        save_state(g, nd, &s, sizeof s);
        nd->vjp = sum_all_vjp;
    }
    return y;
}

Tensor *sum_all(Graph *g, Tensor *x) { return reduce_all(g, x, 0); }
Tensor *mean_all(Graph *g, Tensor *x) { return reduce_all(g, x, 1); }

static void mean_hw_node_backward(Graph *g, TapeNode *n) {
    Tensor *x = n->in[0];
    float *dx = input_grad(g, n, 0);
    size_t hw = (size_t)x->shape[2] * x->shape[3];
    for (size_t p = 0; p < n->out->size; p++) {
        float d = n->out->grad[p] / (float)hw;
        for (size_t i = 0; i < hw; i++) dx[p * hw + i] += d;
    }
}

static void mean_hw_vjp(Graph *g, TapeNode *n, Tensor *dy) {
    Tensor *x = n->in[0];
    float k = 1.0f / (float)((size_t)x->shape[2] * x->shape[3]);
    node_vjp_add(g, x, mul(g, ones_like(g, x), scale_shift(g, dy, k, 0.0f)));
}

Tensor *mean_hw(Graph *g, Tensor *x) {
    check_4d(x, "mean_hw");
    Tensor *y = tensor4(g, x->shape[0], x->shape[1], 1, 1);
    size_t hw = (size_t)x->shape[2] * x->shape[3];
    for (size_t p = 0; p < y->size; p++) {
        double s = 0.0;
        for (size_t i = 0; i < hw; i++) s += x->data[p * hw + i];
        y->data[p] = (float)(s / (double)hw);
    }
    if (wants_grad(g, x, NULL, NULL))
        record(g, "mean_hw", mean_hw_node_backward, y, x, NULL, NULL)->vjp = mean_hw_vjp;
    return y;
}

// ---------------------------------------------------------------------------
// ---- op: cross-entropy loss ----
// mean over the rows of -log softmax(logits)[label] (torch's F.cross_entropy),
// the classifier's loss (fid.c). The softmax is kept for backward:
// d/dlogits = (softmax - onehot(label)) / N.
// ---------------------------------------------------------------------------
double cross_entropy_forward(float *prob, const float *logits, const int *labels, int N, int K) {
    double total = 0.0;
    for (int n = 0; n < N; n++) {
        const float *l = logits + (size_t)n * K;
        float *p = prob + (size_t)n * K;
        double mx = -INFINITY, z = 0.0;
        for (int k = 0; k < K; k++) mx = l[k] > mx ? l[k] : mx;
        for (int k = 0; k < K; k++) z += exp((double)l[k] - mx);
        for (int k = 0; k < K; k++) p[k] = (float)(exp((double)l[k] - mx) / z);
        total += log(z) + mx - l[labels[n]];  // -log p[label], without rounding p first
    }
    return total / N;
}

void cross_entropy_backward(float *dlogits, const float *prob, const int *labels, float dloss,
                            int N, int K) {
    float k1 = dloss / (float)N;
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++)
            dlogits[(size_t)n * K + k] +=
                k1 * (prob[(size_t)n * K + k] - (k == labels[n] ? 1.0f : 0.0f));
}

typedef struct { float *prob; int *labels; } CrossEntropyState;

static void cross_entropy_node_backward(Graph *g, TapeNode *n) {
    const CrossEntropyState *s = n->state;
    float *dl = input_grad(g, n, 0);
    Tensor *x = n->in[0];
    if (dl) cross_entropy_backward(dl, s->prob, s->labels, n->out->grad[0], x->shape[0],
                                   (int)(x->size / x->shape[0]));
}

Tensor *cross_entropy(Graph *g, Tensor *logits, const int *labels) {
    int N = logits->shape[0], K = (int)(logits->size / N), one = 1;
    for (int n = 0; n < N; n++)
        if (labels[n] < 0 || labels[n] >= K)
            fatal("cross_entropy: label %d of row %d is outside 0..%d", labels[n], n, K - 1);
    Tensor *y = tensor_new(g, 1, &one);
    CrossEntropyState s = {arena_floats(&g->arena, logits->size), NULL};
    y->data[0] = (float)cross_entropy_forward(s.prob, logits->data, labels, N, K);
    if (wants_grad(g, logits, NULL, NULL)) {
        s.labels = arena_alloc(&g->arena, (size_t)N * sizeof(int));
        memcpy(s.labels, labels, (size_t)N * sizeof(int));
        TapeNode *nd = record(g, "cross_entropy", cross_entropy_node_backward, y, logits, NULL,
                              NULL);
        save_state(g, nd, &s, sizeof s);
    }
    return y;
}

// ---------------------------------------------------------------------------
// ---- op: mean squared error loss ----
// ---------------------------------------------------------------------------

// mse_loss: sum_n w[n] sum_i (a - b)^2 / (number of elements)
typedef struct { float *w; } MseState;  // per-sample weights (N), a copy, or NULL

static void mse_node_backward(Graph *g, TapeNode *n) {
    const float *w = ((const MseState *)n->state)->w;
    Tensor *a = n->in[0], *b = n->in[1];
    float *da = input_grad(g, n, 0), *db = input_grad(g, n, 1);
    size_t per = a->size / a->shape[0];
    float k = 2.0f * n->out->grad[0] / (float)a->size;
    for (int s = 0; s < a->shape[0]; s++) {
        float ks = k * (w ? w[s] : 1.0f);
        for (size_t i = s * per; i < (s + 1) * per; i++) {
            float d = ks * (a->data[i] - b->data[i]);
            if (da) da[i] += d;
            if (db) db[i] -= d;
        }
    }
}

Tensor *mse_loss(Graph *g, Tensor *a, Tensor *b, const float *w) {
    if (!same_shape(a, b)) {
        char sa[64], sb[64];
        shape_str(a, sa, sizeof sa);
        shape_str(b, sb, sizeof sb);
        fatal("mse_loss: shapes %s and %s differ", sa, sb);
    }
    int one = 1, N = a->shape[0];
    Tensor *y = tensor_new(g, 1, &one);
    size_t per = a->size / N;
    double total = 0.0;
    for (int s = 0; s < N; s++) {
        double e = 0.0;
        for (size_t i = s * per; i < (s + 1) * per; i++) {
            double d = (double)a->data[i] - b->data[i];
            e += d * d;
        }
        total += (w ? w[s] : 1.0) * e;
    }
    y->data[0] = (float)(total / (double)a->size);
    if (wants_grad(g, a, b, NULL)) {
        TapeNode *nd = record(g, "mse_loss", mse_node_backward, y, a, b, NULL);
        MseState s = {.w = NULL};
        if (w) {
            s.w = arena_floats(&g->arena, (size_t)N);
            memcpy(s.w, w, N * sizeof(float));
        }
        save_state(g, nd, &s, sizeof s);
    }
    return y;
}

// ---------------------------------------------------------------------------
// ---- op: dropout ----
// ---------------------------------------------------------------------------

// dropout: keep with probability 1-p and scale by 1/(1-p), as torch
typedef struct { float *mask; } DropoutState;  // 0 or 1/(1-p) per element

static void dropout_node_backward(Graph *g, TapeNode *n) {
    float *dx = input_grad(g, n, 0);
    const float *mask = ((const DropoutState *)n->state)->mask;
    for (size_t i = 0; i < n->out->size; i++) dx[i] += n->out->grad[i] * mask[i];
}

Tensor *dropout(Graph *g, Tensor *x, float p) {
    if (!g->training || p <= 0.0f) return x;
    if (p >= 1.0f) fatal("dropout: p=%g must be below 1", p);
    if (!g->rng) fatal("dropout: the graph has no RNG while training");
    Tensor *y = tensor_new(g, x->ndim, x->shape);
    float *mask = arena_floats(&g->arena, x->size), keep = 1.0f / (1.0f - p);
    unsigned char *kept = arena_alloc(&g->arena, x->size);
    graph_fill_keep(g, kept, x->size, x->shape[0], p);
    for (size_t i = 0; i < x->size; i++) {
        mask[i] = kept[i] ? keep : 0.0f;
        y->data[i] = x->data[i] * mask[i];
    }
    if (wants_grad(g, x, NULL, NULL)) {
        DropoutState s = {.mask = mask};
        save_state(g, record(g, "dropout", dropout_node_backward, y, x, NULL, NULL), &s, sizeof s);
    }
    return y;
}

// ---------------------------------------------------------------------------
// ---- op: clamp ----
// ---------------------------------------------------------------------------

// clamp: y = min(max(x, lo), hi); the gradient passes where lo < x < hi
typedef struct { float lo, hi; } ClampState;

static void clamp_node_backward(Graph *g, TapeNode *n) {
    const ClampState *s = n->state;
    float *dx = input_grad(g, n, 0), lo = s->lo, hi = s->hi;
    const float *x = n->in[0]->data;
    for (size_t i = 0; i < n->out->size; i++)
        if (x[i] > lo && x[i] < hi) dx[i] += n->out->grad[i];
}

Tensor *clamp(Graph *g, Tensor *x, float lo, float hi) {
    Tensor *y = tensor_new(g, x->ndim, x->shape);
    for (size_t i = 0; i < x->size; i++)
        y->data[i] = x->data[i] < lo ? lo : (x->data[i] > hi ? hi : x->data[i]);
    if (wants_grad(g, x, NULL, NULL)) {
        TapeNode *nd = record(g, "clamp", clamp_node_backward, y, x, NULL, NULL);
        ClampState s = {.lo = lo, .hi = hi};
        save_state(g, nd, &s, sizeof s);
    }
    return y;
}

// ---------------------------------------------------------------------------
// ---- op: the diagonal Gaussian posterior of a KL autoencoder ----
// latent-diffusion's DiagonalGaussianDistribution (ldm/modules/distributions/
// distributions.py): moments (N, 2C, H, W) hold the mean in channels [0, C)
// and the log-variance in [C, 2C), clamped to [-30, 20] (torch.clamp: the
// gradient passes where lo <= x <= hi).
//   sample: z = mean + exp(logvar / 2) * eps, eps ~ N(0, 1) (the
//           reparameterisation), eps drawn from g->rng and kept for backward
//   kl:     0.5 * sum over (C, H, W) of mean^2 + exp(logvar) - 1 - logvar,
//           one value per image (N), against N(0, I)
// ---------------------------------------------------------------------------
#define LOGVAR_MIN (-30.0f)
#define LOGVAR_MAX 20.0f

static float logvar_clamped(float v) {
    return v < LOGVAR_MIN ? LOGVAR_MIN : (v > LOGVAR_MAX ? LOGVAR_MAX : v);
}
static int logvar_passes(float v) { return v >= LOGVAR_MIN && v <= LOGVAR_MAX; }

void gaussian_sample_forward(float *z, const float *moments, const float *eps, int N, int C,
                             int HW) {
    size_t per = (size_t)C * HW;
    for (int n = 0; n < N; n++) {
        const float *mean = moments + 2 * per * n, *logvar = mean + per;
        for (size_t i = 0; i < per; i++)
            z[per * n + i] = mean[i] + expf(0.5f * logvar_clamped(logvar[i])) * eps[per * n + i];
    }
}

// dmean = dz; dlogvar = dz * eps * exp(logvar / 2) / 2 where the clamp passes
void gaussian_sample_backward(float *dmoments, const float *dz, const float *moments,
                              const float *eps, int N, int C, int HW) {
    size_t per = (size_t)C * HW;
    for (int n = 0; n < N; n++) {
        const float *logvar = moments + 2 * per * n + per, *d = dz + per * n, *e = eps + per * n;
        float *dmean = dmoments + 2 * per * n, *dlogvar = dmean + per;
        for (size_t i = 0; i < per; i++) {
            dmean[i] += d[i];
            if (logvar_passes(logvar[i]))
                dlogvar[i] += d[i] * e[i] * 0.5f * expf(0.5f * logvar[i]);
        }
    }
}

void gaussian_kl_forward(float *kl, const float *moments, int N, int C, int HW) {
    size_t per = (size_t)C * HW;
    for (int n = 0; n < N; n++) {
        const float *mean = moments + 2 * per * n, *logvar = mean + per;
        double s = 0.0;
        for (size_t i = 0; i < per; i++) {
            double lv = logvar_clamped(logvar[i]);
            s += (double)mean[i] * mean[i] + exp(lv) - 1.0 - lv;
        }
        kl[n] = (float)(0.5 * s);
    }
}

// dmean = dkl * mean; dlogvar = dkl * (exp(logvar) - 1) / 2 where the clamp passes
void gaussian_kl_backward(float *dmoments, const float *dkl, const float *moments, int N, int C,
                          int HW) {
    size_t per = (size_t)C * HW;
    for (int n = 0; n < N; n++) {
        const float *mean = moments + 2 * per * n, *logvar = mean + per;
        float *dmean = dmoments + 2 * per * n, *dlogvar = dmean + per;
        for (size_t i = 0; i < per; i++) {
            dmean[i] += dkl[n] * mean[i];
            if (logvar_passes(logvar[i])) dlogvar[i] += dkl[n] * 0.5f * (expf(logvar[i]) - 1.0f);
        }
    }
}

static void gaussian_shape(const Tensor *moments, const char *op, int *N, int *C, int *HW) {
    check_4d(moments, op);
    if (moments->shape[1] % 2) fatal("%s: moments need an even channel count (mean, logvar)", op);
    *N = moments->shape[0];
    *C = moments->shape[1] / 2;
    *HW = moments->shape[2] * moments->shape[3];
}

typedef struct { float *eps; } GaussianSampleState;

static void gaussian_sample_node_backward(Graph *g, TapeNode *n) {
    int N, C, HW;
    gaussian_shape(n->in[0], "gaussian_sample", &N, &C, &HW);
    gaussian_sample_backward(input_grad(g, n, 0), n->out->grad, n->in[0]->data,
                             ((const GaussianSampleState *)n->state)->eps, N, C, HW);
}

Tensor *gaussian_sample(Graph *g, Tensor *moments, const float *eps) {
    int N, C, HW;
    gaussian_shape(moments, "gaussian_sample", &N, &C, &HW);
    if (!eps && !g->rng) fatal("gaussian_sample: the graph has no RNG");
    Tensor *z = tensor4(g, N, C, moments->shape[2], moments->shape[3]);
    GaussianSampleState s = {arena_floats(&g->arena, z->size)};
    if (eps)
        memcpy(s.eps, eps, z->size * sizeof(float));
    else
        rng_fill_normal(g->rng, s.eps, z->size, 0.0f, 1.0f);
    gaussian_sample_forward(z->data, moments->data, s.eps, N, C, HW);
    if (wants_grad(g, moments, NULL, NULL))
        save_state(g, record(g, "gaussian_sample", gaussian_sample_node_backward, z, moments, NULL,
                             NULL),
                   &s, sizeof s);
    return z;
}

static void gaussian_kl_node_backward(Graph *g, TapeNode *n) {
    int N, C, HW;
    gaussian_shape(n->in[0], "gaussian_kl", &N, &C, &HW);
    gaussian_kl_backward(input_grad(g, n, 0), n->out->grad, n->in[0]->data, N, C, HW);
}

Tensor *gaussian_kl(Graph *g, Tensor *moments) {
    int N, C, HW;
    gaussian_shape(moments, "gaussian_kl", &N, &C, &HW);
    Tensor *kl = tensor_new(g, 1, &N);
    gaussian_kl_forward(kl->data, moments->data, N, C, HW);
    if (wants_grad(g, moments, NULL, NULL))
        record(g, "gaussian_kl", gaussian_kl_node_backward, kl, moments, NULL, NULL);
    return kl;
}

// ---------------------------------------------------------------------------
// ---- op: FIR resampling, upfirdn2d ----
// score_sde's upfirdn2d (op/upfirdn2d.py, upfirdn2d_native), the FIR up- and
// downsampling of NCSN++ and of DDGAN's discriminators: each plane is
// upsampled by inserting up - 1 zeros after every sample, padded by pad0
// before and pad1 after (negative: cropped), convolved with the K x K kernel
// (a true convolution: the kernel flipped, as upfirdn2d_native does), and
// every down-th sample kept. The same pads on both axes, as score_sde uses it.
// Output side (S * up + pad0 + pad1 - K) / down + 1.
// ---------------------------------------------------------------------------
typedef struct {
    float *out;
    const float *inp;
    const float *kernel;
    int H, W, K, up, down, pad0, OH, OW;
} Upfirdn;

static int upfirdn_side(int S, int K, int up, int down, int pad0, int pad1) {
    int n = S * up + pad0 + pad1 - K;
    return n < 0 ? 0 : n / down + 1;
}

// The reference: out[o] = sum_k kernel[K-1-k] u[o * down + k - pad0], u the
// zero-stuffed input, every tap tested
static void upfirdn_forward_ref_range(void *arg, size_t p0, size_t p1) {
    const Upfirdn *t = arg;
    int K = t->K, Hu = t->H * t->up, Wu = t->W * t->up;
    for (size_t p = p0; p < p1; p++) {
        const float *x = t->inp + p * t->H * t->W;
        float *y = t->out + p * t->OH * t->OW;
        for (int oy = 0; oy < t->OH; oy++)
            for (int ox = 0; ox < t->OW; ox++) {
                float acc = 0.0f;
                for (int ky = 0; ky < K; ky++) {
                    int uy = oy * t->down + ky - t->pad0;
                    if (uy < 0 || uy >= Hu || uy % t->up) continue;
                    const float *xr = x + (size_t)(uy / t->up) * t->W;
                    const float *kr = t->kernel + (size_t)(K - 1 - ky) * K + K - 1;
                    for (int kx = 0; kx < K; kx++) {
                        int ux = ox * t->down + kx - t->pad0;
                        if (ux < 0 || ux >= Wu || ux % t->up) continue;
                        acc += kr[-kx] * xr[ux / t->up];
                    }
                }
                y[(size_t)oy * t->OW + ox] = acc;
            }
    }
}

void upfirdn2d_forward_ref(float *out, const float *inp, const float *kernel, size_t P, int H, int W,
                       int K, int up, int down, int pad0, int pad1) {
    Upfirdn t = {out, inp, kernel, H, W, K, up, down, pad0,
                 upfirdn_side(H, K, up, down, pad0, pad1), upfirdn_side(W, K, up, down, pad0, pad1)};
    parallel_for(P, 4, upfirdn_forward_ref_range, &t);
}

// the adjoint: every input sample gathers what it gave to each output (per
// plane, so a plane's gradient is made by one thread, in a fixed order)
static void upfirdn_backward_ref_range(void *arg, size_t p0, size_t p1) {
    const Upfirdn *t = arg;  // out: dinp, inp: dout
    int K = t->K, Hu = t->H * t->up, Wu = t->W * t->up;
    for (size_t p = p0; p < p1; p++) {
        const float *dy = t->inp + p * t->OH * t->OW;
        float *dx = t->out + p * t->H * t->W;
        for (int oy = 0; oy < t->OH; oy++)
            for (int ox = 0; ox < t->OW; ox++) {
                float d = dy[(size_t)oy * t->OW + ox];
                for (int ky = 0; ky < K; ky++) {
                    int uy = oy * t->down + ky - t->pad0;
                    if (uy < 0 || uy >= Hu || uy % t->up) continue;
                    float *xr = dx + (size_t)(uy / t->up) * t->W;
                    const float *kr = t->kernel + (size_t)(K - 1 - ky) * K + K - 1;
                    for (int kx = 0; kx < K; kx++) {
                        int ux = ox * t->down + kx - t->pad0;
                        if (ux < 0 || ux >= Wu || ux % t->up) continue;
                        xr[ux / t->up] += kr[-kx] * d;
                    }
                }
            }
    }
}

void upfirdn2d_backward_ref(float *dinp, const float *dout, const float *kernel, size_t P, int H,
                        int W, int K, int up, int down, int pad0, int pad1) {
    Upfirdn t = {dinp, dout, kernel, H, W, K, up, down, pad0,
                 upfirdn_side(H, K, up, down, pad0, pad1), upfirdn_side(W, K, up, down, pad0, pad1)};
    parallel_for(P, 4, upfirdn_backward_ref_range, &t);
}

// The fast path: the taps that meet each output row and column (the input
// index and the kernel index of every k that passes the reference's tests,
// in the reference's order) are listed once per call, so the inner loops
// have no tests. Same sums in the same order: bitwise the reference's.
typedef struct { int n, *in, *k; } UpfirdnTaps;  // n taps of output line o at [o * K ..)

static void upfirdn_taps(UpfirdnTaps *t, int *mem, int O, int I, int K, int up, int down,
                         int pad0) {
    t->in = mem;
    t->k = mem + (size_t)O * K;
    int *count = mem + 2 * (size_t)O * K;
    for (int o = 0; o < O; o++) {
        int n = 0;
        for (int k = 0; k < K; k++) {
            int u = o * down + k - pad0;
            if (u < 0 || u >= I * up || u % up) continue;
            t->in[o * K + n] = u / up;
            t->k[o * K + n] = K - 1 - k;
            n++;
        }
        count[o] = n;
    }
}

typedef struct {
    const Upfirdn *u;
    UpfirdnTaps rows, cols;
    const int *nrow, *ncol;
} UpfirdnFast;

static void upfirdn_forward_range(void *arg, size_t p0, size_t p1) {
    const UpfirdnFast *f = arg;
    const Upfirdn *t = f->u;
    int K = t->K;
    for (size_t p = p0; p < p1; p++) {
        const float *x = t->inp + p * t->H * t->W;
        float *y = t->out + p * t->OH * t->OW;
        for (int oy = 0; oy < t->OH; oy++) {
            const int *iy = f->rows.in + oy * K, *ky = f->rows.k + oy * K, ny = f->nrow[oy];
            for (int ox = 0; ox < t->OW; ox++) {
                const int *ix = f->cols.in + ox * K, *kx = f->cols.k + ox * K, nx = f->ncol[ox];
                float acc = 0.0f;
                for (int a = 0; a < ny; a++) {
                    const float *xr = x + (size_t)iy[a] * t->W, *kr = t->kernel + (size_t)ky[a] * K;
                    for (int b = 0; b < nx; b++) acc += kr[kx[b]] * xr[ix[b]];
                }
                y[(size_t)oy * t->OW + ox] = acc;
            }
        }
    }
}

static void upfirdn_backward_range(void *arg, size_t p0, size_t p1) {
    const UpfirdnFast *f = arg;
    const Upfirdn *t = f->u;  // out: dinp, inp: dout
    int K = t->K;
    for (size_t p = p0; p < p1; p++) {
        const float *dy = t->inp + p * t->OH * t->OW;
        float *dx = t->out + p * t->H * t->W;
        for (int oy = 0; oy < t->OH; oy++) {
            const int *iy = f->rows.in + oy * K, *ky = f->rows.k + oy * K, ny = f->nrow[oy];
            for (int ox = 0; ox < t->OW; ox++) {
                const int *ix = f->cols.in + ox * K, *kx = f->cols.k + ox * K, nx = f->ncol[ox];
                float d = dy[(size_t)oy * t->OW + ox];
                for (int a = 0; a < ny; a++) {
                    float *xr = dx + (size_t)iy[a] * t->W;
                    const float *kr = t->kernel + (size_t)ky[a] * K;
                    for (int b = 0; b < nx; b++) xr[ix[b]] += kr[kx[b]] * d;
                }
            }
        }
    }
}

static void upfirdn_fast(const Upfirdn *t, size_t P, void (*range)(void *, size_t, size_t)) {
    int K = t->K;
    int *mem = mallocCheck(((size_t)t->OH + t->OW) * (2 * (size_t)K + 1) * sizeof(int));
    UpfirdnFast f = {.u = t};
    upfirdn_taps(&f.rows, mem, t->OH, t->H, K, t->up, t->down, t->pad0);
    int *cmem = mem + (size_t)t->OH * (2 * (size_t)K + 1);
    upfirdn_taps(&f.cols, cmem, t->OW, t->W, K, t->up, t->down, t->pad0);
    f.nrow = mem + 2 * (size_t)t->OH * K;
    f.ncol = cmem + 2 * (size_t)t->OW * K;
    parallel_for(P, 4, range, &f);
    free(mem);
}

void upfirdn2d_forward(float *out, const float *inp, const float *kernel, size_t P, int H, int W,
                       int K, int up, int down, int pad0, int pad1) {
    Upfirdn t = {out, inp, kernel, H, W, K, up, down, pad0,
                 upfirdn_side(H, K, up, down, pad0, pad1), upfirdn_side(W, K, up, down, pad0, pad1)};
    upfirdn_fast(&t, P, upfirdn_forward_range);
}

void upfirdn2d_backward(float *dinp, const float *dout, const float *kernel, size_t P, int H,
                        int W, int K, int up, int down, int pad0, int pad1) {
    Upfirdn t = {dinp, dout, kernel, H, W, K, up, down, pad0,
                 upfirdn_side(H, K, up, down, pad0, pad1), upfirdn_side(W, K, up, down, pad0, pad1)};
    upfirdn_fast(&t, P, upfirdn_backward_range);
}

typedef struct { const float *kernel; int K, up, down, pad0, pad1; } UpfirdnState;

static void upfirdn_node_backward(Graph *g, TapeNode *n) {
    const UpfirdnState *s = n->state;
    const Tensor *x = n->in[0];
    upfirdn2d_backward(input_grad(g, n, 0), n->out->grad, s->kernel,
                       (size_t)x->shape[0] * x->shape[1], x->shape[2], x->shape[3], s->K, s->up,
                       s->down, s->pad0, s->pad1);
}

// upfirdn2d's adjoint as an op: z = A^T dy; its backward d(dy) = A dz
static void upfirdn_t_node_backward(Graph *g, TapeNode *n) {
    const UpfirdnState *s = n->state;
    Tensor *dy = n->in[0];
    float *ddy = input_grad(g, n, 0);
    ArenaMark m = arena_mark(&g->arena);
    float *t = arena_floats(&g->arena, dy->size);
    upfirdn2d_forward(t, n->out->grad, s->kernel, (size_t)dy->shape[0] * dy->shape[1],
                      n->out->shape[2], n->out->shape[3], s->K, s->up, s->down, s->pad0, s->pad1);
    for (size_t i = 0; i < dy->size; i++) ddy[i] += t[i];
    arena_release(&g->arena, m);
}

Tensor *upfirdn2d_transpose(Graph *g, Tensor *dy, const float *kernel, int K, int up, int down,
                            int pad0, int pad1, int H, int W) {
    check_4d(dy, "upfirdn2d_transpose");
    if (dy->shape[2] != upfirdn_side(H, K, up, down, pad0, pad1) ||
        dy->shape[3] != upfirdn_side(W, K, up, down, pad0, pad1))
        fatal("upfirdn2d_transpose: dy does not fit a %dx%d input", H, W);
    Tensor *z = tensor_zeros(g, 4, (int[4]){dy->shape[0], dy->shape[1], H, W});
    float *k = arena_floats(&g->arena, (size_t)K * K);
    memcpy(k, kernel, (size_t)K * K * sizeof(float));
    upfirdn2d_backward(z->data, dy->data, k, (size_t)dy->shape[0] * dy->shape[1], H, W, K, up,
                       down, pad0, pad1);
    if (wants_grad(g, dy, NULL, NULL)) {
        UpfirdnState s = {k, K, up, down, pad0, pad1};
        save_state(g, record(g, "upfirdn2d_transpose", upfirdn_t_node_backward, z, dy, NULL, NULL),
                   &s, sizeof s);
    }
    return z;
}

static void upfirdn_vjp(Graph *g, TapeNode *n, Tensor *dy) {
    const UpfirdnState *s = n->state;
    Tensor *x = n->in[0];
    node_vjp_add(g, x, upfirdn2d_transpose(g, dy, s->kernel, s->K, s->up, s->down, s->pad0,
                                           s->pad1, x->shape[2], x->shape[3]));
}

Tensor *upfirdn2d(Graph *g, Tensor *x, const float *kernel, int K, int up, int down, int pad0,
                  int pad1) {
    check_4d(x, "upfirdn2d");
    if (K < 1 || up < 1 || down < 1) fatal("upfirdn2d: kernel %d, up %d, down %d", K, up, down);
    int OH = upfirdn_side(x->shape[2], K, up, down, pad0, pad1),
        OW = upfirdn_side(x->shape[3], K, up, down, pad0, pad1);
    if (OH < 1 || OW < 1) fatal("upfirdn2d: a %dx%d map gives no output", x->shape[2], x->shape[3]);
    Tensor *y = tensor4(g, x->shape[0], x->shape[1], OH, OW);
    float *k = arena_floats(&g->arena, (size_t)K * K);  // the caller's kernel may not outlive g
    memcpy(k, kernel, (size_t)K * K * sizeof(float));
    upfirdn2d_forward(y->data, x->data, k, (size_t)x->shape[0] * x->shape[1], x->shape[2],
                      x->shape[3], K, up, down, pad0, pad1);
    if (wants_grad(g, x, NULL, NULL)) {
        UpfirdnState s = {k, K, up, down, pad0, pad1};
        TapeNode *nd = record(g, "upfirdn2d", upfirdn_node_backward, y, x, NULL, NULL);
        save_state(g, nd, &s, sizeof s);
        nd->vjp = upfirdn_vjp;
    }
    return y;
}

// ---------------------------------------------------------------------------
// ---- op: PixelNorm ----
// DDGAN's z mapping network (score_models/ncsnpp_generator_adagn.py,
// PixelNorm): y = x / sqrt(mean_c x^2 + 1e-8), per sample (and pixel)
// r = (mean_c x^2 + eps)^(-1/2); dx_c = r dy_c - x_c r^3 (1/C) sum_k x_k dy_k
// ---------------------------------------------------------------------------
void pixel_norm_forward(float *out, float *rnorm, const float *inp, int N, int C, int HW,
                        float eps) {
    for (int n = 0; n < N; n++)
        for (int p = 0; p < HW; p++) {
            const float *x = inp + (size_t)n * C * HW + p;
            double sq = 0.0;
            for (int c = 0; c < C; c++) sq += (double)x[(size_t)c * HW] * x[(size_t)c * HW];
            float r = (float)(1.0 / sqrt(sq / C + eps));
            rnorm[(size_t)n * HW + p] = r;
            for (int c = 0; c < C; c++) out[(size_t)n * C * HW + (size_t)c * HW + p] = x[(size_t)c * HW] * r;
        }
}

void pixel_norm_backward(float *dinp, const float *dout, const float *inp, const float *rnorm,
                         int N, int C, int HW) {
    for (int n = 0; n < N; n++)
        for (int p = 0; p < HW; p++) {
            size_t o = (size_t)n * C * HW + p;
            double dot = 0.0;
            for (int c = 0; c < C; c++) dot += (double)inp[o + (size_t)c * HW] * dout[o + (size_t)c * HW];
            float r = rnorm[(size_t)n * HW + p], k = (float)(dot / C) * r * r * r;
            for (int c = 0; c < C; c++) {
                size_t i = o + (size_t)c * HW;
                dinp[i] += r * dout[i] - inp[i] * k;
            }
        }
}

typedef struct { float *rnorm; } PixelNormState;

static int rest_of(const Tensor *x) { return (int)(x->size / ((size_t)x->shape[0] * x->shape[1])); }

static void pixel_norm_node_backward(Graph *g, TapeNode *n) {
    const Tensor *x = n->in[0];
    pixel_norm_backward(input_grad(g, n, 0), n->out->grad, x->data,
                        ((const PixelNormState *)n->state)->rnorm, x->shape[0], x->shape[1],
                        rest_of(x));
}

Tensor *pixel_norm(Graph *g, Tensor *x) {
    if (x->ndim < 2) fatal("pixel_norm: expected (N, C, ...), got %d dims", x->ndim);
    Tensor *y = tensor_new(g, x->ndim, x->shape);
    int N = x->shape[0], C = x->shape[1], HW = rest_of(x);
    PixelNormState s = {arena_floats(&g->arena, (size_t)N * HW)};
    pixel_norm_forward(y->data, s.rnorm, x->data, N, C, HW, 1e-8f);
    if (wants_grad(g, x, NULL, NULL))
        save_state(g, record(g, "pixel_norm", pixel_norm_node_backward, y, x, NULL, NULL), &s,
                   sizeof s);
    return y;
}

// ---------------------------------------------------------------------------
// ---- op: minibatch standard deviation ----
// DDGAN's discriminators (score_models/discriminator.py), StyleGAN2's layer
// with stddev_feat 1: samples n = g * M + m (g < G groups, M = N / G; the
// code's view(group, -1, ...)) form the groups {m, M + m, ...}; per m,
// s_m = mean over (c, h, w) of sqrt(biased var over g + 1e-8), appended to
// every sample n of the group as one more channel: (N, C + 1, H, W).
// Backward: d x_{gM+m} = ds_m (x - mu) / (C H W G sd), ds_m summed over the
// group's new channel.
// ---------------------------------------------------------------------------
// the mean and sd = sqrt(biased var + 1e-8) of element i over group m's G samples
static void group_moments(const float *inp, size_t per, int M, int G, int m, size_t i, double *mu,
                          double *sd) {
    double a = 0.0, var = 0.0;
    for (int g = 0; g < G; g++) a += inp[(size_t)(g * M + m) * per + i];
    a /= G;
    for (int g = 0; g < G; g++) {
        double d = inp[(size_t)(g * M + m) * per + i] - a;
        var += d * d;
    }
    *mu = a;
    *sd = sqrt(var / G + 1e-8);
}

void minibatch_std_forward(float *out, const float *inp, int N, int C, int HW, int G) {
    int M = N / G;
    size_t per = (size_t)C * HW;
    for (int n = 0; n < N; n++) memcpy(out + (size_t)n * (per + HW), inp + (size_t)n * per, per * sizeof(float));
    for (int m = 0; m < M; m++) {
        double sum = 0.0;
        for (size_t i = 0; i < per; i++) {
            double mu, sd;
            group_moments(inp, per, M, G, m, i, &mu, &sd);
            sum += sd;
        }
        float s = (float)(sum / per);
        for (int g = 0; g < G; g++) {
            float *o = out + (size_t)(g * M + m) * (per + HW) + per;
            for (int p = 0; p < HW; p++) o[p] = s;
        }
    }
}

void minibatch_std_backward(float *dinp, const float *dout, const float *inp, int N, int C,
                            int HW, int G) {
    int M = N / G;
    size_t per = (size_t)C * HW;
    for (int n = 0; n < N; n++) {
        const float *d = dout + (size_t)n * (per + HW);
        float *dx = dinp + (size_t)n * per;
        for (size_t i = 0; i < per; i++) dx[i] += d[i];
    }
    for (int m = 0; m < M; m++) {
        double ds = 0.0;
        for (int g = 0; g < G; g++) {
            const float *d = dout + (size_t)(g * M + m) * (per + HW) + per;
            for (int p = 0; p < HW; p++) ds += d[p];
        }
        ds /= (double)per;  // the mean over (c, h, w)
        for (size_t i = 0; i < per; i++) {
            double mu, sd;
            group_moments(inp, per, M, G, m, i, &mu, &sd);
            double k = ds / (G * sd);
            for (int g = 0; g < G; g++) {
                size_t j = (size_t)(g * M + m) * per + i;
                dinp[j] += (float)(k * (inp[j] - mu));
            }
        }
    }
}

typedef struct { int group; } MinibatchStdState;

// ---- its input gradient as an op (the vjp, for graph_grad) ----
// dx = dy[:, :C] + c_m u, u = (x - mu) / sd per element of group m, c_m =
// ds_m / (C H W G), ds_m the group's std-channel gradient summed. With v the
// gradient of dx: d x_h = c_m / sd (v_h - mean_g v - u_h mean_g (v u)); the
// std channel of d(dy) gets sum over the group's (g, c, h, w) of v u / (C H W G)
// at every (g, h, w); its other channels get v.
typedef struct { int group; } MinibatchStdGradState;

static void minibatch_std_grad_node_backward(Graph *g, TapeNode *n) {
    Tensor *x = n->in[0], *dy = n->in[1];
    int N = x->shape[0], C = x->shape[1], HW = x->shape[2] * x->shape[3],
        G = ((const MinibatchStdGradState *)n->state)->group, M = N / G;
    size_t per = (size_t)C * HW;
    float *dx = input_grad(g, n, 0), *ddy = input_grad(g, n, 1);
    const float *v = n->out->grad;
    for (int m = 0; m < M; m++) {
        double ds = 0.0, vu = 0.0;
        for (int gi = 0; gi < G; gi++)
            for (int p = 0; p < HW; p++) ds += dy->data[(size_t)(gi * M + m) * (per + HW) + per + p];
        double c = ds / ((double)per * G);
        for (size_t i = 0; i < per; i++) {
            double mu, sd, mv = 0.0, mvu = 0.0;
            group_moments(x->data, per, M, G, m, i, &mu, &sd);
            for (int gi = 0; gi < G; gi++) {
                size_t j = (size_t)(gi * M + m) * per + i;
                double u = (x->data[j] - mu) / sd;
                mv += v[j];
                mvu += v[j] * u;
            }
            vu += mvu;
            mv /= G;
            mvu /= G;
            if (dx)
                for (int gi = 0; gi < G; gi++) {
                    size_t j = (size_t)(gi * M + m) * per + i;
                    double u = (x->data[j] - mu) / sd;
                    dx[j] += (float)(c / sd * (v[j] - mv - u * mvu));
                }
        }
        if (ddy) {
            float k = (float)(vu / ((double)per * G));
            for (int gi = 0; gi < G; gi++) {
                float *d = ddy + (size_t)(gi * M + m) * (per + HW);
                const float *vg = v + (size_t)(gi * M + m) * per;
                for (size_t i = 0; i < per; i++) d[i] += vg[i];
                for (int p = 0; p < HW; p++) d[per + p] += k;
            }
        }
    }
}

Tensor *minibatch_std_input_grad(Graph *g, Tensor *x, Tensor *dy, int group) {
    check_4d(x, "minibatch_std_input_grad");
    int N = x->shape[0], C = x->shape[1], HW = x->shape[2] * x->shape[3];
    if (group < 1 || N % group || dy->size != (size_t)N * (C + 1) * HW)
        fatal("minibatch_std_input_grad: shapes or group do not fit");
    Tensor *dx = tensor_zeros(g, 4, x->shape);
    minibatch_std_backward(dx->data, dy->data, x->data, N, C, HW, group);
    if (wants_grad(g, x, dy, NULL)) {
        MinibatchStdGradState s = {group};
        save_state(g, record(g, "minibatch_std_input_grad", minibatch_std_grad_node_backward, dx, x,
                             dy, NULL),
                   &s, sizeof s);
    }
    return dx;
}

static void minibatch_std_vjp(Graph *g, TapeNode *n, Tensor *dy) {
    node_vjp_add(g, n->in[0], minibatch_std_input_grad(g, n->in[0], dy,
                                                       ((const MinibatchStdState *)n->state)->group));
}

static void minibatch_std_node_backward(Graph *g, TapeNode *n) {
    const Tensor *x = n->in[0];
    minibatch_std_backward(input_grad(g, n, 0), n->out->grad, x->data, x->shape[0], x->shape[1],
                           x->shape[2] * x->shape[3], ((const MinibatchStdState *)n->state)->group);
}

Tensor *minibatch_std(Graph *g, Tensor *x, int group) {
    check_4d(x, "minibatch_std");
    int N = x->shape[0];
    if (group < 1 || N % group)
        fatal("minibatch_std: a batch of %d does not split into groups of %d", N, group);
    Tensor *y = tensor4(g, N, x->shape[1] + 1, x->shape[2], x->shape[3]);
    minibatch_std_forward(y->data, x->data, N, x->shape[1], x->shape[2] * x->shape[3], group);
    if (wants_grad(g, x, NULL, NULL)) {
        MinibatchStdState s = {group};
        TapeNode *nd = record(g, "minibatch_std", minibatch_std_node_backward, y, x, NULL, NULL);
        save_state(g, nd, &s, sizeof s);
        nd->vjp = minibatch_std_vjp;
    }
    return y;
}

// ---------------------------------------------------------------------------
// ---- parameters ----
// ---------------------------------------------------------------------------
void params_init(ParamSet *p) { memset(p, 0, sizeof *p); }

size_t params_add(ParamSet *p, const char *name, int ndim, const int *shape) {
    if (p->data) fatal("params_add('%s') after params_alloc", name);
    if (p->count == p->cap) {
        p->cap = p->cap ? 2 * p->cap : 64;
        Tensor *t = mallocCheck(p->cap * sizeof *t);
        if (p->count) memcpy(t, p->t, p->count * sizeof *t);
        free(p->t);
        p->t = t;
    }
    size_t len = strlen(name) + 1;
    if (p->names_len + len > p->names_cap) {
        size_t cap = p->names_cap ? 2 * p->names_cap : 4096;
        while (cap < p->names_len + len) cap *= 2;
        char *nm = mallocCheck(cap);
        if (p->names_len) memcpy(nm, p->names, p->names_len);
        free(p->names);
        p->names = nm;
        p->names_cap = cap;
    }
    memcpy(p->names + p->names_len, name, len);
    Tensor *t = &p->t[p->count];
    memset(t, 0, sizeof *t);
    t->ndim = ndim;
    for (int i = 0; i < ndim; i++) t->shape[i] = shape[i];
    t->size = shape_size(ndim, shape);
    t->name = (const char *)(uintptr_t)p->names_len;  // an offset until params_alloc
    p->names_len += len;
    p->total += t->size;
    return p->count++;
}

void params_alloc(ParamSet *p, int with_grad) {
    p->data = aligned_malloc(p->total * sizeof(float));
    memset(p->data, 0, p->total * sizeof(float));
    p->grad = NULL;
    if (with_grad) {
        p->grad = aligned_malloc(p->total * sizeof(float));
        memset(p->grad, 0, p->total * sizeof(float));
    }
    size_t off = 0;
    for (size_t i = 0; i < p->count; i++) {
        Tensor *t = &p->t[i];
        t->name = p->names + (size_t)(uintptr_t)t->name;
        t->data = p->data + off;
        t->grad = with_grad ? p->grad + off : NULL;
        t->requires_grad = with_grad;
        off += t->size;
    }
}

Tensor *params_get(ParamSet *p, size_t index) { return &p->t[index]; }

const char *params_name(const ParamSet *p, size_t index) {
    const Tensor *t = &p->t[index];
    return p->data ? t->name : p->names + (size_t)(uintptr_t)t->name;
}

Tensor *params_find(ParamSet *p, const char *name) {
    for (size_t i = 0; i < p->count; i++)
        if (strcmp(p->t[i].name, name) == 0) return &p->t[i];
    return NULL;
}

static void zero_range(void *arg, size_t i0, size_t i1) {
    memset((float *)arg + i0, 0, (i1 - i0) * sizeof(float));
}

void params_zero_grad(ParamSet *p) {  // (33 M floats for LDDGAN's generator: both threads)
    if (p->grad) parallel_for(p->total, 1 << 15, zero_range, p->grad);
}

void params_free(ParamSet *p) {
    aligned_free(p->data);
    aligned_free(p->grad);
    free(p->t);
    free(p->names);
    memset(p, 0, sizeof *p);
}

void param_decl_init(ParamDecl *d, ParamSet *ps) {
    memset(d, 0, sizeof *d);
    d->ps = ps;
}

void param_declare(ParamDecl *d, Tensor **slot, const char *name, int ndim, int s0, int s1,
                   int s2, int s3) {
    int shape[4] = {s0, s1, s2, s3};
    if (d->n == d->cap) {
        d->cap = d->cap ? 2 * d->cap : 256;
        ParamSlot *n = mallocCheck(d->cap * sizeof *n);
        if (d->n) memcpy(n, d->slots, d->n * sizeof *n);
        free(d->slots);
        d->slots = n;
    }
    d->slots[d->n].slot = slot;
    d->slots[d->n].index = params_add(d->ps, name, ndim, shape);
    d->n++;
}

void param_declare_weight_bias(ParamDecl *d, Tensor **w, Tensor **b, const char *prefix, int ndim,
                               int s0, int s1, int s2, int s3) {
    char name[200];
    snprintf(name, sizeof name, "%s.weight", prefix);
    param_declare(d, w, name, ndim, s0, s1, s2, s3);
    snprintf(name, sizeof name, "%s.bias", prefix);
    param_declare(d, b, name, 1, s0, 0, 0, 0);
}

void param_decl_fill(ParamDecl *d) {
    for (size_t i = 0; i < d->n; i++) *d->slots[i].slot = params_get(d->ps, d->slots[i].index);
    param_decl_free(d);
}

void param_decl_free(ParamDecl *d) {
    free(d->slots);
    d->slots = NULL;
    d->n = d->cap = 0;
}

void params_init_torch(ParamSet *ps, Rng *rng, int (*is_zero)(const char *name)) {
    for (size_t i = 0; i < ps->count; i++) {
        Tensor *t = params_get(ps, i);
        if (is_zero && is_zero(t->name)) { memset(t->data, 0, t->size * sizeof(float)); continue; }
        if (t->ndim == 1) {
            // biases take the fan_in of their weight (the previous parameter);
            // 1-D weights are norm scales
            if (ends_with(t->name, ".weight")) {
                for (size_t k = 0; k < t->size; k++) t->data[k] = 1.0f;
                continue;
            }
            Tensor *w = i > 0 ? params_get(ps, i - 1) : NULL;
            if (!w || w->ndim == 1) { memset(t->data, 0, t->size * sizeof(float)); continue; }
            float bound = 1.0f / sqrtf((float)(w->size / w->shape[0]));
            rng_fill_uniform(rng, t->data, t->size, -bound, bound);
        } else {
            float bound = 1.0f / sqrtf((float)(t->size / t->shape[0]));
            rng_fill_uniform(rng, t->data, t->size, -bound, bound);
        }
    }
}

// ---------------------------------------------------------------------------
// ---- optimiser ----
// ---------------------------------------------------------------------------
void adam_init(Adam *a, size_t n, float lr) {
    a->n = n;
    a->m = aligned_malloc(n * sizeof(float));
    a->v = aligned_malloc(n * sizeof(float));
    memset(a->m, 0, n * sizeof(float));
    memset(a->v, 0, n * sizeof(float));
    a->step = 0;
    a->lr = lr;
    a->beta1 = 0.9f;
    a->beta2 = 0.999f;
    a->eps = 1e-8f;
}

typedef struct { Adam *a; float *p; const float *g; float step_size, bc2_sqrt; } AdamTask;

// In vectors: sqrtf and the divisions, which -O2 keeps scalar (for errno),
// made this loop compute-bound at twice its memory time (33 M weights:
// 75 ms at 2 threads, Intel Xeon). Each lane does the scalar tail's
// operations in its order, and IEEE sqrt and division are correctly rounded.
static void adam_range(void *arg, size_t i0, size_t i1) {
    const AdamTask *t = arg;
    float b1 = t->a->beta1, b2 = t->a->beta2, eps = t->a->eps;
    float *m = t->a->m, *v = t->a->v;
    size_t i = i0;
#if VLEN > 1
    vfloat vb1 = v_set1(b1), vc1 = v_set1(1.0f - b1), vb2 = v_set1(b2), vc2 = v_set1(1.0f - b2);
    vfloat veps = v_set1(eps), vbc2 = v_set1(t->bc2_sqrt), vstep = v_set1(-t->step_size);
    for (; i + VLEN <= i1; i += VLEN) {
        vfloat g = v_load(t->g + i);
        vfloat mi = v_add(v_mul(v_load(m + i), vb1), v_mul(g, vc1));
        vfloat vi = v_add(v_mul(v_load(v + i), vb2), v_mul(v_mul(g, g), vc2));
        vfloat denom = v_add(v_div(v_sqrt(vi), vbc2), veps);
        v_store(m + i, mi);
        v_store(v + i, vi);
        v_store(t->p + i, v_add(v_load(t->p + i), v_mul(vstep, v_div(mi, denom))));
    }
#endif
    for (; i < i1; i++) {
        float g = t->g[i];
        m[i] = m[i] * b1 + g * (1.0f - b1);
        v[i] = v[i] * b2 + g * g * (1.0f - b2);
        float denom = sqrtf(v[i]) / t->bc2_sqrt + eps;
        t->p[i] += -t->step_size * (m[i] / denom);
    }
}

// PyTorch: step_size = lr / (1 - beta1^t); denom = sqrt(v) / sqrt(1 - beta2^t) + eps
void adam_step(Adam *a, float *param, const float *grad) {
    a->step++;
    double bc1 = 1.0 - pow((double)a->beta1, (double)a->step),
           bc2 = 1.0 - pow((double)a->beta2, (double)a->step);
    AdamTask t = {a, param, grad, (float)(a->lr / bc1), (float)sqrt(bc2)};
    parallel_for(a->n, 1 << 15, adam_range, &t);
}

void adam_free(Adam *a) {
    aligned_free(a->m);
    aligned_free(a->v);
    a->m = a->v = NULL;
}

typedef struct { float *ema; const float *param; float keep, take; } EmaTask;

static void ema_range(void *arg, size_t i0, size_t i1) {
    const EmaTask *t = arg;
    for (size_t i = i0; i < i1; i++) t->ema[i] = t->keep * t->ema[i] + t->take * t->param[i];
}

// elementwise, so split over the threads with no effect on the result (as Adam)
void ema_blend(float *ema, const float *param, size_t n, float keep, float take) {
    EmaTask t = {ema, param, keep, take};
    parallel_for(n, 1 << 15, ema_range, &t);
}

void ema_update(float *ema, const float *param, size_t n, float rate) {
    ema_blend(ema, param, n, rate, 1.0f - rate);
}

double grad_norm_sq(const float *grad, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += (double)grad[i] * grad[i];
    return s;
}
