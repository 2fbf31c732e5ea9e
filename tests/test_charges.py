"""The fast ChargeLayout path against the per-group reference loop."""

from types import SimpleNamespace

import pytest
import torch

from nld_callbacks import charges
from nld_callbacks.charges import ChargeLayout, bilinear_reference, linear_reference
from nld_callbacks.symmetries import Member, SymmetryGroup

SHAPES = {"conv.weight": (6, 3, 3, 3), "conv.bias": (6,), "fc.weight": (4, 6), "fc.bias": (4,), "gn.weight": (8, 5),
          "conv2.weight": (5, 6, 3, 3)}

GROUPS = [
    SymmetryGroup("scale", "conv", (Member("conv.weight", 0), Member("conv.bias", 0)), 6, "output channel", "t"),
    SymmetryGroup("rescale", "conv", (Member("conv.weight", 0), Member("conv.bias", 0), Member("fc.weight", 1, -1),
                                      Member("conv2.weight", 1, -1)), 6, "hidden unit", "t"),
    SymmetryGroup("scale", "gn", (Member("gn.weight", 0, blocks=2),), 2, "norm group", "t"),
    SymmetryGroup("scale", "fc", (Member("fc.weight", None), Member("fc.bias", None)), 1, "layer", "t"),
    SymmetryGroup("translation", "fc", (Member("fc.weight", 1), Member("fc.bias", None, offset=6)), 7,
                  "input feature", "t"),
]


def _tensors(seed):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in SHAPES.items()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_layout_matches_reference(dtype, device):
    X = {n: t.to(dtype) for n, t in _tensors(0).items()}
    Y = {n: t.to(dtype) for n, t in _tensors(1).items()}
    lay = ChargeLayout(GROUPS, SHAPES, device)
    Xd, Yd = ({n: t.to(device) for n, t in T.items()} for T in (X, Y))
    fast = lay.split(lay.to_groups(lay.reduce(Xd, Yd)).cpu())  # the reference loops run on the CPU
    fast_unsigned = lay.split(lay.to_groups(lay.reduce(Xd, Xd), unsigned=True).cpu())
    fast_linear = lay.split(lay.to_groups(lay.reduce(Xd)).cpu())
    tol = {torch.float64: 1e-13, torch.float32: 1e-6}[dtype]
    for g, f, fu, fl in zip(GROUPS, fast, fast_unsigned, fast_linear):
        torch.testing.assert_close(f, bilinear_reference(g, X, Y), rtol=tol, atol=tol, msg=g.key)
        torch.testing.assert_close(fu, bilinear_reference(g, X, X, unsigned=True), rtol=tol, atol=tol, msg=g.key)
        torch.testing.assert_close(fl, linear_reference(g, X), rtol=tol, atol=tol, msg=g.key)


def test_reference_by_hand():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    rows = SymmetryGroup("scale", "l", (Member("w", 0),), 3, "row", "t")
    cols = SymmetryGroup("rescale", "l", (Member("w", 1, sign=-1),), 2, "column", "t")
    assert bilinear_reference(rows, {"w": w}, {"w": v}).tolist() == [1.0, 4.0, 11.0]
    assert bilinear_reference(cols, {"w": w}, {"w": w}).tolist() == [-(1 + 9 + 25), -(4 + 16 + 36)]


def test_missing_tensor_counts_as_zero():
    lay = ChargeLayout(GROUPS[:1], SHAPES)
    X = _tensors(0)
    out = lay.reduce({**X, "conv.bias": None}, X)
    ref = lay.reduce({**X, "conv.bias": torch.zeros(6, dtype=torch.float64)}, X)
    assert torch.equal(out, ref)


def test_per_group_aggregates(device):
    lay = ChargeLayout(GROUPS, SHAPES, device)
    vals = torch.arange(lay.n_neurons, dtype=torch.float64)
    sums, means, maxes, mins = (lay.per_group(vals.to(device), r).cpu() for r in ("sum", "mean", "amax", "amin"))
    for i, part in enumerate(lay.split(vals)):
        assert sums[i] == part.sum() and means[i] == part.mean() and maxes[i] == part.max() and mins[i] == part.min()


def test_to_groups_of_many_rows_in_blocks(monkeypatch):
    # on the CPU a product of many rows runs a few rows at a time (the sparse product copies its
    # dense factor), from a matrix or from a list of rows (stacked a block at a time): any block
    # size gives bitwise the rows mapped one by one, and the reference
    lay = ChargeLayout(GROUPS, SHAPES)
    pairs = [(_tensors(i), _tensors(i + 10)) for i in range(5)]
    rows = torch.stack([lay.reduce(X, Y) for X, Y in pairs])
    one_by_one = torch.stack([lay.to_groups(r) for r in rows])
    for block_rows in (1, 2, 3, 5):
        monkeypatch.setattr(charges, "_APPLY_BYTES", block_rows * lay.n_reductions * 8)
        assert torch.equal(lay.to_groups(rows), one_by_one), block_rows
        assert torch.equal(lay.to_groups(list(rows.unbind())), one_by_one), block_rows  # the rows as a list
    for (X, Y), got in zip(pairs, one_by_one):
        for g, part in zip(GROUPS, lay.split(got)):
            torch.testing.assert_close(part, bilinear_reference(g, X, Y), rtol=1e-13, atol=1e-13, msg=g.key)


def test_to_groups_through_the_csr_map_of_other_devices(monkeypatch):
    # off the CPU the maps are CSR, built on the host and copied over, and a product is one mm() of
    # all rows: the same numbers, here on the CPU with another device's maps (kept on the host),
    # from a matrix and from a list of rows, signed, unsigned and per group
    lay = ChargeLayout(GROUPS, SHAPES)
    rows = torch.stack([lay.reduce(X, Y) for X, Y in ((_tensors(i), _tensors(i + 10)) for i in range(4))])
    expected = [lay.to_groups(rows), lay.to_groups(rows, unsigned=True), lay.per_group(lay.to_groups(rows))]
    other = ChargeLayout(GROUPS, SHAPES, kernel=False)  # torch maps
    monkeypatch.setattr(other, "device", SimpleNamespace(type="other"))
    monkeypatch.setattr(charges, "host_to_device", lambda t, device: t)
    got = [other.to_groups(rows), other.to_groups(rows, unsigned=True), other.per_group(other.to_groups(rows))]
    assert {m.layout for m in other._matrices.values()} == {torch.sparse_csr}
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
    torch.testing.assert_close(other.to_groups(list(rows.unbind())), expected[0], rtol=0, atol=1e-14)


def test_cpu_sparse_maps_keep_int32_indices_and_values_only():
    # what MKL reads; the int64 matrix they are made from is given back (a view of its values
    # would keep it alive)
    from nld_callbacks.bench import cpu_allocations

    lay = ChargeLayout(GROUPS, SHAPES)
    n_entries = sum(m.n_neurons(SHAPES[m.param]) for g in GROUPS for m in g.members)
    for which, cols, nnz in (("signed", lay.n_neurons, n_entries), ("groups", len(GROUPS), lay.n_neurons)):
        kept = sum(cpu_allocations(lambda w=which: lay._matrix(w, torch.float64)))
        m = lay._matrix(which, torch.float64)
        assert m.ccol_indices().dtype == m.row_indices().dtype == torch.int32
        assert kept == (cols + 1) * 4 + nnz * (4 + 8), which
    x = torch.randn(3, lay.n_reductions, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    dense = lay._matrix("signed", torch.float64).to_dense()
    torch.testing.assert_close(lay.to_groups(x), x @ dense, rtol=0, atol=1e-15)


def test_params_to_groups_sums_each_neurons_parameters():
    lay = ChargeLayout(GROUPS, SHAPES)
    vals = torch.randn(3, len(lay.params), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = lay.params_to_groups(vals)
    per_reduction = lay.to_groups(vals[:, lay.param_of_reduction], unsigned=True)
    torch.testing.assert_close(got, per_reduction, rtol=1e-15, atol=1e-15)
    assert torch.equal(lay.params_to_groups(vals, rows_at_once=1), got)
    # by hand: a `scale/conv` neuron has one conv.weight row and one conv.bias entry; the rescale
    # neuron adds an fc.weight column and a conv2.weight input channel; the translation neuron 6 is
    # fc.bias alone
    w, b, fc, w2 = (vals[:, lay.params.index(n)] for n in ("conv.weight", "conv.bias", "fc.weight", "conv2.weight"))
    scale, rescale, *_, translation = lay.split(got)
    torch.testing.assert_close(scale, (w + b)[:, None].expand(3, 6))
    torch.testing.assert_close(rescale, (w + b + fc + w2)[:, None].expand(3, 6))
    torch.testing.assert_close(translation[:, 6], vals[:, lay.params.index("fc.bias")])


def test_unknown_parameter_is_a_clear_error():
    with pytest.raises(ValueError, match="exist in the model"):
        ChargeLayout(GROUPS, {"conv.weight": (6, 3, 3, 3)})


# -------------------------------------------------------------------- the fused path's edges

PAIRS = ["XY", "XX", "X"]  # bilinear, square (the same tensor twice), linear


def _expected(group, X, Y, kind):
    if kind == "X":
        return linear_reference(group, X)
    return bilinear_reference(group, X, X if kind == "XX" else Y)


def _mapping(kind, X, Y):
    return (X, None) if kind == "X" else (X, X if kind == "XX" else Y)


@pytest.mark.parametrize("scratch", [None, 7, 40], ids=["default", "tiny_scratch", "small_scratch"])
def test_reduce_many_matches_reference_and_chunking(scratch, device):
    """Tiny scratch buffers force row chunks, split rows (the 'layer' group's 28-entry rows) and
    partial sums over dim-0 chunks for the strided (column) reductions."""
    X, Y = _tensors(0), _tensors(1)
    Xd, Yd = ({n: t.to(device) for n, t in T.items()} for T in (X, Y))
    lay = ChargeLayout(GROUPS, SHAPES, device, scratch_elements=scratch)
    out = lay.reduce_many([_mapping(k, Xd, Yd) for k in PAIRS])
    assert out.shape == (len(PAIRS), lay.n_reductions) and out.dtype == torch.float64 and out.device.type == device.type
    for row, kind in zip(out, PAIRS):
        for g, got in zip(GROUPS, lay.split(lay.to_groups(row).cpu())):
            torch.testing.assert_close(got, _expected(g, X, Y, kind), rtol=1e-13, atol=1e-13, msg=f"{g.key} {kind}")
    single = torch.stack([lay.reduce(*_mapping(k, Xd, Yd)) for k in PAIRS])
    torch.testing.assert_close(out, single, rtol=1e-13, atol=1e-13)


def test_reduce_many_missing_entries_and_mixed_dtypes():
    X, Y = _tensors(0), _tensors(1)
    X32 = {n: t.float() for n, t in X.items()}
    lay = ChargeLayout(GROUPS, SHAPES, scratch_elements=50)
    partial = {n: t for n, t in X.items() if n != "fc.weight"}
    none_bias = {**Y, "conv.bias": None}
    mixed = {**X32, "conv.weight": X["conv.weight"]}  # float64 and float32 tensors in one call
    out = lay.reduce_many([(partial, Y), (X, none_bias), (mixed, mixed), (partial, None)])
    zero_fc = {**X, "fc.weight": torch.zeros(SHAPES["fc.weight"], dtype=torch.float64)}
    zero_bias = {**Y, "conv.bias": torch.zeros(6, dtype=torch.float64)}
    mixed64 = {n: t.double() for n, t in mixed.items()}
    for g, a, b, c, d in zip(GROUPS, *(lay.split(lay.to_groups(r)) for r in out)):
        torch.testing.assert_close(a, bilinear_reference(g, zero_fc, Y), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(b, bilinear_reference(g, X, zero_bias), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(c, bilinear_reference(g, mixed64, mixed64), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(d, linear_reference(g, zero_fc), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_float64_accumulation_is_exact_on_low_precision(dtype):
    """Upcast mode: products of two low-precision numbers are exact in float64, so the fused path
    matches the float64 reference on the same (rounded) values to float64 rounding."""
    X = {n: t.to(dtype) for n, t in _tensors(0).items()}
    Y = {n: t.to(dtype) for n, t in _tensors(1).items()}
    lay = ChargeLayout(GROUPS, SHAPES, float64_accumulation=True, scratch_elements=30)
    for g, got in zip(GROUPS, lay.split(lay.to_groups(lay.reduce(X, Y)))):
        torch.testing.assert_close(got, bilinear_reference(g, X, Y), rtol=1e-12, atol=1e-12, msg=g.key)


def test_non_contiguous_tensors():
    """channels_last weights and transposed views give the same sums as contiguous copies."""
    shapes = {"c.weight": (6, 4, 3, 3), "l.weight": (5, 5)}
    groups = [SymmetryGroup("scale", "c", (Member("c.weight", 0),), 6, "output channel", "t"),
              SymmetryGroup("rescale", "l", (Member("l.weight", 0), Member("l.weight", 1, -1)), 5, "unit", "t")]
    gen = torch.Generator().manual_seed(3)
    X = {"c.weight": torch.randn(6, 4, 3, 3, generator=gen, dtype=torch.float64).to(memory_format=torch.channels_last),
         "l.weight": torch.randn(5, 5, generator=gen, dtype=torch.float64).T}
    Y = {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
    for scratch in (None, 20):
        lay = ChargeLayout(groups, shapes, scratch_elements=scratch)
        out = lay.reduce_many([(X, Y), (X, None)])
        for g, a, b in zip(groups, lay.split(lay.to_groups(out[0])), lay.split(lay.to_groups(out[1]))):
            torch.testing.assert_close(a, bilinear_reference(g, X, Y), rtol=1e-13, atol=1e-13)
            torch.testing.assert_close(b, linear_reference(g, X), rtol=1e-13, atol=1e-13)


def test_op_count_does_not_grow_with_depth():
    """The fused path dispatches the same number of aten ops for 4 and for 64 equal layers."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for depth in (4, 64):
        shapes = {f"l{i}.weight": (8, 8) for i in range(depth)} | {f"l{i}.bias": (8,) for i in range(depth)}
        groups = [SymmetryGroup("scale", f"l{i}", (Member(f"l{i}.weight", 0), Member(f"l{i}.bias", 0)), 8,
                                "output channel", "t") for i in range(depth)]
        lay = ChargeLayout(groups, shapes, scratch_elements=1 << 16)
        X = {n: torch.randn(s) for n, s in shapes.items()}
        Y = {n: torch.randn(s) for n, s in shapes.items()}
        lay.reduce_many([(X, X), (X, Y)])  # builds the plan
        Count.n = 0
        with Count():
            lay.reduce_many([(X, X), (X, Y)])
        counts.append(Count.n)
    assert counts[0] == counts[1], counts


def test_scratch_elements_is_validated():
    with pytest.raises(ValueError, match="scratch_elements"):
        ChargeLayout(GROUPS, SHAPES, scratch_elements=0)


@pytest.mark.parametrize("kernel", [None, False], ids=["kernel_maps", "torch_maps"])
def test_values_of_the_wrong_length_are_refused(kernel):
    # the compiled maps read as many entries as the layout has: a shorter row must never reach them
    lay = ChargeLayout(GROUPS, SHAPES, kernel=kernel)
    short = torch.ones(lay.n_reductions - 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"per-reduction values of length {lay.n_reductions}"):
        lay.to_groups(short)
    with pytest.raises(ValueError, match="per-reduction"):
        lay.to_groups([short, short], unsigned=True)
    for reduce in ("sum", "amax"):
        with pytest.raises(ValueError, match=f"group-neuron values of length {lay.n_neurons}"):
            lay.per_group(torch.ones(2, lay.n_neurons - 1, dtype=torch.float64), reduce)
