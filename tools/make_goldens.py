#!/usr/bin/python3
"""Writes tests/goldens/ops.safetensors: forward and backward of the tensor
engine's ops computed by PyTorch (Debian's python3-torch), for tests/test_tensor.c;
and the image fixtures image.png / image_grey.png / image.ppm for the CLI tests.

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


def write_png(path, arr):
    """An 8-bit PNG written with zlib level 9 (dynamic Huffman blocks) and row
    filters 0..4 in turn, so casdm's PNG reader meets every filter type."""
    import struct
    import zlib
    import numpy as np
    h, w, c = arr.shape
    raw = b""
    for y in range(h):
        f, row = y % 5, arr[y].reshape(-1).astype(np.int32)
        prev = arr[y - 1].reshape(-1).astype(np.int32) if y else np.zeros_like(row)
        out = []
        for i in range(len(row)):
            a = row[i - c] if i >= c else 0
            u = prev[i]
            cc = prev[i - c] if (i >= c and y) else 0
            if f == 0:
                p = 0
            elif f == 1:
                p = a
            elif f == 2:
                p = u
            elif f == 3:
                p = (a + u) // 2
            else:
                pp = a + u - cc
                pa, pb, pc = abs(pp - a), abs(pp - u), abs(pp - cc)
                p = a if (pa <= pb and pa <= pc) else (u if pb <= pc else cc)
            out.append((row[i] - p) & 255)
        raw += bytes([f]) + bytes(out)

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, {1: 0, 3: 2}[c], 0, 0, 0)
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def write_image_fixtures(d):
    """tests/goldens/image.png (RGB), image_grey.png and image.ppm: the same
    32x32 pixels (smooth ramps plus noise, so LZ77 finds matches)."""
    import numpy as np
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:32, 0:32]
    img = np.stack([xx * 8, yy * 8, (xx + yy) * 4], -1) + rng.integers(0, 24, (32, 32, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    write_png(os.path.join(d, "image.png"), img)
    write_png(os.path.join(d, "image_grey.png"), img[:, :, :1])
    with open(os.path.join(d, "image.ppm"), "wb") as fh:
        fh.write(b"P6\n# casdm test image\n32 32\n255\n" + img.tobytes())


write_image_fixtures(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "goldens"))
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "goldens", "ops.safetensors")
st.save(out, G, {"producer": "tools/make_goldens.py", "torch": torch.__version__})
print(f"wrote {os.path.normpath(out)}: {len(G)} tensors")
