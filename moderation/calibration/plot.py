"""`calibrate --plot DIR`: one PNG per concept, score distributions with the thresholds marked.

Drawn with matplotlib's Agg canvas directly (no pyplot, no global backend switch), so it works
without a display and leaves a caller's matplotlib setup alone.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from moderation.calibration.calibrate import Calibration, ConceptCalibration

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
BINS = 40  # knob: histogram bins across the plotted range


def file_names(names: list[str]) -> list[str]:
    """A distinct, safe `NAME.png` per concept (other characters become `_`)."""
    seen: set[str] = set()
    out = []
    for name in names:
        base = _UNSAFE.sub("_", name).strip("._") or "concept"
        candidate, n = base, 1
        while candidate.lower() in seen:
            n += 1
            candidate = f"{base}-{n}"
        seen.add(candidate.lower())
        out.append(f"{candidate}.png")
    return out


def _text(value: str) -> str:
    """A label matplotlib shows as written (no mathtext from `$`)."""
    return value.replace("$", r"\$")


def _rates(confusion) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.0f}%"

    return f"precision {pct(confusion.precision)}, recall {pct(confusion.recall)}, FPR {pct(confusion.fpr)}"


def plot_concept(policy_name: str, c: ConceptCalibration, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    marks = [c.threshold] + ([c.suggested_threshold] if c.suggested_threshold is not None else [])
    values = c.values
    low = min([*values.tolist(), *marks]) - 0.02
    high = max([*values.tolist(), *marks]) + 0.02
    bins = np.linspace(low, high, BINS + 1)
    positives, negatives = values[c.positive], values[~c.positive]
    axes.hist(
        negatives, bins, color="tab:blue", alpha=0.55, label=f"does not show it ({len(negatives)})"
    )
    axes.hist(positives, bins, color="tab:red", alpha=0.55, label=f"shows it ({len(positives)})")
    axes.axvline(
        c.threshold,
        color="black",
        linewidth=2,
        label=f"current threshold {c.threshold:.4g}: {_rates(c.current)}",
    )
    if c.suggested is not None and c.suggested_threshold is not None:
        axes.axvline(
            c.suggested_threshold,
            color="tab:green",
            linewidth=2,
            linestyle="--",
            label=f"suggested {c.suggested_threshold:.4g}: {_rates(c.suggested)}",
        )
    kind = " (special care)" if c.special else ""
    axes.set_title(_text(f"{policy_name}: {c.name}{kind}"))
    axes.set_xlabel(
        "cosine" if c.special else "cosine + special-care adjustment (fires above the threshold)"
    )
    axes.set_ylabel("labelled images")
    axes.set_xlim(low, high)
    # Below the axes, so that it never hides a bar.
    figure.legend(loc="outside lower center", ncols=2, fontsize="small", frameon=False)
    note = "no labelled images" if values.size == 0 else None
    if c.refused:
        note = "no suggestion: " + c.refused
    if note:
        axes.text(
            0.98, 0.6, _text(textwrap.fill(note, 48)), transform=axes.transAxes,
            ha="right", va="top", fontsize="small",
            bbox={"facecolor": "white", "edgecolor": "0.7"},
        )  # fmt: skip
    from policy.atomic import atomic_file

    with atomic_file(path) as file:
        figure.savefig(file, format="png")


def write_plots(report: Calibration, folder: Path) -> list[Path]:
    """One PNG per concept in `folder` (created); returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for c, name in zip(report.concepts, file_names([c.name for c in report.concepts]), strict=True):
        path = folder / name
        plot_concept(report.policy.name, c, path)
        paths.append(path)
    return paths
