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
void unet_free(UNet *u);
// x (N,in,H,W), t (N) the timesteps the network sees (already rescaled)
Tensor *unet_forward(Graph *g, UNet *u, Tensor *x, const float *t);
// the sinusoidal embedding (N, dim), cos half first (improved-diffusion nn.py)
void timestep_embedding(float *out, const float *t, int n, int dim);

#endif

// ---------------------------------------------------------------------------
// ddim.c: noise schedules, P2 weighting, the training losses of the four
// models, and (with the sampling issue) DDPM / DDIM sampling.
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
    float lambda_lpips;    // weight of L^lpips (Eq. 15), 0.1 in the paper
    lpips_loss_fn lpips;   // NULL: no LPIPS term
    void *lpips_ctx;
} LossConfig;

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
