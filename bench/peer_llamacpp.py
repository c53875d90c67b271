"""llama.cpp's `llama-server` as a peer: built from source, fed a GGUF of the same weights.

No wheel ships the server, so it is built here, once, into `.cache/llama.cpp/` (git-ignored):

1. the source: the `llama-cpp-python` sdist vendors llama.cpp (`vendor/llama.cpp`), so it comes
   through pip (`pip download --no-binary :all:`) like every other package, and is unpacked;
2. `cmake` with the server on and the web UI off (otherwise it downloads one), static, tuned
   for this CPU (`GGML_NATIVE`), then `--target llama-server` only (~14 min with -j2 on 2 cores);
3. a stamp names the source version: a later run reuses the build.

`convert` turns a GPT-2 folder into GGUF with the source tree's own converter
(`bench.gguf_convert`); `start_llama_server` runs the server the way the race needs it: one
slot per client (`-np`), continuous batching, a KV cache per slot (`--no-kv-unified`), prompt
caching off (each request pays its whole prompt, as it does on the other servers), and as many
threads as cores. Failures are `PeerError`s: the report says why, the race goes on.

CLI (`make llama-server`): `python -m bench.peer_llamacpp build` or
`python -m bench.peer_llamacpp convert MODEL_DIR OUT.gguf [--outtype q8_0]`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.peer_vllm import PeerError, PeerServer, Runner
from bench.server_process import answers, server_process, stop_group
from slimserve.net import free_port

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "llama.cpp"
SDIST = "llama-cpp-python"
VERSION = "0.3.36"
ERROR_LINE = re.compile(r"^\w*(?:Error|Exception): ")
CAUSE = re.compile(r"\berror:|\] Killed$|fatal|No space left|CMake Error")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",  # these two: no web UI, so nothing is downloaded during the build
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
)


@dataclass(frozen=True)
class LlamaBuild:
    """A finished build: the server binary, the source tree (for the converter), its version."""

    server: Path
    source: Path
    version: str
    seconds: float | None  # how long the build that made it took
    reused: bool


def _tail_text(text: str, n: int = 3) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[-n:])


def logged(log: Path) -> Runner:
    """A runner whose commands write their output to the end of `log` (read back on failure)."""

    def run(cmd: list[str]) -> subprocess.CompletedProcess:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as out:
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
        tail = log.read_text(errors="replace")[-8000:]
        return subprocess.CompletedProcess(cmd, proc.returncode, tail, tail)

    return run


def _why(output: str) -> str:
    """The cause of a failed step: its last compiler error or killed job, else its last lines
    (make's own `Error 2` trailer says nothing about why)."""
    causes = [ln.strip() for ln in output.splitlines() if CAUSE.search(ln)]
    if not causes:
        return _tail_text(output)
    killed = " (a compiler was killed: out of memory? fewer jobs use less)"
    return causes[-1][:300] + (killed if causes[-1].endswith("Killed") else "")


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        why = _why(proc.stderr or proc.stdout or "")
        raise PeerError(f"{what} failed (exit {proc.returncode}): {why}")


def _sdist_name(version: str) -> str:
    return f"{SDIST.replace('-', '_')}-{version}"


def vendored_source(cache: Path = CACHE, version: str = VERSION) -> Path:
    """Where the unpacked llama.cpp tree lives (present or not)."""
    return cache / "src" / _sdist_name(version) / "vendor" / "llama.cpp"


def build_dir(cache: Path = CACHE, version: str = VERSION) -> Path:
    return cache / f"build-{version}"


def stamp_path(cache: Path = CACHE) -> Path:
    return cache / "llama-server.stamp"


def read_stamp(cache: Path = CACHE) -> tuple[str, float | None] | None:
    """(source version, build seconds) of the finished build, None when there is none."""
    path = stamp_path(cache)
    if not path.is_file():
        return None
    words = path.read_text().split()
    if not words:
        return None
    try:
        return words[0], float(words[1])
    except (IndexError, ValueError):
        return words[0], None


def fetch_source(cache: Path = CACHE, version: str = VERSION, *, run: Runner | None = None) -> Path:
    """Download the sdist (pip, no wheels) and unpack it, unless it is unpacked already."""
    source = vendored_source(cache, version)
    if (source / "CMakeLists.txt").is_file():
        return source
    run = run or logged(cache / f"build-{version}.log")
    sdists = cache / "sdist"
    archive = sdists / f"{_sdist_name(version)}.tar.gz"
    if not archive.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        _check(run([*cmd, f"{SDIST}=={version}", "-d", str(sdists)]), f"pip download {SDIST}")
    if not archive.is_file():
        raise PeerError(f"pip download left no {archive.name} in {sdists}")
    with tarfile.open(archive) as tar:
        tar.extractall(cache / "src", filter="data")
    if not (source / "CMakeLists.txt").is_file():
        raise PeerError(f"{archive.name} holds no vendor/llama.cpp")
    return source


def build(
    cache: Path = CACHE,
    version: str = VERSION,
    *,
    jobs: int = 2,
    run: Runner | None = None,
    log=print,
) -> LlamaBuild:
    """Build `llama-server` (or reuse the build the stamp names); PeerError says why not.

    Every step's output goes to `<cache>/build-<version>.log` unless `run` is given.
    """
    server = build_dir(cache, version) / "bin" / "llama-server"
    stamp = read_stamp(cache)
    if stamp and stamp[0] == version and server.is_file():
        return LlamaBuild(server, vendored_source(cache, version), version, stamp[1], True)
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise PeerError(f"no {tool} on PATH (apt-get install -y cmake g++)")
    run = run or logged(cache / f"build-{version}.log")
    t0 = time.monotonic()
    log(f"fetching the {SDIST} {version} sdist into {cache}")
    source = fetch_source(cache, version, run=run)
    out = build_dir(cache, version)
    log(f"configuring llama.cpp in {out}")
    _check(run(["cmake", "-S", str(source), "-B", str(out), *CMAKE_FLAGS]), "cmake configure")
    log(f"building llama-server with -j{jobs} (about 14 min on 2 cores; log: {cache})")
    cmd = ["cmake", "--build", str(out), "--target", "llama-server", f"-j{jobs}"]
    _check(run(cmd), "cmake --build")
    if not server.is_file():
        raise PeerError(f"the build finished without {server}")
    seconds = round(time.monotonic() - t0, 1)
    stamp_path(cache).write_text(f"{version}\n{seconds}\n")
    return LlamaBuild(server, source, version, seconds, False)


def convert(source: Path, model_dir: Path, out: Path, outtype: str = "f32") -> Path:
    """`model_dir` (a GPT-2 folder) -> `out` (GGUF, `outtype`: f32 | q8_0 | ...), in a process
    of its own (the converter puts the source tree on its `sys.path`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.gguf_convert", str(source), str(model_dir), str(out)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run([*cmd, "--outtype", outtype], capture_output=True, text=True,
                          env=env, check=False)  # fmt: skip
    if proc.returncode != 0 or not out.is_file():
        why = last_error(proc.stderr) or _tail_text(proc.stderr)
        raise PeerError(f"GGUF conversion failed (exit {proc.returncode}): {why}")
    return out


def last_error(text: str) -> str | None:
    """The last `SomeError: why` line of a Python traceback, if there is one."""
    found = [ln.strip() for ln in text.splitlines() if ERROR_LINE.match(ln.strip())]
    return found[-1][:240] if found else None


def server_command(
    binary: Path,
    gguf: Path,
    *,
    alias: str,
    port: int,
    slots: int = 16,
    slot_ctx: int = 128,
    threads: int | None = None,
) -> list[str]:
    """`llama-server` on 127.0.0.1:`port`: `slots` parallel sequences with continuous batching,
    each its own KV cache of `slot_ctx` tokens, prompt caching off, `threads` (default: every
    core) for both decoding and prompt processing."""
    threads = threads or os.cpu_count() or 1
    return [
        str(binary),
        "-m", str(gguf),
        "--alias", alias,
        "--host", "127.0.0.1",
        "--port", str(port),
        "-t", str(threads),
        "-tb", str(threads),
        "-np", str(slots),
        "-cb",
        "--no-kv-unified",
        "-c", str(slots * slot_ctx),
        "--no-cache-prompt",
        "--no-webui",
    ]  # fmt: skip


def _tail(log: Path | None) -> str:
    if log is None or not log.is_file():
        return "no log"
    return _tail_text(log.read_text(errors="replace")[-4000:])


@contextlib.contextmanager
def start_llama_server(
    built: LlamaBuild,
    gguf: Path,
    *,
    alias: str,
    port: int,
    slots: int = 16,
    slot_ctx: int = 128,
    log: Path | None = None,
    timeout_s: float = 120.0,
) -> Iterator[PeerServer]:
    """Run the server as its own process group; yield it once `/health` answers; stop it after.

    Raises PeerError (with the end of its log) when it exits or does not answer in time.
    """
    cmd = server_command(built.server, gguf, alias=alias, port=port, slots=slots,
                         slot_ctx=slot_ctx)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with server_process(
        cmd,
        ready=lambda: answers(f"{url}/health"),
        exited=lambda rc: PeerError(f"llama-server exited with {rc}: {_tail(log)}"),
        timed_out=lambda: PeerError(f"llama-server not ready after {timeout_s:.0f}s"),
        stop=stop_group,
        log=log,
        timeout_s=timeout_s,
        poll_s=0.2,
        start_new_session=True,
    ) as proc:
        yield PeerServer(url, proc.pid, built.version)


def status(
    enabled: bool = True, *, jobs: int = 2, cache: Path = CACHE, log=print
) -> tuple[dict, LlamaBuild | None]:
    """The report's row for this peer, and the build (None when not requested or not built)."""
    row: dict = {"peer": "llama.cpp llama-server", "status": "not requested"}
    if not enabled:
        return row, None
    try:
        built = build(cache, jobs=jobs, log=log)
    except (PeerError, OSError) as exc:
        return row | {"status": f"not built: {exc}"}, None
    return row | {
        "status": "built",
        "version": f"llama.cpp vendored in {SDIST} {built.version}",
        "build_s": built.seconds,
        "reused": built.reused,
    }, built


def start_for_race(
    stack: contextlib.ExitStack,
    built: LlamaBuild | None,
    row: dict,
    model_dir: Path,
    name: str,
    *,
    outtype: str = "f32",
    slots: int = 16,
    log_dir: Path,
) -> PeerServer | None:
    """Convert `model_dir` to GGUF (`outtype`) and start the server on it inside `stack`.

    The row records `run (<name> <outtype>)`: "ran" or why not; None is returned then.
    """
    if built is None:
        return None
    key = f"run ({name} {outtype})"
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        gguf = convert(built.source, model_dir, CACHE / "gguf" / f"{name}-{outtype}.gguf", outtype)
        server = stack.enter_context(
            start_llama_server(
                built, gguf, alias=name, port=free_port(), slots=slots,
                log=log_dir / f"llama-server-{name}-{outtype}.log",
            )
        )  # fmt: skip
    except PeerError as exc:
        row[key] = f"not started: {exc}"
        return None
    row[key] = "ran"
    return server


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peer_llamacpp", description=__doc__)
    sub = p.add_subparsers(dest="verb", required=True)
    b = sub.add_parser("build", help=f"build llama-server into {CACHE} (reused once built)")
    b.add_argument("--jobs", type=int, default=2, help="parallel compile jobs")
    c = sub.add_parser("convert", help="a GPT-2 folder -> GGUF (needs the source: build first)")
    c.add_argument("model_dir", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--outtype", default="f32", help="f32 | f16 | bf16 | q8_0")
    a = p.parse_args(argv)
    try:
        if a.verb == "build":
            built = build(jobs=a.jobs)
            state = "reused" if built.reused else f"built in {built.seconds:.0f}s"
            print(f"llama-server {built.version}: {built.server} ({state})")
        else:
            source = fetch_source()
            print(convert(source, a.model_dir, a.out, a.outtype))
    except PeerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
