"""Shared pieces of the typed config: the strict base model and path-aware errors."""
from __future__ import annotations

import re
from typing import List, Optional

from pydantic import BaseModel, ConfigDict


class PathValueError(ValueError):
    """A cross-field error that knows the key path (relative to the model raising it) it belongs to."""

    def __init__(self, subpath: str, message: str):
        super().__init__(message)
        self.subpath = subpath


class StrictModel(BaseModel):
    """Every config section: unknown keys are errors, no type coercion, immutable once loaded."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def check_regexes(patterns: Optional[List[str]]) -> Optional[List[str]]:
    """``patterns`` unchanged if every entry compiles as a regular expression; a ValueError naming the bad one."""
    for i, pat in enumerate(patterns or []):
        try:
            re.compile(pat)
        except re.error as exc:
            raise ValueError(f"entry {i} ({pat!r}) is not a valid regular expression: {exc}") from None
    return patterns


