"""Command line: ``fmnist-dask run``, ``fetch``, ``report``, ``compare``.

Exit codes: 0 success, 1 unexpected error, 2 bad job spec or usage, 3 bad input data,
4 cluster unreachable or unusable, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM, as a
batch system or ``kill`` sends it; the same clean stop as Ctrl-C).
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

# 1 (an unexpected error) is what Python exits with on an uncaught exception.
EXIT_OK, EXIT_SPEC, EXIT_INPUT, EXIT_CLUSTER, EXIT_INTERRUPTED = 0, 2, 3, 4, 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, the shell's convention
DEFAULT_JOB = Path("jobs/fashion_mnist.yaml")


def _out_file(value: str) -> Path:
    if Path(value).suffix.lower() not in (".md", ".markdown", ".html", ".htm"):
        raise argparse.ArgumentTypeError(f"{value}: must end in .md or .html")
    return Path(value)


def _parser() -> argparse.ArgumentParser:
    from fmnist_dask.stages.report import DEFAULT_SORT, SCORES

    parser = argparse.ArgumentParser(
        prog="fmnist-dask",
        description="Distributed unsupervised analysis of Fashion-MNIST on Dask.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a job spec on a Dask cluster")
    run.add_argument("job", nargs="?", type=Path, default=DEFAULT_JOB,
                     help=f"job spec YAML (default {DEFAULT_JOB})")
    run.add_argument("--data", help="directory (or URL) of the input files (data.dir)")
    run.add_argument("--out", help="directory for run directories (output_dir)")
    run.add_argument("--cluster", help="cluster config YAML (see cluster_config/)")
    run.add_argument("--scheduler", help="address of a running scheduler, e.g. tcp://host:8786")
    run.add_argument("--seed", type=int, help="random seed for every stage")
    run.add_argument("--run-name", help="name of the run directory (default <job>-<time>)")
    run.add_argument("--limit-rows", type=int, help="read at most N rows of each split")
    run.add_argument("--on-bad-rows", choices=["error", "quarantine"],
                     help="stop on a bad row, or set bad rows aside in rejected.parquet")
    verbosity = run.add_mutually_exclusive_group()
    verbosity.add_argument("--quiet", action="store_true", help="only warnings and errors")
    verbosity.add_argument("--verbose", action="store_true", help="debug logging")

    aug = sub.add_parser("augment", help="write augmented copies of a dataset as parquet")
    aug.add_argument("job", nargs="?", type=Path, default=DEFAULT_JOB,
                     help="job spec whose augment section (and cluster) to use "
                          f"(default {DEFAULT_JOB})")
    aug.add_argument("--factor", type=int,
                     help="copies per source image (copy 0 is the image itself)")
    aug.add_argument("--out", help="output directory (augment.out)")
    aug.add_argument("--seed", type=int, help="seed of the random transforms (augment.seed)")
    aug.add_argument("--source-dir", help="directory of the source files (augment.source.dir)")
    aug.add_argument("--csv", action="store_true", default=None,
                     help="also write CSV shards in the Kaggle layout")
    for transform in ("shift", "rotate", "flip", "jitter", "noise"):
        aug.add_argument(f"--no-{transform}", dest=transform, action="store_false",
                         default=None, help=f"switch the {transform} transform off")
    aug.add_argument("--cluster", help="cluster config YAML (see cluster_config/)")
    aug.add_argument("--scheduler", help="address of a running scheduler")

    report = sub.add_parser("report", help="(re)write RUN_DIR/report.html from its files")
    report.add_argument("run_dir", type=Path, help="a run directory (outputs/<run name>)")
    report.add_argument("--sort-by", choices=list(SCORES), default=DEFAULT_SORT,
                        help=f"score that ranks the methods (default {DEFAULT_SORT})")

    compare = sub.add_parser("compare", help="the methods' scores side by side across runs")
    compare.add_argument("runs", nargs="+", type=Path, help="run directories")
    compare.add_argument("--sort-by", choices=list(SCORES), default=DEFAULT_SORT,
                         help=f"score that orders the methods (default {DEFAULT_SORT})")
    compare.add_argument("--out", type=_out_file, action="append", default=[],
                         help="also write the comparison to FILE.md or FILE.html (repeatable)")

    fetch = sub.add_parser("fetch", help="get the official Fashion-MNIST files (sha256-checked)")
    fetch.add_argument("--dest", type=Path, default=Path("data/fashion-mnist"),
                       help="where to put the files (default data/fashion-mnist)")
    fetch.add_argument("--mirror", type=Path,
                       help="copy from this local directory instead of downloading "
                            "(default: $FMNIST_MIRROR when set)")
    fetch.add_argument("--csv", action="store_true",
                       help="also write fashion-mnist_{train,test}.csv (Kaggle layout)")
    fetch.add_argument("--gzip", action="store_true", help="gzip the CSV files")
    return parser


def _configure_logging(quiet: bool = False, verbose: bool = False) -> None:
    # One line format (UTC time, level, stage) for this package and Dask, on stderr; a run
    # adds run.log. --quiet: warnings and errors only on the terminal, no progress line.
    from fmnist_dask.logs import configure

    configure(quiet=quiet, verbose=verbose)


def _cmd_fetch(args: argparse.Namespace) -> int:
    from fmnist_dask.fetch import default_mirror, fetch, write_csv

    mirror = args.mirror or default_mirror()
    placed = fetch(args.dest, mirror=mirror)
    for path in placed:
        print(f"verified {path}")
    if args.csv:
        for path in write_csv(args.dest, args.dest, compress=args.gzip):
            print(f"wrote {path}")
    return EXIT_OK


def _cmd_augment(args: argparse.Namespace) -> int:
    from fmnist_dask.augment import augment
    from fmnist_dask.config import load_job_spec
    from fmnist_dask.dask_cluster import job_cluster_target, open_cluster

    overrides = {f"augment.{key}": getattr(args, key) for key in (
        "factor", "out", "seed", "csv", "shift", "rotate", "flip", "jitter", "noise")}
    overrides |= {"augment.source.dir": args.source_dir, "cluster.config": args.cluster,
                  "cluster.scheduler": args.scheduler}
    spec = load_job_spec(args.job, overrides)
    target = job_cluster_target(spec.cluster)
    with open_cluster(target) as session:
        logging.getLogger("fmnist_dask").info("Dask dashboard: %s", session.dashboard_link)
        summary = augment(spec.augment.source, spec.augment, Path(spec.augment.out))
    print(json.dumps({"out": spec.augment.out, "rows": summary["rows"]}))
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from fmnist_dask.stages.report import write_report

    print(write_report(args.run_dir, sort_by=args.sort_by))
    return EXIT_OK


def _cmd_compare(args: argparse.Namespace) -> int:
    from fmnist_dask.compare import compare_runs, to_text, write

    comparison = compare_runs(args.runs, sort_by=args.sort_by)
    print(to_text(comparison), end="")
    for path in args.out:
        print(f"wrote {write(comparison, path)}", file=sys.stderr)
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from fmnist_dask.config import load_job_spec
    from fmnist_dask.dask_cluster import StartingCluster, job_cluster_target
    from fmnist_dask.stages.load import check_inputs

    overrides = {
        "data.dir": args.data, "output_dir": args.out, "cluster.config": args.cluster,
        "cluster.scheduler": args.scheduler, "seed": args.seed,
        "data.limit_rows": args.limit_rows, "clean.on_bad_rows": args.on_bad_rows,
    }
    spec = load_job_spec(args.job, overrides)
    if not spec.augment.enabled:  # augmented inputs are written by the job itself
        check_inputs(spec.data)  # before a cluster starts: a missing file is refused at once
    target = job_cluster_target(spec.cluster)
    # The workers boot while this process imports the stages (docs/benchmarks.md, "Session 15").
    with StartingCluster(target) as cluster:
        from fmnist_dask.pipeline import run_job  # imports every stage: only once it is needed

        run_dir = run_job(spec, run_name=args.run_name, cluster=cluster)
    print(run_dir)
    return EXIT_OK


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every stage unwinds the same way: the cluster is
    closed, workers shut down, the run directory marked interrupted and removed."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fmnist-dask`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    if threading.current_thread() is not threading.main_thread():
        return _dispatch(args)  # signal handlers can only be set in the main thread
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _dispatch(args)
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)


def _dispatch(args: argparse.Namespace) -> int:
    _configure_logging(getattr(args, "quiet", False), getattr(args, "verbose", False))
    from fmnist_dask.config import SpecError
    from fmnist_dask.dask_cluster import ClusterConfigError, ClusterError
    from fmnist_dask.fetch import ChecksumError
    from fmnist_dask.stages.clean import BadRowsError
    from fmnist_dask.stages.load import InputError

    handlers = {"run": _cmd_run, "fetch": _cmd_fetch, "augment": _cmd_augment}
    handlers |= {"report": _cmd_report, "compare": _cmd_compare}
    try:
        return handlers[args.command](args)
    except Terminated:
        print("fmnist-dask: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("fmnist-dask: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (SpecError, ClusterConfigError) as error:
        print(f"fmnist-dask: {error}", file=sys.stderr)
        return EXIT_SPEC
    except ClusterError as error:
        print(f"fmnist-dask: cluster error: {error}", file=sys.stderr)
        return EXIT_CLUSTER
    except (InputError, BadRowsError, ChecksumError, FileNotFoundError, FileExistsError) as error:
        print(f"fmnist-dask: input error: {error}", file=sys.stderr)
        return EXIT_INPUT


def console_main() -> None:
    """The ``fmnist-dask`` command: :func:`main`, then the process ends at once.

    When ``main`` returns, every file of the run is written and closed. Python's own
    teardown of what a run loads (the scheduler's task states, numba, matplotlib...) took
    0.75 s more after the job's last line, measured from the command's start to its exit
    (docs/benchmarks.md, "Session 15"). The exit handlers still run and the output is
    flushed before the process ends; an error raised by ``main`` unwinds as usual.
    """
    code = main()
    atexit._run_exitfuncs()  # what a normal exit runs: the cluster's and logging's handlers
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    console_main()
