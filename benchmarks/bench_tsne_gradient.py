"""The t-SNE fit with openTSNE's FFT gradient against ours (``OverlappedFFTGradient``).

Input: all 70,000 Fashion-MNIST images scaled to [0, 1] and reduced to 10 components with
``sklearn.decomposition.PCA(10, random_state=0)``, as in ``bench_sample_models.py``.

1. One gradient evaluation (medians of ``--calls``) on those rows' affinities
   (perplexity 30) at the embedding reached after the early exaggeration: openTSNE's
   ``kl_divergence_fft`` on 2 threads (the reference), ours on 2 threads, and the parts:
   the repulsion alone (openTSNE's, one thread, the floor of a step here: nothing else can
   run while it holds the GIL but compiled code), openTSNE's attraction on 1 and 2
   threads, ours on one thread.
2. The whole fit, ``TSNEEmbedding(n_jobs=2, random_state=0)`` with openTSNE's gradient
   function and optimiser (the reference) and with ours (``OverlappedFFTGradient`` and the
   fused update of ``_fused_descent_class``), alternating, ``--repeats`` each: seconds,
   KL divergence and trustworthiness (5 neighbours, 5,000 points).

Reproduce::

    source .venv/bin/activate
    python benchmarks/bench_tsne_gradient.py --repeats 3 --json /tmp/bench_tsne_gradient.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import openTSNE
from bench_sample_models import load_projected
from openTSNE import _tsne
from openTSNE.tsne import kl_divergence_fft

import fmnist_dask.models.tsne as tsne_module
from fmnist_dask.models.tsne import (
    KDTreeNeighbors,
    OverlappedFFTGradient,
    TSNEEmbedding,
    _attraction_rows,
    subsample_trustworthiness,
)
from fmnist_dask.models.tsne import _fused_descent_class as fused_descent_class

FFT = {"n_interpolation_points": 3, "min_num_intervals": 50, "ints_in_interval": 4.0}


class OpenTSNEGradient:
    """openTSNE's own ``kl_divergence_fft``, in the place of ours (the reference)."""

    def close(self) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[float, np.ndarray]:
        return kl_divergence_fft(*args, **kwargs)


def median_ms(fn: Callable[[], Any], calls: int) -> float:
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def gradient_parts(X: np.ndarray, calls: int) -> dict[str, float]:
    index = KDTreeNeighbors(X, 90, n_jobs=2)
    affinities = openTSNE.affinity.MultiscaleMixture(perplexities=[30], knn_index=index,
                                                     n_jobs=2, random_state=0)
    P = affinities.P
    start = openTSNE.initialization.pca(X, random_state=0)
    embedding = openTSNE.TSNEEmbedding(start, affinities, n_jobs=2, random_state=0,
                                       negative_gradient_method="fft", **FFT)
    embedding = embedding.optimize(250, exaggeration=12, momentum=0.5,
                                   learning_rate=len(X) / 12)
    points = np.ascontiguousarray(embedding, dtype=np.float64)
    zeros = np.zeros_like(points)

    def openTSNE_attraction(threads: int) -> None:
        _tsne.estimate_positive_gradient_nn(P.indices, P.indptr, P.data, points, points,
                                            zeros.copy(), 1, num_threads=threads)

    out = {
        "opentsne_gradient_2_threads_ms": median_ms(
            lambda: kl_divergence_fft(points, P, 1, FFT, n_jobs=2), calls),
        "repulsion_1_thread_ms": median_ms(
            lambda: _tsne.estimate_negative_gradient_fft_2d(points, zeros.copy(), **FFT),
            calls),
        "opentsne_attraction_1_thread_ms": median_ms(lambda: openTSNE_attraction(1), calls),
        "opentsne_attraction_2_threads_ms": median_ms(lambda: openTSNE_attraction(2), calls),
        "our_attraction_1_thread_ms": median_ms(
            lambda: _attraction_rows(P.indices, P.indptr, P.data, points, zeros.copy(), 0,
                                     len(points)), calls),
    }
    with OverlappedFFTGradient() as ours:
        out["our_gradient_2_threads_ms"] = median_ms(lambda: ours(points, P, 1, FFT, n_jobs=2),
                                                     calls)
        out["our_head_share"] = ours.head_share
    out["gradient_ratio"] = out["opentsne_gradient_2_threads_ms"] / out["our_gradient_2_threads_ms"]
    out["nnz"] = int(P.nnz)
    return out


def fit_once(X: np.ndarray, side: str) -> dict[str, float]:
    from openTSNE.tsne import gradient_descent

    if side == "opentsne":  # what TSNEEmbedding.fit builds, set back to openTSNE's own
        tsne_module.OverlappedFFTGradient = OpenTSNEGradient
        tsne_module._fused_descent_class = lambda: gradient_descent
    try:
        start = time.perf_counter()
        model = TSNEEmbedding(n_jobs=2, random_state=0).fit(X)
        seconds = time.perf_counter() - start
    finally:
        tsne_module.OverlappedFFTGradient = OverlappedFFTGradient
        tsne_module._fused_descent_class = fused_descent_class
    return {"seconds": seconds, "kl_divergence": model.kl_divergence_,
            "trustworthiness": subsample_trustworthiness(X, model.embedding_),
            "load1": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    X = np.asarray(load_projected()[0], dtype=np.float64)
    result: dict[str, Any] = {"rows": len(X), "load1_start": os.getloadavg()[0]}
    result["step"] = gradient_parts(X, args.calls)
    print(json.dumps(result["step"], indent=1))
    runs: dict[str, list] = {"opentsne": [], "ours": []}
    for _ in range(args.repeats):
        for side in ("opentsne", "ours"):
            runs[side].append(fit_once(X, side))
            print(side, json.dumps(runs[side][-1]))
    result["fits"] = runs
    medians = {side: statistics.median(r["seconds"] for r in rs) for side, rs in runs.items()}
    result["fit_medians_s"] = medians
    result["fit_ratio"] = medians["opentsne"] / medians["ours"]
    result["load1_end"] = os.getloadavg()[0]
    print(json.dumps({k: result[k] for k in ("fit_medians_s", "fit_ratio", "load1_start",
                                            "load1_end")}))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
