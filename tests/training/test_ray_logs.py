"""The private Ray Train module whose logger `quiet_report_log` silences still exists (this
fails when a Ray upgrade moves it), and silencing it keeps warnings."""

from __future__ import annotations

import logging
from importlib import import_module

from training.ray_logs import REPORT_LOG_MODULE, quiet_report_log, report_logger


def test_the_private_module_is_where_the_adapter_looks():
    module = import_module(REPORT_LOG_MODULE)
    logger = report_logger()
    assert logger is not None and logger.name == module.__file__


def test_quiet_report_log_keeps_warnings_only():
    logger = report_logger()
    assert logger is not None
    before = logger.level
    try:
        quiet_report_log()
        assert logger.level == logging.WARNING
    finally:
        logger.setLevel(before)


def test_training_modules_import_without_a_cycle():
    """`training.loop` no longer needs `training.trainer` (nor the other way round at import)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "training"
    for name, other in (("loop", "trainer"), ("trainer", "loop")):
        tree = ast.parse((root / f"{name}.py").read_text())
        top = [n for n in tree.body if isinstance(n, ast.ImportFrom)]
        assert all(n.module != f"training.{other}" for n in top), name
