"""Charges as pure functions: per-neuron bilinear sums B(X, Y) and linear sums ⟨c, X⟩.

For a group with members i (parameter tensor, neuron axis, sign s_i), physics.md §0 defines

    B(X, Y)[j] = Σ_i s_i · red_i(X_i ⊙ Y_i)[j],        T(X)[j] = Σ_i s_i · red_i(X_i)[j]

where ``red_i`` sums a tensor over every axis but the member's neuron axis. The charge is
Q = B(θ, θ); the identities of §2.1 also need R = B(θ, g), K = B(v, v), P = B(θ, v), ...

Two implementations, one obviously right and one fast, tested against each other:

* :func:`bilinear_reference` / :func:`linear_reference`: a per-group, per-member loop on float64
  copies;
* :class:`ChargeLayout`: built once per model; evaluates any number of products X ⊙ Y over every
  parameter into one flat float64 vector of *reduction neurons* (one entry per (tensor, neuron)),
  and maps those onto the groups' neurons with one call per quantity, whatever the depth. On the
  CPU both come from a compiled kernel (:mod:`nld_callbacks.kernel`: all the products of a tensor
  in one read of it, exact float32 products, float64 sums; each member's run of reductions added
  onto its run of neurons); elsewhere, or without a C compiler, the sums from torch ops in a few
  fused batches (``torch._foreach_copy_`` / ``torch._foreach_mul_`` into one reusable scratch
  buffer, then one per-row ``sum`` per row length) and the maps from one sparse product each.

Example:
    >>> import torch
    >>> from nld_callbacks.symmetries import Member, SymmetryGroup
    >>> g = SymmetryGroup("scale", "fc", (Member("w", axis=0),), 2, "output channel", "example")
    >>> w = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    >>> bilinear_reference(g, {"w": w}, {"w": w})
    tensor([25.,  1.], dtype=torch.float64)
"""

from __future__ import annotations

import ctypes
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import kernel as _kernel
from .symmetries import Member, SymmetryGroup

__all__ = ["AdamDirection", "ChargeLayout", "Restricted", "bilinear_reference", "linear_reference", "reduce_member"]


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t``, a host tensor, on ``device`` without a host synchronisation.

    A CUDA copy goes from pinned memory, asynchronously (torch keeps the pinned block until the
    copy has run); elsewhere this is ``t.to(device)``.
    """
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def reduce_member(x: torch.Tensor, member: Member) -> torch.Tensor:
    """Sum ``x`` (shaped like the member's parameter) onto the member's neurons.

    The sum runs in ``x``'s dtype (torch's cascade summation: about one unit roundoff of relative
    error, inside the residual floor of physics.md §3.2) and the per-neuron result is returned as
    float64; pass float64 ``x`` for float64 accumulation.

    Args:
        x: an elementwise quantity of the parameter's shape (θ², θ·g, θ, ...).
        member: which axis holds the neurons and how they are blocked.

    Returns:
        A float64 vector of ``member.n_neurons(x.shape)`` entries.
    """
    if member.axis is None:
        return x.sum().to(torch.float64).reshape(1)
    axis = member.axis % x.dim()
    dims = tuple(d for d in range(x.dim()) if d != axis)
    out = (x.sum(dim=dims) if dims else x).to(torch.float64)
    if member.blocks is not None:
        out = out.reshape(member.blocks, -1).sum(dim=1)
    return out


def _combine(group: SymmetryGroup, parts: Sequence[tuple[Member, torch.Tensor]], unsigned: bool) -> torch.Tensor:
    out = torch.zeros(group.n_neurons, dtype=torch.float64, device=parts[0][1].device)
    for m, v in parts:
        out[m.offset : m.offset + v.numel()] += v if unsigned else m.sign * v
    return out


def bilinear_reference(
    group: SymmetryGroup,
    X: Mapping[str, torch.Tensor],
    Y: Mapping[str, torch.Tensor],
    *,
    unsigned: bool = False,
) -> torch.Tensor:
    """B(X, Y) per neuron of ``group``, by a plain loop over members on float64 copies.

    Args:
        group: the symmetry group.
        X: parameter name → tensor.
        Y: parameter name → tensor.
        unsigned: use +1 for every member (the group size M of physics.md §0 when X = Y = θ).
    """
    parts = [(m, reduce_member(X[m.param].double() * Y[m.param].double(), m)) for m in group.members]
    return _combine(group, parts, unsigned)


def linear_reference(group: SymmetryGroup, X: Mapping[str, torch.Tensor], *, absolute: bool = False) -> torch.Tensor:
    """T(X) = ⟨c, X⟩ per neuron (c = the all-ones generator on each member); ``absolute`` sums |X|."""
    parts = [(m, reduce_member(X[m.param].double().abs() if absolute else X[m.param].double(), m))
             for m in group.members]
    return _combine(group, parts, unsigned=absolute)


@dataclass(frozen=True)
class _Reduction:
    param: str
    axis: int | None
    blocks: int | None
    start: int
    size: int


# The dense factor of one sparse product on the CPU, at most (its column-major copy is made per call).
_APPLY_BYTES = 1 << 19
# the compiled kernel's operations over the groups' runs of neurons (``nld_runs``)
_RUN_OPS = {"sum": 0, "amax": 1, "amin": 2}

# A chunk this large costs more in memory traffic (the fused path copies before it multiplies)
# than one more dispatched op: it is multiplied straight into the scratch buffer instead.
_DIRECT = 1 << 14


@dataclass(frozen=True)
class _Target:
    """One reduction of a tensor, evaluated on dim-0 slabs of the tensor's product.

    ``mode``: ``"rows"`` (neuron axis 0: one sum per dim-0 entry), ``"all"`` (the whole tensor is
    one neuron: one partial sum per slab) or ``"axis"`` (any other axis: the slab summed over every
    other dim). Outputs are ``start + j // per`` (``per`` > 1 for blocks); partial sums of one
    output from several slabs add up in the final ``index_add_``.
    """

    start: int
    mode: str
    axis: int
    per: int


@dataclass(frozen=True)
class _Slabs:
    """Every reduction of one tensor, read off one product per dim-0 slab."""

    shape: tuple[int, ...]
    targets: tuple[_Target, ...]

    @property
    def n(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def slice_numel(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1


def _slabs(shape: tuple[int, ...], reds: Sequence[_Reduction]) -> _Slabs:
    targets = []
    for r in reds:
        if r.axis is None:
            targets.append(_Target(r.start, "all", -1, 1))
            continue
        n = shape[r.axis]
        per = n // r.blocks if r.blocks is not None else 1
        targets.append(_Target(r.start, "rows" if r.axis == 0 else "axis", r.axis, per))
    return _Slabs(shape, tuple(targets))


@dataclass(frozen=True)
class _Piece:
    """Dim-0 entries ``lo:hi`` of one product (or linear sum) of one tensor, for pair ``pair``."""

    pair: int
    param: int
    sl: _Slabs
    lo: int
    hi: int
    linear: bool
    upcast: bool

    @property
    def whole(self) -> bool:
        return self.lo == 0 and self.hi == self.sl.n

    @property
    def numel(self) -> int:
        return (self.hi - self.lo) * self.sl.slice_numel

    @property
    def shape(self) -> tuple[int, ...]:
        return self.sl.shape if self.whole else (self.hi - self.lo, *self.sl.shape[1:])


@dataclass(frozen=True)
class _Sum:
    src: torch.Tensor
    out: torch.Tensor
    dims: tuple[int, ...]
    row_len: int  # 0 for sums that never merge
    soff: int
    roff: int
    rows: int
    ones: torch.Tensor | None = None  # column sums of a matrix: src is its transpose, times ones (gemv)


# where a piece's factor is: pair, parameter, and its dim-0 slice (None: the whole tensor)
_Source = tuple[int, int, slice | None]


def _source(pc: _Piece) -> _Source:
    return pc.pair, pc.param, None if pc.whole else slice(pc.lo, pc.hi)


def _take(tensors: list[list[torch.Tensor | None]], src: _Source) -> torch.Tensor:
    t = tensors[src[0]][src[1]]
    assert t is not None
    return t if src[2] is None else t[src[2]]


@dataclass(frozen=True)
class _Batch:
    """One fill of the scratch buffer: its products, then its sums.

    The small pieces are copied in with one fused copy (``views`` ← ``fused_x``), and those that
    are products multiplied with one fused product (``prod_views`` *= ``prod_y``); each large
    piece is one op straight into its view (``direct``: view, factors, linear i.e. a copy).
    """

    views: list[torch.Tensor]
    fused_x: list[_Source]
    prod_views: list[torch.Tensor]
    prod_y: list[_Source]
    direct: list[tuple[torch.Tensor, _Source, bool]]
    sums: list[_Sum]

    @classmethod
    def of(cls, fused: list[tuple[torch.Tensor, _Piece]], direct: list[tuple[torch.Tensor, _Piece]],
           sums: list[_Sum]) -> _Batch:
        prod = [(v, pc) for v, pc in fused if not pc.linear]
        return cls([v for v, _ in fused], [_source(pc) for _, pc in fused], [v for v, _ in prod],
                   [_source(pc) for _, pc in prod], [(v, _source(pc), pc.linear) for v, pc in direct], sums)


@dataclass(frozen=True)
class _DtypePlan:
    res_dtype: torch.dtype
    batches: list[_Batch]
    res: torch.Tensor
    index: torch.Tensor
    duplicates: bool


@dataclass(frozen=True)
class _Plan:
    dtypes: list[_DtypePlan]
    zero: bool


class Restricted(Mapping[str, "torch.Tensor | None"]):
    """The entries of ``base`` named in ``names`` (a read-only view: nothing is copied).

    :meth:`ChargeLayout.reduce_many` sees that a restricted mapping reads the same tensors as its
    base, so a product of the base and a linear sum of the restriction read each tensor once.

    Example:
        >>> import torch
        >>> theta = {"a": torch.ones(2), "b": torch.zeros(3)}
        >>> only_a = Restricted(theta, ("a",))
        >>> list(only_a), only_a["a"] is theta["a"], only_a.get("b")
        (['a'], True, None)
    """

    def __init__(self, base: Mapping[str, torch.Tensor | None], names: Sequence[str]) -> None:
        self.base = base
        self.names = frozenset(names)

    def __getitem__(self, name: str) -> torch.Tensor | None:
        if name not in self.names:
            raise KeyError(name)
        return self.base[name]

    def get(self, name: str, default: Any = None) -> Any:
        """``base.get(name)`` for a name in ``names``, else ``default`` (one dict lookup, no KeyError)."""
        return self.base.get(name, default) if name in self.names else default

    def __iter__(self) -> Iterator[str]:
        return (n for n in self.base if n in self.names)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class AdamDirection(Mapping[str, "torch.Tensor | None"]):
    """Adam's update direction u = m̂ / (sqrt(v̂) + ε) of each tensor, made where it is read.

    ``m`` and ``v``: name → the first and second moment (``max_exp_avg_sq`` under AMSGrad);
    ``scalars``: name → (1 − β1^t, sqrt(1 − β2^t), ε), the first two 0-dim float64 tensors (made
    from the step counts by torch ops: nothing is read on the host). Per entry
    u = (m / bc1) / (sqrt(v) / bc2s + ε) in the tensors' dtype, as torch's own Adam orders it. With
    the compiled kernel :meth:`ChargeLayout.reduce_many` forms u inside its one read of m and v and
    keeps nothing; elsewhere (torch ops) ``self[name]`` makes it, one new tensor.

    Example:
        >>> import torch
        >>> m, v, one = torch.tensor([0.2, -0.4]), torch.tensor([0.04, 0.16]), torch.tensor(1.0, dtype=torch.float64)
        >>> AdamDirection({"w": m}, {"w": v}, {"w": (one, one, 0.0)})["w"].tolist()
        [1.0, -1.0]
    """

    def __init__(self, m: Mapping[str, torch.Tensor], v: Mapping[str, torch.Tensor],
                 scalars: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        self.m, self.v, self.scalars = m, v, scalars

    def __getitem__(self, name: str) -> torch.Tensor:
        bc1, bc2s, eps = self.scalars[name]
        return (self.m[name] / bc1) / (self.v[name].sqrt().div_(bc2s).add_(eps))

    def __iter__(self) -> Iterator[str]:
        return iter(self.scalars)

    def __len__(self) -> int:
        return len(self.scalars)


class _AdamU(ctypes.Structure):  # the kernel's ``adam_u``
    _fields_ = [("m", ctypes.c_void_p), ("v", ctypes.c_void_p), ("bc1", ctypes.c_void_p),
                ("bc2s", ctypes.c_void_p), ("eps", ctypes.c_double)]


@dataclass(frozen=True)
class _KernelPlan:
    """The compiled kernel's jobs for one structure of a :meth:`ChargeLayout.reduce_many` call.

    ``slots``: (tensor source, parameter) of every entry of the kernel's address table, in order.
    The jobs write straight into the output matrix; ``zero``: some of its entries are no job's
    (a missing tensor), so it is zeroed first.
    """

    jobs: Any  # ctypes int64 array
    slots: list[tuple[int, int]]
    zero: bool
    #: per job: its offset and length in ``jobs``, and the tensor entries it reads
    spans: list[tuple[int, int, int]]
    _parts: dict[int, tuple[int, Any, Any, list[Any]]] = field(default_factory=dict)

    @property
    def n_jobs(self) -> int:
        return len(self.spans)

    def parts(self, threads: int) -> tuple[int, Any, Any, list[Any]] | None:
        """The jobs shared out over up to ``threads`` threads, for ``nld_run_parts``; ``None``: one thread.

        A thread is given at least :data:`_KERNEL_ENTRIES_PER_THREAD` entries to read. Each job
        stays whole (largest first, to the least loaded thread; each thread's jobs in table order).
        Returns (parts, jobs per part, the parts' table addresses, the tables).
        """
        n = min(threads, len(self.spans), sum(e for *_, e in self.spans) // _KERNEL_ENTRIES_PER_THREAD)
        if n < 2:
            return None
        if n not in self._parts:
            loads = [0] * n
            members: list[list[int]] = [[] for _ in range(n)]
            for j in sorted(range(len(self.spans)), key=lambda j: -self.spans[j][2]):
                p = loads.index(min(loads))
                members[p].append(j)
                loads[p] += self.spans[j][2]
            tables = []
            for m in members:
                entries = [x for j in sorted(m) for x in self.jobs[self.spans[j][0] : sum(self.spans[j][:2])]]
                tables.append((ctypes.c_int64 * len(entries))(*entries))
            counts = (ctypes.c_int64 * n)(*map(len, members))
            self._parts[n] = (n, counts, (ctypes.c_void_p * n)(*map(ctypes.addressof, tables)), tables)
        return self._parts[n]


_KERNEL_DTYPES = {torch.float32: 0, torch.float64: 1}
# rows of at most this many entries (a 3x3 kernel's 9 per input channel), in a job of 8 rows i or
# more, are summed as columns of the (A, J·C) view, vector lanes along (j, c), instead of one short
# vector sum per (i, j); so are rows shorter than a vector (8) in any job. Measured (AVX-512, the
# rows and columns of three tensors): a 64x64x3x3 convolution 24 against 97 µs, 16 entries 45
# against 121, 25 entries 72 against 102 but with 16 rows 29 against 26, fewer than 8 rows of 16
# entries slower as columns
_SHORT_ROWS = 16
#: tensor entries a thread of the kernel reads at least: on fewer, starting it costs more than it saves
_KERNEL_ENTRIES_PER_THREAD = 1 << 18


class ChargeLayout:
    """Index plan that evaluates every group's bilinear sums with a fixed number of batched ops.

    The flat *reduction* vector holds one float64 entry per (parameter, neuron-axis, neuron);
    :meth:`to_groups` maps any per-reduction quantity onto the flat *group-neuron* vector (groups
    concatenated in order) with the members' signs, and :meth:`per_group` aggregates group-neuron
    values per group.

    Args:
        groups: the symmetry groups to evaluate.
        shapes: parameter name → shape (or tensor) for every parameter the groups name.
        device: where the index tensors live (the parameters' device).
        float64_accumulation: upcast every tensor to float64 before multiplying and summing
            (exact products, float64 sums; several times slower on low-precision tensors). By
            default products and per-neuron sums run in the tensors' own dtype.
        scratch_elements: bound on the reusable product buffer, per compute dtype (``None``: 1/32
            of the grouped parameters' entries, clamped to [2¹⁸, 2²⁰]; never below the largest
            ``tensor[i]`` slice). It bounds the extra memory; products of larger tensors are
            evaluated in slabs of dim-0 entries, each product once for all of its reductions.
        kernel: evaluate CPU float32/float64 products with the compiled kernel of
            :mod:`nld_callbacks.kernel` (every product and linear sum of a tensor in one read of
            it, exact products, float64 sums; nothing allocated), and map float64 CPU rows onto
            the group neurons and groups with it (:meth:`to_groups`, :meth:`per_group`: one call
            for any number of rows, which are read where they are). ``None`` (default): where it
            can be built and the call's tensors suit it (contiguous, on the CPU, float32 or
            float64, at most four distinct tensors per parameter, or three with an
            :class:`AdamDirection`, whose u it forms as it reads m and v), torch ops otherwise; ``False``:
            torch ops only; ``True``: the kernel or an error if it cannot be built.

    Cost of one :meth:`reduce_many` call with the compiled kernel (CPU): one call, which reads every
    tensor once and writes the sums in place, and no tensor operation unless some entries are no
    product's (one ``zero_``). With torch ops (CUDA, other dtypes): per fused batch of at most
    ``scratch_elements`` entries, one ``_foreach_copy_`` and one ``_foreach_mul_`` for the small
    tensors, one ``mul(out=)`` per large slab, and one ``sum`` per distinct row length (plus one
    per column or whole-tensor reduction: a gemv with ones for a matrix's columns); then one cast
    and one ``index_copy_`` (``index_add_`` where slabs share outputs). The scratch
    buffer is allocated for the call only; no parameter is copied outside it, nothing leaves the
    device.
    """

    def __init__(
        self,
        groups: Sequence[SymmetryGroup],
        shapes: Mapping[str, Sequence[int] | torch.Tensor],
        device: torch.device | str = "cpu",
        *,
        float64_accumulation: bool = False,
        scratch_elements: int | None = None,
        kernel: bool | None = None,
    ) -> None:
        self.groups = list(groups)
        self.float64_accumulation = float64_accumulation
        self.device = torch.device(device)
        if kernel and self.device.type != "cpu":
            raise ValueError(f"The compiled kernel sums CPU tensors; this layout is on {self.device}")
        shape = {n: tuple(s.shape if isinstance(s, torch.Tensor) else s) for n, s in shapes.items()}
        missing = sorted({m.param for g in groups for m in g.members} - shape.keys())
        if missing:
            raise ValueError(f"Expected every grouped parameter to exist in the model, but {missing} do not")
        index: dict[tuple[str, int | None, int | None], _Reduction] = {}
        goff: list[int] = []
        # each member's reductions land on a run of its group's neurons: (first neuron, first
        # reduction, length), and the member's sign
        runs: list[tuple[int, int, int]] = []
        signs: list[float] = []
        start = 0
        gstart = 0
        for g in self.groups:
            goff.append(gstart)
            for m in g.members:
                key = (m.param, None if m.axis is None else m.axis % len(shape[m.param]), m.blocks)
                if key not in index:
                    n = m.n_neurons(shape[m.param])
                    index[key] = _Reduction(m.param, key[1], m.blocks, start, n)
                    start += n
                r = index[key]
                if m.offset + r.size > g.n_neurons:
                    raise ValueError(
                        f"Group {g.key!r}: member {m.param!r} gives {r.size} neurons at offset {m.offset}, "
                        f"more than the group's n_neurons={g.n_neurons}"
                    )
                runs.append((gstart + m.offset, r.start, r.size))
                signs.append(float(m.sign))
            gstart += g.n_neurons
        self.n_reductions = start
        self.n_neurons = gstart
        # parameter name -> its reductions, in first-seen order
        self.reductions: dict[str, list[_Reduction]] = {}
        for r in index.values():
            self.reductions.setdefault(r.param, []).append(r)
        self.params = list(self.reductions)
        dev = self.device
        #: whether any reduction feeds each group neuron (host): not for the other ranks' rows of
        #: a sharded parameter
        self.covered = torch.zeros(gstart, dtype=torch.bool)
        for first, _, n in runs:
            self.covered[first : first + n] = True
        self.covers_all = bool(self.covered.all())
        # the maps' plan, on the host (the compiled maps read it; torch's sparse maps are built from
        # it, see _matrix), and the groups' bounds on the neuron vector
        self._runs = torch.tensor(runs, dtype=torch.long).reshape(-1, 3)
        self._run_sign = {"signed": torch.tensor(signs, dtype=torch.float64),
                          "unsigned": torch.ones(len(runs), dtype=torch.float64)}
        self._bounds = torch.tensor([*goff, gstart], dtype=torch.long)
        sizes = torch.tensor([g.n_neurons for g in self.groups], dtype=torch.long)
        self._group_of_neuron = torch.repeat_interleave(torch.arange(len(self.groups)), sizes)
        self.group_index = self._group_of_neuron.to(dev)
        self.group_offsets = goff
        self._group_sizes = sizes.to(dev)
        self._matrices: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        # which parameter each reduction entry belongs to (for per-tensor coefficients)
        owner = torch.empty(start, dtype=torch.long)
        for pi, p in enumerate(self.params):
            for r in self.reductions[p]:
                owner[r.start : r.start + r.size] = pi
        self.param_of_reduction = owner.to(dev)
        self.shapes = {p: shape[p] for p in self.params}
        self._shape_of = [torch.Size(shape[p]) for p in self.params]
        numel = sum(math.prod(self.shapes[p]) for p in self.params)
        if scratch_elements is None:
            scratch_elements = min(max(numel // 32, 1 << 18), 1 << 20)
        if not isinstance(scratch_elements, int) or scratch_elements < 1:
            raise ValueError(f"Expected `scratch_elements` to be a positive int but got {scratch_elements!r}")
        self._slabs = {p: _slabs(self.shapes[p], self.reductions[p]) for p in self.params}
        least = max((sl.slice_numel for sl in self._slabs.values()), default=1)
        self.scratch_elements = max(scratch_elements, least)
        self._plans: dict[Any, _Plan] = {}
        self._ones_of: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self._scratch: dict[torch.dtype, torch.Tensor] = {}
        self._res: dict[torch.dtype, torch.Tensor] = {}
        self._lib = _kernel.load() if kernel is not False and self.device.type == "cpu" else None
        if kernel and self._lib is None:
            raise RuntimeError("The compiled kernel is not available: it needs a C compiler (`cc` or $CC) and "
                               "NLD_CALLBACKS_KERNEL not set to 0; pass kernel=None to fall back to torch ops")
        self._kplans: dict[Any, _KernelPlan | None] = {}

    @property
    def compiled(self) -> bool:
        """Whether the compiled kernel is loaded: the sums and maps of suitable calls run in it."""
        return self._lib is not None

    def map_runs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The plan of :meth:`to_groups` (host tensors).

        The runs ``(first neuron, first reduction, length)`` (int64, one row each, in order) and
        each run's sign (float64) in the signed and the unsigned map.
        """
        return self._runs, self._run_sign["signed"], self._run_sign["unsigned"]

    @property
    def kernel(self) -> Any:
        """The compiled kernel this layout runs on (:func:`nld_callbacks.kernel.load`), or ``None``."""
        return self._lib

    @property
    def n_plans(self) -> int:
        """How many evaluation plans (one per distinct set of products asked for) are built."""
        return len(self._plans) + len(self._kplans)

    def reduce(self, tensors: Mapping[str, torch.Tensor | None], other: Mapping[str, torch.Tensor | None] | None = None,
               *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Per-reduction float64 sums of ``tensors ⊙ other`` (or of ``tensors`` alone if linear).

        Args:
            tensors: parameter name → X (a missing or ``None`` entry counts as zeros).
            other: parameter name → Y; ``None`` reduces X itself (linear charges).
            out: optional preallocated float64 vector of ``n_reductions`` entries.
        """
        res = self.reduce_many([(tensors, other)], out=None if out is None else out.view(1, -1))
        return res[0]

    def reduce_many(self, pairs: Sequence[tuple[Mapping[str, torch.Tensor | None],
                                                 Mapping[str, torch.Tensor | None] | None]],
                    *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Several :meth:`reduce` calls in one fused evaluation: row k is ``reduce(*pairs[k])``.

        All products of one parameter chunk share a batch, so each tensor is read from memory about
        once however many products need it; the number of tensor operations depends on the number
        of fused batches and distinct row lengths, not on the number of layers.

        Args:
            pairs: ``(X, Y)`` mappings as :meth:`reduce` takes them (``Y = None``: linear sums).
            out: optional preallocated float64 ``(len(pairs), n_reductions)`` matrix.

        Returns:
            The float64 ``(len(pairs), n_reductions)`` matrix.

        Example:
            >>> import torch
            >>> from nld_callbacks.symmetries import Member, SymmetryGroup
            >>> g = SymmetryGroup("scale", "fc", (Member("w", axis=0),), 2, "output channel", "example")
            >>> lay = ChargeLayout([g], {"w": (2, 2)})
            >>> w, v = torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.ones(2, 2)
            >>> lay.reduce_many([({"w": w}, {"w": w}), ({"w": w}, {"w": v}), ({"w": v}, None)]).tolist()
            [[25.0, 1.0], [7.0, 1.0], [2.0, 2.0]]
        """
        n = len(pairs)
        if out is None:
            out = torch.empty((n, self.n_reductions), dtype=torch.float64, device=self.device)
        elif out.shape != (n, self.n_reductions) or out.dtype != torch.float64:
            raise ValueError(f"Expected `out` to be a float64 tensor of shape {(n, self.n_reductions)} but got "
                             f"{out.dtype} {tuple(out.shape)}")
        if n == 0:
            return out
        if self._lib is not None and self._run_kernel(pairs, out):
            return out
        xs: list[list[torch.Tensor | None]] = []
        ys: list[list[torch.Tensor | None]] = []
        key: list[Any] = []
        for X, Y in pairs:
            xk = [X.get(p) for p in self.params]
            if Y is None:
                yk: list[torch.Tensor | None] = [None] * len(xk)
                key.append(tuple(None if x is None else x.dtype for x in xk))
            else:
                yk = [Y.get(p) for p in self.params]
                key.append(tuple(None if x is None or y is None else (x.dtype, y.dtype, x is y)
                                 for x, y in zip(xk, yk)))
            xs.append(xk)
            ys.append(yk)
        tkey = tuple(key)
        plan = self._plans.get(tkey)
        if plan is None:
            plan = self._plans[tkey] = self._build_plan(tkey)
        flat = out.view(-1)
        if plan.zero:
            flat.zero_()
        # the scratch buffers hold memory only during the call: their storages are given back
        # after it (the precomputed views keep their offsets and see the new allocation next time)
        storages = [t.untyped_storage() for t in self._scratch.values()]
        for st, t in zip(storages, self._scratch.values()):
            if st.nbytes() == 0:
                st.resize_(t.numel() * t.element_size())
        try:
            for dp in plan.dtypes:
                self._run(dp, xs, ys, flat)
        finally:
            for st in storages:
                st.resize_(0)
        return out

    # ------------------------------------------------------------------ compiled kernel
    def _run_kernel(self, pairs: Sequence[tuple[Mapping[str, torch.Tensor | None],
                                                 Mapping[str, torch.Tensor | None] | None]],
                    out: torch.Tensor) -> bool:
        """Evaluate ``pairs`` into ``out`` with the compiled kernel; ``False`` if they do not suit it.

        The pairs' mappings are told apart by identity (a :class:`Restricted` one by its base's), so
        the products of θ, g and v of a tracked step read each of the three once per tensor.
        """
        if not out.is_contiguous():  # the jobs write at offsets of a dense matrix
            return False
        roots: list[Mapping[str, torch.Tensor | None]] = []
        form: list[tuple[tuple[int, frozenset[str] | None] | None, ...]] = []
        for pair in pairs:
            ends: list[tuple[int, frozenset[str] | None] | None] = []
            for M in pair:
                if M is None:
                    ends.append(None)
                    continue
                names = None
                if isinstance(M, Restricted):
                    names, M = M.names, M.base
                r = next((k for k, m in enumerate(roots) if m is M), len(roots))
                if r == len(roots):
                    roots.append(M)
                ends.append((r, names))
            form.append(tuple(ends))
        # every root's tensor of each parameter; an Adam direction's: its (m, v) and its scalars,
        # whose address the kernel reads (code + 2: formed from them)
        tensors: list[list[Any]] = []
        derived: dict[tuple[int, int], _AdamU] = {}
        codes: list[int | None] = []
        for r, M in enumerate(roots):
            adam = M if isinstance(M, AdamDirection) else None
            row: list[Any] = []
            for i, (p, shape) in enumerate(zip(self.params, self._shape_of)):
                if adam is None:  # (the common case, checked inline: this loop runs every tracked step)
                    t = M.get(p)
                    if t is None:
                        row.append(None)
                        codes.append(None)
                        continue
                    code = _KERNEL_DTYPES.get(t.dtype)
                    # anything else (a GPU tensor, a strided view, a wrong shape) goes to torch ops
                    if code is None or not t.is_cpu or t.shape != shape or not t.is_contiguous():
                        return False
                    row.append(t)
                    codes.append(code)
                    continue
                # (an Adam direction's m and v: u is formed in the kernel, never made here)
                ts: tuple[torch.Tensor | None, ...] = (adam.m.get(p), adam.v.get(p)) if p in adam.scalars else (None,)
                first = ts[0]
                if first is None:
                    row.append(None)
                    codes.append(None)
                    continue
                code = _KERNEL_DTYPES.get(first.dtype)
                if code is None or any(t is None or t.dtype != first.dtype or not t.is_cpu or t.shape != shape
                                       or not t.is_contiguous() for t in ts):
                    return False
                second = ts[-1]
                bc1, bc2s, eps = adam.scalars[p]
                if second is None or any(c.dtype != torch.float64 or not c.is_cpu for c in (bc1, bc2s)):
                    return False
                derived[r, i] = _AdamU(first.data_ptr(), second.data_ptr(), bc1.data_ptr(), bc2s.data_ptr(), eps)
                code += 2
                row.append(first)
                codes.append(code)
            tensors.append(row)
        key = (tuple(form), tuple(codes))
        if key in self._kplans:
            kp = self._kplans[key]
        else:
            kp = self._kplans[key] = self._build_kernel_plan(form, codes)
        if kp is None:
            return False
        assert self._lib is not None
        if derived:
            addresses = [ctypes.addressof(derived[r, i]) if (r, i) in derived else tensors[r][i].data_ptr()
                         for r, i in kp.slots]
        else:
            addresses = [tensors[r][i].data_ptr() for r, i in kp.slots]
        ptrs = (ctypes.c_int64 * len(kp.slots))(*addresses)
        if kp.zero:
            out.zero_()
        parts = kp.parts(torch.get_num_threads())  # as many threads as torch's own CPU ops use
        if parts is None:
            self._lib.nld_run(kp.n_jobs, ptrs, kp.jobs, out.data_ptr())
        else:
            self._lib.nld_run_parts(*parts[:3], ptrs, out.data_ptr())
        return True

    def _build_kernel_plan(self, form: list[tuple[tuple[int, frozenset[str] | None] | None, ...]],
                           codes: list[int | None]) -> _KernelPlan | None:
        """One job per reduction of every parameter some pair reads: all of its products at once.

        ``None`` (torch ops instead) where a parameter's sums need more than four tensors or
        tensors of two dtypes, or one product is asked for twice in the call.
        """
        P, R = len(self.params), self.n_reductions
        slots: list[tuple[int, int]] = []
        table: list[int] = []
        spans: list[tuple[int, int, int]] = []
        written = 0
        for i, p in enumerate(self.params):
            asks: list[tuple[int, int, int | None]] = []  # (pair, first tensor, second tensor or None)
            for k, ends in enumerate(form):
                x, y = ends
                assert x is not None
                if (x[1] is not None and p not in x[1]) or codes[x[0] * P + i] is None:
                    continue
                if y is not None and ((y[1] is not None and p not in y[1]) or codes[y[0] * P + i] is None):
                    continue
                asks.append((k, x[0], None if y is None else y[0]))
            if not asks:
                continue
            used = sorted({r for _, a, b in asks for r in (a, b) if r is not None})
            made = [r for r in used if (codes[r * P + i] or 0) >= 2]  # a derived tensor (Adam's u)
            # a tensor whose square no pair asks for goes last: the kernel then skips that product;
            # a derived one goes last in any case (the kernel forms it there, and its square)
            unsquared = made or [r for r in used if not any(a == b == r for _, a, b in asks)]
            if unsquared:
                used.remove(unsquared[-1])
                used.append(unsquared[-1])
            K = len(used)
            dtypes = {(codes[r * P + i] or 0) & 1 for r in used}
            if K > (3 if made else 4) or len(dtypes) > 1 or len(made) > 1:
                return None
            code = dtypes.pop() + (2 if made else 0)
            at = {r: n for n, r in enumerate(used)}
            qs = []
            for _, a, b in asks:
                u, w = at[a], (None if b is None else at[b])
                if w is None:
                    qs.append(K * (K + 1) // 2 + u)
                else:
                    u, w = min(u, w), max(u, w)
                    qs.append(u * K - u * (u - 1) // 2 + (w - u))
            if len(set(qs)) != len(qs):
                return None
            first = len(slots)
            slots.extend((r, i) for r in used)
            shape = self.shapes[p]
            reds = list(self.reductions[p])
            # a reduction on axis 0 and one on axis 1 share a job: the (shape[0], shape[1], rest)
            # view's sums of each (i, j) go to both (one read of the tensor for its rows and columns)
            rows = next((r for r in reds if r.axis == 0), None)
            cols = next((r for r in reds if r.axis == 1), None)
            jobs_of: list[tuple[_Reduction, _Reduction | None]] = []
            if rows is not None and cols is not None:
                jobs_of.append((cols, rows))
                reds = [r for r in reds if r is not rows and r is not cols]
            jobs_of += [(r, None) for r in reds]
            QT = K * (K + 1) // 2 + K
            for red, red0 in jobs_of:
                if red.axis is None:
                    A, J, C = 1, 1, math.prod(shape)
                else:
                    A, J, C = math.prod(shape[: red.axis]), shape[red.axis], math.prod(shape[red.axis + 1 :])
                outs, outs0 = [-1] * QT, [-1] * QT
                for (k, _, _), q in zip(asks, qs):
                    outs[q] = k * R + red.start
                    written += red.size
                    if red0 is not None:
                        outs0[q] = k * R + red0.start
                        written += red0.size
                start = len(table)
                per = J // red.size
                # short rows: columns of the (A, J·C) view, per·C of them to an output
                if 1 < C and (C < 8 or (C <= _SHORT_ROWS and A >= 8)):
                    J, C, per = J * C, 1, per * C
                table += [A, J, C, K, code, per, 1 if red0 is None else A // red0.size,
                          *range(first, first + K), *outs, *outs0]
                spans.append((start, len(table) - start, A * J * C * K))
        jobs = (ctypes.c_int64 * len(table))(*table)
        return _KernelPlan(jobs, slots, zero=written != len(form) * R, spans=spans)

    # ------------------------------------------------------------------ fused evaluation
    def _buffer(self, store: dict[torch.dtype, torch.Tensor], dtype: torch.dtype, size: int) -> torch.Tensor:
        buf = store.get(dtype)
        if buf is None or buf.numel() < size:
            buf = store[dtype] = torch.empty(size, dtype=dtype, device=self.device)
        st = buf.untyped_storage()
        if st.nbytes() == 0:  # a scratch buffer between calls (views need its memory to be made)
            st.resize_(buf.numel() * buf.element_size())
        return buf

    def _build_plan(self, key: tuple[Any, ...]) -> _Plan:
        """Split every (pair, parameter) product into dim-0 slabs, each summed every way asked for.

        One product serves every reduction of its parameter (rows, columns, the whole). The slabs
        are packed into batches of at most ``scratch_elements`` entries per compute dtype, and
        every view the evaluation needs is made once, here.
        """
        by_dtype: dict[torch.dtype, list[tuple[int, int, bool, bool]]] = {}
        covered = 0
        for k, codes in enumerate(key):
            for i, code in enumerate(codes):
                if code is None:
                    continue
                linear = not isinstance(code, tuple)
                own = (code,) if linear else code[:2]
                cdt = code if linear else torch.promote_types(code[0], code[1])
                if self.float64_accumulation:
                    cdt = torch.float64
                by_dtype.setdefault(cdt, []).append((k, i, linear, any(d != cdt for d in own)))
                covered += sum(r.size for r in self.reductions[self.params[i]])
        dtypes = [self._build_dtype_plan(cdt, items) for cdt, items in by_dtype.items()]
        full = covered == len(key) * self.n_reductions and not any(dp.duplicates for dp in dtypes)
        return _Plan(dtypes, zero=not full)

    def _build_dtype_plan(self, cdt: torch.dtype, items: list[tuple[int, int, bool, bool]]) -> _DtypePlan:
        S = self.scratch_elements
        rdt = torch.float32 if cdt in (torch.float16, torch.bfloat16) else cdt
        # parameter-major, then slab-major: the products of one slab follow each other, so the
        # slab is read from memory once and the other products find it in cache
        owners: dict[int, list[tuple[int, bool, bool]]] = {}
        for k, i, linear, upcast in items:
            owners.setdefault(i, []).append((k, linear, upcast))
        pieces: list[_Piece] = []
        for i, users in owners.items():
            sl = self._slabs[self.params[i]]
            per = max(1, S // sl.slice_numel)
            chunks = -(-sl.n // per)
            step = -(-sl.n // chunks)  # balanced slabs of at most S entries
            for lo in range(0, sl.n, step):
                hi = min(lo + step, sl.n)
                pieces.extend(_Piece(k, i, sl, lo, hi, linear, upcast) for k, linear, upcast in users)
        batches: list[list[_Piece]] = []
        cur: list[_Piece] = []
        used = 0
        for pc in pieces:
            if cur and used + pc.numel > S:
                batches.append(cur)
                cur, used = [], 0
            cur.append(pc)
            used += pc.numel
        if cur:
            batches.append(cur)
        need = max(sum(pc.numel for pc in b) for b in batches)
        old = self._scratch.get(cdt)
        if old is not None and old.numel() < need:
            self._plans.clear()  # the plans built so far hold views of the smaller buffer
        scratch = self._buffer(self._scratch, cdt, need)  # never more than the largest batch
        n_out = sum(self._outputs(pc, t)[1] for pc in pieces for t in pc.sl.targets)
        res = self._buffer(self._res, rdt, n_out)
        idx: list[int] = []
        plans = []
        roff = 0
        for batch in batches:
            batch.sort(key=lambda pc: pc.sl.slice_numel)
            offs, soff = [], 0
            views: list[torch.Tensor] = []
            for pc in batch:
                views.append(scratch[soff : soff + pc.numel].view(pc.shape))
                offs.append(soff)
                soff += pc.numel
            sums: list[_Sum] = []
            # first every per-row sum (adjacent slabs of one row length merge into one sum), then the rest
            for pc, off in zip(batch, offs):
                for t in pc.sl.targets:
                    if t.mode != "rows":
                        continue
                    L, rows = pc.sl.slice_numel, pc.hi - pc.lo
                    last = sums[-1] if sums else None
                    if last is not None and last.row_len == L and last.soff + last.rows * L == off:
                        n = last.rows + rows
                        sums[-1] = _Sum(scratch[last.soff : off + rows * L].view(n, L),
                                        res[last.roff : last.roff + n], (1,), L, last.soff, last.roff, n)
                    else:
                        sums.append(_Sum(scratch[off : off + rows * L].view(rows, L), res[roff : roff + rows], (1,),
                                         L, off, roff, rows))
                    idx.extend(pc.pair * self.n_reductions + t.start + j // t.per for j in range(pc.lo, pc.hi))
                    roff += rows
            # then the other sums, one per run of products of the same slab (several pairs' products
            # of one slab lie side by side in the scratch buffer: one sum over a leading pair dim)
            i = 0
            while i < len(batch):
                pc, off = batch[i], offs[i]
                j = i + 1
                while (j < len(batch) and batch[j].sl is pc.sl and (batch[j].lo, batch[j].hi) == (pc.lo, pc.hi)
                       and offs[j] == off + (j - i) * pc.numel):
                    j += 1
                for t in pc.sl.targets:
                    if t.mode == "rows":
                        continue
                    outs, n = self._outputs(pc, t)
                    dims: tuple[int, ...]
                    if t.mode == "all":
                        src, dims = scratch[off : off + pc.numel].view(1, pc.numel), (1,)
                    else:
                        src, dims = views[i], tuple(d for d in range(views[i].dim()) if d != t.axis)
                    if dims == (0,) and src.dim() == 2 and src.dtype == rdt and rdt in (torch.float32, torch.float64):
                        # a matrix's column sums: one gemv each reads it about twice as fast as sum(dim=0)
                        ones = self._ones(src.shape[0], rdt)
                        for q in range(i, j):
                            sums.append(_Sum(views[q].mT, res[roff : roff + n], dims, 0, offs[q], roff, n, ones))
                            idx.extend(batch[q].pair * self.n_reductions + o for o in outs)
                            roff += n
                        continue
                    k = j - i
                    if k == 1:
                        sums.append(_Sum(src, res[roff : roff + n], dims, 0, off, roff, n))
                    else:
                        every = scratch[off : off + k * pc.numel].view(k, *src.shape)
                        sums.append(_Sum(every, res[roff : roff + k * n].view(k, n), tuple(d + 1 for d in dims), 0,
                                         off, roff, k * n))
                    for q in range(i, j):
                        idx.extend(batch[q].pair * self.n_reductions + o for o in outs)
                    roff += k * n
                i = j
            direct = [(v, pc) for v, pc in zip(views, batch)
                      if not pc.upcast and (pc.numel >= _DIRECT or len(batch) == 1)]
            fused = [(v, pc) for v, pc in zip(views, batch) if all(pc is not q for _, q in direct)]
            plans.append(_Batch.of(fused, direct, sums))
        dup = len(set(idx)) != len(idx)
        small = dup and max(idx, default=0) < 2**31
        # index_add_ takes int32 indices (half the memory); index_copy_ (no duplicates) wants int64
        index = host_to_device(torch.tensor(idx, dtype=torch.int32 if small else torch.long), self.device)
        return _DtypePlan(rdt, plans, res[:roff], index, dup)

    def _ones(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        key = (n, dtype)
        if key not in self._ones_of:
            self._ones_of[key] = torch.ones(n, dtype=dtype, device=self.device)
        return self._ones_of[key]

    @staticmethod
    def _outputs(pc: _Piece, t: _Target) -> tuple[list[int], int]:
        """Reduction indices of the sums one slab gives for one target, and their number."""
        if t.mode == "rows":
            return [t.start + j // t.per for j in range(pc.lo, pc.hi)], pc.hi - pc.lo
        if t.mode == "all":
            return [t.start], 1
        n = pc.sl.shape[t.axis]
        return [t.start + j // t.per for j in range(n)], n

    @staticmethod
    def _run(dp: _DtypePlan, xs: list[list[torch.Tensor | None]], ys: list[list[torch.Tensor | None]],
             flat: torch.Tensor) -> None:
        for b in dp.batches:
            # large slabs: the product straight into the scratch buffer (one read of each factor)
            for v, src, linear in b.direct:
                if linear:
                    v.copy_(_take(xs, src))
                else:
                    torch.mul(_take(xs, src), _take(ys, src), out=v)
            # small ones: one fused copy and one fused product for the whole batch
            if b.views:
                torch._foreach_copy_(b.views, [_take(xs, src) for src in b.fused_x])
                if b.prod_views:
                    torch._foreach_mul_(b.prod_views, [_take(ys, src) for src in b.prod_y])
            for sm in b.sums:
                if sm.ones is not None:
                    torch.mv(sm.src, sm.ones, out=sm.out)  # src: the slab transposed
                elif sm.src.dtype == dp.res_dtype:
                    torch.sum(sm.src, sm.dims, out=sm.out)
                else:
                    torch.sum(sm.src, sm.dims, dtype=dp.res_dtype, out=sm.out)
        res = dp.res if dp.res.dtype == torch.float64 else dp.res.to(torch.float64)
        if dp.duplicates:  # partial sums of one output from several slabs add up (``flat`` was zeroed)
            flat.index_add_(0, dp.index, res)
        else:
            flat.index_copy_(0, dp.index, res)

    def _matrix(self, which: str, dtype: torch.dtype) -> torch.Tensor:
        """A sparse matrix of the layout, built once per dtype.

        ``signed``/``unsigned``: group neurons × reductions (the members' signs, or ones);
        ``groups``: groups × group neurons (ones). Stored transposed, compressed by column (CSC,
        int32 indices) on the CPU, for MKL's ``dense @ csc``; CSR elsewhere. Built on the host
        (coalescing on a GPU would wait for it) and copied without a host synchronisation: the
        first tracked steps, which build the maps, need none either.
        """
        key = (which, dtype)
        m = self._matrices.get(key)
        if m is None:
            if which == "groups":
                rows, cols = self._group_of_neuron, torch.arange(self.n_neurons)
                shape, vals = (len(self.groups), self.n_neurons), torch.ones(self.n_neurons)
            else:
                # every entry of the runs, member by member
                first, start, length = self._runs.unbind(1)
                member = torch.repeat_interleave(torch.arange(len(length)), length)
                within = torch.arange(len(member)) - (length.cumsum(0) - length)[member]
                rows, cols, vals = first[member] + within, start[member] + within, self._run_sign[which][member]
                shape = (self.n_neurons, self.n_reductions)
            with warnings.catch_warnings():  # torch calls its CSR support "beta" at every construction
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                # (and some releases warn that checks are off whatever a construction asks for)
                warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
                coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals.to(dtype), shape, check_invariants=True)
                coo = coo.coalesce()
                if self.device.type == "cpu":  # int32 indices: what MKL reads (int64 ones are converted per call)
                    m = coo.t().coalesce().to_sparse_csc()
                    # values() is a view whose base is the int64 matrix: a copy lets that matrix go
                    m = torch.sparse_csc_tensor(m.ccol_indices().int(), m.row_indices().int(), m.values().clone(),
                                                m.shape, check_invariants=True)
                else:
                    csr = coo.to_sparse_csr()
                    crow, col, val = (host_to_device(t, self.device)
                                      for t in (csr.crow_indices(), csr.col_indices(), csr.values()))
                    # checked on the host; the shape given: nothing is read back from the device
                    m = torch.sparse_csr_tensor(crow, col, val, csr.shape, check_invariants=False)
                self._matrices[key] = m
        return m

    def _map_rows(self, op: str, values: torch.Tensor | Sequence[torch.Tensor], n: int, n_in: int,
                  n_out: int) -> torch.Tensor | None:
        """A map of float64 CPU rows with the compiled kernel, in one call; ``None`` if they do not suit it.

        ``op``: ``signed``/``unsigned`` (:meth:`to_groups`: each member's reductions added onto its
        run of neurons, members in order), or ``sum``/``amax``/``amin`` over each group's run (see
        :mod:`nld_callbacks.kernel`). The rows are read where they are: nothing is stacked.
        """
        f64 = torch.float64
        if isinstance(values, torch.Tensor):
            if values.dtype is not f64 or not values.is_cpu:
                return None
            flat = values if values.dim() == 2 else values.reshape(n, n_in)
            if flat.stride(-1) != 1:
                flat = flat.contiguous()
            base, step = flat.data_ptr(), flat.stride(0) * flat.element_size()
            addresses = [base + i * step for i in range(n)]
        else:
            rows = [r if r.is_contiguous() else r.contiguous() for r in values
                    if r.dtype is f64 and r.is_cpu and r.shape == (n_in,)]
            if len(rows) != n:
                return None
            addresses = [r.data_ptr() for r in rows]
        out = torch.empty(n, n_out, dtype=f64)
        ptrs = (ctypes.c_int64 * n)(*addresses)
        assert self._lib is not None
        if op in self._run_sign:
            self._lib.nld_map(n, ptrs, n_out, len(self._runs), self._runs.data_ptr(), self._run_sign[op].data_ptr(),
                              out.data_ptr())
        else:
            self._lib.nld_runs(_RUN_OPS[op], n, ptrs, n_out, self._bounds.data_ptr(), out.data_ptr())
        return out

    def _check_length(self, n_in: int, *, groups: bool) -> None:
        """Refuse values without one entry per group neuron (``groups``) or reduction: the maps read that many."""
        expected = self.n_neurons if groups else self.n_reductions
        if n_in != expected:
            kind = "group-neuron" if groups else "per-reduction"
            raise ValueError(f"Expected {kind} values of length {expected} (the last dim) but got {n_in}")

    def _apply(self, which: str, values: torch.Tensor | Sequence[torch.Tensor], n_out: int) -> torch.Tensor:
        # one call of the compiled maps, or one sparse product, for any number of rows: V @ Mᵀ
        if isinstance(values, torch.Tensor):
            lead, n_in = values.shape[:-1], values.shape[-1]
        else:
            lead, n_in = torch.Size([len(values)]), values[0].shape[-1]
        n = lead.numel()
        self._check_length(n_in, groups=which == "groups")
        if self._lib is not None:
            mapped = self._map_rows("sum" if which == "groups" else which, values, n, n_in, n_out)
            if mapped is not None:
                return mapped if len(lead) == 1 else mapped.reshape(*lead, n_out)
        if isinstance(values, torch.Tensor):
            flat = values.reshape(-1, n_in)
        else:  # rows stacked a few at a time (the whole stack is never made on the CPU)
            flat = values[0].view(1, -1)

        def rows(a: int, b: int) -> torch.Tensor:
            if isinstance(values, torch.Tensor):
                return flat if (a, b) == (0, n) else flat[a:b]
            return torch.stack(list(values[a:b]))

        m = self._matrix(which, flat.dtype)
        if m.layout == torch.sparse_csc:
            # into a fresh output (beta=0 ignores its contents): half the time and memory of mm();
            # a few rows at a time, as the product copies its dense factor column-major first
            out = flat.new_empty(n, n_out)
            step = max(1, _APPLY_BYTES // max(1, n_in * flat.element_size()))
            for a in range(0, n, step):
                o = out if step >= n else out[a : a + step]
                torch.addmm(o, rows(a, min(a + step, n)), m, beta=0, out=o)
        else:
            out = torch.mm(m, rows(0, n).mT).mT
        return out.reshape(*lead, n_out)

    def to_groups(self, values: torch.Tensor | Sequence[torch.Tensor], *, unsigned: bool = False) -> torch.Tensor:
        """Map per-reduction values (last dim) onto the group-neuron vector, applying signs.

        One sparse matrix product whatever the number of groups (on the CPU one per block of a few
        rows). ``values`` may also be a sequence of per-reduction vectors, the rows of the result,
        stacked a block at a time. With the compiled kernel, float64 CPU rows take one call instead,
        which adds each member's reductions onto its run of the group's neurons (members in order)
        and stacks nothing.
        """
        return self._apply("unsigned" if unsigned else "signed", values, self.n_neurons)

    def params_to_groups(self, values: torch.Tensor, rows_at_once: int = 4) -> torch.Tensor:
        """Sum per-parameter values (last dim, in :attr:`params` order) over each neuron's reductions.

        The same as ``to_groups(values[..., param_of_reduction], unsigned=True)``, a few rows at a
        time: the per-reduction intermediate is never larger than ``rows_at_once`` rows.
        """
        flat = values.reshape(-1, values.shape[-1])
        out = flat.new_empty(len(flat), self.n_neurons)
        for a in range(0, len(flat), rows_at_once):
            block = flat[a : a + rows_at_once].index_select(1, self.param_of_reduction)
            out[a : a + rows_at_once] = self.to_groups(block, unsigned=True)
        return out.reshape(*values.shape[:-1], self.n_neurons)

    def per_group(self, values: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        """Aggregate group-neuron values (last dim) per group: ``sum``, ``mean``, ``amax``, ``amin``.

        Sums and means are one sparse matrix product; ``amax``/``amin`` one segment reduction
        (groups are contiguous ranges of the group-neuron vector). With the compiled kernel, float64
        CPU values take one call over those ranges (a NaN gives NaN, as ``segment_reduce`` does).
        """
        if reduce in ("sum", "mean"):
            out = self._apply("groups", values, len(self.groups))
            return out / self._group_sizes.to(values.dtype) if reduce == "mean" else out
        if reduce not in ("amax", "amin"):
            raise ValueError(f"Expected `reduce` to be one of sum, mean, amax, amin but got {reduce!r}")
        self._check_length(values.shape[-1], groups=True)
        if self._lib is not None:
            runs = self._map_rows(reduce, values, values.shape[:-1].numel(), values.shape[-1], len(self.groups))
            if runs is not None:
                return runs if values.dim() == 2 else runs.reshape(*values.shape[:-1], len(self.groups))
        lengths = self._group_sizes.expand(*values.shape[:-1], len(self.groups))
        return torch.segment_reduce(values, "max" if reduce == "amax" else "min", lengths=lengths,
                                    axis=values.dim() - 1, unsafe=True)

    def split(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Split a group-neuron vector into one tensor per group."""
        return list(values.split([g.n_neurons for g in self.groups], dim=-1))
