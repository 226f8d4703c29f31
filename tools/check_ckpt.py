#!/usr/bin/python3
"""Checks that a casdm checkpoint moves into PyTorch: builds our reference U-Net(s)
(tools/casdm_ref.py, improved-diffusion's parameter names) from the checkpoint's
metadata, loads the EMA weights with load_state_dict(strict=True) after stripping
the "ema.<net>." prefix, samples with DDIM from the same initial noise as
`casdm sample` (our PCG32 + Box-Muller, reimplemented below) and compares the
uint8 images with the .npz the C program wrote.

  ./casdm sample --ckpt CKPT --n 8 --steps 20 --seed 3 --out OUT
  /usr/bin/python3 tools/check_ckpt.py CKPT OUT/samples_8x32x32x1.npz --steps 20 --seed 3
"""
import argparse
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import casdm_ref as R  # noqa: E402
import st  # noqa: E402

M64 = (1 << 64) - 1


class Pcg32:
    """tensor.c's rng_seed / rng_u32 / rng_normal (PCG XSH RR 64/32, Box-Muller)."""

    def __init__(self, seed, stream):
        self.state, self.inc = 0, ((stream << 1) | 1) & M64
        self.u32()
        self.state = (self.state + seed) & M64
        self.u32()

    def u32(self):
        old = self.state
        self.state = (old * 6364136223846793005 + self.inc) & M64
        x = (((old >> 18) ^ old) >> 27) & 0xFFFFFFFF
        rot = old >> 59
        return ((x >> rot) | (x << ((32 - rot) & 31))) & 0xFFFFFFFF

    def uniform_open(self):
        hi, lo = self.u32(), self.u32()
        return (float(((hi << 32) | lo) >> 11) + 0.5) * (1.0 / 9007199254740992.0)

    def normal(self):
        u1, u2 = self.uniform_open(), self.uniform_open()
        return np.float32(math.sqrt(-2.0 * math.log(u1)) * math.cos(6.283185307179586 * u2))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("npz")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(2)
    tensors, meta = st.load(a.ckpt)
    kind, S, C = meta["model"], int(meta["image_size"]), int(meta["in_channels"])
    mult = tuple(int(m) for m in meta["channel_mult"].split(","))
    attn = {S // int(r) for r in meta["attention_resolutions"].split(",") if r}
    T, sched = int(meta["diffusion_steps"]), meta["noise_schedule"]
    outs = {"ddpm-eps": C, "ddpm-x0": C, "dual": 2 * C + 1, "casdm": C}
    nets = {"theta": R.UNet(C, int(meta["model_channels"]), outs[kind], int(meta["num_res_blocks"]), attn, mult,
                            int(meta["num_heads"]), 0.0)}
    if kind == "casdm":
        nets["phi"] = R.UNet(C, int(meta["model_channels"]), C + 1, int(meta["num_res_blocks"]), attn, mult,
                             int(meta["num_heads"]), 0.0)
    for name, net in nets.items():
        prefix = f"ema.{name}."
        sd = {k[len(prefix):]: torch.from_numpy(v) for k, v in tensors.items() if k.startswith(prefix)}
        net.load_state_dict(sd, strict=True)  # raises on any missing, unexpected or misshapen key
        net.eval()
    print(f"loaded {kind}: " + ", ".join(f"{n} {sum(q.numel() for q in net.parameters())} parameters (strict)"
                                          for n, net in nets.items()))
    want = np.load(a.npz)["arr_0"]
    N = want.shape[0]
    rng = Pcg32(a.seed, 1)
    x = np.array([rng.normal() for _ in range(N * C * S * S)], dtype=np.float32).reshape(N, C, S, S)
    with torch.no_grad():
        x0, _ = R.sample(kind, nets, torch.from_numpy(x), f"ddim{a.steps}", T, sched, "ddim", 0.0,
                         [torch.zeros(N, C, S, S)] * a.steps, clip=True, clip_x0=meta.get("clip_x0", "1") == "1")
    got = R.to_uint8(x0).numpy()
    diff = np.abs(got.astype(int) - want.astype(int))
    print(f"PyTorch vs casdm sample: max pixel difference {diff.max()}, mean {diff.mean():.4f} "
          f"({(diff > 0).mean() * 100:.2f}% of pixels differ)")
    return 0 if diff.max() <= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
