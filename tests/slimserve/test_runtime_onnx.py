"""The ONNX Runtime runtime against the torch runtime on the same tiny GPT-2 (CPU, fp32), on the
standard graph and on the append graph (KV cache in arenas), with each graph's weights inline
(the layout of folders written before the shared weights file) and with both graphs reading one
shared weights file (what export-onnx writes now)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from build_engines.onnx_append import APPEND_FILE, export_append_onnx
from build_engines.onnx_export import export_kv_onnx, load_parent_model, prepare_folder
from build_engines.onnx_graph import WEIGHTS_FILE, share_weights
from slimserve.artifacts import Manifest, write_manifest
from slimserve.runtimes import load
from slimserve.runtimes.arena import GROW_MIN, ArenaKVState
from slimserve.runtimes.base import Runtime
from slimserve.runtimes.base import merge as base_merge
from slimserve.runtimes.base import select as base_select
from slimserve.runtimes.onnx_rt import SIDECAR, OnnxRuntime

TOL = 1e-4  # fp32 on both sides: only summation order differs


@pytest.fixture(scope="module")
def onnx_dir(tiny_model_dir: Path, tmp_path_factory) -> Path:
    """The tiny model exported with the KV cache into an artifact folder with a manifest."""
    out = tmp_path_factory.mktemp("tiny-onnx")
    prepare_folder(tiny_model_dir, out)
    export_kv_onnx(load_parent_model(tiny_model_dir), out / "model.onnx")
    (out / SIDECAR).write_text(json.dumps({"model": "model.onnx", "precision": "float32"}))
    write_manifest(
        out,
        Manifest(
            variant="tiny-onnx",
            profile="test",
            step="export-onnx",
            parent="tiny",
            runtime="onnxruntime",
            config_hash="c",
            parent_hash=None,
        ),
    )
    return out


@pytest.fixture(scope="module")
def append_dir(onnx_dir: Path, tiny_model_dir: Path, tmp_path_factory) -> Path:
    """The same folder plus the append graph, named in the sidecar."""
    out = tmp_path_factory.mktemp("tiny-onnx-append")
    shutil.copytree(onnx_dir, out, dirs_exist_ok=True)
    export_append_onnx(load_parent_model(tiny_model_dir), out / APPEND_FILE)
    meta = json.loads((out / SIDECAR).read_text())
    (out / SIDECAR).write_text(json.dumps({**meta, "append": APPEND_FILE}))
    return out


@pytest.fixture(scope="module")
def shared_dir(append_dir: Path, tmp_path_factory) -> Path:
    """The same two graphs with their weights moved into one shared file."""
    out = tmp_path_factory.mktemp("tiny-onnx-shared")
    shutil.copytree(append_dir, out, dirs_exist_ok=True)
    share_weights(out, ["model.onnx", APPEND_FILE])
    meta = json.loads((out / SIDECAR).read_text())
    (out / SIDECAR).write_text(json.dumps({**meta, "weights": WEIGHTS_FILE}))
    return out


@pytest.fixture(scope="module", params=["standard", "append", "shared"])
def ort_rt(request, onnx_dir, append_dir, shared_dir):
    folder = {"standard": onnx_dir, "append": append_dir, "shared": shared_dir}[request.param]
    rt = load(folder, device="cpu", threads=1)
    assert rt.append == (request.param != "standard")
    assert rt.info.extra["graph"] == ("standard" if request.param == "standard" else "append")
    return rt


@pytest.fixture(scope="module")
def append_rt(append_dir):
    return load(append_dir, device="cpu", threads=1)


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def test_load_dispatches_and_reports(ort_rt, tiny_runtime):
    assert isinstance(ort_rt, OnnxRuntime) and isinstance(ort_rt, Runtime)
    info = ort_rt.info
    assert (info.runtime, info.device, info.dtype, info.threads) == (
        "onnxruntime",
        "cpu",
        "float32",
        1,
    )
    assert info.extra["providers"] == "CPUExecutionProvider"
    ref = tiny_runtime.info
    assert (
        info.context_length,
        info.vocab_size,
        info.num_layers,
        info.num_heads,
        info.head_dim,
    ) == (
        ref.context_length,
        ref.vocab_size,
        ref.num_layers,
        ref.num_heads,
        ref.head_dim,
    )


def test_score_prefill_decode_match_torch(ort_rt, tiny_runtime):
    ids = torch.randint(1, ort_rt.info.vocab_size, (2, ort_rt.info.context_length))
    assert close(ort_rt.score(ids), tiny_runtime.score(ids)) < TOL
    seq = [5, 17, 42, 99, 3]
    a_logits, a = ort_rt.prefill([seq])
    b_logits, b = tiny_runtime.prefill([seq])
    assert a_logits.shape == (1, ort_rt.info.vocab_size) and a_logits.dtype == torch.float32
    assert close(a_logits, b_logits) < TOL
    for tok in [7, 250, 1, 64, 64, 12]:
        a_logits, a = ort_rt.decode(torch.tensor([tok]), a)
        b_logits, b = tiny_runtime.decode(torch.tensor([tok]), b)
        assert close(a_logits, b_logits) < TOL
    assert a.past_length == len(seq) + 6 and a.positions.tolist() == [len(seq) + 6]
    assert all(isinstance(k, torch.Tensor) and k.shape == b.keys[0].shape for k in a.keys)
    assert close(a.keys[1], b.keys[1]) < TOL and close(a.values[0], b.values[0]) < TOL


def test_left_padded_batch_matches_torch(ort_rt, tiny_runtime):
    seqs = [[1, 2, 3], [10, 20, 30, 40, 50, 60, 70], [9], [4, 4, 4, 4]]
    a_logits, a = ort_rt.prefill(seqs)
    b_logits, b = tiny_runtime.prefill(seqs)
    assert close(a_logits, b_logits) < TOL
    assert a.mask.tolist() == b.mask.tolist() and a.positions.tolist() == [3, 7, 1, 4]
    for step in range(5):
        toks = torch.tensor([11 + step, 22 + step, 33 + step, 44 + step])
        a_logits, a = ort_rt.decode(toks, a)
        b_logits, b = tiny_runtime.decode(toks, b)
        assert close(a_logits, b_logits) < TOL
    for row, seq in enumerate(seqs):  # each padded row equals that prompt run alone
        alone, _ = ort_rt.prefill([seq])
        first, _ = ort_rt.prefill(seqs)
        assert close(first[row], alone[0]) < TOL


def test_merge_and_select_through_base_helpers(ort_rt, tiny_runtime):
    merge = getattr(ort_rt, "merge", base_merge)  # as the engine picks them
    select = getattr(ort_rt, "select", base_select)
    _, s1 = ort_rt.prefill([[1, 2, 3, 4, 5, 6]])
    _, s2 = ort_rt.prefill([[7, 8], [9, 10, 11]])
    _, s1 = ort_rt.decode(torch.tensor([12]), s1)
    merged = merge(s1, s2)  # P = 7 vs 3: the second batch is left-padded by 4
    assert merged.batch_size == 3 and merged.past_length == 7
    a_logits, a = ort_rt.decode(torch.tensor([13, 14, 15]), merged)
    _, r1 = tiny_runtime.prefill([[1, 2, 3, 4, 5, 6, 12]])
    r1_logits, _ = tiny_runtime.decode(torch.tensor([13]), r1)
    _, r2 = tiny_runtime.prefill([[7, 8], [9, 10, 11]])
    r2_logits, _ = tiny_runtime.decode(torch.tensor([14, 15]), r2)
    assert close(a_logits, torch.cat([r1_logits, r2_logits])) < TOL
    kept = select(a, [2, 1])  # the 7-token row leaves: leading all-padding columns are dropped
    assert kept.past_length == 4 and kept.positions.tolist() == [4, 3]
    k_logits, _ = ort_rt.decode(torch.tensor([16, 17]), kept)
    _, r = tiny_runtime.prefill([[9, 10, 11, 15], [7, 8, 14]])
    r_logits, _ = tiny_runtime.decode(torch.tensor([16, 17]), r)
    assert close(k_logits, r_logits) < TOL


def test_context_limits_are_errors(ort_rt):
    ctx = ort_rt.info.context_length
    with pytest.raises(ValueError, match="exceeds context length"):
        ort_rt.prefill([[1] * (ctx + 1)])
    _, state = ort_rt.prefill([[1] * ctx])
    with pytest.raises(ValueError, match="decode past the context length"):
        ort_rt.decode(torch.tensor([1]), state)


def test_device_and_threads_are_explicit(onnx_dir, monkeypatch):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(ValueError, match="CUDAExecutionProvider"):
            load(onnx_dir, device="cuda")
    elif not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
            load(onnx_dir, device="cuda")
    else:  # onnxruntime-gpu on a GPU machine: device="cuda" is honoured, never silently CPU
        assert load(onnx_dir, device="cuda", threads=1).info.device == "cuda:0"
    monkeypatch.setenv("SLIMSERVE_ORT_THREADS", "2")
    assert load(onnx_dir, device="cpu").info.threads == 2
    monkeypatch.setenv("SLIMSERVE_ORT_THREADS", "two")
    with pytest.raises(ValueError, match="SLIMSERVE_ORT_THREADS must be an integer"):
        load(onnx_dir, device="cpu")


def test_onnx_runtime_imports_no_model_code():
    """An ONNX replica needs no transformers model classes (only config.json, read as JSON)."""
    import subprocess
    import sys

    code = (
        "import sys; import slimserve.runtimes.onnx_rt; "
        "print(any(m.startswith('transformers') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_io_binding_path_matches_plain_run(onnx_dir):
    """The I/O-binding path CUDA uses (preallocated outputs, empty past bound to a real address)
    gives the same results as plain `run`; exercised on CPU, where it needs no GPU."""
    plain = load(onnx_dir, device="cpu", threads=1)
    bound = load(onnx_dir, device="cpu", threads=1)
    bound.io_binding = True
    seqs = [[3, 4, 5, 6], [7, 8]]
    a_logits, a = plain.prefill(seqs)
    b_logits, b = bound.prefill(seqs)
    assert close(a_logits, b_logits) == 0.0 and close(a.keys[0], b.keys[0]) == 0.0
    for tok in ([9, 10], [11, 12]):
        a_logits, a = plain.decode(torch.tensor(tok), a)
        b_logits, b = bound.decode(torch.tensor(tok), b)
        assert close(a_logits, b_logits) == 0.0 and close(a.values[1], b.values[1]) == 0.0
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert close(plain.score(ids), bound.score(ids)) == 0.0


def test_append_decode_writes_in_place_and_regrows_when_full(append_rt, tiny_runtime):
    """Decode appends into the arena (no copy) until it is full, then moves to a roomier one;
    logits track the torch runtime all the way, and unused columns stay zero."""
    seq = [5, 17, 42, 99, 3]
    _, a = append_rt.prefill([seq])
    _, b = tiny_runtime.prefill([seq])
    arenas = []
    for step in range(GROW_MIN + 4):  # past the first arena's capacity (5 + GROW_MIN)
        tok = torch.tensor([(step * 37) % 200 + 1])
        a_logits, a = append_rt.decode(tok, a)
        b_logits, b = tiny_runtime.decode(tok, b)
        assert close(a_logits, b_logits) < TOL
        assert isinstance(a, ArenaKVState) and a.arena is not None
        if not arenas or arenas[-1] is not a.arena:
            arenas.append(a.arena)
        spare = a.arena.keys[0][:, :, a.past_length :]
        assert a.arena.length == a.past_length and not spare.any()
    assert len(arenas) == 2 and arenas[0].capacity == len(seq) + GROW_MIN
    assert close(a.keys[1], b.keys[1]) < TOL and close(a.values[0], b.values[0]) < TOL


def test_append_decode_from_an_older_state_stays_correct(append_rt):
    """Two decodes from one state (the second finds the arena moved on) give the same result."""
    _, s = append_rt.prefill([[1, 2, 3], [4, 5, 6, 7]])
    _, s = append_rt.decode(torch.tensor([8, 9]), s)
    first, newer = append_rt.decode(torch.tensor([10, 11]), s)
    again, other = append_rt.decode(torch.tensor([10, 11]), s)  # s is no longer the newest
    assert close(first, again) == 0.0 and other.arena is not newer.arena
    assert close(newer.keys[0], other.keys[0]) == 0.0


def test_append_decode_leaves_earlier_masks_alone(append_rt):
    """A decoded state's mask is a view of the mask the runtime feeds the graph: the steps after
    it write only columns past it, so every earlier state keeps its own (padding included)."""
    _, s = append_rt.prefill([[1, 2, 3], [4, 5, 6, 7]])  # row 0 left-padded by one column
    states, masks = [], []
    for step in range(GROW_MIN + 3):  # through a regrown arena
        _, s = append_rt.decode(torch.tensor([8 + step, 9 + step]), s)
        states.append(s)
        masks.append(s.mask.clone())
    for state, mask in zip(states, masks, strict=True):
        assert torch.equal(state.mask, mask)
        assert mask.shape == (2, state.past_length) and mask.dtype == torch.int64
        assert mask[0, 0] == 0 and mask[0, 1:].all() and mask[1].all()


def test_a_runtime_opens_one_graph_of_a_shared_folder(shared_dir, monkeypatch):
    """Each ONNX Runtime session keeps its own prepacked copy of the weights, so a replica that
    opened both graphs would hold them twice: `load` opens the one graph it serves."""
    import onnx
    import onnxruntime
    from onnx.external_data_helper import uses_external_data

    opened: list[str] = []
    real = onnxruntime.InferenceSession

    class Counting(real):
        def __init__(self, path, *args, **kwargs):
            opened.append(Path(path).name)
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", Counting)
    rt = load(shared_dir, device="cpu", threads=1)
    assert opened == [APPEND_FILE] and rt.append
    graph = onnx.load(str(shared_dir / APPEND_FILE), load_external_data=False)
    assert any(uses_external_data(t) for t in graph.graph.initializer)  # read from the file
    logits, state = rt.prefill([[3, 4, 5]])
    assert torch.isfinite(logits).all() and state.past_length == 3
