"""export-onnx on a tiny GPT-2: checker, KV-cache graph, parity, tied embedding, one shared
weights file for both graphs, bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from build_engines.onnx_append import APPEND_FILE, AppendKVLM
from build_engines.onnx_export import MODEL_FILE, OnnxCheckError, check_onnx, export_folder, run
from build_engines.onnx_graph import EXTERNAL_MIN_BYTES, WEIGHTS_FILE
from build_engines.parity import ParityError, check_parity, prompt_ids
from slimserve.artifacts import ArtifactError, Manifest, folder_bytes, read_manifest, write_manifest
from slimserve.runner import StepResult, count_safetensors
from slimserve.steps import ExportOnnxParams
from slimserve.tokenizer import save_hf_tokenizer, train_bpe

CONTEXT = 64
WORDS = [
    "the",
    "a",
    "model",
    "token",
    "cache",
    "batch",
    "list",
    "number",
    "items",
    "return",
    "parse",
    "command",
    "line",
    "def",
    "main",
]


def make_torch_artifact(folder: Path, seed: int = 0, n_embd: int = 32) -> Path:
    """A 2-layer GPT-2 (tied embedding), its tokenizer and a manifest with runtime "torch".

    Biases and LayerNorms are randomised too, so a dropped bias or a mis-wired LayerNorm in
    the graph shows up as a parity failure (fresh GPT-2 init has them at 0 / 1).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)]
    tok = train_bpe(texts, vocab_size=300)
    save_hf_tokenizer(tok, folder, CONTEXT)
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=n_embd,
        vocab_size=tok.get_vocab_size(),
        n_positions=CONTEXT,
        bos_token_id=0,
        eos_token_id=0,
        initializer_range=0.2,  # peaked logits: greedy ties are implausible
    )
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    write_manifest(
        folder,
        Manifest(
            variant="student",
            profile="test",
            step="distill",
            parent="teacher",
            runtime="torch",
            config_hash="c",
            parent_hash=None,
        ),
    )
    return folder


def fake_ctx(parent: Path, out: Path, params, block_size: int = CONTEXT) -> SimpleNamespace:
    """The parts of a StepContext the compile steps read (data = random test blocks)."""
    gen = torch.Generator().manual_seed(1)
    vocab = json.loads((parent / "config.json").read_text())["vocab_size"]

    def blocks(split: str, block: int, max_tokens: int | None = None) -> torch.Tensor:
        n = max(1, (max_tokens or 16 * block) // block)
        return torch.randint(0, vocab, (n, block), generator=gen)

    out.mkdir(parents=True, exist_ok=True)
    return SimpleNamespace(
        variant="student-onnx",
        params=params,
        parent_dir=parent,
        out_dir=out,
        profile=SimpleNamespace(block_size=block_size, eval=SimpleNamespace(max_tokens=2048)),
        data=SimpleNamespace(blocks=blocks, tokenizer_dir=parent),
        log=lambda msg: None,
    )


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    return make_torch_artifact(tmp_path_factory.mktemp("student"))


@pytest.fixture(scope="module")
def exported(parent, tmp_path_factory) -> tuple[Path, StepResult]:
    """The export-onnx step run once (dynamo exporter, fusion tried) into a folder."""
    out = tmp_path_factory.mktemp("student-onnx")
    result = run(fake_ctx(parent, out, ExportOnnxParams()))
    return out, result


def test_graph_has_kv_cache_io_dynamic_axes_and_opset(exported):
    out, _ = exported
    check_onnx(out / MODEL_FILE, full=False)  # the kept graph (maybe fused) is valid
    model = onnx.load(str(out / MODEL_FILE))
    assert {o.domain: o.version for o in model.opset_import}[""] == 18

    def dims(values):
        return {
            v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in values
        }

    ins, outs = dims(model.graph.input), dims(model.graph.output)
    assert ins["input_ids"] == ["batch", "sequence"]
    assert ins["attention_mask"] == ["batch", "total"]
    assert ins["past_key_values.1.value"] == ["batch", 2, "past", 16]
    assert outs["logits"][:2] == ["batch", "kept"]  # min(sequence, logits_to_keep)
    assert outs["present.0.key"] == ["batch", 2, "total", 16]
    assert json.loads((out / "onnx.json").read_text())["precision"] == "float32"


def test_parity_recorded_and_within_tolerance(exported):
    _, result = exported
    parity = result.details["parity"]
    assert parity["passed"] and parity["batch1_identical"] and parity["padded_batch_identical"]
    assert parity["max_abs_logit_diff"] < 1e-4 and parity["greedy_steps"] == 32
    assert result.details["checker"].startswith("passed")


def test_optimisation_choice_is_recorded(exported):
    out, result = exported
    opt = result.details["optimize"]
    graph = json.loads((out / "onnx.json").read_text())["graph"]
    assert opt["requested"] is True
    if opt["kept"]:
        assert graph == "ort-gpt2-fused" and opt["parity"]["passed"]
        assert opt["decode_ms_b1_plus_b8"]["fused"] < opt["decode_ms_b1_plus_b8"]["plain"]
    else:
        assert graph == "standard" and opt["reason"]


def test_tied_embedding_stored_once(exported, parent):
    out, result = exported
    total, nonzero = count_safetensors(parent)  # safetensors stores the tied matrix once
    assert (result.params_total, result.params_nonzero) == (total, nonzero)
    model = onnx.load(str(out / MODEL_FILE))
    vocab = json.loads((parent / "config.json").read_text())["vocab_size"]
    tables = [i for i in model.graph.initializer if vocab in i.dims]
    assert len(tables) == 1 and list(tables[0].dims) == [32, vocab]
    st_bytes = (parent / "model.safetensors").stat().st_size
    assert result.details["weight_bytes"] <= 1.05 * st_bytes


def test_empty_past_and_padded_rows_in_onnxruntime(exported):
    """P = 0 is a valid input, and a left-padded row equals the same row alone."""
    out, _ = exported
    sess = ort.InferenceSession(str(out / MODEL_FILE), providers=["CPUExecutionProvider"])
    seqs = [[5, 6, 7, 8], [9, 10]]
    feeds_for = []
    for ids, mask in (
        ([seqs[0], [0, 0, *seqs[1]]], [[1, 1, 1, 1], [0, 0, 1, 1]]),
        ([seqs[1]], [[1, 1]]),
    ):
        mask_t = torch.tensor(mask)
        pos = ((mask_t.cumsum(-1) - 1).clamp(min=0) * mask_t).numpy()
        feeds = {"input_ids": np.array(ids), "attention_mask": mask_t.numpy(), "position_ids": pos}
        for i in range(2):
            for kv in ("key", "value"):
                feeds[f"past_key_values.{i}.{kv}"] = np.zeros((len(ids), 2, 0, 16), np.float32)
        feeds_for.append(sess.run(None, feeds))
    batch, alone = feeds_for
    assert batch[1].shape == (2, 2, 4, 16)  # present = empty past + 4 new columns
    assert np.abs(batch[0][1, -1] - alone[0][0, -1]).max() < 1e-5


def test_logits_to_keep_limits_the_head_to_the_last_positions(exported, tmp_path):
    """Unfed, every position's logits (scoring, TensorRT); fed N, the last N only, the same
    values; the runtime's prefill feeds 1; TensorRT's copy has it frozen to the default."""
    from build_engines.trt import freeze_initializer_inputs
    from slimserve.runtimes import onnx_rt

    out, result = exported
    assert result.details["logits_to_keep"] is True
    sess = ort.InferenceSession(str(out / MODEL_FILE), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_overridable_initializers()] == ["logits_to_keep"]
    feeds = {
        "input_ids": np.array([[5, 6, 7, 8], [9, 10, 11, 12]]),
        "attention_mask": np.array([[1, 1, 1, 1], [0, 1, 1, 1]]),
        "position_ids": np.array([[0, 1, 2, 3], [0, 0, 1, 2]]),
    }
    for i in range(2):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((2, 2, 0, 16), np.float32)
    full = sess.run(None, feeds)
    assert full[0].shape[:2] == (2, 4)
    for n in (1, 3):
        kept = sess.run(None, {**feeds, "logits_to_keep": np.array([n])})
        assert kept[0].shape[:2] == (2, n)
        np.testing.assert_array_equal(kept[0], full[0][:, -n:])
        np.testing.assert_array_equal(kept[1], full[1])  # the cache is unchanged
    runtime = onnx_rt.load(out, device="cpu", threads=1)
    assert runtime.keeps_logits
    logits, _ = runtime.prefill([[5, 6, 7, 8], [10, 11, 12]])
    np.testing.assert_allclose(logits.numpy(), full[0][:, -1], atol=1e-5)

    frozen = tmp_path / "model.trt.onnx"
    assert freeze_initializer_inputs(out / MODEL_FILE, frozen) == {
        "frozen_inputs": ["logits_to_keep"]
    }
    check_onnx(frozen)
    plain = ort.InferenceSession(str(frozen), providers=["CPUExecutionProvider"])
    assert not plain.get_overridable_initializers()
    np.testing.assert_array_equal(plain.run(None, feeds)[0], full[0])


class _Skewed:
    """A candidate runtime that perturbs a reference: logits +delta, or one flipped token."""

    def __init__(self, ref, delta: float = 0.0, flip_at: int | None = None):
        self.ref, self.delta, self.flip_at, self.info = ref, delta, flip_at, ref.info
        self.calls = 0

    def _skew(self, logits):
        logits = logits + self.delta
        if logits.shape[0] == 3:  # the padded batch: count its steps (prefill = 1)
            self.calls += 1
            if self.calls == self.flip_at:
                logits[1, logits[1].argmin()] = logits[1].max() + 1.0
        return logits

    def prefill(self, seqs):
        logits, state = self.ref.prefill(seqs)
        return self._skew(logits), state

    def decode(self, tokens, state):
        logits, state = self.ref.decode(tokens, state)
        return self._skew(logits), state

    def score(self, ids):
        return self.ref.score(ids) + self.delta


def test_parity_failures_are_reported(parent):
    from slimserve.runtimes import torch_rt

    ref = torch_rt.load(parent, device="cpu", dtype="float32", threads=1)
    prompts = prompt_ids(parent, 8, CONTEXT)
    assert len({len(p) for p in prompts}) == 3  # a padded batch really has padding
    check_parity(ref, _Skewed(ref), prompts, 8, 1e-3)  # identical: passes
    with pytest.raises(ParityError, match=r"max \|logit diff\| 0.01 > tolerance 0.001"):
        check_parity(ref, _Skewed(ref, delta=0.01), prompts, 8, 1e-3)
    with pytest.raises(ParityError, match="padded batch of 3: row 1 step 4"):
        check_parity(ref, _Skewed(ref, flip_at=5), prompts, 8, 1e3)


def test_broken_onnx_fails_the_checker(tmp_path):
    node = onnx.helper.make_node("Add", ["x", "missing"], ["y"])
    graph = onnx.helper.make_graph(
        [node],
        "broken",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "broken.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    with pytest.raises(OnnxCheckError, match="fails the ONNX checker"):
        check_onnx(path)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a protobuf" * 10)
    with pytest.raises(
        OnnxCheckError, match="garbage.onnx: (fails the ONNX checker|not a readable)"
    ):
        check_onnx(garbage)


def test_missing_and_corrupt_parents_raise_one_clear_error(parent, tmp_path):
    params = ExportOnnxParams(optimize=False)
    with pytest.raises(ArtifactError, match="no manifest.json"):
        export_folder(tmp_path / "nowhere", tmp_path / "o1", params)
    bad = tmp_path / "bad-manifest"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt manifest"):
        export_folder(bad, tmp_path / "o2", params)
    torn = tmp_path / "torn-weights"
    torn.mkdir()
    for f in parent.iterdir():
        (torn / f.name).write_bytes(f.read_bytes())
    weights = torn / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="cannot load the parent's weights"):
        export_folder(torn, tmp_path / "o3", params)
    onnx_parent = tmp_path / "onnx-parent"
    onnx_parent.mkdir()
    m = read_manifest(parent).model_copy(update={"runtime": "onnxruntime"})
    write_manifest(onnx_parent, m)
    with pytest.raises(ArtifactError, match="needs a PyTorch parent"):
        export_folder(onnx_parent, tmp_path / "o4", params)


def test_append_graph_written_checked_and_named_in_the_sidecar(exported):
    out, result = exported
    append = result.details["append"]
    assert append["requested"] and append["kept"] and append["parity"]["passed"]
    assert append["parity"]["max_abs_logit_diff"] < 1e-4
    meta = json.loads((out / "onnx.json").read_text())
    assert meta["append"] == APPEND_FILE and meta["model"] == MODEL_FILE
    model = onnx.load(str(out / APPEND_FILE))
    check_onnx(out / APPEND_FILE)
    ins = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in model.graph.input
    }
    outs = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in model.graph.output
    }
    assert ins["past_key_values.0.key"] == ["batch", 2, "past", 16] and "logits_to_keep" in ins
    # only the new columns come out: (B, H, T, D), not the grown cache
    assert outs["new.1.value"] == ["batch", 2, "sequence", 16]
    assert "present.0.key" not in outs and outs["logits"][:2] == ["batch", "kept"]
    vocab = json.loads((out / "config.json").read_text())["vocab_size"]
    tables = [i for i in model.graph.initializer if vocab in i.dims]
    assert len(tables) == 1  # the tied embedding is stored once here too


def test_append_graph_attends_over_masked_buffer_like_the_standard_graph(exported):
    """Decode on a zero-padded buffer (C > P) equals the standard graph on the P columns."""
    out, _ = exported
    std = ort.InferenceSession(str(out / MODEL_FILE), providers=["CPUExecutionProvider"])
    app = ort.InferenceSession(str(out / APPEND_FILE), providers=["CPUExecutionProvider"])
    names = [i.name for i in std.get_inputs() if i.name != "logits_to_keep"]
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 300, (2, 6))
    mask = np.ones((2, 6), np.int64)
    mask[1, :2] = 0  # left padding
    positions = np.clip(np.cumsum(mask, 1) - 1, 0, None) * mask
    empty = {n: np.zeros((2, 2, 0, 16), np.float32) for n in names[3:]}
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **empty}
    s, a = std.run(None, feeds), app.run(None, feeds)
    assert np.abs(s[0] - a[0])[mask.astype(bool)].max() < 1e-4  # prefill: same logits
    assert all(np.abs(x - y).max() < 1e-5 for x, y in zip(s[1:], a[1:], strict=True))
    cap = 10
    buffers = []
    for cache in a[1:]:
        buf = np.zeros((2, 2, cap, 16), np.float32)
        buf[:, :, :6] = cache
        buffers.append(buf)
    tok, pos = np.array([[7], [9]]), mask.sum(1, keepdims=True)
    fed = np.zeros((2, cap + 1), np.int64)
    fed[:, :6], fed[:, cap] = mask, 1
    a = app.run(
        None,
        {
            **dict(zip(names[3:], buffers, strict=True)),
            "input_ids": tok,
            "attention_mask": fed,
            "position_ids": pos,
        },
    )
    grown = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
    s = std.run(
        None,
        {
            **dict(zip(names[3:], s[1:], strict=True)),
            "input_ids": tok,
            "attention_mask": grown,
            "position_ids": pos,
        },
    )
    assert np.abs(s[0] - a[0]).max() < 1e-4
    assert all(np.abs(x[:, :, -1:] - y).max() < 1e-5 for x, y in zip(s[1:], a[1:], strict=True))


def test_append_graph_can_be_turned_off_and_needs_a_plain_gpt2(parent, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "no-append"
    result = run(fake_ctx(parent, out, ExportOnnxParams(optimize=False, append_graph=False)))
    assert result.details["append"] == {"requested": False, "kept": False}
    assert not (out / APPEND_FILE).exists()
    assert "append" not in json.loads((out / "onnx.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(parent)
    model.config.reorder_and_upcast_attn = True  # an attention variant the graph does not cover
    with pytest.raises(ValueError, match="plain GPT-2"):
        AppendKVLM(model)


def external_spans(path: Path) -> set[tuple[str, int, int]]:
    """(file, offset, length) of every initializer of the graph at `path` kept outside it;
    asserts that what stays inline is small (shape constants, scalars, LayerNorm vectors)."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    spans = set()
    for t in onnx.load(str(path), load_external_data=False).graph.initializer:
        if uses_external_data(t):
            info = ExternalDataInfo(t)
            spans.add((info.location, info.offset, info.length))
        else:
            assert len(t.raw_data) < EXTERNAL_MIN_BYTES, f"{t.name} is inline"
    return spans


def test_both_graphs_read_their_weights_from_one_file(exported, parent):
    out, result = exported
    meta = json.loads((out / "onnx.json").read_text())
    assert meta["weights"] == WEIGHTS_FILE
    shared = result.details["weights_file"]
    assert shared["graphs"] == [MODEL_FILE, APPEND_FILE]
    assert shared["bytes"] == (out / WEIGHTS_FILE).stat().st_size
    main, append = external_spans(out / MODEL_FILE), external_spans(out / APPEND_FILE)
    assert {f for f, _, _ in main | append} == {WEIGHTS_FILE}
    # the append graph reads the standard graph's own bytes, and no span is written twice
    assert append <= main
    st_bytes = (parent / "model.safetensors").stat().st_size
    assert shared["bytes"] <= 1.05 * st_bytes
    assert sum(length for _, _, length in main) <= shared["bytes"]
    graphs = sum((out / g).stat().st_size for g in (MODEL_FILE, APPEND_FILE))
    assert result.details["onnx_bytes"] == shared["bytes"] + graphs


@pytest.mark.timeout(240)
def test_folder_is_the_size_of_one_set_of_weights(tmp_path):
    """A wider model (graph structure and tokenizer are then small beside the weights): the
    whole folder stays within 1.05 x the parent's safetensors, both graphs load in ONNX Runtime
    from the shared file and the served graph matches PyTorch."""
    from slimserve.runtimes import onnx_rt, torch_rt

    parent = make_torch_artifact(tmp_path / "wide", n_embd=192)
    out = tmp_path / "wide-onnx"
    result = run(fake_ctx(parent, out, ExportOnnxParams(optimize=False, parity_steps=8)))
    st_bytes = sum(p.stat().st_size for p in parent.glob("*.safetensors"))
    assert folder_bytes(out) <= 1.05 * st_bytes, (folder_bytes(out), st_bytes)
    assert result.details["append"]["kept"] and result.details["parity"]["passed"]
    for name in (MODEL_FILE, APPEND_FILE):
        ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
    rt = onnx_rt.load(out, device="cpu", threads=1)
    ref = torch_rt.load(parent, device="cpu", dtype="float32")
    assert rt.append
    prompts = [[5, 9, 11, 3], [7, 2]]
    got, state = rt.prefill(prompts)
    want, ref_state = ref.prefill(prompts)
    assert float((got - want).abs().max()) < 1e-4
    tokens = want.argmax(-1)
    got, _ = rt.decode(tokens, state)
    want, _ = ref.decode(tokens, ref_state)
    assert float((got - want).abs().max()) < 1e-4
