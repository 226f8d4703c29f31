#!/usr/bin/python3
"""Converts LDDGAN / DDGAN generator checkpoints (netG_*.pth) to casdm's GAN weights file,
and back.

    convert_ddgan.py --ckpt netG_950.pth --out lddgan_cifar10.safetensors [--model lddgan]
        [--scale-factor 105] [architecture flags: the official argparse names]
    convert_ddgan.py --to-torch ckpt.safetensors --out netG.pth [--netD netD.pth] [--raw]

--ckpt    a state_dict of score_sde's NCSNpp as train_ldgan.py / train_ddgan.py save it:
          netG_{epoch}.pth holds the EMA weights with DistributedDataParallel's 'module.'
          prefix on every key (test_ldgan.py strips it: key[7:]); the prefix is dropped
          here. LDDGAN's released CIFAR-10 generator is netG_950.pth (thanhluantrinh/LDDGAN
          README, its pretrained-checkpoint link), trained with run.sh's settings, which
          are the defaults below; its autoencoder comes separately (convert_autoencoder.py).
          The file stores no configuration: give the flags the run was trained with.
--model   lddgan (latents; sampling needs --ae and the scale) or ddgan (pixels; the
          defaults become DDGAN's CIFAR-10: 3x32x32, ch_mult 1 2 2 2, attention 16,
          nz 100, 4 discriminator layers).
--to-torch  the other way: from a casdm file (casdm train --model lddgan/ddgan, or this
          tool's output) the generator as a netG state_dict with the 'module.' prefix
          (the EMA weights, netG_*.pth's; --raw for the training weights under netG.),
          and with --netD the discriminator (netD.*) as Discriminator_small's. Both are
          checked by a strict load into tools/lddgan_ref's modules, whose state_dicts
          are the official ones key for key (tools/witness_ncsnpp.py,
          witness_ddgan_disc.py), and load into the official NCSNpp / Discriminator_small
          with strict=True once 'module.' is stripped.
--official LDDGAN  with --to-torch: also load what was written into LDDGAN's own NCSNpp
          (and Discriminator_small) from that checkout, strict=True, as test_ldgan.py
          does after stripping 'module.', and run both generators on one input.

Written atomically (tmp + rename), safetensors F32, metadata format "casdm-ddgan-1" with
the configuration under the official argument names (what lddgan.c's gan_config_read
reads). Needs Debian's python3-torch and python3-numpy.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lddgan_ref as D  # noqa: E402
import st  # noqa: E402

FORMAT = "casdm-ddgan-1"
PRESETS = {  # run.sh (LDDGAN, CIFAR-10) and DDGAN's readme (CIFAR-10)
    "lddgan": dict(num_channels=4, image_size=16, num_channels_dae=128, ch_mult=(1, 2, 2),
                   num_res_blocks=2, attn_resolutions=(32,), nz=50, z_emb_dim=256, n_mlp=4,
                   num_timesteps=4, beta_min=0.1, beta_max=20.0, ngf=64, t_emb_dim=256,
                   num_disc_layers=3),
    "ddgan": dict(num_channels=3, image_size=32, num_channels_dae=128, ch_mult=(1, 2, 2, 2),
                  num_res_blocks=2, attn_resolutions=(16,), nz=100, z_emb_dim=256, n_mlp=4,
                  num_timesteps=4, beta_min=0.1, beta_max=20.0, ngf=64, t_emb_dim=256,
                  num_disc_layers=4),
}
INTS = ("num_channels", "image_size", "num_channels_dae", "num_res_blocks", "nz", "z_emb_dim",
        "n_mlp", "num_timesteps", "ngf", "t_emb_dim", "num_disc_layers")
LISTS = ("ch_mult", "attn_resolutions")


def generator(cfg):
    return D.NCSNpp(channels=cfg["num_channels"], nf=cfg["num_channels_dae"],
                    ch_mult=tuple(cfg["ch_mult"]), num_res_blocks=cfg["num_res_blocks"],
                    nz=cfg["nz"], zdim=cfg["z_emb_dim"], n_mlp=cfg["n_mlp"],
                    attn_resolutions=tuple(cfg["attn_resolutions"]), image_size=cfg["image_size"])


def discriminator(cfg):
    return D.DiscriminatorSmall(2 * cfg["num_channels"], cfg["ngf"], cfg["t_emb_dim"],
                                cfg["num_disc_layers"])


def metadata(cfg, extra):
    m = {"format": FORMAT}
    for k, v in cfg.items():
        m[k] = ",".join(map(str, v)) if k in LISTS else repr(float(v)) if k.startswith("beta") else int(v)
    m.update(extra)
    return {k: str(v) for k, v in m.items()}


def config_from_metadata(meta):
    if meta.get("format") != FORMAT:
        raise SystemExit(f"metadata format {meta.get('format')!r}, want {FORMAT!r}")
    cfg = {k: int(meta[k]) for k in INTS}
    for k in LISTS:
        cfg[k] = tuple(int(v) for v in meta[k].split(",") if v)
    cfg["beta_min"], cfg["beta_max"] = float(meta["beta_min"]), float(meta["beta_max"])
    return cfg


def strict(module, sd, what):
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise SystemExit(f"{what}: not the configured network's state_dict:\n{e}")
    return module.state_dict()


def check_official(a, cfg, dsd):
    """The files just written, loaded as test_ldgan.py loads netG (key[7:], here strict) into
    LDDGAN's own modules; both generators on one input agree."""
    NCSNpp, Discriminator_small, _ = D.import_official(a.official)
    args = argparse.Namespace(num_channels=cfg["num_channels"], image_size=cfg["image_size"],
                              num_channels_dae=cfg["num_channels_dae"], ch_mult=list(cfg["ch_mult"]),
                              num_res_blocks=cfg["num_res_blocks"],
                              attn_resolutions=list(cfg["attn_resolutions"]), nz=cfg["nz"],
                              z_emb_dim=cfg["z_emb_dim"], n_mlp=cfg["n_mlp"], **D.OFFICIAL_FIXED)
    off = NCSNpp(args)
    ckpt = torch.load(a.out, map_location="cpu")
    off.load_state_dict({k[7:]: v for k, v in ckpt.items()}, strict=True)
    ours = generator(cfg)
    ours.load_state_dict({k[7:]: v for k, v in ckpt.items()}, strict=True)
    n, c, s = 3, cfg["num_channels"], cfg["image_size"]
    x, t, z = torch.randn(n, c, s, s), torch.tensor([0, 1, cfg["num_timesteps"] - 1]), torch.randn(n, cfg["nz"])
    with torch.no_grad():
        d = (off(x, t, z) - ours(x, t, z)).abs().max().item()
    print(f"{a.out}: loads into LDDGAN's NCSNpp (strict); outputs differ by {d:.1e}")
    if dsd is not None:
        disc = Discriminator_small(nc=2 * c, ngf=cfg["ngf"], t_emb_dim=cfg["t_emb_dim"],
                                   act=torch.nn.LeakyReLU(0.2), num_layers=cfg["num_disc_layers"])
        disc.load_state_dict({k[7:]: v for k, v in torch.load(a.netD, map_location="cpu").items()},
                             strict=True)
        print(f"{a.netD}: loads into LDDGAN's Discriminator_small (strict)")
    if d > 1e-4:
        raise SystemExit("the official generator's output differs from tools/lddgan_ref.py's")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt")
    ap.add_argument("--to-torch")
    ap.add_argument("--out", required=True)
    ap.add_argument("--netD", help="with --to-torch: also write the discriminator here")
    ap.add_argument("--raw", action="store_true", help="with --to-torch: netG. (not the EMA)")
    ap.add_argument("--official", help="with --to-torch: an LDDGAN checkout to load the result into")
    ap.add_argument("--model", choices=sorted(PRESETS), default="lddgan")
    ap.add_argument("--scale-factor", type=float, help="lddgan: the latent divisor (105)")
    for k in INTS:
        ap.add_argument("--" + k, type=int)
    for k in LISTS:
        ap.add_argument("--" + k, type=int, nargs="*")
    ap.add_argument("--beta_min", type=float)
    ap.add_argument("--beta_max", type=float)
    a = ap.parse_args()
    if a.to_torch:
        tensors, meta = st.load(a.to_torch)
        cfg = config_from_metadata(meta)
        pre = "netG." if a.raw else ""
        if a.raw and not any(k.startswith("netG.") for k in tensors):
            raise SystemExit(f"{a.to_torch}: no netG.* (only checkpoints of casdm train have "
                             "the raw generator)")
        g = {k[len(pre):]: torch.from_numpy(v.copy()) for k, v in tensors.items()
             if (k.startswith(pre) if pre else "." in k and k.split(".")[0] in ("all_modules", "z_transform"))}
        sd = strict(generator(cfg), g, a.to_torch)
        st.atomic(a.out, lambda p: torch.save({"module." + k: v for k, v in sd.items()}, p))
        print(f"wrote {a.out}: {len(sd)} tensors ({'raw' if a.raw else 'EMA'} generator, "
              "'module.' prefix as netG_*.pth)")
        dsd = None
        if a.netD:
            d = {k[5:]: torch.from_numpy(v.copy()) for k, v in tensors.items() if k.startswith("netD.")}
            if not d:
                raise SystemExit(f"{a.to_torch}: no netD.* tensors")
            dsd = strict(discriminator(cfg), d, a.to_torch)
            st.atomic(a.netD, lambda p: torch.save({"module." + k: v for k, v in dsd.items()}, p))
            print(f"wrote {a.netD}: {len(dsd)} tensors (Discriminator_small)")
        if a.official:
            check_official(a, cfg, dsd)
        return
    if not a.ckpt:
        ap.error("--ckpt or --to-torch is needed")
    cfg = dict(PRESETS[a.model])
    for k in INTS + LISTS + ("beta_min", "beta_max"):
        if getattr(a, k) is not None:
            cfg[k] = tuple(getattr(a, k)) if k in LISTS else getattr(a, k)
    sd = torch.load(a.ckpt, map_location="cpu")
    if not isinstance(sd, dict):
        raise SystemExit(f"{a.ckpt}: not a state_dict")
    sd = {(k[7:] if k.startswith("module.") else k): v.float() for k, v in sd.items()}
    gsd = strict(generator(cfg), sd, a.ckpt)  # names and shapes, before writing
    extra = {"producer": "tools/convert_ddgan.py", "source": os.path.basename(a.ckpt),
             "model": a.model}
    if a.scale_factor:
        extra["scale_factor"] = repr(a.scale_factor)
    st.atomic(a.out, lambda p: st.save(p, gsd, metadata(cfg, extra)))
    print(f"wrote {a.out}: {len(gsd)} tensors, {sum(v.numel() for v in gsd.values()):,} parameters")


if __name__ == "__main__":
    main()
