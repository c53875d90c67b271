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
