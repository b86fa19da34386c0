"""The plots section of the review: ``dvc plots diff`` data drawn as inline SVG (matplotlib).

Details: docs/review.md.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PlotDiff:
    """One ``dvc plots diff`` plot rendered to SVG, or the reason it could not be."""

    name: str
    title: str
    svg: str | None
    note: str = ""


def plot_diffs(data: dict[str, Any]) -> list[PlotDiff]:
    """``dvc plots diff BASE --split --json`` (the data of both revisions), drawn as SVG.

    DVC's own HTML loads Vega from a CDN; drawing the same data with matplotlib
    keeps the review page self-contained and readable offline.
    """
    plots = data.get("data", data) if isinstance(data, dict) else {}
    return [
        _render_plot(name, render)
        for name, renders in plots.items()
        for render in (renders if isinstance(renders, list) else [renders])
    ]


def _find_field(node: Any, axis: str) -> str | None:
    """The first ``encoding.<axis>.field`` in a Vega-Lite spec, breadth first."""
    queue = [node]
    while queue:
        item = queue.pop(0)
        if isinstance(item, dict):
            enc = item.get("encoding")
            if isinstance(enc, dict) and isinstance(enc.get(axis), dict) and enc[axis].get("field"):
                return str(enc[axis]["field"])
            queue.extend(item.values())
        elif isinstance(item, list):
            queue.extend(item)
    return None


def _render_plot(name: str, render: dict[str, Any]) -> PlotDiff:
    anchors = render.get("anchor_definitions") or {}
    title = str(anchors.get("<DVC_METRIC_TITLE>") or name)
    if render.get("type") != "vega":
        return PlotDiff(
            name,
            title,
            None,
            f"{render.get('type')} plots are not drawn here; see `dvc plots diff`",
        )
    content = render.get("content") or {}
    x, y = _find_field(content, "x"), _find_field(content, "y")
    rows = anchors.get("<DVC_METRIC_DATA>") or []
    color = anchors.get("<DVC_METRIC_COLOR>") or {}
    group_field = color.get("field", "rev") if isinstance(color, dict) else "rev"
    scale = color.get("scale", {}) if isinstance(color, dict) else {}
    domain = [str(d) for d in scale.get("domain", [])]
    palette = [str(c) for c in scale.get("range", [])]
    series: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        try:
            xv, yv = float(row[x]), float(row[y])
        except (KeyError, TypeError, ValueError):
            continue
        xs, ys = series.setdefault(str(row.get(group_field, "")), ([], []))
        xs.append(xv)
        ys.append(yv)
    if not series:
        return PlotDiff(name, title, None, "no numeric x/y data to draw; see `dvc plots diff`")
    order = [g for g in domain if g in series] + [g for g in series if g not in domain]
    return PlotDiff(
        name,
        title,
        _svg(
            title,
            str(anchors.get("<DVC_METRIC_X_LABEL>") or x),
            str(anchors.get("<DVC_METRIC_Y_LABEL>") or y),
            [(g, series[g], _color(g, domain, palette)) for g in order],
        ),
    )


def _color(group: str, domain: list[str], palette: list[str]) -> str | None:
    if group in domain and domain.index(group) < len(palette):
        return palette[domain.index(group)]
    return None


def _svg(
    title: str,
    xlabel: str,
    ylabel: str,
    series: list[tuple[str, tuple[list[float], list[float]], str | None]],
) -> str:
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context({"svg.hashsalt": "mlops-review", "svg.fonttype": "path"}):
        fig = Figure(figsize=(4.6, 3.6), layout="constrained")
        ax = fig.subplots()
        # Draw the base first so the working tree's line is on top.
        for label, (xs, ys), color in reversed(series):
            ax.plot(xs, ys, label=label, color=color, linewidth=1.8)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(frameon=False, fontsize=9)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg") :]
