#!/usr/bin/python3
"""Writes tests/goldens/ops.safetensors: forward and backward of the tensor
engine's ops computed by PyTorch (Debian's python3-torch), for tests/test_tensor.c.

Each case stores its inputs, a random upstream gradient `dout`, the output and
the gradient of every input. Run from the repository root:
    /usr/bin/python3 tools/make_goldens.py
Not needed by the build or CI: the output file is committed.
"""
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st  # noqa: E402

torch.manual_seed(1234)
torch.set_num_threads(1)
G = {}


def leaf(*shape, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).float().requires_grad_(True)


def record(name, out, inputs, extra=None):
    """Stores inputs, out, dout and d<input> for `name`."""
    dout = torch.randn(out.shape)
    grads = torch.autograd.grad(out, list(inputs.values()), dout)
    for k, v in inputs.items():
        G[f"{name}.{k}"] = v.detach()
    for (k, _), g in zip(inputs.items(), grads):
        G[f"{name}.d{k}"] = g
    G[f"{name}.out"] = out.detach()
    G[f"{name}.dout"] = dout
    for k, v in (extra or {}).items():
        G[f"{name}.{k}"] = torch.tensor(v, dtype=torch.float32)


# convolutions: 3x3 stride 1, 3x3 stride 2 (odd sizes), 1x1
for name, (N, C, H, W, OC, K, s, p) in {
    "conv3x3": (2, 5, 9, 7, 6, 3, 1, 1),
    "conv3x3s2": (2, 4, 9, 8, 3, 3, 2, 1),
    "conv1x1": (2, 6, 5, 5, 4, 1, 1, 0),
}.items():
    x, w, b = leaf(N, C, H, W), leaf(OC, C, K, K, scale=0.3), leaf(OC)
    record(name, F.conv2d(x, w, b, stride=s, padding=p), {"x": x, "w": w, "b": b},
           {"stride": [s], "pad": [p]})

# group norm, 32 groups as improved-diffusion's GroupNorm32, eps 1e-5
x, gm, bt = leaf(2, 64, 5, 3, scale=2.0), leaf(64), leaf(64)
x.data += 0.5
record("groupnorm", F.group_norm(x, 32, gm, bt, eps=1e-5), {"x": x, "gamma": gm, "beta": bt})

# attention as improved-diffusion's QKVAttention: w = softmax((q s)^T (k s)), out = v w^T
q, k, v = leaf(3, 8, 10), leaf(3, 8, 10), leaf(3, 8, 10)
sc = 1 / math.sqrt(math.sqrt(8))
wts = torch.softmax(torch.einsum("bct,bcs->bts", q * sc, k * sc), dim=-1)
record("attention", torch.einsum("bts,bcs->bct", wts, v), {"q": q, "k": k, "v": v}, {"scale": [sc]})

# bilinear resize, align_corners=False: up by a non-integer factor, 32->56, and down
for name, (shape, size) in {
    "resize_up": ((2, 3, 8, 8), (21, 21)),
    "resize_32_56": ((1, 2, 32, 32), (56, 56)),
    "resize_down": ((2, 2, 9, 7), (4, 3)),
}.items():
    x = leaf(*shape)
    record(name, F.interpolate(x, size=size, mode="bilinear", align_corners=False), {"x": x})

x = leaf(2, 3, 4, 5)
record("upsample", F.interpolate(x, scale_factor=2, mode="nearest"), {"x": x})
x = leaf(2, 3, 6, 8)
record("avgpool", F.avg_pool2d(x, 2, 2), {"x": x})

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "goldens", "ops.safetensors")
st.save(out, G, {"producer": "tools/make_goldens.py", "torch": torch.__version__})
print(f"wrote {os.path.normpath(out)}: {len(G)} tensors")
