#!/usr/bin/python3
"""Writes the goldens of tests/test_fid.c: tests/goldens/fid.safetensors and two
small statistics files as numpy writes them (tests/goldens/stats_savez.npz by
np.savez, tests/goldens/stats_compressed.npz by np.savez_compressed, the call of
pytorch-fid's --save-stats).

fid.safetensors keys:
  <case>/pool3, <case>/spatial, <case>/logits  tools/inception_ref.py on the test
      weights (inception_ref.test_values) in float64, for the images
      inception_ref.test_images(case, ...): c32 (2 x 32x32), c45x37 (1 x 45x37),
      c299 (1 x 299x299, no resize)
  fd/<pair>   pytorch-fid's calculate_frechet_distance formula with scipy.linalg.sqrtm
              on feature sets made by feature_set() below (np.mean, np.cov):
              AB (2048-d, 3000 vs 2500 samples), AC (C: 1000 samples, a singular
              covariance), ab (64-d)
  fd/<pair>_eig  the same from numpy's eigenvalues of S1 S2 (a second method)
  is/mean, is/std  improved-gan's inception score, 10 splits, of test logits
Run from the repository root (needs python3-torch, python3-scipy):
    /usr/bin/python3 tools/make_fid_goldens.py
Not needed by the build or CI: the outputs are committed.
"""
import os
import sys

import numpy as np
import torch
from scipy import linalg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import inception_ref as R  # noqa: E402
import lpips_ref  # noqa: E402
import st  # noqa: E402

OUT = "tests/goldens"


def base(name, n):
    u = lpips_ref._mix_bits(lpips_ref.fnv1a64(name), np.arange(n, dtype=np.uint64), "splitmix64")
    return (u.astype(np.float64) / float(1 << 24) - 0.5) * 2.0


def feature_set(name, n, d, offset, latents=16):
    """x = max(0, offset + sum_k z[:, k] M[k] / (1 + k) + 0.3 noise) in float64, then
    float32; z from "fid.latent.<name>", M from "fid.mix.<d>", noise from
    "fid.noise.<name>" (the operations and their order are the C test's)."""
    z = base("fid.latent." + name, n * latents).reshape(n, latents)
    m = base("fid.mix.%d" % d, latents * d).reshape(latents, d)
    noise = base("fid.noise." + name, n * d).reshape(n, d)
    acc = np.full((n, d), offset)
    for k in range(latents):
        acc = acc + z[:, k:k + 1] * (m[k:k + 1, :] * (1.0 / (1 + k)))
    acc = acc + 0.3 * noise
    return np.maximum(acc, 0.0).astype(np.float32)


def stats(x):
    x = x.astype(np.float64)
    return np.mean(x, axis=0), np.cov(x, rowvar=False)


def fid_scipy(mu1, s1, mu2, s2):  # pytorch-fid's calculate_frechet_distance
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(s1.dot(s2), disp=False)
    if not np.isfinite(covmean).all():
        off = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + off).dot(s2 + off))
    covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fid_eig(mu1, s1, mu2, s2):
    ev = np.linalg.eigvals(s1.dot(s2)).real
    tr = np.sqrt(np.clip(ev, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * tr)


def inception_score(logits, splits=10):  # improved-gan inception_score/model.py
    p = torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()
    n, scores = len(p), []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores)), float(np.std(scores))


def main():
    torch.set_num_threads(2)
    G = {}
    model = R.FIDInception()
    model.load_state_dict(R.test_state_dict(model), strict=True)
    model = model.double().eval()
    for case, (n, h, w) in {"c32": (2, 32, 32), "c45x37": (1, 45, 37),
                            "c299": (1, 299, 299)}.items():
        x = torch.from_numpy(R.test_images(case, n, h, w)).double()
        pool3, spatial, logits = R.features(model, x)
        G[case + "/pool3"], G[case + "/spatial"], G[case + "/logits"] = pool3, spatial, logits
        print(case, "pool3 mean %.4f max %.4f" % (pool3.mean().item(), pool3.max().item()),
              "logits std %.4f" % logits.std().item())

    sets = {"A": (3000, 2048, 0.2), "B": (2500, 2048, 0.3), "C": (1000, 2048, 0.2),
            "a": (300, 64, 0.2), "b": (200, 64, 0.25)}
    S = {k: stats(feature_set(k, *v)) for k, v in sets.items()}
    for pair in ("AB", "AC", "ab"):
        (m1, s1), (m2, s2) = S[pair[0]], S[pair[1]]
        f, e = fid_scipy(m1, s1, m2, s2), fid_eig(m1, s1, m2, s2)
        G["fd/" + pair], G["fd/" + pair + "_eig"] = np.array([f]), np.array([e])
        print("fd", pair, "scipy %.6f eig %.6f" % (f, e))

    logits = (base("fid.is.logits", 500 * 1008) * 4.0).astype(np.float32).reshape(500, 1008)
    m, s = inception_score(logits)
    G["is/mean"], G["is/std"] = np.array([m]), np.array([s])
    print("is %.6f +- %.6f" % (m, s))
    st.save(os.path.join(OUT, "fid.safetensors"), G,
            {"producer": "tools/make_fid_goldens.py", "torch": torch.__version__})

    # statistics files as numpy writes them: mu (8,), sigma (8, 8) of feature set "a"'s
    # first 8 dimensions, float64
    x = feature_set("a", *sets["a"])[:, :8]
    mu, sigma = stats(x)
    np.savez(os.path.join(OUT, "stats_savez.npz"), mu=mu, sigma=sigma)
    np.savez_compressed(os.path.join(OUT, "stats_compressed.npz"), mu=mu, sigma=sigma)
    print("stats mu[0] %.17g sigma[0,1] %.17g" % (mu[0], sigma[0, 1]))


if __name__ == "__main__":
    main()
