"""llama-server as a peer: the GGUF conversion wrapper's corrections, the build's reuse and
failure paths, the server's command line; the real converter and server where they are cached.

Nothing here downloads or builds: the converter test needs the source tree already unpacked
in `.cache/llama.cpp/` (`make llama-server`), the server test the finished build.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

import pytest

from bench import peer_llamacpp
from bench.gguf_convert import byte_level_gpt2, gpt2_shape, patch
from bench.peer_vllm import PeerError
from slimserve.net import free_port

BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}


# -- the converter's corrections, on plain data ----------------------------------------------


def test_byte_level_gpt2_is_recognised_alone_or_in_a_sequence():
    assert byte_level_gpt2({"pre_tokenizer": BYTE_LEVEL})
    assert byte_level_gpt2({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [BYTE_LEVEL]}})
    assert not byte_level_gpt2({"pre_tokenizer": BYTE_LEVEL | {"add_prefix_space": True}})
    assert not byte_level_gpt2({"pre_tokenizer": BYTE_LEVEL | {"use_regex": False}})
    assert not byte_level_gpt2({"pre_tokenizer": {"type": "Metaspace"}})
    assert not byte_level_gpt2({"pre_tokenizer": None})
    split = {"type": "Split", "pattern": {"Regex": "x"}}
    assert not byte_level_gpt2(
        {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, BYTE_LEVEL]}}
    )


def test_gpt2_shape_takes_n_positions_and_n_inner():
    hp = {"n_layer": 2, "n_head": 4, "n_embd": 128, "n_positions": 128, "n_inner": None}
    assert gpt2_shape(hp) == {
        "block_count": 2, "context_length": 128, "embedding_length": 128,
        "feed_forward_length": 512, "head_count": 4,
    }  # fmt: skip
    assert gpt2_shape(hp | {"n_inner": 256})["feed_forward_length"] == 256
    assert gpt2_shape(hp | {"n_ctx": 64})["context_length"] == 64


class _Writer:
    def __init__(self):
        self.keys: dict[str, object] = {}

    def __getattr__(self, name: str):
        return lambda value: self.keys.__setitem__(name.removeprefix("add_"), value)


def _fake_converter_class(known: dict[str, str]):
    class FakeGPT2:
        def __init__(self, folder: Path, hparams: dict):
            self.dir_model, self.hparams, self.ftype = folder, hparams, 0
            self.gguf_writer = _Writer()

        def get_vocab_base_pre(self, tokenizer) -> str:
            if tokenizer in known:
                return known[tokenizer]
            raise NotImplementedError("BPE pre-tokenizer was not recognized")

        def set_gguf_parameters(self) -> None:
            self.gguf_writer.add_context_length(self.hparams["n_ctx"])  # what the original does

    return FakeGPT2


def test_patch_answers_gpt2_only_for_an_unknown_byte_level_tokenizer(tmp_path):
    cls = _fake_converter_class({"known": "llama-bpe"})
    patch(cls)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"pre_tokenizer": BYTE_LEVEL}))
    hp = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 128, "n_inner": 48}
    model = cls(tmp_path, hp | {"layer_norm_epsilon": 1e-5})
    assert model.get_vocab_base_pre("known") == "llama-bpe"  # a known hash is left alone
    assert model.get_vocab_base_pre("from scratch") == "gpt-2"
    model.set_gguf_parameters()  # no n_ctx in hparams: the original would raise KeyError
    keys = model.gguf_writer.keys
    assert keys["context_length"] == 128 and keys["feed_forward_length"] == 48
    assert keys["layer_norm_eps"] == 1e-5 and keys["block_count"] == 2
    (tmp_path / "tokenizer.json").write_text(json.dumps({"pre_tokenizer": {"type": "Metaspace"}}))
    with pytest.raises(NotImplementedError):
        model.get_vocab_base_pre("from scratch")


# -- the real converter on a tiny from-scratch folder (source tree cached only) ---------------


def _tiny_narrow_mlp(folder: Path) -> Path:
    """A 2-layer GPT-2 with a 48-wide MLP (not 4 x 32) and a BPE trained here, saved the way
    slimserve saves its artifacts (transformers 5: no `n_ctx` in config.json)."""
    import torch
    from transformers import GPT2LMHeadModel

    from slimserve.gpt2_config import gpt2_config
    from slimserve.tokenizer import load_tokenizer, save_hf_tokenizer, train_bpe

    words = [
        "the",
        "river",
        "flows",
        "over",
        "a",
        "quiet",
        "mountain",
        "café",
        "straße",
        "東京",
        "🙂",
        "model",
        "token",
    ]
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(9)) for i in range(200)]
    save_hf_tokenizer(train_bpe(lines, vocab_size=300), folder, model_max_length=128)
    tok = load_tokenizer(folder)
    torch.manual_seed(0)
    config = gpt2_config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=tok.tokenizer.get_vocab_size(),
        n_positions=128, eos=tok.eos_token_id, n_inner=48, initializer_range=0.2,
    )  # fmt: skip
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def source() -> Path:
    tree = peer_llamacpp.vendored_source()
    if not (tree / "convert_hf_to_gguf.py").is_file():
        pytest.skip(
            f"llama.cpp's source is not unpacked in {tree.parent.parent} (make llama-server)"
        )
    return tree


@pytest.fixture(scope="module")
def tiny_gguf(source, tmp_path_factory) -> tuple[Path, Path]:
    folder = _tiny_narrow_mlp(tmp_path_factory.mktemp("narrow"))
    return folder, peer_llamacpp.convert(source, folder, folder.parent / "narrow-f32.gguf")


@pytest.mark.timeout(240)
def test_vendored_converter_with_the_corrections(source, tiny_gguf, monkeypatch):
    folder, gguf = tiny_gguf
    assert "n_ctx" not in json.loads((folder / "config.json").read_text())  # left as it was
    monkeypatch.syspath_prepend(str(source / "gguf-py"))
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields

    def value(key: str):
        field = fields[key]
        return field.contents() if hasattr(field, "contents") else field.parts[-1][0]

    assert value("tokenizer.ggml.pre") == "gpt-2"
    assert value("gpt2.context_length") == 128
    assert value("gpt2.feed_forward_length") == 48
    assert value("gpt2.embedding_length") == 32
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    assert len(fields["tokenizer.ggml.tokens"].data) == vocab


@pytest.mark.timeout(120)
def test_conversion_failure_is_a_reason(source, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["NoSuchModel"]}))
    with pytest.raises(PeerError, match="GGUF conversion failed"):
        peer_llamacpp.convert(source, tmp_path, tmp_path / "x.gguf")


# -- the server, where the build is there ---------------------------------------------------


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _strip(ids: list[int], eos: int) -> list[int]:
    return ids[:-1] if ids and ids[-1] == eos else ids


@pytest.mark.timeout(240)
def test_llama_server_matches_hf_greedy(tiny_gguf, tmp_path):
    import torch
    from transformers import GPT2LMHeadModel

    from slimserve.tokenizer import load_tokenizer

    stamp = peer_llamacpp.read_stamp()
    binary = peer_llamacpp.build_dir() / "bin" / "llama-server"
    if not stamp or stamp[0] != peer_llamacpp.VERSION or not binary.is_file():
        pytest.skip("llama-server is not built (make llama-server)")
    built = peer_llamacpp.LlamaBuild(binary, peer_llamacpp.vendored_source(), stamp[0], None, True)
    folder, gguf = tiny_gguf
    tok = load_tokenizer(folder)
    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    log = tmp_path / "server.log"
    with peer_llamacpp.start_llama_server(
        built, gguf, alias="tiny", port=free_port(), slots=2, log=log
    ) as server:
        for prompt in ("the river flows", "café 東京", "a quiet mountain"):
            ids = tok.encode(prompt)
            assert _post(f"{server.url}/tokenize", {"content": prompt})["tokens"] == ids
            body = {"prompt": prompt, "n_predict": 8, "temperature": 0, "return_tokens": True}
            theirs = _post(f"{server.url}/completion", body | {"cache_prompt": False})["tokens"]
            theirs = _strip(theirs, tok.eos_token_id)
            assert len(theirs) >= 1
            # every token llama-server picked is HF's argmax at that step, within float error
            # (a random tiny model has near-ties that fp32 kernels may break either way)
            with torch.inference_mode():
                logits = model(torch.tensor([ids + theirs])).logits[0, len(ids) - 1 : -1]
            picked = logits.gather(1, torch.tensor(theirs)[:, None])[:, 0]
            assert torch.all(picked >= logits.max(dim=1).values - 1e-3), prompt
        reply = _post(
            f"{server.url}/v1/completions", {"model": "tiny", "prompt": "the", "max_tokens": 4}
        )
        assert reply["usage"]["completion_tokens"] >= 1
    assert server.pid and "llama-server exited" not in log.read_text()


# -- the build, with fakes ------------------------------------------------------------------


def _sdist(path: Path, version: str) -> None:
    """A stand-in sdist: just vendor/llama.cpp/CMakeLists.txt."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        data = b"project(llama.cpp)\n"
        info = tarfile.TarInfo(f"llama_cpp_python-{version}/vendor/llama.cpp/CMakeLists.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def test_build_runs_pip_cmake_then_is_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(peer_llamacpp.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    calls: list[list[str]] = []

    def run(cmd: list[str]) -> subprocess.CompletedProcess:
        calls.append(cmd)
        if "download" in cmd:
            _sdist(Path(cmd[cmd.index("-d") + 1]) / "llama_cpp_python-9.9.tar.gz", "9.9")
        if "--build" in cmd:
            server = Path(cmd[cmd.index("--build") + 1]) / "bin" / "llama-server"
            server.parent.mkdir(parents=True)
            server.write_text("")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    built = peer_llamacpp.build(tmp_path, "9.9", jobs=3, run=run, log=lambda _: None)
    assert not built.reused and built.version == "9.9" and built.server.is_file()
    assert calls[0][:4] == [sys.executable, "-m", "pip", "download"]
    assert "llama-cpp-python==9.9" in calls[0] and ":all:" in calls[0]
    assert "-DLLAMA_BUILD_UI=OFF" in calls[1] and "-DLLAMA_BUILD_SERVER=ON" in calls[1]
    assert calls[2][-3:] == ["--target", "llama-server", "-j3"]
    again = peer_llamacpp.build(tmp_path, "9.9", run=run, log=lambda _: None)
    assert again.reused and len(calls) == 3  # the stamp names 9.9: nothing run
    assert peer_llamacpp.read_stamp(tmp_path)[0] == "9.9"


def test_build_failure_is_a_reason_and_leaves_no_stamp(tmp_path, monkeypatch):
    monkeypatch.setattr(peer_llamacpp.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    _sdist(tmp_path / "sdist" / "llama_cpp_python-9.9.tar.gz", "9.9")

    def run(cmd: list[str]) -> subprocess.CompletedProcess:
        failed = "--build" in cmd
        return subprocess.CompletedProcess(cmd, int(failed), "", "error: ggml.c: boom\n")

    with pytest.raises(PeerError, match="cmake --build failed .exit 1.: error: ggml.c: boom"):
        peer_llamacpp.build(tmp_path, "9.9", run=run, log=lambda _: None)
    assert peer_llamacpp.read_stamp(tmp_path) is None
    killed = "[ 12%] Building tiled.cpp.o\ngmake[3]: *** [build.make:188: tiled.cpp.o] Killed\n"
    killed += "gmake[2]: *** [Makefile2:719: all] Error 2\ngmake: *** [Makefile:507] Error 2\n"
    why = peer_llamacpp._why(killed)
    assert why.startswith("gmake[3]: *** [build.make:188: tiled.cpp.o] Killed (a compiler was")
    assert peer_llamacpp._why("a\nb\nc\nd\n") == "b | c | d"


def test_server_command_and_a_server_that_dies(tmp_path):
    cmd = peer_llamacpp.server_command(Path("/b/llama-server"), Path("/m.gguf"), alias="student",
                                       port=8123, slots=32, threads=2)  # fmt: skip
    line = " ".join(cmd)
    for part in ("-np 32", "-c 4096", "-t 2 -tb 2", "--no-kv-unified", "--no-cache-prompt", "-cb"):
        assert part in line
    assert "--alias student" in line and "--port 8123" in line and "--host 127.0.0.1" in line
    fake = tmp_path / "llama-server"
    fake.write_text(f"#!{sys.executable}\nimport sys\nprint('error: bad magic')\nsys.exit(1)\n")
    fake.chmod(0o755)
    built = peer_llamacpp.LlamaBuild(fake, tmp_path, "9.9", None, True)
    dies = peer_llamacpp.start_llama_server(
        built,
        tmp_path / "m.gguf",
        alias="m",
        port=free_port(),
        log=tmp_path / "s.log",
        timeout_s=20,
    )
    with pytest.raises(PeerError, match="exited with 1: error: bad magic"), dies:
        pass
