#!/usr/bin/python3
"""Second witness for tools/ae_ref.py's AELoss: latent-diffusion's own loss module
(LPIPSWithDiscriminator of ldm/modules/losses/contperceptual.py, on taming's LPIPS,
NLayerDiscriminator and hinge_d_loss), fed by latent-diffusion's own AutoencoderKL
and DiagonalGaussianDistribution, must give the same loss as AELoss fed by ae_ref's
AutoencoderKL, on the same weights and inputs: the scenario of tools/make_ae_goldens.py
(loss_goldens, LOSS; both CONFIGS; disc_start 1), at step 0 (GAN terms off) and
step 1 (on). Compared: the generator step (optimizer_idx 0, last_layer =
decoder.conv_out.weight): total loss, nll, kl, g_loss, d_weight, rec_loss, the
gradient of the total loss w.r.t. every autoencoder parameter and the
discriminator's running statistics after it; with the GAN on, the discriminator
step (optimizer_idx 1) on a fresh forward with the same noise: d_loss,
logits_real, logits_fake, the gradients w.r.t. the discriminator's parameters and
the running statistics after.

    witness_ldm_loss.py /path/to/latent-diffusion /path/to/taming-transformers

Nothing of either checkout is copied here. Stubbed: pytorch_lightning
(LightningModule is nn.Module), einops, ldm.util (instantiate_from_config: the
AutoencoderKL's own loss is not used), taming.modules.vqvae.quantize, taming.util
(its download helper; torchvision's VGG16 is built without weights and
LPIPS.load_from_pretrained does nothing). The loss's modules get our test weights:
lpips_ref.lpips_test_init under taming's names (net.slice<k>.<i>, lin<k>.model.1,
ScalingLayer constants in float64 as in witness_taming_lpips.py), and since
LPIPSWithDiscriminator takes no ndf (it builds NLayerDiscriminator with ndf 64),
its discriminator is replaced by taming's NLayerDiscriminator(input_nc=C, ndf=8,
n_layers=2) holding ae_ref.disc_test_init's weights. LPIPS in eval mode (heads'
Dropout off), the discriminator in training mode (BatchNorm batch statistics), as
AELoss assumes. The posterior noise is given: z = mean + std * eps (not .sample()).
For one-channel images the official LPIPS is wrapped to repeat the channel three
times, as AELoss does (casdm's extension, not latent-diffusion's behaviour).
Float64 on both sides; prints the largest differences and exits non-zero above
1e-10 relative.
"""
import os
import sys
import types

import torch
import torch.nn as nn
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ae_ref as A  # noqa: E402
import lpips_ref as L  # noqa: E402
import make_ae_goldens as M  # noqa: E402  (CONFIGS, LOSS; importing it writes nothing)

if len(sys.argv) != 3:
    sys.exit("usage: witness_ldm_loss.py /path/to/latent-diffusion /path/to/taming-transformers")
pl = types.ModuleType("pytorch_lightning")
pl.LightningModule = nn.Module
sys.modules["pytorch_lightning"] = pl
einops = types.ModuleType("einops")
einops.rearrange = einops.repeat = None
sys.modules["einops"] = einops
util = types.ModuleType("ldm.util")
util.instantiate_from_config = lambda cfg: nn.Identity()
tutil = types.ModuleType("taming.util")
tutil.get_ckpt_path = lambda *a, **k: None
quant = types.ModuleType("taming.modules.vqvae.quantize")
quant.VectorQuantizer2 = None
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[2])
import ldm  # noqa: E402,F401
import taming  # noqa: E402,F401
sys.modules["ldm.util"] = util
sys.modules["taming.util"] = tutil
sys.modules["taming.modules.vqvae.quantize"] = quant
_vgg16 = torchvision.models.vgg16
torchvision.models.vgg16 = lambda *a, **k: _vgg16(weights=None)  # no download
import taming.modules.losses.lpips as T  # noqa: E402
T.models.vgg16 = torchvision.models.vgg16
T.LPIPS.load_from_pretrained = lambda self, name="vgg_lpips": None
from taming.modules.discriminator.model import NLayerDiscriminator  # noqa: E402
from ldm.models.autoencoder import AutoencoderKL  # noqa: E402
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution  # noqa: E402
from ldm.modules.losses.contperceptual import LPIPSWithDiscriminator  # noqa: E402


def taming_lpips_state(ours):
    """lpips_ref's state_dict under taming's LPIPS names (as witness_taming_lpips.py)."""
    bounds = (0, 4, 9, 16, 23, 30)  # taming's slices of VGG16's features
    sd = {}
    for key, v in ours.state_dict().items():
        if key.startswith("features."):
            idx, what = key.split(".")[1:]
            k = next(j for j in range(5) if bounds[j] <= int(idx) < bounds[j + 1])
            sd[f"net.slice{k + 1}.{idx}.{what}"] = v
        else:
            sd[key.replace(".weight", ".model.1.weight")] = v
    # taming's ScalingLayer holds its constants rounded to float32 (~1e-7 relative
    # in float64); given the float64 values, the same map as lpips_ref's normalisation
    sd["scaling_layer.shift"] = torch.tensor(L.LPIPS_SHIFT, dtype=torch.float64).view(1, 3, 1, 1)
    sd["scaling_layer.scale"] = torch.tensor(L.LPIPS_SCALE, dtype=torch.float64).view(1, 3, 1, 1)
    return sd


class GreyToRGB(nn.Module):
    """casdm's extension, not latent-diffusion's behaviour: the official LPIPS takes
    three channels only; one-channel images are repeated to three, as AELoss does."""

    def __init__(self, lpips):
        super().__init__()
        self.lpips = lpips

    def forward(self, a, b):
        return self.lpips(a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1))


def rel(a, b):
    """max |a - b| / max |b| (the absolute difference when b is all zero)."""
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    assert a.shape == b.shape or a.numel() == b.numel() == 1, (a.shape, b.shape)
    d, s = (a.reshape(b.shape) - b).abs().max().item(), b.abs().max().item()
    return d / s if s > 0 else d


def worst_of(pairs):
    """(largest rel over named pairs, its name)."""
    return max(((rel(a, b), k) for k, a, b in pairs), key=lambda t: t[0])


def split_grads(grads):
    """Gradients that vanish mathematically carry rounding noise only (a per-channel
    bias followed by a GroupNorm of one channel per group, e.g. at the 32-channel
    levels, or an attention k.bias, which the softmax ignores): those below 1e-12 of
    the largest autoencoder gradient entry are measured against that entry.
    Returns (worst rel, its key) over the others, and (count, worst noise) of these."""
    scale = max(b.abs().max().item() for _, _, b in grads)
    small = [(k, a, b) for k, a, b in grads if b.abs().max().item() <= 1e-12 * scale]
    rest = [t for t in grads if t[0] not in {k for k, _, _ in small}]
    noise = max([0.0] + [max(a.abs().max().item(), b.abs().max().item()) / scale for _, a, b in small])
    return worst_of(rest), (len(small), noise)


def buffers_pairs(ours, theirs):
    tb = dict(theirs.named_buffers())
    out = []
    for k, b in ours.named_buffers():
        if "running" in k:
            out.append((k, b, tb[k]))
        else:  # num_batches_tracked
            assert int(b) == int(tb[k]), (k, int(b), int(tb[k]))
    return out


def main():
    torch.set_num_threads(1)
    torch.manual_seed(5)
    inputs = {}
    for name, cfg in M.CONFIGS.items():  # drawn as in make_ae_goldens.loss_goldens
        f = 2 ** (len(cfg["ch_mult"]) - 1)
        x = (torch.rand(2, cfg["in_channels"], 16, 16) * 2 - 1).double()
        eps = torch.randn(2, cfg["embed_dim"], 16 // f, 16 // f).double()
        inputs[name] = x, eps
    lpips = L.lpips_test_init(L.VGGLPIPS(pool="max")).double()
    lpips_sd = taming_lpips_state(lpips)
    worst = 0.0
    for name, cfg in M.CONFIGS.items():
        C = cfg["in_channels"]
        x, eps = inputs[name]
        ours_ae = A.test_init(A.AutoencoderKL(cfg)).double()
        dd = dict(double_z=True, z_channels=cfg["z_channels"], resolution=cfg["resolution"],
                  in_channels=C, out_ch=cfg["out_ch"], ch=cfg["ch"], ch_mult=list(cfg["ch_mult"]),
                  num_res_blocks=cfg["num_res_blocks"], attn_resolutions=list(cfg["attn_resolutions"]),
                  dropout=cfg["dropout"], tanh_out=cfg["tanh_out"])
        theirs_ae = AutoencoderKL(dd, lossconfig=None, embed_dim=cfg["embed_dim"]).double()
        theirs_ae.load_state_dict(ours_ae.state_dict(), strict=True)
        their_params = dict(theirs_ae.named_parameters())
        official = LPIPSWithDiscriminator(
            disc_start=1, logvar_init=M.LOSS["logvar"], kl_weight=M.LOSS["kl_weight"],
            disc_weight=M.LOSS["disc_weight"], disc_factor=M.LOSS["disc_factor"],
            perceptual_weight=M.LOSS["perceptual_weight"], disc_num_layers=2, disc_in_channels=C,
            disc_loss="hinge").double()
        official.perceptual_loss.load_state_dict(lpips_sd, strict=True)
        if C == 1:
            official.perceptual_loss = GreyToRGB(official.perceptual_loss)
        for mode, step in (("off", 0), ("on", 1)):
            disc = A.disc_test_init(A.NLayerDiscriminator(C, 8, 2)).double().train()
            official.discriminator = NLayerDiscriminator(input_nc=C, ndf=8, n_layers=2).double().train()
            official.discriminator.load_state_dict(disc.state_dict(), strict=True)
            assert official.training and official.discriminator.training
            assert not any(m.training for m in official.perceptual_loss.modules()
                           if isinstance(m, nn.Dropout))
            loss = A.AELoss(lpips, disc, disc_start=1, **M.LOSS)
            discs = (disc, official.discriminator)
            for d in discs:  # Lightning's toggle_optimizer for the generator step
                for p in d.parameters():
                    p.requires_grad_(False)

            # generator step, ours
            ours_ae.zero_grad()
            moments = ours_ae.encode(x)
            x_rec = ours_ae.decode(A.posterior_sample(moments, eps))
            total, terms = loss.generator(x, x_rec, moments, step, ours_ae.decoder.conv_out.weight)
            total.backward()
            # generator step, official (its AutoencoderKL.encode builds the posterior)
            theirs_ae.zero_grad()
            posterior = theirs_ae.encode(x)
            assert isinstance(posterior, DiagonalGaussianDistribution)
            kl_shape = tuple(posterior.kl().shape)
            t_rec = theirs_ae.decode(posterior.mean + posterior.std * eps)
            t_total, log = official(x, t_rec, posterior, 0, step,
                                    last_layer=theirs_ae.get_last_layer(), split="train")
            t_total.backward()
            assert float(log["train/disc_factor"]) == loss.factor(step)
            pw = M.LOSS["perceptual_weight"]
            scalars = [("x_rec", x_rec, t_rec), ("loss", terms["loss"], log["train/total_loss"]),
                       ("nll", terms["nll"], log["train/nll_loss"]),
                       ("kl", terms["kl"], log["train/kl_loss"]),
                       ("g_loss", terms["g_loss"], log["train/g_loss"]),
                       ("d_weight", terms["d_weight"], log["train/d_weight"]),
                       ("rec_loss", terms["l1"] + pw * terms["lpips"], log["train/rec_loss"])]
            grads = [(k, p.grad, their_params[k].grad) for k, p in ours_ae.named_parameters()]
            bufs = buffers_pairs(disc, official.discriminator)
            pre = f"{name}/loss_{mode} (step {step})"
            print(f"{pre}: posteriors.kl() shape {kl_shape}; "
                  + ", ".join(f"{k} {b.reshape(-1)[0].item():.6g}" for k, a, b in scalars[1:]))
            print("    rel diff " + ", ".join(f"{k} {rel(a, b):.1e}" for k, a, b in scalars))
            (eg, kg), (nz, ez) = split_grads(grads)
            eb, kb = worst_of(bufs)
            print(f"    {len(grads) - nz} autoencoder gradients: worst {eg:.1e} ({kg}); {nz} zero but "
                  f"for rounding on both sides (at most {ez:.1e} of the largest entry)")
            print(f"    discriminator running statistics after: worst {eb:.1e} ({kb})")
            worst = max([worst, eg, ez, eb] + [rel(a, b) for _, a, b in scalars])
            if mode == "off":
                continue

            # discriminator step on a fresh forward with the same noise
            for d in discs:
                for p in d.parameters():
                    p.requires_grad_(True)
            with torch.no_grad():
                x_rec2 = ours_ae.decode(A.posterior_sample(ours_ae.encode(x), eps))
                posterior2 = theirs_ae.encode(x)
                t_rec2 = theirs_ae.decode(posterior2.mean + posterior2.std * eps)
            d_loss, dterms = loss.discriminator(x, x_rec2, step)
            dg = torch.autograd.grad(d_loss, [p for _, p in disc.named_parameters()])
            t_dloss, dlog = official(x, t_rec2, posterior2, 1, step,
                                     last_layer=theirs_ae.get_last_layer(), split="train")
            tdg = torch.autograd.grad(t_dloss, [p for _, p in official.discriminator.named_parameters()])
            dscalars = [("d_loss", dterms["d_loss"], dlog["train/disc_loss"]),
                        ("logits_real", dterms["logits_real"], dlog["train/logits_real"]),
                        ("logits_fake", dterms["logits_fake"], dlog["train/logits_fake"])]
            dgrads = [(k, a, b) for (k, _), a, b in zip(disc.named_parameters(), dg, tdg)]
            assert [k for k, _ in disc.named_parameters()] == \
                [k for k, _ in official.discriminator.named_parameters()]
            dbufs = buffers_pairs(disc, official.discriminator)
            print(f"{pre} discriminator: " + ", ".join(f"{k} {b.item():.6g}" for k, a, b in dscalars))
            print("    rel diff " + ", ".join(f"{k} {rel(a, b):.1e}" for k, a, b in dscalars))
            eg, kg = worst_of(dgrads)
            eb, kb = worst_of(dbufs)
            print(f"    {len(dgrads)} discriminator gradients: worst {eg:.1e} ({kg})")
            print(f"    discriminator running statistics after: worst {eb:.1e} ({kb})")
            worst = max([worst, eg, eb] + [rel(a, b) for _, a, b in dscalars])
    print("agree" if worst <= 1e-10 else "DISAGREE", f"(worst {worst:.1e})")
    sys.exit(0 if worst <= 1e-10 else 1)


if __name__ == "__main__":
    main()
