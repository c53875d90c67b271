"""`slimserve sweep prune` smoke test on a tiny seeded store (seconds, no Ray): the report's
tables hold measured figures, the files are written, and bad input is one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_prune import seed_store, tiny_profile, tiny_profile_raw, write_corpus

from build_engines.sweep import StructuredPoint, default_points, run_prune_sweep
from slimserve.cli import main
from slimserve.reports import read_report
from slimserve.runner import build


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("sweep-store")
    corpus = write_corpus(base / "corpus")
    seed_store(base / "artifacts", corpus)
    return base / "artifacts", corpus


def test_default_points_cover_mlp_width_and_depth():
    labels = [p.label for p in default_points(n_layer=2, n_head=4)]
    assert labels == ["mlp 75%", "mlp 50%", "mlp 25%", "heads 3/4", "heads 2/4", "layers 1/2"]
    assert [p.label for p in default_points(n_layer=1, n_head=1)] == labels[:3]


def test_sweep_writes_a_report_of_measured_points(seeded, tmp_path):
    root, corpus = seeded
    variants = {"pruned": {"step": "prune-l1", "from": "student", "params": {"amount": 0.5}}}
    profile = tiny_profile(root, corpus, variants)
    build(profile, only="pruned", log=lambda _: None)  # a built child (no recovery: no Ray)
    points = [StructuredPoint("mlp 50%", mlp_keep=0.5), StructuredPoint("heads 2/4", 0.5, 2)]
    report, paths = run_prune_sweep(
        profile,
        amounts=[0.6, 0.3],
        points=points,
        repeats=1,
        steps=2,
        reports_dir=tmp_path / "reports",
        log=lambda _: None,
    )
    assert sorted(p.name for p in paths) == [
        "prune_sweep.json",
        "prune_sweep.md",
        "prune_sweep.png",
    ]
    assert read_report(tmp_path / "reports" / "prune_sweep.json").report is not None
    l1, slim, built = (t.records() for t in report.tables)
    assert [r["amount"] for r in l1] == [0.0, 0.3, 0.6]
    for r in l1[1:]:
        assert abs(r["sparsity"] - r["amount"]) < 0.005
        assert r["perplexity"] > 1 and 0 <= r["agreement"] <= 1
    assert l1[0]["ppl_vs_parent"] == 1.0 and l1[2]["perplexity"] != l1[0]["perplexity"]
    assert [r["config"] for r in slim] == ["student (parent)", "mlp 50%", "heads 2/4"]
    assert slim[2]["params"] < slim[1]["params"] < slim[0]["params"]
    assert all(r["tok_s_b8"] > 0 for r in slim) and slim[0]["speedup_b8"] == 1.0
    assert [r["variant"] for r in built] == ["student", "pruned"]
    assert built[1]["params_nonzero"] < built[1]["params"] == built[0]["params"]
    md = (tmp_path / "reports" / "prune_sweep.md").read_text()
    assert "prune_sweep.png" in md and "machine:" in md
    json.loads((tmp_path / "reports" / "prune_sweep.json").read_text())


def test_cli_bad_input_is_one_clear_error(seeded, tmp_path, capsys):
    root, corpus = seeded
    config = tmp_path / "t.yaml"
    config.write_text(yaml.safe_dump(tiny_profile_raw(root, corpus)))
    out = tmp_path / "reports"
    for args, message in (
        (["--amounts", "0.5", "1.5"], "--amounts: [1.5] outside (0, 1)"),
        (["--parent", "nope"], "--parent: no variant 'nope'"),
    ):
        assert (
            main(["sweep", "prune", "--config", str(config), "--report-dir", str(out), *args]) == 2
        )
        assert message in capsys.readouterr().err
    empty = tmp_path / "t2.yaml"
    empty.write_text(yaml.safe_dump(tiny_profile_raw(tmp_path / "none", corpus)))
    assert main(["sweep", "prune", "--config", str(empty), "--report-dir", str(out)]) == 2
    assert "student is not built" in capsys.readouterr().err
    assert not out.exists()  # nothing written
