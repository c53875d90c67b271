"""The 124M-shaped bench profile's plumbing on a tiny stand-in: its catalogue loads, and its
int8 variant is built from the ONNX variant by the pipeline's quantizer and serves a decode."""

from __future__ import annotations

import pytest
import torch
import yaml

from bench.bench_model import (
    INT8_VARIANT,
    ONNX_VARIANT,
    PROFILE,
    TORCH_VARIANT,
    _manifest,
    build_int8,
    build_onnx,
)
from slimserve.artifacts import ArtifactStore, read_manifest
from slimserve.catalogue import load_profile
from tests.bench.test_benches import _tiny_builder


def test_the_bench_profile_declares_int8_from_the_onnx_variant(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(PROFILE, sort_keys=False))
    profile = load_profile(path)
    int8 = profile.variants[INT8_VARIANT]
    assert int8.step == "quantize-int8" and int8.from_ == ONNX_VARIANT
    assert profile.variants[ONNX_VARIANT].from_ == TORCH_VARIANT


@pytest.mark.timeout(300)
def test_build_int8_on_a_tiny_stand_in(tmp_path):
    """The bench's builders on a tiny GPT-2 in the torch variant's place: export, then int8,
    which loads as an int8 ONNX runtime and decodes close to its float32 parent."""
    from slimserve.runtimes import onnx_rt

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(PROFILE, sort_keys=False))
    profile = load_profile(path)
    store = ArtifactStore(tmp_path / "artifacts", profile.name)
    torch_dir = store.path(TORCH_VARIANT)
    _tiny_builder()(torch_dir)
    _manifest(torch_dir, profile, TORCH_VARIANT, "torch", params_total=1, params_nonzero=1)
    build_onnx(store, profile, log=lambda *_: None)
    folder = build_int8(store, profile, log=lambda *_: None)
    manifest = read_manifest(folder)
    assert manifest.variant == INT8_VARIANT and manifest.runtime == "onnxruntime"
    assert manifest.step == "quantize-int8" and manifest.parent == ONNX_VARIANT
    assert manifest.details["quantized_ops"]["MatMulInteger"] > 0
    assert manifest.details["per_channel"] is True
    assert manifest.details["quality_gate"].startswith("skipped")
    int8 = onnx_rt.load(folder, device="cpu", threads=1)
    fp32 = onnx_rt.load(store.path(ONNX_VARIANT), device="cpu", threads=1)
    assert int8.info.dtype == "int8" and fp32.info.dtype == "float32"
    logits = []
    for rt in (fp32, int8):
        _, state = rt.prefill([[5, 6, 7, 8]])
        step, _ = rt.decode(torch.tensor([9]), state)
        logits.append(step)
    assert logits[1].shape == logits[0].shape
    spread = float(logits[0].max() - logits[0].min())
    assert float((logits[1] - logits[0]).abs().max()) < 0.1 * spread
