"""The whole job on real clusters, run as the user runs it: ``fmnist-dask run`` in its own
process against real ``dask scheduler`` / ``dask worker`` processes on 127.0.0.1.

Every run uses the same job spec on the same real Fashion-MNIST rows (1500 train + 300 test,
written as CSV) with the same seed, so each run's assignments and metrics must equal those of
the undisturbed LocalCluster run (the reference): on a remote scheduler over mutual TLS, and on
a plain TCP one after a worker was SIGKILLed in the middle of k-means. The faults check the exit
code, the message and what is left in the output directory: the scheduler killed or frozen
mid-run, unreachable at start, the last worker gone, and Ctrl-C. To keep the file short, the
slow stages (EDA plots, spectral clustering, t-SNE, silhouettes) are switched off in the spec;
k-means on pixels, PCA, k-means on the projection, the GMM and the evaluation run.

A fault must land while a given stage runs: the tests poll the run's ``manifest.json``, which
is rewritten when a stage starts (``status: running``), and act then; ``run.log`` then shows
what the job saw, tagged with the stage.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import time
import urllib.request
from concurrent.futures import CancelledError
from pathlib import Path

import pandas as pd
import pytest
import yaml
from distributed import Client
from distributed.security import Security

from fmnist_dask import logs
from fmnist_dask.dask_cluster import ClusterError, LocalConfig, RemoteConfig, open_cluster
from fmnist_dask.progress import StageProgress, performance_report
from fmnist_dask.rundir import done_message, open_run
from tests.cluster_procs import dask_processes, free_port, make_tls_files
from tests.conftest import N_TEST, N_TRAIN, running, saved_logging

#: One log line: UTC time, level, [stage], message. A line from Dask's own threads while
#: several stages run names them all (``[gmm+tsne]``).
LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL)"
                  r" +\[([\w+-]+)\] ")
PROGRESS = re.compile(r"\[(\w+)\] (\d+)/(\d+) tasks, (\d+) running, (\d+\.\d) s")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def results(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(assignments sorted by row id, metrics without wall times) of a finished run."""
    assignments = pd.read_parquet(run_dir / "assignments").sort_values("row_id")
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    metrics = metrics.drop(columns=[c for c in metrics.columns if c.endswith("_seconds")])
    return assignments.reset_index(drop=True), metrics


def assert_same_results(run_dir: Path, reference: Path) -> None:
    assignments, metrics = results(run_dir)
    ref_assignments, ref_metrics = results(reference)
    assert len(assignments) == N_TRAIN + N_TEST
    assert list(metrics["method"]) == ["kmeans_raw", "kmeans_pca", "gmm"]
    pd.testing.assert_frame_equal(assignments, ref_assignments, check_exact=True)
    pd.testing.assert_frame_equal(metrics, ref_metrics, check_exact=True)


def session_processes(session_id: int) -> list[str]:
    """Command lines of the live processes in a session (a CLI started its own session)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == session_id and fields[0] != "Z":  # fields[3]: session id
            found.append(f"{entry.name}: {cmdline[:120]}")
    return found


def assert_no_key_material(texts: list[str], key_file: Path) -> None:
    key_body = "".join(key_file.read_text().splitlines()[1:-1])
    joined = "\n".join(texts)
    assert key_body and key_body[:40] not in joined
    assert "PRIVATE KEY" not in joined
    assert key_file.name not in joined  # not even where the key lives


def failed_run(out: Path, name: str) -> dict:
    """The manifest of a run that must not look finished: only ``<name>.failed`` exists."""
    assert sorted(p.name for p in out.iterdir()) == [f"{name}.failed"]
    return json.loads((out / f"{name}.failed" / "manifest.json").read_text())


# ---------------------------------------------------------------------------------------------
# Fixtures: the job spec and the undisturbed reference run are the session's (conftest.py)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def job(ops_job) -> Path:
    """The job spec every run here uses, on the real CSV subset."""
    return ops_job


@pytest.fixture(scope="module")
def reference(job_runs) -> tuple[Path, str]:
    """The undisturbed run on a LocalCluster, with stderr on a terminal: (run dir, terminal)."""
    return job_runs.ops, job_runs.ops_terminal


# ---------------------------------------------------------------------------------------------
# Watching the job: progress, run.log, performance report
# ---------------------------------------------------------------------------------------------


def test_local_run_on_a_terminal_shows_progress_and_writes_run_log_and_report(reference):
    run_dir, terminal = reference
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "succeeded" and manifest["cluster"]["kind"] == "local"

    # The progress line: redrawn in place (\r + erase line), with tasks done/total and time.
    redraws = terminal.split("\r\x1b[K")
    assert len(redraws) > 10
    progress = [m.groups() for m in PROGRESS.finditer(terminal)]
    seen = {stage for stage, *_ in progress}
    # Every stage that lasts several redraws (0.5 s apart) is shown; clean is too quick here.
    lasting = {name for name, record in manifest["stages"].items()
               if record.get("tasks") and record["seconds"] >= 1.5}
    # (which stages last that long depends on the job's speed: here the scores, at least)
    assert lasting and lasting <= seen
    for _, done, total, active, _ in progress:
        assert 0 <= int(done) <= int(total) and int(active) <= int(total)
    # Each stage's final task count is in the manifest, and never below what was displayed.
    for stage in seen:
        shown = max(int(done) for s, done, *_ in progress if s == stage)
        assert manifest["stages"][stage]["tasks"] >= shown
        # A lasting stage is shown at work: tasks done, or running (the raw k-means' fit
        # is one task for most of its stage, its labels' tasks done after the last redraw)
        at_work = max(int(done) + int(active) for s, done, _, active, _ in progress if s == stage)
        assert at_work > 0 or stage not in lasting

    # run.log: the same lines as the terminal (minus the progress redraws), one format.
    log_lines = (run_dir / "run.log").read_text().splitlines()
    terminal_lines = [part.split("\r")[0] for part in re.split(r"\r\n|\r\x1b\[K", terminal)]
    terminal_lines = [line for line in terminal_lines if LINE.match(line)]
    assert log_lines and all(LINE.match(line) for line in log_lines)
    first = terminal_lines.index(log_lines[0])
    assert terminal_lines[first:first + len(log_lines)] == log_lines
    tagged = {(m.group(2), line.split("] ", 1)[1]) for line in log_lines if (m := LINE.match(line))}
    for stage, record in manifest["stages"].items():
        assert (stage, "started") in tagged
        assert (stage, done_message(record)) in tagged

    # The Dask performance report of the stages.
    assert manifest["performance_report"] == "performance-report.html"
    html = (run_dir / "performance-report.html").read_text()
    assert html.lstrip().startswith("<!DOCTYPE html>") and "Dask Performance Report" in html
    assert "Task Stream" in html


def test_stage_progress_counts_the_tasks_each_stage_runs(dask_client, tmp_path):
    class FakeTerminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = logs.TerminalHandler(FakeTerminal())
    manifest: dict = {}
    with open_run(tmp_path, "unit", manifest) as run:
        run.stage_hooks.append(StageProgress(dask_client, display=False, interval=0.05))
        with run.stage("twenty"):
            futures = dask_client.map(lambda i, pause: time.sleep(pause) or i, range(20),
                                      pause=0.05)
            assert sum(dask_client.gather(futures)) == sum(range(20))
        del futures
        with run.stage("nothing"):
            pass
    assert manifest["stages"]["twenty"]["tasks"] == 20  # the 20 tasks submitted, no others
    assert manifest["stages"]["nothing"]["tasks"] == 0
    # The display draws on the terminal and erases itself; not without a terminal.
    progress = StageProgress(dask_client, display=True, interval=0.05)
    handler_before = logs.terminal_handler()
    root = logging.getLogger()
    if handler_before is not None:
        root.removeHandler(handler_before)
    root.addHandler(screen)
    try:
        with progress("shown", {}):
            futures = dask_client.map(lambda i: time.sleep(0.1) or i, range(10), pure=False)
            dask_client.gather(futures)
            time.sleep(0.3)
    finally:
        root.removeHandler(screen)
        if handler_before is not None:
            root.addHandler(handler_before)
    text = screen.stream.getvalue()
    assert "[shown] " in text and " tasks, " in text
    assert text.endswith("\r\x1b[K")  # the last line drawn was erased at the end


def test_log_lines_name_time_level_and_stage(tmp_path):
    stream = io.StringIO()
    with saved_logging():
        logs.configure(stream=stream)
        with logs.run_log(tmp_path / "run.log"):
            logging.getLogger("fmnist_dask.test").info("outside")
            with logs.stage_label("kmeans_raw"):
                logging.getLogger("fmnist_dask.test").info("inside %d", 1)
                logging.getLogger("distributed.client").warning("from dask")
                logging.getLogger("distributed.client").info("dask info is hidden")
            with pytest.raises(RuntimeError), logs.run_log(tmp_path / "failed.log"):
                raise RuntimeError("boom")
    lines = (tmp_path / "run.log").read_text().splitlines()
    assert [LINE.match(line).groups() for line in lines] == [
        ("INFO", "-"), ("INFO", "kmeans_raw"), ("WARNING", "kmeans_raw")]
    assert lines[0].endswith("] outside") and lines[1].endswith("] inside 1")
    assert lines[2].endswith("] distributed.client: from dask")
    assert stream.getvalue().splitlines() == lines  # the terminal got the same lines
    assert (tmp_path / "failed.log").read_text().rstrip().endswith(
        "run failed: RuntimeError: boom")


def test_stages_since_a_moment_name_the_running_ones_and_those_ended_since():
    before = time.monotonic()
    with logs.stage_label("reduce"):
        with logs.stage_label("kmeans_raw"):
            pass
        middle = time.monotonic()
        with logs.stage_label("score_kmeans_raw"):
            # a worker seen gone now left at some moment since ``before``: kmeans_raw ran then
            assert logs.stages_since(before) == "kmeans_raw+reduce+score_kmeans_raw"
            assert logs.stages_since(middle) == "reduce+score_kmeans_raw"
    assert logs.stages_since(time.monotonic()) == logs.NO_STAGE


def _warn_on_worker(text: str) -> None:
    logging.getLogger("distributed.worker").warning(text)


def test_workers_warnings_reach_the_job_log_with_the_stage_and_the_worker(tmp_path):
    stream = io.StringIO()
    target = LocalConfig(n_workers=1, threads_per_worker=1, memory_limit="1GiB",
                         dashboard_address=None)
    with saved_logging():
        logs.configure(stream=stream)
        with logs.run_log(tmp_path / "run.log"), open_cluster(target) as session, \
                logs.stage_label("kmeans_raw"):
            worker = next(iter(session.client.scheduler_info(n_workers=-1)["workers"]))
            session.client.submit(_warn_on_worker, "memory is short", pure=False).result()
            deadline = time.monotonic() + 30
            while "memory is short" not in stream.getvalue():  # events arrive asynchronously
                assert time.monotonic() < deadline, stream.getvalue()
                time.sleep(0.05)
    line = next(x for x in stream.getvalue().splitlines() if "memory is short" in x)
    assert LINE.match(line).groups() == ("WARNING", "kmeans_raw")
    assert line.endswith(f"] distributed.worker [{worker}]: memory is short")
    assert line in (tmp_path / "run.log").read_text().splitlines()


def test_the_session_client_computes_even_inside_another_clients_block(dask_client):
    import dask.array as da
    from distributed import wait

    assert Client.current() is dask_client  # the fixture's `with Client(...)` made it current
    target = LocalConfig(n_workers=1, threads_per_worker=1, memory_limit="1GiB",
                         dashboard_address=None)
    with open_cluster(target, check_versions=False) as session:
        x = da.arange(1000, chunks=100).persist()
        wait(x)
        held = {k for keys in session.client.has_what().values() for k in keys}
        assert len(held) == 10  # the ten blocks live on the session's worker
        assert int(x.sum().compute()) == sum(range(1000))
    assert Client.current() is dask_client  # and the outer client is current again


def test_performance_report_of_a_computation(dask_client, tmp_path):
    import dask.array as da

    manifest: dict = {}
    with performance_report(tmp_path / "report.html", dask_client, manifest):
        assert manifest["performance_report"] == "report.html"  # known while running
        assert da.ones((1000, 10), chunks=100).sum().compute() == 10_000
    html = (tmp_path / "report.html").read_text()
    assert "Dask Performance Report" in html and "sum-partial" in html  # its task stream
    # No report after Ctrl-C, and no dangling name in the manifest.
    manifest = {}
    with pytest.raises(KeyboardInterrupt), performance_report(tmp_path / "r2.html", dask_client,
                                                              manifest):
        raise KeyboardInterrupt
    assert "performance_report" not in manifest and not (tmp_path / "r2.html").exists()


# ---------------------------------------------------------------------------------------------
# Remote scheduler and workers
# ---------------------------------------------------------------------------------------------


def test_remote_run_survives_a_worker_killed_during_kmeans_with_the_same_results(
        job, reference, tmp_path):
    with dask_processes(tmp_path / "procs", n_workers=2) as procs, \
            running(tmp_path, job, tmp_path / "out", "killed", "--scheduler",
                    procs.scheduler_address, "--quiet") as run:
        run.wait_for_stage("kmeans_raw")
        procs.kill_worker(1)  # SIGKILL to the worker and its nanny: it does not come back
        assert run.stage_status("kmeans_raw") == "running"  # the kill landed mid-stage
        code = run.finish()
        assert code == 0, run.stderr()[-3000:]
    run_dir = tmp_path / "out" / "killed"
    assert run.stdout().strip() == str(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["cluster"]["kind"] == "remote" and manifest["cluster"]["n_workers"] == 2
    assert manifest["cluster"]["address"] == procs.scheduler_address
    assert [w["name"] for w in manifest["cluster"]["workers"]] == ["worker-0", "worker-1"]
    assert_same_results(run_dir, reference[0])
    log = (run_dir / "run.log").read_text()
    # The watchdog's line names the stages running when the worker left: k-means on pixels,
    # and the PCA beside it when the kill landed while both ran ([kmeans_raw+reduce]).
    left = re.search(r"WARNING +\[([\w+]+\+)?kmeans_raw(\+[\w+]+)?\] worker tcp://127\.0\.0\.1:\d+ "
                     r"\(worker-1\) left the cluster; 1 worker\(s\) remain", log)
    assert left, log[-3000:]
    # --quiet, and no terminal: the warning but none of the INFO lines run.log has, and no
    # progress line.
    stderr = run.stderr()
    assert left.group(0).split("] ", 1)[1] in stderr
    assert " INFO " not in stderr and re.search(r"INFO +\[kmeans_raw\] started", log)
    assert "\x1b[K" not in stderr and "\r" not in stderr and not PROGRESS.search(stderr)
    assert (run_dir / "performance-report.html").stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------
# Mutual TLS
# ---------------------------------------------------------------------------------------------


def _tls_config(directory: Path, address: str, ca: Path, cert: Path, key: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tls.yaml"
    path.write_text(yaml.safe_dump({
        "kind": "remote-tls", "address": address, "ca_file": str(ca), "cert_file": str(cert),
        "key_file": str(key), "connect_timeout": 5}))
    return path


def test_tls_job_runs_end_to_end_and_a_client_without_a_valid_certificate_is_refused(
        job, reference, tmp_path):
    certs = make_tls_files(tmp_path / "ca")
    rogue = make_tls_files(tmp_path / "rogue", name="rogue-ca")
    with dask_processes(tmp_path / "procs", n_workers=2, tls=certs) as procs:
        # The file names the certificates; --scheduler gives the address (as users do when
        # the scheduler moves).
        good = _tls_config(tmp_path / "good", "tls://scheduler.invalid:8786", certs.ca_file,
                           certs.client_cert, certs.client_key)
        with running(tmp_path, job, tmp_path / "out", "tls", "--cluster", str(good),
                     "--scheduler", procs.scheduler_address, "--verbose") as run:
            run.wait_for_stage("kmeans_raw")
            live = json.loads(run.manifest_path.read_text())
            assert live["dashboard_link"] == f"{procs.dashboard_url}/status"
            with urllib.request.urlopen(live["dashboard_link"], timeout=30) as response:
                assert response.status == 200 and b"Dask" in response.read()
            assert run.stage_status("kmeans_raw") == "running"  # asked while the job worked
            code = run.finish()
        assert code == 0, run.stderr()[-3000:]
        security = Security(tls_ca_file=str(certs.ca_file), require_encryption=True,
                            tls_client_cert=str(certs.client_cert),
                            tls_client_key=str(certs.client_key))
        with Client(procs.scheduler_address, security=security, timeout=30) as client:
            executed = client.run(lambda dask_worker: dask_worker.state.executed_count)

        # A client whose certificate another CA signed: refused, exit code 4.
        bad = _tls_config(tmp_path / "bad", procs.scheduler_address, certs.ca_file,
                          rogue.client_cert, rogue.client_key)
        with running(tmp_path, job, tmp_path / "refused", "rogue", "--cluster",
                     str(bad)) as refused:
            refused_code = refused.finish(timeout=120)
    assert len(executed) == 2 and min(executed.values()) > 0  # both workers ran the job's tasks
    assert refused_code == 4, refused.stderr()[-3000:]
    assert "could not connect to the Dask scheduler at tls://127.0.0.1" in refused.stderr()
    assert failed_run(tmp_path / "refused", "rogue")["status"] == "failed"

    run_dir = tmp_path / "out" / "tls"
    assert run.stdout().strip() == str(run_dir)
    manifest_text = (run_dir / "manifest.json").read_text()
    manifest = json.loads(manifest_text)
    assert manifest["cluster"]["tls"] is True and manifest["cluster"]["n_workers"] == 2
    assert manifest["cluster"]["address"] == procs.scheduler_address
    assert_same_results(run_dir, reference[0])
    stderr = run.stderr()
    assert re.search(r"DEBUG +\[\w+\] ", stderr)  # --verbose
    assert_no_key_material([manifest_text, (run_dir / "run.log").read_text(), stderr,
                            run.stdout(), refused.stderr()], certs.client_key)


# ---------------------------------------------------------------------------------------------
# The scheduler goes away, is unreachable; Ctrl-C
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_scheduler_going_away_mid_run_fails_clearly_with_exit_code_4(job, tmp_path, how):
    with dask_processes(tmp_path / "procs", n_workers=2) as procs:
        config = tmp_path / "remote.yaml"
        config.write_text(yaml.safe_dump({"kind": "remote", "address": procs.scheduler_address,
                                          "connect_timeout": 5}))
        with running(tmp_path, job, tmp_path / "out", how, "--cluster", str(config)) as run:
            run.wait_for_stage("load")
            # killed: the connection closes; frozen: it stays open but nothing answers.
            sig = signal.SIGKILL if how == "killed" else signal.SIGSTOP
            os.killpg(procs.scheduler.pid, sig)
            try:
                code = run.finish(timeout=120)
            finally:
                os.killpg(procs.scheduler.pid, signal.SIGKILL)
    assert code == 4, run.stderr()[-3000:]
    expected = {"killed": f"lost the connection to the scheduler at {procs.scheduler_address}",
                "frozen": f"the scheduler at {procs.scheduler_address} did not answer for 5 s"}
    assert f"fmnist-dask: cluster error: {expected[how]}" in run.stderr()
    manifest = failed_run(tmp_path / "out", how)
    assert manifest["status"] == "failed" and expected[how] in manifest["error"]
    assert manifest["stages"]["load"]["status"] == "failed"
    assert "clean" not in manifest["stages"]
    log = (tmp_path / "out" / f"{how}.failed" / "run.log").read_text()
    assert re.search(r"ERROR +\[-\] run failed: ClusterError: " + re.escape(expected[how]), log)


@pytest.mark.timeout(180)  # without the watchdog, the result below would be awaited forever
def test_no_worker_left_stops_the_computation_after_workers_timeout(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fmnist_dask")
    with dask_processes(tmp_path / "procs", n_workers=1) as procs:
        target = RemoteConfig(kind="remote", address=procs.scheduler_address,
                              connect_timeout=20, workers_timeout=2)
        with pytest.raises(ClusterError) as info:
            with open_cluster(target, check_versions=False) as session:
                future = session.client.submit(time.sleep, 600, pure=False)
                deadline = time.monotonic() + 60
                while not any(session.client.processing().values()):
                    assert time.monotonic() < deadline, "the task never started"
                    time.sleep(0.05)
                procs.kill_worker(0)
                future.result()
    assert str(info.value).startswith(
        f"no worker has been connected to {procs.scheduler_address} for 2 s")
    assert isinstance(info.value.__cause__, CancelledError)  # the waiting result was cut off
    assert re.search(r"worker tcp://127\.0\.0\.1:\d+ \(worker-0\) left the cluster; 0 worker",
                     caplog.text)


def test_unreachable_scheduler_at_start_exits_4_without_a_finished_run(job, tmp_path):
    config = tmp_path / "remote.yaml"
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    config.write_text(yaml.safe_dump({"kind": "remote", "address": address,
                                      "connect_timeout": 2}))
    with running(tmp_path, job, tmp_path / "out", "nowhere", "--cluster", str(config)) as run:
        code = run.finish(timeout=120)
    assert code == 4
    assert f"could not connect to the Dask scheduler at {address} within 2 s" in run.stderr()
    manifest = failed_run(tmp_path / "out", "nowhere")
    assert manifest["status"] == "failed" and "stages" not in manifest


@pytest.mark.parametrize("to", ["command", "group"])
def test_ctrl_c_stops_the_job_shuts_the_local_cluster_down_and_removes_the_run(
        job, tmp_path, to):
    with running(tmp_path, job, tmp_path / "out", "interrupted") as run:
        run.wait_for_stage("load")
        assert len(session_processes(run.proc.pid)) >= 3  # the CLI and its worker processes
        if to == "command":
            run.proc.send_signal(signal.SIGINT)  # to the CLI only, as `kill -INT PID` does
        else:  # Ctrl-C on a terminal: the whole foreground group, local workers included
            os.killpg(run.proc.pid, signal.SIGINT)
        code = run.finish(timeout=120)
        time.sleep(1)  # let the killed workers' exits be reaped
        left = session_processes(run.proc.pid)
    assert code == 130, run.stderr()[-3000:]
    assert run.stderr().rstrip().endswith("fmnist-dask: interrupted")
    assert left == []  # no orphaned nanny or worker processes
    assert list((tmp_path / "out").iterdir()) == []  # the temporary run directory is gone


def test_sigterm_stops_the_job_like_ctrl_c_with_exit_143(job, tmp_path):
    # What a batch system (SLURM at the time limit, Kubernetes, `kill`) sends.
    with running(tmp_path, job, tmp_path / "out", "terminated") as run:
        run.wait_for_stage("load")
        run.proc.send_signal(signal.SIGTERM)
        code = run.finish(timeout=120)
        time.sleep(1)
        left = session_processes(run.proc.pid)
    assert code == 143, run.stderr()[-3000:]
    assert run.stderr().rstrip().endswith("fmnist-dask: terminated")
    assert left == []
    assert list((tmp_path / "out").iterdir()) == []
