"""Catalogue validation: every problem named in one error."""

from __future__ import annotations

import pytest

from slimserve.catalogue import CatalogueError, load_profile, parse_profile


def base(**variants) -> dict:
    return {
        "name": "t",
        "variants": variants
        or {
            "teacher": {"step": "finetune", "params": {"model": {"n_layer": 1}}},
            "student": {"step": "distill", "from": "teacher"},
        },
    }


def test_shipped_profiles_validate():
    for path in ("configs/tiny.yaml", "configs/gpt2.yaml"):
        p = load_profile(path)
        assert p.order()[0] == "teacher"
    gpt2 = load_profile("configs/gpt2.yaml")
    assert {"student-onnx-int8", "student-trt", "student-slim", "student-pruned"} <= set(
        gpt2.variants
    )


def test_order_puts_parents_first():
    p = parse_profile(
        base(
            c={"step": "export-onnx", "from": "student"},
            student={"step": "distill", "from": "teacher"},
            teacher={"step": "finetune", "params": {"model": {}}},
        )
    )
    assert p.order() == ["teacher", "student", "c"]
    assert p.order("student") == ["teacher", "student"]


def test_every_problem_named_once():
    raw = base(
        teacher={"step": "finetune", "params": {"model": {"n_embd": 30, "n_head": 4}}},
        a={"step": "no-such-step", "from": "teacher"},
        b={"step": "distill", "from": "ghost"},
        c={"step": "prune-l1", "from": "teacher", "params": {"amount": 1.5}},
        d={"step": "export-onnx", "from": "teacher", "params": {"opsett": 18}},
    )
    with pytest.raises(CatalogueError) as err:
        parse_profile(raw)
    msg = str(err.value)
    for needle in (
        "variants.teacher.params.model",
        "divisible",
        "variants.a.step: unknown step 'no-such-step'",
        "variants.b.from: no variant named 'ghost'",
        "variants.c.params.amount",
        "variants.d.params.opsett",
    ):
        assert needle in msg, needle


def test_cycle_detected():
    raw = base(
        teacher={"step": "finetune", "params": {"model": {}}},
        x={"step": "export-onnx", "from": "y"},
        y={"step": "export-onnx", "from": "x"},
    )
    with pytest.raises(CatalogueError, match="cycle"):
        parse_profile(raw)


def test_top_level_typo_and_range_reported_with_variant_problems():
    raw = base(teacher={"step": "finetune", "params": {"model": {}}}, z={"step": "bogus"})
    raw["blok_size"] = 64
    raw["block_size"] = 2
    with pytest.raises(CatalogueError) as err:
        parse_profile(raw)
    msg = str(err.value)
    assert "blok_size" in msg and "block_size" in msg and "variants.z.step" in msg


def test_finetune_needs_exactly_one_init():
    with pytest.raises(CatalogueError, match="exactly one"):
        parse_profile(base(teacher={"step": "finetune", "params": {}}))


def test_config_hash_changes_with_params_only():
    p1 = parse_profile(base())
    raw = base()
    raw["variants"]["student"]["params"] = {"temperature": 3.0}
    p2 = parse_profile(raw)
    assert p1.config_hash("teacher") == p2.config_hash("teacher")
    assert p1.config_hash("student") != p2.config_hash("student")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(CatalogueError, match="no such profile"):
        load_profile(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(CatalogueError, match="not valid YAML"):
        load_profile(bad)


def test_default_variant_is_named_by_the_profile():
    for cfg in ("configs/tiny.yaml", "configs/gpt2.yaml"):
        profile = load_profile(cfg)
        assert profile.default_variant in profile.variants
    teacher = {"step": "finetune", "params": {"pretrained": "gpt2"}}
    raw = {"name": "x", "variants": {"teacher": teacher}}
    assert parse_profile(raw).default_variant == "student"  # unnamed: not checked
    with pytest.raises(CatalogueError, match="default_variant: no variant named 'ghost'"):
        parse_profile({**raw, "default_variant": "ghost"})
