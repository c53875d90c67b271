"""ONNX Runtime on CUDA, checked on CPU with a fake onnxruntime and fake CUDA streams.

* a session that silently fell back to CPU is refused (CUDA must be its first provider);
* the CUDA provider computes in fp32 (`use_tf32=0`) on a torch stream of its own;
* each I/O-bound run waits for torch's stream, and torch's stream waits for it afterwards.
"""

from __future__ import annotations

from types import SimpleNamespace

import onnxruntime
import pytest
import torch
from test_runtime_onnx import onnx_dir

from slimserve.runtimes import onnx_rt
from slimserve.runtimes.onnx_rt import OnnxRuntime

__all__ = ["onnx_dir"]  # the module-scoped fixture, shared with test_runtime_onnx.py


class _Stream:
    def __init__(self, handle: int, log: list):
        self.cuda_stream, self.log = handle, log

    def wait_stream(self, other):
        self.log.append(f"{self.cuda_stream} waits for {other.cuda_stream}")


def _fake_ort(active: list[str], sessions: list) -> SimpleNamespace:
    class Session:
        def __init__(self, path, options, providers):
            self.providers = providers
            sessions.append(self)

        def get_providers(self):
            return active

    real = {k: getattr(onnxruntime, k) for k in ("SessionOptions", "ExecutionMode")}
    return SimpleNamespace(
        **real,
        GraphOptimizationLevel=onnxruntime.GraphOptimizationLevel,
        __version__=onnxruntime.__version__,
        get_available_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
        InferenceSession=Session,
    )


@pytest.fixture
def fake_cuda(monkeypatch) -> list:
    log: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # "cuda" = the current one
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _Stream(4242, log))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream(0, log))
    return log


def test_silent_cpu_fallback_is_refused(onnx_dir, fake_cuda, monkeypatch):
    sessions: list = []
    monkeypatch.setattr(onnx_rt, "ort", _fake_ort(["CPUExecutionProvider"], sessions))
    with pytest.raises(RuntimeError, match="did not load its CUDA provider"):
        onnx_rt.load(onnx_dir, device="cuda", threads=1)
    (session,) = sessions
    (name, options), cpu = session.providers
    assert name == "CUDAExecutionProvider" and cpu == "CPUExecutionProvider"
    assert options["use_tf32"] == "0"  # fp32 graphs compute in fp32, as their parity check did
    assert options["user_compute_stream"] == "4242"  # ORT's own stream, not the default "0"
    assert options["device_id"] == "0"


def test_cuda_session_check_accepts_cuda_first():
    onnx_rt.check_cuda_session(
        SimpleNamespace(get_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]),
        "cuda:0",
    )


def test_bound_runs_are_ordered_against_torchs_stream(onnx_dir, monkeypatch):
    """I/O binding (here on CPU, where it also works) with a fake ORT stream: the run waits
    for torch's stream and torch's stream waits for the run, in that order."""
    ref = onnx_rt.load(onnx_dir, device="cpu", threads=1)
    log: list = []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream(0, log))
    rt = OnnxRuntime(ref.session, ref.info, stream=_Stream(4242, log))
    rt.io_binding = True
    real_run = ref.session.run_with_iobinding

    class Session:
        def __getattr__(self, name):
            return getattr(ref.session, name)

        def run_with_iobinding(self, binding):
            log.append("run")
            return real_run(binding)

    rt.session = Session()
    logits, _ = rt.prefill([[1, 2, 3]])
    assert log == ["4242 waits for 0", "run", "0 waits for 4242"]
    expected, _ = ref.prefill([[1, 2, 3]])
    assert (logits - expected).abs().max() < 1e-5
