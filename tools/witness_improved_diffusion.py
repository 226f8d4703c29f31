#!/usr/bin/python3
"""Checks tools/casdm_ref.py against openai/improved-diffusion's own code (a second
witness for the U-Net and the schedule coefficients). Prints the results; writes nothing.

Needs an unpacked checkout of https://github.com/openai/improved-diffusion (not part of
this repository; its code is imported from that path, never copied here):
    /usr/bin/python3 tools/witness_improved_diffusion.py /tmp/idiff
Only improved_diffusion/{unet,nn,fp16_util,gaussian_diffusion,losses}.py are imported,
which need nothing beyond torch and numpy (dist_util's mpi4py is never touched).

Checks:
  1. the tiny golden configuration (tools/make_casdm_goldens.py): identical state_dict keys
     and shapes; with casdm_ref.test_init weights loaded into their UNetModel
     (load_state_dict strict), forward outputs and input/parameter gradients agree;
  2. parameter counts of the paper's CIFAR-10 network (128 channels, mult 1,2,2,2,
     3 res blocks, attention at 16 and 8 => ds {2,4}, 4 heads);
  3. cosine/linear betas and the posterior-mean / x0-from-eps coefficients agree with
     their GaussianDiffusion in float64, and mu from eps (k1, k2) equals
     posterior_mean(x0_from_eps);
  4. their GaussianDiffusion.training_losses (MSE, eps and x0 targets) equals train_losses
     for ddpm-eps / ddpm-x0 with P2 off (they have no P2 weighting).
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import casdm_ref as R  # noqa: E402


def their_unet(U, in_ch, model_ch, out_ch, nres, ds, mult, heads, dropout):
    return U(in_channels=in_ch, model_channels=model_ch, out_channels=out_ch, num_res_blocks=nres,
             attention_resolutions=set(ds), dropout=dropout, channel_mult=tuple(mult),
             conv_resample=True, dims=2, num_classes=None, use_checkpoint=False,
             num_heads=heads, use_scale_shift_norm=True)


def nparams(net):
    return sum(p.numel() for p in net.parameters())


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.path.insert(0, os.path.abspath(sys.argv[1]))
    from improved_diffusion.unet import UNetModel  # noqa: E402  (their code, from the checkout)
    import improved_diffusion.gaussian_diffusion as gd  # noqa: E402
    torch.set_num_threads(1)
    ok = True

    # 1. tiny golden configuration, both output widths used by the goldens
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    t_in = R.rescale_t([7, 3985], 4000)
    for out_ch in (3, 4, 7):
        mine = R.test_init(R.UNet(3, 32, out_ch, 1, {2}, (1, 1), 2, 0.0), "theta")
        theirs = their_unet(UNetModel, 3, 32, out_ch, 1, {2}, (1, 1), 2, 0.0)
        ks = {k: tuple(v.shape) for k, v in mine.state_dict().items()}
        kt = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
        same_keys = ks == kt and list(ks) == list(kt)
        theirs.load_state_dict(mine.state_dict(), strict=True)
        xm, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        om, ot = mine(xm, t_in), theirs(xt, t_in)
        fwd = (om - ot).abs().max().item()
        proj = torch.randn(om.shape)
        (om * proj).sum().backward()
        (ot * proj).sum().backward()
        dx = (xm.grad - xt.grad).abs().max().item()
        pt = dict(theirs.named_parameters())
        dp = max((p.grad - pt[k].grad).abs().max().item() for k, p in mine.named_parameters())
        gmax = max(p.grad.abs().max().item() for p in mine.parameters())
        print(f"tiny out_ch {out_ch}: params mine {nparams(mine)} theirs {nparams(theirs)}; "
              f"same keys/order/shapes {same_keys}; |out| max {om.abs().max().item():.4g}; "
              f"max abs diff forward {fwd:.3g}, d/dx {dx:.3g}, d/dparams {dp:.3g} (max |grad| {gmax:.3g})")
        ok &= same_keys and fwd < 1e-5 and dx < 1e-5 and dp < 1e-5 * max(1.0, gmax)

    # 2. the paper's CIFAR-10 network
    mine = R.UNet(3, 128, 3, 3, {2, 4}, (1, 2, 2, 2), 4, 0.1)
    theirs = their_unet(UNetModel, 3, 128, 3, 3, {2, 4}, (1, 2, 2, 2), 4, 0.1)
    same = [(k, tuple(v.shape)) for k, v in mine.state_dict().items()] == \
           [(k, tuple(v.shape)) for k, v in theirs.state_dict().items()]
    print(f"CIFAR-10 theta: params mine {nparams(mine)} theirs {nparams(theirs)}; "
          f"same keys/order/shapes {same}")
    ok &= same and nparams(mine) == nparams(theirs)
    for name, oc in (("phi (out C+1)", 4), ("dual theta (out 2C+1)", 7)):
        print(f"CIFAR-10 {name}: params mine {nparams(R.UNet(3, 128, oc, 3, {2, 4}, (1, 2, 2, 2), 4, 0.1))}")

    # 3. schedules and coefficients in float64
    for sched, T in (("cosine", 4000), ("linear", 1000), ("cosine", 1000)):
        S = R.schedule_arrays(sched, T)
        D = gd.GaussianDiffusion(betas=gd.get_named_beta_schedule(sched, T),
                                 model_mean_type=gd.ModelMeanType.EPSILON,
                                 model_var_type=gd.ModelVarType.FIXED_SMALL,
                                 loss_type=gd.LossType.MSE, rescale_timesteps=True)
        b, a, ab, abp = S["betas"], S["alphas"], S["abar"], S["abar_prev"]
        c1 = np.sqrt(abp) * b / (1 - ab)
        c2 = np.sqrt(a) * (1 - abp) / (1 - ab)
        a1, a2 = 1 / np.sqrt(ab), np.sqrt(1 - ab) / np.sqrt(ab)
        k1, k2 = 1 / np.sqrt(a), b / (np.sqrt(1 - ab) * np.sqrt(a))

        def rel(u, v):
            d = np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64))
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                return float(np.max(np.where(d == 0, 0.0, d / np.maximum(np.abs(v), 1e-300))))
        r = {"betas": rel(b, D.betas), "abar": rel(ab, D.alphas_cumprod),
             "c1": rel(c1, D.posterior_mean_coef1), "c2": rel(c2, D.posterior_mean_coef2),
             "a1": rel(a1, D.sqrt_recip_alphas_cumprod), "a2": rel(a2, D.sqrt_recipm1_alphas_cumprod),
             "k1=c1*a1+c2": rel(c1 * a1 + c2, k1), "k2=c1*a2": rel(c1 * a2, k2)}
        tt = torch.tensor([0, 7, T // 2, T - 15])
        rt = rel(R.rescale_t(tt.numpy(), T).numpy(), D._scale_timesteps(tt).numpy())
        print(f"{sched} T={T}: max relative diff " + ", ".join(f"{k} {v:.2g}" for k, v in r.items())
              + f", t_in {rt:.2g}")
        ok &= max(r.values()) < 1e-9 and rt < 1e-6
    # 4. their training loss (no P2) equals ours with p2_gamma 0, eps and x0 targets
    noise = torch.randn(2, 3, 16, 16)
    t = torch.tensor([7, 3985])
    for variant, mtype in (("ddpm-eps", gd.ModelMeanType.EPSILON), ("ddpm-x0", gd.ModelMeanType.START_X)):
        mine = R.test_init(R.UNet(3, 32, 3, 1, {2}, (1, 1), 2, 0.0), "theta")
        theirs = their_unet(UNetModel, 3, 32, 3, 1, {2}, (1, 1), 2, 0.0)
        theirs.load_state_dict(mine.state_dict(), strict=True)
        D = gd.GaussianDiffusion(betas=gd.get_named_beta_schedule("cosine", 4000), model_mean_type=mtype,
                                 model_var_type=gd.ModelVarType.FIXED_SMALL,
                                 loss_type=gd.LossType.MSE, rescale_timesteps=True)
        lt = D.training_losses(theirs, x, t, noise=noise)["loss"].mean().item()
        lm = R.train_losses(variant, {"theta": mine}, x, t.numpy(), noise, 4000, "cosine", 0.0, 1.0)["loss"].item()
        print(f"{variant} training loss (P2 off), cosine T=4000, t=[7,3985]: mine {lm:.8g} theirs {lt:.8g}")
        ok &= abs(lm - lt) < 1e-6 * abs(lt)

    print("WITNESS OK" if ok else "WITNESS MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
