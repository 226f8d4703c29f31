#!/usr/bin/python3
"""Writes tests/goldens/gan.safetensors: the denoising-diffusion GAN of tools/lddgan_ref.py
(LDDGAN stage two) for tests/test_lddgan.c. So far the diffusion: the T = 4 schedule
(beta_min 0.1, beta_max 20: every coefficient array), and with fixed noise one batch of
q_sample_pairs and of sample_posterior (t = 0..3, so the noise-free t = 0 is in it); the
discriminator (DiscriminatorSmall, ngf 8, t_emb_dim 32, 3 layers, latent 4x16x16, N = 8: two
minibatch-std groups) on ae_ref.test_values("gdisc." + key) weights, in float64: logits,
d(sum logits * r) in x_t, x_{t+1} and every parameter, and R1 (gamma 0.02, create_graph=True)
with its gradient in every parameter; the generator (NCSNpp, nf 32, ch_mult 1,2, one
ResBlock a level, attention at side 8, latent 4x8x8, nz 6, zdim 16, 2 mapping layers) on
test_values("ggen." + key): its output and d(sum y * r) in x, z and every parameter (the
gradient's norm and 256 evenly spaced elements, gnorm/ and gsample/, as make_ae_goldens.py).
Run from the repository root:
    /usr/bin/python3 tools/make_gan_goldens.py
Not needed by the build or CI: the output file is committed.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lddgan_ref as D  # noqa: E402
import st  # noqa: E402


def main():
    torch.manual_seed(11)
    G = {}
    s = D.gan_schedule(4, 0.1, 20.0)
    for k, v in s.items():
        G[f"schedule/{k}"] = v.float()
    t = torch.tensor([0, 1, 2, 3, 2, 0])
    x0 = torch.randn(6, 4, 3, 3)
    e1, e2, e3 = torch.randn(6, 4, 3, 3), torch.randn(6, 4, 3, 3), torch.randn(6, 4, 3, 3)
    x_t, x_tp1 = D.q_sample_pairs(s, x0, t, e1, e2)
    x0p = torch.randn(6, 4, 3, 3)
    post = D.sample_posterior(s, x0p, x_tp1, t, e3)
    for k, v in dict(t=t.float(), x0=x0, eps1=e1, eps2=e2, x_t=x_t, x_tp1=x_tp1, x0_pred=x0p,
                     eps3=e3, posterior=post).items():
        G[f"diffusion/{k}"] = v.float()
    # the discriminator
    import ae_ref as A
    disc = D.DiscriminatorSmall(8, 8, 32, 3).double()
    with torch.no_grad():
        for k, p in disc.named_parameters():
            p.copy_(torch.from_numpy(A.test_values("gdisc." + k, tuple(p.shape))))
    td = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    x_t = torch.randn(8, 4, 16, 16).double().requires_grad_(True)
    x_tp1 = torch.randn(8, 4, 16, 16).double().requires_grad_(True)
    logits = disc(x_t, td, x_tp1)
    r = torch.randn(logits.shape).double()
    params = dict(disc.named_parameters())
    grads = torch.autograd.grad((logits * r).sum(), [x_t, x_tp1] + list(params.values()))
    G["disc/t"], G["disc/x_t"], G["disc/x_tp1"] = td.float(), x_t.detach().float(), x_tp1.detach().float()
    G["disc/logits"], G["disc/r"] = logits.detach().float(), r.float()
    G["disc/dx_t"], G["disc/dx_tp1"] = grads[0].float(), grads[1].float()
    for k, gk in zip(params, grads[2:]):
        G[f"disc/grad/{k}"] = gk.float()
    r1 = D.r1_penalty(disc, x_t, td, x_tp1, 0.02)
    # (allow_unused: end_linear.bias, and the weights that only shift pre-activations,
    # reach R1 only through LeakyReLU's masks, whose derivative is 0: a zero gradient)
    r1_grads = torch.autograd.grad(r1, list(params.values()), allow_unused=True)
    r1_grads = [torch.zeros_like(p) if gk is None else gk for p, gk in zip(params.values(), r1_grads)]
    G["disc/r1"] = r1.detach().reshape(1).float()
    for k, gk in zip(params, r1_grads):
        G[f"disc/r1_grad/{k}"] = gk.float()
    print(f"disc: {sum(p.numel() for p in params.values())} parameters, logits |max| "
          f"{logits.abs().max().item():.4g}, R1 {r1.item():.6g}")
    # the generator: a small NCSNpp with the input pyramid and attention at level 0
    gen = D.NCSNpp(channels=4, nf=32, ch_mult=(1, 2), num_res_blocks=1, nz=6, zdim=16, n_mlp=2,
                   attn_resolutions=(8,), image_size=8).double()
    with torch.no_grad():
        for k, p in gen.named_parameters():
            p.copy_(torch.from_numpy(A.test_values("ggen." + k, tuple(p.shape))))
    tg = torch.tensor([0, 3, 1])
    xg = torch.randn(3, 4, 8, 8).double().requires_grad_(True)
    zg = torch.randn(3, 6).double().requires_grad_(True)
    y = gen(xg, tg, zg)
    rg = torch.randn(y.shape).double()
    params = dict(gen.named_parameters())
    grads = torch.autograd.grad((y * rg).sum(), [xg, zg] + list(params.values()))
    G["gen/t"], G["gen/x"], G["gen/z"], G["gen/y"], G["gen/r"] = (
        tg.float(), xg.detach().float(), zg.detach().float(), y.detach().float(), rg.float())
    G["gen/dx"], G["gen/dz"] = grads[0].float(), grads[1].float()
    for k, gk in zip(params, grads[2:]):  # (as make_ae_goldens: the norm and 256 samples)
        flat = gk.reshape(-1)
        n = flat.numel()
        m = min(n, 256)
        G[f"gen/gnorm/{k}"] = flat.norm().reshape(1).float()
        G[f"gen/gsample/{k}"] = flat[torch.tensor([i * n // m for i in range(m)])].float()
    print(f"gen: {sum(p.numel() for p in params.values())} parameters, {len(gen.all_modules)} modules, "
          f"y |max| {y.abs().max().item():.4g}")
    # one iteration's gradients: the D step with R1 and the G step (alpha 0.7), the small
    # generator and a discriminator on its 8x8 latents (ngf 8, t_emb_dim 32), N = 8
    gen2 = D.NCSNpp(channels=4, nf=32, ch_mult=(1, 2), num_res_blocks=1, nz=6, zdim=16, n_mlp=2,
                    attn_resolutions=(8,), image_size=8).double()
    disc2 = D.DiscriminatorSmall(8, 8, 32, 3).double()
    with torch.no_grad():
        for k, p in gen2.named_parameters():
            p.copy_(torch.from_numpy(A.test_values("ggen." + k, tuple(p.shape))))
        for k, p in disc2.named_parameters():
            p.copy_(torch.from_numpy(A.test_values("gdisc." + k, tuple(p.shape))))
    ts = torch.tensor([0, 1, 2, 3, 1, 2, 3, 0])
    sd = {k: v.double() for k, v in s.items()}
    # of 100 seeds, the inputs whose LeakyReLU inputs stay farthest from the kink (relative
    # to each tensor's max) in both steps, so that float32's ~1e-6 is unlikely to flip one

    def step_inputs(seed):
        gen_rng = torch.Generator().manual_seed(seed)
        x0 = (torch.rand(8, 4, 8, 8, generator=gen_rng) * 2 - 1).double()
        nz = {k: torch.randn(*shape, generator=gen_rng).double() for k, shape in
              [("eps1", (8, 4, 8, 8)), ("eps2", (8, 4, 8, 8)), ("z", (8, 6)), ("eps_post", (8, 4, 8, 8))]}
        return x0, nz

    best = (-1.0, 0)
    for seed in range(2000, 2100):
        x0, nz = step_inputs(seed)
        D.KINKS = []
        D.d_step_loss(gen2, disc2, sd, x0, ts, nz["eps1"], nz["eps2"], nz["z"], nz["eps_post"], 0.02)
        D.g_step_loss(gen2, disc2, sd, x0, ts, nz["eps1"], nz["eps2"], nz["z"], nz["eps_post"], 0.7)
        best = max(best, (min(D.KINKS), seed))
        D.KINKS = None
    x0, nz = step_inputs(best[1])
    print(f"step: seed {best[1]}, kink margin {best[0]:.2e}")
    G["step/x0"], G["step/t"] = x0.float(), ts.float()
    for k, v in nz.items():
        G[f"step/{k}"] = v.float()
    dl, dt = D.d_step_loss(gen2, disc2, sd, x0, ts, nz["eps1"], nz["eps2"], nz["z"], nz["eps_post"], 0.02)
    dparams = dict(disc2.named_parameters())
    dg = torch.autograd.grad(dl, list(dparams.values()), allow_unused=True)
    for (k, p), gk in zip(dparams.items(), dg):
        G[f"step/d_grad/{k}"] = (torch.zeros_like(p) if gk is None else gk).float()
    for k, v in dt.items():
        G[f"step/d_{k}" if not k.startswith("d_") else f"step/{k}"] = v.reshape(1).float()
    gl, gt = D.g_step_loss(gen2, disc2, sd, x0, ts, nz["eps1"], nz["eps2"], nz["z"], nz["eps_post"], 0.7)
    gparams = dict(gen2.named_parameters())
    gg = torch.autograd.grad(gl, list(gparams.values()))
    for k, gk in zip(gparams, gg):
        flat = gk.reshape(-1)
        n = flat.numel()
        m = min(n, 256)
        G[f"step/g_gnorm/{k}"] = flat.norm().reshape(1).float()
        G[f"step/g_gsample/{k}"] = flat[torch.tensor([i * n // m for i in range(m)])].float()
    for k, v in gt.items():
        G[f"step/{k}"] = v.reshape(1).float()
    # the sampler: T = 4 generator calls from x_T with given noise
    xT = torch.randn(3, 4, 8, 8).double()
    zs, es = torch.randn(4, 3, 6).double(), torch.randn(4, 3, 4, 8, 8).double()
    G["sample/x_init"], G["sample/z"], G["sample/eps"] = xT.float(), zs.float(), es.float()
    G["sample/out"] = D.sample_from_model(gen2, sd, xT, zs, es).float()
    # two full iterations on the step's inputs: lazy R1 on the first (global_step 0), none on
    # the second; Adam (0.5, 0.9) at the official learning rates, the EMA at 0.9999 (a blend
    # of 0.5 so that the second step's shows); the weights after, sampled as the gradients
    import copy
    gen3, disc3 = copy.deepcopy(gen2), copy.deepcopy(disc2)
    opt_g = torch.optim.Adam(gen3.parameters(), lr=1.6e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc3.parameters(), lr=1.25e-4, betas=(0.5, 0.9))
    ema = {}
    for r1 in (0.02, 0.0):
        D.train_iteration(gen3, disc3, opt_g, opt_d, ema, sd, x0, ts, nz, r1, 0.7, 0.5)
    for net, params in (("d", dict(disc3.named_parameters())), ("g", dict(gen3.named_parameters())),
                        ("ema", ema)):
        for k, p in params.items():
            flat = p.detach().reshape(-1)
            n = flat.numel()
            m = min(n, 256)
            G[f"iter/{net}/{k}"] = flat[torch.tensor([i * n // m for i in range(m)])].float()
    print("step: " + ", ".join(f"{k} {v.item():.6g}" for k, v in {**dt, **gt}.items()))
    out = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                        "goldens", "gan.safetensors"))
    st.save(out, G, {"producer": "tools/make_gan_goldens.py", "torch": torch.__version__})
    print(f"wrote {out}: {len(G)} tensors")


if __name__ == "__main__":
    main()
