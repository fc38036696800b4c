"""The run directory: written under a temporary name, renamed only when the run succeeds.

``outputs/.<run-name>.incomplete/`` while the job runs; ``outputs/<run-name>/`` once it has
finished; ``outputs/<run-name>.failed/`` (manifest ``status: failed``) when it raised. So a
failed or interrupted run never looks like a finished one.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import logging
import platform
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmnist_dask import runfiles
from fmnist_dask.logs import stage_label

logger = logging.getLogger(__name__)
#: Called as ``hook(stage_name, stage_record)`` around every stage (progress display, ...).
StageHook = Callable[[str, dict[str, Any]], AbstractContextManager]
PACKAGES = (
    "fmnist-dask", "dask", "distributed", "dask-ml", "numpy", "pandas", "scipy",
    "scikit-learn", "matplotlib", "pyarrow", "openTSNE", "pyamg",
)


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages the results depend on."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def default_run_name(job_name: str) -> str:
    """``<job name>-<UTC timestamp>``: sortable and unique per second."""
    return f"{job_name}-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%d-%H%M%S')}"


def done_message(record: dict[str, Any]) -> str:
    """A stage's last log line, from its manifest record."""
    text = f"done in {record['seconds']:.1f} s"
    if "tasks" in record:
        text += f", {record['tasks']} tasks"
    if "pixel_passes" in record:
        counts = record["pixel_passes"]
        text += (f", {counts['passes']:g} passes over the pixels, "
                 f"{counts['bytes_read'] / 1e9:.2f} GB read")
    return text


@dataclass
class Run:
    """A run in progress: its directory, its manifest, and per-stage timings.

    ``stage_hooks`` are entered around every stage, inside its timing (e.g.
    :class:`fmnist_dask.progress.StageProgress`); they may add details to the stage record.
    Stages may run at the same time in threads of their own: manifest writes are serialised,
    and each write serialises a copy of the manifest taken at once, so a stage adding to its
    record while another stage writes the manifest is safe.
    """

    final_dir: Path
    dir: Path
    manifest: dict[str, Any] = field(default_factory=dict)
    stage_hooks: list[StageHook] = field(default_factory=list)
    #: ``time.perf_counter()`` when the run started: stage start and end times count from it.
    started: float = field(default_factory=time.perf_counter)
    #: ``time.time()`` at the same moment: Dask's task times are epoch times.
    started_epoch: float = field(default_factory=time.time)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _closed: bool = field(default=False, repr=False)

    @contextmanager
    def stage(self, name: str, log: Callable[[str], Any] | None = None
              ) -> Iterator[dict[str, Any]]:
        """Time a stage; its status, times and details go to ``manifest["stages"][name]``.

        The manifest is written when the stage starts (``status: running``) and when it ends
        (``done``, ``failed`` or ``interrupted``). The record keeps ``start`` and ``end``
        (seconds since the run started) and ``seconds`` (wall time). Log lines the calling
        thread writes within are tagged with ``name``.
        """
        log = log or logger.info
        start = time.perf_counter()
        record: dict[str, Any] = {"status": "running",
                                  "start": round(start - self.started, 3)}
        with self._lock:
            self.manifest.setdefault("stages", {})[name] = record
        with stage_label(name):
            self.write_manifest()
            log("started")
            try:
                with ExitStack() as hooks:
                    for hook in self.stage_hooks:
                        hooks.enter_context(hook(name, record))
                    yield record
            except BaseException as error:
                record["status"] = ("interrupted" if isinstance(error, KeyboardInterrupt)
                                    else "failed")
                raise
            finally:
                end = time.perf_counter()
                record.update(end=round(end - self.started, 3), seconds=round(end - start, 3))
                self.write_manifest()
            record["status"] = "done"
            self.write_manifest()
            log(done_message(record))

    def write_manifest(self, final: bool = False) -> Path:
        """Write ``manifest.json`` atomically (temporary file then rename).

        After the ``final`` write (the run's end) nothing more is written: a stage thread
        still unwinding after another stage failed cannot touch a directory that has been
        renamed or removed.
        """
        path = self.dir / runfiles.MANIFEST
        with self._lock:
            if self._closed:
                return path
            self._closed = final
            text = json.dumps(_snapshot(self.manifest), indent=2, default=str)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(text + "\n")
            tmp.replace(path)
        return path


def _snapshot(manifest: dict[str, Any]) -> dict[str, Any]:
    """A copy of the manifest's top level and stage records, each taken in one step.

    ``dict(d)`` copies without running Python code, so no other thread changes ``d`` midway;
    serialising the copy cannot see a record grow. (Nested values are replaced whole by the
    stages, never changed in place.)
    """
    copy = dict(manifest)
    if "stages" in copy:
        copy["stages"] = {name: dict(record) for name, record in dict(copy["stages"]).items()}
    return copy


@contextmanager
def open_run(output_dir: Path, run_name: str, manifest: dict[str, Any]) -> Iterator[Run]:
    """Create the temporary run directory; rename it to its final name on success.

    Raises ``FileExistsError`` if a finished run of that name exists already.
    """
    output_dir = Path(output_dir)
    final_dir = output_dir / run_name
    if final_dir.exists():
        raise FileExistsError(f"{final_dir}: a run of that name exists already")
    tmp_dir = output_dir / f".{run_name}.incomplete"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir(parents=True)
    run = Run(final_dir=final_dir, dir=tmp_dir, manifest=manifest)
    started = run.started
    manifest.update(
        run_name=run_name,
        status="running",
        started_utc=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        command=sys.argv,
        versions=package_versions(),
    )
    run.write_manifest()
    try:
        yield run
    except KeyboardInterrupt:
        manifest.update(status="interrupted", seconds=round(time.perf_counter() - started, 3))
        run.write_manifest(final=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    except BaseException as error:
        manifest.update(status="failed", error=f"{type(error).__name__}: {error}",
                        seconds=round(time.perf_counter() - started, 3))
        run.write_manifest(final=True)
        failed = output_dir / f"{run_name}.failed"
        if failed.exists():
            shutil.rmtree(failed)
        tmp_dir.rename(failed)
        raise
    manifest.update(status="succeeded", seconds=round(time.perf_counter() - started, 3),
                    finished_utc=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    run.write_manifest(final=True)
    tmp_dir.rename(final_dir)
    run.dir = final_dir
