"""02 — add NoetherMonitor to an existing Lightning Trainer.

Your LightningModule stays as it is; the monitor reads the symmetries off the first training step's
autograd graph and logs through the trainer's logger. With a TensorBoardLogger the run also gets the
"NLD" custom-scalars dashboard, the symmetry table (Text tab), per-neuron histograms and the
monitor's settings as hyperparameters.

    python examples/02_lightning_trainer.py            # 10 epochs
    python examples/02_lightning_trainer.py --quick    # a few steps (what the test suite runs)
"""

from __future__ import annotations

import argparse
import os

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nld_callbacks import NoetherMonitor
from nld_callbacks.testing import digits


class LitDigits(pl.LightningModule):
    """Any LightningModule: here a small conv → BatchNorm → ReLU network with SGD and weight decay."""

    def __init__(self, lr: float = 0.1, weight_decay: float = 5e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save-dir", default="runs")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--quick", action="store_true", default=os.environ.get("NLD_QUICK") == "1",
                        help="a few steps only (also NLD_QUICK=1)")
    args = parser.parse_args(argv)

    pl.seed_everything(0)
    x, y = digits()
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    trainer = pl.Trainer(
        max_epochs=args.epochs, max_steps=10 if args.quick else -1, log_every_n_steps=5,
        logger=TensorBoardLogger(args.save_dir, name="lightning_example"),
        callbacks=[NoetherMonitor()],          # <- the one line this example is about
        enable_checkpointing=False, enable_progress_bar=not args.quick,
    )
    trainer.fit(LitDigits(), loader)
    print(f"\nOpen the dashboard:  tensorboard --logdir {trainer.logger.log_dir}")


if __name__ == "__main__":
    main()
