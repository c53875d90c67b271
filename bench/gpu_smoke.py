"""GPU smoke run: every GPU path once, in a few minutes, with one command (`make gpu-smoke`).

    PYTHONPATH=. python -m bench.gpu_smoke [--out reports] [--skip-bench]

No Ray. Needs torch, transformers, onnx, onnxruntime(-gpu) and pydantic (and tensorrt for the
last section). Prints `PASS` / `FAIL` / `SKIP <reason>` per section with its figures and writes
`reports/gpu_smoke.{json,md}`. Sections:

0. environment: driver, torch and its CUDA build, GPU, ORT providers, whether tensorrt imports;
1. torch runtime on CUDA in fp32 / fp16 / bf16 against CPU fp32 on a random small GPT-2: a
   left-padded batch prefill then 16 decode steps in lockstep (both fed the reference's greedy
   tokens); logits finite, max |diff| within `TORCH_REL` x the reference's largest logit;
2. CUDA-graph decode: replay equals eager on the small model, then `bench.gpu_decode`'s
   figures (eager vs graph ms per step at batch 1 and 32, the bandwidth floor) against the
   performance targets (graph >= 5x eager and <= 0.5 ms per token at batch 1, 124M shape);
3. ONNX Runtime on CUDA with I/O binding (when the CUDA provider exists): parity with ORT on
   CPU (`check_parity`: finite, 1e-3, greedy identical) and a stream-race probe;
4. TensorRT (when it imports): fp32 and fp16 engines of the small model (build time), parity
   with ORT on CPU, and a two-thread probe on the one execution context (`bench.gpu_smoke_trt`).

Tolerances: fp32 on CUDA keeps TF32 off (torch's default for matmuls), so only summation order
differs from the CPU: 1e-4 of the logit scale. fp16 rounds at 2^-11 and bf16 at 2^-8 relative;
allowing ~20 roundings' worth along the two-layer residual path gives 1e-2 and 8e-2 of the
logit scale. Without a CUDA GPU every section is SKIP with its reason and the exit status is 0;
a FAIL makes it 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SMALL = {"n_layer": 2, "n_head": 4, "n_embd": 128, "vocab_size": 1000, "n_positions": 256}
TORCH_REL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 8e-2}
DECODE_STEPS = 16
TARGET_SPEEDUP, TARGET_MS = 5.0, 0.5  # graph vs eager, ms per token at batch 1 (124M shape)


@dataclass
class Section:
    name: str
    status: str = "PASS"  # PASS | FAIL | SKIP
    reason: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def line(self) -> str:
        tail = f" {self.reason}" if self.reason else ""
        return f"{self.status} {self.name}:{tail}"


def cuda_missing() -> str | None:
    import torch

    if torch.version.cuda is None:
        return f"no CUDA GPU: torch {torch.__version__} is a CPU build"
    if not torch.cuda.is_available():
        return "no CUDA GPU: torch.cuda.is_available() is False"
    return None


def environment() -> Section:
    import onnxruntime as ort
    import torch

    s = Section("0 environment")
    f = s.figures
    f["torch"], f["torch_cuda"] = torch.__version__, torch.version.cuda
    f["onnxruntime"], f["ort_providers"] = ort.__version__, ort.get_available_providers()
    f["tensorrt"] = tensorrt_version()
    f["driver"] = driver_version()
    if (why := cuda_missing()) is not None:
        s.status, s.reason = "SKIP", why
        return s
    f["gpu"] = torch.cuda.get_device_name(0)
    f["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    f["memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    s.reason = f"{f['gpu']}, driver {f['driver']}, torch CUDA {f['torch_cuda']}"
    return s


def tensorrt_version() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except Exception as exc:  # installed but broken (missing libraries): say so
        return f"import failed: {type(exc).__name__}: {exc}"


def driver_version() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    run = subprocess.run(
        [exe, "--query-gpu=driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return run.stdout.strip().splitlines()[0] if run.returncode == 0 and run.stdout else None


def small_model(folder: Path) -> Path:
    """A random small GPT-2 (`SMALL`) saved as a Hugging Face folder."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**SMALL)).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    return folder


def prompts(n: int = 3) -> list[list[int]]:
    """Prompts of different lengths (5, 17, 29 tokens): the batch is really left-padded."""
    import torch

    gen = torch.Generator().manual_seed(1)
    return [
        torch.randint(1, SMALL["vocab_size"], (5 + 12 * i,), generator=gen).tolist()
        for i in range(n)
    ]


def lockstep_diff(ref: Any, cand: Any, seqs: list[list[int]], steps: int) -> dict[str, Any]:
    """Prefill + `steps` decodes on both, fed the reference's greedy tokens: max |diff|,
    finiteness, greedy agreement, and the reference's largest |logit| (the scale)."""
    import torch

    r, rs = ref.prefill(seqs)
    c, cs = cand.prefill(seqs)
    worst, scale, finite, same, total = 0.0, 0.0, True, 0, 0
    for step in range(steps):
        r, c = r.float().cpu(), c.float().cpu()
        finite = finite and bool(torch.isfinite(c).all())
        if finite:
            worst = max(worst, float((r - c).abs().max()))
        scale = max(scale, float(r.abs().max()))
        tok = r.argmax(-1)
        same, total = same + int((c.argmax(-1) == tok).sum()), total + len(seqs)
        if step + 1 < steps:
            r, rs = ref.decode(tok, rs)
            c, cs = cand.decode(tok, cs)
    return {"max_abs_diff": worst, "scale": scale, "finite": finite, "greedy_agree": same / total}


def torch_cuda(model_dir: Path) -> Section:
    from slimserve.runtimes import torch_rt

    s = Section("1 torch on CUDA vs CPU fp32")
    ref = torch_rt.load(model_dir, device="cpu", dtype="float32", threads=4)
    failed = []
    for dtype, rel in TORCH_REL.items():
        cand = torch_rt.load(model_dir, device="cuda", dtype=dtype, threads=4)
        got = lockstep_diff(ref, cand, prompts(), DECODE_STEPS)
        got["tolerance"] = rel * max(1.0, got["scale"])
        ok = got["finite"] and got["max_abs_diff"] <= got["tolerance"]
        s.figures[dtype] = {k: round(v, 6) if isinstance(v, float) else v for k, v in got.items()}
        if not ok:
            failed.append(f"{dtype} diff {got['max_abs_diff']:.3g} (tol {got['tolerance']:.3g})")
    s.status = "FAIL" if failed else "PASS"
    s.reason = "; ".join(failed) or ", ".join(
        f"{d} {s.figures[d]['max_abs_diff']:.2g}" for d in TORCH_REL
    )
    return s


def cuda_graph(skip_bench: bool) -> Section:
    import torch

    from bench import gpu_decode

    s = Section("2 CUDA-graph decode")
    model = gpu_decode.gpt2_model("cuda", torch.float16, **SMALL)
    ids = torch.tensor([p[:5] for p in prompts()], device="cuda")
    dec = gpu_decode.StaticDecoder(model, batch=ids.shape[0], max_len=64)
    eager = [dec.prefill(ids).clone()]
    tokens = []
    for _ in range(8):
        tokens.append(eager[-1].argmax(-1))
        eager.append(dec.decode(tokens[-1]).clone())
    dec.prefill(ids)
    dec.capture()
    replay = [dec.decode(t).clone() for t in tokens]
    diff = max(float((a - b).abs().max()) for a, b in zip(eager[1:], replay, strict=True))
    s.figures["replay_vs_eager_max_abs_diff"] = diff
    problems = [] if diff <= 1e-3 else [f"replay differs from eager by {diff:.3g}"]
    if not skip_bench:
        bench = gpu_decode.run_gpu_decode(batches=(1, 32), steps=32, repeats=3)
        s.figures["bench"] = bench
        b1 = next(r for r in bench["rows"] if r["batch"] == 1)
        s.figures["targets"] = {
            f"graph >= {TARGET_SPEEDUP}x eager at batch 1": b1["graph_speedup"] >= TARGET_SPEEDUP,
            f"<= {TARGET_MS} ms per token at batch 1": b1["graph_ms"] <= TARGET_MS,
        }
        problems += [f"target missed: {t}" for t, met in s.figures["targets"].items() if not met]
        summary = f"batch 1: eager {b1['eager_ms']} ms, graph {b1['graph_ms']} ms"
    else:
        summary = "bench skipped (--skip-bench)"
    s.status = "FAIL" if problems else "PASS"
    s.reason = "; ".join(problems) or f"replay = eager ({diff:.2g}); {summary}"
    return s


def ort_missing() -> str | None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return None
    return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (needs onnxruntime-gpu)"


def trt_missing() -> str | None:
    version = tensorrt_version()
    if version is None or version.startswith("import failed"):
        return f"tensorrt: {version or 'not installed'}"
    return None


def ort_cuda(model_dir: Path, work: Path) -> Section:
    s = Section("3 ONNX Runtime on CUDA (I/O binding)")
    if (why := ort_missing()) is not None:
        s.status, s.reason = "SKIP", why
        return s
    from bench.gpu_smoke_trt import onnx_folder, ort_checks

    folder = onnx_folder(model_dir, work / "onnx")
    return ort_checks(s, folder, prompts())


def tensorrt(model_dir: Path, work: Path) -> Section:
    s = Section("4 TensorRT")
    if (why := trt_missing()) is not None:
        s.status, s.reason = "SKIP", why
        return s
    from bench.gpu_smoke_trt import onnx_folder, trt_checks

    folder = onnx_folder(model_dir, work / "onnx")
    return trt_checks(s, folder, work, prompts())


def run(out: Path, skip_bench: bool = False) -> list[Section]:
    """Every section in order; a section that raises is a FAIL with the error, not a crash."""
    sections = [environment()]
    print(sections[0].line(), flush=True)
    why = cuda_missing()
    names = ["1 torch on CUDA vs CPU fp32", "2 CUDA-graph decode",
             "3 ONNX Runtime on CUDA (I/O binding)", "4 TensorRT"]  # fmt: skip
    if why is not None:
        extra = {2: ort_missing(), 3: trt_missing()}  # what would also be missing on a GPU
        sections += [
            Section(n, "SKIP", why + (f"; {extra[i]}" if extra.get(i) else ""))
            for i, n in enumerate(names)
        ]
        for section in sections[1:]:
            print(section.line(), flush=True)
    else:
        with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as tmp:
            work = Path(tmp)
            model_dir = small_model(work / "torch")
            steps = [
                lambda: torch_cuda(model_dir),
                lambda: cuda_graph(skip_bench),
                lambda: ort_cuda(model_dir, work),
                lambda: tensorrt(model_dir, work),
            ]
            for name, step in zip(names, steps, strict=True):
                t0 = time.monotonic()
                try:
                    section = step()
                except Exception as exc:  # reported as that section's failure
                    section = Section(name, "FAIL", f"{type(exc).__name__}: {exc}")
                section.seconds = round(time.monotonic() - t0, 1)
                print(section.line(), flush=True)
                sections.append(section)
    write(sections, out)
    return sections


def write(sections: list[Section], out: Path) -> None:
    """`gpu_smoke.json` (a slimserve report: the dashboard lists it) and `gpu_smoke.md`."""
    from slimserve.reports import Table, new_report, write_report

    rows = [
        {
            "section": s.name,
            "status": s.status,
            "reason": s.reason,
            "seconds": s.seconds,
            "figures": json.dumps(s.figures, default=str, sort_keys=True) if s.figures else None,
        }
        for s in sections
    ]
    counts = {k: sum(s.status == k for s in sections) for k in ("PASS", "FAIL", "SKIP")}
    report = new_report(
        "gpu_smoke",
        kind="gpu-smoke",
        title="GPU smoke run",
        tables=[Table.from_records("sections (PASS / FAIL / SKIP)", rows)],
        notes=[", ".join(f"{n} {k}" for k, n in counts.items())],
        command="make gpu-smoke",
    )
    write_report(report, out, png=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GPU smoke run (PASS / FAIL / SKIP per section)")
    parser.add_argument("--out", default="reports", help="folder for gpu_smoke.{json,md}")
    parser.add_argument(
        "--skip-bench", action="store_true", help="section 2 without bench.gpu_decode's figures"
    )
    args = parser.parse_args(argv)
    sections = run(Path(args.out), skip_bench=args.skip_bench)
    print(f"wrote {Path(args.out) / 'gpu_smoke.md'} and gpu_smoke.json")
    return 1 if any(s.status == "FAIL" for s in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
