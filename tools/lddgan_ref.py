"""PyTorch reference for casdm's denoising-diffusion GAN (LDDGAN stage two, lddgan.c),
written for this project from the official code's definitions (read, not copied):
score_sde's op/upfirdn2d.py (upfirdn2d_native) and models/up_or_down_sampling.py
(_setup_kernel, upsample_2d, downsample_2d), and DDGAN's score_models (PixelNorm in
ncsnpp_generator_adagn.py, the minibatch standard deviation of discriminator.py),
as thanhluantrinh/LDDGAN ships them. So far the ops; the networks follow.
Needs Debian's python3-torch; run with /usr/bin/python3.

  upfirdn2d(x, k, up, down, pad0, pad1)  each plane: up - 1 zeros after every sample,
        padded by pad0 before and pad1 after on both axes (negative: cropped), a true 2-D
        convolution with k (conv2d with the flipped kernel), every down-th sample kept
  fir_kernel(k)        outer(k, k) / sum (the 1-D [1, 3, 3, 1] of NCSN++)
  upsample_2d(x, k)    upfirdn2d(x, fir_kernel(k) * gain * factor^2, up=factor,
        pads ((p + 1) // 2 + factor - 1, p // 2)), p = len(k) - factor
  downsample_2d(x, k)  upfirdn2d(x, fir_kernel(k) * gain, down=factor,
        pads ((p + 1) // 2, p // 2))
  pixel_norm(x)        x / sqrt(mean(x^2, dim=1) + 1e-8)
  minibatch_std(x, G)  StyleGAN2's layer with stddev_feat 1: view(G, -1, 1, C, H, W),
        sqrt(biased var over the group + 1e-8), mean over (C, H, W), repeated to every
        sample of the group and concatenated as one more channel
"""
import numpy as np
import torch
import torch.nn.functional as F


def upfirdn2d(x, k, up=1, down=1, pad0=0, pad1=0):
    N, C, H, W = x.shape
    K = k.shape[0]
    y = x.reshape(N * C, 1, H, 1, W, 1)
    y = F.pad(y, [0, up - 1, 0, 0, 0, up - 1]).reshape(N * C, 1, H * up, W * up)  # zero-stuffed
    y = F.pad(y, [max(pad0, 0), max(pad1, 0), max(pad0, 0), max(pad1, 0)])
    y = y[:, :, max(-pad0, 0):y.shape[2] - max(-pad1, 0), max(-pad0, 0):y.shape[3] - max(-pad1, 0)]
    y = F.conv2d(y, torch.flip(k, [0, 1]).reshape(1, 1, K, K).to(x.dtype))
    y = y[:, :, ::down, ::down]
    return y.reshape(N, C, y.shape[2], y.shape[3])


def fir_kernel(k):
    k = np.asarray(k, dtype=np.float32)
    k = np.outer(k, k)
    return torch.from_numpy(k / np.sum(k))


def upsample_2d(x, k=(1, 3, 3, 1), factor=2, gain=1):
    kk = fir_kernel(k) * (gain * factor ** 2)
    p = kk.shape[0] - factor
    return upfirdn2d(x, kk, up=factor, pad0=(p + 1) // 2 + factor - 1, pad1=p // 2)


def downsample_2d(x, k=(1, 3, 3, 1), factor=2, gain=1):
    kk = fir_kernel(k) * gain
    p = kk.shape[0] - factor
    return upfirdn2d(x, kk, down=factor, pad0=(p + 1) // 2, pad1=p // 2)


def pixel_norm(x):
    return x / torch.sqrt(torch.mean(x ** 2, dim=1, keepdim=True) + 1e-8)


def minibatch_std(x, group=4):
    N, C, H, W = x.shape
    G = min(N, group)
    s = x.view(G, -1, 1, C, H, W)
    s = torch.sqrt(s.var(0, unbiased=False) + 1e-8)
    s = s.mean([2, 3, 4], keepdim=True).squeeze(2)
    return torch.cat([x, s.repeat(G, 1, H, W)], 1)
