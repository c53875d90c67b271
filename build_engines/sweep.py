"""`slimserve sweep prune`: what each pruning amount / ratio costs in quality, and buys in speed.

For one parent (default `student`), in one process:

* **L1 unstructured** at each amount (default 0.1 … 0.9, global ranking, block weights only,
  as `prune-l1` does): measured sparsity, test perplexity, top-1 agreement with the teacher.
* **Structured** points (MLP 75 / 50 / 25 %, width with fewer heads, depth with a layer
  dropped; the `prune-structured` code): parameters, perplexity, agreement, and greedy decode
  tokens/s at batch 1 and 8 next to the parent (`structured.decode_speed`: interleaved runs,
  median of `repeats`).
* **Built variants**: every built `prune-l1` / `prune-structured` child of the parent, with
  its manifest's figures (after recovery) and the same speed measurement, so the table shows
  that dense zeros (L1) buy no speed while a slimmer shape does.

Sweep points are *not* recovered (a recovery per point would cost a training run each); the
built variants are. Everything is measured on the runner's evaluation blocks (test split,
`eval.max_tokens`). The result is `reports/prune_sweep.{json,md,png}` (`slimserve.reports`).
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from build_engines.prune import l1_prune, load_gpt2, measure, teacher_top1, weight_sparsity
from build_engines.structured import calibration_blocks, decode_speed, n_inner, structured_prune
from slimserve.artifacts import ArtifactStore
from slimserve.catalogue import Profile
from slimserve.reports import Chart, Report, Table, new_report, write_report
from slimserve.steps import PruneStructuredParams
from training.kd import non_embedding_params

DEFAULT_AMOUNTS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
REPORT_NAME = "prune_sweep"
PRUNE_STEPS = ("prune-l1", "prune-structured")
CALIBRATION_BLOCKS = 32  # the structured step's default
Log = Callable[[str], None]


@dataclass(frozen=True)
class StructuredPoint:
    """One structured configuration of the sweep (`PruneStructuredParams` fields)."""

    label: str
    mlp_keep: float = 1.0
    heads_keep: int | None = None
    layers_keep: tuple[int, ...] | None = None


def default_points(n_layer: int, n_head: int) -> list[StructuredPoint]:
    """MLP 75 / 50 / 25 %; one head fewer and half the heads (width); the last layer dropped."""
    points = [StructuredPoint(f"mlp {k:.0%}", mlp_keep=k) for k in (0.75, 0.5, 0.25)]
    for k in sorted({n_head - 1, n_head // 2}, reverse=True):
        if 1 <= k < n_head:
            points.append(StructuredPoint(f"heads {k}/{n_head}", mlp_keep=0.5, heads_keep=k))
    if n_layer > 1:
        keep = tuple(range(n_layer - 1))
        points.append(StructuredPoint(f"layers {n_layer - 1}/{n_layer}", layers_keep=keep))
    return points


def check_amounts(amounts: Sequence[float]) -> list[float]:
    if not amounts:
        raise ValueError("--amounts: give at least one amount")
    bad = [a for a in amounts if not 0 < a < 1]
    if bad:
        raise ValueError(f"--amounts: {bad} outside (0, 1); an amount is a fraction of weights")
    return sorted(set(amounts))


def _ratio(x: float | None, base: float | None) -> float | None:
    return None if x is None or not base else round(x / base, 4)


@dataclass
class _Parent:
    """The sweep's starting point: the parent model, its figures and the evaluation data."""

    name: str
    folder: Path
    manifest: Any
    model: Any
    figures: dict[str, Any]  # measure(): perplexity, agreement, ...
    blocks: Any  # (N, T) test blocks
    batch: int
    ref: Any  # the teacher's top-1 tokens on `blocks`, or None

    @property
    def perplexity(self) -> float:
        return self.figures["perplexity"]


def _check_arguments(
    profile: Profile, parent: str | None, scope: str, repeats: int, steps: int, threads: int
) -> tuple[str, ArtifactStore, Any]:
    """The parent's name, the store and the parent's manifest; ValueError on bad input."""
    if scope not in ("global", "layer"):
        raise ValueError(f"--scope must be 'global' or 'layer', got {scope!r}")
    if repeats < 1 or steps < 1 or threads < 1:
        raise ValueError("--repeats, --steps and --threads must be >= 1")
    parent = parent or profile.default_variant
    if parent not in profile.variants:
        raise ValueError(f"--parent: no variant {parent!r} (have: {', '.join(profile.variants)})")
    store = ArtifactStore(profile.artifacts_root(), profile.name)
    manifest = store.manifest(parent)
    if manifest is None:
        raise FileNotFoundError(f"{parent} is not built: run `slimserve build --only {parent}`")
    if manifest.runtime != "torch":
        raise ValueError(f"--parent: {parent} is a {manifest.runtime} variant; pruning needs torch")
    return parent, store, manifest


def _load_parent(
    profile: Profile, store: ArtifactStore, name: str, manifest: Any, data: Any, log: Log
) -> _Parent:
    blocks = data.blocks("test", profile.block_size, profile.eval.max_tokens)
    batch = profile.eval.batch_size
    teacher_dir = store.path(profile.teacher) if store.manifest(profile.teacher) else None
    ref = teacher_top1(teacher_dir, blocks, batch)
    model = load_gpt2(store.path(name))
    figures = measure(model, blocks, batch, ref)
    log(f"sweep: {name} perplexity {figures['perplexity']:.2f}, agreement {figures['agreement']}")
    return _Parent(name, store.path(name), manifest, model, figures, blocks, batch, ref)


def _l1_rows(p: _Parent, amounts: Sequence[float], scope: str, log: Log) -> list[dict[str, Any]]:
    """The parent (amount 0), then each L1 amount: sparsity, perplexity, agreement."""
    rows: list[dict[str, Any]] = [
        {"amount": 0.0, "sparsity": 0.0, **p.figures, "ppl_vs_parent": 1.0},
    ]
    for amount in amounts:
        model = copy.deepcopy(p.model)
        names = l1_prune(model, amount, scope)
        _, total = weight_sparsity(model, names)
        m = measure(model, p.blocks, p.batch, p.ref)
        ratio = _ratio(m["perplexity"], p.perplexity)
        rows.append({"amount": amount, "sparsity": total, **m, "ppl_vs_parent": ratio})
        log(f"sweep: L1 {amount:.2f} -> sparsity {total:.4f}, perplexity {m['perplexity']:.2f}")
    return rows


def _l1_charts() -> list[Chart]:
    return [
        Chart(title="L1: perplexity vs amount", type="line", table=0, x="amount", y=["perplexity"]),
        Chart(
            title="L1: agreement with teacher", type="line", table=0, x="amount", y=["agreement"]
        ),
    ]


def _shape_cols(model: Any) -> dict[str, Any]:
    c = model.config
    return {
        "shape": f"L{c.n_layer} H{c.n_head} E{c.n_embd} I{n_inner(c)}",
        "params": sum(t.numel() for t in model.parameters()),
        "non_embedding_params": non_embedding_params(model),
    }


def _structured_rows(
    p: _Parent,
    points: Sequence[StructuredPoint],
    importance: str,
    calib: Any,
    folders: dict[str, Path],
    tmp: Path,
    log: Log,
) -> list[dict[str, Any]]:
    """Each structured point, pruned from the parent and measured; saved under `tmp` (its
    folder added to `folders`) for the decode-speed runs."""
    rows: list[dict[str, Any]] = []
    for pt in points:
        params = PruneStructuredParams(
            mlp_keep=pt.mlp_keep,
            heads_keep=pt.heads_keep,
            layers_keep=list(pt.layers_keep) if pt.layers_keep is not None else None,
            importance=importance,  # type: ignore[arg-type]
        )
        slim, _ = structured_prune(p.model, params, calib)
        folders[pt.label] = tmp / f"point-{len(rows)}"
        slim.save_pretrained(folders[pt.label])
        m = measure(slim, p.blocks, p.batch, p.ref)
        ratio = _ratio(m["perplexity"], p.perplexity)
        rows.append({"config": pt.label, **_shape_cols(slim), **m, "ppl_vs_parent": ratio})
        log(f"sweep: {pt.label} -> perplexity {m['perplexity']:.2f}")
    return rows


def _speed_cols(speed: dict[str, Any], name: str, parent: str) -> dict[str, Any]:
    """Wall-clock and CPU-time decode tokens/s (see `decode_speed`), and / the parent's."""
    cols: dict[str, Any] = {}
    for clock in ("", "cpu_"):
        for b in (1, 8):
            key = f"{clock}batch_{b}"
            cols[f"{clock}tok_s_b{b}"] = speed[name][key]
            cols[f"{clock}speedup_b{b}"] = _ratio(speed[name][key], speed[parent][key])
    return cols


def _structured_section(
    p: _Parent, s_rows: list[dict[str, Any]], speed: dict[str, Any], table: int
) -> tuple[Table, list[Chart]]:
    """The structured table (the parent first) and its two charts."""
    parent_row = {
        "config": f"{p.name} (parent)",
        **_shape_cols(p.model),
        **p.figures,
        "ppl_vs_parent": 1.0,
    }
    rows = [parent_row | _speed_cols(speed, p.name, p.name)]
    rows += [r | _speed_cols(speed, r["config"], p.name) for r in s_rows]
    charts = [
        Chart(
            title="Structured: decode speedup, batch 8",
            table=table,
            x="config",
            y=["speedup_b8", "cpu_speedup_b8"],
        ),
        Chart(
            title="Structured: perplexity / parent's", table=table, x="config", y=["ppl_vs_parent"]
        ),
    ]
    return Table.from_records(f"Structured pruning of {p.name} (no recovery)", rows), charts


def _built_table(
    p: _Parent, store: ArtifactStore, built: list[str], speed: dict[str, Any]
) -> Table:
    """The parent and its built pruned children, with their manifests' figures."""
    rows = []
    for name in [p.name, *built]:
        m = p.manifest if name == p.name else store.manifest(name)
        assert m is not None
        cols = _manifest_cols(m, p.perplexity)
        rows.append({"variant": name, "step": m.step, **cols, **_speed_cols(speed, name, p.name)})
    return Table.from_records(f"Built variants from {p.name} (after recovery)", rows)


def run_prune_sweep(
    profile: Profile,
    *,
    parent: str | None = None,
    amounts: Sequence[float] = DEFAULT_AMOUNTS,
    scope: str = "global",
    structured: bool = True,
    points: Sequence[StructuredPoint] | None = None,
    importance: str = "activation",
    repeats: int = 5,
    threads: int = 1,
    steps: int = 32,
    reports_dir: str | Path = "reports",
    png: bool = True,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> tuple[Report, list[Path]]:
    """Measure every point, write the report; returns it and the paths written."""
    from slimserve.data import prepare

    amounts = check_amounts(amounts)
    name, store, manifest = _check_arguments(profile, parent, scope, repeats, steps, threads)
    data = prepare(profile, log)
    p = _load_parent(profile, store, name, manifest, data, log)
    l1_rows = _l1_rows(p, amounts, scope, log)
    tables = [
        Table.from_records(f"L1 unstructured pruning of {p.name} ({scope}, no recovery)", l1_rows)
    ]
    charts = _l1_charts()
    built = [
        n
        for n, v in profile.variants.items()
        if v.step in PRUNE_STEPS and v.from_ == p.name and store.manifest(n) is not None
    ]
    with tempfile.TemporaryDirectory(prefix="prune-sweep-") as tmp:
        folders: dict[str, Path] = {p.name: p.folder}
        s_rows: list[dict[str, Any]] = []
        if structured:
            cfg = p.model.config
            calib = None
            if importance == "activation":
                calib = calibration_blocks(data, profile.block_size, CALIBRATION_BLOCKS)
            pts = points if points is not None else default_points(cfg.n_layer, cfg.n_head)
            s_rows = _structured_rows(p, pts, importance, calib, folders, Path(tmp), log)
        for n in built:
            folders[n] = store.path(n)
        log(f"sweep: decode speed of {len(folders)} models (median of {repeats}, interleaved)")
        speed = decode_speed(folders, (1, 8), repeats, steps, threads=threads)
    if structured:
        table, more = _structured_section(p, s_rows, speed, table=len(tables))
        tables.append(table)
        charts += more
    tables.append(_built_table(p, store, built, speed))
    report = new_report(
        REPORT_NAME,
        kind="prune-sweep",
        title=f"Pruning sweep of {p.name} ({profile.name} profile)",
        tables=tables,
        charts=charts,
        notes=_notes(l1_rows, speed, p.name, threads, repeats, steps),
    )
    paths = write_report(report, reports_dir, png=png)
    log(f"sweep: wrote {', '.join(str(path) for path in paths)}")
    return report, paths


def _manifest_cols(m: Any, p0: float) -> dict[str, Any]:
    """A built variant's figures as its manifest records them (measured by the runner)."""
    extra = m.metrics.model_dump()
    return {
        "params": m.params_total,
        "params_nonzero": m.params_nonzero,
        "perplexity": m.metrics.perplexity,
        "ppl_vs_parent": _ratio(m.metrics.perplexity, p0),
        "agreement": m.metrics.agreement,
        "pruned_perplexity": extra.get("pruned_perplexity"),
    }


def _notes(
    l1_rows: list[dict[str, Any]],
    speed: dict[str, Any],
    parent: str,
    threads: int,
    repeats: int,
    steps: int,
) -> list[str]:
    """Findings read off the measured rows (nothing here is a constant)."""
    notes = []
    within = None  # the largest amount up to which every amount stays within 1.10x
    for r in l1_rows[1:]:
        if r["ppl_vs_parent"] is None or r["ppl_vs_parent"] > 1.1:
            break
        within = r["amount"]
    if within is not None:
        notes.append(
            f"L1 without recovery stays within 1.10x the parent's perplexity up to {within}."
        )
    worst = l1_rows[-1]
    notes.append(
        f"L1 at amount {worst['amount']}: perplexity {worst['perplexity']:.2f} "
        f"({worst['ppl_vs_parent']}x the parent's), agreement {worst['agreement']}."
    )
    p = speed[parent]
    notes.append(
        f"Decode tokens/s: greedy, {steps} steps after a 16-token prompt, torch runtime on CPU, "
        f"{threads} thread(s), median of {repeats} interleaved runs in one process; "
        f"{parent}: {p['batch_1']} (batch 1), {p['batch_8']} (batch 8) wall-clock, "
        f"{p['cpu_batch_1']} / {p['cpu_batch_8']} per CPU-second of the decoding thread "
        f"(cpu_* columns: what the model costs, whatever else runs on the machine)."
    )
    load1, _, _ = os.getloadavg()
    notes.append(f"Load average when the sweep ended: {load1:.1f} on {os.cpu_count()} cores.")
    notes.append("Sweep points are not recovered; built variants are (KD from the teacher).")
    return notes
