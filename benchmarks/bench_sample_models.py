"""Benchmark of the sample-based models against scikit-learn, on the 70,000 Fashion-MNIST images.

Input: all 70,000 images scaled to float32 [0, 1], reduced to 10 components with
``sklearn.decomposition.PCA(10, random_state=0)`` (the original analysis's input).

* ``FastSpectralClustering(n_clusters=10, random_state=0)`` against
  ``sklearn.cluster.SpectralClustering(n_clusters=10, affinity="nearest_neighbors",
  random_state=0)``: wall time, exact silhouette on the PCA space
  (``sklearn.metrics.silhouette_score`` on all rows), NMI / ACC / ARI against the labels, and
  the ARI between the two partitions.
* ``TSNEEmbedding(n_jobs=2, random_state=0)`` (openTSNE, FFT) against
  ``sklearn.manifold.TSNE(n_components=2, random_state=0)`` (Barnes-Hut): wall time and
  trustworthiness (5 neighbours) on the same 5,000 uniformly drawn points.

Both sides run in this one process on the same machine. Ours runs ``--repeats`` times and the
reference ``--ref-repeats`` times (scikit-learn's take minutes each), interleaved so that a
change of load hits both; times are medians and the ratio is reference median / our median.
The 1-minute load average is recorded with every run (other jobs may share the CPU).
``--scaling 5000,10000,20000`` also times both on uniform subsamples of those sizes.

Reproduce::

    source .venv/bin/activate
    python benchmarks/bench_sample_models.py --repeats 3 --ref-repeats 1 \\
        --json /tmp/bench_sample_models.json
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.cluster import SpectralClustering
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.metrics import adjusted_rand_score, silhouette_score
from sklearn.metrics.cluster import contingency_matrix

from fmnist_dask.fetch import load_split
from fmnist_dask.metrics import external_scores
from fmnist_dask.models.spectral import FastSpectralClustering
from fmnist_dask.models.tsne import TSNEEmbedding, subsample_trustworthiness

DATA = Path(os.environ.get(
    "FMNIST_MIRROR", Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"))
SEED = 0


def load_projected() -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 images on 10 principal components (float32) and their labels."""
    (a, ya), (b, yb) = load_split(DATA, "train"), load_split(DATA, "test")
    images = (np.concatenate([a, b]) / np.float32(255)).astype(np.float32)
    return PCA(10, random_state=SEED).fit_transform(images), np.concatenate([ya, yb])


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any, float]:
    """Wall time and CPU time (all threads of this process) of fn(), its result, and the
    1-minute load average after it."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - start, time.process_time() - cpu, out, os.getloadavg()[0]


def interleaved(
    ours: Callable[[], Any], reference: Callable[[], Any], repeats: int, ref_repeats: int,
    label: str,
) -> dict[str, Any]:
    """Run ours ``repeats`` and the reference ``ref_repeats`` times, alternating."""
    runs: dict[str, dict[str, list]] = {
        side: {"times_s": [], "cpu_s": [], "load1": [], "outputs": []}
        for side in ("ours", "reference")
    }
    order = []
    for i in range(max(repeats, ref_repeats)):
        if i < repeats:
            order.append("ours")
        if i < ref_repeats:
            order.append("reference")
    for side in order:
        seconds, cpu, out, load1 = timed(ours if side == "ours" else reference)
        runs[side]["times_s"].append(seconds)
        runs[side]["cpu_s"].append(cpu)
        runs[side]["load1"].append(load1)
        runs[side]["outputs"].append(out)
        print(f"  {label} {side}: {seconds:8.2f} s wall {cpu:8.2f} s cpu  load1={load1:.1f}",
              flush=True)
    for side in runs.values():
        side["median_s"] = statistics.median(side["times_s"])
        side["median_cpu_s"] = statistics.median(side["cpu_s"])
    runs["ratio"] = runs["reference"]["median_s"] / runs["ours"]["median_s"]
    print(f"{label}: reference {runs['reference']['median_s']:.1f} s / ours "
          f"{runs['ours']['median_s']:.1f} s = {runs['ratio']:.1f}x", flush=True)
    return runs


def cluster_scores(X: np.ndarray, y: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Exact silhouette on X plus ACC / NMI / ARI against the true classes."""
    scores = external_scores(contingency_matrix(y, labels))
    scores["silhouette"] = float(silhouette_score(X, labels))
    return {k: float(v) for k, v in scores.items()}


def bench_spectral(X: np.ndarray, y: np.ndarray, repeats: int, ref_repeats: int) -> dict:
    def ours() -> np.ndarray:
        return FastSpectralClustering(n_clusters=10, random_state=SEED).fit_predict(X)

    def reference() -> np.ndarray:
        model = SpectralClustering(n_clusters=10, affinity="nearest_neighbors", random_state=SEED)
        return model.fit_predict(X)

    runs = interleaved(ours, reference, repeats, ref_repeats, f"spectral n={X.shape[0]}")
    ours_labels = runs["ours"]["outputs"][0]
    ref_labels = runs["reference"]["outputs"][0]
    for side in ("ours", "reference"):
        first = runs[side]["outputs"][0]
        runs[side]["same_labels_every_run"] = all(
            np.array_equal(first, o) for o in runs[side]["outputs"])
        runs[side]["scores"] = cluster_scores(X, y, first)
        del runs[side]["outputs"]
    runs["ari_ours_vs_reference"] = float(adjusted_rand_score(ref_labels, ours_labels))
    print(json.dumps({k: runs[k]["scores"] for k in ("ours", "reference")}, indent=1))
    return runs


def bench_tsne(X: np.ndarray, repeats: int, ref_repeats: int, trust_points: int) -> dict:
    pickled_bytes = []

    def ours() -> tuple[np.ndarray, float]:
        model = TSNEEmbedding(n_components=2, n_jobs=2, random_state=SEED).fit(X)
        pickled_bytes.append(len(pickle.dumps(model)))  # what travels to the workers
        return model.embedding_, model.kl_divergence_

    def reference() -> tuple[np.ndarray, float]:
        model = TSNE(n_components=2, random_state=SEED)
        return model.fit_transform(X), float(model.kl_divergence_)

    runs = interleaved(ours, reference, repeats, ref_repeats, f"tsne n={X.shape[0]}")
    for side in ("ours", "reference"):
        trust = [
            subsample_trustworthiness(X, emb, n_points=trust_points, random_state=SEED)
            for emb, _ in runs[side]["outputs"]
        ]
        runs[side]["trustworthiness"] = trust
        runs[side]["trustworthiness_median"] = statistics.median(trust)
        runs[side]["kl_divergence"] = [kl for _, kl in runs[side]["outputs"]]
        del runs[side]["outputs"]
    runs["trust_points"] = min(trust_points, X.shape[0])
    runs["ours"]["pickled_estimator_bytes"] = pickled_bytes[0]
    print(f"  trustworthiness ours {runs['ours']['trustworthiness']} "
          f"reference {runs['reference']['trustworthiness']}", flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of ours")
    parser.add_argument("--ref-repeats", type=int, default=1, help="runs of scikit-learn")
    parser.add_argument("--only", choices=("spectral", "tsne"), default=None)
    parser.add_argument("--trust-points", type=int, default=5000)
    parser.add_argument("--scaling", default="", help="comma-separated subsample sizes")
    parser.add_argument("--scaling-repeats", type=int, default=3)
    parser.add_argument("--skip-full", action="store_true", help="only the --scaling sizes")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()

    X, y = load_projected()
    cores = os.cpu_count()
    print(f"data {X.shape} {X.dtype}; cores={cores}; load1={os.getloadavg()[0]:.1f}", flush=True)
    results: dict[str, Any] = {"n": int(X.shape[0]), "cores": cores, "runs": {}}

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))

    sizes = [int(s) for s in args.scaling.split(",") if s]
    rng = np.random.default_rng(SEED)
    for n in sizes:
        keep = np.sort(rng.choice(X.shape[0], n, replace=False))
        if args.only in (None, "spectral"):
            results["runs"][f"spectral_{n}"] = bench_spectral(
                X[keep], y[keep], args.scaling_repeats, args.scaling_repeats)
        if args.only in (None, "tsne"):
            results["runs"][f"tsne_{n}"] = bench_tsne(
                X[keep], args.scaling_repeats, args.scaling_repeats, args.trust_points)
        save()
    if args.skip_full:
        return
    if args.only in (None, "spectral"):
        results["runs"]["spectral"] = bench_spectral(X, y, args.repeats, args.ref_repeats)
        save()
    if args.only in (None, "tsne"):
        results["runs"]["tsne"] = bench_tsne(X, args.repeats, args.ref_repeats, args.trust_points)
        save()


if __name__ == "__main__":
    main()
