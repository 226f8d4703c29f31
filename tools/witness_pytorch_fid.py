#!/usr/bin/python3
"""Second witness for tools/inception_ref.py: pytorch-fid's own InceptionV3 module on
the same test weights must give the same pool_3, sFID and logit features.

    witness_pytorch_fid.py /path/to/pytorch-fid/src

The path holds the pytorch_fid package (a checkout of mseitzer/pytorch-fid); nothing
of it is copied here. Its fid_inception_v3() downloads FID_WEIGHTS_URL; this script
hands it inception_ref.test_state_dict instead, so no network is needed. Prints the
largest differences (float64 on both sides) and exits non-zero above 1e-10 relative.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import inception_ref as R  # noqa: E402

sys.path.insert(0, sys.argv[1])
import pytorch_fid.inception as PF  # noqa: E402

ours = R.FIDInception()
sd = R.test_state_dict(ours)
ours.load_state_dict(sd)
PF.load_state_dict_from_url = lambda *a, **k: sd  # the weights fid_inception_v3 loads
theirs = PF.InceptionV3(output_blocks=[3]).double().eval()
ours = ours.double().eval()
tap = []
theirs.blocks[2][6].branch1x1.register_forward_hook(lambda m, i, o: tap.append(o))
worst = 0.0
for case, (n, h, w) in {"c32": (2, 32, 32), "c45x37": (1, 45, 37), "c299": (1, 299, 299)}.items():
    x = torch.from_numpy(R.test_images(case, n, h, w)).double()
    pool3, spatial, logits = R.features(ours, x)
    tap.clear()
    with torch.no_grad():
        p = theirs(x)[0].flatten(1)
    s = tap[0][:, :7].permute(0, 2, 3, 1).reshape(n, -1)
    l = p @ sd["fc.weight"].double().t()
    errs = [((a - b).abs().max() / b.abs().max()).item() for a, b in
            ((pool3, p), (spatial, s), (logits, l))]
    worst = max(worst, *errs)
    print("%-7s pool3 %.1e  spatial %.1e  logits %.1e" % (case, *errs))
print("worst %.1e" % worst)
sys.exit(0 if worst <= 1e-10 else 1)
