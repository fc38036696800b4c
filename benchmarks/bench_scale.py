"""Scale benchmark: the whole job at 1x, 4x, 16x (optionally 100x) the size of Fashion-MNIST.

For each factor the official images are augmented ``factor`` times (parquet, generated on the
workers, not timed as part of the job), then the default job runs on them as a real
``fmnist-dask run`` process on a LocalCluster of 2 workers. A sampler adds up the resident
memory of the whole process tree (client, scheduler, nannies, workers) every 0.2 s.

Reproduce (from the repository root, after ``make install``)::

    .venv/bin/python benchmarks/bench_scale.py --factors 1 4 16 \
        --mirror ../shared/data/fashion-mnist

``--reuse-augmented`` skips writing a factor's augmented data when ``--work`` has it already
(issue 17 times the job on data already written).

Results: ``benchmarks/results/scale.json`` and a markdown table on stdout (copied into
docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import psutil

REPO = Path(__file__).resolve().parents[1]
#: Stages over every row. Their seconds add up to more than their wall time when they overlap
#: (the job runs independent stages at the same time): this sums work, not wall time.
SCALABLE = ("load", "clean", "eda", "kmeans_raw", "reduce", "kmeans_pca", "score_kmeans_raw",
            "score_kmeans_pca", "evaluate")


def tree_rss(root: psutil.Process) -> dict[int, int]:
    """Resident bytes of a process and each of its descendants, by pid."""
    out = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            out[proc.pid] = proc.memory_info().rss
        except psutil.Error:
            pass
    return out


def tree_cpu(root: psutil.Process) -> dict[int, float]:
    """CPU seconds (user + system) of a process and each of its descendants, by pid."""
    out = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            out[proc.pid] = times.user + times.system
        except psutil.Error:
            pass
    return out


def run_measured(command: list[str], log: Path) -> tuple[int, float, int, dict]:
    """Run ``command``; return (exit code, wall seconds, peak tree RSS bytes, memory trace).

    The trace has the sampled timeline (wall-clock time, tree RSS, the command's own RSS),
    at the peak the RSS of
    the command's own process (client and, for a LocalCluster, the scheduler) and of its
    children (nannies, workers), and ``cpu_seconds``: the CPU time of the whole tree, each
    process's last sample (a process's time after its last sample, at most 0.2 s, is lost).
    """
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    root = psutil.Process(proc.pid)
    peak = 0
    trace: dict = {"timeline": [], "at_peak": {}}
    cpu: dict[int, float] = {}
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                by_pid = tree_rss(root)
                cpu.update(tree_cpu(root))
            except psutil.Error:
                by_pid = {}
            total = sum(by_pid.values())
            trace["timeline"].append((time.time(), total, by_pid.get(proc.pid, 0)))
            if total > peak:
                peak = total
                trace["at_peak"] = {"client_and_scheduler": by_pid.get(proc.pid, 0),
                                    "children": sorted(v for k, v in by_pid.items()
                                                       if k != proc.pid)}
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = proc.wait()
    stop.set()
    sampler.join()
    trace["cpu_seconds"] = sum(cpu.values())
    return code, time.perf_counter() - start, peak, trace


def stage_peaks(run_log: Path, timeline: list[tuple[float, int, int]], column: int = 1
                ) -> dict[str, float]:
    """Peak RSS (GiB) during each stage, from the run log's start/done lines: of the tree
    (``column=1``) or of the client and scheduler process (``column=2``)."""
    spans: dict[str, list[float]] = {}
    for line in run_log.read_text().splitlines():
        m = re.match(r"(\S+Z) INFO +\[(\w+)\] (started|done)", line)
        if m:
            t = datetime.fromisoformat(m[1].replace("Z", "+00:00")).timestamp()
            spans.setdefault(m[2], []).append(t)
    peaks = {}
    for stage, (t0, *rest) in spans.items():
        t1 = rest[-1] if rest else t0
        inside = [sample[column] for sample in timeline if t0 <= sample[0] <= t1]
        if inside:
            peaks[stage] = round(max(inside) / 2**30, 2)
    return peaks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--mirror", default=str(REPO.parent / "shared/data/fashion-mnist"))
    parser.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--results", default=str(REPO / "benchmarks/results/scale.json"))
    parser.add_argument("--reuse-augmented", action="store_true",
                        help="use augmented data already in --work (not timed again)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="fmnist-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "fmnist_dask.cli"]
    rows = []
    for factor in args.factors:
        data = work / f"x{factor}"
        job = work / f"x{factor}.yaml"
        job.write_text(
            "name: scale\n"
            f"augment: {{factor: {factor}, seed: 0, out: {data}, source: {{dir: {args.mirror}}}}}\n"
            f"data: {{format: parquet, dir: {data}, splits: {{train: train, test: test}}}}\n"
            # Exact silhouette is O(n^2): benchmarked apart (bench_core); here the sampled one.
            "scores: {silhouette: sampled, silhouette_sample_size: 10000}\n"
        )
        aug_seconds = aug_peak = float("nan")
        if not (args.reuse_augmented and data.exists()):
            code, aug_seconds, aug_peak, _ = run_measured([*cli, "augment", str(job)],
                                                       work / f"augment-x{factor}.log")
            if code:
                raise SystemExit(f"augment x{factor} failed: see {work}/augment-x{factor}.log")
        shutil.rmtree(work / "runs" / f"x{factor}", ignore_errors=True)  # a previous run's
        code, seconds, peak, trace = run_measured(
            [*cli, "run", str(job), "--out", str(work / "runs"), "--run-name", f"x{factor}"],
            work / f"run-x{factor}.log")
        if code:
            raise SystemExit(f"run x{factor} failed (exit {code}): see {work}/run-x{factor}.log")
        manifest = json.loads((work / "runs" / f"x{factor}" / "manifest.json").read_text())
        n_rows = manifest["rows"]["total"]["read"]
        stages = {k: v["seconds"] for k, v in manifest["stages"].items()}
        metrics = pd.DataFrame(manifest["metrics"]).set_index("method")
        row = {
            "factor": factor, "rows": n_rows, "augment_seconds": round(aug_seconds, 1),
            "augment_peak_gib": round(aug_peak / 2**30, 2), "job_seconds": round(seconds, 1),
            "peak_rss_gib": round(peak / 2**30, 2),
            "cpu_seconds": round(trace["cpu_seconds"], 1),
            "cpu_share": round(trace["cpu_seconds"] / (seconds * (os.cpu_count() or 1)), 3),
            "scalable_seconds": round(sum(stages.get(s, 0) for s in SCALABLE), 1),
            "stages": stages,
            "stage_peak_rss_gib": stage_peaks(
                work / "runs" / f"x{factor}" / "run.log", trace["timeline"]),
            "stage_peak_client_gib": stage_peaks(
                work / "runs" / f"x{factor}" / "run.log", trace["timeline"], column=2),
            "at_peak_gib": {
                "client_and_scheduler": round(trace["at_peak"]["client_and_scheduler"] / 2**30, 2),
                "children": [round(v / 2**30, 2) for v in trace["at_peak"]["children"]]},
            "scores": metrics[["silhouette", "acc", "nmi", "ari"]].round(4).to_dict("index"),
            "load_avg_1m": os.getloadavg()[0],
        }
        row["scalable_rows_per_second"] = round(n_rows / row["scalable_seconds"])
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(json.dumps(rows, indent=2) + "\n")
    base = rows[0]
    print("\n| factor | rows | job s | CPU s (share of the cores) | scalable stages s | rows/s"
          " | peak RSS GiB | peak / 1x |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['factor']}x | {r['rows']:,} | {r['job_seconds']}"
              f" | {r['cpu_seconds']} ({r['cpu_share']:.0%}) | {r['scalable_seconds']}"
              f" | {r['scalable_rows_per_second']:,} | {r['peak_rss_gib']}"
              f" | {r['peak_rss_gib'] / base['peak_rss_gib']:.2f} |")
    names = list(rows[-1]["stages"])
    print("\n| stage | " + " | ".join(f"{r['factor']}x s (peak GiB: all / client + scheduler)"
                                    for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for name in names:
        print(f"| {name} | " + " | ".join(
            f"{r['stages'].get(name, '')} ({r['stage_peak_rss_gib'].get(name, '')}"
            f" / {r['stage_peak_client_gib'].get(name, '')})"
            for r in rows) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
