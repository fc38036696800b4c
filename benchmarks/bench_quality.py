"""Cluster quality of the manifold-gmm consensus on the 70,000 Fashion-MNIST images, over seeds.

For each seed: a uniform sample of ``--n-sample`` rows (all 70,000 by default, the job's default
sample cap) is fitted with the consensus the ``manifold:`` section of ``--job`` describes
(``jobs/fashion_mnist_manifold.yaml`` by default; ``--n-runs`` overrides its member count),
seeded with the seed, the way the job fits it
(:func:`fit_on_workers`: the members are parallel tasks on a LocalCluster of
2 workers x 1 thread, the images scattered to it once; no label is passed), then every row
is labelled per block with ``predict``. The labels are read only afterwards, to count the
contingency table and score it (ACC by Hungarian matching, NMI, ARI, from
:func:`fmnist_dask.metrics.external_scores`). As the reference measured in the same run,
each member's own clusters of the sample are scored too (``member_*``: mean over members).
With ``--baseline`` the original analysis's PCA(50) + k-means(10) (scikit-learn, same
seed) is scored on the same rows.

Prints one row per seed, then mean +- sd, and the 1-minute load average (other jobs may share
the CPU, which stretches wall times).

Reproduce (about 11 min per seed with the job file's settings on 2 free cores; more under
load)::

    source .venv/bin/activate
    python benchmarks/bench_quality.py --seeds 0 1 2 3 4 --json /tmp/bench_quality.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import dask.array as da
import numpy as np

from fmnist_dask.config import load_job_spec
from fmnist_dask.fetch import load_split
from fmnist_dask.metrics import contingency, external_scores
from fmnist_dask.models.manifold import fit_on_workers
from fmnist_dask.sampling import choose_sample_indices
from fmnist_dask.stages.cluster import manifold_ensemble

DATA = Path(os.environ.get(
    "FMNIST_MIRROR", Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"))
CHUNK_ROWS = 10_000
JOB = Path(__file__).resolve().parents[1] / "jobs" / "fashion_mnist_manifold.yaml"


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
    parser.add_argument("--job", type=Path, default=JOB,
                        help="job spec whose manifold: settings are fitted")
    parser.add_argument("--n-runs", type=int, default=None,
                        help="members of the consensus (default: the job spec's)")
    parser.add_argument("--baseline", action="store_true", help="also score PCA + k-means")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    spec = load_job_spec(args.job).manifold
    if args.n_runs is not None:
        spec = spec.model_copy(update={"n_runs": args.n_runs})
    print(f"manifold settings ({args.job.name}): {spec.model_dump(exclude={'enabled'})}",
          flush=True)
    X, y = load()
    rows: list[dict] = []
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None,
                      memory_limit="8GiB") as cluster, Client(cluster) as client:
        Xd = da.from_array(X, chunks=(CHUNK_ROWS, X.shape[1])).persist()
        for seed in args.seeds:
            idx = choose_sample_indices(len(X), args.n_sample, random_state=seed)
            images = client.scatter(X[idx])
            t0 = time.perf_counter()
            model = fit_on_workers(manifold_ensemble(spec, seed), images, idx)
            t1 = time.perf_counter()
            labels = model.predict(Xd).compute()
            t2 = time.perf_counter()
            scores = external_scores(contingency(y, labels, 10, 10))
            members = [external_scores(contingency(y[idx], m, 10, 10))
                       for m in model.member_labels_]
            row = {"seed": seed, "n_sample": len(idx), "n_runs": spec.n_runs, **scores,
                   **{f"member_{k}": statistics.mean(m[k] for m in members) for k in scores},
                   "member_acc_all": [round(m["acc"], 4) for m in members],
                   "stability": model.stability_, "fit_s": t1 - t0,
                   "predict_s": t2 - t1, "load1": os.getloadavg()[0]}
            if args.baseline:
                b = baseline(X, seed)
                row.update({f"baseline_{k}": v for k, v in
                            external_scores(contingency(y, b, 10, 10)).items()})
            rows.append(row)
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in row.items()), flush=True)
    print(f"\nmanifold-gmm consensus of {spec.n_runs}, {len(rows)} seeds, sample "
          f"{args.n_sample}, all {len(X):,} rows scored")
    keys = ["acc", "nmi", "ari", "member_acc", "member_nmi", "member_ari", "stability",
            "fit_s", "predict_s"]
    if args.baseline:
        keys += ["baseline_acc", "baseline_nmi", "baseline_ari"]
    for k in keys:
        values = [r[k] for r in rows]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{k:14s} {statistics.mean(values):8.3f} +- {sd:.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
