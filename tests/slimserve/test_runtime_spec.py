"""The runtime declarations: one `RuntimeSpec` per runtime, asked instead of the runtime's name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimserve.artifacts import ArtifactError
from slimserve.runtimes import RUNTIMES, runtime_spec
from slimserve.runtimes.base import resolve_device, resolve_threads

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]


def test_every_manifest_runtime_is_declared_once():
    from typing import get_args

    from slimserve.artifacts import RuntimeName

    assert set(RUNTIMES) == set(get_args(RuntimeName))
    assert all(runtime_spec(name).name == name for name in RUNTIMES)
    with pytest.raises(ArtifactError, match="unknown runtime 'tflite'"):
        runtime_spec("tflite")


def test_load_options_match_the_backends_signatures():
    """A spec passes on exactly what its backend's `load` takes: no `**ignored` catch-alls."""
    import importlib
    import inspect

    for spec in RUNTIMES.values():  # trt_rt imports tensorrt only inside `load`
        params = inspect.signature(importlib.import_module(spec.module).load).parameters
        keywords = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
        assert keywords == set(spec.load_options), spec.name
        assert not any(p.kind is p.VAR_KEYWORD for p in params.values()), spec.name


def test_gpu_facts():
    assert runtime_spec("tensorrt").needs_gpu and runtime_spec("tensorrt").requires == "tensorrt"
    assert not runtime_spec("torch").needs_gpu and not runtime_spec("onnxruntime").needs_gpu
    assert runtime_spec("tensorrt").gpu_missing() is None  # its import is checked on its own
    fake_ort = type("ort", (), {"get_available_providers": staticmethod(lambda: ["CPU"])})
    from slimserve.runtimes.spec import onnxruntime_gpu_missing

    assert "CUDAExecutionProvider" in (onnxruntime_gpu_missing(fake_ort) or "")


def test_missing_here_names_the_module():
    assert runtime_spec("torch").missing_here() is None
    from dataclasses import replace

    absent = replace(runtime_spec("torch"), packages=("no_such_package_here",))
    assert absent.missing_here() == (
        "runtime 'torch' unavailable here (cannot import no_such_package_here)"
    )


def test_files_and_sidecars(tmp_path):
    onnx, trt, pt = (runtime_spec(n) for n in ("onnxruntime", "tensorrt", "torch"))
    assert onnx.weight_files(tmp_path) == ("model.onnx",) and onnx.precision(tmp_path) is None
    (tmp_path / "onnx.json").write_text(
        json.dumps({"model": "model.int8.onnx", "precision": "int8"})
    )
    assert onnx.weight_files(tmp_path) == ("model.int8.onnx",)
    assert onnx.precision(tmp_path) == "int8"
    (tmp_path / "onnx.json").write_text("{not json")
    assert onnx.weight_files(tmp_path) == ("model.onnx",) and onnx.precision(tmp_path) is None
    assert trt.weight_files(tmp_path) == ("model.plan",)
    assert pt.files.required == ("config.json",) and pt.precision(tmp_path) is None


def test_resolve_threads_and_device(monkeypatch):
    monkeypatch.delenv("A", raising=False)
    monkeypatch.setenv("B", "3")
    assert resolve_threads(None, ("A", "B")) == 3 and resolve_threads(2, ("A", "B")) == 2
    monkeypatch.setenv("A", "x")
    with pytest.raises(ValueError, match="A must be an integer"):
        resolve_threads(None, ("A", "B"))
    with pytest.raises(ValueError, match=">= 1"):
        resolve_threads(0)
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device(None) == torch.device("cpu")
    assert resolve_device(None, gpu_missing="no provider") == torch.device("cpu")
    with pytest.raises(ValueError, match="requested but no provider"):
        resolve_device("cuda", gpu_missing="no provider")
    with pytest.raises(ValueError, match="'cpu' or 'cuda"):
        resolve_device("mps")


def test_the_registry_imports_no_torch():
    """The Serve app builder asks the specs from a process that never loads a model."""
    code = (
        "import sys, slimserve.runtimes as r, deployments.app; "
        "r.runtime_spec('onnxruntime').missing_here(); "
        "print(sorted({'torch', 'onnxruntime', 'tensorrt'} & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"
