#!/usr/bin/python3
"""Writes tests/goldens/lpips.safetensors: the VGG16-LPIPS (avg-pool) distance of
tools/lpips_ref.py and its gradient with respect to the prediction, for the C tests.

Model: lpips_test_init weights (regenerable in C from the key names, see
lpips_ref.lpips_test_values), evaluated in float64 (the float32 weights are exact in
float64; the float32 inputs are promoted). torch.manual_seed(2);
x = rand(2,3,32,32)*2-1 (prediction), y = rand(2,3,32,32)*2-1 (target), both float32.

Keys, for size in 32 (no resize), 64 (bilinear up 32->64), 16 (bilinear down 32->16):
  s<size>/distance  (2,)         LPIPS distance per image
  s<size>/grad_x    (2,3,32,32)  d(sum of the two distances)/dx
  s<size>/taps      (2,5)        per-tap contributions (relu1_2..relu5_3), rows sum to distance
and x, y (2,3,32,32). Run from the repository root:
    /usr/bin/python3 tools/make_lpips_goldens.py
Not needed by the build or CI: the output file is committed.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lpips_ref as L  # noqa: E402
import st  # noqa: E402

torch.set_num_threads(1)
torch.manual_seed(2)
x32 = torch.rand(2, 3, 32, 32) * 2 - 1
y32 = torch.rand(2, 3, 32, 32) * 2 - 1

model = L.lpips_test_init(L.VGGLPIPS()).double()
G = {"x": x32, "y": y32}
SIZES = (32, 64, 16)

for size in SIZES:
    x = x32.double().requires_grad_(True)
    y = y32.double()
    taps = L.tap_distances(model, x, y, size)
    d = taps.sum(dim=1)
    (g,) = torch.autograd.grad(d.sum(), x)
    assert torch.isfinite(g).all() and torch.isfinite(d).all()

    # cross-check with the piq-style form: lpips' [-1,1] shift/scale normalisation
    # (shift = 2*mean-1, scale = 2*std exactly), per-channel weights
    # times the squared difference, spatial mean, then a sum over channels and taps.
    with torch.no_grad():
        def feats(v):
            if size != 32:
                v = torch.nn.functional.interpolate(v, size=(size, size), mode="bilinear",
                                                    align_corners=False)
            v = (v - v.new_tensor(L.LPIPS_SHIFT).view(1, 3, 1, 1)) / v.new_tensor(L.LPIPS_SCALE).view(1, 3, 1, 1)
            return model.taps(v)
        alt = 0
        for f0, f1, lin in zip(feats(x), feats(y), model.heads()):
            dd = (L.unit_normalize(f0) - L.unit_normalize(f1)) ** 2
            alt = alt + (dd * lin.weight).mean(dim=(2, 3)).sum(dim=1)
        rel = ((alt - d).abs() / d.abs()).max().item()
        assert rel < 1e-12, rel

    G[f"s{size}/distance"] = d.detach()
    G[f"s{size}/grad_x"] = g
    G[f"s{size}/taps"] = taps.detach()
    print(f"size {size:3d}: distance {d.tolist()}  |grad_x|max {g.abs().max().item():.4e}  "
          f"piq-style (lpips shift/scale) rel diff {rel:.2e}")
    print("          taps " + "  ".join(f"[{', '.join(f'{v:.6f}' for v in row)}]" for row in taps.tolist()))

# taming's LPIPS (max pools, no resize), the same weights and images: max/s32/*
model_max = L.lpips_test_init(L.VGGLPIPS(pool="max")).double()
x = x32.double().requires_grad_(True)
taps = L.tap_distances(model_max, x, y32.double(), None)
d = taps.sum(dim=1)
(g,) = torch.autograd.grad(d.sum(), x)
G["max/s32/distance"] = d.detach()
G["max/s32/grad_x"] = g
G["max/s32/taps"] = taps.detach()
print(f"max pools: distance {d.tolist()}  |grad_x|max {g.abs().max().item():.4e}")

meta = {
    "producer": "tools/make_lpips_goldens.py",
    "max": "max/s32/*: taming-transformers' variant, MaxPool2d(2, 2) as torchvision's vgg16, no resize",
    "torch": torch.__version__,
    "weights": "lpips_ref.lpips_test_init (names 'vgg.'+key, FNV-1a 64 hash; conv w base*sqrt(6/fan_in), "
               "bias 0.01*base, lin |base|)",
    "definition": "T: bilinear resize to (size,size) if needed (align_corners=False, no antialias), "
                  "(x+1)/2, ImageNet mean/std; VGG16 features to relu5_3 with AvgPool2d(2,2) for MaxPool; "
                  "taps relu1_2,relu2_2,relu3_3,relu4_3,relu5_3 (features 3,8,15,22,29); "
                  "f/(sqrt(sum_c f^2)+1e-10); squared diff; 1x1 conv lin<k>, no bias; spatial mean; sum over taps",
    "precision": "float64 compute, stored F32; inputs are float32 values",
    "inputs": "torch.manual_seed(2); x=rand(2,3,32,32)*2-1 (prediction); y=rand(2,3,32,32)*2-1 (target)",
    "sizes": ",".join(str(s) for s in SIZES),
    "grad_x": "d(sum over batch of distance)/dx; y under no_grad",
}
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "goldens", "lpips.safetensors")
out = os.path.normpath(out)
st.save(out, G, meta)
print(f"wrote {out}: {len(G)} tensors, {os.path.getsize(out):,} bytes")
