"""Connect the job to a Dask cluster: a local one, an existing scheduler, or HPC/Kubernetes.

A cluster *target* is a validated YAML file from ``cluster_config/`` (``--cluster FILE``) or a
scheduler address (``--scheduler ADDRESS``)::

    target = load_cluster_config(Path("cluster_config/remote.yaml"))
    with open_cluster(target) as session:
        session.client            # distributed.Client, set as the default scheduler
        session.dashboard_link    # str or None
        session.description       # JSON-able summary, without secrets or key material

On connecting, the workers are checked: they must import ``fmnist_dask`` and run the same
versions of the key packages as the client, otherwise :class:`ClusterError` names the package,
the worker and both versions.
"""

from __future__ import annotations

import builtins
import contextlib
import importlib
import logging
import threading
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fmnist_dask.logs import stages_since

logger = logging.getLogger(__name__)

#: Distribution name -> import name of the packages that must match between client and workers.
KEY_PACKAGES: dict[str, str] = {
    "fmnist-dask": "fmnist_dask",
    "dask": "dask",
    "distributed": "distributed",
    "numpy": "numpy",
    "pandas": "pandas",
    "scikit-learn": "sklearn",
    "dask-ml": "dask_ml",
}
#: Packages the scheduler must match too (it does not run the job's code).
SCHEDULER_PACKAGES = ("dask", "distributed")
DEFAULT_SCHEDULER_PORT = 8786


class ClusterError(RuntimeError):
    """The cluster cannot be used: unreachable, refused, no workers, or mismatched workers."""


class ClusterConfigError(ClusterError, ValueError):
    """A cluster configuration file or ``--scheduler`` address is invalid."""


# ---------------------------------------------------------------------------------------------
# Configuration models
# ---------------------------------------------------------------------------------------------


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def public_settings(self) -> dict[str, Any]:
        """Settings safe to write to a manifest or log (no key material, no env values)."""
        return self.model_dump(mode="json")


def _machine_cpus() -> int:
    from dask.system import CPU_COUNT  # honours CPU affinity and cgroup quotas

    return int(CPU_COUNT)


def _machine_memory() -> int:
    from distributed.system import MEMORY_LIMIT  # total RAM, capped by cgroup limits

    return int(MEMORY_LIMIT)


def _parse_bytes(value: int | str, key: str) -> int:
    from dask.utils import parse_bytes

    try:
        size = int(value) if isinstance(value, int) else int(parse_bytes(value))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{key} must be bytes or a size like '4GiB', got {value!r}") from exc
    if size <= 0:
        raise ValueError(f"{key} must be positive, got {value!r}")
    return size


class LocalConfig(_Config):
    """A ``LocalCluster`` of worker processes on this machine.

    ``None`` fields are sized for the machine when the file is loaded: dask's own split of the
    CPU count into processes x threads (2 cores -> 2 workers x 1 thread) and 80% of the RAM
    (cgroup-aware) shared equally between the workers.
    """

    kind: Literal["local"] = "local"
    n_workers: int | None = Field(default=None, ge=1)
    threads_per_worker: int | None = Field(default=None, ge=1)
    memory_limit: int | str | None = None  # per worker; bytes or "4GiB"
    dashboard_address: str | None = "127.0.0.1:8787"  # a random port if 8787 is busy
    host: str = "127.0.0.1"
    local_directory: Path | None = None  # where workers spill to disk
    # Fractions of memory_limit (distributed.worker.memory.*): start spilling at target/spill,
    # pause new tasks at pause, restart the worker at terminate.
    memory_target: float = Field(default=0.6, gt=0, le=1)
    memory_spill: float = Field(default=0.7, gt=0, le=1)
    memory_pause: float = Field(default=0.8, gt=0, le=1)
    memory_terminate: float = Field(default=0.95, gt=0, le=1)

    @field_validator("memory_limit")
    @classmethod
    def _memory_bytes(cls, value: int | str | None) -> int | None:
        return None if value is None else _parse_bytes(value, "memory_limit")

    @field_validator("local_directory")
    @classmethod
    def _relative_to_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else _resolve(value, info)

    @model_validator(mode="after")
    def _size_for_machine(self) -> LocalConfig:
        from distributed.deploy.utils import nprocesses_nthreads

        cpus = _machine_cpus()
        if self.n_workers is None and self.threads_per_worker is None:
            n_workers, threads = nprocesses_nthreads(cpus)
        elif self.n_workers is None:
            threads = self.threads_per_worker
            n_workers = max(1, cpus // threads)
        elif self.threads_per_worker is None:
            n_workers = self.n_workers
            threads = max(1, cpus // n_workers)
        else:
            n_workers, threads = self.n_workers, self.threads_per_worker
        memory = self.memory_limit or int(0.8 * _machine_memory() / n_workers)
        fractions = [self.memory_target, self.memory_spill, self.memory_pause,
                     self.memory_terminate]
        if fractions != sorted(fractions):
            raise ValueError(
                "memory fractions must satisfy memory_target <= memory_spill <= memory_pause "
                f"<= memory_terminate, got {fractions}"
            )
        # frozen model: write the resolved values through the instance dict
        object.__setattr__(self, "n_workers", n_workers)
        object.__setattr__(self, "threads_per_worker", threads)
        object.__setattr__(self, "memory_limit", memory)
        return self


def _check_address(value: str, schemes: tuple[str, ...], key: str = "address") -> str:
    parts = urlsplit(value)
    if parts.scheme not in schemes:
        wanted = " or ".join(f"{s}://" for s in schemes)
        raise ValueError(f"{key} must start with {wanted}, got {value!r}")
    if not parts.hostname:
        raise ValueError(f"{key} has no host: {value!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{key} has an invalid port: {value!r}") from exc
    if port is None:
        raise ValueError(
            f"{key} needs a port, e.g. {parts.scheme}://{parts.hostname}:{DEFAULT_SCHEDULER_PORT}"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{key} must be scheme://host:port only, got {value!r}")
    return value.rstrip("/")


class RemoteConfig(_Config):
    """An existing scheduler reached over plain TCP (trusted networks only)."""

    kind: Literal["remote"]
    address: str
    connect_timeout: float = Field(default=30.0, gt=0)  # seconds
    min_workers: int = Field(default=1, ge=1)  # wait until this many workers are connected
    workers_timeout: float = Field(default=60.0, gt=0)  # seconds to wait for min_workers

    @field_validator("address")
    @classmethod
    def _tcp(cls, value: str) -> str:
        return _check_address(value, ("tcp",))


def _resolve(value: Path, info: ValidationInfo) -> Path:
    """Relative paths are relative to the directory of the config file."""
    base = (info.context or {}).get("base_dir")
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return path


class RemoteTLSConfig(_Config):
    """An existing scheduler reached over mutual TLS (``tls://``).

    The client presents ``cert_file``/``key_file`` and trusts only schedulers whose certificate
    is signed by ``ca_file``; the scheduler in turn refuses clients without a certificate from
    its CA. Relative paths are relative to the config file.
    """

    kind: Literal["remote-tls"]
    address: str
    ca_file: Path
    cert_file: Path
    key_file: Path
    connect_timeout: float = Field(default=30.0, gt=0)
    min_workers: int = Field(default=1, ge=1)
    workers_timeout: float = Field(default=60.0, gt=0)

    @field_validator("address")
    @classmethod
    def _tls(cls, value: str) -> str:
        return _check_address(value, ("tls",))

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _existing_file(cls, value: Path, info: ValidationInfo) -> Path:
        path = _resolve(value, info)
        if not path.is_file():
            raise ValueError(f"file not found: {path}")
        return path

    def public_settings(self) -> dict[str, Any]:
        # Certificates are public, but the key's location is kept out of manifests and logs.
        return {"kind": self.kind, "address": self.address, "ca_file": str(self.ca_file),
                "cert_file": str(self.cert_file), "connect_timeout": self.connect_timeout,
                "min_workers": self.min_workers, "workers_timeout": self.workers_timeout}


class SlurmConfig(_Config):
    """Workers as SLURM batch jobs via ``dask_jobqueue.SLURMCluster`` (optional package).

    Each job runs ``processes`` workers sharing ``cores`` and ``memory``. The compute nodes must
    see the same Python environment (e.g. ``job_script_prologue: ["source venv/bin/activate"]``).
    """

    kind: Literal["slurm"]
    queue: str | None = None  # SLURM partition (#SBATCH -p)
    account: str | None = None  # #SBATCH -A
    cores: int = Field(ge=1)  # per job
    memory: str  # per job, e.g. "16GiB"
    processes: int = Field(default=1, ge=1)  # workers per job
    walltime: str = "01:00:00"
    n_jobs: int = Field(default=1, ge=1)
    job_extra_directives: list[str] = Field(default_factory=list)
    job_script_prologue: list[str] = Field(default_factory=list)
    interface: str | None = None  # network interface of the nodes, e.g. "ib0"
    local_directory: str | None = None  # node-local scratch for spilling, e.g. "$TMPDIR"
    log_directory: str | None = None
    python: str | None = None  # Python executable on the nodes
    dashboard_address: str = ":8787"
    min_workers: int = Field(default=1, ge=1)
    workers_timeout: float = Field(default=600.0, gt=0)  # jobs may wait in the queue

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str) -> str:
        _parse_bytes(value, "memory")
        return value


class KubernetesResources(_Config):
    requests: dict[str, str] = Field(default_factory=dict)  # e.g. {cpu: "1", memory: "4Gi"}
    limits: dict[str, str] = Field(default_factory=dict)


class KubernetesConfig(_Config):
    """A cluster created by the Dask Kubernetes operator (``dask_kubernetes.operator``).

    ``image`` must contain this project (same versions as the client).
    """

    kind: Literal["kubernetes"]
    name: str = "fmnist-dask"
    namespace: str | None = None
    image: str
    n_workers: int = Field(default=2, ge=1)
    resources: KubernetesResources = Field(default_factory=KubernetesResources)
    env: dict[str, str] = Field(default_factory=dict)
    worker_command: str = "dask worker"
    scheduler_service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    port_forward_cluster_ip: bool | None = None
    shutdown_on_close: bool = True
    resource_timeout: int = Field(default=60, ge=1)  # seconds for k8s resources to come up
    min_workers: int = Field(default=1, ge=1)
    workers_timeout: float = Field(default=600.0, gt=0)

    def public_settings(self) -> dict[str, Any]:
        settings = self.model_dump(mode="json")
        settings["env"] = sorted(self.env)  # names only: values may be credentials
        return settings


ClusterTarget = Annotated[
    LocalConfig | RemoteConfig | RemoteTLSConfig | SlurmConfig | KubernetesConfig,
    Field(discriminator="kind"),
]
_TARGET_ADAPTER: TypeAdapter = TypeAdapter(ClusterTarget)
_KINDS = ("local", "remote", "remote-tls", "slurm", "kubernetes")
_MODELS = {"local": LocalConfig, "remote": RemoteConfig, "remote-tls": RemoteTLSConfig,
           "slurm": SlurmConfig, "kubernetes": KubernetesConfig}


def _format_validation_error(exc: ValidationError, source: str, data: Any) -> str:
    """One line per problem, each naming the key (dotted for nested keys) and the file."""
    kind = data.get("kind") if isinstance(data, dict) else None
    lines = []
    for err in exc.errors():
        loc = list(err["loc"])
        if loc and loc[0] == kind:  # the discriminated union puts the kind first
            loc = loc[1:]
        key = ".".join(str(part) for part in loc) or "(top level)"
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            got = f", got {kind!r}" if kind is not None else ""
            lines.append(f"key 'kind': must be one of {', '.join(_KINDS)}{got}")
        elif err["type"] == "extra_forbidden":
            allowed = ""
            model = _MODELS.get(kind) if len(loc) == 1 else None
            if model is not None:
                allowed = f" (allowed keys: {', '.join(model.model_fields)})"
            lines.append(f"unknown key '{key}'{allowed}")
        elif err["type"] == "missing":
            lines.append(f"missing required key '{key}'")
        else:
            message = err["msg"].removeprefix("Value error, ")
            lines.append(f"key '{key}': {message} (got {err.get('input')!r})")
    return f"invalid cluster config {source}:\n  " + "\n  ".join(lines)


def validate_cluster_config(
    data: Any, source: str = "<dict>", base_dir: Path | None = None
) -> ClusterTarget:
    """Validate a mapping as a cluster target; raise :class:`ClusterConfigError` naming keys."""
    if not isinstance(data, dict):
        raise ClusterConfigError(
            f"invalid cluster config {source}: expected a mapping of keys, got "
            f"{type(data).__name__}"
        )
    try:
        return _TARGET_ADAPTER.validate_python(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ClusterConfigError(_format_validation_error(exc, source, data)) from None


def _scheduler_target(scheduler: str, base: ClusterTarget | None, source: str) -> ClusterTarget:
    address = scheduler.strip()
    if "://" not in address:
        address = f"tcp://{address}"
    scheme = address.split("://", 1)[0]
    if scheme == "tcp":
        if base is not None and not isinstance(base, RemoteConfig):
            raise ClusterConfigError(
                f"--scheduler {scheduler} is a plain TCP address but {source} has kind "
                f"'{base.kind}'; use a kind: remote config or no --cluster"
            )
        settings = base.model_dump() if base is not None else {"kind": "remote"}
    elif scheme == "tls":
        if not isinstance(base, RemoteTLSConfig):
            raise ClusterConfigError(
                f"--scheduler {scheduler} needs certificates: pass --cluster with a "
                "kind: remote-tls config (ca_file, cert_file, key_file)"
            )
        settings = base.model_dump()
    else:
        raise ClusterConfigError(
            f"--scheduler {scheduler}: unsupported protocol '{scheme}://' (use tcp:// or tls://)"
        )
    settings["address"] = address
    try:
        return _TARGET_ADAPTER.validate_python(settings)
    except ValidationError as exc:
        message = _format_validation_error(exc, "--scheduler", settings)
        raise ClusterConfigError(message) from None


def job_cluster_target(ref: Any) -> ClusterTarget:
    """The cluster target a job spec's ``cluster:`` section (``config.ClusterRef``: a file,
    a scheduler address, or neither for the default local cluster) names."""
    return load_cluster_config(Path(ref.config) if ref.config else None, ref.scheduler)


def load_cluster_config(path: Path | None, scheduler: str | None = None) -> ClusterTarget:
    """Load the cluster target from ``--cluster FILE`` and/or ``--scheduler ADDRESS``.

    Parameters
    ----------
    path : Path or None
        YAML file with a ``kind`` key (see ``cluster_config/``). Relative file paths inside it
        are relative to the file's directory.
    scheduler : str or None
        Scheduler address. ``host:port`` or ``tcp://host:port`` gives a ``remote`` target (or
        overrides the address of a ``remote`` file); ``tls://host:port`` overrides the address
        of a ``remote-tls`` file, which supplies the certificates.

    Returns
    -------
    ClusterTarget
        Validated configuration; ``None, None`` gives the default local cluster sized for this
        machine.

    Raises
    ------
    ClusterConfigError
        Unreadable file, bad YAML, unknown or missing keys, wrong types; the message names the
        key and the file.
    """
    base: ClusterTarget | None = None
    source = "--scheduler"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ClusterConfigError(f"cannot read cluster config {path}: {exc}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ClusterConfigError(f"cluster config {path} is not valid YAML: {exc}") from None
        base = validate_cluster_config(data, source, base_dir=path.resolve().parent)
    if scheduler is not None:
        return _scheduler_target(scheduler, base, source)
    return base if base is not None else LocalConfig()


# ---------------------------------------------------------------------------------------------
# Worker environment check
# ---------------------------------------------------------------------------------------------


def _environment_probe(packages: dict[str, str]) -> dict[str, list]:
    """``{distribution: [version or None, error or None]}`` plus ``python``, where it runs.

    Imports ``fmnist_dask`` for real (the job's tasks need it) and reads the others' installed
    metadata after checking their modules can be found. Self-contained: it is shipped by value.
    """
    import importlib
    import importlib.metadata
    import importlib.util
    import sys

    result: dict[str, list] = {"python": [f"{sys.version_info[0]}.{sys.version_info[1]}", None]}
    for dist, module_name in packages.items():
        try:
            if module_name == "fmnist_dask":
                module = importlib.import_module(module_name)
                version = getattr(module, "__version__", None)
                version = version or importlib.metadata.version(dist)
            else:
                if importlib.util.find_spec(module_name) is None:
                    raise ModuleNotFoundError(f"No module named {module_name!r}")
                version = importlib.metadata.version(dist)
            result[dist] = [str(version), None]
        except Exception as exc:  # any failure means the worker cannot run the job
            result[dist] = [None, f"{type(exc).__name__}: {exc}"]
    return result


def _kernel_probe() -> dict[str, str | None]:
    """The numeric kernels this process runs, which can change results in their last bits.

    ``blas``: each BLAS library loaded (numpy's, scipy's), its version and the CPU core type
    whose kernels it picked at run time (OpenBLAS's ``DYNAMIC_ARCH``); ``numba_cpu``: the
    CPU numba compiles for.
    The same code on AVX-512 and on AVX2 kernels gives the manifold method another
    partition (docs/quality.md, "Seed 0 today"). Self-contained: it is shipped by value.
    """
    import os

    found: dict[str, str | None] = {"blas": None, "numba_cpu": None}
    try:
        # numpy and scipy each load their own OpenBLAS; threadpoolctl lists those loaded
        import numpy  # noqa: F401
        import scipy.linalg  # noqa: F401
        from threadpoolctl import threadpool_info

        found["blas"] = " + ".join(sorted(
            " ".join(str(lib[key]) for key in ("internal_api", "version", "architecture")
                     if lib.get(key))
            for lib in threadpool_info() if lib.get("user_api") == "blas")) or None
    except Exception:  # a description, never a reason to fail
        pass
    try:
        import llvmlite.binding

        found["numba_cpu"] = (os.environ.get("NUMBA_CPU_NAME")
                              or llvmlite.binding.get_host_cpu_name())
    except Exception:
        pass
    return found


def _environ_probe(names: list[str]) -> dict[str, str | None]:
    """This process's value of each environment variable in ``names`` (None where unset).
    Self-contained: it is shipped by value."""
    import os

    return {name: os.environ.get(name) for name in names}


def _by_value(func: Callable) -> Callable:
    """A copy of ``func`` that cloudpickle ships by value, not as ``fmnist_dask.<name>``.

    A worker without fmnist_dask could not unpickle a by-reference function from this module,
    which is exactly the case the probe must report.
    """
    namespace = {"__builtins__": builtins, "__name__": "_fmnist_dask_probe"}
    return types.FunctionType(func.__code__, namespace, func.__name__, func.__defaults__)


T = TypeVar("T")


def call_with_timeout(func: Callable[[], T], timeout: float, what: str) -> T:
    """Run a blocking client call in a helper thread so an unresponsive cluster cannot hang us."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = func()
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"fmnist-dask-{what}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise ClusterError(f"{what} did not answer within {timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def local_versions() -> dict[str, str | None]:
    """Versions of the key packages (and Python major.minor) in this process."""
    return {name: info[0] for name, info in _environment_probe(dict(KEY_PACKAGES)).items()}


def check_worker_environments(client: Any, timeout: float = 60.0) -> dict[str, str | None]:
    """Raise :class:`ClusterError` unless every worker matches this client's key packages.

    Parameters
    ----------
    client : distributed.Client
        Connected client.
    timeout : float
        Seconds to wait for the workers' and the scheduler's answers.

    Returns
    -------
    dict
        The client's versions ``{package: version}`` (they equal the workers').
    """
    mine = _environment_probe(dict(KEY_PACKAGES))
    probe = _by_value(_environment_probe)
    workers = call_with_timeout(
        lambda: client.run(probe, dict(KEY_PACKAGES), on_error="return"), timeout,
        "the workers' environment check",
    )
    scheduler = call_with_timeout(
        lambda: client.get_versions(packages=list(SCHEDULER_PACKAGES))["scheduler"], timeout,
        "the scheduler's version report",
    )
    problems: list[str] = []
    for address, answer in sorted(workers.items()):
        if isinstance(answer, BaseException):
            problems.append(f"worker {address}: environment check failed "
                            f"({type(answer).__name__}: {answer})")
            continue
        for name, (version, _) in mine.items():
            theirs, error = answer.get(name, [None, "not reported"])
            if error is not None:
                problems.append(
                    f"{name}: worker {address} cannot import it ({error}); "
                    f"the client has {version}"
                )
            elif theirs != version:
                problems.append(f"{name}: worker {address} has {theirs}, the client has {version}")
    sched_packages = (scheduler or {}).get("packages", {})
    for name in SCHEDULER_PACKAGES:
        theirs = sched_packages.get(name)
        if theirs != mine[name][0]:
            problems.append(f"{name}: the scheduler has {theirs}, the client has {mine[name][0]}")
    if problems:
        raise ClusterError(
            "the cluster's environment does not match this client:\n  - "
            + "\n  - ".join(problems)
            + "\nInstall this project and the same package versions on every worker "
            "(see docs/cluster.md)."
        )
    return {name: info[0] for name, info in mine.items()}


# ---------------------------------------------------------------------------------------------
# Watching the cluster while the job runs
# ---------------------------------------------------------------------------------------------


class ClusterWatchdog:
    """Follows the scheduler and its workers from a background thread while the job runs.

    Every ``interval`` seconds it asks the scheduler who its workers are, and logs a warning
    when a worker leaves (Dask then recomputes the results it held on the others). It gives
    up on the cluster -- cutting the client's connection, so that the job's running
    computation fails at once instead of waiting forever -- when

    - the scheduler does not answer for ``timeout`` seconds (frozen, or a network partition
      that TCP has not noticed), or
    - no worker has been connected for ``workers_timeout`` seconds.

    A scheduler that closes the connection (crashed, killed) is noticed by the client itself.
    ``lost`` then says why, for :class:`ClusterError`.
    """

    def __init__(self, client: Any, label: str, timeout: float, workers_timeout: float,
                 interval: float = 1.0) -> None:
        self.client = client
        self.label = label
        self.timeout = timeout
        self.workers_timeout = workers_timeout
        self.interval = interval
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fmnist-dask-watchdog",
                                        daemon=True)

    def start(self) -> ClusterWatchdog:
        self._asked = time.monotonic()
        try:  # the workers at the start, so that a loss before the first poll is named too
            self._known: dict[str, str] | None = self._ask()
        except Exception:
            self._known = None
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 1)

    def _ask(self) -> dict[str, str]:
        info = self.client.sync(self.client.scheduler.identity, n_workers=-1,
                                callback_timeout=self.timeout)
        return {addr: str(w.get("name", addr)) for addr, w in info.get("workers", {}).items()}

    def _run(self) -> None:
        known = self._known
        empty_since: float | None = None
        asked = self._asked  # when ``known`` was asked for
        while not self._stop.wait(self.interval):
            if self.client.status != "running":
                if self.client.status in ("closing", "closed"):
                    return
                continue  # reconnecting: the client decides within its own timeout
            polled = time.monotonic()
            try:
                workers = self._ask()
            except TimeoutError:
                if not self._stop.is_set() and self.client.status == "running":
                    self._give_up(f"the scheduler at {self.label} did not answer for "
                                  f"{self.timeout:g} s")
                return
            except Exception as exc:  # connection errors: the client notices them too
                logger.debug("watchdog: %s: %s", type(exc).__name__, exc)
                continue
            if known is not None:
                for addr in sorted(known.keys() - workers.keys()):
                    # it left at some moment since the last answer: name every stage that
                    # ran since, not only those still running (one may have just ended)
                    logger.warning("worker %s (%s) left the cluster; %d worker(s) remain; "
                                   "Dask recomputes the results it held", addr, known[addr],
                                   len(workers), extra={"stage": stages_since(asked)})
                for addr in sorted(workers.keys() - known.keys()):
                    logger.info("worker %s (%s) joined the cluster; %d worker(s)", addr,
                                workers[addr], len(workers))
            known, asked = workers, polled
            if workers:
                empty_since = None
            elif empty_since is None:
                empty_since = time.monotonic()
            elif time.monotonic() - empty_since > self.workers_timeout:
                self._give_up(f"no worker has been connected to {self.label} for "
                              f"{self.workers_timeout:g} s")
                return

    def _give_up(self, reason: str) -> None:
        self.lost = reason
        logger.error("%s: stopping the job", reason)

        def cut() -> None:  # on the client's event loop; the client then cancels its futures
            comm = self.client.scheduler_comm
            if comm is not None:
                comm.abort()

        self.client.loop.add_callback(cut)


#: Worker-side loggers whose warnings and errors are re-emitted in the client's log.
FORWARDED_LOGGER = "distributed"


def _forward_worker_warnings(client: Any, timeout: float) -> bool:
    """Have the workers send their ``distributed`` warnings and errors to this client.

    They are then logged here like the client's own lines (with the worker's address), so
    they reach the terminal and ``run.log``: a worker's memory warnings or a task's failure on
    a remote machine. Returns whether forwarding is on.
    """
    try:
        call_with_timeout(lambda: client.forward_logging(FORWARDED_LOGGER, logging.WARNING),
                           timeout, "forwarding the workers' warnings")
    except Exception as exc:  # the job runs without it; the workers' own logs still have them
        logger.warning("the workers' warnings stay in their own logs: %s: %s",
                       type(exc).__name__, exc)
        return False
    return True


def _lost_connection(client: Any, error: BaseException, label: str,
                     watchdog: ClusterWatchdog | None) -> str | None:
    """Why ``error`` means the cluster went away, or None when it is an ordinary error."""
    if watchdog is not None and watchdog.lost:
        return watchdog.lost
    reason = getattr(error, "reason", None)
    if reason == "scheduler-connection-lost" or client.status in ("connecting", "closing",
                                                                  "closed"):
        return f"lost the connection to the scheduler at {label} while the job was running"
    return None


# ---------------------------------------------------------------------------------------------
# Opening a cluster
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterSession:
    """A connected client and what it is connected to.

    Attributes
    ----------
    client : distributed.Client
        The job's client (also the default scheduler for dask collections).
    target : ClusterTarget
        The configuration that was opened.
    dashboard_link : str or None
        URL of the scheduler's dashboard, None when it has none.
    description : dict
        JSON-able: kind, scheduler address, dashboard link, workers (name, threads, memory
        limit in bytes), key package versions, public settings. No secrets or key material.
    cluster : object or None
        The cluster manager this session started (local, SLURM, Kubernetes), else None.
    """

    client: Any
    target: Any
    dashboard_link: str | None
    description: dict[str, Any]
    cluster: Any = None


def _optional_import(module: str, package: str, kind: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ClusterError(
            f"kind: {kind} needs the optional package '{package}' which is not installed "
            f"here ({exc}); install it with: pip install {package}"
        ) from None


def _dashboard_link(client: Any) -> str | None:
    try:
        return client.dashboard_link
    except (KeyError, AttributeError, OSError):  # scheduler without a dashboard
        return None


def _probe_workers(client: Any, probe: Callable, *args: Any, timeout: float, what: str
                   ) -> dict[str, Any]:
    """``{worker address: probe(*args)}`` (an exception for a worker where it failed), or {}
    when the workers do not answer within ``timeout``: a description, never a reason to fail."""
    try:
        return call_with_timeout(
            lambda: client.run(_by_value(probe), *args, on_error="return"), timeout,
            f"the workers' {what} report")
    except ClusterError:
        return {}


def _describe(client: Any, target: ClusterTarget, versions: dict[str, str | None],
              dashboard: str | None, timeout: float = 60.0) -> dict[str, Any]:
    info = client.scheduler_info(n_workers=-1)
    kernels = _probe_workers(client, _kernel_probe, timeout=timeout, what="kernel")
    environ = _probe_workers(client, _environ_probe, list(WORKER_ENV), timeout=timeout,
                             what="environment")
    workers = sorted(
        ({"name": str(w.get("name")), "address": addr, "nthreads": int(w.get("nthreads", 0)),
          "memory_limit_bytes": int(w.get("memory_limit") or 0),
          "kernels": k if isinstance(k := kernels.get(addr), dict) else None,
          "environ": e if isinstance(e := environ.get(addr), dict) else None}
         for addr, w in info.get("workers", {}).items()),
        key=lambda w: (w["name"], w["address"]),
    )
    return {
        "kind": target.kind,
        "address": info.get("address"),
        "tls": str(info.get("address", "")).startswith("tls://"),
        "dashboard_link": dashboard,
        "n_workers": len(workers),
        "total_threads": sum(w["nthreads"] for w in workers),
        "workers": workers,
        "versions": versions,
        "settings": target.public_settings(),
    }


def _connect_client(address_or_cluster: Any, *, timeout: float, security: Any = None,
                    label: str) -> Any:
    from distributed import Client

    try:
        return Client(address_or_cluster, timeout=timeout, security=security)
    except Exception as exc:
        hint = ("check the address, that `dask scheduler` runs there and that the port is open"
                " (a tls:// scheduler needs kind: remote-tls)")
        if security is not None:
            hint = ("check the address, and that the scheduler's certificate is signed by "
                    "ca_file and the client's certificate by the CA the scheduler trusts")
        raise ClusterError(
            f"could not connect to the Dask scheduler at {label} within {timeout:g} s "
            f"({type(exc).__name__}: {exc}); {hint}"
        ) from None


def _tls_security(target: RemoteTLSConfig) -> Any:
    from distributed.security import Security

    try:
        security = Security(
            tls_ca_file=str(target.ca_file), tls_client_cert=str(target.cert_file),
            tls_client_key=str(target.key_file), require_encryption=True,
        )
        security.get_connection_args("client")  # load the files now: clear error if unusable
    except Exception as exc:
        raise ClusterError(
            f"cannot load the TLS files (ca_file {target.ca_file}, cert_file "
            f"{target.cert_file}): {type(exc).__name__}: {exc}"
        ) from None
    return security


#: glibc settings for the worker processes. Dask's nanny sets MALLOC_TRIM_THRESHOLD_=64 KiB,
#: which also freezes glibc's mmap threshold at 128 KiB: every block-sized temporary is then
#: a fresh mapping whose pages fault in at ~8 us per 4 KiB (a 31 MB float32 block: ~60 ms,
#: more than the k-means product on it). Up to 32 MiB from the heap, and 128 MiB of freed
#: heap kept per worker, took a 16x k-means|| pass from 18.9 to 12.8 s of task time
#: (docs/benchmarks.md, "Worker allocations").
WORKER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": 32 << 20, "MALLOC_TRIM_THRESHOLD_": 128 << 20}

#: OpenMP threads of a worker (openTSNE's gradient) sleep at once when they wait, instead of
#: spinning: a worker is one of several on the machine's cores, and a spinning thread takes
#: its core from the other workers' tasks. The 70,000-row t-SNE fit on two threads beside
#: one busy core: 41.3 -> 36.6 CPU-s (wall 36.6 -> 34.9 s), the busy core's work 5.7%
#: faster; alone on the machine 23.7 vs 24.0 s (docs/benchmarks.md, "Big data, session 12").
WORKER_OMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}

#: Both, as every worker should have them. Workers started by hand get them from
#: ``cluster_config/dask-worker.yaml`` (dask configuration: the nanny would overwrite
#: ``MALLOC_TRIM_THRESHOLD_`` taken from the shell); the job warns when a worker lacks them.
WORKER_ENV = {**WORKER_MALLOC_ENV, **WORKER_OMP_ENV}
#: Imported by each worker as it starts (``distributed.worker.preload``): the modules of
#: the job's tasks, imported there before the first stage instead of inside it.
WORKER_PRELOAD = "fmnist_dask.worker_preload"


def workers_lacking_settings(description: dict[str, Any]) -> list[str]:
    """Names of the workers in a cluster description (:func:`open_cluster`) whose environment
    differs from :data:`WORKER_ENV`; workers that could not report are not listed."""
    wanted = {name: str(value) for name, value in WORKER_ENV.items()}
    return [w["name"] for w in description.get("workers", [])
            if isinstance(w.get("environ"), dict) and w["environ"] != wanted]


def _malloc_trim() -> bool:
    """Return this process's freed heap memory to the system (glibc ``malloc_trim``);
    False where there is no glibc."""
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def trim_worker_memory(client: Any) -> None:
    """``malloc_trim`` on every worker (dask's advice for unmanaged memory).

    The workers keep freed heap memory for reuse (:data:`WORKER_MALLOC_ENV`), and glibc
    returns only the top of a heap by itself: the many ~1-30 MB blocks of a stage (streamed
    pixel blocks, k-means states) leave a high-water mark that the next stages would carry.
    Called between stages, where it costs a few milliseconds.
    """
    client.run(_malloc_trim)


def local_cluster(target: LocalConfig) -> Any:
    """The ``LocalCluster`` that ``target`` describes, its workers set up as every job's are
    (memory thresholds, :data:`WORKER_ENV`)."""
    import dask
    from distributed import LocalCluster

    memory = {
        "distributed.worker.memory.target": target.memory_target,
        "distributed.worker.memory.spill": target.memory_spill,
        "distributed.worker.memory.pause": target.memory_pause,
        "distributed.worker.memory.terminate": target.memory_terminate,
        "distributed.nanny.pre-spawn-environ": {
            **dask.config.get("distributed.nanny.pre-spawn-environ", {}), **WORKER_ENV},
        "distributed.worker.preload": [
            *dask.config.get("distributed.worker.preload", []), WORKER_PRELOAD],
    }
    # The nannies copy dask.config when created, so the thresholds reach the workers.
    with dask.config.set(memory):
        return LocalCluster(
            n_workers=target.n_workers, threads_per_worker=target.threads_per_worker,
            memory_limit=target.memory_limit, processes=True, host=target.host,
            dashboard_address=target.dashboard_address,
            local_directory=str(target.local_directory) if target.local_directory else None,
            # The workers' own stderr lines would bypass this process's log format and
            # run.log; their warnings reach the client instead (_forward_worker_warnings).
            silence_logs=logging.CRITICAL,
        )


def _slurm_cluster(target: SlurmConfig) -> Any:
    jobqueue = _optional_import("dask_jobqueue", "dask-jobqueue", target.kind)
    cluster = jobqueue.SLURMCluster(
        queue=target.queue, account=target.account, cores=target.cores,
        memory=target.memory, processes=target.processes, walltime=target.walltime,
        job_extra_directives=target.job_extra_directives,
        job_script_prologue=target.job_script_prologue, interface=target.interface,
        local_directory=target.local_directory, log_directory=target.log_directory,
        python=target.python,
        scheduler_options={"dashboard_address": target.dashboard_address},
    )
    cluster.scale(jobs=target.n_jobs)
    return cluster


def _kubernetes_cluster(target: KubernetesConfig) -> Any:
    operator = _optional_import("dask_kubernetes.operator", "dask-kubernetes", target.kind)
    return operator.KubeCluster(
        name=target.name, namespace=target.namespace, image=target.image,
        n_workers=target.n_workers,
        resources=target.resources.model_dump(exclude_defaults=True) or None,
        env=dict(target.env), worker_command=target.worker_command.split(),
        scheduler_service_type=target.scheduler_service_type,
        port_forward_cluster_ip=target.port_forward_cluster_ip,
        shutdown_on_close=target.shutdown_on_close,
        resource_timeout=target.resource_timeout,
    )


_CLUSTER_FACTORIES: dict[type, Callable[[Any], Any]] = {
    LocalConfig: local_cluster, SlurmConfig: _slurm_cluster, KubernetesConfig: _kubernetes_cluster,
}


def _start_cluster(target: ClusterTarget) -> tuple[Any, Any]:
    """(cluster manager this session owns or None, what to hand to Client) for ``target``."""
    factory = _CLUSTER_FACTORIES.get(type(target))
    if factory is None:  # remote kinds: connect to the existing scheduler
        return None, target.address
    try:
        cluster = factory(target)
    except ClusterError:
        raise
    except Exception as exc:
        raise ClusterError(
            f"could not start the {target.kind} cluster: {type(exc).__name__}: {exc}"
        ) from None
    return cluster, cluster


class StartingCluster:
    """The cluster of ``target``, started in a background thread; :func:`open_cluster` takes it.

    For the command line: a local cluster's worker processes boot (about 1 s) while the
    client imports the stages (1.2 s), instead of after them. As a ``with`` block it
    closes a cluster that no :func:`open_cluster` took (the run failed before connecting).
    """

    def __init__(self, target: ClusterTarget) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.target = target
        self._taken = False
        pool = ThreadPoolExecutor(1, thread_name_prefix="fmnist-dask-cluster-start")
        self._started = pool.submit(_start_cluster, target)
        pool.shutdown(wait=False)  # the thread ends once the cluster is up

    def take(self) -> tuple[Any, Any]:
        """``(cluster manager or None, what to hand to Client)``, once started; raises what
        starting it raised."""
        self._taken = True
        return self._started.result()

    def __enter__(self) -> StartingCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._taken:
            return
        with contextlib.suppress(Exception):
            cluster, _ = self._started.result()
            if cluster is not None:
                cluster.close(timeout=30)


@contextlib.contextmanager
def open_cluster(target: ClusterTarget | StartingCluster, *, check_versions: bool = True
                 ) -> Iterator[ClusterSession]:
    """Start or connect to the cluster described by ``target``; close what was opened on exit.

    Parameters
    ----------
    target : ClusterTarget or StartingCluster
        From :func:`load_cluster_config`, or that target's cluster already starting.
    check_versions : bool
        Check that every worker imports fmnist_dask and has the client's key package versions.

    Yields
    ------
    ClusterSession

    Raises
    ------
    ClusterError
        The scheduler cannot be reached or refuses us within ``connect_timeout``, fewer than
        ``min_workers`` workers join within ``workers_timeout``, or the workers' environment
        does not match. Also raised from the ``with`` block when the cluster goes away while
        the job runs: the connection to the scheduler is lost, the scheduler stops answering
        for ``connect_timeout`` seconds, or no worker is left for ``workers_timeout`` seconds
        (see :class:`ClusterWatchdog`); the block's own error is its ``__cause__``.
    """
    if isinstance(target, StartingCluster):
        target, (cluster, where) = target.target, target.take()
    else:
        cluster, where = _start_cluster(target)
    client = None
    watchdog = None
    forwarding = False
    try:
        security = _tls_security(target) if isinstance(target, RemoteTLSConfig) else None
        timeout = getattr(target, "connect_timeout", 60.0)
        label = getattr(target, "address", None) or f"the new {target.kind} cluster"
        logger.info("connecting to %s (kind: %s)", label, target.kind)
        client = _connect_client(where, timeout=timeout, security=security, label=label)
        min_workers = getattr(target, "min_workers", 1)
        workers_timeout = getattr(target, "workers_timeout", 60.0)
        try:
            client.wait_for_workers(min_workers, timeout=workers_timeout)
        except Exception as exc:
            have = len(client.scheduler_info(n_workers=-1).get("workers", {}))
            raise ClusterError(
                f"the scheduler at {label} has {have} worker(s), fewer than min_workers="
                f"{min_workers}, after {workers_timeout:g} s ({type(exc).__name__})"
            ) from None
        if check_versions:
            versions = check_worker_environments(client, timeout=workers_timeout)
        else:
            versions = local_versions()
        dashboard = _dashboard_link(client)
        description = _describe(client, target, versions, dashboard, workers_timeout)
        logger.info(
            "connected to %s: %d workers, %d threads, dashboard %s",
            description["address"], description["n_workers"], description["total_threads"],
            dashboard or "(none)",
        )
        lacking = workers_lacking_settings(description)
        if lacking:
            named = ", ".join(lacking[:4]) + (", ..." if len(lacking) > 4 else "")
            logger.warning(
                "%d of %d workers (%s) run without the worker settings %s: the default job "
                "took 1.17x as long so (docs/benchmarks.md, session 17); start workers with "
                "DASK_CONFIG=cluster_config/dask-worker.yaml (docs/cluster.md)", len(lacking),
                description["n_workers"], named,
                " ".join(f"{k}={v}" for k, v in WORKER_ENV.items()))
        session = ClusterSession(client=client, target=target, dashboard_link=dashboard,
                                 description=description, cluster=cluster)
        forwarding = _forward_worker_warnings(client, workers_timeout)
        watchdog = ClusterWatchdog(client, label, timeout, workers_timeout).start()
        try:
            # The session's client computes the block's dask collections, also when the
            # caller is inside another client's `with` block (which would stay "current").
            with client.as_current():
                yield session
        except Exception as error:
            lost = _lost_connection(client, error, label, watchdog)
            if lost is None:
                raise
            raise ClusterError(f"{lost}; the run cannot finish (rerun it when the cluster is "
                               "back)") from error
    finally:
        if watchdog is not None:
            watchdog.stop()
        if forwarding and client.status == "running":
            with contextlib.suppress(Exception):  # unregister: the cluster may be shared
                call_with_timeout(lambda: client.unforward_logging(FORWARDED_LOGGER), 10,
                                   "stopping the forwarding of the workers' warnings")
        if client is not None:
            gone = client.status != "running"
            # A client still trying to reconnect logs a traceback when closed: expected here.
            quiet = logging.getLogger("distributed.client")
            level = quiet.level
            if gone:
                quiet.setLevel(logging.CRITICAL)
            try:
                with contextlib.suppress(Exception):
                    client.close(timeout=2 if gone else 10)
            finally:
                quiet.setLevel(level)
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close(timeout=30)
