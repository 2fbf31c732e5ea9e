"""01 — a plain PyTorch training loop with NoetherTracker (no Lightning).

A BatchNorm CNN on scikit-learn's digits, SGD with momentum and weight decay. The tracker hangs on
the optimizer's step hooks, measures every scale group's charge at every step, and writes the
"NLD" dashboard (scalars, custom-scalars layout, histograms, symmetry table) through the
SummaryWriter every ``--log-every`` steps.

    python examples/01_plain_pytorch.py            # 10 epochs, about half a minute on 2 cores
    python examples/01_plain_pytorch.py --quick    # a few steps (what the test suite runs)
    tensorboard --logdir runs/plain                # then open "Custom Scalars"
    nld report runs/plain                          # or PNGs and a markdown table
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter

from nld_callbacks import NoetherTracker
from nld_callbacks.testing import BNCNN, digits
from nld_callbacks.tracker import format_summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/plain")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--quick", action="store_true", default=os.environ.get("NLD_QUICK") == "1",
                        help="a few steps only (also NLD_QUICK=1)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x, y = digits()
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    model = BNCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    max_steps = 12 if args.quick else None
    every = 4 if args.quick else args.log_every

    writer = SummaryWriter(args.logdir)
    steps = 0
    with NoetherTracker(model, optimizer, example_input=x[:64], writer=writer, log_every_n_steps=every) as tracker:
        print(tracker.report.table())
        for _ in range(args.epochs):
            for xb, yb in loader:
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(xb), yb).backward()
                optimizer.step()
                steps += 1
                if steps == max_steps:
                    break
            if steps == max_steps:
                break
    writer.close()
    print(format_summary(tracker.summary()))
    print(f"\n{steps} steps. Open the dashboard:  tensorboard --logdir {args.logdir}"
          f"\nor write PNGs and a table:      nld report {args.logdir}")


if __name__ == "__main__":
    main()
