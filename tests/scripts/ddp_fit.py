"""Two-process CPU DDP run with NoetherMonitor (launched by tests/test_distributed.py).

Usage: python ddp_fit.py OUTDIR [STRATEGY]
Each rank writes OUTDIR/rank{r}.json with its tracker's logged values and summary.
"""

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nld_callbacks import NoetherMonitor
from nld_callbacks.testing import BNCNN, digits


class Net(LightningModule):
    def __init__(self):
        super().__init__()
        self.net = BNCNN(channels=(8, 16, 16))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def main(out: Path, strategy: str) -> None:
    seed_everything(0, verbose=False)
    x, y = digits()
    loader = DataLoader(TensorDataset(x[:512], y[:512]), batch_size=32, shuffle=False)
    monitor = NoetherMonitor(log_every_n_steps=3, verbose=False)
    trainer = Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=9,
                      logger=TensorBoardLogger(out, name="run"), callbacks=[monitor], enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False, use_distributed_sampler=True)
    trainer.fit(Net(), train_dataloaders=loader)
    rank = trainer.global_rank
    tracker = monitor.trackers[0]
    (out / f"rank{rank}.json").write_text(json.dumps({"logged": tracker.logged, "summary": monitor.summary,
                                                      "world_size": trainer.world_size}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "ddp")
