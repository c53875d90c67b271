"""build-trt and the TensorRT runtime: pure-Python parts with fakes, a real engine on a GPU.

The fake engine and context implement the TensorRT 10/11 name-based API the runtime calls
(`num_io_tensors`, `get_tensor_name/mode/dtype`, `set_input_shape`, `get_tensor_shape`,
`set_tensor_address`, `execute_async_v3`) and execute by running the ONNX graph in ONNX
Runtime on the tensors found at the bound addresses. So the runtime's bookkeeping (shapes,
addresses, output allocation, the padding column that keeps the past ≥ 1) is checked against
the torch runtime for real, on CPU.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from pydantic import ValidationError
from test_onnx_export import fake_ctx, make_torch_artifact

from build_engines import trt as build_trt
from build_engines.onnx_export import MODEL_FILE, check_onnx, export_folder
from build_engines.parity import check_parity, prompt_ids
from slimserve import hardware
from slimserve.artifacts import ArtifactError, Manifest, write_manifest
from slimserve.runtimes import torch_rt
from slimserve.runtimes.base import RuntimeInfo, merge, select
from slimserve.runtimes.trt_rt import TorchBuffers, TrtRuntime
from slimserve.steps import BuildTrtParams, ExportOnnxParams, ProfileShape

CFG = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64, "vocab_size": 300}
FITS = BuildTrtParams(
    batch=ProfileShape(min=1, opt=4, max=8),
    sequence=ProfileShape(min=1, opt=16, max=64),
    past=ProfileShape(min=1, opt=32, max=64),
)


# -- profile shapes ---------------------------------------------------------------------------


def test_profile_shapes_cover_every_input():
    shapes = build_trt.profile_shapes(FITS, CFG)
    assert shapes["input_ids"] == ((1, 1), (4, 16), (8, 64))
    assert shapes["position_ids"] == shapes["input_ids"]
    assert shapes["attention_mask"] == ((1, 2), (4, 48), (8, 128))  # past + sequence
    assert shapes["past_key_values.1.value"] == ((1, 2, 1, 16), (4, 2, 32, 16), (8, 2, 64, 16))
    assert len(shapes) == 3 + 2 * CFG["n_layer"]


def test_profile_larger_than_the_context_is_one_clear_error():
    with pytest.raises(build_trt.ProfileError) as err:
        build_trt.profile_shapes(BuildTrtParams(), CFG)  # defaults: sequence 256, past 512
    msg = str(err.value)
    assert "sequence.max 256 exceeds the model's context 64" in msg
    assert "past.max 512 exceeds the model's context 64" in msg


def test_profile_minimum_is_one_not_zero():
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        ProfileShape(min=0, opt=1, max=2)
    with pytest.raises(ValidationError, match="min <= opt <= max"):
        ProfileShape(min=4, opt=2, max=8)


# -- precision per TensorRT version -----------------------------------------------------------


def test_precision_plan_per_tensorrt_version():
    ten = build_trt.precision_plan("10.13.3.9", "fp16")
    assert (ten.fp16_flag, ten.convert_onnx_fp16, ten.strongly_typed) == (True, False, False)
    eleven = build_trt.precision_plan("11.1.0", "fp16")
    assert (eleven.fp16_flag, eleven.convert_onnx_fp16, eleven.strongly_typed) == (
        False,
        True,
        True,
    )
    for version in ("10.0.1", "11.4.0"):
        fp32 = build_trt.precision_plan(version, "fp32")
        assert not fp32.fp16_flag and not fp32.convert_onnx_fp16
    assert "BuilderFlag.FP16" in ten.describe() and "strongly typed" in eleven.describe()
    with pytest.raises(RuntimeError, match="too old"):
        build_trt.precision_plan("8.6.1", "fp16")
    with pytest.raises(ValueError, match="precision"):
        build_trt.precision_plan("10.1", "int4")


# -- a tiny exported model shared by the rest ------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> SimpleNamespace:
    torch_dir = make_torch_artifact(tmp_path_factory.mktemp("student"))
    onnx_dir = tmp_path_factory.mktemp("student-onnx")
    export_folder(torch_dir, onnx_dir, ExportOnnxParams(optimize=False, append_graph=False))
    manifest = Manifest(
        variant="student-onnx",
        profile="test",
        step="export-onnx",
        parent="student",
        runtime="onnxruntime",
        config_hash="c",
        parent_hash=None,
    )
    write_manifest(onnx_dir, manifest)
    ref = torch_rt.load(torch_dir, device="cpu", dtype="float32", threads=1)
    return SimpleNamespace(torch_dir=torch_dir, onnx_dir=onnx_dir, ref=ref)


def test_fp16_conversion_keeps_norms_softmax_and_io_fp32(models, tmp_path):
    dst = tmp_path / "model.fp16.onnx"
    facts = build_trt.convert_fp16(models.onnx_dir / MODEL_FILE, dst)
    assert facts["io_types"] == "float32"
    check_onnx(dst)  # SSA, topological order and types all valid
    model = onnx.shape_inference.infer_shapes(onnx.load(str(dst)))
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    types.update({v.name: v.type.tensor_type.elem_type for v in model.graph.input})
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax", "Pow"):
            assert all(types.get(i, f32) == f32 for i in node.input if i), node.name
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert matmuls and all(types.get(n.input[0]) == f16 for n in matmuls)
    assert all(v.type.tensor_type.elem_type != f16 for v in model.graph.input)
    feeds = {"input_ids": np.array([[5, 6, 7]]), "attention_mask": np.ones((1, 3), np.int64)}
    feeds["position_ids"] = np.array([[0, 1, 2]])
    for i in range(2):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((1, 2, 0, 16), np.float32)
    half = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, feeds)
    full = ort.InferenceSession(str(models.onnx_dir / MODEL_FILE)).run(None, feeds)
    assert half[0].dtype == np.float32
    assert np.abs(half[0] - full[0]).max() < 1e-2  # fp16 rounding only (3e-3 measured)


def test_parent_checks(models, tmp_path):
    assert build_trt._check_parent(models.onnx_dir) == models.onnx_dir / MODEL_FILE
    with pytest.raises(ArtifactError, match="no manifest.json"):
        build_trt._check_parent(tmp_path / "missing")
    with pytest.raises(ArtifactError, match="needs an ONNX parent"):
        build_trt._check_parent(models.torch_dir)
    fused = tmp_path / "fused"
    fused.mkdir()
    for f in models.onnx_dir.iterdir():
        (fused / f.name).write_bytes(f.read_bytes())
    (fused / "onnx.json").write_text(
        json.dumps({"model": MODEL_FILE, "graph": "ort-gpt2-fused", "precision": "float32"})
    )
    with pytest.raises(ArtifactError, match="optimize: false"):
        build_trt._check_parent(fused)
    (fused / "onnx.json").write_text(json.dumps({"model": MODEL_FILE, "precision": "int8"}))
    with pytest.raises(ArtifactError, match="needs an fp32 graph"):
        build_trt._check_parent(fused)


@pytest.mark.skipif(hardware.missing("tensorrt") is None, reason="TensorRT is available here")
def test_step_refuses_without_tensorrt(models, tmp_path):
    ctx = fake_ctx(models.onnx_dir, tmp_path / "trt", FITS)
    with pytest.raises(RuntimeError, match="build-trt cannot run here: "):
        build_trt.run(ctx)


# -- the runtime over a fake engine -----------------------------------------------------------


class Mode(enum.Enum):
    INPUT = 0
    OUTPUT = 1


class DType(enum.Enum):
    FLOAT = 0
    INT64 = 1


FAKE_TRT = SimpleNamespace(TensorIOMode=Mode)


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine, self.shapes, self.addresses, self.runs = engine, {}, {}, 0

    def set_input_shape(self, name, shape):
        assert self.engine.get_tensor_mode(name) is Mode.INPUT
        assert min(shape) >= 1, f"{name} {shape}: outside a TensorRT profile (min 1)"
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        b, t = self.shapes["input_ids"]
        past = self.shapes["past_key_values.0.key"]
        if name == "logits":
            return (b, t, self.engine.vocab)
        return (b, past[1], past[2] + t, past[3])

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream):
        names = self.engine.names
        assert set(self.addresses) == set(names), "every tensor needs an address"
        assert set(self.shapes) == set(self.engine.inputs), "every input needs a shape"
        buffers = self.engine.buffers  # find the tensors behind the addresses
        by_ptr = {t.data_ptr(): t for t in buffers._keep + buffers._outs}
        feeds = {n: by_ptr[self.addresses[n]].numpy() for n in self.engine.inputs}
        for name, value in zip(
            self.engine.outputs, self.engine.session.run(None, feeds), strict=True
        ):
            out = by_ptr[self.addresses[name]]
            assert tuple(out.shape) == value.shape
            out.copy_(torch.from_numpy(value))
        self.shapes, self.addresses, self.runs = {}, {}, self.runs + 1
        return True


class FakeEngine:
    """An "engine" whose profile rejects P = 0 like TensorRT's, executed by ONNX Runtime."""

    def __init__(self, path: Path, vocab: int, buffers: TorchBuffers):
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.names = self.outputs[::-1] + self.inputs  # any order: the runtime asks modes
        self.vocab, self.buffers = vocab, buffers

    @property
    def num_io_tensors(self):
        return len(self.names)

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return Mode.INPUT if name in self.inputs else Mode.OUTPUT

    def get_tensor_dtype(self, name):
        return DType.INT64 if name in self.inputs[:3] else DType.FLOAT

    def create_execution_context(self):
        return FakeContext(self)


@pytest.fixture(scope="module")
def fake_trt(models) -> TrtRuntime:
    buffers = TorchBuffers(torch.device("cpu"))
    engine = FakeEngine(models.onnx_dir / MODEL_FILE, CFG["vocab_size"], buffers)
    info = RuntimeInfo("tensorrt", 64, models.ref.info.vocab_size, "cpu", "float32", 2, 2, 16, 1)
    limits = {k: getattr(FITS, k).model_dump() for k in ("batch", "sequence", "past")}
    return TrtRuntime(engine, buffers, info, limits, FAKE_TRT)


def test_fake_engine_prefill_decode_score_match_torch(fake_trt, models):
    ref = models.ref
    seqs = [[1, 2, 3], [10, 20, 30, 40, 50], [9]]
    logits, state = fake_trt.prefill(seqs)
    ref_logits, _ = ref.prefill(seqs)
    assert (logits - ref_logits).abs().max() < 1e-4
    assert state.past_length == 6 and state.mask[:, 0].tolist() == [0, 0, 0]  # padding column
    assert state.positions.tolist() == [3, 5, 1]
    ids = torch.randint(0, ref.info.vocab_size, (2, 64))
    assert (fake_trt.score(ids) - ref.score(ids)).abs().max() < 1e-4
    prompts = prompt_ids(models.torch_dir, 16, 64)
    record = check_parity(ref, fake_trt, prompts, 16, 1e-4, ids)
    assert record["passed"] and record["padded_batch_identical"]


def test_fake_engine_state_survives_merge_and_select(fake_trt, models):
    ref = models.ref
    _, a = fake_trt.prefill([[1, 2, 3, 4, 5, 6]])
    _, b = fake_trt.prefill([[7, 8]])
    both = merge(a, b)
    logits, both = fake_trt.decode(torch.tensor([11, 12]), both)
    _, r = ref.prefill([[1, 2, 3, 4, 5, 6], [7, 8]])
    ref_logits, _ = ref.decode(torch.tensor([11, 12]), r)
    assert (logits - ref_logits).abs().max() < 1e-4
    kept = select(both, [1])
    assert kept.past_length == 3  # the padding column and left padding trimmed away
    logits, _ = fake_trt.decode(torch.tensor([13]), kept)
    _, r = ref.prefill([[7, 8, 12]])
    ref_logits, _ = ref.decode(torch.tensor([13]), r)
    assert (logits - ref_logits).abs().max() < 1e-4


def test_profile_limits_are_checked_before_the_engine(fake_trt):
    runs = fake_trt.context.runs
    ids, mask = torch.ones((9, 1), dtype=torch.long), torch.ones((9, 2), dtype=torch.long)
    with pytest.raises(ValueError, match=r"batch 9 is outside the engine's profile \[1, 8\]"):
        fake_trt._execute(ids, mask, ids, fake_trt._pad_column(9))
    assert fake_trt.context.runs == runs
    fake_trt.prefill([[1]] * 9)  # the runtime runs a wider batch in row groups instead
    assert fake_trt.context.runs == runs + 2


def test_torch_buffers_bookkeeping():
    buf = TorchBuffers(torch.device("cpu"))
    buf.begin()
    x = torch.arange(6).view(2, 3).t()  # non-contiguous: bound as a contiguous copy
    ptr = buf.input(x, torch.int64)
    assert ptr == buf._keep[0].data_ptr() and buf._keep[0].is_contiguous()
    p1, p2 = buf.output((2, 2), torch.float32), buf.output((1,), torch.float32)
    outs = buf.finish()
    assert [o.data_ptr() for o in outs] == [p1, p2] and buf._keep == [] and buf.stream() == 0


# -- a real engine, where TensorRT and a GPU exist -------------------------------------------


@pytest.mark.gpu
def test_real_engine_builds_and_matches_onnx(models, tmp_path):
    reason = hardware.missing("tensorrt")
    if reason:
        pytest.skip(reason)
    from slimserve.runtimes import trt_rt

    out = tmp_path / "student-trt"
    params = FITS.model_copy(update={"precision": "fp32"})
    result = build_trt.run(fake_ctx(models.onnx_dir, out, params))
    assert result.details["parity_vs_onnx"]["passed"]
    assert result.details["tensorrt_version"] and result.details["gpu"]
    rt = trt_rt.load(out)
    logits, state = rt.prefill([[1, 2, 3], [4]])
    assert logits.is_cuda and state.keys[0].is_cuda


# -- the build step against a fake `tensorrt` module ------------------------------------------


def fake_tensorrt(version: str, calls: list) -> SimpleNamespace:
    """Just the TensorRT 10/11 builder API build-trt uses, recording every call."""

    class Network:
        pass

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            calls.append(("parser", network))

        def parse_from_file(self, path):
            calls.append(("parse", path))
            return True

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            calls.append(("set_shape", name, lo, opt, hi))

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls.append(("pool", pool, size))

        def set_flag(self, flag):
            calls.append(("flag", flag))

        def add_optimization_profile(self, profile):
            calls.append(("add_profile", profile))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls.append(("network", flags))
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"PLAN"

    return SimpleNamespace(
        __version__=version,
        Logger=Logger,
        Builder=Builder,
        OnnxParser=Parser,
        NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1),
        BuilderFlag=SimpleNamespace(FP16="FP16"),
        MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"),
    )


@pytest.mark.parametrize("version", ["10.13.0", "11.1.0"])
def test_build_step_drives_the_builder_api(version, models, fake_trt, tmp_path, monkeypatch):
    import sys

    from slimserve.runtimes import trt_rt

    calls: list = []
    module = fake_tensorrt(version, calls)
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setattr(hardware, "missing", lambda requirement: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Fake GPU")
    monkeypatch.setattr(trt_rt, "load", lambda folder, **kw: fake_trt)  # ORT behind the API
    out = tmp_path / "student-trt"
    result = build_trt.run(fake_ctx(models.onnx_dir, out, FITS))

    assert (out / "model.plan").read_bytes() == b"PLAN"
    sidecar = json.loads((out / "trt.json").read_text())
    assert sidecar["limits"]["past"] == {"min": 1, "opt": 32, "max": 64}
    assert sidecar["tensorrt_version"] == version and sidecar["gpu"] == "Fake GPU"
    shapes = {c[1]: c[2:] for c in calls if c[0] == "set_shape"}
    assert shapes == build_trt.profile_shapes(FITS, CFG)
    parsed = Path(next(c[1] for c in calls if c[0] == "parse"))
    network_flags = next(c[1] for c in calls if c[0] == "network")
    if version.startswith("10"):
        assert ("flag", "FP16") in calls and network_flags == 0
        assert parsed.name == "model.trt.onnx"  # logits_to_keep frozen: one fixed signature
        assert result.details["frozen_inputs"] == ["logits_to_keep"]
    else:  # strongly typed: no precision flag, an fp16 ONNX graph parsed instead
        assert not any(c[0] == "flag" for c in calls) and network_flags == 1 << 1
        assert parsed.name == "model.fp16.onnx" and result.details["fp16_onnx"]
    assert ("pool", "WORKSPACE", FITS.workspace_mb << 20) in calls
    assert result.details["parity_vs_onnx"]["max_abs_logit_diff"] < 1e-4
    assert result.params_total > 0 and (out / "tokenizer.json").is_file()
