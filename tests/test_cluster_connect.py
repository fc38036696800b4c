"""Connecting to local and remote Dask clusters, with real scheduler and worker processes.

The remote tests start ``dask scheduler`` and ``dask worker`` as separate processes on
127.0.0.1 (tests/cluster_procs.py), the way a user runs them by hand.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
import socket
import ssl
import subprocess
import sys
import sysconfig
import urllib.request
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import yaml
from distributed import wait

import fmnist_dask
from fmnist_dask.dask_cluster import (
    WORKER_ENV,
    WORKER_PRELOAD,
    ClusterConfigError,
    ClusterError,
    KubernetesConfig,
    LocalConfig,
    RemoteConfig,
    RemoteTLSConfig,
    SlurmConfig,
    StartingCluster,
    load_cluster_config,
    open_cluster,
    trim_worker_memory,
    workers_lacking_settings,
)
from tests.cluster_procs import (
    WORKER_CONFIG,
    WorkerSpec,
    dask_processes,
    free_port,
    make_tls_files,
)
from tests.conftest import cli

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "cluster_config"
GiB = 1024**3


def _write(path: Path, data: dict | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _tls_yaml(directory: Path, address: str, ca: Path, cert: Path, key: Path, **extra) -> Path:
    """A remote-tls config whose paths are relative to the file, as in the example."""
    certs = directory / "certs"
    certs.mkdir(parents=True, exist_ok=True)
    for src, name in ((ca, "ca.pem"), (cert, "client.pem"), (key, "client.key")):
        shutil.copy(src, certs / name)
    data = {"kind": "remote-tls", "address": address, "ca_file": "certs/ca.pem",
            "cert_file": "certs/client.pem", "key_file": "certs/client.key", **extra}
    return _write(directory / "tls.yaml", data)


def _check_sum_on_all_workers(client, n_workers: int) -> None:
    """A real computation whose chunks land on every worker; compared with numpy."""
    rng = np.random.default_rng(0)
    values = rng.random((4000, 20))
    x = da.from_array(values, chunks=(250, 20)).persist()
    wait(x)
    holders = {w for w, keys in client.has_what().items() if keys}
    assert len(holders) == n_workers
    np.testing.assert_allclose((x.T @ x).compute(), values.T @ values, rtol=1e-12)
    np.testing.assert_allclose(x.mean(axis=0).compute(), values.mean(axis=0), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Configuration files
# ---------------------------------------------------------------------------------------------


def test_example_configs_validate(tmp_path):
    examples = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    assert examples == ["dask-worker.yaml", "kubernetes.yaml", "local.yaml", "remote-tls.yaml",
                        "remote.yaml", "slurm.yaml"]
    # dask's configuration for workers (checked below), not a cluster file: refused as one
    with pytest.raises(ClusterConfigError, match=r"dask-worker.yaml:\n  key 'kind'"):
        load_cluster_config(CONFIG_DIR / "dask-worker.yaml")
    local = load_cluster_config(CONFIG_DIR / "local.yaml")
    assert isinstance(local, LocalConfig) and local.dashboard_address == "127.0.0.1:8787"
    remote = load_cluster_config(CONFIG_DIR / "remote.yaml")
    assert isinstance(remote, RemoteConfig)
    assert (remote.address, remote.connect_timeout) == ("tcp://10.0.0.5:8786", 30)
    slurm = load_cluster_config(CONFIG_DIR / "slurm.yaml")
    assert isinstance(slurm, SlurmConfig) and (slurm.cores, slurm.processes) == (8, 4)
    kube = load_cluster_config(CONFIG_DIR / "kubernetes.yaml")
    assert isinstance(kube, KubernetesConfig)
    assert kube.resources.limits == {"cpu": "2", "memory": "6Gi"}
    # The TLS example names certs/ beside itself: validate it where those files exist.
    shutil.copy(CONFIG_DIR / "remote-tls.yaml", tmp_path / "remote-tls.yaml")
    (tmp_path / "certs").mkdir()
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / "certs" / name).write_text("placeholder")
    tls = load_cluster_config(tmp_path / "remote-tls.yaml")
    assert isinstance(tls, RemoteTLSConfig)
    assert tls.key_file == tmp_path / "certs" / "client.key"
    with pytest.raises(ClusterConfigError, match=r"ca_file.*file not found"):
        load_cluster_config(CONFIG_DIR / "remote-tls.yaml")  # no certs/ in the repo


def test_default_target_is_a_local_cluster_sized_for_the_machine():
    from dask.system import CPU_COUNT
    from distributed.system import MEMORY_LIMIT

    target = load_cluster_config(None)
    assert isinstance(target, LocalConfig)
    assert target.n_workers * target.threads_per_worker == CPU_COUNT
    assert target.memory_limit == int(0.8 * MEMORY_LIMIT / target.n_workers)
    assert target.dashboard_address.startswith("127.0.0.1:")
    sized = LocalConfig(n_workers=1, memory_limit="3GiB")
    assert (sized.threads_per_worker, sized.memory_limit) == (CPU_COUNT, 3 * GiB)


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ({"kind": "local", "n_worker": 2}, r"unknown key 'n_worker' \(allowed keys: .*n_workers"),
        ({"kind": "local", "n_workers": "two"}, r"key 'n_workers'.*integer"),
        ({"kind": "local", "n_workers": 0}, r"key 'n_workers'.*greater than or equal to 1"),
        ({"kind": "local", "memory_limit": "lots"}, r"key 'memory_limit'.*'lots'"),
        ({"kind": "local", "memory_spill": 0.9, "memory_pause": 0.5}, r"memory_target <="),
        ({"kind": "remote"}, r"missing required key 'address'"),
        ({"kind": "remote", "address": "tls://h:8786"}, r"key 'address'.*tcp://"),
        ({"kind": "remote", "address": "tcp://h"}, r"key 'address'.*needs a port"),
        ({"kind": "remote", "address": "tcp://h:1", "connect_timeout": -1},
         r"key 'connect_timeout'"),
        ({"kind": "cloud"}, r"key 'kind': must be one of local, remote, remote-tls"),
        ({"n_workers": 2}, r"key 'kind'"),
        ({"kind": "remote-tls", "address": "tls://h:1", "ca_file": "nope.pem",
          "cert_file": "nope.pem", "key_file": "nope.key"}, r"key 'ca_file': file not found"),
        ({"kind": "kubernetes", "image": "i", "resources": {"request": {}}},
         r"unknown key 'resources.request'"),
        ({"kind": "slurm", "cores": 4}, r"missing required key 'memory'"),
        ("kind: local\nn_workers: [1\n", r"not valid YAML"),
        ("- kind: local\n", r"expected a mapping"),
    ],
)
def test_invalid_config_names_the_key_and_file(tmp_path, content, named):
    path = _write(tmp_path / "bad.yaml", content)
    with pytest.raises(ClusterConfigError, match=named) as info:
        load_cluster_config(path)
    assert str(path) in str(info.value)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ClusterConfigError, match=r"cannot read cluster config .*absent.yaml"):
        load_cluster_config(tmp_path / "absent.yaml")


def test_scheduler_shortcut(tmp_path):
    bare = load_cluster_config(None, scheduler="127.0.0.1:8786")
    assert isinstance(bare, RemoteConfig) and bare.address == "tcp://127.0.0.1:8786"
    remote = _write(tmp_path / "r.yaml", {"kind": "remote", "address": "tcp://a:1",
                                          "connect_timeout": 7})
    override = load_cluster_config(remote, scheduler="tcp://b:2")
    assert (override.address, override.connect_timeout) == ("tcp://b:2", 7)
    with pytest.raises(ClusterConfigError, match=r"needs certificates.*remote-tls"):
        load_cluster_config(None, scheduler="tls://127.0.0.1:8786")
    for name in ("ca.pem", "c.pem", "c.key"):
        (tmp_path / name).write_text("placeholder")
    tls_file = _tls_yaml(tmp_path, "tls://a:1", tmp_path / "ca.pem", tmp_path / "c.pem",
                         tmp_path / "c.key")
    tls = load_cluster_config(tls_file, scheduler="tls://b:2")
    assert isinstance(tls, RemoteTLSConfig)
    assert (tls.address, tls.ca_file) == ("tls://b:2", tmp_path / "certs" / "ca.pem")
    with pytest.raises(ClusterConfigError, match=r"plain TCP address.*remote-tls"):
        load_cluster_config(tls_file, scheduler="tcp://b:2")
    with pytest.raises(ClusterConfigError, match=r"unsupported protocol 'ucx://'"):
        load_cluster_config(None, scheduler="ucx://b:2")
    with pytest.raises(ClusterConfigError, match=r"needs a port"):
        load_cluster_config(None, scheduler="tcp://b")


@pytest.mark.parametrize(("name", "module", "package"), [
    ("slurm.yaml", "dask_jobqueue", "dask-jobqueue"),
    ("kubernetes.yaml", "dask_kubernetes", "dask-kubernetes"),
])
def test_optional_cluster_kinds_name_the_missing_package(name, module, package):
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{package} is installed here; this checks the message when it is not")
    target = load_cluster_config(CONFIG_DIR / name)
    with pytest.raises(ClusterError, match=rf"optional package '{package}'.*pip install"):
        with open_cluster(target):
            pass


# ---------------------------------------------------------------------------------------------
# A local cluster
# ---------------------------------------------------------------------------------------------


def test_local_cluster_session():
    target = LocalConfig(n_workers=2, threads_per_worker=1, memory_limit="1GiB",
                         dashboard_address="127.0.0.1:0", memory_spill=0.65)
    # started in a background thread, as the command line does, then taken by open_cluster
    with StartingCluster(target) as starting, open_cluster(starting) as session:
        desc = session.description
        assert desc["kind"] == "local" and desc["n_workers"] == 2
        assert [w["memory_limit_bytes"] for w in desc["workers"]] == [GiB, GiB]
        assert [w["nthreads"] for w in desc["workers"]] == [1, 1]
        assert desc["versions"]["fmnist-dask"] == fmnist_dask.__version__
        # each worker's numeric kernels, as this process (same machine, same wheels) sees them
        import scipy.linalg  # noqa: F401 - its OpenBLAS too, as the workers load it
        from llvmlite.binding import get_host_cpu_name
        from threadpoolctl import threadpool_info

        blas = " + ".join(sorted(f"{lib['internal_api']} {lib['version']} {lib['architecture']}"
                                 for lib in threadpool_info() if lib["user_api"] == "blas"))
        for worker in desc["workers"]:
            assert worker["kernels"]["blas"] == blas
            assert worker["kernels"]["numba_cpu"] == get_host_cpu_name()
        # the spill threshold reached the worker processes
        spill = session.client.run(
            lambda: __import__("dask").config.get("distributed.worker.memory.spill"))
        assert set(spill.values()) == {0.65}
        # OpenMP threads of the workers sleep when they wait (WORKER_OMP_ENV)
        policy = session.client.run(lambda: __import__("os").environ.get("OMP_WAIT_POLICY"))
        assert set(policy.values()) == {"PASSIVE"}
        assert session.dashboard_link.startswith("http://127.0.0.1:")
        _check_sum_on_all_workers(session.client, 2)
        # The workers keep freed heap memory (WORKER_MALLOC_ENV); trim_worker_memory, run
        # between stages, gives it back: 300 MiB of 1 MiB blocks freed under a live one.
        before = session.client.run(_leave_freed_heap, 300)
        trim_worker_memory(session.client)
        after = session.client.run(_rss)
        for worker, (held, freed_rss) in before.items():
            assert held == 1
            assert freed_rss - after[worker] > 200 * 2**20, (freed_rss, after[worker])
        cluster = session.cluster
    assert cluster.status.name == "closed"


_KEPT: list = []


def _leave_freed_heap(mib: int) -> tuple[int, int]:
    """Allocate ``mib`` 1 MiB blocks, free all but the last (which pins the heap's top);
    return (blocks kept, RSS bytes)."""
    import numpy as np

    blocks = [np.ones(2**20, np.uint8) for _ in range(mib)]
    _KEPT[:] = blocks[-1:]
    del blocks
    return len(_KEPT), _rss()


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


# ---------------------------------------------------------------------------------------------
# Real scheduler and workers over TCP
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tcp_cluster(tmp_path_factory):
    with dask_processes(tmp_path_factory.mktemp("tcp"), n_workers=2) as procs:
        yield procs


def test_a_cluster_started_early_that_no_run_takes_is_closed():
    starting = StartingCluster(LocalConfig(n_workers=1, threads_per_worker=1,
                                           dashboard_address=None))
    with starting:
        pass  # e.g. the run directory exists: the run fails before it connects
    cluster, _ = starting.take()
    assert cluster.status.name == "closed"
    assert cluster.scheduler.status.name == "closed"


def test_remote_scheduler_with_two_workers(tcp_cluster):
    target = load_cluster_config(None, scheduler=tcp_cluster.scheduler_address)
    with open_cluster(target) as session:
        desc = session.description
        json.dumps(desc)  # JSON-able for the manifest
        assert desc["address"] == tcp_cluster.scheduler_address
        assert desc["n_workers"] == 2 and desc["total_threads"] == 2
        assert [w["name"] for w in desc["workers"]] == ["worker-0", "worker-1"]
        assert {w["memory_limit_bytes"] for w in desc["workers"]} == {2 * GiB}
        assert desc["tls"] is False
        # started as docs/cluster.md says (DASK_CONFIG=cluster_config/dask-worker.yaml): the
        # nannies gave the workers the job's own worker settings
        wanted = {name: str(value) for name, value in WORKER_ENV.items()}
        assert [w["environ"] for w in desc["workers"]] == [wanted, wanted]
        assert workers_lacking_settings(desc) == []
        _check_sum_on_all_workers(session.client, 2)
        assert session.dashboard_link == f"{tcp_cluster.dashboard_url}/status"
        with urllib.request.urlopen(session.dashboard_link, timeout=30) as response:
            assert response.status == 200
            assert b"Dask" in response.read()


def test_a_worker_started_without_the_worker_settings_is_named_in_a_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="fmnist_dask")
    specs = [WorkerSpec(), WorkerSpec(worker_config=False)]  # the second as plain `dask worker`
    with dask_processes(tmp_path, workers=specs) as procs, open_cluster(
            load_cluster_config(None, scheduler=procs.scheduler_address)) as session:
        environ = {w["name"]: w["environ"] for w in session.description["workers"]}
        names = {w["address"]: w["name"] for w in session.description["workers"]}
        preloaded = {names[a]: v for a, v in _preloaded(session.client).items()}
    assert preloaded == {"worker-0": True, "worker-1": False}
    assert environ["worker-0"]["MALLOC_TRIM_THRESHOLD_"] == str(128 << 20)
    # dask's nanny default, which made every large temporary fresh pages from the kernel
    assert environ["worker-1"]["MALLOC_TRIM_THRESHOLD_"] == "65536"
    assert environ["worker-1"]["MALLOC_MMAP_THRESHOLD_"] is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "1 of 2 workers (worker-1) run without the worker settings" in warnings[0]
    assert "DASK_CONFIG=cluster_config/dask-worker.yaml" in warnings[0]


def _preloaded(client) -> dict[str, bool]:
    """Whether each worker imported the job's preload module (nothing else imports it)."""
    # a lambda travels by value: the workers cannot import this test module
    return client.run(lambda: WORKER_PRELOAD in sys.modules)


def test_the_jobs_local_workers_import_the_task_modules_as_they_start(dask_client):
    # the session's cluster is the job's (dask_cluster.local_cluster)
    assert set(_preloaded(dask_client).values()) == {True}


def test_the_shipped_worker_config_holds_the_jobs_worker_settings():
    shipped = yaml.safe_load(WORKER_CONFIG.read_text())["distributed"]
    assert shipped["worker"]["preload"] == [WORKER_PRELOAD]
    environ = shipped["nanny"]["pre-spawn-environ"]
    assert {name: environ[name] for name in WORKER_ENV} == WORKER_ENV
    # and dask's own defaults beside them are kept
    assert {environ[n] for n in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                 "OPENBLAS_NUM_THREADS")} == {1}


def test_remote_needs_min_workers(tcp_cluster):
    target = RemoteConfig(kind="remote", address=tcp_cluster.scheduler_address,
                          min_workers=3, workers_timeout=1)
    with pytest.raises(ClusterError, match=r"has 2 worker\(s\), fewer than min_workers=3"):
        with open_cluster(target):
            pass


@pytest.mark.timeout(60)  # "never hang": the test itself fails if the error does not come
def test_unreachable_scheduler_is_a_clear_error():
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    target = RemoteConfig(kind="remote", address=address, connect_timeout=2)
    with pytest.raises(ClusterError, match=rf"could not connect .*{address} within 2 s"):
        with open_cluster(target):
            pass


# ---------------------------------------------------------------------------------------------
# Mutual TLS
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_env(tmp_path_factory):
    base = tmp_path_factory.mktemp("tls")
    certs = make_tls_files(base / "ca")
    rogue = make_tls_files(base / "rogue", name="rogue-ca")
    with dask_processes(base / "procs", n_workers=2, tls=certs) as procs:
        yield procs, certs, rogue, base


def test_tls_job_runs_and_leaks_no_key_material(tls_env, tmp_path, caplog):
    procs, certs, _, _ = tls_env
    config = _tls_yaml(tmp_path, procs.scheduler_address, certs.ca_file, certs.client_cert,
                       certs.client_key, connect_timeout=20)
    caplog.set_level(logging.DEBUG, logger="fmnist_dask")
    target = load_cluster_config(config)
    with open_cluster(target) as session:
        desc = session.description
        assert desc["tls"] is True and desc["address"].startswith("tls://127.0.0.1:")
        assert desc["n_workers"] == 2
        _check_sum_on_all_workers(session.client, 2)
        with urllib.request.urlopen(session.dashboard_link, timeout=30) as response:
            assert response.status == 200
        text = json.dumps(desc) + caplog.text
    assert "connected to tls://" in caplog.text  # the log was captured
    key_body = "".join(certs.client_key.read_text().splitlines()[1:-1])
    assert key_body and key_body[:40] not in text
    assert "PRIVATE KEY" not in text and "BEGIN" not in text
    assert "client.key" not in text  # not even where the key lives


def test_tls_scheduler_refuses_a_client_without_certificate(tls_env):
    procs, certs, _, _ = tls_env
    port = int(procs.scheduler_address.rsplit(":", 1)[1])
    context = ssl.create_default_context(cafile=str(certs.ca_file))  # trusts the scheduler
    context.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        with pytest.raises((ssl.SSLError, ConnectionResetError)) as info:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.recv(1)  # TLS 1.3: the server's verdict arrives after the handshake
    assert "CERTIFICATE_REQUIRED" in str(info.value).upper() or isinstance(
        info.value, ConnectionResetError)


def test_tls_scheduler_refuses_a_certificate_from_another_ca(tls_env, tmp_path):
    procs, certs, rogue, _ = tls_env
    config = _tls_yaml(tmp_path, procs.scheduler_address, certs.ca_file, rogue.client_cert,
                       rogue.client_key, connect_timeout=5)
    with pytest.raises(ClusterError, match=r"could not connect.*within 5 s.*certificate"):
        with open_cluster(load_cluster_config(config)):
            pass
    # Control: the same scheduler and CA file with this CA's client certificate is accepted,
    # so the refusal above is the scheduler rejecting the foreign certificate.
    good = _tls_yaml(tmp_path / "good", procs.scheduler_address, certs.ca_file,
                     certs.client_cert, certs.client_key, connect_timeout=5)
    with open_cluster(load_cluster_config(good), check_versions=False) as session:
        assert session.description["n_workers"] == 2


@pytest.mark.timeout(60)
def test_plain_tcp_client_cannot_use_the_tls_scheduler(tls_env):
    procs, _, _, _ = tls_env
    address = procs.scheduler_address.replace("tls://", "tcp://")
    target = RemoteConfig(kind="remote", address=address, connect_timeout=3)
    with pytest.raises(ClusterError, match=r"could not connect.*kind: remote-tls"):
        with open_cluster(target):
            pass


# ---------------------------------------------------------------------------------------------
# Workers whose environment differs from the client's
# ---------------------------------------------------------------------------------------------


def _venv_without_project(directory: Path) -> Path:
    """A virtual environment that sees this one's packages but not the editable fmnist_dask.

    Its .pth adds the project venv's site-packages as a plain path, so that directory's own
    .pth files (among them the editable-install hook for fmnist_dask) are not processed.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(directory)],
                   check=True, timeout=120)
    python = directory / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    Path(site, "project-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _older_checkout(directory: Path, version: str) -> Path:
    """A copy of the fmnist_dask sources that declares another version (an outdated worker)."""
    package = directory / "fmnist_dask"
    shutil.copytree(Path(fmnist_dask.__file__).parent, package,
                    ignore=shutil.ignore_patterns("__pycache__"))
    init = package / "__init__.py"
    text, count = re.subn(r'__version__ = "[^"]*"', f'__version__ = "{version}"',
                          init.read_text())
    assert count == 1
    init.write_text(text)
    return directory


def test_version_check_rejects_workers_lacking_or_mismatching_the_package(tmp_path):
    bare_python = _venv_without_project(tmp_path / "venv")
    isolated = tmp_path / "elsewhere"  # not the repository: no fmnist_dask via the cwd
    isolated.mkdir()
    probe = subprocess.run([str(bare_python), "-c", "import dask, fmnist_dask"], cwd=isolated,
                           capture_output=True, text=True, timeout=60)
    assert "No module named 'fmnist_dask'" in probe.stderr  # the environment really lacks it
    old = _older_checkout(tmp_path / "old", "0.0.9")
    # Without the shipped worker config: its preload (this version's task modules) would
    # stop both at start, before the job could name them.
    workers = [
        WorkerSpec(python=str(bare_python), cwd=isolated, worker_config=False),
        WorkerSpec(env={"PYTHONPATH": str(old)}, cwd=isolated, worker_config=False),
    ]
    with dask_processes(tmp_path / "procs", workers=workers) as procs:
        target = load_cluster_config(None, scheduler=procs.scheduler_address)
        with pytest.raises(ClusterError) as info:
            with open_cluster(target):
                pass
        message = str(info.value)
        assert "fmnist-dask" in message
        assert "cannot import it (ModuleNotFoundError: No module named 'fmnist_dask')" in message
        assert f"has 0.0.9, the client has {fmnist_dask.__version__}" in message
        assert "Install this project and the same package versions on every worker" in message
        # the check is what refused them: without it the same workers connect
        with open_cluster(target, check_versions=False) as session:
            assert session.description["n_workers"] == 2


def test_job_on_augmented_data_assigns_alike_on_a_local_cluster_and_separate_processes(
        tcp_cluster, tmp_path, real_dir):
    """The whole job, pixels streamed from pixel files, on a LocalCluster and on separately
    started ``dask scheduler`` / ``dask worker`` processes: the same clusters, row by row."""
    job = tmp_path / "job.yaml"
    job.write_text(
        "name: procs\nseed: 5\n"
        f"augment: {{enabled: true, factor: 3, seed: 1, out: {tmp_path / 'aug'}, "
        f"source: {{dir: {real_dir}, limit_rows: 400}}}}\n"
        f"data: {{format: parquet, dir: {tmp_path / 'aug'}, "
        "splits: {train: train, test: test}}\n"
        "eda: {enabled: false}\ntsne: {enabled: false}\npersist_max_bytes: 0\n"
        "scores: {silhouette: sampled, silhouette_sample_size: 500, images_per_cluster: 2}\n")
    out = tmp_path / "runs"
    local = cli("run", str(job), "--out", str(out), "--run-name", "local")
    assert local.returncode == 0, local.stderr[-3000:]
    remote = cli("run", str(job), "--out", str(out), "--run-name", "remote", "--scheduler",
                 tcp_cluster.scheduler_address)
    assert remote.returncode == 0, remote.stderr[-3000:]
    manifests = {name: json.loads((out / name / "manifest.json").read_text())
                 for name in ("local", "remote")}
    assert manifests["local"]["cluster"]["kind"] == "local"
    assert manifests["remote"]["cluster"]["address"] == tcp_cluster.scheduler_address
    for manifest in manifests.values():
        assert manifest["rows"]["total"] == {"read": 2400, "rejected": 0, "duplicates": 0,
                                             "kept": 2400}
        assert manifest["pixels"]["in_worker_memory"] is False
    frames = [pd.read_parquet(out / name / "assignments").sort_values("row_id")
              .reset_index(drop=True) for name in ("local", "remote")]
    assert list(frames[0].columns[3:]) == ["kmeans_raw", "kmeans_pca", "gmm", "spectral"]
    pd.testing.assert_frame_equal(*frames)
    metrics = [pd.read_parquet(out / name / "metrics.parquet").set_index("method")
               for name in ("local", "remote")]
    scores = ["inertia", "silhouette", "acc", "nmi", "ari"]
    pd.testing.assert_frame_equal(metrics[0][scores], metrics[1][scores])
