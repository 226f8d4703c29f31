"""Inception-v3 as pytorch-fid runs it, written out in PyTorch for casdm's tests.

The module tree and parameter names are those of pytorch-fid's fid_inception_v3()
(mseitzer/pytorch-fid, src/pytorch_fid/inception.py: torchvision's Inception3 with
num_classes=1008, aux_logits=False and its FIDInceptionA/C/E_1/E_2 blocks), so a
state_dict of pytorch-fid's pt_inception-2015-12-05-6726825d.pth loads into it
strictly. Written here, not imported, so that it can be checked against the real
module (tools/witness_pytorch_fid.py) and the goldens do not depend on it.

features(model, x) returns what fid.c computes from images x (N,3,H,W) in [0,1]:
  pool3    (N, 2048)  the final average pool (FID)
  spatial  (N, 2023)  Mixed_6d.branch1x1 after its ReLU, channels 0-6, flattened
                      in (H, W, C) order: TF's "mixed_6/conv:0"[..., :7] (sFID)
  logits   (N, 1008)  pool3 @ fc.weight^T, no bias (TF "softmax/logits/MatMul", IS)
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import lpips_ref


class BasicConv2d(nn.Module):
    """torchvision's: conv without bias, BatchNorm2d(eps=0.001), ReLU."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_valid(x):  # TF's SAME average pool: padded zeros are not counted
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(avg_valid(x))
        return torch.cat([a, b, c, d], 1)


class BlockB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)
        self.tap = None  # set to a list to receive branch1x1's output

    def forward(self, x):
        a = self.branch1x1(x)
        if self.tap is not None:
            self.tap.append(a)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = x
        for m in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                  self.branch7x7dbl_4, self.branch7x7dbl_5):
            c = m(c)
        d = self.branch_pool(avg_valid(x))
        return torch.cat([a, b, c, d], 1)


class BlockD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = x
        for m in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b = m(b)
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool  # FIDInceptionE_2 max-pools where E_1 averages
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        t = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(t), self.branch3x3_2b(t)], 1)
        t = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(t), self.branch3x3dbl_3b(t)], 1)
        p = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_valid(x)
        return torch.cat([a, b, c, self.branch_pool(p)], 1)


class FIDInception(nn.Module):
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, False)
        self.Mixed_7c = BlockE(2048, True)
        self.fc = nn.Linear(2048, 1008)

    def trunk(self, x):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for m in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                  self.Mixed_7c):
            x = m(x)
        return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


def features(model, x):
    tap = []
    model.Mixed_6d.tap = tap
    with torch.no_grad():
        pool3 = model.trunk(x)
        logits = pool3 @ model.fc.weight.t()
    model.Mixed_6d.tap = None
    spatial = tap[0][:, :7].permute(0, 2, 3, 1).reshape(x.shape[0], -1)
    return pool3, spatial, logits


def test_values(name, shape):
    """float32 test values of tensor `name` (a state_dict key), regenerable in C
    (tests/test_fid.c): h = fnv1a64("inception." + name), base in [-1, 1) as
    lpips_ref.lpips_test_values. conv weights base*sqrt(6/fan_in); bn.weight and
    bn.running_var 1 + 0.2 base; bn.bias, bn.running_mean 0.1 base; fc.weight
    base*sqrt(6/2048); fc.bias 0.01 base."""
    n = int(np.prod(shape))
    u = lpips_ref._mix_bits(lpips_ref.fnv1a64("inception." + name), np.arange(n, dtype=np.uint64),
                            "splitmix64")
    base = (u.astype(np.float64) / float(1 << 24) - 0.5) * 2.0
    if name.endswith("conv.weight"):
        val = base * math.sqrt(6.0 / (shape[1] * shape[2] * shape[3]))
    elif name.endswith("bn.weight") or name.endswith("bn.running_var"):
        val = 1.0 + 0.2 * base
    elif name.endswith("bn.bias") or name.endswith("bn.running_mean"):
        val = 0.1 * base
    elif name == "fc.weight":
        val = base * math.sqrt(6.0 / 2048)
    else:
        val = 0.01 * base
    return val.astype(np.float32).reshape(shape)


def test_state_dict(model):
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            sd[k] = v
        else:
            sd[k] = torch.from_numpy(test_values(k, tuple(v.shape)))
    return sd


def test_images(case, n, h, w):
    """(n,3,h,w) float32 in [0,1): (base + 1)/2 of fnv1a64("inception.images." + case)."""
    u = lpips_ref._mix_bits(lpips_ref.fnv1a64("inception.images." + case),
                            np.arange(n * 3 * h * w, dtype=np.uint64), "splitmix64")
    base = (u.astype(np.float64) / float(1 << 24) - 0.5) * 2.0
    return ((base + 1.0) * 0.5).astype(np.float32).reshape(n, 3, h, w)
