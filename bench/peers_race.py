"""The peers race: every server takes its turn level by level, round after round.

Kept apart from `peers.py` (which starts the servers) so the turn order and the median rounds
can be tested with a fake load generator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from bench.serving import CpuMeter, LevelResult, median_level, run_levels

Races = dict[str, list[LevelResult]]


class RacePlan(Protocol):
    """The settings `race` reads (`bench.peers.PeersPlan` has them)."""

    requests_per_client: int
    min_requests: int
    max_tokens: int
    once: frozenset[str]


def running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class PeerMeter(CpuMeter):
    """The load generator's CPU meter, but a process that has exited (a peer that died during
    the race) is forgotten instead of failing the snapshot."""

    def snapshot(self) -> dict[str, float]:
        import psutil

        for _ in range(3):
            self.extra = {k: pid for k, pid in self.extra.items() if running(pid)}
            try:
                return super().snapshot()
            except psutil.NoSuchProcess:
                continue
        return super().snapshot()

    def memory(self) -> dict[str, dict[str, float]]:
        self.extra = {k: pid for k, pid in self.extra.items() if running(pid)}
        return super().memory()


def memory_rows(meter: PeerMeter, model: str, folders: dict[str, Path]) -> list[dict[str, Any]]:
    """Each process role's resident memory after `model`'s race, servers still up; a slimserve
    replica (its role is its variant's name) beside its artifact folder's bytes on disk."""
    from slimserve.artifacts import folder_bytes

    rows = []
    for role, mem in sorted(meter.memory().items()):
        if role == "client":
            continue
        row: dict[str, Any] = {"model": model, "process": role, **mem}
        if role in folders:
            row["folder_mib"] = round(folder_bytes(folders[role]) / 2**20, 1)
        rows.append(row)
    return rows


def race(
    servers: dict[str, tuple[str, str]],
    plan: RacePlan,
    concurrencies: Sequence[int],
    meter: CpuMeter,
    own: dict[str, frozenset[str]],
    alive: dict[str, Callable[[], bool]] | None = None,
    rounds: int = 1,
    close: frozenset[str] = frozenset(),
) -> Races:
    """label -> (URL, model name): one `run_levels` call per level, round and label, so the
    servers take turns level by level even though they serve the model under different names.

    Each concurrency runs `rounds` rounds in a row. A round is every server non-streamed, then
    every server streamed, the servers' order rotated each round; each server keeps its median
    run per level (`median_level`). On a VM whose speed drifts by a quarter within seconds, one
    short run per level decides a ratio by luck, and a drift between a whole non-streamed phase
    and a whole streamed one would decide the streamed / non-streamed ratio. Servers in
    `plan.once` (the Flask baseline, far behind and slow to measure) run the first round only.
    A server whose `alive` check fails after one of its levels is left out of the rest.
    Servers in `close` get a new connection per request (llama-server closes a kept-alive
    connection after each streamed answer, so a reused one fails).
    """
    out: Races = {label: [] for label in servers}
    gone: set[str] = set()
    labels = list(servers)
    for conc in concurrencies:
        got: dict[tuple[str, bool], list[LevelResult]] = {}
        for r in range(max(1, rounds)):
            for stream in (False, True):
                for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
                    if label in gone or (r and label in plan.once):
                        continue
                    url, model = servers[label]
                    got.setdefault((label, stream), []).extend(
                        run_levels(
                            {label: url},
                            model=model,
                            concurrencies=(conc,),
                            streams=(stream,),
                            requests_per_client=plan.requests_per_client,
                            min_requests=plan.min_requests,
                            max_tokens=plan.max_tokens,
                            meter=meter,
                            own=own,
                            force_close=label in close,
                        )[label]
                    )
                    if label in (alive or {}) and not alive[label]():
                        print(f"{label} has exited: left out of the remaining levels", flush=True)
                        gone.add(label)
        for (label, _), runs in sorted(got.items(), key=lambda kv: kv[0][1]):
            out[label].append(median_level(runs))
    return out
