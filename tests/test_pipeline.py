"""The orchestrator: the table of stages, run as a graph.

The graph runner is checked with stand-in stages (do independent stages run at the same
time, does the first failure stop the run); the whole job twice on the session cluster, to
show that which stage finishes first changes no number.
"""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import dask
import numpy as np
import pandas as pd
import pytest

from fmnist_dask._blocks import is_persisted
from fmnist_dask.config import parse_job_spec
from fmnist_dask.pipeline import (
    STAGES,
    JobState,
    Stage,
    _one_host,
    _to_start,
    enabled_stages,
    run_stages,
)
from fmnist_dask.rundir import open_run
from tests.conftest import N_TEST, N_TRAIN, cli, write_job


def test_every_need_names_a_stage_of_the_table_that_comes_before_it():
    names = [s.name for s in STAGES]
    for index, stage in enumerate(STAGES):
        assert stage.needs == ("*",) or set(stage.needs) <= set(names[:index]), stage.name


def test_the_spec_chooses_the_stages_and_needs_on_stages_that_do_not_run_are_dropped():
    graph = enabled_stages(parse_job_spec({}))
    assert "augment" not in graph and "manifold_gmm" not in graph
    assert graph["load"].needs == ()  # augment is off: nothing to wait for
    assert graph["gmm"].needs == ("sample",)
    assert graph["kmeans_raw"].needs == ("clean",) and graph["reduce"].needs == ("clean",)
    assert set(graph["report"].needs) == set(graph) - {"report"}
    off = {"enabled": False}
    graph = enabled_stages(parse_job_spec({"reduce": off, "gmm": off, "spectral": off,
                                           "tsne": off}))
    assert list(graph) == ["load", "clean", "eda", "kmeans_raw", "score_kmeans_raw",
                           "evaluate", "report"]


def _job(run) -> JobState:
    return JobState(spec=parse_job_spec({}), run=run, session=None)


def test_independent_stages_run_at_the_same_time_each_once_its_needs_are_done(tmp_path):
    both = threading.Barrier(2, timeout=10)  # passes only if b and c run at once

    def meet(job):
        both.wait()
        return threading.current_thread().name, {}

    stages = {
        "a": Stage("a", lambda job: (1, {"value": 1})),
        "b": Stage("b", meet, needs=("a",)),
        "c": Stage("c", meet, needs=("a",)),
        "d": Stage("d", lambda job: (job.outputs["b"] != job.outputs["c"], {}),
                   needs=("b", "c")),
    }
    manifest: dict = {}
    with open_run(tmp_path, "graph", manifest) as run:
        job = _job(run)
        run_stages(job, stages)
    assert job.outputs["a"] == 1 and job.outputs["d"] is True  # b and c: two threads
    records = manifest["stages"]
    assert records["a"]["value"] == 1 and all(r["status"] == "done" for r in records.values())
    assert records["b"]["start"] >= records["a"]["end"]
    assert records["d"]["start"] >= max(records["b"]["end"], records["c"]["end"])
    for record in records.values():
        assert record["end"] - record["start"] == pytest.approx(record["seconds"], abs=2e-3)
    written = json.loads((tmp_path / "graph" / "manifest.json").read_text())
    assert written["stages"] == records


def test_a_stage_that_runs_alone_waits_for_the_others_and_none_starts_beside_it(tmp_path):
    def sleep(seconds):
        return lambda job: (time.sleep(seconds), {})

    stages = {
        "a": Stage("a", sleep(0)),
        "fit": Stage("fit", sleep(0.2), needs=("a",), alone=lambda job: True),
        "b": Stage("b", sleep(0.2), needs=("a",)),
        "c": Stage("c", sleep(0.2), needs=("b",)),  # ready only after fit is
        "after": Stage("after", sleep(0), needs=("fit",)),
    }
    manifest: dict = {}
    with open_run(tmp_path, "alone", manifest) as run:
        run_stages(_job(run), stages)
    records = manifest["stages"]
    assert records["fit"]["start"] >= max(records["b"]["end"], records["c"]["end"])
    assert records["after"]["start"] >= records["fit"]["end"]


def test_a_stage_runs_alone_only_on_a_cluster_of_one_host():
    def workers(*addresses):
        return {"workers": [{"address": a} for a in addresses]}

    assert _one_host(workers("tcp://127.0.0.1:4001", "tcp://127.0.0.1:4002"))
    assert not _one_host(workers("tcp://10.0.0.5:4001", "tcp://10.0.0.6:4001"))
    fit, other = Stage("fit", None), Stage("other", None)

    def alone(stage):
        return stage is fit

    assert _to_start([fit, other], [], alone) == [other]
    assert _to_start([fit], [other], alone) == []
    assert _to_start([fit], [], alone) == [fit]
    assert _to_start([other], [fit], alone) == []
    assert _to_start([fit, other], [other], lambda stage: False) == [fit, other]
    # the t-SNE fit has the host to itself when its sample is every row (the rest is short)
    tsne = {s.name: s for s in STAGES}["tsne"]
    for n_rows, sample_size, expected in ((60_000, 60_000, True), (1_120_000, 70_000, False)):
        job = SimpleNamespace(outputs={"clean": (SimpleNamespace(n_rows=n_rows), ["train"]),
                                       "sample": SimpleNamespace(size=sample_size)})
        assert tsne.alone(job) is expected


def test_on_one_host_a_stage_waits_while_one_of_higher_priority_is_ready_or_running(tmp_path):
    def sleep(seconds):
        return lambda job: (time.sleep(seconds), {})

    stages = {
        "clean": Stage("clean", sleep(0)),
        "reduce": Stage("reduce", sleep(0.2), needs=("clean",), priority=1),
        "kmeans_pca": Stage("kmeans_pca", sleep(0.2), needs=("reduce",), priority=1),
        "kmeans_raw": Stage("kmeans_raw", sleep(0.2), needs=("clean",)),
        "sample": Stage("sample", sleep(0), needs=("reduce",)),
        "score": Stage("score", sleep(0.2), needs=("clean",), priority=-1),
    }
    manifest: dict = {}
    with open_run(tmp_path, "priority", manifest) as run:
        run_stages(_job(run), stages)
    records = manifest["stages"]
    # the fit and the sample wait for both short stages; the scores do not wait
    assert records["kmeans_raw"]["start"] >= records["kmeans_pca"]["end"]
    assert records["sample"]["start"] >= records["kmeans_pca"]["end"]
    assert records["score"]["start"] < records["reduce"]["end"]

    high, low, score = Stage("high", None, priority=1), Stage("low", None), \
        Stage("score", None, priority=-1)
    never = lambda stage: False  # noqa: E731
    assert _to_start([high, low, score], [], never) == [high, score]
    assert _to_start([low], [high], never) == []
    assert _to_start([low, score], [], never) == [low, score]
    # several hosts: priorities order the tasks only
    assert _to_start([high, low, score], [], never, by_priority=False) == [high, low, score]
    # the job's table: after clean, the look at the data and the PCA go before the raw k-means
    table = {s.name: s for s in STAGES}
    assert table["eda"].priority > table["reduce"].priority == table["kmeans_pca"].priority
    assert table["kmeans_raw"].priority < table["reduce"].priority
    assert table["sample"].priority < table["kmeans_raw"].priority
    assert table["spectral"].priority < table["gmm"].priority  # its 6 s fit after the 2 s one


def test_only_the_stages_of_negative_priority_annotate_their_tasks(tmp_path):
    # The others are ordered as stages; at 7 million rows the look at the data's tasks at
    # priority 3 raised the job's memory to 6.7 GiB (3.3 unannotated): see _task_priority.
    def annotations(job):
        return dask.get_annotations(), {}

    stages = {"eda": Stage("eda", annotations, priority=3),
              "fit": Stage("fit", annotations),
              "score": Stage("score", annotations, needs=("eda",), priority=-1)}
    with open_run(tmp_path, "annotations", {}) as run:
        job = _job(run)
        run_stages(job, stages)
    assert job.outputs["eda"] == job.outputs["fit"] == {}
    assert job.outputs["score"] == {"priority": -1}  # the scores' tasks yield to the rest


def test_the_first_failing_stage_stops_the_run_with_its_own_error(tmp_path):
    started = []

    def fail(job):
        raise ValueError("bad rows")

    def slow(job):
        time.sleep(0.5)
        return None, {}

    stages = {
        "fails": Stage("fails", fail),
        "slow": Stage("slow", slow),
        "after": Stage("after", lambda job: started.append("after") or (None, {}),
                       needs=("fails",)),
    }
    manifest: dict = {}
    with pytest.raises(ValueError, match="bad rows"), open_run(tmp_path, "f", manifest) as run:
        run_stages(_job(run), stages)
    assert started == []
    written = json.loads((tmp_path / "f.failed" / "manifest.json").read_text())
    assert written["status"] == "failed" and written["error"] == "ValueError: bad rows"
    assert written["stages"]["fails"]["status"] == "failed" and "after" not in written["stages"]
    time.sleep(0.7)  # the slow stage ends after the run did: it writes nothing any more
    assert json.loads((tmp_path / "f.failed" / "manifest.json").read_text()) == written
    assert sorted(p.name for p in (tmp_path / "f.failed").iterdir()) == ["manifest.json"]


def test_the_clean_stage_keeps_row_ids_and_classes_on_the_workers(tmp_path, subset_csv,
                                                                   dask_client):
    # Later stages must not read them from the files: those reads would be root tasks,
    # which the scheduler holds back while the workers run tasks already sent to them,
    # whatever the stages' priorities (the reduce stage once waited 13 s that way).
    spec = parse_job_spec({"data": {"format": "csv", "dir": str(subset_csv)},
                           "persist_max_bytes": 0})
    session = SimpleNamespace(client=dask_client, description={"workers": [
        {"address": address, "memory_limit_bytes": 4 * 2**30}
        for address in dask_client.scheduler_info(n_workers=-1)["workers"]]})
    with open_run(tmp_path, "clean", {}) as run:
        job = JobState(spec=spec, run=run, session=session)
        run_stages(job, enabled_stages(spec, [s for s in STAGES if s.name in ("load", "clean")]))
        data, _ = job.outputs["clean"]
        cleaned = pd.read_parquet(run.dir / "cleaned").sort_values("row_id")
        assert job.manifest["pixels"]["in_worker_memory"] is False  # persist_max_bytes: 0
        for column, values in (("row_id", data.row_id), ("label", data.label)):
            # only the held blocks are left in the graph: nothing to read
            assert len(values.__dask_graph__()) == values.numblocks[0], column
            assert is_persisted(values), column
            # inside the run: the persisted reads may still be under way, and leaving it
            # renames the run directory they read from
            read = np.sort(values.compute())
            assert np.array_equal(read, np.sort(cleaned[column].to_numpy())), column


def _results(run_dir):
    assignments = pd.read_parquet(run_dir / "assignments").sort_values("row_id")
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    metrics = metrics.drop(columns=[c for c in metrics.columns if c.endswith("_seconds")])
    return assignments.reset_index(drop=True), metrics


def test_two_runs_of_one_job_agree_exactly_whichever_stage_finishes_first(
        tmp_path, subset_csv, dask_client):
    # Every method and its scores run at the same time as the others: the finishing order
    # differs between runs, the numbers must not.
    job = write_job(tmp_path / "twice.yaml", name="twice", seed=5,
                    eda={"enabled": False}, kmeans={"max_iter": 30},
                    tsne={"enabled": False}, sample={"size": 600},
                    scores={"silhouette": "exact", "images_per_cluster": 2})
    runs = []
    for name in ("first", "second"):
        result = cli("run", str(job), "--data", str(subset_csv), "--out", str(tmp_path / "out"),
                     "--run-name", name, "--scheduler", dask_client.scheduler.address)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(tmp_path / "out" / name)
    (first, first_metrics), (second, second_metrics) = map(_results, runs)
    assert len(first) == N_TRAIN + N_TEST
    assert list(first_metrics["method"]) == ["kmeans_raw", "kmeans_pca", "gmm", "spectral"]
    pd.testing.assert_frame_equal(first, second, check_exact=True)
    pd.testing.assert_frame_equal(first_metrics, second_metrics, check_exact=True)
    manifest = json.loads((runs[0] / "manifest.json").read_text())
    stages = manifest["stages"]
    # A fit and a score overlapped (the scores start as soon as their labels exist, beside
    # the fits): each started before the other ended.
    assert stages["kmeans_raw"]["start"] < stages["score_kmeans_pca"]["end"]
    assert stages["score_kmeans_pca"]["start"] < stages["kmeans_raw"]["end"]
    # On this one-host cluster the fits went in priority order, the short ones first.
    assert stages["kmeans_raw"]["start"] >= stages["kmeans_pca"]["end"]
    assert stages["spectral"]["start"] >= stages["gmm"]["end"]
    # When each worker computed each stage's tasks (the report's timeline draws it): within
    # the stage's own time, give or take the workers' clocks. Stages that call the same
    # functions (both k-means, the four silhouettes) each get their own tasks.
    methods = ("kmeans_raw", "kmeans_pca", "gmm", "spectral")
    for name in (*methods, *(f"score_{m}" for m in methods)):
        busy = stages[name]["workers"]
        assert busy and set(busy) <= {w["address"] for w in manifest["cluster"]["workers"]}
        for intervals in busy.values():
            for start, end in intervals:
                assert stages[name]["start"] - 0.5 <= start <= end <= stages[name]["end"] + 0.5
