"""`Strict`: the base of every validated model (profiles, step params, Serve settings, HTTP
requests, reports). An unknown key is an error, so a typo never passes silently.

A module that needs more (no NaN in requests, a string cap, aliases) sets those keys in its own
`model_config`; pydantic merges them with this one.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Unknown fields are rejected, with their names."""

    model_config = ConfigDict(extra="forbid")
