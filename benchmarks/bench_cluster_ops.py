"""How fast the job reacts when its cluster fails or the user stops it, and what watching costs.

Runs ``fmnist-dask run`` as a separate process on 1,500 + 300 real Fashion-MNIST rows (the
job spec of ``tests/test_cluster_ops.py``) and measures, from the moment of the event to the
command's exit (median of ``--repeats``):

* ``scheduler_killed``: the scheduler (a real ``dask scheduler`` process) SIGKILLed during
  the load stage; exit code 4 expected;
* ``scheduler_frozen``: the scheduler SIGSTOPped (nothing closes the connection), with
  ``connect_timeout: 5``; exit code 4 expected after about 5 s;
* ``ctrl_c``: SIGINT to the command during the load stage, on its LocalCluster; exit 130,
  which includes shutting the local cluster down.

It also times the two requests the job sends while it runs (the progress question, twice a
second, and the watchdog's, once a second) on a LocalCluster, and reads from the run logs
how long the scheduler took to render the performance report at the end.

Reproduce::

    source .venv/bin/activate
    python benchmarks/bench_cluster_ops.py --repeats 3 --json /tmp/bench_cluster_ops.json
    python benchmarks/bench_cluster_ops.py --events scheduler_frozen   # one reaction only

The load average is printed with each figure: the machine's 2 cores are shared.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fmnist_dask.fetch import load_split  # noqa: E402
from tests.cluster_procs import dask_processes  # noqa: E402
from tests.conftest import real_data_dir  # noqa: E402
from tests.test_load_clean import write_rows  # noqa: E402

CLI = [sys.executable, "-m", "fmnist_dask.cli"]
EVENTS = ("scheduler_killed", "scheduler_frozen", "ctrl_c")


def load() -> float:
    return os.getloadavg()[0]


def write_job(base: Path) -> Path:
    source = real_data_dir()
    if source is None:
        raise SystemExit("the real Fashion-MNIST files are needed (set $FMNIST_MIRROR)")
    data = base / "csv"
    data.mkdir(parents=True)
    for split, n, name in (("train", 1500, "fashion-mnist_train.csv"),
                           ("test", 300, "fashion-mnist_test.csv")):
        images, labels = load_split(source, split)
        write_rows(data / name, labels[:n], images[:n])
    spec = {"name": "bench", "seed": 7, "data": {"dir": str(data), "blocksize": "1MiB"},
            "eda": {"enabled": False}, "kmeans": {"max_iter": 50},
            "spectral": {"enabled": False}, "tsne": {"enabled": False},
            "scores": {"silhouette": "off", "images_per_cluster": 2}}
    path = base / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def start(job: Path, out: Path, name: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "run", str(job), "--out", str(out), "--run-name", name, *args],
                            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def wait_for_stage(proc: subprocess.Popen, out: Path, name: str, stage: str) -> None:
    manifest = out / f".{name}.incomplete" / "manifest.json"
    while True:
        try:
            if json.loads(manifest.read_text())["stages"][stage]["status"] == "running":
                return
        except (OSError, ValueError, KeyError):
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{name} ended before {stage}")
        time.sleep(0.05)


def react(job: Path, base: Path, event: str, i: int) -> dict:
    """Seconds from the event to the command's exit, and its exit code."""
    name = f"{event}-{i}"
    out = base / "out"
    if event == "ctrl_c":
        proc = start(job, out, name)
        wait_for_stage(proc, out, name, "load")
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=300)
        return {"seconds": time.perf_counter() - t0, "exit": code, "load": load()}
    with dask_processes(base / f"procs-{name}", n_workers=2) as procs:
        config = base / f"{name}.yaml"
        config.write_text(yaml.safe_dump({"kind": "remote", "address": procs.scheduler_address,
                                          "connect_timeout": 5}))
        proc = start(job, out, name, "--cluster", str(config))
        try:
            wait_for_stage(proc, out, name, "load")
            t0 = time.perf_counter()
            sig = signal.SIGKILL if event == "scheduler_killed" else signal.SIGSTOP
            os.killpg(procs.scheduler.pid, sig)
            code = proc.wait(timeout=300)
            seconds = time.perf_counter() - t0
        finally:
            os.killpg(procs.scheduler.pid, signal.SIGKILL)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return {"seconds": seconds, "exit": code, "load": load()}


def request_latency(n: int = 200) -> dict:
    """Median seconds of the progress and the watchdog requests on a LocalCluster."""
    from distributed import Client, LocalCluster, span

    from fmnist_dask.progress import StageProgress

    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        progress = StageProgress(client, display=False)
        with span("bench") as span_id:
            client.gather(client.map(lambda x: x, range(100)))
        times = {"progress": [], "watchdog": []}
        for _ in range(n):
            t0 = time.perf_counter()
            assert progress.counts(span_id)["done"] == 100
            times["progress"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            client.sync(client.scheduler.identity, n_workers=-1)
            times["watchdog"].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()} | {"load": load()}


def report_seconds(run_log: Path) -> float | None:
    """Seconds between the last stage's end and 'performance report saved' in a run.log."""
    stamps = []
    for line in run_log.read_text().splitlines():
        if " done in " in line or "performance report saved" in line:
            stamps.append((dt.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")),
                           "saved" in line))
    ends = [t for t, saved in stamps if not saved]
    saved = [t for t, s in stamps if s]
    return (saved[-1] - ends[-1]).total_seconds() if ends and saved else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--events", nargs="+", default=list(EVENTS), choices=EVENTS,
                        help="measure only these reactions (and skip the whole run)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-cluster-ops-"))
    try:
        job = write_job(base)
        results: dict = {"requests": request_latency()}
        print(f"requests: {results['requests']}", flush=True)
        for event in args.events:
            runs = [react(job, base, event, i) for i in range(args.repeats)]
            results[event] = {"median_seconds": statistics.median(r["seconds"] for r in runs),
                              "exit_codes": sorted({r["exit"] for r in runs}), "runs": runs}
            print(f"{event}: {results[event]}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        if args.events != list(EVENTS):
            return
        # One whole run, for the report's render time.
        proc = start(job, base / "out", "whole")
        results["whole_run_exit"] = proc.wait(timeout=900)
        results["performance_report_seconds"] = report_seconds(base / "out" / "whole" / "run.log")
        results["whole_run_load"] = load()
        print(f"performance report: {results['performance_report_seconds']} s", flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
