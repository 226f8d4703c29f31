"""PyTorch reference for casdm's KL autoencoder (lddgan.c): latent-diffusion's
AutoencoderKL as LDDGAN configures it, written for this project from the facts
below (checked in CompVis/latent-diffusion ldm/modules/diffusionmodules/model.py,
ldm/models/autoencoder.py and thanhluantrinh/LDDGAN autoencoder/config/
cifar10_16x16x4.yaml; read, not copied). tools/witness_ldm_autoencoder.py loads
the same weights into latent-diffusion's own modules and checks they agree.
Needs Debian's python3-torch; run with /usr/bin/python3.

  Normalize      GroupNorm(32, C, eps=1e-6, affine=True)
  ResnetBlock    h = conv1(swish(norm1(x))); h = conv2(dropout(swish(norm2(h))));
                 out = x + h, or nin_shortcut(x) + h (1x1) when in != out; no temb
  AttnBlock      q, k, v, proj_out: 1x1 convs of norm(x); w_ij = softmax_j(q_i . k_j
                 C^-1/2); out_i = sum_j w_ij v_j; x + proj_out(out)
  Downsample     F.pad(x, (0, 1, 0, 1)), conv 3x3 stride 2 padding 0
  Upsample       nearest x2, conv 3x3 padding 1
  Encoder        conv_in; level i: num_res_blocks blocks (ch*in_ch_mult[i] ->
                 ch*ch_mult[i]), each followed by an AttnBlock when the side
                 (resolution >> i) is in attn_resolutions; downsample but at the last
                 level; mid: block_1, attn_1, block_2; norm_out, swish, conv_out to
                 2*z_channels (double_z)
  Decoder        conv_in z_channels -> ch*ch_mult[-1]; mid; levels from the top, each
                 num_res_blocks + 1 blocks (+ attention), upsample but at level 0;
                 up[i] is level i; norm_out, swish, conv_out; tanh when tanh_out
  AutoencoderKL  moments = quant_conv(encoder(x)) (1x1, 2z -> 2*embed_dim);
                 decode(z) = decoder(post_quant_conv(z)) (1x1, embed_dim -> z)

state_dict keys are latent-diffusion's (encoder.down.0.block.0.norm1.weight, ...).
"""
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from casdm_ref import fnv1a64  # noqa: E402
import lpips_ref as L  # noqa: E402
from lpips_ref import _mix_bits  # noqa: E402


def norm(c):
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, dropout):
        super().__init__()
        self.norm1 = norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).reshape(B, C, H * W) for m in (self.q, self.k, self.v))
        w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * C ** -0.5, dim=2)
        out = torch.einsum("bij,bcj->bci", w, v).reshape(B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, mult, R = cfg["ch"], cfg["ch_mult"], cfg["resolution"]
        self.conv_in = nn.Conv2d(cfg["in_channels"], ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = ch
        for i, m in enumerate(mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(cfg["num_res_blocks"]):
                level.block.append(ResnetBlock(cin, ch * m, cfg["dropout"]))
                cin = ch * m
                if (R >> i) in cfg["attn_resolutions"]:
                    level.attn.append(AttnBlock(cin))
            if i != len(mult) - 1:
                level.downsample = Downsample(cin)
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(cin, cin, cfg["dropout"])
        self.mid.attn_1 = AttnBlock(cin)
        self.mid.block_2 = ResnetBlock(cin, cin, cfg["dropout"])
        self.norm_out = norm(cin)
        self.conv_out = nn.Conv2d(cin, 2 * cfg["z_channels"], 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, mult, R = cfg["ch"], cfg["ch_mult"], cfg["resolution"]
        cin = ch * mult[-1]
        self.tanh_out = cfg["tanh_out"]
        self.conv_in = nn.Conv2d(cfg["z_channels"], cin, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(cin, cin, cfg["dropout"])
        self.mid.attn_1 = AttnBlock(cin)
        self.mid.block_2 = ResnetBlock(cin, cin, cfg["dropout"])
        levels = [None] * len(mult)
        for i in reversed(range(len(mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(cfg["num_res_blocks"] + 1):
                level.block.append(ResnetBlock(cin, ch * mult[i], cfg["dropout"]))
                cin = ch * mult[i]
                if (R >> i) in cfg["attn_resolutions"]:
                    level.attn.append(AttnBlock(cin))
            if i != 0:
                level.upsample = Upsample(cin)
            levels[i] = level
        self.up = nn.ModuleList(levels)
        self.norm_out = norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg["out_ch"], 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h


class AutoencoderKL(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg["z_channels"], 2 * cfg["embed_dim"], 1)
        self.post_quant_conv = nn.Conv2d(cfg["embed_dim"], cfg["z_channels"], 1)

    def encode(self, x):
        return self.quant_conv(self.encoder(x))   # the posterior's moments

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


def posterior_sample(moments, eps):
    """DiagonalGaussianDistribution(moments).sample() with the noise given:
    mean, logvar = chunk(2, dim=1); logvar clamped to [-30, 20]; mean + exp(logvar/2) eps."""
    mean, logvar = torch.chunk(moments, 2, dim=1)
    return mean + torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0)) * eps


def posterior_kl(moments):
    """DiagonalGaussianDistribution.kl(): 0.5 sum(mean^2 + var - 1 - logvar) over (C, H, W)."""
    mean, logvar = torch.chunk(moments, 2, dim=1)
    logvar = torch.clamp(logvar, -30.0, 20.0)
    return 0.5 * torch.sum(mean ** 2 + torch.exp(logvar) - 1.0 - logvar, dim=[1, 2, 3])


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class AELoss(nn.Module):
    """LPIPSWithDiscriminator (ldm/modules/losses/contperceptual.py) for the
    KL autoencoder, hinge loss, unconditional, written from these facts:
      rec = |x - x_rec| + perceptual_weight * LPIPS(x, x_rec)  (LPIPS per image, broadcast)
      nll = sum(rec / exp(logvar) + logvar) / N
      kl  = sum(posterior.kl()) / N
      g_loss = -mean D(x_rec)
      d_weight = disc_weight * clamp(||d nll/dW|| / (||d g_loss/dW|| + 1e-4), 0, 1e4),
                 W = decoder.conv_out.weight, detached
      loss = nll + kl_weight * kl + d_weight * disc_factor * g_loss
      d_loss = disc_factor * hinge(D(x), D(x_rec.detach()))
      disc_factor = 0 while global_step < disc_start (adopt_weight)
    lpips: a lpips_ref.VGGLPIPS(pool="max") (taming's), run with no resize;
    one-channel images are repeated to three for it (casdm's extension)."""

    def __init__(self, lpips, disc, disc_start, kl_weight=1e-6, disc_weight=0.5,
                 disc_factor=1.0, perceptual_weight=1.0, logvar=0.0):
        super().__init__()
        self.lpips, self.disc = lpips, disc
        self.disc_start, self.kl_weight, self.disc_weight = disc_start, kl_weight, disc_weight
        self.disc_factor, self.perceptual_weight, self.logvar = disc_factor, perceptual_weight, logvar

    def factor(self, step):
        return 0.0 if step < self.disc_start else self.disc_factor

    def perceptual(self, x, x_rec):
        rgb = (lambda t: t) if x.shape[1] == 3 else (lambda t: t.repeat(1, 3, 1, 1))
        return L.distance(self.lpips, rgb(x_rec), rgb(x), None)

    def generator(self, x, x_rec, moments, step, last_layer):
        """The optimizer_idx 0 loss and its logged terms."""
        p = self.perceptual(x, x_rec).view(-1, 1, 1, 1)
        rec = torch.abs(x - x_rec) + self.perceptual_weight * p
        lv = torch.tensor(self.logvar, dtype=x.dtype)
        nll = torch.sum(rec / torch.exp(lv) + lv) / rec.shape[0]
        kl = torch.sum(posterior_kl(moments)) / moments.shape[0]
        g_loss = -torch.mean(self.disc(x_rec))
        g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_g = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = torch.clamp(torch.norm(g_nll) / (torch.norm(g_g) + 1e-4), 0.0, 1e4).detach()
        d_weight = d_weight * self.disc_weight
        loss = nll + self.kl_weight * kl + d_weight * self.factor(step) * g_loss
        terms = dict(loss=loss, l1=torch.abs(x - x_rec).mean(), lpips=p.mean(), nll=nll, kl=kl,
                     g_loss=g_loss, d_weight=d_weight)
        return loss, {k: v.detach().reshape(1) for k, v in terms.items()}

    def discriminator(self, x, x_rec, step):
        real, fake = self.disc(x.detach()), self.disc(x_rec.detach())
        d_loss = self.factor(step) * hinge_d_loss(real, fake)
        terms = dict(d_loss=d_loss, logits_real=real.mean(), logits_fake=fake.mean())
        return d_loss, {k: v.detach().reshape(1) for k, v in terms.items()}


class NLayerDiscriminator(nn.Module):
    """taming's PatchGAN (taming/modules/discriminator/model.py) with BatchNorm:
    main = Conv(in, ndf, 4, 2, 1), LReLU(0.2); for n in 1..n_layers-1: Conv(ndf*m', ndf*m,
    4, 2, 1, bias=False), BN, LReLU with m = min(2^n, 8); Conv(.., ndf*min(2^n_layers, 8),
    4, 1, 1, bias=False), BN, LReLU; Conv(.., 1, 4, 1, 1)."""

    def __init__(self, in_channels=3, ndf=64, n_layers=3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        m = 1
        for n in range(1, n_layers + 1):
            m_prev, m = m, min(2 ** n, 8)
            layers += [nn.Conv2d(ndf * m_prev, ndf * m, 4, 2 if n < n_layers else 1, 1, bias=False),
                       nn.BatchNorm2d(ndf * m), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(ndf * m, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)

    def forward(self, x):
        return self.main(x)


def disc_test_init(model):
    """test_values("disc." + key) for the parameters; running statistics stay 0 and 1."""
    with torch.no_grad():
        for key, p in model.named_parameters():
            p.copy_(torch.from_numpy(test_values("disc." + key, tuple(p.shape))))
    return model


# LDDGAN's CIFAR-10 autoencoder (autoencoder/config/cifar10_16x16x4.yaml)
CIFAR10 = dict(resolution=32, in_channels=3, out_ch=3, ch=128, ch_mult=(1, 2), num_res_blocks=2,
               attn_resolutions=(16,), z_channels=4, embed_dim=4, dropout=0.2, tanh_out=True)


def test_values(full_name, shape):
    """float32 values of test_init for `full_name` ("ae." + key), regenerated in C by
    tests/test_lddgan.c: h = fnv1a64(full_name); element i: u = splitmix64 of h + (i+1) *
    0x9E3779B97F4A7C15, >> 40; base = (u/2^24 - 0.5)*2 in [-1, 1). Weights (>= 2-D):
    base*sqrt(3/fan_in); norm gains (1-D .weight): 1 + 0.1*base; biases 0.1*base."""
    n = int(np.prod(shape))
    u = _mix_bits(fnv1a64(full_name), np.arange(n, dtype=np.uint64), "splitmix64")
    base = (u.astype(np.float64) / float(1 << 24) - 0.5) * 2.0
    if len(shape) >= 2:
        val = base * math.sqrt(3.0 / (n / shape[0]))
    elif full_name.endswith(".weight"):
        val = 1.0 + 0.1 * base
    else:
        val = 0.1 * base
    return val.astype(np.float32).reshape(shape)


def test_init(model):
    with torch.no_grad():
        for key, p in model.state_dict().items():
            p.copy_(torch.from_numpy(test_values("ae." + key, tuple(p.shape))))
    return model
