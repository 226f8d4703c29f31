#!/usr/bin/python3
"""Writes tests/goldens/ae.safetensors: the KL autoencoder of tools/ae_ref.py on its
test weights (ae_ref.test_values, regenerated in C), in float64, for
tests/test_lddgan.c. Two tiny configurations, 16x16 images (dropout 0):

  c3  3 channels, ch 32, ch_mult 1,2, 1 ResnetBlock per level, attention at side 8
      (the second level), z 4, embed_dim 4, tanh_out
  c1  1 channel, ch 32, ch_mult 1,2,2, 1 ResnetBlock, attention at side 16 (the
      first level), z 3, embed_dim 2, no tanh

Per configuration <c>: x (2,C,16,16), moments = encode(x), z (latents),
y = decode(z), r_moments and r_y (random weights of the scalar
L = sum(moments * r_moments) + sum(y * r_y)), dx, dz, and for every parameter
gnorm/<key> = ||dL/d<param>|| and gsample/<key> = dL/d<param> at flat indices
floor(k n / m), k < m = min(n, 256) (the whole gradients would be 6 MB); and disc/*:
the PatchGAN discriminator (ndf 8, 3 layers) in training mode (logits, dx, grad/<key>
in full, the running statistics after) and in eval mode (logits_eval of x_eval); and
<c>/loss_off/*, <c>/loss_on/*: the loss (ae_ref.AELoss: taming's LPIPS with the test
weights of lpips_ref, a PatchGAN of ndf 8 and 2 layers, kl_weight 0.01 and logvar 0.25
so that both paths show, disc_start 1) at step 0 (GAN terms off) and step 1 (on) on
loss_x with the posterior noise loss_eps: the logged terms, every autoencoder
gradient (gnorm/, gsample/), the discriminator's running statistics after the
generator step (disc_g/); with the GAN on, the discriminator step too (terms,
dgrad/<key> in full, running statistics after, disc_d/). Run
from the repository root:
    /usr/bin/python3 tools/make_ae_goldens.py
Not needed by the build or CI: the output file is committed.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ae_ref as A  # noqa: E402
import lpips_ref as L  # noqa: E402
import st  # noqa: E402

CONFIGS = {
    "c3": dict(resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=(1, 2), num_res_blocks=1,
               attn_resolutions=(8,), z_channels=4, embed_dim=4, dropout=0.0, tanh_out=True),
    "c1": dict(resolution=16, in_channels=1, out_ch=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
               attn_resolutions=(16,), z_channels=3, embed_dim=2, dropout=0.0, tanh_out=False),
}


LOSS = dict(kl_weight=0.01, disc_weight=0.5, disc_factor=1.0, perceptual_weight=1.0, logvar=0.25)


def sampled_grads(G, prefix, named_grads):
    for k, gk in named_grads:
        flat = gk.reshape(-1)
        n = flat.numel()
        m = min(n, 256)
        idx = torch.tensor([k2 * n // m for k2 in range(m)])
        G[f"{prefix}/gnorm/{k}"] = flat.norm().reshape(1).float()
        G[f"{prefix}/gsample/{k}"] = flat[idx].float()


def loss_goldens(G, name, cfg):
    """One generator step with the GAN terms off (step 0) and one with them on
    (step 1, then the discriminator step), from the same weights."""
    C = cfg["in_channels"]
    model = A.test_init(A.AutoencoderKL(cfg)).double()
    lpips = L.lpips_test_init(L.VGGLPIPS(pool="max")).double()
    f = 2 ** (len(cfg["ch_mult"]) - 1)
    x = (torch.rand(2, C, 16, 16) * 2 - 1).double()
    eps = torch.randn(2, cfg["embed_dim"], 16 // f, 16 // f).double()
    G[f"{name}/loss_x"], G[f"{name}/loss_eps"] = x.float(), eps.float()
    for mode, step in (("off", 0), ("on", 1)):
        disc = A.disc_test_init(A.NLayerDiscriminator(C, 8, 2)).double().train()
        loss = A.AELoss(lpips, disc, disc_start=1, **LOSS)
        model.zero_grad()
        for p in disc.parameters():
            p.requires_grad_(False)  # Lightning's toggle_optimizer
        moments = model.encode(x)
        x_rec = model.decode(A.posterior_sample(moments, eps))
        total, terms = loss.generator(x, x_rec, moments, step, model.decoder.conv_out.weight)
        total.backward()
        pre = f"{name}/loss_{mode}"
        for k, v in terms.items():
            G[f"{pre}/{k}"] = v.float()
        sampled_grads(G, pre, [(k, p.grad) for k, p in model.named_parameters()])
        for k, b in disc.named_buffers():
            if "running" in k:
                G[f"{pre}/disc_g/{k}"] = b.float()
        print(f"{pre}: " + ", ".join(f"{k} {v.item():.6g}" for k, v in terms.items()))
        if mode == "off":
            continue
        for p in disc.parameters():
            p.requires_grad_(True)
        with torch.no_grad():  # the discriminator step's own forward (dropout 0: the same x_rec)
            x_rec2 = model.decode(A.posterior_sample(model.encode(x), eps))
        d_loss, dterms = loss.discriminator(x, x_rec2, step)
        params = dict(disc.named_parameters())
        grads = torch.autograd.grad(d_loss, list(params.values()))
        for k, v in dterms.items():
            G[f"{pre}/{k}"] = v.float()
        for k, gk in zip(params, grads):
            G[f"{pre}/dgrad/{k}"] = gk.float()
        for k, b in disc.named_buffers():
            if "running" in k:
                G[f"{pre}/disc_d/{k}"] = b.float()
        print(f"{pre} (discriminator): " + ", ".join(f"{k} {v.item():.6g}" for k, v in dterms.items()))


def main():
    torch.set_num_threads(1)
    torch.manual_seed(5)
    G = {}
    for name, cfg in CONFIGS.items():
        model = A.test_init(A.AutoencoderKL(cfg)).double()
        f = 2 ** (len(cfg["ch_mult"]) - 1)
        x = (torch.rand(2, cfg["in_channels"], 16, 16) * 2 - 1).double().requires_grad_(True)
        z = torch.randn(2, cfg["embed_dim"], 16 // f, 16 // f).double().requires_grad_(True)
        moments = model.encode(x)
        y = model.decode(z)
        r_m, r_y = torch.randn(moments.shape).double(), torch.randn(y.shape).double()
        Lsum = (moments * r_m).sum() + (y * r_y).sum()
        params = dict(model.named_parameters())
        grads = torch.autograd.grad(Lsum, [x, z] + list(params.values()))
        for k, v in {"x": x, "z": z, "moments": moments, "y": y, "r_moments": r_m, "r_y": r_y,
                     "dx": grads[0], "dz": grads[1]}.items():
            G[f"{name}/{k}"] = v.detach().float()
        sampled_grads(G, name, zip(params, grads[2:]))
        print(f"{name}: {sum(p.numel() for p in params.values())} parameters, moments |max| "
              f"{moments.abs().max().item():.3f}, y |max| {y.abs().max().item():.3f}")

    # the PatchGAN: training mode (batch statistics; the running ones after the
    # step), then eval mode on new images with those running statistics
    disc = A.disc_test_init(A.NLayerDiscriminator(3, 8, 3)).double().train()
    x = (torch.rand(3, 3, 32, 32) * 2 - 1).double().requires_grad_(True)
    logits = disc(x)
    r = torch.randn(logits.shape).double()
    params = dict(disc.named_parameters())
    grads = torch.autograd.grad((logits * r).sum(), [x] + list(params.values()))
    G["disc/x"], G["disc/logits"], G["disc/r"], G["disc/dx"] = (
        x.detach().float(), logits.detach().float(), r.float(), grads[0].float())
    for (k, _), gk in zip(params.items(), grads[1:]):
        G[f"disc/grad/{k}"] = gk.float()
    for k, b in disc.named_buffers():
        if "running" in k:
            G[f"disc/{k}"] = b.float()
    disc.eval()
    x2 = (torch.rand(2, 3, 32, 32) * 2 - 1).double()
    with torch.no_grad():
        G["disc/x_eval"], G["disc/logits_eval"] = x2.float(), disc(x2).float()
    print(f"disc: {sum(p.numel() for p in params.values())} parameters, logits {tuple(logits.shape)}")

    for name, cfg in CONFIGS.items():  # after the rest, whose random draws stay as they were
        loss_goldens(G, name, cfg)

    out = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                        "goldens", "ae.safetensors"))
    st.save(out, G, {"producer": "tools/make_ae_goldens.py", "torch": torch.__version__,
                     "weights": "ae_ref.test_values('ae.' + key)", "loss": str(LOSS), "precision": "float64, stored F32"})
    print(f"wrote {out}: {len(G)} tensors, {os.path.getsize(out):,} bytes")


if __name__ == "__main__":
    main()
