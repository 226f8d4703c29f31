#!/usr/bin/python3
"""Second witness for tools/ae_ref.py: latent-diffusion's own AutoencoderKL (its
Encoder and Decoder of ldm/modules/diffusionmodules/model.py, which LDDGAN ships
unchanged) loads ae_ref's state_dict with strict=True and gives the same moments
and decoder outputs on the test weights, for LDDGAN's CIFAR-10 configuration and
for the two tiny configurations of tools/make_ae_goldens.py; and taming's
NLayerDiscriminator agrees with ae_ref's PatchGAN.

    witness_ldm_autoencoder.py /path/to/latent-diffusion /path/to/taming-transformers

Nothing of either checkout is copied here. Modules the autoencoder's forward does
not use are stubbed (pytorch_lightning: LightningModule is nn.Module; einops; the
loss from instantiate_from_config, so its loss.* keys are absent on both sides).
Float64 on both sides; exits non-zero above 1e-10 relative.
"""
import os
import sys
import types

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ae_ref as A  # noqa: E402

pl = types.ModuleType("pytorch_lightning")
pl.LightningModule = nn.Module
sys.modules["pytorch_lightning"] = pl
einops = types.ModuleType("einops")
einops.rearrange = einops.repeat = None
sys.modules["einops"] = einops
util = types.ModuleType("ldm.util")
util.instantiate_from_config = lambda cfg: nn.Identity()
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[2])
import ldm  # noqa: E402
sys.modules["ldm.util"] = util
quant = types.ModuleType("taming.modules.vqvae.quantize")
quant.VectorQuantizer2 = None
sys.modules["taming.modules.vqvae.quantize"] = quant
from ldm.models.autoencoder import AutoencoderKL  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__))))
import make_ae_goldens as M  # noqa: E402  (its CONFIGS; importing it rewrites nothing)

worst = 0.0
for name, cfg in [("cifar10", A.CIFAR10)] + list(M.CONFIGS.items()):
    ours = A.test_init(A.AutoencoderKL(cfg)).double().eval()
    dd = dict(double_z=True, z_channels=cfg["z_channels"], resolution=cfg["resolution"],
              in_channels=cfg["in_channels"], out_ch=cfg["out_ch"], ch=cfg["ch"],
              ch_mult=list(cfg["ch_mult"]), num_res_blocks=cfg["num_res_blocks"],
              attn_resolutions=list(cfg["attn_resolutions"]), dropout=cfg["dropout"],
              tanh_out=cfg["tanh_out"])
    theirs = AutoencoderKL(dd, lossconfig=None, embed_dim=cfg["embed_dim"]).double().eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    torch.manual_seed(3)
    R, f = cfg["resolution"], 2 ** (len(cfg["ch_mult"]) - 1)
    x = torch.rand(2, cfg["in_channels"], R, R).double() * 2 - 1
    z = torch.randn(2, cfg["embed_dim"], R // f, R // f).double()
    with torch.no_grad():
        m0, m1 = ours.encode(x), theirs.encode(x).parameters
        y0, y1 = ours.decode(z), theirs.decode(z)
    em = ((m0 - m1).abs().max() / m1.abs().max()).item()
    ey = ((y0 - y1).abs().max() / y1.abs().max()).item()
    n = sum(p.numel() for p in theirs.parameters())
    print(f"{name}: {n} parameters, strict load ok; moments rel diff {em:.1e}, decoder {ey:.1e}")
    worst = max(worst, em, ey)
# taming's NLayerDiscriminator (the loss's PatchGAN) against ae_ref's, training
# mode (batch statistics, then the running ones compared) and eval mode
from taming.modules.discriminator.model import NLayerDiscriminator  # noqa: E402
ours = A.disc_test_init(A.NLayerDiscriminator(3, 8, 3)).double().train()
theirs = NLayerDiscriminator(3, 8, 3).double().train()
theirs.load_state_dict(ours.state_dict(), strict=True)
x = torch.rand(3, 3, 32, 32).double() * 2 - 1
with torch.no_grad():
    l0, l1 = ours(x), theirs(x)
    b = max((a - c).abs().max().item() for a, c in zip(ours.buffers(), theirs.buffers()))
    ours.eval(), theirs.eval()
    e0, e1 = ours(x), theirs(x)
el = max(((l0 - l1).abs().max() / l1.abs().max()).item(), ((e0 - e1).abs().max() / e1.abs().max()).item())
print(f"NLayerDiscriminator: strict load ok; logits rel diff {el:.1e} (train and eval), buffers {b:.1e}")
worst = max(worst, el, b)
print("agree" if worst <= 1e-10 else "DISAGREE", f"(worst {worst:.1e})")
sys.exit(0 if worst <= 1e-10 else 1)
