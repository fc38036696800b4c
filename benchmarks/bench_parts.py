"""Time the scalable parts of the job in one process, one thread, for two checkouts in turn.

Reads a finished 16x run of ``bench_scale.py`` (its ``cleaned/`` pixels and ``projected/``
PCA rows) and times, inside one process with one BLAS thread:

- ``kmeans_pca_fit``: the one-task k-means fit on the PCA-10 rows (10 runs, seed 0);
- ``kmeans_raw_fit``: the one-task fit on the uint8 pixels divided by 255 (3 runs, seed 0);
- ``reduce_stage``: the reduce stage (PCA fit, projection persisted), synchronous scheduler.

Each checkout is timed in a fresh subprocess that imports ``fmnist_dask`` from it, the
checkouts alternating ``--repeats`` times, so that both sides see the same machine. The
inertias are printed beside the times: equal code gives equal numbers.

    git worktree add /tmp/before <commit>
    .venv/bin/python benchmarks/bench_parts.py --run /work/scale2/runs/x16 \
        --checkouts /tmp/before . --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PARTS = ("kmeans_pca_fit", "kmeans_raw_fit", "reduce_stage")


def child(run: Path, parts: list[str]) -> dict:
    import tempfile
    import time

    import dask
    import numpy as np
    import pandas as pd
    from sklearn.utils import check_random_state
    from threadpoolctl import threadpool_limits

    from fmnist_dask.config import ReduceSpec
    from fmnist_dask.models.kmeans import DaskKMeans, _fit_in_one_task
    from fmnist_dask.stages import reduce as reduce_stage
    from fmnist_dask.stages.clean import load_cleaned

    data = load_cleaned(run)
    out = {}
    with threadpool_limits(1, "blas"):
        if "kmeans_pca_fit" in parts:
            files = sorted((run / "projected").glob("*.parquet"),
                           key=lambda f: int(f.name.split(".")[-2]))
            blocks = [np.ascontiguousarray(pd.read_parquet(f).filter(like="pc")
                                           .to_numpy(np.float32)) for f in files]
            t = time.perf_counter()
            fit = _fit_in_one_task(DaskKMeans, DaskKMeans(10, random_state=0, n_jobs=1)
                                   .get_params(), 10, check_random_state(0), blocks)
            out["kmeans_pca_fit"] = [time.perf_counter() - t, float(fit["inertia_"])]
        if "kmeans_raw_fit" in parts:
            with dask.config.set(scheduler="threads"):
                blocks = [b.compute() for b in data.raw_pixels.to_delayed().ravel()]
            t = time.perf_counter()
            fit = _fit_in_one_task(DaskKMeans, DaskKMeans(10, random_state=0, n_jobs=1,
                                                          divide_by=255.0).get_params(),
                                   3, check_random_state(0), blocks)
            out["kmeans_raw_fit"] = [time.perf_counter() - t, float(fit["inertia_"])]
        if "reduce_stage" in parts:
            data.raw_pixels = data.raw_pixels.persist(scheduler="threads")
            with dask.config.set(scheduler="synchronous"):
                t = time.perf_counter()
                reduction, _ = reduce_stage.reduce(data.pixels, data.row_id, ReduceSpec(),
                                                   Path(tempfile.mkdtemp()))
                projected = reduction.projected.persist()
                out["reduce_stage"] = [time.perf_counter() - t,
                                       float(projected[:1000].sum().compute())]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished 16x run directory")
    parser.add_argument("--checkouts", nargs="+", default=["."])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.run), args.parts)))
        return 0
    times: dict[str, dict[str, list[float]]] = {c: {} for c in args.checkouts}
    for _ in range(args.repeats):
        for checkout in args.checkouts:
            env = {**os.environ, "PYTHONPATH": str(Path(checkout).resolve()),
                   "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
            result = subprocess.run(
                [sys.executable, __file__, "--child", "--run", args.run, "--parts", *args.parts],
                env=env, capture_output=True, text=True)
            if result.returncode:
                raise SystemExit(f"{checkout}: exit {result.returncode}\n{result.stderr}")
            got = json.loads(result.stdout.strip().splitlines()[-1])
            print(checkout, got, "load average", os.getloadavg()[0], flush=True)
            for part, (seconds, _) in got.items():
                times[checkout].setdefault(part, []).append(seconds)
    print("\n| part | " + " | ".join(f"{c} median (s)" for c in args.checkouts)
          + " | ratio |")
    print("|---|" + "---|" * len(args.checkouts) + "---|")
    for part in args.parts:
        medians = [statistics.median(times[c][part]) for c in args.checkouts]
        print(f"| {part} | " + " | ".join(f"{m:.2f}" for m in medians)
              + f" | {medians[0] / medians[-1]:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
