"""Cluster quality of ManifoldClustering on the 70,000 Fashion-MNIST images, over several seeds.

For each seed: a uniform sample of ``--n-sample`` rows (all 70,000 by default, the job's default
sample cap) is fitted in this process with ``ManifoldClustering(random_state=seed)`` (no label
is passed), then every row is labelled per block on a LocalCluster (2 workers x 1 thread) with
``predict``; the labels are read only afterwards, to count the contingency table and score it
(ACC by Hungarian matching, NMI, ARI, from :func:`fmnist_dask.metrics.external_scores`). As a
reference, the original analysis's PCA(50) + k-means(10) (scikit-learn, same seed) is scored on
the same rows.

Prints one row per seed, then mean +- sd, and the 1-minute load average (other jobs may share
the CPU, which stretches wall times).

Reproduce (about 10-20 min per seed on 2 free cores; more under load)::

    source .venv/bin/activate
    python benchmarks/bench_quality.py --seeds 0 1 2 3 4 --json /tmp/bench_quality.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import dask.array as da
import numpy as np

from fmnist_dask.fetch import load_split
from fmnist_dask.metrics import contingency, external_scores
from fmnist_dask.models.manifold import ManifoldClustering
from fmnist_dask.sampling import choose_sample_indices

DATA = Path(os.environ.get(
    "FMNIST_MIRROR", Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"))
CHUNK_ROWS = 10_000


def load() -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 images as float32 in [0, 1] (train then test) and their labels."""
    (a, ya), (b, yb) = load_split(DATA, "train"), load_split(DATA, "test")
    return (np.concatenate([a, b]) / np.float32(255)).astype(np.float32), np.concatenate([ya, yb])


def baseline(X: np.ndarray, seed: int) -> np.ndarray:
    """The original analysis: PCA(50) then k-means(10) on the pixels (scikit-learn)."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    Z = PCA(50, random_state=seed).fit_transform(X)
    return KMeans(10, n_init=10, random_state=seed).fit_predict(Z)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--n-sample", type=int, default=70_000, help="rows the model fits on")
    parser.add_argument("--no-baseline", action="store_true", help="skip PCA + k-means")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)  # UMAP's seed/threads notice

    from distributed import Client, LocalCluster

    X, y = load()
    rows: list[dict] = []
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None,
                      memory_limit="6GiB") as cluster, Client(cluster):
        Xd = da.from_array(X, chunks=(CHUNK_ROWS, X.shape[1])).persist()
        for seed in args.seeds:
            idx = choose_sample_indices(len(X), args.n_sample, random_state=seed)
            t0 = time.perf_counter()
            model = ManifoldClustering(random_state=seed).fit(X[idx], sample_indices=idx)
            t1 = time.perf_counter()
            labels = model.predict(Xd).compute()
            t2 = time.perf_counter()
            scores = external_scores(contingency(y, labels, 10, model.n_clusters))
            row = {"seed": seed, "n_sample": len(idx), **scores, "fit_s": t1 - t0,
                   "predict_s": t2 - t1, "load1": os.getloadavg()[0]}
            if not args.no_baseline:
                b = baseline(X, seed)
                row.update({f"baseline_{k}": v for k, v in
                            external_scores(contingency(y, b, 10, 10)).items()})
            rows.append(row)
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in row.items()), flush=True)
    print(f"\nManifoldClustering, {len(rows)} seeds, sample {args.n_sample}, "
          f"all {len(X):,} rows scored")
    keys = ["acc", "nmi", "ari", "fit_s", "predict_s"]
    if not args.no_baseline:
        keys += ["baseline_acc", "baseline_nmi", "baseline_ari"]
    for k in keys:
        values = [r[k] for r in rows]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{k:14s} {statistics.mean(values):8.3f} +- {sd:.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
