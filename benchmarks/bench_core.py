"""Benchmark of the scalable core: PCA(10) + k-means(10) on the 70,000 Fashion-MNIST images.

Compares, on the same float32 [0, 1] array and the same machine:

* fmnist_dask (DaskPCA, DaskKMeans) on a LocalCluster of 2 workers x 1 thread, against
  scikit-learn in one process (PCA + KMeans, all cores);
* DaskKMeans against dask_ml.cluster.KMeans (same cluster, same persisted array);
* DaskPCA against dask_ml.decomposition.PCA / IncrementalPCA (explained variance);
* the exact distributed silhouette against sklearn.metrics.silhouette_score.

Medians of ``--repeats`` runs (seeds 0, 1, ...) and their ratios; the load average is
printed with every measurement because other jobs may share the CPU.

Reproduce::

    source .venv/bin/activate
    python benchmarks/bench_core.py --repeats 3 --json /tmp/bench_core.json

Options skip the slow parts (``--no-dask-ml``, ``--no-silhouette``, ``--sklearn-sil-raw``
to also run scikit-learn's 70,000 x 784 silhouette instead of extrapolating it).
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


def load() -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 images as float32 in [0, 1] (train then test) and their labels."""
    (a, ya), (b, yb) = load_split(DATA, "train"), load_split(DATA, "test")
    return (np.concatenate([a, b]) / np.float32(255)).astype(np.float32), np.concatenate([ya, yb])


def timed(fn: Callable[[], Any]) -> tuple[float, Any, float]:
    """Wall time of fn(), its result, and the 1-minute load average after it."""
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out, os.getloadavg()[0]


def run(name: str, fn: Callable[[int], Any], repeats: int, log: dict) -> list[Any]:
    """Run fn(seed) for seeds 0..repeats-1; record times, median and loads."""
    times, outs, loads = [], [], []
    for seed in range(repeats):
        t, out, load1 = timed(lambda seed=seed: fn(seed))
        times.append(t)
        outs.append(out)
        loads.append(load1)
        print(f"  {name} seed={seed}: {t:7.2f} s  load={load1:.1f}  {describe(out)}", flush=True)
    log[name] = {"times_s": times, "median_s": statistics.median(times), "load1": loads,
                 "results": [describe(o) for o in outs]}
    print(f"{name}: median {statistics.median(times):.2f} s", flush=True)
    return outs


def describe(out: Any) -> dict:
    if isinstance(out, dict):
        return {k: v for k, v in out.items() if isinstance(v, (int, float, str))}
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dask-ml-repeats", type=int, default=1)
    parser.add_argument("--no-dask-ml", action="store_true")
    parser.add_argument("--no-silhouette", action="store_true")
    parser.add_argument("--sklearn-sil-raw", action="store_true",
                        help="run sklearn's 70,000 x 784 silhouette (minutes) instead of "
                             "extrapolating it from 20,000 rows")
    parser.add_argument("--rows", type=int, default=None,
                        help="use only the first ROWS rows (smoke test of this script)")
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

    X, _ = load()
    if args.rows:
        X = X[: args.rows]
    n, d = X.shape
    log: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "load_at_start": os.getloadavg()},
        "data": {"n": n, "d": d, "chunk_rows": CHUNK_ROWS},
    }
    print(f"data {X.shape} {X.dtype}; load at start {os.getloadavg()}", flush=True)

    # --- scikit-learn, one process ------------------------------------------------------
    def sk_pca_kmeans(seed: int) -> dict:
        pca = PCA(n_components=10, random_state=seed)
        Z = pca.fit_transform(X)
        km = KMeans(n_clusters=10, random_state=seed).fit(Z)
        return {"inertia": float(km.inertia_), "n_iter": int(km.n_iter_),
                "evr_sum": float(pca.explained_variance_ratio_.sum())}

    def sk_kmeans_raw(seed: int) -> dict:
        km = KMeans(n_clusters=10, random_state=seed).fit(X)
        return {"inertia": float(km.inertia_), "n_iter": int(km.n_iter_)}

    sk_pk = run("sklearn PCA+KMeans (70000x784 -> 10)", sk_pca_kmeans, args.repeats, log)
    sk_raw = run("sklearn KMeans raw 70000x784", sk_kmeans_raw, args.repeats, log)

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None, memory_limit="6GiB") as cluster, \
            Client(cluster) as client:
        chunk_rows = min(CHUNK_ROWS, -(-n // 4))
        dX = da.from_array(X, chunks=(chunk_rows, d)).persist()
        client.wait_for_workers(2)
        dask.compute(dX.sum())  # data on the workers before timing

        def ours_pca_kmeans(seed: int) -> dict:
            pca = DaskPCA(n_components=10).fit(dX)
            Z = pca.transform(dX).persist()
            km = DaskKMeans(n_clusters=10, random_state=seed).fit(Z)
            del Z
            return {"inertia": km.inertia_, "n_iter": km.n_iter_,
                    "evr_sum": float(pca.explained_variance_ratio_.sum())}

        def ours_kmeans_raw(seed: int) -> dict:
            km = DaskKMeans(n_clusters=10, random_state=seed).fit(dX)
            return {"inertia": km.inertia_, "n_iter": km.n_iter_}

        ours_pk = run("fmnist_dask PCA+KMeans, 2 workers", ours_pca_kmeans, args.repeats, log)
        ours_raw = run("fmnist_dask KMeans raw, 2 workers", ours_kmeans_raw, args.repeats, log)

        # PCA alone, and the PCA-10 projection for the k-means comparisons below
        run("fmnist_dask PCA fit", lambda s: DaskPCA(10).fit(dX) and {}, args.repeats, log)
        run("sklearn PCA fit", lambda s: PCA(10).fit(X) and {}, args.repeats, log)
        pca = DaskPCA(n_components=10).fit(dX)
        Z = pca.transform(dX).persist()
        Zn = Z.compute()

        def ours_kmeans_pca(seed: int) -> dict:
            km = DaskKMeans(n_clusters=10, random_state=seed).fit(Z)
            return {"inertia": km.inertia_, "n_iter": km.n_iter_}

        def sk_kmeans_pca(seed: int) -> dict:
            km = KMeans(n_clusters=10, random_state=seed).fit(Zn)
            return {"inertia": float(km.inertia_), "n_iter": int(km.n_iter_)}

        ours_p = run("fmnist_dask KMeans on PCA-10", ours_kmeans_pca, args.repeats, log)
        sk_p = run("sklearn KMeans on PCA-10", sk_kmeans_pca, args.repeats, log)

        if not args.no_dask_ml:
            from dask_ml.cluster import KMeans as DMLKMeans
            from dask_ml.decomposition import PCA as DMLPCA
            from dask_ml.decomposition import IncrementalPCA

            def dml_kmeans(data: da.Array) -> Callable[[int], dict]:
                def fit(seed: int) -> dict:
                    km = DMLKMeans(n_clusters=10, random_state=seed).fit(data)
                    true = sum_of_squares(data, km.labels_, km.cluster_centers_)
                    return {"inertia_true": true, "inertia_reported": float(km.inertia_),
                            "n_iter": int(km.n_iter_)}
                return fit

            dml_p = run("dask-ml KMeans on PCA-10", dml_kmeans(Z), args.dask_ml_repeats, log)
            dml_raw = run("dask-ml KMeans raw", dml_kmeans(dX), args.dask_ml_repeats, log)
            log["ratio_dask_ml_over_ours_pca10"] = (
                log["dask-ml KMeans on PCA-10"]["median_s"]
                / log["fmnist_dask KMeans on PCA-10"]["median_s"])
            log["ratio_dask_ml_over_ours_raw"] = (
                log["dask-ml KMeans raw"]["median_s"]
                / log["fmnist_dask KMeans raw, 2 workers"]["median_s"])
            del dml_p, dml_raw

            ref = PCA(n_components=10, svd_solver="full").fit(X).explained_variance_ratio_
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
            log["pca_variants"] = {}
            for name, fit in variants.items():
                try:
                    t, model, load1 = timed(fit)
                    evr = np.asarray(model.explained_variance_ratio_, dtype=float)
                    row = {"time_s": t, "load1": load1, "evr_sum": float(evr.sum()),
                           "max_abs_evr_diff_vs_sklearn": float(np.abs(evr - ref).max())}
                except Exception as exc:  # report, do not hide: some variants fail
                    row = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                log["pca_variants"][name] = row
                print(f"  PCA variant {name}: {row}", flush=True)

        if not args.no_silhouette:
            labels_p = DaskKMeans(n_clusters=10, random_state=0).fit(Z).labels_.persist()
            lab_p = labels_p.compute()
            sil: dict[str, Any] = {}
            t, v, l1 = timed(lambda: silhouette_exact(Z, labels_p))
            sil["ours_exact_pca10"] = {"time_s": t, "value": v, "load1": l1}
            print(f"  silhouette ours {n}x10: {t:.1f} s value={v:.6f} load={l1:.1f}", flush=True)
            t, v, l1 = timed(lambda: float(silhouette_score(Zn, lab_p)))
            sil["sklearn_pca10"] = {"time_s": t, "value": v, "load1": l1}
            print(f"  silhouette sklearn {n}x10: {t:.1f} s value={v:.6f} load={l1:.1f}",
                  flush=True)

            labels_r = DaskKMeans(n_clusters=10, random_state=0).fit(dX).labels_.persist()
            lab_r = labels_r.compute()
            for name, dt in (("float32", np.float32), ("float64", np.float64)):
                t, v, l1 = timed(lambda dt=dt: silhouette_exact(dX, labels_r, dtype=dt))
                sil[f"ours_exact_raw_{name}"] = {"time_s": t, "value": v, "load1": l1}
                print(f"  silhouette ours {n}x{d} {name}: {t:.1f} s value={v:.6f} "
                      f"load={l1:.1f}", flush=True)
            if args.sklearn_sil_raw:
                t, v, l1 = timed(lambda: float(silhouette_score(X, lab_r)))
                sil["sklearn_raw"] = {"time_s": t, "value": v, "load1": l1}
            else:
                m = min(20000, n)
                t, v, l1 = timed(lambda: float(silhouette_score(X[:m], lab_r[:m])))
                sil["sklearn_raw_20000"] = {"time_s": t, "value": v, "load1": l1}
                sil["sklearn_raw_extrapolated_70000_s"] = t * (n / m) ** 2
            shown = sil.get("sklearn_raw", sil.get("sklearn_raw_20000"))
            print(f"  silhouette sklearn raw: {shown}", flush=True)
            log["silhouette"] = sil

    med = {k: v["median_s"] for k, v in log.items() if isinstance(v, dict) and "median_s" in v}
    log["ratio_ours_over_sklearn_pca_kmeans"] = (
        med["fmnist_dask PCA+KMeans, 2 workers"] / med["sklearn PCA+KMeans (70000x784 -> 10)"])
    log["ratio_ours_over_sklearn_kmeans_raw"] = (
        med["fmnist_dask KMeans raw, 2 workers"] / med["sklearn KMeans raw 70000x784"])
    log["ratio_ours_over_sklearn_kmeans_pca10"] = (
        med["fmnist_dask KMeans on PCA-10"] / med["sklearn KMeans on PCA-10"])
    for label, ours, sk in (("pca_kmeans", ours_pk, sk_pk), ("raw", ours_raw, sk_raw),
                            ("pca10", ours_p, sk_p)):
        log[f"inertia_ratio_{label}"] = [
            o["inertia"] / s["inertia"] for o, s in zip(ours, sk, strict=True)]
    log["machine"]["load_at_end"] = os.getloadavg()
    print(json.dumps({k: v for k, v in log.items() if k.startswith(("ratio", "inertia"))},
                     indent=1))
    if args.json:
        args.json.write_text(json.dumps(log, indent=1, default=float))


if __name__ == "__main__":
    main()
