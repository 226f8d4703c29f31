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

# ---- the KL autoencoder's ops (LDDGAN stage one) ----
# max pool 2x2 on an odd size (floor), as taming's LPIPS VGG16
x = leaf(2, 3, 7, 9)
record("maxpool", F.max_pool2d(x, 2, 2), {"x": x})
# pointwise: tanh (the decoder's output), LeakyReLU(0.2) (the discriminator)
x = leaf(2, 3, 4, 5, scale=2.0)
record("tanh", torch.tanh(x), {"x": x})
x = leaf(2, 3, 4, 5)
record("leaky_relu", F.leaky_relu(x, 0.2), {"x": x})
# latent-diffusion's Downsample padding: F.pad(x, (0, 1, 0, 1))
x = leaf(2, 3, 5, 6)
record("pad", F.pad(x, (0, 1, 0, 1)), {"x": x})
# BatchNorm2d in training mode (momentum 0.1, eps 1e-5) from running
# statistics that are not the defaults, and the statistics after the step;
# then eval mode with those statistics
bn = torch.nn.BatchNorm2d(4)
with torch.no_grad():
    bn.weight.copy_(torch.randn(4)); bn.bias.copy_(torch.randn(4))
    bn.running_mean.copy_(torch.randn(4)); bn.running_var.copy_(torch.rand(4) + 0.5)
G["batchnorm_train.running_mean0"] = bn.running_mean.clone()
G["batchnorm_train.running_var0"] = bn.running_var.clone()
x = leaf(3, 4, 5, 6, scale=1.5)
x.data += 0.7
gm, bt = bn.weight, bn.bias
bn.train()
record("batchnorm_train", bn(x), {"x": x, "gamma": gm, "beta": bt})
G["batchnorm_train.running_mean"] = bn.running_mean.clone()
G["batchnorm_train.running_var"] = bn.running_var.clone()
bn.eval()
x = leaf(2, 4, 3, 5)
record("batchnorm_eval", bn(x), {"x": x, "gamma": gm, "beta": bt})
G["batchnorm_eval.running_mean"] = bn.running_mean.clone()
G["batchnorm_eval.running_var"] = bn.running_var.clone()
# DiagonalGaussianDistribution: kl() per image and sample() with given
# noise, the formulas of ldm/modules/distributions/distributions.py (logvar
# clamped to [-30, 20]; two values outside that range)
m = leaf(2, 6, 3, 4)
with torch.no_grad():
    m[0, 3, 0, 0] = 25.0
    m[1, 5, 2, 3] = -40.0
mean, logvar = torch.chunk(m, 2, dim=1)
logvar = torch.clamp(logvar, -30.0, 20.0)
record("gaussian_kl", 0.5 * torch.sum(mean ** 2 + torch.exp(logvar) - 1.0 - logvar, dim=[1, 2, 3]),
       {"moments": m})
eps = torch.randn(2, 3, 3, 4)
G["gaussian_sample.eps"] = eps
mean, logvar = torch.chunk(m, 2, dim=1)
logvar = torch.clamp(logvar, -30.0, 20.0)
record("gaussian_sample", mean + torch.exp(0.5 * logvar) * eps, {"moments": m})

# ---- the denoising-diffusion GAN's ops (LDDGAN stage two; tools/lddgan_ref.py) ----
import lddgan_ref as D  # noqa: E402
# FIR up- and downsampling as NCSN++ and DDGAN's discriminators call them
# ([1, 3, 3, 1], factor 2), and a crop with an asymmetric kernel
x = leaf(2, 3, 5, 6)
record("fir_up", D.upsample_2d(x), {"x": x})
G["fir_up.kernel"] = D.fir_kernel((1, 3, 3, 1)) * 4
x = leaf(2, 3, 8, 6)
record("fir_down", D.downsample_2d(x), {"x": x})
G["fir_down.kernel"] = D.fir_kernel((1, 3, 3, 1))
x = leaf(1, 2, 6, 7)
kk = torch.rand(3, 3)
record("upfirdn_crop", D.upfirdn2d(x, kk, 1, 1, -1, 2), {"x": x})
G["upfirdn_crop.kernel"] = kk
x = leaf(2, 3, 4, 5, scale=4.0)
with torch.no_grad():
    x[0, 0, 0, 0] = 25.0  # above softplus's threshold 20
record("softplus", F.softplus(x), {"x": x})
x = leaf(4, 6)
record("pixel_norm", D.pixel_norm(x), {"x": x})
x = leaf(8, 3, 2, 3)
record("minibatch_std", D.minibatch_std(x, 4), {"x": x})


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
