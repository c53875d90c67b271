"""The torch runtime against full-sequence forwards, and `runtimes.load` dispatch."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from slimserve.artifacts import ArtifactError
from slimserve.runtimes import load, runtime_name, runtime_spec
from slimserve.runtimes.base import KVState, Runtime, merge, select

TOL = 1e-4  # fp32 on CPU: cached decode vs full forward differ only by summation order


def full_last(rt, seq: list[int]) -> torch.Tensor:
    """Reference: last-token logits (V,) of one unpadded full forward."""
    return rt.score(torch.tensor([seq]))[0, -1]


def assert_rows_match(rt, logits: torch.Tensor, seqs: list[list[int]]) -> None:
    for row, seq in enumerate(seqs):
        diff = (logits[row] - full_last(rt, seq)).abs().max().item()
        assert diff < TOL, f"row {row}: max |diff| {diff}"


def test_prefill_then_decode_equals_full_forward(tiny_runtime):
    rt = tiny_runtime
    seq = [5, 17, 42, 99, 3]
    logits, state = rt.prefill([seq])
    assert logits.shape == (1, rt.info.vocab_size) and logits.dtype == torch.float32
    assert_rows_match(rt, logits, [seq])
    for tok in [7, 250, 1, 64, 64, 12]:
        seq = seq + [tok]
        logits, state = rt.decode(torch.tensor([tok]), state)
        assert_rows_match(rt, logits, [seq])
    assert state.past_length == len(seq) and state.positions.tolist() == [len(seq)]


def test_left_padded_batch_equals_each_row(tiny_runtime):
    rt = tiny_runtime
    seqs = [[1, 2, 3], [10, 20, 30, 40, 50, 60, 70], [9], [4, 4, 4, 4]]
    logits, state = rt.prefill(seqs)
    assert_rows_match(rt, logits, seqs)
    assert state.mask.tolist()[0] == [0, 0, 0, 0, 1, 1, 1]
    assert state.positions.tolist() == [3, 7, 1, 4]
    assert all(k.shape == (4, rt.info.num_heads, 7, rt.info.head_dim) for k in state.keys)
    for step in range(5):
        toks = [11 + step, 22 + step, 33 + step, 44 + step]
        seqs = [s + [t] for s, t in zip(seqs, toks, strict=True)]
        logits, state = rt.decode(torch.tensor(toks), state)
        assert_rows_match(rt, logits, seqs)


def test_merge_and_select_keep_each_rows_logits(tiny_runtime):
    rt = tiny_runtime
    seqs = [[3, 1, 4, 1, 5], [2, 7]]
    _, state = rt.prefill(seqs)
    for tok in (8, 9, 10):
        seqs = [s + [tok] for s in seqs]
        _, state = rt.decode(torch.tensor([tok, tok]), state)
    joiner = [[6, 6, 6], [200, 100, 50, 25, 12, 6, 3, 1, 0, 7, 9]]  # shorter and longer than P
    _, fresh = rt.prefill(joiner)
    state = merge(state, fresh)
    seqs = seqs + joiner
    assert state.batch_size == 4 and state.past_length == 11
    toks = [1, 2, 3, 4]
    seqs = [s + [t] for s, t in zip(seqs, toks, strict=True)]
    logits, state = rt.decode(torch.tensor(toks), state)
    assert_rows_match(rt, logits, seqs)

    state = select(state, [2, 0])  # the longest row leaves: leading padding is trimmed
    seqs = [seqs[2], seqs[0]]
    assert state.past_length == max(len(s) for s in seqs)
    for tok in (5, 6):
        seqs = [s + [tok] for s in seqs]
        logits, state = rt.decode(torch.tensor([tok, tok]), state)
        assert_rows_match(rt, logits, seqs)


def test_decoding_twice_from_one_state_is_independent(tiny_runtime):
    """The in-place append must not let a second decode of the same state clobber the first."""
    rt = tiny_runtime
    seq = [1, 2, 3, 4]
    _, s0 = rt.prefill([seq])
    _, s1 = rt.decode(torch.tensor([5]), s0)
    _, s2 = rt.decode(torch.tensor([6]), s1)  # s1 -> s2 appends in place
    branch, _ = rt.decode(torch.tensor([7]), s1)  # s1 again: must copy, not overwrite s2
    assert_rows_match(rt, branch, [seq + [5, 7]])
    again, _ = rt.decode(torch.tensor([8]), s2)
    assert_rows_match(rt, again, [seq + [5, 6, 8]])


def test_plain_kvstate_is_accepted(tiny_runtime):
    """Any KVState (e.g. built by another runtime or by merge) decodes, not only torch's own."""
    rt = tiny_runtime
    seq = [9, 8, 7]
    _, state = rt.prefill([seq])
    plain = KVState(
        [k.clone() for k in state.keys],
        [v.clone() for v in state.values],
        state.mask,
        state.positions,
    )
    logits, _ = rt.decode(torch.tensor([6]), plain)
    assert_rows_match(rt, logits, [seq + [6]])


def test_score_shape(tiny_runtime):
    out = tiny_runtime.score(torch.tensor([[1, 2, 3], [4, 5, 6]]))
    assert out.shape == (2, 3, tiny_runtime.info.vocab_size) and out.dtype == torch.float32


def test_context_limits(tiny_runtime):
    rt = tiny_runtime
    n = rt.info.context_length
    with pytest.raises(ValueError, match="context"):
        rt.prefill([[1] * (n + 1)])
    logits, state = rt.prefill([[1] * (n - 1)])
    logits, state = rt.decode(torch.tensor([2]), state)  # fills position n - 1
    assert state.past_length == n
    with pytest.raises(ValueError, match="context"):
        rt.decode(torch.tensor([3]), state)


def test_info_fields(tiny_runtime):
    info = tiny_runtime.info
    assert isinstance(tiny_runtime, Runtime)
    assert info.runtime == "torch"
    assert (info.context_length, info.vocab_size) == (128, 300)
    assert (info.num_layers, info.num_heads, info.head_dim) == (2, 2, 16)
    assert (info.device, info.dtype, info.threads) == ("cpu", "float32", 1)
    assert not tiny_runtime.model.training


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_from_env(tiny_model_dir, monkeypatch, restore_threads):
    monkeypatch.setenv("SLIMSERVE_TORCH_THREADS", "2")
    rt = load(tiny_model_dir, device="cpu")
    assert rt.info.threads == 2 == torch.get_num_threads()


@pytest.mark.parametrize("dtype,tol", [("bfloat16", 0.1), ("float16", 0.02)])
def test_half_precision_on_cpu(tiny_model_dir, tiny_runtime, dtype, tol, restore_threads):
    rt = load(tiny_model_dir, device="cpu", dtype=dtype, threads=1)
    assert rt.info.dtype == dtype
    seqs = [[1, 2, 3], [7, 8]]
    logits, state = rt.prefill(seqs)
    logits, _ = rt.decode(torch.tensor([4, 9]), state)
    assert logits.dtype == torch.float32
    ref, state = tiny_runtime.prefill(seqs)
    ref, _ = tiny_runtime.decode(torch.tensor([4, 9]), state)
    assert (logits - ref).abs().max().item() < tol


def test_bad_options(tiny_model_dir):
    with pytest.raises(ValueError, match="dtype"):
        load(tiny_model_dir, device="cpu", dtype="int3")
    with pytest.raises(ValueError, match="device"):
        load(tiny_model_dir, device="tpu")
    with pytest.raises(ValueError, match="threads"):
        load(tiny_model_dir, device="cpu", threads=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-3), ("float16", 0.02), ("bfloat16", 0.1)])
def test_cuda_matches_cpu(tiny_model_dir, tiny_runtime, dtype, tol):
    rt = load(tiny_model_dir, device="cuda", dtype=dtype, threads=2)
    assert rt.info.device.startswith("cuda")
    seqs = [[1, 2, 3], [7, 8, 9, 10, 11]]
    logits, state = rt.prefill(seqs)
    logits, state = rt.decode(torch.tensor([4, 12], device="cuda"), state)
    assert logits.device.type == "cuda" and logits.dtype == torch.float32
    ref, ref_state = tiny_runtime.prefill(seqs)
    ref, _ = tiny_runtime.decode(torch.tensor([4, 12]), ref_state)
    assert (logits.cpu() - ref).abs().max().item() < tol


# -- runtimes.load dispatch -----------------------------------------------------------------------


def _manifest(folder: Path, runtime: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    doc = {
        "variant": "v",
        "profile": "tiny",
        "step": "export-onnx",
        "parent": None,
        "runtime": runtime,
        "config_hash": "h",
        "parent_hash": None,
    }
    (folder / "manifest.json").write_text(json.dumps(doc))


def test_bare_hf_folder_is_torch(tiny_model_dir):
    assert runtime_name(tiny_model_dir) == "torch"


@pytest.mark.parametrize(
    "runtime,module", [("onnxruntime", "onnx_rt"), ("tensorrt", "trt_rt"), ("torch", "torch_rt")]
)
def test_dispatch_on_manifest(tmp_path, monkeypatch, runtime, module):
    calls = []
    fake = types.ModuleType(f"slimserve.runtimes.{module}")
    fake.load = lambda folder, **kw: calls.append((Path(folder), kw)) or "loaded"
    monkeypatch.setitem(sys.modules, f"slimserve.runtimes.{module}", fake)
    _manifest(tmp_path, runtime)
    assert load(tmp_path, device="cpu", dtype="float16", threads=3) == "loaded"
    # each backend gets only the options its spec takes (TensorRT: neither dtype nor threads)
    given = {"device": "cpu", "dtype": "float16", "threads": 3}
    expected = {k: v for k, v in given.items() if k in runtime_spec(runtime).load_options}
    assert "device" in expected and ("dtype" in expected) == (runtime == "torch")
    assert calls == [(tmp_path, expected)]


def test_unloadable_folders(tmp_path):
    with pytest.raises(ArtifactError, match="no such"):
        load(tmp_path / "missing")
    with pytest.raises(ArtifactError, match="config.json"):
        load(tmp_path)
    _manifest(tmp_path, "tflite")  # not a known runtime: the manifest itself is rejected
    with pytest.raises(ArtifactError, match="runtime"):
        load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt"):
        load(tmp_path)


def test_decode_runs_in_inference_mode_whether_or_not_the_caller_is(tiny_runtime):
    """`inference_mode_once`: a caller outside inference mode still gets inference tensors (no
    autograd record), and one already inside it (the engine's worker) gets the same logits."""
    _, state = tiny_runtime.prefill([[1, 2, 3]])
    assert not torch.is_inference_mode_enabled()
    logits, _ = tiny_runtime.decode(torch.tensor([4]), state)
    assert logits.is_inference() and not torch.is_inference_mode_enabled()
    with torch.inference_mode():
        inside, _ = tiny_runtime.decode(torch.tensor([4]), state)
        assert torch.is_inference_mode_enabled()
    assert torch.equal(logits, inside)
