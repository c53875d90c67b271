"""Ray Train jobs end to end on CPU: finetune, distill (+ CE-only baseline), resume, hub path.

Every Ray Train `fit()` costs ~15 s of start-up on 2 cores, so the scenarios share fits: one
build is interrupted in the teacher's training and resumed, then distils the student; one
build fine-tunes a local folder standing in for a hub checkpoint. The pure pieces of the loop
(schedule, data order, masks, worker sizing) are tested without a fit.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from slimserve.catalogue import Profile, TrainingDefaults, parse_profile
from slimserve.data import prepare
from slimserve.gpt2_config import gpt2_config
from slimserve.runner import build
from slimserve.steps import Budget
from training.loop import LoopConfig, Schedule, batch_rows, lr_factor, train_worker, zero_masks
from training.trainer import INTERRUPT_ENV, plan_workers, scaling_config

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- pure pieces of the loop


def test_schedule_from_token_budget():
    b = Budget(tokens=10_000, batch_size=8, warmup_tokens=1024, eval_every_tokens=0)
    s = Schedule.of(b, block_size=32)  # 256 tokens per step
    assert (s.tokens_per_step, s.total_steps, s.warmup_steps) == (256, 40, 4)
    assert s.eval_every == 10 and s.checkpoint_every == 10  # 4 evaluations; checkpoints with them
    s2 = Schedule.of(b.model_copy(update={"checkpoint_every_tokens": 512}), block_size=32)
    assert s2.checkpoint_every == 2


def test_lr_warms_up_then_decays_to_the_floor():
    s = Schedule(
        tokens_per_step=1, total_steps=100, warmup_steps=10, eval_every=25, checkpoint_every=25
    )
    f = [lr_factor(i, s, 0.1) for i in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:9], f[1:10], strict=True))  # linear warmup
    assert all(a >= b for a, b in zip(f[10:-1], f[11:], strict=True))  # monotone cosine decay
    assert f[55] == pytest.approx(0.55) and f[100] == pytest.approx(0.1)


def test_batches_shard_over_workers_and_cover_each_epoch():
    n, batch = 40, 8
    for step in range(5):  # one epoch = 5 steps
        whole = batch_rows(step, n, batch, 0, 1, seed=3)
        parts = [batch_rows(step, n, batch, r, 2, seed=3) for r in range(2)]
        assert sorted(torch.cat(parts).tolist()) == sorted(whole.tolist())
        assert len(parts[0]) == len(parts[1]) == batch // 2
    epoch = torch.cat([batch_rows(s, n, batch, 0, 1, seed=3) for s in range(5)])
    assert sorted(epoch.tolist()) == list(range(n))
    assert not torch.equal(batch_rows(5, n, batch, 0, 1, 3), batch_rows(0, n, batch, 0, 1, 3))
    with pytest.raises(ValueError, match="cannot fill"):
        batch_rows(0, 4, 8, 0, 1, 0)


def test_zero_masks_cover_only_pruned_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight[0, :2] = 0
    masks = zero_masks(model)
    assert set(masks) == {"0.weight"}
    assert masks["0.weight"].sum() == 14


def test_workers_get_all_cores_on_cpu(ray_session, monkeypatch):
    def cluster(total: float, free: float) -> None:
        monkeypatch.setattr(ray_session, "cluster_resources", lambda: {"CPU": total})
        monkeypatch.setattr(ray_session, "available_resources", lambda: {"CPU": free})

    cluster(2, 2.0)
    one = plan_workers(TrainingDefaults(workers=1, use_gpu=False))
    assert (one.workers, one.use_gpu, one.cpus_per_worker, one.threads) == (1, False, 2, 2)
    assert scaling_config(one).resources_per_worker == {"CPU": 2}
    assert scaling_config(one).num_workers == 1 and not scaling_config(one).use_gpu
    two = plan_workers(TrainingDefaults(workers=1, use_gpu=False), workers=2)
    assert (two.workers, two.cpus_per_worker, two.threads) == (2, 1, 1)
    fixed = plan_workers(TrainingDefaults(workers=1, cpus_per_worker=3, use_gpu=False))
    assert (fixed.cpus_per_worker, fixed.threads) == (3, 3)

    # Serve replicas hold 1.15 of the 2 CPUs: reserve what is free instead of waiting forever.
    cluster(2, 0.85)
    shared = plan_workers(TrainingDefaults(workers=1, use_gpu=False))
    assert (shared.cpus_per_worker, shared.threads) == (0.85, 2)
    cluster(2, 0.0)
    with pytest.raises(RuntimeError, match="0.00 of 2 CPUs free"):
        plan_workers(TrainingDefaults(workers=1, use_gpu=False))


def run_in_process(job: LoopConfig, monkeypatch) -> tuple[dict, dict[str, torch.Tensor]]:
    """Run `job` with Ray Train's local mode (no workers, no cluster): last metrics, final weights.

    The loop's checkpoints live in temp folders that are gone after `report`, so the final
    weights are read at report time.
    """
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    final: dict[str, torch.Tensor] = {}
    report = ray.train.report

    def capture(metrics, checkpoint=None, **kw):
        if metrics.get("final") and checkpoint is not None:
            final.update(load_file(f"{checkpoint.path}/model/model.safetensors"))
        return report(metrics, checkpoint=checkpoint, **kw)

    monkeypatch.setattr(ray.train, "report", capture)
    threads = torch.get_num_threads()
    try:
        result = TorchTrainer(
            train_worker,
            train_loop_config={"job": job},
            scaling_config=ScalingConfig(num_workers=0),  # local mode: this process
            run_config=RunConfig(name="local", storage_path=str(Path(job.init_dir).parent)),
        ).fit()
    finally:
        torch.set_num_threads(threads)
    return result.metrics, final


def test_mask_hook_keeps_pruned_weights_at_zero(tmp_path, monkeypatch):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        gpt2_config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=16)
    )
    fc = model.transformer.h[0].mlp.c_fc.weight  # Conv1D (in, out)
    with torch.no_grad():
        fc[:, ::2] = 0  # half the MLP neurons pruned
    model.save_pretrained(tmp_path / "init")
    before = model.state_dict()
    g = torch.Generator().manual_seed(0)
    job = LoopConfig(
        init_dir=str(tmp_path / "init"),
        train_blocks=torch.randint(0, 64, (64, 16), generator=g).numpy(),
        val_blocks=torch.randint(0, 64, (8, 16), generator=g).numpy(),
        budget=Budget(tokens=2048, batch_size=8, lr=1e-2),
        mask_fn=zero_masks,
        threads=1,
    )
    metrics, after = run_in_process(job, monkeypatch)
    assert metrics["final"] and metrics["step"] == 16
    name = "transformer.h.0.mlp.c_fc.weight"
    assert torch.all(after[name][:, ::2] == 0)
    assert not torch.equal(after[name][:, 1::2], before[name][:, 1::2])  # the rest trained
    proj = "transformer.h.0.mlp.c_proj.weight"
    assert not torch.equal(after[proj], before[proj])


# ---------------------------------------------------------------- jobs through Ray Train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~25 KB of real English (pydoc topics), one document per file."""
    from pydoc_data.topics import topics

    folder = tmp_path_factory.mktemp("corpus")
    for i, key in enumerate(sorted(topics)[:40]):
        (folder / f"{i:02d}.txt").write_text(topics[key][:700])
    return folder


def tiny_profile(root: Path, corpus: Path) -> Profile:
    model = {"n_layer": 2, "n_head": 2, "n_embd": 32}
    budget = {"batch_size": 8, "lr": 3e-3, "warmup_tokens": 512, "eval_blocks": 16}
    return parse_profile(
        {
            "name": "t",
            "artifacts_dir": str(root),
            "block_size": 32,
            "data": {"source": f"text:{corpus}", "split": {"validation": 0.15, "test": 0.15}},
            "tokenizer": {"kind": "bpe", "vocab_size": 300},
            "training": {"workers": 1, "use_gpu": False},
            "eval": {"max_tokens": 2048, "batch_size": 8},
            "variants": {
                "teacher": {
                    "step": "finetune",
                    # 24 steps of 256 tokens, a checkpoint every 4 steps
                    "params": {"model": model, "tokens": 6144, "checkpoint_every_tokens": 1024}
                    | budget,
                },
                "student": {
                    "step": "distill",
                    "from": "teacher",
                    "params": {"tokens": 3072} | budget,
                },
            },
        }
    )


def assert_loadable(folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([tok.encode("The for statement")])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)


def latest_checkpoint_step(run_dir: Path) -> int:
    steps = [
        torch.load(c / "state.pt", weights_only=False)["step"]
        for c in run_dir.glob("checkpoint_*")
        if (c / "state.pt").is_file()
    ]
    return max(steps)


def test_interrupted_teacher_resumes_then_student_distils(
    ray_session, tmp_path, corpus, monkeypatch
):
    profile = tiny_profile(tmp_path, corpus)
    store = tmp_path / "t"

    # 1. A crash after 6 steps (checkpoints at 4; the one at 8 is never reached).
    monkeypatch.setenv(INTERRUPT_ENV, "6")
    with pytest.raises(Exception, match="interrupted after step"):
        build(profile)
    monkeypatch.delenv(INTERRUPT_ENV)
    assert not (store / "teacher").exists()
    run_dir = next((store / ".checkpoints").glob("teacher-*")) / "finetune"
    assert latest_checkpoint_step(run_dir) == 4
    shutil.copytree(run_dir.parent / "init", tmp_path / "init")  # for the reference run below

    # 2. The next build resumes from step 4, finishes the teacher, then distils the student.
    rows = {r.variant: r for r in build(profile)}
    teacher, student = rows["teacher"].manifest, rows["student"].manifest
    assert rows["teacher"].status == rows["student"].status == "built"
    t = teacher.details
    assert t["resumed_from_step"] == 4 and t["step"] == 24 and t["tokens"] == 6144
    assert t["val_loss"] < t["initial_val_loss"] - 0.5, t  # training lowered the loss
    assert t["device"] == "cpu" and t["workers"] == 1 and t["tokens_per_s"] > 0
    assert teacher.metrics.perplexity < 300  # below a uniform guess over the vocabulary

    s = student.details
    assert s["layers"] == [0] and s["resumed_from_step"] is None
    assert s["val_loss"] < s["initial_val_loss"], s  # KD lowered the student's loss
    assert s["non_embedding_reduction"] >= 1.8
    ce_only = student.metrics.model_dump()["ce_only_perplexity"]
    assert math.isfinite(ce_only) and 1 < ce_only < 300
    assert s["ce_only"]["tokens"] == s["tokens"] == 3072  # same budget as the student
    assert 0 < student.metrics.agreement < 1

    for name in ("teacher", "student"):
        assert_loadable(store / name)
    assert not any((store / ".checkpoints").iterdir())  # removed after success

    # 3. Nothing is stale: a second build trains nothing.
    again = build(profile)
    assert [r.status for r in again] == ["fresh", "fresh"]

    # 4. Resuming lost nothing: the same job run uninterrupted ends with the same weights.
    data = prepare(profile, log=lambda _: None)
    reference = LoopConfig(
        init_dir=str(tmp_path / "init"),
        train_blocks=data.blocks("train", 32).numpy(),
        val_blocks=data.blocks("validation", 32).numpy(),
        budget=profile.step_params("teacher"),
        seed=profile.seed,
        threads=t["threads"],
    )
    metrics, weights = run_in_process(reference, monkeypatch)
    assert metrics["step"] == 24 and metrics["resumed_from_step"] is None
    resumed = load_file(store / "teacher" / "model.safetensors")
    assert set(resumed) == set(weights)
    for name, value in weights.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_hub_path_finetunes_a_local_pretrained_folder(ray_session, tmp_path, corpus):
    """configs/gpt2.yaml with its hub ids replaced by a local tiny GPT-2 folder, on 2 workers."""
    from transformers import GPT2LMHeadModel

    from slimserve.tokenizer import load_tokenizer, save_hf_tokenizer, train_bpe

    hub = tmp_path / "hub-gpt2"
    texts = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    save_hf_tokenizer(train_bpe(texts, 300), hub, model_max_length=64)
    eos = load_tokenizer(hub).eos_token_id
    torch.manual_seed(0)
    config = gpt2_config(n_layer=2, n_head=2, n_embd=32, vocab_size=300, n_positions=64, eos=eos)
    GPT2LMHeadModel(config).save_pretrained(hub)

    raw = yaml.safe_load((ROOT / "configs" / "gpt2.yaml").read_text())
    raw["artifacts_dir"] = str(tmp_path / "artifacts")
    raw["block_size"] = 32
    raw["data"] = {"source": f"text:{corpus}", "split": {"validation": 0.15, "test": 0.15}}
    raw["tokenizer"]["pretrained"] = str(hub)
    raw["eval"] = {"max_tokens": 2048, "batch_size": 8}
    raw["training"]["workers"] = 2  # data-parallel (DDP over gloo), one core each
    teacher = raw["variants"]["teacher"]["params"]
    assert teacher["pretrained"] == "gpt2"  # the hub id this test stands in for
    teacher.update(pretrained=str(hub), tokens=2048, batch_size=8, lr=3e-3, warmup_tokens=256)
    profile = parse_profile(raw)

    rows = build(profile, only="teacher")
    assert [r.variant for r in rows] == ["teacher"] and rows[0].status == "built"
    m = rows[0].manifest
    assert m.details["start"] == f"pretrained {hub}"
    assert m.details["val_loss"] < m.details["initial_val_loss"]
    assert m.details["workers"] == 2 and m.details["cpus_per_worker"] >= 1
    folder = tmp_path / "artifacts" / "gpt2" / "teacher"
    assert_loadable(folder)
    assert json.loads((folder / "config.json").read_text())["n_layer"] == 2


def test_pretrained_with_a_smaller_vocabulary_fails_before_training(tmp_path, corpus):
    from transformers import GPT2Config, GPT2LMHeadModel

    from slimserve.data import prepare
    from slimserve.runner import StepContext
    from training.finetune import check_pretrained

    small = tmp_path / "small"
    GPT2LMHeadModel(
        GPT2Config(vocab_size=100, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    ).save_pretrained(small)
    profile = tiny_profile(tmp_path, corpus)
    data = prepare(profile, log=lambda _: None)
    ctx = StepContext(
        profile,
        "teacher",
        profile.step_params("teacher"),
        tmp_path,
        None,
        None,
        data,
        tmp_path / "ckpt",
    )
    with pytest.raises(ValueError, match="vocab_size 100 < the tokenizer's 300.*n_positions 16"):
        check_pretrained(str(small), ctx)
