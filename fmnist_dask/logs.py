"""Logging of a run: one line format for the terminal and for ``run.log``.

Every line carries a UTC timestamp, the level, the stage it was logged for (see
:func:`stage_label`) and the message; lines from other libraries (Dask, ...) also name their
logger, and lines a worker sent (its warnings and errors, see ``dask_cluster``) the worker::

    2026-11-27T10:39:09.512Z INFO    [kmeans_raw] started
    2026-11-27T10:39:12.004Z WARNING [kmeans_raw] worker tcp://10.0.0.7:40123 left ...
    2026-11-27T10:39:12.010Z WARNING [kmeans_raw] distributed.client: ...
    2026-11-27T10:39:13.120Z ERROR   [kmeans_raw] distributed.worker [tcp://10.0.0.7:40123]: ...

The command line calls :func:`configure` once; :func:`run_log` adds ``run.log`` for the
duration of a run. The terminal handler also owns the one-line progress display
(:func:`status_line`), so log lines and the progress line never overwrite each other.
"""

from __future__ import annotations

import collections
import contextvars
import datetime as dt
import logging
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

#: Label of log lines outside any stage.
NO_STAGE = "-"
#: Libraries whose log lines go through the same handlers (their own handlers are removed).
THIRD_PARTY = ("distributed", "bokeh", "tornado", "dask", "dask_ml", "py.warnings")

#: The stage the current thread (or asyncio task) works for: stages run in threads of their
#: own, several at a time, so the label is per context, not per process.
_stage: contextvars.ContextVar[str | None] = contextvars.ContextVar("fmnist_dask_stage",
                                                                   default=None)
#: Stages running now, in the order they started: the label of lines logged by threads that
#: work for no stage in particular (Dask's event loop forwarding a worker's warning, ...).
_running: list[str] = []
#: (name, time.monotonic() at its end) of the stages that ended, the latest last.
_ended: collections.deque[tuple[str, float]] = collections.deque(maxlen=256)
_running_lock = threading.Lock()


@contextmanager
def stage_label(name: str) -> Iterator[None]:
    """Tag the log lines of this thread with ``name`` while the block runs.

    Lines from threads outside any stage (Dask's event loop, ...) are tagged with the stages
    running at the time, joined by ``+`` when several run at once.
    """
    token = _stage.set(name)
    with _running_lock:
        _running.append(name)
    try:
        yield
    finally:
        with _running_lock:
            _running.remove(name)
            _ended.append((name, time.monotonic()))
        _stage.reset(token)


def _label() -> str:
    own = _stage.get()
    if own is not None:
        return own
    with _running_lock:
        return "+".join(_running) or NO_STAGE


def stages_since(since: float) -> str:
    """The label of the stages that ran at any time from ``since`` (``time.monotonic()``)
    to now: those running and those that ended since, joined by ``+``.

    For a line about something that happened at an unknown moment of that span: a worker
    seen gone at one poll of the cluster left it at some time after the poll before.
    """
    with _running_lock:
        names = [name for name, end in _ended if end >= since] + _running
    return "+".join(dict.fromkeys(names)) or NO_STAGE


class _StageFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "stage"):
            record.stage = _label()
        return True


class RunFormatter(logging.Formatter):
    """``<UTC ISO time> <LEVEL> [<stage>] [<logger>: ]<message>``, one record per line."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        moment = dt.datetime.fromtimestamp(record.created, dt.timezone.utc)
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            message = f"{message}\n{record.exc_text}"
        source = "" if record.name.startswith("fmnist_dask") else record.name
        worker = getattr(record, "worker", None)  # set on lines forwarded from a worker
        if worker:
            source = f"{source} [{worker}]".lstrip()
        source = f"{source}: " if source else ""
        stage = getattr(record, "stage", NO_STAGE)
        return f"{self.formatTime(record)} {record.levelname:<7} [{stage}] {source}{message}"


class _DropInterruptNoise(logging.Filter):
    """Ctrl-C during a gather leaves distributed's helper tasks failed with ``AllExit``;
    asyncio reports each one ("Task exception was never retrieved"), which says nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "exception=AllExit()" not in record.getMessage()


class TerminalHandler(logging.StreamHandler):
    """Log lines on stderr, plus an optional status line kept below them on a terminal."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream if stream is not None else sys.stderr)
        self._status = ""
        self._status_lock = threading.RLock()

    @property
    def is_terminal(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def set_status(self, text: str, unless: threading.Event | None = None) -> None:
        """Show ``text`` on the last terminal line (replacing the previous status).

        Nothing is drawn once ``unless`` is set: a progress thread that lags behind the end of
        its stage cannot leave a stale line under the next log lines.
        """
        with self._status_lock:
            if unless is not None and unless.is_set():
                return
            self._erase()
            self._status = text
            self._draw()

    def clear_status(self) -> None:
        with self._status_lock:
            self._erase()
            self._status = ""

    def _erase(self) -> None:
        if self._status:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def _draw(self) -> None:
        if self._status:
            self.stream.write(self._status)
            self.stream.flush()

    def emit(self, record: logging.LogRecord) -> None:
        with self._status_lock:
            self._erase()
            super().emit(record)
            self._draw()


def _handlers_of(logger: logging.Logger, kind: type) -> list[logging.Handler]:
    return [h for h in logger.handlers if isinstance(h, kind)]


def terminal_handler() -> TerminalHandler | None:
    """The handler :func:`configure` installed, or None."""
    handlers = _handlers_of(logging.getLogger(), TerminalHandler)
    return handlers[0] if handlers else None


def status_line() -> TerminalHandler | None:
    """The terminal handler when stderr is a terminal and not silenced (``--quiet``), else None.

    Progress displays draw on it; without a terminal (CI logs, pipes) there is none, so only
    ordinary log lines are written.
    """
    handler = terminal_handler()
    if handler is None or not handler.is_terminal or handler.level > logging.INFO:
        return None
    return handler


def configure(quiet: bool = False, verbose: bool = False, stream: TextIO | None = None) -> None:
    """Route this package's and Dask's log lines to one terminal handler (stderr).

    ``quiet``: the terminal shows warnings and errors only (``run.log`` still gets INFO).
    ``verbose``: DEBUG lines of this package, INFO lines of Dask, and Python warnings that are
    hidden otherwise. Default: INFO lines of this package, Dask's warnings and errors.
    """
    import distributed  # noqa: F401  (installs its own handlers on import: replace them)

    root = logging.getLogger()
    for handler in _handlers_of(root, TerminalHandler):
        root.removeHandler(handler)
    terminal = TerminalHandler(stream)
    terminal.setFormatter(RunFormatter())
    terminal.addFilter(_StageFilter())
    terminal.setLevel(logging.WARNING if quiet else logging.DEBUG)
    root.addHandler(terminal)
    root.setLevel(logging.WARNING)

    ours = logging.getLogger("fmnist_dask")
    ours.setLevel(logging.DEBUG if verbose else logging.INFO)
    ours.propagate = True
    for handler in list(ours.handlers):
        ours.removeHandler(handler)

    third_level = logging.INFO if verbose else logging.WARNING
    names = [n for n in logging.root.manager.loggerDict
             if n.startswith(tuple(f"{p}." for p in THIRD_PARTY))]
    for name in (*THIRD_PARTY, *names):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(logging.NOTSET if name in names else third_level)
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropInterruptNoise) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_DropInterruptNoise())
    logging.captureWarnings(True)
    if not verbose:
        # Noise on every local run: the dashboard's real URL is logged anyway, the bokeh
        # wildcard refers to the dashboard's websocket origin check, and p2p shuffles
        # announce themselves at WARNING level.
        warnings.filterwarnings("ignore", message=r"Port \d+ is already in use")
        logging.getLogger("bokeh").setLevel(logging.ERROR)
        logging.getLogger("distributed.shuffle").setLevel(logging.ERROR)


@contextmanager
def run_log(path: Path) -> Iterator[Path]:
    """Also write every log line to ``path`` (``run.log``) while the block runs.

    The file gets INFO lines even under ``--quiet`` (DEBUG under ``--verbose``); an error that
    ends the block is recorded in it before it propagates.
    """
    path = Path(path)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(RunFormatter())
    handler.addFilter(_StageFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield path
    except BaseException as error:
        kind = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        record = logging.LogRecord("fmnist_dask", logging.ERROR, __file__, 0,
                                   "run %s: %s: %s", (kind, type(error).__name__, error), None)
        handler.handle(record)  # the file only: the command line reports it on the terminal
        raise
    finally:
        root.removeHandler(handler)
        handler.close()
