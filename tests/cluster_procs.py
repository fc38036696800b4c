"""Real ``dask scheduler`` / ``dask worker`` processes on 127.0.0.1 for the tests.

``dask_processes`` starts a scheduler and N workers as separate OS processes (the same commands
a user types), waits until every worker has registered, and always stops them again, also when
the test fails. ``make_tls_files`` writes a CA and certificates signed by it with the ``openssl``
command line tool, for the mutual-TLS tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import BASE_ENV

STARTUP_TIMEOUT = 60.0  # seconds; generous because the 2 cores are shared with other jobs
#: The dask configuration docs/cluster.md tells users to start their workers with.
WORKER_CONFIG = Path(__file__).resolve().parents[1] / "cluster_config" / "dask-worker.yaml"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of one certificate authority and certificates it signed."""

    ca_file: Path
    node_cert: Path  # scheduler and workers (server and client use)
    node_key: Path
    client_cert: Path  # the job's client
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_tls_files(directory: Path, name: str = "test-ca") -> TLSFiles:
    """Create a CA and a node and a client certificate (EC P-256, 1 day) under ``directory``.

    The leaf certificates name 127.0.0.1 and localhost and allow both TLS server and client use,
    as Dask's scheduler and workers act as both.
    """
    if shutil.which("openssl") is None:  # pragma: no cover - openssl ships with the base image
        raise RuntimeError("the openssl command line tool is needed to make test certificates")
    directory.mkdir(parents=True, exist_ok=True)
    leaf_ext = directory / "leaf.ext"
    leaf_ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", f"/CN={name}", "-extensions", "v3_ca", "-addext",
             "basicConstraints=critical,CA:TRUE", "-addext",
             "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    for leaf in ("node", "client"):
        _openssl("req", *ec, "-keyout", f"{leaf}.key", "-out", f"{leaf}.csr",
                 "-subj", f"/CN={name}-{leaf}", cwd=directory)
        _openssl("x509", "-req", "-in", f"{leaf}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{leaf}.pem", "-days", "1",
                 "-extfile", str(leaf_ext), cwd=directory)
    for key in directory.glob("*.key"):
        key.chmod(0o600)
    return TLSFiles(
        ca_file=directory / "ca.pem",
        node_cert=directory / "node.pem",
        node_key=directory / "node.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )


@dataclass
class DaskProcesses:
    """Handles on a running scheduler and its workers."""

    scheduler_address: str
    dashboard_url: str
    scheduler: subprocess.Popen
    workers: list[subprocess.Popen]
    log_dir: Path
    _all: list[subprocess.Popen] = field(default_factory=list)

    def kill_worker(self, index: int) -> None:
        """SIGKILL worker ``index`` with its nanny and children (its whole process group)."""
        _signal_group(self.workers[index], signal.SIGKILL)
        self.workers[index].wait(timeout=30)

    def logs(self) -> str:
        """All process logs, for failure messages."""
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            parts.append(f"--- {path.name} ---\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    # Every process here is started in its own session, so its process group id is its pid:
    # this reaches the nanny's worker child too, and nothing else.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _stop(procs: Sequence[subprocess.Popen]) -> None:
    for proc in procs:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        # SIGKILL the group even when the leader exited, so no orphaned worker child survives.
        _signal_group(proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def _spawn(cmd: list[str], log: Path, env: Mapping[str, str] | None, cwd: Path) -> subprocess.Popen:
    # The environment before any test ran: a LocalCluster started in this process leaves its
    # workers' settings (and its dask config, in DASK_INTERNAL_INHERIT_CONFIG) in os.environ.
    full_env = dict(BASE_ENV)
    if env:
        full_env.update(env)
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=full_env, cwd=cwd, start_new_session=True,
        )


@dataclass(frozen=True)
class WorkerSpec:
    """How to start one worker: which Python, extra environment variables, working directory,
    and whether with the shipped worker configuration (``DASK_CONFIG``), as users should."""

    python: str = sys.executable
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    worker_config: bool = True


@contextlib.contextmanager
def dask_processes(
    tmp_dir: Path,
    n_workers: int = 2,
    *,
    tls: TLSFiles | None = None,
    workers: Sequence[WorkerSpec] | None = None,
    nthreads: int = 1,
    memory_limit: str = "2GiB",
    nanny: bool = True,
) -> Iterator[DaskProcesses]:
    """Start ``dask scheduler`` and ``n_workers`` ``dask worker`` processes on 127.0.0.1.

    Parameters
    ----------
    tmp_dir : Path
        Directory for the logs and the scheduler file.
    n_workers : int
        Number of worker processes (ignored when ``workers`` is given).
    tls : TLSFiles or None
        With certificates, every process listens on ``tls://`` and requires mutual TLS.
    workers : sequence of WorkerSpec or None
        One entry per worker, to run some workers in a different environment.
    nthreads, memory_limit, nanny
        Passed to ``dask worker``.

    Yields
    ------
    DaskProcesses
        Once every worker has registered with the scheduler. All processes are stopped on exit.
    """
    tmp_dir.mkdir(parents=True, exist_ok=True)
    specs = list(workers) if workers is not None else [WorkerSpec() for _ in range(n_workers)]
    protocol = "tls" if tls else "tcp"
    port, dash_port = free_port(), free_port()
    address = f"{protocol}://127.0.0.1:{port}"
    tls_args: list[str] = []
    if tls:
        tls_args = ["--tls-ca-file", str(tls.ca_file), "--tls-cert", str(tls.node_cert),
                    "--tls-key", str(tls.node_key)]
    scheduler_file = tmp_dir / "scheduler.json"
    started: list[subprocess.Popen] = []
    try:
        scheduler = _spawn(
            [sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port),
             "--protocol", protocol, "--dashboard-address", f"127.0.0.1:{dash_port}",
             "--scheduler-file", str(scheduler_file), *tls_args],
            tmp_dir / "scheduler.log", None, tmp_dir,
        )
        started.append(scheduler)
        _wait_for(lambda: scheduler_file.exists(), [scheduler], tmp_dir, "scheduler start")
        worker_procs = []
        for i, spec in enumerate(specs):
            cmd = [spec.python, "-m", "dask", "worker", address, "--host", "127.0.0.1",
                   "--nthreads", str(nthreads), "--memory-limit", memory_limit,
                   "--no-dashboard", "--name", f"worker-{i}", "--death-timeout", "60",
                   "--local-directory", str(tmp_dir / f"worker-{i}-space"),
                   "--nanny" if nanny else "--no-nanny", *tls_args]
            env = {"DASK_CONFIG": str(WORKER_CONFIG)} if spec.worker_config else {}
            proc = _spawn(cmd, tmp_dir / f"worker-{i}.log", {**env, **(spec.env or {})},
                          spec.cwd or tmp_dir)
            started.append(proc)
            worker_procs.append(proc)
        handle = DaskProcesses(
            scheduler_address=address,
            dashboard_url=f"http://127.0.0.1:{dash_port}",
            scheduler=scheduler,
            workers=worker_procs,
            log_dir=tmp_dir,
            _all=started,
        )
        _wait_for_workers(handle, len(specs), tls)
        yield handle
    finally:
        _stop(started)


def _wait_for(ready, procs: Sequence[subprocess.Popen], log_dir: Path, what: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not ready():
        dead = [p for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            logs = "\n".join(
                f"--- {p.name} ---\n{p.read_text(errors='replace')[-4000:]}"
                for p in sorted(log_dir.glob("*.log"))
            )
            reason = "a process exited" if dead else f"no success in {STARTUP_TIMEOUT:.0f} s"
            raise RuntimeError(f"{what} failed ({reason}):\n{logs}")
        time.sleep(0.1)


def _wait_for_workers(handle: DaskProcesses, n: int, tls: TLSFiles | None) -> None:
    """Block until ``n`` workers have registered, asking the scheduler with a real client."""
    from distributed import Client
    from distributed.security import Security

    security = None
    if tls:
        security = Security(
            tls_ca_file=str(tls.ca_file), tls_client_cert=str(tls.client_cert),
            tls_client_key=str(tls.client_key), require_encryption=True,
        )
    with Client(handle.scheduler_address, security=security, timeout=STARTUP_TIMEOUT,
                set_as_default=False) as client:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while len(client.scheduler_info(n_workers=-1)["workers"]) < n:
            dead = [p for p in handle._all if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{n} workers did not register with {handle.scheduler_address}:\n"
                    + handle.logs()
                )
            time.sleep(0.1)
