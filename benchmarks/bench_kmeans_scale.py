"""k-means on raw pixels at scale: the ways the job has fitted it, side by side in one run.

The ``kmeans_raw`` stage was the largest cost of the 16x job (issue 17). This benchmark fits
``DaskKMeans`` (k=10, the job's defaults: k-means||, n_init 3) on the cleaned pixels of a
run directory (e.g. the 16x scale run's ``cleaned/``), capped at ``--iterations`` Lloyd
steps, in these variants, interleaved per repeat so that a load change hits all of them:

- ``scaled-streamed``: the pixels read from ``cleaned/`` and scaled to float32 block by block
  on every pass, fitted across the workers (the job before this change, 256 MiB
  ``persist_max_bytes``), workers with dask's default glibc settings;
- ``uint8-streamed``: the uint8 pixels read on every pass, ``divide_by=255`` (each kernel
  converts only the rows it reads), across the workers, with the job's worker glibc
  settings (``dask_cluster.WORKER_MALLOC_ENV``);
- ``uint8-memory``: the same with the uint8 pixels kept in worker memory;
- ``uint8-one-task``: kept in memory and fitted inside one task with both cores (the job's
  path up to ``max_local_bytes``, 1 GiB: 16x is 0.88 GB).

Every variant fits the same values and gives the same centres (checked here: the run stops
if they differ). Reported: median wall time of the fit (labels included) per variant and
its ratio to ``scaled-streamed``.

Reproduce (after a 16x scale run; any run directory with ``cleaned/`` works)::

    .venv/bin/python benchmarks/bench_kmeans_scale.py --run /work/scale2/runs/x16 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import dask
import numpy as np
from distributed import Client, LocalCluster, wait

from fmnist_dask.dask_cluster import WORKER_MALLOC_ENV
from fmnist_dask.models.kmeans import DaskKMeans
from fmnist_dask.stages.clean import load_cleaned

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("scaled-streamed", "uint8-streamed", "uint8-memory", "uint8-one-task")


def fit_once(client: Client, run: Path, variant: str, iterations: int) -> tuple[float, np.ndarray]:
    data = load_cleaned(run)
    if variant == "scaled-streamed":
        X, divide_by, local = data.pixels, 1.0, 0
    else:
        X, divide_by = data.raw_pixels, 255.0
        local = None if variant == "uint8-one-task" else 0
        if variant != "uint8-streamed":
            X = X.persist()
            wait(X)
    start = time.perf_counter()
    model = DaskKMeans(n_clusters=10, max_iter=iterations, random_state=0, divide_by=divide_by,
                       max_local_bytes=local).fit(X)
    model.labels_.persist().sum().compute()
    seconds = time.perf_counter() - start
    del X
    return seconds, model.cluster_centers_


def cluster(malloc: bool) -> LocalCluster:
    base = dask.config.get("distributed.nanny.pre-spawn-environ")
    env = {**base, **WORKER_MALLOC_ENV} if malloc else base
    with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
        return LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="10GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="run directory with cleaned/")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--results", default=str(REPO / "benchmarks/results/kmeans_scale.json"))
    args = parser.parse_args()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    centres: dict[str, np.ndarray] = {}
    for repeat in range(args.repeats):
        for variant in VARIANTS:
            with cluster(malloc=variant != "scaled-streamed") as lc, Client(lc) as client:
                seconds, c = fit_once(client, args.run, variant, args.iterations)
            times[variant].append(seconds)
            if variant in centres and not np.array_equal(centres[variant], c):
                raise SystemExit(f"{variant}: centres differ between repeats")
            centres.setdefault(variant, c)
            print(f"repeat {repeat} {variant:16s} {seconds:7.1f} s", flush=True)
    first = centres[VARIANTS[0]]
    for variant, c in centres.items():
        if not np.array_equal(c, first):
            raise SystemExit(f"{variant}: centres differ from {VARIANTS[0]}")
    reference = statistics.median(times[VARIANTS[0]])
    report = {
        "run": str(args.run), "iterations": args.iterations, "load_avg_1m": os.getloadavg()[0],
        "variants": {v: {"median_s": statistics.median(t), "runs_s": t,
                         "ratio": statistics.median(t) / reference} for v, t in times.items()},
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(report, indent=2))
    print("\n| variant | median fit s | runs | / scaled-streamed |\n|---|---|---|---|")
    for v, r in report["variants"].items():
        runs = ", ".join(f"{t:.1f}" for t in r["runs_s"])
        print(f"| {v} | {r['median_s']:.1f} | {runs} | {r['ratio']:.2f} |")


if __name__ == "__main__":
    main()
