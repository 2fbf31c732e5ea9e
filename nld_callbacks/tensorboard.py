r"""TensorBoard naming and writing: tags, the "NLD" custom-scalars dashboard, histograms, text.

Tags are flat scalars ``nld/{kind}/{layer}/{quantity}`` (design.md), with ``layer`` the module's
qualified name; one pure function, :func:`tag`, builds every one of them.

The dashboard a run gets, written through any ``SummaryWriter``-like object (the writer given to
:class:`~nld_callbacks.NoetherTracker`, or ``logger.experiment`` of Lightning's
``TensorBoardLogger``) by :class:`Dashboard`:

* one custom-scalars layout, written once, from the tags actually written (:func:`custom_scalars_layout`):
  per layer a Multiline chart of measured charge, exact prediction and NLD law, a Margin chart of the
  prediction with its tolerance band, the residual, the effective learning rate and the angular
  update. Multiline regexes are escaped and anchored (:func:`layer_regex`), so ``features.1``
  matches only itself; Margin charts name exact tags;
* a text panel with the detected-symmetry table and the parameter coverage (:func:`symmetry_markdown`);
* histograms of the per-neuron charges and effective learning rates at logging steps, binned on
  the device by :func:`bin_on_device` so that only the counts travel.

Never ``add_scalars`` or ``add_hparams``: both create extra runs.

Example:
    >>> tag("scale", "features.0", "charge")
    'nld/scale/features.0/charge'
    >>> layer_regex("scale", "features.0", "charge")
    'nld/scale/features\\.0/charge$'
    >>> parse_tag("nld/scale/features.0/charge")
    ('scale', 'features.0', 'charge')
    >>> layout = custom_scalars_layout(["nld/scale/fc/charge", "nld/scale/fc/predicted"])
    >>> [(c["title"], [ch["title"] for ch in c["chart"]]) for c in layout["category"]]
    [('NLD scale fc', ['fc: charge, measured vs predicted'])]
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch

__all__ = [
    "HISTOGRAMS",
    "QUANTITIES",
    "Dashboard",
    "bin_on_device",
    "custom_scalars_layout",
    "layer_regex",
    "layout_tags",
    "parse_tag",
    "symmetry_markdown",
    "tag",
    "write_histograms",
    "write_layout",
    "write_scalars",
]

PREFIX = "nld"

#: Every per-layer scalar the tracker may write, and what it means.
QUANTITIES: dict[str, str] = {
    "charge": "measured charge after the step (Σ over the layer's neurons)",
    "predicted": "exact per-step identity with R_t = 0, carried from the last measured charge",
    "nld": "continuous NLD law integrated from the start of tracking",
    "band_lower": "predicted − D, D = Σ over the layer's neurons of the residual scale of physics.md §3.2",
    "band_upper": "predicted + D (the measured charge lies inside the band when every neuron has |r| ≤ 1)",
    "residual": "largest |e| (unexplained residual, physics.md §3.2) since the last log",
    "breaking": "largest |b| (measured symmetry-breaking share) since the last log",
    "effective_lr": "η/((1−ηλ)Q), mean over the layer's channels (scale groups)",
    "angular_update": "measured 2·asin(|ŵ_{t+1} − ŵ_t|/2), mean over channels (scale groups)",
    "equilibrium": "predicted equilibrium charge Σ Q* (physics.md §2.4), from the drive averaged over one "
    "relaxation time",
    "equilibrium_angle": "predicted equilibrium angular update per step (§2.4), mean over channels",
    "relaxation_steps": "steps for the charge to relax towards equilibrium (§2.4), mean over channels",
    "rmsprop_decay": "decay of the implicit RMSProp accumulator |w|⁴: (1−ηλ)⁴ for SGD (§2.3)",
    "rmsprop_accumulator": "the implicit RMSProp accumulator |w|⁴ = Q², mean over channels (§2.3)",
    "radial_update": "cos(θ_t, u_t) of adaptive updates, mean over channels: kinetic symmetry breaking (§2.1)",
    "metric_charge": "metric charge Σ G θ² of adaptive rules without momentum (G = sqrt(v̂) + ε, §2.1)",
    "metric_predicted": "exact metric identity with R_t = 0 for metric_charge (§2.1)",
}

#: Per-neuron histograms written at logging steps (tag quantity → what is binned).
HISTOGRAMS: dict[str, str] = {
    "neuron_charge": "the charge of each neuron (channel, unit) of the layer after the step",
    "neuron_effective_lr": "η/((1−ηλ)Q_c) of each channel (scale groups)",
}

#: Charts per layer: (title suffix, quantities drawn together). Quantities not named here get a
#: chart of their own, so that every written tag is on the dashboard.
_CHARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("charge, measured vs predicted", ("charge", "predicted", "nld")),
    ("residual |e| and breaking |b|", ("residual", "breaking")),
    ("effective learning rate", ("effective_lr",)),
    ("angular update (rad), measured and at equilibrium", ("angular_update", "equilibrium_angle")),
    ("equilibrium charge Q*", ("equilibrium",)),
    ("metric charge Σ G w², measured vs predicted", ("metric_charge", "metric_predicted")),
)
_BAND = ("predicted", "band_lower", "band_upper")


@functools.lru_cache(maxsize=8192)  # a logging step asks for the same few hundred tags every time
def tag(kind: str, layer: str, quantity: str) -> str:
    """The TensorBoard tag of one per-layer quantity.

    Raises:
        ValueError: for an empty ``kind``, ``layer`` or ``quantity``.
    """
    for arg, v in (("kind", kind), ("layer", layer), ("quantity", quantity)):
        if not v:
            raise ValueError(f"Expected a non-empty `{arg}` but got {v!r}")
    return f"{PREFIX}/{kind}/{layer}/{quantity}"


def parse_tag(t: str) -> tuple[str, str, str] | None:
    """Inverse of :func:`tag`: ``(kind, layer, quantity)``, or ``None`` for other tags."""
    parts = t.split("/")
    if len(parts) < 4 or parts[0] != PREFIX:
        return None
    return parts[1], "/".join(parts[2:-1]), parts[-1]


def layer_regex(kind: str, layer: str, quantity: str) -> str:
    """An escaped regex matching exactly one tag.

    TensorBoard's custom-scalars plugin selects a Multiline chart's tags with ``re.match`` (anchored
    at the start); the ``$`` anchors the end.
    """
    return f"{re.escape(f'{PREFIX}/{kind}/{layer}/')}{re.escape(quantity)}$"


def custom_scalars_layout(tags: Iterable[str]) -> dict[str, Any]:
    """A custom-scalars layout as plain data, built from the scalar tags a run writes.

    One category per ``(kind, layer)``, in the order the tags first name them. Per layer:

    * a Multiline chart of ``charge`` with ``predicted`` and ``nld`` (those written);
    * a Margin chart of ``predicted`` inside ``[band_lower, band_upper]`` (when all three are written);
    * Multiline charts of ``residual`` with ``breaking``, of ``effective_lr`` and of
      ``angular_update``;
    * one chart for any other quantity.

    Tags that :func:`parse_tag` does not recognise are ignored. Every recognised tag appears in
    exactly one Multiline chart, except the band tags, which appear in the Margin chart; so the
    layout lists exactly the tags that were written.

    Args:
        tags: scalar tags (duplicates are fine).

    Returns:
        ``{"category": [{"title": str, "chart": [chart, ...]}, ...]}`` with each chart either
        ``{"title": str, "multiline": [regex, ...]}`` or
        ``{"title": str, "margin": {"value": tag, "lower": tag, "upper": tag}}``.
    """
    layers: dict[tuple[str, str], list[str]] = {}
    for t in tags:
        parsed = parse_tag(t)
        if parsed is None:
            continue
        kind, layer, q = parsed
        qs = layers.setdefault((kind, layer), [])
        if q not in qs:
            qs.append(q)
    categories = []
    for (kind, layer), qs in layers.items():
        charts: list[dict[str, Any]] = []
        placed: set[str] = set()
        for title, group in _CHARTS:
            present = [q for q in group if q in qs]
            if present:
                charts.append({"title": f"{layer}: {title}",
                               "multiline": [layer_regex(kind, layer, q) for q in present]})
                placed.update(present)
            if group[0] == "charge" and all(q in qs for q in _BAND):
                value, lower, upper = (tag(kind, layer, q) for q in _BAND)
                charts.append({"title": f"{layer}: predicted ± tolerance band",
                               "margin": {"value": value, "lower": lower, "upper": upper}})
        for q in qs:
            if q in placed or q in _BAND[1:]:
                continue
            charts.append({"title": f"{layer}: {q}", "multiline": [layer_regex(kind, layer, q)]})
        # band tags written without a prediction (should not happen) still get a chart
        for q in _BAND[1:]:
            if q in qs and "predicted" not in qs:
                charts.append({"title": f"{layer}: {q}", "multiline": [layer_regex(kind, layer, q)]})
        categories.append({"title": f"NLD {kind} {layer}", "chart": charts})
    return {"category": categories}


def layout_tags(layout: Mapping[str, Any], tags: Iterable[str]) -> dict[str, list[str]]:
    """Which of ``tags`` each chart of ``layout`` selects, keyed by chart title (for checks).

    Multiline regexes are applied as TensorBoard applies them (``re.match``); Margin tags are exact.
    """
    tags = list(dict.fromkeys(tags))
    out: dict[str, list[str]] = {}
    for cat in layout["category"]:
        for ch in cat["chart"]:
            if "multiline" in ch:
                out[ch["title"]] = [t for t in tags if any(re.match(rx, t) for rx in ch["multiline"])]
            else:
                m = ch["margin"]
                out[ch["title"]] = [t for t in (m["value"], m["lower"], m["upper"]) if t in tags]
    return out


def write_layout(writer: Any, layout: Mapping[str, Any]) -> None:
    """Write a layout from :func:`custom_scalars_layout` through a ``SummaryWriter``."""
    spec: dict[str, dict[str, list[Any]]] = {}
    for cat in layout["category"]:
        charts: dict[str, list[Any]] = {}
        for ch in cat["chart"]:
            if "multiline" in ch:
                charts[ch["title"]] = ["Multiline", list(ch["multiline"])]
            else:
                m = ch["margin"]
                charts[ch["title"]] = ["Margin", [m["value"], m["lower"], m["upper"]]]
        spec[cat["title"]] = charts
    writer.add_custom_scalars(spec)


class ScalarWriter(Protocol):
    def add_scalar(self, tag: str, value: float, global_step: int) -> Any: ...


def _one_event(writer: Any, step: int, values: Callable[[Any], list[Any]]) -> bool:
    """Write ``values(summary_pb2)`` as one event if ``writer`` is a torch ``SummaryWriter``.

    Returns False (nothing written) for any other writer.
    """
    from torch.utils.tensorboard import SummaryWriter

    if not isinstance(writer, SummaryWriter):
        return False
    from tensorboard.compat.proto import summary_pb2

    entries = values(summary_pb2)
    if entries:
        writer._get_file_writer().add_summary(summary_pb2.Summary(value=entries), step)
    return True


def write_scalars(writer: ScalarWriter, metrics: Mapping[str, float], step: int) -> None:
    """Write flat scalars (never ``add_scalars``, which creates extra runs).

    A torch ``SummaryWriter`` gets the step's values as one event (the same ``simple_value``
    entries ``add_scalar`` writes, one protobuf and one write instead of one per value: some 190
    values take about 1 ms instead of 18); any other writer gets ``add_scalar`` per value.
    """
    if _one_event(writer, step, lambda pb: [pb.Summary.Value(tag=k, simple_value=float(v))
                                            for k, v in metrics.items()]):
        return
    for k, v in metrics.items():
        writer.add_scalar(k, v, global_step=step)


def _md(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def symmetry_markdown(report: Any) -> str:
    """The detected-symmetry table and the parameter coverage as a markdown text panel.

    Args:
        report: a :class:`~nld_callbacks.SymmetryReport` (anything with ``groups``, ``covered``,
            ``n_params``, ``coverage`` and ``notes``).

    Example:
        >>> from nld_callbacks.symmetries import Member, SymmetryGroup, SymmetryReport
        >>> g = SymmetryGroup("scale", "fc", (Member("fc.weight"),), 4, "output channel", "Linear → BatchNorm")
        >>> print(symmetry_markdown(SymmetryReport(groups=[g], n_params=20, covered=16)))
        | kind | layer | neurons | granularity | parameters | confirmed | why |
        |---|---|---|---|---|---|---|
        | scale | fc | 4 | output channel | fc.weight | - | Linear → BatchNorm |
        <BLANKLINE>
        **1 group** (1 scale); parameters covered: 16 of 20 (80.0%)
    """
    groups = list(getattr(report, "groups", []))
    refuted = list(getattr(report, "refuted", []))
    lines = ["| kind | layer | neurons | granularity | parameters | confirmed | why |", "|---|---|---|---|---|---|---|"]
    for g in groups + refuted:
        conf = {True: "yes", False: "REFUTED", None: "-"}[getattr(g, "confirmed", None)]
        if getattr(g, "violation", None) is not None:
            conf += f" ({g.violation:.1e})"
        lines.append("| " + " | ".join(_md(x) for x in (g.kind, g.name, g.n_neurons, getattr(g, "granularity", ""),
                                                        ", ".join(g.params), conf, getattr(g, "why", ""))) + " |")
    kinds: dict[str, int] = {}
    for g in groups:
        kinds[g.kind] = kinds.get(g.kind, 0) + 1
    counts = ", ".join(f"{n} {k}" for k, n in kinds.items()) or "none"
    covered, n_params = int(getattr(report, "covered", 0)), int(getattr(report, "n_params", 0))
    share = 100.0 * covered / n_params if n_params else 0.0
    lines.append("")
    lines.append(f"**{len(groups)} group{'s' if len(groups) != 1 else ''}** ({counts}); parameters covered: "
                 f"{covered:,} of {n_params:,} ({share:.1f}%)")
    lines.extend(f"- note: {_md(n)}" for n in getattr(report, "notes", []))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ histograms
#: Leading entries of a :func:`bin_on_device` row, then the bucket counts.
HIST_MIN, HIST_MAX, HIST_NUM, HIST_SUM, HIST_SUMSQ, HIST_COUNTS = range(6)


def bin_on_device(values: torch.Tensor, group_index: torch.Tensor, n_groups: int, bins: int = 30) -> torch.Tensor:
    """Per-group histograms of a per-neuron vector, computed where the vector lives (no host sync).

    Each group's finite values are binned into ``bins`` equal buckets between their own minimum and
    maximum; non-finite values are left out.

    Args:
        values: ``(N,)`` per-neuron values (groups concatenated).
        group_index: ``(N,)`` long, the group of each entry.
        n_groups: number of groups G.
        bins: number of buckets.

    Returns:
        ``(G, 5 + bins)`` float64: ``[min, max, num, sum, sum_squares, count_0, ..., count_{bins-1}]``
        per group (min = +inf, max = −inf and num = 0 for a group without finite values).

    Example:
        >>> v = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0])
        >>> h = bin_on_device(v, torch.tensor([0, 0, 0, 0, 1]), 2, bins=3)
        >>> h[0].tolist()
        [0.0, 3.0, 4.0, 6.0, 14.0, 1.0, 1.0, 2.0]
        >>> h[1].tolist()
        [10.0, 10.0, 1.0, 10.0, 100.0, 1.0, 0.0, 0.0]
    """
    if bins < 1:
        raise ValueError(f"Expected `bins` to be a positive int but got {bins!r}")
    v = values.detach().to(torch.float64)
    ok = torch.isfinite(v)
    w = ok.to(torch.float64)
    z = torch.where(ok, v, torch.zeros_like(v))
    lo = torch.full((n_groups,), float("inf"), dtype=torch.float64, device=v.device)
    hi = torch.full((n_groups,), float("-inf"), dtype=torch.float64, device=v.device)
    lo = lo.scatter_reduce(0, group_index, torch.where(ok, v, torch.full_like(v, float("inf"))), "amin")
    hi = hi.scatter_reduce(0, group_index, torch.where(ok, v, torch.full_like(v, float("-inf"))), "amax")
    zeros = torch.zeros(n_groups, dtype=torch.float64, device=v.device)
    num = zeros.index_add(0, group_index, w)
    s = zeros.index_add(0, group_index, z)
    s2 = zeros.index_add(0, group_index, z * z)
    width = hi - lo
    width = torch.where(torch.isfinite(width) & (width > 0), width, torch.ones_like(width))
    lo_n = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
    pos = (z - lo_n.index_select(0, group_index)) / width.index_select(0, group_index) * bins
    b = pos.floor().clamp(0, bins - 1).to(torch.long)
    counts = torch.zeros(n_groups * bins, dtype=torch.float64, device=v.device)
    counts = counts.index_add(0, group_index * bins + b, w).view(n_groups, bins)
    return torch.cat([torch.stack([lo, hi, num, s, s2], dim=1), counts], dim=1)


def histogram_kwargs(row: Sequence[float]) -> dict[str, Any] | None:
    """``add_histogram_raw`` arguments of one :func:`bin_on_device` row (host values).

    ``None`` when the row holds no value.

    Bucket limits are the right edges of the equal buckets between min and max.

    Example:
        >>> histogram_kwargs([0.0, 3.0, 4.0, 6.0, 14.0, 1.0, 1.0, 2.0])["bucket_limits"]
        [1.0, 2.0, 3.0]
    """
    lo, hi, num = float(row[HIST_MIN]), float(row[HIST_MAX]), int(round(row[HIST_NUM]))
    if num == 0:
        return None
    counts = [float(c) for c in row[HIST_COUNTS:]]
    n = len(counts)
    if hi > lo:
        limits = [lo + (hi - lo) * (k + 1) / n for k in range(n)]
        limits[-1] = hi
    else:  # every value equal: one bucket
        limits, counts = [hi], [float(num)]
    return {"min": lo, "max": hi, "num": num, "sum": float(row[HIST_SUM]), "sum_squares": float(row[HIST_SUMSQ]),
            "bucket_limits": limits, "bucket_counts": counts}


def write_histograms(writer: Any, histograms: Mapping[str, Mapping[str, Any]], step: int) -> None:
    """Write ``add_histogram_raw`` arguments (tag → :func:`histogram_kwargs`) for one step.

    A torch ``SummaryWriter`` gets them as one event (the same ``HistogramProto`` entries
    ``add_histogram_raw`` writes, one protobuf and one write instead of one per histogram: a
    logging step's ~20 histograms took some 3 ms one by one); any other writer gets
    ``add_histogram_raw`` per tag.
    """
    if _one_event(writer, step, lambda pb: [pb.Summary.Value(tag=t, histo=pb.HistogramProto(
            min=kw["min"], max=kw["max"], num=kw["num"], sum=kw["sum"], sum_squares=kw["sum_squares"],
            bucket_limit=kw["bucket_limits"], bucket=kw["bucket_counts"])) for t, kw in histograms.items()]):
        return
    for t, kw in histograms.items():
        writer.add_histogram_raw(t, global_step=step, **kw)


# ------------------------------------------------------------------------------------ dashboard
class Dashboard:
    """Writes the NLD dashboard of one run to one ``SummaryWriter``-like object.

    The layout is written once, after every source registered with :meth:`expect` has flushed
    once, from the union of the scalar tags they wrote; the symmetry text panel once; histograms at
    every flush. Scalars themselves are written by the caller (the tracker's writer, or the
    Lightning logger), so that every logger sees them.

    Args:
        writer: anything with ``add_custom_scalars``, ``add_text`` and ``add_histogram_raw``
            (``torch.utils.tensorboard.SummaryWriter``, ``TensorBoardLogger.experiment``).
    """

    def __init__(self, writer: Any) -> None:
        for method in ("add_custom_scalars", "add_text", "add_histogram_raw"):
            if not callable(getattr(writer, method, None)):
                raise TypeError(f"Expected `writer` to have {method} (a SummaryWriter) but got {type(writer).__name__}")
        self.writer = writer
        self.layout: dict[str, Any] | None = None
        self.text_written = False
        self._expected: set[int] = set()
        self._flushed: set[int] = set()
        self._tags: list[str] = []

    @staticmethod
    def supports(writer: Any) -> bool:
        """Whether ``writer`` can take a dashboard (a ``SummaryWriter``, not a plain callable)."""
        return all(callable(getattr(writer, m, None)) for m in ("add_custom_scalars", "add_text", "add_histogram_raw"))

    def expect(self, source: object) -> None:
        """Wait for ``source`` (a tracker) to flush once before writing the layout."""
        if self.layout is None:
            self._expected.add(id(source))

    def write_symmetries(self, report: Any, step: int = 0) -> None:
        """The text panel ``nld/symmetries``: detected groups and coverage (once)."""
        if self.text_written:
            return
        self.writer.add_text(f"{PREFIX}/symmetries", symmetry_markdown(report), global_step=step)
        self.text_written = True

    def write(self, source: object, metrics: Mapping[str, float], histograms: Mapping[str, Sequence[float]],
              step: int) -> None:
        """One logging step of ``source``: histograms now, the layout once everything expected arrived."""
        write_histograms(self.writer, {t: kw for t, row in histograms.items()
                                       if (kw := histogram_kwargs(row)) is not None}, step)
        if self.layout is not None:
            return
        self._tags.extend(t for t in metrics if t not in self._tags)
        self._flushed.add(id(source))
        if self._expected <= self._flushed and self._tags:
            self.layout = custom_scalars_layout(self._tags)
            write_layout(self.writer, self.layout)
