#!/usr/bin/python3
"""Second witness for tools/lddgan_ref.py's stage two (the denoising-diffusion GAN of
LDDGAN): the official thanhluantrinh/LDDGAN modules, run on the same weights and inputs,
must give what lddgan_ref gives.

1. The discriminator: score_sde/models/discriminator.py's Discriminator_small(nc=8, ngf=8,
   t_emb_dim=32, act=nn.LeakyReLU(0.2), num_layers=3) against DiscriminatorSmall(8, 8, 32, 3)
   holding ae_ref.test_values("gdisc." + key) (as tools/make_gan_goldens.py), loaded into the
   official module with load_state_dict(strict=True) (the key lists are compared first).
   Inputs of make_gan_goldens (seed 11, its draw order; N = 8, t = [0,1,2,3,3,2,1,0]), float64:
   logits, the gradients of sum(logits * r) w.r.t. x_t, x_tp1 and every parameter, and R1 as the
   official training computes it: D_real = netD(x_t, t, x_tp1.detach()).view(-1) with
   x_t.requires_grad (train_ldgan.py:218-222), then train_ldgan.py's own grad_penalty_call
   (:40-49: create_graph=True, r1_gamma 0.02, .backward() into the parameters), against
   r1_penalty and its autograd.grad in every parameter. Also N = 4 and N = 12 (minibatch std with
   one and three groups): logits, the input gradients and R1.
2. The diffusion (diffusion.py): get_sigma_schedule, Diffusion_Coefficients,
   Posterior_Coefficients (args: num_timesteps 4, beta_min 0.1, beta_max 20, use_geometric
   False) against gan_schedule; q_sample_pairs and sample_posterior on make_gan_goldens' batch
   (t = [0,1,2,3,2,0]) with the noise made equal: torch.randn_like is replaced by a queue of the
   pre-drawn tensors in the code's draw order (eps1 in q_sample_pairs, then eps2 in q_sample,
   then eps3 in sample_posterior), in float32 (the goldens) and float64.
3. The FIR: score_sde/op/upfirdn2d.py's upfirdn2d_native and its CPU dispatcher upfirdn2d
   (values and input gradients; up/down factors, negative pads, asymmetric kernels, H != W), and
   up_or_down_sampling.py's upsample_2d / downsample_2d (kernels, factors, gains) against ours.

    witness_ddgan_disc.py /path/to/LDDGAN

Nothing of the official code is copied here; grad_penalty_call is taken from the checkout's
train_ldgan.py at run time (that file imports the training stack, so only this function is
compiled from it). Stubbed: einops (rearrange is the identity, valid for patch_size 1, asserted),
and torch.utils.cpp_extension.load while score_sde.op is imported (it returns an object that
raises if used; on CPU the official dispatcher calls upfirdn2d_native, score_sde/op/upfirdn2d.py
:156-168, so nothing is compiled and nothing of the extension runs). Two float64 adaptations,
exact and applied as our reference does: the FIR kernel of _setup_kernel (float32) is cast to the
input's dtype before upfirdn2d (F.conv2d refuses mixed dtypes; the entries are multiples of 1/64),
and the sinusoidal time embedding, computed in float32 by layers.get_timestep_embedding, is cast
to float64 before the dense layers (F.linear refuses mixed dtypes).
Prints the largest relative differences (max |ours - official| / max |official|) and exits
non-zero above 1e-10. Gradients that vanish in exact arithmetic are measured against the largest
gradient entry instead: those of R1 in conv3.conv2.0.bias (a per-channel constant added to every
sample of h3, which the minibatch variance ignores; the rest is piecewise linear), final_conv.bias
(it reaches R1 only through LeakyReLU's piecewise-constant slope) and end_linear.bias (not at all).
"""
import argparse
import ast
import os
import sys
import types

import torch
import torch.nn as nn
import torch.utils.cpp_extension

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ae_ref as A  # noqa: E402
import lddgan_ref as D  # noqa: E402
import st  # noqa: E402

GOLDENS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "goldens",
                       "gan.safetensors")

if len(sys.argv) != 2:
    sys.exit("usage: witness_ddgan_disc.py /path/to/LDDGAN")
ROOT = sys.argv[1]


def _rearrange(x, pattern, p1=1, p2=1):
    assert p1 == 1 and p2 == 1, "the einops stub holds for patch_size 1 only"
    return x


einops = types.ModuleType("einops")
einops.rearrange = _rearrange
sys.modules["einops"] = einops


class _NoExtension:
    """Stands for the CUDA extensions of score_sde/op; never used on CPU."""

    def __init__(self, name):
        self.name = name

    def __getattr__(self, attr):
        raise RuntimeError(f"the CUDA extension {self.name} was used (CPU path expected)")


sys.path.insert(0, ROOT)
_load = torch.utils.cpp_extension.load
torch.utils.cpp_extension.load = lambda name, *a, **k: _NoExtension(name)
try:
    import score_sde.op  # noqa: E402
    OF = sys.modules["score_sde.op.upfirdn2d"]  # (the package's name upfirdn2d is the function)
finally:
    torch.utils.cpp_extension.load = _load
import diffusion as ODF  # noqa: E402
import score_sde.models.discriminator as OD  # noqa: E402
import score_sde.models.layers as OL  # noqa: E402
import score_sde.models.up_or_down_sampling as OU  # noqa: E402

# float64 adaptations (exact; see the docstring)
_their_upfirdn2d = OU.upfirdn2d
assert _their_upfirdn2d is OF.upfirdn2d
OU.upfirdn2d = lambda x, kernel, **kw: _their_upfirdn2d(x, kernel.to(x.dtype), **kw)
OD.get_sinusoidal_positional_embedding = \
    lambda t, dim: OL.get_timestep_embedding(t, dim).to(torch.float64)


def official_function(path, name):
    """One top-level function of a checkout file, compiled from its own source."""
    src = open(path).read()
    node = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == name)
    mod = ast.Module(body=[node], type_ignores=[])
    ns = {"torch": torch}
    exec(compile(mod, path, "exec"), ns)
    return ns[name], node.lineno


grad_penalty_call, GPC_LINE = official_function(os.path.join(ROOT, "train_ldgan.py"), "grad_penalty_call")


def rel(a, b):
    """max |a - b| / max |b| (the absolute difference when b is all zero)."""
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    assert a.shape == b.shape or a.numel() == b.numel() == 1, (a.shape, b.shape)
    d, s = (a.reshape(b.shape) - b).abs().max().item(), b.abs().max().item()
    return d / s if s > 0 else d


def worst_of(pairs):
    return max(((rel(a, b), k) for k, a, b in pairs), key=lambda t: t[0])


def split_grads(grads):
    """Gradients whose official value is below 1e-12 of the largest entry (zero in exact
    arithmetic) are measured against that entry. Returns (worst rel, key) over the others and
    (their keys, worst noise)."""
    scale = max(b.abs().max().item() for _, _, b in grads)
    small = [k for k, a, b in grads if b.abs().max().item() <= 1e-12 * scale]
    rest = [t for t in grads if t[0] not in small]
    noise = max([0.0] + [max(a.abs().max().item(), b.abs().max().item()) / scale
                         for k, a, b in grads if k in small])
    return worst_of(rest), (small, noise)


class RandnQueue:
    """torch.randn_like replaced by pre-drawn tensors, in order; checks shape and dtype."""

    def __init__(self, tensors):
        self.q = list(tensors)

    def __enter__(self):
        self.orig = torch.randn_like

        def draw(x, *a, **k):
            assert not a and not k and self.q, "unexpected draw"
            e = self.q.pop(0)
            assert e.shape == x.shape and e.dtype == x.dtype, (e.shape, x.shape, e.dtype, x.dtype)
            return e.clone()
        torch.randn_like = draw
        return self

    def __exit__(self, *exc):
        torch.randn_like = self.orig
        assert exc[0] is not None or not self.q, "not every pre-drawn tensor was used"


def official_r1(disc, x_t, t, x_tp1, gamma):
    """R1 as the training loop runs it (train_ldgan.py:218-231 with :40-49): returns the value
    (captured at its .backward()) and the parameters' .grad it leaves (None -> zeros)."""
    x_t = x_t.detach().clone()
    x_t.requires_grad = True
    disc.zero_grad(set_to_none=True)
    D_real = disc(x_t, t, x_tp1.detach()).view(-1)
    seen, orig = [], torch.Tensor.backward

    def backward(self, *a, **k):
        seen.append(self.detach().clone())
        return orig(self, *a, **k)
    torch.Tensor.backward = backward
    try:
        grad_penalty_call(argparse.Namespace(r1_gamma=gamma), D_real, x_t)
    finally:
        torch.Tensor.backward = orig
    assert len(seen) == 1
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in disc.parameters()]
    disc.zero_grad(set_to_none=True)
    return seen[0], grads


def diffusion_part(draws):
    worst = 0.0
    args = argparse.Namespace(num_timesteps=4, beta_min=0.1, beta_max=20.0, use_geometric=False)
    s = D.gan_schedule(4, 0.1, 20.0)
    sig, a_s, betas = ODF.get_sigma_schedule(args, "cpu")
    dc = ODF.Diffusion_Coefficients(args, "cpu")
    pc = ODF.Posterior_Coefficients(args, "cpu")
    pairs = [("betas", s["betas"], betas), ("sigmas", s["sigmas"], sig), ("a_s", s["a_s"], a_s),
             ("a_s_cum", s["a_s_cum"], dc.a_s_cum), ("sigmas_cum", s["sigmas_cum"], dc.sigmas_cum),
             ("sigmas (coeff)", s["sigmas"], dc.sigmas), ("a_s (coeff)", s["a_s"], dc.a_s),
             ("betas[1:] (posterior)", s["betas"][1:], pc.betas)]
    pairs += [(k, s[k], getattr(pc, k)) for k in ("posterior_variance", "posterior_mean_coef1",
                                                 "posterior_mean_coef2", "posterior_log_variance_clipped")]
    for k, a, b in pairs:
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape, (k, a.dtype, b.dtype)
    bitwise = all(torch.equal(a, b) for _, a, b in pairs)
    e, k = worst_of(pairs)
    print(f"diffusion schedule (T 4): {len(pairs)} float32 arrays, worst rel {e:.1e} ({k}); "
          f"bitwise equal: {bitwise}")
    print("    betas " + " ".join(f"{v:.9f}" for v in betas.tolist()))
    worst = max(worst, e)
    t, x0, e1, e2, x0p, e3 = draws
    for dtype in (torch.float32, torch.float64):
        x0d, e1d, e2d, x0pd, e3d = (v.to(dtype) for v in (x0, e1, e2, x0p, e3))
        x_t, x_tp1 = D.q_sample_pairs(s, x0d, t, e1d, e2d)
        post = D.sample_posterior(s, x0pd, x_tp1, t, e3d)
        with RandnQueue([e1d, e2d]):  # eps1 (diffusion.py:93), then q_sample's eps2 (:78)
            tx_t, tx_tp1 = ODF.q_sample_pairs(dc, x0d, t)
        with RandnQueue([e3d]):  # p_sample's noise (:149)
            tpost = ODF.sample_posterior(pc, x0pd, tx_tp1, t)
        outs = [("x_t", x_t, tx_t), ("x_tp1", x_tp1, tx_tp1), ("posterior", post, tpost)]
        for k, a, b in outs:
            assert a.dtype == b.dtype == dtype, (k, a.dtype, b.dtype)
        bitwise = all(torch.equal(a, b) for _, a, b in outs)
        print(f"q_sample_pairs / sample_posterior, t {t.tolist()}, {str(dtype)[6:]}: rel diff "
              + ", ".join(f"{k} {rel(a, b):.1e}" for k, a, b in outs) + f"; bitwise equal: {bitwise}")
        worst = max([worst] + [rel(a, b) for _, a, b in outs])
    return worst


def ours_disc():
    disc = D.DiscriminatorSmall(8, 8, 32, 3).double()
    with torch.no_grad():
        for k, p in disc.named_parameters():
            p.copy_(torch.from_numpy(A.test_values("gdisc." + k, tuple(p.shape))))
    return disc


def disc_part(ours, x_t, x_tp1, td, draw_r):
    worst = 0.0
    with torch.random.fork_rng():  # its initialisation must not move make_gan_goldens' draws
        theirs = OD.Discriminator_small(nc=8, ngf=8, t_emb_dim=32, act=nn.LeakyReLU(0.2),
                                        num_layers=3).double()
    ok, tk = list(ours.state_dict()), list(theirs.state_dict())
    if ok != tk:
        print("state_dict keys differ: only ours", sorted(set(ok) - set(tk)), "only official",
              sorted(set(tk) - set(ok)), "same set, other order" if set(ok) == set(tk) else "")
    shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    for k, v in ours.state_dict().items():
        if k in shapes and shapes[k] != tuple(v.shape):
            print(f"shape of {k}: ours {tuple(v.shape)}, official {shapes[k]}")
    theirs.load_state_dict(ours.state_dict(), strict=True)
    print(f"discriminator: {len(tk)} state_dict keys, identical names, order and shapes: "
          f"{ok == tk}; load_state_dict(strict=True) ok; "
          f"{sum(p.numel() for p in theirs.parameters())} parameters")
    names = [k for k, _ in ours.named_parameters()]
    assert names == [k for k, _ in theirs.named_parameters()]
    op, tp = list(ours.parameters()), list(theirs.parameters())

    logits = ours(x_t, td, x_tp1)
    tlogits = theirs(x_t, td, x_tp1)
    r = draw_r(logits.shape)
    golden = st.load(GOLDENS)[0] if os.path.exists(GOLDENS) else None
    if golden is not None:  # the same inputs as the committed goldens (stored in float32)
        same = all(torch.equal(v.detach().float(), torch.from_numpy(golden[f"disc/{k}"]))
                   for k, v in (("x_t", x_t), ("x_tp1", x_tp1), ("r", r), ("t", td.float())))
        print(f"inputs equal to {os.path.relpath(GOLDENS)}'s disc/x_t, x_tp1, r, t: {same}")
        assert same
    g = torch.autograd.grad((logits * r).sum(), [x_t, x_tp1] + op)
    tg = torch.autograd.grad((tlogits * r).sum(), [x_t, x_tp1] + tp)
    scal = [("logits", logits, tlogits), ("dx_t", g[0], tg[0]), ("dx_tp1", g[1], tg[1])]
    print(f"N 8, t {td.tolist()}: logits |max| {tlogits.abs().max().item():.4g}; rel diff "
          + ", ".join(f"{k} {rel(a, b):.1e}" for k, a, b in scal))
    grads = [(k, a, b) for k, a, b in zip(names, g[2:], tg[2:])]
    (eg, kg), (small, ez) = split_grads(grads)
    print(f"    d(sum logits*r)/d params: {len(grads) - len(small)} gradients, worst {eg:.1e} ({kg})"
          + (f"; {len(small)} zero but for rounding ({', '.join(small)}; at most {ez:.1e} of the "
             f"largest entry)" if small else ""))
    worst = max([worst, eg, ez] + [rel(a, b) for _, a, b in scal])

    r1 = D.r1_penalty(ours, x_t, td, x_tp1, 0.02)
    rg = torch.autograd.grad(r1, op, allow_unused=True)
    rg = [torch.zeros_like(p) if v is None else v for p, v in zip(op, rg)]
    tr1, trg = official_r1(theirs, x_t, td, x_tp1, 0.02)
    print(f"    R1 (gamma 0.02): official {tr1.item():.10g}, ours {r1.item():.10g}, rel diff "
          f"{rel(r1, tr1):.1e}")
    rgrads = [(k, a, b) for k, a, b in zip(names, rg, trg)]
    (eg, kg), (small, ez) = split_grads(rgrads)
    exact0 = [k for k, a, b in rgrads if not a.any() and not b.any()]
    print(f"    dR1/d params: {len(rgrads) - len(small)} gradients, worst {eg:.1e} ({kg}); "
          f"{len(small)} zero in exact arithmetic ({', '.join(small)}): at most {ez:.1e} of the largest "
          f"entry; exactly 0 on both sides: {', '.join(exact0) or 'none'}")
    worst = max([worst, eg, ez, rel(r1, tr1)])

    for n, seed in ((4, 12), (12, 13)):  # one and three minibatch-std groups
        gen = torch.Generator().manual_seed(seed)
        xa = torch.randn(n, 4, 16, 16, generator=gen, dtype=torch.float64).requires_grad_(True)
        xb = torch.randn(n, 4, 16, 16, generator=gen, dtype=torch.float64).requires_grad_(True)
        rr = torch.randn(n, 1, generator=gen, dtype=torch.float64)
        tn = torch.arange(n) % 4
        la, lb = ours(xa, tn, xb), theirs(xa, tn, xb)
        ga = torch.autograd.grad((la * rr).sum(), [xa, xb])
        gb = torch.autograd.grad((lb * rr).sum(), [xa, xb])
        r1a = D.r1_penalty(ours, xa, tn, xb, 0.02)
        r1b, _ = official_r1(theirs, xa, tn, xb, 0.02)
        sc = [("logits", la, lb), ("dx_t", ga[0], gb[0]), ("dx_tp1", ga[1], gb[1]), ("R1", r1a, r1b)]
        print(f"N {n} ({n // min(n, 4)} minibatch-std group{'s' if n > 4 else ''}), t {tn.tolist()}: "
              "rel diff " + ", ".join(f"{k} {rel(a, b):.1e}" for k, a, b in sc))
        worst = max([worst] + [rel(a, b) for _, a, b in sc])
    return worst


def fir_part():
    worst = 0.0
    gen = torch.Generator().manual_seed(7)
    fir = torch.from_numpy(OU._setup_kernel([1, 3, 3, 1])).double()
    rk = lambda n: torch.rand(n, n, generator=gen, dtype=torch.float64)  # noqa: E731 (asymmetric)
    cases = [((2, 3, 8, 8), fir, 1, 2, 1, 1), ((2, 3, 8, 8), fir * 4, 2, 1, 2, 1),
             ((1, 2, 7, 5), rk(4), 2, 1, 2, 1), ((1, 2, 9, 6), rk(3), 1, 2, -1, 2),
             ((2, 1, 5, 7), rk(4), 3, 2, 1, -1), ((1, 3, 6, 6), rk(2), 1, 1, 0, 0),
             ((1, 1, 6, 9), rk(5), 2, 3, 3, -2)]
    for shape, k, up, down, p0, p1 in cases:
        x = torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(True)
        y = D.upfirdn2d(x, k, up, down, p0, p1)
        yn = OF.upfirdn2d_native(x, k, up, up, down, down, p0, p1, p0, p1)
        yd = OF.upfirdn2d(x, k, up=up, down=down, pad=(p0, p1))
        r = torch.randn(yn.shape, generator=gen, dtype=torch.float64)
        g, = torch.autograd.grad((y * r).sum(), x)
        gn, = torch.autograd.grad((yn * r).sum(), x)
        sc = [("y native", y, yn), ("y dispatcher", y, yd), ("dx", g, gn)]
        print(f"upfirdn2d {tuple(shape)} k {tuple(k.shape)} up {up} down {down} pad ({p0},{p1}) -> "
              f"{tuple(yn.shape[2:])}: rel diff " + ", ".join(f"{n} {rel(a, b):.1e}" for n, a, b in sc))
        worst = max([worst] + [rel(a, b) for _, a, b in sc])
    for kern, factor, gain, shape in (([1, 3, 3, 1], 2, 1, (2, 3, 8, 8)), ([1, 3, 3, 1], 2, 1, (1, 2, 6, 10)),
                                      ([1, 1], 2, 1, (1, 2, 6, 4)), ([1, 2, 1], 2, 2.5, (1, 2, 8, 6)),
                                      ([1, 3, 3, 1], 3, 1, (1, 2, 6, 9))):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        u, tu = D.upsample_2d(x, kern, factor, gain), OU.upsample_2d(x, kern, factor=factor, gain=gain)
        d, td = D.downsample_2d(x, kern, factor, gain), OU.downsample_2d(x, kern, factor=factor, gain=gain)
        print(f"upsample_2d / downsample_2d k {kern} factor {factor} gain {gain} {shape}: "
              f"{tuple(tu.shape[2:])} rel diff {rel(u, tu):.1e}, {tuple(td.shape[2:])} rel diff {rel(d, td):.1e}")
        worst = max(worst, rel(u, tu), rel(d, td))
    return worst


def main():
    torch.set_num_threads(1)
    print(f"official: {ROOT}; grad_penalty_call from train_ldgan.py:{GPC_LINE}")
    torch.manual_seed(11)  # make_gan_goldens' draws, in its order
    t = torch.tensor([0, 1, 2, 3, 2, 0])
    x0 = torch.randn(6, 4, 3, 3)
    e1, e2, e3 = torch.randn(6, 4, 3, 3), torch.randn(6, 4, 3, 3), torch.randn(6, 4, 3, 3)
    x0p = torch.randn(6, 4, 3, 3)
    ours = ours_disc()  # (its nn.Linear/Conv2d initialisation draws too, as in make_gan_goldens)
    td = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    x_t = torch.randn(8, 4, 16, 16).double().requires_grad_(True)
    x_tp1 = torch.randn(8, 4, 16, 16).double().requires_grad_(True)
    worst = diffusion_part((t, x0, e1, e2, x0p, e3))
    worst = max(worst, disc_part(ours, x_t, x_tp1, td, lambda shape: torch.randn(shape).double()))
    worst = max(worst, fir_part())
    print("agree" if worst <= 1e-10 else "DISAGREE", f"(worst {worst:.1e})")
    sys.exit(0 if worst <= 1e-10 else 1)


if __name__ == "__main__":
    main()
