"""The one place training reaches into Ray Train's private modules.

Ray Train V2 (the default in Ray 2.60) logs one INFO line per `ray.train.report` with a full
repr of the checkpoint. That logger is named by the *file path* of a private module,
`ray.train.v2._internal.execution.context`, so neither `LoggingConfig` nor the public
`ray.train` logger's level reaches it, and Ray has no public switch for it. The private name is
confined to this module; `tests/training/test_ray_logs.py` fails when Ray moves it.
"""

from __future__ import annotations

import logging
from importlib import import_module

REPORT_LOG_MODULE = "ray.train.v2._internal.execution.context"


def report_logger() -> logging.Logger | None:
    """The logger Ray Train's per-report INFO line goes to, or None on a Ray that lacks it."""
    try:
        context = import_module(REPORT_LOG_MODULE)
    except ImportError:  # another Ray version: keep its logging as it is
        return None
    return logging.getLogger(context.__file__)


def quiet_report_log() -> None:
    """Silence Ray Train's INFO line per report; our progress lines say the same, and its
    warnings still come through."""
    logger = report_logger()
    if logger is not None:
        logger.setLevel(logging.WARNING)
