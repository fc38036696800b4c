"""The job on workers started by hand: with and without ``cluster_config/dask-worker.yaml``.

Starts a real ``dask scheduler`` and two ``dask worker --nthreads 1`` processes on 127.0.0.1
(``tests/cluster_procs.py``, as the tests do), either as plain commands (dask's nanny gives
the workers ``MALLOC_TRIM_THRESHOLD_=65536``) or with
``DASK_CONFIG=cluster_config/dask-worker.yaml`` (the job's own worker settings,
``dask_cluster.WORKER_ENV``), and runs the shipped default job on the train CSV against
them with ``--scheduler``. The two alternate per repeat, each on freshly started processes,
so a load change on the machine hits both. Reported: each run's time in the manifest, the
medians and their ratio.

Reproduce (from the repository root, after ``make install`` and ``make data``)::

    .venv/bin/python benchmarks/bench_remote_workers.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.cluster_procs import WorkerSpec, dask_processes  # noqa: E402


def run_once(job: Path, work: Path, name: str, worker_config: bool) -> float:
    """Start a scheduler and two workers (the tests' helper, which waits until both joined),
    run the job against them; the manifest's seconds."""
    workers = [WorkerSpec(worker_config=worker_config)] * 2
    with dask_processes(work / f"procs-{name}", workers=workers, memory_limit="8GiB") as procs:
        subprocess.run([str(REPO / ".venv" / "bin" / "fmnist-dask"), "run", str(job), "--out",
                        str(work), "--run-name", name, "--scheduler", procs.scheduler_address],
                       cwd=REPO, check=True, capture_output=True, text=True)
    manifest = json.loads((work / name / "manifest.json").read_text())
    assert manifest["cluster"]["n_workers"] == 2
    return float(manifest["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--csv", type=Path,
                        default=REPO / "data" / "fashion-mnist" / "fashion-mnist_train.csv")
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {"plain": [], "worker_config": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spec = yaml.safe_load((REPO / "jobs" / "fashion_mnist.yaml").read_text())
        spec["data"]["dir"] = str(args.csv.parent)
        spec["data"]["splits"] = {"train": args.csv.name}
        job = work / "job.yaml"
        job.write_text(yaml.safe_dump(spec))
        for repeat in range(args.repeats):
            # alternate which variant goes first
            order = ["plain", "worker_config"][:: 1 if repeat % 2 == 0 else -1]
            for variant in order:
                seconds[variant].append(run_once(job, work, f"{variant}{repeat}",
                                                 variant == "worker_config"))
                print(f"repeat {repeat} {variant}: {seconds[variant][-1]:.1f} s",
                      file=sys.stderr)
    medians = {variant: statistics.median(runs) for variant, runs in seconds.items()}
    print(json.dumps({"seconds": seconds, "medians": medians,
                      "ratio_plain_to_config": medians["plain"] / medians["worker_config"],
                      "load_average": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()
