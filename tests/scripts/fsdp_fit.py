"""FSDP2 (fully_shard) on CPU with gloo, two processes: sharded groups are left out with one
warning, training goes on (launched by tests/test_distributed.py). Usage: fsdp_fit.py OUTDIR PORT"""

import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from nld_callbacks import NoetherTracker, find_symmetries
from nld_callbacks.testing import MLPBN, synthetic_classification


def run(rank: int, out: Path, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = MLPBN()
    x, y = synthetic_classification(n=64)
    report = find_symmetries(model, x)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        tracker = NoetherTracker(model, opt, report, log_every_n_steps=2)
    for _ in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    (out / f"rank{rank}.json").write_text(json.dumps({
        "warnings": [str(w.message) for w in rec if "sharded" in str(w.message)],
        "groups": [g.key for g in tracker.groups], "found": [g.key for g in report.groups],
        "notes": tracker.report.notes, "step": tracker.step}))
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(Path(sys.argv[1]), int(sys.argv[2])), nprocs=2)
