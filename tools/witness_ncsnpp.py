#!/usr/bin/python3
"""Second witness for tools/lddgan_ref.py's NCSNpp (the generator of LDDGAN stage two):
LDDGAN's own NCSNpp (score_sde/models/ncsnpp_generator_adagn.py, on its layerspp,
layers, dense_layer and up_or_down_sampling) must give the same output and the same
gradients as ours on the same weights and inputs, in float64. Two configurations:
  small  the generator of tools/make_gan_goldens.py: NCSNpp(channels=4, nf=32,
         ch_mult=(1, 2), num_res_blocks=1, nz=6, zdim=16, n_mlp=2,
         attn_resolutions=(8,), image_size=8), i.e. attention at level 0 on the way
         down and up, plus the middle one; the official args are train_ldgan.py's
         parser on --num_channels 4 --num_channels_dae 32 --ch_mult 1 2
         --num_res_blocks 1 --attn_resolutions 8 --nz 6 --z_emb_dim 16 --n_mlp 2
         --current_resolution 8 (everything else its defaults);
  cifar  LDDGAN's CIFAR-10 config: ours NCSNpp(attn_resolutions=(32,)) with its
         defaults; the official args are train_ldgan.py's parser on run.sh's CIFAR-10
         training command line, read from the checkout.
In both, image_size := current_resolution as train_ldgan.py:79 does, and the script
asserts that the args map onto our constructor's (num_channels -> channels,
num_channels_dae -> nf, z_emb_dim -> zdim, ...) and that centered, not_use_tanh, fir,
fir_kernel, skip_rescale, resblock_type, progressive, progressive_input,
embedding_type, dropout, conditional, patch_size hold the values our reference
assumes. Our model gets ae_ref.test_values("ggen." + key) weights (as
make_gan_goldens.py); its state_dict is loaded into the official module with
strict=True after a key-by-key check of names and shapes. With x (3, C, side, side),
t = [0, 3, 1], z (3, nz) and r (the shape of y) drawn once per configuration,
compared: y, and the gradients of sum(y * r) w.r.t. x, z and every parameter (by
name), each relative to the official tensor's max |.|; gradients that vanish in
exact arithmetic (the attention's NIN_1.b, the key bias, which the softmax ignores)
are measured against the largest parameter-gradient entry. Also printed: the
official CIFAR parameter count and whether the state_dict key order equals ours.

    witness_ncsnpp.py /path/to/LDDGAN

Nothing of the checkout is copied here; its train_ldgan.py argument parser (the
statements of its __main__ block before parse_args) is executed from the file, and
run.sh's command line is read from the file. Stubbed: einops (rearrange is the
identity; asserted patch_size 1), torch.utils.cpp_extension.load while score_sde.op
is imported (returns None: nothing is compiled; on CPU the official dispatcher
score_sde/op/upfirdn2d.py:156-168 takes upfirdn2d_native anyway). Two dtype shims,
without which the official modules cannot run in float64 at all: the FIR kernel,
built by the official code as a float32 tensor (up_or_down_sampling.py, torch.tensor
of _setup_kernel's float32 array), is cast to the input's dtype before the official
upfirdn2d; the timestep embedding, computed by the official get_timestep_embedding
in float32 (layers.py:473-484), is cast to float64 afterwards. Both casts are exact
and are what lddgan_ref.py does too. Float64 on both sides; prints the largest
differences and exits non-zero above 1e-10 relative.
"""
import argparse
import ast
import os
import shlex
import sys
import types

import torch
import torch.utils.cpp_extension

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ae_ref as A  # noqa: E402
import lddgan_ref as D  # noqa: E402

if len(sys.argv) != 2:
    sys.exit("usage: witness_ncsnpp.py /path/to/LDDGAN")
ROOT = os.path.abspath(sys.argv[1])

einops = types.ModuleType("einops")


def _rearrange(x, pattern, p1=1, p2=1):
    assert p1 == 1 and p2 == 1, "only patch_size 1 is stubbed"
    return x


einops.rearrange = _rearrange
sys.modules["einops"] = einops
sys.path.insert(0, ROOT)
_load = torch.utils.cpp_extension.load
torch.utils.cpp_extension.load = lambda *a, **k: None  # nothing compiled
try:
    import score_sde.op  # noqa: E402
finally:
    torch.utils.cpp_extension.load = _load
from score_sde.models import layers as L  # noqa: E402
from score_sde.models import up_or_down_sampling as U  # noqa: E402
from score_sde.models.ncsnpp_generator_adagn import NCSNpp as OfficialNCSNpp  # noqa: E402

_official_upfirdn2d = score_sde.op.upfirdn2d
assert U.upfirdn2d is _official_upfirdn2d
U.upfirdn2d = lambda input, kernel, up=1, down=1, pad=(0, 0): _official_upfirdn2d(
    input, kernel.to(input.dtype), up=up, down=down, pad=pad)
_official_temb = L.get_timestep_embedding
L.get_timestep_embedding = lambda t, dim, max_positions=10000: _official_temb(
    t, dim, max_positions).to(torch.float64)


def official_parser():
    """train_ldgan.py's ArgumentParser: the statements of its __main__ block up to
    `args = parser.parse_args()`, executed from the file."""
    path = os.path.join(ROOT, "train_ldgan.py")
    src = open(path).read()
    tree = ast.parse(src, path)
    main = next(n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))
    stop = next(i for i, s in enumerate(main.body)
                if isinstance(s, ast.Assign) and "parse_args" in ast.unparse(s.value))
    body = main.body[:stop]
    ns = {"argparse": argparse}
    exec(compile(ast.Module(body=body, type_ignores=[]), path, "exec"), ns)
    assert "args.image_size = args.current_resolution" in src
    return ns["parser"], (body[0].lineno, body[-1].end_lineno)


def run_sh_cifar_argv():
    """The arguments of run.sh's CIFAR-10 training command (the continued lines)."""
    lines = open(os.path.join(ROOT, "run.sh")).read().split("\n")
    i0 = next(i for i, s in enumerate(lines) if "train_ldgan.py --dataset cifar10" in s)
    i1 = i0
    while lines[i1].rstrip().endswith("\\"):
        i1 += 1
    cmd = " ".join(s.rstrip().rstrip("\\") for s in lines[i0:i1 + 1])
    cmd = cmd.replace("$MASTER_PORT", "6002").replace("$GPUS", "1")
    argv = shlex.split(cmd)
    k = argv.index("train_ldgan.py")
    return argv[k + 1:], (i0 + 1, i1 + 1 if lines[i1].strip() else i1)  # (not the blank line after)


def official_args(parser, argv):
    args = parser.parse_args(argv)
    args.ori_image_size = args.image_size  # train_ldgan.py:78-79
    args.image_size = args.current_resolution
    fixed = dict(centered=True, not_use_tanh=False, fir=True, fir_kernel=[1, 3, 3, 1], skip_rescale=True,
                 resblock_type="biggan", progressive="none", progressive_input="residual",
                 embedding_type="positional", dropout=0.0, conditional=True, patch_size=1,
                 resamp_with_conv=True)
    for k, v in fixed.items():
        assert getattr(args, k) == v, (k, getattr(args, k), v)
    return args


def check_mapping(ours_kw, args):
    """Our constructor's arguments against the official args namespace."""
    theirs = dict(channels=args.num_channels, nf=args.num_channels_dae, ch_mult=tuple(args.ch_mult),
                  num_res_blocks=args.num_res_blocks, nz=args.nz, zdim=args.z_emb_dim, n_mlp=args.n_mlp,
                  attn_resolutions=tuple(args.attn_resolutions), image_size=args.image_size)
    full = dict(channels=4, nf=128, ch_mult=(1, 2, 2), num_res_blocks=2, nz=50, zdim=256, n_mlp=4,
                attn_resolutions=(), image_size=16)  # lddgan_ref.NCSNpp's defaults
    full.update(ours_kw)
    assert full == theirs, (full, theirs)
    return theirs


def rel(a, b):
    """max |a - b| / max |b| (the absolute difference when b is all zero)."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    d, s = (a - b).abs().max().item(), b.abs().max().item()
    return d / s if s > 0 else d


def split_grads(grads):
    """As witness_ldm_loss.py: gradients whose official max |.| is at most 1e-12 of the
    largest parameter-gradient entry are zero but for rounding (the attention's key
    bias); they are measured against that entry. Returns the others' (rel, key) sorted
    worst first, and (keys, worst noise) of these."""
    scale = max(b.abs().max().item() for _, _, b in grads)
    small = [k for k, _, b in grads if b.abs().max().item() <= 1e-12 * scale]
    rest = sorted(((rel(a, b), k) for k, a, b in grads if k not in small), reverse=True)
    noise = max([0.0] + [max(a.abs().max().item(), b.abs().max().item()) / scale
                         for k, a, b in grads if k in small])
    return rest, (small, noise)


def compare(name, ours_kw, args, seed):
    mapped = check_mapping(ours_kw, args)
    print(f"{name}: {', '.join(f'{k} {v}' for k, v in mapped.items())}")
    ours = D.NCSNpp(**ours_kw).double()
    with torch.no_grad():
        for k, p in ours.named_parameters():
            p.copy_(torch.from_numpy(A.test_values("ggen." + k, tuple(p.shape))))
    torch.manual_seed(0)  # the official init draws (overwritten by the load)
    theirs = OfficialNCSNpp(args).double()
    sd, tsd = ours.state_dict(), theirs.state_dict()
    only_ours = [k for k in sd if k not in tsd]
    only_theirs = [k for k in tsd if k not in sd]
    shapes = [(k, tuple(sd[k].shape), tuple(tsd[k].shape)) for k in sd
              if k in tsd and sd[k].shape != tsd[k].shape]
    if only_ours or only_theirs or shapes:
        print(f"    keys only in ours: {only_ours}\n    keys only in the official: {only_theirs}\n"
              f"    shape mismatches (key, ours, official): {shapes}")
        sys.exit(1)
    theirs.load_state_dict(sd, strict=True)
    n_theirs = sum(p.numel() for p in theirs.parameters())
    n_ours = sum(p.numel() for p in ours.parameters())
    ok, tk = list(sd), list(tsd)
    moved = [k for k in ok if not k.startswith("z_transform.")] + [k for k in ok if k.startswith("z_transform.")]
    print(f"    state_dict: {len(ok)} keys, names and shapes equal, loaded with strict=True; parameters: "
          f"official {n_theirs:,}, ours {n_ours:,}; {len(theirs.all_modules)} official modules")
    print(f"    key order equal: {ok == tk}; official order = all_modules.* then z_transform.* "
          f"(first {tk[0]}, last {tk[-1]}): {tk == moved}; ours begins {ok[0]}")

    g = torch.Generator().manual_seed(seed)
    side, C, nz = args.image_size, args.num_channels, args.nz
    x = torch.randn(3, C, side, side, generator=g, dtype=torch.float64)
    z = torch.randn(3, nz, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 3, 1])
    results = []
    for model in (ours, theirs):
        xi, zi = x.clone().requires_grad_(True), z.clone().requires_grad_(True)
        y = model(xi, t, zi)
        if model is ours:
            r = torch.randn(y.shape, generator=g, dtype=torch.float64)
        names = [k for k, _ in model.named_parameters()]
        gr = torch.autograd.grad((y * r).sum(), [xi, zi] + [p for _, p in model.named_parameters()])
        results.append((y.detach(), gr[0], gr[1], dict(zip(names, gr[2:]))))
    (y0, dx0, dz0, gp0), (y1, dx1, dz1, gp1) = results
    assert y1.dtype == torch.float64 and all(v.dtype == torch.float64 for v in gp1.values())
    grads = [(k, gp0[k], gp1[k]) for k in gp0]
    rest, (small, noise) = split_grads(grads)
    ey, edx, edz = rel(y0, y1), rel(dx0, dx1), rel(dz0, dz1)
    print(f"    y |max| {y1.abs().max().item():.4g}, |y| <= 0.999 in {100 * (y1.abs() <= 0.999).double().mean().item():.0f}%"
          f" of entries; rel diff y {ey:.1e}, dx {edx:.1e}, dz {edz:.1e}")
    print(f"    {len(rest)} parameter gradients: worst " + ", ".join(f"{e:.1e} ({k})" for e, k in rest[:3]))
    print(f"    {len(small)} zero but for rounding on both sides ({', '.join(small)}): at most "
          f"{noise:.1e} of the largest entry")
    return max([ey, edx, edz, noise, rest[0][0]])


def main():
    torch.set_num_threads(1)
    parser, (a0, a1) = official_parser()
    print(f"official parser: train_ldgan.py:{a0}-{a1}; generator: "
          f"score_sde/models/ncsnpp_generator_adagn.py (NCSNpp) in {ROOT}")
    small_argv = ("--num_channels 4 --num_channels_dae 32 --ch_mult 1 2 --num_res_blocks 1 "
                  "--attn_resolutions 8 --nz 6 --z_emb_dim 16 --n_mlp 2 --current_resolution 8").split()
    worst = compare("small", dict(channels=4, nf=32, ch_mult=(1, 2), num_res_blocks=1, nz=6, zdim=16,
                                  n_mlp=2, attn_resolutions=(8,), image_size=8),
                    official_args(parser, small_argv), seed=1)
    cifar_argv, (l0, l1) = run_sh_cifar_argv()
    print(f"run.sh:{l0}-{l1}: {' '.join(cifar_argv)}")
    worst = max(worst, compare("cifar", dict(attn_resolutions=(32,)), official_args(parser, cifar_argv), seed=2))
    print("agree" if worst <= 1e-10 else "DISAGREE", f"(worst {worst:.1e})")
    sys.exit(0 if worst <= 1e-10 else 1)


if __name__ == "__main__":
    main()
