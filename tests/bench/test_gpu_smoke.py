"""`make gpu-smoke` (bench/gpu_smoke.py): all SKIP with reasons and exit 0 without a GPU, from
a plain `PYTHONPATH=.`; and its GPU sections' own logic, run here on CPU runtimes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import gpu_smoke, gpu_smoke_trt
from slimserve.reports import read_report

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the sections run")
def test_without_a_gpu_every_section_skips_with_its_reason(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": "."}
    t0 = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "bench.gpu_smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert time.monotonic() - t0 < 60
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith(("PASS", "FAIL", "SKIP"))]
    assert len(lines) == 5 and all(ln.startswith("SKIP ") for ln in lines), run.stdout
    assert all("no CUDA GPU" in ln for ln in lines), lines
    report = read_report(tmp_path / "gpu_smoke.json").report  # a dashboard-readable report
    assert report is not None
    rows = report.tables[0].records()
    assert [r["status"] for r in rows] == ["SKIP"] * 5
    assert json.loads(rows[0]["figures"])["ort_providers"]
    assert "| 4 TensorRT | SKIP |" in (tmp_path / "gpu_smoke.md").read_text()


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> Path:
    return gpu_smoke.small_model(tmp_path_factory.mktemp("smoke") / "torch")


def test_torch_section_logic_on_cpu(small_dir, monkeypatch):
    from slimserve.runtimes import torch_rt

    real = torch_rt.load
    monkeypatch.setattr(
        torch_rt, "load", lambda folder, **kw: real(folder, **{**kw, "device": "cpu", "threads": 1})
    )
    section = gpu_smoke.torch_cuda(small_dir)
    assert section.status == "PASS", section
    assert set(section.figures) == set(gpu_smoke.TORCH_REL)
    assert all(f["finite"] and f["greedy_agree"] == 1.0 for f in section.figures.values())


def test_probes_pass_on_a_correct_runtime(small_dir):
    from slimserve.runtimes import torch_rt

    rt = torch_rt.load(small_dir, device="cpu", dtype="float32", threads=1)
    assert gpu_smoke_trt.stream_race(rt, rounds=3, size=64) == {"rounds": 3, "mismatches": 0}
    probe = gpu_smoke_trt.two_threads(rt, gpu_smoke.SMALL["vocab_size"], rounds=3)
    assert probe == {"rounds": 6, "mismatches": 0, "errors": []}


def test_ort_section_logic_on_cpu(small_dir, monkeypatch):
    """ort_checks' parity and probes, with CPU runtimes standing in for ORT on CUDA."""
    from slimserve.runtimes import onnx_rt, torch_rt

    rt = torch_rt.load(small_dir, device="cpu", dtype="float32", threads=1)
    monkeypatch.setattr(onnx_rt, "load", lambda folder, **kw: rt)
    monkeypatch.setattr(gpu_smoke_trt, "PROBE_ROUNDS", 2)
    real_race = gpu_smoke_trt.stream_race
    monkeypatch.setattr(gpu_smoke_trt, "stream_race", lambda r: real_race(r, 2, 64))
    section = gpu_smoke_trt.ort_checks(gpu_smoke.Section("3"), small_dir, gpu_smoke.prompts())
    assert section.status == "PASS", section
    assert section.figures["parity_vs_cpu"]["passed"] and section.figures["parity_vs_cpu"]["finite"]
