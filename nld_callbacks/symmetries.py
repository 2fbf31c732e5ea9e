"""Symmetry detection: which parameter groups carry a Noether charge.

A *symmetry group* is a set of parameter slices on which a one-parameter transformation leaves the
loss unchanged (physics.md §1). Three kinds are modelled:

* ``"scale"``: θ_A → e^α θ_A, charge Q = |θ_A|² (weights feeding a normalization, §1.1);
* ``"translation"``: θ_A → θ_A + α c, charge T = ⟨c, θ_A⟩ (softmax logits, biases feeding a
  normalization, the attention key bias, writers into a LayerNorm-read residual stream, §1.2, §1.4);
* ``"rescale"``: (θ_in, θ_out) → (e^α θ_in, e^-α θ_out), charge Q = |θ_in|² − |θ_out|² (units
  between two layers joined by a positively homogeneous activation or a linear path, §1.3, §1.4).

How groups are found. Detection reads the computation that actually ran: the autograd graph of one
forward pass, from the output (or the loss) down to the parameters' ``AccumulateGrad`` nodes, so
functional calls (``F.relu``, ``F.batch_norm``), nested containers, subclasses and data-dependent
control flow are all seen as the ops they executed. For every parameter the detector *pushes a
candidate transformation forward* through that graph (scale it per output row, shift it per row,
...) and follows what each op does to it:

* ops that carry it on (ReLU/LeakyReLU, pooling, dropout, views, the linear maps of a layer, ...);
* ops that remove it (a train-mode BatchNorm per channel, a GroupNorm per norm group, a LayerNorm
  over its normalized axes, a softmax over its axis, the attention softmax over keys, a ratio whose
  numerator and denominator scale alike, as in weight standardization or weight norm);
* ops that can be compensated by transforming one more parameter the opposite way (the next
  layer's columns: a rescale; the bias of the same layer: the layer's own group);
* every other op (GELU, tanh, a residual add under a scale, eval-mode BatchNorm, a loss, an op not
  in the table) breaks the candidate.

Each neuron of the candidate (a row, a column, a channel) is followed on its own; where an op needs
several neurons to share one factor (a LayerNorm over the layer's outputs, a GroupNorm's group, a
QK-norm's head), they are merged into one block, which sets the group's granularity. A candidate
is proposed only when no op breaks it, so every proposed group is an exact symmetry of the loss up
to the normalizations' ε (physics.md §1.4). Gradients then confirm it numerically (§3.1, tier 1)
in :func:`find_symmetries`. Module names are used only to name the groups. (torch.fx is not used:
the autograd graph exists for every model that runs, traceable or not.)

The support matrix is one table keyed on module class (walked along the MRO, see
:func:`support_table`) plus the small named op rules below it; :func:`register` adds a rule for a
custom module type whose forward the graph cannot see through (a custom ``autograd.Function``).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
    ...                       nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    >>> report = find_symmetries(model, torch.randn(4, 3, 8, 8))
    >>> [(g.kind, g.name, g.n_neurons) for g in report.groups]
    [('scale', '0', 8), ('translation', '0', 8), ('rescale', '1', 8)]
"""

from __future__ import annotations

import dataclasses
import fnmatch
import heapq
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = [
    "Homogeneous",
    "Member",
    "Normalizes",
    "Opaque",
    "Rule",
    "SeeThrough",
    "SymmetryGroup",
    "SymmetryReport",
    "find_symmetries",
    "module_calls",
    "register",
    "rule_for",
    "support_table",
    "symmetries_from_graph",
]

Kind = Literal["scale", "translation", "rescale"]
KINDS: tuple[Kind, ...] = ("scale", "translation", "rescale")


@dataclass(frozen=True)
class Member:
    """One parameter tensor's share of a symmetry group.

    The group's charge is a vector over *neurons* (output channels, hidden units, norm groups, ...).
    A member maps its tensor onto that vector: entries are summed over every axis except ``axis``;
    the ``axis`` entries are then summed in ``blocks`` contiguous blocks when ``blocks`` is set
    (GroupNorm: channels of one norm group), and written from neuron index ``offset`` on.

    Attributes:
        param: qualified parameter name, as in ``model.named_parameters()``.
        axis: the neuron axis of the tensor; ``None`` makes the whole tensor a single neuron.
        sign: +1 or -1, the sign of this member in the bilinear form B (rescale out-side: -1).
        blocks: number of contiguous blocks the ``axis`` is summed into; ``None`` for one neuron
            per index.
        offset: first neuron index this member contributes to (members side by side).
    """

    param: str
    axis: int | None = 0
    sign: int = 1
    blocks: int | None = None
    offset: int = 0

    def n_neurons(self, shape: Sequence[int]) -> int:
        """Number of neurons this member produces for a tensor of ``shape``."""
        if self.axis is None:
            return 1
        n = int(shape[self.axis])
        return int(self.blocks) if self.blocks is not None else n


@dataclass
class SymmetryGroup:
    """A set of parameter slices with one Noether charge per neuron.

    Attributes:
        kind: ``"scale"``, ``"translation"`` or ``"rescale"``.
        name: readable layer name: the qualified name of the module that owns the group's first
            parameter (``"features.0"``), unique per kind within a report.
        members: the parameter slices, see :class:`Member`.
        n_neurons: length of the per-neuron charge vector.
        granularity: what one neuron is (``"output channel"``, ``"norm group"``, ``"layer"``, ...).
        why: the rule that proposed the group, in words.
        confirmed: ``True`` when gradients confirmed the geometry, ``False`` when they refuted it,
            ``None`` when not checked (or not checkable: every neuron degenerate).
        violation: the largest measured geometry violation (physics.md §3.1), if checked.
        exact: ``False`` for groups that hold only approximately (labelled, never predicted
            exactly).
        degenerate: neurons whose gradient vanished on every probe (dead units, physics.md
            §1.4): they pass any finite-batch test, so they confirm nothing; the structural rule
            still holds for them.
    """

    kind: Kind
    name: str
    members: tuple[Member, ...]
    n_neurons: int
    granularity: str
    why: str
    confirmed: bool | None = None
    violation: float | None = None
    exact: bool = True
    degenerate: tuple[int, ...] = ()

    @property
    def params(self) -> tuple[str, ...]:
        """Names of the parameters the group covers, in member order, without repeats."""
        return tuple(dict.fromkeys(m.param for m in self.members))

    @property
    def linear(self) -> bool:
        """Whether the charge is linear in θ (translation) rather than quadratic."""
        return self.kind == "translation"

    @property
    def key(self) -> str:
        """``kind/name``: the group's identity in tags and state dicts."""
        return f"{self.kind}/{self.name}"

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-serialisable)."""
        d = dataclasses.asdict(self)
        d["members"] = [dataclasses.asdict(m) for m in self.members]
        d["degenerate"] = list(self.degenerate)
        d["params"] = list(self.params)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SymmetryGroup:
        """Inverse of :meth:`to_dict`."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        kw["members"] = tuple(Member(**m) for m in d["members"])
        kw["degenerate"] = tuple(d.get("degenerate", ()))
        return cls(**kw)


@dataclass
class SymmetryReport(Sequence[SymmetryGroup]):
    """The groups found on a model, printable as a table.

    Attributes:
        groups: the accepted groups (confirmed or unconfirmed; refuted ones are in ``refuted``).
        refuted: groups a rule proposed and gradients refuted, with the measured violation.
        n_params: number of parameter entries in the model that require gradients.
        covered: how many of them lie in at least one accepted group.
        notes: what could not be modelled, in words.
    """

    groups: list[SymmetryGroup] = field(default_factory=list)
    refuted: list[SymmetryGroup] = field(default_factory=list)
    n_params: int = 0
    covered: int = 0
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, i):
        return self.groups[i]

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self) -> Iterator[SymmetryGroup]:
        return iter(self.groups)

    @property
    def coverage(self) -> float:
        """Fraction of trainable parameter entries that lie in at least one group."""
        return self.covered / self.n_params if self.n_params else 0.0

    def by_kind(self, kind: Kind) -> list[SymmetryGroup]:
        """Groups of one kind."""
        return [g for g in self.groups if g.kind == kind]

    def select(self, include: Iterable[str] | None = None, exclude: Iterable[str] | None = None) -> SymmetryReport:
        """Keep groups whose ``kind/name`` key matches an ``include`` glob and no ``exclude`` glob."""
        inc, exc = list(include or []), list(exclude or [])
        keep = [
            g
            for g in self.groups
            if (not inc or any(fnmatch.fnmatchcase(g.key, p) for p in inc))
            and not any(fnmatch.fnmatchcase(g.key, p) for p in exc)
        ]
        return dataclasses.replace(self, groups=keep, refuted=list(self.refuted), notes=list(self.notes))

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-serialisable)."""
        return {
            "groups": [g.to_dict() for g in self.groups],
            "refuted": [g.to_dict() for g in self.refuted],
            "n_params": self.n_params,
            "covered": self.covered,
            "coverage": self.coverage,
            "notes": list(self.notes),
        }

    def table(self) -> str:
        """The report as a fixed-width text table with a coverage line."""
        rows = [("kind", "layer", "neurons", "granularity", "parameters", "confirmed", "why")]
        for g in self.groups + self.refuted:
            conf = {True: "yes", False: "REFUTED", None: "-"}[g.confirmed]
            if g.violation is not None:
                conf += f" ({g.violation:.1e})"
            if g.degenerate:
                conf += f", {len(g.degenerate)} dead"
            rows.append((g.kind, g.name, str(g.n_neurons), g.granularity, ", ".join(g.params), conf, g.why))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        counts = ", ".join(f"{len(self.by_kind(k))} {k}" for k in KINDS)
        lines.append(
            f"{len(self.groups)} groups ({counts}); parameters covered: "
            f"{self.covered:,} of {self.n_params:,} ({100 * self.coverage:.1f}%)"
        )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# --------------------------------------------------------------------------------------------
# Support matrix: module class -> rule (walks the MRO)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """What a module class does to the symmetries that flow through it.

    Attributes:
        finds: what the detector finds at modules of this class, in words (the support table).
    """

    finds: str = ""

    @property
    def opaque_forward(self) -> bool:
        """Whether detection treats the module's forward as one hooked op (not its autograd ops)."""
        return True


@dataclass(frozen=True)
class SeeThrough(Rule):
    """Read the module's forward from the autograd ops it ran (every ``torch.nn`` class)."""

    @property
    def opaque_forward(self) -> bool:  # noqa: D102
        return False


@dataclass(frozen=True)
class Normalizes(Rule):
    """A normalization: the output ignores a scale (and a shift) of the first input per set.

    The output does not change when the first input is scaled (and, with ``shift``, shifted) by
    a constant over each normalization set: the entries that share every axis not in ``over``.

    Attributes:
        over: the axes each statistic pools over (negative counts from the end): ``(-1,)`` for a
            LayerNorm-like module, ``(0, 2, 3)`` for a BatchNorm2d-like one.
        shift: whether the mean is subtracted too (a translation is removed as well).
    """

    over: tuple[int, ...] = (-1,)
    shift: bool = True


@dataclass(frozen=True)
class Homogeneous(Rule):
    """Positively homogeneous and elementwise: f(αx) = αf(x) for α > 0 (a custom ReLU).

    A scale passes through; a shift does not.
    """


@dataclass(frozen=True)
class Opaque(Rule):
    """Nothing passes through the module and nothing is removed by it.

    No group is proposed across it or on its parameters.
    """


# One row per module class; lookups walk ``type(module).__mro__``, so subclasses inherit the row
# of their nearest listed ancestor. Every torch.nn class is read from the ops it runs; the text
# says what those op rules find there.
_SUPPORT: dict[type, Rule] = {
    nn.Module: SeeThrough("its ops, one by one (the rules below)"),
    nn.Linear: SeeThrough("scale of rows (+bias) before a norm; rescale of rows (+bias) against the next layer's "
                          "columns; translation of columns (+bias) before softmax/LayerNorm, of the bias before "
                          "BatchNorm/GroupNorm"),
    nn.modules.conv._ConvNd: SeeThrough("scale per filter before BatchNorm/InstanceNorm, per norm group before "
                                        "GroupNorm, whole before LayerNorm; rescale per channel; bias translation "
                                        "before BatchNorm/GroupNorm; weight standardization and weight norm from "
                                        "their ops"),
    nn.modules.batchnorm._BatchNorm: SeeThrough("train mode only: removes scale and shift per channel; γ, β are "
                                                "the in-side of a rescale; eval mode: nothing through it"),
    nn.modules.instancenorm._InstanceNorm: SeeThrough("removes scale and shift per (sample, channel)"),
    nn.GroupNorm: SeeThrough("removes scale and shift per norm group; γ, β are the in-side of a rescale"),
    nn.LayerNorm: SeeThrough("removes scale and shift over the normalized axes; γ, β are the in-side of a rescale"),
    nn.RMSNorm: SeeThrough("removes scale over the normalized axes (never a shift); γ is the in-side of a rescale"),
    nn.ReLU: SeeThrough("passes scale (α > 0)"),
    nn.LeakyReLU: SeeThrough("passes scale (α > 0)"),
    nn.modules.pooling._MaxPoolNd: SeeThrough("passes scale and shift"),
    nn.modules.pooling._AvgPoolNd: SeeThrough("passes scale, and shift without zero padding"),
    nn.modules.pooling._AdaptiveAvgPoolNd: SeeThrough("passes scale and shift"),
    nn.modules.dropout._DropoutNd: SeeThrough("passes scale (mask held fixed); breaks shift"),
    nn.GELU: SeeThrough("breaks everything"),
    nn.SiLU: SeeThrough("breaks everything"),
    nn.Tanh: SeeThrough("breaks everything"),
    nn.Sigmoid: SeeThrough("breaks everything"),
    nn.Embedding: SeeThrough("rescale per column against the next layer; translation per row into a LayerNorm"),
    nn.MultiheadAttention: SeeThrough("softmax over keys removes a key shift; linear in the values; packed "
                                      "in_proj: key-bias third noted, not tracked"),
    nn.CrossEntropyLoss: SeeThrough("log-softmax removes a shift of the logits"),
}


def _check_rule_args(cls: Any, rule: Any) -> None:
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"Expected `cls` to be a subclass of torch.nn.Module but got {cls!r}")
    if not isinstance(rule, Rule):
        raise TypeError(f"Expected `rule` to be a Rule (SeeThrough, Normalizes, Homogeneous, Opaque) but got {rule!r}")


def register(cls: type[nn.Module], rule: Rule, *, overwrite: bool = False) -> None:
    """Add (or replace) the support-table row of a module class.

    Use it for a custom module whose forward the autograd graph cannot see through (a custom
    ``torch.autograd.Function``, a fused kernel): :func:`find_symmetries` then treats each call of
    such a module as one op with the rule's meaning. Subclasses inherit the row (MRO).

    Args:
        cls: the module class.
        rule: :class:`Normalizes`, :class:`Homogeneous`, :class:`Opaque` or :class:`SeeThrough`.
        overwrite: replace an existing row for exactly this class.

    Raises:
        TypeError: if ``cls`` is not a module class or ``rule`` not a :class:`Rule`.
        ValueError: if ``cls`` already has a row and ``overwrite`` is false.

    Example:
        >>> class MyNorm(nn.Module):
        ...     def forward(self, x):
        ...         return x / x.norm(dim=-1, keepdim=True)
        >>> register(MyNorm, Normalizes(over=(-1,), shift=False))
        >>> rule_for(MyNorm())
        Normalizes(finds='', over=(-1,), shift=False)
        >>> register(MyNorm, Opaque())
        Traceback (most recent call last):
        ...
        ValueError: MyNorm already has a rule (Normalizes(...)); pass overwrite=True to replace it
        >>> unregister(MyNorm)
    """
    _check_rule_args(cls, rule)
    if cls in _SUPPORT and not overwrite:
        raise ValueError(f"{cls.__name__} already has a rule ({type(_SUPPORT[cls]).__name__}(...)); pass "
                         "overwrite=True to replace it")
    _SUPPORT[cls] = rule


def unregister(cls: type[nn.Module]) -> None:
    """Remove a row added by :func:`register` (built-in rows stay).

    Raises:
        ValueError: if ``cls`` has no row of its own or its row is built in.
    """
    if cls not in _SUPPORT or cls in _BUILTIN:
        raise ValueError(f"Expected a class added with register(), but {getattr(cls, '__name__', cls)!r} is not one")
    del _SUPPORT[cls]


_BUILTIN = frozenset(_SUPPORT)


def rule_for(module: nn.Module | type[nn.Module]) -> Rule:
    """The support-table row that applies to a module (or class): the nearest class on its MRO."""
    cls = module if isinstance(module, type) else type(module)
    for c in cls.__mro__:
        if c in _SUPPORT:
            return _SUPPORT[c]
    return _SUPPORT[nn.Module]


def support_table() -> str:
    """The support matrix as text: one row per module class.

    Example:
        >>> print(support_table().splitlines()[0])
        module class | rule | what is found
    """
    rows = ["module class | rule | what is found"]
    for cls, rule in _SUPPORT.items():
        prefix = "nn." if cls.__module__.startswith("torch.nn") else f"{cls.__module__}."
        rows.append(f"{prefix}{cls.__qualname__} | "
                    f"{type(rule).__name__} | {rule.finds}")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# The autograd graph as a forward DAG
# --------------------------------------------------------------------------------------------

_U64 = 1 << 64


def _fix(v: Any) -> Any:
    """Saved ints come back as unsigned 64-bit values (-2 reads 2**64 - 2)."""
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v >= 1 << 63:
        return v - _U64
    if isinstance(v, tuple):
        return tuple(_fix(x) for x in v)
    return v


def _attr(fn: Any, name: str, default: Any = None) -> Any:
    try:
        return _fix(getattr(fn, "_saved_" + name))
    except (AttributeError, RuntimeError):
        return default


class _Node:
    """One op of the forward computation (an autograd node, a parameter, or a hooked module)."""

    __slots__ = ("fn", "op", "inputs", "outs", "consumers", "param", "rule", "label")

    def __init__(self, fn: Any, op: str) -> None:
        self.fn = fn
        self.op = op
        self.inputs: list[tuple[_Node | None, int]] = []
        self.outs: list[tuple[int, ...] | None] = []
        self.consumers: dict[int, list[tuple[_Node, int]]] = {}
        self.param: str | None = None
        self.rule: Rule | None = None
        self.label = ""

    def in_shape(self, slot: int) -> tuple[int, ...] | None:
        if slot >= len(self.inputs):
            return None
        src, nr = self.inputs[slot]
        return None if src is None or nr >= len(src.outs) else src.outs[nr]

    def out(self, i: int = 0) -> tuple[int, ...] | None:
        return self.outs[i] if i < len(self.outs) else None

    def out_shape(self) -> tuple[int, ...]:
        """The first output's shape, which every node a rule reads records."""
        out = self.out()
        assert out is not None, self.op
        return out

    def attr(self, name: str, default: Any = None) -> Any:
        return _attr(self.fn, name, default)


@dataclass
class _Hooked:
    """A module call recorded by a forward hook: treated as one op when its rule is opaque."""

    name: str
    rule: Rule
    inp: Tensor
    out: Tensor


class _IR:
    """The graph from the parameters to ``root``, with consumer lists (forward edges)."""

    def __init__(self, root: Tensor, names: Mapping[int, str], hooked: Sequence[_Hooked] = ()) -> None:
        self.nodes: dict[Any, _Node] = {}
        self.params: dict[str, _Node] = {}
        self.notes: list[str] = []
        self.frozen = False  # some parameter is frozen: a missing norm bias may be a frozen one
        fn0 = root.grad_fn
        assert fn0 is not None  # _propose checks it
        stack = [fn0]
        self._node(fn0, names)
        while stack:
            fn = stack.pop()
            node = self.nodes[fn]
            for slot, (nx, nr) in enumerate(fn.next_functions):
                if nx is None:
                    node.inputs.append((None, 0))
                    continue
                new = nx not in self.nodes
                src = self._node(nx, names)
                node.inputs.append((src, nr))
                src.consumers.setdefault(nr, []).append((node, slot))
                if new:
                    stack.append(nx)
        self.root = self.nodes[fn0]
        self.root_nr = root.output_nr
        for h in hooked:
            self._collapse(h)
        # forward topological order: inputs before consumers (post-order of the backward walk)
        self.order: dict[_Node, int] = {}
        stack2: list[tuple[_Node, int]] = [(self.root, 0)]
        seen = {self.root}
        while stack2:
            n, i = stack2.pop()
            if i < len(n.inputs):
                stack2.append((n, i + 1))
                inp = n.inputs[i][0]
                if inp is not None and inp not in seen:
                    seen.add(inp)
                    stack2.append((inp, 0))
            else:
                self.order[n] = len(self.order)

    def _node(self, fn: Any, names: Mapping[int, str]) -> _Node:
        node = self.nodes.get(fn)
        if node is None:
            node = self.nodes[fn] = _Node(fn, type(fn).__name__)
            try:
                node.outs = [tuple(int(s) for s in m.shape) for m in fn._input_metadata]
            except Exception:  # a Python-defined node without metadata: its rule breaks anyway
                node.outs = []
            if node.op == "AccumulateGrad":
                name = names.get(id(fn.variable))
                if name is not None:
                    node.param = name
                    self.params[name] = node
        return node

    def _collapse(self, h: _Hooked) -> None:
        """Replace the ops of one hooked module call by a single node carrying its rule."""
        out_fn, inp_fn = h.out.grad_fn, h.inp.grad_fn
        if out_fn not in self.nodes:
            return  # the call does not reach the root
        inner: set[_Node] = set()
        stack = [self.nodes[out_fn]]
        stop = self.nodes.get(inp_fn) if inp_fn is not None else None
        while stack:
            n = stack.pop()
            if n in inner or n is stop or n.param is not None or n.op == "AccumulateGrad":
                continue
            inner.add(n)
            stack.extend(src for src, _ in n.inputs if src is not None)
        out_node = self.nodes[out_fn]
        for n in inner:  # an inner value used outside the call: cannot cut the module out
            for nr, cons in n.consumers.items():
                if any(c not in inner for c, _ in cons) and not (n is out_node and nr == h.out.output_nr):
                    self.notes.append(f"{h.name}: its inner values are used outside the call; read from its ops")
                    return
        macro = _Node(None, f"Module[{type(h.rule).__name__}]")
        macro.rule, macro.label = h.rule, h.name
        macro.outs = [tuple(h.out.shape)]
        inp_edge: tuple[_Node | None, int] = (stop, h.inp.output_nr) if stop is not None else (None, 0)
        ext: list[tuple[_Node, int]] = []
        for n in inner:
            for src, nr in n.inputs:
                if src is not None and src not in inner and (src, nr) not in ext:
                    ext.append((src, nr))
        macro.inputs = [inp_edge] + [e for e in ext if e != inp_edge]
        for slot, (src, nr) in enumerate(macro.inputs):
            if src is not None:
                kept = [(c, s) for c, s in src.consumers.get(nr, []) if c not in inner]
                src.consumers[nr] = kept + [(macro, slot)]
        macro.consumers = {0: out_node.consumers.pop(h.out.output_nr, [])}
        for c, slot in macro.consumers[0]:
            c.inputs[slot] = (macro, 0)
        for n in inner:
            self.nodes.pop(n.fn, None)
        self.nodes[("macro", id(h))] = macro
        if self.root in inner:
            self.root, self.root_nr = macro, 0


# --------------------------------------------------------------------------------------------
# Candidate transformations pushed through the graph
# --------------------------------------------------------------------------------------------
#
# A candidate acts on a *seed* parameter with N neurons (rows, columns, ... of the tensor); ψ_j
# transforms neuron j only. On every tensor it reaches, an int64 ``ids`` tensor says which seed
# neuron each entry belongs to (-1: untouched). ``ids`` has the tensor's rank but size 1 on every
# axis along which it is constant (broadcast-compressed), so it stays small.


@dataclass(eq=False)
class _Scale:
    """ψ_j multiplies every entry whose id is j by α^k."""

    k: Fraction
    ids: Tensor


@dataclass(eq=False)
class _Shift:
    """ψ_j adds α·Δ_j.

    Δ_j is supported on the entries whose id is j (anywhere when ``ids`` is None) and constant
    along every axis whose ``prov`` is None. Equal ``tok`` and ``prov``: equal Δ.
    """

    tok: int
    ids: Tensor | None
    prov: tuple[int | None, ...]
    mix: Tensor | None = None  # without ids: the neurons that contribute (None: any)


def _owners(*ps: Any) -> Tensor | None:
    """The seed neurons a set of perturbations involves (None: possibly all)."""
    parts = []
    for p in ps:
        if p is None:
            continue
        if p.ids is not None:
            parts.append(p.ids[p.ids >= 0].reshape(-1))
        elif getattr(p, "mix", None) is not None:
            parts.append(p.mix)
        else:
            return None
    return torch.unique(torch.cat(parts)) if parts else None


_FRESH = itertools.count(1)


def _fresh() -> int:
    return next(_FRESH)


class _Break(Exception):
    """Every neuron of the candidate is broken: stop early."""


class _Restart(Exception):
    """The candidate needs more parameters transformed (the other side of a rescale, a bias)."""

    def __init__(self, adds: list[tuple[str, Any]]) -> None:
        super().__init__()
        self.adds = adds


def _lead(ids: Tensor, nd: int) -> Tensor:
    return ids.reshape((1,) * (nd - ids.dim()) + tuple(ids.shape)) if ids.dim() < nd else ids


def _lead_p(p: Any, nd: int) -> Any:
    if p is None:
        return None
    extra = nd - (p.ids.dim() if p.ids is not None else len(p.prov))
    if extra <= 0:
        return p
    if isinstance(p, _Scale):
        return _Scale(p.k, _lead(p.ids, nd))
    ids = None if p.ids is None else _lead(p.ids, nd)
    return _Shift(p.tok, ids, (None,) * extra + p.prov, p.mix)


def _compress(ids: Tensor) -> Tensor:
    for d in range(ids.dim()):
        if ids.shape[d] > 1:
            first = ids.narrow(d, 0, 1)
            if bool((ids == first).all()):
                ids = first.contiguous()
    return ids


def _same_ids(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    nd = max(a.dim(), b.dim())
    a, b = _lead(a, nd), _lead(b, nd)
    try:
        shape = torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        return False
    return torch.equal(a.expand(shape), b.expand(shape))


def _varies(ids: Tensor | None, dims: Iterable[int]) -> bool:
    return ids is not None and any(ids.shape[d] > 1 for d in dims)


def _with(p: Any, f_ids: Callable[[Tensor], Tensor], f_prov: Callable[[tuple], tuple]) -> Any:
    if p is None:
        return None
    if isinstance(p, _Scale):
        return _Scale(p.k, f_ids(p.ids))
    ids = None if p.ids is None else f_ids(p.ids)
    return _Shift(p.tok, ids, tuple(f_prov(p.prov)), p.mix)


def _nd(p: Any) -> int:
    return p.ids.dim() if p.ids is not None else len(p.prov)


def _norm_dim(d: int, nd: int) -> int:
    return d + nd if d < 0 else d


def _view_groups(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Pair the axes of a reshape a -> b into groups of equal size (C order)."""
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        gi, gj, pi, pj = [], [], 1, 1
        if i < len(a):
            gi.append(i)
            pi = a[i]
            i += 1
        if j < len(b):
            gj.append(j)
            pj = b[j]
            j += 1
        while pi != pj:
            if pi < pj and i < len(a):
                gi.append(i)
                pi *= a[i]
                i += 1
            elif pj < pi and j < len(b):
                gj.append(j)
                pj *= b[j]
                j += 1
            else:
                return None
        groups.append((gi, gj))
    return groups


def _reshape(run: _Run, p: Any, a: Sequence[int], b: Sequence[int]) -> Any:
    if p is None:
        return None
    groups = _view_groups(a, b)
    if groups is None:
        run.breaks_p(p, "reshape")
        return None
    ids = p.ids
    if ids is not None:
        full, new = [], []
        for gi, gj in groups:
            if any(ids.shape[d] != 1 for d in gi):
                full += [a[d] for d in gi]
                new += [b[d] for d in gj]
            else:
                full += [1] * len(gi)
                new += [1] * len(gj)
        ids = _compress(ids.expand(full).reshape(new))
    if isinstance(p, _Scale):
        return _Scale(p.k, ids)
    prov: list[int | None] = []
    for gi, gj in groups:
        if len(gi) == 1 and len(gj) == 1:
            prov.append(p.prov[gi[0]])
        elif all(p.prov[d] is None for d in gi):
            prov += [None] * len(gj)
        else:
            prov += [_fresh() if b[d] > 1 else None for d in gj]
    return _Shift(p.tok, ids, tuple(prov), p.mix)


def _permute(p: Any, dims: Sequence[int]) -> Any:
    return _with(p, lambda t: t.permute(*dims), lambda pr: tuple(pr[d] for d in dims))


def _unsqueeze(p: Any, d: int) -> Any:
    return _with(p, lambda t: t.unsqueeze(d), lambda pr: pr[:d] + (None,) + pr[d:])


def _drop_dims(p: Any, dims: Sequence[int]) -> Any:
    keep = [d for d in range(_nd(p))] if p is not None else []
    dims = sorted(set(dims))

    def f_ids(t: Tensor) -> Tensor:
        for d in reversed(dims):
            t = t.narrow(d, 0, 1).squeeze(d) if t.shape[d] > 1 else t.squeeze(d)
        return t

    return _with(p, f_ids, lambda pr: tuple(pr[d] for d in keep if d not in dims))


class _Run:
    """One candidate pushed through the graph: breaks, merges and recruits, per seed neuron."""

    def __init__(self, ir: _IR, seeds: dict[str, Any], n: int, kind: str, parent: list[int] | None = None) -> None:
        self.ir, self.seeds, self.n, self.kind = ir, seeds, n, kind
        self.parent = list(parent) if parent is not None else list(range(n))
        self._roots: Tensor | None = None
        self.broken = torch.zeros(n, dtype=torch.bool)
        self.path: dict[str, None] = {}
        self.removed: dict[str, None] = {}
        self.unknown: set[str] = set()
        self.eps = False
        self.positive = False
        self.eval_bn: set[str] = set()
        self.strict = False  # a probe: any break aborts
        self.data_mode = False  # neuron ids placed by the data (embedding rows): break and merge all together
        self.touched = torch.zeros(n, dtype=torch.bool)
        self.track = False  # record which neurons reach an op (for the notes on partial symmetries)
        self.current = ""  # the op being read

    # -- outcome bookkeeping
    def breaks(self, ids: Tensor | None, why: str = "") -> None:
        if self.strict:
            raise _Break
        if ids is None or (self.data_mode and bool((ids >= 0).any())):
            self.broken[:] = True
        else:
            v = ids[ids >= 0]
            if v.numel():
                self.broken[v.unique()] = True
        if bool(self.broken.all()):
            raise _Break

    def breaks_p(self, p: Any, why: str = "") -> None:
        if p is not None:
            self.breaks(p.ids if p.ids is not None else _owners(p), why)

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def unite(self, vals: Sequence[int]) -> None:
        if self.data_mode:
            vals = range(self.n)
        r0 = self.find(int(vals[0]))
        for v in vals[1:]:
            r = self.find(int(v))
            if r != r0:
                self.parent[r] = r0
                self._roots = None

    def canon(self, p: Any) -> Any:
        """``p`` with every id replaced by its merged block's representative."""
        if p is None or p.ids is None or all(self.parent[i] == i for i in range(self.n)):
            return p
        if self._roots is None:
            self._roots = torch.tensor([self.find(i) for i in range(self.n)], dtype=torch.long)
        ids = p.ids
        ids = _compress(torch.where(ids >= 0, self._roots[ids.clamp(min=0)], ids))
        return _Scale(p.k, ids) if isinstance(p, _Scale) else _Shift(p.tok, ids, p.prov, p.mix)

    def passes(self, what: str) -> None:
        self.path[what] = None

    def removes(self, what: str, *, eps: bool = False, positive: bool = False) -> None:
        self.removed[what] = None
        self.eps |= eps
        self.positive |= positive

    def norm_sets(self, ids: Tensor | None, dims: Iterable[int]) -> None:
        """Each normalization set (entries sharing every axis not in ``dims``) must see one factor.

        Merge the neurons that share a set; break those that share it with untouched entries.
        """
        R = sorted(set(dims))
        if ids is None or not _varies(ids, R):
            return
        other = [d for d in range(ids.dim()) if d not in R]
        rows = ids.permute(*other, *R).reshape(-1, math.prod(ids.shape[d] for d in R))
        mixed = rows[rows.amin(1) != rows.amax(1)]
        if mixed.numel() == 0:
            return
        for row in torch.unique(mixed, dim=0):
            vals = row.unique()
            if int(vals[0]) < 0:
                self.breaks(vals[vals >= 0])
            else:
                self.unite(vals.tolist())

    def partition(self) -> list[int]:
        return [self.find(i) for i in range(self.n)]

    # -- recruiting one more parameter
    def recruit(self, edge: tuple[_Node | None, int], target: Tensor, k: Fraction, *, behind: bool = True,
                or_break: bool = True) -> None:
        """Transform the parameter behind ``edge`` so that ``edge`` is scaled by α^k with ids ``target``.

        Restart with it, or (``or_break``) break the target neurons if no parameter can do it.
        """
        adds = None
        if k in (1, -1) and bool((target >= 0).any()) and not self.strict:
            adds = _solve_param(self, edge, target, k)
            if adds is None and behind:
                adds = _solve_producer(self, edge, target, k)
        if adds and not any(p in self.seeds for p, _ in adds):
            raise _Restart(adds)
        if or_break:
            self.breaks(target)


# Shape-only ops that map a tensor onto another without arithmetic: parameters are traced back
# through them, and recruited targets solved through them.
_VIEWLIKE = {
    "TBackward0", "TransposeBackward0", "TransposeBackward1", "PermuteBackward0", "ViewBackward0",
    "UnsafeViewBackward0", "ReshapeAliasBackward0", "UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1",
    "SqueezeBackward2", "ExpandBackward0", "CloneBackward0", "ToCopyBackward0", "AliasBackward0", "SelectBackward0",
    "SliceBackward0", "RepeatBackward0",
}


def _push(run: _Run, chain: Sequence[_Node], p: Any) -> Any:
    """Push a perturbation through a chain of shape-only ops (forward order)."""
    for node in chain:
        if node.op in _VIEWLIKE:
            p = _OPS[node.op](run, node, [p] + [None] * (len(node.inputs) - 1))[0]
        # else: the add of a bias on the way back to a producer, the value passes unchanged
        if p is None:
            return None
    return p


def _solve_map(labels: Tensor, target: Tensor, n: int) -> Tensor | None:
    """The id each label must carry so that ``labels`` maps onto ``target`` (None: impossible)."""
    nd = max(labels.dim(), target.dim())
    labels, target = _lead(labels, nd), _lead(target, nd)
    try:
        shape = torch.broadcast_shapes(labels.shape, target.shape)
    except RuntimeError:
        return None
    lf, tf = labels.expand(shape).reshape(-1), target.expand(shape).reshape(-1)
    lo = torch.full((n,), 1 << 62, dtype=torch.long).scatter_reduce(0, lf, tf, "amin")
    hi = torch.full((n,), -(1 << 62), dtype=torch.long).scatter_reduce(0, lf, tf, "amax")
    seen = torch.zeros(n, dtype=torch.bool)
    seen[lf] = True
    if bool((lo[seen] != hi[seen]).any()):
        return None
    out = torch.full((n,), -1, dtype=torch.long)
    out[seen] = lo[seen]
    return out


def _chain_to_param(edge: tuple[_Node | None, int]) -> tuple[_Node, list[_Node]] | None:
    node, chain = edge[0], []
    while node is not None and node.param is None:
        if node.op not in _VIEWLIKE or not node.inputs:
            return None
        chain.append(node)
        node = node.inputs[0][0]
    return (node, chain[::-1]) if node is not None else None


def _solve_param(run: _Run, edge: tuple[_Node | None, int], target: Tensor, k: Fraction) -> list | None:
    """Scale the parameter behind a chain of shape ops so that the edge carries ``target``."""
    found = _chain_to_param(edge)
    if found is None:
        return None
    pnode, chain = found
    shape = pnode.out() or ()
    ids = _solve_ids(run, chain, shape, target)
    return None if ids is None else [(pnode.param, _Scale(Fraction(k), ids))]


def _solve_ids(run: _Run, chain: Sequence[_Node], shape: Sequence[int], target: Tensor) -> Tensor | None:
    """Ids on a tensor of ``shape`` that the chain maps onto ``target``: per axis, or one for all."""
    probe = _Run(run.ir, {}, 1, "scale")
    probe.strict = True
    for axis in [a for a in range(len(shape)) if shape[a] > 1] + [None]:
        n = 1 if axis is None else shape[axis]
        lab = torch.zeros((1,) * len(shape), dtype=torch.long)
        if axis is not None:
            lab = torch.arange(n).reshape([n if d == axis else 1 for d in range(len(shape))])
        try:
            out = _push(probe, chain, _Scale(Fraction(1), lab))
        except (_Break, _Restart):
            continue
        if out is None:
            continue
        m = _solve_map(out.ids, target, n)
        if m is None:
            continue
        return m.reshape(lab.shape)
    return None


def _producer(node: _Node) -> tuple[int, int] | None:
    """(input slot of the weight, output axis of the neurons) of a layer that can be recruited."""
    out = node.out()
    if out is None:
        return None
    if node.op == "AddmmBackward0":
        return 2, len(out) - 1  # mat2 = Wᵀ: output features along its axis 1
    if node.op == "MmBackward0":
        return 1, len(out) - 1
    if node.op == "ConvolutionBackward0" and not node.attr("transposed", False):
        return 1, 1  # weight: output channels along axis 0
    return None


def _solve_producer(run: _Run, edge: tuple[_Node | None, int], target: Tensor, k: Fraction) -> list | None:
    """Recruit the weight of the layer that produced ``edge`` (through shape ops and a bias add)."""
    node, chain = edge[0], []
    while node is not None:
        if node.op in _VIEWLIKE and node.inputs:
            chain.append(node)
            node = node.inputs[0][0]
        elif node.op == "AddBackward0" and len(node.inputs) == 2 and any(
                _chain_to_param(e) is not None for e in node.inputs):
            chain.append(node)
            other = [e for e in node.inputs if _chain_to_param(e) is None]
            node = other[0][0] if other else None
        else:
            break
    if node is None:
        return None
    found = _producer(node)
    if found is None:
        return None
    slot, axis = found
    out = node.out_shape()
    n = out[axis]
    lab = torch.arange(n).reshape([n if d == axis else 1 for d in range(len(out))])
    probe = _Run(run.ir, {}, 1, "scale")
    probe.strict = True
    try:
        pushed = _push(probe, chain[::-1], _Scale(Fraction(1), lab))
    except (_Break, _Restart):
        return None
    if pushed is None:
        return None
    m = _solve_map(pushed.ids, target, n)
    if m is None:
        return None
    if node.op == "ConvolutionBackward0":
        wtarget = m.reshape(-1, *([1] * (len(node.in_shape(1) or (0, 0)) - 1)))
    else:
        wtarget = m.reshape(1, -1)
    return _solve_param(run, node.inputs[slot], wtarget, k)


# --------------------------------------------------------------------------------------------
# Op rules: what each autograd op does to a candidate (unknown ops break it)
# --------------------------------------------------------------------------------------------

_OPS: dict[str, Callable[[_Run, _Node, list[Any]], list[Any]]] = {}


def _op(*names: str) -> Callable:
    def deco(f: Callable) -> Callable:
        for n in names:
            _OPS[n] = f
        return f

    return deco


def _nonempty(p: Any) -> Any:
    if p is None or p.ids is None:
        return p
    return p if bool((p.ids >= 0).any()) else None


def _fresh_if(size: int) -> int | None:
    return _fresh() if size > 1 else None


def _break_all(run: _Run, *ps: Any) -> None:
    for p in ps:
        run.breaks_p(p)


@_op("CloneBackward0", "ToCopyBackward0", "AliasBackward0")
def _r_same(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    return [ins[0]]


@_op("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0")
def _r_view(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    a, b = node.in_shape(0) or node.attr("self_sym_sizes"), node.out()
    if a is None or b is None:
        run.breaks_p(ins[0])
        return [None]
    return [_reshape(run, ins[0], a, b)]


@_op("TBackward0")
def _r_t(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    p = ins[0]
    return [p if p is None or _nd(p) < 2 else _permute(p, (1, 0))]


@_op("TransposeBackward0")
def _r_transpose(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    p = ins[0]
    nd = _nd(p)
    d0, d1 = _norm_dim(node.attr("dim0", 0), nd), _norm_dim(node.attr("dim1", 1), nd)
    dims = list(range(nd))
    dims[d0], dims[d1] = dims[d1], dims[d0]
    return [_permute(p, dims)]


@_op("PermuteBackward0")
def _r_permute(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    nd = _nd(ins[0])
    return [_permute(ins[0], [_norm_dim(d, nd) for d in node.attr("dims")])]


@_op("UnsqueezeBackward0")
def _r_unsqueeze(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    return [_unsqueeze(ins[0], _norm_dim(node.attr("dim"), _nd(ins[0]) + 1))]


@_op("SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2")
def _r_squeeze(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    a = node.in_shape(0) or node.attr("self_sym_sizes")
    if node.op == "SqueezeBackward0":
        dims = [d for d in range(len(a)) if a[d] == 1]
    else:
        raw = node.attr("dim" if node.op == "SqueezeBackward1" else "dims")
        raw = raw if isinstance(raw, tuple) else (raw,)
        dims = [d for d in (_norm_dim(x, len(a)) for x in raw) if a[d] == 1]
    return [_drop_dims(ins[0], dims)]


@_op("ExpandBackward0")
def _r_expand(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    a, b = node.in_shape(0) or node.attr("self_sym_sizes"), node.out_shape()
    p = _lead_p(ins[0], len(b))
    if isinstance(p, _Shift):
        a = (1,) * (len(b) - len(a)) + tuple(a)
        p = _Shift(p.tok, p.ids, tuple(None if a[d] == 1 else p.prov[d] for d in range(len(b))), p.mix)
    return [p]


@_op("RepeatBackward0")
def _r_repeat(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    reps = node.attr("repeats")
    p = _lead_p(ins[0], len(reps))

    def f(t: Tensor) -> Tensor:
        return t.repeat(*[r if t.shape[d] > 1 else 1 for d, r in enumerate(reps)])

    return [_with(p, f, lambda pr: tuple(_fresh() if x is not None and reps[d] > 1 else x for d, x in enumerate(pr)))]


@_op("SelectBackward0")
def _r_select(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    a = node.in_shape(0) or node.attr("self_sym_sizes")
    d = _norm_dim(node.attr("dim"), len(a))
    i = node.attr("index")
    i = i + a[d] if i < 0 else i
    return [_nonempty(_with(ins[0], lambda t: _select_ids(t, d, i), lambda pr: pr[:d] + pr[d + 1:]))]


def _select_ids(t: Tensor, d: int, i: int) -> Tensor:
    return t.select(d, i if t.shape[d] > 1 else 0)


def _slice_ids(t: Tensor, d: int, start: int, end: int, step: int = 1) -> Tensor:
    return t[(slice(None),) * d + (slice(start, end, step),)] if t.shape[d] > 1 else t


@_op("SliceBackward0")
def _r_slice(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    a = node.in_shape(0) or node.attr("self_sym_sizes")
    d = _norm_dim(node.attr("dim"), len(a))
    n = a[d]
    start, end, step = node.attr("start", 0) or 0, node.attr("end", n), node.attr("step", 1) or 1
    start, end = (start + n if start < 0 else start), (end + n if end is not None and end < 0 else end)
    start, end = max(0, min(start, n)), n if end is None else max(0, min(end, n))
    return [_nonempty(_with(ins[0], lambda t: _slice_ids(t, d, start, end, step),
                            lambda pr: tuple(_fresh() if (j == d and x is not None) else x for j, x in enumerate(pr))))]


@_op("SplitBackward0", "UnsafeSplitBackward0", "SplitWithSizesBackward0", "UnbindBackward0")
def _r_split(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    a = node.in_shape(0) or node.attr("self_sym_sizes")
    d = _norm_dim(node.attr("dim"), len(a))
    if node.op == "UnbindBackward0":
        return [_nonempty(_with(ins[0], partial(_select_ids, d=d, i=i), lambda pr: pr[:d] + pr[d + 1:]))
                for i in range(a[d])]
    if node.op == "SplitWithSizesBackward0":
        sizes = list(node.attr("split_sizes"))
    else:
        s = node.attr("split_size")
        sizes = [s] * (a[d] // s) + ([a[d] % s] if a[d] % s else [])
    outs, start = [], 0
    for s in sizes:
        outs.append(_nonempty(_with(ins[0], partial(_slice_ids, d=d, start=start, end=start + s),
                                    lambda pr: tuple(_fresh() if (j == d and x is not None) else x
                                                     for j, x in enumerate(pr)))))
        start += s
    return outs


def _cat(run: _Run, ps: list[Any], shapes: list[tuple[int, ...] | None], d: int, out: tuple[int, ...]) -> Any:
    nd = len(out)
    live = [p for p in ps if p is not None]
    if not live:
        return None
    if any(s is None for s in shapes) or len({type(p) for p in live}) > 1 or (
            isinstance(live[0], _Scale) and len({p.k for p in live}) > 1) or any(p.ids is None for p in live):
        _break_all(run, *live)
        return None
    ps = [_lead_p(p, nd) for p in ps]
    common = [1] * nd
    for p in ps:
        if p is not None:
            for dd in range(nd):
                if dd != d and p.ids.shape[dd] > 1:
                    common[dd] = out[dd]
    pieces = []
    for p, s in zip(ps, shapes):
        assert s is not None  # checked above
        shp = list(common)
        shp[d] = s[d]
        pieces.append(torch.full(shp, -1, dtype=torch.long) if p is None else p.ids.expand(shp))
    ids = _compress(torch.cat(pieces, d))
    if isinstance(live[0], _Scale):
        return _Scale(live[0].k, ids)
    if len(live) == 1:
        return _Shift(live[0].tok, ids, live[0].prov)
    prov = tuple(None if all(p.prov[dd] is None for p in live) else _fresh_if(out[dd]) for dd in range(nd))
    return _Shift(_fresh(), ids, prov)


@_op("CatBackward0")
def _r_cat(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    out = node.out_shape()
    d = _norm_dim(node.attr("dim"), len(out))
    return [_cat(run, ins, [node.in_shape(i) for i in range(len(ins))], d, out)]


@_op("StackBackward0")
def _r_stack(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    out = node.out_shape()
    d = _norm_dim(node.attr("dim"), len(out))
    shapes = [node.in_shape(i) for i in range(len(ins))]
    shapes = [None if s is None else tuple(s[:d]) + (1,) + tuple(s[d:]) for s in shapes]
    return [_cat(run, [None if p is None else _unsqueeze(p, d) for p in ins], shapes, d, out)]


_HOMOGENEOUS = {"ReluBackward0": "ReLU", "ReluBackward1": "ReLU", "LeakyReluBackward0": "LeakyReLU",
                "LeakyReluBackward1": "LeakyReLU", "AbsBackward0": "abs"}


@_op(*_HOMOGENEOUS, "ClampMinBackward0", "ClampBackward1")
def _r_homogeneous(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    p = ins[0]
    if node.op.startswith("Clamp") and not (node.attr("min") == 0 and node.attr("max") is None):
        run.breaks_p(p)  # only clamp(min=0) is a ReLU
        return [None]
    if isinstance(p, _Scale):
        run.passes(_HOMOGENEOUS.get(node.op, "ReLU"))
        run.positive = True
        return [p]
    run.breaks_p(p)
    return [None]


@_op("NegBackward0", "MulBackward1", "DivBackward1")
def _r_linear1(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    p = ins[0]
    return [p if isinstance(p, _Scale) or p is None else _Shift(_fresh(), p.ids, p.prov, p.mix)]


_DENOMINATORS = {"RsqrtBackward0", "ReciprocalBackward0"}


def _feeds_denominator(node: _Node, depth: int = 0) -> bool:
    """Whether every use of the node's value is as a denominator.

    An ε added there is a normalizer's ε: x / sqrt(var + ε), x * rsqrt(mean(x²) + ε),
    (w - m) / (std + ε).
    """
    cons = node.consumers.get(0, [])
    if not cons:
        return False
    for c, slot in cons:
        ok = (c.op in _DENOMINATORS or (c.op == "DivBackward0" and slot == 1)
              or (c.op == "PowBackward0" and (c.attr("exponent") or 0) < 0)
              or (c.op == "SqrtBackward0" and depth == 0 and _feeds_denominator(c, 1)))
        if not ok:
            return False
    return True


@_op("AddBackward1", "SubBackward1", "RsubBackward1")
def _r_add_scalar(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    p = ins[0]
    if isinstance(p, _Shift):
        return [p if node.op != "RsubBackward1" else _Shift(_fresh(), p.ids, p.prov, p.mix)]
    if isinstance(p, _Scale) and node.op != "RsubBackward1" and p.k > 0 and _feeds_denominator(node):
        run.eps = True
        return [p]
    run.breaks_p(p)
    return [None]


@_op("PowBackward0", "SqrtBackward0", "RsqrtBackward0", "ReciprocalBackward0")
def _r_power(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    p = ins[0]
    e: Any = {"SqrtBackward0": 0.5, "RsqrtBackward0": -0.5, "ReciprocalBackward0": -1}.get(node.op)
    if e is None:
        e = node.attr("exponent")
    if isinstance(p, _Scale) and isinstance(e, (int, float)) and math.isfinite(e):
        k = p.k * Fraction(e).limit_denominator(1 << 16)
        return [_Scale(k, p.ids) if k != 0 else None]
    run.breaks_p(p)
    return [None]


def _target(ids: Tensor, out: Sequence[int], shape: Sequence[int] | None) -> Tensor | None:
    """``ids`` (on a tensor of shape ``out``) as ids on an operand of ``shape`` broadcast to it."""
    if shape is None:
        return None
    ids = _lead(ids, len(out))
    lead = len(out) - len(shape)
    if lead < 0 or any(ids.shape[d] > 1 for d in range(lead)):
        return None
    t = ids.reshape(ids.shape[lead:])
    if any(t.shape[d] > 1 and shape[d] == 1 for d in range(len(shape))):
        return None
    return t


def _merge_prov(a: tuple, b: tuple, out: Sequence[int]) -> tuple:
    return tuple(x if x == y else (None if x is None and y is None else _fresh_if(out[d]))
                 for d, (x, y) in enumerate(zip(a, b)))


def _sum(run: _Run, node: _Node, pa: Any, pb: Any, ca: float, cb: float, out: Sequence[int]) -> Any:
    """a·ca + b·cb for the perturbations of two operands broadcast to ``out``."""
    nd = len(out)
    pa, pb = _lead_p(pa, nd), _lead_p(pb, nd)
    if pa is None and pb is None:
        return None
    if isinstance(pa, _Scale) or isinstance(pb, _Scale):
        if isinstance(pa, _Scale) and isinstance(pb, _Scale):
            if pa.k == pb.k and _same_ids(pa.ids, pb.ids):
                shape = torch.broadcast_shapes(pa.ids.shape, pb.ids.shape)
                return _Scale(pa.k, _compress(pa.ids.expand(shape)))
            _break_all(run, pa, pb)
            return None
        if pa is not None and pb is not None:
            _break_all(run, pa, pb)
            return None
        p, slot = (pa, 1) if pa is not None else (pb, 0)
        edge = node.inputs[slot] if slot < len(node.inputs) else (None, 0)
        if edge[0] is None:  # a constant: ε before a denominator, or a real offset
            if p.k > 0 and _feeds_denominator(node):
                run.eps = True
                return p
        else:
            target = _target(p.ids, out, node.in_shape(slot))
            if target is not None and _chain_to_param(edge) is not None:
                run.recruit(edge, target, p.k, behind=False)
        run.breaks_p(p)  # a residual add: the other branch is not scaled
        return None
    if pa is not None and pb is not None:
        if pa.tok == pb.tok and pa.prov == pb.prov and _same_ids(pa.ids, pb.ids) and ca + cb == 0:
            run.removes("mean subtraction")
            return None
        ids = pa.ids if _same_ids(pa.ids, pb.ids) else None
        return _Shift(_fresh(), ids, _merge_prov(pa.prov, pb.prov, out), _owners(pa, pb))
    p, c = (pa, ca) if pa is not None else (pb, cb)
    return p if c == 1 else _Shift(_fresh(), p.ids, p.prov, p.mix)


@_op("AddBackward0", "SubBackward0", "RsubBackward0")
def _r_add(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    alpha = node.attr("alpha", 1)
    alpha = 1 if not isinstance(alpha, (int, float)) else alpha
    ca, cb = {"AddBackward0": (1, alpha), "SubBackward0": (1, -alpha), "RsubBackward0": (-alpha, 1)}[node.op]
    ins = ins + [None] * (2 - len(ins))
    out = node.out_shape()
    return [_sum(run, node, ins[0], ins[1], ca, cb, out)]


def _operand_shape(node: _Node, slot: int) -> tuple[int, ...] | None:
    s = node.in_shape(slot)
    if s is None:
        t = node.attr(("self", "other")[slot])
        s = tuple(t.shape) if isinstance(t, Tensor) else ()
    return s


def _shift_times(p: _Shift, other: Sequence[int] | None, out: Sequence[int]) -> _Shift:
    """Δ multiplied by a data-dependent operand of shape ``other``: it varies where the operand does."""
    nd = len(out)
    other = tuple(other) if other is not None else tuple(out)
    other = (1,) * (nd - len(other)) + other
    prov = tuple(_fresh_if(out[d]) if other[d] > 1 else p.prov[d] for d in range(nd))
    return _Shift(_fresh(), p.ids, prov, p.mix)


@_op("MulBackward0", "DivBackward0")
def _r_mul(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    out = node.out_shape()
    nd = len(out)
    ins = ins + [None] * (2 - len(ins))
    pa, pb = _lead_p(ins[0], nd), _lead_p(ins[1], nd)
    div = node.op == "DivBackward0"
    if pa is None and pb is None:
        return [None]
    if isinstance(pa, _Scale) and isinstance(pb, _Scale):
        if _same_ids(pa.ids, pb.ids):
            k = pa.k - pb.k if div else pa.k + pb.k
            if k == 0:
                run.removes("a normalizing ratio")
                return [None]
            shape = torch.broadcast_shapes(pa.ids.shape, pb.ids.shape)
            return [_Scale(k, _compress(pa.ids.expand(shape)))]
        _break_all(run, pa, pb)
        return [None]
    if pa is not None and pb is not None:
        _break_all(run, pa, pb)
        return [None]
    if isinstance(pb, _Shift) and div:
        run.breaks_p(pb)
        return [None]
    p, slot = (pa, 1) if pa is not None else (pb, 0)
    if isinstance(p, _Shift):
        return [_shift_times(p, _operand_shape(node, slot), out)]
    k = -p.k if (div and slot == 0) else p.k
    edge = node.inputs[slot] if slot < len(node.inputs) else (None, 0)
    if not div and edge[0] is not None and _chain_to_param(edge) is not None:
        # a gain parameter per neuron (layer scale): the other side of a rescale
        in_shape = node.in_shape(slot)
        target = _target(p.ids, out, in_shape)
        if target is not None and in_shape is not None and bool((target >= 0).all()) and all(
                s == 1 or t > 1 for s, t in zip(in_shape, target.shape)):
            run.recruit(edge, target, -k, behind=False, or_break=False)
    return [_Scale(k, p.ids)]


_REDUCE = {"SumBackward0": "sum", "SumBackward1": "sum", "MeanBackward0": "mean", "MeanBackward1": "mean",
           "VarBackward0": "var", "StdBackward0": "std", "LinalgVectorNormBackward0": "norm", "NormBackward1": "norm",
           "AmaxBackward0": "max", "AminBackward0": "max", "MaxBackward0": "max", "MinBackward0": "max",
           "MaxBackward1": "max", "MinBackward1": "max"}


@_op(*_REDUCE)
def _r_reduce(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    p = ins[0]
    how = _REDUCE[node.op]
    a = node.in_shape(0) or node.attr("self_sym_sizes")
    nd = len(a)
    n_out = max(1, len(node.outs))
    dim = None if node.op in ("SumBackward0", "MeanBackward0", "MaxBackward1", "MinBackward1") else node.attr("dim")
    if isinstance(dim, int):
        dim = (dim,)
    dims = list(range(nd)) if not dim else sorted({_norm_dim(d, nd) for d in dim})
    keep = bool(node.attr("keepdim", False)) if dim else False
    rest = [None] * (n_out - 1)

    def reduced(q: Any) -> Any:
        def f(t: Tensor) -> Tensor:
            for d in reversed(dims):
                t = t.amax(d, keepdim=keep) if t.shape[d] > 1 else (t if keep else t.squeeze(d))
            return t

        def fp(pr: tuple) -> tuple:
            return tuple((None if d in dims else x) for d, x in enumerate(pr) if keep or d not in dims)

        return _with(q, f, fp)

    if isinstance(p, _Scale):
        if _varies(p.ids, dims):  # the neurons pooled together must share one factor
            run.norm_sets(p.ids, dims)
            p = run.canon(p)
        if how in ("max", "norm"):
            run.positive = True
        q = reduced(p)
        return [_Scale(q.k * (2 if how == "var" else 1), q.ids)] + rest
    flat = not _varies(p.ids, dims) and all(p.prov[d] is None for d in dims)
    if how in ("var", "std"):
        if flat:
            run.removes("variance")
            return [None] + rest
        run.breaks_p(p)
        return [None] + rest
    if how == "norm" or (how == "max" and not flat):
        run.breaks_p(p)
        return [None] + rest
    if flat and how in ("max", "mean"):
        return [reduced(p)] + rest
    q = reduced(_Shift(p.tok, None if _varies(p.ids, dims) else p.ids, p.prov, _owners(p)))
    return [_Shift(_fresh(), q.ids, q.prov, q.mix)] + rest


# Spatial ops that act per channel: pooling, and nearest upsampling (copies entries, like a max).
_POOL = {"MaxPool1DWithIndicesBackward0": ("max", 1), "MaxPool2DWithIndicesBackward0": ("max", 2),
         "MaxPool3DWithIndicesBackward0": ("max", 3), "AvgPool1DBackward0": ("avg", 1),
         "AvgPool2DBackward0": ("avg", 2),
         "AvgPool3DBackward0": ("avg", 3), "AdaptiveAvgPool1DBackward0": ("adaptive", 1),
         "AdaptiveAvgPool2DBackward0": ("adaptive", 2), "AdaptiveAvgPool3DBackward0": ("adaptive", 3),
         "AdaptiveMaxPool1DBackward0": ("max", 1), "AdaptiveMaxPool2DBackward0": ("max", 2),
         "AdaptiveMaxPool3DBackward0": ("max", 3), "UpsampleNearest1DBackward0": ("max", 1),
         "UpsampleNearest2DBackward0": ("max", 2), "UpsampleNearest3DBackward0": ("max", 3)}


@_op(*_POOL)
def _r_pool(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    p = ins[0]
    how, k = _POOL[node.op]
    nd = _nd(p)
    sp = list(range(nd - k, nd))
    rest = [None] * (max(1, len(node.outs)) - 1)
    label = "upsampling" if node.op.startswith("Upsample") else {"max": "max pool", "avg": "average pool",
                                                                 "adaptive": "average pool"}[how]
    if isinstance(p, _Scale):
        if _varies(p.ids, sp):
            run.breaks_p(p)
            return [None] + rest
        run.passes(label)
        run.positive |= how == "max" and not node.op.startswith("Upsample")
        return [p] + rest
    flat = not _varies(p.ids, sp) and all(p.prov[d] is None for d in sp)
    if how == "max":
        if flat:
            return [p] + rest
        run.breaks_p(p)
        return [None] + rest
    pad = node.attr("padding", ()) or ()
    exact = how == "adaptive" or ((all(x == 0 for x in pad) or not node.attr("count_include_pad", True))
                                  and node.attr("divisor_override") is None)
    if flat and exact:
        return [p] + rest
    out = node.out() or ()
    ids = None if _varies(p.ids, sp) else p.ids
    prov = tuple(_fresh_if(out[d]) if d in sp and d < len(out) else x for d, x in enumerate(p.prov))
    return [_Shift(_fresh(), ids, prov, _owners(p))] + rest


@_op("SoftmaxBackward0", "LogSoftmaxBackward0", "SafeSoftmaxBackward0", "_SafeSoftmaxBackward0")
def _r_softmax(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    p = ins[0]
    d = _norm_dim(node.attr("dim"), _nd(p))
    if isinstance(p, _Shift) and p.prov[d] is None:
        run.norm_sets(p.ids, [d])
        run.removes("log-softmax" if "Log" in node.op else "softmax")
        return [None]
    run.breaks_p(p)
    return [None]


def _normalize(run: _Run, p: Any, dims: Sequence[int], label: str) -> None:
    """A normalization removes a scale / a shift that is constant over each of its sets."""
    if p is None:
        return
    if isinstance(p, _Shift):
        if any(p.prov[d] is not None for d in dims):
            run.breaks_p(p)
            return
        run.norm_sets(p.ids, dims)
        run.removes(label)
        return
    run.norm_sets(p.ids, dims)
    run.removes(label, eps=True, positive=True)


def _affine(run: _Run, node: _Node, pw: Any, pb: Any, to_out: Callable[[Tensor], Tensor], nd: int,
            out: Sequence[int], has_bias: bool | None = None) -> Any:
    """γ ⊙ x̂ + β of a normalization, for perturbations of γ and β (x̂ unchanged).

    ``has_bias`` None: unknown (BatchNorm and GroupNorm do not save it); a bias without gradient is
    then taken to be absent unless the model has frozen parameters.
    """
    slots = (1, 2)
    if pw is None and pb is None:
        return None
    w_edge = node.inputs[slots[0]] if slots[0] < len(node.inputs) else (None, 0)
    b_edge = node.inputs[slots[1]] if slots[1] < len(node.inputs) else (None, 0)
    if isinstance(pw, _Scale) or isinstance(pb, _Scale):
        if isinstance(pw, _Scale) and isinstance(pb, _Scale):
            if pw.k == pb.k and _same_ids(pw.ids, pb.ids):
                return _Scale(pw.k, to_out(pw.ids))
        elif pb is None and isinstance(pw, _Scale):
            if b_edge[0] is None and (has_bias is False or (has_bias is None and not run.ir.frozen)):
                return _Scale(pw.k, to_out(pw.ids))
            if b_edge[0] is None:
                _break_all(run, pw)
                return None
            run.recruit(b_edge, pw.ids, pw.k, behind=False)
        elif pw is None and isinstance(pb, _Scale) and w_edge[0] is not None:
            run.recruit(w_edge, pb.ids, pb.k, behind=False)
        _break_all(run, pw, pb)
        return None
    prov = tuple(_fresh_if(out[d]) for d in range(nd))
    if pw is not None and pb is not None:
        return _Shift(_fresh(), to_out(pw.ids) if _same_ids(pw.ids, pb.ids) else None, prov, _owners(pw, pb))
    if pw is not None:
        return _Shift(_fresh(), to_out(pw.ids), prov)
    return _Shift(_fresh(), to_out(pb.ids), (None,) * nd)


def _rest(node: _Node) -> list[Any]:
    return [None] * (max(1, len(node.outs)) - 1)


@_op("NativeBatchNormBackward0", "CudnnBatchNormBackward0", "MiopenBatchNormBackward0")
def _r_batchnorm(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    x, w, b = (list(ins) + [None] * 3)[:3]
    out = node.out_shape()
    nd = len(out)
    training = node.attr("training")
    if training is None:  # cuDNN/MIOpen do not save the flag: batch statistics are saved only in training
        r = node.attr("result1")
        training = isinstance(r, Tensor) and r.numel() > 0
    if not training:  # running statistics: an affine map, nothing is removed
        run.eval_bn.add("BatchNorm")
        _break_all(run, x, w, b)
        return [None] + _rest(node)
    x_shape = node.in_shape(0) or out
    _normalize(run, x, [0] + list(range(2, nd)), "InstanceNorm" if x_shape[0] == 1 and nd > 2 else "BatchNorm (train)")
    return [_affine(run, node, w, b, lambda t: t.reshape([1, -1] + [1] * (nd - 2)), nd, out)] + _rest(node)


@_op("NativeLayerNormBackward0")
def _r_layernorm(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    x, w, b = (list(ins) + [None] * 3)[:3]
    out = node.out_shape()
    nd = len(out)
    m = len(node.attr("normalized_shape"))
    if x is not None and any(node.consumers.get(i) for i in (1, 2)):
        run.breaks_p(x)
    _normalize(run, x, range(nd - m, nd), "LayerNorm")
    return [_affine(run, node, w, b, lambda t: _lead(t, nd), nd, out, node.attr("bias") is not None)] + _rest(node)


@_op("NativeGroupNormBackward0")
def _r_groupnorm(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    x, w, b = (list(ins) + [None] * 3)[:3]
    out = node.out_shape()
    nd = len(out)
    n, c, hw, g = (node.attr(k) for k in ("N", "C", "HxW", "group"))
    if x is not None:
        if any(node.consumers.get(i) for i in (1, 2)):
            run.breaks_p(x)
        x_shape = node.in_shape(0)
        assert x_shape is not None  # x is perturbed: its input edge is in the graph
        xv = _reshape(run, x, x_shape, (n, g, c // g, hw))
        _normalize(run, xv, [2, 3], f"GroupNorm({g})")
    return [_affine(run, node, w, b, lambda t: t.reshape([1, -1] + [1] * (nd - 2)), nd, out)] + _rest(node)


@_op("WeightNormInterfaceBackward0")
def _r_weight_norm(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    v, g = (list(ins) + [None] * 2)[:2]
    out = node.out_shape()
    dim = _norm_dim(node.attr("dim", 0), len(out))
    if isinstance(v, _Scale):
        run.norm_sets(v.ids, [d for d in range(len(out)) if d != dim])
        run.removes("weight norm", positive=True)
    elif v is not None:
        run.breaks_p(v)
    res = None
    if isinstance(g, _Scale):
        res = _Scale(g.k, _lead(g.ids, len(out)))
    elif g is not None:
        run.breaks_p(g)
    return [res] + _rest(node)


def _contract(run: _Run, node: _Node, pa: Any, pb: Any, ea: tuple, eb: tuple, nb: int,
              a_shape: Sequence[int], b_shape: Sequence[int], out: Sequence[int]) -> Any:
    """out[*b, i, j] = Σ_c A[*b, i, c] B[*b, c, j] for perturbations of A and B."""
    i_a, c_a, c_b, j_b = nb, nb + 1, nb, nb + 1
    bat = list(range(nb))
    if pa is None and pb is None:
        return None
    if isinstance(pa, _Shift) or isinstance(pb, _Shift):
        if pa is not None and pb is not None:
            _break_all(run, pa, pb)
            return None
        if pa is not None:  # Δ_A @ B
            ids = None if pa.ids is None or _varies(pa.ids, [c_a]) else pa.ids
            prov = [pa.prov[d] if b_shape[d] == 1 else _fresh_if(out[d]) for d in bat]
            return _Shift(_fresh(), ids, (*prov, pa.prov[i_a], _fresh_if(out[-1])), _owners(pa))
        ids = None if pb.ids is None or _varies(pb.ids, [c_b]) else pb.ids  # A @ Δ_B
        prov = [pb.prov[d] if a_shape[d] == 1 else _fresh_if(out[d]) for d in bat]
        return _Shift(_fresh(), ids, (*prov, _fresh_if(out[-2]), pb.prov[j_b]), _owners(pb))
    if pa is not None and pb is not None:
        if _varies(pa.ids, [c_a]) or _varies(pb.ids, [c_b]):
            if (pa.k + pb.k == 0 and not _varies(pa.ids, [i_a]) and not _varies(pb.ids, [j_b])
                    and _same_ids(pa.ids, pb.ids.transpose(-1, -2))):
                run.removes("the next layer's columns")
                return None
        elif _same_ids(pa.ids, pb.ids):
            k = pa.k + pb.k
            shape = torch.broadcast_shapes(pa.ids.shape, pb.ids.shape)
            return _Scale(k, _compress(pa.ids.expand(shape))) if k != 0 else None
        _break_all(run, pa, pb)
        return None
    if pa is not None:
        if _varies(pa.ids, [c_a]):
            if not _varies(pa.ids, bat + [i_a]):
                run.recruit(eb, pa.ids.transpose(-1, -2), -pa.k)
            run.breaks_p(pa)
            return None
        return _Scale(pa.k, pa.ids)
    if _varies(pb.ids, [c_b]):
        if not _varies(pb.ids, bat + [j_b]):
            run.recruit(ea, pb.ids.transpose(-1, -2), -pb.k)
        run.breaks_p(pb)
        return None
    return _Scale(pb.k, pb.ids)


def _plus_bias(run: _Run, node: _Node, prod: Any, pbias: Any, bias_slot: int, has_bias: bool,
               bias_target: Callable[[Tensor], Tensor | None], bias_to_out: Callable[[Tensor], Tensor],
               weight_slot: int, weight_target: Callable[[Tensor], Tensor | None], out: Sequence[int]) -> Any:
    """A layer's product plus its bias: a scaled product needs the bias scaled alike (recruited)."""
    nd = len(out)
    b_edge = node.inputs[bias_slot] if 0 <= bias_slot < len(node.inputs) else (None, 0)
    if pbias is not None:
        pbias = (_Scale(pbias.k, bias_to_out(pbias.ids)) if isinstance(pbias, _Scale)
                 else _Shift(pbias.tok, None if pbias.ids is None else bias_to_out(pbias.ids), (None,) * nd, pbias.mix))
    if isinstance(prod, _Scale) and pbias is None:
        if not has_bias:
            return prod
        if b_edge[0] is not None:
            t = bias_target(prod.ids)
            if t is not None:
                run.recruit(b_edge, t, prod.k, behind=False)
        run.breaks_p(prod)
        return None
    if isinstance(pbias, _Scale) and prod is None:
        t = weight_target(pbias.ids)
        if t is not None:
            run.recruit(node.inputs[weight_slot], t, pbias.k, behind=False)
        run.breaks_p(pbias)
        return None
    if isinstance(prod, _Scale) and isinstance(pbias, _Scale):
        if prod.k == pbias.k and _same_ids(prod.ids, pbias.ids):
            return prod
        _break_all(run, prod, pbias)
        return None
    if prod is None or pbias is None:
        return prod if pbias is None else pbias
    if isinstance(prod, _Shift) and isinstance(pbias, _Shift):
        ids = prod.ids if _same_ids(prod.ids, pbias.ids) else None
        return _Shift(_fresh(), ids, _merge_prov(prod.prov, pbias.prov, out), _owners(prod, pbias))
    _break_all(run, prod, pbias)
    return None


@_op("MmBackward0", "BmmBackward0", "AddmmBackward0")
def _r_matmul(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    out = node.out()
    addmm = node.op == "AddmmBackward0"
    sa, sb = (1, 2) if addmm else (0, 1)
    ins = list(ins) + [None] * (3 - len(ins))
    a_shape, b_shape = node.in_shape(sa), node.in_shape(sb)
    if a_shape is None:
        a_shape = node.attr("mat1_sym_sizes" if addmm else "self_sym_sizes")
    if b_shape is None:
        b_shape = node.attr("mat2_sym_sizes")
    if a_shape is None or b_shape is None or out is None:
        _break_all(run, *ins)
        return [None]
    prod = _contract(run, node, ins[sa], ins[sb], node.inputs[sa] if sa < len(node.inputs) else (None, 0),
                     node.inputs[sb] if sb < len(node.inputs) else (None, 0), len(out) - 2, a_shape, b_shape, out)
    if not addmm:
        return [prod]
    bshape = node.in_shape(0)

    def weight_target(ids: Tensor) -> Tensor | None:
        t = _lead(ids, 2)
        return None if t.shape[0] > 1 else t

    return [_plus_bias(run, node, prod, ins[0], 0, True, lambda ids: _target(ids, out, bshape),
                       lambda t: _lead(t, 2), sb, weight_target, out)]


@_op("ConvolutionBackward0")
def _r_conv(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    px, pw, pbias = (list(ins) + [None] * 3)[:3]
    out = node.out()
    w_shape = node.in_shape(1)
    if out is None or w_shape is None:
        _break_all(run, px, pw, pbias)
        return [None]
    nd = len(out)
    sp = list(range(2, nd))
    tr, groups = bool(node.attr("transposed", False)), node.attr("groups", 1)
    wo, wc = (1, 0) if tr else (0, 1)
    kd = list(range(2, len(w_shape)))
    flat_ok = not tr and all(p == 0 for p in (node.attr("padding", ()) or ()))

    def w_as_x(ids: Tensor) -> Tensor:  # weight ids (in-channel axis) in the input's layout, and back
        return ids.transpose(0, 1) if tr else ids

    def w_as_out(ids: Tensor) -> Tensor:  # weight ids (out-channel axis) in the output's layout
        return ids.transpose(0, 1) if not tr else ids

    prod: _Scale | _Shift | None = None
    if px is not None and pw is not None:
        if (isinstance(px, _Scale) and isinstance(pw, _Scale) and groups == 1 and px.k + pw.k == 0
                and not _varies(px.ids, [0] + sp) and not _varies(pw.ids, [wo] + kd)
                and _same_ids(px.ids, w_as_x(pw.ids))):
            run.removes("the next layer's columns")
        else:
            _break_all(run, px, pw)
    elif px is not None:
        if isinstance(px, _Scale):
            if _varies(px.ids, [1]):
                if groups == 1 and not _varies(px.ids, [0] + sp):
                    run.recruit(node.inputs[1], w_as_x(px.ids), -px.k)
                run.breaks_p(px)
            elif _varies(px.ids, sp) or (tr and groups != 1):
                run.breaks_p(px)
            else:
                prod = _Scale(px.k, px.ids)
        else:
            ids = None if px.ids is None or _varies(px.ids, [1] + sp) else px.ids
            prov = [px.prov[0], _fresh_if(out[1])] + [
                None if flat_ok and px.prov[d] is None and not _varies(px.ids, [d]) else _fresh_if(out[d]) for d in sp]
            prod = _Shift(_fresh(), ids, tuple(prov), _owners(px))
    elif pw is not None:
        if isinstance(pw, _Scale):
            if _varies(pw.ids, [wc]):
                if groups == 1 and not _varies(pw.ids, [wo] + kd):
                    run.recruit(node.inputs[0], w_as_x(pw.ids), -pw.k)
                run.breaks_p(pw)
            elif _varies(pw.ids, kd) or (tr and groups != 1):
                run.breaks_p(pw)
            else:
                prod = _Scale(pw.k, w_as_out(pw.ids))
        else:
            ids = None if pw.ids is None or _varies(pw.ids, [wc] + kd) or (tr and groups != 1) else w_as_out(pw.ids)
            # a grouped conv sums a different set of inputs into each output channel
            prov = [_fresh_if(out[0]), pw.prov[wo] if groups == 1 else _fresh_if(out[1])] + [
                _fresh_if(out[d]) for d in sp]
            prod = _Shift(_fresh(), ids, tuple(prov), _owners(pw))
    has_bias = bool(node.attr("bias_sym_sizes_opt")) and node.attr("bias_sym_sizes_opt") != (0,)

    def bias_target(ids: Tensor) -> Tensor | None:
        if _varies(ids, [0] + sp):
            return None
        return ids.reshape(-1)

    def weight_target(ids: Tensor) -> Tensor | None:
        if _varies(ids, [0] + sp):
            return None
        v = ids.reshape(-1)
        return v.reshape([-1] + [1] * (len(w_shape) - 1)) if not tr else v.reshape([1, -1] + [1] * (len(w_shape) - 2))

    return [_plus_bias(run, node, prod, pbias, 2, has_bias, bias_target,
                       lambda t: t.reshape([1, -1] + [1] * (nd - 2)), 1, weight_target, out)]


@_op("EmbeddingBackward0")
def _r_embedding(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    p = ins[0]
    out = node.out_shape()
    nd = len(out)
    if p is None:
        return [None]
    ids = p.ids
    if ids.shape[0] == 1:
        new = ids.reshape((1,) * (nd - 1) + (ids.shape[1],))
    else:
        idx = node.attr("indices")
        if not isinstance(idx, Tensor):
            run.breaks_p(p)
            return [None]
        v = node.attr("weight_sym_argsize_0") or ids.shape[0]
        new = _compress(ids.expand(v, ids.shape[1])[idx.to(torch.long).cpu()])
        run.data_mode = True  # which rows meet which op depends on the batch: decide for all rows at once
    if isinstance(p, _Scale):
        return [_Scale(p.k, new)]
    tok_prov = None if p.prov[0] is None else _fresh()
    return [_Shift(_fresh(), new, tuple(tok_prov if d < nd - 1 and out[d] > 1 else None for d in range(nd - 1))
                   + (p.prov[1],))]


_SDPA = ("ScaledDotProductFlashAttentionForCpuBackward0", "ScaledDotProductFlashAttentionBackward0",
         "ScaledDotProductEfficientAttentionBackward0", "ScaledDotProductCudnnAttentionBackward0",
         "ScaledDotProductFusedAttentionOverrideableBackward0")


@_op(*_SDPA)
def _r_sdpa(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    q, k, v = (list(ins) + [None] * 3)[:3]
    _break_all(run, *ins[3:])
    out = node.out_shape()
    nd = len(out)
    t = nd - 2
    if isinstance(q, _Scale) and isinstance(k, _Scale):
        if (q.k + k.k == 0 and not _varies(q.ids, [t]) and not _varies(k.ids, [t])
                and _same_ids(q.ids, k.ids)):
            run.removes("query·key")
        else:
            _break_all(run, q, k)
    else:  # q and k perturbed by different neurons (a packed projection): each on its own
        if isinstance(q, _Scale) and k is None and not _varies(q.ids, [t]):
            run.recruit(node.inputs[1], q.ids, -q.k)
        run.breaks_p(q)
        if isinstance(k, _Shift) and k.prov[t] is None:
            run.norm_sets(k.ids, [t])
            run.removes("attention softmax over keys")
        elif isinstance(k, _Scale) and q is None and not _varies(k.ids, [t]):
            run.recruit(node.inputs[0], k.ids, -k.k)
        else:
            run.breaks_p(k)
    res: _Scale | _Shift | None = None
    if isinstance(v, _Scale):
        if _varies(v.ids, [t]):
            run.breaks_p(v)
        else:
            res = v
    elif isinstance(v, _Shift):
        rows_sum_to_one = not node.attr("dropout_p", 0.0) and node.attr("attn_mask") is None
        if v.prov[t] is None and not _varies(v.ids, [t]) and rows_sum_to_one:
            res = v
        else:
            ids = None if _varies(v.ids, [t]) else v.ids
            res = _Shift(_fresh(), ids, v.prov[:t] + (_fresh_if(out[t]),) + v.prov[t + 1:], _owners(v))
    return [res] + _rest(node)


# Ops known to break every candidate (not positively homogeneous, not linear, or a loss that is not
# a function of softmax(logits)): listed so that they are not reported as ops without a rule.
_BREAKING = (
    "GeluBackward0", "SiluBackward0", "TanhBackward0", "SigmoidBackward0", "EluBackward0", "SeluBackward0",
    "CeluBackward0", "SoftplusBackward0", "HardtanhBackward0", "HardswishBackward0", "HardsigmoidBackward0",
    "MishBackward0", "LogSigmoidBackward0", "ExpBackward0", "LogBackward0", "ErfBackward0", "SinBackward0",
    "CosBackward0", "LogsumexpBackward0", "NllLossBackward0", "NllLoss2DBackward0", "MseLossBackward0",
    "L1LossBackward0", "SmoothL1LossBackward0", "HuberLossBackward0", "BinaryCrossEntropyBackward0",
    "BinaryCrossEntropyWithLogitsBackward0", "KlDivBackward0", "SoftMarginLossBackward0", "WhereBackward0",
    "MaskedFillBackward0", "ClampMaxBackward0", "PreluKernelBackward0", "ThresholdBackward0",
)


@_op(*_BREAKING)
def _r_break(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    _break_all(run, *ins)
    return [None] * max(1, len(node.outs))


def _r_module(run: _Run, node: _Node, ins: list[Any]) -> list[Any]:
    """A hooked module call with a registered rule."""
    p, rule = ins[0] if ins else None, node.rule
    _break_all(run, *ins[1:])
    if p is None:
        return [None]
    nd = _nd(p)
    if isinstance(rule, Normalizes) and (rule.shift or isinstance(p, _Scale)):
        _normalize(run, p, sorted({_norm_dim(d, nd) for d in rule.over}), node.label)
        return [None]
    if isinstance(rule, Homogeneous) and isinstance(p, _Scale) and node.in_shape(0) == node.out():
        run.passes(node.label)
        run.positive = True
        return [p]
    run.breaks_p(p)
    return [None]


# --------------------------------------------------------------------------------------------
# Pushing one candidate through the graph
# --------------------------------------------------------------------------------------------


def _flow(run: _Run) -> None:
    """Visit, in topological order, only the ops a perturbed value reaches."""
    ir = run.ir
    vals: dict[tuple[_Node, int], Any] = {}
    heap: list[tuple[int, int, _Node]] = []
    queued: set[_Node] = set()
    ticket = itertools.count()

    def push_consumers(node: _Node, nr: int) -> None:
        for c, _ in node.consumers.get(nr, []):
            if c not in queued and c in ir.order:
                queued.add(c)
                heapq.heappush(heap, (ir.order[c], next(ticket), c))

    for name, p in run.seeds.items():
        node = ir.params[name]
        vals[(node, 0)] = p
        push_consumers(node, 0)
    while heap:
        _, _, node = heapq.heappop(heap)
        run.current = node.op
        ins = [run.canon(vals.get((src, nr))) if src is not None else None for src, nr in node.inputs]
        if not any(p is not None for p in ins):
            continue
        for p in ins if run.track else ():
            if p is not None:
                who = _owners(p)
                if who is None:
                    run.touched[:] = True
                else:
                    run.touched[who] = True
        rule = _r_module if node.rule is not None else _OPS.get(node.op)
        if rule is None:
            run.unknown.add(node.op)
            _break_all(run, *ins)
            continue
        outs = rule(run, node, ins)
        for i, p in enumerate(outs):
            if p is None:
                continue
            if node is ir.root and i == ir.root_nr:  # the candidate changes the output / the loss
                run.breaks_p(p)
                continue
            vals[(node, i)] = p
            push_consumers(node, i)


def _candidate(ir: _IR, seeds: dict[str, Any], n: int, kind: str, track: bool = False) -> tuple[_Run, bool]:
    """Run a candidate, restarting with each parameter it recruits; (run, whether any neuron survived)."""
    seeds, parent = dict(seeds), None
    for _ in range(10):
        run = _Run(ir, seeds, n, kind, parent)
        run.track = track
        try:
            _flow(run)
            return run, True
        except _Break:
            return run, False
        except _Restart as r:
            for name, p in r.adds:
                seeds[name] = p
            parent = run.parent
        except Exception as err:  # noqa: BLE001 - an op the rules misread: propose nothing, say so
            run.unknown.add(f"{run.current} ({type(err).__name__}: {err})")
            return run, False
    return run, False


# --------------------------------------------------------------------------------------------
# From candidates to groups
# --------------------------------------------------------------------------------------------


def _owner(param: str) -> str:
    """The qualified name of the module owning a parameter (parametrizations seen through)."""
    mod = param.rsplit(".", 1)[0] if "." in param else param
    if ".parametrizations." in f".{mod}.":
        mod = mod.split(".parametrizations.")[0] if not mod.startswith("parametrizations.") else param
    return mod


def _member(name: str, ids: Tensor, sign: int, block: int) -> Member | None:
    if bool((ids < 0).any()):
        return None
    lab = _compress(ids // block)
    var = [d for d in range(lab.dim()) if lab.shape[d] > 1]
    if not var:
        return Member(name, axis=None, sign=sign, offset=int(lab.reshape(-1)[0]) if lab.numel() else 0)
    if len(var) > 1:
        return None
    a = var[0]
    v = lab.reshape(-1)
    size, off = v.numel(), int(v[0])
    cnt = int(v[-1]) - off + 1
    if cnt <= 0 or size % cnt:
        return None
    if not torch.equal(v, off + torch.arange(cnt).repeat_interleave(size // cnt)):
        return None
    return Member(name, axis=a, sign=sign, blocks=None if cnt == size else cnt, offset=off)


@dataclass
class _Found:
    group: SymmetryGroup
    seed: str
    eps: bool


def _describe(run: _Run, kind: str, members: Sequence[Member], granularity: str) -> str:
    ins = " + ".join(dict.fromkeys(m.param for m in members if m.sign > 0))
    path = ", ".join(run.path)
    removed = ", ".join(run.removed) or "nothing downstream"
    if kind == "rescale":
        out = ", ".join(dict.fromkeys(_owner(m.param) for m in members if m.sign < 0))
        via = f"through {path}" if path else "along a linear path (any α ≠ 0)"
        return f"{ins} per {granularity} against {out}, {via}"
    what = "scaled" if kind == "scale" else "shifted"
    return (f"{ins} {what} per {granularity}: removed by {removed}" + (f" through {path}" if path else "")
            + (" (exact up to the norm's ε)" if run.eps and kind == "scale" else ""))


def _granularity(kind: str, n: int, block: int, seed: Member, shape: Sequence[int]) -> str:
    if n == 1:
        return "layer"
    if block > 1:
        return "norm group"
    a = seed.axis
    if kind == "translation":
        if len(shape) == 1:
            return "channel"
        return "input feature" if a == 1 and len(shape) == 2 else ("row" if a == 0 else f"slice on axis {a}")
    if kind == "rescale":
        return "channel" if len(shape) > 2 else "unit"
    return "output channel" if a == 0 else f"slice on axis {a}"


def _build(run: _Run, seed: str, kind: Kind, shapes: Mapping[str, Sequence[int]]) -> tuple[_Found | None, str | None]:
    """The group a finished candidate proves, or a note when only part of it holds."""
    n = run.n
    if kind == "scale" and any(isinstance(p, _Scale) and p.k < 0 for p in run.seeds.values()):
        kind = "rescale"
    classes: dict[int, list[int]] = {}
    for i in range(n):
        classes.setdefault(run.find(i), []).append(i)
    broken, touched = run.broken.tolist(), run.touched.tolist()
    bad = [c for c in classes.values() if any(broken[i] for i in c)]
    removed = ", ".join(run.removed)
    if bad:
        bad_ids = {i for c in bad for i in c}
        good = [i for i in range(n) if i not in bad_ids and touched[i]]
        note = None
        if good and removed:
            which = (f"entries {good[0]}-{good[-1]}" if good == list(range(good[0], good[-1] + 1))
                     else f"{len(good)} entries")
            note = (f"{seed}: {which} of {n} keep a {kind} symmetry ({removed}), the rest do not; a member cannot "
                    "select part of a tensor, so it is not tracked")
        return None, note
    sizes = {len(c) for c in classes.values()}
    block = sizes.pop() if len(sizes) == 1 else n
    if block < n and any(c != list(range(c[0], c[0] + block)) or c[0] % block for c in classes.values()):
        block = n  # the merged blocks are not contiguous: one block for all
    members = []
    for name, p in run.seeds.items():
        m = _member(name, p.ids, -1 if isinstance(p, _Scale) and p.k < 0 else 1, block)
        if m is None:
            return None, (f"{seed}: a {kind} symmetry holds ({removed or 'by cancellation'}), but it takes part of an "
                          f"axis of {name}, which a member cannot select; not tracked")
        members.append(m)
    n_groups = n // block
    gran = _granularity(kind, n_groups, block, members[0], shapes[seed])
    g = SymmetryGroup(kind=kind, name=_owner(seed), members=tuple(members), n_neurons=n_groups, granularity=gran,
                      why=_describe(run, kind, members, gran))
    return _Found(g, seed, run.eps), None


def _seed(shape: Sequence[int], axis: int | None, kind: str) -> tuple[Any, int]:
    nd = len(shape)
    if axis is None:
        ids, n = torch.zeros((1,) * nd, dtype=torch.long), 1
    else:
        n = shape[axis]
        ids = torch.arange(n).reshape([n if d == axis else 1 for d in range(nd)])
    p = _Scale(Fraction(1), ids) if kind == "scale" else _Shift(_fresh(), ids, (None,) * nd)
    return p, n


def _signature(g: SymmetryGroup) -> tuple:
    return (g.linear, frozenset((m.param, m.axis, m.blocks, m.offset) for m in g.members))


def _first_ops(ir: _IR, name: str) -> set[_Node]:
    """The ops that consume a parameter, seen through shape-only ops."""
    out, stack = set(), [ir.params[name]]
    while stack:
        node = stack.pop()
        for cons in node.consumers.values():
            for c, _ in cons:
                (stack.append(c) if c.op in _VIEWLIKE else out.add(c))
    return out


def _merge_translations(found: list[_Found], order: Sequence[str], ir: _IR) -> list[_Found]:
    """One translation group per layer: the weight's columns, then the bias (physics.md §1.2).

    Groups merge when their parameters feed the same op.
    """
    rank = {p: i for i, p in enumerate(order)}
    found = sorted(found, key=lambda f: rank.get(f.seed, 0))
    ops = [_first_ops(ir, f.seed) for f in found]
    parent = list(range(len(found)))
    for a in range(len(found)):
        for b in range(a):
            if ops[a] & ops[b]:
                parent[a] = parent[b]
                break
    out = []
    for root in sorted(set(parent)):
        fs = [f for f, r in zip(found, parent) if r == root]
        if len(fs) == 1:
            out.append(fs[0])
            continue
        members, off = [], 0
        for f in fs:
            members += [dataclasses.replace(m, offset=m.offset + off) for m in f.group.members]
            off += f.group.n_neurons
        grans = " + ".join(f.group.granularity if f.group.n_neurons > 1 else f.seed.rsplit(".", 1)[-1] for f in fs)
        removed = ", ".join(dict.fromkeys(f.group.why.split(": removed by ", 1)[-1] for f in fs))
        why = f"{' + '.join(f.seed for f in fs)} shifted per {grans}: removed by {removed}"
        g = SymmetryGroup("translation", fs[0].group.name, tuple(members), off, grans, why)
        out.append(_Found(g, fs[0].seed, any(f.eps for f in fs)))
    return out


def _unique_name(g: SymmetryGroup, keys: set[str]) -> None:
    """Make ``g.key`` unique among ``keys`` ("conv2[bias]", then "conv2[2]", ...) and add it."""
    base, i = g.name, 1
    if g.key in keys:
        g.name = f"{base}[{g.members[0].param.rsplit('.', 1)[-1]}]"
    while g.key in keys:
        i += 1
        g.name = f"{base}[{i}]"
    keys.add(g.key)


def _propose(model: nn.Module, root: Tensor, hooked: Sequence[_Hooked] = ()) -> tuple[SymmetryReport, dict[str, bool]]:
    if root.grad_fn is None:
        raise ValueError(
            "Expected `root` to be a tensor computed from the model's parameters with gradients "
            f"enabled, but it has no grad_fn (requires_grad={root.requires_grad}). Run the forward "
            "pass outside torch.no_grad() and with the model's parameters requiring gradients."
        )
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    ir = _IR(root, names, hooked)
    ir.frozen = any(not p.requires_grad for p in model.parameters())
    order = [n for n in names.values() if n in ir.params]
    shapes = {n: ir.params[n].out() or () for n in order}
    notes: dict[str, None] = dict.fromkeys(ir.notes)
    unknown: set[str] = set()
    eval_bn = False
    found: dict[str, list[_Found]] = {"scale": [], "shift": []}
    seen: set[tuple] = set()
    for kind in ("scale", "shift"):
        covered: set[tuple[str, int | None]] = set()
        for name in order:
            shape = shapes[name]
            axes: list[int | None] = [a for a in range(len(shape)) if shape[a] > 1]
            best: list[_Found] = []
            for axis in axes + [None]:
                if (name, axis) in covered or (axis is None and (best or any(c[0] == name for c in covered))):
                    continue
                pert, n = _seed(shape, axis, kind)
                run, alive = _candidate(ir, {name: pert}, n, kind)
                unknown |= run.unknown
                eval_bn |= bool(run.eval_bn)
                if not alive:
                    continue
                if bool(run.broken.any()):  # part of it holds: find which neurons were really tested
                    run, alive = _candidate(ir, run.seeds, n, kind, track=True)
                f, note = _build(run, name, "translation" if kind == "shift" else "scale", shapes)
                if note:  # one note per candidate: its other parameters need not be tried again
                    notes[note] = None
                    for other, p in run.seeds.items():
                        var = [d for d in range(p.ids.dim()) if p.ids.shape[d] > 1]
                        covered.add((other, var[0] if len(var) == 1 else None))
                if f is None or _signature(f.group) in seen:
                    continue
                seen.add(_signature(f.group))
                covered.update((m.param, m.axis) for m in f.group.members)
                best.append(f)
            if kind == "shift" and len(best) > 1:  # the finest translation of a tensor implies the coarser
                best = [max(best, key=lambda f: f.group.n_neurons)]
            by_params: dict[tuple, _Found] = {}
            for f in best:  # the same parameters grouped coarser (merged by a reduction) add nothing
                key = (f.group.kind, f.group.params)
                if key not in by_params or f.group.n_neurons > by_params[key].group.n_neurons:
                    by_params[key] = f
            best = list(by_params.values())
            found[kind].extend(best)
    groups = found["scale"] + _merge_translations(found["shift"], order, ir)
    rank = {p: i for i, p in enumerate(order)}
    groups.sort(key=lambda f: (KINDS.index(f.group.kind), rank.get(f.group.members[0].param, 0)))
    keys: set[str] = set()
    for f in groups:
        _unique_name(f.group, keys)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training for m in model.modules()):
        eval_bn = True
    if eval_bn:
        bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training]
        notes[f"BatchNorm in eval mode ({', '.join(bns) or 'functional'}): running statistics remove nothing, so no "
              "symmetry is proposed through it"] = None
    if unknown:
        notes[f"ops without a rule, no symmetry proposed through them: {', '.join(sorted(unknown))}"] = None
    report = SymmetryReport(groups=[f.group for f in groups], notes=list(notes))
    return _with_coverage(model, report), {f.group.key: f.eps for f in groups}


class module_calls:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Record the calls of modules whose support-table rule reads their forward as one op.

    Only classes added with :func:`register` (other than :class:`SeeThrough`) are recorded; pass
    the recording to :func:`symmetries_from_graph` so that their rules apply there too.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> with module_calls(model) as calls:
        ...     out = model(torch.randn(5, 4))
        >>> [g.key for g in symmetries_from_graph(model, out.sum(), calls=calls)]
        ['rescale/0']
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.calls: list[_Hooked] = []
        self._handles: list[Any] = []

    def __enter__(self) -> list[_Hooked]:
        def record(name: str, rule: Rule) -> Callable:
            def hook(mod: nn.Module, args: tuple, output: Any) -> None:
                if args and isinstance(args[0], Tensor) and isinstance(output, Tensor) and output.grad_fn is not None:
                    self.calls.append(_Hooked(f"{type(mod).__name__} {name}".strip(), rule, args[0], output))

            return hook

        self._handles = [m.register_forward_hook(record(n, rule_for(m))) for n, m in self.model.named_modules()
                         if rule_for(m).opaque_forward]
        return self.calls

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def symmetries_from_graph(model: nn.Module, root: torch.Tensor, *,
                          calls: Sequence[Any] = ()) -> SymmetryReport:
    """Propose symmetry groups from the autograd graph that produced ``root``.

    ``root`` is any tensor computed from the model's parameters with gradients enabled: the
    model's output (groups must leave it unchanged), or the training loss (loss-level groups such
    as the softmax translation of the head are then found too). Nothing is run: the graph is only
    read, before any backward pass, so groups come back unconfirmed.

    Args:
        model: the module whose parameters are named in the report.
        root: a tensor whose ``grad_fn`` graph reaches the parameters.
        calls: module calls recorded with :class:`module_calls` during the forward pass, so that
            registered rules of custom module types apply (without it they are read op by op).

    Returns:
        A :class:`SymmetryReport` with unconfirmed groups.

    Raises:
        ValueError: if ``root`` has no autograd graph.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
        >>> loss = nn.functional.cross_entropy(model(torch.randn(5, 4)), torch.tensor([0, 1, 2, 0, 1]))
        >>> for g in symmetries_from_graph(model, loss):
        ...     print(g.key, g.n_neurons, g.granularity)
        scale/0 1 layer
        translation/0 5 input feature + bias
        translation/2 9 input feature + bias
        rescale/1 8 unit
    """
    return _propose(model, root, calls)[0]


def _with_coverage(model: nn.Module, report: SymmetryReport) -> SymmetryReport:
    params = dict(model.named_parameters())
    covered = {m.param for g in report.groups for m in g.members}
    report.n_params = sum(p.numel() for p in params.values() if p.requires_grad)
    report.covered = sum(params[n].numel() for n in covered if n in params)
    return report


# --------------------------------------------------------------------------------------------
# Confirmation from gradients (physics.md §3.1, tier 1)
# --------------------------------------------------------------------------------------------


def _tolerance(dtype: torch.dtype, eps_limited: bool = False) -> float:
    """Largest geometry violation a group may show and still count as confirmed.

    Exact groups sit at the dtype's floor (physics.md §3.1: about 1e-16 in float64, 1e-7 in float32,
    1e-3 under bf16 autocast); groups that hold only up to a normalization's ε reach 1e-7 to 3e-5
    (BatchNorm) and 2e-4 (weight standardization) on ordinary inputs (§1.4), so they get 1e-3.
    Real violations (a wrong grouping, eval-mode BatchNorm) are 0.1 to 1.
    """
    exact = {torch.float64: 1e-8, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}.get(dtype, 1e-4)
    return max(exact, 1e-3) if eps_limited else exact


def _violation(group: SymmetryGroup, params: Mapping[str, Tensor], grads: Mapping[str, Tensor | None],
               typical: float) -> tuple[Tensor, Tensor] | None:
    """Per-neuron geometry violation (NaN where degenerate) and the degenerate mask, in float64.

    Quadratic groups: |B(θ, g)| / sqrt(B₊(θ, θ) B₊(g, g)) (a cosine; 0 for an exact symmetry).
    Linear groups: |Σ g| / max(Σ |g|, n·typical), so that an exactly zero gradient reads 0 rather
    than rounding noise over rounding noise.
    """
    from .charges import bilinear_reference, linear_reference

    grad = {n: grads.get(n) for n in group.params}
    if any(g is None for g in grad.values()):
        return None
    grad64 = {n: g.double() for n, g in grad.items()}  # type: ignore[union-attr]
    tiny = torch.finfo(torch.float64).tiny
    if group.linear:
        t = linear_reference(group, grad64)
        a = linear_reference(group, grad64, absolute=True)
        cnt = linear_reference(group, {n: torch.ones_like(g) for n, g in grad64.items()}, absolute=True)
        v = t.abs() / torch.maximum(a, cnt * typical).clamp_min(tiny)
        return v, torch.zeros_like(v, dtype=torch.bool)
    theta = {n: params[n].detach().double() for n in group.params}
    r = bilinear_reference(group, theta, grad64)
    qq = bilinear_reference(group, theta, theta, unsigned=True)
    gg = bilinear_reference(group, grad64, grad64, unsigned=True)
    dead = gg == 0
    v = r.abs() / (qq * gg).sqrt().clamp_min(tiny)
    v[dead] = math.nan
    return v, dead


def _confirm(report: SymmetryReport, params: Mapping[str, Tensor], probes: Sequence[Mapping[str, Tensor | None]],
             eps: Mapping[str, bool]) -> None:
    """Mark each group confirmed / refuted (moved to ``report.refuted``) / unconfirmed."""
    def typical(grads: Mapping[str, Tensor | None], prefix: str) -> float:
        gs = [g.detach().abs() for n, g in grads.items() if g is not None and n.startswith(prefix)]
        total = sum(int(g.numel()) for g in gs)
        return float(sum(g.double().sum() for g in gs)) / total if total else 0.0

    overall = [typical(grads, "") for grads in probes]
    kept: list[SymmetryGroup] = []
    refuted: list[SymmetryGroup] = []
    for g in report.groups:
        # rounding noise of an exactly-zero gradient sum scales with the layer's own gradients
        owner = _owner(g.members[0].param) + "."
        typ = [max(t, typical(grads, owner)) if g.linear else t for grads, t in zip(probes, overall)]
        res = [r for grads, t in zip(probes, typ) if (r := _violation(g, params, grads, t)) is not None]
        if not res:
            g.confirmed, g.violation = None, None
            kept.append(g)
            continue
        v = torch.stack([r[0] for r in res])
        dead = torch.stack([r[1] for r in res]).all(0)
        g.degenerate = tuple(int(i) for i in dead.nonzero().reshape(-1))
        live = v[:, ~dead]
        if live.numel() == 0:
            g.confirmed, g.violation = None, None
            report.notes.append(f"{g.key}: every neuron has zero gradient on the probes (dead units); degenerate, "
                                "not confirmed")
            kept.append(g)
            continue
        g.violation = float(torch.nan_to_num(live, nan=0.0).max())
        g.confirmed = g.violation <= _tolerance(params[g.members[0].param].dtype, eps.get(g.key, True))
        if g.degenerate:
            report.notes.append(f"{g.key}: {len(g.degenerate)} of {g.n_neurons} neurons have zero gradient on the "
                                "probes (dead units): degenerate, they confirm nothing")
        (kept if g.confirmed else refuted).append(g)
    report.groups, report.refuted = kept, report.refuted + refuted


# --------------------------------------------------------------------------------------------
# Running the model
# --------------------------------------------------------------------------------------------


def _call(model: nn.Module, example_input: Any) -> Any:
    if isinstance(example_input, Mapping):
        return model(**example_input)
    if isinstance(example_input, tuple):
        return model(*example_input)
    return model(example_input)


def _output_tensors(out: Any) -> list[Tensor]:
    """Every tensor with an autograd graph in a (nested) output."""
    if isinstance(out, Tensor):
        return [out] if out.grad_fn is not None else []
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _output_tensors(o)]
    return []


def _projection(outs: Sequence[Tensor], seed: int) -> Tensor:
    """A random linear functional of every output: a loss whose symmetries are the output's."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    terms = [(o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype)).sum() for o in outs]
    return torch.stack([t.to(terms[0].dtype) for t in terms]).sum() if len(terms) > 1 else terms[0]


class _Preserved:
    """Saves and restores what a probing forward pass would otherwise change.

    That is: buffers (BatchNorm running statistics), ``.grad`` of every parameter, the RNG states.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> _Preserved:
        self.buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        self.grads = {n: p.grad for n, p in self.model.named_parameters()}
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        return self

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for n, b in self.model.named_buffers():
                if n in self.buffers:
                    b.copy_(self.buffers[n])
        for n, p in self.model.named_parameters():
            p.grad = self.grads.get(n)
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


def _check_declared(model: nn.Module, groups: Iterable[SymmetryGroup]) -> list[SymmetryGroup]:
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    out = []
    for g in groups:
        if not isinstance(g, SymmetryGroup):
            raise TypeError(f"Expected every entry of `declare` to be a SymmetryGroup but got {type(g).__name__}")
        if g.kind not in KINDS:
            raise ValueError(f"Expected the declared group's kind to be one of {KINDS} but got {g.kind!r}")
        for m in g.members:
            if m.param not in shapes:
                raise ValueError(f"Declared group {g.key!r}: expected a parameter of the model but got {m.param!r}")
            if m.offset + m.n_neurons(shapes[m.param]) > g.n_neurons:
                raise ValueError(
                    f"Declared group {g.key!r}: member {m.param!r} gives {m.n_neurons(shapes[m.param])} neurons "
                    f"at offset {m.offset}, more than the group's n_neurons={g.n_neurons}")
        out.append(dataclasses.replace(g, why=g.why or "declared by hand", confirmed=None, violation=None))
    return out


def find_symmetries(
    model: nn.Module,
    example_input: Any,
    *,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    confirm: bool = True,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    declare: Iterable[SymmetryGroup] = (),
    probes: int = 2,
    extra_inputs: Sequence[Any] = (),
) -> SymmetryReport:
    """Find the symmetry groups of ``model`` on ``example_input`` and confirm them from gradients.

    One forward pass is run with the model as it is (call ``model.train()`` first: eval-mode
    BatchNorm has no symmetry), the groups are read off its autograd graph, and each is checked
    against the gradients of ``probes`` backward passes (physics.md §3.1, tier 1). Buffers,
    gradients and RNG states are restored afterwards, so calling this never changes training.

    Args:
        model: the network.
        example_input: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
        loss_fn: optional map from the model's output to a scalar loss; lets loss-level rules
            (the softmax translation of the head) see the head. Without it the groups must leave
            every output unchanged, and random linear functionals of the output are the probes.
        confirm: check each group's gradient geometry; refuted groups move to ``report.refuted``.
        include: glob patterns over ``kind/layer`` keys to keep (default: all).
        exclude: glob patterns over ``kind/layer`` keys to drop.
        declare: groups declared by hand; confirmed like the found ones.
        probes: backward passes used for confirmation without ``loss_fn`` (with it: one).
        extra_inputs: more batches (same form as ``example_input``) whose gradients confirm the
            groups too, one forward and backward each; ``loss_fn`` must accept their outputs (any
            targets do: a symmetry holds for every target).

    Returns:
        The :class:`SymmetryReport`.

    Raises:
        TypeError: if ``model`` is not a module or ``declare`` holds something else than groups.
        ValueError: if the model cannot run on ``example_input``, ``loss_fn`` does not return a
            scalar with a graph, or a declared group does not fit the model.

    Example:
        >>> model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
        >>> report = find_symmetries(model, x, loss_fn=lambda out: nn.functional.cross_entropy(out, y))
        >>> [(g.key, g.granularity, g.confirmed) for g in report]
        [('translation/2', 'input feature + bias', True), ('rescale/0', 'unit', True)]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be a torch.nn.Module but got {type(model).__name__}")
    if not isinstance(probes, int) or isinstance(probes, bool) or probes < 1:
        raise ValueError(f"Expected `probes` to be a positive int but got {probes!r}")
    declared = _check_declared(model, declare)
    with _Preserved(model), torch.enable_grad():
        try:
            with module_calls(model) as hooked:
                out = _call(model, example_input)
        except Exception as err:  # a clear message naming what the model expected
            raise ValueError(_input_mismatch(model, example_input, err)) from err
        outs = _output_tensors(out)
        if loss_fn is not None:
            root = loss_fn(out)
            if not isinstance(root, Tensor) or root.numel() != 1 or root.grad_fn is None:
                raise ValueError("Expected `loss_fn` to return a scalar tensor computed from the output, but got "
                                 f"{type(root).__name__}{tuple(root.shape) if isinstance(root, Tensor) else ''}")
        elif outs:
            root = _projection(outs, 0)
        else:
            raise TypeError(f"Expected the model to return a tensor (or a tuple/dict of tensors) with an autograd "
                            f"graph but got {type(out).__name__}")
        report, eps = _propose(model, root, hooked)
        keys = {g.key for g in report.groups}
        for g in declared:
            _unique_name(g, keys)
            report.groups.append(g)
        if confirm and report.groups:
            named = dict(model.named_parameters())
            wanted = sorted({m.param for g in report.groups for m in g.members} | set(
                n for n, p in named.items() if p.requires_grad))
            tensors = [named[n] for n in wanted if named[n].requires_grad]
            names = [n for n in wanted if named[n].requires_grad]
            n_probe = 1 if loss_fn is not None else probes
            grads_list = []
            for i in range(n_probe):
                r = root if i == 0 else _projection(outs, i)
                gs = torch.autograd.grad(r, tensors, retain_graph=i < n_probe - 1, allow_unused=True)
                grads_list.append(dict(zip(names, gs)))
            for j, extra in enumerate(extra_inputs):
                out_j = _call(model, extra)
                r = loss_fn(out_j) if loss_fn is not None else _projection(_output_tensors(out_j), 100 + j)
                gs = torch.autograd.grad(r, tensors, allow_unused=True)
                grads_list.append(dict(zip(names, gs)))
            _confirm(report, named, grads_list, eps)
    report = report.select(include, exclude)
    return _with_coverage(model, report)


def _input_mismatch(model: nn.Module, example_input: Any, err: Exception) -> str:
    def describe(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return f"Tensor(shape={tuple(x.shape)}, dtype={x.dtype})"
        if isinstance(x, Mapping):
            return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in x.items()) + "}"
        if isinstance(x, tuple):
            return "(" + ", ".join(describe(v) for v in x) + ")"
        return type(x).__name__

    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))), None)
    expect = ""
    if isinstance(first, nn.Linear):
        expect = (f" Its first layer is Linear(in_features={first.in_features}): it expects inputs of shape "
                  f"(N, {first.in_features}).")
    elif isinstance(first, nn.modules.conv._ConvNd):
        expect = (f" Its first layer is {type(first).__name__}(in_channels={first.in_channels}): it expects "
                  f"(N, {first.in_channels}, ...).")
    return (
        f"`example_input` does not fit {type(model).__name__}: calling it on {describe(example_input)} "
        f"raised {type(err).__name__}: {err}.{expect}"
    )
