"""DDP on CPU (gloo), two processes: the same charges on every rank, written once, no hang."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

SCRIPT = Path(__file__).parent / "scripts" / "ddp_fit.py"


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ddp_two_cpu_processes(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for k in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "ddp"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == 2
    assert r0["logged"] and r0["logged"] == r1["logged"], "ranks disagree on the charges"
    assert r0["summary"] == r1["summary"]
    assert all(row["max_residual"] < 4.0 for row in r0["summary"])
    events = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert len(events) == 1, events  # written once, by rank 0
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("nld/scale/net.0/charge")]
    assert steps == [3, 6, 9]


def _fully_shard_available():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return dist.is_available() and dist.is_gloo_available()


@pytest.mark.skipif(not _fully_shard_available(), reason="needs torch.distributed.fsdp.fully_shard and gloo")
def test_fsdp_sharded_groups_are_left_out_with_one_warning(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT.parent / "fsdp_fit.py"), str(tmp_path), "29547"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in (0, 1):
        out = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert out["found"] and out["groups"] == []
        assert len(out["warnings"]) == 1 and "Use DDP" in out["warnings"][0]
        assert all("sharded parameters (FSDP)" in n for n in out["notes"] if n.startswith(tuple(out["found"])))
        assert out["step"] == 4
