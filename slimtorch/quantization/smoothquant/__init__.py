r"""SmoothQuant: per-input-channel scales that move activation outliers into the weights, folded into the model or
kept as an explicit multiply on each Linear's input.

``y = x W^T = (x / s) (W * s)^T`` for any s > 0: the activation range shrinks where s > 1. Folded, the ``1 / s`` goes
into the op that makes ``x`` (a LayerNorm/RMSNorm's weight and bias, or a previous Linear's output rows and bias), so
the model keeps its structure, its module names and its float function.

| function              | what it does                                                                          |
|-----------------------|---------------------------------------------------------------------------------------|
| smoothing_scales      | s_j = max\|X_j\|^a / max\|W_j\|^(1-a); 1 for channels with zero activation or weight   |
| find_smoothing_groups | hooks: the Linears that read exactly a norm's or a Linear's output tensor, plus Linear |
|                       | -> Linear pairs through other ops (value -> attention output), tried per block          |
| search_alpha          | the grid alpha with the least int8 fake-quant output error of a group                 |
| smooth                | calibrate, pick alpha, fold, verify, report (SmoothQuantReport)                       |
| smooth_explicit       | no folding: scale every Linear's weight columns, 1/s for its QDQ layer's input        |

| module      | its one job                                                                             |
|-------------|-----------------------------------------------------------------------------------------|
| scales      | the scale formula, alpha validation, weight maxima, scaling weights in place            |
| stats       | ChannelStats: the observer for per-channel ranges and sampled input rows                |
| alpha       | ALPHA_GRID and the search for the alpha with the least fake-quant error                 |
| report      | the result types: SmoothGroup, GroupResult, SmoothQuantReport                           |
| exactness   | fold, run the model on a probe batch, compare, revert                                   |
| discovery   | the traced forward, candidate groups, each checked for exactness                        |
| folded      | smooth(): the scales folded into the previous op                                        |
| explicit    | smooth_explicit(), input_groups(): an explicit per-channel multiply before each Linear  |

"Smoothing never changes the float model" is checked, not assumed: each candidate fold is applied, the model run on
a probe batch and the fold reverted if the output moved. Hooks see module calls, not the residual add: a post-LN
block (BERT) feeds its LayerNorm's output to the next Linears *and* to the residual, so folding into it is wrong,
while a pre-LN block (LLaMA, GPT-2) feeds it to the Linears only. The check also catches norms that scale by
``1 + weight`` (Gemma) and tied weights.
"""
from .alpha import ALPHA_GRID, alpha_errors, search_alpha
from .discovery import find_smoothing_groups
from .explicit import input_groups, smooth_explicit
from .folded import smooth
from .report import GroupResult, SmoothGroup, SmoothQuantReport
from .scales import smoothing_scales
from .stats import ChannelStats

__all__ = [
    "ALPHA_GRID", "ChannelStats", "GroupResult", "SmoothGroup", "SmoothQuantReport", "alpha_errors",
    "find_smoothing_groups", "input_groups", "search_alpha", "smooth", "smooth_explicit", "smoothing_scales",
]
