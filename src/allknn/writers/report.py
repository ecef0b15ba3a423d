"""A one-page look at a run: a self-contained HTML report of a result.

The page holds the run's parameters and machine, the distribution of the
1st and the k-th neighbour's similarity, the in-degree histogram with the
top hubs, the duplicate groups, the measured recall of an approximate run,
and a few example rows with their neighbours, by id. Plots are inline SVG
drawn by matplotlib (the optional extra ``allknn[report]``); the page loads
nothing from anywhere.
"""

from __future__ import annotations

import html
import io
import os
import platform
from collections.abc import Sequence
from typing import Any

import numpy as np

from allknn._optional import optional
from allknn.topk.result import TopK
from allknn.writers.atomic import atomic_path
from allknn.writers.json_text import dumps

EXAMPLE_ROWS = 5
SHOWN_GROUPS = 10

_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { padding: 0.2em 0.8em; text-align: left; }
tr:nth-child(even) { background: #f4f4f4; } figure { margin: 0.5em 0; }
.plot svg { width: 100%; height: auto; }
"""

_LAYOUT_SCRIPT = """
window.addEventListener("load", function () {
  var sizes = Array.prototype.map.call(document.querySelectorAll(".plot svg"), function (svg) {
    var box = svg.getBoundingClientRect();
    return [Math.round(box.width), Math.round(box.height)];
  });
  document.getElementById("layout").textContent = JSON.stringify(sizes);
});
"""


def _svg(figure) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _plots(result: TopK) -> list[tuple[str, str]]:
    matplotlib = optional("matplotlib", "writing a report")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []
    first, last = result.similarities[:, 0], result.similarities[:, -1]
    figure, axes = plt.subplots(figsize=(7, 3))
    shown = np.r_[first, last]
    shown = shown[np.isfinite(shown)]
    bins = np.linspace(min(float(shown.min()), 0.99) if shown.size else 0.0, 1.0, 50)
    axes.hist(first[np.isfinite(first)], bins=bins, alpha=0.6, label="1st neighbour")
    axes.hist(last[np.isfinite(last)], bins=bins, alpha=0.6, label=f"{result.k}-th neighbour")
    axes.set_xlabel("cosine similarity")
    axes.set_ylabel("rows")
    axes.legend()
    plots.append(("Similarity of the 1st and the k-th neighbour", _svg(figure)))
    plt.close(figure)
    degree = result.in_degree()
    figure, axes = plt.subplots(figsize=(7, 3))
    axes.hist(degree, bins=min(60, max(1, int(degree.max()) + 1)), color="#555")
    axes.set_yscale("log")
    axes.set_xlabel("in-degree (times a row is someone's neighbour)")
    axes.set_ylabel("rows")
    plots.append(("In-degree", _svg(figure)))
    plt.close(figure)
    return plots


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _machine() -> list[tuple[str, str]]:
    from threadpoolctl import threadpool_info

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            named = (line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
            cpu = next(named, cpu)
    except OSError:
        pass
    blas = ", ".join(f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')}"
                     for i in threadpool_info() if i.get("user_api") == "blas")
    return [("CPU", cpu), ("BLAS", blas or "unknown"), ("Python", platform.python_version()),
            ("system", platform.platform())]


def write_report(result: TopK, path: str | os.PathLike[str], *, ids: Sequence[Any] | None = None,
                 title: str = "allknn run") -> None:
    """Write the one-page HTML report of ``result`` to ``path``, atomically.

    Parameters
    ----------
    result : TopK
    path : path-like
        The ``.html`` file.
    ids : sequence of length n_corpus, optional
        Item labels for the hubs, duplicate groups and examples (default:
        row numbers).
    title : str
    """
    labels = np.arange(result.n_corpus) if ids is None else np.asarray(ids)
    if labels.shape != (result.n_corpus,):
        raise ValueError(f"ids has {labels.shape[0] if labels.ndim else 0} entries but the result has "
                         f"{result.n_corpus} corpus rows; pass one label per row")
    self_join = bool(result.params.get("self_join", len(result) == result.n_corpus))
    sections = [f"<h1>{html.escape(title)}</h1>",
                f"<p>{len(result):,} rows, k = {result.k}, {result.n_corpus:,} corpus rows</p>",
                "<h2>Parameters</h2>", _table(sorted(result.params.items()), ("parameter", "value")),
                "<h2>Machine</h2>", _table(_machine(), ("", ""))]
    if result.recall is not None:
        low, high = result.recall.interval
        sections += ["<h2>Recall</h2>",
                     f"<p>recall@{result.k} {result.recall.estimate:.4f} (95% interval {low:.4f} to "
                     f"{high:.4f}, measured on {result.recall.sample_size} rows against exact answers)</p>"]
    for caption, svg in _plots(result):
        sections.append(f"<h2>{html.escape(caption)}</h2><figure class='plot'>{svg}</figure>")
    top = result.hubs(top=10)
    sections += [f"<h2>Hubs</h2><p>skewness of the in-degree: {top.skew:.2f}</p>",
                 _table([(labels[r], d) for r, d in zip(top.rows, top.in_degree, strict=True)],
                        ("item", "in-degree"))]
    if self_join:
        groups = result.duplicate_groups()
        shown = [(len(g), ", ".join(map(str, labels[g[:8]])) + (" ..." if len(g) > 8 else ""))
                 for g in groups[:SHOWN_GROUPS]]
        sections += [f"<h2>Duplicate groups</h2><p>{len(groups)} group(s) of identical items "
                     f"(similarity 1)</p>", _table(shown, ("size", "items"))]
    examples = []
    for row in range(min(EXAMPLE_ROWS, len(result))):
        listed = [f"{labels[j]} ({s:.3f})" for j, s in zip(result.indices[row], result.similarities[row],
                                                           strict=True) if j >= 0]
        examples.append((labels[row] if self_join else row, ", ".join(listed)))
    sections += ["<h2>Examples</h2>", _table(examples, ("item", "neighbours (similarity)"))]
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
            + "".join(sections)
            + f"<pre id='layout' hidden></pre><script type='application/json' id='params'>"
            f"{html.escape(dumps(result.params))}</script><script>{_LAYOUT_SCRIPT}</script></body></html>")
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
