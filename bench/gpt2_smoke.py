"""`make smoke-gpt2`: the real GPT-2 profile, end to end, offline, on the CPU.

`configs/gpt2-smoke.yaml` is `configs/gpt2.yaml` with local stand-ins for the hub
(`bench.gpt2_standins`) and token budgets of a few thousand. This runner

1. makes the stand-ins (a 124M-shaped checkpoint, a 50,257-entry tokenizer, a WikiText-2-shaped
   dataset read through `hf:<folder>`);
2. builds every variant that can run here, one `slimserve.runner.build(only=variant)` per
   child process, sampling the process tree's memory (Ray's workers included) for its peak;
3. serves them with `serve_config.yaml` (its `config` arg pointed at the smoke profile) and
   sends each one completion, one streamed chat and, all together, one `/compare`; a prompt at
   the 1,024-position context limit must pass and one past it must be a 400;
4. opens the dashboard's Models page against that ingress (Streamlit's AppTest);
5. writes `reports/gpt2_smoke.{json,md}` (`slimserve.reports`, stamped with the commit).

Perplexities and agreements on random weights mean nothing; the run checks that every step
runs, fits in memory and gives finite figures, so the first real run (GPU + hub) fails on
nothing else.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/gpt2-smoke.yaml"
STANDINS = "artifacts/gpt2-hub"
REPORT_NAME = "gpt2_smoke"
MAX_TOKENS = 8  # per request: the point is that each path answers, not its speed
PROMPT = "The Python interpreter"


class TreeMemory:
    """Peak resident memory of a process and all its descendants, sampled every `period_s`."""

    def __init__(self, pid: int, period_s: float = 0.25) -> None:
        self.pid, self.period_s = pid, period_s
        self.peak = 0  # the tree's summed RSS
        self.peak_process = 0  # the largest single process (a training worker, a replica)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for p in procs:
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            self.peak_process = max(self.peak_process, rss)
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(self.period_s)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _mb(n: float | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def build_variant(config: str, variant: str, log_path: Path) -> dict[str, Any]:
    """`runner.build(only=variant)` in a child process; wall time, peak tree RSS, exit code."""
    code = (
        "import sys; from slimserve.catalogue import load_profile; "
        "from slimserve.runner import build; "
        f"build(load_profile({config!r}), only={variant!r})"
    )
    t0 = time.monotonic()
    with log_path.open("a") as out:
        out.write(f"\n===== build {variant} =====\n")
        out.flush()
        proc = subprocess.Popen(
            [sys.executable, "-c", code], cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT
        )
        with TreeMemory(proc.pid) as mem:
            rc = proc.wait()
    return {
        "rc": rc,
        "wall_s": round(time.monotonic() - t0, 1),
        "peak_rss_mb": _mb(mem.peak),
        "peak_process_rss_mb": _mb(mem.peak_process),
    }


def _parity(details: dict[str, Any]) -> dict[str, Any]:
    """The ONNX parity / int8 quality figures a manifest holds (whichever the step wrote)."""
    out: dict[str, Any] = {}
    parity = details.get("parity") or {}
    if parity:
        out["max_abs_logit_diff"] = parity.get("max_abs_logit_diff")
        out["greedy_identical"] = bool(
            parity.get("batch1_identical") and parity.get("padded_batch_identical")
        )
    quality = details.get("quality_vs_fp32") or {}
    for key in ("perplexity_ratio", "greedy_agreement", "top1_agreement"):
        if key in quality:
            out[f"int8_{key}"] = quality[key]
    if "size_ratio" in details:
        out["int8_size_ratio"] = details["size_ratio"]
    return out


def step_rows(profile, root: Path, measured: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per variant: how its build went and what its manifest says."""
    from slimserve.artifacts import ArtifactStore

    store = ArtifactStore(root, profile.name)
    rows = []
    for name, v in profile.variants.items():
        m = measured.get(name, {})
        man = store.manifest(name) if not m.get("skipped") else None
        row: dict[str, Any] = {
            "variant": name,
            "step": v.step,
            "status": m.get("skipped") or ("built" if man else f"failed (rc {m.get('rc')})"),
            "wall_s": m.get("wall_s"),
            "peak_rss_mb": m.get("peak_rss_mb"),
            "peak_process_rss_mb": m.get("peak_process_rss_mb"),
            "artifact_mb": _mb(man.bytes) if man else None,
            "params_total": man.params_total if man else None,
            "params_nonzero": man.params_nonzero if man else None,
            "perplexity": man.metrics.perplexity if man else None,
            "agreement": man.metrics.agreement if man else None,
        }
        if man:
            row.update(_parity(man.details))
        rows.append(row)
    return rows


def _post(url: str, path: str, body: dict[str, Any], timeout: float = 600) -> tuple[int, Any]:
    import httpx

    r = httpx.post(f"{url}{path}", json=body, timeout=timeout)
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, r.text


def _stream_chat(url: str, model: str) -> dict[str, Any]:
    import httpx

    body = {
        "model": model,
        "messages": [{"role": "user", "content": "What does len() return?"}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
    }
    t0, chunks, done, text = time.monotonic(), 0, False, ""
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        status = r.status_code
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                continue
            event = json.loads(data)
            for choice in event.get("choices", []):
                delta = choice.get("delta", {}).get("content")
                if delta:
                    chunks += 1
                    text += delta
    ok = status == 200 and done and chunks > 0
    return {"chat_stream_ok": ok, "chat_chunks": chunks, "chat_s": round(time.monotonic() - t0, 2)}


def probe_variant(url: str, model: str) -> dict[str, Any]:
    """One completion and one streamed chat; what came back and how long it took."""
    t0 = time.monotonic()
    status, body = _post(
        url,
        "/v1/completions",
        {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0},
    )
    usage = body.get("usage", {}) if isinstance(body, dict) else {}
    row: dict[str, Any] = {
        "completion_ok": status == 200 and usage.get("completion_tokens", 0) > 0,
        "completion_tokens": usage.get("completion_tokens"),
        "completion_s": round(time.monotonic() - t0, 2),
    }
    try:
        row.update(_stream_chat(url, model))
    except Exception as exc:  # a broken stream is a finding, not a crash of the whole run
        row.update(chat_stream_ok=False, chat_error=str(exc)[:200])
    return row


def context_limits(url: str, model: str, tokenizer_dir: Path) -> dict[str, Any]:
    """A prompt that fills the 1,024 positions with `max_tokens` must pass; one token more, 400."""
    from slimserve.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 200)
    fits = ids[: 1024 - MAX_TOKENS]
    body = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0}
    ok_status, _ = _post(url, "/v1/completions", {**body, "prompt": fits})
    over_status, over = _post(url, "/v1/completions", {**body, "prompt": ids[: len(fits) + 1]})
    param = over.get("error", {}).get("param") if isinstance(over, dict) else None
    return {
        "model": model,
        "prompt_tokens_at_limit": len(fits),
        "at_limit_status": ok_status,
        "over_limit_status": over_status,
        "over_limit_param": param,
    }


def models_page(url: str) -> dict[str, Any]:
    """The dashboard's Models page against the live ingress: exceptions and errors shown."""
    from streamlit.testing.v1 import AppTest

    os.environ["SLIMSERVE_URL"] = url
    t0 = time.monotonic()
    at = AppTest.from_file(str(PROJECT_ROOT / "dashboard" / "app.py"), default_timeout=120).run()
    at.switch_page("views/models.py").run()
    return {
        "exceptions": [str(e.value)[:200] for e in at.exception],
        "errors": [str(e.value)[:200] for e in at.error],
        "tables": len(at.dataframe) + len(at.table),
        "seconds": round(time.monotonic() - t0, 1),
    }


def serve_and_probe(
    serve_config: str, config: str, variants: list[str], tokenizer_dir: Path
) -> dict[str, Any]:
    """Start Serve on every built variant, measure start-up and memory, probe each variant."""
    from bench.run_all import start_serve

    out: dict[str, Any] = {"variants": {}}
    t0 = time.monotonic()
    with start_serve(serve_config, config=config, need=variants, timeout_s=900) as url:
        out["startup_s"] = round(time.monotonic() - t0, 1)
        out["memory_mb"] = _mb(TreeMemory(os.getpid()).sample())
        out["replica_rss_mb"] = replica_memory()
        for v in variants:
            out["variants"][v] = probe_variant(url, v)
        status, body = _post(
            url, "/compare", {"prompt": PROMPT, "models": variants, "max_tokens": MAX_TOKENS}
        )
        results = {r["model"]: r for r in body.get("results", [])} if status == 200 else {}
        out["compare_status"] = status
        for v in variants:
            r = results.get(v, {})
            out["variants"][v].update(
                compare_ok=bool(r) and not r.get("error") and r.get("completion_tokens", 0) > 0,
                compare_latency_s=r.get("latency_s"),
                compare_agreement=r.get("agreement"),
            )
        out["context"] = context_limits(url, "student", tokenizer_dir)
        out["dashboard_models"] = models_page(url)
        out["memory_after_mb"] = _mb(TreeMemory(os.getpid()).sample())
    return out


def replica_memory() -> dict[str, float]:
    """RSS per Serve replica (`ray::ServeReplica:<app>:<deployment>`, the process title Ray
    sets) among this process's descendants (the Ray started here, not others'), in MiB."""
    import psutil

    out: dict[str, float] = {}
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            title = (p.cmdline() or [""])[0]
            rss = p.memory_info().rss
        except psutil.Error:
            continue
        if title.startswith("ray::ServeReplica:"):
            name = title.split(":")[-1].split(".")[0].strip()
            out[name] = max(out.get(name, 0.0), _mb(rss) or 0.0)
    return out


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def problems_of(rows: list[dict[str, Any]], serving: dict[str, Any]) -> list[str]:
    """What the smoke run must not have: the list is empty when it passed."""
    bad = []
    for r in rows:
        if r["status"].startswith("skipped"):
            continue
        if r["status"] != "built":
            bad.append(f"{r['variant']}: {r['status']}")
            continue
        if not _finite(r["perplexity"]):
            bad.append(f"{r['variant']}: perplexity {r['perplexity']} is not finite")
        if r.get("max_abs_logit_diff") is not None and r["max_abs_logit_diff"] > 1e-3:
            bad.append(f"{r['variant']}: max |logit diff| {r['max_abs_logit_diff']} > 1e-3")
        if r.get("greedy_identical") is False:
            bad.append(f"{r['variant']}: greedy tokens differ from PyTorch")
        s = serving.get("variants", {}).get(r["variant"], {})
        for check in ("completion_ok", "chat_stream_ok", "compare_ok"):
            if not s.get(check):
                bad.append(f"{r['variant']}: {check} is {s.get(check)}")
    ctx = serving.get("context", {})
    if ctx and (ctx.get("at_limit_status") != 200 or ctx.get("over_limit_status") != 400):
        bad.append(f"context limit at 1,024 positions: {ctx}")
    page = serving.get("dashboard_models", {})
    if page.get("exceptions") or page.get("errors"):
        bad.append(f"dashboard Models page: {page}")
    return bad


def write(rows, serving, standins_s, total_s, problems, reports_dir: str) -> list[Path]:
    from slimserve.reports import Table, new_report, write_report

    serve_rows = [{"variant": v, **f} for v, f in serving.get("variants", {}).items()]
    for r in serve_rows:
        r["replica_rss_mb"] = serving.get("replica_rss_mb", {}).get(r["variant"])
    ctx = serving.get("context") or {}
    page = serving.get("dashboard_models") or {}
    summary = [
        {"figure": "total wall time (s)", "value": total_s},
        {"figure": "stand-ins made (s)", "value": standins_s},
        {"figure": "Serve start-up, every variant deployed (s)", "value": serving.get("startup_s")},
        {"figure": "Serve process tree RSS after start-up (MiB)", "value": serving.get("memory_mb")},
        {"figure": "Serve process tree RSS at the end (MiB)", "value": serving.get("memory_after_mb")},
        {"figure": "/compare HTTP status", "value": serving.get("compare_status")},
        {"figure": "prompt at the context limit (tokens)", "value": ctx.get("prompt_tokens_at_limit")},
        {"figure": "at the limit: HTTP status", "value": ctx.get("at_limit_status")},
        {"figure": "one token over: HTTP status", "value": ctx.get("over_limit_status")},
        {"figure": "dashboard Models page: exceptions + errors",
         "value": len(page.get("exceptions", [])) + len(page.get("errors", []))},
        {"figure": "problems", "value": len(problems)},
    ]  # fmt: skip
    notes = [
        "configs/gpt2-smoke.yaml = configs/gpt2.yaml with local stand-ins for the hub (random "
        "124M-shaped weights, a 50,257-entry BPE trained on python-docs, that text in "
        "WikiText-2's layout read through hf:<folder>) and a few thousand tokens per budget.",
        "Perplexity and agreement on random weights are meaningless: they are recorded to show "
        "every step ran and gave finite figures. TensorRT variants are skipped (no GPU).",
        "peak_rss_mb: the build's process tree summed (its Ray processes included; shared pages "
        "counted once per process), sampled every 0.25 s; peak_process_rss_mb: its largest "
        "single process.",
        *(f"PROBLEM: {p}" for p in problems),
    ]
    report = new_report(
        REPORT_NAME,
        kind="smoke",
        title="GPT-2 profile smoke run (124M-shaped, offline, CPU)",
        tables=[
            Table.from_records("build steps", rows),
            Table.from_records("serving (serve_config.yaml on the smoke profile)", serve_rows),
            Table.from_records("summary", summary),
        ],
        notes=notes,
        command="make smoke-gpt2",
    )
    return write_report(report, reports_dir, png=False)


def run_smoke(
    config: str = CONFIG,
    serve_config: str = "serve_config.yaml",
    reports_dir: str = "reports",
    standins: str = STANDINS,
) -> dict[str, Any]:
    """The whole smoke run; returns {"rows", "serving", "problems", "paths", "total_s"}."""
    from bench.gpt2_standins import ensure_standins
    from slimserve.artifacts import ArtifactStore
    from slimserve.catalogue import load_profile
    from slimserve.runner import plan

    t_start = time.monotonic()
    os.chdir(PROJECT_ROOT)  # the profile's paths are relative to the project root
    paths = ensure_standins(standins)
    standins_s = round(time.monotonic() - t_start, 1)
    profile = load_profile(config)
    store = ArtifactStore(profile.artifacts_root(), profile.name)
    log_path = profile.artifacts_root() / f"{profile.name}-build.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    measured: dict[str, dict[str, Any]] = {}
    for item in plan(profile, store):
        if item.action == "skip":
            measured[item.variant] = {"skipped": f"skipped: {item.reason}"}
            continue
        if item.action == "fresh":
            measured[item.variant] = {}
            print(f"smoke: {item.variant} is up to date", flush=True)
            continue
        print(f"smoke: building {item.variant} (log: {log_path})", flush=True)
        measured[item.variant] = m = build_variant(config, item.variant, log_path)
        print(f"smoke: {item.variant}: {m}", flush=True)
    rows = step_rows(profile, profile.artifacts_root(), measured)
    built = [r["variant"] for r in rows if r["status"] == "built"]
    serving: dict[str, Any] = {}
    if built:
        print(f"smoke: serving {', '.join(built)}", flush=True)
        serving = serve_and_probe(serve_config, config, built, paths["tokenizer"])
    total_s = round(time.monotonic() - t_start, 1)
    problems = problems_of(rows, serving)
    out_paths = write(rows, serving, standins_s, total_s, problems, reports_dir)
    print(f"smoke: {total_s:.0f}s, {len(problems)} problem(s); wrote {out_paths}", flush=True)
    for p in problems:
        print(f"smoke: PROBLEM {p}", flush=True)
    return {"rows": rows, "serving": serving, "problems": problems, "paths": out_paths,
            "total_s": total_s}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GPT-2 profile smoke run (offline, CPU)")
    parser.add_argument("--config", default=CONFIG, help="the smoke profile")
    parser.add_argument("--serve-config", default="serve_config.yaml", help="Serve YAML used")
    parser.add_argument("--reports-dir", default="reports", help="where the report goes")
    parser.add_argument("--standins", default=STANDINS, help="where the hub stand-ins go")
    a = parser.parse_args(argv)
    result = run_smoke(a.config, a.serve_config, a.reports_dir, a.standins)
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
