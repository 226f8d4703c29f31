"""PyTorch reference for casdm's U-Net and for one training step of each model
variant (ddpm-eps, ddpm-x0, dual, casdm). Imported by tools/make_casdm_goldens.py
and tools/witness_improved_diffusion.py; needs only Debian's python3-torch and
python3-numpy (run with /usr/bin/python3).

What it holds:
  timestep_embedding  the sinusoidal embedding of improved-diffusion (cos half first)
  UNet                improved-diffusion's UNetModel (2D, use_scale_shift_norm=True,
                      conv_resample=True, no class conditioning), same state_dict keys
  betas, schedule     the linear / cosine schedules and their float64 derived arrays
  train_losses        the outputs and losses of one training step for each variant
  test_init           a deterministic, hash-based initialisation C can reproduce
                      without storing weights (every parameter nonzero)

Written for this project from the facts in the papers and /work/shared/REFERENCE.md;
tools/witness_improved_diffusion.py checks the U-Net against openai/improved-diffusion.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

VARIANTS = ("ddpm-eps", "ddpm-x0", "dual", "casdm")


# ---------------------------------------------------------------------------
# U-Net
# ---------------------------------------------------------------------------
def timestep_embedding(t, dim):
    """Sinusoidal embedding of the (float, already rescaled) timesteps t, shape (B,).

    half = dim//2, freqs_i = exp(-ln(10000) * i / half) computed in float32 as
    improved-diffusion does; returns [cos(t f), sin(t f)] (cos first) plus a zero
    column when dim is odd. Shape (B, dim), float32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


def zeroed(module):
    """Zero-initialises a module's parameters (improved-diffusion's zero_module)."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm; a bf16 input (torch.autocast, tools/train_ref.py --autocast) is
    normalised in float32 and left so, as autocast's float32 list has it on CUDA and
    improved-diffusion's GroupNorm32 does (CPU autocast in torch 1.13 has no rule for
    group_norm and fails on a bf16 input with float32 weights)."""

    def forward(self, x):
        return super().forward(x.float() if x.dtype == torch.bfloat16 else x)


class ResBlock(nn.Module):
    """Residual block with scale-shift conditioning on the time embedding.

    h = conv(SiLU(GN(x)));  scale, shift = chunk(Linear(SiLU(emb)), 2) (scale first);
    h = conv(Dropout(SiLU(GN(h) * (1 + scale) + shift)));  out = skip(x) + h
    """

    def __init__(self, cin, cout, emb_dim, dropout, groups):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm(groups, cin), nn.SiLU(), conv3x3(cin, cout))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * cout))
        self.out_layers = nn.Sequential(GroupNorm(groups, cout), nn.SiLU(), nn.Dropout(p=dropout),
                                        zeroed(conv3x3(cout, cout)))
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        scale, shift = self.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)
        norm, rest = self.out_layers[0], self.out_layers[1:]
        h = rest(norm(h) * (1 + scale) + shift)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions with improved-diffusion's legacy head order.

    qkv = Conv1d(C, 3C, 1)(GN(x)) is reshaped to (B*heads, 3C/heads, HW), so each head
    owns a contiguous block of 3C/heads channels, split in that order into q, k, v of
    d = C/heads channels each. q and k are each scaled by 1/sqrt(sqrt(d)); the softmax is
    over the key positions; out = x + proj_out(attention), proj_out zero-initialised.
    """

    def __init__(self, ch, num_heads, groups):
        super().__init__()
        assert ch % num_heads == 0
        self.num_heads = num_heads
        self.norm = GroupNorm(groups, ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = zeroed(nn.Conv1d(ch, ch, 1))

    def forward(self, x):
        b, c, hh, ww = x.shape
        x = x.reshape(b, c, hh * ww)
        qkv = self.qkv(self.norm(x)).reshape(b * self.num_heads, 3 * c // self.num_heads, hh * ww)
        d = c // self.num_heads
        q, k, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
        s = 1.0 / math.sqrt(math.sqrt(d))
        logits = torch.bmm((q * s).transpose(1, 2), k * s)      # (B*heads, query, key)
        weights = torch.softmax(logits, dim=-1)
        a = torch.bmm(v, weights.transpose(1, 2))               # (B*heads, d, query)
        a = a.reshape(b, c, hh * ww)
        return (x + self.proj_out(a)).reshape(b, c, hh, ww)


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = conv3x3(ch, ch, stride=2)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = conv3x3(ch, ch)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class EmbedSequential(nn.Sequential):
    """A Sequential whose ResBlocks also receive the time embedding."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNet(nn.Module):
    """improved-diffusion's UNetModel (use_scale_shift_norm=True, conv_resample=True, 2D,
    unconditional) with its state_dict key names.

    attention_ds: the downsample factors (1 at full resolution, doubled after every
    Downsample) at which AttentionBlocks follow the ResBlocks. The middle block is always
    ResBlock, AttentionBlock, ResBlock. groups: GroupNorm group count (32 in
    improved-diffusion). forward(x, t_float) takes the already-rescaled float timesteps.
    """

    def __init__(self, in_ch, model_ch, out_ch, num_res_blocks, attention_ds, channel_mult,
                 num_heads, dropout, groups=32):
        super().__init__()
        self.model_ch = model_ch
        emb_dim = 4 * model_ch
        attention_ds = set(attention_ds)
        self.time_embed = nn.Sequential(nn.Linear(model_ch, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))

        def res(cin, cout):
            return ResBlock(cin, cout, emb_dim, dropout, groups)

        # Encoder. skip_chans records the channel count of every input block's output;
        # the decoder pops them in reverse order for its skip concatenations.
        self.input_blocks = nn.ModuleList([EmbedSequential(conv3x3(in_ch, model_ch))])
        skip_chans, ch, ds = [model_ch], model_ch, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, mult * model_ch)]
                ch = mult * model_ch
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, num_heads, groups))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(Downsample(ch)))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = EmbedSequential(res(ch, ch), AttentionBlock(ch, num_heads, groups),
                                            res(ch, ch))

        # Decoder: num_res_blocks + 1 ResBlocks per level, each taking one skip; the last
        # block of every level but level 0 ends with an Upsample.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), mult * model_ch)]
                ch = mult * model_ch
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, num_heads, groups))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))
        assert not skip_chans

        self.out = nn.Sequential(GroupNorm(groups, ch), nn.SiLU(), zeroed(conv3x3(ch, out_ch)))

    def forward(self, x, t_float):
        # the embedding is always computed in float32 (as improved-diffusion and
        # our C code do); a float64 reference model takes it from there
        emb = self.time_embed(timestep_embedding(t_float, self.model_ch).to(x.dtype))
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


# ---------------------------------------------------------------------------
# Deterministic test initialisation
# ---------------------------------------------------------------------------
FNV_OFFSET = 14695981039346656037
FNV_PRIME = 1099511628211
GOLDEN = 0x9E3779B97F4A7C15
MASK64 = (1 << 64) - 1


def fnv1a64(name):
    """FNV-1a 64-bit hash of the UTF-8 bytes of name (python ints, mod 2^64)."""
    h = FNV_OFFSET
    for byte in name.encode("utf-8"):
        h = ((h ^ byte) * FNV_PRIME) & MASK64
    return h


def test_init_values(full_name, shape):
    """The float32 values test_init gives the parameter `full_name` of this shape.

    h = fnv1a64(full_name); for flat element i: u = ((h + i*0x9E3779B97F4A7C15) mod 2^64)
    >> 40 (24 bits); base = (u / 2^24 - 0.5) * 2 in [-1, 1). ndim >= 2: base/sqrt(fan_in),
    fan_in = numel/shape[0]; 1-D ".weight" (GroupNorm gains): 1 + 0.1*base; other 1-D
    (biases): 0.1*base. Computed in float64, cast to float32.

    Hand-checked values (pure python ints, asserted by _check_test_init):
      fnv1a64("theta.input_blocks.0.0.weight") = 0xfde9d0ec3622a552
      that conv weight, shape (32,3,3,3), fan_in 27:
        i=0: u = 16640464, base = 0.9836978912353516 -> value 0.18931274 (f32 0.18931274116039276)
        i=1: u = 10232138, base = 0.21976590156555176 -> value 0.04229397 (f32 0.0422939658164978)
      "theta.out.0.weight" (GroupNorm gain), i=0: f32 0.9335021376609802
      "theta.time_embed.0.bias" (bias), i=0: f32 0.027496885508298874
    """
    h = np.uint64(fnv1a64(full_name))
    n = int(np.prod(shape)) if len(shape) else 1
    i = np.arange(n, dtype=np.uint64)
    u = (h + i * np.uint64(GOLDEN)) >> np.uint64(40)       # uint64 arithmetic wraps mod 2^64
    base = (u.astype(np.float64) / float(1 << 24) - 0.5) * 2.0
    if len(shape) >= 2:
        val = base / math.sqrt(n / shape[0])
    elif full_name.endswith(".weight"):
        val = 1.0 + 0.1 * base
    else:
        val = 0.1 * base
    return val.astype(np.float32).reshape(shape)


def test_init(net, prefix):
    """Overwrites every parameter of net with test_init_values(prefix + "." + key)."""
    sd = net.state_dict()
    with torch.no_grad():
        for key, p in sd.items():
            p.copy_(torch.from_numpy(test_init_values(f"{prefix}.{key}", tuple(p.shape))))
    return net


def _check_test_init():
    """Recomputes the values quoted in test_init_values' docstring with python ints."""
    def slow(name, i):
        u = ((fnv1a64(name) + i * GOLDEN) & MASK64) >> 40
        return (u / 2.0 ** 24 - 0.5) * 2.0

    n = "theta.input_blocks.0.0.weight"
    assert fnv1a64(n) == 0xfde9d0ec3622a552
    assert ((fnv1a64(n) + GOLDEN) & MASK64) >> 40 == 10232138
    v = test_init_values(n, (32, 3, 3, 3)).reshape(-1)
    for i in (0, 1, 12345 % 864, 863):
        assert v[i] == np.float32(slow(n, i) / math.sqrt(27)), i
    assert v[0] == np.float32(0.18931274116039276) and v[1] == np.float32(0.0422939658164978)
    g = test_init_values("theta.out.0.weight", (32,))
    assert g[0] == np.float32(1 + 0.1 * slow("theta.out.0.weight", 0)) == np.float32(0.9335021376609802)
    b = test_init_values("theta.time_embed.0.bias", (128,))
    assert b[0] == np.float32(0.1 * slow("theta.time_embed.0.bias", 0)) == np.float32(0.027496885508298874)


# ---------------------------------------------------------------------------
# Diffusion schedules (float64)
# ---------------------------------------------------------------------------
def betas(schedule, T):
    """float64 numpy betas of length T for "linear" or "cosine" (improved-diffusion)."""
    if schedule == "linear":
        scale = 1000.0 / T
        return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)
    if schedule == "cosine":
        def abar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)],
                        dtype=np.float64)
    raise ValueError(schedule)


def schedule_arrays(schedule, T):
    """dict of float64 arrays: betas, alphas, abar, abar_prev."""
    b = betas(schedule, T)
    a = 1.0 - b
    abar = np.cumprod(a)
    return {"betas": b, "alphas": a, "abar": abar, "abar_prev": np.append(1.0, abar[:-1])}


def rescale_t(t, T):
    """The float timestep the network sees: t * 1000 / T (computed in float64)."""
    return torch.from_numpy(np.asarray(t, dtype=np.float64) * (1000.0 / T)).float()


def coef(values, t):
    """Per-sample coefficient: float64 array values[t] cast to float32, shape (B,1,1,1)."""
    return torch.from_numpy(np.asarray(values, dtype=np.float64)[np.asarray(t)]).float().reshape(-1, 1, 1, 1)


def step_coefs(S, t, p2_gamma, p2_k):
    """All per-sample float32 coefficients of a training step, each computed in float64."""
    b, a, ab, abp = S["betas"], S["alphas"], S["abar"], S["abar_prev"]
    snr = ab / (1.0 - ab)
    return {
        "sqrt_abar": coef(np.sqrt(ab), t),                          # q(x_t | x_0)
        "sqrt_1m_abar": coef(np.sqrt(1.0 - ab), t),
        "p2w": coef(1.0 / (p2_k + snr) ** p2_gamma, t),            # P2 weight
        "c1": coef(np.sqrt(abp) * b / (1.0 - ab), t),               # posterior mean, x0 term
        "c2": coef(np.sqrt(a) * (1.0 - abp) / (1.0 - ab), t),       # posterior mean, xt term
        "k1": coef(1.0 / np.sqrt(a), t),                            # mu from eps: k1 xt - k2 eps
        "k2": coef(b / (np.sqrt(1.0 - ab) * np.sqrt(a)), t),
        "a1": coef(1.0 / np.sqrt(ab), t),                           # x0 from eps: a1 xt - a2 eps
        "a2": coef(np.sqrt(1.0 - ab) / np.sqrt(ab), t),
    }


# ---------------------------------------------------------------------------
# Training losses
# ---------------------------------------------------------------------------
def mse(a, b):
    return ((a - b) ** 2).mean()


def train_losses(variant, nets, x0, t, noise, T, schedule, p2_gamma, p2_k, clip_x0=True):
    """Outputs and losses of one training step.

    variant: one of VARIANTS. nets: dict with "theta" (and "phi" for casdm). x0, noise:
    (B,C,H,W) float32; t: integer timesteps (B,). Returns a dict of tensors, "loss" the one
    to backpropagate. All MSEs are means over every element; sg(.) = .detach().
    """
    C = x0.shape[1]
    t = np.asarray(t, dtype=np.int64)
    # coefficients are float32 values (as the C code uses), promoted to the
    # reference's dtype: make_casdm_goldens.py runs everything else in float64
    k = {n: v.to(x0.dtype) for n, v in step_coefs(schedule_arrays(schedule, T), t, p2_gamma, p2_k).items()}
    t_in = rescale_t(t, T)
    xt = k["sqrt_abar"] * x0 + k["sqrt_1m_abar"] * noise
    out = {"t_in": t_in, "xt": xt}

    def l_eps(eps):                      # P2-weighted, weight applied element-wise
        return (k["p2w"] * (eps - noise) ** 2).mean()

    def mu_mixed(x0p, eps, r):
        # Both branches detached: the mixing loss trains only r (and nothing else).
        mu_x0 = (k["c1"] * x0p + k["c2"] * xt).detach()
        mu_e = (k["k1"] * xt - k["k2"] * eps).detach()
        mu_mix = r * mu_x0 + (1 - r) * mu_e
        mu_true = k["c1"] * x0 + k["c2"] * xt
        out.update(mu_x0=mu_x0, mu_e=mu_e, mu_mix=mu_mix, mu_true=mu_true, r=r)
        return mse(mu_mix, mu_true)

    if variant == "ddpm-eps":
        eps = nets["theta"](xt, t_in)
        out.update(theta_out=eps, L_eps=l_eps(eps))
        out["loss"] = out["L_eps"]
    elif variant == "ddpm-x0":
        x0p = nets["theta"](xt, t_in)
        out.update(theta_out=x0p, L_x0=mse(x0p, x0))
        out["loss"] = out["L_x0"]
    elif variant == "dual":
        # Benny & Wolf: one network, outputs [x0 (C), eps (C), r-logit (1)].
        o = nets["theta"](xt, t_in)
        x0p, eps, r = o[:, :C], o[:, C:2 * C], torch.sigmoid(o[:, 2 * C:2 * C + 1])
        out.update(theta_out=o, L_x0=mse(x0p, x0), L_eps=l_eps(eps), L_mu=mu_mixed(x0p, eps, r))
        out["loss"] = (out["L_x0"] + out["L_eps"] + out["L_mu"]) / 3
    elif variant == "casdm":
        # theta predicts eps; phi refines x0* = (xt - sqrt(1-abar) sg(eps)) / sqrt(abar)
        # into x0' and a per-pixel mixing logit. x0* is clipped to [-1,1] before phi
        # (the paper is silent; 1/sqrt(abar) explodes at the top steps), flag clip_x0.
        eps = nets["theta"](xt, t_in)
        x0_star = k["a1"] * xt - k["a2"] * eps.detach()
        x0_in = x0_star.clamp(-1.0, 1.0) if clip_x0 else x0_star
        o = nets["phi"](x0_in, t_in)
        x0p, r = o[:, :C], torch.sigmoid(o[:, C:C + 1])
        out.update(theta_out=eps, x0_star=x0_star, x0_in=x0_in, phi_out=o,
                   L_eps=l_eps(eps), L_x0=mse(x0p, x0), L_mu=mu_mixed(x0p, eps, r))
        out["loss"] = out["L_eps"] + out["L_x0"] + out["L_mu"]
    else:
        raise ValueError(variant)
    return out


if __name__ == "__main__":
    _check_test_init()
    print("test_init hand-checked values OK")


# ===========================================================================
# Sampling
# ===========================================================================
# Respacing and the DDPM / DDIM sampling loops of improved-diffusion (respace.py,
# gaussian_diffusion.py; facts in /work/shared/REFERENCE.md, code written here), plus
# the Cas-DM / dual-diffusion mixing of the two branch means (Cas-DM Eq. 16-17).
# Used by tools/make_sample_goldens.py.

def space_timesteps(T, spec):
    """Sorted list of the original steps kept by the respacing spec (improved-diffusion
    respace.space_timesteps semantics).

    "ddimN": the smallest integer stride k >= 1 with len(range(0, T, k)) == N, keeping
    0, k, 2k, ... (ValueError if there is none).
    Otherwise a comma list of counts ("10,10"; a plain "N" is one section): T is cut
    into len(list) sections of T // n steps, the first T % n of them one step longer;
    a section of `size` steps with count c keeps the offsets round(j*(size-1)/(c-1)),
    j = 0..c-1 (python round, half to even; offset 0 if c <= 1; ValueError if c > size).
    """
    if spec.startswith("ddim"):
        n = int(spec[len("ddim"):])
        for k in range(1, T):
            if len(range(0, T, k)) == n:
                return list(range(0, T, k))
        raise ValueError(f"cannot take exactly {n} of {T} steps with an integer stride")
    counts = [int(c) for c in spec.split(",")]
    base, extra = divmod(T, len(counts))
    kept, start = [], 0
    for i, c in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if c > size:
            raise ValueError(f"cannot take {c} steps from a section of {size}")
        # the fractional stride is accumulated by repeated addition, as improved-diffusion
        # does (cur += stride), so rounding of j*stride matches theirs bit for bit
        stride = (size - 1) / (c - 1) if c > 1 else 1
        cur = 0.0
        for _ in range(c):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(kept))


def respaced_schedule(schedule, T, spec):
    """dict of the respaced process: "kept" (list of original steps), "t_in" (float32
    tensor (n,), the ORIGINAL step rescaled: kept[j]*1000/T computed in float64), and the
    float64 arrays betas, alphas, abar, abar_prev, abar_kept of length n.

    betas_j = 1 - abar_kept[j] / abar_kept[j-1] (abar_kept[-1] := 1); then, as
    improved-diffusion's GaussianDiffusion does from any betas: alphas = 1 - betas,
    abar = cumprod(alphas) (equal to abar_kept up to float64 round-off), abar_prev =
    [1, abar[:-1]].
    """
    kept = space_timesteps(T, spec)
    abar_full = schedule_arrays(schedule, T)["abar"]
    abar_kept = abar_full[kept]
    prev = np.append(1.0, abar_kept[:-1])
    b = 1.0 - abar_kept / prev
    a = 1.0 - b
    abar = np.cumprod(a)
    return {"kept": kept, "t_in": rescale_t(kept, T), "betas": b, "alphas": a, "abar": abar,
            "abar_prev": np.append(1.0, abar[:-1]), "abar_kept": abar_kept}


def sample_coefs(RS, j, B, eta):
    """The float32 per-sample coefficients (B,1,1,1) of respaced step j, each computed in
    float64 with improved-diffusion's formulas, then cast to float32."""
    b, a, ab, abp = RS["betas"], RS["alphas"], RS["abar"], RS["abar_prev"]
    t = np.full(B, j, dtype=np.int64)
    sig_ddim = eta * np.sqrt((1.0 - abp) / (1.0 - ab)) * np.sqrt(1.0 - ab / abp)
    return {
        "a1": coef(np.sqrt(1.0 / ab), t),                           # x0 = a1 x - a2 eps
        "a2": coef(np.sqrt(1.0 / ab - 1.0), t),
        "c1": coef(b * np.sqrt(abp) / (1.0 - ab), t),               # posterior mean
        "c2": coef((1.0 - abp) * np.sqrt(a) / (1.0 - ab), t),
        "sigma_ddpm": coef(np.sqrt(b * (1.0 - abp) / (1.0 - ab)), t),   # fixed small variance
        # improved-diffusion's FIXED_LARGE (its default without learned sigma): beta_t
        # (posterior_variance[1] at t = 0, where no noise is added)
        "sigma_ddpm_large": coef(np.sqrt(b), t),
        "d1": coef(np.sqrt(abp), t),                                # DDIM: d1 x0 + d2 eps
        # max(.,0): only guards float64 round-off below 0 (eta = 1 at the last step)
        "d2": coef(np.sqrt(np.maximum(1.0 - abp - sig_ddim ** 2, 0.0)), t),
        "sigma_ddim": coef(sig_ddim, t),
    }


def sample(variant, nets, x_T, spec, T, schedule, method, eta, noises, clip=True, clip_x0=True,
           ddpm_sigma="small"):
    """Runs the respaced sampler from x_T (B,C,H,W) for j = n-1 .. 0.

    method "ddim" (eta as given) or "ddpm" (eta ignored; ddpm_sigma "small": the posterior
    variance, "large": beta_t, improved-diffusion's FIXED_LARGE).
    noises[j] (B,C,H,W) is the noise added at step j (not used at j == 0).
    clip: clamp predicted x0 to [-1,1] (improved-diffusion's clip_denoised); clip_x0: casdm
    clamps x0* before phi (as in train_losses).
    Per branch (coefficients of the current respaced step; cl = clamp if clip):
      eps-branch: x0_e = cl(a1 x - a2 eps'), eps_e = (a1 x - x0_e) / a2  (eps re-derived
                  from the clipped x0, improved-diffusion's _predict_eps_from_xstart)
      x0-branch:  x0_x = cl(x0'),            eps_x = (a1 x - x0_x) / a2
    Branch mean: DDIM d1 x0 + d2 eps, DDPM c1 x0 + c2 x. casdm mixes per pixel,
    mean = r m_x + (1-r) m_e (Cas-DM Eq. 16-17, r (B,1,H,W) broadcast over channels);
    dual mixes the unclipped x0s, x0_mix = r x0' + (1-r)(a1 x - a2 eps'), and steps with
    cl(x0_mix) and eps = (a1 x - x0_mix) / a2 (yanivbenny/dual_diffusion's sampler).
    x_prev = mean + sigma noises[j] (j > 0), mean (j == 0).
    Returns (x_0, xs) with xs[j] the x produced by step j (xs[0] is x_0).
    """
    RS = respaced_schedule(schedule, T, spec)
    n = len(RS["kept"])
    B, C = x_T.shape[:2]
    if method not in ("ddim", "ddpm"):
        raise ValueError(method)
    cl = (lambda v: v.clamp(-1.0, 1.0)) if clip else (lambda v: v)
    x = x_T
    xs = [None] * n
    with torch.no_grad():
        for j in range(n - 1, -1, -1):
            k = {name: v.to(x.dtype) for name, v in sample_coefs(RS, j, B, eta).items()}
            t_in = RS["t_in"][j].repeat(B)

            def mean_of(x0b, epsb):
                if method == "ddim":
                    return k["d1"] * x0b + k["d2"] * epsb
                return k["c1"] * x0b + k["c2"] * x

            def eps_branch(eps):
                x0_e = cl(k["a1"] * x - k["a2"] * eps)
                return mean_of(x0_e, (k["a1"] * x - x0_e) / k["a2"])

            def x0_branch(x0p):
                x0_x = cl(x0p)
                return mean_of(x0_x, (k["a1"] * x - x0_x) / k["a2"])

            if variant == "ddpm-eps":
                mean = eps_branch(nets["theta"](x, t_in))
            elif variant == "ddpm-x0":
                mean = x0_branch(nets["theta"](x, t_in))
            elif variant == "dual":
                # Benny & Wolf: the two x0s mixed first (unclipped), eps re-derived
                # from the unclipped mixed x0, then the mixed x0 clipped
                o = nets["theta"](x, t_in)
                r = torch.sigmoid(o[:, 2 * C:2 * C + 1])
                x0_mix = r * o[:, :C] + (1 - r) * (k["a1"] * x - k["a2"] * o[:, C:2 * C])
                mean = mean_of(cl(x0_mix), (k["a1"] * x - x0_mix) / k["a2"])
            elif variant == "casdm":
                eps = nets["theta"](x, t_in)
                x0s = k["a1"] * x - k["a2"] * eps
                o = nets["phi"](x0s.clamp(-1.0, 1.0) if clip_x0 else x0s, t_in)
                r = torch.sigmoid(o[:, C:C + 1])
                mean = r * x0_branch(o[:, :C]) + (1 - r) * eps_branch(eps)
            else:
                raise ValueError(variant)
            if j > 0:
                sigma = (k["sigma_ddim"] if method == "ddim" else
                         k["sigma_ddpm_large"] if ddpm_sigma == "large" else k["sigma_ddpm"])
                x = mean + sigma * noises[j].to(x.dtype)
            else:
                x = mean
            xs[j] = x
    return x, xs


def to_uint8(x):
    """improved-diffusion image_sample.py: ((x+1)*127.5).clamp(0,255) cast (truncated) to
    uint8, returned NHWC."""
    return ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
