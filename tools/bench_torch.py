#!/usr/bin/python3
"""The PyTorch side of bench cases that ../shared/ref/unet_ref.py has no mode for.

  bench_torch.py REF_DIR ddim --ch 128 --res 3 --attn 16,8 --batch 16 --threads 2

  bench_torch.py REF_DIR casdm_ckpt --ch 64 --res 2 --attn 16 --batch 16 --threads 2

  bench_torch.py REF_DIR inception --batch 50 --threads 2

ddim: one Cas-DM sampling step without gradients: theta(x_t, t), x0* from eps,
phi(x0*, t), the same networks as unet_ref.py's (imported from REF_DIR).
casdm_ckpt: unet_ref.py's Cas-DM training step (no LPIPS) with every block
that holds a ResBlock under torch.utils.checkpoint, as improved-diffusion's
use_checkpoint and casdm's bench --checkpoint 1.
inception: tools/inception_ref.py's FIDInception (pytorch-fid's network; the witness
tools/witness_pytorch_fid.py shows the two agree) without gradients on 32x32 images in
[0, 1] resized to 299x299: pool_3, the Mixed_6d tap and the logits, as fid.c computes.
Prints one JSON line like unet_ref.py: step_s (median), peak_rss_mib.
"""
import json
import sys

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, sys.argv[1])
import unet_ref as R  # noqa: E402


def main():
    sys.argv = [sys.argv[0]] + sys.argv[2:]
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["ddim", "casdm_ckpt", "inception"])
    p.add_argument("--ch", type=int, default=128)
    p.add_argument("--res", type=int, default=3)
    p.add_argument("--attn", default="16,8")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.mode == "casdm_ckpt":
        return casdm_ckpt(a)
    if a.mode == "inception":
        return inception(a)
    theta, phi = R.make_unet(a, 3).eval(), R.make_unet(a, 4).eval()
    B = a.batch
    x = torch.randn(B, 3, 32, 32)
    t = torch.full((B,), R.T // 2, dtype=torch.long)

    def step():
        with torch.no_grad():
            eps = theta(x, t)
            x0s = R.pred_x0(x, t, eps).clamp(-1, 1)
            o = phi(x0s, t)
            return o

    med, mn, mx = R.timeit(step, 2, a.iters)
    print(json.dumps({"mode": "ddim", "threads": torch.get_num_threads(), "batch": B,
                      "step_s": round(med, 4), "peak_rss_mib": round(R.peak_rss_mib(), 1)}))


def inception(a):
    import os
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import inception_ref
    model = inception_ref.FIDInception().eval()
    x = torch.rand(a.batch, 3, 32, 32)
    med, mn, mx = R.timeit(lambda: inception_ref.features(model, x), 1, a.iters)
    print(json.dumps({"mode": "inception", "threads": torch.get_num_threads(), "batch": a.batch,
                      "step_s": round(med, 4), "peak_rss_mib": round(R.peak_rss_mib(), 1)}))


def use_checkpoint(m):
    """Blocks with a ResBlock run under checkpoint (the RNG state is kept, so
    dropout draws the same mask in the recomputation)."""
    blocks = list(m.input_blocks) + [m.middle_block] + list(m.output_blocks)
    for b in blocks:
        if any(isinstance(layer, R.ResBlock) for layer in b):
            plain = b.forward
            b.forward = lambda x, emb, plain=plain: checkpoint(plain, x, emb, use_reentrant=False)
    return m


def casdm_ckpt(a):
    """unet_ref.py's casdm step (Eq. 8-15 of arXiv 2401.02414), checkpointed."""
    torch.manual_seed(0)
    th_, ph_ = use_checkpoint(R.make_unet(a, 3)), use_checkpoint(R.make_unet(a, 4))
    opt = torch.optim.Adam(list(th_.parameters()) + list(ph_.parameters()), lr=1e-4)
    B = a.batch
    x0 = torch.randn(B, 3, 32, 32).clamp(-1, 1)
    t = torch.randint(0, R.T, (B,))

    def step():
        eps = torch.randn_like(x0)
        xt = R.q_sample(x0, t, eps)
        eps_p = th_(xt, t)
        x0s = R.pred_x0(xt, t, eps_p).detach()
        o = ph_(x0s, t)
        x0p, r = o[:, :3], torch.sigmoid(o[:, 3:4])
        c1, c2 = R.post_coefs(t)
        mu_true = c1 * x0 + c2 * xt
        mu_x0 = (c1 * x0p + c2 * xt).detach()
        mu_eps = (c1 * x0s + c2 * xt).detach()
        loss = (F.mse_loss(eps_p, eps) + F.mse_loss(x0p, x0)
                + F.mse_loss(r * mu_x0 + (1 - r) * mu_eps, mu_true))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    med, mn, mx = R.timeit(step, 2, a.iters)
    print(json.dumps({"mode": "casdm_ckpt", "threads": torch.get_num_threads(), "batch": B,
                      "step_s": round(med, 4), "peak_rss_mib": round(R.peak_rss_mib(), 1)}))


if __name__ == "__main__":
    main()
