"""report.html and ``fmnist-dask compare`` on real runs, checked in a real headless Chromium.

The two real runs of the CLI on the real subset that the session shares (conftest.py): run A
is the whole default job, run B the operations job (EDA, spectral clustering and t-SNE off),
so the report and the comparison also meet missing sections and methods. The browser is
Debian's chromium, installed by ``make test`` (the ``browser`` target), not by a test.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from fmnist_dask.compare import compare_runs
from fmnist_dask.stages.report import SCORES, rank_methods, render_report, verdict
from tests.browser import find_chromium, load_page
from tests.conftest import cli, fail_in_ci_else_skip

ALL_METHODS = ["kmeans_raw", "kmeans_pca", "gmm", "spectral"]
RUN_B_METHODS = ["kmeans_raw", "kmeans_pca", "gmm"]
SECTIONS = ["data", "pca", "methods", "comparison", "time"]

#: Evaluated in the page after the load event: what a reader would see.
PAGE_FACTS = """(async () => {
  const images = [...document.images];
  await Promise.all(images.map(i => i.decode().catch(() => null)));
  const ok = i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0;
  return {
    images: images.map(i => i.dataset.file),
    notDecoded: images.filter(i => !ok(i)).map(i => i.dataset.file),
    withoutAlt: images.filter(i => !(i.alt || '').trim()).map(i => i.dataset.file),
    outsidePage: images.filter(i => !i.src.startsWith('data:image/png;base64,')).length,
    thWithoutScope: [...document.querySelectorAll('th')].filter(t => !t.scope).length,
    sections: [...document.querySelectorAll('main > section')].map(s => s.id),
    comparison: [...document.querySelectorAll('#comparison-table tbody tr')].map(
      r => [...r.cells].map(c => c.textContent.trim())),
    comparisonHeaders: [...document.querySelectorAll('#comparison-table thead th')].map(
      c => c.textContent.trim()),
    verdict: (document.querySelector('#verdict') || {}).textContent || null,
    stageRows: [...document.querySelectorAll('#time tbody tr th')].map(t => t.textContent),
    missing: [...document.querySelectorAll('.missing')].map(p => p.textContent),
    performanceReport: (document.querySelector('#performance-report') || {}).href || null,
    widestPx: Math.max(...[...document.querySelectorAll('main *')].map(
      e => e.getBoundingClientRect().right)),
  };
})()"""
#: Under print media: the contents box is hidden and every section starts a page.
PRINT_FACTS = """({toc: getComputedStyle(document.querySelector('nav.toc')).display,
  breaks: [...document.querySelectorAll('main > section h2')].map(
    h => getComputedStyle(h).breakBefore)})"""


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium (``make browser`` installs it); fails in CI when it is missing."""
    found = find_chromium()
    if found is None:
        fail_in_ci_else_skip("chromium is missing: run `make browser` (apt-get, as root)")
    return found


@pytest.fixture(scope="module")
def runs(job_runs) -> dict[str, Path]:
    """Run A (the default job) and run B (the operations job) of the session."""
    return {"a": job_runs.default, "b": job_runs.ops}


def test_the_job_writes_a_report_that_loads_cleanly_in_chromium(runs, chromium):
    run = runs["a"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["report"]["status"] == "done"
    assert manifest["stages"]["report"]["file"] == "report.html"
    screenshot = run / "report-screenshot.png"
    page = load_page(run / "report.html", PAGE_FACTS, screenshot=screenshot,
                     print_expression=PRINT_FACTS)
    facts = page.result

    assert page.errors == []
    # the workers' numeric kernels, which the results' last bits depend on, are in the header
    kernels = {(w["kernels"]["blas"], w["kernels"]["numba_cpu"])
               for w in manifest["cluster"]["workers"]}
    html = (run / "report.html").read_text()
    for blas, cpu in kernels:
        assert f"BLAS {blas}, numba {cpu}" in html
    pngs = sorted(str(p.relative_to(run)) for p in run.rglob("*.png")
                  if p.name != screenshot.name)
    assert sorted(facts["images"]) == pngs  # every figure of the run, none twice
    # 3 data, 2 PCA, 10 cluster, 5 t-SNE, 1 comparison, and timeline.png (added with the
    # graph of stages: the stages as bars over time)
    assert len(pngs) >= 22
    assert facts["notDecoded"] == [] and facts["withoutAlt"] == []
    assert facts["outsidePage"] == 0  # embedded: the file stands alone
    assert facts["thWithoutScope"] == 0
    assert facts["sections"] == SECTIONS
    assert facts["missing"] == []
    assert facts["widestPx"] <= 1280  # nothing wider than a laptop screen

    # The comparison table: every method, best first by NMI, numbers equal metrics.parquet.
    metrics = pd.read_parquet(run / "metrics.parquet").set_index("method")
    table = facts["comparison"]
    assert sorted(row[1] for row in table) == sorted(ALL_METHODS)
    headers = facts["comparisonHeaders"]
    assert headers[:3] == ["rank", "method", "features"] and "NMI ▼" in headers
    nmi_column = headers.index("NMI ▼")
    assert [row[1] for row in table] == list(metrics["nmi"].sort_values(ascending=False).index)
    for row in table:
        assert float(row[nmi_column]) == pytest.approx(metrics.loc[row[1], "nmi"], abs=5e-5)
    best = metrics["nmi"].idxmax()
    assert facts["verdict"].startswith(f"By NMI, {best} worked best "
                                       f"({metrics.loc[best, 'nmi']:.3f})")
    stages = [s for s in manifest["stages"] if manifest["stages"][s].get("seconds") is not None
              and s != "report"]
    assert facts["stageRows"][:len(stages)] == stages

    # The Dask performance report is linked (relatively) exactly when the run saved one.
    perf = run / "performance-report.html"
    if perf.exists():
        assert facts["performanceReport"] == perf.as_uri()
    else:
        assert facts["performanceReport"] is None

    assert page.print_result["toc"] == "none"
    assert page.print_result["breaks"][1:] == ["page"] * (len(SECTIONS) - 1)
    assert page.pdf_bytes > 100_000
    assert screenshot.read_bytes()[:4] == b"\x89PNG"


def test_report_command_regenerates_the_page_from_the_run_directory(runs, chromium, tmp_path):
    # A copy of the run: the page must come from its files alone, wherever it lives.
    run = shutil.copytree(runs["a"], tmp_path / "copied-run")
    (run / "report.html").unlink()
    result = cli("report", str(run), "--sort-by", "ari")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(run / "report.html")
    page = load_page(run / "report.html", PAGE_FACTS)
    assert page.errors == []
    # 21 figures of the run and timeline.png (added with the graph of stages), redrawn here
    assert page.result["notDecoded"] == [] and len(page.result["images"]) == 22
    metrics = pd.read_parquet(run / "metrics.parquet").set_index("method")
    assert [r[1] for r in page.result["comparison"]] == list(
        metrics["ari"].sort_values(ascending=False).index)
    assert page.result["verdict"].startswith(f"By ARI, {metrics['ari'].idxmax()} worked best")
    # Regenerated after the run: it now also times the job's own report stage.
    assert "report" in page.result["stageRows"]
    assert "succeeded" in (run / "report.html").read_text()

    missing = cli("report", str(tmp_path / "no-such-run"))
    assert missing.returncode == 3 and "manifest.json" in missing.stderr


def test_a_report_with_methods_and_figures_missing_still_loads_cleanly(runs, chromium):
    run = runs["b"]
    page = load_page(run / "report.html", PAGE_FACTS)
    assert page.errors == []
    assert page.result["notDecoded"] == []
    assert [r[1] for r in page.result["comparison"]] == list(
        pd.read_parquet(run / "metrics.parquet").sort_values("nmi", ascending=False)["method"])
    assert sorted(r[1] for r in page.result["comparison"]) == sorted(RUN_B_METHODS)
    missing = " ".join(page.result["missing"])
    assert "exploration stage did not run" in missing
    assert "tsne/tsne_kmeans_raw.png" in missing  # no t-SNE in this run: said, not broken


def _printed_scores(stdout: str, title: str) -> dict[str, list[str]]:
    """The rows of one score's block in ``compare``'s output: method -> cells."""
    after_title = stdout.split(title, 1)[1].split("\n", 1)[1]
    lines = after_title.split("\n\n", 1)[0].splitlines()
    assert lines[0].split()[0] == "method" and not lines[1].replace("-", "").strip()
    return {line.split()[0]: line.split()[1:] for line in lines[2:]}


def _score(metrics: pd.DataFrame, method: str, score: str) -> float:
    """A method's score in a run's metrics; NaN where the run has no such method or score."""
    if method not in metrics.index or score not in metrics.columns:
        return float("nan")
    return float(metrics.loc[method, score])


def test_compare_prints_both_runs_scores_as_written_in_metrics(runs, tmp_path):
    a, b = runs["a"], runs["b"]
    md, page = tmp_path / "cmp.md", tmp_path / "cmp.html"
    result = cli("compare", str(a), str(b), "--out", str(md), "--out", str(page))
    assert result.returncode == 0, result.stderr
    metrics = {run.name: pd.read_parquet(run / "metrics.parquet").set_index("method")
               for run in (a, b)}
    for score in ("nmi", "ari", "acc", "silhouette"):
        title = f"{SCORES[score][0]}, higher is better"
        rows = _printed_scores(result.stdout, title)
        assert sorted(rows) == sorted(ALL_METHODS)
        for method, cells in rows.items():
            for column, run in enumerate((a, b)):
                value = _score(metrics[run.name], method, score)
                if pd.notna(value):
                    assert float(cells[column]) == pytest.approx(value, abs=5e-5)
                else:  # no such method in the run, or a score it did not compute
                    assert cells[column] == "–"
            if method in RUN_B_METHODS:  # change = run B − run A
                expected = (_score(metrics[b.name], method, score)
                            - _score(metrics[a.name], method, score))
                if pd.notna(expected):
                    assert float(cells[3]) == pytest.approx(expected, abs=1.5e-4)
                else:  # run B computes no silhouette
                    assert score == "silhouette" and cells[3] == "–"
    # Ordered by mean NMI over the runs that have the method.
    nmi = pd.concat([m["nmi"] for m in metrics.values()], axis=1).mean(axis=1)
    assert list(_printed_scores(result.stdout, "NMI, higher")) == list(
        nmi.sort_values(ascending=False).index)
    assert re.search(rf"By mean NMI over 2 runs, {nmi.idxmax()} worked best", result.stdout)

    text = md.read_text()
    for method in ALL_METHODS:
        assert f"| {method} |" in text
    assert f"{metrics[a.name].loc['kmeans_pca', 'nmi']:.4f}" in text
    assert "<th scope=\"col\"" in page.read_text() and a.name in page.read_text()


def test_compare_refuses_a_directory_that_is_not_a_run(runs, tmp_path):
    result = cli("compare", str(runs["a"]), str(tmp_path))
    assert result.returncode == 3
    assert "not a run directory" in result.stderr
    bad_out = cli("compare", str(runs["a"]), "--out", str(tmp_path / "x.txt"))
    assert bad_out.returncode == 2 and "must end in .md or .html" in bad_out.stderr


def test_verdict_names_the_best_method_and_warns_when_the_lead_is_small():
    metrics = pd.DataFrame({"method": ["a", "b", "c"], "nmi": [0.50, 0.62, 0.615]})
    ranked = rank_methods(metrics, "nmi")
    assert list(ranked["method"]) == ["b", "c", "a"]
    said = verdict(ranked, "nmi")
    assert said.startswith("By NMI, b worked best (0.620), ahead of c (0.615) by 0.005; "
                           "a came last (0.500).")
    assert "under 0.01" in said
    clear = verdict(rank_methods(metrics.assign(nmi=[0.5, 0.7, 0.6]), "nmi"), "nmi")
    assert "under 0.01" not in clear and "ahead of c (0.600) by 0.100" in clear


def test_unlabelled_runs_are_ranked_by_silhouette(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"run_name": "x", "status": "failed"}))
    pd.DataFrame({"method": ["a", "b"], "n_clusters": [3, 3], "features": ["pca", "pca"],
                  "silhouette": [0.2, 0.3], "nmi": [float("nan")] * 2}).to_parquet(
        tmp_path / "metrics.parquet")
    page = render_report(tmp_path)
    assert "By silhouette, b worked best (0.300)" in page
    assert "NMI is not available in this run" in page
    assert 'class="missing">Figure not produced in this run: <code>clusters/a_samples.png' in page
    comparison = compare_runs([tmp_path])
    assert comparison.score == "silhouette" and comparison.methods == ["b", "a"]


def test_names_from_the_run_are_escaped_in_both_pages(tmp_path):
    # The run name, the job name, an error message and a method name are text on the pages,
    # never markup, wherever they appear.
    evil = "<script>alert(1)</script>"
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({
        "run_name": evil, "status": "failed", "error": f"boom {evil}",
        "job": {"name": evil, "seed": 0, "data": {"format": "csv", "dir": evil}}}))
    pd.DataFrame({"method": [evil, "b"], "n_clusters": [3, 3], "features": ["pca", "pca"],
                  "nmi": [0.5, 0.4]}).to_parquet(run / "metrics.parquet")
    page = render_report(run)
    assert "<script>" not in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 5  # title, h1, facts, methods
    assert f"By NMI, {evil.replace('<', '&lt;').replace('>', '&gt;')} worked best" in page
    html_out = tmp_path / "compare.html"
    assert cli("compare", str(run), "--out", str(html_out)).returncode == 0
    compared = html_out.read_text()
    assert "<script>" not in compared and "&lt;script&gt;alert(1)&lt;/script&gt;" in compared


def test_image_grid_puts_each_image_below_room_for_its_title(tmp_path):
    import matplotlib.image as mpimg
    import numpy as np

    from fmnist_dask.plots import MOSAIC_GAP, image_grid, image_mosaic

    images = np.zeros((5, 784))
    for i in range(5):
        images[i, i] = 1.0  # one lit pixel per image, in row 0, column i of the image
    canvas = image_mosaic([images[:3], images[3:]], 3, title_gap=9)
    # two rows of 28 pixels, each with 9 blank rows above it; 3 columns, 2 blank between
    assert canvas.shape == (2 * (28 + 9), 3 * 28 + 2 * MOSAIC_GAP)
    lit = sorted(zip(*np.nonzero(canvas), strict=True))
    assert lit == [(9, 0), (9, 30 + 1), (9, 60 + 2), (9 + 37, 3), (9 + 37, 30 + 4)]
    # without the gap: the mosaic of the sample figures, rows 2 pixels apart
    assert image_mosaic([images[:3], images[3:]], 3).shape == (2 * 28 + MOSAIC_GAP, 88)

    png = image_grid(images, [f"image {i}" for i in range(5)], 3, tmp_path / "grid.png", "five")
    picture = mpimg.imread(png)
    assert picture.shape[0] > 100 and picture.shape[1] > 200
    assert picture[..., :3].min() < 0.2  # the lit pixels and the titles are drawn dark
