"""Headless Chromium driven over the DevTools protocol, for tests of the HTML pages we write.

A real browser loads the page; the tests see what a reader would: console errors, uncaught
exceptions, resources that failed to load, images that did not decode, and a screenshot.
The DevTools websocket is spoken with tornado's client (a dependency of distributed).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tornado.websocket import websocket_connect

#: Flags for a quiet, offline, throw-away browser (no sandbox: CI runs as root in a container).
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
]


def find_chromium() -> str | None:
    """Path of Debian's ``chromium`` (``make browser`` installs it), or None."""
    return shutil.which("chromium")


@dataclass
class PageLoad:
    """What the browser reported while loading a page.

    Attributes
    ----------
    errors : list of str
        Uncaught exceptions, ``console.error`` calls and error log entries (e.g. a resource
        that failed to load).
    result : Any
        The value of the expression evaluated after the load event.
    print_result : Any
        The same expression's value with print media emulated (None when not asked).
    pdf_bytes : int
        Size of the page printed to PDF (0 when not asked).
    """

    errors: list[str] = field(default_factory=list)
    result: Any = None
    print_result: Any = None
    pdf_bytes: int = 0


def _event_error(event: dict[str, Any]) -> str | None:
    method, params = event.get("method"), event.get("params", {})
    if method == "Runtime.exceptionThrown":
        details = params.get("exceptionDetails", {})
        return f"exception: {details.get('exception', {}).get('description') or details}"
    if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
        return "console.error: " + " ".join(str(a.get("value", a.get("description")))
                                            for a in params.get("args", []))
    if method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
        entry = params["entry"]
        return f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".strip()
    return None


async def _drive(ws_url: str, url: str, expression: str, screenshot: Path | None,
                 width: int, height: int, print_expression: str | None, timeout: float
                 ) -> PageLoad:
    conn = await websocket_connect(ws_url, max_message_size=512 * 2**20)
    ids = itertools.count(1)
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout

    async def receive() -> dict[str, Any]:
        message = await asyncio.wait_for(conn.read_message(), deadline - time.monotonic())
        if message is None:
            raise RuntimeError("the DevTools connection closed")
        return json.loads(message)

    async def call(method: str, **params: Any) -> dict[str, Any]:
        call_id = next(ids)
        await conn.write_message(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = await receive()
            if "method" in message:
                events.append(message)
            elif message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    try:
        for domain in ("Runtime", "Log", "Page"):
            await call(f"{domain}.enable")
        await call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                   deviceScaleFactor=1, mobile=False)
        await call("Page.navigate", url=url)
        while not any(e.get("method") == "Page.loadEventFired" for e in events):
            message = await receive()
            if "method" in message:
                events.append(message)
        load = PageLoad()
        evaluated = await call("Runtime.evaluate", expression=expression, returnByValue=True,
                               awaitPromise=True)
        if "exceptionDetails" in evaluated:
            raise RuntimeError(f"the check expression failed: {evaluated['exceptionDetails']}")
        load.result = evaluated["result"].get("value")
        if screenshot is not None:
            shot = await call("Page.captureScreenshot", format="png")
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        if print_expression is not None:
            await call("Emulation.setEmulatedMedia", media="print")
            printed = await call("Runtime.evaluate", expression=print_expression,
                                 returnByValue=True)
            load.print_result = printed["result"].get("value")
            await call("Emulation.setEmulatedMedia", media="")
            pdf = await call("Page.printToPDF", printBackground=False)
            load.pdf_bytes = len(base64.b64decode(pdf["data"]))
        # Let late errors (e.g. from timers) arrive, then collect every error seen.
        await call("Runtime.evaluate", expression="new Promise(r => setTimeout(r, 200))",
                   awaitPromise=True)
        load.errors = [e for e in map(_event_error, events) if e]
        return load
    finally:
        conn.close()


def load_page(path: Path, expression: str, screenshot: Path | None = None, width: int = 1280,
              height: int = 2000, print_expression: str | None = None,
              timeout: float = 120) -> PageLoad:
    """Open ``path`` in headless Chromium, evaluate ``expression`` after the load event.

    ``expression`` may return a promise; its value comes back as JSON. With ``screenshot``,
    the ``width`` x ``height`` viewport is saved as PNG there.
    """
    chromium = find_chromium()
    if chromium is None:
        raise RuntimeError("chromium is not installed and could not be installed")
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        log = Path(profile) / "stderr.log"
        with log.open("wb") as stderr:
            process = subprocess.Popen(
                [chromium, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                 f"--window-size={width},{height}", "about:blank"],
                stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + 60
            while not (port_file.exists() and port_file.read_text().strip()):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"chromium did not start: {log.read_text()[-2000:]}")
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                targets = json.load(r)
            page = next(t for t in targets if t.get("type") == "page")
            return asyncio.run(_drive(page["webSocketDebuggerUrl"], Path(path).resolve().as_uri(),
                                      expression, screenshot, width, height, print_expression,
                                      timeout))
        finally:
            # Its own session: stopping the group also stops its renderer and zygote children.
            _signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
