#!/usr/bin/python3
"""Converts latent-diffusion / LDDGAN KL-autoencoder checkpoints to casdm's weights
file, and back.

    convert_autoencoder.py --ckpt 16x16x4_551.ckpt --config cifar10_16x16x4.yaml \\
        --out ae.safetensors [--scale-factor 105]
    convert_autoencoder.py --to-torch ae.safetensors --out ae_state_dict.pt

--ckpt    a PyTorch Lightning checkpoint of ldm.models.autoencoder.AutoencoderKL (its
          "state_dict"), or a bare state_dict. LDDGAN's CIFAR-10 autoencoder is
          16x16x4_551.ckpt (thanhluantrinh/LDDGAN README: the pretrained autoencoders'
          download link; its test_ldgan.py loads it strictly). encoder.*, decoder.*,
          quant_conv.* and post_quant_conv.* are kept; loss.* (LPIPS, the
          discriminator, logvar) is left aside.
--config  the model's YAML (model.params.ddconfig and model.params.embed_dim), e.g.
          LDDGAN's autoencoder/config/cifar10_16x16x4.yaml; or --preset cifar10 for it.
--scale-factor  the constant LDDGAN divides latents by (--scale_factor 105 for CIFAR-10
          in its run.sh), stored in the metadata.
--to-torch  the other way: a casdm autoencoder file to a state_dict (.pt) that
          AutoencoderKL loads with load_state_dict(sd, strict=False) (strict apart
          from the loss's keys) or tools/ae_ref.AutoencoderKL with strict=True. From a
          casdm train-ae checkpoint, loss.discriminator.* (with num_batches_tracked)
          and loss.logvar come along, so the PatchGAN loads into
          LPIPSWithDiscriminator too; Adam's moments (adam_m.*, adam_v.*) stay behind.

The file is checked by loading it strictly into tools/ae_ref.AutoencoderKL before it
is written; written atomically (tmp + rename), safetensors F32, metadata format
"casdm-autoencoder-1" with the configuration (what lddgan.c's ae_load reads).
Needs Debian's python3-torch, python3-numpy and (for --config) python3-yaml.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ae_ref as A  # noqa: E402
import st  # noqa: E402

FORMAT = "casdm-autoencoder-1"
KEPT = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def config_from_yaml(path):
    import yaml
    with open(path) as f:
        y = yaml.safe_load(f)
    p = y["model"]["params"]
    dd = p["ddconfig"]
    if not dd.get("double_z", True):
        raise SystemExit(f"{path}: double_z false is not an AutoencoderKL")
    return dict(resolution=int(dd["resolution"]), in_channels=int(dd["in_channels"]),
                out_ch=int(dd["out_ch"]), ch=int(dd["ch"]), ch_mult=tuple(dd["ch_mult"]),
                num_res_blocks=int(dd["num_res_blocks"]),
                attn_resolutions=tuple(dd.get("attn_resolutions", [])),
                z_channels=int(dd["z_channels"]), embed_dim=int(p["embed_dim"]),
                dropout=float(dd.get("dropout", 0.0)), tanh_out=bool(dd.get("tanh_out", False)))


def metadata(cfg, extra):
    m = {"format": FORMAT, "resolution": cfg["resolution"], "in_channels": cfg["in_channels"],
         "out_ch": cfg["out_ch"], "ch": cfg["ch"], "ch_mult": ",".join(map(str, cfg["ch_mult"])),
         "num_res_blocks": cfg["num_res_blocks"],
         "attn_resolutions": ",".join(map(str, cfg["attn_resolutions"])),
         "z_channels": cfg["z_channels"], "embed_dim": cfg["embed_dim"], "double_z": 1,
         "tanh_out": int(bool(cfg["tanh_out"])), "dropout": repr(float(cfg["dropout"]))}
    m.update(extra)
    return {k: str(v) for k, v in m.items()}


def config_from_metadata(meta):
    if meta.get("format") != FORMAT:
        raise SystemExit(f"metadata format {meta.get('format')!r}, want {FORMAT!r}")
    ints = lambda s: tuple(int(v) for v in s.split(",") if v)  # noqa: E731
    return dict(resolution=int(meta["resolution"]), in_channels=int(meta["in_channels"]),
                out_ch=int(meta["out_ch"]), ch=int(meta["ch"]), ch_mult=ints(meta["ch_mult"]),
                num_res_blocks=int(meta["num_res_blocks"]),
                attn_resolutions=ints(meta["attn_resolutions"]),
                z_channels=int(meta["z_channels"]), embed_dim=int(meta["embed_dim"]),
                dropout=float(meta.get("dropout", 0.0)), tanh_out=meta["tanh_out"] == "1")


DISC = "loss.discriminator."


def disc_state(disc, meta):
    """casdm train-ae's discriminator tensors as torch's NLayerDiscriminator state_dict
    under loss.discriminator.*: checked by a strict load into ae_ref's (ndf and layers
    from the metadata), with BatchNorm's num_batches_tracked (int64 in torch; the
    metadata's disc_batches_tracked) added."""
    ndf, layers = int(meta["disc_ndf"]), int(meta["disc_layers"])
    c_in = int(meta["in_channels"])
    d = A.NLayerDiscriminator(c_in, ndf, layers)
    sd = {k[len(DISC):]: torch.from_numpy(v.copy()) for k, v in disc.items()}
    nbt = torch.tensor(int(meta.get("disc_batches_tracked", "0")), dtype=torch.long)
    for k in d.state_dict():
        if k.endswith("num_batches_tracked"):
            sd[k] = nbt.clone()
    d.load_state_dict(sd, strict=True)
    return {DISC + k: v for k, v in d.state_dict().items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt")
    ap.add_argument("--config")
    ap.add_argument("--preset", choices=["cifar10"])
    ap.add_argument("--scale-factor", type=float)
    ap.add_argument("--to-torch")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.to_torch:
        tensors, meta = st.load(a.to_torch)
        cfg = config_from_metadata(meta)
        model = A.AutoencoderKL(cfg)
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in tensors.items()
                               if k.startswith(KEPT)}, strict=True)
        sd = model.state_dict()
        disc = {k: v for k, v in tensors.items() if k.startswith(DISC)}
        if disc:  # a casdm train-ae checkpoint: its discriminator too, as LPIPSWithDiscriminator holds it
            sd.update(disc_state(disc, meta))
            sd["loss.logvar"] = torch.tensor(float(meta.get("logvar", "0")))
        st.atomic(a.out, lambda p: torch.save(sd, p))
        print(f"wrote {a.out}: {len(sd)} tensors (AutoencoderKL keys"
              + (", loss.discriminator.* and loss.logvar)" if disc else ", no loss.*)"))
        return
    if not a.ckpt or not (a.config or a.preset):
        ap.error("--ckpt and --config (or --preset) are needed")
    cfg = config_from_yaml(a.config) if a.config else A.CIFAR10
    ck = torch.load(a.ckpt, map_location="cpu")
    sd = ck.get("state_dict", ck) if isinstance(ck, dict) else ck
    kept = {k: v.float() for k, v in sd.items() if k.startswith(KEPT)}
    model = A.AutoencoderKL(cfg)
    model.load_state_dict(kept, strict=True)  # names and shapes, before writing
    extra = {"producer": "tools/convert_autoencoder.py", "source": os.path.basename(a.ckpt)}
    if a.scale_factor:
        extra["scale_factor"] = repr(a.scale_factor)
    st.atomic(a.out, lambda p: st.save(p, model.state_dict(), metadata(cfg, extra)))
    left = sorted({k.split(".")[0] + "." + k.split(".")[1] for k in sd if not k.startswith(KEPT)})
    print(f"wrote {a.out}: {len(kept)} tensors, {sum(v.numel() for v in kept.values()):,} parameters"
          + (f"; left aside: {', '.join(left)}" if left else ""))


if __name__ == "__main__":
    main()
