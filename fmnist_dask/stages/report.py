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

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pandas as pd
from markupsafe import Markup

from fmnist_dask import pages, runfiles
from fmnist_dask.pages import Table, figure, num, table

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


def _status_text(manifest: dict[str, Any]) -> str:
    status = manifest.get("status", "unknown")
    if status == "running":
        return "finishing (this page was written by the job's last stage)"
    if status == "failed":
        return f"failed: {manifest.get('error', '')}"
    return status


def _header(manifest: dict[str, Any], run_dir: Path) -> list[tuple[str, Any]]:
    job = manifest.get("job", {})
    data = job.get("data", {})
    cluster = manifest.get("cluster", {})
    rows = manifest.get("rows", {}).get("total", {})
    stage_seconds = sum(s.get("seconds", 0) for s in manifest.get("stages", {}).values())
    workers = cluster.get("workers") or []
    cluster_text = (f"{cluster.get('kind', '?')} at {cluster.get('address', '?')}: "
                    f"{cluster.get('n_workers', len(workers))} workers, "
                    f"{cluster.get('total_threads', '?')} threads") if cluster else None
    # Results can differ in their last bits between CPUs (docs/quality.md, "Seed 0 today")
    kernels = sorted({f"BLAS {k.get('blas')}, numba {k.get('numba_cpu')}" for w in workers
                      if isinstance(k := w.get("kernels"), dict)})
    limit = data.get("limit_rows")
    facts = [
        ("Run", manifest.get("run_name", run_dir.name)),
        ("Status", _status_text(manifest)),
        ("Started (UTC)", manifest.get("started_utc")),
        ("Finished (UTC)", manifest.get("finished_utc")),
        ("Wall time", f"{manifest['seconds']:,.1f} s" if manifest.get("seconds") else
         f"{stage_seconds:,.1f} s in the stages so far" if stage_seconds else None),
        ("Job", f"{job.get('name', '?')}, seed {job.get('seed', '?')}"),
        ("Input", f"{data.get('format', '?')} files in {data.get('dir', '?')}"
                  + (f", first {limit:,} rows of each split" if limit else "")),
        ("Rows kept", num(rows.get("kept")) if rows else None),
        ("Cluster", cluster_text),
        ("Numeric kernels", "; ".join(kernels) or None),
        ("Command", " ".join(manifest.get("command", [])) or None),
    ]
    return [(name, value) for name, value in facts if value not in (None, "")]


def _data(manifest: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    rows = manifest.get("rows", {})
    out: dict[str, Any] = {"rows": None, "eda": None}
    if rows:
        splits = [s for s in rows if s != "total"] + (["total"] if "total" in rows else [])
        out["rows"] = table(
            ["split", "read", "rejected", "duplicates", "kept"],
            [[s, *(num(rows[s].get(k)) for k in ("read", "rejected", "duplicates", "kept"))]
             for s in splits],
            caption="Rows per split", row_classes=["best" if s == "total" else ""
                                                   for s in splits])
    out["row_files"] = [name for name in (runfiles.DUPLICATES, runfiles.REJECTED)
                        if (run_dir / name).exists()]
    eda = manifest.get("eda")
    if not eda:
        return out
    mean, std = f"{eda['pixel_mean']:.4f}", f"{eda['pixel_std']:.4f}"
    out["eda"] = {"pixel_mean": mean, "pixel_std": std}
    counts = eda.get("class_counts", {})
    classes = list(dict.fromkeys(c for split in counts.values() for c in split))
    grid = manifest.get("job", {}).get("eda", {}).get("sample_grid", 3)
    out["classes"] = table(
        ["class", *counts, "all"],
        [[c, *(num(counts[s].get(c, 0)) for s in counts),
          num(sum(counts[s].get(c, 0) for s in counts))] for c in classes],
        caption="Images per class") if counts else None
    out["sample_images"] = figure(
        run_dir, runfiles.SAMPLE_IMAGES,
        f"{grid} by {grid} grid of randomly chosen cleaned images, each titled with its "
        "class name", "Random sample of the cleaned images.")
    out["class_distribution"] = figure(
        run_dir, runfiles.CLASS_DISTRIBUTION,
        "Bar chart of images per class for each split, the second split hatched; the same "
        "counts are in the table 'Images per class'", "Images per class and split.")
    out["pixel_histogram"] = figure(
        run_dir, runfiles.PIXEL_HISTOGRAM,
        f"Histogram of scaled pixel values on a log scale: most pixels are background "
        f"near 0; mean {mean}, standard deviation {std}",
        "Pixel value histogram, computed on the workers.")
    return out


def _pca(manifest: dict[str, Any], run_dir: Path) -> dict[str, Any] | None:
    pca = manifest.get("pca")
    if not pca:
        return None
    ratio = pca["explained_variance_ratio"]
    cumulative = [sum(ratio[: i + 1]) for i in range(len(ratio))]
    out = {
        "n_components": pca["n_components"],
        "cumulative": f"{pca['cumulative_explained_variance']:.1%}",
        "explained": figure(
            run_dir, runfiles.EXPLAINED_VARIANCE_PNG,
            "Bar chart of the variance explained by each principal component with the "
            f"cumulative curve, reaching {pca['cumulative_explained_variance']:.2f}; the "
            "values are in the table 'Explained variance'", "Explained variance."),
        "components": figure(
            run_dir, runfiles.COMPONENTS_PNG,
            "The mean image and the first principal components drawn as 28 by 28 images, "
            "mid grey for zero", "Mean image and principal components."),
        "table": table(["component", "explained variance", "cumulative"],
                       [[f"PC{i + 1}", f"{r:.2%}", f"{c:.2%}"]
                        for i, (r, c) in enumerate(zip(ratio, cumulative, strict=True))],
                       caption="Explained variance"),
        "tsne": None,
    }
    tsne = manifest.get("tsne")
    if tsne:
        out["tsne"] = {
            "sample_size": num(tsne.get("sample_size")),
            "kl_divergence": num(tsne.get("kl_divergence"), 3),
            "trustworthiness": num(tsne.get("trustworthiness"), 3),
            "figure": figure(
                run_dir, runfiles.TSNE_TRUE_CLASS,
                "Scatter plot of the t-SNE map, each point a row, coloured and shaped by its "
                "true class with the class names written at the centre of each group",
                "t-SNE map coloured by the true class."),
        }
    return out


def _method_scores(row: pd.Series) -> list[list[Any]]:
    rows = []
    silhouette = row.get("silhouette")
    if silhouette is not None and not pd.isna(silhouette):
        how = row.get("silhouette_method")
        detail = [how] if isinstance(how, str) and how else []
        if how == "sampled":
            reference = row.get("silhouette_reference_size")
            against = (f" against {num(reference)}"
                       if reference is not None and not pd.isna(reference) else "")
            detail.append(f"{num(row.get('silhouette_sample_size'))} rows{against}, 95% CI "
                          f"{num(row.get('silhouette_ci_low'))} to "
                          f"{num(row.get('silhouette_ci_high'))}")
        detail.append(f"on {row.get('features')}")
        rows.append(["silhouette", f"{num(silhouette)} ({', '.join(detail)})"])
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
        rows.append([label, num(value, digits)])
    return rows


def _methods(metrics: pd.DataFrame, run_dir: Path) -> list[dict[str, Any]]:
    methods = []
    for _, row in metrics.iterrows():
        method = str(row["method"])
        k = int(row["n_clusters"])
        centroids = run_dir / runfiles.centroids(method)
        methods.append({
            "name": method, "k": k, "features": row.get("features"),
            "text": METHOD_TEXT.get(method, "Clustering method."),
            "scores": table(["score", "value"], _method_scores(row),
                            caption=f"Scores of {method}", text_columns=(0, 1)),
            "centroids": figure(run_dir, runfiles.centroids(method),
                                f"The {k} cluster centres of {method} drawn as images",
                                "Cluster centres as images.") if centroids.is_file() else None,
            "samples": figure(
                run_dir, runfiles.cluster_samples(method),
                f"One row per cluster of {method}, labelled with the cluster number and its "
                "matched class, showing random images assigned to it",
                "Random images of each cluster."),
            "contingency": figure(
                run_dir, runfiles.contingency(method),
                f"Heat map of how many images of each true class (rows) fall in each of the "
                f"{k} clusters of {method} (columns); every cell is annotated with its count",
                "Contingency matrix: true class against cluster."),
            "tsne": figure(
                run_dir, runfiles.tsne_figure(method),
                f"The t-SNE map coloured and shaped by the {k} clusters of {method}, with the "
                "cluster numbers written at the centre of each group",
                f"t-SNE map coloured by the clusters of {method}."),
        })
    return methods


def comparison_table(metrics: pd.DataFrame, score: str) -> Table:
    """Every method's headline scores, best first by ``score``, with ``<th scope>``."""
    ranked = rank_methods(metrics, score)
    columns = [c for c in ("silhouette", "acc", "nmi", "ari") if c in ranked]
    headers = ["rank", "method", "features", *[SCORES[c][0] for c in columns], "fit time (s)"]
    sort_attr = ['aria-sort="descending"' if c == score else "" for c in ["", "", "", *columns]]
    rows, classes = [], []
    for i, (_, row) in enumerate(ranked.iterrows()):
        rows.append([str(i + 1), row["method"], row.get("features", ""),
                     *[num(row[c]) for c in columns], num(row.get("fit_seconds"), 1)])
        classes.append("best" if i == 0 else "")
    headers[3 + columns.index(score)] += " ▼" if score in columns else ""
    return table(headers, rows, caption=f"All methods, best first by {SCORES[score][0]}",
                 row_headers=False, text_columns=(1, 2), attrs='id="comparison-table"',
                 row_classes=classes, header_attrs=sort_attr)


def _comparison(metrics: pd.DataFrame, run_dir: Path, score: str) -> dict[str, Any] | None:
    if metrics.empty:
        return None
    return {
        "table": comparison_table(metrics, score),
        "score_name": SCORES[score][0],
        "figure": figure(
            run_dir, runfiles.COMPARISON_PNG,
            "Grouped bar chart of silhouette, ACC, NMI and ARI for every method; each method "
            "has its own colour and hatching, and the bars are labelled with their values, "
            "which are also in the table above", "All methods, all scores."),
    }


def _time(manifest: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    stages = manifest.get("stages", {})
    timed = {n: s for n, s in stages.items() if s.get("seconds") is not None}
    total = sum(s["seconds"] for s in timed.values()) or 1.0
    longest = max((s["seconds"] for s in timed.values()), default=1.0) or 1.0
    rows = []
    for name, stage in stages.items():
        seconds = stage.get("seconds")
        share = "–" if seconds is None else f"{seconds / total:.0%}"
        bar = "" if seconds is None else Markup(
            f'<span class="bar" style="width:{max(seconds / longest * 12, 0.1):.2f}rem" '
            'aria-hidden="true"></span>')
        rows.append([name, STAGE_TEXT.get(name, ""), stage.get("status", "?"),
                     num(seconds, 1), share, bar])
    rows.append(["all stages", "", "", num(sum(s["seconds"] for s in timed.values()), 1),
                 "100%", ""])
    perf_name = manifest.get("performance_report")
    perf_name = Path(perf_name).name if isinstance(perf_name, str) else runfiles.PERFORMANCE_REPORT
    has_perf = (run_dir / perf_name).exists() or manifest.get("performance_report")
    return {
        "table": table(["stage", "what", "status", "seconds", "share", "bar"], rows,
                       caption="Wall time per stage", text_columns=(0, 1, 2, 5),
                       row_classes=[""] * (len(rows) - 1) + ["best"]),
        "timeline": figure(run_dir, runfiles.TIMELINE, "Timeline of the run: one bar per "
                           "stage, from its start to its end", "When each stage ran.")
        if (run_dir / runfiles.TIMELINE).is_file() else None,
        "seconds": f"{manifest['seconds']:,.1f}" if manifest.get("seconds") else None,
        "performance_report": perf_name if has_perf else None,
        "run_log": runfiles.RUN_LOG if (run_dir / runfiles.RUN_LOG).exists() else None,
        "dashboard_link": manifest.get("dashboard_link"),
    }


def render_report(run_dir: Path, sort_by: str = DEFAULT_SORT) -> str:
    """The report of ``run_dir`` as one HTML string (see :func:`write_report`)."""
    run_dir = Path(run_dir)
    manifest, metrics = read_run(run_dir)
    score = ranking_score(metrics, sort_by)
    said = verdict(rank_methods(metrics, score), score)
    if score != sort_by:
        said += (f" ({SCORES[sort_by][0]} is not available in this run, so the ranking uses "
                 f"{SCORES[score][0]}.)")
    versions = manifest.get("versions", {})
    return pages.render(
        "report.html.j2",
        name=manifest.get("run_name", run_dir.name), run_dir_name=run_dir.name,
        header=_header(manifest, run_dir), verdict=said,
        data=_data(manifest, run_dir), pca=_pca(manifest, run_dir),
        methods=_methods(metrics, run_dir) if not metrics.empty else [],
        comparison=_comparison(metrics, run_dir, score), scores=list(SCORES.values()),
        time=_time(manifest, run_dir),
        generated=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        files={"manifest": runfiles.MANIFEST, "metrics": runfiles.METRICS},
        versions=table(["package", "version"],
                       [[k, v or "not installed"] for k, v in versions.items()],
                       text_columns=(0, 1)) if versions else None,
    )


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
