"""`nld bench --quick`: the printed tables have their structure and finite ratios (never timings)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from nld_callbacks import bench

SECTIONS = ["[cnn]", "[mlp]", "[cnn (Lightning)]", "[cost growth]", "[targets]", "nld bench detect"]


def _cells(line: str, starts: list[int]) -> list[str]:
    ends = starts[1:] + [len(line)]
    return [line[a:b].strip() for a, b in zip(starts, ends)]


def _tables(text: str) -> list[list[list[str]]]:
    """Fixed-width tables: a header line, a dashes line, rows until a blank line."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        if i and re.fullmatch(r"-+( +-+)+", line):
            starts = [m.start() for m in re.finditer(r"-+", line)]
            rows = [_cells(lines[i - 1], starts)]
            for row in lines[i + 1 :]:
                if not row.strip():
                    break
                rows.append(_cells(row, starts))
            out.append(rows)
    return out


@pytest.fixture(scope="module")
def quick_output() -> str:
    import contextlib
    import io

    buf = io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(buf):
            assert bench.main(["--quick"]) == 0
    finally:
        torch.set_num_threads(threads)
    return buf.getvalue()


def test_quick_run_prints_every_section(quick_output):
    for s in SECTIONS:
        assert s in quick_output, s


def test_overhead_tables_have_finite_ratios(quick_output):
    tables = _tables(quick_output)
    overhead = [t for t in tables if t[0][:3] == ["model", "instrumentation", "log every"]]
    assert len(overhead) == 3  # cnn, mlp, cnn under Lightning
    labels = set()
    for t in overhead:
        head = t[0]
        col = head.index("time ratio [IQR]")
        for row in t[1:]:
            labels.add(row[1])
            median, q1, q3 = (float(x) for x in re.findall(r"[-+0-9.]+", row[col]))
            assert all(math.isfinite(v) for v in (median, q1, q3)) and q1 <= median <= q3
            cpu = [float(x) for x in re.findall(r"[-+0-9.]+", row[head.index("cpu-time ratio [IQR]")])]
            assert len(cpu) == 3 and all(math.isfinite(v) for v in cpu)
            assert math.isfinite(float(row[head.index("added cpu ms")]))
            own = row[head.index("1 + own/plain [IQR]")]
            assert own == "-" or all(math.isfinite(float(x)) and float(x) >= 1.0 for x in re.findall(r"[0-9.]+", own))
            mem = row[head.index("peak mem ratio")]
            assert mem == "-" or math.isfinite(float(mem))
        assert t[1][1] == "none" and t[1][4].startswith("1.000")  # the plain run against itself
    for expected in ("nld", "nld sampled 1/10", "nld sums only", "floor", "grad_norm", "item", "NoetherMonitor"):
        assert expected in labels
    assert "sums only" not in quick_output[quick_output.index("[targets]"):]  # a comparison: no verdict
    lightning = {row[1] for row in overhead[2][1:]}
    assert {"grad_norm", "item"} <= lightning  # the references logged through the trainer too
    # own time: measured for every instrumented arm of plain PyTorch and the monitor under Lightning
    for t in overhead:
        col = t[0].index("1 + own/plain [IQR]")
        for row in t[1:]:
            timed = row[1] != "none" and (not row[0].endswith("(Lightning)") or row[1].startswith("NoetherMonitor"))
            assert (row[col] != "-") == timed, row


def test_clocked_counts_the_trackers_hooks_only(monkeypatch):
    """The own-time clock takes what the tracker's hooks spend, not other hooks', and only while timing."""
    from types import SimpleNamespace

    from torch import nn

    from nld_callbacks import NoetherTracker, find_symmetries

    now = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = NoetherTracker(model, opt, find_symmetries(model, x), log_every_n_steps=1000)
    pre, post = tracker._pre_hook, tracker._post_hook

    def costly(hook, cost):
        def run(*args):
            hook(*args)
            now[0] += cost
        return run

    tracker._pre_hook, tracker._post_hook = costly(pre, 3.0), costly(post, 4.0)  # what attach() registers
    opt.register_step_pre_hook(lambda *_: now.__setitem__(0, now[0] + 100.0))  # someone else's hooks
    inst = SimpleNamespace(timing=False, spent=0.0)
    handles = bench._clocked(tracker, inst)
    opt.register_step_post_hook(lambda *_: now.__setitem__(0, now[0] + 100.0))
    for step in range(5):
        inst.timing = step >= 2
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert inst.spent == 3 * (3.0 + 4.0)
    for h in handles:
        h.remove()
    tracker.detach()


def test_cost_growth_table_counts_ops(quick_output):
    (t,) = [t for t in _tables(quick_output) if t[0][0] == "layers"]
    assert [r[0] for r in t[1:]] == ["2", "4", "8"]
    head = t[0]
    for row in t[1:]:
        assert int(row[head.index("hook ops/step")]) > 0
        assert int(row[head.index("sum passes")]) > 0
        wall, cpu = re.fullmatch(r"([-+0-9.]+) \(([-+0-9.]+)\)", row[head.index("nld added ms (cpu)")]).groups()
        assert math.isfinite(float(wall)) and math.isfinite(float(cpu))


def test_targets_and_detect_lines(quick_output):
    targets = quick_output.split("[targets]")[1].split("nld bench detect")[0].strip().splitlines()
    # a first column of "-" where a ratio's reference added no time (n/a), see the test below
    assert targets and all(re.match(r"(met   |MISSED|info  |-     ) (met   |MISSED|-     )  ", line)
                           for line in targets)
    (t,) = [t for t in _tables(quick_output) if t[0][0] == "model" and "find_symmetries ms [IQR]" in t[0]]
    assert t[1][-1].endswith("x") and math.isfinite(float(t[1][-1][:-1]))


def test_peak_memory_sees_a_transient_allocation():
    def work():
        x = torch.empty(1 << 18)  # 1 MiB, freed before the next one
        del x
        return torch.empty(1 << 16)

    peak = bench.peak_memory(work, torch.device("cpu"))
    assert (1 << 20) <= peak < (1 << 20) + (1 << 16) + 4096


def test_stats_and_bad_device():
    s = bench.Stats.of([3.0, 1.0, 2.0])
    assert (s.median, s.q1, s.q3, s.n) == (2.0, 1.5, 2.5, 3)
    assert math.isnan(bench.Stats.of([]).median)
    if not torch.cuda.is_available():
        assert bench.main(["--device", "cuda"]) == 2


def test_reference_verdicts_compare_added_time_under_lightning_too():
    """The added time of the monitor against each reference, per setting; own time only where both have it."""
    def row(model, label, added, own=()):
        st = bench.Stats.of([added])
        return bench.Row(model, label, "1", 10.0, bench.Stats.of([1 + added / 10]), bench.Stats.of([1 + added / 10]),
                         st, added_cpu_ms=st, own=bench.Stats.of([1 + o / 10 for o in own]),
                         own_ms=bench.Stats.of(list(own)))

    rows = [row("cnn", "nld", 2.0, [1.9]), row("cnn", "grad_norm", 0.5, [0.4]), row("cnn", "item", 2.5, [2.4]),
            row("cnn (Lightning)", "NoetherMonitor", 3.0, [2.0]), row("cnn (Lightning)", "grad_norm", 5.0),
            row("cnn (Lightning)", "item", 2.0)]
    lines = [ln for ln in bench._verdicts(rows, [], 10) if " minus " in ln]
    assert lines == [
        "MISSED MISSED  cnn, added ms of nld every step minus grad_norm every step: 1.500 ms wall, 1.500 ms cpu, "
        "1.500 ms own (target <= 0 ms)",
        "met    met     cnn, added ms of nld every step minus item every step: -0.500 ms wall, -0.500 ms cpu, "
        "-0.500 ms own (target <= 0 ms)",
        "met    -       cnn (Lightning), added ms of NoetherMonitor every step minus grad_norm every step: "
        "-2.000 ms wall, -2.000 ms cpu (target <= 0 ms)",
        "MISSED -       cnn (Lightning), added ms of NoetherMonitor every step minus item every step: "
        "1.000 ms wall, 1.000 ms cpu (target <= 0 ms)",
    ]


def test_floor_verdict_is_undefined_when_the_floor_added_no_time():
    """The MLP's added time over the floor's: a ratio, or n/a (no verdict) where the floor added ≤ 0 ms."""
    def row(label, added, own):
        a, o = bench.Stats.of([added]), bench.Stats.of([own])
        return bench.Row("mlp", label, "1", 10.0, bench.Stats.of([1 + added / 10]), bench.Stats.of([1 + added / 10]),
                         a, added_cpu_ms=a, own=bench.Stats.of([1 + own / 10]), own_ms=o)

    def line(floor_added):
        rows = [row("nld", 3.0, 2.5), row("floor", floor_added, 0.5)]
        return next(ln for ln in bench._verdicts(rows, [], 10) if "floor added time" in ln)

    assert line(2.0) == ("met    MISSED  mlp, nld added time / floor added time (every step): 1.500x wall, "
                         "1.500x cpu, 5.000x own (target <= 2x)")
    assert line(-0.1) == ("-      MISSED  mlp, nld added time / floor added time (every step): n/a wall, "
                          "n/a cpu, 5.000x own (target <= 2x)")


def test_sums_arm_reads_what_a_tracked_step_reads():
    """``nld sums only``: the rows of a tracked post-step's fused read, bit for bit, and nothing else."""
    from torch import nn

    from nld_callbacks import NoetherTracker, find_symmetries

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    report = find_symmetries(model, x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    tracker = NoetherTracker(model, opt, report)
    reads = []
    read = tracker._read

    def spy(pairs):
        read(pairs)
        reads.append(dict(tracker._rows))

    tracker._read = spy
    sums = bench._Sums()
    sums.attach(model, opt, report)  # its post hook runs after the tracker's
    try:
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    finally:
        sums.close()
    rows = reads[-1]  # the third step's post-step read (its pre-step took the second's over)
    assert {"θθ", "θg", "vg", "vv", "θv"} <= rows.keys()
    assert torch.equal(sums.last, torch.stack(list(rows.values())))
    assert len(opt._optimizer_step_post_hooks) == 1  # the tracker's: the arm's own is gone


def test_torch_ops_arms_run_the_tracker_without_the_kernel(monkeypatch):
    """``--torch-ops``: the tracker again with its sums and maps by torch ops, beside the compiled arms, no target."""
    import contextlib
    import io
    import os

    from nld_callbacks import kernel

    monkeypatch.setenv("NLD_CALLBACKS_KERNEL", "1")
    layouts = []
    attach = bench._Tracker.attach

    def spy(self, *args):
        attach(self, *args)
        layouts.append((self.compiled, self.tracker.layout))

    monkeypatch.setattr(bench._Tracker, "attach", spy)
    buf = io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(buf):
            assert bench.main(["--quick", "--torch-ops", "--skip", "lightning,depth,detect"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = buf.getvalue()
    tables = [t for t in _tables(out) if t[0][:3] == ["model", "instrumentation", "log every"]]
    for t in tables:
        assert {(row[1], row[2]) for row in t[1:] if "torch ops" in row[1]} == {("nld, torch ops", "1"),
                                                                                ("nld, torch ops", "50")}
    targets = out[out.index("[targets]"):]
    assert "torch ops" not in targets
    assert any(not compiled for compiled, _ in layouts) and all(not lay.compiled for c, lay in layouts if not c)
    if kernel.load() is not None:
        assert all(lay.compiled for c, lay in layouts if c)
    assert os.environ["NLD_CALLBACKS_KERNEL"] == "1"  # given back as it was


def test_hook_ops_do_not_grow_with_depth():
    """A non-logging tracked step dispatches as many aten ops on 2 layers as on 8: the sums and maps are kernel calls,
    the per-tensor work fused (as ``nld bench``'s cost-growth table counts them)."""
    from nld_callbacks import kernel

    if kernel.load() is None:
        pytest.skip("no C compiler: the torch-op sums dispatch ops per row length")
    dev = torch.device("cpu")
    counts = []
    for depth in (2, 8):
        work = bench.Workload(f"mlp{depth}", "", lambda d=depth: bench.wide_mlp(32, d, 32),
                              bench._batches((16, 32), 2, 10, dev))
        counts.append(bench._hook_ops(work, bench._report_of(work), dev))
    (ops2, passes2), (ops8, passes8) = counts
    assert ops2 == ops8 and passes8 > passes2, counts


def test_lr_schedule_changes_the_lr_of_every_arm_at_every_step():
    """``--lr-schedule``: each run's optimizer steps at lr/(1 + k/100), the plain run's as the tracked one's."""
    cfg = bench.Config(quick=True, schedule=True)
    cnn, _ = bench._workloads(cfg)

    class Plain(bench._Instrument):
        def attach(self, model, opt, report):
            self.opt, self.lrs = opt, []

        def after_backward(self, model):
            self.lrs.append(self.opt.param_groups[0]["lr"])

    class Tracked(bench._Tracker):
        def attach(self, model, opt, report):
            super().attach(model, opt, report)
            Plain.attach(self, model, opt, report)  # type: ignore[arg-type]

        after_backward = Plain.after_backward

    report = bench._report_of(cnn)
    for arm in (Plain(), Tracked(1)):
        bench._train(cnn, arm, report, 3, 2, torch.device("cpu"))
        assert arm.lrs == [cnn.lr * (1.0 / (1.0 + k / 100)) for k in range(5)]  # (LambdaLR: base lr × factor)
    assert isinstance(arm, Tracked) and arm.tracker is not None and arm.tracker.step == 5
    assert bench._workloads(bench.Config(quick=True))[0].scheduler(torch.optim.SGD([torch.zeros(1)], lr=1.0)) is None


@pytest.mark.parametrize("rule", ["sgd", "adamw"])
def test_optimizer_option_and_the_floor_reads_every_buffer(rule):
    """``--optimizer``: the workloads' optimizer; the floor reads θ, g and each of its buffers of θ's shape
    (the momentum buffer v, or Adam's m and v), one norm each."""
    cnn, _ = bench._workloads(bench.Config(quick=True, optimizer=rule))
    model = cnn.make()
    opt = cnn.optimizer(model)
    assert type(opt) is (torch.optim.AdamW if rule == "adamw" else torch.optim.SGD)
    report = bench._report_of(cnn)
    floor = bench._Floor()
    floor.attach(model, opt, report)
    x, y = cnn.batches[0]
    try:
        for _ in range(2):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    finally:
        floor.close()
    params = bench._monitored(model, report)
    buffers = 2 if rule == "adamw" else 1
    assert len(floor.last) == (2 + buffers) * len(params)
    state = opt.state[params[0]]
    want = [params[0].norm(), params[0].grad.norm(),
            *[state[k].norm() for k in (("exp_avg", "exp_avg_sq") if rule == "adamw" else ("momentum_buffer",))]]
    n = len(params)
    got = [floor.last[0], floor.last[n], *floor.last[2 * n : 2 * n + buffers]]  # (the buffers: per parameter)
    torch.testing.assert_close(torch.stack(got), torch.stack(want))
