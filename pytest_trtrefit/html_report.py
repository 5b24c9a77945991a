"""``--trt-refit-html=PATH``: a self-contained HTML page with a picture of per-layer refit error.

The page embeds one PNG (matplotlib, an optional dependency: ``pip install pytest-trtrefit[plot]``):

- top: per engine weight, in engine order and grouped per model, the largest discrepancy between
  the cached and the fallback mapping (max abs diff, log scale; bit-identical weights are drawn at
  the floor in grey, so a single disagreeing layer stands out);
- bottom: the output error (engine vs eager, max abs) of every check, per model, failures in red.

Below it: the per-model summary table and one table per model listing every engine weight with its
discrepancy, so the page can be searched for a weight name.
"""
from __future__ import annotations

import base64
import html
import io
import math
import os

from .records import RunRecords

__all__ = ["PLOT_HINT", "PlotUnavailableError", "require_matplotlib", "render_png", "render_html", "write"]

PLOT_HINT = "install pytest-trtrefit[plot]"
_FLOOR = 1e-12   # where zeros (bit-identical weights) are drawn on the log scale


class PlotUnavailableError(ImportError):
    """matplotlib is not installed; the message says how to get it."""


def require_matplotlib():
    """matplotlib with its non-interactive backend, or :class:`PlotUnavailableError`."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise PlotUnavailableError(f"--trt-refit-html needs matplotlib: {PLOT_HINT} ({err})") from None
    return plt


def _layers_by_model(data: RunRecords) -> dict[str, list[tuple[str, float, str]]]:
    """Per model, per engine weight (engine order of first appearance): the worst discrepancy and status."""
    out: dict[str, dict] = {}
    for entry in data.layers:
        m = out.setdefault(entry.model, {})
        for name, diff, status in entry.weights:
            old_diff, old_status = m.get(name, (0.0, "ok"))
            d = float(diff) if diff is not None else 0.0
            m[name] = (max(old_diff, d), status if status != "ok" else old_status)   # a failure sticks
    return {model: [(n, d, s) for n, (d, s) in weights.items()] for model, weights in sorted(out.items())}


def _log_axis_with_zero(ax) -> None:
    """A log axis whose bottom tick (where exact zeros are drawn) reads "0"."""
    ax.set_yscale("log")
    ax.set_ylim(_FLOOR / 3, max(ax.get_ylim()[1], 1.0) * 3)
    ticks = [t for t in ax.get_yticks() if _FLOOR < t <= ax.get_ylim()[1]]
    ax.set_yticks([_FLOOR] + ticks)
    ax.set_yticklabels(["0"] + [f"1e{round(math.log10(t))}" for t in ticks], fontsize=7)


def render_png(data: RunRecords) -> bytes:
    """The two-panel plot as PNG bytes."""
    plt = require_matplotlib()
    layers = _layers_by_model(data)
    records = [r for r in data.checks if not r.expected_failure]
    models = sorted({r.model for r in records} | set(layers))
    n_weights = sum(len(v) for v in layers.values())
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(min(16, max(7, 0.28 * n_weights + 3)), 7.5),
                                      gridspec_kw={"height_ratios": [3, 2]})
    colors = plt.get_cmap("tab10")
    x = 0
    ticks, labels = [], []
    for i, model in enumerate(models):
        weights = layers.get(model, [])
        if not weights:
            continue
        xs = list(range(x, x + len(weights)))
        vals = [d if d > 0 and math.isfinite(d) else (_FLOOR if d == 0 else 1e6) for _, d, _ in weights]
        bar_colors = ["#bbbbbb" if d == 0 else ("#d62728" if s != "ok" else colors(i % 10))
                      for _, d, s in weights]
        top.bar(xs, vals, color=bar_colors, width=0.8)
        top.text((xs[0] + xs[-1]) / 2, 10.0, model, ha="center", va="bottom", fontsize=8, fontweight="bold")
        ticks += xs
        labels += [n if len(n) <= 28 else n[:25] + "..." for n, _, _ in weights]
        x += len(weights) + 1
    _log_axis_with_zero(top)
    top.set_ylabel("cached vs fallback\nmax abs diff")
    top.set_title("per engine weight, engine order, grouped per model (grey: bit-identical, red: the paths disagree)",
                  fontsize=9, pad=18)
    if ticks:
        top.set_xticks(ticks)
        top.set_xticklabels(labels, rotation=75, ha="right", fontsize=6)
    else:
        top.text(0.5, 0.5, "no per-layer data (run both paths: --trt-refit-paths=both)", ha="center",
                 transform=top.transAxes)
    x = 0
    for i, model in enumerate(models):
        mine = [r for r in records if r.model == model]
        if not mine:
            continue
        ys = [r.max_abs if isinstance(r.max_abs, (int, float)) else None for r in mine]
        pts = [(x + k, max(y, _FLOOR)) for k, y in enumerate(ys) if y is not None and math.isfinite(y)]
        bad = [(x + k, max(ys[k], _FLOOR)) for k, r in enumerate(mine)
               if not r.ok and ys[k] is not None and math.isfinite(ys[k])]
        if pts:
            bottom.plot([p[0] for p in pts], [p[1] for p in pts], "o", ms=3, color=colors(i % 10), label=model)
        if bad:
            bottom.plot([p[0] for p in bad], [p[1] for p in bad], "x", ms=7, color="#d62728")
        x += len(mine)
        bottom.axvline(x - 0.5, color="#dddddd", lw=0.8)
    _log_axis_with_zero(bottom)
    bottom.set_xlabel("check (grouped per model, in run order; red x: failed)")
    bottom.set_ylabel("output max abs err\n(engine vs eager)")
    if records:
        bottom.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def render_html(data: RunRecords, rows: list[dict], summary_lines: list[str], png: bytes) -> str:
    """The page: summary lines, the embedded plot, the per-model table, per-weight tables."""
    esc = html.escape
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>trt-refit report</title>",
             "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}td:first-child,th:first-child"
             "{text-align:left}.bad{color:#b00;font-weight:bold}pre{font-size:12px}</style></head><body>",
             "<h1>trt-refit report</h1>", "<pre>" + esc("\n".join(summary_lines)) + "</pre>",
             f"<img alt='per-layer refit error' src='data:image/png;base64,{base64.b64encode(png).decode()}'>",
             "<h2>Models</h2><table><tr><th>model</th><th>checks</th><th>failed checks</th><th>worst abs err</th>"
             "<th>worst rel err</th></tr>"]
    for r in rows:
        cls = " class='bad'" if r["failures"] else ""
        parts.append(f"<tr><td>{esc(r['model'])}</td><td>{r['checks']}</td><td{cls}>{r['failures']}</td>"
                     f"<td>{r['worst_max_abs']:.3g}</td><td>{r['worst_max_rel']:.3g}</td></tr>")
    parts.append("</table>")
    for model, weights in _layers_by_model(data).items():
        parts.append(f"<h2>{esc(model)}: cached vs fallback per engine weight</h2>"
                     "<table><tr><th>#</th><th>engine weight</th><th>max abs diff</th><th>status</th></tr>")
        for i, (name, d, s) in enumerate(weights):
            cls = " class='bad'" if s != "ok" else ""
            parts.append(f"<tr><td>{i + 1}</td><td>{esc(name)}</td><td>{d:.3g}</td><td{cls}>{esc(s)}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write(path: str, data: RunRecords, rows: list[dict], summary_lines: list[str]) -> str:
    """Render and write the page atomically; returns its absolute path."""
    from refitcore.engine.fileio import atomic_write

    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, render_html(data, rows, summary_lines, render_png(data)).encode("utf-8"))
    return path
