"""The orchestrator: the job as a graph of stages, each started as soon as what it needs exists.

:data:`STAGES` is the whole job: every stage's name, the function that runs it, the stages
whose outputs it needs and whether the spec turns it on. :func:`run_job` runs each stage in a
thread of its own once its inputs are there, so independent stages (k-means on pixels and
the PCA; the sample-based models; each method's scores) share the cluster at the same time,
all through the one client. Every stage keeps its ``run.stage`` record in the manifest.

Results do not depend on which stage finishes first: every stage draws its randomness from
the job's seed alone, reads the outputs of the stages it names and changes none of them, and
the per-method outputs are gathered in the table's order, not in finishing order.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dask

from fmnist_dask import logs, progress, runfiles, sampling
from fmnist_dask.augment import augment
from fmnist_dask.config import JobSpec
from fmnist_dask.dask_cluster import (
    ClusterSession,
    StartingCluster,
    job_cluster_target,
    open_cluster,
    trim_worker_memory,
)
from fmnist_dask.models.kmeans import MAX_LOCAL_BYTES
from fmnist_dask.rundir import Run, default_run_name, open_run
from fmnist_dask.schema import N_PIXELS
from fmnist_dask.stages import clean, cluster, eda, embed, evaluate, load, reduce, report

logger = logging.getLogger("fmnist_dask")
#: Keep the pixels in worker memory when they take at most this share of it.
PERSIST_SHARE = 0.25


def _worker_memory(description: dict) -> int:
    return sum(int(w.get("memory_limit_bytes") or 0) for w in description.get("workers", []))


@dataclass
class JobState:
    """What the stages of one run share: the spec, the run, the cluster and the outputs.

    ``outputs[name]`` is what stage ``name`` returned; a stage reads only the outputs of the
    stages it needs, and never changes them.
    """

    spec: JobSpec
    run: Run
    session: ClusterSession | None  # None: a stage table run without a cluster (tests)
    outputs: dict[str, Any] = field(default_factory=dict)

    @property
    def manifest(self) -> dict[str, Any]:
        return self.run.manifest

    def features(self, space: str) -> Any:
        """The rows of a feature space a method saw: ``pixels`` or ``pca``."""
        data, _ = self.outputs["clean"]
        return data.pixels if space == "pixels" else self.outputs["reduce"][0]


#: What a stage function returns: its output (for the stages that need it) and the details
#: for its manifest record.
StageOutput = tuple[Any, dict[str, Any]]


# ---------------------------------------------------------------------------------------------
# The stages. Each takes the job's state and returns (output, record details).
# ---------------------------------------------------------------------------------------------


def _augment(job: JobState) -> StageOutput:
    spec = job.spec.augment
    return None, augment(spec.source, spec, Path(spec.out))


def _load(job: JobState) -> StageOutput:
    raw, pieces, files = load.load(job.spec.data)
    return (raw, pieces, files), {"inputs": files, "partitions": len(pieces)}


def _clean(job: JobState) -> StageOutput:
    raw, pieces, files = job.outputs["load"]
    counts = clean.clean(raw, pieces, files, job.spec.clean, job.run.dir)
    job.manifest["rows"] = counts.as_dict()
    # Read once and keep the uint8 pixels (a quarter of float32) in worker memory when
    # they fit: k-means and PCA pass over them many times; each pass rescales block by block.
    pixel_bytes = job.manifest["rows"]["total"]["kept"] * N_PIXELS  # uint8
    keep = pixel_bytes <= min(
        job.spec.persist_max_bytes, PERSIST_SHARE * _worker_memory(job.session.description))
    data = clean.load_cleaned(job.run.dir, in_memory=keep)
    job.manifest["pixels"] = {"bytes": pixel_bytes, "in_worker_memory": keep}
    return (data, list(counts.read)), {"rows": counts.as_dict()["total"]}


def _eda(job: JobState) -> StageOutput:
    data, splits = job.outputs["clean"]
    summary = eda.explore(data, splits, job.spec.eda, job.run.dir, job.spec.seed)
    job.manifest["eda"] = summary
    return None, {"pixel_mean": summary["pixel_mean"], "pixel_std": summary["pixel_std"]}


def _kmeans_raw(job: JobState) -> StageOutput:
    data, _ = job.outputs["clean"]
    # the uint8 pixels, divided by 255 as the kernels read them: no float copy per pass;
    # pixels too large to keep in worker memory are not gathered into one task either
    result, model = cluster.kmeans(data.raw_pixels, job.spec.kmeans, job.spec.seed,
                                   "kmeans_raw", "pixels", divide_by=255.0,
                                   max_local_bytes=min(job.spec.persist_max_bytes,
                                                       MAX_LOCAL_BYTES))
    cluster.save_centroids(model.cluster_centers_, result.method, job.run.dir,
                           images=model.cluster_centers_)
    return result, result.scores


def _reduce(job: JobState) -> StageOutput:
    data, _ = job.outputs["clean"]
    reduction, summary = reduce.reduce(data.pixels, data.row_id, job.spec.reduce, job.run.dir)
    job.manifest["pca"] = summary
    # The projection, kept on the workers, and the PCA (its inverse shows k-means centres).
    return (reduction.projected, reduction.pca), {
        "cumulative_explained_variance": summary["cumulative_explained_variance"]}


def _kmeans_pca(job: JobState) -> StageOutput:
    result, model = cluster.kmeans(job.features("pca"), job.spec.kmeans, job.spec.seed,
                                   "kmeans_pca", "pca")
    _, pca = job.outputs["reduce"]
    # ten rows: in this thread, not a round trip to a worker busy with long tasks
    centres = pca.inverse_transform(model.cluster_centers_).compute(scheduler="sync")
    cluster.save_centroids(model.cluster_centers_, result.method, job.run.dir, images=centres)
    return result, result.scores


def _sample(job: JobState) -> StageOutput:
    sample = sampling.draw_sample(job.features("pca"), job.spec.sample.size, job.spec.seed)
    return sample, {"sample_size": sample.size}


def _gmm(job: JobState) -> StageOutput:
    result = cluster.gmm(job.features("pca"), job.outputs["sample"], job.spec.gmm,
                         job.spec.seed)
    return result, result.scores


def _spectral(job: JobState) -> StageOutput:
    result = cluster.spectral(job.features("pca"), job.outputs["sample"], job.spec.spectral,
                              job.spec.seed)
    return result, result.scores


def _manifold(job: JobState) -> StageOutput:
    result = cluster.manifold(job.features("pixels"), job.outputs["sample"],
                              job.spec.manifold, job.spec.seed)
    return result, result.scores


def _sample_is_all_rows(job: JobState) -> bool:
    """Whether the sample is every row: the other stages are then short, and the t-SNE fit,
    which keeps every core of its host busy, runs alone (beside the scores it got one core
    and held up the short fits). On more rows it runs beside the k-means and scores that
    take longer than it (16x: 131 s alone, 117 s beside them; docs/benchmarks.md,
    "Session 13")."""
    data, _ = job.outputs["clean"]
    return job.outputs["sample"].size >= data.n_rows


def _tsne(job: JobState) -> StageOutput:
    data, _ = job.outputs["clean"]
    embedding, summary = embed.tsne(job.features("pca"), job.outputs["sample"], data.row_id,
                                    job.spec.tsne, job.spec.seed, job.run.dir)
    job.manifest["tsne"] = summary
    return embedding, summary


def _tsne_trust(job: JobState) -> StageOutput:
    value = embed.trustworthiness(job.outputs["sample"], job.outputs["tsne"], job.spec.seed)
    # replaced whole: the manifest's nested records are never changed in place
    job.manifest["tsne"] = {**job.manifest["tsne"], "trustworthiness": value}
    return None, {"trustworthiness": value}


def _scorer(method: str) -> Callable[[JobState], StageOutput]:
    """The stage that scores ``method`` (its silhouette, scores against the labels, PNGs)."""
    def score(job: JobState) -> StageOutput:
        result = job.outputs[method]
        data, _ = job.outputs["clean"]
        row, names = evaluate.score(result, job.features(result.features), data,
                                    job.spec.scores, job.run.dir, job.spec.seed)
        return (row, names), {k: float(row[k]) for k in SCORE_DETAILS if row.get(k) is not None}
    score.__name__ = f"_score_{method}"
    return score


def _scored(job: JobState) -> list[str]:
    """The scored methods in the table's order, whichever finished first."""
    return [m for m in METHODS if f"score_{m}" in job.outputs]


def _evaluate(job: JobState) -> StageOutput:
    methods = _scored(job)
    results = [job.outputs[m] for m in methods]
    rows = [job.outputs[f"score_{m}"][0] for m in methods]
    data, _ = job.outputs["clean"]
    evaluate.write_assignments(results, data, job.run.dir)
    metrics = evaluate.write_metrics(rows, job.run.dir)
    job.manifest["metrics"] = metrics.to_dict("records")
    seconds = {name: stage["seconds"] for name, stage in dict(job.manifest["stages"]).items()
               if "seconds" in stage}
    evaluate.write_comparison(metrics, seconds, job.run.dir)
    return None, {"methods": methods}


def _tsne_figures(job: JobState) -> StageOutput:
    # Drawn on the client while evaluate writes the assignments on the workers.
    methods = _scored(job)
    names = {m: job.outputs[f"score_{m}"][1] for m in methods}
    data, _ = job.outputs["clean"]
    embedding = job.outputs["tsne"]
    paths = evaluate.tsne_figures(embedding.coordinates, embedding.indices,
                                  [job.outputs[m] for m in methods], names, data, job.run.dir)
    return None, {"figures": len(paths)}


def _report(job: JobState) -> StageOutput:
    # Built from the files written above only, exactly as `fmnist-dask report` does.
    return None, {"file": report.write_report(job.run.dir).name}


@dataclass(frozen=True)
class Stage:
    """One stage of the job.

    Attributes
    ----------
    name : str
        Its name in the manifest, the log and the report.
    run : callable
        ``run(job) -> (output, record details)``.
    needs : tuple of str
        Stages whose outputs it reads; it starts once they are done. A need on a stage the
        spec turns off is no need (the spec refuses a stage whose inputs are off, see
        ``config.JobSpec``). ``("*",)``: every other stage.
    enabled : callable
        ``enabled(spec) -> bool``: whether the spec runs it.
    priority : int
        Negative (the scores): the Dask priority of the stage's tasks, so that the other
        stages' ready tasks run first; without it the oldest graph goes first, and a model
        fit of a second waited behind the hundreds of silhouette tasks submitted before it.
        Such a stage starts as soon as its needs are done and fills the cores the others
        leave. 0 or more: on a cluster of one host the stage does not start while one of
        higher priority is ready or running. Task priorities cannot stop a task that runs:
        the fits are single tasks of seconds that run threads on every core, and beside the
        raw k-means' fit the PCA and the k-means on it took 4.3 s instead of 1.7 s
        (docs/benchmarks.md, "Session 19"). On several hosts it has no effect. The job's
        levels, among the stages ready at the same time the short ones first: 3 for the
        look at the data (0.5 s; beside the PCA at 1.12 million rows, their tasks
        interleaved, it took 13.7 s instead of 3.8 s, the job's peak memory 5.6 GiB instead
        of 2.1); 2 for the PCA and the k-means on it (a second each; the sample and its
        models wait for them); 1 for the raw k-means' fit (2 s, before the sample's fits,
        since the longest score waits for it) and the GMM (2 s, before spectral's 6 s fit
        on the same worker); 0 for the other stages; -1 for the scores.
    alone : callable
        ``alone(job) -> bool``, asked once its needs are done: whether the stage's work
        takes every core of its host (the t-SNE fit runs its own threads) and should have
        them. When it says so and the cluster's workers share one host, the stage starts
        once no other stage is running or ready, and no other stage starts until it is
        done: beside other stages it would get part of the cores and hold a worker thread
        while their tasks queue behind it (docs/benchmarks.md, "The notebook against the
        job"). On a cluster of several hosts it runs like any other stage.
    """

    name: str
    run: Callable[[JobState], StageOutput]
    needs: tuple[str, ...] = ()
    enabled: Callable[[JobSpec], bool] = lambda spec: True
    priority: int = 0
    alone: Callable[[JobState], bool] = lambda job: False


#: The clustering methods, in the order of the metrics table and the assignments' columns.
METHODS = ("kmeans_raw", "kmeans_pca", "gmm", "spectral", "manifold_gmm")
#: Scores a ``score_<method>`` stage also puts in its manifest record.
SCORE_DETAILS = ("silhouette", "acc", "nmi", "ari")


def _sample_based(spec: JobSpec) -> bool:
    return (spec.gmm.enabled or spec.spectral.enabled or spec.tsne.enabled
            or spec.manifold.enabled)


def _any_method(spec: JobSpec) -> bool:
    return any(_method_enabled(m)(spec) for m in METHODS)


def _method_enabled(method: str) -> Callable[[JobSpec], bool]:
    return {
        "kmeans_raw": lambda s: s.kmeans.enabled,
        "kmeans_pca": lambda s: s.kmeans.enabled and s.reduce.enabled,
        "gmm": lambda s: s.gmm.enabled,
        "spectral": lambda s: s.spectral.enabled,
        "manifold_gmm": lambda s: s.manifold.enabled,
    }[method]


#: The job. Order matters only for the manifest's and the report's listing of stages that
#: become ready at the same moment.
STAGES: tuple[Stage, ...] = (
    Stage("augment", _augment, enabled=lambda s: s.augment.enabled),
    Stage("load", _load, needs=("augment",)),  # reads what augment wrote, when it runs
    Stage("clean", _clean, needs=("load",)),
    # After clean: the short stages first, the raw k-means' fit once they are done.
    Stage("eda", _eda, needs=("clean",), enabled=lambda s: s.eda.enabled, priority=3),
    Stage("kmeans_raw", _kmeans_raw, needs=("clean",), enabled=_method_enabled("kmeans_raw"),
          priority=1),
    Stage("reduce", _reduce, needs=("clean",), enabled=lambda s: s.reduce.enabled, priority=2),
    Stage("kmeans_pca", _kmeans_pca, needs=("reduce",), enabled=_method_enabled("kmeans_pca"),
          priority=2),
    Stage("sample", _sample, needs=("reduce",), enabled=_sample_based),
    Stage("gmm", _gmm, needs=("sample",), enabled=_method_enabled("gmm"), priority=1),
    Stage("spectral", _spectral, needs=("sample",), enabled=_method_enabled("spectral")),
    Stage("manifold_gmm", _manifold, needs=("sample",), enabled=_method_enabled("manifold_gmm")),
    Stage("tsne", _tsne, needs=("sample",), enabled=lambda s: s.tsne.enabled,
          alone=_sample_is_all_rows),
    Stage("tsne_trust", _tsne_trust, needs=("tsne",), enabled=lambda s: s.tsne.enabled),
    # The scores are most of the tasks and only evaluate waits for them: they yield.
    *(Stage(f"score_{m}", _scorer(m), needs=(m,), enabled=_method_enabled(m), priority=-1)
      for m in METHODS),
    Stage("evaluate", _evaluate, needs=tuple(f"score_{m}" for m in METHODS),
          enabled=_any_method),
    Stage("tsne_figures", _tsne_figures, needs=(*(f"score_{m}" for m in METHODS), "tsne"),
          enabled=lambda s: s.tsne.enabled and _any_method(s)),
    Stage("report", _report, needs=("*",)),
)


def enabled_stages(spec: JobSpec, stages: Iterable[Stage] = STAGES) -> dict[str, Stage]:
    """The stages ``spec`` runs, each with its needs on stages that do not run dropped."""
    chosen = [s for s in stages if s.enabled(spec)]
    names = [s.name for s in chosen]
    graph = {}
    for stage in chosen:
        needs = (tuple(n for n in names if n != stage.name) if stage.needs == ("*",)
                 else tuple(n for n in stage.needs if n in names))
        graph[stage.name] = dataclasses.replace(stage, needs=needs)
    return graph


def _one_host(description: dict) -> bool:
    """Whether every worker of the cluster (``ClusterSession.description``) is on one host."""
    return len({urlsplit(w["address"]).hostname for w in description.get("workers", [])}) <= 1


def _to_start(ready: list[Stage], running: list[Stage],
              alone: Callable[[Stage], bool], by_priority: bool = True) -> list[Stage]:
    """Which of the ``ready`` stages start now, beside the ``running`` ones; ``alone(stage)``
    says whether a stage runs by itself; ``by_priority``: whether stages of priority 0 or
    more wait for those of higher priority (see :class:`Stage`)."""
    if any(alone(s) for s in running):
        return []
    if by_priority:
        top = max((s.priority for s in ready + running), default=0)
        ready = [s for s in ready if s.priority < 0 or s.priority >= top]
    shared = [s for s in ready if not alone(s)]
    return shared if shared or running else ready[:1]


def _task_priority(priority: int) -> contextlib.AbstractContextManager:
    """The Dask priority of the tasks a stage of ``priority`` submits: negative ones only.

    The other stages are ordered as stages (see :class:`Stage`) and their tasks keep no
    annotation: at 7 million rows, pixels streamed from files, the look at the data with
    its tasks at priority 3 raised the job's memory to 6.7 GiB, against 3.3 GiB with them
    at 0 (as the clean stage's reading tasks) or unannotated (docs/benchmarks.md, "Session
    19"; how the scheduler came to hold the blocks read was not pinned down).
    """
    return dask.annotate(priority=priority) if priority < 0 else contextlib.nullcontext()


def run_stages(job: JobState, stages: dict[str, Stage]) -> None:
    """Run ``stages`` (from :func:`enabled_stages`), each in its own thread once its needs
    are done; return when all are done.

    On a cluster of one host, a stage whose ``alone`` says so waits until no other stage
    is running or ready, and runs by itself; and a stage of priority 0 or more waits while
    one of higher priority is ready or running (see :class:`Stage`).

    The first stage that fails stops the run: its error is raised here (in the calling
    thread, so the command line maps it to its exit code) and no further stage starts; the
    stages still running stop with the cluster as the error unwinds. Ctrl-C and SIGTERM
    arrive in the calling thread, which only waits, and unwind the same way.
    """
    finished: queue.Queue[tuple[str, BaseException | None]] = queue.Queue()
    pending = dict(stages)
    running: set[str] = set()
    done: set[str] = set()

    def work(stage: Stage) -> None:
        try:
            with job.run.stage(stage.name, logger.info) as record, \
                    _task_priority(stage.priority):
                output, details = stage.run(job)
                record.update(details or {})
            job.outputs[stage.name] = output
            finished.put((stage.name, None))
        except BaseException as error:  # handed to the calling thread, which raises it
            finished.put((stage.name, error))

    one_host = job.session is None or _one_host(job.session.description)

    def alone(stage: Stage) -> bool:
        return one_host and stage.alone(job)

    while pending or running:
        ready = [s for s in pending.values() if set(s.needs) <= done]
        if not ready and not running:
            raise RuntimeError(f"stages whose needs never run: {sorted(pending)}")
        for stage in _to_start(ready, [stages[n] for n in running], alone, one_host):
            del pending[stage.name]
            running.add(stage.name)
            # The thread sees this thread's context: the session's client is current there.
            context = contextvars.copy_context()
            threading.Thread(target=context.run, args=(work, stage), daemon=True,
                             name=f"fmnist-dask-stage-{stage.name}").start()
        name, error = finished.get()
        running.discard(name)
        if error is not None:
            raise error
        done.add(name)
        if job.session is not None:
            # what the stage freed goes back to the system before the next ones grow
            trim_worker_memory(job.session.client)


def run_job(spec: JobSpec, run_name: str | None = None,
            cluster: StartingCluster | None = None) -> Path:
    """Run the whole job described by ``spec``; return the finished run directory.

    ``cluster``: the spec's cluster already starting (the command line starts it before it
    imports this module); by default it is started here.
    """
    target = cluster or job_cluster_target(spec.cluster)
    manifest = {"job": spec.model_dump(mode="json")}
    name = run_name or default_run_name(spec.name)
    with open_run(Path(spec.output_dir), name, manifest) as run, \
            logs.run_log(run.dir / runfiles.RUN_LOG), open_cluster(target) as session, \
            progress.watch(run, session.client):
        manifest["cluster"] = session.description
        manifest["dashboard_link"] = session.dashboard_link
        logger.info("Dask dashboard: %s", session.dashboard_link or "(none)")
        logger.info("run directory (while running): %s", run.dir)
        run_stages(JobState(spec, run, session), enabled_stages(spec))
    logger.info("run directory: %s", run.dir)
    return run.dir
