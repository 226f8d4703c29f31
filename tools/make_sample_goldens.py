#!/usr/bin/python3
"""Writes tests/goldens/sample.safetensors: respaced DDIM / DDPM sampling of each model
variant (ddpm-eps, ddpm-x0, dual, casdm) on the tiny U-Nets of
tools/make_casdm_goldens.py (same CFG, same casdm_ref.test_init weights, eval mode),
computed by casdm_ref.sample (Debian's python3-torch), for the C tests of the sampler.

T = 4000, cosine schedule; torch.manual_seed(1), then x_T = randn(2,3,16,16) and ten
noise tensors randn(2,3,16,16), noise[j] the one added at respaced step j (unused at
j = 0). The reference runs in float64 from these float32 inputs, float32 weights and
float32 per-step coefficients (each computed in float64, then cast), and is stored as
float32. Contents:
  x_T                   (2,3,16,16)
  noise                 (10,2,3,16,16)
  kept/ddim10, kept/10  (10,) the kept original steps (as floats); the network sees
                        t_in = kept[j]*1000/T
  <v>/ddim10            (2,3,16,16) final x_0, DDIM eta 0, spec "ddim10"
  <v>/ddim10/x          (10,2,3,16,16) x after respaced step j at index j ([0] = x_0)
  <v>/ddpm10            (2,3,16,16) final x_0, DDPM (fixed small variance), spec "10"
  <v>/ddpm10_large      (2,3,16,16) the same with improved-diffusion's FIXED_LARGE (beta_t)
  casdm/ddim10_eta0.5   (2,3,16,16) final x_0, DDIM eta 0.5, spec "ddim10"
  casdm/ddim10_uint8    (2,16,16,3) to_uint8 of the float32 casdm/ddim10 (NHWC, values
                        0..255 stored as float32; truncation, so a C test should allow
                        +-1 where its x_0 lands within round-off of a level boundary)
Predicted x0 is clipped to [-1,1] (clip=True) and casdm clips x0* before phi
(clip_x0=True). The configuration is in the file's metadata. Run from the repository root:
    /usr/bin/python3 tools/make_sample_goldens.py
Not needed by the build or CI: the output file is committed.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import casdm_ref as R  # noqa: E402
import st  # noqa: E402
from make_casdm_goldens import CFG, build_nets  # noqa: E402

torch.set_num_threads(1)

T, SCHEDULE, STEPS = 4000, "cosine", 10
RUNS = [  # (key suffix, method, spec, eta, DDPM variance)
    ("ddim10", "ddim", "ddim10", 0.0, "small"),
    ("ddpm10", "ddpm", "10", 0.0, "small"),
    ("ddpm10_large", "ddpm", "10", 0.0, "large"),
]


def main():
    c = CFG
    C, S, B = c["in_channels"], c["image_size"], c["batch"]
    torch.manual_seed(1)
    x_T = torch.randn(B, C, S, S)
    noises = [torch.randn(B, C, S, S) for _ in range(STEPS)]
    G = {"x_T": x_T, "noise": torch.stack(noises)}
    for spec in ("ddim10", "10"):
        kept = R.space_timesteps(T, spec)
        assert len(kept) == STEPS
        G[f"kept/{spec}"] = torch.tensor(kept, dtype=torch.float32)
        print(f"kept/{spec}: {kept}")

    x_T64, noises64 = x_T.double(), [n.double() for n in noises]
    for v in R.VARIANTS:
        nets = build_nets(v, C)
        for net in nets.values():
            net.eval()
        for name, method, spec, eta, var in RUNS:
            x0, xs = R.sample(v, nets, x_T64, spec, T, SCHEDULE, method, eta, noises64,
                              clip=True, clip_x0=c["clip_x0"], ddpm_sigma=var)
            G[f"{v}/{name}"] = x0.float()
            if name == "ddim10":
                G[f"{v}/{name}/x"] = torch.stack(xs).float()
            print(f"{v}/{name}: mean {float(x0.mean()):+.6f} std {float(x0.std()):.6f} "
                  f"min {float(x0.min()):+.6f} max {float(x0.max()):+.6f}")
        if v == "casdm":
            x0, _ = R.sample(v, nets, x_T64, "ddim10", T, SCHEDULE, "ddim", 0.5, noises64,
                             clip=True, clip_x0=c["clip_x0"])
            G["casdm/ddim10_eta0.5"] = x0.float()
            print(f"casdm/ddim10_eta0.5: mean {float(x0.mean()):+.6f} std {float(x0.std()):.6f}")
            # from the stored float32 x_0, in float32, as image_sample.py does
            G["casdm/ddim10_uint8"] = R.to_uint8(G["casdm/ddim10"]).float()

    keys = ("image_size", "in_channels", "model_channels", "channel_mult", "num_res_blocks",
            "attention_ds", "num_heads", "dropout", "groups", "batch", "clip_x0")
    meta = {k: (",".join(str(x) for x in c[k]) if isinstance(c[k], tuple) else c[k]) for k in keys}
    meta.update(producer="tools/make_sample_goldens.py", torch=torch.__version__,
                description="respaced DDIM (ddim10, eta 0; casdm also eta 0.5) and DDPM ('10', "
                            "fixed small variance; ddpm10_large: beta_t) sampling of each variant from x_T with the "
                            "stored per-step noise (noise[j] at step j, none at j=0); clipped "
                            "x0 with eps re-derived from it; dual/casdm mix the branch means "
                            "per pixel, r*m_x0 + (1-r)*m_eps",
                T=T, schedule=SCHEDULE, steps=STEPS, seed=1, clip=True, eval_mode=True,
                init="casdm_ref.test_init, prefixes theta / phi (as make_casdm_goldens.py)",
                t_in="kept[j]*1000/T (original step, rescaled)",
                respacing="improved-diffusion respace.space_timesteps; betas_j = "
                          "1 - abar_kept[j]/abar_kept[j-1]",
                precision="reference computed in float64 from float32 inputs, weights and "
                          "coefficients",
                variants=",".join(R.VARIANTS), uint8="((x+1)*127.5).clamp(0,255) truncated, NHWC")
    path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                         "tests", "goldens", "sample.safetensors"))
    st.save(path, G, meta)
    print(f"wrote {path}: {len(G)} tensors, {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
