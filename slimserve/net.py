"""Small networking helpers shared by the benchmarks, the reliability runs and the tests."""

from __future__ import annotations

import socket


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
