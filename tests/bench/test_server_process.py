"""The peers' child-process helper: readiness probe, start, and stop, on a real HTTP server."""

from __future__ import annotations

import sys

import pytest

from bench.server_process import answers, server_process, terminate
from slimserve.net import free_port

pytestmark = pytest.mark.timeout(60)


def test_a_child_server_is_started_probed_and_stopped(tmp_path):
    (tmp_path / "health").write_text("ok")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    assert not answers(f"{url}/health")  # nothing listens yet
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    with server_process(
        cmd,
        ready=lambda: answers(f"{url}/health"),
        exited=lambda rc: RuntimeError(f"exited {rc}"),
        timed_out=lambda: RuntimeError("timed out"),
        stop=terminate,
        log=tmp_path / "server.log",
        timeout_s=30,
        poll_s=0.1,
        cwd=tmp_path,
    ) as proc:
        assert answers(f"{url}/health")
        assert not answers(f"{url}/missing")  # a 404 is not ready
    assert proc.poll() is not None
    assert not answers(f"{url}/health")


def test_a_child_that_exits_first_raises_its_error(tmp_path):
    with (
        pytest.raises(RuntimeError, match="exited 3"),
        server_process(
            [sys.executable, "-c", "raise SystemExit(3)"],
            ready=lambda: False,
            exited=lambda rc: RuntimeError(f"exited {rc}"),
            timed_out=lambda: RuntimeError("timed out"),
            stop=terminate,
            timeout_s=30,
            poll_s=0.05,
        ),
    ):
        pass
