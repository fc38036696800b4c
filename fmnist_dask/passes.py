"""Passes over the pixels, counted per stage on the workers.

Every pass over the cleaned pixels scales each block to float32 (``clean.scale_pixels``;
k-means converts only the rows it reads, so its passes can be fractions) and, when the
pixels stream from ``cleaned/`` instead of staying in worker memory, reads each pixel file
first (``pixelfiles.read_pixels``). Both note the uint8 bytes they handled
under the spans of the task that ran them; every stage runs in a span of its own
(``progress.StageProgress``), whose record collects the workers' counts when the stage
ends: ``stages.<name>.pixel_passes`` in the manifest and the stage's "done" log line.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

#: ``{span id: {"scaled": bytes, "read": bytes}}`` of this worker process.
_COUNTS: dict[str, dict[str, int]] = {}
_LOCK = threading.Lock()
#: Spans lent to helper threads of a task (:func:`carried`).
_LENT = threading.local()


def _task_spans() -> tuple[str, ...]:
    """Span ids of the task this thread runs on a Dask worker (outermost first), or ()."""
    lent = getattr(_LENT, "spans", None)
    if lent is not None:
        return lent
    try:
        from distributed.worker import get_worker, thread_state

        key = getattr(thread_state, "key", None)
        task = get_worker().state.tasks.get(key) if key is not None else None
    except (ImportError, ValueError):  # not inside a worker's task
        return ()
    span = (task.annotations or {}).get("span") if task is not None else None
    return tuple(span.get("ids", ())) if span else ()


def note(kind: str, nbytes: int) -> None:
    """Count ``nbytes`` of pixels handled (``kind``: ``"scaled"`` or ``"read"``) for the
    spans of the running task; nothing outside a worker's task."""
    spans = _task_spans()
    if not spans:
        return
    with _LOCK:
        for span_id in spans:
            counts = _COUNTS.setdefault(span_id, {})
            counts[kind] = counts.get(kind, 0) + int(nbytes)


def carried(fn: Callable) -> Callable:
    """``fn`` for a helper thread of the running task: its notes count for the task's spans
    (a task that processes its blocks on a thread pool, e.g. a k-means fit in one task)."""
    spans = _task_spans()

    def run(*args: Any, **kwargs: Any) -> Any:
        _LENT.spans = spans
        try:
            return fn(*args, **kwargs)
        finally:
            _LENT.spans = None

    return run


def counts_of(span_id: str) -> dict[str, int]:
    """This worker's counts for a span (run on every worker by :func:`span_counts`)."""
    with _LOCK:
        return dict(_COUNTS.get(span_id, {}))


def span_counts(client: Any, span_id: str) -> dict[str, int]:
    """The counts of a span summed over the workers: ``{"scaled": bytes, "read": bytes}``."""
    total: dict[str, int] = {}
    for counts in client.run(counts_of, span_id).values():
        for kind, nbytes in counts.items():
            total[kind] = total.get(kind, 0) + nbytes
    return total


def summary(counts: dict[str, int], pixel_bytes: int) -> dict[str, float]:
    """A stage's record: passes over the pixels (blocks scaled / all blocks) and bytes read
    from ``cleaned/``."""
    scaled, read = counts.get("scaled", 0), counts.get("read", 0)
    return {"passes": round(scaled / pixel_bytes, 2) if pixel_bytes else 0.0,
            "bytes_read": read}
