"""What the TensorRT path must get right before it first meets a GPU, checked with fakes on CPU.

* parity fails on NaN / inf logits (fp16 engines and left-padded rows are where they appear);
* an fp32 engine is built with TF32 cleared;
* the runtime's limits are the optimization profile's: the context length is capped by the
  past axis, longer prompts are prefilled in chunks and wider batches in row groups;
* one execution context is used by one thread at a time;
* the torch backend runs the engine on a stream of its own, ordered against torch's;
* the PyCUDA backend pushes its context on the thread that runs the engine.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_onnx_export import fake_ctx
from test_trt import CFG, FAKE_TRT, FITS, FakeContext, FakeEngine, fake_tensorrt, fake_trt, models

from build_engines import trt as build_trt
from build_engines.onnx_export import MODEL_FILE
from build_engines.parity import ParityError, check_parity
from slimserve import hardware
from slimserve.runtimes import trt_rt
from slimserve.runtimes.base import RuntimeInfo
from slimserve.runtimes.trt_rt import PyCudaBuffers, TorchBuffers, TrtRuntime
from slimserve.steps import BuildTrtParams, ProfileShape

__all__ = ["fake_trt", "models"]  # module-scoped fixtures, shared with test_trt.py

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]


# -- parity: non-finite logits fail ----------------------------------------------------------


class _Poisoned:
    """The reference with NaN (or inf) written into one row's logits from a given call on."""

    def __init__(self, ref, value: float | None, row: int = 0, at_call: int = 2):
        self.ref, self.value, self.row, self.at_call, self.info = ref, value, row, at_call, ref.info
        self.calls = 0

    def _poison(self, logits):
        self.calls += 1
        if self.value is not None and self.calls >= self.at_call and logits.shape[0] > self.row:
            logits = logits.clone()
            logits[self.row, 5] = self.value  # not the argmax: greedy tokens still agree
        return logits

    def prefill(self, seqs):
        logits, state = self.ref.prefill(seqs)
        return self._poison(logits), state

    def decode(self, tokens, state):
        logits, state = self.ref.decode(tokens, state)
        return self._poison(logits), state

    def score(self, ids):
        return self.ref.score(ids)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_parity_fails_on_non_finite_logits(models, value):
    ref = models.ref
    assert check_parity(ref, _Poisoned(ref, None), PROMPTS, 4, 1e-4)["finite"]
    with pytest.raises(ParityError, match="not finite"):
        check_parity(ref, _Poisoned(ref, value), PROMPTS, 4, 1e-4)
    # fp16 mode (greedy mismatches only recorded) still fails on a NaN in a left-padded row.
    with pytest.raises(ParityError, match="not finite"):
        check_parity(ref, _Poisoned(ref, value, row=2), PROMPTS, 4, 1e3, require_identical=False)


def test_parity_fails_on_non_finite_scores(models):
    ref = models.ref
    nan_scores = SimpleNamespace(**{k: getattr(ref, k) for k in ("prefill", "decode", "info")})
    nan_scores.score = lambda ids: torch.full_like(ref.score(ids), float("nan"))
    ids = torch.randint(0, CFG["vocab_size"], (1, 8))
    with pytest.raises(ParityError, match="full-sequence scoring"):
        check_parity(ref, nan_scores, PROMPTS, 2, 1e-4, ids)


# -- build: fp32 clears TF32 -----------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_fp32_engine_is_built_without_tf32(models, fake_trt, precision, tmp_path, monkeypatch):
    calls: list = []
    module = fake_tensorrt("10.13.0", calls)
    module.BuilderFlag = SimpleNamespace(FP16="FP16", TF32="TF32")
    config_cls = type(module.Builder(None).create_builder_config())
    config_cls.clear_flag = lambda self, flag: calls.append(("clear", flag))
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setattr(hardware, "missing", lambda requirement: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Fake GPU")
    monkeypatch.setattr(trt_rt, "load", lambda folder, **kw: fake_trt)
    params = FITS.model_copy(update={"precision": precision})
    build_trt.run(fake_ctx(models.onnx_dir, tmp_path / "trt", params))
    assert (("clear", "TF32") in calls) == (precision == "fp32"), calls


# -- the runtime's limits come from the profile ----------------------------------------------

SMALL = BuildTrtParams(
    batch=ProfileShape(min=1, opt=2, max=2),
    sequence=ProfileShape(min=1, opt=4, max=4),
    past=ProfileShape(min=1, opt=16, max=48),
)


def _limits(params: BuildTrtParams) -> dict:
    return {k: getattr(params, k).model_dump() for k in ("batch", "sequence", "past")}


def _runtime(models, params: BuildTrtParams, context_cls=FakeContext) -> TrtRuntime:
    buffers = TorchBuffers(torch.device("cpu"))
    engine = FakeEngine(models.onnx_dir / MODEL_FILE, CFG["vocab_size"], buffers)
    engine.create_execution_context = lambda: context_cls(engine)
    ctx = trt_rt.profile_context(CFG["n_positions"], _limits(params))
    info = RuntimeInfo("tensorrt", ctx, CFG["vocab_size"], "cpu", "float32", 2, 2, 16, 1)
    return TrtRuntime(engine, buffers, info, _limits(params), FAKE_TRT)


def test_load_reports_the_profile_context_not_n_positions(models, tmp_path, monkeypatch):
    folder = tmp_path / "trt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CFG))
    (folder / "model.plan").write_bytes(b"PLAN")
    (folder / "trt.json").write_text(json.dumps({"precision": "fp32", "limits": _limits(SMALL)}))
    buffers = TorchBuffers(torch.device("cpu"))
    engine = FakeEngine(models.onnx_dir / MODEL_FILE, CFG["vocab_size"], buffers)
    runtime = SimpleNamespace(deserialize_cuda_engine=lambda data: engine)
    fake = SimpleNamespace(**vars(FAKE_TRT), __version__="10.13.0", Logger=lambda level: None)
    fake.Logger.WARNING = 2
    fake.Runtime = lambda logger: runtime
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_rt, "make_buffers", lambda backend, device: buffers)
    rt = trt_rt.load(folder)
    assert rt.info.context_length == 48 < CFG["n_positions"]
    assert "past <= 48" in rt.info.extra["profile"]


def test_long_prompts_and_wide_batches_fit_the_profile(models):
    """sequence.max 4 and batch.max 2: a 3-row batch of prompts up to 11 tokens still matches
    the torch reference, in prefill, decode and scoring (the old runtime raised here)."""
    rt, ref = _runtime(models, SMALL), models.ref
    seqs = [list(range(1, 12)), [20, 21, 22], [30, 31, 32, 33, 34, 35]]
    logits, state = rt.prefill(seqs)
    ref_logits, ref_state = ref.prefill(seqs)
    assert (logits - ref_logits).abs().max() < 1e-4
    for step in range(3):
        tokens = ref_logits.argmax(-1)
        logits, state = rt.decode(tokens, state)
        ref_logits, ref_state = ref.decode(tokens, ref_state)
        assert (logits - ref_logits).abs().max() < 1e-4, step
    ids = torch.randint(0, CFG["vocab_size"], (3, 10))
    assert (rt.score(ids) - ref.score(ids)).abs().max() < 1e-4
    with pytest.raises(ValueError, match="context length 48"):
        rt.prefill([[1] * 49])


# -- one context, one thread at a time -------------------------------------------------------


class _SlowContext(FakeContext):
    """Notices when a second thread sets shapes while another thread's run is in flight."""

    def __init__(self, engine):
        super().__init__(engine)
        self.owner: int | None = None
        self.clashes = 0

    def set_input_shape(self, name, shape):
        me = threading.get_ident()
        if self.owner not in (None, me):
            self.clashes += 1
        self.owner = me
        return super().set_input_shape(name, shape)

    def execute_async_v3(self, stream):
        time.sleep(0.005)  # a slow kernel: room for another thread to barge in
        try:
            return super().execute_async_v3(stream)
        finally:
            self.owner = None


def test_one_execution_context_is_never_shared_by_two_threads_at_once(models):
    rt = _runtime(models, FITS, _SlowContext)
    ids = torch.randint(0, CFG["vocab_size"], (2, 12))
    expected = rt.score(ids)
    errors: list[BaseException] = []
    results: list[torch.Tensor] = []

    def work():
        try:
            for _ in range(4):
                results.append(rt.score(ids))
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert rt.context.clashes == 0
    assert all((r - expected).abs().max() < 1e-5 for r in results) and len(results) == 12


# -- streams and contexts --------------------------------------------------------------------


class _FakeStream:
    def __init__(self, handle: int, log: list):
        self.cuda_stream, self.log = handle, log

    def wait_stream(self, other):
        self.log.append((self.cuda_stream, "waits for", other.cuda_stream))


def test_torch_buffers_run_the_engine_on_its_own_stream(monkeypatch):
    log: list = []
    current = _FakeStream(0, log)  # torch's default stream
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _FakeStream(77, log))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    buffers = TorchBuffers(torch.device("cuda", 0))
    assert buffers.stream() == 77  # not the default stream 0
    assert log == [(77, "waits for", 0)]  # the engine reads inputs torch wrote
    buffers.finish()
    assert log[-1] == (0, "waits for", 77)  # torch reads outputs the engine wrote


def _fake_pycuda() -> tuple[dict[str, types.ModuleType], threading.local]:
    """`pycuda.driver` whose calls need a context current on the calling thread."""
    local = threading.local()

    def need_context():
        if not getattr(local, "stack", None):
            raise RuntimeError("cuMemAlloc failed: invalid device context")

    class Context:
        def push(self):
            local.stack = [*getattr(local, "stack", []), self]

        def pop(self):
            local.stack.pop()

    primary = Context()

    class Stream:
        handle = 99

        def __init__(self):
            need_context()

        def synchronize(self):
            need_context()

    memory: dict[int, np.ndarray] = {}

    def mem_alloc(nbytes):
        need_context()
        addr = 4096 * (len(memory) + 1)
        memory[addr] = np.zeros(nbytes, dtype=np.uint8)
        return addr

    def htod(dev, host, stream):
        need_context()
        memory[dev][: host.nbytes] = host.view(np.uint8).ravel()

    def dtoh(host, dev, stream):
        need_context()
        host.view(np.uint8).ravel()[:] = memory[dev][: host.nbytes]

    driver = types.ModuleType("pycuda.driver")
    driver.init = lambda: None
    driver.Device = lambda index: SimpleNamespace(retain_primary_context=lambda: primary)
    driver.Stream, driver.mem_alloc = Stream, mem_alloc
    driver.memcpy_htod_async, driver.memcpy_dtoh_async = htod, dtoh
    autoinit = types.ModuleType("pycuda.autoinit")  # importing it = a context on this thread
    package = types.ModuleType("pycuda")
    package.driver, package.autoinit = driver, autoinit
    primary.push()  # what `import pycuda.autoinit` does, on the loading thread only
    return {"pycuda": package, "pycuda.driver": driver, "pycuda.autoinit": autoinit}, local


def test_pycuda_buffers_work_from_another_thread(monkeypatch):
    modules, local = _fake_pycuda()
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    try:
        buffers = PyCudaBuffers()  # loaded here, used by the engine's own thread below
        outcome: list = []

        def engine_thread():
            try:
                buffers.begin()
                ptr = buffers.input(torch.arange(4, dtype=torch.int64), torch.int64)
                buffers.output((4,), torch.int64)
                assert buffers.stream() == 99 and ptr
                outcome.append(buffers.finish())
            except BaseException as exc:
                outcome.append(exc)
            finally:
                buffers.reset()

        worker = threading.Thread(target=engine_thread)
        worker.start()
        worker.join(timeout=30)
        assert outcome and not isinstance(outcome[0], BaseException), outcome
        assert not buffers._pushed
    finally:
        local.stack = []
