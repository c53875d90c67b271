"""Evaluation: test perplexity, the unigram floor, and top-1 agreement with the teacher.

Works on any variant through the runtime interface (`Runtime.score`), so torch, ONNX and
TensorRT variants are measured by the same code on the same test blocks. The teacher's top-1
predictions are cached in its folder (`eval_top1.npy`) so each student costs one pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from slimserve.catalogue import Profile
from slimserve.data import DataBundle, unigram_perplexity

TOP1_FILE = "eval_top1.npy"


@torch.inference_mode()
def score_blocks(runtime, blocks: torch.Tensor, batch_size: int) -> tuple[float, np.ndarray]:
    """Mean next-token NLL over `blocks` (N, T) and the top-1 predictions (N, T-1)."""
    nll_sum, count, top1 = 0.0, 0, []
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size]
        logits = runtime.score(ids).float()  # (B, T, V)
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = ids[:, 1:].to(logp.device)
        nll_sum += float(-logp.gather(-1, target.unsqueeze(-1)).sum())
        count += target.numel()
        top1.append(logits[:, :-1].argmax(-1).cpu().numpy().astype(np.int32))
    return nll_sum / count, np.concatenate(top1)


def evaluate_folder(
    folder: Path,
    profile: Profile,
    data: DataBundle,
    teacher_dir: Path | None,
    log: Callable[[str], None] = print,
) -> dict[str, float | int]:
    """Measure a built variant; when `teacher_dir` is None the variant *is* the teacher."""
    from slimserve.runtimes import load

    blocks = data.blocks("test", profile.block_size, profile.eval.max_tokens)
    runtime = load(folder)
    nll, top1 = score_blocks(runtime, blocks, profile.eval.batch_size)
    vocab = int(data.stats["vocab_size"])
    metrics: dict[str, float | int] = {
        "perplexity": round(math.exp(nll), 4),
        "unigram_perplexity": round(
            unigram_perplexity(data.tokens("train"), blocks.numpy(), vocab), 4
        ),
        "eval_tokens": int(blocks[:, 1:].numel()),
    }
    if teacher_dir is None:
        np.save(folder / TOP1_FILE, top1)
        metrics["agreement"] = 1.0
    else:
        cached = teacher_dir / TOP1_FILE
        if cached.is_file() and np.load(cached).shape == top1.shape:
            ref = np.load(cached)
        else:
            _, ref = score_blocks(load(teacher_dir), blocks, profile.eval.batch_size)
        metrics["agreement"] = round(float((ref == top1).mean()), 4)
    log(
        f"eval {folder.name}: perplexity {metrics['perplexity']:.2f} "
        f"(unigram {metrics['unigram_perplexity']:.1f}), agreement {metrics['agreement']:.3f}"
    )
    return metrics
