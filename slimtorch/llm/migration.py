"""Scale migration inside one decoder block, before its Linears are rounded: SmoothQuant (``w8a8_quantization``)
or AWQ (``weight_only_quantization.awq``).

Both fold per-input-channel scales ``s`` into the op that makes a group of Linears' input (a norm; v -> o and
up -> down where that is exact) and multiply the Linears' weight columns by ``s``: the float block computes the same
function. This reuses slimtorch's SmoothQuant machinery (slimtorch/quantization/smoothquant) on the block alone:
discovery by hooks on one calibration batch, every fold checked by running the block and reverted if its output
moved (so a GQA model's v -> o, whose widths differ, or a Gemma norm that scales by ``1 + weight`` is skipped, with
the reason in the report). Only the scale formula differs: SmoothQuant's ``max|x|^a / max|w|^(1-a)``, or AWQ's
search (awq.py) on a seeded sample of the block's calibration tokens.

Memory: the block's inputs are those already captured; the statistics add per channel min/max/sum and, for AWQ,
``sample_tokens`` rows per group (2048 x 576 floats = 4.7 MB for SmolLM2).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

from torch import Tensor, nn

from ..config.quant_schema import AWQSettings, LLMSmoothQuant
from ..quantization.grid import WeightGrid
from ..quantization.smoothquant import SmoothQuantReport, smooth
from ..quantization.smoothquant.scales import linear_weight
from ..quantization.smoothquant.stats import ChannelStats
from .awq import awq_search
from .blocks import PREFIX, BlockCall, BlockInput, block_call


def _migrate(block: nn.Module, linears: Sequence[str], inputs: List[BlockInput], **kwargs) -> SmoothQuantReport:
    wrapper = BlockCall(block)
    report = smooth(wrapper, inputs, linear_names=[f"{PREFIX}.{n}" for n in linears], num_batches=len(inputs),
                    input_fn=block_call, **kwargs)
    for g in [*report.groups, *report.skipped]:  # names inside the block, as the caller gave them
        g.prev = g.prev[len(PREFIX) + 1:] if g.prev.startswith(f"{PREFIX}.") else g.prev
        g.linears = [n[len(PREFIX) + 1:] if n.startswith(f"{PREFIX}.") else n for n in g.linears]
    return report


def smoothquant_block(block: nn.Module, linears: Sequence[str], inputs: List[BlockInput],
                      settings: LLMSmoothQuant) -> SmoothQuantReport:
    """SmoothQuant ``block`` in place for its ``linears`` (names inside the block), calibrated on ``inputs``."""
    return _migrate(block, linears, inputs, alpha=settings.alpha)


def awq_block(block: nn.Module, linears: Sequence[str], inputs: List[BlockInput], grid: WeightGrid,
              settings: AWQSettings, where: str = "") -> SmoothQuantReport:
    """AWQ scales searched for ``grid`` and folded into ``block`` in place; each group's winning ratio is reported
    as its alpha (None in the search result is reported as -1: no scaling beat plain rounding)."""

    def scales(stats: ChannelStats, mods: Sequence[nn.Module]) -> Tuple[Tensor, float]:
        result = awq_search(stats.rows, stats.absmean, [linear_weight(m) for m in mods], grid,
                            grid_points=settings.grid, duo_scaling=settings.duo_scaling, where=where)
        return result.scales, -1.0 if result.ratio is None else result.ratio

    return _migrate(block, linears, inputs, alpha=0.5, scales_fn=scales, max_rows=settings.sample_tokens)


def folded_groups(report: SmoothQuantReport) -> Dict[str, str]:
    """Linear -> the op its scales were folded into, for the per-layer report."""
    return {n: g.prev for g in report.groups for n in g.linears}
