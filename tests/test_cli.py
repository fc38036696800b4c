"""The command line: help, fetch, run, and its exit codes.

The default job runs once per session as a real process (``job_runs`` in conftest.py); the
commands whose process is not the point, and the job variants (manifold, a bad row), run
in-process through ``cli.main``, the variants on the session's LocalCluster.
"""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from sklearn.manifold import trustworthiness
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

from fmnist_dask.fetch import OFFICIAL_FILES, read_idx
from tests.conftest import (
    DEFAULT_RUN_SEED,
    N_TEST,
    N_TRAIN,
    cli,
    write_job,
    write_subset,
)

METHODS = ["kmeans_raw", "kmeans_pca", "gmm", "spectral"]


def test_help_lists_the_commands():
    result = cli("--help")
    assert result.returncode == 0
    for command in ("run", "fetch"):
        assert command in result.stdout
    run_help = cli("run", "--help")
    for option in ("--data", "--out", "--cluster", "--scheduler", "--seed"):
        assert option in run_help.stdout


def test_fetch_from_mirror_verifies_and_writes_csv(tmp_path, real_dir, real_arrays):
    dest = tmp_path / "data"
    result = cli("fetch", "--mirror", str(real_dir), "--dest", str(dest), "--csv")
    assert result.returncode == 0, result.stderr
    for name in OFFICIAL_FILES:
        assert (dest / name).read_bytes() == (real_dir / name).read_bytes()
    csv = dest / "fashion-mnist_test.csv"
    head = pd.read_csv(csv, nrows=3)
    assert list(head.columns[:3]) == ["label", "pixel1", "pixel2"] and head.shape[1] == 785
    images, labels = real_arrays["test"]
    np.testing.assert_array_equal(head.iloc[:, 1:].to_numpy(), images[:3])
    np.testing.assert_array_equal(head["label"], labels[:3])
    assert sum(1 for _ in csv.open()) == 10001


def test_fetch_refuses_a_file_whose_checksum_does_not_match(tmp_path, real_dir):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in OFFICIAL_FILES:
        shutil.copyfile(real_dir / name, mirror / name)
    bad = mirror / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    dest = tmp_path / "data"
    result = cli("fetch", "--mirror", str(mirror), "--dest", str(dest))
    assert result.returncode == 3
    assert "t10k-labels-idx1-ubyte.gz" in result.stderr and "sha256" in result.stderr
    assert not (dest / "t10k-labels-idx1-ubyte.gz").exists()
    assert not [p for p in dest.iterdir() if p.name.startswith(".")]  # no temporary left


def test_run_on_a_real_subset_produces_a_complete_run_directory(job_runs, real_arrays):
    # The shipped default job on the real subset, run once per session as a real process.
    result, run = job_runs.default_process, job_runs.default
    out = run.parent
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith(str(run))
    assert [p.name for p in out.iterdir()] == ["subset"]  # no temporary directory left
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "succeeded"
    assert manifest["job"]["seed"] == DEFAULT_RUN_SEED
    assert manifest["rows"]["train"] == {"read": N_TRAIN, "rejected": 0, "duplicates": 0,
                                         "kept": N_TRAIN}
    assert manifest["rows"]["test"]["kept"] == N_TEST
    assert manifest["dashboard_link"].startswith("http://127.0.0.1:")
    assert manifest["cluster"]["n_workers"] >= 1
    assert manifest["versions"]["dask"] and manifest["versions"]["scikit-learn"]
    for stage in ("load", "clean", "eda", "kmeans_raw", "reduce", "kmeans_pca", "sample", "gmm",
                  "spectral", "tsne", "tsne_trust", "evaluate"):
        assert manifest["stages"][stage]["status"] == "done"
        assert manifest["stages"][stage]["seconds"] > 0
    images = np.concatenate([real_arrays["train"][0][:N_TRAIN], real_arrays["test"][0][:N_TEST]])
    assert manifest["eda"]["pixel_mean"] == pytest.approx(
        (images / 255).mean(), abs=1e-6)
    cleaned = pd.read_parquet(run / "cleaned")
    assert len(cleaned) == N_TRAIN + N_TEST and cleaned["row_id"].is_unique
    for png in ("eda/sample_images.png", "eda/class_distribution.png",
                "eda/pixel_histogram.png", "pca/explained_variance.png", "pca/components.png",
                "comparison.png", "tsne/tsne_true_class.png",
                *[f"clusters/{m}_{kind}.png" for m in METHODS
                  for kind in ("samples", "contingency")],
                *[f"clusters/{m}_centroids.png" for m in ("kmeans_raw", "kmeans_pca")],
                *[f"tsne/tsne_{m}.png" for m in METHODS]):
        assert (run / png).read_bytes()[:4] == b"\x89PNG", png

    metrics = pd.read_parquet(run / "metrics.parquet").set_index("method")
    assert list(metrics.index) == METHODS
    assert metrics.loc["gmm", "log_likelihood"] < 0 < metrics.loc["gmm", "bic"]
    assert "| spectral | pca |" in (run / "comparison.md").read_text()
    embedding = pd.read_parquet(run / "embedding")
    assert list(embedding.columns) == ["row_id", "x", "y"] and len(embedding) == N_TRAIN + N_TEST
    # the map's trustworthiness (computed on a worker after the fit): scikit-learn's on the
    # written sample rows and coordinates (1,800 rows: all of them, under 5,000)
    rows = pd.read_parquet(run / "projected").set_index("row_id").loc[embedding["row_id"]]
    assert manifest["tsne"]["trustworthiness"] == pytest.approx(trustworthiness(
        rows.to_numpy(), embedding[["x", "y"]].to_numpy(), n_neighbors=5), abs=1e-12)
    assignments = pd.read_parquet(run / "assignments").sort_values("row_id")
    assert len(assignments) == N_TRAIN + N_TEST
    labels = np.concatenate([real_arrays["train"][1][:N_TRAIN], real_arrays["test"][1][:N_TEST]])
    np.testing.assert_array_equal(assignments["label"], labels)
    projected = pd.read_parquet(run / "projected").sort_values("row_id")
    assert list(projected.columns) == ["row_id", *[f"pc{i}" for i in range(1, 11)]]
    # Scores recomputed independently with scikit-learn from the written files.
    spaces = {"pixels": images / 255.0, "pca": projected.iloc[:, 1:].to_numpy()}
    for method in METHODS:
        space = spaces[metrics.loc[method, "features"]]
        predicted = assignments[method].to_numpy()
        assert set(predicted) == set(range(10))
        assert metrics.loc[method, "nmi"] == pytest.approx(
            normalized_mutual_info_score(labels, predicted), abs=1e-9)
        assert metrics.loc[method, "ari"] == pytest.approx(
            adjusted_rand_score(labels, predicted), abs=1e-9)
        assert metrics.loc[method, "silhouette"] == pytest.approx(
            silhouette_score(space, predicted), abs=1e-4)
        if "kmeans" not in method:
            continue
        centres = np.stack([space[predicted == k].mean(axis=0) for k in range(10)])
        inertia = ((space - centres[predicted]) ** 2).sum()
        # Cluster means minimise the sum of squares: the model's centres can only tie it.
        assert inertia <= metrics.loc[method, "inertia"] * (1 + 1e-6)
        assert metrics.loc[method, "inertia"] == pytest.approx(inertia, rel=1e-3)
    assert "Dask dashboard: http://127.0.0.1:" in result.stderr


def test_run_with_a_bad_row_fails_clearly_and_leaves_no_finished_run(tmp_path, real_arrays,
                                                                     dask_client):
    data = write_subset(tmp_path / "csv", real_arrays, 200, 50)
    path = data / "fashion-mnist_test.csv"
    lines = path.read_text().splitlines()
    lines[10] = lines[10].rsplit(",", 1)[0] + ",256"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "outputs"
    scheduler = ("--scheduler", dask_client.scheduler.address)
    result = cli("run", "--data", str(data), "--out", str(out), "--run-name", "bad", *scheduler)
    assert result.returncode == 3
    assert f"{path}: line 11, column pixel784: pixel not in 0..255: '256'" in result.stderr
    assert not (out / "bad").exists()
    failed = json.loads((out / "bad.failed" / "manifest.json").read_text())
    assert failed["status"] == "failed" and "line 11" in failed["error"]

    # Only what quarantine changes runs: load and clean (every later stage is checked above).
    off = {"enabled": False}
    job = write_job(tmp_path / "clean-only.yaml", eda=off, kmeans=off, reduce=off, gmm=off,
                    spectral=off, tsne=off)
    result = cli("run", str(job), "--data", str(data), "--out", str(out), "--run-name",
                 "quarantined", "--on-bad-rows", "quarantine", *scheduler)
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((out / "quarantined" / "manifest.json").read_text())
    assert manifest["rows"]["test"] == {"read": 50, "rejected": 1, "duplicates": 0, "kept": 49}
    rejected = pd.read_parquet(out / "quarantined" / "rejected.parquet")
    assert rejected["source_line"].tolist() == [11]


def test_job_spec_errors_name_the_key(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("name: x\nclean:\n  on_bad_row: quarantine\n")
    result = cli("run", str(job))
    assert result.returncode == 2
    assert "clean.on_bad_row: unknown key" in result.stderr
    job.write_text("eda:\n  histogram_bins: many\n")
    result = cli("run", str(job))
    assert result.returncode == 2 and "eda.histogram_bins" in result.stderr
    job.write_text("reduce:\n  enabled: false\n")  # the default GMM, spectral, t-SNE need it
    result = cli("run", str(job))
    assert result.returncode == 2
    assert ("gmm.enabled, spectral.enabled, tsne.enabled need reduce.enabled, which is false"
            in result.stderr)
    result = cli("run", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and "missing.yaml: job spec not found" in result.stderr


def test_missing_or_foreign_inputs_are_refused_before_a_cluster_starts(tmp_path):
    out = tmp_path / "outputs"
    missing = tmp_path / "nowhere"
    result = cli("run", "--data", str(missing), "--out", str(out))
    assert result.returncode == 3
    assert f"{missing}/fashion-mnist_train.csv: no such file (split 'train')" in result.stderr
    assert not out.exists()  # refused before a run (or its cluster) started
    assert "Dask dashboard" not in result.stderr
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for split in ("train", "test"):
        (foreign / f"fashion-mnist_{split}.csv").write_text("name,price\nshoe,3\n")
    result = cli("run", "--data", str(foreign), "--out", str(out))
    assert result.returncode == 3 and "fashion-mnist_train.csv" in result.stderr
    assert not out.exists()


def test_idx_reader_rejects_truncated_file(tmp_path, real_dir):
    truncated = tmp_path / "train-images-idx3-ubyte"
    truncated.write_bytes(gzip.open(real_dir / "train-images-idx3-ubyte.gz").read(
        )[:16 + 784 * 3 + 5])
    with pytest.raises(ValueError, match="header says"):
        read_idx(truncated)
