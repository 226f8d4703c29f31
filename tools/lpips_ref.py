"""PyTorch reference for casdm's LPIPS loss: VGG16-LPIPS with average pooling, the
perceptual distance the Cas-DM paper uses (it follows consistency models, which call
piq's `LPIPS(replace_pooling=True)`). Needs only Debian's python3-torch and
python3-numpy (run with /usr/bin/python3); imported by tools/convert_lpips.py and
tools/make_lpips_goldens.py.

Definition (see /work/shared/REFERENCE.md, "LPIPS"):
  T(x)   x in [-1, 1], (N,3,H,W). If (H,W) != (size,size): bilinear resize to
         (size,size), align_corners=False, no antialias (F.interpolate). Then
         x01 = (x+1)/2 and (x01 - mean)/std with ImageNet mean (0.485,0.456,0.406),
         std (0.229,0.224,0.225) -- the same function as lpips' (x - shift)/scale
         with shift (-.030,-.088,-.188) = 2*mean-1 and scale (.458,.448,.450) = 2*std
         exactly (max difference 8.9e-16 in float64 over x in [-1,1]).
  trunk  torchvision's vgg16().features up to relu5_3 (module index 29), conv3x3
         pad 1 + ReLU, every MaxPool2d replaced by AvgPool2d(2, 2).
         Convs at indices 0,2,5,7,10,12,14,17,19,21,24,26,28; pools at 4,9,16,23.
  taps   after the ReLUs at indices 3, 8, 15, 22, 29 (relu1_2 .. relu5_3),
         channels 64, 128, 256, 512, 512.
  head   per tap k, for both images: f / (sqrt(sum_c f^2) + 1e-10) per pixel;
         squared difference; 1x1 conv with lin<k>.weight (1,C_k,1,1), no bias, no
         dropout; spatial mean. d = sum over the 5 taps, one number per image (N,).
         The loss is the batch mean of d.

Weights file (safetensors, F32, metadata format "casdm-lpips-vgg16-1"):
  features.<i>.weight (out,in,3,3) and features.<i>.bias (out,) for the 13 convs,
  lin<k>.weight (1,C_k,1,1) for k = 0..4 -- exactly VGGLPIPS' state_dict keys.
  14,714,688 trunk parameters + 1,472 head weights.

Written for this project from the facts in /work/shared/REFERENCE.md and the public
piq / richzhang-PerceptualSimilarity sources (read, not copied).
"""
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st  # noqa: E402

FORMAT = "casdm-lpips-vgg16-1"
# torchvision vgg16 cfg "D" up to relu5_3 (the final pool, index 30, is not needed)
CFG = [64, 64, "P", 128, 128, "P", 256, 256, 256, "P", 512, 512, 512, "P", 512, 512, 512]
CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
POOL_INDICES = (4, 9, 16, 23)
TAP_INDICES = (3, 8, 15, 22, 29)
TAP_NAMES = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
TAP_CHANNELS = (64, 128, 256, 512, 512)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)      # richzhang lpips ScalingLayer, inputs in [-1,1]
LPIPS_SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10


def expected_shapes():
    """dict key -> shape of every tensor in the weights file, in state_dict order."""
    shapes, cin = {}, 3
    convs = [v for v in CFG if v != "P"]
    for idx, cout in zip(CONV_INDICES, convs):
        shapes[f"features.{idx}.weight"] = (cout, cin, 3, 3)
        shapes[f"features.{idx}.bias"] = (cout,)
        cin = cout
    for k, c in enumerate(TAP_CHANNELS):
        shapes[f"lin{k}.weight"] = (1, c, 1, 1)
    return shapes


class VGGLPIPS(nn.Module):
    """VGG16 trunk (avg-pool) + LPIPS heads. state_dict keys = the weights file's keys.
    Parameters are frozen (requires_grad False); gradients flow to the inputs only.
    pool="max": torchvision's own max pools, as taming-transformers' LPIPS
    (taming/modules/losses/lpips.py, the perceptual loss of latent-diffusion's
    autoencoders and so of LDDGAN's); use it with size=None (taming resizes nothing)."""

    def __init__(self, pool="avg"):
        super().__init__()
        layers, cin = [], 3
        for v in CFG:
            if v == "P":
                layers.append(nn.AvgPool2d(kernel_size=2, stride=2) if pool == "avg"
                              else nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
                cin = v
        self.features = nn.Sequential(*layers)
        assert len(self.features) == TAP_INDICES[-1] + 1
        for k, c in enumerate(TAP_CHANNELS):
            setattr(self, f"lin{k}", nn.Conv2d(c, 1, 1, bias=False))
        # not in the state_dict; kept in float64 and cast to the input's dtype
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1),
                             persistent=False)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def heads(self):
        return [getattr(self, f"lin{k}") for k in range(len(TAP_CHANNELS))]

    def transform(self, x, size):
        """T of Cas-DM Eq. 13: resize (if needed), [-1,1] -> [0,1], ImageNet normalisation."""
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x01 = (x + 1) / 2
        return (x01 - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def taps(self, z):
        """Trunk features at relu1_2 .. relu5_3 of an already transformed batch."""
        out = []
        for i, m in enumerate(self.features):
            z = m(z)
            if i in TAP_INDICES:
                out.append(z)
        return out


def unit_normalize(f):
    """f / (sqrt(sum_c f^2) + 1e-10), per pixel (piq's and lpips' normalize_tensor)."""
    return f / (torch.sqrt(torch.sum(f * f, dim=1, keepdim=True)) + EPS)


def tap_distances(model, x, y, size):
    """Per-tap contributions, shape (N, 5); their row sum is the LPIPS distance.
    x: prediction (gradients flow), y: target (computed under no_grad)."""
    fx = model.taps(model.transform(x, size))
    with torch.no_grad():
        fy = model.taps(model.transform(y, size))
    cols = []
    for f0, f1, lin in zip(fx, fy, model.heads()):
        d = (unit_normalize(f0) - unit_normalize(f1)) ** 2
        cols.append(F.conv2d(d, lin.weight).mean(dim=(2, 3))[:, 0])
    return torch.stack(cols, dim=1)


def distance(model, x, y, size):
    """LPIPS distance per image, shape (N,). The training loss is distance(...).mean()."""
    return tap_distances(model, x, y, size).sum(dim=1)


def check_state(sd):
    """Raises ValueError unless sd (name -> tensor/array) has exactly the expected keys
    and shapes."""
    exp = expected_shapes()
    missing = [k for k in exp if k not in sd]
    extra = [k for k in sd if k not in exp]
    if missing or extra:
        raise ValueError(f"weights: missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
                         f"unexpected {extra[:6]}{'...' if len(extra) > 6 else ''}")
    for k, shp in exp.items():
        if tuple(sd[k].shape) != shp:
            raise ValueError(f"weights: {k} has shape {tuple(sd[k].shape)}, expected {shp}")


def load(path):
    """Loads a casdm-lpips-vgg16-1 safetensors file into a float32 VGGLPIPS (eval, frozen)."""
    tensors, meta = st.load(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: metadata format {meta.get('format')!r}, expected {FORMAT!r}")
    check_state(tensors)
    model = VGGLPIPS()
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in tensors.items()}, strict=True)
    return model


def save(model, path, metadata):
    """Writes model's state_dict as a casdm-lpips-vgg16-1 file, atomically (tmp + rename)."""
    sd = model.state_dict()
    check_state(sd)
    meta = {"format": FORMAT}
    meta.update(metadata or {})
    meta["format"] = FORMAT
    st.atomic(path, lambda tmp: st.save(tmp, sd, meta))


# ---------------------------------------------------------------------------
# Deterministic test weights C can regenerate
# ---------------------------------------------------------------------------
# the hash and constants of casdm_ref's U-Net test weights, shared
from casdm_ref import FNV_OFFSET, FNV_PRIME, GOLDEN, MASK64, fnv1a64  # noqa: E402,F401


# "splitmix64" is the definition in use (tests/test_unet.c regenerates it). Measured (tools/make_lpips_goldens.py
# inputs, white noise in [-1,1]): the Weyl sequence h + i*GOLDEN is low-discrepancy, so
# its weights nearly cancel on correlated inputs and the trunk loses its signal (tap rms
# 1.1, 0.10, 0.0072, 0.0045, 0.0045): relu4_3/relu5_3 become bias-dominated and equal
# for x and y (taps ~2e-3 and ~6e-7). "splitmix64" (z = h + (i+1)*GOLDEN through the
# splitmix64 finaliser, then >> 40) keeps the scale (rms 1.3 .. 0.084) and every tap
# contributes, so deep-layer bugs show in the goldens.
TEST_INIT_MIX = "splitmix64"


def _mix_bits(h, i, mix):
    """24-bit u for hash h (python int) and element indices i (uint64 array)."""
    with np.errstate(over="ignore"):                         # uint64 arithmetic wraps mod 2^64
        if mix == "weyl":
            return (np.uint64(h) + i * np.uint64(GOLDEN)) >> np.uint64(40)
        if mix == "splitmix64":
            z = np.uint64(h) + (i + np.uint64(1)) * np.uint64(GOLDEN)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            z = z ^ (z >> np.uint64(31))
            return z >> np.uint64(40)
    raise ValueError(mix)


def lpips_test_values(full_name, shape, mix=None):
    """float32 values of lpips_test_init for the tensor `full_name` ("vgg." + key).

    h = fnv1a64(full_name); flat element i: u = ((h + i*0x9E3779B97F4A7C15) mod 2^64) >> 40,
    base = (u/2^24 - 0.5)*2 in [-1, 1), float64. Conv weights (4-D, 3x3):
    base*sqrt(6/fan_in), fan_in = in*3*3 (He-uniform); biases: 0.01*base; lin heads
    ("vgg.lin<k>.weight"): |base|. Cast float64 -> float32.
    (mix="splitmix64" replaces u, see TEST_INIT_MIX.)

    Hand-checked (python ints, asserted by _check_test_init):
      fnv1a64("vgg.features.0.weight") = 0xc792b470972bce0c; element 0: u = 13079220,
      base = 0.5591645240783691, value base*sqrt(6/27) -> f32 0.2635926902294159
    """
    n = int(np.prod(shape))
    i = np.arange(n, dtype=np.uint64)
    u = _mix_bits(fnv1a64(full_name), i, mix or TEST_INIT_MIX)
    base = (u.astype(np.float64) / float(1 << 24) - 0.5) * 2.0
    key = full_name[len("vgg."):]
    if key.startswith("lin"):
        val = np.abs(base)
    elif key.endswith(".bias"):
        val = 0.01 * base
    else:
        fan_in = shape[1] * shape[2] * shape[3]
        val = base * math.sqrt(6.0 / fan_in)
    return val.astype(np.float32).reshape(shape)


def lpips_test_init(model, mix=None):
    """Overwrites every parameter of model with lpips_test_values("vgg." + key)."""
    with torch.no_grad():
        for key, p in model.state_dict().items():
            v = lpips_test_values("vgg." + key, tuple(p.shape), mix)
            p.copy_(torch.from_numpy(v))
    return model


def _check_test_init():
    """Recomputes a few lpips_test_values elements with plain python ints."""
    def slow(name, i, mix="weyl"):
        z = (fnv1a64(name) + (i + (mix == "splitmix64")) * GOLDEN) & MASK64
        if mix == "splitmix64":
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
            z ^= z >> 31
        return ((z >> 40) / 2.0 ** 24 - 0.5) * 2.0

    n = "vgg.features.0.weight"
    assert fnv1a64(n) == 0xc792b470972bce0c
    v = lpips_test_values(n, (64, 3, 3, 3), "weyl").reshape(-1)
    for i in (0, 1, 1000, 1727):
        assert v[i] == np.float32(slow(n, i) * math.sqrt(6.0 / 27)), (n, i)
    assert v[0] == np.float32(0.2635926902294159)
    n = "vgg.features.28.weight"
    v = lpips_test_values(n, (512, 512, 3, 3), "weyl").reshape(-1)
    for i in (0, 123456, 512 * 512 * 9 - 1):
        assert v[i] == np.float32(slow(n, i) * math.sqrt(6.0 / 4608)), (n, i)
    n = "vgg.features.14.bias"
    v = lpips_test_values(n, (256,), "weyl")
    assert v[7] == np.float32(0.01 * slow(n, 7))
    n = "vgg.lin4.weight"
    v = lpips_test_values(n, (1, 512, 1, 1), "weyl").reshape(-1)
    for i in (0, 511):
        assert v[i] == np.float32(abs(slow(n, i))), (n, i)
    n = "vgg.features.26.weight"
    v = lpips_test_values(n, (512, 512, 3, 3), "splitmix64").reshape(-1)
    for i in (0, 99999):
        assert v[i] == np.float32(slow(n, i, "splitmix64") * math.sqrt(6.0 / 4608)), (n, i)
    return True


_check_test_init()


if __name__ == "__main__":
    m = VGGLPIPS()
    trunk = sum(p.numel() for k, p in m.state_dict().items() if k.startswith("features."))
    heads = [tuple(h.weight.shape) for h in m.heads()]
    print(f"VGGLPIPS: trunk params {trunk:,}, heads {heads}, keys {len(m.state_dict())}")
    for n in ("vgg.features.0.weight", "vgg.lin0.weight"):
        print(f"fnv1a64({n!r}) = {fnv1a64(n):#018x}")
