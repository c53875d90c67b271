"""What every phase of `make reliability` works with: the run's options, the Serve it
deployed, and what the phases add to the report (reliability.run drives them)."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

APP = "reliability"  # the Serve application the run deploys
BODY = {"prompt": "The Python interpreter", "max_tokens": 16, "temperature": 0.7}


@dataclass
class Run:
    """One reliability run: its options and what the phases add to the report."""

    a: argparse.Namespace
    profile: str  # the catalogue's name
    store: Path  # its artifact folder (artifacts/<profile>)
    base: str = ""  # the Serve URL, once started
    app: str = APP
    tables: list[Any] = field(default_factory=list)  # slimserve.reports.Table
    notes: list[str] = field(default_factory=list)
    verdicts: dict[str, bool] = field(default_factory=dict)
    t_start: float = field(default_factory=time.monotonic)

    @property
    def body(self) -> dict[str, Any]:
        return {**BODY, "model": self.a.variant}

    def table(self, title: str, rows: list[dict[str, Any]]) -> None:
        from slimserve.reports import Table

        self.tables.append(Table.from_records(title, rows))
