#!/usr/bin/python3
"""The PyTorch side of bench cases that ../shared/ref/unet_ref.py has no mode for.

  bench_torch.py REF_DIR ddim --ch 128 --res 3 --attn 16,8 --batch 16 --threads 2

ddim: one Cas-DM sampling step without gradients: theta(x_t, t), x0* from eps,
phi(x0*, t), the same networks as unet_ref.py's (imported from REF_DIR).
Prints one JSON line like unet_ref.py: step_s (median), peak_rss_mib.
"""
import json
import sys

import torch

sys.path.insert(0, sys.argv[1])
import unet_ref as R  # noqa: E402


def main():
    sys.argv = [sys.argv[0]] + sys.argv[2:]
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["ddim"])
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


if __name__ == "__main__":
    main()
