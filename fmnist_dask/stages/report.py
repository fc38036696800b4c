"""Report stage: ``report.html``, one page that tells the story of a run.

The page reads only the run directory (``manifest.json``, ``metrics.parquet`` and the PNGs),
so ``fmnist-dask report RUN_DIR`` regenerates it for any run, finished or failed, long after
the cluster is gone.

Images are embedded as base64 data URIs rather than linked: the page is then one file that
can be mailed, attached to a ticket or copied off the cluster and still shows every figure
(about 4 MB for the default job). Only the Dask performance report and ``run.log`` are linked
relatively, as they are documents of their own.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import math
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fmnist_dask import runfiles

#: Scores a ranking can use: (short name, what it measures). All are "higher is better".
SCORES: dict[str, tuple[str, str]] = {
    "nmi": ("NMI", "normalised mutual information between clusters and true classes, 0 to 1"),
    "ari": ("ARI", "adjusted Rand index against the true classes, about 0 by chance, 1 at best"),
    "acc": ("ACC", "share of rows whose cluster is matched to their class (Hungarian matching)"),
    "silhouette": ("silhouette", "label-free: cohesion against separation in the method's own "
                                 "feature space, -1 to 1"),
}
#: NMI by default: it needs no cluster-to-class matching, is bounded, and unlike silhouette it
#: is comparable across methods that cluster different feature spaces (pixels vs PCA).
DEFAULT_SORT = "nmi"
#: When the data has no labels, rank by the only score left.
FALLBACK_SORT = "silhouette"

METHOD_TEXT = {
    "kmeans_raw": "k-means (k-means|| start, then Lloyd iterations across the workers) on the "
                  "784 scaled pixels of every row.",
    "kmeans_pca": "The same k-means on every row's PCA projection; centres shown as images "
                  "through the inverse PCA transform.",
    "gmm": "Gaussian mixture fitted on a sample of the PCA projection on one worker; every row "
           "is then assigned its most likely component, block by block.",
    "spectral": "Spectral clustering of a k-nearest-neighbour graph of a sample of the PCA "
                "projection; the other rows take the clusters of their nearest sampled rows.",
    "manifold_gmm": "Patch-dictionary image features kept where two shifted copies of each "
                    "image agree, a UMAP manifold and a Gaussian mixture, fitted on the "
                    "sample's images several times with different seeds (in parallel on the "
                    "workers) and combined into the clusters the fits agree on; the other "
                    "rows take the clusters of their nearest sampled rows.",
}
STAGE_TEXT = {
    "load": "read the input files", "clean": "validate and drop exact duplicates",
    "eda": "summaries and figures of the data", "kmeans_raw": "k-means on pixels",
    "reduce": "PCA", "kmeans_pca": "k-means on the PCA projection",
    "sample": "draw the sample for the sample-based models", "gmm": "Gaussian mixture",
    "spectral": "spectral clustering", "manifold_gmm": "UMAP manifold + Gaussian mixture",
    "tsne": "t-SNE map of the sample",
    **{f"score_{m}": f"silhouette, scores and figures of {m}" for m in METHOD_TEXT},
    "evaluate": "metrics table, assignments, t-SNE figures", "report": "this page",
}

CSS = """
:root { --fg: #1b1b1b; --muted: #4d4d4d; --line: #b8b8b8; --accent: #0b4f8a; --alt: #eef2f6; }
* { box-sizing: border-box; }
body { font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--fg); background: #fff; margin: 0 auto; max-width: 74rem;
       padding: 1rem 1.5rem 3rem; }
h1 { font-size: 1.8rem; margin: .5rem 0 .2rem; }
h2 { font-size: 1.45rem; border-bottom: 2px solid var(--accent); padding-bottom: .15rem;
     margin-top: 2.5rem; }
h3 { font-size: 1.2rem; margin-top: 2rem; }
a { color: var(--accent); }
.lead { color: var(--muted); margin-top: 0; }
nav.toc { background: var(--alt); padding: .4rem 1rem; border-radius: 4px; }
nav.toc ol { columns: 2; margin: .3rem 0; }
table { border-collapse: collapse; margin: .6rem 0 1.2rem; font-variant-numeric: tabular-nums; }
caption { text-align: left; font-weight: 600; padding-bottom: .3rem; }
th, td { border: 1px solid var(--line); padding: .2rem .6rem; text-align: right;
         vertical-align: top; }
thead th { background: var(--alt); }
th[scope=row], td.text, th.text { text-align: left; }
tr.best th, tr.best td { font-weight: 700; }
.figs { display: flex; flex-wrap: wrap; gap: 1rem 1.5rem; align-items: flex-start; }
/* Figures keep their natural size (small print stays legible) and wrap rather than shrink. */
.figs figure { flex: 0 1 auto; min-width: 0; }
figure { margin: 1rem 0; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid #e3e3e3; }
figcaption { color: var(--muted); font-size: .9rem; margin-top: .25rem; }
.verdict { border-left: 6px solid var(--accent); background: var(--alt); padding: .6rem 1rem;
           font-size: 1.1rem; }
.note { color: var(--muted); font-size: .92rem; }
.missing { color: #8a1f11; font-style: italic; }
.bar { display: inline-block; height: .75em; background: var(--accent); vertical-align: middle;
       print-color-adjust: exact; -webkit-print-color-adjust: exact; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .1rem 1rem; }
dl.facts dt { font-weight: 600; }
dl.facts dd { margin: 0; }
code { font-size: .9em; overflow-wrap: anywhere; }
@media print {
  body { max-width: none; padding: 0; font-size: 10pt; }
  nav.toc { display: none; }
  h2 { break-before: page; }
  section:first-of-type h2 { break-before: auto; }
  h2, h3 { break-after: avoid; }
  figure, table, .verdict { break-inside: avoid; }
  a { color: inherit; }
  a.file::after { content: " (" attr(href) ")"; }
  @page { margin: 14mm; }
}
"""


class Raw(str):
    """Markup that table cells and paragraphs include without escaping."""


def _esc(value: Any) -> str:
    return value if isinstance(value, Raw) else html.escape(str(value))


def _num(value: Any, digits: int = 4) -> str:
    """A score with ``digits`` decimals, large values with thousands separators, blanks as –."""
    if value is None or isinstance(value, str):
        return "–" if value in (None, "") else value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(number):
        return "–"
    if float(number).is_integer() and abs(number) >= 1:
        return f"{int(number):,}"
    if abs(number) >= 1000:
        return f"{number:,.1f}"
    return f"{number:.{digits}f}"


def table(headers: Sequence[Any], rows: Iterable[Sequence[Any]], caption: str | None = None,
          row_headers: bool = True, text_columns: Sequence[int] = (0,), attrs: str = "",
          row_classes: Sequence[str] | None = None, header_attrs: Sequence[str] = ()) -> str:
    """An HTML table with ``<th scope>`` headers; the first cell of a row heads that row."""
    head = "".join(
        f'<th scope="col"{" class=text" if i in text_columns else ""}'
        f'{" " + header_attrs[i] if i < len(header_attrs) and header_attrs[i] else ""}>'
        f"{_esc(h)}</th>" for i, h in enumerate(headers))
    body = []
    for r, row in enumerate(rows):
        cells = []
        for i, cell in enumerate(row):
            cls = ' class="text"' if i in text_columns else ""
            if i == 0 and row_headers:
                cells.append(f'<th scope="row"{cls}>{_esc(cell)}</th>')
            else:
                cells.append(f"<td{cls}>{_esc(cell)}</td>")
        row_cls = f' class="{row_classes[r]}"' if row_classes and row_classes[r] else ""
        body.append(f"<tr{row_cls}>{''.join(cells)}</tr>")
    cap = f"<caption>{_esc(caption)}</caption>" if caption else ""
    return (f"<table{' ' + attrs if attrs else ''}>{cap}<thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def _png_size(data: bytes) -> tuple[int, int] | None:
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 24:
        return None
    return struct.unpack(">II", data[16:24])


def figure(run_dir: Path, relative: str, alt: str, caption: str | None = None) -> str:
    """``<figure>`` with the PNG embedded as a data URI, or a note when it was not produced."""
    path = run_dir / relative
    if not path.is_file():
        return (f'<p class="missing">Figure not produced in this run: '
                f"<code>{_esc(relative)}</code></p>")
    data = path.read_bytes()
    size = _png_size(data)
    dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
    encoded = base64.b64encode(data).decode("ascii")
    cap = f"<figcaption>{_esc(caption)} <code>{_esc(relative)}</code></figcaption>" if caption \
        else f"<figcaption><code>{_esc(relative)}</code></figcaption>"
    return (f'<figure><img src="data:image/png;base64,{encoded}" alt="{html.escape(alt)}"'
            f'{dims} data-file="{html.escape(relative)}">{cap}</figure>')


def read_run(run_dir: Path) -> tuple[dict[str, Any], pd.DataFrame]:
    """``manifest.json`` as a dict and ``metrics.parquet`` (empty frame when absent)."""
    run_dir = Path(run_dir)
    manifest_path = run_dir / runfiles.MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: not a run directory (no {runfiles.MANIFEST})")
    manifest = json.loads(manifest_path.read_text())
    metrics_path = run_dir / runfiles.METRICS
    metrics = pd.read_parquet(metrics_path) if metrics_path.is_file() else pd.DataFrame()
    return manifest, metrics


def ranking_score(metrics: pd.DataFrame, sort_by: str = DEFAULT_SORT) -> str:
    """The score to rank by: ``sort_by`` when the run has it, else silhouette (no labels)."""
    if sort_by not in SCORES:
        raise ValueError(f"unknown score {sort_by!r}; choose from {', '.join(SCORES)}")
    for score in (sort_by, FALLBACK_SORT):
        if score in metrics and metrics[score].notna().any():
            return score
    return sort_by


def rank_methods(metrics: pd.DataFrame, score: str) -> pd.DataFrame:
    """Methods sorted best first by ``score`` (missing values last; ties keep run order)."""
    if metrics.empty or score not in metrics:
        return metrics
    return metrics.sort_values(score, ascending=False, kind="stable", na_position="last")


def verdict(ranked: pd.DataFrame, score: str) -> str:
    """One or two sentences naming the method that worked best by ``score``."""
    name = SCORES[score][0]
    if ranked.empty or score not in ranked or ranked[score].isna().all():
        return "No clustering method was scored in this run, so there is no verdict."
    scored = ranked[ranked[score].notna()]
    best = scored.iloc[0]
    text = f"By {name}, {best['method']} worked best ({best[score]:.3f})"
    if len(scored) == 1:
        return text + ", the only method scored."
    second = scored.iloc[1]
    gap = best[score] - second[score]
    text += f", ahead of {second['method']} ({second[score]:.3f}) by {gap:.3f}"
    if len(scored) > 2:
        last = scored.iloc[-1]
        text += f"; {last['method']} came last ({last[score]:.3f})"
    text += "."
    if gap < 0.01:
        text += (" The lead is under 0.01: compare runs with other seeds "
                 "(fmnist-dask compare) before trusting the order.")
    return text


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}" aria-labelledby="{anchor}-h">' \
           f'<h2 id="{anchor}-h">{_esc(title)}</h2>{body}</section>'


def _facts(items: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in items if v not in (None, ""))
    return f'<dl class="facts">{rows}</dl>'


def _status_text(manifest: dict[str, Any]) -> str:
    status = manifest.get("status", "unknown")
    if status == "running":
        return "finishing (this page was written by the job's last stage)"
    if status == "failed":
        return f"failed: {manifest.get('error', '')}"
    return status


def _header(manifest: dict[str, Any], run_dir: Path) -> str:
    job = manifest.get("job", {})
    data = job.get("data", {})
    cluster = manifest.get("cluster", {})
    rows = manifest.get("rows", {}).get("total", {})
    stage_seconds = sum(s.get("seconds", 0) for s in manifest.get("stages", {}).values())
    workers = cluster.get("workers") or []
    cluster_text = (f"{cluster.get('kind', '?')} at {cluster.get('address', '?')}: "
                    f"{cluster.get('n_workers', len(workers))} workers, "
                    f"{cluster.get('total_threads', '?')} threads") if cluster else None
    limit = data.get("limit_rows")
    return _facts([
        ("Run", manifest.get("run_name", run_dir.name)),
        ("Status", _status_text(manifest)),
        ("Started (UTC)", manifest.get("started_utc")),
        ("Finished (UTC)", manifest.get("finished_utc")),
        ("Wall time", f"{manifest['seconds']:,.1f} s" if manifest.get("seconds") else
         f"{stage_seconds:,.1f} s in the stages so far" if stage_seconds else None),
        ("Job", f"{job.get('name', '?')}, seed {job.get('seed', '?')}"),
        ("Input", f"{data.get('format', '?')} files in {data.get('dir', '?')}"
                  + (f", first {limit:,} rows of each split" if limit else "")),
        ("Rows kept", _num(rows.get("kept")) if rows else None),
        ("Cluster", cluster_text),
        ("Command", " ".join(manifest.get("command", [])) or None),
    ])


def _data_section(manifest: dict[str, Any], run_dir: Path) -> str:
    rows = manifest.get("rows", {})
    parts = ["<p>Every input row is numbered, validated and compared byte for byte; exact "
             "duplicates are dropped (the lowest row id is kept). Rows read = rejected + "
             "duplicates + kept.</p>"]
    if rows:
        splits = [s for s in rows if s != "total"] + (["total"] if "total" in rows else [])
        parts.append(table(
            ["split", "read", "rejected", "duplicates", "kept"],
            [[s, *(_num(rows[s].get(k)) for k in ("read", "rejected", "duplicates", "kept"))]
             for s in splits],
            caption="Rows per split", row_classes=["best" if s == "total" else ""
                                                   for s in splits]))
    links = [f'<a class="file" href="{name}">{name}</a>'
             for name in (runfiles.DUPLICATES, runfiles.REJECTED) if (run_dir / name).exists()]
    if links:
        parts.append(f"<p class=note>Row-level detail: {', '.join(links)}.</p>")
    eda = manifest.get("eda")
    if eda:
        parts.append(f"<p>Scaled pixel values (0 to 1) over all kept rows: mean "
                     f"<strong>{eda['pixel_mean']:.4f}</strong>, standard deviation "
                     f"<strong>{eda['pixel_std']:.4f}</strong>.</p>")
        counts = eda.get("class_counts", {})
        classes = list(dict.fromkeys(c for split in counts.values() for c in split))
        grid = manifest.get("job", {}).get("eda", {}).get("sample_grid", 3)
        class_table = table(
            ["class", *counts, "all"],
            [[c, *(_num(counts[s].get(c, 0)) for s in counts),
              _num(sum(counts[s].get(c, 0) for s in counts))] for c in classes],
            caption="Images per class") if counts else ""
        parts.append('<div class="figs">' + figure(
            run_dir, runfiles.SAMPLE_IMAGES,
            f"{grid} by {grid} grid of randomly chosen cleaned images, each titled with its "
            "class name", "Random sample of the cleaned images.") + class_table + "</div>")
        parts.append(figure(
            run_dir, runfiles.CLASS_DISTRIBUTION,
            "Bar chart of images per class for each split, the second split hatched; the same "
            "counts are in the table 'Images per class'", "Images per class and split."))
        parts.append(figure(
            run_dir, runfiles.PIXEL_HISTOGRAM,
            f"Histogram of scaled pixel values on a log scale: most pixels are background "
            f"near 0; mean {eda['pixel_mean']:.4f}, standard deviation {eda['pixel_std']:.4f}",
            "Pixel value histogram, computed on the workers."))
    else:
        parts.append('<p class="missing">The exploration stage did not run.</p>')
    return _section("data", "1. Data", "".join(parts))


def _pca_section(manifest: dict[str, Any], run_dir: Path) -> str:
    pca = manifest.get("pca")
    if not pca:
        return _section("pca", "2. PCA", '<p class="missing">PCA did not run.</p>')
    ratio = pca["explained_variance_ratio"]
    cumulative = [sum(ratio[: i + 1]) for i in range(len(ratio))]
    parts = [
        f"<p>An exact PCA fitted across the workers keeps {pca['n_components']} components, "
        f"which explain <strong>{pca['cumulative_explained_variance']:.1%}</strong> of the "
        "pixel variance. The PCA projection is the feature space of every method but "
        "k-means on raw pixels.</p>",
        '<div class="figs">',
        figure(run_dir, runfiles.EXPLAINED_VARIANCE_PNG,
               "Bar chart of the variance explained by each principal component with the "
               f"cumulative curve, reaching {pca['cumulative_explained_variance']:.2f}; the "
               "values are in the table 'Explained variance'", "Explained variance."),
        figure(run_dir, runfiles.COMPONENTS_PNG,
               "The mean image and the first principal components drawn as 28 by 28 images, "
               "mid grey for zero", "Mean image and principal components."),
        "</div>",
        table(["component", "explained variance", "cumulative"],
              [[f"PC{i + 1}", f"{r:.2%}", f"{c:.2%}"]
               for i, (r, c) in enumerate(zip(ratio, cumulative, strict=True))],
              caption="Explained variance"),
    ]
    tsne = manifest.get("tsne")
    if tsne:
        parts += [
            "<h3>t-SNE map of the sample</h3>",
            f"<p>{_num(tsne.get('sample_size'))} rows of the PCA projection embedded in 2-D "
            f"(KL divergence {_num(tsne.get('kl_divergence'), 3)}, trustworthiness "
            f"{_num(tsne.get('trustworthiness'), 3)} with 5 neighbours). Each method below "
            "colours this same map by its own clusters; here it is coloured by the true "
            "class, for evaluation only.</p>",
            figure(run_dir, runfiles.TSNE_TRUE_CLASS,
                   "Scatter plot of the t-SNE map, each point a row, coloured and shaped by its "
                   "true class with the class names written at the centre of each group",
                   "t-SNE map coloured by the true class."),
        ]
    return _section("pca", "2. PCA and the t-SNE map", "".join(parts))


def _method_scores(row: pd.Series) -> list[list[Any]]:
    rows = []
    silhouette = row.get("silhouette")
    if silhouette is not None and not pd.isna(silhouette):
        how = row.get("silhouette_method")
        detail = [how] if isinstance(how, str) and how else []
        if how == "sampled":
            detail.append(f"{_num(row.get('silhouette_sample_size'))} rows, 95% CI "
                          f"{_num(row.get('silhouette_ci_low'))} to "
                          f"{_num(row.get('silhouette_ci_high'))}")
        detail.append(f"on {row.get('features')}")
        rows.append(["silhouette", f"{_num(silhouette)} ({', '.join(detail)})"])
    labels = {"acc": "ACC (Hungarian)", "nmi": "NMI", "ari": "ARI", "inertia": "inertia",
              "log_likelihood": "mean log-likelihood", "bic": "BIC", "n_iter": "iterations",
              "converged": "converged", "sample_size": "fitted on rows",
              "n_runs": "runs in the consensus",
              "stability": "stability (mean NMI between runs)",
              "fit_seconds": "fit and label time (s)", "score_seconds": "scoring time (s)"}
    for key, label in labels.items():
        value = row.get(key)
        if value is None or (not isinstance(value, str) and pd.isna(value)):
            continue
        digits = 1 if key.endswith("seconds") else 4
        rows.append([label, _num(value, digits)])
    return rows


def _methods_section(metrics: pd.DataFrame, run_dir: Path) -> str:
    if metrics.empty:
        return _section("methods", "3. Clustering methods",
                        '<p class="missing">No clustering method was scored.</p>')
    parts = ["<p>Each method is fitted without labels. The true classes are read only "
             "afterwards, to score the clusters (ACC, NMI, ARI) and to name each cluster by its "
             "largest class and that class's share.</p>"]
    for _, row in metrics.iterrows():
        method = str(row["method"])
        k = int(row["n_clusters"])
        parts.append(f'<h3 id="method-{_esc(method)}">{_esc(method)}</h3>')
        parts.append(f"<p>{_esc(METHOD_TEXT.get(method, 'Clustering method.'))} "
                     f"{k} clusters, features: {_esc(row.get('features'))}.</p>")
        parts.append(table(["score", "value"], _method_scores(row),
                           caption=f"Scores of {method}", text_columns=(0, 1)))
        if (run_dir / runfiles.centroids(method)).is_file():
            parts.append(figure(run_dir, runfiles.centroids(method),
                                f"The {k} cluster centres of {method} drawn as images",
                                "Cluster centres as images."))
        parts.append(figure(
            run_dir, runfiles.cluster_samples(method),
            f"One row per cluster of {method}, labelled with the cluster number and its matched "
            "class, showing random images assigned to it", "Random images of each cluster."))
        parts.append('<div class="figs">' + figure(
            run_dir, runfiles.contingency(method),
            f"Heat map of how many images of each true class (rows) fall in each of the {k} "
            f"clusters of {method} (columns); every cell is annotated with its count",
            "Contingency matrix: true class against cluster.") + figure(
            run_dir, runfiles.tsne_figure(method),
            f"The t-SNE map coloured and shaped by the {k} clusters of {method}, with the "
            "cluster numbers written at the centre of each group",
            f"t-SNE map coloured by the clusters of {method}.") + "</div>")
    return _section("methods", "3. Clustering methods", "".join(parts))


def comparison_table(metrics: pd.DataFrame, score: str) -> str:
    """Every method's headline scores, best first by ``score``, with ``<th scope>``."""
    ranked = rank_methods(metrics, score)
    columns = [c for c in ("silhouette", "acc", "nmi", "ari") if c in ranked]
    headers = ["rank", "method", "features", *[SCORES[c][0] for c in columns], "fit time (s)"]
    sort_attr = ['aria-sort="descending"' if c == score else "" for c in ["", "", "", *columns]]
    rows, classes = [], []
    for i, (_, row) in enumerate(ranked.iterrows()):
        rows.append([str(i + 1), row["method"], row.get("features", ""),
                     *[_num(row[c]) for c in columns], _num(row.get("fit_seconds"), 1)])
        classes.append("best" if i == 0 else "")
    headers[3 + columns.index(score)] += " ▼" if score in columns else ""
    return table(headers, rows, caption=f"All methods, best first by {SCORES[score][0]}",
                 row_headers=False, text_columns=(1, 2), attrs='id="comparison-table"',
                 row_classes=classes, header_attrs=sort_attr)


def _comparison_section(metrics: pd.DataFrame, run_dir: Path, score: str, said: str) -> str:
    if metrics.empty:
        return _section("comparison", "4. Comparison", f'<p class="verdict">{_esc(said)}</p>')
    parts = [
        f'<p class="verdict" id="verdict">{_esc(said)}</p>',
        comparison_table(metrics, score),
        "<p class=note>Scores, all higher-is-better: "
        + "; ".join(f"<strong>{_esc(n)}</strong> {_esc(d)}" for n, d in SCORES.values())
        + ". Silhouettes are measured in each method's own feature space, so they compare "
          "methods only within one space (pixels or PCA); hence the ranking uses "
          f"{_esc(SCORES[score][0])}.</p>",
        figure(run_dir, runfiles.COMPARISON_PNG,
               "Grouped bar chart of silhouette, ACC, NMI and ARI for every method; each method "
               "has its own colour and hatching, and the bars are labelled with their values, "
               "which are also in the table above", "All methods, all scores."),
    ]
    return _section("comparison", "4. Comparison", "".join(parts))


def _time_section(manifest: dict[str, Any], run_dir: Path) -> str:
    stages = manifest.get("stages", {})
    timed = {n: s for n, s in stages.items() if s.get("seconds") is not None}
    total = sum(s["seconds"] for s in timed.values()) or 1.0
    longest = max((s["seconds"] for s in timed.values()), default=1.0) or 1.0
    rows = []
    for name, stage in stages.items():
        seconds = stage.get("seconds")
        share = "–" if seconds is None else f"{seconds / total:.0%}"
        bar = "" if seconds is None else Raw(
            f'<span class="bar" style="width:{max(seconds / longest * 12, 0.1):.2f}rem" '
            'aria-hidden="true"></span>')
        rows.append([name, STAGE_TEXT.get(name, ""), stage.get("status", "?"),
                     _num(seconds, 1), share, bar])
    rows.append(["all stages", "", "", _num(sum(s["seconds"] for s in timed.values()), 1),
                 "100%", ""])
    parts = [table(["stage", "what", "status", "seconds", "share", "bar"], rows,
                   caption="Wall time per stage", text_columns=(0, 1, 2, 5),
                   row_classes=[""] * (len(rows) - 1) + ["best"])]
    if (run_dir / runfiles.TIMELINE).is_file():
        parts.append(
            "<p>Stages run as soon as what they need exists, several at a time: the shares "
            "above add up to more than the run's wall time when they overlapped.</p>"
            + figure(run_dir, runfiles.TIMELINE, "Timeline of the run: one bar per stage, from its "
                     "start to its end", "When each stage ran."))
    if manifest.get("seconds"):
        parts.append(f"<p class=note>The whole run took {manifest['seconds']:,.1f} s, "
                     "including starting the cluster and writing the run directory.</p>")
    perf_name = manifest.get("performance_report")
    perf_name = Path(perf_name).name if isinstance(perf_name, str) else runfiles.PERFORMANCE_REPORT
    links = []
    if (run_dir / perf_name).exists() or manifest.get("performance_report"):
        links.append(f'<a class="file" id="performance-report" href="{_esc(perf_name)}">Dask '
                     "performance report</a> (task stream, worker profiles and bandwidth of the "
                     "whole run; open it beside this page)")
    else:
        links.append("No Dask performance report was saved in this run directory")
    if (run_dir / runfiles.RUN_LOG).exists():
        log = runfiles.RUN_LOG
        links.append(f'The job\'s log: <a class="file" href="{log}">{log}</a>')
    if manifest.get("dashboard_link"):
        links.append(f"The Dask dashboard was at <code>{_esc(manifest['dashboard_link'])}"
                     "</code> while the job ran")
    parts.append("<ul>" + "".join(f"<li>{link}.</li>" for link in links) + "</ul>")
    return _section("time", "5. Wall time and Dask", "".join(parts))


def _versions(manifest: dict[str, Any]) -> str:
    versions = manifest.get("versions", {})
    if not versions:
        return ""
    return ("<details open><summary>Package versions on the client</summary>"
            + table(["package", "version"], [[k, v or "not installed"]
                                              for k, v in versions.items()],
                    text_columns=(0, 1)) + "</details>")


def render_report(run_dir: Path, sort_by: str = DEFAULT_SORT) -> str:
    """The report of ``run_dir`` as one HTML string (see :func:`write_report`)."""
    run_dir = Path(run_dir)
    manifest, metrics = read_run(run_dir)
    score = ranking_score(metrics, sort_by)
    said = verdict(rank_methods(metrics, score), score)
    if score != sort_by:
        said += (f" ({SCORES[sort_by][0]} is not available in this run, so the ranking uses "
                 f"{SCORES[score][0]}.)")
    name = manifest.get("run_name", run_dir.name)
    toc = ("<nav class=toc aria-label=Contents><ol>"
           '<li><a href="#data">Data</a></li><li><a href="#pca">PCA and the t-SNE map</a></li>'
           '<li><a href="#methods">Clustering methods</a>'
           + (" (" + ", ".join(f'<a href="#method-{_esc(m)}">{_esc(m)}</a>'
                               for m in metrics.get("method", [])) + ")" if not metrics.empty
              else "")
           + '</li><li><a href="#comparison">Comparison</a></li>'
           '<li><a href="#time">Wall time and Dask</a></li></ol></nav>')
    generated = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    body = "".join([
        f"<header><h1>Run {_esc(name)}</h1>",
        '<p class="lead">Unsupervised analysis of Fashion-MNIST on Dask: the data, its PCA, '
        "each clustering method and how they compare.</p>",
        _header(manifest, run_dir),
        f'<p class="verdict">{_esc(said)}</p></header>',
        toc,
        "<main>",
        _data_section(manifest, run_dir),
        _pca_section(manifest, run_dir),
        _methods_section(metrics, run_dir),
        _comparison_section(metrics, run_dir, score, said),
        _time_section(manifest, run_dir),
        "</main>",
        f"<footer><p class=note>Written {generated} from the files of this run directory "
        f"(<code>{runfiles.MANIFEST}</code>, <code>{runfiles.METRICS}</code>, the PNGs); "
        "regenerate with "
        f"<code>fmnist-dask report {_esc(run_dir.name)}</code>.</p>{_versions(manifest)}"
        "</footer>",
    ])
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>Run {_esc(name)}: Fashion-MNIST clustering report</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>\n")


def write_timeline(run_dir: Path) -> Path | None:
    """Draw ``timeline.png`` from ``manifest.json``: the stages as bars over time and, when
    the stage records have them (``workers``), when each worker computed which stage.

    Returns None, drawing nothing, when no stage has both a start and an end (a run made
    before stages recorded them). A stage still running (the report stage itself, while the
    job writes the report) is left out.
    """
    manifest, _ = read_run(run_dir)
    timed = [(name, stage) for name, stage in manifest.get("stages", {}).items()
             if stage.get("start") is not None and stage.get("end") is not None]
    if not timed:
        return None
    from fmnist_dask import plots  # matplotlib only when there is something to draw

    workers: dict[str, list[tuple[str, float, float]]] = {}
    for name, stage in timed:
        for worker, intervals in (stage.get("workers") or {}).items():
            workers.setdefault(worker, []).extend((name, a, b) for a, b in intervals)
    return plots.timeline([n for n, _ in timed], [s["start"] for _, s in timed],
                          [s["end"] for _, s in timed],
                          [s.get("status") == "done" for _, s in timed],
                          run_dir / runfiles.TIMELINE,
                          f"Run {manifest.get('run_name', run_dir.name)}: stages over time",
                          workers={w.split("://")[-1]: workers[w] for w in sorted(workers)})


def write_report(run_dir: Path, sort_by: str = DEFAULT_SORT) -> Path:
    """Write ``run_dir/report.html`` (and its ``timeline.png``) from the run directory's
    files alone.

    Parameters
    ----------
    run_dir : Path
        A run directory (finished, failed, or still being written by the job's last stage).
    sort_by : {"nmi", "ari", "acc", "silhouette"}
        Score that ranks the methods and names the best one; silhouette is used instead when
        the run has no labels.

    Returns
    -------
    Path
        The report file. It is written to a temporary name and renamed, so a reader never
        sees half a page.
    """
    run_dir = Path(run_dir)
    write_timeline(run_dir)
    page = render_report(run_dir, sort_by)
    path = run_dir / runfiles.REPORT
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
