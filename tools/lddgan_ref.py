"""PyTorch reference for casdm's denoising-diffusion GAN (LDDGAN stage two, lddgan.c),
written for this project from the official code's definitions (read, not copied):
score_sde's op/upfirdn2d.py (upfirdn2d_native) and models/up_or_down_sampling.py
(_setup_kernel, upsample_2d, downsample_2d), and DDGAN's score_models (PixelNorm in
ncsnpp_generator_adagn.py, the minibatch standard deviation of discriminator.py),
as thanhluantrinh/LDDGAN ships them. So far the ops; the networks follow.
Needs Debian's python3-torch; run with /usr/bin/python3.

  upfirdn2d(x, k, up, down, pad0, pad1)  each plane: up - 1 zeros after every sample,
        padded by pad0 before and pad1 after on both axes (negative: cropped), a true 2-D
        convolution with k (conv2d with the flipped kernel), every down-th sample kept
  fir_kernel(k)        outer(k, k) / sum (the 1-D [1, 3, 3, 1] of NCSN++)
  upsample_2d(x, k)    upfirdn2d(x, fir_kernel(k) * gain * factor^2, up=factor,
        pads ((p + 1) // 2 + factor - 1, p // 2)), p = len(k) - factor
  downsample_2d(x, k)  upfirdn2d(x, fir_kernel(k) * gain, down=factor,
        pads ((p + 1) // 2, p // 2))
  pixel_norm(x)        x / sqrt(mean(x^2, dim=1) + 1e-8)
  minibatch_std(x, G)  StyleGAN2's layer with stddev_feat 1: view(G, -1, 1, C, H, W),
        sqrt(biased var over the group + 1e-8), mean over (C, H, W), repeated to every
        sample of the group and concatenated as one more channel
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def upfirdn2d(x, k, up=1, down=1, pad0=0, pad1=0):
    N, C, H, W = x.shape
    K = k.shape[0]
    y = x.reshape(N * C, 1, H, 1, W, 1)
    y = F.pad(y, [0, up - 1, 0, 0, 0, up - 1]).reshape(N * C, 1, H * up, W * up)  # zero-stuffed
    y = F.pad(y, [max(pad0, 0), max(pad1, 0), max(pad0, 0), max(pad1, 0)])
    y = y[:, :, max(-pad0, 0):y.shape[2] - max(-pad1, 0), max(-pad0, 0):y.shape[3] - max(-pad1, 0)]
    y = F.conv2d(y, torch.flip(k, [0, 1]).reshape(1, 1, K, K).to(x.dtype))
    y = y[:, :, ::down, ::down]
    return y.reshape(N, C, y.shape[2], y.shape[3])


def fir_kernel(k):
    k = np.asarray(k, dtype=np.float32)
    k = np.outer(k, k)
    return torch.from_numpy(k / np.sum(k))


def upsample_2d(x, k=(1, 3, 3, 1), factor=2, gain=1):
    kk = fir_kernel(k) * (gain * factor ** 2)
    p = kk.shape[0] - factor
    return upfirdn2d(x, kk, up=factor, pad0=(p + 1) // 2 + factor - 1, pad1=p // 2)


def downsample_2d(x, k=(1, 3, 3, 1), factor=2, gain=1):
    kk = fir_kernel(k) * gain
    p = kk.shape[0] - factor
    return upfirdn2d(x, kk, down=factor, pad0=(p + 1) // 2, pad1=p // 2)


def pixel_norm(x):
    return x / torch.sqrt(torch.mean(x ** 2, dim=1, keepdim=True) + 1e-8)


def minibatch_std(x, group=4):
    N, C, H, W = x.shape
    G = min(N, group)
    s = x.view(G, -1, 1, C, H, W)
    s = torch.sqrt(s.var(0, unbiased=False) + 1e-8)
    s = s.mean([2, 3, 4], keepdim=True).squeeze(2)
    return torch.cat([x, s.repeat(G, 1, H, W)], 1)


# ---- the diffusion (LDDGAN's diffusion.py, the same as DDGAN's train_ddgan.py) ----
def gan_schedule(T=4, beta_min=0.1, beta_max=20.0):
    """get_sigma_schedule and the coefficients built on it, as the code computes them:
    t_i = i / T * (1 - 1e-3) + 1e-3 (float64); var_vp(t) = 1 - exp(2 (-0.25 t^2 (b_max -
    b_min) - 0.5 t b_min)); alpha_bar = 1 - var; beta_i = 1 - alpha_bar_i / alpha_bar_{i-1}
    (i >= 1), beta_0 = 1e-8; cast to float32; sigma = sqrt(beta), a = sqrt(1 - beta);
    a_cum = cumprod(a), sigma_cum = sqrt(1 - a_cum^2) (the pairs' marginals, index 0..T);
    the posterior of step t (x_{t+1} -> x_t, t = 0..T-1) from betas[1:]: var = beta (1 -
    abar_prev) / (1 - abar), coef1 = beta sqrt(abar_prev) / (1 - abar), coef2 = (1 -
    abar_prev) sqrt(alpha) / (1 - abar), log_var = log(max(var, 1e-20)); float32 ops."""
    t = torch.from_numpy(np.arange(0, T + 1, dtype=np.float64) / T) * (1.0 - 1e-3) + 1e-3
    log_mean = -0.25 * t ** 2 * (beta_max - beta_min) - 0.5 * t * beta_min
    abar = 1.0 - (1.0 - torch.exp(2.0 * log_mean))
    betas = 1 - abar[1:] / abar[:-1]
    betas = torch.cat((torch.tensor([1e-8], dtype=torch.float64), betas)).float()
    s = dict(betas=betas, sigmas=betas ** 0.5, a_s=torch.sqrt(1 - betas))
    s["a_s_cum"] = torch.from_numpy(np.cumprod(s["a_s"].numpy()))
    s["sigmas_cum"] = torch.sqrt(1 - s["a_s_cum"] ** 2)
    b = betas[1:]
    alphas = 1 - b
    ac = torch.cumprod(alphas, 0)
    ac_prev = torch.cat((torch.tensor([1.0]), ac[:-1]), 0)
    var = b * (1 - ac_prev) / (1 - ac)
    s["posterior_variance"] = var
    s["posterior_mean_coef1"] = b * torch.sqrt(ac_prev) / (1 - ac)
    s["posterior_mean_coef2"] = (1 - ac_prev) * torch.sqrt(alphas) / (1 - ac)
    s["posterior_log_variance_clipped"] = torch.log(var.clamp(min=1e-20))
    return s


def q_sample_pairs(s, x0, t, eps1, eps2):
    """x_t = a_cum[t] x0 + sigma_cum[t] eps2; x_{t+1} = a[t+1] x_t + sigma[t+1] eps1
    (the code draws eps1 first, then q_sample draws eps2)."""
    v = lambda a, i: a[i].view(-1, 1, 1, 1)  # noqa: E731
    x_t = v(s["a_s_cum"], t) * x0 + v(s["sigmas_cum"], t) * eps2
    return x_t, v(s["a_s"], t + 1) * x_t + v(s["sigmas"], t + 1) * eps1


def sample_posterior(s, x0, x_tp1, t, eps):
    """coef1[t] x0' + coef2[t] x_{t+1} + (t != 0) exp(log_var[t] / 2) eps."""
    v = lambda a: a[t].view(-1, 1, 1, 1)  # noqa: E731
    mean = v(s["posterior_mean_coef1"]) * x0 + v(s["posterior_mean_coef2"]) * x_tp1
    mask = (1 - (t == 0).float()).view(-1, 1, 1, 1)
    return mean + mask * torch.exp(0.5 * v(s["posterior_log_variance_clipped"])) * eps


# ---- the discriminator (score_sde/models/discriminator.py, Discriminator_small) ----
def timestep_embedding(t, dim, max_positions=10000):
    """get_timestep_embedding: half = dim // 2, f_k = exp(-k ln(max_positions) / (half - 1))
    (float32), cat(sin(t f), cos(t f)) - sin first."""
    half = dim // 2
    f = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(max_positions) / (half - 1)))
    a = t.float()[:, None] * f[None, :]
    return torch.cat([torch.sin(a), torch.cos(a)], dim=1)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.main = nn.Sequential(nn.Linear(dim, dim), nn.LeakyReLU(0.2), nn.Linear(dim, dim))

    def forward(self, t):  # (the embedding in float32, as the code; then the weights' dtype)
        return self.main(timestep_embedding(t, self.main[0].in_features).to(self.main[0].weight.dtype))


# While make_gan_goldens.py probes a golden's inputs: how close each LeakyReLU's
# input comes to the kink, relative to the tensor's largest value (a float32 run
# may put an element within ~1e-6 of it on the other side, changing the gradient)
KINKS = None


def lrelu(x):
    if KINKS is not None:
        a = x.detach().abs()
        KINKS.append(float(a.min() / a.max().clamp(min=1e-30)))
    return F.leaky_relu(x, 0.2)


class DownConvBlock(nn.Module):
    """out = conv1(act(x)) + dense_t1(temb)[..., None, None]; act; FIR downsampling of out and
    x when down; (conv2(out) + skip(x)) / sqrt(2); skip a 1x1 conv without bias."""

    def __init__(self, cin, cout, t_emb_dim, down):
        super().__init__()
        self.down = down
        self.conv1 = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1))
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, padding=1))
        self.dense_t1 = nn.Linear(t_emb_dim, cout)
        self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False))

    def forward(self, x, temb):
        out = self.conv1(lrelu(x)) + self.dense_t1(temb)[..., None, None]
        out = lrelu(out)
        if self.down:
            out, x = downsample_2d(out), downsample_2d(x)
        return (self.conv2(out) + self.skip(x)) / math.sqrt(2)


class DiscriminatorSmall(nn.Module):
    """D(x_t, t, x_{t+1}): cat -> start_conv (1x1, 2 ngf) -> conv1 (keeps the size), conv2,
    conv3 (, conv4) halving it, widths 2, 4, 8 (, 8) ngf -> minibatch std (groups of min(N, 4))
    -> act(final_conv 3x3) -> sum over H, W -> end_linear; the time embedding is act(main(emb))."""

    def __init__(self, nc, ngf=64, t_emb_dim=256, num_layers=3):
        super().__init__()
        self.t_embed = TimestepEmbedding(t_emb_dim)
        self.start_conv = nn.Conv2d(nc, 2 * ngf, 1)
        ch, blocks = 2 * ngf, []
        for k in range(num_layers):
            out = ch if k == 0 else min(2 * ch, 8 * ngf)
            blocks.append(DownConvBlock(ch, out, t_emb_dim, k > 0))
            ch = out
        for k, b in enumerate(blocks):
            setattr(self, f"conv{k + 1}", b)
        self.n = num_layers
        self.final_conv = nn.Conv2d(ch + 1, ch, 3, padding=1)
        self.end_linear = nn.Linear(ch, 1)

    def forward(self, x, t, x_tp1):
        temb = F.leaky_relu(self.t_embed(t), 0.2)
        h = self.start_conv(torch.cat((x, x_tp1), dim=1))
        for k in range(self.n):
            h = getattr(self, f"conv{k + 1}")(h, temb)
        h = minibatch_std(h, 4)
        h = lrelu(self.final_conv(h))
        return self.end_linear(h.view(h.shape[0], h.shape[1], -1).sum(2))


def r1_penalty(disc, x_t, t, x_tp1, gamma):
    """The D step's R1 (train_ldgan.py:40-49): gamma / 2 * mean over the batch of
    |d sum D(x_t) / d x_t|^2, the gradient with create_graph=True."""
    d = disc(x_t, t, x_tp1).view(-1)
    g, = torch.autograd.grad(d.sum(), x_t, create_graph=True)
    return gamma / 2 * (g.view(g.shape[0], -1).norm(2, dim=1) ** 2).mean()


# ---- the generator (score_sde's NCSNpp of ncsnpp_generator_adagn.py, LDDGAN's config) ----
class AdaGN(nn.Module):
    """AdaptiveGroupNorm (layerspp.py:46-65): s = style(zemb) (N, 2C); gamma = s[:, :C], beta =
    s[:, C:]; gamma * GroupNorm(min(C // 4, 32), C, affine False, eps 1e-6)(x) + beta."""

    def __init__(self, c, zdim):
        super().__init__()
        self.c = c
        self.style = nn.Linear(zdim, 2 * c)

    def forward(self, x, zemb):
        s = self.style(zemb)
        gamma, beta = s[:, :self.c, None, None], s[:, self.c:, None, None]
        return gamma * F.group_norm(x, min(self.c // 4, 32), eps=1e-6) + beta


class ResBlockAdaGN(nn.Module):
    """ResnetBlockBigGANpp_Adagn (layerspp.py:275-344): h = SiLU(AdaGN_0(x)); FIR up- or
    downsampling of h and x; h = Conv_0(h) + Dense_0(SiLU(temb)); h = Conv_1(SiLU(AdaGN_1(h)));
    x = Conv_2(x) (1x1) when the width changes or it resamples; (x + h) / sqrt(2)."""

    def __init__(self, cin, cout, tdim, zdim, up=False, down=False):
        super().__init__()
        self.up, self.down = up, down
        self.GroupNorm_0 = AdaGN(cin, zdim)
        self.Conv_0 = nn.Conv2d(cin, cout, 3, padding=1)
        self.Dense_0 = nn.Linear(tdim, cout)
        self.GroupNorm_1 = AdaGN(cout, zdim)
        self.Conv_1 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout or up or down:
            self.Conv_2 = nn.Conv2d(cin, cout, 1)

    def forward(self, x, temb, zemb):
        h = F.silu(self.GroupNorm_0(x, zemb))
        if self.up:
            h, x = upsample_2d(h), upsample_2d(x)
        elif self.down:
            h, x = downsample_2d(h), downsample_2d(x)
        h = self.Conv_0(h) + self.Dense_0(F.silu(temb))[:, :, None, None]
        h = self.Conv_1(F.silu(self.GroupNorm_1(h, zemb)))
        if hasattr(self, "Conv_2"):
            x = self.Conv_2(x)
        return (x + h) / math.sqrt(2.0)


class NIN(nn.Module):
    """layers.NIN: y[b, o, h, w] = sum_c x[b, c, h, w] W[c, o] + b[o]; W is (in, out)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.W = nn.Parameter(torch.zeros(cin, cout))
        self.b = nn.Parameter(torch.zeros(cout))

    def forward(self, x):
        return torch.einsum("bchw,co->bohw", x, self.W) + self.b[None, :, None, None]


class AttnBlockpp(nn.Module):
    """layerspp.AttnBlockpp (skip_rescale): h = GroupNorm(32, C, eps 1e-6)(x); q, k, v = NIN_0..2;
    w = softmax over the keys of q . k C^-1/2; (x + NIN_3(sum w v)) / sqrt(2)."""

    def __init__(self, c):
        super().__init__()
        self.GroupNorm_0 = nn.GroupNorm(min(c // 4, 32), c, eps=1e-6)
        for i in range(4):
            setattr(self, f"NIN_{i}", NIN(c, c))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.GroupNorm_0(x)
        q, k, v = self.NIN_0(h), self.NIN_1(h), self.NIN_2(h)
        w = torch.einsum("bchw,bcij->bhwij", q, k) * (int(C) ** (-0.5))
        w = torch.softmax(w.reshape(B, H, W, H * W), dim=-1).reshape(B, H, W, H, W)
        a = self.NIN_3(torch.einsum("bhwij,bcij->bchw", w, v))
        return (x + a) / math.sqrt(2.0)


class PyramidDown(nn.Module):
    """layerspp.Downsample(with_conv, fir): conv_downsample_2d, a FIR blur (outer([1,3,3,1]) / 64,
    pads (2, 2)) then a 3x3 stride-2 convolution without padding, plus the bias."""

    def __init__(self, cin, cout):
        super().__init__()
        self.Conv2d_0 = nn.Conv2d(cin, cout, 3)

    def forward(self, x):
        y = upfirdn2d(x, fir_kernel((1, 3, 3, 1)).to(x.dtype), 1, 1, 2, 2)
        return F.conv2d(y, self.Conv2d_0.weight, self.Conv2d_0.bias, stride=2)


class NCSNpp(nn.Module):
    """The generator G(x_{t+1}, t, z) -> x0' of LDDGAN (tools/lddgan_facts.md section 1):
    z_transform = PixelNorm, dense(nz, zdim), SiLU, n_mlp x (dense(zdim, zdim), SiLU); temb =
    all_modules.1(SiLU(all_modules.0(emb(t, nf)))); all_modules in the code's order (input conv,
    num_res_blocks ResBlocks per level plus a down ResBlock and a pyramid Downsample but at the
    last level, middle ResBlock-Attn-ResBlock, per level from the top num_res_blocks + 1
    ResBlocks on cat(h, skip) plus an up ResBlock but at level 0, GroupNorm, conv); tanh."""

    def __init__(self, channels=4, nf=128, ch_mult=(1, 2, 2), num_res_blocks=2, nz=50, zdim=256,
                 n_mlp=4, attn_resolutions=(), image_size=16):
        super().__init__()
        self.nf, self.nres, self.nlev = nf, num_res_blocks, len(ch_mult)
        tdim = 4 * nf
        m = [nn.Linear(nf, tdim), nn.Linear(tdim, tdim), nn.Conv2d(channels, nf, 3, padding=1)]
        self.attn_at = set(attn_resolutions)
        hs_c, cin, res, pyr_c = [nf], nf, image_size, channels
        for lvl, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                m.append(ResBlockAdaGN(cin, nf * mult, tdim, zdim))
                cin = nf * mult
                if res in self.attn_at:
                    m.append(AttnBlockpp(cin))
                hs_c.append(cin)
            if lvl != len(ch_mult) - 1:
                m.append(ResBlockAdaGN(cin, cin, tdim, zdim, down=True))
                m.append(PyramidDown(pyr_c, cin))
                pyr_c = cin
                res //= 2
                hs_c.append(cin)
        m += [ResBlockAdaGN(cin, cin, tdim, zdim), AttnBlockpp(cin), ResBlockAdaGN(cin, cin, tdim, zdim)]
        for lvl in reversed(range(len(ch_mult))):
            for _ in range(num_res_blocks + 1):
                m.append(ResBlockAdaGN(cin + hs_c.pop(), nf * ch_mult[lvl], tdim, zdim))
                cin = nf * ch_mult[lvl]
            if res in self.attn_at:
                m.append(AttnBlockpp(cin))
            if lvl != 0:
                m.append(ResBlockAdaGN(cin, cin, tdim, zdim, up=True))
                res *= 2
        m += [nn.GroupNorm(min(cin // 4, 32), cin, eps=1e-6), nn.Conv2d(cin, channels, 3, padding=1)]
        self.all_modules = nn.ModuleList(m)
        self.ch_mult = ch_mult
        z = [PixelNormModule(), nn.Linear(nz, zdim), nn.SiLU()]  # after all_modules, as the code
        for _ in range(n_mlp):
            z += [nn.Linear(zdim, zdim), nn.SiLU()]
        self.z_transform = nn.Sequential(*z)

    def forward(self, x, t, z):
        zemb = self.z_transform(z)
        m, i = self.all_modules, 0
        temb = timestep_embedding(t, self.nf).to(x.dtype)
        temb = m[1](F.silu(m[0](temb)))
        i = 2
        pyr = x
        hs = [m[i](x)]
        i += 1
        for lvl in range(self.nlev):
            for _ in range(self.nres):
                h = m[i](hs[-1], temb, zemb)
                i += 1
                if isinstance(m[i], AttnBlockpp):
                    h = m[i](h)
                    i += 1
                hs.append(h)
            if lvl != self.nlev - 1:
                h = m[i](hs[-1], temb, zemb)
                i += 1
                pyr = (m[i](pyr) + h) / math.sqrt(2.0)
                i += 1
                h = pyr
                hs.append(h)
        h = hs[-1]
        h = m[i](h, temb, zemb)
        h = m[i + 1](h)
        h = m[i + 2](h, temb, zemb)
        i += 3
        for lvl in reversed(range(self.nlev)):
            for _ in range(self.nres + 1):
                h = m[i](torch.cat([h, hs.pop()], dim=1), temb, zemb)
                i += 1
            if isinstance(m[i], AttnBlockpp):
                h = m[i](h)
                i += 1
            if lvl != 0:
                h = m[i](h, temb, zemb)
                i += 1
        h = m[i + 1](F.silu(m[i](h)))
        return torch.tanh(h)


class PixelNormModule(nn.Module):
    def forward(self, x):
        return pixel_norm(x)


# ---- one training iteration's losses (train_ldgan.py:192-280), noise given ----
def d_step_loss(gen, disc, s, x0, t, eps1, eps2, z, eps_post, r1_gamma):
    """softplus(-D(x_t)).mean() [+ R1] + softplus(D(x'_t)).mean(); x'_t the posterior
    sample of G(x_{t+1}, t, z) under no_grad. Returns (loss, terms)."""
    x_t, x_tp1 = q_sample_pairs(s, x0, t, eps1, eps2)
    x_t = x_t.detach().requires_grad_(True)
    real = disc(x_t, t, x_tp1.detach()).view(-1)
    loss = F.softplus(-real).mean()
    terms = dict(d_real=loss.detach(), logit_real=real.detach().mean())
    if r1_gamma > 0:
        g, = torch.autograd.grad(real.sum(), x_t, create_graph=True)
        r1 = r1_gamma / 2 * (g.view(g.shape[0], -1).norm(2, dim=1) ** 2).mean()
        loss = loss + r1
        terms["r1"] = r1.detach()
    with torch.no_grad():
        x_pos = sample_posterior(s, gen(x_tp1, t, z), x_tp1, t, eps_post)
    fake = disc(x_pos, t, x_tp1).view(-1)
    lf = F.softplus(fake).mean()
    terms.update(d_fake=lf.detach(), logit_fake=fake.detach().mean())
    return loss + lf, terms


def g_step_loss(gen, disc, s, x0, t, eps1, eps2, z, eps_post, alpha):
    """softplus(-D(x'_t)).mean() + alpha * l1_loss(x0', x0)."""
    x_t, x_tp1 = q_sample_pairs(s, x0, t, eps1, eps2)
    x0p = gen(x_tp1, t, z)
    out = disc(sample_posterior(s, x0p, x_tp1, t, eps_post), t, x_tp1).view(-1)
    adv = F.softplus(-out).mean()
    rec = F.l1_loss(x0p, x0)
    return adv + alpha * rec, dict(g_adv=adv.detach(), rec=rec.detach())


def weighted_learning_alpha(epoch, num_epoch, delta=6.0):
    """train_ldgan.py:184-187: 1 - sigmoid(linspace(-delta, delta, num_epoch + 1))[epoch]."""
    beta = np.linspace(-delta, delta, num_epoch + 1)
    return float(1 - 1 / (1 + np.exp(-beta[epoch])))


def sample_from_model(gen, s, x_init, zs, epss):
    """diffusion.py:160-172 with the noise given: for i = T-1 .. 0, x0' = G(x, i, z_i),
    x = sample_posterior(x0', x, i, eps_i)."""
    x = x_init
    with torch.no_grad():
        for k, i in enumerate(reversed(range(len(s["posterior_mean_coef1"])))):
            t = torch.full((x.shape[0],), i, dtype=torch.int64)
            x = sample_posterior(s, gen(x, t, zs[k]), x, t, epss[k])
    return x


def ema_step(ema, params, decay):
    """EMA.py:25-62 after optimizer.step(): state['ema'] = p.clone() at the first step, then
    ema.mul_(decay).add_(p, alpha=1 - decay) for every parameter with a gradient."""
    for k, p in params.items():
        if k not in ema:
            ema[k] = p.detach().clone()
        ema[k].mul_(decay).add_(p.detach(), alpha=1 - decay)


def train_iteration(gen, disc, opt_g, opt_d, ema, s, x0, t, noise, r1_gamma, alpha, decay):
    """train_ldgan.py:192-280 with the noise given (the same for the D and the G step here):
    zero_grad, D loss backward (R1 when r1_gamma > 0), optimizerD.step(); G loss backward,
    optimizerG.step(), then the EMA."""
    opt_d.zero_grad()
    dl, _ = d_step_loss(gen, disc, s, x0, t, noise["eps1"], noise["eps2"], noise["z"],
                        noise["eps_post"], r1_gamma)
    dl.backward()
    gen.zero_grad()
    opt_d.step()
    opt_g.zero_grad()
    for p in disc.parameters():
        p.requires_grad_(False)
    gl, _ = g_step_loss(gen, disc, s, x0, t, noise["eps1"], noise["eps2"], noise["z"],
                        noise["eps_post"], alpha)
    gl.backward()
    for p in disc.parameters():
        p.requires_grad_(True)
    opt_g.step()
    ema_step(ema, dict(gen.named_parameters()), decay)


def import_official(root):
    """LDDGAN's own NCSNpp class, Discriminator_small class and diffusion module from a
    checkout at root, with the stubs tools/witness_ncsnpp.py explains: einops (rearrange
    is the identity at patch_size 1) and torch.utils.cpp_extension.load while score_sde.op
    is imported (nothing is compiled; on the CPU the official dispatcher takes
    upfirdn2d_native). Float32 as the official code runs."""
    import sys
    import types
    import torch.utils.cpp_extension
    einops = types.ModuleType("einops")
    einops.rearrange = lambda x, pattern, p1=1, p2=1: x
    sys.modules["einops"] = einops
    sys.path.insert(0, root)
    load = torch.utils.cpp_extension.load
    torch.utils.cpp_extension.load = lambda *a, **k: None
    try:
        import score_sde.op  # noqa: F401
    finally:
        torch.utils.cpp_extension.load = load
    from score_sde.models.ncsnpp_generator_adagn import NCSNpp as OfficialNCSNpp
    from score_sde.models.discriminator import Discriminator_small
    import diffusion
    return OfficialNCSNpp, Discriminator_small, diffusion


# train_ldgan.py's parser values that its NCSNpp reads besides the sizes (run.sh's CIFAR-10)
OFFICIAL_FIXED = dict(centered=True, not_use_tanh=False, fir=True, fir_kernel=[1, 3, 3, 1],
                      skip_rescale=True, resblock_type="biggan", progressive="none",
                      progressive_input="residual", progressive_combine="sum",
                      embedding_type="positional", fourier_scale=16.0, dropout=0.0,
                      conditional=True, patch_size=1, resamp_with_conv=True, training=True,
                      use_geometric=False)
