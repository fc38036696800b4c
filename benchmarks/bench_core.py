"""Benchmark of the scalable core: PCA(10) + k-means(10) on the 70,000 Fashion-MNIST images.

Compares, on the same float32 [0, 1] array and the same machine:

* fmnist_dask (DaskPCA, DaskKMeans) on a LocalCluster of 2 workers x 1 thread, against
  scikit-learn in one process (PCA + KMeans, all cores): the default settings of each
  (DaskKMeans runs n_init="auto" = 10 runs on 10 features, 3 on 784; scikit-learn 1),
  and at equal work (the same number of runs on both sides);
* DaskKMeans against dask_ml.cluster.KMeans (same cluster, same persisted array);
* DaskPCA against dask_ml.decomposition.PCA / IncrementalPCA (explained variance);
* the exact distributed silhouette against sklearn.metrics.silhouette_score.

Medians of ``--repeats`` runs (seeds 0, 1, ...) and their ratios; inertias are reported
as true sums of squared distances (dask-ml's own ``inertia_`` is also shown). The load
average is printed with every measurement because other jobs may share the CPU.

Reproduce::

    source .venv/bin/activate
    python benchmarks/bench_core.py --repeats 3 --json /tmp/bench_core.json

``--quick`` skips the equal-work and dask-ml comparisons, ``--no-dask-ml`` only the
dask-ml ones, ``--no-silhouette`` the silhouettes; ``--sklearn-sil-raw`` runs
scikit-learn's 70,000 x 784 silhouette instead of extrapolating it from 20,000 rows
(O(n^2)); ``--rows N`` is a smoke test on N rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from fmnist_dask.fetch import load_split

DATA = Path(os.environ.get(
    "FMNIST_MIRROR", Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"))
CHUNK_ROWS = 17500  # 4 blocks of 70,000 rows: 2 per worker


def load() -> np.ndarray:
    """All 70,000 images as float32 in [0, 1] (train then test)."""
    (a, _), (b, _) = load_split(DATA, "train"), load_split(DATA, "test")
    return (np.concatenate([a, b]) / np.float32(255)).astype(np.float32)


def timed(fn: Callable[[], Any]) -> tuple[float, Any, float]:
    """Wall time of fn(), its result, and the 1-minute load average after it."""
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out, os.getloadavg()[0]


def run(name: str, fn: Callable[[int], dict], repeats: int, log: dict) -> list[dict]:
    """Run fn(seed) for seeds 0..repeats-1; record times, median, results and loads."""
    times, outs, loads = [], [], []
    for seed in range(repeats):
        t, out, load1 = timed(lambda seed=seed: fn(seed))
        times.append(t)
        outs.append(out)
        loads.append(load1)
        print(f"  {name} seed={seed}: {t:7.2f} s  load={load1:.1f}  {out}", flush=True)
    log["runs"][name] = {"times_s": times, "median_s": statistics.median(times),
                         "load1": loads, "results": outs}
    print(f"{name}: median {statistics.median(times):.2f} s", flush=True)
    return outs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dask-ml-repeats", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-silhouette", action="store_true")
    parser.add_argument("--no-dask-ml", action="store_true")
    parser.add_argument("--sklearn-sil-raw", action="store_true")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*large graph.*")
    warnings.filterwarnings("ignore", category=FutureWarning)

    from distributed import Client, LocalCluster
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_score

    from fmnist_dask.metrics import silhouette_exact, sum_of_squares
    from fmnist_dask.models.kmeans import DaskKMeans
    from fmnist_dask.models.pca import DaskPCA

    X = load()
    if args.rows:
        X = X[: args.rows]
    n, d = X.shape
    log: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "load_at_start": os.getloadavg()},
        "data": {"n": n, "d": d}, "runs": {},
    }
    print(f"data {X.shape} {X.dtype}; load at start {os.getloadavg()}", flush=True)
    R = args.repeats

    # --- scikit-learn, one process ------------------------------------------------------
    def sk_pca_kmeans(n_init: int) -> Callable[[int], dict]:
        def fit(seed: int) -> dict:
            Z = PCA(n_components=10, random_state=seed).fit_transform(X)
            km = KMeans(n_clusters=10, n_init=n_init, random_state=seed).fit(Z)
            return {"inertia": float(km.inertia_), "n_iter": int(km.n_iter_)}
        return fit

    def sk_kmeans(data: np.ndarray, n_init: int) -> Callable[[int], dict]:
        def fit(seed: int) -> dict:
            km = KMeans(n_clusters=10, n_init=n_init, random_state=seed).fit(data)
            return {"inertia": float(km.inertia_), "n_iter": int(km.n_iter_)}
        return fit

    run("sklearn PCA+KMeans", sk_pca_kmeans(1), R, log)
    run("sklearn KMeans raw", sk_kmeans(X, 1), R, log)
    if not args.quick:
        run("sklearn PCA+KMeans n_init=10", sk_pca_kmeans(10), R, log)
        run("sklearn KMeans raw n_init=3", sk_kmeans(X, 3), R, log)
    run("sklearn PCA fit", lambda s: PCA(10).fit(X) and {}, R, log)

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None, memory_limit="6GiB") as cluster, \
            Client(cluster) as client:
        chunk_rows = min(CHUNK_ROWS, -(-n // 4))
        dX = da.from_array(X, chunks=(chunk_rows, d)).persist()
        client.wait_for_workers(2)
        dask.compute(dX.sum())  # data on the workers before timing

        def ours_pca_kmeans(n_init: int | str) -> Callable[[int], dict]:
            def fit(seed: int) -> dict:
                pca = DaskPCA(n_components=10).fit(dX)
                Z = pca.transform(dX).persist()
                km = DaskKMeans(n_clusters=10, n_init=n_init, random_state=seed).fit(Z)
                return {"inertia": km.inertia_, "n_iter": km.n_iter_,
                        "runs": len(km.inertia_per_run_)}
            return fit

        def ours_kmeans(data: da.Array, n_init: int | str) -> Callable[[int], dict]:
            def fit(seed: int) -> dict:
                km = DaskKMeans(n_clusters=10, n_init=n_init, random_state=seed).fit(data)
                return {"inertia": km.inertia_, "n_iter": km.n_iter_,
                        "runs": len(km.inertia_per_run_)}
            return fit

        run("ours PCA+KMeans", ours_pca_kmeans("auto"), R, log)
        run("ours KMeans raw", ours_kmeans(dX, "auto"), R, log)
        run("ours PCA fit", lambda s: DaskPCA(10).fit(dX) and {}, R, log)
        Z = DaskPCA(n_components=10).fit(dX).transform(dX).persist()
        Zn = Z.compute()
        run("ours KMeans PCA-10", ours_kmeans(Z, "auto"), R, log)
        run("sklearn KMeans PCA-10", sk_kmeans(Zn, 1), R, log)
        if not args.quick:
            run("ours PCA+KMeans n_init=1", ours_pca_kmeans(1), R, log)
            run("ours KMeans raw n_init=1", ours_kmeans(dX, 1), R, log)
            run("ours KMeans PCA-10 n_init=1", ours_kmeans(Z, 1), R, log)
            run("sklearn KMeans PCA-10 n_init=10", sk_kmeans(Zn, 10), R, log)
        if not args.quick and not args.no_dask_ml:
            from dask_ml.cluster import KMeans as DMLKMeans

            def dml_kmeans(data: da.Array) -> Callable[[int], dict]:
                def fit(seed: int) -> dict:
                    km = DMLKMeans(n_clusters=10, random_state=seed).fit(data)
                    true = sum_of_squares(data, km.labels_, km.cluster_centers_)
                    return {"inertia": true, "inertia_reported": float(km.inertia_),
                            "n_iter": int(km.n_iter_)}
                return fit

            run("dask-ml KMeans PCA-10", dml_kmeans(Z), args.dask_ml_repeats, log)
            run("dask-ml KMeans raw", dml_kmeans(dX), args.dask_ml_repeats, log)
            pca_variants(dX, X, chunk_rows, log)

        if not args.no_silhouette:
            sil = log["silhouette"] = {}
            labels_p = DaskKMeans(n_clusters=10, random_state=0).fit(Z).labels_.persist()
            lab_p = labels_p.compute()
            measure(sil, f"ours exact {n}x10", lambda: silhouette_exact(Z, labels_p))
            measure(sil, f"sklearn {n}x10", lambda: float(silhouette_score(Zn, lab_p)))
            labels_r = DaskKMeans(n_clusters=10, random_state=0).fit(dX).labels_.persist()
            lab_r = labels_r.compute()
            for name, dt in (("float32", np.float32), ("float64", np.float64)):
                measure(sil, f"ours exact {n}x{d} {name}",
                        lambda dt=dt: silhouette_exact(dX, labels_r, dtype=dt))
            if args.sklearn_sil_raw:
                measure(sil, f"sklearn {n}x{d}", lambda: float(silhouette_score(X, lab_r)))
            else:
                m = min(20000, n)
                row = measure(sil, f"sklearn {m}x{d}",
                              lambda: float(silhouette_score(X[:m], lab_r[:m])))
                sil[f"sklearn {n}x{d} extrapolated n^2 s"] = row["time_s"] * (n / m) ** 2

    summarise(log)
    log["machine"]["load_at_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(log, indent=1, default=float))


def measure(store: dict, name: str, fn: Callable[[], float]) -> dict:
    t, value, load1 = timed(fn)
    store[name] = {"time_s": t, "value": value, "load1": load1}
    print(f"  silhouette {name}: {t:.1f} s value={value:.7f} load={load1:.1f}", flush=True)
    return store[name]


def pca_variants(dX: da.Array, X: np.ndarray, chunk_rows: int, log: dict) -> None:
    """Explained variance of DaskPCA and dask-ml's PCAs against scikit-learn's."""
    from dask_ml.decomposition import PCA as DMLPCA
    from dask_ml.decomposition import IncrementalPCA
    from sklearn.decomposition import PCA

    from fmnist_dask.models.pca import DaskPCA

    ref = PCA(n_components=10).fit(X.astype(np.float64)).explained_variance_ratio_
    variants = {
        "DaskPCA": lambda: DaskPCA(10).fit(dX),
        "dask_ml IncrementalPCA (default solver)":
            lambda: IncrementalPCA(n_components=10, batch_size=chunk_rows).fit(dX),
        "dask_ml IncrementalPCA svd_solver=full":
            lambda: IncrementalPCA(n_components=10, batch_size=chunk_rows,
                                   svd_solver="full").fit(dX),
        "dask_ml PCA svd_solver=full": lambda: DMLPCA(10, svd_solver="full").fit(dX),
        "dask_ml PCA svd_solver=tsqr": lambda: DMLPCA(10, svd_solver="tsqr").fit(dX),
    }
    out = log["pca_variants"] = {}
    for name, fit in variants.items():
        try:
            t, model, load1 = timed(fit)
            evr = np.asarray(model.explained_variance_ratio_, dtype=float)
            row = {"time_s": t, "load1": load1, "evr_sum": float(evr.sum()),
                   "max_abs_evr_diff_vs_sklearn_f64": float(np.abs(evr - ref).max())}
        except Exception as exc:  # reported, not hidden: some variants fail
            row = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        out[name] = row
        print(f"  PCA variant {name}: {row}", flush=True)


def summarise(log: dict) -> None:
    """Ratios of medians (ours / reference) and inertia ratios seed by seed."""
    runs = log["runs"]
    pairs = {
        "PCA+KMeans defaults": ("ours PCA+KMeans", "sklearn PCA+KMeans"),
        "PCA+KMeans same runs (10)": ("ours PCA+KMeans", "sklearn PCA+KMeans n_init=10"),
        "PCA+KMeans one run": ("ours PCA+KMeans n_init=1", "sklearn PCA+KMeans"),
        "KMeans raw defaults": ("ours KMeans raw", "sklearn KMeans raw"),
        "KMeans raw same runs (3)": ("ours KMeans raw", "sklearn KMeans raw n_init=3"),
        "KMeans raw one run": ("ours KMeans raw n_init=1", "sklearn KMeans raw"),
        "KMeans PCA-10 defaults": ("ours KMeans PCA-10", "sklearn KMeans PCA-10"),
        "KMeans PCA-10 same runs (10)": ("ours KMeans PCA-10",
                                         "sklearn KMeans PCA-10 n_init=10"),
        "KMeans PCA-10 one run": ("ours KMeans PCA-10 n_init=1", "sklearn KMeans PCA-10"),
        "PCA fit": ("ours PCA fit", "sklearn PCA fit"),
        "vs dask-ml raw, one run each": ("ours KMeans raw n_init=1", "dask-ml KMeans raw"),
        "vs dask-ml PCA-10, one run each": ("ours KMeans PCA-10 n_init=1",
                                            "dask-ml KMeans PCA-10"),
    }
    summary = log["summary"] = {}
    for label, (ours, ref) in pairs.items():
        if ours not in runs or ref not in runs:
            continue
        a, b = runs[ours], runs[ref]
        row = {"ours_median_s": a["median_s"], "ref_median_s": b["median_s"],
               "time_ratio_ours_over_ref": a["median_s"] / b["median_s"]}
        if "inertia" in (a["results"][0] or {}) and "inertia" in (b["results"][0] or {}):
            row["inertia_ratio_ours_over_ref"] = [  # seed by seed, as far as both ran
                x["inertia"] / y["inertia"]
                for x, y in zip(a["results"], b["results"], strict=False)]
        summary[label] = row
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
