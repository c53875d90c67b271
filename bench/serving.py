"""Closed-loop HTTP load generator for `/v1/completions`: slimserve's ingress or the baseline.

Closed loop (as vLLM's and TGI's benchmarks run it at a fixed concurrency): C clients each send
a request, wait for the whole answer, and send the next, until `requests` have been sent; so
the server always holds C requests, and req/s is what it sustains at that concurrency. The
prompts cycle through a fixed list, every request asks for the same `max_tokens`, greedy.

Per request it records the client-side view, which is what a user sees through every hop:

* `e2e` — from sending the request to the last byte;
* `ttft` — streamed only: to the first SSE frame that carries generated text;
* `tpot` — streamed only: (e2e - ttft) / (output tokens - 1);
* output tokens — the `usage` the server reports (`stream_options.include_usage` for streams).

aiohttp, not httpx: the generator shares the 2 cores with the server it measures, and aiohttp
parses a streamed response with several times less CPU per frame, so less of the machine goes
to the measuring side (both servers pay the same client cost either way).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.engine_bench import PROMPTS
from slimserve.protocol import SSEDecoder
from slimserve.stats import percentile


@dataclass
class RequestResult:
    """One request as the client saw it."""

    ok: bool
    e2e_s: float
    output_tokens: int = 0
    ttft_s: float | None = None
    frames: int = 0  # SSE frames that carried text (streamed only)
    error: str | None = None
    server_e2e_s: float | None = None  # the server's own e2e (slimserve's `timings`), if given

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass
class LevelResult:
    """Every request of one (concurrency, streamed) level and the wall time they took."""

    concurrency: int
    stream: bool
    wall_s: float
    results: list[RequestResult] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)  # role -> CPU seconds (CpuMeter)
    own: frozenset[str] | None = None  # the server's own roles (None: all but "client")
    rounds_tok_s: list[float] = field(default_factory=list)  # every round's, when kept as median
    rounds_failed: list[int] = field(default_factory=list)  # failed requests, per round

    def row(self) -> dict[str, Any]:
        """The figures every slimserve benchmark prints (DESIGN.md), latencies in ms."""
        ok = [r for r in self.results if r.ok]
        tokens = sum(r.output_tokens for r in ok)
        ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
        tpot = [t for t in (r.tpot_s for r in ok) if t is not None]
        e2e = [r.e2e_s for r in ok]
        frames = sum(r.frames for r in ok)
        hops = [r.e2e_s - r.server_e2e_s for r in ok if r.server_e2e_s is not None]
        return {
            "concurrency": self.concurrency,
            "stream": self.stream,
            "ok": len(ok),
            "failed": len(self.results) - len(ok),
            "req_s": _r(len(ok) / self.wall_s),
            "out_tok_s": _r(self.tok_s()),
            "ttft_p50_ms": _ms(percentile(ttft, 50)),
            "ttft_p99_ms": _ms(percentile(ttft, 99)),
            "tpot_p50_ms": _ms(percentile(tpot, 50)),
            "tpot_p99_ms": _ms(percentile(tpot, 99)),
            "e2e_p50_ms": _ms(percentile(e2e, 50)),
            "e2e_p99_ms": _ms(percentile(e2e, 99)),
            "tokens_per_req": _r(statistics.mean(r.output_tokens for r in ok)) if ok else None,
            "tokens_per_frame": _r(tokens / frames) if self.stream and frames else None,
            "hop_ms_p50": _ms(percentile(hops, 50)),
            "cpu_ms_per_token": _r(self.own_cpu_s() * 1000 / tokens)
            if self.cpu_s and tokens
            else None,
            "errors": "; ".join(self.errors()) or None,
            **({"rounds_tok_s": self.rounds_tok_s} if self.rounds_tok_s else {}),
            **({"rounds_failed": self.rounds_failed} if any(self.rounds_failed) else {}),
        }

    def tok_s(self) -> float:
        """Output tokens per second of the requests that succeeded."""
        return sum(r.output_tokens for r in self.results if r.ok) / self.wall_s

    def own_cpu_s(self) -> float:
        """CPU seconds of the measured server's own processes during the level."""
        if self.own is not None:
            return sum(v for k, v in self.cpu_s.items() if k in self.own)
        return sum(v for k, v in self.cpu_s.items() if k != "client")

    def cpu_rows(self) -> list[dict[str, Any]]:
        """CPU ms per output token, one row per process role (the cost of each hop)."""
        tokens = sum(r.output_tokens for r in self.results if r.ok)
        return [
            {
                "stream": self.stream,
                "concurrency": self.concurrency,
                "role": role,
                "cpu_ms_per_token": _r(sec * 1000 / tokens) if tokens else None,
                "cpu_share": _r(sec / self.wall_s),
            }
            for role, sec in sorted(self.cpu_s.items(), key=lambda kv: -kv[1])
        ]

    def errors(self) -> list[str]:
        return sorted({r.error for r in self.results if r.error})


def _r(x: float) -> float:
    return round(x, 2)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 1)


def _body(model: str, prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def _one(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], timeout_s: float
) -> RequestResult:
    """Send one request; never raises (a failure is a result with `ok=False`)."""
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(url, json=body) as resp:
                if resp.status != 200:
                    text = (await resp.text())[:80]
                    return RequestResult(
                        False, time.perf_counter() - t0, error=f"HTTP {resp.status}: {text}"
                    )
                if not body["stream"]:
                    data = await resp.json()
                    tokens = int(data["usage"]["completion_tokens"])
                    server = (data.get("timings") or {}).get("e2e_s")
                    e2e = time.perf_counter() - t0
                    return RequestResult(True, e2e, tokens, server_e2e_s=server)
                return await _read_stream(resp, t0)
    except TimeoutError:
        return RequestResult(False, time.perf_counter() - t0, error="client timeout")
    except (aiohttp.ClientError, ValueError, KeyError) as exc:
        return RequestResult(False, time.perf_counter() - t0, error=type(exc).__name__)


async def _read_stream(resp: aiohttp.ClientResponse, t0: float) -> RequestResult:
    """Parse SSE frames: TTFT at the first text, tokens from the usage frame, then [DONE]."""
    ttft = None
    frames = 0
    tokens: int | None = None
    done = False
    decoder = SSEDecoder()
    async for raw in resp.content:
        payload = decoder.feed(raw.decode().rstrip("\r\n"))
        if payload is None:
            continue
        if payload == "[DONE]":
            done = True
            break
        event = json.loads(payload)
        if "error" in event:
            return RequestResult(False, time.perf_counter() - t0, error="error frame")
        if event.get("usage"):
            tokens = int(event["usage"]["completion_tokens"])
        for choice in event.get("choices") or ():
            if choice.get("text"):
                frames += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    e2e = time.perf_counter() - t0
    if not done or tokens is None:
        return RequestResult(False, e2e, error="stream ended without usage and [DONE]")
    return RequestResult(True, e2e, tokens, ttft if ttft is not None else e2e, frames)


async def run_level(
    base_url: str,
    *,
    model: str,
    concurrency: int,
    requests: int,
    stream: bool,
    max_tokens: int = 64,
    prompts: Sequence[str] = PROMPTS,
    warmup: int = 1,
    timeout_s: float = 300.0,
    meter: CpuMeter | None = None,
    force_close: bool = False,
) -> LevelResult:
    """`requests` requests from `concurrency` closed-loop clients (after `warmup` per client).

    The warm-up round (one request per client, at the same concurrency) opens the connections
    and lets the server reach its steady state; it is not counted. `force_close`: a new
    connection per request, for a server that closes a kept-alive connection after a stream.
    """
    if concurrency < 1 or requests < 1 or max_tokens < 1:
        raise ValueError("concurrency, requests and max_tokens must be >= 1")
    url = base_url.rstrip("/") + "/v1/completions"
    conn = aiohttp.TCPConnector(limit=concurrency, force_close=force_close)
    async with aiohttp.ClientSession(connector=conn) as session:

        def body(i: int) -> dict[str, Any]:
            return _body(model, prompts[i % len(prompts)], max_tokens, stream)

        if warmup:
            await asyncio.gather(
                *(_one(session, url, body(i), timeout_s) for i in range(concurrency * warmup))
            )
        counter = iter(range(requests))
        results: list[RequestResult] = []

        async def client() -> None:
            for i in counter:  # shared iterator: each request index is taken once
                results.append(await _one(session, url, body(i), timeout_s))

        before = meter.snapshot() if meter else {}
        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        cpu = CpuMeter.delta(before, meter.snapshot()) if meter else {}
    return LevelResult(concurrency, stream, wall, results, cpu)


def run_levels(
    servers: dict[str, str],
    *,
    model: str,
    concurrencies: Sequence[int] = (1, 4, 16, 32),
    streams: Sequence[bool] = (False, True),
    requests_per_client: int = 4,
    min_requests: int = 16,
    max_tokens: int = 64,
    timeout_s: float = 300.0,
    meter: CpuMeter | None = None,
    own: dict[str, frozenset[str]] | None = None,
    force_close: bool = False,
) -> dict[str, list[LevelResult]]:
    """Every (concurrency, stream) level against every server (label -> base URL), in turns.

    The servers take turns level by level (all of one level, then the next), never running
    together, and a concurrency's streamed levels follow its non-streamed ones at once: on a
    machine whose speed drifts, each pair of figures compared in a ratio (two servers at one
    level, or one server streamed vs not) is measured minutes apart at most, not a whole
    phase apart. Each level sends
    max(min_requests, requests_per_client × concurrency) requests. `own` names a server's own
    process roles for its `cpu_ms_per_token`; a server not in it owns every role that no other
    server claims, except the client.
    Returns label -> levels (rows: `LevelResult.row()`).
    """
    out: dict[str, list[LevelResult]] = {label: [] for label in servers}
    for conc in concurrencies:
        for stream in streams:
            n = max(min_requests, requests_per_client * conc)
            for label, url in servers.items():
                level = asyncio.run(
                    run_level(
                        url,
                        model=model,
                        concurrency=conc,
                        requests=n,
                        stream=stream,
                        max_tokens=max_tokens,
                        timeout_s=timeout_s,
                        meter=meter,
                        force_close=force_close,
                    )
                )
                claimed = frozenset().union(*(own or {}).values(), {"client"})
                level.own = (own or {}).get(label) or frozenset(level.cpu_s) - claimed
                print(_line(label, level.row()), flush=True)
                out[label].append(level)
    return out


def median_level(runs: Sequence[LevelResult]) -> LevelResult:
    """The run of a level with the median output tokens/s (the lower middle one of an even
    count), carrying every run's tokens/s in `rounds_tok_s` when there was more than one.

    A whole run is kept, not a median per column: its latencies, CPU per token and failures
    belong together. A run with failed requests counts as slower than any without, and every
    run's failures stay in `rounds_failed`.
    """
    if not runs:
        raise ValueError("no runs to take the median of")
    tok_s = [lv.tok_s() for lv in runs]
    failed = [sum(not r.ok for r in lv.results) for lv in runs]
    order = sorted(range(len(runs)), key=lambda i: (failed[i] == 0, tok_s[i]))
    kept = runs[order[(len(runs) - 1) // 2]]
    if len(runs) > 1:
        kept.rounds_tok_s = [_r(t) for t in tok_s]
        kept.rounds_failed = failed
    return kept


def _line(label: str, row: dict[str, Any]) -> str:
    mode = "stream" if row["stream"] else "json"
    return (
        f"{label:>9} {mode:>6} c={row['concurrency']:<3} ok={row['ok']:<4} fail={row['failed']:<3}"
        f" {row['req_s']:>7.2f} req/s {row['out_tok_s']:>8.1f} tok/s"
        f"  TTFT p50/p99 {row['ttft_p50_ms']}/{row['ttft_p99_ms']} ms"
        f"  E2E p50/p99 {row['e2e_p50_ms']}/{row['e2e_p99_ms']} ms"
    )


class CpuMeter:
    """CPU seconds used by each process role between two snapshots (user + system).

    Why: wall-clock figures on a shared 2-core machine move with the neighbours' load, but the
    CPU a hop burns per request or per token does not, so this is how the cost of each hop
    (proxy, ingress, model replica) is measured. Roles come from Ray's process titles
    (`ray::ProxyActor` and the `haproxy` it runs are both "proxy",
    `ray::ServeReplica:<app>:<deployment>`, ...) among this process's
    descendants, plus `extra` pids (e.g. the baseline server) and this process ("client").
    """

    def __init__(self, extra: dict[str, int] | None = None):
        self.extra = dict(extra or {})
        self._roles: dict[int, str] = {}  # pid -> role, fixed at first sight

    @staticmethod
    def role(title: str) -> str:
        """`ray::ServeReplica:app:Ingress.handle_request` -> `Ingress` (busy titles name the
        method being run, so it is cut off)."""
        if title.startswith("ray::ServeReplica:"):
            return title.rsplit(":", 1)[-1].split(".", 1)[0]
        name = title.removeprefix("ray::").split(".", 1)[0]
        roles = {"ProxyActor": "proxy", "haproxy": "proxy", "ServeController": "controller"}
        return roles.get(name, "ray other")

    def processes(self) -> list[tuple[str, Any]]:
        """(role, psutil.Process) for this process, the `extra` pids and Ray's descendants."""
        import psutil

        me = psutil.Process()
        procs = [("client", me)] + [(k, psutil.Process(pid)) for k, pid in self.extra.items()]
        extra_pids = set(self.extra.values())
        for child in me.children(recursive=True):
            if child.pid in extra_pids:
                continue
            try:
                role = self._roles.get(child.pid) or self.role(child.name() or "")
            except psutil.Error:
                continue
            self._roles[child.pid] = role
            procs.append((role, child))
        return procs

    def snapshot(self) -> dict[str, float]:
        import psutil

        out: dict[str, float] = {}
        for role, proc in self.processes():
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                out[role] = out.get(role, 0.0) + t.user + t.system
        return out

    def memory(self) -> dict[str, dict[str, float]]:
        """role -> resident memory now and at its peak (VmHWM), MiB, summed over its processes.

        A role's processes share pages (a forked worker, a memory-mapped weights file), so a
        sum over several processes can count a page more than once; a model replica is one
        process."""
        import psutil

        found: dict[str, list[int]] = {}  # role -> [rss bytes, peak bytes, processes]
        for role, proc in self.processes():
            with contextlib.suppress(psutil.Error, OSError):
                rss = proc.memory_info().rss
                row = found.setdefault(role, [0, 0, 0])
                row[0] += rss
                row[1] += _peak_rss(proc.pid, rss)
                row[2] += 1
        return {
            role: {
                "rss_mib": round(r / 2**20, 1),
                "peak_rss_mib": round(p / 2**20, 1),
                "processes": n,
            }
            for role, (r, p, n) in found.items()
        }

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {k: max(0.0, after[k] - before.get(k, 0.0)) for k in after}


def _peak_rss(pid: int, rss: int) -> int:
    """A process's peak resident set (Linux's VmHWM, bytes); `rss` where /proc does not say."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return rss
