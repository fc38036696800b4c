"""k-means on the 70,000 Fashion-MNIST images: scikit-learn, and DaskKMeans on both paths.

Interleaved per seed (scikit-learn, DaskKMeans in one task, DaskKMeans across the workers
with ``max_local_bytes=0``), so that a load change on a shared machine hits all three
alike. Same LocalCluster as ``bench_core.py`` (2 workers x 1 thread, 4 persisted row
blocks); scikit-learn in this process with all cores; equal numbers of runs on both sides.

Reproduce::

    python benchmarks/bench_kmeans_paths.py --repeats 3 --json /tmp/bench_kmeans_paths.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import dask
import dask.array as da
import numpy as np
from bench_core import CHUNK_ROWS, load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*large graph.*")

    from distributed import Client, LocalCluster
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    from fmnist_dask.models.kmeans import DaskKMeans

    X = load()
    Zn = PCA(10, random_state=0).fit_transform(X).astype(np.float32)
    out: dict = {"load_at_start": os.getloadavg()}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None, memory_limit="6GiB") as cluster, \
            Client(cluster):
        dX = da.from_array(X, chunks=(CHUNK_ROWS, X.shape[1])).persist()
        Z = da.from_array(Zn, chunks=(CHUNK_ROWS, 10)).persist()
        dask.compute(dX.sum(), Z.sum())  # data on the workers before timing
        cases = (("PCA-10", Z, Zn, 1), ("PCA-10", Z, Zn, 10), ("raw", dX, X, 1),
                 ("raw", dX, X, 3))
        for name, data, arr, n_init in cases:
            times: dict[str, list[float]] = {"sklearn": [], "one task": [], "across": []}
            loads = []
            for seed in range(args.repeats):
                for label in times:
                    t = time.perf_counter()
                    if label == "sklearn":
                        KMeans(10, n_init=n_init, random_state=seed).fit(arr)
                    else:
                        DaskKMeans(10, n_init=n_init, random_state=seed,
                                   max_local_bytes=None if label == "one task" else 0).fit(data)
                    times[label].append(time.perf_counter() - t)
                loads.append(os.getloadavg()[0])
            med = {k: statistics.median(v) for k, v in times.items()}
            key = f"{name} n_init={n_init}"
            out[key] = {"median_s": med, "times_s": times, "load1": loads}
            print(f"{key:18s} sklearn {med['sklearn']:.2f} s, one task {med['one task']:.2f} s, "
                  f"across {med['across']:.2f} s; one task / sklearn "
                  f"{med['one task'] / med['sklearn']:.2f}, across / one task "
                  f"{med['across'] / med['one task']:.2f}; load {loads}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
