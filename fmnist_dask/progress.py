"""Watching a run: per-stage task progress and the Dask performance report.

Each stage's tasks are tagged with a Dask *span* named after the stage (``distributed.span``),
so the scheduler keeps per-stage task counts (also shown per stage on the dashboard's "Fine
Performance Metrics" page). :class:`StageProgress` asks the scheduler for them twice a second
and shows one line on the terminal::

    [kmeans_raw] 124/310 tasks, 2 running, 12.4 s

Without a terminal (CI logs, pipes) or under ``--quiet`` there is no such line; under
``--verbose`` the counts are logged every 10 s instead. Each stage's task count goes to the
manifest, and so do the intervals in which each worker computed the stage's tasks (the
report's timeline draws them per worker). :func:`performance_report` saves Dask's HTML
performance report of the stages.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fmnist_dask import logs, passes, runfiles

logger = logging.getLogger(__name__)

#: Task states that count as finished (released/forgotten: finished, result dropped).
DONE_STATES = ("memory", "released", "forgotten", "erred")


#: Name of the scheduler plugin, and of the requests it answers.
PLUGIN_NAME = "fmnist-dask-progress"
HANDLER = "fmnist_dask_span_states"
BUSY_HANDLER = "fmnist_dask_span_busy"
#: A worker's compute intervals closer than this (s) are kept as one: the timeline shows
#: when a worker was busy with a stage, not every task.
BUSY_GAP = 0.05
#: At most this many intervals per worker and stage in the manifest (closest ones merged).
MAX_INTERVALS = 100


def _progress_plugin() -> Any:
    """A scheduler plugin that answers ``fmnist_dask_span_states(span_id)`` and
    ``fmnist_dask_span_busy(span_id)`` requests.

    The first answer is ``{task state: count}`` of the span's tasks: ``{}`` while none of them
    has reached the scheduler, None when the scheduler keeps no spans. The second is
    ``{worker: [[start, stop], ...]}``, the (epoch) intervals in which each worker computed
    the span's tasks, forgotten once asked for. A request handler, unlike
    ``Client.run_on_scheduler``, ships no code per question and leaves no line in the
    scheduler's log. The class is local so that it travels by value: the scheduler need not
    have this package installed.
    """
    from distributed.diagnostics.plugin import SchedulerPlugin

    class SpanStates(SchedulerPlugin):
        name = PLUGIN_NAME
        idempotent = True

        async def start(self, scheduler: Any) -> None:
            self.scheduler = scheduler
            self.busy: dict[str, dict[str, list[list[float]]]] = {}
            scheduler.handlers[HANDLER] = self.span_states
            scheduler.handlers[BUSY_HANDLER] = self.span_busy

        def transition(self, key: Any, start: str, finish: str, *args: Any,
                       **kwargs: Any) -> None:
            if start != "processing" or finish not in ("memory", "erred"):
                return
            task = self.scheduler.tasks.get(key)
            span_id = getattr(getattr(task, "group", None), "span_id", None)
            worker = kwargs.get("worker")
            if span_id is None or worker is None:
                return
            intervals = self.busy.setdefault(span_id, {}).setdefault(worker, [])
            for step in kwargs.get("startstops", ()):
                if step.get("action") != "compute":
                    continue
                if intervals and step["start"] <= intervals[-1][1] + BUSY_GAP:
                    intervals[-1][1] = max(intervals[-1][1], step["stop"])
                else:
                    intervals.append([step["start"], step["stop"]])

        def span_busy(self, span_id: str) -> dict[str, list[list[float]]]:
            return self.busy.pop(span_id, {})

        def span_states(self, span_id: str) -> dict[str, int] | None:
            extension = self.scheduler.extensions.get("spans")
            if extension is None:
                return None
            span = extension.spans.get(span_id)
            return {} if span is None else {str(k): int(v) for k, v in span.states.items()}

    return SpanStates()


def summarise(states: dict[str, int] | None) -> dict[str, int]:
    """``{"done", "running", "total"}`` task counts from a span's state counts."""
    states = states or {}
    return {"done": sum(states.get(s, 0) for s in DONE_STATES),
            "running": states.get("processing", 0), "total": sum(states.values())}


class StageProgress:
    """Per-stage progress of the tasks a stage submits, as a :class:`~fmnist_dask.rundir.Run`
    stage hook (``run.stage_hooks.append(StageProgress(client))``).

    Parameters
    ----------
    client : distributed.Client
        The job's client.
    display : bool
        Draw the progress line when stderr is a terminal (and not ``--quiet``).
    interval : float
        Seconds between two questions to the scheduler.
    log_every : float
        Seconds between two DEBUG log lines with the counts (seen under ``--verbose``).
    origin : float or None
        Epoch time (``time.time()``) the run started: each stage record gets ``workers``,
        ``{worker: [[start, end], ...]}`` in seconds since then, when each worker computed
        the stage's tasks. None: no such record.
    manifest : dict or None
        The run's manifest: its ``pixels.bytes`` turns the bytes a stage scaled into
        passes over the pixels (``pixel_passes`` in the stage's record, see
        :mod:`fmnist_dask.passes`).
    """

    def __init__(self, client: Any, display: bool = True, interval: float = 0.5,
                 log_every: float = 10.0, origin: float | None = None,
                 manifest: dict[str, Any] | None = None) -> None:
        self.client = client
        self.manifest = manifest
        self.origin = origin
        self.display = display
        self.interval = interval
        self.log_every = log_every
        try:
            client.register_plugin(_progress_plugin())
            self._ready = True
        except Exception as exc:  # e.g. a scheduler that refuses pickled code
            logger.warning("no task counts per stage: the scheduler did not take the progress "
                           "plugin (%s: %s)", type(exc).__name__, exc)
            self._ready = False
        # dask.dataframe warns that it ignores annotations in its graphs; the client still
        # applies the span to every task it submits, which is all the counts need.
        warnings.filterwarnings("ignore", message=r"Dask annotations .* detected",
                                category=UserWarning)

    def states(self, span_id: str, timeout: float = 10.0) -> dict[str, int] | None:
        """``{task state: count}`` of a span, or None when the scheduler cannot tell."""
        if not self._ready:
            return None
        try:
            request = getattr(self.client.scheduler, HANDLER)
            return self.client.sync(request, span_id=span_id, callback_timeout=timeout)
        except Exception as exc:  # progress is informative only: never fail the job for it
            logger.debug("no task counts from the scheduler: %s: %s", type(exc).__name__, exc)
            return None

    def counts(self, span_id: str, timeout: float = 10.0) -> dict[str, int] | None:
        """:func:`summarise` of a span's task states, or None when the scheduler cannot tell."""
        states = self.states(span_id, timeout)
        return None if states is None else summarise(states)

    @contextlib.contextmanager
    def __call__(self, name: str, record: dict[str, Any]) -> Iterator[None]:
        from distributed import span

        start = time.perf_counter()
        stop = threading.Event()
        screen = logs.status_line() if self.display else None
        with span(name) as span_id:
            watcher = threading.Thread(
                target=self._watch, args=(name, span_id, start, stop, screen),
                name=f"fmnist-dask-progress-{name}", daemon=True)
            watcher.start()
            ok = False
            try:
                yield
                ok = True
            finally:
                stop.set()
                if screen is not None:
                    screen.clear_status()  # after stop: the watcher draws nothing more
                # A watcher waiting for a scheduler that is gone must not delay the error.
                watcher.join(timeout=2 * self.interval if ok else 0.1)
        if ok and self.client.status == "running":
            states = self.states(span_id)
            if states is not None:
                record["tasks"] = summarise(states)["done"]
                logger.debug("task states at the end: %s", ", ".join(
                    f"{state} {n}" for state, n in sorted(states.items()) if n) or "no tasks")
            try:
                counts = passes.span_counts(self.client, span_id)
            except Exception as exc:  # informative only, like the counts
                logger.debug("no pixel passes from the workers: %s: %s", type(exc).__name__, exc)
                counts = {}
            if counts:
                pixel_bytes = int((self.manifest or {}).get("pixels", {}).get("bytes", 0))
                record["pixel_passes"] = passes.summary(counts, pixel_bytes)
            if self.origin is not None and states:
                busy = self.busy(span_id)
                if busy:
                    record["workers"] = {
                        worker: [[round(a - self.origin, 2), round(b - self.origin, 2)]
                                 for a, b in _coarsen(intervals, MAX_INTERVALS)]
                        for worker, intervals in sorted(busy.items())}

    def busy(self, span_id: str, timeout: float = 10.0) -> dict[str, list[list[float]]]:
        """``{worker: [[start, stop], ...]}`` (epoch seconds) of a span's computing, or {}."""
        try:
            request = getattr(self.client.scheduler, BUSY_HANDLER)
            return self.client.sync(request, span_id=span_id, callback_timeout=timeout) or {}
        except Exception as exc:  # informative only, like the counts
            logger.debug("no worker intervals from the scheduler: %s: %s",
                         type(exc).__name__, exc)
            return {}

    def _watch(self, name: str, span_id: str, start: float, stop: threading.Event,
               screen: logs.TerminalHandler | None) -> None:
        last_log = start
        while not stop.wait(self.interval):
            if self.client.status != "running":
                continue
            counts = self.counts(span_id, timeout=max(self.interval * 4, 2.0))
            if stop.is_set():
                return
            elapsed = time.perf_counter() - start
            text = f"[{name}] {elapsed:.1f} s"
            if counts is not None:
                text = (f"[{name}] {counts['done']}/{counts['total']} tasks, "
                        f"{counts['running']} running, {elapsed:.1f} s")
            if screen is not None:
                screen.set_status(text, unless=stop)
            if time.perf_counter() - last_log >= self.log_every:
                last_log = time.perf_counter()
                logger.debug("progress: %s", text.split("] ", 1)[1])


def _coarsen(intervals: list[list[float]], limit: int) -> list[list[float]]:
    """Sorted, overlapping ones joined, and the closest neighbours merged until at most
    ``limit`` remain."""
    merged: list[list[float]] = []
    for start, stop in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    while len(merged) > limit:
        gaps = sorted(merged[i + 1][0] - merged[i][1] for i in range(len(merged) - 1))
        widest_closed = gaps[len(merged) - limit - 1]
        joined = [merged[0]]
        for start, stop in merged[1:]:
            if start - joined[-1][1] <= widest_closed:
                joined[-1][1] = max(joined[-1][1], stop)
            else:
                joined.append([start, stop])
        merged = joined
    return merged


@contextlib.contextmanager
def watch(run: Any, client: Any, display: bool = True) -> Iterator[None]:
    """Watch a run's stages: progress per stage, and the performance report of them all.

    Parameters
    ----------
    run : fmnist_dask.rundir.Run
        Its stages get a :class:`StageProgress` hook; the report goes to its directory and
        the report's file name to its manifest (``performance_report``).
    client : distributed.Client
    display : bool
        Draw the progress line on a terminal.
    """
    hook = StageProgress(client, display=display, origin=getattr(run, "started_epoch", None),
                         manifest=run.manifest)
    run.stage_hooks.append(hook)
    try:
        with performance_report(run.dir / runfiles.PERFORMANCE_REPORT, client, run.manifest):
            yield
    finally:
        run.stage_hooks.remove(hook)


@contextlib.contextmanager
def performance_report(path: Path, client: Any, manifest: dict[str, Any] | None = None,
                       timeout: float = 120.0) -> Iterator[None]:
    """Save Dask's performance report of the block's work as HTML at ``path``.

    ``manifest["performance_report"]`` gets its file name from the start (so a report page
    written within the block can link it) and loses it again if no report could be written.
    Without a report (the scheduler is gone or cannot render it) the job is not failed: a
    warning says why. After an error the report is still attempted when the client is
    connected, as it helps to see what went wrong; not after Ctrl-C.
    """
    from distributed import performance_report as dask_report

    from fmnist_dask.dask_cluster import call_with_timeout

    path = Path(path)
    info = manifest if manifest is not None else {}
    report = dask_report(filename=str(path))
    try:
        call_with_timeout(report.__enter__, timeout, "the performance report's start")
        info["performance_report"] = path.name
    except Exception as exc:
        logger.warning("no performance report: %s: %s", type(exc).__name__, exc)
        report = None
    try:
        yield
    except BaseException as error:
        if report is not None and not isinstance(error, KeyboardInterrupt) and (
                client.status == "running"):
            _finish_report(report, path, timeout, info, error)
        elif not path.exists():
            info.pop("performance_report", None)
        raise
    if report is not None:
        _finish_report(report, path, timeout, info, None)


def _finish_report(report: Any, path: Path, timeout: float, info: dict,
                   error: BaseException | None) -> None:
    from fmnist_dask.dask_cluster import call_with_timeout

    args = (None, None, None) if error is None else (type(error), error, error.__traceback__)
    try:
        call_with_timeout(lambda: report.__exit__(*args), timeout, "the performance report")
    except Exception as exc:
        logger.warning("no performance report: %s: %s", type(exc).__name__, exc)
    if path.exists():
        logger.info("performance report saved: %s", path.name)
    else:
        info.pop("performance_report", None)
