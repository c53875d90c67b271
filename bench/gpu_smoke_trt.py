"""The ONNX Runtime (CUDA) and TensorRT sections of `bench.gpu_smoke`, and their probes.

Imported only on a machine with a CUDA GPU (and, for TensorRT, the `tensorrt` package).
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import torch

from build_engines.parity import ParityError, check_parity

STEPS = 16
PROBE_ROUNDS = 20


def onnx_folder(model_dir: Path, out: Path) -> Path:
    """The small model exported with the KV cache (fp32, standard ops), once per run."""
    from build_engines.onnx_export import export_kv_onnx, load_parent_model

    if (out / "model.onnx").is_file():
        return out
    out.mkdir(parents=True)
    export_kv_onnx(load_parent_model(model_dir), out / "model.onnx")
    shutil.copyfile(model_dir / "config.json", out / "config.json")
    meta = {"model": "model.onnx", "precision": "float32", "graph": "standard"}
    (out / "onnx.json").write_text(json.dumps(meta))
    return out


def blocks(vocab: int) -> torch.Tensor:
    return torch.randint(1, vocab, (2, 32), generator=torch.Generator().manual_seed(2))


def ort_checks(section: Any, folder: Path, prompts: list[list[int]]) -> Any:
    """Parity of ORT on CUDA (I/O binding) with ORT on CPU, then the stream-race probe."""
    from slimserve.runtimes import onnx_rt

    ref = onnx_rt.load(folder, device="cpu", threads=4)
    cand = onnx_rt.load(folder, device="cuda", threads=1)
    section.figures["providers"] = cand.info.extra.get("providers")
    problems = []
    try:
        record = check_parity(ref, cand, prompts, STEPS, 1e-3, blocks(ref.info.vocab_size))
    except ParityError as exc:
        record = {"error": str(exc)}
        problems.append(str(exc))
    section.figures["parity_vs_cpu"] = record
    race = stream_race(cand)
    section.figures["stream_race"] = race
    if race["mismatches"]:
        problems.append(f"stream race: {race['mismatches']} of {race['rounds']} runs differ")
    section.status = "FAIL" if problems else "PASS"
    diff = record.get("max_abs_logit_diff")
    section.reason = "; ".join(problems) or f"parity {diff:.2g} <= 1e-3, no stream race"
    return section


def stream_race(rt: Any, rounds: int = PROBE_ROUNDS, size: int = 4096) -> dict[str, Any]:
    """Decode inputs written by torch right behind a long kernel on torch's stream: a runtime
    whose engine is not ordered after torch's stream reads them before they are written."""
    dev = rt.device
    logits, state = rt.prefill([[1, 2, 3, 4, 5]] * 4)
    tok = logits.argmax(-1)
    expected, _ = rt.decode(tok, state)
    expected = expected.float().cpu()
    big = torch.randn(size, size, device=dev)
    mismatches = 0
    for _ in range(rounds):
        busy = big @ big  # milliseconds of work queued on torch's stream
        tokens = torch.empty_like(tok)
        tokens.copy_(tok + (busy[0, 0] * 0).long())  # written only after the busy kernel
        got, _ = rt.decode(tokens, state)
        if not torch.allclose(got.float().cpu(), expected, atol=1e-4, rtol=0):
            mismatches += 1
    return {"rounds": rounds, "mismatches": mismatches}


def two_threads(rt: Any, vocab: int, rounds: int = 10) -> dict[str, Any]:
    """Two threads scoring different inputs at once on the one runtime, against serial runs."""
    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randint(1, vocab, (2, 24), generator=gen) for _ in range(2)]
    serial = [rt.score(x).float().cpu() for x in inputs]
    errors: list[str] = []
    mismatches = [0]

    def work(i: int) -> None:
        try:
            for _ in range(rounds):
                if not torch.allclose(rt.score(inputs[i]).float().cpu(), serial[i], atol=1e-3):
                    mismatches[0] += 1
        except Exception as exc:  # counted, and the probe fails
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return {"rounds": 2 * rounds, "mismatches": mismatches[0], "errors": errors[:3]}


def build(folder: Path, out: Path, precision: str, params: Any) -> dict[str, Any]:
    """One engine of the small model into `out` (model.plan, trt.json, config.json)."""
    import tensorrt as trt

    from build_engines import trt as build_trt
    from slimserve.runtimes import onnx_rt, trt_rt

    cfg = onnx_rt.read_model_config(folder)
    shapes = build_trt.profile_shapes(params, cfg)
    plan = build_trt.precision_plan(trt.__version__, precision)
    out.mkdir(parents=True)
    source, _ = build_trt.engine_source(folder / "model.onnx", out, plan)
    built = build_trt.build_engine(source, out / trt_rt.PLAN_FILE, shapes, plan, 1024)
    shutil.copyfile(folder / "config.json", out / "config.json")
    limits = {k: getattr(params, k).model_dump() for k in ("batch", "sequence", "past")}
    sidecar = {"plan": trt_rt.PLAN_FILE, "precision": precision, "limits": limits}
    (out / trt_rt.SIDECAR).write_text(json.dumps(sidecar))
    return {**built, "precision_plan": plan.describe()}


def trt_checks(section: Any, folder: Path, work: Path, prompts: list[list[int]]) -> Any:
    """fp32 and fp16 engines: build time, parity with ORT on CPU, the two-thread probe."""
    from build_engines.trt import TOLERANCE
    from slimserve.runtimes import onnx_rt, trt_rt
    from slimserve.steps import BuildTrtParams, ProfileShape

    params = BuildTrtParams(
        batch=ProfileShape(min=1, opt=4, max=8),
        sequence=ProfileShape(min=1, opt=32, max=64),
        past=ProfileShape(min=1, opt=64, max=128),
    )
    ref = onnx_rt.load(folder, device="cpu", threads=4)
    vocab = ref.info.vocab_size
    problems = []
    for precision in ("fp32", "fp16"):
        figures = build(folder, work / f"trt-{precision}", precision, params)
        rt = trt_rt.load(work / f"trt-{precision}")
        figures["context_length"] = rt.info.context_length
        try:
            figures["parity_vs_ort_cpu"] = check_parity(
                ref, rt, prompts, STEPS, TOLERANCE[precision], blocks(vocab),
                require_identical=precision == "fp32",
            )  # fmt: skip
        except ParityError as exc:
            figures["parity_vs_ort_cpu"] = {"error": str(exc)}
            problems.append(f"{precision}: {exc}")
        probe = two_threads(rt, vocab)
        figures["two_threads"] = probe
        if probe["mismatches"] or probe["errors"]:
            problems.append(f"{precision}: two threads on one context: {probe}")
        section.figures[precision] = figures
    section.status = "FAIL" if problems else "PASS"
    section.reason = "; ".join(problems) or ", ".join(
        f"{p} built in {section.figures[p]['build_seconds']} s" for p in ("fp32", "fp16")
    )
    return section
