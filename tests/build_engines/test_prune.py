"""prune-l1 on tiny GPT-2s: exact amounts (global and per layer), tie handling, permanence,
`from_pretrained` round trip, bad input, and a masked recovery that keeps zeros at zero.

`seed_store` (also used by the structured and sweep tests) writes a tiny teacher and student
into an artifact store with manifests the runner considers fresh, so a test builds only the
pruned variant (no teacher training).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from build_engines.prune import l1_prune, prunable_weights, run_l1, weight_sparsity
from slimserve.artifacts import (
    ArtifactError,
    ArtifactStore,
    Manifest,
    Metrics,
    folder_bytes,
    read_manifest,
    write_manifest,
)
from slimserve.catalogue import CatalogueError, Profile, parse_profile
from slimserve.data import prepare
from slimserve.evaluate import evaluate_folder
from slimserve.runner import StepContext, build, count_safetensors, deps_hash
from slimserve.tokenizer import copy_tokenizer_files

BLOCK = 32
SHAPE = {"n_layer": 3, "n_head": 4, "n_embd": 32, "n_inner": 64}  # head_dim 8
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


# ---------------------------------------------------------------- helpers (shared by the files)


def tiny_gpt2(seed: int = 0, vocab: int = 300, **shape: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        initializer_range=0.2,  # varied weights and peaked logits
        **(SHAPE | shape),
    )
    return GPT2LMHeadModel(config).eval()


def write_corpus(folder: Path) -> Path:
    """~25 KB of real English (pydoc topics), one document per file."""
    from pydoc_data.topics import topics

    folder.mkdir(parents=True, exist_ok=True)
    for i, key in enumerate(sorted(topics)[:40]):
        (folder / f"{i:02d}.txt").write_text(topics[key][:700])
    return folder


def tiny_profile_raw(root: Path, corpus: Path, variants: dict[str, Any] | None = None) -> dict:
    """Teacher + student (`seed_store` writes them, nothing trains them) plus `variants`."""
    model = {"n_layer": 3, "n_head": 4, "n_embd": 32}
    return {
        "name": "t",
        "artifacts_dir": str(root),
        "block_size": BLOCK,
        "data": {"source": f"text:{corpus}", "split": {"validation": 0.15, "test": 0.15}},
        "tokenizer": {"kind": "bpe", "vocab_size": 300},
        "training": {"workers": 1, "use_gpu": False},
        "eval": {"max_tokens": 1024, "batch_size": 8},
        "variants": {
            "teacher": {"step": "finetune", "params": {"model": model, "tokens": 4096}},
            "student": {"step": "distill", "from": "teacher", "params": {"tokens": 2048}},
            **(variants or {}),
        },
    }


def tiny_profile(root: Path, corpus: Path, variants: dict[str, Any] | None = None) -> Profile:
    return parse_profile(tiny_profile_raw(root, corpus, variants))


def seed_store(root: Path, corpus: Path) -> None:
    """Random tiny teacher and student, evaluated, with fresh manifests, under `root`."""
    profile = tiny_profile(root, corpus)
    data = prepare(profile, log=lambda _: None)
    store = ArtifactStore(root, profile.name)
    for name, seed in (("teacher", 1), ("student", 2)):
        model = tiny_gpt2(seed, int(data.stats["vocab_size"]))
        with store.writer(name) as tmp:
            model.save_pretrained(tmp)
            copy_tokenizer_files(data.tokenizer_dir, tmp)
            v = profile.variants[name]
            m = Manifest(
                variant=name,
                profile=profile.name,
                step=v.step,
                parent=v.from_,
                runtime="torch",
                config_hash=profile.config_hash(name),
                parent_hash=deps_hash(store, profile, name),
            )
            write_manifest(tmp, m)
            teacher = None if name == "teacher" else store.path("teacher")
            m.metrics = Metrics(**evaluate_folder(tmp, profile, data, teacher, log=lambda _: None))
            m.bytes = folder_bytes(tmp)
            m.params_total, m.params_nonzero = count_safetensors(tmp)
            write_manifest(tmp, m)


@pytest.fixture(scope="session")
def store_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(artifacts root, corpus) with teacher and student built once per session."""
    base = tmp_path_factory.mktemp("prune-store")
    corpus = write_corpus(base / "corpus")
    seed_store(base / "artifacts", corpus)
    return base / "artifacts", corpus


def fresh_store(template: tuple[Path, Path], dest: Path) -> tuple[Path, Path]:
    """A private copy of the seeded store (tests build into it)."""
    shutil.copytree(template[0], dest)
    return dest, template[1]


def leftovers(root: Path) -> list[str]:
    """Half-written things: the store's temp / old folders, and checkpoints left behind."""
    store = root / "t"
    temps = [p.name for p in store.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    ckpts = [p.name for p in (store / ".checkpoints").glob("*")]
    return sorted(temps + ckpts)


# ---------------------------------------------------------------- pruning exactness


def _orig(model: GPT2LMHeadModel, include_embeddings: bool = False) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters(remove_duplicate=False))
    return {n: params[n].detach().clone() for n in prunable_weights(model, include_embeddings)}


def test_pruned_set_is_every_block_conv1d_and_linear():
    model = tiny_gpt2()
    names = prunable_weights(model, include_embeddings=False)
    assert sorted(names) == sorted(
        f"transformer.h.{i}.{m}.weight" for i in range(3) for m in CONV1D
    )
    # A Linear inside a block is pruned too (GPT-2 has none; other blocks may).
    model.transformer.h[0].extra = torch.nn.Linear(32, 32)
    assert "transformer.h.0.extra.weight" in prunable_weights(model, False)
    assert "transformer.wte.weight" in prunable_weights(tiny_gpt2(), include_embeddings=True)


@pytest.mark.parametrize("amount", [0.1, 0.3, 0.77])
def test_global_pruning_is_exact_and_ranks_across_layers(amount):
    model = tiny_gpt2()
    before = _orig(model)
    names = l1_prune(model, amount, "global")
    after = dict(model.named_parameters())
    n = sum(w.numel() for w in before.values())
    zeros = sum(int((after[k] == 0).sum()) for k in names)
    assert zeros == round(amount * n)  # exact count (random weights: no ties, no prior zeros)
    _, total = weight_sparsity(model, names)
    assert abs(total - amount) < 0.005
    cut = max(before[k][after[k] == 0].abs().max() for k in names)
    kept = min(before[k][after[k] != 0].abs().min() for k in names)
    assert cut <= kept  # one threshold for all layers
    assert all(torch.equal(after[k][after[k] != 0], before[k][after[k] != 0]) for k in names)
    per, _ = weight_sparsity(model, names)
    assert len(set(per.values())) > 1  # global ranking: layers differ
    assert all(per[f"transformer.h.{i}.{m}.weight"] > 0 for i in range(3) for m in CONV1D)


def test_per_layer_pruning_hits_the_amount_in_every_weight():
    model = tiny_gpt2()
    before = _orig(model)
    names = l1_prune(model, 0.4, "layer")
    per, total = weight_sparsity(model, names)
    for k in names:
        w = dict(model.named_parameters())[k]
        assert int((w == 0).sum()) == round(0.4 * w.numel())  # exact in every weight
        assert per[k] == pytest.approx(0.4, abs=1e-3)
        assert before[k][w == 0].abs().max() <= before[k][w != 0].abs().min()
    assert abs(total - 0.4) < 0.005


def test_masks_are_permanent_and_embedding_is_untouched_by_default(tmp_path):
    model = tiny_gpt2()
    wte = model.transformer.wte.weight.detach().clone()
    names = l1_prune(model, 0.5, "global")
    keys = set(model.state_dict())
    assert not [k for k in keys if k.endswith(("_orig", "_mask"))]
    assert all(not m._forward_pre_hooks for m in model.modules())  # no pruning hooks left
    assert torch.equal(model.transformer.wte.weight, wte)
    assert model.lm_head.weight is model.transformer.wte.weight
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert not [k for k in stored if "_orig" in k or "_mask" in k]
    assert torch.equal(stored["transformer.wte.weight"], wte)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    assert weight_sparsity(loaded, names) == weight_sparsity(model, names)
    ids = torch.randint(0, 300, (2, 16))
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_include_embeddings_prunes_the_tied_matrix_once(tmp_path):
    model = tiny_gpt2()
    names = l1_prune(model, 0.3, "layer", include_embeddings=True)
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names
    per, _ = weight_sparsity(model, names)
    assert abs(per["transformer.wte.weight"] - 0.3) < 0.005
    assert model.lm_head.weight is model.transformer.wte.weight  # still one tensor
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.lm_head.weight, model.transformer.wte.weight)


def test_bad_amounts_and_scopes_are_refused():
    for amount in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="amount must be in"):
            l1_prune(tiny_gpt2(), amount)
    with pytest.raises(ValueError, match="scope"):
        l1_prune(tiny_gpt2(), 0.3, "row")


# ---------------------------------------------------------------- the step, through the runner


def test_bad_config_is_one_clear_error_before_anything_is_written(store_template, tmp_path):
    root, corpus = fresh_store(store_template, tmp_path / "a")
    for params, field in (({"amount": 1.0}, "amount"), ({"amount": 0}, "amount")):
        variants = {"p": {"step": "prune-l1", "from": "student", "params": params}}
        with pytest.raises(CatalogueError, match=f"variants.p.params.{field}"):
            tiny_profile(root, corpus, variants)
    with pytest.raises(CatalogueError, match="variants.p.from: no variant named 'nope'"):
        tiny_profile(root, corpus, {"p": {"step": "prune-l1", "from": "nope"}})


def test_missing_parent_is_one_clear_error(store_template, tmp_path):
    root, corpus = fresh_store(store_template, tmp_path / "a")
    profile = tiny_profile(root, corpus, {"p": {"step": "prune-l1", "from": "student"}})
    shutil.rmtree(root / "t" / "student")
    data = prepare(profile, log=lambda _: None)
    out = tmp_path / "out"
    out.mkdir()
    ctx = StepContext(
        profile, "p", profile.step_params("p"), out, root / "t" / "student", None, data, tmp_path
    )
    with pytest.raises(ArtifactError, match=r"student: no manifest.json \(not built"):
        run_l1(ctx)
    assert not any(out.iterdir())


def test_step_records_measured_sparsity_and_keeps_zeros_through_recovery(
    ray_session, store_template, tmp_path
):
    root, corpus = fresh_store(store_template, tmp_path / "a")
    params = {
        "amount": 0.5,
        "recovery_tokens": 1024,  # 4 steps of 8 × 32 tokens
        "recovery": {"batch_size": 8, "lr": 1e-2, "eval_blocks": 8},
    }
    variants = {"student-pruned": {"step": "prune-l1", "from": "student", "params": params}}
    profile = tiny_profile(root, corpus, variants)
    rows = {r.variant: r for r in build(profile, only="student-pruned", log=lambda _: None)}
    assert [rows[v].status for v in ("teacher", "student")] == ["fresh", "fresh"]
    m = rows["student-pruned"].manifest
    folder = root / "t" / "student-pruned"
    assert read_manifest(folder).variant == "student-pruned" and not leftovers(root)

    # Sparsity: measured on the written file, per layer and in total, in every Conv1D.
    d = m.details
    assert abs(d["sparsity"] - 0.5) < 0.005 and m.metrics.model_dump()["sparsity"] == d["sparsity"]
    assert set(d["sparsity_per_layer"]) == {
        f"transformer.h.{i}.{c}.weight" for i in range(3) for c in CONV1D
    }
    assert all(s > 0 for s in d["sparsity_per_layer"].values())
    assert m.params_nonzero < m.params_total

    # Recovery kept every pruned weight at zero and trained the rest.
    student = GPT2LMHeadModel.from_pretrained(root / "t" / "student")
    pruned = GPT2LMHeadModel.from_pretrained(root / "t" / "student")
    names = l1_prune(pruned, 0.5, "global")
    final = dict(AutoModelForCausalLM.from_pretrained(folder).named_parameters())
    before = dict(pruned.named_parameters())
    for k in names:
        mask = before[k] == 0
        assert torch.all(final[k][mask] == 0), k
        assert not torch.equal(final[k][~mask], before[k][~mask]), k
    assert not torch.equal(final["transformer.wte.weight"], student.transformer.wte.weight)
    rec = d["recovery"]
    assert rec["tokens"] == 1024 and rec["masked"] and rec["teacher"] == "teacher"
    assert rec["val_loss"] < rec["initial_val_loss"]

    # Perplexity before / after: the parent's, after pruning, after recovery.
    metrics = m.metrics.model_dump()
    assert metrics["parent_perplexity"] == read_manifest(root / "t" / "student").metrics.perplexity
    assert metrics["pruned_perplexity"] > 0 and m.metrics.perplexity > 0
    assert m.metrics.perplexity < metrics["pruned_perplexity"]  # recovery helped
