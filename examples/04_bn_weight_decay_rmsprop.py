"""04 — normalization + weight decay = RMSProp (physics.md §2.3).

A BatchNorm-fed conv layer is scale invariant, so under SGD with weight decay its direction moves
with the effective learning rate η_eff = η / ((1−ηλ)|w|²), and |w|⁴ is exactly an RMSProp
accumulator of the scale-free squared gradient |g̃|² = |w|²|g|²:

    v_{t+1} = ρ v_t + 2(1−ηλ)²η² |g̃_t|² + η⁴|g̃_t|⁴ / v_t,     ρ = (1−ηλ)⁴ ≈ 1 − 4ηλ,   v_0 = |w_0|⁴.

Left: the effective learning rate of the BatchNorm layer's channels as NoetherTracker measures it,
beside the same rate computed from that RMSProp recursion fed only with the measured gradients.
Right: torch.optim.RMSprop with the same decay ρ on the same problem (no weight decay, no help from
the norm): its per-coordinate effective rate lr/(sqrt(v)+ε) has the same form — 1/sqrt(EMA of squared
gradients) — with a zero initial accumulator where the BatchNorm layer starts from |w_0|⁴.

    python examples/04_bn_weight_decay_rmsprop.py           # 600 steps, writes examples/figures/04_bn_wd_rmsprop.png
    python examples/04_bn_weight_decay_rmsprop.py --quick   # 40 steps (what the test suite runs)
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch
from torch import nn

from nld_callbacks import NoetherTracker
from nld_callbacks.testing import BNCNN, digits

LAYER = "3"  # the second conv of BNCNN (conv → BatchNorm → ReLU)


def batches(x, y, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    done = 0
    while True:
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y) - 63, 64):
            if done == steps:
                return
            yield x[perm[i : i + 64]], y[perm[i : i + 64]]
            done += 1


def sgd_with_weight_decay(x, y, steps, lr, wd):
    """Train with SGD + weight decay; return the measured η_eff per step and the RMSProp recursion's."""
    torch.manual_seed(0)
    model = BNCNN()
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
    conv = model[int(LAYER)]
    measured: list[float] = []
    a = 1.0 - lr * wd
    v = None
    recursion: list[float] = []

    def record(metrics, step):
        measured.append(metrics[f"nld/scale/{LAYER}/effective_lr"])

    with NoetherTracker(model, opt, example_input=x[:64], writer=record, log_every_n_steps=1,
                        include=[f"scale/{LAYER}"]):
        for xb, yb in batches(x, y, steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            with torch.no_grad():  # per channel: Q = |w_c|² + b_c², G = |g_c|²
                Q = conv.weight.double().pow(2).flatten(1).sum(1) + conv.bias.double().pow(2)
                G = conv.weight.grad.double().pow(2).flatten(1).sum(1) + conv.bias.grad.double().pow(2)
            if v is None:
                v = Q * Q  # the accumulator starts at |w_0|⁴
            recursion.append(float((lr / (a * v.sqrt())).mean()))
            g_tilde = Q * G  # scale-free squared gradient
            v = a**4 * v + 2 * a * a * lr * lr * g_tilde + lr**4 * g_tilde**2 / v
            opt.step()
    return measured, recursion


def rmsprop(x, y, steps, lr, alpha):
    """torch.optim.RMSprop on the same problem; its effective rate lr/(sqrt(v)+ε), median over the layer."""
    torch.manual_seed(0)
    model = BNCNN()
    opt = torch.optim.RMSprop(model.parameters(), lr=lr, alpha=alpha)
    conv = model[int(LAYER)]
    rates = []
    for xb, yb in batches(x, y, steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
        v = opt.state[conv.weight]["square_avg"]
        rates.append(float((lr / (v.sqrt() + opt.param_groups[0]["eps"])).median()))
    return rates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", default=str(Path(__file__).parent / "figures" / "04_bn_wd_rmsprop.png"))
    parser.add_argument("--quick", action="store_true", default=os.environ.get("NLD_QUICK") == "1",
                        help="40 steps only (also NLD_QUICK=1)")
    args = parser.parse_args(argv)
    steps = 40 if args.quick else args.steps
    lr, wd = 0.1, 5e-3
    rho = (1 - lr * wd) ** 4

    x, y = digits()
    measured, recursion = sgd_with_weight_decay(x, y, steps, lr, wd)
    # the tracker measures from its second step on; the recursion is computed from the first
    rel = max(abs(m - r) / r for m, r in zip(measured, recursion[len(recursion) - len(measured):]))
    rms = rmsprop(x, y, steps, lr=1e-3, alpha=rho)
    print(f"RMSProp decay ρ = (1−ηλ)⁴ = {rho:.6f} (≈ 1 − 4ηλ = {1 - 4 * lr * wd:.6f}); "
          f"equilibrium angular update sqrt(2ηλ) = {math.sqrt(2 * lr * wd):.4f} rad")
    print(f"BatchNorm layer {LAYER}: effective lr {measured[0]:.4g} -> {measured[-1]:.4g} over {steps} steps")
    print(f"max relative difference, measured vs RMSProp recursion: {rel:.3e}")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.0, 3.4), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    t = range(1, steps + 1)
    left.plot(t[steps - len(measured):], measured, color="black", lw=2.2, label="measured (NoetherTracker)")
    left.plot(t, recursion, color="tab:orange", ls="--", lw=1.4, label="RMSProp recursion, ρ = (1−ηλ)⁴")
    left.set(title=f"BatchNorm conv + SGD, η = {lr}, λ = {wd}", xlabel="step", ylabel="effective lr η/((1−ηλ)|w|²)")
    left.legend(fontsize=8, frameon=False)
    right.plot(t, rms, color="tab:blue", lw=1.4)
    right.set(title="torch.optim.RMSprop, α = ρ, lr = 1e-3", xlabel="step", ylabel="lr/(√v + ε), median")
    right.set_yscale("log")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
