"""Rendering of a review (:mod:`pipelines.review.review`): PR-comment markdown and HTML page.

The markdown leads with what changed and stays short enough for a pull-request
comment (GitHub-flavoured: tables, ``<details>``, a ``diff`` block per notebook).
The HTML page is self-contained: inline CSS, plots as base64 SVG images, no
scripts and no external resources, so it opens from a CI artifact or offline.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.core.io import atomic_path
from pipelines.core.settings import load_settings
from pipelines.review.review import (
    WORKSPACE,
    GateSection,
    MetricChange,
    Review,
    build_review,
    is_number,
    md5_of,
)

# --------------------------------------------------------------------------- formatting

MAX_COMMENT_CHARS = 65_000  # GitHub rejects comments over 65,536 characters
_BACKTICKS = re.compile(r"`{3,}")


def fmt_value(value: Any) -> str:
    """A metric or param value for a table cell."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not is_number(value):
        return value if isinstance(value, str) else json.dumps(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4f}"


def fmt_param(value: Any) -> str:
    """A parameter value as written in params.yaml (``0.1``, not ``0.1000``)."""
    if value is None:
        return "—"
    return value if isinstance(value, str) else json.dumps(value)


def fmt_delta(m: MetricChange) -> str:
    """``+0.0123 (+1.8%)``; empty when unchanged."""
    if not m.changed or m.diff is None:
        return ""
    text = f"{m.diff:+,}" if isinstance(m.diff, int) else f"{m.diff:+.4f}"
    if is_number(m.old) and m.old:
        text += f" ({m.diff / abs(m.old) * 100:+.1f}%)"
    return text


def _short(entry: dict[str, Any] | None) -> str:
    md5 = md5_of(entry)
    if not md5:
        return "—"
    return md5[:8] + (" (dir)" if md5.endswith(".dir") else "")


def _size(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("size") is None:
        return "—"
    size = float(entry["size"])
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            text = f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
            break
        size /= 1000
    return text + (f", {_n(int(entry['nfiles']), 'file')}" if entry.get("nfiles") else "")


def _headline(r: Review) -> list[str]:
    metrics = r.changed_metrics
    rank = {name: i for i, name in enumerate(r.settings.metric_direction)}
    top = sorted(
        (m for m in metrics if "." not in m.name and m.verdict in ("better", "worse")),
        key=lambda m: rank.get(m.name, len(rank)),
    )
    noise = len(r.noise_metrics)
    bits = [
        f"{_n(len(r.params), 'param')} changed",
        f"{len(metrics)} of {_n(len(r.metrics), 'metric')} changed past tolerance"
        + (f" ({noise} within)" if noise else ""),
    ]
    if top:
        bits[-1] += (
            " ("
            + ", ".join(f"{m.name} {fmt_delta(m).split(' ')[0]} {m.verdict}" for m in top[:3])
            + ")"
        )
    bits.append(f"{_n(len(r.changed_hashes), 'DVC output')} with new hashes")
    bits.append(f"{_n(len(r.notebooks), 'source notebook')} changed")
    if r.gates is not None and r.gates.verdict:
        bits.append(f"gates: {r.gates.verdict}")
    return bits


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _fence(lines: list[str]) -> str:
    """A code fence longer than any backtick run in ``lines`` (a notebook may hold fences)."""
    runs = [len(m) for line in lines for m in _BACKTICKS.findall(line)]
    return "`" * max(3, max(runs, default=0) + 1)


def _rev_line(r: Review) -> str:
    head = f"`{r.head}`" + (f" at `{r.head_commit[:8]}`" if r.head_commit else "")
    dirty = " plus uncommitted changes" if r.dirty else ""
    return f"Working tree of {head}{dirty}, compared with `{r.base}` at `{r.base_commit[:8]}`."


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(cell(c) for c in row) + " |" for row in rows),
    ]


_MARK = {
    "better": "🟢 better",
    "worse": "🔴 worse",
    "changed": "changed",
    "within tolerance": "≈ within tolerance",
    "new": "new",
    "removed": "removed",
    "": "",
}


def _metric_rows(metrics: list[MetricChange]) -> list[list[str]]:
    return [
        [f"`{m.name}`", fmt_value(m.old), fmt_value(m.new), fmt_delta(m), _MARK[m.verdict]]
        for m in metrics
    ]


def render_markdown(
    r: Review, details_url: str | None = None, html_rel: str = "reports/review/review.html"
) -> str:
    """The pull-request comment: changed things first, everything else in the HTML page.

    Notebook diffs are cut to ``review.max_diff_lines`` each, and dropped altogether
    if the comment would still exceed what GitHub accepts.
    """
    text = _markdown(r, details_url, html_rel, r.settings.max_diff_lines)
    if len(text) > MAX_COMMENT_CHARS:
        text = _markdown(r, details_url, html_rel, 0)
    return text


def _markdown(r: Review, details_url: str | None, html_rel: str, max_diff_lines: int) -> str:
    lines = [f"## Review of `{r.head}` against `{r.base}`", "", _rev_line(r), ""]
    if r.stale:
        lines += [
            "> [!WARNING]",
            "> Pipeline outputs do not match the working tree, so the numbers below are "
            "stale. Run `dvc repro` and review again. Out of date: "
            + "; ".join(f"`{k}`: {v}" for k, v in r.stale.items()),
            "",
        ]
    for warning in r.warnings:
        lines += [f"> [!NOTE]\n> {warning}", ""]
    lines += ["**Summary:** " + " · ".join(_headline(r)), ""]

    lines += ["### Params", ""]
    if r.params:
        lines += _md_table(
            ["Param", r.base, WORKSPACE],
            [[f"`{p.name}`", fmt_param(p.old), fmt_param(p.new)] for p in r.params],
        )
    else:
        lines.append("No parameter changed.")
    lines.append("")

    lines += ["### Metrics", ""]
    if r.metrics:
        for file in sorted({m.file for m in r.metrics}):
            mine = [m for m in r.metrics if m.file == file]
            top = [m for m in mine if "." not in m.name]
            nested = [m for m in mine if "." in m.name]
            header = ["Metric", r.base, WORKSPACE, "Δ", ""]
            lines += [f"`{file}`", "", *_md_table(header, _metric_rows(top)), ""]
            moved = [m for m in nested if m.significant]
            if nested:
                lines += [
                    f"<details><summary>{len(moved)} of {len(nested)} nested metrics "
                    f"changed past tolerance (per surface, baseline, …)</summary>",
                    "",
                ]
                lines += (
                    _md_table(header, _metric_rows(moved)) if moved else ["None past tolerance."]
                )
                lines += ["", "</details>", ""]
    else:
        lines += ["No metrics found at either revision.", ""]

    if r.gates is not None:
        lines += _md_gates(r.gates)

    lines += ["### Data and model hashes", ""]
    changed = r.changed_hashes
    if changed:
        lines += _md_table(
            ["Stage", "Output", r.base, WORKSPACE, "Size"],
            [
                [
                    f"`{h.source}`",
                    f"`{h.path}`" + (f" ({h.label})" if h.label else ""),
                    f"`{_short(h.old)}`",
                    f"`{_short(h.new)}`" + ("" if h.status == "changed" else f" ({h.status})"),
                    f"{_size(h.old)} → {_size(h.new)}",
                ]
                for h in changed
            ],
        )
    else:
        lines.append("No DVC-tracked output changed.")
    same = [h for h in r.hashes if h.status == "unchanged"]
    if same:
        lines += ["", "Unchanged: " + ", ".join(f"`{h.path}`" for h in same)]
    lines.append("")

    lines += ["### Source notebooks (nbdime)", ""]
    if not r.notebooks:
        lines += ["No source notebook changed.", ""]
    for nb in r.notebooks:
        lines += [f"`{nb.path}` ({nb.status})", ""]
        body = nb.text.splitlines()
        keep = body[:max_diff_lines]
        if keep:
            fence = _fence(keep)
            lines += [f"{fence}diff", *keep, fence]
        if len(body) > len(keep):
            lines.append(f"… {len(body) - len(keep)} more lines in the HTML report.")
        lines.append("")

    lines += ["### Executed notebooks", ""]
    if r.executed:
        lines += ["| Stage | HTML | |", "|---|---|---|"]
        lines += [
            f"| `{e.stage}` | `{e.path}` | {'re-run in this change' if e.changed else ''}"
            f"{'' if e.exists else ' (missing here)'} |"
            for e in r.executed
        ]
    else:
        lines.append("No executed notebooks recorded in `dvc.lock`.")
    lines.append("")

    drawn = [p.title for p in r.plots if p.svg]
    lines += [
        "### Plots",
        "",
        (
            f"{_n(len(drawn), 'plot')} compared ({', '.join(dict.fromkeys(drawn))}); "
            f"they are drawn in the HTML report."
        )
        if drawn
        else "No plots to compare.",
        "",
    ]
    where = f"[the full report]({details_url}) (`{html_rel}`)" if details_url else f"`{html_rel}`"
    lines += [
        "---",
        f"<sub>`mlops review --base {r.base}` · {r.created_at} · plots, every metric, "
        f"every hash and the full notebook diffs: {where}</sub>",
        "",
    ]
    return "\n".join(lines)


def _md_gates(g: GateSection) -> list[str]:
    lines = [f"### Quality gates (`{g.path}`)", ""]
    if g.verdict:
        lines += [f"Overall: **{g.verdict}**", ""]
    if g.report is not None:
        lines += _md_table(
            ["Gate", "Verdict", "Detail"],
            [[r.gate, _gate_mark(_pass(r.passed)), r.detail] for r in g.report.results],
        )
    else:
        lines.append(f"The gate report is {g.problem}")
    return [*lines, ""]


def _pass(passed: bool) -> str:
    return "pass" if passed else "fail"


def _gate_mark(verdict: str) -> str:
    return {"pass": "✅ pass", "fail": "❌ fail"}.get(verdict, verdict)


# --------------------------------------------------------------------------- html

_CSS = """
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --bg:#f6f8fa; --good:#1a7f37;
        --bad:#cf222e; --accent:#0969da; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.5 -apple-system, "Segoe UI", "Noto Sans", "DejaVu Sans",
       Helvetica, Arial, sans-serif; color: var(--fg); background: #fff; }
header { background: #24292f; color: #fff; padding: 18px 32px; }
header h1 { margin: 0 0 4px; font-size: 20px; font-weight: 600; }
header p { margin: 0; color: #d1d9e0; }
header code { background: rgba(255,255,255,.12); color: #fff; }
main { max-width: 1180px; margin: 0 auto; padding: 8px 32px 40px; }
section { margin-top: 24px; }
h2 { font-size: 17px; border-bottom: 1px solid var(--line); padding-bottom: 6px; margin: 0 0 10px; }
h3 { font-size: 14px; margin: 16px 0 6px; }
code { font: 12.5px ui-monospace, SFMono-Regular, "DejaVu Sans Mono", Menlo, monospace;
       background: var(--bg); padding: 1px 4px; border-radius: 4px; }
table { border-collapse: collapse; width: 100%; margin: 4px 0 8px; }
th, td { border: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: var(--bg); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.same td { color: var(--muted); }
.better { color: var(--good); font-weight: 600; }
.worse { color: var(--bad); font-weight: 600; }
.pass { color: var(--good); font-weight: 600; } .fail { color: var(--bad); font-weight: 600; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin-top: 18px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 16px; min-width: 150px;
        background: var(--bg); }
.card b { display: block; font-size: 22px; }
.card > span { color: var(--muted); font-size: 12px; }
.alert { border-left: 4px solid #bf8700; background: #fff8c5; padding: 10px 14px; margin-top: 18px;
         border-radius: 4px; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 12px; }
.plots figure { margin: 0; border: 1px solid var(--line); border-radius: 8px; padding: 8px;
                background: #fff; }
.plots img { width: 100%; height: auto; display: block; }
.plots figcaption { color: var(--muted); font-size: 12px; }
pre.diff { background: var(--bg); border: 1px solid var(--line); border-radius: 6px;
           padding: 10px 12px; overflow-x: auto; font: 12.5px/1.45 ui-monospace,
           "DejaVu Sans Mono", monospace; white-space: pre; }
.ansi-green-fg, .ansi-green-intense-fg { color: var(--good); }
.ansi-red-fg, .ansi-red-intense-fg { color: var(--bad); }
.ansi-blue-fg, .ansi-blue-intense-fg { color: var(--accent); }
.ansi-cyan-fg, .ansi-cyan-intense-fg { color: #1b7c83; }
.ansi-yellow-fg, .ansi-yellow-intense-fg { color: #9a6700; }
.ansi-bold { font-weight: 700; }
details > summary { cursor: pointer; color: var(--accent); margin: 4px 0; }
footer { color: var(--muted); font-size: 12px; margin-top: 32px; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text))


@dataclass(frozen=True)
class _Num:
    """A right-aligned numeric table cell (escaped on output)."""

    text: str


def _html_table(header: list[str], rows: Sequence[tuple[str, Sequence[str | _Num]]]) -> str:
    """``rows`` are ``(css class of the row, cells)``; str cells are HTML, _Num cells text."""

    def td(cell: str | _Num) -> str:
        if isinstance(cell, _Num):
            return f'<td class="num">{_e(cell.text)}</td>'
        return f"<td>{cell}</td>"

    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join(
        f'<tr class="{cls}">' + "".join(td(c) for c in cells) + "</tr>" for cls, cells in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_metric_table(r: Review, metrics: list[MetricChange]) -> str:
    rows: list[tuple[str, list[str | _Num]]] = [
        (
            "" if m.significant else "same",
            [
                f"<code>{_e(m.name)}</code>",
                _Num(fmt_value(m.old)),
                _Num(fmt_value(m.new)),
                _Num(fmt_delta(m)),
                f'<span class="{m.verdict}">{_e(m.verdict)}</span>',
            ],
        )
        for m in metrics
    ]
    return _html_table(["Metric", _e(r.base), WORKSPACE, "Δ", ""], rows)


def render_html(r: Review, link_from: Path, root: Path) -> str:
    """The self-contained review page (no scripts, no external resources)."""
    parts = [
        f"<header><h1>Review of <code>{_e(r.head)}</code> against "
        f"<code>{_e(r.base)}</code></h1><p>{_md_code_to_html(_rev_line(r))} "
        f"Generated {_e(r.created_at)} by <code>mlops review --base {_e(r.base)}</code>."
        "</p></header><main>"
    ]
    if r.stale:
        items = "".join(f"<li><code>{_e(k)}</code>: {_e(v)}</li>" for k, v in r.stale.items())
        parts.append(
            '<div class="alert"><b>Pipeline outputs do not match the working tree</b>; '
            "the metrics, plots and hashes below are stale. Run <code>dvc repro</code> "
            f"and review again.<ul>{items}</ul></div>"
        )
    for warning in r.warnings:
        parts.append(f'<div class="alert">{_e(warning)}</div>')
    worse = sum(1 for m in r.changed_metrics if m.verdict == "worse")
    better = sum(1 for m in r.changed_metrics if m.verdict == "better")
    cards = [
        (len(r.params), "params changed"),
        (f"{len(r.changed_metrics)}/{len(r.metrics)}", "metrics changed past tolerance"),
        (
            f'<span class="better">{better}</span> / <span class="worse">{worse}</span>',
            "better / worse",
        ),
        (len(r.changed_hashes), "DVC outputs with new hashes"),
        (len(r.notebooks), "source notebooks changed"),
    ]
    if r.gates is not None and r.gates.verdict:
        cards.append(
            (f'<span class="{_e(r.gates.verdict)}">{_e(r.gates.verdict)}</span>', "quality gates")
        )
    parts.append(
        '<div class="cards">'
        + "".join(f"<div class=card><b>{v}</b><span>{_e(label)}</span></div>" for v, label in cards)
        + "</div>"
    )

    parts.append("<section><h2>Params</h2>")
    parts.append(
        _html_table(
            ["Param", _e(r.base), WORKSPACE],
            [
                ("", [f"<code>{_e(p.name)}</code>", _Num(fmt_param(p.old)), _Num(fmt_param(p.new))])
                for p in r.params
            ],
        )
        if r.params
        else "<p>No parameter changed.</p>"
    )
    parts.append("</section>")

    parts.append("<section><h2>Metrics</h2>")
    for file in sorted({m.file for m in r.metrics}):
        mine = [m for m in r.metrics if m.file == file]
        top = [m for m in mine if "." not in m.name]
        nested = [m for m in mine if "." in m.name]
        parts.append(f"<h3><code>{_e(file)}</code></h3>" + _html_metric_table(r, top))
        if nested:
            moved = sum(m.significant for m in nested)
            parts.append(
                f"<details><summary>{moved} of {len(nested)} nested metrics changed past "
                "tolerance (per "
                f"surface, baseline, …)</summary>{_html_metric_table(r, nested)}</details>"
            )
    if not r.metrics:
        parts.append("<p>No metrics found at either revision.</p>")
    parts.append("</section>")

    if r.gates is not None:
        g = r.gates
        parts.append(f"<section><h2>Quality gates <code>{_e(g.path)}</code></h2>")
        if g.verdict:
            parts.append(f'<p>Overall: <span class="{_e(g.verdict)}">{_e(g.verdict)}</span></p>')
        if g.report is not None:
            parts.append(
                _html_table(
                    ["Gate", "Verdict", "Detail"],
                    [
                        (
                            "",
                            [
                                _e(x.gate),
                                f'<span class="{_pass(x.passed)}">{_pass(x.passed)}</span>',
                                _e(x.detail),
                            ],
                        )
                        for x in g.report.results
                    ],
                )
            )
        else:
            parts.append(f'<pre class="diff">{_e(g.problem or "")}</pre>')
        parts.append("</section>")

    parts.append("<section><h2>Plots <small>(<code>dvc plots diff</code>)</small></h2>")
    if r.plots:
        parts.append('<div class="plots">')
        for p in r.plots:
            if p.svg:
                uri = "data:image/svg+xml;base64," + base64.b64encode(p.svg.encode()).decode()
                body = f'<img alt="{_e(p.title)}" src="{uri}">'
            else:
                body = f"<p>{_e(p.note)}</p>"
            caption = "" if p.name == p.title else f"<figcaption>{_e(p.name)}</figcaption>"
            parts.append(f"<figure>{body}{caption}</figure>")
        parts.append("</div>")
    else:
        parts.append("<p>No plots to compare.</p>")
    parts.append("</section>")

    parts.append(
        "<section><h2>Data and model hashes <small>(<code>dvc.lock</code>, "
        "<code>.dvc</code> files)</small></h2>"
    )
    parts.append(
        _html_table(
            ["Stage", "Output", f"{_e(r.base)} md5", "workspace md5", "Size", ""],
            [
                (
                    "" if h.status != "unchanged" else "same",
                    [
                        f"<code>{_e(h.source)}</code>",
                        f"<code>{_e(h.path)}</code>"
                        + (f" <small>{_e(h.label)}</small>" if h.label else ""),
                        f"<code>{_e(_short(h.old))}</code>",
                        f"<code>{_e(_short(h.new))}</code>",
                        _Num(f"{_size(h.old)} → {_size(h.new)}"),
                        _e(h.status),
                    ],
                )
                for h in r.hashes
            ],
        )
        if r.hashes
        else "<p>No DVC-tracked outputs.</p>"
    )
    parts.append("</section>")

    parts.append("<section><h2>Source notebooks <small>(nbdime)</small></h2>")
    if not r.notebooks:
        parts.append("<p>No source notebook changed.</p>")
    for nb in r.notebooks:
        parts.append(
            f"<h3><code>{_e(nb.path)}</code> ({_e(nb.status)})</h3>"
            f'<pre class="diff">{nb.html}</pre>'
        )
    parts.append("</section>")

    parts.append("<section><h2>Executed notebooks</h2>")
    if r.executed:
        rows = []
        for e in r.executed:
            href = os.path.relpath(root / e.path, link_from)
            link = (
                f'<a href="{_e(href)}">{_e(e.path)}</a>' if e.exists else f"{_e(e.path)} (missing)"
            )
            rows.append(
                (
                    "" if e.changed else "same",
                    [
                        f"<code>{_e(e.stage)}</code>",
                        link,
                        "re-run in this change" if e.changed else "unchanged",
                    ],
                )
            )
        parts.append(_html_table(["Stage", "HTML", ""], rows))
    else:
        parts.append("<p>No executed notebooks recorded in <code>dvc.lock</code>.</p>")
    parts.append("</section>")
    parts.append(
        f"<footer>Generated by <code>mlops review --base {_e(r.base)}</code> at "
        f"{_e(r.created_at)}.</footer></main>"
    )
    title = f"Review: {r.head} vs {r.base}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(parts)
        + "</body></html>\n"
    )


def _md_code_to_html(text: str) -> str:
    """Turn the `code` spans of a one-line markdown string into <code> elements."""
    pieces = _e(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(pieces))


def write_review(
    root: Path, base: str = "main", out_dir: Path | None = None, details_url: str | None = None
) -> tuple[Path, Path, Review]:
    """Build the review and write ``review.md`` and ``review.html``; returns both paths."""
    project = load_settings(root)
    settings = project.review
    review = build_review(root, base, settings, project.base.reports_dir)
    out = out_dir or root / settings.out_dir
    out = out if out.is_absolute() else root / out
    out.mkdir(parents=True, exist_ok=True)
    md_path, html_path = out / "review.md", out / "review.html"
    with atomic_path(md_path) as tmp:
        tmp.write_text(
            render_markdown(review, details_url, _rel(html_path, root)), encoding="utf-8"
        )
    with atomic_path(html_path) as tmp:
        tmp.write_text(render_html(review, link_from=out, root=root), encoding="utf-8")
    return md_path, html_path, review


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)
