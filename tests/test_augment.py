"""Augmented datasets: deterministic, labels and source ids kept, readable by the job."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from fmnist_dask.augment import augment
from fmnist_dask.config import AugmentSourceSpec, AugmentSpec, CleanSpec, DataSpec
from fmnist_dask.stages import clean as clean_stage
from fmnist_dask.stages.load import load
from tests.conftest import cli, pixels_of

N_TRAIN = 300  # source rows per split


def _source(real_dir: Path) -> AugmentSourceSpec:
    return AugmentSourceSpec(dir=str(real_dir), limit_rows=N_TRAIN)


def _read(out: Path, split: str) -> pd.DataFrame:
    frame = pd.read_parquet(out / split)
    return frame.sort_values(["source_row_id", "copy"]).reset_index(drop=True)


def test_augmentation_is_deterministic_and_keeps_labels_and_sources(tmp_path, real_dir,
                                                                    real_arrays, dask_client):
    spec = AugmentSpec(factor=3, seed=7, csv=True)
    first = augment(_source(real_dir), spec, tmp_path / "a")
    augment(_source(real_dir), spec, tmp_path / "b")
    augment(_source(real_dir), spec.model_copy(update={"seed": 8}), tmp_path / "c")
    assert first["rows"] == {"train": 3 * N_TRAIN, "test": 3 * N_TRAIN}
    a, b, c = (_read(tmp_path / d, "train") for d in "abc")
    pd.testing.assert_frame_equal(a, b)  # same seed, same dataset
    transformed = (a["copy"] > 0).to_numpy()
    assert (pixels_of(a)[transformed] != pixels_of(c)[transformed]).mean() > 0.3

    images, labels = real_arrays["train"]
    assert a["source_row_id"].tolist() == np.repeat(np.arange(N_TRAIN), 3).tolist()
    np.testing.assert_array_equal(a["label"], labels[a["source_row_id"]])
    assert sorted(a["copy"].unique()) == [0, 1, 2]
    assert a.loc[transformed, "aug_flip"].mean() > 0.3
    assert a["aug_rotation_deg"].abs().max() <= 10
    augmented = pixels_of(a)
    source = images[a["source_row_id"]].astype(np.float64)
    # Copy 0 is the source image itself, its parameters the identity.
    np.testing.assert_array_equal(augmented[~transformed], source[~transformed])
    identity = a.loc[~transformed, ["aug_shift_x", "aug_rotation_deg", "aug_brightness",
                                    "aug_noise_std"]]
    assert (identity == 0).all().all() and (a.loc[~transformed, "aug_contrast"] == 1).all()
    # Every other copy differs from its source, but stays close to it (small transforms).
    difference = np.abs(augmented - source).mean(axis=1)[transformed]
    assert (difference > 0).all() and np.median(difference) < 60
    test = _read(tmp_path / "a", "test")
    assert test["source_row_id"].min() == N_TRAIN  # row ids continue across splits
    np.testing.assert_array_equal(test["label"], real_arrays["test"][1][test["source_row_id"]
                                                                         - N_TRAIN])
    # The CSV shards hold the same rows in the Kaggle layout.
    shards = sorted((tmp_path / "a" / "csv" / "train").glob("*.csv"))
    from_csv = pd.concat([pd.read_csv(p) for p in shards])
    assert list(from_csv.columns[:2]) == ["label", "pixel1"]
    assert len(from_csv) == 3 * N_TRAIN
    assert (tmp_path / "a" / "augment_preview.png").read_bytes()[:4] == b"\x89PNG"


def test_factor_two_without_transforms_duplicates_every_row_once(tmp_path, real_dir,
                                                                 dask_client):
    spec = AugmentSpec(factor=2, shift=False, rotate=False, flip=False, jitter=False,
                       noise=False)
    out = tmp_path / "x2"
    augment(_source(real_dir), spec, out)
    data = DataSpec(format="parquet", dir=str(out), splits={"train": "train", "test": "test"})
    raw, pieces, files = load(data)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    counts = clean_stage.clean(raw, pieces, files, CleanSpec(), run_dir).as_dict()
    for split in ("train", "test"):
        assert counts[split] == {"read": 2 * N_TRAIN, "rejected": 0, "duplicates": N_TRAIN,
                                 "kept": N_TRAIN}


def test_job_runs_end_to_end_on_augmented_csv_shards(tmp_path, real_dir, dask_client):
    # In-process on the session's cluster; the stages nothing here checks (EDA, t-SNE,
    # silhouettes) are off.
    out = tmp_path / "aug"
    job = tmp_path / "job.yaml"
    job.write_text(
        "augment:\n  source: {limit_rows: 500}\n"
        "data:\n  format: csv\n  dir: " + str(out / "csv") + "\n"
        "  splits: {train: 'train/*.csv', test: 'test/*.csv'}\n"
        "eda: {enabled: false}\ntsne: {enabled: false}\nscores: {silhouette: 'off'}\n"
    )
    scheduler = ("--scheduler", dask_client.scheduler.address)
    result = cli("augment", "--factor", "2", "--out", str(out), "--source-dir", str(real_dir),
                 "--csv", "--seed", "3", str(job), *scheduler)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["rows"] == {"train": 1000, "test": 1000}
    result = cli("run", str(job), "--out", str(tmp_path / "runs"), "--run-name", "aug",
                 *scheduler)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "runs" / "aug" / "manifest.json").read_text())
    assert manifest["rows"]["total"]["kept"] == 2000
    metrics = pd.read_parquet(tmp_path / "runs" / "aug" / "metrics.parquet")
    assert set(metrics["method"]) == {"kmeans_raw", "kmeans_pca", "gmm", "spectral"}
    assert (metrics["nmi"] > 0.3).all()  # real structure survives the augmentation
    assert manifest["pixels"] == {"bytes": 2000 * 784, "in_worker_memory": True}
    # Above persist_max_bytes the pixels stream from parquet on every pass: same results.
    job.write_text(job.read_text() + "persist_max_bytes: 0\n")
    result = cli("run", str(job), "--out", str(tmp_path / "runs"), "--run-name", "streamed",
                 *scheduler)
    assert result.returncode == 0, result.stderr[-3000:]
    streamed = json.loads((tmp_path / "runs" / "streamed" / "manifest.json").read_text())
    assert streamed["pixels"]["in_worker_memory"] is False
    kept, read = (pd.read_parquet(tmp_path / "runs" / name / "assignments").sort_values("row_id")
                  for name in ("aug", "streamed"))
    pd.testing.assert_frame_equal(kept.reset_index(drop=True), read.reset_index(drop=True))
