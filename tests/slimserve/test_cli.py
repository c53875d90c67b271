"""The CLI: verbs listed, help on every option, bad input exits 2 with one clear line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from slimserve.cli import main, make_parser


def test_help_lists_verbs():
    out = subprocess.run(
        [sys.executable, "-m", "slimserve.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for verb in ("build", "eval", "data", "generate", "bench"):
        assert verb in out


def test_every_option_has_help():
    parser = make_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.dest} has no help"


def test_dry_run_prints_plans(capsys):
    for cfg in ("configs/tiny.yaml", "configs/gpt2.yaml"):
        assert main(["build", "--config", cfg, "--dry-run", "--artifacts", "/nonexistent/x"]) == 0
    err = capsys.readouterr().err
    assert "plan for profile 'tiny'" in err and "plan for profile 'gpt2'" in err
    assert "student-trt" in err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["build", "--config", "configs/nope.yaml"], "no such profile"),
        (["build", "--only", "ghost", "--dry-run"], "no variant 'ghost'"),
        (["eval", "--variant", "ghost"], "no variant 'ghost'"),
    ],
)
def test_bad_input_exits_2(argv, needle, capsys):
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_unwritable_artifacts_exits_2(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["build", "--artifacts", str(tmp_path / "file" / "sub")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_upper_layers_register_their_verbs():
    """`bench` and `sweep` come from entry points, so the core CLI never imports upward."""
    import ast
    from pathlib import Path

    from slimserve.cli import all_verbs

    assert [v.name for v in all_verbs()][-2:] == ["bench", "sweep"]
    source = Path(__file__).resolve().parents[2] / "slimserve" / "cli.py"
    imported = {
        n.module.split(".")[0]
        for n in ast.walk(ast.parse(source.read_text()))
        if isinstance(n, ast.ImportFrom) and n.module
    }
    assert not imported & {"bench", "build_engines", "training", "deployments", "dashboard"}
