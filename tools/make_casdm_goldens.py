#!/usr/bin/python3
"""Writes tests/goldens/casdm_step.safetensors: one training step of each model variant
(ddpm-eps, ddpm-x0, dual, casdm) on a tiny U-Net, computed by the PyTorch reference in
tools/casdm_ref.py (Debian's python3-torch), for the C tests of unet.c and casdm.c.

The weights are not stored: every net is initialised with casdm_ref.test_init (a hash of
"<net>.<state_dict key>" and the element index), which the C tests reproduce. Contents:
  x0, noise            (2,3,16,16) inputs, t (2,) integer timesteps as floats
  <v>/<name>           every tensor train_losses returns for variant v (xt, t_in,
                       theta_out, phi_out, x0_star, x0_in, r, mu_*, L_*, loss; scalars
                       as shape (1,))
  casdm/grad/<net>.<key>   full gradient of loss w.r.t. every parameter (net theta, phi)
  casdm/adam7/<net>.<key>  parameters after one Adam step, flattened, every 7th element
  <v>/grad7/<net>.<key>    for ddpm-eps, ddpm-x0, dual: flattened gradient, every 7th
  <v>/adam7/<net>.<key>    element ([::7], from 0), and the same for the post-Adam params
The configuration is in the file's metadata. Some gradients are zero analytically, so
the stored values are float32 round-off (|g| < 2e-8) and need an absolute tolerance:
with groups == channels (32 and 32 here) GroupNorm normalises each channel alone and
cancels any per-channel bias feeding only into it, i.e. every ResBlock's
in_layers.2.bias and, in the last output block, out_layers.3.bias and
skip_connection.bias (they feed only the final GroupNorm `out.0`); and in every
AttentionBlock the key third of each head's qkv.bias rows (softmax is shift-invariant).
The theta of ddpm-eps and casdm gets the same init and the same loss L_eps, so their
theta gradients and post-Adam values are identical. Run from the repository root:
    /usr/bin/python3 tools/make_casdm_goldens.py
Not needed by the build or CI: the output file is committed.
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import casdm_ref as R  # noqa: E402
import st  # noqa: E402

torch.set_num_threads(1)

CFG = dict(image_size=16, in_channels=3, model_channels=32, channel_mult=(1, 1),
           num_res_blocks=1, attention_ds=(2,), num_heads=2, dropout=0.0, groups=32,
           T=4000, schedule="cosine", batch=2, t=(7, 3985), p2_gamma=0.5, p2_k=1.0,
           clip_x0=True, adam_lr=1e-4, adam_betas=(0.9, 0.999), adam_eps=1e-8, stride=7)
# The casdm post-Adam parameters in full would add 2.5 MB; Adam is element-wise and
# shared by all variants, so every 7th element is kept, as for the other variants.
FULL_CASDM_ADAM = False


def make_net(in_ch, out_ch):
    c = CFG
    return R.UNet(in_ch, c["model_channels"], out_ch, c["num_res_blocks"], set(c["attention_ds"]),
                  c["channel_mult"], c["num_heads"], c["dropout"], c["groups"])


def build_nets(variant, C):
    if variant == "dual":
        nets = {"theta": make_net(C, 2 * C + 1)}
    else:
        nets = {"theta": make_net(C, C)}
    if variant == "casdm":
        nets["phi"] = make_net(C, C + 1)
    for name, net in nets.items():
        R.test_init(net, name)   # float32 values...
        net.double()             # ...held exactly in float64
        net.train()
    return nets


def main():
    c = CFG
    C, S, B = c["in_channels"], c["image_size"], c["batch"]
    torch.manual_seed(0)
    x0 = torch.rand(B, C, S, S) * 2 - 1
    noise = torch.randn(B, C, S, S)
    t = np.array(c["t"], dtype=np.int64)
    G = {"x0": x0, "noise": noise, "t": torch.tensor(t, dtype=torch.float32)}
    # The reference runs in float64 from these float32 inputs, weights and
    # coefficients, so the stored (float32-rounded) values are the exact answer
    # and the C test measures only its own float32 rounding.
    x0, noise = x0.double(), noise.double()
    k = c["stride"]

    for v in R.VARIANTS:
        nets = build_nets(v, C)
        out = R.train_losses(v, nets, x0, t, noise, c["T"], c["schedule"],
                             c["p2_gamma"] if v != "ddpm-x0" else 0.0, c["p2_k"], c["clip_x0"])
        out["loss"].backward()
        for name, val in out.items():
            G[f"{v}/{name}"] = (val.detach().reshape(1) if val.dim() == 0 else val.detach()).float()

        params = [(f"{n}.{key}", p) for n, net in nets.items() for key, p in net.named_parameters()]
        opt = torch.optim.Adam([p for _, p in params], lr=c["adam_lr"], betas=c["adam_betas"],
                               eps=c["adam_eps"])
        opt.step()

        ngrad = sum(p.numel() for _, p in params)
        nzero = sum(int((p.grad == 0).sum()) for _, p in params)
        for full, p in params:
            g, a = p.grad.detach().float(), p.detach().float()
            if v == "casdm":
                G[f"{v}/grad/{full}"] = g.clone()
            else:
                G[f"{v}/grad7/{full}"] = g.reshape(-1)[::k].clone()
            if v == "casdm" and FULL_CASDM_ADAM:
                G[f"{v}/adam/{full}"] = a.clone()
            else:
                G[f"{v}/adam7/{full}"] = a.reshape(-1)[::k].clone()
        counts = ", ".join(f"{n} {sum(p.numel() for p in net.parameters())}" for n, net in nets.items())
        scal = ", ".join(f"{n} {float(out[n]):.6g}" for n in ("L_eps", "L_x0", "L_mu", "loss") if n in out)
        print(f"{v}: params {counts}; {scal}; zero grads {nzero}/{ngrad}")

    meta = {k2: (",".join(str(x) for x in v2) if isinstance(v2, tuple) else v2) for k2, v2 in c.items()}
    meta.update(producer="tools/make_casdm_goldens.py", torch=torch.__version__,
                init="casdm_ref.test_init, prefixes theta / phi", t_in="t*1000/T",
                precision="reference computed in float64 from float32 inputs, weights and coefficients",
                variants=",".join(R.VARIANTS), full_casdm_adam=FULL_CASDM_ADAM,
                p2_applies_to="ddpm-eps,dual,casdm",
                analytic_zero_grads="ResBlock in_layers.2.bias; last output block out_layers.3.bias "
                                    "and skip_connection.bias; key rows of qkv.bias")
    path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                         "tests", "goldens", "casdm_step.safetensors"))
    st.save(path, G, meta)
    print(f"wrote {path}: {len(G)} tensors, {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
