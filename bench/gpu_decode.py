"""GPU decode: eager PyTorch against a CUDA-graph decode step with a static KV cache.

A GPT-2-124M-shaped model (12 layers, 12 heads, 768 wide, 50257 tokens; random weights: speed
does not depend on them) in fp16. Eager decode on a GPU is bound by kernel launches (~150-200
small kernels a step, each a few µs of CPU), not by arithmetic or memory, so the lever is to
launch the whole step at once: a CUDA graph. A graph replays fixed addresses and shapes, so the
cache must not grow: `StaticDecoder` preallocates keys and values (L, B, H, max_len, D), writes
each step's column in place at the row's position, and attends over the whole buffer with a
mask of the positions written so far (gpt-fast's design, on GPT-2's own weights).

Figures (medians after warm-up), at batch 1 and batch 32:

* `eager` — the torch runtime's decode (`slimserve.runtimes.torch_rt`, HF GPT-2, growing cache);
* `static` — `StaticDecoder` run eagerly (same kernels as the graph, launched one by one);
* `graph` — `StaticDecoder` replayed as one CUDA graph;

with the memory-bandwidth floor beside them: the bytes a step must read (fp16 weights once,
plus the keys and values it attends over) divided by the card's bandwidth.

Without CUDA it skips with the reason (`run_gpu_decode` returns {"skipped": ...}); the
decoder's arithmetic is checked on CPU against Hugging Face's (tests/bench).
Run: `python -m bench.gpu_decode` or `slimserve bench gpu`.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from slimserve.reports import Chart, Report, Table, new_report

GPT2_124M = {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50257, "n_positions": 1024}
# Peak DRAM bandwidth (bytes/s) by product name, for cards whose properties lack the clock.
KNOWN_BANDWIDTH = {"H100 SXM": 3.35e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "H200": 4.8e12}


def gpt2_model(device: str, dtype: torch.dtype, **shape: int) -> Any:
    """A randomly initialised GPT2LMHeadModel (GPT-2 124M's shape unless overridden)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(**{**GPT2_124M, **shape})
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).to(device=device, dtype=dtype).eval()


class StaticDecoder:
    """One GPT-2 decode step over a static KV cache, optionally captured as a CUDA graph.

    Rows all have prompts of the same length (a benchmark's batch); `prefill` fills the cache
    with HF's forward, then each `decode(tokens)` appends one token per row and returns the
    (B, V) logits in a buffer that the next call overwrites.
    """

    def __init__(self, model: Any, batch: int, max_len: int):
        cfg = model.config
        p = next(model.parameters())
        self.model, self.batch, self.max_len = model, batch, max_len
        self.heads, self.dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.eps = cfg.layer_norm_epsilon
        shape = (cfg.n_layer, batch, self.heads, max_len, self.dim)
        self.keys = torch.zeros(shape, dtype=p.dtype, device=p.device)  # (L, B, H, S, D)
        self.values = torch.zeros_like(self.keys)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=p.device)  # (B,)
        self.pos = torch.zeros(batch, dtype=torch.long, device=p.device)  # (B,) next position
        self.rows = torch.arange(batch, device=p.device)
        self.slots = torch.arange(max_len, device=p.device)  # (S,)
        self.logits = torch.zeros(batch, cfg.vocab_size, dtype=torch.float32, device=p.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.length = 0  # positions filled (host copy: checking the device one would sync)

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run (B, T) prompts through HF's forward and copy their cache in; (B, V) logits."""
        from transformers.cache_utils import DynamicCache

        b, t = ids.shape
        if b != self.batch or t >= self.max_len:
            raise ValueError(
                f"prefill wants ({self.batch}, < {self.max_len}), got {tuple(ids.shape)}"
            )
        cache = DynamicCache()
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True)
        for i, layer in enumerate(cache.layers):  # (B, H, T, D) each
            self.keys[i, :, :, :t].copy_(layer.keys)
            self.values[i, :, :, :t].copy_(layer.values)
        self.pos.fill_(t)
        self.length = t
        return out.logits[:, -1].float()

    def _ln(self, x: torch.Tensor, ln: Any) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, self.eps)

    def _step(self) -> None:
        """tokens, pos -> logits; writes one cache column per row and advances pos (in place)."""
        tf = self.model.transformer
        b, h, d = self.batch, self.heads, self.dim
        x = tf.wte(self.tokens) + tf.wpe(self.pos)  # (B, E)
        mask = (self.slots[None, :] <= self.pos[:, None])[:, None, None, :]  # (B, 1, 1, S)
        for i, block in enumerate(tf.h):
            qkv = block.attn.c_attn(self._ln(x, block.ln_1))  # Conv1D: (B, 3E)
            q, k, v = qkv.view(b, 3, h, d).unbind(1)  # (B, H, D) each
            self.keys[i][self.rows, :, self.pos] = k  # cache[b, :, pos[b]] = k[b]
            self.values[i][self.rows, :, self.pos] = v
            att = F.scaled_dot_product_attention(
                q[:, :, None], self.keys[i], self.values[i], attn_mask=mask
            )  # (B, H, 1, D)
            x = x + block.attn.c_proj(att.reshape(b, h * d))
            hidden = block.mlp.c_fc(self._ln(x, block.ln_2))
            x = x + block.mlp.c_proj(F.gelu(hidden, approximate="tanh"))
        logits = self.model.lm_head(self._ln(x, tf.ln_f))  # (B, V)
        self.logits.copy_(logits.float())
        self.pos.add_(1)

    @torch.inference_mode()
    def capture(self, warmup: int = 3) -> None:
        """Record `_step` as a CUDA graph (after warm-up on a side stream, as torch asks)."""
        if not self.pos.is_cuda:
            raise RuntimeError("CUDA graphs need the model on a CUDA device")
        keys, values, pos = self.keys.clone(), self.values.clone(), self.pos.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        self.keys.copy_(keys)  # undo what warm-up and capture wrote
        self.values.copy_(values)
        self.pos.copy_(pos)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (B,); (B, V) float32 logits (a reused buffer)."""
        if self.length >= self.max_len:
            raise ValueError(f"static cache of {self.max_len} positions is full")
        self.length += 1
        self.tokens.copy_(tokens)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        return self.logits


def bandwidth_bytes_per_s() -> tuple[float | None, str]:
    """Peak DRAM bandwidth of CUDA device 0: from its clock and bus width, else by name."""
    props = torch.cuda.get_device_properties(0)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8, "memory clock x bus width (DDR)"
    for name, bw in KNOWN_BANDWIDTH.items():
        if name in props.name:
            return bw, f"datasheet value for {name}"
    return None, "unknown for this card"


def _time_steps(step: Any, steps: int, repeats: int) -> float:
    """Median seconds per step over `repeats` runs of `steps` steps (CUDA-synchronised)."""
    runs = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        runs.append((time.perf_counter() - t0) / steps)
    return statistics.median(runs)


def _measure_batch(
    runtime: Any, model: Any, ids: torch.Tensor, max_len: int, steps: int, repeats: int
) -> tuple[float, float, float]:
    """Seconds per step: the runtime's eager decode, static eager, static as a CUDA graph."""
    with torch.inference_mode():
        logits, state = runtime.prefill(ids.tolist())
        tok = logits.argmax(-1)  # (B,): the same token every step; speed does not care
        holder = {"state": state}

        def eager() -> None:
            holder["state"] = runtime.decode(tok, holder["state"])[1]

        for _ in range(3):  # warm-up
            eager()
        holder["state"] = runtime.prefill(ids.tolist())[1]
        t_eager = _time_steps(eager, steps, repeats)
    dec = StaticDecoder(model, ids.shape[0], max_len)
    dec.prefill(ids)
    dec.decode(tok)  # warm-up
    t_static = _time_steps(lambda: dec.decode(tok), steps, repeats)
    dec.prefill(ids)
    dec.capture()
    dec.decode(tok)
    t_graph = _time_steps(lambda: dec.decode(tok), steps, repeats)
    return t_eager, t_static, t_graph


def run_gpu_decode(
    batches: tuple[int, ...] = (1, 32),
    prompt_tokens: int = 32,
    steps: int = 64,
    repeats: int = 5,
) -> dict[str, Any]:
    """Per-step latency of eager / static / graph decode at each batch (see the module doc)."""
    if not torch.cuda.is_available():
        return {"skipped": "not run: no CUDA GPU on this machine"}
    from slimserve.runtimes.base import RuntimeInfo
    from slimserve.runtimes.torch_rt import TorchRuntime

    model = gpt2_model("cuda", torch.float16)
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # tied wte once
    bandwidth, source = bandwidth_bytes_per_s()
    info = RuntimeInfo(
        "torch", cfg.n_positions, cfg.vocab_size, "cuda:0", "float16", cfg.n_layer,
        cfg.n_head, cfg.n_embd // cfg.n_head, torch.get_num_threads(),
    )  # fmt: skip
    runtime = TorchRuntime(model, info)
    max_len = prompt_tokens + steps * (repeats + 2) + 8
    rows = []
    for b in batches:
        ids = torch.randint(0, cfg.vocab_size, (b, prompt_tokens), device="cuda")
        t_eager, t_static, t_graph = _measure_batch(runtime, model, ids, max_len, steps, repeats)
        kv = 2 * cfg.n_layer * b * max_len * cfg.n_embd * 2  # keys + values read per step
        floor = (weights + kv) / bandwidth if bandwidth else None
        rows.append(
            {
                "batch": b,
                "eager_ms": round(t_eager * 1e3, 4),
                "static_ms": round(t_static * 1e3, 4),
                "graph_ms": round(t_graph * 1e3, 4),
                "graph_speedup": round(t_eager / t_graph, 2),
                "eager_tok_s": round(b / t_eager, 1),
                "graph_tok_s": round(b / t_graph, 1),
                "floor_ms": None if floor is None else round(floor * 1e3, 4),
            }
        )
    return {
        "gpu": torch.cuda.get_device_name(0),
        "weights_mb": round(weights / 2**20, 1),
        "bandwidth_gb_s": None if bandwidth is None else round(bandwidth / 1e9),
        "bandwidth_source": source,
        "rows": rows,
    }


def gpu_report(result: dict[str, Any], *, command: str | None = None) -> Report:
    """`bench_gpu_decode`: the figures and the GPU targets, or why it did not run."""
    title = "GPU decode: eager vs CUDA graph (GPT-2 124M shape, fp16)"
    if "skipped" in result:
        table = Table(title="status", columns=["status"], rows=[[result["skipped"]]])
        notes = [
            "Targets (graph >= 5x faster per token than eager, <= 0.5 ms per token at batch 1 "
            "on an H100-class card): not measured here.",
            "StaticDecoder's arithmetic is checked on CPU against Hugging Face's logits "
            "(tests/bench); the CUDA-graph capture itself has not run.",
        ]
        return new_report(
            "bench_gpu_decode", kind="gpu-decode", title=title, tables=[table], notes=notes,
            command=command,
        )  # fmt: skip
    rows = result["rows"]
    table = Table.from_records("per-step latency and throughput", rows)
    b1 = next((r for r in rows if r["batch"] == 1), None)
    notes = [
        f"{result['gpu']}: weights {result['weights_mb']} MB; bandwidth "
        f"{result['bandwidth_gb_s']} GB/s ({result['bandwidth_source']}); floor_ms = (weights "
        "+ keys and values read) / bandwidth.",
    ]
    if b1 is not None:
        speedup, ms = b1["graph_speedup"], b1["graph_ms"]
        notes.append(
            f"target graph >= 5x eager at batch 1: {speedup}x ({'met' if speedup >= 5 else 'missed'})"
        )
        notes.append(
            f"target <= 0.5 ms per token at batch 1: {ms} ms ({'met' if ms <= 0.5 else 'missed'})"
        )
    charts = [
        Chart(title="ms per decode step", table=0, x="batch", y=["eager_ms", "static_ms", "graph_ms", "floor_ms"]),
        Chart(title="tokens/s", table=0, x="batch", y=["eager_tok_s", "graph_tok_s"]),
    ]  # fmt: skip
    return new_report(
        "bench_gpu_decode", kind="gpu-decode", title=title, tables=[table], charts=charts,
        notes=notes, command=command,
    )  # fmt: skip


if __name__ == "__main__":
    import json

    print(json.dumps(run_gpu_decode(), indent=2))
