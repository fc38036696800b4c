"""Load + validate + dedup: the job's load and clean stages against pandas, on one CSV.

Issue 16 asks the job to load, validate and deduplicate at least as fast as pandas'
``read_csv`` + ``drop_duplicates`` in one process on the same file. The pandas side is the
notebook's code (no validation: pandas infers int64 and trusts the values). The job side is
``load`` + ``clean`` as the job runs them (the default job's 16 MiB CSV pieces), on a
LocalCluster of 2 single-threaded workers started before the clock: parsing, validation of
every value (labels 0..9, pixels 0..255 integers), the 128-bit hash dedup with its exact
byte comparison, and writing ``cleaned/``, ``duplicates.parquet``. The two sides alternate
per repeat, so a load change on the machine hits both.

Reproduce (from the repository root, after ``make install`` and ``make data``)::

    .venv/bin/python benchmarks/bench_load.py --repeats 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
from distributed import Client, LocalCluster

from fmnist_dask.config import CleanSpec, DataSpec
from fmnist_dask.stages.clean import clean
from fmnist_dask.stages.load import load

REPO = Path(__file__).resolve().parents[1]


def pandas_side(csv: Path) -> tuple[float, int]:
    start = time.perf_counter()
    frame = pd.read_csv(csv).drop_duplicates()
    return time.perf_counter() - start, len(frame)


def job_side(csv: Path, work: Path) -> tuple[float, int]:
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    start = time.perf_counter()
    raw, pieces, files = load(DataSpec(dir=str(csv.parent), splits={"train": csv.name}))
    counts = clean(raw, pieces, files, CleanSpec(), run_dir)
    return time.perf_counter() - start, counts.as_dict()["total"]["kept"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--csv", type=Path,
                        default=REPO / "data/fashion-mnist/fashion-mnist_train.csv")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"pandas": [], "job": []}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as cluster, \
            Client(cluster), tempfile.TemporaryDirectory() as tmp:
        job_side(args.csv, Path(tmp))  # warm: imports on the workers, the page cache
        for repeat in range(args.repeats):
            seconds, kept_pandas = pandas_side(args.csv)
            times["pandas"].append(seconds)
            seconds, kept_job = job_side(args.csv, Path(tmp))
            times["job"].append(seconds)
            assert kept_pandas == kept_job, (kept_pandas, kept_job)
            print(f"repeat {repeat}: pandas {times['pandas'][-1]:.2f} s, job "
                  f"{times['job'][-1]:.2f} s, {kept_job:,} rows kept, load average "
                  f"{os.getloadavg()[0]:.2f}", flush=True)
    pandas_median, job_median = (statistics.median(times[k]) for k in ("pandas", "job"))
    print(f"\n| {args.csv.name} | median of {args.repeats} (s) | runs (s) |")
    print("|---|---|---|")
    for name, median in (("pandas read_csv + drop_duplicates", pandas_median),
                         ("job load + clean (validation, dedup, files written)", job_median)):
        runs = ", ".join(f"{t:.2f}" for t in times["pandas" if "pandas" in name else "job"])
        print(f"| {name} | {median:.2f} | {runs} |")
    print(f"\njob / pandas: {job_median / pandas_median:.2f} (below 1: the job is faster)")


if __name__ == "__main__":
    main()
