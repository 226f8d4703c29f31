#!/usr/bin/python3
"""PyTorch reference run of `casdm train`: the same model, data, random stream,
losses and Adam, so that its log.csv can be plotted next to the C program's.

It starts from a checkpoint the C program wrote (normally after --steps 0): the
raw weights theta (and phi for casdm), the model config and the PCG32 state are
taken from it, and the C training loop's random stream is replayed exactly
(per step: for each image rng_below(N) then, when flipping, one rng_u32 for
the flip bit (CIFAR: unless --no-flip; IDX: only with --flip); then rng_below(T) per image; then Box-Muller normals for the
noise). The losses are casdm_ref.py's, in float32. Needs --dropout 0 (dropout
masks would draw from the same stream) and no --lpips.

A step-0 checkpoint holds exactly the state a fresh run with the same flags
starts from (the RNG is only used by the initialisation before the loop), so
the C run can simply be a fresh run with the same flags and seed:

  F=(--data data/fashion-mnist/train-images-idx3-ubyte --model casdm --ch 32 --res 1 --attn ''
     --mult 1,2,2 --T 1000 --dropout 0 --batch 32 --lr 1e-3 --log-every 10 --sample-n 0)  # bash array
  ./casdm train "${F[@]}" --steps 0 --out runs/init
  ./casdm train "${F[@]}" --steps 500 --out runs/c
  /usr/bin/python3 tools/train_ref.py --init runs/init/ckpt.safetensors "${F[@]}" --steps 500 --out runs/torch

Or, equivalently, `./casdm train "${F[@]}" --steps 500 --resume runs/init --out runs/c`.
Threads: `./casdm --threads N
train ...` (a global option), `train_ref.py ... --threads N`.
Both write OUT/log.csv: step,loss,l_eps,l_x0,l_mu,l_lpips,img_per_s, each row
the mean over the last --log-every steps; img_per_s is each program's own.
Flags of `casdm train` that do not change the losses (--seed, --ema,
--ckpt-every, --sample-*) are accepted and ignored, so the same $F can be used.
Model flags (--model, --ch, ...) are optional; given, they must agree with the
checkpoint's metadata.
"""
import argparse
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import casdm_ref as R  # noqa: E402
import st  # noqa: E402

M64 = (1 << 64) - 1
MUL = 6364136223846793005


class Pcg32:
    """tensor.c's PCG32 (XSH RR) from a saved (state, inc); the normals are vectorised
    with LCG jump-ahead: state_k = A_k s + C_k (mod 2^64)."""

    def __init__(self, state, inc):
        self.state, self.inc, self.tables = state, inc, {}

    def u32(self):
        old = self.state
        self.state = (old * MUL + self.inc) & M64
        x = (((old >> 18) ^ old) >> 27) & 0xFFFFFFFF
        rot = old >> 59
        return ((x >> rot) | (x << ((32 - rot) & 31))) & 0xFFFFFFFF

    def below(self, n):  # rng_below: rejection below (2^32 - n) % n, then x % n
        threshold = ((1 << 32) - n) % n
        while True:
            x = self.u32()
            if x >= threshold:
                return x % n

    def _table(self, m):  # A_k, C_k for k = 0..m, by doubling
        if m not in self.tables:
            A, C = np.ones(1, np.uint64), np.zeros(1, np.uint64)
            while len(A) < m + 1:
                AL = np.uint64((int(A[-1]) * MUL) & M64)                  # A_L, L = len(A)
                CL = np.uint64((int(C[-1]) * MUL + self.inc) & M64)       # C_L
                A, C = np.concatenate([A, A * AL]), np.concatenate([C, C * AL + CL])
            self.tables[m] = (A[:m + 1], C[:m + 1])
        return self.tables[m]

    def u32s(self, m):
        A, C = self._table(m)
        old = A[:m] * np.uint64(self.state) + C[:m]
        self.state = (int(A[m]) * self.state + int(C[m])) & M64
        x = (((old >> np.uint64(18)) ^ old) >> np.uint64(27)).astype(np.uint32)
        rot = (old >> np.uint64(59)).astype(np.uint32)
        return (x >> rot) | (x << ((np.uint32(32) - rot) & np.uint32(31)))

    def normals(self, n):  # rng_fill_normal(mean 0, std 1): 4 words per value
        w = self.u32s(4 * n).reshape(n, 4).astype(np.uint64)
        u = [(((w[:, i] << np.uint64(32)) | w[:, i + 1]) >> np.uint64(11)).astype(np.float64) + 0.5
             for i in (0, 2)]
        u1, u2 = u[0] * (1.0 / 9007199254740992.0), u[1] * (1.0 / 9007199254740992.0)
        return (np.sqrt(-2.0 * np.log(u1)) * np.cos(6.283185307179586 * u2)).astype(np.float32)


def load_data(path):
    """uint8 (N, C, S, S) as casdm.c's load_dataset: CIFAR-10 dir / .bin, or IDX
    padded; and whether casdm flips by default (CIFAR yes, IDX no)."""
    def cifar(p):
        b = np.fromfile(p, np.uint8)
        if b.size == 0 or b.size % 3073:
            sys.exit(f"train_ref: '{p}' is not a CIFAR-10 binary batch")
        return b.reshape(-1, 3073)[:, 1:].reshape(-1, 3, 32, 32)
    if os.path.isdir(path):
        files = [f"{path}/data_batch_{i}.bin" for i in range(1, 6) if os.path.exists(f"{path}/data_batch_{i}.bin")]
        if not files:
            sys.exit(f"train_ref: no data_batch_N.bin in '{path}' (folders of images: not supported here)")
        return np.concatenate([cifar(f) for f in files]), True
    if path.endswith(".bin"):
        return cifar(path), True
    if "idx3-ubyte" not in path:
        sys.exit(f"train_ref: --data '{path}' is not CIFAR-10 nor an IDX *-idx3-ubyte file")
    b = np.fromfile(path, np.uint8)
    magic, n, rows, cols = (int.from_bytes(b[i:i + 4].tobytes(), "big") for i in (0, 4, 8, 12))
    if magic != 0x803 or b.size != 16 + n * rows * cols:
        sys.exit(f"train_ref: '{path}' is not an uncompressed IDX image file")
    side = (max(rows, cols) + 7) // 8 * 8
    out = np.zeros((n, 1, side, side), np.uint8)
    oy, ox = (side - rows) // 2, (side - cols) // 2
    out[:, 0, oy:oy + rows, ox:ox + cols] = b[16:].reshape(n, rows, cols)
    return out, False


def draw_batch(data, rng, B, flip):
    idx, fl = [], []
    for _ in range(B):
        idx.append(rng.below(data.shape[0]))
        fl.append(rng.u32() & 1 if flip else 0)
    x = data[idx].copy()
    for b in range(B):
        if fl[b]:
            x[b] = x[b, :, :, ::-1].copy()
    return x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)   # as C: float division


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--init", required=True, help="checkpoint written by casdm train (e.g. --steps 0)")
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=1000, help="total steps, counting the checkpoint's")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--grad-clip", type=float, default=0.0)
    p.add_argument("--no-flip", action="store_true")
    p.add_argument("--flip", action="store_true")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--out", default="runs/train_ref")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--autocast", action="store_true",
                   help="bf16 autocast with channels_last networks (the reference for casdm --precision bf16)")
    # model config: taken from the checkpoint; given, must agree with it
    for f, ty in (("--model", str), ("--ch", int), ("--res", int), ("--attn", str), ("--mult", str),
                  ("--heads", int), ("--dropout", float), ("--T", int), ("--schedule", str),
                  ("--p2-gamma", float), ("--p2-k", float)):
        p.add_argument(f, type=ty)
    p.add_argument("--no-clip-x0", action="store_true")
    for f in ("--seed", "--ema", "--ckpt-every", "--sample-every", "--sample-n", "--sample-steps"):
        p.add_argument(f, help="ignored (does not change the losses)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    tensors, meta = st.load(a.init)
    kind, S, C = meta["model"], int(meta["image_size"]), int(meta["in_channels"])
    T, sched = int(meta["diffusion_steps"]), meta["noise_schedule"]
    p2g, p2k, clip_x0 = float(meta["p2_gamma"]), float(meta["p2_k"]), meta["clip_x0"] == "1"
    if a.mult == "":  # casdm's '' = improved-diffusion's default for the size
        a.mult = {256: "1,1,2,2,4,4", 64: "1,2,3,4"}.get(S, "1,2,2,2")
    want = {"model": (a.model, kind), "ch": (a.ch, int(meta["model_channels"])),
            "res": (a.res, int(meta["num_res_blocks"])), "attn": (a.attn, meta["attention_resolutions"]),
            "mult": (a.mult, meta["channel_mult"]), "heads": (a.heads, int(meta["num_heads"])),
            "dropout": (a.dropout, float(meta["dropout"])), "T": (a.T, T), "schedule": (a.schedule, sched),
            "p2-gamma": (a.p2_gamma, p2g), "p2-k": (a.p2_k, p2k),
            "no-clip-x0": (a.no_clip_x0 or None, not clip_x0)}
    bad = [f"--{k} {g!r} (checkpoint: {c!r})" for k, (g, c) in want.items()
           if g is not None and (g != c if not isinstance(g, float) else abs(g - c) > 1e-6 * abs(c))]
    if bad:
        sys.exit(f"train_ref: flags disagree with {a.init}: " + "; ".join(bad))
    if float(meta["dropout"]) != 0.0:
        sys.exit("train_ref: the checkpoint has dropout > 0; only --dropout 0 replays the C random stream")
    data, flip_default = load_data(a.data)
    flip = a.flip or (flip_default and not a.no_flip)
    if data.shape[1:] != (C, S, S):
        sys.exit(f"train_ref: --data has images {data.shape[1:]}, the checkpoint {(C, S, S)}")

    mult = tuple(int(m) for m in meta["channel_mult"].split(","))
    attn = {S // int(r) for r in meta["attention_resolutions"].split(",") if r}
    outs = {"ddpm-eps": C, "ddpm-x0": C, "dual": 2 * C + 1, "casdm": C}
    netnames = ("theta", "phi") if kind == "casdm" else ("theta",)
    nets = {n: R.UNet(C, int(meta["model_channels"]), outs[kind] if n == "theta" else C + 1,
                      int(meta["num_res_blocks"]), attn, mult, int(meta["num_heads"]), 0.0) for n in netnames}
    adam_step = int(meta["adam_step"])
    params, state = [], {}
    for n, net in nets.items():
        sd = {k[len(n) + 1:]: torch.from_numpy(v) for k, v in tensors.items() if k.startswith(n + ".")}
        net.load_state_dict(sd, strict=True)
        net.train()
        if a.autocast:
            net.to(memory_format=torch.channels_last)
        for k, q in net.named_parameters():
            params.append(q)
            if adam_step:  # continue the checkpoint's Adam moments
                state[q] = {"step": torch.tensor(float(adam_step)),
                            "exp_avg": torch.from_numpy(tensors[f"adam_m.{n}.{k}"].copy()),
                            "exp_avg_sq": torch.from_numpy(tensors[f"adam_v.{n}.{k}"].copy())}
    opt = torch.optim.Adam(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    opt.state.update(state)
    rng = Pcg32(int(meta["rng_state"], 16), int(meta["rng_inc"], 16))
    step = int(meta["step"])

    os.makedirs(a.out, exist_ok=True)
    log = open(os.path.join(a.out, "log.csv"), "w")
    log.write("step,loss,l_eps,l_x0,l_mu,l_lpips,img_per_s\n")
    print(f"train_ref: {kind} from {a.init} (step {step}) on {data.shape[0]} images {C}x{S}x{S}; theta "
          f"{sum(q.numel() for q in nets['theta'].parameters())} parameters{' (+ phi)' if 'phi' in nets else ''}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", file=sys.stderr)
    B, names = a.batch, ("loss", "L_eps", "L_x0", "L_mu", "L_lpips")
    sums, nsum, step0 = [0.0] * 5, 0, step
    t0 = tlog = time.monotonic()
    while step < a.steps:
        x0 = torch.from_numpy(draw_batch(data, rng, B, flip))
        t = np.array([rng.below(T) for _ in range(B)], dtype=np.int64)
        noise = torch.from_numpy(rng.normals(B * C * S * S).reshape(B, C, S, S))
        if a.autocast:
            x0, noise = (v.to(memory_format=torch.channels_last) for v in (x0, noise))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.autocast):
            out = R.train_losses(kind, nets, x0, t, noise, T, sched, p2g, p2k, clip_x0=clip_x0)
        loss = out["loss"]
        if not math.isfinite(loss.item()):
            sys.exit(f"train_ref: loss is {loss.item()} at step {step + 1}: stopping")
        opt.zero_grad(set_to_none=False)
        loss.backward()
        if a.grad_clip > 0:  # one global norm over both networks; coef clip / (norm + 1e-6) as C
            torch.nn.utils.clip_grad_norm_(params, a.grad_clip)
        opt.step()
        step += 1
        terms = [out.get(k) for k in names]
        for i, v in enumerate(terms):
            sums[i] += v.item() if v is not None else 0.0
        nsum += 1
        if step % a.log_every == 0 or step == a.steps:
            now = time.monotonic()
            ips = nsum * B / (now - tlog)
            vals = [sums[i] / nsum if v is not None else None for i, v in enumerate(terms)]
            log.write(f"{step}" + "".join("," + ("" if v is None else "%.6g" % v) for v in vals)
                      + ",%.3f\n" % ips)
            log.flush()
            elapsed = now - t0
            eta = elapsed / (step - step0) * (a.steps - step)
            extra = "".join(f" {nm} {v:.4f}" for nm, v in zip(("eps", "x0", "mu", "lpips"), vals[1:]) if v is not None)
            print(f"step {step}/{a.steps} loss {vals[0]:.4f}{extra} | {ips:.2f} img/s | "
                  f"{elapsed:.0f}s elapsed, ETA {eta:.0f}s", file=sys.stderr)
            sums, nsum, tlog = [0.0] * 5, 0, now
    log.close()
    print(f"done at step {step}: wrote {os.path.join(a.out, 'log.csv')}", file=sys.stderr)


if __name__ == "__main__":
    main()
