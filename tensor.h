// tensor.h: the casdm tensor engine.
//
// float32 NCHW tensors, reverse-mode autograd on a tape, a pthread pool, a thin
// SIMD layer and a counter-free PCG32 generator (file formats: formats.c). C99, libc,
// libm and (optionally) pthreads; nothing else.
//
// Two layers, as in karpathy/llm.c's train_gpt2.c:
//   1. kernels on raw pointers, each `*_forward` with its `*_backward` right
//      below it in tensor.c (`conv2d_forward`, `conv2d_backward`, ...), and
//      beside the fast ones a plain reference (`conv2d_forward_ref`) that the
//      tests hold them to;
//   2. graph ops on Tensors (`conv2d(g, x, w, b, stride, pad)`) that call the
//      forward kernel and, when a gradient is needed, push a tape node whose
//      backward calls the backward kernel.
// tensor.c has one section per op holding both layers, after the
// infrastructure (arena, RNG, thread pool, SIMD, GEMM) and the tape.
// Backward kernels accumulate (+=) into gradients; zeroing is explicit.
//
// Reading guide: one Cas-DM training step, top to bottom.
//   casdm.c  main -> cmd_train (the loop: a step, a log row, maybe a
//            checkpoint or a sample grid) -> train_step (a batch, t and the
//            noise; the losses; zero grad; graph_backward; the gradient's
//            norm and clip; adam_step; ema_update)
//   ddim.c   diffusion_losses: x_t (Eq. 3), theta's eps and r_t, x0* from
//            them, phi's x0, the loss terms of Eq. 8-15 (P2 on L_eps)
//   unet.c   unet_forward -> run_block (checkpointed or not) -> block_forward
//            -> resblock_forward / attention_forward, upsample2x, concat
//   tensor.c norm_conv2d (group norm, FiLM, SiLU, dropout, then the conv;
//            the norm's output not kept) -> norm_into_planes (the norm
//            writes the convolution's padded planes, where every tap of
//            the kernel is one offset) -> conv_forward_on_planes ->
//            planes_conv -> planes_micro_kernel (B read straight from the
//            planes, no im2col, no packing). 3x3 ones of 128+ channels
//            take the Winograd path instead: wino_forward (16 GEMMs over
//            transformed tiles), wino_backward. Convolutions on small maps,
//            strided and 1x1 ones go through the GEMM instead:
//            conv2d_add_forward -> sgemm_pack_b with pack_conv_cols ->
//            gemm_block -> gemm_micro_kernel
// Backward comes back the same way: graph_backward walks the tape from the
// loss's node to the first, each node's backward (norm_conv2d_node_backward:
// the norm again from x into planes, the weight gradient as inner products
// over the planes (planes_dweight), the input gradient as the flipped
// convolution of dy's planes, then the norm's backward reading it from
// there) adding into its inputs' gradients; a parameter's gradient lands in
// its ParamSet's one gradient buffer, which train_step hands to adam_step.
#ifndef CASDM_TENSOR_H
#define CASDM_TENSOR_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

// ---------------------------------------------------------------------------
// checked libc wrappers (llm.c's mallocCheck / fopenCheck): print where and
// what, then exit(1). Never return NULL.
// ---------------------------------------------------------------------------
void *malloc_check(size_t size, const char *file, int line);
void *calloc_check(size_t n, size_t size, const char *file, int line);
FILE *fopen_check(const char *path, const char *mode, const char *file, int line);
#define mallocCheck(n) malloc_check((n), __FILE__, __LINE__)
#define callocCheck(n, s) calloc_check((n), (s), __FILE__, __LINE__)
#define fopenCheck(p, m) fopen_check((p), (m), __FILE__, __LINE__)
void fatal(const char *fmt, ...);  // message to stderr, exit(1)
double now_seconds(void);          // a monotonic clock
int ends_with(const char *s, const char *suffix);

// ---------------------------------------------------------------------------
// arena: a bump allocator made of blocks, 64-byte aligned. Blocks are kept on
// reset, so after the first training step a step allocates nothing from libc.
// `limit` (bytes, 0 = none) makes overflow a clear error instead of swapping.
// ---------------------------------------------------------------------------
typedef struct ArenaBlock ArenaBlock;
typedef struct {
    const char *name;     // shown in the overflow message
    ArenaBlock *head;     // first block
    ArenaBlock *cur;      // block being filled; blocks after it are empty
    size_t block_size;    // default size of a new block
    size_t limit;         // maximum total bytes of all blocks, 0 = no limit
    size_t reserved;      // total bytes of all blocks
    size_t used;          // bytes handed out since the last reset
    size_t peak;          // maximum of `used` over the arena's life
} Arena;
typedef struct { ArenaBlock *block; size_t offset; size_t used; } ArenaMark;

void arena_init(Arena *a, const char *name, size_t block_size, size_t limit);
void *arena_alloc(Arena *a, size_t bytes);           // never NULL; aborts on limit
float *arena_floats(Arena *a, size_t n);             // uninitialised floats
float *arena_zeros(Arena *a, size_t n);              // zeroed floats
void arena_reset(Arena *a);                          // everything handed out is gone
ArenaMark arena_mark(Arena *a);                      // for scratch buffers:
void arena_release(Arena *a, ArenaMark m);           // free all since the mark
void arena_free(Arena *a);

// ---------------------------------------------------------------------------
// random numbers: PCG32 (O'Neill 2014, "PCG XSH RR 64/32"), one stream per
// generator; the fills split a stream between threads with rng_advance, so a
// seed gives the same numbers for any thread count. Normals by Box-Muller in
// double.
// ---------------------------------------------------------------------------
typedef struct { uint64_t state, inc; } Rng;
void rng_seed(Rng *r, uint64_t seed, uint64_t stream);
uint32_t rng_u32(Rng *r);
float rng_uniform(Rng *r);                           // [0, 1), 24 random bits
float rng_normal(Rng *r);                            // N(0, 1)
void rng_fill_normal(Rng *r, float *x, size_t n, float mean, float std);
void rng_fill_uniform(Rng *r, float *x, size_t n, float lo, float hi);
uint32_t rng_below(Rng *r, uint32_t n);              // uniform integer in [0, n)
void rng_advance(Rng *r, uint64_t delta);            // skip delta rng_u32 outputs, O(log delta)
void rng_fill_keep(Rng *r, unsigned char *keep, size_t n, float p);  // keep[i] = (uniform >= p)
// values first .. first+n-1 of a fill of `total`; r advances past all `total`
void rng_fill_normal_part(Rng *r, float *x, size_t first, size_t n, size_t total, float mean,
                          float std);
void rng_fill_keep_part(Rng *r, unsigned char *keep, size_t first, size_t n, size_t total,
                        float p);

// ---------------------------------------------------------------------------
// thread pool: pool_run_chunks(fn, arg, n) calls fn(arg, c, n) for every
// chunk c = 0..n-1 and returns when all are done. The caller and the workers
// claim chunks one at a time, so a worker that is late (asleep, or its core
// busy with another process) holds nothing up: the caller runs what nobody
// has started. Kernels split their work with `slice(total, c, n, ...)` and
// make each output in one chunk, so the numbers do not depend on which
// thread ran which chunk. pool_run(fn, arg) is the same with one chunk per
// thread. Built with THREADS=0 everything runs on the calling thread. Nested
// calls run serially.
// ---------------------------------------------------------------------------
typedef void (*pool_fn)(void *arg, int chunk, int nchunks);
void pool_init(int nthreads);        // <= 0: CASDM_THREADS env, else cores
int pool_threads(void);
void pool_run_chunks(pool_fn fn, void *arg, int nchunks);
void pool_run(pool_fn fn, void *arg);
int pool_thread_id(void);             // the calling thread: 0 = the one that called pool_init
void pool_shutdown(void);            // joins the workers (pool_init starts them again)
// [*begin, *end) = part ith of nth of [0, n), contiguous, in order
void slice(size_t n, int ith, int nth, size_t *begin, size_t *end);
// fn(ctx, begin, end) over contiguous ranges of [0, n), a few per thread, each
// of at least min_per_chunk items; on the caller alone when that is one range
typedef void (*range_fn)(void *ctx, size_t begin, size_t end);
void parallel_for(size_t n, size_t min_per_chunk, range_fn fn, void *ctx);
const char *simd_name(void);         // "avx512", "avx2", "neon" or "scalar"
// multiply-add FLOPs (2 per MAC) of the forward GEMMs since the last reset:
// convolutions, linears and matmuls, for the benchmark's GFLOP/s
extern double flops_forward;
// the floats one padded-planes buffer of a convolution may hold (default 4 Mi:
// a batch of large maps is convolved a group of images at a time); tests
// lower it to make every batch split
extern size_t conv_planes_max_floats;
// 0: same 3x3 convolutions without the Winograd path (tests and benchmarks compare both)
extern int conv_winograd;
// a register-only FMA loop of `iters` iterations on the calling thread;
// returns the FLOPs it did (the benchmark's measure of the machine's peak)
double simd_fma_loop(long iters);
// the same with VDPBF16PS (bf16 pairs into float32); 0 where the CPU or build lacks it
double simd_bf16_loop(long iters);
// the same with AMX's TDPBF16PS on tiles; 0 where the tiles cannot run
double simd_amx_loop(long iters);
// y[i] = exp(x[i]) (y may be x): the SIMD polynomial within 2 ulp of expf,
// libm's expf in scalar builds; what SiLU, sigmoid and softmax use
void exp_array(float *y, const float *x, size_t n);

// ---------------------------------------------------------------------------
// matrix multiply. C (M,N) = op(A) (M,K) @ op(B) (K,N), + C if accumulate.
// op(X) = X^T when transX. Row-major with leading dimensions lda, ldb, ldc.
// Every output element is summed over k in the same order whatever the
// thread count, so results are bitwise identical for 1 or N threads.
// ---------------------------------------------------------------------------
void sgemm(int transA, int transB, size_t M, size_t N, size_t K,
           const float *A, size_t lda, const float *B, size_t ldb,
           int accumulate, float *C, size_t ldc);
void sgemm_naive(int transA, int transB, size_t M, size_t N, size_t K,
                 const float *A, size_t lda, const float *B, size_t ldb,
                 int accumulate, float *C, size_t ldc);
// frees the per-thread panel buffers sgemm keeps between calls (made again
// on the next call); at the end of a program, after pool_shutdown
void sgemm_free_buffers(void);

// ---- the precision of every matrix product (sgemm and the convolutions) ----
// GEMM_BF16: both operands rounded to bfloat16 (round to nearest even, values
// below bf16's smallest normal to zero) while the GEMM packs them, products
// summed in float32, results stored in float32, as PyTorch's CPU autocast
// computes convolutions, linears and matmuls. Where the CPU has AMX-BF16 and
// Linux grants the tile state, the packed blocks go to AMX tiles (TDPBF16PS,
// Intel Sapphire Rapids on); on CPUs whose VDPBF16PS runs at the float32
// FMA's rate (AMD Zen 4 and 5) to VDPBF16PS; elsewhere (Intel's AVX512-BF16
// alone, at half that rate; CPUs without it) the rounded operands go to the
// float32 kernels: the same operands, the same float32 sums up to their
// order, as fast as float32 (gemm_bf16_why says which and why).
// GEMM_BF16_EMULATED, GEMM_BF16_VDPBF16PS and GEMM_BF16_AMX force a back-end
// (tests, benchmarks; the last two only where the CPU has the instructions,
// else emulated); GEMM_BF16_AMX_MODEL runs the AMX kernel on tiles in
// software (tests; AVX-512 builds, else emulated).
// Everything else (norms, softmax, losses, the optimiser, the weights) stays
// float32. Set between steps, never while a graph is being built or run.
typedef enum {
    GEMM_FP32,
    GEMM_BF16,
    GEMM_BF16_EMULATED,
    GEMM_BF16_VDPBF16PS,
    GEMM_BF16_AMX,
    GEMM_BF16_AMX_MODEL
} GemmPrecision;
void gemm_set_precision(GemmPrecision p);
GemmPrecision gemm_precision(void);   // as set (GEMM_BF16 for every bf16 back-end)
int gemm_bf16_vdpbf16ps(void);        // 1: this CPU (and build) can run the VDPBF16PS kernels
int gemm_bf16_amx(void);              // 1: this CPU, kernel and build can run the AMX tiles
int gemm_bf16_native(void);           // 1: GEMM_BF16 runs on AMX or VDPBF16PS on this CPU
const char *gemm_bf16_why(void);      // why GEMM_BF16 is emulated here ("" where it is not)
// the kernel that runs now: "fp32 avx512", "bf16 amx", "bf16 avx512-bf16",
// "bf16 emulated on avx512", "bf16 amx-model (tiles in software)"
const char *gemm_backend_name(void);
// the CPU's bf16 instructions, by CPUID (0 off x86): AVX512-BF16, AMX-BF16
// (AMX-TILE with it)
int cpu_has_avx512_bf16(void);
int cpu_has_amx_bf16(void);
// x rounded to bfloat16 as the packing rounds it (returned as a float)
float bf16_round(float x);

// ---------------------------------------------------------------------------
// tensors
// ---------------------------------------------------------------------------
#define MAX_DIMS 4
typedef struct Tensor {
    int ndim;
    int shape[MAX_DIMS];  // NCHW for images; (B,M,K) for batched matrices
    size_t size;          // number of elements
    float *data;
    float *grad;          // same size as data; NULL while nothing flowed in
    int requires_grad;    // leaf parameter / input, or computed from one
    int grad_pooled;      // grad is a buffer of the graph's gradient pool (not a view)
    const char *name;     // parameter name (improved-diffusion key) or NULL
    // graph_grad's bookkeeping (see there): the tensor a reshape views, the
    // gradient as a graph tensor, whether the tensor depends on graph_grad's input
    struct Tensor *view_of, *dgraph;
    int on_path;
} Tensor;

typedef struct TapeNode TapeNode;
struct Graph;
typedef void (*backward_fn)(struct Graph *g, TapeNode *node);
// the backward of a node as graph ops (graph_grad): from the output's
// gradient tensor dy, adds the inputs' gradient tensors (node_vjp_add)
typedef void (*vjp_fn)(struct Graph *g, TapeNode *node, Tensor *dy);
struct TapeNode {
    TapeNode *prev;       // the tape is a list, walked from the last node back
    const char *op;       // op name, for debugging
    backward_fn backward;
    vjp_fn vjp;           // NULL: the op cannot be differentiated twice
    Tensor *out;
    Tensor *in[5];        // inputs; record() sets the first three
    const void *state;    // what backward needs besides the inputs: a struct
                          // declared next to the op's backward (ConvState, ...)
};

// A graph owns one step: the tensors it makes and the tape live in `arena`;
// the gradients of non-parameter tensors come from a pool of buffers that
// backward hands back as soon as a gradient has been used (see
// graph_backward). graph_reset frees them all (the memory is kept for the
// next step).
typedef struct GradBuf GradBuf;
typedef struct Graph {
    Arena arena;
    GradBuf *grad_bufs;   // every gradient buffer, free or in use
    size_t grad_bytes, grad_live, grad_peak;  // pool size; bytes in use now and at most
    TapeNode *last;       // most recent tape node
    size_t n_nodes;
    int grad_enabled;     // 0: no-grad mode, records nothing, saves nothing
    int training;         // dropout active
    Rng *rng;             // for dropout; may be NULL when training is 0
    // 0, or: this graph's batch is rows batch_first.. of a batch of
    // batch_total (data parallel, micro-batches): dropout draws those rows
    // of the whole batch's masks (graph_fill_keep)
    int batch_first, batch_total;
    struct Graph *sub;    // where checkpoint() recomputes in backward; made on first use
} Graph;

void graph_init(Graph *g, size_t block_size, size_t limit);
void graph_reset(Graph *g);
void graph_free(Graph *g);
// Seeds out->grad with dout (or 1 for a one-element `out` when dout is NULL)
// and runs the tape backwards, accumulating into every tensor that
// requires a gradient (parameters: their persistent grad buffers). The
// gradient of an intermediate tensor is released once its producer has used
// it (t->grad is NULL afterwards); those of parameters, of leaf inputs and of
// `out` stay. One backward per graph_reset.
void graph_backward(Graph *g, Tensor *out, const float *dout);
// Double backward (PyTorch's autograd.grad with create_graph=True): the
// gradient of the scalar out with respect to x, built as graph ops on the
// same tape (each node's vjp), so that a loss of it (R1 = |grad|^2) can be
// backpropagated by graph_backward into everything the gradient depends on,
// the weights included. Only the ops that have a vjp can stand between x and
// out (convolutions, linear, the pointwise LeakyReLU/ReLU, broadcast
// arithmetic, scale_shift, upfirdn2d, the minibatch std, concat, reshape,
// sums and means; the
// others stop with a message naming the op). Once per graph_reset.
Tensor *graph_grad(Graph *g, Tensor *out, Tensor *x);
// the vjp's helper: adds d (a graph tensor) to input t's gradient tensor
void node_vjp_add(Graph *g, Tensor *t, Tensor *d);
// Adds dt (t->size floats) into t's gradient: a second output's seed, for
// the graph_backward that follows (a loss whose gradient reaches t from
// outside this graph, e.g. the autoencoder's decoder head)
void graph_seed(Graph *g, Tensor *t, const float *dt);

size_t shape_size(int ndim, const int *shape);  // product of the dimensions
Tensor *tensor_new(Graph *g, int ndim, const int *shape);  // uninitialised
Tensor *tensor4(Graph *g, int n, int c, int h, int w);
Tensor *tensor_zeros(Graph *g, int ndim, const int *shape);
Tensor *tensor_from(Graph *g, int ndim, const int *shape, const float *data);  // copies
float *tensor_grad(Graph *g, Tensor *t);  // the gradient buffer, zeroed on first use
// no-grad mode: free everything made since m but y (moved down); else y as is
Tensor *graph_keep(Graph *g, ArenaMark m, Tensor *y);
// Activation checkpointing (Chen et al. 2016, "Training deep nets with
// sublinear memory cost"; improved-diffusion's use_checkpoint): y = fn(g,
// ctx, in) is computed without a tape, so only y is kept; backward runs fn
// again on g->sub (with the RNG state of the first run, so dropout draws the
// same mask) and backpropagates through it. The gradients are the same
// numbers as without it; the price is a second forward of fn. ctx
// (ctx_bytes) is copied; 1 to 5 inputs. Without grad: just fn.
typedef Tensor *(*checkpoint_fn)(Graph *g, const void *ctx, Tensor **in);
Tensor *checkpoint(Graph *g, checkpoint_fn fn, const void *ctx, size_t ctx_bytes, int n_in,
                   Tensor **in);
int same_shape(const Tensor *a, const Tensor *b);
void shape_str(const Tensor *t, char *buf, size_t n);

// ---------------------------------------------------------------------------
// parameters: a size table, then one allocation for all values and one for
// all gradients (llm.c's fill_in_parameter_sizes + malloc_and_point).
// ---------------------------------------------------------------------------
typedef struct {
    Tensor *t;            // t[i].data points into `data`
    size_t count, cap;
    size_t total;         // number of floats
    float *data;
    float *grad;          // NULL for a frozen set (e.g. VGG in LPIPS)
    char *names;          // all names, NUL separated
    size_t names_len, names_cap;
} ParamSet;

void params_init(ParamSet *p);
// Declare a parameter; returns its index. Pointers are made by params_alloc.
size_t params_add(ParamSet *p, const char *name, int ndim, const int *shape);
void params_alloc(ParamSet *p, int with_grad);
Tensor *params_get(ParamSet *p, size_t index);
Tensor *params_find(ParamSet *p, const char *name);  // NULL if absent
const char *params_name(const ParamSet *p, size_t index);  // before params_alloc too
void params_zero_grad(ParamSet *p);
void params_free(ParamSet *p);

// A model declares its parameters before the one allocation: each slot (a
// Tensor* field of the model) is remembered with its index, and
// param_decl_fill points every slot at its tensor after params_alloc.
typedef struct { Tensor **slot; size_t index; } ParamSlot;
typedef struct { ParamSet *ps; ParamSlot *slots; size_t n, cap; } ParamDecl;
void param_decl_init(ParamDecl *d, ParamSet *ps);
void param_declare(ParamDecl *d, Tensor **slot, const char *name, int ndim, int s0, int s1,
                   int s2, int s3);
// PREFIX.weight of shape (s0, s1, s2, s3) (its first ndim dims) and
// PREFIX.bias (s0): the pair every norm, convolution and linear layer has
void param_declare_weight_bias(ParamDecl *d, Tensor **w, Tensor **b, const char *prefix, int ndim,
                               int s0, int s1, int s2, int s3);
void param_decl_fill(ParamDecl *d);  // after params_alloc; frees the slot list
void param_decl_free(ParamDecl *d);  // without filling (a layout only counted)
// PyTorch's default initialisation, in declaration order: Conv and Linear
// weights and their biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform
// with a = sqrt(5); a bias takes the fan_in of the weight declared before it),
// norm scales (1-D .weight) 1 and their biases 0; tensors whose name is_zero
// accepts are zeroed without drawing (is_zero may be NULL)
void params_init_torch(ParamSet *ps, Rng *rng, int (*is_zero)(const char *name));

// ---------------------------------------------------------------------------
// optimiser: Adam as torch.optim.Adam / AdamW with weight_decay 0 (the
// update order of PyTorch 1.13's single-tensor path), and an EMA of weights.
// ---------------------------------------------------------------------------
typedef struct {
    size_t n;
    float *m, *v;         // first and second moments, one allocation each
    long step;            // steps taken
    float lr, beta1, beta2, eps;
} Adam;
void adam_init(Adam *a, size_t n, float lr);
void adam_step(Adam *a, float *param, const float *grad);
void adam_free(Adam *a);
// ema = rate * ema + (1 - rate) * param
void ema_update(float *ema, const float *param, size_t n, float rate);
// ema = keep * ema + take * param (each product rounded, then the sum)
void ema_blend(float *ema, const float *param, size_t n, float keep, float take);
double grad_norm_sq(const float *grad, size_t n);  // sum of squares in double

// ---------------------------------------------------------------------------
// graph ops, in tensor.c's order. Shapes are given as (N,C,H,W).
// Broadcasting in add/sub/mul follows numpy: shapes aligned to the right,
// each dim equal or 1. Marked "(reference)": ops no model uses today, kept
// as the composed forms the tests check fused ops against (groupnorm, softmax,
// dropout, matmul) and as blocks for the next models.
// ---------------------------------------------------------------------------
Tensor *conv2d(Graph *g, Tensor *x, Tensor *w, Tensor *b, int stride, int pad);  // b may be NULL
// the adjoint of conv2d in its input: dy (N,OC,OH,OW) -> (N,C,H,W) for an
// input of H x W; differentiable in dy and w (conv2d's vjp)
Tensor *conv2d_transpose(Graph *g, Tensor *dy, Tensor *w, int H, int W, int stride, int pad);
// relu(conv2d), fused
Tensor *conv2d_relu(Graph *g, Tensor *x, Tensor *w, Tensor *b, int stride, int pad);
// conv2d(x, w, b) + shift[:, :, None, None] + residual; shift (N,OC) and
// residual (N,OC,OH,OW) may be NULL. Neither sum is stored separately.
Tensor *conv2d_add(Graph *g, Tensor *x, Tensor *w, Tensor *b, Tensor *shift, Tensor *residual,
                   int stride, int pad);
Tensor *linear(Graph *g, Tensor *x, Tensor *w, Tensor *b);   // x (N,in), w (out,in), b (out)
// batched (B,M,K)@(B,K,N) (reference)
Tensor *matmul(Graph *g, Tensor *a, Tensor *b, int transA, int transB);
// improved-diffusion's QKVAttentionLegacy on qkv (BH, 3*ch, T): per head q, k,
// v = rows [0,ch), [ch,2ch), [2ch,3ch); softmax(scale q^T k) applied to v.
// Returns (BH, ch, T); q, k, v are not copied, and the weights are not kept:
// backward recomputes them a head at a time (as FlashAttention does).
Tensor *qkv_attention(Graph *g, Tensor *qkv, float scale);
// scratch: qkv_attention_scratch(T) floats (two T*T blocks per thread)
size_t qkv_attention_scratch(int T);
void qkv_attention_forward(float *out, const float *qkv, float *scratch, int BH, int ch, int T,
                           float scale);
void qkv_attention_backward(float *dqkv, const float *dout, const float *qkv, float *scratch,
                            int BH, int ch, int T, float scale);
Tensor *add(Graph *g, Tensor *a, Tensor *b);
Tensor *sub(Graph *g, Tensor *a, Tensor *b);
Tensor *mul(Graph *g, Tensor *a, Tensor *b);
Tensor *scale_shift(Graph *g, Tensor *x, float scale, float shift);  // scale*x + shift
// (reference)
Tensor *groupnorm(Graph *g, Tensor *x, Tensor *gamma, Tensor *beta, int groups, float eps);
// The norm, FiLM, SiLU and dropout in one pass (reference: norm_conv2d's
// first half): dropout([silu](groupnorm(x) * (1 + scale) + shift)), scale and
// shift (N,C) or NULL, silu_after 0/1, dropout p (when training; 0 = none);
// the normalised tensor is not kept, the dropout mask as bytes.
Tensor *groupnorm_film_silu(Graph *g, Tensor *x, Tensor *gamma, Tensor *beta, Tensor *scale,
                            Tensor *shift, int silu_after, float dropout_p, int groups, float eps);
// silu(groupnorm(x)) (reference; LDDGAN's autoencoder will use it)
Tensor *groupnorm_silu(Graph *g, Tensor *x, Tensor *gamma, Tensor *beta, int groups, float eps);
// conv2d_add(groupnorm_film_silu(x, norm...), w, b, residual=residual), stride
// 1, where the norm's output is not kept: backward computes it again from x
// (a memory-bound pass, cheap next to the convolution). The U-Net's
// in_layers and out_layers; the same numbers as the two ops composed.
typedef struct {
    Tensor *gamma, *beta, *scale, *shift;  // any may be NULL
    int silu, groups;
    float dropout, eps;
} NormSpec;
Tensor *norm_conv2d(Graph *g, Tensor *x, const NormSpec *norm, Tensor *w, Tensor *b,
                    Tensor *residual, int pad);
Tensor *silu(Graph *g, Tensor *x);
Tensor *relu(Graph *g, Tensor *x);             // (reference)
Tensor *sigmoid(Graph *g, Tensor *x);
// tanh, exp and |x| (the tensor_ prefix: libm has the plain names); the
// gradient of |x| is 0 at 0, as torch's
Tensor *tensor_tanh(Graph *g, Tensor *x);
Tensor *tensor_exp(Graph *g, Tensor *x);
Tensor *tensor_abs(Graph *g, Tensor *x);
Tensor *leaky_relu(Graph *g, Tensor *x, float slope);  // x for x > 0, else slope * x
Tensor *softplus(Graph *g, Tensor *x);         // log(1 + e^x), x above 20 (F.softplus)
Tensor *softmax(Graph *g, Tensor *x);          // over the last axis (reference)
Tensor *upsample2x(Graph *g, Tensor *x);       // nearest
Tensor *avgpool2x2(Graph *g, Tensor *x);       // kernel 2, stride 2
Tensor *maxpool2x2(Graph *g, Tensor *x);       // kernel 2, stride 2 (taming's LPIPS)
// zeros around x: (N, C, H + top + bottom, W + left + right), F.pad's
// (left, right, top, bottom)
Tensor *pad2d(Graph *g, Tensor *x, int top, int bottom, int left, int right);
Tensor *resize_bilinear(Graph *g, Tensor *x, int out_h, int out_w);  // align_corners=False
Tensor *concat_channels(Graph *g, Tensor *a, Tensor *b);
Tensor *slice_channels(Graph *g, Tensor *x, int c0, int c1);         // x[:, c0:c1]
Tensor *reshape(Graph *g, Tensor *x, int ndim, const int *shape);    // a view
Tensor *transpose2d(Graph *g, Tensor *x);      // (R, C) -> (C, R), a copy
Tensor *sum_all(Graph *g, Tensor *x);          // shape (1) (reference)
Tensor *mean_all(Graph *g, Tensor *x);         // shape (1)
Tensor *mean_hw(Graph *g, Tensor *x);          // (N,C,H,W) -> (N,C,1,1)
// mean over all elements of w[n] * (a - b)^2; w (N) may be NULL (all 1).
// b usually needs no gradient (a target) but may have one.
Tensor *mse_loss(Graph *g, Tensor *a, Tensor *b, const float *w);
// mean over rows n of -log softmax(logits[n])[labels[n]] (F.cross_entropy);
// logits (N, K), labels in 0..K-1 (copied)
Tensor *cross_entropy(Graph *g, Tensor *logits, const int *labels);
// torch's BatchNorm2d, in training mode when g->training (batch statistics;
// running_mean and running_var (C) are updated with momentum, the variance
// unbiased), else with the running statistics; gamma, beta (C) may be NULL
Tensor *batchnorm2d(Graph *g, Tensor *x, Tensor *gamma, Tensor *beta, float *running_mean,
                    float *running_var, float momentum, float eps);
Tensor *l2norm_channels(Graph *g, Tensor *x, float eps);  // x / (||x||_c + eps)
Tensor *dropout(Graph *g, Tensor *x, float p);  // identity unless g->training (reference)
Tensor *detach(Graph *g, Tensor *x);            // same data, no gradient
Tensor *clamp(Graph *g, Tensor *x, float lo, float hi);  // gradient 0 where clipped
// A KL autoencoder's posterior (latent-diffusion's DiagonalGaussianDistribution):
// moments (N, 2C, H, W) = mean, then logvar (clamped to [-30, 20]).
// gaussian_sample: mean + exp(logvar / 2) * eps, eps ~ N(0, 1) from g->rng (or the
// N*C*H*W given, for tests against a reference), (N, C, H, W);
// gaussian_kl: KL against N(0, I), summed over (C, H, W): shape (N)
Tensor *gaussian_sample(Graph *g, Tensor *moments, const float *eps);  // eps may be NULL
Tensor *gaussian_kl(Graph *g, Tensor *moments);
// score_sde's upfirdn2d: zeros inserted (up), padded by pad0 / pad1 (negative:
// cropped), convolved with the K x K kernel (row-major; copied), every down-th
// sample kept; side (S * up + pad0 + pad1 - K) / down + 1. No kernel gradient.
Tensor *upfirdn2d(Graph *g, Tensor *x, const float *kernel, int K, int up, int down, int pad0,
                  int pad1);
// its adjoint: dy of upfirdn2d's output shape -> (N, C, H, W); differentiable (upfirdn2d's vjp)
Tensor *upfirdn2d_transpose(Graph *g, Tensor *dy, const float *kernel, int K, int up, int down,
                            int pad0, int pad1, int H, int W);
Tensor *pixel_norm(Graph *g, Tensor *x);  // x / sqrt(mean over dim 1 of x^2 + 1e-8)
// (N, C, H, W) -> (N, C + 1, H, W): the group standard deviation channel of
// DDGAN's discriminators (groups {m, M + m, ...}, M = N / group)
Tensor *minibatch_std(Graph *g, Tensor *x, int group);
// its input gradient for the output gradient dy, as an op differentiable in x and dy
Tensor *minibatch_std_input_grad(Graph *g, Tensor *x, Tensor *dy, int group);

// ---------------------------------------------------------------------------
// kernels: the layer under the graph ops, on raw pointers, for code that
// wants no tape (and for tests that compare them with references).
// Backward kernels accumulate (+=); a NULL gradient pointer is skipped.
// ---------------------------------------------------------------------------
enum { ACT_SILU, ACT_RELU, ACT_SIGMOID, ACT_TANH, ACT_EXP, ACT_ABS, ACT_LEAKY_RELU, ACT_SOFTPLUS };
// out (N,OC,OH,OW) = inp (N,C,H,W) * weight (OC,C,K,K) + bias (OC); col is
// scratch of conv2d_forward_scratch(...) floats (small maps are done several
// images per GEMM, which needs more)
void conv2d_forward(float *out, const float *inp, const float *weight, const float *bias,
                    float *col, int N, int C, int H, int W, int OC, int K, int stride, int pad);
void conv2d_add_forward(float *out, const float *inp, const float *weight, const float *bias,
                        const float *shift, const float *residual, float *col,
                        int N, int C, int H, int W, int OC, int K, int stride, int pad);
// col: conv2d_backward_scratch(...) floats
void conv2d_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                     const float *inp, const float *weight, float *col,
                     int N, int C, int H, int W, int OC, int K, int stride, int pad);
size_t conv2d_backward_scratch(int N, int C, int H, int W, int OC, int K, int stride, int pad);
size_t conv2d_forward_scratch(int N, int C, int H, int W, int OC, int K, int stride, int pad);
// out (N,OUT) = inp (N,IN) @ weight (OUT,IN)^T + bias (OUT)
void linear_forward(float *out, const float *inp, const float *weight, const float *bias,
                    int N, int IN, int OUT);
void linear_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                     const float *inp, const float *weight, int N, int IN, int OUT);
void matmul_forward(float *out, const float *a, const float *b, int batch, int M, int N, int K,
                    int transA, int transB);
void matmul_backward(float *da, float *db, const float *dout, const float *a, const float *b,
                     int batch, int M, int N, int K, int transA, int transB);
// mean, rstd (N,G) are written by forward and read by backward
void groupnorm_forward(float *out, float *mean, float *rstd, const float *inp, const float *gamma,
                       const float *beta, int N, int C, int HW, int G, float eps);
void groupnorm_backward(float *dinp, float *dgamma, float *dbeta, const float *dout,
                        const float *inp, const float *mean, const float *rstd, const float *gamma,
                        int N, int C, int HW, int G);
// [silu](group norm * (1 + scale) + shift) without storing the norm; scale,
// shift (N,C) may be NULL; dz: scratch of C*HW floats
// keep: dropout mask (N*C*HW bytes, 1 = kept and scaled by keep_scale) or NULL
void groupnorm_film_silu_forward(float *out, float *mean, float *rstd, const float *inp,
                                 const float *gamma, const float *beta, const float *scale,
                                 const float *shift, int silu, const unsigned char *keep,
                                 float keep_scale, int N, int C, int HW, int G, float eps);
void groupnorm_film_silu_backward(float *dinp, float *dgamma, float *dbeta, float *dscale,
                                  float *dshift, const float *dout, const float *inp,
                                  const float *mean, const float *rstd, const float *gamma,
                                  const float *beta, const float *scale, const float *shift,
                                  int silu, const unsigned char *keep, float keep_scale, float *dz,
                                  int N, int C, int HW, int G);
void activation_forward(float *out, const float *inp, size_t n, int act);
void activation_backward(float *dinp, const float *dout, const float *inp, const float *out,
                         size_t n, int act);
void leaky_relu_forward(float *out, const float *inp, size_t n, float slope);
void leaky_relu_backward(float *dinp, const float *dout, const float *inp, size_t n, float slope);
void softmax_forward(float *out, const float *inp, size_t rows, size_t len);
void softmax_backward(float *dinp, const float *dout, const float *out, size_t rows, size_t len);
// P = N*C planes of (H,W)
void upsample2x_forward(float *out, const float *inp, size_t P, int H, int W);
void upsample2x_backward(float *dinp, const float *dout, size_t P, int H, int W);
void avgpool2x2_forward(float *out, const float *inp, size_t P, int H, int W);
void avgpool2x2_backward(float *dinp, const float *dout, size_t P, int H, int W);
void maxpool2x2_forward(float *out, const float *inp, size_t P, int H, int W);
void maxpool2x2_backward(float *dinp, const float *dout, const float *inp, size_t P, int H, int W);
void pad2d_forward(float *out, const float *inp, size_t P, int H, int W, int top, int bottom,
                   int left, int right);
void pad2d_backward(float *dinp, const float *dout, size_t P, int H, int W, int top, int bottom,
                    int left, int right);
void resize_bilinear_forward(float *out, const float *inp, size_t P, int H, int W, int OH, int OW);
void resize_bilinear_backward(float *dinp, const float *dout, size_t P, int H, int W, int OH,
                              int OW);
// Inference only (Inception-v3 in fid.c; no backward): a KH x KW kernel
// with padding PH rows and PW columns on each side, then ReLU when relu;
// col: conv2d_rect_forward_scratch floats
void conv2d_rect_forward(float *out, const float *inp, const float *weight, const float *bias,
                         float *col, int N, int C, int H, int W, int OC, int KH, int KW,
                         int stride, int PH, int PW, int relu);
size_t conv2d_rect_forward_scratch(int N, int C, int H, int W, int OC, int KH, int KW, int stride,
                                   int PH, int PW);
// K x K pooling of P planes, zero padding pad, out (P, OH, OW): the largest
// pixel inside the image; the mean of the pixels inside (count_include_pad=False)
void maxpool2d_forward(float *out, const float *inp, size_t P, int H, int W, int K, int stride,
                       int pad);
void avgpool2d_valid_forward(float *out, const float *inp, size_t P, int H, int W, int K,
                             int stride, int pad);
// prob (N,K) = softmax(logits) (kept for backward); returns the mean loss
double cross_entropy_forward(float *prob, const float *logits, const int *labels, int N, int K);
void cross_entropy_backward(float *dlogits, const float *prob, const int *labels, float dloss,
                            int N, int K);
// mean, rstd (C) are written by forward and read by backward
void batchnorm_forward(float *out, float *mean, float *rstd, const float *inp, const float *gamma,
                       const float *beta, float *running_mean, float *running_var, int N, int C,
                       int HW, float momentum, float eps, int training);
void batchnorm_backward(float *dinp, float *dgamma, float *dbeta, const float *dout,
                        const float *inp, const float *mean, const float *rstd, const float *gamma,
                        int N, int C, int HW, int training);
// the posterior's kernels (moments (N, 2C, HW); eps, z (N, C, HW); kl (N))
void gaussian_sample_forward(float *z, const float *moments, const float *eps, int N, int C,
                             int HW);
void gaussian_sample_backward(float *dmoments, const float *dz, const float *moments,
                              const float *eps, int N, int C, int HW);
void gaussian_kl_forward(float *kl, const float *moments, int N, int C, int HW);
void gaussian_kl_backward(float *dmoments, const float *dkl, const float *moments, int N, int C,
                          int HW);
// P planes (H, W); see upfirdn2d
void upfirdn2d_forward(float *out, const float *inp, const float *kernel, size_t P, int H, int W,
                       int K, int up, int down, int pad0, int pad1);
void upfirdn2d_backward(float *dinp, const float *dout, const float *kernel, size_t P, int H,
                        int W, int K, int up, int down, int pad0, int pad1);
// the plain references of the two (every tap tested); the fast ones agree bitwise
void upfirdn2d_forward_ref(float *out, const float *inp, const float *kernel, size_t P, int H,
                           int W, int K, int up, int down, int pad0, int pad1);
void upfirdn2d_backward_ref(float *dinp, const float *dout, const float *kernel, size_t P, int H,
                            int W, int K, int up, int down, int pad0, int pad1);
// rnorm (N, HW) written by forward
void pixel_norm_forward(float *out, float *rnorm, const float *inp, int N, int C, int HW,
                        float eps);
void pixel_norm_backward(float *dinp, const float *dout, const float *inp, const float *rnorm,
                         int N, int C, int HW);
void minibatch_std_forward(float *out, const float *inp, int N, int C, int HW, int G);
void minibatch_std_backward(float *dinp, const float *dout, const float *inp, int N, int C,
                            int HW, int G);
// norm (N,HW) is written by forward and read by backward
void l2norm_forward(float *out, float *norm, const float *inp, int N, int C, int HW, float eps);
void l2norm_backward(float *dinp, const float *dout, const float *inp, const float *norm,
                     int N, int C, int HW, float eps);

// ---------------------------------------------------------------------------
// reference kernels: the definitions as direct loops, accumulated in double,
// beside the fast kernels they witness (as llm.c keeps matmul_forward_naive
// beside matmul_forward); for tests, slow by design. Backward ones
// accumulate (+=) and skip a NULL gradient, like the fast ones; the group
// norm's computes its own statistics. sgemm_naive (above) is the GEMM's.
// ---------------------------------------------------------------------------
void conv2d_forward_ref(float *out, const float *inp, const float *weight, const float *bias,
                        int N, int C, int H, int W, int OC, int K, int stride, int pad);
void conv2d_rect_forward_ref(float *out, const float *inp, const float *weight, const float *bias,
                             int N, int C, int H, int W, int OC, int KH, int KW, int stride, int PH,
                             int PW, int relu);
void conv2d_backward_ref(float *dinp, float *dweight, float *dbias, const float *dout,
                         const float *inp, const float *weight,
                         int N, int C, int H, int W, int OC, int K, int stride, int pad);
void groupnorm_film_silu_forward_ref(float *out, const float *inp, const float *gamma,
                                     const float *beta, const float *scale, const float *shift,
                                     int silu, const unsigned char *keep, float keep_scale, int N,
                                     int C, int HW, int G, float eps);
void groupnorm_film_silu_backward_ref(float *dinp, float *dgamma, float *dbeta, float *dscale,
                                      float *dshift, const float *dout, const float *inp,
                                      const float *gamma, const float *beta, const float *scale,
                                      const float *shift, int silu, const unsigned char *keep,
                                      float keep_scale, int N, int C, int HW, int G, float eps);
void qkv_attention_forward_ref(float *out, const float *qkv, int BH, int ch, int T, float scale);
void qkv_attention_backward_ref(float *dqkv, const float *dout, const float *qkv, int BH, int ch,
                                int T, float scale);

#endif
