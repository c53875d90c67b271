"""The channel-cut, pre-auth flood and restart phases of `make reliability`, without Serve:
how a stream's frames are recorded, the targets' arithmetic, the flood against a local
socket server, and the restart sequence with a stand-in for `serve run`."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
import yaml

from reliability import channel_cut, preauth, restart
from reliability.load import Outcome, Tally, stream
from slimserve.net import free_port

DELTA = 'data: {"choices": [{"text": "x"}]}\n\n'
ERROR = 'data: {"error": {"message": "the replica serving this stream was lost", "code": 503}}\n\n'
DONE = "data: [DONE]\n\n"


def _stream_outcome(status: int, parts: list[str], broken: bool = False) -> Outcome:
    async def body():
        for part in parts:
            yield part.encode()
        if broken:
            raise httpx.RemoteProtocolError("peer closed connection")

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body(), headers={"retry-after": "1"})

    async def go() -> Outcome:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await stream(client, "http://x/v1/completions", {}, time.monotonic())

    return asyncio.run(go())


@pytest.mark.timeout(20)
def test_a_stream_records_its_frames_the_error_event_and_done():
    ok = _stream_outcome(200, [DELTA, DELTA, DONE])
    assert (ok.result, ok.frames, ok.error_event, ok.done) == ("ok", 2, False, True)
    mid = _stream_outcome(200, [DELTA, ERROR, DONE])
    assert (mid.result, mid.frames, mid.error_event, mid.done) == ("failed", 1, True, True)
    assert mid.mid_stream and mid.status == 503
    cut = _stream_outcome(200, [DELTA, DELTA], broken=True)
    assert (cut.result, cut.frames, cut.done) == ("lost", 2, False)
    unfinished = _stream_outcome(200, [DELTA])
    assert (unfinished.result, unfinished.detail) == ("lost", "no [DONE]")
    refused = _stream_outcome(503, ['{"error": {"message": "server overloaded"}}'])
    assert (refused.result, refused.frames, refused.retry_after) == ("failed", 0, "1")


def _outcome(kind: str, result: str, frames: int = 0, error=False, done=False) -> Outcome:
    return Outcome(kind, 0.0, 0.1, result, 200, frames=frames, error_event=error, done=done)


@pytest.mark.timeout(10)
def test_channel_cut_row_and_targets():
    tally = Tally(
        [
            _outcome("plain", "ok"),
            _outcome("stream", "ok", 3, done=True),
            _outcome("stream", "failed", 2, error=True, done=True),
        ]
    )
    tally.outcomes[1].start, tally.outcomes[2].start = 4.9, 9.0  # each 0.1 s long
    r = channel_cut.row(tally, [(5.0, 2), (10.0, 2), (15.0, 0)], rate=20.0, seconds=20.0)
    assert (r["cuts"], r["connections_cut"], r["sent"], r["ok"]) == (3, 4, 3, 2)
    assert r["streams_under_way_at_a_cut"] == 1
    assert r["stream_failed_after_first_frame"] == r["of_which_error_event_and_done"] == 1
    assert all(channel_cut.verdicts(r).values())

    early = Outcome("stream", 0.0, 0.1, "failed", 503)  # refused before its first frame
    lost = _outcome("stream", "lost", 4)
    r = channel_cut.row(Tally([early, lost, _outcome("plain", "failed")]), [], 20.0, 20.0)
    assert r["stream_failed_before_first_frame"] == 1 and r["stream_lost_after_first_frame"] == 1
    missed = {k for k, v in channel_cut.verdicts(r).items() if not v}
    assert missed == {
        "channel cut: connections were cut",
        "channel cut: 0 lost",
        "channel cut: 0 failed non-streamed",
        "channel cut: 0 streams failed before their first frame",
    }


@pytest.mark.timeout(10)
def test_cuts_are_spread_over_the_load_and_never_in_its_last_second():
    assert channel_cut.cut_times(20.0, 5.0) == [5.0, 10.0, 15.0]
    assert channel_cut.cut_times(10.0, 3.0) == [3.0, 6.0]
    assert channel_cut.cut_times(3.0, 5.0) == [1.5]


@pytest.mark.timeout(10)
def test_the_flood_refuses_any_address_outside_loopback():
    assert preauth.loopback("127.0.0.1") and preauth.loopback("127.0.0.9")
    assert not preauth.loopback("192.0.2.2") and not preauth.loopback("localhost")
    with pytest.raises(ValueError, match="not a 127.0.0.x"):
        asyncio.run(preauth.flood_inbox("10.0.0.1:9", 1, 0, 1.0, 1.0))


async def _flood_against(limit: int | None, idle_s: float | None, **flood) -> tuple:
    """A stand-in inbox on 127.0.0.1: closes a connection after `limit` bytes or `idle_s`
    seconds (None: never); counts the connections it saw end."""
    ended = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal ended
        got = 0
        try:
            async with asyncio.timeout(idle_s):
                while chunk := await reader.read(65536):
                    got += len(chunk)
                    if limit is not None and got > limit:
                        break
        except TimeoutError:
            pass
        writer.close()
        ended += 1

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    result = await preauth.flood_inbox(f"127.0.0.1:{port}", **flood)
    for _ in range(100):  # the server's side notices the closes a moment later
        if ended == result.opened:
            break
        await asyncio.sleep(0.05)
    server.close()
    return result, ended


@pytest.mark.timeout(30)
def test_the_flood_against_an_inbox_that_cuts_strangers_off():
    flood, ended = asyncio.run(
        _flood_against(64 << 10, 0.5, connections=10, senders=3, send_mib=32.0, seconds=10.0)
    )
    assert (flood.opened, flood.refused, flood.senders) == (10, 0, 3)
    assert flood.closed_by_inbox == 10 and flood.senders_cut_short == 3
    assert flood.sent_mib < 96.0 and flood.seconds < 5.0  # it did not wait out its 10 s
    assert ended == 10


@pytest.mark.timeout(30)
def test_the_flood_against_an_inbox_that_buffers_everything_closes_every_socket():
    flood, ended = asyncio.run(
        _flood_against(None, None, connections=8, senders=2, send_mib=1.0, seconds=1.5)
    )
    assert (flood.opened, flood.senders, flood.senders_cut_short) == (8, 2, 0)
    assert flood.closed_by_inbox == 0 and flood.sent_mib == 2.0
    assert ended == 8  # every socket was closed at the end


@pytest.mark.timeout(20)
def test_the_rss_sampler_sees_a_peak():
    with preauth.Peak(os.getpid()) as peak:
        start = peak.peak
        block = bytearray(os.urandom(1 << 20) * 64)  # 64 MiB, touched
        time.sleep(0.4)
        del block
    assert peak.peak - start > 50


@pytest.mark.timeout(10)
def test_preauth_targets():
    row = {
        "inbox": "127.0.0.1:5",
        "rss_growth_mib": 12.0,
        "p99_without_ms": 80.0,
        "p99_with_flood_ms": 110.0,
        "light_failed_or_lost": 0,
        "stream_ok_after": True,
        "inbox_after": "127.0.0.1:5",
    }
    assert all(preauth.verdicts(row).values())
    bad = {**row, "rss_growth_mib": 60.0, "p99_with_flood_ms": 130.0, "inbox_after": None}
    assert sum(not v for v in preauth.verdicts(bad).values()) == 3
    assert preauth.verdicts({"skipped": "x"}) == {
        "preauth flood: ran against a 127.0.0.x inbox": False
    }


@pytest.mark.timeout(10)
def test_restart_reads_serves_fixed_ports_and_sees_one_held():
    assert restart.ports(restart.SERVE_CONFIG) == [8000, 8404, 9101, 8500, 9500]
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert restart.held(port)
    assert not restart.held(port)


@pytest.mark.timeout(10)
def test_restart_uses_serve_config_or_a_copy_with_the_runs_artifacts(tmp_path):
    default = restart.ROOT / "artifacts"
    assert restart.config_for(default, default) == (restart.SERVE_CONFIG, None)
    path, note = restart.config_for(tmp_path, default)
    args = yaml.safe_load(path.read_text())["applications"][0]["args"]
    assert args["artifacts_dir"] == str(tmp_path.resolve()) and note
    assert Path(args["config"]).is_absolute() and Path(args["config"]).exists()


FAKE_SERVE = textwrap.dedent(
    """
    import json, sys, subprocess
    from http.server import BaseHTTPRequestHandler, HTTPServer
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # a child
    class H(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["content-length"]))
            body = json.dumps({"choices": [{"text": "hi"}]}).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
    """
)


def _fake_config(tmp_path: Path) -> Path:
    config = tmp_path / "serve_config.yaml"
    env = {k: str(free_port()) for k in restart.SIDE_PORTS}
    data = {
        "http_options": {"port": free_port()},
        "controller_options": {"runtime_env": {"env_vars": env}},
    }
    config.write_text(yaml.safe_dump(data))
    return config


def _group_gone(pgid: int, timeout_s: float = 10.0) -> bool:
    """No live process (zombies aside: init reaps them when it gets to it) in the group."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = []
        for proc in psutil.process_iter(["status"]):
            try:
                if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                    alive.append(proc.pid)
            except ProcessLookupError:
                pass
        if not alive:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.timeout(60)
def test_restart_sequence_with_a_stand_in_for_serve_run(tmp_path, monkeypatch):
    """Start, SIGKILL the process group (its child too), start again; all gone after."""
    script = tmp_path / "fake_serve.py"
    script.write_text(FAKE_SERVE)
    config = _fake_config(tmp_path)
    port = restart.ports(config)[0]
    command = [sys.executable, str(script), str(port)]
    cleared = [sys.executable, "-c", "print('preflight: stopped a stale HAProxy (pid 7)')"]
    monkeypatch.setattr(restart, "first_command", lambda _c: command)
    monkeypatch.setattr(restart, "preflight_command", lambda _c: cleared)
    monkeypatch.setattr(restart, "ray_stop", lambda: "stopped")  # never the machine's Ray
    monkeypatch.setattr(restart, "pgrep", lambda *_a, **_k: [])  # nor anyone's HAProxy
    started: list[restart.Started] = []
    real_start = restart.Started.start

    def start(command, log, t0=None):
        started.append(real_start(command, log, t0))
        return started[-1]

    monkeypatch.setattr(restart.Started, "start", start)
    row = restart.restart_run(config, "student", tmp_path)
    assert row["first_start_s"] is not None and row["restart_s"] < 30
    assert row["stale_haproxy"] == "none" and row["ports_held_after_crash"] == "none"
    assert row["preflight"] == "preflight: stopped a stale HAProxy (pid 7)"
    assert all(restart.verdicts(row).values())
    assert len(started) == 2 and all(s.proc.poll() is not None for s in started)
    for s in started:  # the whole process group is gone, the sleeping child included
        assert _group_gone(s.proc.pid)
    assert not restart.held(port)


@pytest.mark.timeout(60)
def test_a_restart_refused_with_one_line_names_the_blocker(tmp_path, monkeypatch):
    script = tmp_path / "fake_serve.py"
    script.write_text(FAKE_SERVE)
    config = _fake_config(tmp_path)
    port = restart.ports(config)[0]
    refuse = [sys.executable, "-c", "raise SystemExit('preflight: port 8000 is held by nginx')"]
    monkeypatch.setattr(
        restart, "first_command", lambda _c: [sys.executable, str(script), str(port)]
    )
    monkeypatch.setattr(restart, "preflight_command", lambda _c: refuse)
    monkeypatch.setattr(restart, "ray_stop", lambda: "stopped")
    monkeypatch.setattr(restart, "pgrep", lambda *_a, **_k: [])
    row = restart.restart_run(config, "student", tmp_path)
    assert "restart_s" not in row and row["preflight_exit"] == 1
    assert row["blocker"] == "preflight: port 8000 is held by nginx"
    assert all(restart.verdicts(row).values())
    two_lines = {**row, "blocker": "a | b", "blocker_lines": 2}
    assert not all(restart.verdicts(two_lines).values())
    assert json.dumps(row)  # the report can hold it


@pytest.mark.timeout(10)
def test_a_failed_start_is_summed_up_by_its_exception_line(tmp_path):
    log = tmp_path / "serve.log"
    log.write_text(
        "\x1b[36m(ServeController pid=1)\x1b[0m INFO starting\n"
        "Traceback (most recent call last):\n  File x, line 1\n"
        "ray.exceptions.ActorDiedError: The actor died unexpectedly.\n"
        "\x1b[36m(ServeController pid=1)\x1b[0m INFO Proxy on node 1 is unhealthy.\n"
    )
    started = restart.Started(None, log, 0.0)  # type: ignore[arg-type]
    assert started.last_line() == "ray.exceptions.ActorDiedError: The actor died unexpectedly."
    log.write_text("INFO a\n\x1b[33mstill going\x1b[0m\n\n")
    assert started.last_line() == "still going"
