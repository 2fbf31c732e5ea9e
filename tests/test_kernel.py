"""The compiled CPU kernel of the charge sums: against the reference loop, torch ops, and its fallbacks."""

import math
import os
import platform

import pytest
import torch

from nld_callbacks import kernel
from nld_callbacks.charges import AdamDirection, ChargeLayout, Restricted, bilinear_reference, linear_reference
from nld_callbacks.symmetries import Member, SymmetryGroup

needs_kernel = pytest.mark.skipif(kernel.load() is None, reason="no C compiler: the kernel cannot be built")

# the kernel's paths as a layout uses them: rows of 8+ entries (conv rows: C = 27; conv2's 5 rows of
# 3x3 kernels, C = 9, with their columns; each with a remainder), rows and columns of one matrix in
# one job (C = 1; more than one block of 1024 columns), blocks on axis 0 together with columns
# (per0 > 1), a whole-tensor sum (short rows as columns: test_short_rows_are_summed_as_columns)
SHAPES = {"conv.weight": (6, 3, 3, 3), "conv.bias": (6,), "conv2.weight": (5, 6, 3, 3), "wide.weight": (3, 2100),
          "head.weight": (4, 6), "head.bias": (4,), "gn.weight": (8, 5)}
GROUPS = [
    SymmetryGroup("scale", "conv", (Member("conv.weight", 0), Member("conv.bias", 0)), 6, "output channel", "t"),
    SymmetryGroup("rescale", "conv", (Member("conv.weight", 0), Member("conv.bias", 0), Member("head.weight", 1, -1),
                                      Member("conv2.weight", 1, -1)), 6, "hidden unit", "t"),
    SymmetryGroup("scale", "conv2", (Member("conv2.weight", 0),), 5, "output channel", "t"),
    SymmetryGroup("scale", "wide", (Member("wide.weight", 0),), 3, "row", "t"),
    SymmetryGroup("rescale", "wide", (Member("wide.weight", 1, -1),), 2100, "column", "t"),
    SymmetryGroup("scale", "gn", (Member("gn.weight", 0, blocks=2),), 2, "norm group", "t"),
    SymmetryGroup("rescale", "gn", (Member("gn.weight", 1),), 5, "column", "t"),
    SymmetryGroup("scale", "head", (Member("head.weight", None), Member("head.bias", None)), 1, "layer", "t"),
    SymmetryGroup("translation", "head", (Member("head.weight", 1), Member("head.bias", None, offset=6)), 7,
                  "input feature", "t"),
]


@pytest.fixture
def fresh_kernel():
    """Lets a test change how the kernel is found; the next load() afterwards looks again."""
    kernel.reset()
    yield
    kernel.reset()


def _tensors(seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for n, s in SHAPES.items()}


def _system_compiler():
    import shutil

    return shutil.which("cc") or shutil.which("gcc")


def _wrapped_compiler(monkeypatch, tmp_path, script):
    """``$CC``: a shell script that runs ``script`` on the arguments, then the system compiler; a fresh cache."""
    import stat

    fake = tmp_path / "cc"
    fake.write_text(f'#!/bin/sh\n{script}\nexec {_system_compiler()} "$@"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("NLD_CALLBACKS_CACHE", str(tmp_path / "cache"))


def _groups(lay, row):
    return lay.split(lay.to_groups(row))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_kernel_matches_the_reference_loop(dtype):
    """Products and linear sums of θ, g and v as a tracked step asks for them, each tensor read once.

    float32 products are exact in float64 and the kernel sums them in float64: it meets the float64
    reference on the same float32 values to float64 rounding (torch ops in float32 would not).
    """
    th, g, v = (_tensors(s, dtype) for s in (0, 1, 2))
    lin = ["head.weight", "head.bias"]
    pairs = [(th, th), (th, g), (v, g), (v, v), (th, v), (Restricted(th, lin), None), (Restricted(g, lin), None),
             (Restricted(v, lin), None)]
    lay = ChargeLayout(GROUPS, SHAPES, kernel=True)
    out = lay.reduce_many(pairs)
    (kp,) = lay._kplans.values()
    assert kp is not None and lay._plans == {}  # the kernel's plan, no torch-op plan
    assert kp.n_jobs == 8  # one per tensor (rows and columns of one tensor share a job), two for head.weight
    as64 = [{n: t.double() for n, t in T.items()} for T in (th, g, v)]
    th64, g64, v64 = as64
    refs = [(th64, th64), (th64, g64), (v64, g64), (v64, v64), (th64, v64), th64, g64, v64]
    for row, ref in zip(out, refs):
        for grp, got in zip(GROUPS, _groups(lay, row)):
            want = linear_reference(grp, ref) if isinstance(ref, dict) else bilinear_reference(grp, *ref)
            if isinstance(ref, dict) and grp.key != "translation/head":
                continue  # the restricted mappings' linear sums cover the head only
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=grp.key)


def _adam(dtype):
    """θ, Adam's m and v (v ≥ 0), the bias corrections and ε of step 3 (β 0.9, 0.999) per tensor, and
    u = (m / bc1) / (sqrt(v) / bc2s + ε) made by NumPy in the tensors' dtype: IEEE operations, each
    correctly rounded (torch's CPU sqrt can be one unit in the last place off; its divisions are not)."""
    import numpy as np

    th, m, v = _tensors(0, dtype), _tensors(1, dtype), {n: t.abs() * 1e-3 for n, t in _tensors(2, dtype).items()}
    bc1, bc2s, eps = 1 - 0.9**3, math.sqrt(1 - 0.999**3), 1e-8
    f = np.float32 if dtype == torch.float32 else np.float64
    u = {n: torch.from_numpy((m[n].numpy() / f(bc1)) / (np.sqrt(v[n].numpy()) / f(bc2s) + f(eps))) for n in SHAPES}
    scalars = {n: (torch.tensor(bc1, dtype=torch.float64), torch.tensor(bc2s, dtype=torch.float64), eps)
               for n in SHAPES}
    return th, AdamDirection(m, v, scalars), u


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_adam_direction_is_formed_inside_the_read(dtype):
    """An Adam direction's products: u formed from m and v as the kernel reads them (no tensor made),
    with the bits of u made by torch ops first, on every path of the kernel (rows, columns, short
    rows, rows and columns in one job, blocks, whole tensors, linear sums)."""
    th, direction, u = _adam(dtype)
    made_here = []

    class Counted(AdamDirection):
        def __getitem__(self, name):
            made_here.append(name)
            return super().__getitem__(name)

    direction = Counted(direction.m, direction.v, direction.scalars)
    lin = ["head.weight", "head.bias"]
    pairs = [(th, th), (th, direction), (direction, direction), (Restricted(direction, lin), None)]
    lay = ChargeLayout(GROUPS, SHAPES, kernel=True)
    out = lay.reduce_many(pairs)
    (kp,) = lay._kplans.values()
    assert kp is not None and lay._plans == {} and made_here == []  # no u made as a tensor
    made = lay.reduce_many([(th, th), (th, u), (u, u), (Restricted(u, lin), None)])
    assert torch.equal(out, made)  # the same u, the same sums
    u64 = {n: t.double() for n, t in u.items()}
    for row, ref in zip(out[1:], [(th, u64), (u64, u64), u64]):
        for grp, got in zip(GROUPS, _groups(lay, row)):
            if isinstance(ref, dict):
                if grp.key != "translation/head":
                    continue  # the restricted mapping's linear sums cover the head only
                want = linear_reference(grp, ref)
            else:
                want = bilinear_reference(grp, {n: t.double() for n, t in ref[0].items()}, ref[1])
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=grp.key)
    # torch ops: each u made as it is read (float32 products and sums there)
    ops = ChargeLayout(GROUPS, SHAPES, kernel=False).reduce_many(pairs)
    torch.testing.assert_close(ops, out, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-9)
    # a tensor the kernel cannot read (a strided m) sends the call to torch ops
    strided = AdamDirection({**direction.m, "conv.weight": direction.m["conv.weight"].transpose(0, 1).contiguous()
                             .transpose(0, 1)}, direction.v, direction.scalars)
    again = lay.reduce_many([(th, strided), (strided, strided)])
    torch.testing.assert_close(again, out[1:3], rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-9)


@needs_kernel
def test_kernel_and_torch_ops_agree_and_the_kernel_repeats_bitwise():
    X, Y = _tensors(0, torch.float32), _tensors(1, torch.float32)
    pairs = [(X, X), (X, Y), (Y, None), ({**X, "conv.bias": None}, Y)]
    fast = ChargeLayout(GROUPS, SHAPES, kernel=True)
    ops = ChargeLayout(GROUPS, SHAPES, kernel=False)
    a, b = fast.reduce_many(pairs), ops.reduce_many(pairs)
    assert ops._kplans == {} and fast._plans == {}
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # torch ops: float32 products and sums
    assert torch.equal(a, fast.reduce_many(pairs))
    # a call with fewer products gives the same bits for the products it shares (the tracker's
    # pre-step read and post-step read of one θ must agree)
    assert torch.equal(fast.reduce(X, X), a[0])
    assert torch.equal(fast.reduce_many([(X, Y), (X, X)])[1], a[0])


@needs_kernel
def test_a_tensor_whose_square_is_not_asked_for_goes_last():
    """A heavy-ball step asks for θθ, θg, θv, vg, vv but not gg: g is the job's last tensor (its square skipped)."""
    theta, g, v = _tensors(0), _tensors(1), _tensors(2)
    pairs = [(theta, theta), (theta, g), (v, g), (v, v), (theta, v)]
    lay = ChargeLayout(GROUPS, SHAPES, kernel=True)
    out = lay.reduce_many(pairs)
    (plan,) = lay._kplans.values()
    assert plan is not None and [r for r, _ in plan.slots[:3]] == [0, 2, 1]  # θ, v, g (roots by first use)
    expected = ChargeLayout(GROUPS, SHAPES, kernel=False).reduce_many(pairs)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_short_rows_are_summed_as_columns(dtype):
    """Rows of fewer than 8 entries, and of up to 16 in a job of 8 rows or more, run as columns.

    Such a job's view is (A, J·C, 1) with J·C/size columns per output; other rows keep theirs.
    Every sum still meets the float64 reference, with and without the second reduction.
    """
    # k5: 1,080 columns, two blocks of the kernel's 1,024, the second starting 7 columns into an output
    shapes = {"k2": (4, 5, 2, 3), "k3": (8, 4, 3, 3), "k4": (2, 3, 4, 4), "k6": (8, 2, 4, 4), "k7": (8, 2, 5, 5),
              "k1": (5, 6, 2, 1), "k5": (8, 120, 3, 3)}
    # rows and columns in one job; k1: its columns alone
    groups = [SymmetryGroup("scale", n, (Member(n, 0),), s[0], "output channel", "t")
              for n, s in shapes.items() if n != "k1"]
    groups += [SymmetryGroup("rescale", n, (Member(n, 1, -1),), s[1], "input channel", "t") for n, s in shapes.items()]
    gen = torch.Generator().manual_seed(3)
    X, Y = ({n: torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for n, s in shapes.items()}
            for _ in range(2))
    lay = ChargeLayout(groups, shapes, kernel=True)
    out = lay.reduce_many([(X, Y), (X, X)])
    (kp,) = lay._kplans.values()
    views = {}
    for (start, _, _), (_, p) in zip(kp.spans, kp.slots[::2]):
        A, J, C, _, _, per, _ = kp.jobs[start : start + 7]
        views[lay.params[p]] = (A, J, C, per)
    assert views == {"k2": (4, 30, 1, 6), "k3": (8, 36, 1, 9), "k4": (2, 3, 16, 1), "k6": (8, 32, 1, 16),
                     "k7": (8, 2, 25, 1), "k1": (5, 12, 1, 2), "k5": (8, 1080, 1, 9)}
    X64, Y64 = ({n: t.double() for n, t in T.items()} for T in (X, Y))
    for row, (P, R) in zip(out, [(X64, Y64), (X64, X64)]):
        for grp, got in zip(groups, _groups(lay, row)):
            torch.testing.assert_close(got, bilinear_reference(grp, P, R), rtol=1e-12, atol=1e-12, msg=grp.key)


@needs_kernel
def test_calls_that_do_not_suit_the_kernel_use_torch_ops():
    X, Y = _tensors(0), _tensors(1)
    lay = ChargeLayout(GROUPS, SHAPES, kernel=True)
    strided = {**X, "wide.weight": X["wide.weight"].T.contiguous().T}  # the same values, column-major
    half = {n: t.to(torch.bfloat16) for n, t in X.items()}
    mixed = {**X, "conv.weight": X["conv.weight"].float()}  # float32 and float64 in one product
    many = [(_tensors(s), _tensors(s + 1)) for s in range(3)]  # six tensors per parameter
    for pairs in ([(strided, Y)], [(half, half)], [(mixed, Y)], many):
        lay._plans.clear()
        out = lay.reduce_many(pairs)
        assert lay._plans, "expected the torch-op path"
        for (P, R), row in zip(pairs, out):
            P64, R64 = ({n: t.double() for n, t in T.items()} for T in (P, R))
            for grp, got in zip(GROUPS, _groups(lay, row)):
                torch.testing.assert_close(got, bilinear_reference(grp, P64, R64), rtol=1e-2, atol=1e-2)


def test_without_a_compiler_the_layout_uses_torch_ops(fresh_kernel, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("NLD_CALLBACKS_CACHE", str(tmp_path / "cache"))
    assert kernel.load() is None
    lay = ChargeLayout(GROUPS, SHAPES)  # kernel=None: torch ops, no error
    X = _tensors(0)
    for grp, got in zip(GROUPS, _groups(lay, lay.reduce(X, X))):
        torch.testing.assert_close(got, bilinear_reference(grp, X, X), rtol=1e-13, atol=1e-13)
    with pytest.raises(RuntimeError, match="C compiler"):
        ChargeLayout(GROUPS, SHAPES, kernel=True)


def test_the_kernel_can_be_switched_off(fresh_kernel, monkeypatch):
    monkeypatch.setenv("NLD_CALLBACKS_KERNEL", "0")
    assert kernel.load() is None
    lay = ChargeLayout(GROUPS, SHAPES)
    lay.reduce(_tensors(0), _tensors(1))
    assert lay._kplans == {} and lay._plans


def test_the_kernel_is_for_cpu_layouts():
    with pytest.raises(ValueError, match="CPU tensors"):
        ChargeLayout(GROUPS, SHAPES, "cuda", kernel=True)


@needs_kernel
def test_the_kernel_is_built_once_into_its_cache(fresh_kernel, monkeypatch, tmp_path):
    monkeypatch.setenv("NLD_CALLBACKS_CACHE", str(tmp_path))
    lib = kernel.load()
    assert lib is not None and kernel.load() is lib
    (built,) = tmp_path.glob("nld_kernel-*.so")
    mtime = built.stat().st_mtime_ns
    kernel.reset()
    assert kernel.load() is not None and built.stat().st_mtime_ns == mtime  # loaded, not rebuilt


# compiler scripts: each run's arguments logged; one refusing -fopenmp, one dropping it (as a compiler
# whose -fopenmp links another runtime than libgomp: its library is not kept)
_LOG = 'echo "$*" >> "$(dirname "$0")/calls"'
_REFUSE = _LOG + '\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done'
_DROP = _LOG + '\nfor a in "$@"; do shift; [ "$a" = -fopenmp ] || set -- "$@" "$a"; done'


@needs_kernel
@pytest.mark.parametrize("case", ["compiler refuses -fopenmp", "not libgomp", "torch not on libgomp"])
def test_without_openmp_the_kernel_runs_the_parts_in_turn(fresh_kernel, monkeypatch, tmp_path, case):
    from nld_callbacks import charges

    _wrapped_compiler(monkeypatch, tmp_path, _DROP if case == "not libgomp" else _REFUSE)
    if case == "torch not on libgomp":
        monkeypatch.setattr(kernel, "_openmp", lambda: False)
    assert kernel.load() is not None
    (built,) = (tmp_path / "cache").glob("nld_kernel-*.so")
    assert b"GOMP_parallel" not in built.read_bytes()  # built without OpenMP
    calls = (tmp_path / "calls").read_text().splitlines()
    tried = ["-fopenmp" in c for c in calls]
    # the first try asks for OpenMP unless torch runs on another runtime; the library kept is the
    # first try without it
    assert tried == ([] if case == "torch not on libgomp" else [True]) + [False]
    X = _tensors(0, torch.float32)
    serial = ChargeLayout(GROUPS, SHAPES, kernel=True).reduce_many([(X, X)])
    monkeypatch.setattr(charges, "_KERNEL_ENTRIES_PER_THREAD", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert torch.equal(ChargeLayout(GROUPS, SHAPES, kernel=True).reduce_many([(X, X)]), serial)


@needs_kernel
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 vector widths")
def test_a_kernel_built_for_avx2_has_the_same_sums(fresh_kernel, monkeypatch, tmp_path):
    """Without AVX-512 the kernel works in 4 lanes instead of 8: the same checks, on such a build."""
    import subprocess

    probe = subprocess.run([_system_compiler(), "-march=x86-64-v3", "-x", "c", "-c", "-o", os.devnull, "-"],
                           input="", capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("the compiler does not know -march=x86-64-v3")
    # the system compiler, building for AVX2 (x86-64-v3) instead of this CPU
    _wrapped_compiler(monkeypatch, tmp_path, 'for a in "$@"; do shift; [ "$a" = -march=native ] && '
                                             'a=-march=x86-64-v3; set -- "$@" "$a"; done')
    assert kernel.load() is not None
    for dtype in (torch.float32, torch.float64):
        test_kernel_matches_the_reference_loop(dtype)
        test_adam_direction_is_formed_inside_the_read(dtype)
    for shape in ((1, 37, 100), (9, 1030, 1), (13, 1030, 1), (5, 7, 3)):
        test_a_sum_has_the_same_bits_in_every_specialised_job(shape)


@needs_kernel
def test_kernel_job_table_by_hand():
    """One job of the table documented in nld_callbacks.kernel, against sums written out."""
    import ctypes

    lib = kernel.load()
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    y = torch.tensor([[1.0, 0.0, -1.0], [2.0, 2.0, 2.0]])
    ptrs = (ctypes.c_int64 * 2)(x.data_ptr(), y.data_ptr())
    # (A, J, C) = (2, 3, 1): columns j, rows i (R); sums xx, xy, yy, x, y -> columns; xy -> rows
    job = [2, 3, 1, 2, 0, 1, 1, 0, 1, 0, 3, 6, 9, 12, -1, 15, -1, -1, -1]
    res = torch.full((17,), math.nan, dtype=torch.float64)
    assert lib.nld_run(1, ptrs, (ctypes.c_int64 * len(job))(*job), res.data_ptr()) == len(job)
    assert res[:15].tolist() == [17, 29, 45, 9, 10, 9, 5, 4, 5, 5, 7, 9, 3, 2, 1]
    assert res[15:].tolist() == [1 - 3, 8 + 10 + 12]
    # a sum asked for in the second list only: yy per row (the last tensor's square still runs)
    job = [2, 3, 1, 2, 0, 1, 1, 0, 1, -1, -1, -1, -1, -1, -1, -1, 0, -1, -1]
    res = torch.full((2,), math.nan, dtype=torch.float64)
    lib.nld_run(1, ptrs, (ctypes.c_int64 * len(job))(*job), res.data_ptr())
    assert res.tolist() == [1 + 0 + 1, 4 + 4 + 4]


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 37, 100), (9, 1030, 1), (13, 1030, 1), (5, 7, 3)],
                         ids=["rows", "rows+columns", "rows+columns, a full group of four", "columns"])
def test_a_sum_has_the_same_bits_in_every_specialised_job(shape):
    """float64 products are rounded: each is added with one fused multiply-add, whatever else the job sums.

    The same product X·Y at every position among 2-4 tensors, with and without the last square,
    the second reduction and the linear sums (each a different compiled copy of the job).
    """
    import ctypes
    import itertools

    lib = kernel.load()
    A, J, C = shape
    gen = torch.Generator().manual_seed(7)
    X, Y, Z = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    seen = {}
    for K in (2, 3, 4):
        P = K * (K + 1) // 2
        for (a, b), skip, rows, linear in itertools.product(itertools.permutations(range(K), 2), (0, 1), (0, 1),
                                                            (0, 1)):
            ts = [Z] * K
            ts[a], ts[b] = X, Y
            lo, hi = min(a, b), max(a, b)
            q = lo * K - lo * (lo - 1) // 2 + (hi - lo)
            outs, outs0, size = [-1] * (P + K), [-1] * (P + K), J + rows * A
            outs[q] = 0
            if rows:
                outs0[q] = J
            if not skip and q != P - 1:  # the last tensor's square is wanted: that copy runs
                outs[P - 1], size = size, size + J
            if linear:
                outs[P], size = size, size + J
            job = [A, J, C, K, 1, 1, 1, *range(K), *outs, *outs0]
            res = torch.zeros(size, dtype=torch.float64)
            lib.nld_run(1, (ctypes.c_int64 * K)(*[t.data_ptr() for t in ts]), (ctypes.c_int64 * len(job))(*job),
                        res.data_ptr())
            seen[(K, a, b, skip, rows, linear)] = res[:J].clone()
            if rows:
                seen.setdefault("rows", []).append(res[J : J + A].clone())
    first = seen.pop((2, 0, 1, 0, 0, 0))
    row_sums = seen.pop("rows")
    assert torch.allclose(first, (X * Y).sum((0, 2)), rtol=1e-13, atol=1e-13)
    assert all(torch.equal(first.view(torch.int64), v.view(torch.int64)) for v in seen.values())
    assert torch.allclose(row_sums[0], (X * Y).sum((1, 2)), rtol=1e-13, atol=1e-13)
    assert all(torch.equal(row_sums[0].view(torch.int64), v.view(torch.int64)) for v in row_sums)


@needs_kernel
@pytest.mark.parametrize("threads", [2, 3, 5])
def test_jobs_shared_out_over_threads_give_the_same_bits(monkeypatch, threads):
    """Each job runs whole on one thread: the sums do not depend on the number of threads."""
    from nld_callbacks import charges

    X, Y = _tensors(0, torch.float32), _tensors(1, torch.float32)
    pairs = [(X, X), (X, Y), (Y, Y), (Restricted(X, {"conv.bias", "head.bias"}), None)]
    lay = ChargeLayout(GROUPS, SHAPES, kernel=True)
    serial = lay.reduce_many(pairs)
    (plan,) = lay._kplans.values()
    assert plan is not None and plan.parts(threads) is None  # a small call stays on one thread
    monkeypatch.setattr(charges, "_KERNEL_ENTRIES_PER_THREAD", 1)
    n, counts, _, tables = plan.parts(threads)
    assert n == threads and sum(counts) == plan.n_jobs
    # every job once: the parts' tables are the whole table's jobs, shared out
    whole = sorted(tuple(plan.jobs[a : a + m]) for a, m, _ in plan.spans)
    parts = []
    for c, t in zip(counts, tables):
        entries, at = list(t), 0
        for _ in range(c):
            K = entries[at + 3]
            m = 7 + K + 2 * (K * (K + 1) // 2 + K)
            parts.append(tuple(entries[at : at + m]))
            at += m
        assert at == len(entries)
    assert sorted(parts) == whole
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    for _ in range(3):
        assert torch.equal(lay.reduce_many(pairs), serial)


def _runs_sum(xs):
    """A run's sum as ``nld_runs`` documents it: four running sums over i mod 4, added pairwise, then the rest."""
    s = [0.0] * 4
    whole = len(xs) // 4 * 4
    for i in range(whole):
        s[i % 4] += xs[i]
    v = (s[0] + s[1]) + (s[2] + s[3])
    for x in xs[whole:]:
        v += x
    return v


@needs_kernel
def test_compiled_maps_by_hand():
    """``nld_map`` and ``nld_runs`` as documented in nld_callbacks.kernel, against outputs written out."""
    import ctypes

    lib = kernel.load()
    x0 = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    x1 = torch.tensor([-1.0, 0.5, 0.25, 8.0, 0.0], dtype=torch.float64)
    rows = (ctypes.c_int64 * 2)(x0.data_ptr(), x1.data_ptr())
    # runs (first output, first input, length): inputs 0-1 onto outputs 0-1, inputs 2-4 onto 1-3
    # with sign −1, input 4 onto output 0 again; output 4 has none
    runs = torch.tensor([[0, 0, 2], [1, 2, 3], [0, 4, 1]])
    sign = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    out = torch.full((2, 5), math.nan, dtype=torch.float64)
    lib.nld_map(2, rows, 5, 3, runs.data_ptr(), sign.data_ptr(), out.data_ptr())
    assert out.tolist() == [[1 + 2 * 5, 2 - 3, -4, -5, 0], [-1 + 0, 0.5 - 0.25, -8, -0.0, 0]]
    # runs [0, 2), [2, 2) (empty), [2, 5) of the same rows, x0[3] made NaN for the maximum and minimum
    bounds = torch.tensor([0, 2, 2, 5])
    got = {}
    for op, name in enumerate(("sum", "amax", "amin")):
        res = torch.full((2, 3), 7.0, dtype=torch.float64)
        lib.nld_runs(op, 2, rows, 3, bounds.data_ptr(), res.data_ptr())
        got[name] = res.tolist()
        x0[3] = math.nan
    assert got["sum"] == [[3.0, 0.0, 12.0], [-0.5, 0.0, 8.25]]
    assert got["amax"][1] == [0.5, -math.inf, 8.0] and got["amin"][1] == [-1.0, math.inf, 0.0]
    assert got["amax"][0][:2] == [2.0, -math.inf] and math.isnan(got["amax"][0][2])
    assert got["amin"][0][:2] == [1.0, math.inf] and math.isnan(got["amin"][0][2])


@needs_kernel
def test_compiled_run_sums_in_their_documented_order():
    """Bitwise the documented order of ``nld_runs`` on runs of every length mod 4 (sums that rounding tells apart)."""
    import ctypes

    lib = kernel.load()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(200, generator=gen, dtype=torch.float64) * torch.logspace(0, 12, 200, dtype=torch.float64)
    bounds = torch.tensor([0, 1, 3, 6, 10, 19, 38, 39, 120, 200])
    res = torch.empty(len(bounds) - 1, dtype=torch.float64)
    lib.nld_runs(0, 1, (ctypes.c_int64 * 1)(x.data_ptr()), len(res), bounds.data_ptr(), res.data_ptr())
    xs = x.tolist()
    expected = [_runs_sum(xs[a:b]) for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]
    assert res.tolist() == expected
    assert expected != [math.fsum(xs[a:b]) for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]


@needs_kernel
def test_compiled_maps_match_the_reference_and_torch_maps():
    """``to_groups``/``per_group`` of float64 CPU rows in the kernel: the per-group reference loop, torch's maps."""
    lay, torch_maps = ChargeLayout(GROUPS, SHAPES), ChargeLayout(GROUPS, SHAPES, kernel=False)
    pairs = [(_tensors(s), _tensors(s + 10)) for s in range(3)]
    rows = lay.reduce_many(pairs)
    mapped = lay.to_groups(rows)
    for (X, Y), got in zip(pairs, mapped):
        for grp, part in zip(GROUPS, lay.split(got)):
            torch.testing.assert_close(part, bilinear_reference(grp, X, Y), rtol=1e-13, atol=1e-13, msg=grp.key)
    for unsigned in (False, True):
        ref = torch_maps.to_groups(rows, unsigned=unsigned)
        torch.testing.assert_close(lay.to_groups(rows, unsigned=unsigned), ref, rtol=0, atol=1e-14)
        # the same bits from a list of rows, a column of a matrix among them, and with leading dims
        listed = [rows[0], rows.T.contiguous().T[1], rows[2]]
        assert torch.equal(lay.to_groups(listed, unsigned=unsigned), lay.to_groups(rows, unsigned=unsigned))
        assert torch.equal(lay.to_groups(rows.view(3, 1, -1), unsigned=unsigned),
                           lay.to_groups(rows, unsigned=unsigned).view(3, 1, -1))
    mapped[1, 4] = math.nan
    for reduce in ("sum", "mean", "amax", "amin"):
        got = lay.per_group(mapped.view(3, 1, -1), reduce)
        assert got.shape == (3, 1, len(GROUPS))
        torch.testing.assert_close(got.view(3, -1), torch_maps.per_group(mapped, reduce), rtol=1e-14, atol=1e-14,
                                   equal_nan=True)
        for i in range(len(mapped)):
            for g, part in enumerate(lay.split(mapped[i])):
                ref = {"sum": part.sum(), "mean": part.mean(), "amax": part.max(), "amin": part.min()}[reduce]
                torch.testing.assert_close(got[i, 0, g], ref, rtol=1e-14, atol=1e-14, equal_nan=True)
    assert torch.isnan(lay.per_group(mapped, "amax")[1, 0]) and lay._matrices == {}, "expected the compiled maps"
    # rows of another dtype go to torch's maps
    torch.testing.assert_close(lay.to_groups(rows.float()), torch_maps.to_groups(rows.float()))
    assert lay._matrices
