// dist.c: the processes of a data-parallel run (README, "Training on several
// machines"). Built with `make MPI=1` (mpicc, CASDM_MPI=1) these are MPI's
// rank, size and collectives on MPI_COMM_WORLD; in the default build they
// are one process's no-ops, and no other file knows which it got. This is
// the only file that includes mpi.h: the default build has no MPI symbol
// (tests/test_mpi.sh checks).
//
// Every collective waits with a deadline (dist_set_timeout, --dist-timeout):
// a rank that hangs or has died makes the others stop with a message naming
// the collective and the step, instead of waiting for ever. It is started
// non-blocking (MPI_Iallreduce, ...) and polled with MPI_Test, because MPI's
// blocking calls cannot time out.
#define _POSIX_C_SOURCE 200809L
#include "casdm.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double dist_timeout_s = 600.0;
static double dist_wait_s = 0.0;  // time spent in collectives (the communication per step)

void dist_set_timeout(double seconds) { dist_timeout_s = seconds; }
double dist_comm_seconds(void) { return dist_wait_s; }

#if CASDM_MPI
#include <mpi.h>


static int rank_ = 0, size_ = 1, local_size_ = 1, started_ = 0;

int dist_init(int *argc, char ***argv) {
    if (MPI_Init(argc, argv) != MPI_SUCCESS) {
        fprintf(stderr, "casdm: MPI_Init failed\n");
        return -1;
    }
    started_ = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
    // the ranks on this machine share its cores (the default thread count)
    MPI_Comm local;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &local);
    MPI_Comm_size(local, &local_size_);
    MPI_Comm_free(&local);
    return 0;
}

void dist_finalize(void) {
    if (started_) MPI_Finalize();
    started_ = 0;
}

int dist_rank(void) { return rank_; }
int dist_size(void) { return size_; }
int dist_local_size(void) { return local_size_; }

const char *dist_name(void) {
    static char name[96];
    char lib[MPI_MAX_LIBRARY_VERSION_STRING];
    int len = 0;
    MPI_Get_library_version(lib, &len);
    size_t n = strcspn(lib, ",\n");  // "Open MPI v4.1.4, package: ..." -> "Open MPI v4.1.4"
    snprintf(name, sizeof name, "%.*s", (int)(n < 80 ? n : 80), lib);
    return name;
}

void dist_abort(int code) {
    fflush(stderr);
    if (size_ > 1) MPI_Abort(MPI_COMM_WORLD, code);
    exit(code);
}

// polls req until it completes: spins for the first 2 ms (a step's
// allreduce is usually done by then), then sleeps 0.2 ms between polls, so a
// rank that waits for a slower one leaves the core to it
static void wait_or_abort(MPI_Request *req, const char *what) {
    double t0 = now_seconds(), now = t0;
    int done = 0;
    while (!done) {
        MPI_Test(req, &done, MPI_STATUS_IGNORE);
        if (done) break;
        now = now_seconds();
        if (now - t0 > dist_timeout_s) {
            fprintf(stderr,
                    "casdm: rank %d of %d: %s: no answer from the other ranks in %.0f s (one has "
                    "died or hangs); stopping the run (--dist-timeout sets the limit)\n",
                    rank_, size_, what, dist_timeout_s);
            dist_abort(3);
        }
        if (now - t0 > 2e-3) {
            struct timespec ts = {0, 200000};
            nanosleep(&ts, NULL);
        }
    }
    dist_wait_s += now_seconds() - t0;
}

// MPI counts are int: large buffers go in pieces of at most 2^30 elements
enum { DIST_PIECE = 1 << 30 };

void dist_sum_floats(float *x, size_t n, const char *what) {
    for (size_t i = 0; size_ > 1 && i < n; i += DIST_PIECE) {
        int k = (int)(n - i < DIST_PIECE ? n - i : DIST_PIECE);
        MPI_Request req;
        MPI_Iallreduce(MPI_IN_PLACE, x + i, k, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD, &req);
        wait_or_abort(&req, what);
    }
}

void dist_merge_bytes(unsigned char *x, size_t n, const char *what) {
    for (size_t i = 0; size_ > 1 && i < n; i += DIST_PIECE) {
        int k = (int)(n - i < DIST_PIECE ? n - i : DIST_PIECE);
        MPI_Request req;
        MPI_Iallreduce(MPI_IN_PLACE, x + i, k, MPI_UNSIGNED_CHAR, MPI_BOR, MPI_COMM_WORLD, &req);
        wait_or_abort(&req, what);
    }
}

void dist_broadcast(void *x, size_t bytes, const char *what) {
    for (size_t i = 0; size_ > 1 && i < bytes; i += DIST_PIECE) {
        int k = (int)(bytes - i < DIST_PIECE ? bytes - i : DIST_PIECE);
        MPI_Request req;
        MPI_Ibcast((char *)x + i, k, MPI_BYTE, 0, MPI_COMM_WORLD, &req);
        wait_or_abort(&req, what);
    }
}

void dist_barrier(const char *what) {
    if (size_ <= 1) return;
    MPI_Request req;
    MPI_Ibarrier(MPI_COMM_WORLD, &req);
    wait_or_abort(&req, what);
}

#else  // one process: rank 0 of 1, and every collective is the identity

int dist_init(int *argc, char ***argv) {
    (void)argc, (void)argv;
    return 0;
}
void dist_finalize(void) {}
int dist_rank(void) { return 0; }
int dist_size(void) { return 1; }
int dist_local_size(void) { return 1; }
const char *dist_name(void) { return "none (built without MPI: make MPI=1)"; }
void dist_abort(int code) { exit(code); }
void dist_sum_floats(float *x, size_t n, const char *what) { (void)x, (void)n, (void)what; }
void dist_merge_bytes(unsigned char *x, size_t n, const char *what) {
    (void)x, (void)n, (void)what;
}
void dist_broadcast(void *x, size_t bytes, const char *what) { (void)x, (void)bytes, (void)what; }
void dist_barrier(const char *what) { (void)what; }

#endif
