#!/usr/bin/python3
"""Converts the VGG16 trunk and LPIPS v0.1 heads into casdm's LPIPS weights file.

    convert_lpips.py --vgg vgg16-397923af.pth --lin vgg.pth --out lpips_vgg.safetensors
    convert_lpips.py --vgg torchvision --lin lpips_weights.pt --out lpips_vgg.safetensors
    convert_lpips.py --random-test-init --out lpips_test.safetensors

--vgg  torchvision's ImageNet VGG16 state_dict (https://download.pytorch.org/models/
       vgg16-397923af.pth; keys "features.N.weight/bias", "classifier.*" is ignored).
       Also accepted: a state_dict of vgg16().features alone ("N.weight"), or of a whole
       richzhang lpips.LPIPS(net="vgg") model ("net.sliceK.N.weight"; torchvision's
       indices are kept). "--vgg torchvision" builds
       torchvision.models.vgg16(weights=IMAGENET1K_V1): torchvision then reads
       $TORCH_HOME/hub/checkpoints/vgg16-397923af.pth (default ~/.cache/torch/...) and
       downloads it if absent, which needs network access.
--lin  LPIPS v0.1 linear heads, either
       - richzhang/PerceptualSimilarity lpips/weights/v0.1/vgg.pth (also inside the
         `lpips` Python package): a state_dict with "lin0.model.1.weight" ..
         "lin4.model.1.weight", shape (1,C,1,1) (".model.0." when saved without dropout;
         a whole lpips.LPIPS state_dict works too), or
       - piq's release file lpips_weights.pt
         (github.com/photosynthesis-team/photosynthesis.metrics/releases/download/v0.4.0/):
         piq passes what torch.load returns straight on as its list of per-layer
         weights, iterating over it and multiplying each element into the (N,C,H,W)
         squared feature difference before a spatial mean. So it is a sequence of 5
         tensors, relu1_2..relu5_3, each with C_k values broadcasting per channel,
         i.e. (1,C,1,1) (or (C,1,1)).
       Either way the heads are stored as lin<k>.weight (1,C_k,1,1).
--random-test-init  writes lpips_ref.lpips_test_init weights instead (tests, benchmarks).

The file is written atomically (tmp + rename) in casdm's safetensors F32 layout with
metadata format "casdm-lpips-vgg16-1" (see tools/lpips_ref.py for the definition).
Needs Debian's python3-torch and python3-numpy; torchvision only for "--vgg torchvision".
"""
import argparse
import hashlib
import importlib.util
import os
import re
import sys
from collections.abc import Mapping, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lpips_ref as L  # noqa: E402


class ConvertError(Exception):
    pass


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for blk in iter(lambda: f.read(1 << 20), b""):
            h.update(blk)
    return h.hexdigest()


def torch_load(path):
    try:
        return torch.load(path, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - report any unpickling failure plainly
        raise ConvertError(f"{path}: cannot torch.load: {e}") from e


def as_state_dict(obj, path):
    """A name -> tensor mapping from what torch.load returned."""
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        for k in ("state_dict", "model"):
            if k in obj and isinstance(obj[k], Mapping):
                return obj[k]
        return obj
    raise ConvertError(f"{path}: expected a state_dict, got {type(obj).__name__}")


def strip_module(k):
    return k[len("module."):] if k.startswith("module.") else k


# ---------------------------------------------------------------------------
# VGG16 trunk
# ---------------------------------------------------------------------------
_TRUNK_KEY = re.compile(r"^(?:features\.|net\.slice\d+\.)?(\d+)\.(weight|bias)$")
_IGNORED = re.compile(r"^(classifier\.|lin\d+\.|scaling_layer\.)")


def vgg_from_state_dict(sd, path):
    out, unknown = {}, []
    for k, v in sd.items():
        k = strip_module(k)
        m = _TRUNK_KEY.match(k)
        if m:
            out[f"features.{int(m.group(1))}.{m.group(2)}"] = torch.as_tensor(v)
        elif not _IGNORED.match(k):
            unknown.append(k)
    if unknown:
        hint = " (batch-norm VGG16 is not supported)" if any("running_" in k for k in unknown) else ""
        raise ConvertError(f"{path}: unexpected keys {unknown[:5]}{hint}")
    exp = {k: s for k, s in L.expected_shapes().items() if k.startswith("features.")}
    extra = sorted(set(out) - set(exp), key=lambda k: int(k.split(".")[1]))
    missing = [k for k in exp if k not in out]
    if extra or missing:
        raise ConvertError(f"{path}: not a torchvision VGG16 'features' (configuration D): "
                           f"missing {missing[:4]}, extra {extra[:4]}")
    for k, shp in exp.items():
        if tuple(out[k].shape) != shp:
            raise ConvertError(f"{path}: {k} has shape {tuple(out[k].shape)}, expected {shp}")
    return out


def load_vgg(arg):
    """Returns (dict features.* -> tensor, source description, sha256 or '')."""
    if arg == "torchvision":
        try:
            import torchvision
            from torchvision.models import vgg16
        except ImportError as e:
            raise ConvertError("--vgg torchvision: torchvision is not importable "
                               "(Debian: apt-get install python3-torchvision)") from e
        try:
            try:
                from torchvision.models import VGG16_Weights
                model = vgg16(weights=VGG16_Weights.IMAGENET1K_V1)
            except ImportError:                     # torchvision < 0.13
                model = vgg16(pretrained=True)
        except Exception as e:  # noqa: BLE001 - typically no network / no cached file
            hub = os.path.join(torch.hub.get_dir(), "checkpoints", "vgg16-397923af.pth")
            raise ConvertError(f"--vgg torchvision: could not get the ImageNet weights ({e}); "
                               f"put vgg16-397923af.pth at {hub} or pass --vgg <path>") from e
        sd = {"features." + k: v for k, v in model.features.state_dict().items()}
        return (vgg_from_state_dict(sd, "torchvision"),
                f"torchvision {torchvision.__version__} vgg16 IMAGENET1K_V1", "")
    if not os.path.isfile(arg):
        raise ConvertError(f"--vgg {arg}: no such file")
    sd = as_state_dict(torch_load(arg), arg)
    return vgg_from_state_dict(sd, arg), os.path.basename(arg), sha256(arg)


# ---------------------------------------------------------------------------
# LPIPS heads
# ---------------------------------------------------------------------------
_LIN_KEY = re.compile(r"^lin(\d)\.(?:model\.\d\.)?weight$")


def _head(v, k, where):
    c = L.TAP_CHANNELS[k]
    t = torch.as_tensor(v).detach().float()
    if t.numel() != c or (t.dim() > 0 and max(t.shape) != c):
        raise ConvertError(f"{where}: head {k} ({L.TAP_NAMES[k]}) has shape {tuple(t.shape)}, "
                           f"expected {c} values as (1,{c},1,1)")
    return t.reshape(1, c, 1, 1).clone()


def load_lin(path):
    """Returns (dict lin<k>.weight -> (1,C,1,1), format name)."""
    if not os.path.isfile(path):
        raise ConvertError(f"--lin {path}: no such file")
    obj = torch_load(path)
    if isinstance(obj, (Mapping, torch.nn.Module)):
        sd = as_state_dict(obj, path)
        heads = {}
        for k, v in sd.items():
            m = _LIN_KEY.match(strip_module(k))
            if m:
                idx = int(m.group(1))
                if idx >= len(L.TAP_CHANNELS) or idx in heads:
                    raise ConvertError(f"{path}: unexpected head key {k}")
                heads[idx] = _head(v, idx, f"{path}:{k}")
        if sorted(heads) != list(range(len(L.TAP_CHANNELS))):
            shapes = {k: tuple(getattr(v, "shape", ())) for k, v in list(sd.items())[:8]}
            raise ConvertError(f"{path}: expected lin0..lin4 weights "
                               f"('lin<k>.model.1.weight'), found {shapes}")
        fmt = "richzhang lpips v0.1 state_dict (lin<k>.model.N.weight)"
    elif isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        if len(obj) != len(L.TAP_CHANNELS):
            raise ConvertError(f"{path}: piq-style list with {len(obj)} entries, expected 5")
        heads = {k: _head(v, k, f"{path}[{k}]") for k, v in enumerate(obj)}
        fmt = "piq lpips_weights.pt (list of 5 per-channel weight tensors)"
    else:
        raise ConvertError(f"{path}: unrecognised LPIPS head file ({type(obj).__name__})")
    return {f"lin{k}.weight": heads[k] for k in range(len(L.TAP_CHANNELS))}, fmt


# ---------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description="Write casdm's VGG16-LPIPS weights file "
                                 "(format casdm-lpips-vgg16-1).")
    ap.add_argument("--vgg", help="torchvision VGG16 state_dict (.pth), or 'torchvision'")
    ap.add_argument("--lin", help="LPIPS v0.1 heads: lpips vgg.pth or piq lpips_weights.pt")
    ap.add_argument("--out", required=True, help="output .safetensors")
    ap.add_argument("--random-test-init", action="store_true",
                    help="write the deterministic lpips_test_init weights instead")
    a = ap.parse_args(argv)

    try:
        model = L.VGGLPIPS()
        if a.random_test_init:
            if a.vgg or a.lin:
                raise ConvertError("--random-test-init takes no --vgg/--lin")
            L.lpips_test_init(model)
            meta = {"init": f"lpips_test_init ({L.TEST_INIT_MIX})",
                    "vgg_source": "none (test init)", "lin_source": "none (test init)"}
            what = f"lpips_test_init weights ({L.TEST_INIT_MIX})"
        else:
            if not a.vgg or not a.lin:
                tv = " (or --vgg torchvision)" if importlib.util.find_spec("torchvision") else ""
                raise ConvertError(f"need --vgg <vgg16 .pth>{tv} and --lin <heads>, "
                                   "or --random-test-init")
            vgg, vsrc, vsha = load_vgg(a.vgg)
            lin, lfmt = load_lin(a.lin)
            model.load_state_dict({**vgg, **lin}, strict=True)
            neg = sum(int((t < 0).sum()) for t in lin.values())
            meta = {"vgg_source": vsrc, "lin_source": os.path.basename(a.lin), "lin_format": lfmt,
                    "lin_sha256": sha256(a.lin)}
            if vsha:
                meta["vgg_sha256"] = vsha
            what = f"vgg {vsrc} + heads {os.path.basename(a.lin)} [{lfmt}]"
            if neg:
                what += f"; WARNING {neg} negative head weights (trained LPIPS v0.1 heads are >= 0)"
        meta.update({"producer": "tools/convert_lpips.py",
                     "definition": "VGG16 features to relu5_3, MaxPool->AvgPool(2,2); taps 3,8,15,22,29; "
                                   "input (x+1)/2 then ImageNet mean/std; unit-normalise (eps 1e-10); "
                                   "squared diff; 1x1 lin<k> no bias; spatial mean; sum"})
        L.save(model, a.out, meta)
    except ConvertError as e:
        print(f"convert_lpips: error: {e}", file=sys.stderr)
        return 1
    n = sum(t.numel() for t in model.state_dict().values())
    print(f"wrote {a.out}: {what}; {len(model.state_dict())} tensors, {n:,} params, "
          f"{os.path.getsize(a.out):,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
