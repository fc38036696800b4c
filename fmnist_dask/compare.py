"""``fmnist-dask compare RUN...``: every method's scores side by side across runs.

For example two seeds of one job, or the original data against an augmented run. Reads only
each run directory's ``manifest.json`` and ``metrics.parquet``; prints a plain-text table and
writes the same as markdown or HTML (``--out FILE.md`` / ``--out FILE.html``).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from markupsafe import Markup

from fmnist_dask import pages, runfiles
from fmnist_dask.pages import table
from fmnist_dask.stages.report import DEFAULT_SORT, SCORES, ranking_score, read_run

#: Scores compared, in this order; all higher-is-better. Fit time follows, lower is better.
COMPARED = ("nmi", "ari", "acc", "silhouette")
TIME = "fit_seconds"
FORMATS = {".md": "markdown", ".markdown": "markdown", ".html": "html", ".htm": "html"}


@dataclass
class RunScores:
    """One run: its label in the tables, directory, manifest and metrics (indexed by method)."""

    label: str
    path: Path
    manifest: dict[str, Any]
    metrics: pd.DataFrame


@dataclass
class Comparison:
    """Scores of several runs, method by method.

    Attributes
    ----------
    runs : list of RunScores
    score : str
        The score that orders the methods (mean over the runs, best first).
    methods : list of str
        Every method seen in any run, best first.
    tables : dict of str to pandas.DataFrame
        Per score, a (methods, runs) table; NaN where a run lacks the method or score.
    """

    runs: list[RunScores]
    score: str
    methods: list[str]
    tables: dict[str, pd.DataFrame]

    @property
    def labels(self) -> list[str]:
        return [r.label for r in self.runs]


def _labels(paths: Sequence[Path]) -> list[str]:
    """Run directory names, with the parent folder added where two names clash."""
    names = [p.name for p in paths]
    labels = [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]
    return [f"{label} #{i + 1}" if labels.count(label) > 1 else label
            for i, label in enumerate(labels)]


def load_runs(paths: Sequence[Path]) -> list[RunScores]:
    """Read each run directory; ``FileNotFoundError`` names one without scores."""
    paths = [Path(p).resolve() for p in paths]
    runs = []
    for path, label in zip(paths, _labels(paths), strict=True):
        manifest, metrics = read_run(path)
        if metrics.empty:
            raise FileNotFoundError(
                f"{path}: no metrics.parquet (run status: {manifest.get('status', 'unknown')})")
        runs.append(RunScores(label, path, manifest, metrics.set_index("method")))
    return runs


def compare_runs(paths: Sequence[Path], sort_by: str = DEFAULT_SORT) -> Comparison:
    """Gather the runs' scores into one table per score, methods best first by ``sort_by``."""
    runs = load_runs(paths)
    everything = pd.concat([r.metrics.reset_index() for r in runs], ignore_index=True)
    score = ranking_score(everything, sort_by)
    methods = list(dict.fromkeys(everything["method"]))
    tables = {}
    for name in (*COMPARED, TIME):
        columns = {r.label: r.metrics[name] if name in r.metrics else pd.Series(dtype=float)
                   for r in runs}
        frame = pd.DataFrame(columns, index=methods, dtype=float)
        if frame.notna().any().any():
            tables[name] = frame
    if score in tables:
        mean = tables[score].mean(axis=1)
        methods = list(mean.sort_values(ascending=False, kind="stable", na_position="last")
                       .index)
        tables = {k: v.loc[methods] for k, v in tables.items()}
    return Comparison(runs, score, methods, tables)


def _title(name: str) -> str:
    if name == TIME:
        return "Fit and label time (s), lower is better"
    return f"{SCORES[name][0]}, higher is better"


def _fmt(value: float, name: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.1f}" if name == TIME else f"{value:.4f}"


def score_rows(comparison: Comparison, name: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one score's table: method, each run, then mean and change/spread."""
    frame = comparison.tables[name]
    headers = ["method", *comparison.labels]
    extra = len(comparison.runs) > 1
    if extra:
        labels = comparison.labels
        headers += ["mean", f"{labels[1]} − {labels[0]}" if len(labels) == 2
                    else "spread (max − min)"]
    rows = []
    for method, values in frame.iterrows():
        row = [str(method), *(_fmt(v, name) for v in values)]
        if extra:
            present = values.dropna()
            row.append(_fmt(present.mean() if len(present) else math.nan, name))
            if len(comparison.runs) == 2:
                delta = values.iloc[1] - values.iloc[0]
                row.append("–" if math.isnan(delta) else f"{delta:+.{1 if name == TIME else 4}f}")
            else:
                row.append(_fmt(present.max() - present.min() if len(present) else math.nan,
                                name))
        rows.append(row)
    return headers, rows


def run_rows(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    """One row per run: where it is, what it ran on, how long it took."""
    headers = ["run", "status", "seed", "input", "rows kept", "methods", "wall time (s)",
               "directory"]
    rows = []
    for run in comparison.runs:
        m = run.manifest
        data = m.get("job", {}).get("data", {})
        limit = data.get("limit_rows")
        kept = m.get("rows", {}).get("total", {}).get("kept")
        rows.append([
            run.label, str(m.get("status", "?")), str(m.get("job", {}).get("seed", "?")),
            f"{data.get('dir', '?')}" + (f" (first {limit:,} rows per split)" if limit else ""),
            f"{kept:,}" if isinstance(kept, int) else "?", str(len(run.metrics)),
            f"{m['seconds']:.1f}" if m.get("seconds") else "?", str(run.path),
        ])
    return headers, rows


def verdict(comparison: Comparison) -> str:
    """Which method was best by the mean of the ranking score, and in how many runs."""
    if comparison.score not in comparison.tables:
        return "No run has scores to rank the methods by."
    frame = comparison.tables[comparison.score]
    mean = frame.mean(axis=1)
    if mean.isna().all():
        return "No run has scores to rank the methods by."
    best = comparison.methods[0]
    wins = sum(1 for label in frame if frame[label].notna().any()
               and frame[label].idxmax() == best)
    n = len(comparison.runs)
    name = SCORES[comparison.score][0]
    over = f"mean {name} over {n} runs" if n > 1 else name
    text = f"By {over}, {best} worked best ({mean[best]:.3f})"
    if len(comparison.methods) > 1 and not math.isnan(mean[comparison.methods[1]]):
        second = comparison.methods[1]
        text += f", ahead of {second} ({mean[second]:.3f})"
    if n > 1:
        text += f"; it was the best method in {wins} of {n} runs"
    return text + "."


def _plain(headers: list[str], rows: list[list[str]], indent: str = "  ") -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return indent + "  ".join(
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(headers), indent + "  ".join("-" * w for w in widths),
                      *map(line, rows)])


def to_text(comparison: Comparison) -> str:
    """What ``fmnist-dask compare`` prints."""
    headers, rows = run_rows(comparison)
    keep = [0, 1, 2, 4, 6, 7]  # the terminal table leaves out input and method count
    parts = ["Runs", _plain([headers[i] for i in keep], [[r[i] for i in keep] for r in rows])]
    for name in comparison.tables:
        parts += ["", _title(name) + (" (ranking score)" if name == comparison.score else ""),
                  _plain(*score_rows(comparison, name))]
    parts += ["", verdict(comparison)]
    return "\n".join(parts) + "\n"


def _md_table(headers: list[str], rows: list[list[str]], text_columns: Sequence[int] = (0,)
              ) -> str:
    def cell(value: str) -> str:
        return str(value).replace("|", "\\|")

    align = ["---" if i in text_columns else "---:" for i in range(len(headers))]
    return "\n".join(["| " + " | ".join(map(cell, headers)) + " |",
                      "| " + " | ".join(align) + " |",
                      *("| " + " | ".join(map(cell, row)) + " |" for row in rows)])


def to_markdown(comparison: Comparison) -> str:
    """The comparison as a markdown document."""
    parts = [f"# Runs compared: {', '.join(comparison.labels)}", "", verdict(comparison), "",
             "## Runs", "", _md_table(*run_rows(comparison), text_columns=(0, 1, 3, 7))]
    for name in comparison.tables:
        parts += ["", f"## {_title(name)}", "", _md_table(*score_rows(comparison, name))]
    return "\n".join(parts) + "\n"


def to_html(comparison: Comparison) -> str:
    """The comparison as one self-contained HTML page (tables with ``<th scope>``)."""
    headers, rows = run_rows(comparison)
    # Each run's label links to its report, when it has one.
    links = [Markup('<a href="{}/{}">{}</a>').format(r.path.as_uri(), runfiles.REPORT, r.label)
             if (r.path / runfiles.REPORT).exists() else r.label for r in comparison.runs]
    rows = [[link, *row[1:]] for link, row in zip(links, rows, strict=True)]
    return pages.render(
        "compare.html.j2", labels=comparison.labels, verdict=verdict(comparison),
        runs=table(headers, rows, caption="Runs", text_columns=(0, 1, 3, 7), attrs='id="runs"'),
        scores=[table(*score_rows(comparison, name), caption=_title(name),
                      attrs=f'id="score-{name}"') for name in comparison.tables],
        generated=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        files={"metrics": runfiles.METRICS, "manifest": runfiles.MANIFEST})


def write(comparison: Comparison, path: Path) -> Path:
    """Write the comparison as markdown or HTML, chosen by the file's suffix."""
    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: --out must end in {', '.join(FORMATS)}")
    text = to_html(comparison) if kind == "html" else to_markdown(comparison)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
