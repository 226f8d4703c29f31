#!/usr/bin/python3
"""Second witness for tools/lpips_ref.py's max-pool variant: taming-transformers'
own LPIPS module (taming/modules/losses/lpips.py, the perceptual loss of
latent-diffusion's and LDDGAN's autoencoders) on the same test weights and images
must give the same distances and input gradient.

    witness_taming_lpips.py /path/to/taming-transformers

The path holds the taming package (a checkout of CompVis/taming-transformers);
nothing of it is copied here. Its LPIPS downloads torchvision's VGG16 and vgg.pth;
this script builds the module without either (taming.util is stubbed: it imports
requests and tqdm for the download only) and loads lpips_ref.lpips_test_init's
weights into it under taming's names (net.slice<k>.<i>, lin<k>.model.1). The
module is put in eval mode (its heads' Dropout off, as our LPIPS). Prints the
largest differences (float64 on both sides) and exits non-zero above 1e-10 relative.
"""
import os
import sys
import types

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lpips_ref as L  # noqa: E402

stub = types.ModuleType("taming.util")
stub.get_ckpt_path = lambda *a, **k: None
sys.path.insert(0, sys.argv[1])
import taming  # noqa: E402
sys.modules["taming.util"] = stub
_vgg16 = torchvision.models.vgg16
torchvision.models.vgg16 = lambda *a, **k: _vgg16(weights=None)  # no download
import taming.modules.losses.lpips as T  # noqa: E402
T.models.vgg16 = torchvision.models.vgg16
T.LPIPS.load_from_pretrained = lambda self, name="vgg_lpips": None

ours = L.lpips_test_init(L.VGGLPIPS(pool="max")).double()
theirs = T.LPIPS().double().eval()
# taming's slices: features [0,4) [4,9) [9,16) [16,23) [23,30), the same indices
bounds = (0, 4, 9, 16, 23, 30)
sd = {}
for key, v in ours.state_dict().items():
    if key.startswith("features."):
        idx, what = key.split(".")[1:]
        k = next(j for j in range(5) if bounds[j] <= int(idx) < bounds[j + 1])
        sd[f"net.slice{k + 1}.{idx}.{what}"] = v
    else:
        sd[key.replace(".weight", ".model.1.weight")] = v
# taming's ScalingLayer buffers hold its constants rounded to float32; in float64
# that alone moves the gradient by ~1e-7 relative, so they get the float64 values
# (lpips_ref: the same map as the ImageNet normalisation, to 8.9e-16)
sd["scaling_layer.shift"] = torch.tensor(L.LPIPS_SHIFT, dtype=torch.float64).view(1, 3, 1, 1)
sd["scaling_layer.scale"] = torch.tensor(L.LPIPS_SCALE, dtype=torch.float64).view(1, 3, 1, 1)
theirs.load_state_dict(sd, strict=True)

torch.manual_seed(2)  # the inputs of tools/make_lpips_goldens.py
x32 = torch.rand(2, 3, 32, 32) * 2 - 1
y32 = torch.rand(2, 3, 32, 32) * 2 - 1
worst = 0.0
for shape in ((2, 3, 32, 32), (1, 3, 48, 40)):
    if shape[2] == 32:
        x, y = x32.double(), y32.double()
    else:
        x, y = torch.rand(*shape).double() * 2 - 1, torch.rand(*shape).double() * 2 - 1
    xa = x.clone().requires_grad_(True)
    d_ours = L.distance(ours, xa, y, None)
    (g_ours,) = torch.autograd.grad(d_ours.sum(), xa)
    xb = x.clone().requires_grad_(True)
    d_theirs = theirs(xb, y).flatten()
    (g_theirs,) = torch.autograd.grad(d_theirs.sum(), xb)
    ed = ((d_ours - d_theirs).abs() / d_theirs.abs()).max().item()
    eg = ((g_ours - g_theirs).abs().max() / g_theirs.abs().max()).item()
    print(f"{tuple(shape)}: distance {d_theirs.tolist()}  rel diff {ed:.2e}, gradient {eg:.2e}")
    worst = max(worst, ed, eg)
print("agree" if worst <= 1e-10 else "DISAGREE", f"(worst {worst:.2e})")
sys.exit(0 if worst <= 1e-10 else 1)
