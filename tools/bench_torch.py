#!/usr/bin/python3
"""The PyTorch side of bench cases that ../shared/ref/unet_ref.py has no mode for.

  bench_torch.py REF_DIR ddim --ch 128 --res 3 --attn 16,8 --batch 16 --threads 2

  bench_torch.py REF_DIR casdm_ckpt --ch 64 --res 2 --attn 16 --batch 16 --threads 2

  bench_torch.py REF_DIR casdm --ch 64 --res 2 --attn 16 --batch 16 --threads 2 --autocast

  bench_torch.py REF_DIR conv --autocast --threads 1

  bench_torch.py REF_DIR inception --batch 50 --threads 2

  bench_torch.py REF_DIR ae_step --batch 8 --threads 2 [--ldm LDM_DIR --taming TAMING_DIR]

ddim: one Cas-DM sampling step without gradients: theta(x_t, t), x0* from eps,
phi(x0*, t), the same networks as unet_ref.py's (imported from REF_DIR).
casdm_ckpt: unet_ref.py's Cas-DM training step (no LPIPS) with every block
that holds a ResBlock under torch.utils.checkpoint, as improved-diffusion's
use_checkpoint and casdm's bench --checkpoint 1.
inception: tools/inception_ref.py's FIDInception (pytorch-fid's network; the witness
tools/witness_pytorch_fid.py shows the two agree) without gradients on 32x32 images in
[0, 1] resized to 299x299: pool_3, the Mixed_6d tap and the logits, as fid.c computes.
ae_step: one training iteration of LDDGAN's KL autoencoder (CIFAR-10 config, dropout
0.2, train mode) with latent-diffusion's loss, GAN terms on (disc_start 0), x uniform
in [-1, 1]. Generator step: the discriminator frozen (Lightning's toggle_optimizer),
encode, posterior sample, decode, loss with the adaptive d_weight (two autograd.grad
at decoder.conv_out.weight), backward, Adam step. Discriminator step: a fresh
no-grad autoencoder forward, hinge loss on D(x), D(x_rec), backward, Adam step. Both
Adam(lr 4.5e-6 * batch, betas (0.5, 0.9)); the PatchGAN (ndf 64, 3 layers) in train
mode (BatchNorm batch statistics), LPIPS (VGG16, max pools) frozen in eval mode, with
random weights. Default modules: tools/ae_ref.py's AutoencoderKL, NLayerDiscriminator
and AELoss on tools/lpips_ref.py's VGGLPIPS; with --ldm and --taming (checkouts of
CompVis/latent-diffusion and CompVis/taming-transformers) the official ones instead:
ldm.models.autoencoder.AutoencoderKL, its DiagonalGaussianDistribution (.sample()) and
LPIPSWithDiscriminator(disc_start=0, kl_weight=1e-6, disc_weight=0.5), stubbed as
tools/witness_ldm_loss.py does (no downloads). The official loss's forward also
computes the reconstruction, LPIPS and KL terms when optimizer_idx is 1, so its
discriminator step holds one more LPIPS forward than AELoss.discriminator's.
The JSON line names the source: "modules": "ae_ref" or "official".
casdm: unet_ref.py's Cas-DM training step (no LPIPS), as unet_ref.py casdm runs it.
conv: the 3x3 convolution 128->128 of unet_ref.py conv (batch 16, 32x32): fwd_s (no
gradients) and step_s (forward, sum, backward to the input and the weights).
--autocast (casdm, ddim, conv): under torch.autocast("cpu", dtype=torch.bfloat16)
with the modules and inputs in channels_last, the way oneDNN's bf16 kernels are
meant to be fed on a CPU (convolutions, linears and matmuls in bf16, the rest in
float32, the weights float32): the reference for casdm --precision bf16.
Prints one JSON line like unet_ref.py: step_s (median), peak_rss_mib.
"""
import argparse
import contextlib
import json
import sys

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, sys.argv[1])
import unet_ref as R  # noqa: E402


def main():
    sys.argv = [sys.argv[0]] + sys.argv[2:]
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["ddim", "casdm", "casdm_ckpt", "conv", "inception", "ae_step",
                                    "lddgan_d_step_r1", "lddgan_g_step", "lddgan_sample100"])
    p.add_argument("--autocast", action="store_true")  # bf16 autocast, channels_last
    p.add_argument("--ch", type=int, default=128)
    p.add_argument("--res", type=int, default=3)
    p.add_argument("--attn", default="16,8")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=None)  # 8 for ae_step, else 16
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--ldm", default=None)     # ae_step: latent-diffusion checkout
    p.add_argument("--taming", default=None)  # ae_step: taming-transformers checkout
    p.add_argument("--lddgan", default=None)  # lddgan_*: thanhluantrinh/LDDGAN checkout
    a = p.parse_args()
    if a.batch is None:
        a.batch = 8 if a.mode == "ae_step" else 16
    if (a.ldm is None) != (a.taming is None):
        p.error("--ldm and --taming go together")
    torch.set_num_threads(a.threads)
    if a.mode == "ae_step":
        return ae_step(a)
    if a.mode.startswith("lddgan_"):
        return lddgan(a)
    if a.mode in ("casdm", "casdm_ckpt"):
        return casdm_step(a, a.mode == "casdm_ckpt")
    if a.mode == "conv":
        return conv(a)
    if a.mode == "inception":
        return inception(a)
    theta, phi = R.make_unet(a, 3).eval(), R.make_unet(a, 4).eval()
    B = a.batch
    x = torch.randn(B, 3, 32, 32)
    t = torch.full((B,), R.T // 2, dtype=torch.long)
    if a.autocast:
        theta, phi, x = channels_last(theta), channels_last(phi), channels_last(x)

    def step():
        with torch.no_grad(), precision(a):
            eps = theta(x, t)
            x0s = R.pred_x0(x, t, eps).clamp(-1, 1)
            o = phi(x0s, t)
            return o

    med, mn, mx = R.timeit(step, 2, a.iters)
    print(json.dumps({"mode": "ddim", "threads": torch.get_num_threads(), "batch": B,
                      "step_s": round(med, 4), "peak_rss_mib": round(R.peak_rss_mib(), 1)}))


def inception(a):
    import os
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import inception_ref
    model = inception_ref.FIDInception().eval()
    x = torch.rand(a.batch, 3, 32, 32)
    med, mn, mx = R.timeit(lambda: inception_ref.features(model, x), 1, a.iters)
    print(json.dumps({"mode": "inception", "threads": torch.get_num_threads(), "batch": a.batch,
                      "step_s": round(med, 4), "peak_rss_mib": round(R.peak_rss_mib(), 1)}))


def use_checkpoint(m):
    """Blocks with a ResBlock run under checkpoint (the RNG state is kept, so
    dropout draws the same mask in the recomputation)."""
    blocks = list(m.input_blocks) + [m.middle_block] + list(m.output_blocks)
    for b in blocks:
        if any(isinstance(layer, R.ResBlock) for layer in b):
            plain = b.forward
            b.forward = lambda x, emb, plain=plain: checkpoint(plain, x, emb, use_reentrant=False)
    return m


def precision(a):
    """bf16 autocast (--autocast) or nothing"""
    return torch.autocast("cpu", dtype=torch.bfloat16) if a.autocast else contextlib.nullcontext()


def channels_last(m):
    return m.to(memory_format=torch.channels_last)


def conv(a):
    """unet_ref.py conv's 3x3 convolution 128->128, 32x32, batch 16"""
    torch.manual_seed(0)
    C, HW, B = 128, 32, a.batch
    m = torch.nn.Conv2d(C, C, 3, padding=1)
    x = torch.randn(B, C, HW, HW)
    if a.autocast:
        m, x = channels_last(m), channels_last(x)

    def fwd():
        with torch.no_grad(), precision(a):
            return m(x)
    xg = x.clone().requires_grad_(True)

    def step():
        with precision(a):
            y = m(xg)
        y.float().sum().backward()
    fm = R.timeit(fwd, 3, 20)[0]
    med = R.timeit(step, 3, 20)[0]
    print(json.dumps({"mode": "conv", "autocast": a.autocast, "threads": torch.get_num_threads(),
                      "batch": B, "fwd_s": round(fm, 5), "step_s": round(med, 5),
                      "peak_rss_mib": round(R.peak_rss_mib(), 1)}))


def casdm_step(a, checkpointed):
    """unet_ref.py's casdm step (Eq. 8-15 of arXiv 2401.02414), optionally checkpointed"""
    torch.manual_seed(0)
    th_, ph_ = R.make_unet(a, 3), R.make_unet(a, 4)
    if checkpointed:
        th_, ph_ = use_checkpoint(th_), use_checkpoint(ph_)
    opt = torch.optim.Adam(list(th_.parameters()) + list(ph_.parameters()), lr=1e-4)
    B = a.batch
    x0 = torch.randn(B, 3, 32, 32).clamp(-1, 1)
    t = torch.randint(0, R.T, (B,))
    if a.autocast:
        th_, ph_, x0 = channels_last(th_), channels_last(ph_), channels_last(x0)

    def step():
        with precision(a):
            loss = casdm_loss(x0, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def casdm_loss(x0, t):
        eps = torch.randn_like(x0)
        xt = R.q_sample(x0, t, eps)
        eps_p = th_(xt, t)
        x0s = R.pred_x0(xt, t, eps_p).detach()
        o = ph_(x0s, t)
        x0p, r = o[:, :3], torch.sigmoid(o[:, 3:4])
        c1, c2 = R.post_coefs(t)
        mu_true = c1 * x0 + c2 * xt
        mu_x0 = (c1 * x0p + c2 * xt).detach()
        mu_eps = (c1 * x0s + c2 * xt).detach()
        return (F.mse_loss(eps_p, eps) + F.mse_loss(x0p, x0)
                + F.mse_loss(r * mu_x0 + (1 - r) * mu_eps, mu_true))

    med, mn, mx = R.timeit(step, 2, a.iters)
    print(json.dumps({"mode": a.mode, "autocast": a.autocast, "threads": torch.get_num_threads(), "batch": B,
                      "step_s": round(med, 4), "peak_rss_mib": round(R.peak_rss_mib(), 1)}))


def ae_ref_modules():
    """tools/ae_ref.py's modules -> (ae, disc, gen_loss, disc_loss): gen_loss(x, step)
    runs the autoencoder and returns the generator loss (optimizer_idx 0);
    disc_loss(x, step) runs a fresh no-grad forward and returns the hinge loss."""
    import os
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import ae_ref as A
    import lpips_ref as L
    ae = A.AutoencoderKL(A.CIFAR10).train()
    disc = A.NLayerDiscriminator(3, 64, 3).train()
    lpips = L.lpips_test_init(L.VGGLPIPS(pool="max")).eval()  # frozen by VGGLPIPS itself
    loss = A.AELoss(lpips, disc, disc_start=0)  # kl_weight 1e-6, disc_weight 0.5

    def sample(moments):
        # DiagonalGaussianDistribution.sample(): mean + exp(logvar / 2) * randn
        return A.posterior_sample(moments, torch.randn_like(moments.chunk(2, dim=1)[0]))

    def gen_loss(x, step):
        moments = ae.encode(x)
        x_rec = ae.decode(sample(moments))
        return loss.generator(x, x_rec, moments, step, ae.decoder.conv_out.weight)[0]

    def disc_loss(x, step):
        with torch.no_grad():
            x_rec = ae.decode(sample(ae.encode(x)))
        return loss.discriminator(x, x_rec, step)[0]

    return ae, disc, gen_loss, disc_loss


def official_modules(ldm_dir, taming_dir):
    """latent-diffusion's AutoencoderKL and LPIPSWithDiscriminator (on taming's LPIPS
    and NLayerDiscriminator), as ae_ref_modules. Stubbed as tools/witness_ldm_loss.py
    does (that file parses argv when imported, so the few lines are repeated here):
    pytorch_lightning (LightningModule is nn.Module), einops (not used by these
    modules), ldm.util (the AutoencoderKL's own lossconfig gives nn.Identity),
    taming.util (its download helper), taming.modules.vqvae.quantize; torchvision's
    VGG16 is built without weights and LPIPS.load_from_pretrained does nothing."""
    import os
    import types
    import torch.nn as nn
    import torchvision
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import ae_ref as A  # only for its CIFAR10 config
    pl = types.ModuleType("pytorch_lightning")
    pl.LightningModule = nn.Module
    sys.modules["pytorch_lightning"] = pl
    einops = types.ModuleType("einops")
    einops.rearrange = einops.repeat = None
    sys.modules["einops"] = einops
    util = types.ModuleType("ldm.util")
    util.instantiate_from_config = lambda cfg: nn.Identity()
    tutil = types.ModuleType("taming.util")
    tutil.get_ckpt_path = lambda *a, **k: None
    quant = types.ModuleType("taming.modules.vqvae.quantize")
    quant.VectorQuantizer2 = None
    sys.path.insert(0, ldm_dir)
    sys.path.insert(0, taming_dir)
    import ldm  # noqa: F401
    import taming  # noqa: F401
    sys.modules["ldm.util"] = util
    sys.modules["taming.util"] = tutil
    sys.modules["taming.modules.vqvae.quantize"] = quant
    _vgg16 = torchvision.models.vgg16
    torchvision.models.vgg16 = lambda *a, **k: _vgg16(weights=None)  # no download
    import taming.modules.losses.lpips as T
    T.models.vgg16 = torchvision.models.vgg16
    T.LPIPS.load_from_pretrained = lambda self, name="vgg_lpips": None
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.modules.losses.contperceptual import LPIPSWithDiscriminator

    cfg = A.CIFAR10
    dd = dict(double_z=True, z_channels=cfg["z_channels"], resolution=cfg["resolution"],
              in_channels=cfg["in_channels"], out_ch=cfg["out_ch"], ch=cfg["ch"],
              ch_mult=list(cfg["ch_mult"]), num_res_blocks=cfg["num_res_blocks"],
              attn_resolutions=list(cfg["attn_resolutions"]), dropout=cfg["dropout"],
              tanh_out=cfg["tanh_out"])
    ae = AutoencoderKL(dd, lossconfig=None, embed_dim=cfg["embed_dim"]).train()
    loss = LPIPSWithDiscriminator(disc_start=0, kl_weight=1e-6, disc_weight=0.5).train()
    loss.perceptual_loss.eval()  # as LPIPSWithDiscriminator builds it: heads' Dropout off
    assert not any(p.requires_grad for p in loss.perceptual_loss.parameters())

    def gen_loss(x, step):
        posterior = ae.encode(x)
        x_rec = ae.decode(posterior.sample())
        return loss(x, x_rec, posterior, 0, step, last_layer=ae.get_last_layer(), split="train")[0]

    def disc_loss(x, step):
        with torch.no_grad():
            posterior = ae.encode(x)
            x_rec = ae.decode(posterior.sample())
        return loss(x, x_rec, posterior, 1, step, last_layer=ae.get_last_layer(), split="train")[0]

    return ae, loss.discriminator, gen_loss, disc_loss


def ae_step(a):
    """One LDDGAN autoencoder iteration: generator step, then discriminator step,
    as Lightning runs AutoencoderKL.training_step with optimizer_idx 0 and 1."""
    torch.manual_seed(0)
    if a.ldm is not None:
        modules = "official"
        # latent-diffusion prints while it builds the modules: to stderr, so that
        # stdout stays the one JSON line
        with contextlib.redirect_stdout(sys.stderr):
            ae, disc, gen_loss, disc_loss = official_modules(a.ldm, a.taming)
    else:
        modules = "ae_ref"
        ae, disc, gen_loss, disc_loss = ae_ref_modules()
    B = a.batch
    lr = 4.5e-6 * B  # LDDGAN's base_learning_rate times the batch
    opt_ae = torch.optim.Adam(ae.parameters(), lr=lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.9))
    x = torch.rand(B, 3, 32, 32) * 2 - 1
    global_step = [0]  # >= disc_start: GAN terms on from the first step

    def step():
        # generator: the discriminator frozen (toggle_optimizer for opt_ae)
        for p in disc.parameters():
            p.requires_grad_(False)
        opt_ae.zero_grad()
        loss = gen_loss(x, global_step[0])
        loss.backward()
        opt_ae.step()
        # discriminator
        for p in disc.parameters():
            p.requires_grad_(True)
        opt_d.zero_grad()
        d_loss = disc_loss(x, global_step[0])
        d_loss.backward()
        opt_d.step()
        global_step[0] += 1

    med, mn, mx = R.timeit(step, 1, a.iters)
    print(json.dumps({"mode": "ae_step", "modules": modules, "threads": torch.get_num_threads(),
                      "batch": B, "step_s": round(med, 4), "peak_rss_mib": round(R.peak_rss_mib(), 1)}))


def official_gan(root):
    """LDDGAN's NCSNpp (run.sh's CIFAR-10 sizes), Discriminator_small and diffusion.py
    from a checkout (lddgan_ref.import_official)."""
    import os
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import lddgan_ref as D
    NCSNpp, Discriminator_small, diffusion = D.import_official(root)
    args = argparse.Namespace(num_channels=4, image_size=16, num_channels_dae=128, ch_mult=[1, 2, 2],
                              num_res_blocks=2, attn_resolutions=[32], nz=50, z_emb_dim=256,
                              n_mlp=4, num_timesteps=4, beta_min=0.1, beta_max=20.0,
                              **D.OFFICIAL_FIXED)
    gen = NCSNpp(args)
    disc = Discriminator_small(nc=8, ngf=64, t_emb_dim=256, act=torch.nn.LeakyReLU(0.2), num_layers=3)
    coeff = diffusion.Diffusion_Coefficients(args, "cpu")
    post = diffusion.Posterior_Coefficients(args, "cpu")
    return gen, disc, (lambda x0, t: diffusion.q_sample_pairs(coeff, x0, t)), \
        (lambda x0, x, t: diffusion.sample_posterior(post, x0, x, t))


def ref_gan():
    """tools/lddgan_ref.py's modules (float32), the same computation with our own noise."""
    import os
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import lddgan_ref as D
    s = {k: v.float() for k, v in D.gan_schedule(4, 0.1, 20.0).items()}
    randn = torch.randn
    return D.NCSNpp(), D.DiscriminatorSmall(8, 64, 256, 3), \
        (lambda x0, t: D.q_sample_pairs(s, x0, t, randn(x0.shape), randn(x0.shape))), \
        (lambda x0, x, t: D.sample_posterior(s, x0, x, t, randn(x0.shape)))


def lddgan(a):
    """LDDGAN's stage two at its CIFAR-10 config, as train_ldgan.py:192-280 runs it:
    lddgan_d_step_r1, the D step of a lazy-regularisation step (softplus on D(x_t),
    R1 by autograd.grad(create_graph=True), the generator's fake under no_grad, backward,
    Adam (0.5, 0.9)); lddgan_g_step, the G step (D frozen, softplus(-D(fake)) + alpha L1,
    backward, Adam, EMA 0.9999 as EMA.py); lddgan_sample100, test_ldgan.py's sampling of
    100 images: sample_from_model's 4 calls, then AutoencoderKL.decode(x * 105) (ae_ref's
    AutoencoderKL, or latent-diffusion's with --ldm/--taming). --lddgan LDDGAN: the
    official NCSNpp, Discriminator_small and diffusion.py; else tools/lddgan_ref.py's."""
    import os
    torch.manual_seed(0)
    if a.lddgan:
        modules = "official"
        with contextlib.redirect_stdout(sys.stderr):
            gen, disc, pairs, posterior = official_gan(a.lddgan)
    else:
        modules = "lddgan_ref"
        gen, disc, pairs, posterior = ref_gan()
    B = 100 if a.mode == "lddgan_sample100" else a.batch
    x0 = torch.rand(B, 4, 16, 16) * 2 - 1
    if a.mode == "lddgan_sample100":
        gen.eval()
        if a.ldm:
            with contextlib.redirect_stdout(sys.stderr):
                ae = official_modules(a.ldm, a.taming)[0].eval()
        else:
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            import ae_ref as A
            ae = A.AutoencoderKL(A.CIFAR10).eval()

        def step():
            with torch.no_grad():
                x = torch.randn(B, 4, 16, 16)
                for i in reversed(range(4)):
                    t = torch.full((B,), i, dtype=torch.int64)
                    x = posterior(gen(x, t, torch.randn(B, 50)), x, t)
                return ae.decode(x * 105.0)
        warm = 1
    elif a.mode == "lddgan_d_step_r1":
        opt = torch.optim.Adam(disc.parameters(), lr=1.25e-4, betas=(0.5, 0.9))
        for p in gen.parameters():
            p.requires_grad_(False)

        def step():
            disc.zero_grad()
            t = torch.randint(0, 4, (B,))
            x_t, x_tp1 = pairs(x0, t)
            x_t.requires_grad_(True)
            real = disc(x_t, t, x_tp1.detach()).view(-1)
            err_real = F.softplus(-real).mean()
            err_real.backward(retain_graph=True)
            g, = torch.autograd.grad(real.sum(), x_t, create_graph=True)
            r1 = 0.02 / 2 * g.view(B, -1).norm(2, dim=1).pow(2).mean()
            r1.backward()
            x_pos = posterior(gen(x_tp1.detach(), t, torch.randn(B, 50)), x_tp1, t)
            F.softplus(disc(x_pos, t, x_tp1.detach()).view(-1)).mean().backward()
            opt.step()
        warm = 2
    else:
        opt = torch.optim.Adam(gen.parameters(), lr=1.6e-4, betas=(0.5, 0.9))
        ema = [p.detach().clone() for p in gen.parameters()]
        for p in disc.parameters():
            p.requires_grad_(False)

        def step():
            gen.zero_grad()
            t = torch.randint(0, 4, (B,))
            x_t, x_tp1 = pairs(x0, t)
            x0p = gen(x_tp1.detach(), t, torch.randn(B, 50))
            err = F.softplus(-disc(posterior(x0p, x_tp1, t), t, x_tp1.detach()).view(-1)).mean()
            err = err + 0.5 * F.l1_loss(x0p, x0)
            err.backward()
            opt.step()
            with torch.no_grad():
                for e, p in zip(ema, gen.parameters()):
                    e.mul_(0.9999).add_(p, alpha=1 - 0.9999)
        warm = 2
    med, mn, mx = R.timeit(step, warm, a.iters)
    print(json.dumps({"mode": a.mode, "modules": modules, "threads": torch.get_num_threads(),
                      "batch": B, "step_s": round(med, 4), "peak_rss_mib": round(R.peak_rss_mib(), 1)}))

if __name__ == "__main__":
    main()
