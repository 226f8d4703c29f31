#!/usr/bin/python3
"""Converts pytorch-fid's Inception-v3 FID weights into casdm's weights file.

    convert_inception.py --pth pt_inception-2015-12-05-6726825d.pth --out inception.safetensors
    convert_inception.py --random-test-init --out inception_test.safetensors

--pth  the state_dict pytorch-fid downloads for its FID model (FID_WEIGHTS_URL in
       mseitzer/pytorch-fid src/pytorch_fid/inception.py:
       https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/
       pt_inception-2015-12-05-6726825d.pth, 95 MB; TensorFlow's 2015-12-05 Inception
       graph ported to PyTorch, the network of TTUR's and guided-diffusion's FID). Its
       keys are fid_inception_v3()'s: "<unit>.conv.weight", "<unit>.bn.{weight,bias,
       running_mean,running_var}" for the 94 BasicConv2d units, "fc.weight" (1008, 2048)
       and "fc.bias"; "num_batches_tracked" and the aux classifier, if present, are
       dropped. The file is checked by loading it strictly into tools/inception_ref.py's
       FIDInception before anything is written.
--random-test-init  the test weights of inception_ref.test_values instead (what
       tests/test_fid.c regenerates in C), for tests and benchmarks.

The tensors keep their names and shapes (casdm folds the batch norms when it loads);
written atomically (tmp + rename) as safetensors F32 with metadata format
"casdm-inception-fid-1". Needs Debian's python3-torch and python3-numpy.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import inception_ref as R  # noqa: E402
import st  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--pth", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
    src.add_argument("--random-test-init", action="store_true")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    model = R.FIDInception()
    if a.random_test_init:
        sd = R.test_state_dict(model)
    else:
        sd = torch.load(a.pth, map_location="cpu")
        if isinstance(sd, dict) and "state_dict" in sd:
            sd = sd["state_dict"]
    sd = {k: v for k, v in sd.items()
          if not k.endswith("num_batches_tracked") and not k.startswith("AuxLogits.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        sys.exit("convert_inception.py: %s does not have fid_inception_v3's layout: missing %s, "
                 "unexpected %s" % (a.pth, missing[:5], unexpected[:5]))
    tensors = {k: v.float() for k, v in sd.items()}
    tmp = a.out + ".tmp"
    st.save(tmp, tensors, {"format": "casdm-inception-fid-1",
                           "source": "random-test-init" if a.random_test_init
                           else os.path.basename(a.pth)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, a.out)
    print("wrote %s: %d tensors, %.1f M parameters" %
          (a.out, len(tensors), sum(v.numel() for v in tensors.values()) / 1e6))


if __name__ == "__main__":
    main()
