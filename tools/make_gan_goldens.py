#!/usr/bin/python3
"""Writes tests/goldens/gan.safetensors: the denoising-diffusion GAN of tools/lddgan_ref.py
(LDDGAN stage two) for tests/test_lddgan.c. So far the diffusion: the T = 4 schedule
(beta_min 0.1, beta_max 20: every coefficient array), and with fixed noise one batch of
q_sample_pairs and of sample_posterior (t = 0..3, so the noise-free t = 0 is in it).
Run from the repository root:
    /usr/bin/python3 tools/make_gan_goldens.py
Not needed by the build or CI: the output file is committed.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lddgan_ref as D  # noqa: E402
import st  # noqa: E402


def main():
    torch.manual_seed(11)
    G = {}
    s = D.gan_schedule(4, 0.1, 20.0)
    for k, v in s.items():
        G[f"schedule/{k}"] = v.float()
    t = torch.tensor([0, 1, 2, 3, 2, 0])
    x0 = torch.randn(6, 4, 3, 3)
    e1, e2, e3 = torch.randn(6, 4, 3, 3), torch.randn(6, 4, 3, 3), torch.randn(6, 4, 3, 3)
    x_t, x_tp1 = D.q_sample_pairs(s, x0, t, e1, e2)
    x0p = torch.randn(6, 4, 3, 3)
    post = D.sample_posterior(s, x0p, x_tp1, t, e3)
    for k, v in dict(t=t.float(), x0=x0, eps1=e1, eps2=e2, x_t=x_t, x_tp1=x_tp1, x0_pred=x0p,
                     eps3=e3, posterior=post).items():
        G[f"diffusion/{k}"] = v.float()
    out = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                        "goldens", "gan.safetensors"))
    st.save(out, G, {"producer": "tools/make_gan_goldens.py", "torch": torch.__version__})
    print(f"wrote {out}: {len(G)} tensors")


if __name__ == "__main__":
    main()
