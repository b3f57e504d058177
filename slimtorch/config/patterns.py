"""Sparsity pattern strings -> typed patterns.

| string        | meaning                                                                 |
|---------------|-------------------------------------------------------------------------|
| ``"NxM"``     | blocks of N consecutive output channels x M consecutive inputs, kept or |
|               | dropped whole; ``"1x1"`` is unstructured                                |
| ``"channelx1"`` | a whole input column (all output channels of one input)               |
| ``"1xchannel"`` | a whole output row (one neuron, with its bias)                        |
| ``"N:M"``     | at most N non-zeros in every M consecutive weights along the input dim  |
| ``"head"``    | whole attention heads of an output projection (its input columns, one   |
|               | head wide; under grouped-query attention a key/value head with its      |
|               | query heads): the width is read from the model when the layer is chosen |
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Union

CHANNEL = "channel"
HEAD = "head"
_BLOCK_RE = re.compile(r"^\s*(\d+|channel)\s*x\s*(\d+|channel)\s*$", re.IGNORECASE)
_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class BlockPattern:
    """Blocks of ``rows`` output channels x ``cols`` inputs; ``None`` spans the whole dimension."""

    rows: Optional[int]
    cols: Optional[int]

    def __str__(self) -> str:
        return f"{self.rows or CHANNEL}x{self.cols or CHANNEL}"

    @property
    def is_unstructured(self) -> bool:
        return self.rows == 1 and self.cols == 1

    @property
    def prunes_rows(self) -> bool:
        """True when a block spans every input of its outputs, so those neurons' biases go too."""
        return self.cols is None


@dataclass(frozen=True)
class NMPattern:
    """At most ``n`` non-zeros in each group of ``m`` consecutive inputs."""

    n: int
    m: int

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def min_dense_ratio(self) -> float:
        return self.n / self.m


@dataclass(frozen=True)
class HeadPattern:
    """``"head"`` as written in a config: resolved per layer to :class:`HeadBlocks` from the model's head count."""

    def __str__(self) -> str:
        return HEAD


@dataclass(frozen=True)
class HeadBlocks(BlockPattern):
    """``"head"`` resolved on one layer: blocks of every output x ``cols`` input columns, one head (or GQA group)."""

    def __str__(self) -> str:
        return f"head ({self.cols} columns)"


Pattern = Union[BlockPattern, NMPattern, HeadPattern]


def parse_pattern(text: str) -> Pattern:
    """Parse a pattern string; raises ``ValueError`` with the accepted forms on bad input."""
    if not isinstance(text, str):
        raise ValueError(f"a pattern is a string such as '4x1' or '2:4', got {type(text).__name__} {text!r}")
    if text.strip().lower() == HEAD:
        return HeadPattern()
    nm = _NM_RE.match(text)
    if nm:
        n, m = int(nm.group(1)), int(nm.group(2))
        if m < 2 or n < 1 or n >= m:
            raise ValueError(
                f"N:M pattern {text!r} needs 1 <= N < M (N = weights kept of every M), e.g. '2:4', '1:4', '4:8'"
            )
        return NMPattern(n, m)
    block = _BLOCK_RE.match(text)
    if block:
        rows, cols = (None if g.lower() == CHANNEL else int(g) for g in block.groups())
        if rows is None and cols is None:
            raise ValueError("pattern 'channelxchannel' would prune whole layers; use 'channelx1' or '1xchannel'")
        if rows == 0 or cols == 0:
            raise ValueError(f"pattern {text!r}: block sides must be >= 1")
        return BlockPattern(rows, cols)
    raise ValueError(
        f"unknown pattern {text!r}; use 'NxM' blocks ('4x1', '1x1' unstructured), 'channelx1' (input columns), "
        "'1xchannel' (output rows), 'head' (attention heads of an output projection) or 'N:M' ('2:4')"
    )
