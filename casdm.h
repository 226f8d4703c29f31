// casdm.h: the model-level API shared by unet.c, ddim.c, lpips.c, the
// program (casdm.c) and the tests. The tensor engine is in tensor.h.
#ifndef CASDM_H
#define CASDM_H

#include "tensor.h"

// ---------------------------------------------------------------------------
// unet.c: improved-diffusion's UNetModel (openai/improved-diffusion,
// improved_diffusion/unet.py) with use_scale_shift_norm, 2-D, no classes.
// Parameter names are its state_dict keys.
// ---------------------------------------------------------------------------
#define UNET_MAX_LEVELS 8
#define UNET_MAX_BLOCKS 64

typedef struct {
    int image_size;            // for attention resolutions and the default channel_mult
    int in_channels, out_channels;
    int model_channels;
    int channel_mult[UNET_MAX_LEVELS];
    int n_levels;
    int num_res_blocks;
    int attention_ds[UNET_MAX_LEVELS];  // downsample factors with attention (ds = image_size / res)
    int n_attention;
    int num_heads;
    int groups;                // GroupNorm groups: 32 in improved-diffusion
    float dropout;
} UNetConfig;

typedef struct {               // ResBlock with use_scale_shift_norm
    int in_ch, out_ch;
    Tensor *in_norm_w, *in_norm_b, *in_conv_w, *in_conv_b;   // in_layers.0 / .2
    Tensor *emb_w, *emb_b;                                  // emb_layers.1
    Tensor *out_norm_w, *out_norm_b, *out_conv_w, *out_conv_b;  // out_layers.0 / .3
    Tensor *skip_w, *skip_b;                                // skip_connection (NULL: identity)
} ResBlock;

typedef struct {               // AttentionBlock, legacy QKV order
    int ch;
    Tensor *norm_w, *norm_b, *qkv_w, *qkv_b, *proj_w, *proj_b;
} AttnBlock;

enum { CONV_NONE, CONV_INPUT, CONV_DOWN, CONV_UP };
typedef struct {               // one TimestepEmbedSequential
    int conv_kind;             // input conv, Downsample or Upsample (last in the block)
    Tensor *conv_w, *conv_b;
    int has_res, has_attn, has_res2;  // res2: the middle block's second ResBlock
    ResBlock res, res2;
    AttnBlock attn;
} UNetBlock;

typedef struct {
    UNetConfig cfg;
    ParamSet params;
    Tensor *temb0_w, *temb0_b, *temb2_w, *temb2_b;  // time_embed.0 / .2
    UNetBlock input[UNET_MAX_BLOCKS];
    int n_input;
    UNetBlock middle;
    UNetBlock output[UNET_MAX_BLOCKS];
    int n_output;
    Tensor *out_norm_w, *out_norm_b, *out_conv_w, *out_conv_b;  // out.0 / out.2
    // improved-diffusion's use_checkpoint: each block's activations are
    // recomputed in backward instead of kept (a run-time choice, not saved)
    int use_checkpoint;
} UNet;

// Fills channel_mult by image size as improved-diffusion's script_util
// (32 -> 1,2,2,2; 64 -> 1,2,3,4; 256 -> 1,1,2,2,4,4; others 1,2,2,2) and
// sets groups 32, heads 4, dropout 0.1 and the paper's CIFAR-10 sizes.
void unet_default_config(UNetConfig *c, int image_size, int in_channels, int out_channels);
// parses "16,8" (resolutions) into attention_ds; returns 0 or -1 on a bad list
int unet_parse_attention(UNetConfig *c, const char *resolutions);
int unet_parse_channel_mult(UNetConfig *c, const char *list);
// Declares the parameters, allocates them (with gradients if trainable) and
// initialises them as PyTorch's defaults plus improved-diffusion's zero layers.
void unet_init(UNet *u, const UNetConfig *c, int trainable, Rng *rng);
// 0, or -1 with what is wrong in err (unet_init exits on a bad config)
int unet_check_config(const UNetConfig *c, char *err, size_t errlen);
size_t unet_param_count(const UNetConfig *c);
// per image, a measure for memory estimates  // floats unet_init would allocate (c must pass the
// check)
double unet_activation_floats(const UNetConfig *c);
void unet_free(UNet *u);
// x (N,in,H,W), t (N) the timesteps the network sees (already rescaled)
Tensor *unet_forward(Graph *g, UNet *u, Tensor *x, const float *t);
// the sinusoidal embedding (N, dim), cos half first (improved-diffusion nn.py)
void timestep_embedding(float *out, const float *t, int n, int dim);

// ---------------------------------------------------------------------------
// ddim.c: noise schedules, P2 weighting, the training losses of the four
// models, respacing, and DDPM / DDIM sampling with the Eq. 16-17 mixing.
// ---------------------------------------------------------------------------
enum { SCHEDULE_LINEAR, SCHEDULE_COSINE };

typedef struct {
    int T;                 // steps of this (possibly respaced) chain
    int T_train;           // steps the model was trained with
    int kind;
    double *beta, *alpha, *abar, *abar_prev;  // (T)
    int *timestep;         // (T) the trained step each step stands for
} Schedule;

// improved-diffusion's get_named_beta_schedule: linear 1e-4..0.02 scaled by
// 1000/T, or cosine (Nichol & Dhariwal) with betas clipped at 0.999
void schedule_init(Schedule *s, int kind, int T);
void schedule_free(Schedule *s);
int schedule_parse(const char *name);  // "linear" / "cosine" -> kind, or -1
// the float timestep the network sees: trained step * 1000 / T_train, as
// improved-diffusion with rescale_timesteps=True
float schedule_model_t(const Schedule *s, int t);
// P2 weighting (Choi et al. 2022, Eq. 8): 1 / (k + SNR(t))^gamma, SNR = abar / (1 - abar)
double p2_weight(const Schedule *s, int t, double gamma, double k);

typedef enum { MODEL_DDPM_EPS, MODEL_DDPM_X0, MODEL_DUAL, MODEL_CASDM } ModelKind;
int model_parse(const char *name);     // "ddpm-eps", "ddpm-x0", "dual", "casdm" -> kind, or -1
const char *model_name(int kind);
// output channels of theta (and phi for casdm) for images with C channels
int model_theta_out(int kind, int C);

// LPIPS as a loss: distance between pred and target, mean over the batch.
// Supplied by lpips.c; kept as a pointer so ddim.c does not depend on it.
typedef Tensor *(*lpips_loss_fn)(Graph *g, void *ctx, Tensor *pred, Tensor *target);

typedef struct {
    int kind;              // ModelKind
    double p2_gamma, p2_k; // P2 on the epsilon term; gamma 0 = off
    int clip_x0;           // casdm: clip x0* to [-1,1] before phi
    // the weights of Eq. 15, for every model's terms: lambda 1 for each MSE
    // term and 0.1 for LPIPS, the paper's "same setting" for the baselines
    // too (dual diffusion's own code averages its three terms: 1/3 each)
    float lambda_eps, lambda_x0, lambda_mu;
    float lambda_lpips;    // weight of L^lpips (Eq. 15), 0.1 in the paper
    lpips_loss_fn lpips;   // NULL: no LPIPS term
    void *lpips_ctx;
} LossConfig;
// the paper's: Eq. 15's weights, P2 off (k 1), x0* clipped, no LPIPS
void loss_config_default(LossConfig *lc, int kind);

typedef struct {
    Tensor *loss;                           // what backward starts from
    Tensor *l_eps, *l_x0, *l_mu, *l_lpips;  // NULL where a model has no such term
    Tensor *xt, *theta_out, *phi_out, *x0_star;
} LossTerms;

// One training step's forward: x_t from x0, t, noise (Eq. 3), the networks,
// and the losses of the chosen model (Cas-DM: Eq. 8-15). phi is NULL unless
// the model is casdm.
void diffusion_losses(Graph *g, LossTerms *out, const LossConfig *lc, const Schedule *s,
                      UNet *theta, UNet *phi, Tensor *x0, const int *t, Tensor *noise);

// ---- sampling (ddim.c) ----
// improved-diffusion's respace.space_timesteps: "ddimN" (even stride, N
// steps) or a comma list of per-section counts ("10,10", or "100").
// Writes the kept steps (sorted) into kept (capacity T) and returns their
// number, or -1 with a message in err.
int space_timesteps(int T, const char *spec, int *kept, char *err, size_t errlen);
// the respaced chain: betas 1 - abar[k_j] / abar[k_{j-1}], everything else
// recomputed from them (respace.SpacedDiffusion)
void schedule_respace(Schedule *out, const Schedule *base, const int *kept, int n);

enum { SAMPLER_DDIM, SAMPLER_DDPM };
typedef struct {
    int kind;              // ModelKind
    int method;            // SAMPLER_DDIM or SAMPLER_DDPM
    float eta;             // DDIM: 0 deterministic, 1 = DDPM-like noise
    int clip;              // clip predicted x0 to [-1,1] (improved-diffusion's clip_denoised)
    int clip_x0;           // casdm: clip x0* before phi (as in training)
    // DDPM's variance: 1, beta_t (improved-diffusion's FIXED_LARGE, its
    // default for a model without learned sigma); 0, the posterior's beta~_t
    int sigma_large;
} SampleConfig;

// x (N,C,H,W) at step j of the respaced chain s -> x_prev at step j-1
// (the sample itself after j = 0). z: N(0,1) noise of x's size, used when
// j > 0 and the step is stochastic (DDPM, or DDIM with eta > 0); may be NULL
// otherwise. Runs in g's no-grad mode; resets g.
void sample_step(Graph *g, const SampleConfig *sc, const Schedule *s, UNet *theta, UNet *phi,
                 const float *x, float *x_prev, int N, int C, int H, int W, int j, const float *z);
// the step's arithmetic from the networks' outputs: eps, x0 and r_logit
// (any may be NULL) with per-sample strides in floats; z as above
void sample_update(const SampleConfig *sc, const Schedule *s, int j, const float *x, float *x_prev,
                   int N, int C, size_t hw, const float *eps, size_t se, const float *x0, size_t sx,
                   const float *r_logit, size_t sr, const float *z);
// does step j draw noise?
int sample_step_noisy(const SampleConfig *sc, int j);

// ---------------------------------------------------------------------------
// lpips.c: LPIPS with a VGG16 trunk whose max-pools are 2x2 average pools
// (Cas-DM Eq. 13, after consistency models' use of piq), or, with max_pool
// and size 0, taming-transformers' LPIPS (VGG16's own max pools, no resize:
// the perceptual loss of latent-diffusion's and LDDGAN's autoencoders).
// Weights are frozen: gradients flow to the compared image only.
// ---------------------------------------------------------------------------
#define LPIPS_CONVS 13
#define LPIPS_TAPS 5
typedef struct {
    ParamSet params;                 // "features.<i>.weight/bias", "lin<k>.weight"
    Tensor *conv_w[LPIPS_CONVS], *conv_b[LPIPS_CONVS];
    Tensor *lin[LPIPS_TAPS];         // (1, C_k, 1, 1), non-negative in trained weights
    int size;                        // images are resized to size x size (0: as they are)
    int max_pool;                    // 1: 2x2 max pools (taming's), 0: average pools (piq's)
    // dropout on each head's input while g->training (taming's NetLinLayer has
    // Dropout(0.5), active when Lightning puts the loss module in train mode;
    // lpips_init sets 0)
    float head_dropout;
} Lpips;

void lpips_init(Lpips *l);           // declares and allocates (frozen, zero)
void lpips_free(Lpips *l);
// Loads a safetensors file written by tools/convert_lpips.py; 0 or -1 with a
// message naming the file and tensor.
int lpips_load(Lpips *l, const char *path, char *err, size_t errlen);
// Per-image distances (N,1,1,1) between x and y, both (N,3,H,W) in [-1,1].
// x may require a gradient; y's branch is run without a tape. taps, if not
// NULL, receives the five per-tap terms (N,1,1,1) whose sum is the distance.
Tensor *lpips_distance(Graph *g, Lpips *l, Tensor *x, Tensor *y, Tensor **taps);
// lpips_loss_fn for diffusion_losses: mean distance over the batch
Tensor *lpips_loss(Graph *g, void *lpips, Tensor *pred, Tensor *target);

// ---------------------------------------------------------------------------
// fid.c: Inception-v3 as pytorch-fid runs it (FID, sFID, IS features), the
// streamed feature statistics, the Frechet distance and the inception score
// ---------------------------------------------------------------------------
#define INCEPTION_CONVS 94
#define INCEPTION_SIZE 299             // inputs are resized to 299 x 299
#define INCEPTION_POOL 2048            // pool_3
#define INCEPTION_LOGITS 1008
#define INCEPTION_SPATIAL_CH 7         // sFID: Mixed_6d.branch1x1 channels 0-6
#define INCEPTION_SPATIAL (17 * 17 * INCEPTION_SPATIAL_CH)  // 2023, at 299 x 299
typedef struct {
    float *w[INCEPTION_CONVS], *b[INCEPTION_CONVS];  // batch norms folded in
    float *fc_w;                                     // (1008, 2048)
    float *mem;                                      // the one allocation
} Inception;
// a safetensors file of pytorch-fid's state_dict (tools/convert_inception.py)
int inception_load(Inception *m, const char *path, char *err, size_t errlen);
// allocates the arrays (uninitialised; the benchmark fills them); returns their floats
size_t inception_alloc(Inception *m);
void inception_free(Inception *m);
// unit i's name (pytorch-fid's module path) and shape, for tests and tools
const char *inception_conv_name(int i, int *ic, int *oc, int *kh, int *kw);
// images (N,3,H,W) in [0,1] -> pool3 (N,2048), spatial (N,2023) and logits
// (N,1008; pool3 @ fc.weight^T); spatial and logits may be NULL
void inception_forward(const Inception *m, const float *images, int N, int H, int W, float *pool3,
                       float *spatial, float *logits);

typedef struct { int d; long n; double *shift, *sum, *sxx; } FeatStats;
void featstats_init(FeatStats *s, int d);
void featstats_add(FeatStats *s, const float *x, int rows);  // x (rows, d)
// mu (d) and sigma (d, d) as np.mean / np.cov(rowvar=False); -1 if n < 2
int featstats_result(const FeatStats *s, double *mu, double *sigma);
void featstats_free(FeatStats *s);
// a (n,n) symmetric, destroyed -> eigenvalues lambda (unsorted) and, if vt
// is not NULL, the eigenvectors as vt's rows; -1 if QL did not converge
int sym_eigen(double *a, int n, double *lambda, double *vt);
int trace_sqrt_product(const double *s1, const double *s2, int n, double *out);
int frechet_distance(const double *mu1, const double *s1, const double *mu2, const double *s2,
                     int n, double *out);
int inception_score(const float *logits, int N, int classes, int splits, double *mean,
                    double *std);

// the FD-classifier (fid.c): a VGG-style CNN casdm trains on labelled images;
// its 128 penultimate features give a Frechet distance for small data sets
#define CLF_LAYERS 6
#define CLF_FEATURES 128
#define CLF_CLASSES 10
typedef struct {
    int channels, size;       // inputs (N, channels, size, size) in [-1, 1]
    ParamSet params;          // conv1..4, fc1, fc2 ".weight" / ".bias"
    Tensor *w[CLF_LAYERS], *b[CLF_LAYERS];
} Classifier;
void classifier_init(Classifier *c, int channels, int size);  // zero weights, with gradients
void classifier_init_random(Classifier *c, Rng *rng);
void classifier_free(Classifier *c);
// logits (N, 10); *features (N, 128) if features is not NULL
Tensor *classifier_forward(Graph *g, Classifier *c, Tensor *x, Tensor **features);
int classifier_save(const Classifier *c, const char *path, char *err, size_t errlen);
int classifier_load(Classifier *c, const char *path, char *err, size_t errlen);

// a tensor for st_write (formats.c): its name, shape and host-order data
typedef struct { const char *name; int ndim; const int *shape; const float *data; } StWrite;

// ---------------------------------------------------------------------------
// lddgan.c: the Latent Denoising Diffusion GAN (arXiv 2406.11713). Stage one:
// latent-diffusion's KL autoencoder (ldm/models/autoencoder.py AutoencoderKL
// with ldm/modules/diffusionmodules/model.py's Encoder and Decoder), as
// LDDGAN's autoencoder/config/cifar10_16x16x4.yaml configures it. Parameter
// names are its state_dict keys (encoder.down.0.block.0.norm1.weight, ...).
// ---------------------------------------------------------------------------
#define AE_MAX_LEVELS 8
#define AE_MAX_BLOCKS 8     // ResnetBlocks per level (the decoder's num_res_blocks + 1)

typedef struct {
    int resolution;         // image side (attention resolutions are sides)
    int in_channels, out_ch;
    int ch, ch_mult[AE_MAX_LEVELS], n_levels;
    int num_res_blocks;
    int attn_resolutions[AE_MAX_LEVELS], n_attn;
    int z_channels, embed_dim;  // the encoder's 2*z_channels moments -> quant_conv -> 2*embed_dim
    int double_z, tanh_out;
    float dropout;
} AEConfig;

typedef struct {            // ResnetBlock without a time embedding
    int in_ch, out_ch;
    Tensor *norm1_w, *norm1_b, *conv1_w, *conv1_b, *norm2_w, *norm2_b, *conv2_w, *conv2_b;
    Tensor *nin_w, *nin_b;  // nin_shortcut, 1x1 (NULL when in_ch == out_ch)
} AEResBlock;

typedef struct {            // AttnBlock: single head, q, k, v and proj_out 1x1 convolutions
    int ch;
    Tensor *norm_w, *norm_b, *q_w, *q_b, *k_w, *k_b, *v_w, *v_b, *proj_w, *proj_b;
} AEAttn;

typedef struct {            // one resolution: its blocks, their attention, the resampling conv
    AEResBlock block[AE_MAX_BLOCKS];
    AEAttn attn[AE_MAX_BLOCKS];
    int n_block, has_attn;
    Tensor *resample_w, *resample_b;  // downsample.conv / upsample.conv, NULL at the end
} AELevel;

typedef struct {            // the Encoder or the Decoder
    Tensor *conv_in_w, *conv_in_b;
    AELevel level[AE_MAX_LEVELS];  // by resolution level (the decoder's up.i is level i too)
    AEResBlock mid_block_1, mid_block_2;
    AEAttn mid_attn_1;
    Tensor *norm_out_w, *norm_out_b, *conv_out_w, *conv_out_b;
} AECoder;

typedef struct {
    AEConfig cfg;
    ParamSet params;
    AECoder enc, dec;
    Tensor *quant_w, *quant_b, *post_quant_w, *post_quant_b;
    float scale_factor;     // LDDGAN divides latents by it (105 for CIFAR-10); 1 when unknown
} Autoencoder;

// taming-transformers' NLayerDiscriminator (taming/modules/discriminator/
// model.py), the autoencoder loss's PatchGAN: a 4x4 stride-2 convolution and
// LeakyReLU(0.2); n_layers - 1 more stride-2 convolutions (no bias) with
// BatchNorm2d and LeakyReLU, widths ndf * min(2^n, 8); one stride-1 such
// block; a stride-1 convolution to one logit per patch. Names main.<i>.*,
// the running statistics in a second, frozen set (main.<i>.running_mean/var).
#define PATCHGAN_MAX_CONVS 10
typedef struct {
    int in_channels, ndf, n_layers, n_conv;
    ParamSet params, buffers;
    Tensor *conv_w[PATCHGAN_MAX_CONVS], *conv_b[PATCHGAN_MAX_CONVS];  // conv_b NULL when normed
    Tensor *bn_w[PATCHGAN_MAX_CONVS], *bn_b[PATCHGAN_MAX_CONVS];      // NULL when not normed
    Tensor *running_mean[PATCHGAN_MAX_CONVS], *running_var[PATCHGAN_MAX_CONVS];
    int stride[PATCHGAN_MAX_CONVS];
    long num_batches_tracked;  // torch's BatchNorm2d counter (the same for every norm)
} PatchGAN;

// weights as taming's weights_init: convolutions N(0, 0.02), BatchNorm scales
// N(1, 0.02) and shifts 0; the two conv biases PyTorch's default (rng NULL: zeros)
void patchgan_init(PatchGAN *d, int in_channels, int ndf, int n_layers, int trainable, Rng *rng);
void patchgan_free(PatchGAN *d);
// logits (N, 1, h, w); BatchNorm in training mode (batch statistics, the
// running ones updated) when g->training, else with the running statistics
Tensor *patchgan_forward(Graph *g, PatchGAN *d, Tensor *x);

// LDDGAN's CIFAR-10 autoencoder: ch 128, ch_mult 1,2, 2 ResnetBlocks, attention
// at 16, z 4 (latent 4x16x16), dropout 0.2, tanh on the output
void ae_cifar10_config(AEConfig *c);
int ae_check_config(const AEConfig *c, char *err, size_t errlen);  // 0, or -1 and why
void ae_init(Autoencoder *a, const AEConfig *c, int trainable, Rng *rng);  // rng NULL: zeros
void ae_free(Autoencoder *a);
size_t ae_param_count(const AEConfig *c, size_t *encoder, size_t *decoder);
// x (N, in_channels, R, R) -> moments (N, 2*embed_dim, R/f, R/f), f = 2^(levels-1)
Tensor *ae_encode(Graph *g, Autoencoder *a, Tensor *x);
// z (N, embed_dim, r, r) -> images (N, out_ch, r*f, r*f)
Tensor *ae_decode(Graph *g, Autoencoder *a, Tensor *z);
// A safetensors file of the weights under AutoencoderKL's names, the
// configuration and scale_factor in the metadata (format casdm-autoencoder-1); ae_load builds
// the model from it (a checked configuration whose parameters the file can
// hold, then every tensor by name). extra: more key/value pairs or NULL.
int ae_save(const Autoencoder *a, const char *path, const char *const *extra, char *err,
            size_t errlen);
int ae_load(Autoencoder *a, const char *path, int trainable, char *err, size_t errlen);
// ae_save with more tensors beside the weights (casdm train-ae's checkpoint:
// the discriminator, Adam's moments); extra may hold up to 32 pairs
int ae_save_with(const Autoencoder *a, const char *path, const StWrite *more, size_t n_more,
                 const char *const *extra, char *err, size_t errlen);
// ae_decode in two parts: the trunk to norm_out's input, the head from there
Tensor *ae_decode_trunk(Graph *g, Autoencoder *a, Tensor *z);
Tensor *ae_decode_head(Graph *g, Autoencoder *a, Tensor *h);

// The autoencoder's loss, latent-diffusion's LPIPSWithDiscriminator
// (ldm/modules/losses/contperceptual.py) with taming's LPIPS (lpips.c,
// max_pool, size 0) and the PatchGAN above; defaults: LDDGAN's CIFAR-10 config
typedef struct {
    float kl_weight;          // 1e-6
    float disc_weight;        // 0.5: the adaptive d_weight's scale
    float disc_factor;        // 1: the GAN terms' factor from disc_start on
    long disc_start;          // 50001: before it the GAN terms are off
    float perceptual_weight;  // 1: LPIPS's weight inside rec
    float logvar;             // 0: the nll's log-variance (no official optimiser steps it)
} AELossConfig;

typedef struct {              // one iteration's values, as contperceptual.py logs them
    double loss;              // nll + kl_weight * kl + d_weight * disc_factor * g_loss
    double l1, lpips;         // mean |x - x_rec| per pixel; mean LPIPS per image (NAN: none)
    double nll, kl, logvar;   // sum over pixels / N; KL summed per image, mean over N
    double g_loss, d_weight;  // -mean D(x_rec); the adaptive weight
    double d_loss, logits_real, logits_fake;  // the discriminator step (0 while it is off)
} AELossTerms;

typedef struct {
    Autoencoder *ae;
    PatchGAN *disc;
    Lpips *lpips;                 // NULL: no perceptual term
    AELossConfig cfg;
    Graph trunk, head, rec, gan;  // the generator step's four graphs (see ae_generator_grads)
    Rng *rng;                     // dropout, the posterior sample
} AETrainer;

void ae_loss_default(AELossConfig *c);
void ae_trainer_init(AETrainer *t, Autoencoder *ae, PatchGAN *disc, Lpips *lpips,
                     const AELossConfig *cfg, Rng *rng);
void ae_trainer_free(AETrainer *t);
// x: n images (in_channels, resolution^2) in [-1, 1]; step: iterations done;
// eps: the posterior's noise (n * embed_dim * r * r) or NULL to draw it.
// Gradients are added into ae->params (generator) or disc->params.
void ae_generator_grads(AETrainer *t, const float *x, int n, long step, const float *eps,
                        AELossTerms *terms);
// 0 (and nothing done) while the GAN terms are off, else 1
int ae_discriminator_grads(AETrainer *t, const float *x, int n, long step, const float *eps,
                           AELossTerms *terms);

// Stage two, the denoising-diffusion GAN (LDDGAN's diffusion.py): T large
// steps; index 0..T of the pairs' chain, t = 0..T-1 of the posterior (the
// step x_{t+1} -> x_t). Float32 values as the official code computes them.
#define GAN_MAX_T 64
typedef struct {
    int T;
    float betas[GAN_MAX_T + 1], sigmas[GAN_MAX_T + 1], a_s[GAN_MAX_T + 1];
    float a_s_cum[GAN_MAX_T + 1], sigmas_cum[GAN_MAX_T + 1];
    float post_var[GAN_MAX_T], post_coef1[GAN_MAX_T], post_coef2[GAN_MAX_T];
    float post_log_var[GAN_MAX_T];
} GanSchedule;
// the VP schedule of beta_min, beta_max (LDDGAN: 0.1, 20; T 4)
void gan_schedule_init(GanSchedule *s, int T, double beta_min, double beta_max);
// n samples of per floats: x_t and x_{t+1} for each sample's t (0..T-1) and noises
void gan_q_sample_pairs(const GanSchedule *s, const float *x0, const int *t, const float *eps1,
                        const float *eps2, int n, size_t per, float *x_t, float *x_tp1);
// x_t from the prediction x0 (a graph op in x0), x_{t+1} and noise eps
Tensor *gan_sample_posterior(Graph *g, const GanSchedule *s, Tensor *x0, const float *x_tp1,
                             const int *t, const float *eps);
// get_timestep_embedding of the integer steps t: (n, dim), sin first
void gan_timestep_embedding(float *out, const int *t, int n, int dim);

// DDGAN's Discriminator_small (score_sde/models/discriminator.py): D(x_t, t,
// x_{t+1}) on cat(x_t, x_{t+1}); a 1x1 start conv to 2 ngf, num_layers
// DownConvBlocks (the first keeps the size, the others halve it: widths 2, 4,
// 8, 8.. x ngf), the minibatch std, a 3x3 conv, the sum over H x W, a dense
// layer to one logit. Names t_embed.main.0, start_conv, conv1.conv1.0, ...
#define GAN_DISC_MAX_BLOCKS 4  // conv1..conv3, and conv4 when num_layers is 4
typedef struct {
    int in, out, down;
    Tensor *conv1_w, *conv1_b, *conv2_w, *conv2_b, *dense_w, *dense_b, *skip_w;
} GanDownBlock;
typedef struct {
    int in_channels, ngf, t_emb_dim, n_blocks;
    ParamSet params;
    Tensor *temb_w[2], *temb_b[2], *start_w, *start_b, *final_w, *final_b, *end_w, *end_b;
    GanDownBlock block[GAN_DISC_MAX_BLOCKS];
} GanDisc;
// in_channels = 2 x the latent's; LDDGAN's CIFAR-10: 8, ngf 64, t_emb_dim 256,
// 3 layers (7,628,545 parameters). rng: the official initialisation; NULL: zeros
void gan_disc_init(GanDisc *d, int in_channels, int ngf, int t_emb_dim, int num_layers, int trainable,
                   Rng *rng);
void gan_disc_free(GanDisc *d);
Tensor *gan_disc_forward(Graph *g, GanDisc *d, Tensor *x_t, const int *t, Tensor *x_tp1);

// score_sde's NCSNpp generator as LDDGAN configures it (ncsnpp_generator_adagn.py):
// G(x_{t+1}, t, z) -> x0' in [-1, 1]; names all_modules.<i>.*, z_transform.*
#define GAN_GEN_MAX_LEVELS 6
#define GAN_GEN_MAX_MODULES 96
#define GAN_GEN_MAX_MLP 8
typedef struct {
    int channels, image_size;   // the latent's (LDDGAN CIFAR-10: 4, 16)
    int nf, ch_mult[GAN_GEN_MAX_LEVELS], n_levels, num_res_blocks;
    int attn_resolutions[GAN_GEN_MAX_LEVELS], n_attn;
    int nz, zdim, n_mlp;        // z (N, nz) -> zemb (N, zdim) through 1 + n_mlp dense layers
} GanGenConfig;
typedef struct {             // ResnetBlockBigGANpp_Adagn
    int in, out, up, down;
    Tensor *style0_w, *style0_b, *conv0_w, *conv0_b, *dense0_w, *dense0_b;
    Tensor *style1_w, *style1_b, *conv1_w, *conv1_b, *conv2_w, *conv2_b;  // conv2: NULL if none
} GanResBlock;
typedef struct {             // AttnBlockpp: GroupNorm_0, NIN_0..3 (W is (in, out))
    int c;
    Tensor *gn_w, *gn_b, *nin_w[4], *nin_b[4];
} GanAttn;
enum { GAN_MOD_RES, GAN_MOD_ATTN, GAN_MOD_PYRAMID };
typedef struct {
    int kind;
    GanResBlock rb;
    GanAttn at;
    Tensor *pd_w, *pd_b;     // the pyramid Downsample's Conv2d_0
} GanModule;
typedef struct {
    GanGenConfig cfg;
    ParamSet params;
    Tensor *temb_w[2], *temb_b[2], *conv_in_w, *conv_in_b, *norm_w, *norm_b, *conv_out_w, *conv_out_b;
    Tensor *z_w[GAN_GEN_MAX_MLP], *z_b[GAN_GEN_MAX_MLP];
    int n_z;
    GanModule mod[GAN_GEN_MAX_MODULES];  // all_modules 3 .. n - 3, in order
    int n_mod;
} GanGen;
void gan_gen_cifar10_config(GanGenConfig *c);  // 33,329,668 parameters
int gan_gen_check_config(const GanGenConfig *c, char *err, size_t errlen);
// rng: the official initialisation (default_init, dense_layer's); NULL: zeros
void gan_gen_init(GanGen *G, const GanGenConfig *c, int trainable, Rng *rng);
void gan_gen_free(GanGen *G);
Tensor *gan_gen_forward(Graph *g, GanGen *G, Tensor *x_tp1, const int *t, Tensor *z);

// One iteration's gradients (train_ldgan.py:192-280), noise given: the pair's
// eps1 (x_{t+1} from x_t) and eps2 (x_t from x0), z (N, nz), the posterior's eps
typedef struct { const float *eps1, *eps2, *z, *eps_post; } GanNoise;
typedef struct {
    double d_real, d_fake, r1;      // softplus(-D(x_t)), softplus(D(x'_t)) means; R1 (0: not this step)
    double g_adv, rec, alpha;       // softplus(-D(x'_t)) mean; mean |x0' - x0|; its weight
    double logit_real, logit_fake;  // D's mean logits in the D step
} GanTerms;
typedef struct {
    GanGen *G;
    GanDisc *D;
    const GanSchedule *s;
    Graph gd, gg;                   // the D step's graph, the G step's
} GanTrainer;
void gan_trainer_init(GanTrainer *tr, GanGen *G, GanDisc *D, const GanSchedule *s);
void gan_trainer_free(GanTrainer *tr);
// x0: n scaled latents; t: n steps in 0..T-1; r1_gamma 0: no R1 this step
void gan_d_grads(GanTrainer *tr, const float *x0, int n, const int *t, const GanNoise *noise,
                 float r1_gamma, GanTerms *terms);
void gan_g_grads(GanTrainer *tr, const float *x0, int n, const int *t, const GanNoise *noise,
                 float alpha, GanTerms *terms);
// The optimisers of one run (train_ldgan.py:98-104): Adam (0.5, 0.9) for each
// network, and the EMA of G (EMA.py), which starts as a copy of G after the
// first Adam step and then blends every step, as torch's mul_/add_ do
typedef struct {
    Adam adam_g, adam_d;
    float *ema;          // G->params.total floats; NULL before the first step
    double ema_decay;    // 0.9999
} GanOptim;
void gan_optim_init(GanOptim *o, const GanGen *G, const GanDisc *D, double lr_g, double lr_d,
                    double ema_decay);
void gan_optim_free(GanOptim *o);
void gan_ema_update(float *ema, const float *p, size_t n, double decay);
// Weighted Learning's alpha(epoch) = 1 - sigmoid(linspace(-6, 6, E + 1))[epoch]
double gan_weighted_alpha(long epoch, long num_epoch);
// One iteration (train_ldgan.py:192-280): the D step on (t_d, nd) with R1 when
// r1_gamma > 0 and Adam on D, then the G step on (t_g, ng) and Adam on G, then
// the EMA. 0, or -1 with a message when a loss or a gradient is not finite
// (the network of that step is then left as it was).
int gan_iteration(GanTrainer *tr, GanOptim *op, const float *x0, int n, const int *t_d,
                  const GanNoise *nd, const int *t_g, const GanNoise *ng, float r1_gamma,
                  float alpha, GanTerms *terms, char *err, size_t errlen);
// sample_from_model: T generator calls from x_init (n latents of the generator's
// shape), each with its posterior sample; z (T, n, nz) and eps (T, n, ...) in
// order of the calls (step T-1 first); the latents into out (may be x_init)
void gan_sample(Graph *g, GanGen *G, const GanSchedule *s, const float *x_init, int n,
                const float *z, const float *eps, float *out);

// Stage two's files. The configuration is in the metadata under the official
// code's argument names (num_channels_dae, ch_mult, nz, ...; format
// casdm-ddgan-1), the generator's weights at the top level under NCSNpp's
// state_dict names (netG_*.pth's, without DDP's 'module.'), other networks
// under a prefix.
typedef struct {
    GanGenConfig gen;
    int T;                            // num_timesteps
    double beta_min, beta_max;        // the VP schedule's (0.1, 20)
    int ngf, t_emb_dim, disc_layers;  // Discriminator_small's (in channels 2 x gen.channels)
} GanConfig;
void gan_config_lddgan_cifar10(GanConfig *c);  // LDDGAN's run.sh (latent 4x16x16)
void gan_config_ddgan_cifar10(GanConfig *c);   // DDGAN's CIFAR-10 (pixels 3x32x32)
int gan_config_check(const GanConfig *c, char *err, size_t errlen);
#define GAN_CONFIG_KEYS 16
// the configuration as metadata pairs: kv[i][0] = key, kv[i][1] = value; the count
int gan_config_meta(const GanConfig *c, char kv[][2][64]);
// the generator's parameter count (the discriminator's in *disc), from the layout alone
size_t gan_param_count(const GanConfig *c, size_t *disc);
struct StFile;
int gan_config_read(const struct StFile *f, const char *path, GanConfig *c, char *err, size_t errlen);
// a network of the configuration from "<prefix><name>" of f: every name and
// shape is checked on the layout before anything is allocated; 0 or -1
int gan_gen_load_st(GanGen *G, const GanConfig *c, int trainable, const struct StFile *f,
                    const char *path, const char *prefix, char *err, size_t errlen);
int gan_disc_load_st(GanDisc *D, const GanConfig *c, int trainable, const struct StFile *f,
                     const char *path, const char *prefix, char *err, size_t errlen);

// ---------------------------------------------------------------------------
// formats.c: the byte-level file formats (see its header for the list).
// Readers return -1 (or NULL) with a message naming the file in err, and
// bound every allocation by what the file holds or by the limits below.
// Writers go through a temp file, fsync and rename.
// ---------------------------------------------------------------------------
#define IMAGE_MAX_SIDE 16384             // PNG / PPM / PGM side
#define IMAGE_MAX_PIXELS (1 << 26)       // PNG / PPM / PGM width x height
#define IMAGE_MAX_FILE ((uint64_t)1 << 30)
#define IDX_MAX_SIDE 4096
#define DATA_MAX_FILE ((uint64_t)1 << 34)  // CIFAR and IDX files
#define ST_MAX_TENSORS 131072
#define ST_MAX_HEADER ((uint64_t)100 << 20)
#define LOG_MAX_FILE ((uint64_t)1 << 30)
#define LOG_MAX_STEP 1000000000L         // the largest --steps

// writes the message into err (as snprintf) and returns -1: `return errorf(err, errlen, ...)`
int errorf(char *err, size_t errlen, const char *fmt, ...);
typedef struct { unsigned char *b; size_t len, cap; } Bytes;  // a growing byte buffer
void bytes_put(Bytes *o, const void *p, size_t n);
void bytes_printf(Bytes *o, const char *fmt, ...);

// the whole of a regular file of at most max bytes (NUL-terminated copy)
unsigned char *read_file(const char *path, uint64_t max, size_t *size, char *err, size_t errlen);
// path.tmp, then fsync, rename onto path and fsync of the directory
typedef struct { FILE *f; char path[4096], tmp[4100]; int ok, err; } AtomicFile;
int atomic_open(AtomicFile *a, const char *path, char *err, size_t errlen);
void atomic_write(AtomicFile *a, const void *p, size_t n);  // errors are kept for commit
int atomic_commit(AtomicFile *a, char *err, size_t errlen);  // removes the temp file on failure
int write_file_atomically(const char *path, const void *data, size_t len, char *err, size_t errlen);

// An 8-bit PNG or a binary PPM/PGM -> bytes (H,W,C). *C = 3 asks for RGB
// (grey repeated), 1 for one channel (grey, or the red of a colour image);
// *C = 0 keeps the file's own: 1 for grey, 3 for colour (alpha is dropped).
// name is used in messages.
unsigned char *decode_image(const unsigned char *b, size_t n, const char *name, int *W, int *H,
                            int *C, char *err, size_t errlen);
unsigned char *read_image(const char *path, int *W, int *H, int *C, char *err, size_t errlen);
// pixels (H,W,C), C 1 or 3
void png_encode(Bytes *o, const unsigned char *pixels, int W, int H, int C);
int write_png(const char *path, const unsigned char *pixels, int W, int H, int C, char *err,
              size_t errlen);
// improved-diffusion's sample NPZ: arr_0, uint8 (N,H,W,C)
int write_npz(const char *path, const unsigned char *img, int N, int H, int W, int C, char *err,
              size_t errlen);

// NPZ members: name without ".npy"; writes are stored, reads stored or deflated
enum { NPY_U8, NPY_F32, NPY_F64 };
#define NPZ_MAX_DIMS 8
typedef struct { const char *name; int kind, ndim; int64_t shape[NPZ_MAX_DIMS]; const void *data; } NpzWrite;
int npz_write(const char *path, const NpzWrite *arrays, int n, char *err, size_t errlen);
// one member: u8 holds uint8 arrays, f64 float32 / float64 ones (widened)
typedef struct {
    int kind, ndim;
    int64_t shape[NPZ_MAX_DIMS];
    size_t count;
    unsigned char *u8;
    double *f64;
} NpzArray;
int npz_parse(const unsigned char *b, size_t n, const char *name, const char *member,
              NpzArray *out, char *err, size_t errlen);
int npz_read(const char *path, const char *member, NpzArray *out, char *err, size_t errlen);
int npz_has(const char *path, const char *member);  // 1 if the npz holds the member
void npz_free(NpzArray *a);

// uint8 (n,c,h,w); labels (n) when the format has them (CIFAR-10), else NULL
typedef struct { int n, c, h, w; unsigned char *pixels, *labels; } Images;
void images_free(Images *im);
// An IDX label file (magic 0x00000801) of n labels into im->labels
int idx_labels_decode(const unsigned char *b, size_t size, const char *name, Images *im,
                      char *err, size_t errlen);
// IDX image file -> out (square images zero-padded to a multiple of 8, centred)
int idx_decode(const unsigned char *b, size_t size, const char *name, Images *out, char *err,
               size_t errlen);
// CIFAR-10 binary batch, appended to out
int cifar_decode(const unsigned char *b, size_t size, const char *name, Images *out, char *err,
                 size_t errlen);

// safetensors (https://github.com/huggingface/safetensors): 8-byte LE header
// length, JSON header, raw little-endian data. F32 only. The tensors must
// tile the data section (no overlaps, no holes) and have distinct names.
typedef struct {
    char name[256];
    int ndim;
    int shape[8];
    size_t size;          // elements
    float *data;          // host order
} StEntry;
typedef struct StFile {
    StEntry *e;
    size_t count;
    size_t *by_name;      // indices of e sorted by name (st_find)
    char *metadata_json;  // raw "__metadata__" object text or NULL
} StFile;
int st_read(const char *path, StFile *out, char *err, size_t errlen);
int st_parse(const unsigned char *buf, size_t len, const char *name, StFile *out, char *err,
             size_t errlen);
void st_free(StFile *f);
const StEntry *st_find(const StFile *f, const char *name);
// the metadata value of key into buf; returns 0, or -1 if absent
int st_meta(const StFile *f, const char *key, char *buf, size_t len);
// Metadata: NULL-terminated key/value string pairs, or NULL. (StWrite: above, with lddgan.c)
int st_write(const char *path, const StWrite *t, size_t n, const char *const *metadata,
             char *err, size_t errlen);
// copies the tensor "<prefix><name>" of f into every parameter of ps (prefix
// may be ""), checking that each is there, has the parameter's shape and
// holds finite values; 0, or -1 with a message naming path and the tensor
int params_load_st(ParamSet *ps, const StFile *f, const char *path, const char *prefix, char *err,
                   size_t errlen);
// the same checks of names and shapes without copying: usable on a layout
// not yet allocated (so a file's configuration is checked before memory is taken)
int params_check_st(const ParamSet *ps, const StFile *f, const char *path, const char *prefix,
                    char *err, size_t errlen);
// every parameter of ps, under its name, into a safetensors file
int params_st_write(const ParamSet *ps, const char *path, const char *const *metadata, char *err,
                    size_t errlen);

// log.csv rows and the loss plot. A row: step,loss,l_eps,l_x0,l_mu,l_lpips,
// img_per_s,fd; fd is the Frechet distance of casdm train --eval-every on
// the rows of its steps (empty elsewhere).
#define PLOT_TERMS 5              // loss, l_eps, l_x0, l_mu, l_lpips: fields 1-5
#define HISTORY_FD PLOT_TERMS     // the column of fd (field 7)
#define HISTORY_COLS (PLOT_TERMS + 1)
// Which fields of a log.csv row the plot keeps: fields[i] is the CSV field
// (0 = the step) of history column i, names[i] its legend; the last column
// is the panel under the losses (linear, a dot per value)
typedef struct {
    const char *header;       // log.csv's first line (without the newline)
    int fields[HISTORY_COLS];
    const char *names[HISTORY_COLS];
} LogLayout;
extern const LogLayout log_layout_diffusion;  // casdm train: the header above
extern const LogLayout log_layout_ae;         // casdm train-ae
extern const LogLayout log_layout_gan;        // casdm train --model lddgan / ddgan
// v: n x HISTORY_COLS, NAN = absent; layout NULL = log_layout_diffusion
typedef struct { long *step; double *v; size_t n, cap; const LogLayout *layout; } History;
void history_add(History *h, long step, const double *v);
void history_free(History *h);
long log_row_step(const char *line, size_t len);  // a data row's step, or -1
// rows of a log.csv; the layout from its header (log_layout_ae's or _gan's, else the diffusion one)
void history_parse(History *h, const char *text, size_t len);
int history_load(History *h, const char *path, char *err, size_t errlen);
void loss_svg(Bytes *o, const History *runs, const char *const *labels, int nruns,
              const char *title);
int write_loss_svg(const char *path, const History *runs, const char *const *labels, int nruns,
                   const char *title, char *err, size_t errlen);

// ---------------------------------------------------------------------------
// dist.c: the processes of a data-parallel run. MPI with `make MPI=1`; one
// process (rank 0 of 1, every collective the identity) otherwise. Each
// collective returns when every rank has taken part; after dist_set_timeout
// seconds without that (a rank died or hangs) it prints a message naming
// `what` and aborts the whole job (exit 3).
// ---------------------------------------------------------------------------
int dist_init(int *argc, char ***argv);  // MPI_Init; 0, or -1 with a message
void dist_finalize(void);
int dist_rank(void);
int dist_size(void);
int dist_local_size(void);               // ranks on this machine (they share its cores)
const char *dist_name(void);             // the MPI library, or that there is none
void dist_set_timeout(double seconds);   // default 600
double dist_comm_seconds(void);          // time spent in collectives so far
void dist_abort(int code);               // ends every rank (MPI_Abort), or exit(code)
void dist_sum_floats(float *x, size_t n, const char *what);  // x = the sum over ranks, on every rank
// x = the bitwise OR over ranks: each rank fills its own part, zeros elsewhere
void dist_merge_bytes(unsigned char *x, size_t n, const char *what);
void dist_broadcast(void *x, size_t bytes, const char *what);  // rank 0's bytes to every rank
void dist_barrier(const char *what);

#endif
