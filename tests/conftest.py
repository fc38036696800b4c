"""Shared fixtures and helpers: the real Fashion-MNIST files from the mirror beside the project,
one real LocalCluster, the command line run in-process, job processes watched while they run,
and the job runs that several test modules read (the default job once, the operations
reference once).

Test modules import helpers from here, never from each other.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pty
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from fmnist_dask.fetch import MIRROR_ENV, load_split
from fmnist_dask.schema import CSV_COLUMNS, PIXEL_COLUMNS

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "fmnist_dask.cli"]
#: The environment before any test ran. A LocalCluster started in this process (the
#: ``dask_client`` fixture) writes OMP_NUM_THREADS=1 and friends into ``os.environ`` (its
#: nannies' pre-spawn settings); a job started after that would run its client-side linear
#: algebra (the PCA's eigendecomposition) single-threaded, which changes the last bits of
#: the PCA and so of the scores. Every job process gets the same, original environment.
BASE_ENV = dict(os.environ)
#: The real rows most job runs use: the first 1,500 train and 300 test images.
N_TRAIN, N_TEST = 1500, 300
DEFAULT_RUN_SEED = 3
OPS_SEED = 7
RUN_TIMEOUT = 300  # seconds; only a guard against a hang, generous for a shared machine


# ---------------------------------------------------------------------------------------------
# The real data
# ---------------------------------------------------------------------------------------------


def real_data_dir() -> Path | None:
    """The directory holding the official IDX files, or None when it is not here."""
    candidates = [os.environ.get(MIRROR_ENV), REPO.parent / "shared" / "data" / "fashion-mnist"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "train-images-idx3-ubyte.gz").exists():
            return Path(candidate)
    return None


def fail_in_ci_else_skip(message: str) -> None:
    """A missing real component fails in CI (``CI=true``) and skips on a developer's machine."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def real_dir() -> Path:
    """Path of the real data; fails (never skips) in CI when the data is missing."""
    found = real_data_dir()
    if found is None:
        fail_in_ci_else_skip(
            f"real Fashion-MNIST files not found (set ${MIRROR_ENV} or ../shared/data)")
    return found


@pytest.fixture(scope="session")
def real_arrays(real_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images, labels), "test": (images, labels)}`` as uint8 numpy arrays."""
    return {split: load_split(real_dir, split) for split in ("train", "test")}


@pytest.fixture(scope="session")
def real_scaled(real_arrays) -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 images scaled to float32 [0, 1] (train then test) and their labels."""
    images = np.concatenate([real_arrays["train"][0], real_arrays["test"][0]])
    labels = np.concatenate([real_arrays["train"][1], real_arrays["test"][1]])
    return (images / np.float32(255)).astype(np.float32), labels


def pixels_of(frame: pd.DataFrame) -> np.ndarray:
    """The 784-byte ``pixels`` values of a frame read from a pixel file, as uint8 (n, 784)."""
    assert all(len(value) == 784 for value in frame["pixels"])
    return np.frombuffer(b"".join(frame["pixels"]), np.uint8).reshape(len(frame), 784)


def write_rows(path: Path, labels, pixels, header: str | None = None) -> Path:
    """A Kaggle-layout CSV with the given rows (labels may be None for unlabelled)."""
    columns = CSV_COLUMNS if labels is not None else PIXEL_COLUMNS
    table = pixels if labels is None else np.column_stack([labels, pixels])
    lines = [header if header is not None else ",".join(columns)]
    lines += [",".join(str(int(v)) for v in row) for row in table]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_subset(directory: Path, real_arrays, n_train: int = N_TRAIN,
                 n_test: int = N_TEST) -> Path:
    """The first real rows of each split as ``fashion-mnist_{train,test}.csv`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = real_arrays[split]
        write_rows(directory / f"fashion-mnist_{split}.csv", labels[:n], images[:n])
    return directory


@pytest.fixture(scope="session")
def subset_csv(tmp_path_factory, real_arrays) -> Path:
    """The 1,500 + 300 real rows as Kaggle CSVs, shared by the job runs."""
    return write_subset(tmp_path_factory.mktemp("subset") / "csv", real_arrays)


# ---------------------------------------------------------------------------------------------
# The cluster
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def dask_client():
    """One real LocalCluster (2 workers x 1 thread) shared by the tests that need it.

    Jobs run in-process point ``--scheduler`` at it, so their workers (and what numba
    compiled in them) are reused instead of started again per job. Its workers are set up
    as a job's own local cluster sets them up: with dask's default allocator settings the
    manifold fits below took twice as long, a third of it in the kernel zeroing pages.
    """
    from distributed import Client

    from fmnist_dask.dask_cluster import LocalConfig, local_cluster

    target = LocalConfig(n_workers=2, threads_per_worker=1, memory_limit="4GiB",
                         dashboard_address=None)
    with local_cluster(target) as cluster, Client(cluster) as client:
        yield client


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


@dataclass
class CliResult:
    """Exit code and output of one command."""

    returncode: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def saved_logging():
    """Undo :func:`fmnist_dask.logs.configure` afterwards (it rewires process-wide logging)."""
    from fmnist_dask import logs

    names = ["", "fmnist_dask", *logs.THIRD_PARTY, "asyncio",
             *[n for n in logging.root.manager.loggerDict if n.startswith("distributed.")]]
    saved = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).level,
                 logging.getLogger(n).propagate) for n in names}
    try:
        yield
    finally:
        for name, (handlers, level, propagate) in saved.items():
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            for handler in handlers:
                logger.addHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
        logging.captureWarnings(False)


def cli(*args: str) -> CliResult:
    """``fmnist-dask ARGS`` in this process through ``cli.main``: its exit code and output.

    For commands whose process is not the point (help, spec errors, fetch, report, compare,
    and job variants pointed at the session cluster with ``--scheduler``).
    """
    from fmnist_dask.cli import main

    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(REPO)  # relative paths (the default job file) as from the project's root
    try:
        with saved_logging(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exit_:  # argparse: --help, usage errors
                code = exit_.code if isinstance(exit_.code, int) else 2
    finally:
        os.chdir(cwd)
    return CliResult(code, out.getvalue(), err.getvalue())


def write_job(path: Path, base: str | None = None, **sections) -> Path:
    """A job spec: the shipped ``base`` file (or the defaults) with ``sections`` replaced."""
    spec = yaml.safe_load((REPO / base).read_text()) if base else {}
    spec |= sections
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------
# Job processes watched while they run
# ---------------------------------------------------------------------------------------------


@dataclass
class Running:
    """A ``fmnist-dask run`` process in its own session (its group holds the local cluster)."""

    proc: subprocess.Popen
    out: Path
    name: str
    stdout_path: Path
    stderr_path: Path | None
    tty_chunks: list[bytes] = field(default_factory=list)
    reader: threading.Thread | None = None

    @property
    def manifest_path(self) -> Path:
        return self.out / f".{self.name}.incomplete" / "manifest.json"

    def stage_status(self, stage: str) -> str | None:
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):  # not written yet, or gone
            return None
        return manifest.get("stages", {}).get(stage, {}).get("status")

    def wait_for_stage(self, stage: str, timeout: float = RUN_TIMEOUT) -> None:
        """Return as soon as the manifest says ``stage`` is running."""
        deadline = time.monotonic() + timeout
        while self.stage_status(stage) != "running":
            if self.proc.poll() is not None:
                raise AssertionError(f"the run ended before stage {stage} ran:\n{self.stderr()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"stage {stage} did not start within {timeout} s")
            time.sleep(0.05)

    def finish(self, timeout: float = RUN_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.reader is not None:
                self.reader.join(timeout=10)

    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def stderr(self) -> str:
        if self.stderr_path is None:
            return b"".join(self.tty_chunks).decode(errors="replace")
        return self.stderr_path.read_text()

    def kill(self) -> None:
        """SIGKILL the run's whole process group (it and its local cluster), if still there."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)


def _default_sigint() -> None:
    # A shell starting pytest in the background without job control makes SIGINT ignored,
    # and ignored dispositions are inherited: the CLI must see Ctrl-C as a user's shell sends it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_run(tmp: Path, job: Path, out: Path, name: str, *args: str,
              tty: bool = False) -> Running:
    """Start ``fmnist-dask run`` with stderr on a pseudo-terminal (``tty``) or in a file."""
    tmp.mkdir(parents=True, exist_ok=True)
    stdout_path = tmp / f"{name}.stdout"
    cmd = [*CLI, "run", str(job), "--out", str(out), "--run-name", name, *args]
    with open(stdout_path, "wb") as stdout:
        if not tty:
            stderr_path = tmp / f"{name}.stderr"
            with open(stderr_path, "wb") as stderr:
                proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=stdout,
                                        stderr=stderr, start_new_session=True, env=BASE_ENV,
                                        preexec_fn=_default_sigint)
            return Running(proc, out, name, stdout_path, stderr_path)
        master, slave = pty.openpty()
        proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=stdout,
                                stderr=slave, start_new_session=True, env=BASE_ENV,
                                preexec_fn=_default_sigint)
    os.close(slave)
    running = Running(proc, out, name, stdout_path, None)

    def read() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            running.tty_chunks.append(chunk)
        os.close(master)

    running.reader = threading.Thread(target=read, daemon=True)
    running.reader.start()
    return running


@contextlib.contextmanager
def running(*args, **kwargs):
    """``start_run`` that never leaves the process (or its local cluster) behind."""
    run = start_run(*args, **kwargs)
    try:
        yield run
    finally:
        if run.proc.poll() is None:
            run.kill()


# ---------------------------------------------------------------------------------------------
# The shared job runs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ops_job(tmp_path_factory, subset_csv) -> Path:
    """The job spec of the operations tests (and the report's second run): the real subset,
    several blocks per worker, the slow stages off (EDA, spectral, t-SNE, silhouettes);
    k-means on pixels, PCA, k-means on the projection, the GMM and the evaluation run."""
    spec = {
        "name": "ops", "seed": OPS_SEED,
        "data": {"dir": str(subset_csv), "blocksize": "1MiB"},
        "eda": {"enabled": False},
        "kmeans": {"max_iter": 50},
        "spectral": {"enabled": False},
        "tsne": {"enabled": False},
        "scores": {"silhouette": "off", "images_per_cluster": 2},
    }
    path = tmp_path_factory.mktemp("ops-job") / "ops.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@dataclass
class JobRuns:
    """The two job runs several modules read; each started once per session."""

    default: Path  # the shipped default job on the subset, --seed 3
    default_process: subprocess.CompletedProcess
    ops: Path  # the operations job on a local cluster, stderr on a terminal
    ops_terminal: str


@pytest.fixture(scope="session")
def job_runs(tmp_path_factory, subset_csv, ops_job) -> JobRuns:
    """The default job and the operations reference, run at the same time as real processes
    of the real CLI (much of a small run is start-up, which the two overlap).

    Read-only for the tests: a test that changes a run directory works on a copy.
    """
    root = tmp_path_factory.mktemp("runs")
    out = root / "default"
    with running(root, ops_job, root / "ops", "local", tty=True) as ops:
        default = subprocess.Popen(
            [*CLI, "run", "jobs/fashion_mnist.yaml", "--data", str(subset_csv), "--out",
             str(out), "--run-name", "subset", "--seed", str(DEFAULT_RUN_SEED)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=BASE_ENV)
        try:
            stdout, stderr = default.communicate(timeout=900)
        finally:
            if default.poll() is None:
                default.kill()
        code = ops.finish()
    default_process = subprocess.CompletedProcess(default.args, default.returncode, stdout,
                                                  stderr)
    assert default.returncode == 0, stderr[-3000:]
    assert code == 0, ops.stderr()[-3000:]
    return JobRuns(out / "subset", default_process, root / "ops" / "local", ops.stderr())


# ---------------------------------------------------------------------------------------------
# Parallel runs (pytest-xdist, ``make test`` runs ``-n 2``)
# ---------------------------------------------------------------------------------------------

#: Modules that read the session's job runs: one unit of work, so the runs are made once.
JOB_RUN_MODULES = {"test_cli", "test_report", "test_cluster_ops"}


def work_unit(nodeid: str) -> str:
    """The unit of work a test belongs to: its module, or ``job_runs`` for the modules that
    share the session's job runs."""
    module = nodeid.split("::", 1)[0]
    return "job_runs" if Path(module).stem in JOB_RUN_MODULES else module


#: The longest units of work, longest first (``--durations`` in CI): started first, so that
#: the two test processes finish together instead of one waiting on the last long module.
LONGEST_FIRST = ("tests/test_quality.py", "job_runs", "tests/test_augment.py",
                 "tests/test_load_clean.py", "tests/test_pipeline.py", "tests/test_kmeans.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(work_unit(item.nodeid), len(rank)))  # stable


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Give each test process whole modules (their module fixtures are made once) and the
    job-run modules together, in collection order (longest first, above). (xdist's own
    ``loadgroup`` marks do not reach its scheduler under pytest 9, which no longer lets a
    plugin rename a test.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    config.option.loadscopereorder = False  # keep the order above, not by test count
    return ModuleGroups(config, log)
