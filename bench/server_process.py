"""Start a server as a child process, wait until it answers, and stop it after.

The peers the race is run against (the Flask baseline, vLLM) are each a process of their own;
this is how both are started and stopped. Only what differs is passed in: the readiness probe,
the errors to raise, and how the process is stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def answers(url: str) -> bool:
    """Whether GET `url` returns 200 within 2 s (a readiness probe for `server_process`)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def server_process(
    cmd: list[str],
    *,
    ready: Callable[[], bool],
    exited: Callable[[int], Exception],
    timed_out: Callable[[], Exception],
    stop: Callable[[subprocess.Popen], None],
    log: Path | None = None,
    timeout_s: float,
    poll_s: float,
    **popen: Any,
) -> Iterator[subprocess.Popen]:
    """Run `cmd` (its output to `log`, or discarded) until `ready()`; yield the process.

    Raises `exited(returncode)` when it ends first, `timed_out()` after `timeout_s`; `stop`
    runs on the way out either way.
    """
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, **popen)
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if proc.poll() is not None:
                raise exited(proc.returncode)
            if time.monotonic() > deadline:
                raise timed_out()
            time.sleep(poll_s)
        yield proc
    finally:
        stop(proc)
        if log:
            out.close()  # type: ignore[union-attr]


def terminate(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the process, SIGKILL after `grace_s`."""
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop_group(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the process group (a server started with its own session, and its children),
    SIGKILL after `grace_s`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
