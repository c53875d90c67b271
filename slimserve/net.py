"""Small networking helpers shared by the benchmarks, the reliability runs and the tests."""

from __future__ import annotations

import contextlib
import fcntl
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (for a server about to be started there).

    Another process may take it before the server binds; callers start their server at once.
    """
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_from(start: int, host: str = "0.0.0.0", tries: int = 200) -> int:
    """The first port at or above `start` that is free on `host` right now.

    For a server's fixed side ports: starting at the usual port keeps it when it is free, and
    staying below the kernel's ephemeral range (32768 and up on Linux) keeps clear of the ports
    that outgoing connections and other servers' `free_port()` are handed meanwhile.
    """
    for port in range(start, start + tries):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port in {start}-{start + tries - 1} on {host}")


@contextlib.contextmanager
def machine_lock(name: str) -> Iterator[None]:
    """Hold an exclusive lock named `name`, shared by every process on this machine.

    Choosing free ports and binding them are two steps: two servers starting at once would
    pick the same "free" port. Holding this lock from choosing a server's ports until it has
    bound them makes such starts take turns. The lock is a `flock` on a file in the temp
    folder, released when the block ends or the process dies; a second holder waits.
    """
    path = Path(tempfile.gettempdir()) / f"{name}.lock"
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
