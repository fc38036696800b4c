"""Shared fixtures: the real Fashion-MNIST files from the mirror beside the project."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fmnist_dask.fetch import MIRROR_ENV, load_split

REPO = Path(__file__).resolve().parents[1]


def real_data_dir() -> Path | None:
    """The directory holding the official IDX files, or None when it is not here."""
    candidates = [os.environ.get(MIRROR_ENV), REPO.parent / "shared" / "data" / "fashion-mnist"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "train-images-idx3-ubyte.gz").exists():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def real_dir() -> Path:
    """Path of the real data; fails (never skips) in CI when the data is missing."""
    found = real_data_dir()
    if found is None:
        message = f"real Fashion-MNIST files not found (set ${MIRROR_ENV} or ../shared/data)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture(scope="session")
def real_arrays(real_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images, labels), "test": (images, labels)}`` as uint8 numpy arrays."""
    return {split: load_split(real_dir, split) for split in ("train", "test")}


@pytest.fixture(scope="session")
def real_scaled(real_arrays) -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 images scaled to float32 [0, 1] (train then test) and their labels."""
    images = np.concatenate([real_arrays["train"][0], real_arrays["test"][0]])
    labels = np.concatenate([real_arrays["train"][1], real_arrays["test"][1]])
    return (images / np.float32(255)).astype(np.float32), labels


@pytest.fixture(scope="session")
def dask_client():
    """One real LocalCluster (2 workers x 1 thread) shared by the tests that need it."""
    from distributed import Client, LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
        memory_limit="4GiB",
    ) as cluster, Client(cluster) as client:
        yield client
