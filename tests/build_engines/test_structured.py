"""prune-structured on tiny GPT-2s: the slicing is exact (permutations change nothing, removed
neurons equal zeroed ones, depth equals the kept blocks), each mode gives a stock config that
round-trips through `from_pretrained`, scores rank what they should, bad ratios are one clear
error with nothing left behind, and the step recovers with KD and measures decode speed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_prune import fresh_store, leftovers, seed_store, tiny_gpt2, tiny_profile, write_corpus
from transformers import AutoModelForCausalLM

from build_engines.structured import (
    Importance,
    SlimPlan,
    activation_importance,
    apply_plan,
    check_params,
    decode_speed,
    make_plan,
    structured_prune,
    weight_importance,
)
from slimserve.artifacts import read_manifest
from slimserve.runner import build
from slimserve.steps import PruneStructuredParams as P
from training.kd import init_student

IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
CALIB = torch.randint(0, 300, (6, 24), generator=torch.Generator().manual_seed(1))


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def full_plan(model, g: torch.Generator | None = None) -> SlimPlan:
    """Keep everything; with `g`, in a random order (channels, heads and neurons)."""
    c = model.config

    def order(n: int) -> torch.Tensor:
        return torch.randperm(n, generator=g) if g is not None else torch.arange(n)

    return SlimPlan(
        layers=list(range(c.n_layer)),
        channels=order(c.n_embd),
        heads=[order(c.n_head).tolist() for _ in range(c.n_layer)],
        neurons=[order(c.n_inner) for _ in range(c.n_layer)],
    )


# ---------------------------------------------------------------- slicing is exact


def test_permuting_every_kept_index_changes_nothing():
    """Channels, heads and neurons in a random order: the same function if every tensor that
    touches an index is sliced with the same order (LayerNorm is permutation-equivariant)."""
    model = tiny_gpt2()
    same = apply_plan(model, full_plan(model, torch.Generator().manual_seed(3)))
    torch.testing.assert_close(logits(same), logits(model), rtol=1e-4, atol=1e-4)
    assert same.lm_head.weight is same.transformer.wte.weight


def test_removing_neurons_equals_zeroing_them():
    model = tiny_gpt2()
    plan = full_plan(model)
    keep = [torch.tensor([0, 3, 5, 9, 20, 33, 60]), torch.arange(0, 63, 9), torch.arange(7)]
    plan.neurons = keep
    slim = apply_plan(model, plan)
    assert slim.config.n_inner == 7 and slim.transformer.h[1].mlp.c_fc.weight.shape == (32, 7)
    with torch.no_grad():
        for i, block in enumerate(model.transformer.h):
            drop = torch.ones(64, dtype=torch.bool)
            drop[keep[i]] = False
            block.mlp.c_proj.weight[drop] = 0  # (I, E): the dropped neurons write nothing
    torch.testing.assert_close(logits(slim), logits(model), rtol=1e-4, atol=1e-5)


def test_depth_equals_the_kept_blocks():
    model = tiny_gpt2()
    slim, plan = structured_prune(model, P(mlp_keep=1.0, layers_keep=[0, 2]), CALIB)
    assert plan.layers == [0, 2] and slim.config.n_layer == 2
    torch.testing.assert_close(logits(slim), logits(init_student(model, [0, 2]).eval()))


def test_width_slices_the_same_channels_everywhere():
    model = tiny_gpt2()
    slim, plan = structured_prune(model, P(mlp_keep=1.0, heads_keep=2, importance="weight"), None)
    c, ch = slim.config, plan.channels
    assert (c.n_head, c.n_embd, c.n_embd // c.n_head) == (2, 16, 8)  # head_dim kept
    src, new = model.state_dict(), slim.state_dict()
    assert torch.equal(new["transformer.wte.weight"], src["transformer.wte.weight"][:, ch])
    assert torch.equal(new["transformer.wpe.weight"], src["transformer.wpe.weight"][:, ch])
    assert torch.equal(new["transformer.ln_f.weight"], src["transformer.ln_f.weight"][ch])
    h = plan.heads[1]
    cols = torch.cat([torch.arange(x * 8, x * 8 + 8) for x in h])
    w = src["transformer.h.1.attn.c_attn.weight"]  # (E, 3E): q | k | v
    assert torch.equal(new["transformer.h.1.attn.c_attn.weight"][:, 16:32], w[ch][:, cols + 32])
    assert torch.equal(
        new["transformer.h.1.attn.c_proj.weight"],
        src["transformer.h.1.attn.c_proj.weight"][cols][:, ch],
    )
    assert torch.equal(
        new["transformer.h.1.mlp.c_proj.bias"], src["transformer.h.1.mlp.c_proj.bias"][ch]
    )


# ---------------------------------------------------------------- every mode is a stock GPT-2


@pytest.mark.parametrize("importance", ["weight", "activation"])
@pytest.mark.parametrize(
    "params, shape",
    [
        ({"mlp_keep": 0.5}, (3, 4, 32, 32)),
        ({"mlp_keep": 1.0, "heads_keep": 3}, (3, 3, 24, 64)),
        ({"mlp_keep": 1.0, "layers_keep": [2, 0]}, (2, 4, 32, 64)),
        ({"mlp_keep": 0.25, "heads_keep": 2, "layers_keep": [0, 1]}, (2, 2, 16, 16)),
    ],
)
def test_each_mode_round_trips_through_from_pretrained(tmp_path, importance, params, shape):
    model = tiny_gpt2()
    slim, _ = structured_prune(model, P(importance=importance, **params), CALIB)
    c = slim.config
    assert (c.n_layer, c.n_head, c.n_embd, c.n_inner) == shape
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())
    slim.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # stock class, stock config
    assert type(loaded).__name__ == "GPT2LMHeadModel"
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    torch.testing.assert_close(logits(loaded), logits(slim))


def test_scores_rank_neurons_heads_and_channels():
    model = tiny_gpt2()
    block = model.transformer.h[0]
    with torch.no_grad():
        block.mlp.c_proj.weight[5] = 0  # neuron 5 writes nothing
        block.mlp.c_fc.weight[:, 7] *= 10  # neuron 7 is loud
        block.attn.c_proj.weight[8:16] = 0  # head 1 writes nothing
        for ln in (
            *[m for b in model.transformer.h for m in (b.ln_1, b.ln_2)],
            model.transformer.ln_f,
        ):
            ln.weight[3] = 0  # channel 3 is normalised away everywhere
            ln.bias[3] = 0
    for imp in (weight_importance(model), activation_importance(model, CALIB)):
        assert isinstance(imp, Importance)
        assert imp.neurons[0][5] == 0 and imp.neurons[0].argmax() == 7
        assert imp.heads[0][1] == 0 and imp.heads[0].argmin() == 1
        assert all(t[3] == 0 for t in imp.channels_ln)
        plan = make_plan(model.config, P(mlp_keep=0.5, heads_keep=3), imp)
        assert 5 not in plan.neurons[0] and 7 in plan.neurons[0]
        assert 1 not in plan.heads[0] and 3 not in plan.channels


def test_ratios_that_leave_nothing_are_refused():
    cfg = tiny_gpt2().config
    cases = [
        (P(mlp_keep=0.001), "mlp_keep=0.001 keeps 0 of the parent's 64 MLP neurons"),
        (P(heads_keep=5), "heads_keep=5, but the parent has 4 heads"),
        (P(layers_keep=[]), r"layers_keep=\[\] would leave zero layers"),
        (P(layers_keep=[0, 3]), "must be distinct indices in"),
        (P(layers_keep=[1, 1]), "must be distinct indices in"),
        (P(mlp_keep=1.0), "removes nothing"),
        (P(mlp_keep=1.0, heads_keep=4, layers_keep=[0, 1, 2]), "removes nothing"),
    ]
    for params, message in cases:
        with pytest.raises(ValueError, match=message):
            check_params(cfg, params)
    with pytest.raises(ValueError, match="needs calibration"):
        structured_prune(tiny_gpt2(), P(importance="activation"), None)


def test_decode_speed_reports_a_median_per_batch(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "a")
    speed = decode_speed({"a": tmp_path / "a"}, (1, 2), repeats=2, steps=3)
    assert set(speed["a"]) == {"batch_1", "batch_2", "cpu_batch_1", "cpu_batch_2"}
    assert all(v > 0 for v in speed["a"].values())
    # CPU time of the decoding thread never exceeds wall time (one torch thread).
    assert speed["a"]["cpu_batch_2"] >= speed["a"]["batch_2"] * 0.95
    assert (speed["repeats"], speed["threads"], speed["steps"]) == (2, 1, 3)


# ---------------------------------------------------------------- the step, through the runner


@pytest.fixture(scope="module")
def store_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("structured-store")
    corpus = write_corpus(base / "corpus")
    seed_store(base / "artifacts", corpus)
    return base / "artifacts", corpus


def test_bad_ratio_is_one_clear_error_and_leaves_nothing(store_template, tmp_path):
    root, corpus = fresh_store(store_template, tmp_path / "a")
    for params, message in (
        ({"mlp_keep": 0.001}, "mlp_keep=0.001 keeps 0"),
        ({"heads_keep": 9}, "heads_keep=9"),
        ({"layers_keep": [7]}, "layers_keep"),
    ):
        variants = {"slim": {"step": "prune-structured", "from": "student", "params": params}}
        profile = tiny_profile(root, corpus, variants)
        with pytest.raises(ValueError, match=message):
            build(profile, only="slim", log=lambda _: None)
        assert not (root / "t" / "slim").exists() and not leftovers(root)


def test_step_slims_recovers_and_measures_speed(ray_session, store_template, tmp_path):
    root, corpus = fresh_store(store_template, tmp_path / "a")
    params = {
        "mlp_keep": 0.5,
        "heads_keep": 2,
        "calibration_blocks": 4,
        "recovery_tokens": 1024,
        "recovery": {"batch_size": 8, "lr": 1e-2, "eval_blocks": 8},
    }
    variants = {"student-slim": {"step": "prune-structured", "from": "student", "params": params}}
    rows = {
        r.variant: r
        for r in build(tiny_profile(root, corpus, variants), only="student-slim", log=print)
    }
    m = rows["student-slim"].manifest
    folder = root / "t" / "student-slim"
    assert read_manifest(folder).step == "prune-structured" and not leftovers(root)
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    c = loaded.config
    assert (c.n_layer, c.n_head, c.n_embd, c.n_inner) == (3, 2, 16, 32)
    parent = read_manifest(root / "t" / "student")
    assert m.params_total == sum(p.numel() for p in loaded.parameters()) < parent.params_total
    d = m.details
    assert d["shape"] == {"n_layer": 3, "n_head": 2, "n_embd": 16, "n_inner": 32}
    assert d["non_embedding_params"] < d["parent_non_embedding_params"] / 3
    assert d["recovery"]["tokens"] == 1024 and not d["recovery"]["masked"]
    assert d["recovery"]["val_loss"] < d["recovery"]["initial_val_loss"]
    metrics = m.metrics.model_dump()
    assert metrics["pruned_perplexity"] > 0 and metrics["parent_perplexity"] > 0
    speed = d["decode_tokens_per_s"]
    assert speed["repeats"] == 5 and speed["slim"]["batch_8"] > 0
    assert metrics["decode_speedup_batch_8"] == pytest.approx(
        speed["slim"]["batch_8"] / speed["parent"]["batch_8"], rel=1e-2
    )
    shutil.rmtree(root)
