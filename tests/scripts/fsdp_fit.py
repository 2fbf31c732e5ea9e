"""FSDP2 (fully_shard) on CPU with gloo, two processes (launched by tests/test_distributed.py).

Each rank trains the sharded model and, beside it, an unsharded copy with the same start, data and
optimizer under its own tracker: the reference the sharded tracker's logs are compared with. The
script counts the tracker's collectives, and attaches a tracker to a model sharded on another dim
(left out). Usage: fsdp_fit.py OUTDIR PORT [sgd|adamw]
"""

import copy
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

STEPS, EVERY = 6, 2


def run(rank: int, out: Path, port: int, rule: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = MLPBN(hidden=(33, 16))  # 33 rows: an uneven split (17 + 16)
    reference = copy.deepcopy(model)
    x, y = synthetic_classification(n=64)
    report = find_symmetries(model, x)
    fully_shard(model)

    gathers = [0]
    all_gather = dist.all_gather

    def counted(*args, **kwargs):
        gathers[0] += 1
        return all_gather(*args, **kwargs)

    dist.all_gather = counted

    def optimizer(m):
        if rule == "adamw":
            return torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.05)
        return torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    opt, ref_opt = optimizer(model), optimizer(reference)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        tracker = NoetherTracker(model, opt, report, log_every_n_steps=EVERY)
    ref_tracker = NoetherTracker(reference, ref_opt, report, log_every_n_steps=EVERY)
    per_step = []
    for _ in range(STEPS):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
        per_step.append(gathers[0])
    summary = tracker.summary()
    full = {n: p.full_tensor() for n, p in model.named_parameters()}

    # other placements (here fc1.weight sharded on dim 1) are left out, with one warning
    from torch.distributed.tensor import Shard

    torch.manual_seed(0)
    other = MLPBN(hidden=(33, 16))
    fully_shard(other, shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 and p.shape == (33, 20) else Shard(0))
    with warnings.catch_warnings(record=True) as rec_other:
        warnings.simplefilter("always")
        other_tracker = NoetherTracker(other, optimizer(other), report, log_every_n_steps=EVERY)
    try:  # each rank would pick its own interval: refused with sharded groups
        NoetherTracker(model, optimizer(model), report, sample_every="auto")
        auto_error = ""
    except ValueError as err:
        auto_error = str(err)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "auto_error": auto_error,
        "warnings": [str(w.message) for w in rec if "sharded" in str(w.message)],
        "groups": [g.key for g in tracker.groups], "found": [g.key for g in report.groups],
        "notes": tracker.report.notes, "step": tracker.step,
        "logged": tracker.logged, "reference": ref_tracker.logged,
        "summary": summary, "reference_summary": ref_tracker.summary(),
        "gathers_after_each_step": per_step,
        "max_param_difference": max((full[n] - p).abs().max().item() for n, p in reference.named_parameters()),
        "other_placements": {"groups": [g.key for g in other_tracker.groups], "notes": other_tracker.report.notes,
                             "warnings": [str(w.message) for w in rec_other if "sharded" in str(w.message)]},
    }))
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "sgd"), nprocs=2)
