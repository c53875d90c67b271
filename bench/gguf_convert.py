"""A slimserve GPT-2 folder -> GGUF, with llama.cpp's own `convert_hf_to_gguf.py`, unmodified.

The converter is imported from the llama.cpp source tree (`LLAMA_DIR`, with its `conversion`
package and its `gguf-py`), three of its GPT-2 assumptions are corrected on its classes in this
process only, and its `main()` is run:

1. the pre-tokenizer: it hashes the tokenizer's output on a fixed text and refuses any hash it
   does not know, which is every byte-level BPE trained from scratch (slimserve's `tiny`
   tokenizer, the 124M bench model's). When the hash is unknown and `tokenizer.json` holds a
   GPT-2 byte-level pre-tokenizer, the answer is `gpt-2`: the same split regex;
2. the context length: it reads `n_ctx`, which transformers 5 no longer writes; `n_positions`
   is the same number;
3. the MLP width: it writes 4 x `n_embd`, but a pruned student (`student-slim`) has a narrower
   MLP, stored as `n_inner`.

Run as `python -m bench.gguf_convert LLAMA_DIR MODEL_DIR OUTFILE [--outtype f32|q8_0|...]`,
in a process of its own (`bench.peer_llamacpp.convert` does): it puts the source tree on
`sys.path`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PRE_TOKENIZER = "gpt-2"


def byte_level_gpt2(tokenizer_json: dict[str, Any]) -> bool:
    """True when the tokenizer splits text as GPT-2 does: a byte-level pre-tokenizer with the
    GPT-2 regex (`use_regex`, the default) and no prefix space, alone or in a sequence."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    return len(steps) == 1 and (
        steps[0].get("type") == "ByteLevel"
        and steps[0].get("use_regex", True)
        and not steps[0].get("add_prefix_space", False)
    )


def gpt2_shape(hparams: dict[str, Any]) -> dict[str, int]:
    """The GGUF shape keys of a GPT-2 config: context from `n_ctx` or else `n_positions`, MLP
    width from `n_inner` (None means the usual 4 x `n_embd`)."""
    n_embd = int(hparams["n_embd"])
    context = hparams.get("n_ctx") or hparams["n_positions"]
    return {
        "block_count": int(hparams["n_layer"]),
        "context_length": int(context),
        "embedding_length": n_embd,
        "feed_forward_length": int(hparams.get("n_inner") or 4 * n_embd),
        "head_count": int(hparams["n_head"]),
    }


def patch(model_class: type) -> None:
    """Correct the converter's GPT-2 class (`conversion.gpt2.GPT2Model`) in place."""
    known_pre = model_class.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return known_pre(self, tokenizer)
        except NotImplementedError:
            path = Path(self.dir_model) / "tokenizer.json"
            if path.is_file() and byte_level_gpt2(json.loads(path.read_text())):
                return PRE_TOKENIZER
            raise

    def set_gguf_parameters(self) -> None:
        shape = gpt2_shape(self.hparams)
        w = self.gguf_writer
        w.add_block_count(shape["block_count"])
        w.add_context_length(shape["context_length"])
        w.add_embedding_length(shape["embedding_length"])
        w.add_feed_forward_length(shape["feed_forward_length"])
        w.add_head_count(shape["head_count"])
        w.add_layer_norm_eps(self.hparams["layer_norm_epsilon"])
        w.add_file_type(self.ftype)

    model_class.get_vocab_base_pre = get_vocab_base_pre
    model_class.set_gguf_parameters = set_gguf_parameters


def run(llama_dir: Path, model_dir: Path, outfile: Path, outtype: str) -> None:
    """Import the converter from `llama_dir`, patch its GPT-2 class, run its `main()`."""
    llama_dir = llama_dir.resolve()
    sys.path[:0] = [str(llama_dir), str(llama_dir / "gguf-py")]
    from conversion.gpt2 import GPT2Model  # the source tree's package, on sys.path above

    patch(GPT2Model)
    spec = importlib.util.spec_from_file_location(
        "convert_hf_to_gguf", llama_dir / "convert_hf_to_gguf.py"
    )
    if spec is None or spec.loader is None:
        raise FileNotFoundError(llama_dir / "convert_hf_to_gguf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.argv = ["convert_hf_to_gguf.py", str(model_dir), "--outfile", str(outfile)]
    sys.argv += ["--outtype", outtype]
    module.main()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gguf_convert", description=__doc__)
    p.add_argument("llama_dir", type=Path, help="llama.cpp's source tree")
    p.add_argument("model_dir", type=Path, help="a GPT-2 folder (config.json, weights, tokenizer)")
    p.add_argument("outfile", type=Path)
    p.add_argument("--outtype", default="f32", help="f32 | f16 | bf16 | q8_0")
    a = p.parse_args(argv)
    run(a.llama_dir, a.model_dir, a.outfile, a.outtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
