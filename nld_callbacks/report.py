"""``nld report LOGDIR``: event files → one PNG per layer and a markdown summary table.

Reads the ``nld/{kind}/{layer}/{quantity}`` scalars (design.md) straight from TensorBoard event
files, with no TensorBoard server: runs written by :class:`~nld_callbacks.NoetherMonitor` through
Lightning's ``TensorBoardLogger`` and runs written by a plain :class:`~nld_callbacks.NoetherTracker`
with a ``SummaryWriter`` look the same. Every folder under ``LOGDIR`` that holds event files is a
run.

Per layer the PNG has up to four panels over optimizer steps:

1. the measured charge, the exact prediction and the NLD law;
2. measured − predicted inside the tolerance band ± D (the Margin chart of the dashboard);
3. the unexplained residual |e| and the breaking share |b| (physics.md §3.2), log scale, with the
   line |e| = 1 below which a step is explained up to rounding;
4. the effective learning rate (scale groups).

Plots are drawn with matplotlib's Agg canvas directly (no ``pyplot``, no global backend change).

Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     main(d)  # an empty folder: a clear message on stderr and exit status 1
    1
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .tensorboard import parse_tag

__all__ = ["LayerSeries", "Report", "load_runs", "main", "plot_layer", "summary_markdown", "write_report"]

_EVENTS = "events.out.tfevents"


@dataclass
class LayerSeries:
    """The scalars of one layer of one run: quantity → (steps, values)."""

    run: str
    kind: str
    layer: str
    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)

    def get(self, quantity: str) -> tuple[list[int], list[float]]:
        """Steps and values of ``quantity`` (empty lists when it was not written)."""
        return self.series.get(quantity, ([], []))

    def last(self, quantity: str) -> float:
        """The last logged value of ``quantity`` (NaN when absent)."""
        _, v = self.get(quantity)
        return v[-1] if v else math.nan


@dataclass
class Report:
    """What :func:`write_report` produced."""

    layers: list[LayerSeries]
    pngs: list[Path]
    table: Path


def _run_dirs(logdir: Path) -> list[Path]:
    return sorted({Path(d) for d, _, files in os.walk(logdir) if any(f.startswith(_EVENTS) for f in files)})


def load_runs(logdir: str | os.PathLike[str]) -> list[LayerSeries]:
    """Every layer's NLD scalars in every run under ``logdir``, in the order the tags were written.

    Raises:
        FileNotFoundError: if ``logdir`` is not a directory.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = Path(logdir)
    if not root.is_dir():
        raise FileNotFoundError(f"Expected `logdir` to be a directory of TensorBoard event files but got {str(root)!r}")
    out: list[LayerSeries] = []
    for d in _run_dirs(root):
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0})
        acc.Reload()
        run = d.relative_to(root).as_posix()
        layers: dict[tuple[str, str], LayerSeries] = {}
        for t in acc.Tags().get("scalars", []):
            parsed = parse_tag(t)
            if parsed is None:
                continue
            kind, layer, q = parsed
            ls = layers.setdefault((kind, layer), LayerSeries("" if run == "." else run, kind, layer))
            # a resumed run may log a step twice: keep the last value written for each step
            by_step = {e.step: e.value for e in acc.Scalars(t)}
            steps = sorted(by_step)
            ls.series[q] = (steps, [by_step[s] for s in steps])
        out.extend(layers.values())
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def plot_layer(ls: LayerSeries, path: str | os.PathLike[str], *, dpi: int = 90) -> Path:
    """Draw one layer's panels (see the module docstring) into a PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = ["charge"]
    if ls.get("predicted")[0] and ls.get("band_upper")[0]:
        panels.append("band")
    if ls.get("residual")[0] or ls.get("breaking")[0]:
        panels.append("residual")
    if ls.get("effective_lr")[0]:
        panels.append("effective_lr")
    fig = Figure(figsize=(7.0, 1.0 + 1.9 * len(panels)), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    title = f"{ls.kind} charge of {ls.layer}" + (f"  ({ls.run})" if ls.run else "")
    fig.suptitle(title, fontsize=11)
    for ax, panel in zip(axes, panels):
        if panel == "charge":
            for q, style in (("charge", dict(color="black", lw=1.6, label="measured")),
                             ("predicted", dict(color="tab:orange", ls="--", lw=1.2, label="exact prediction")),
                             ("nld", dict(color="tab:blue", ls=":", lw=1.6, label="NLD law"))):
                s, v = ls.get(q)
                if s:
                    ax.plot(s, v, **style)
            ax.set_ylabel("charge Q")
            ax.legend(loc="best", fontsize=8, frameon=False)
        elif panel == "band":
            s, charge = ls.get("charge")
            sp, pred = ls.get("predicted")
            sh, hi = ls.get("band_upper")
            if s == sp == sh:
                half = [h - p for h, p in zip(hi, pred)]
                ax.fill_between(s, [-x for x in half], half, color="tab:orange", alpha=0.3, lw=0,
                                label="tolerance band ± D")
                ax.plot(s, [a - p for a, p in zip(charge, pred)], color="black", lw=1.0,
                        label="measured − predicted")
                ax.axhline(0.0, color="tab:orange", lw=0.8, ls="--")
            ax.set_ylabel("Q − prediction")
            ax.legend(loc="best", fontsize=8, frameon=False)
        elif panel == "residual":
            for q, style in (("residual", dict(color="tab:red", lw=1.2, label="unexplained |e|")),
                             ("breaking", dict(color="tab:purple", lw=1.0, alpha=0.7, label="breaking |b|"))):
                s, v = ls.get(q)
                pts = [(a, b) for a, b in zip(s, v) if b > 0 and math.isfinite(b)]
                if pts:
                    ax.plot(*zip(*pts), **style)
            ax.axhline(1.0, color="gray", lw=0.8, ls="--", label="|e| = 1")
            ax.set_yscale("log")
            ax.set_ylabel("units of D")
            ax.legend(loc="best", fontsize=8, frameon=False)
        else:
            s, v = ls.get("effective_lr")
            ax.plot(s, v, color="tab:green", lw=1.4)
            ax.set_ylabel("effective lr")
    axes[-1].set_xlabel("optimizer step")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _fmt(x: float, spec: str = ".4g") -> str:
    return "–" if not math.isfinite(x) else format(x, spec)


def summary_markdown(layers: Sequence[LayerSeries], pngs: Mapping[int, str] | None = None) -> str:
    """The summary table in markdown, one row per layer.

    Columns: the charge at the first and last log, its change, the largest |charge − predicted| in
    units of the band half-width D, the largest residual |e|, the last effective learning rate and
    angular update.

    Example:
        >>> ls = LayerSeries("", "scale", "fc", {"charge": ([5, 10], [2.0, 2.5]), "residual": ([5, 10], [0.1, 0.3])})
        >>> print(summary_markdown([ls]).splitlines()[2])
        | scale | fc | 2 | 2 | 2.5 | +0.5 | – | 0.3 | – | – |
    """
    multi = len({ls.run for ls in layers}) > 1
    head = (["run"] if multi else []) + ["kind", "layer", "logs", "charge first", "charge last", "Δ charge",
                                         "max \\|Q − pred\\| / D", "max \\|e\\|", "eff. lr (last)", "angle (last)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, ls in enumerate(layers):
        steps, q = ls.get("charge")
        _, pred = ls.get("predicted")
        _, hi = ls.get("band_upper")
        ratio = math.nan
        if pred and hi and len(pred) == len(q) == len(hi):
            r = [abs(a - p) / (h - p) for a, p, h in zip(q, pred, hi) if h - p > 0]
            ratio = max(r) if r else math.nan
        _, e = ls.get("residual")
        e_max = max((x for x in e if math.isfinite(x)), default=math.nan)
        layer = f"[{ls.layer}]({pngs[i]})" if pngs and i in pngs else ls.layer
        row = ([ls.run or "."] if multi else []) + [
            ls.kind, layer, str(len(steps)),
            _fmt(q[0] if q else math.nan), _fmt(q[-1] if q else math.nan),
            _fmt(q[-1] - q[0] if q else math.nan, "+.4g"), _fmt(ratio, ".3g"), _fmt(e_max, ".3g"),
            _fmt(ls.last("effective_lr")), _fmt(ls.last("angular_update"), ".3g"),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_report(logdir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Report:
    """Write one PNG per layer and ``summary.md`` into ``out`` (default ``LOGDIR/nld_report``).

    Raises:
        FileNotFoundError: if ``logdir`` is not a directory.
        ValueError: if no event file under ``logdir`` holds NLD scalars.
    """
    layers = load_runs(logdir)
    if not layers:
        n = len(_run_dirs(Path(logdir)))
        found = "no event file was found" if n == 0 else f"none of the {n} run folder(s) has any"
        raise ValueError(
            f"Expected TensorBoard event files with NLD scalars (tags nld/{{kind}}/{{layer}}/{{quantity}}) under "
            f"{str(logdir)!r}, but {found}. "
            "Point it at the save_dir of a run trained with NoetherMonitor, or at the log_dir of a "
            "SummaryWriter given to NoetherTracker."
        )
    dest = Path(out) if out is not None else Path(logdir) / "nld_report"
    dest.mkdir(parents=True, exist_ok=True)
    multi = len({ls.run for ls in layers}) > 1
    pngs: list[Path] = []
    names: dict[int, str] = {}
    for i, ls in enumerate(layers):
        name = (f"{_slug(ls.run)}/" if multi and ls.run else "") + f"{ls.kind}_{_slug(ls.layer)}.png"
        pngs.append(plot_layer(ls, dest / name))
        names[i] = name
    table = dest / "summary.md"
    table.write_text(f"# NLD report: {Path(logdir).as_posix()}\n\n" + summary_markdown(layers, names) + "\n\n"
                     "D is the residual scale of physics.md §3.2 (the band half-width); |e| ≲ 1 means every "
                     "step was explained up to rounding.\n", encoding="utf-8")
    return Report(layers, pngs, table)


def main(logdir: str, out: str | None = None) -> int:
    """``nld report LOGDIR [--out DIR]``: print what was written; 1 with a message on bad input."""
    try:
        rep = write_report(logdir, out)
    except (FileNotFoundError, ValueError) as err:
        print(f"nld report: {err}", file=sys.stderr)
        return 1
    print(summary_markdown(rep.layers))
    print(f"\nWrote {len(rep.pngs)} PNG(s) and {rep.table}")
    return 0
