"""Typed config of ``compression_inference``: static and dynamic post-training quantization, and the decoder-LLM
sections of ``slimtorch.oneshot`` (weight-only quantization, one-shot pruning).

Key names follow docs/conventions.md; every key has a documented default, so ``{"enabled": true}`` is a whole section.
"""
from __future__ import annotations

from typing import List, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from .base import PathValueError, StrictModel, check_regexes
from .patterns import BlockPattern, NMPattern, parse_pattern

OpType = Literal["Linear", "Conv1d", "Conv2d", "Conv1D"]
ALL_OP_TYPES: List[str] = ["Linear", "Conv1d", "Conv2d", "Conv1D"]
Observer = Literal["minmax", "moving_average", "percentile", "entropy", "mse"]


class WeightQuant(StrictModel):
    """Weights: int8, symmetric (zero point 0, so pruned zeros stay exactly 0; what TensorRT needs)."""

    dtype: Literal["int8"] = "int8"
    scheme: Literal["symmetric"] = "symmetric"
    granularity: Literal["per_channel", "per_tensor"] = "per_channel"
    # minmax: s = max|W| / 127 per channel; mse: the clipped scale with the least squared rounding error
    observer: Literal["minmax", "mse"] = "minmax"


class _ActivationBase(StrictModel):
    # uint8 asymmetric is the default: ONNX Runtime's fast int8 path on x86 (U8S8) and the accurate choice for
    # one-sided inputs (after GELU/ReLU). int8 symmetric is what TensorRT takes; see docs/quantization.md.
    dtype: Literal["int8", "uint8"] = "uint8"
    scheme: Optional[Literal["symmetric", "asymmetric"]] = None  # default follows dtype

    @model_validator(mode="after")
    def _scheme_fits_dtype(self):
        if self.dtype == "uint8" and self.scheme == "symmetric":
            raise PathValueError("scheme", "uint8 activations are asymmetric (zero point in [0, 255]); use "
                                           "'scheme': 'asymmetric', or 'dtype': 'int8' for symmetric activations")
        return self

    @property
    def symmetric(self) -> bool:
        if self.scheme is None:
            return self.dtype == "int8"
        return self.scheme == "symmetric"


class StaticActivationQuant(_ActivationBase):
    """Activations with ranges from calibration data."""

    observer: Observer = "minmax"
    percentile: float = Field(default=99.99, gt=50.0, le=100.0)


class DynamicActivationQuant(_ActivationBase):
    """Activations quantized at run time from each input: one range per tensor, or per token (row)."""

    granularity: Literal["per_tensor", "per_token"] = "per_tensor"


#: SmoothQuant's alpha when the config gives none, in static_quantization and w8a8_quantization alike. Measured
#: (docs/conventions.md, "SmoothQuant"): best or tied on all-MiniLM-L6-v2 static int8 and SmolLM2 W8A8 + GPTQ, 1.7%
#: behind 0.5 on SmolLM2 W8A8 with RTN weights; "auto" was never clearly better
SMOOTHQUANT_ALPHA = 0.8


class SmoothQuantConfig(StrictModel):
    """SmoothQuant, one shape for ``static_quantization`` and ``w8a8_quantization``: per-input-channel scales
    ``s = max|x|^alpha / max|w|^(1-alpha)`` move activation outliers into the weights. ``alpha`` in [0, 1] (0:
    nothing moves to the weights, 1: everything) or "auto" (per group, the grid value with the least fake-quant
    output error); ``folding``: the ``1/s`` folded into the previous op (false: an explicit multiply on each QDQ
    layer's input, static_quantization only)."""

    enabled: bool = False
    alpha: Union[float, Literal["auto"]] = SMOOTHQUANT_ALPHA
    folding: bool = True

    @field_validator("alpha", mode="before")
    @classmethod
    def _alpha_range(cls, value):
        if isinstance(value, bool):
            raise ValueError("alpha must be a number in [0, 1] or \"auto\"")
        if isinstance(value, (int, float)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"alpha must be in [0, 1] (0: no migration to the weights, 1: all of it), "
                                 f"got {value}")
            return float(value)
        return value


class AccuracyCriterion(StrictModel):
    """How much of ``eval_fn``'s metric quantization may cost; layers go back to float until it holds.

    Met when ``metric >= baseline - allowed`` (``higher_is_better``; else ``metric <= baseline + allowed``), with
    ``allowed = tolerable_loss * |baseline|`` if ``relative`` else ``tolerable_loss``. ``max_trials`` bounds the
    ``eval_fn`` calls on candidate models (the float baseline is not a trial); ``timeout`` bounds the search's wall
    time in seconds, counted from the first candidate evaluation (0 = no limit). See docs/quantization.md.
    """

    tolerable_loss: float = Field(default=0.01, ge=0.0)
    relative: bool = True
    higher_is_better: bool = True
    max_trials: int = Field(default=100, ge=1)
    timeout: float = Field(default=0, ge=0)


class _QuantSection(StrictModel):
    enabled: bool = False
    weight: WeightQuant = Field(default_factory=WeightQuant)
    op_types: List[OpType] = Field(default_factory=lambda: list(ALL_OP_TYPES), min_length=1)
    quantize_attention_matmuls: bool = False
    excluded_modules: List[str] = Field(default_factory=list)
    fold_batchnorm: bool = True
    accuracy_criterion: Optional[AccuracyCriterion] = None

    @field_validator("excluded_modules")
    @classmethod
    def _valid_regexes(cls, value):
        return check_regexes(value)


class StaticQuantization(_QuantSection):
    activation: StaticActivationQuant = Field(default_factory=StaticActivationQuant)
    num_calibration_batches: int = Field(default=100, ge=1)
    smoothquant: SmoothQuantConfig = Field(default_factory=SmoothQuantConfig)
    # add E[(W - W_q) x] to each layer's bias, measured on the calibration data; "auto": convolutions only (where
    # it pays: EfficientNet-lite0 top-1 agreement 0.89 -> 0.95; on transformers it changes nothing measurable)
    bias_correction: Union[bool, Literal["auto"]] = "auto"


class DynamicQuantization(_QuantSection):
    activation: DynamicActivationQuant = Field(default_factory=DynamicActivationQuant)


class GPTQSettings(StrictModel):
    """GPTQ (Frantar et al. 2022): quantize a layer's columns one at a time and push each column's rounding error
    onto the columns not yet quantized, weighted by the inverse Hessian ``H = 2/n X^T X`` of the layer's inputs."""

    # added to H's diagonal as a fraction of its mean: keeps H invertible where few tokens or dead inputs leave it
    # singular; larger values move GPTQ towards round-to-nearest
    dampening: float = Field(default=0.01, gt=0.0, le=1.0)
    block_size: int = Field(default=128, ge=1)  # columns updated lazily together (speed only, same result)
    # quantize the columns with the largest H_ii first (llm-compressor's default too); on SmolLM2-135M int4 group 64
    # it took GPTQ's perplexity increase from +41% to +21% (RTN: +44%), per channel from +64% to +29% (RTN: +96%)
    act_order: bool = True
    # group scales from the weights before GPTQ (groups stay runs of consecutive columns, also under act_order); false:
    # from the weights as GPTQ has updated them when the group's first column is reached (the paper's rule; with
    # act_order, groups then follow the processing order and the layer needs a column permutation, g_idx)
    static_groups: bool = True


class _OneShotSection(StrictModel):
    """What the sections of ``slimtorch.oneshot`` share: the layers left alone and where the blocks are."""

    enabled: bool = False
    excluded_modules: List[str] = Field(default_factory=list)  # regexes on full module names, left float
    blocks: Optional[str] = None  # dotted path of the ModuleList of repeated blocks; None: found automatically

    @field_validator("excluded_modules")
    @classmethod
    def _valid_regexes(cls, value):
        return check_regexes(value)


class AWQSettings(StrictModel):
    """AWQ (Lin et al. 2023): before rounding, per-input-channel scales ``s`` searched on the calibration activations
    and folded into the op before each group of Linears (a norm, or a Linear such as up -> down), so that the input
    channels that carry large activations get a finer grid. ``algorithm`` then rounds the scaled weights."""

    enabled: bool = False
    # candidate scales s = mean|x|^r / mean|w~|^(1-r) for r = 0, 1/grid, ..., (grid-1)/grid, plus s = 1 (no scaling)
    grid: int = Field(default=20, ge=1)
    # duo scaling: divide by the weights' normalized magnitude too (llm-compressor's default); false: s = mean|x|^r
    duo_scaling: bool = True
    # calibration tokens (a seeded uniform sample) on which each candidate's output error is measured; mean|x| uses all
    sample_tokens: int = Field(default=2048, ge=1)


class WeightOnlyQuantization(_OneShotSection):
    """Weight-only int4/int8 for decoder LLMs, block by block (``slimtorch.oneshot``); activations stay float.

    Only the Linears inside the repeated blocks are quantized (embeddings, final norm and lm_head stay float);
    ``group_size`` -1 is one scale per output channel. ``awq.enabled`` searches activation-aware scales before
    ``algorithm`` rounds. See docs/llm.md.
    """

    bits: Literal[4, 8] = 4
    symmetric: bool = True
    group_size: int = 128
    algorithm: Literal["rtn", "gptq"] = "gptq"
    gptq: GPTQSettings = Field(default_factory=GPTQSettings)
    awq: AWQSettings = Field(default_factory=AWQSettings)

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value):
        if value != -1 and value < 1:
            raise ValueError(f"group_size must be a positive number of input columns per scale, or -1 for one "
                             f"scale per output channel; got {value}")
        return value


class LLMSmoothQuant(SmoothQuantConfig):
    """SmoothQuant inside each decoder block (``w8a8_quantization.smoothquant``): the same keys and checks as
    :class:`SmoothQuantConfig` (alpha 0.8 by default), folded only (the section refuses ``folding: false``)."""


class W8A8Quantization(_OneShotSection):
    """Weights and activations in 8 bits for decoder LLMs, block by block (``slimtorch.oneshot``): int8 or FP8 E4M3.

    Weights: one symmetric scale per output channel, rounded by ``algorithm`` (GPTQ for int8 only). Activations:
    ``dynamic_per_token`` (a scale per token, computed at run time) or ``static_per_tensor`` (one scale per Linear
    input from the calibration data). Only the Linears inside the repeated blocks are quantized. See docs/llm.md.
    """

    format: Literal["int8", "fp8_e4m3"] = "int8"
    activations: Literal["dynamic_per_token", "static_per_tensor"] = "dynamic_per_token"
    algorithm: Literal["rtn", "gptq"] = "gptq"
    gptq: GPTQSettings = Field(default_factory=GPTQSettings)
    smoothquant: LLMSmoothQuant = Field(default_factory=LLMSmoothQuant)
    observer: Observer = "minmax"  # static_per_tensor: what gives each Linear's input range (quantize's observers)
    percentile: float = Field(default=99.99, gt=50.0, le=100.0)  # observer "percentile": the |x| quantile kept

    @model_validator(mode="after")
    def _gptq_grid(self):
        if self.enabled and self.format == "fp8_e4m3" and self.algorithm == "gptq":
            raise PathValueError("algorithm", "GPTQ rounds to the int8 grid only; FP8 E4M3 weights take algorithm "
                                 "'rtn' (round to nearest, per channel)")
        return self

    @model_validator(mode="after")
    def _folded_smoothing(self):
        if self.smoothquant.enabled and not self.smoothquant.folding:
            raise PathValueError("smoothquant.folding", "the block pipeline folds SmoothQuant's scales into the "
                                 "previous op (W8A8 layers have no explicit input multiply); remove folding: false")
        return self

    @model_validator(mode="after")
    def _observer_needs_static(self):
        if self.observer != "minmax" and self.activations != "static_per_tensor":
            raise PathValueError("observer", f"observer {self.observer!r} chooses static activation ranges; "
                                 "dynamic_per_token activations take each token's range at run time: set "
                                 "activations to 'static_per_tensor' or leave observer out")
        return self


class SparseGPTSettings(StrictModel):
    dampening: float = Field(default=0.01, gt=0.0, le=1.0)  # as GPTQ's: a fraction of mean(diag H) added to it
    block_size: int = Field(default=128, ge=1)  # columns whose unstructured mask is chosen together


class OneShotPruning(_OneShotSection):
    """Pruning without training for decoder LLMs, block by block (``slimtorch.oneshot``), alone or before
    ``weight_only_quantization`` (pruned zeros stay zeros). See docs/llm.md.

    The sparsity is an N:M ``pattern`` ("2:4" keeps 2 of every 4 consecutive input weights, as in ``sparse_pruning``)
    or an unstructured ``dense_ratio`` (the fraction of each row's weights kept). ``pattern`` "channelx1" with a
    ``dense_ratio`` removes whole input columns (the fraction kept), e.g. FFN units through the down projection,
    which ``slimtorch.slim`` then cuts out; it needs ``modules``.
    """

    method: Literal["sparsegpt", "wanda", "magnitude"] = "sparsegpt"
    pattern: Optional[str] = None
    dense_ratio: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    modules: List[str] = Field(default_factory=list)  # regexes on full module names; empty: every Linear
    sparsegpt: SparseGPTSettings = Field(default_factory=SparseGPTSettings)

    @field_validator("pattern")
    @classmethod
    def _n_m_or_columns(cls, value):
        if value is None:
            return value
        parsed = parse_pattern(value)
        columns = isinstance(parsed, BlockPattern) and parsed.rows is None and parsed.cols == 1
        if not isinstance(parsed, NMPattern) and not columns:
            raise ValueError(f"one-shot pruning takes an N:M pattern such as '2:4' or '4:8', 'channelx1' (whole input "
                             f"columns, with a dense_ratio), or no pattern and a dense_ratio for unstructured "
                             f"sparsity; got '{value}' (block patterns are for training-time pruning, "
                             "compression_training.sparse_pruning)")
        return value

    @field_validator("modules")
    @classmethod
    def _valid_module_regexes(cls, value):
        return check_regexes(value)

    @property
    def columns(self) -> bool:
        return self.pattern is not None and not isinstance(parse_pattern(self.pattern), NMPattern)

    @model_validator(mode="after")
    def _one_sparsity(self):
        if not self.enabled:
            return self
        if self.columns:
            if self.dense_ratio is None:
                raise PathValueError("dense_ratio", "pattern 'channelx1' removes whole input columns: give the "
                                     "fraction of columns each layer keeps as dense_ratio (e.g. 0.75)")
            if not self.modules:
                raise PathValueError("modules", "pattern 'channelx1' removes whole input columns: name the layers "
                                     "whose inputs are units that can go (e.g. [\"mlp.down_proj\"] for FFN units); "
                                     "a layer that reads the residual stream would only lose features")
        elif (self.pattern is None) == (self.dense_ratio is None):
            raise PathValueError("pattern", "give the sparsity as an N:M pattern (e.g. \"2:4\") or as an unstructured "
                                 "dense_ratio (e.g. 0.5), exactly one of them")
        return self


class CompressionInference(StrictModel):
    """The post-training sections; ``slimtorch.compress`` runs every enabled one in order (one-shot pruning, then
    quantization). ``oneshot_pruning`` goes with any quantization section (it prunes first)."""

    # how slimtorch.compress runs the sections: "auto" takes the block pipeline for a decoder LLM (a transformers
    # model that generates text, whose repeated blocks are found) and the whole-model path otherwise; "blocks" and
    # "whole_model" force one (e.g. "blocks" for a decoder without a generation head)
    pipeline: Literal["auto", "blocks", "whole_model"] = "auto"
    static_quantization: Optional[StaticQuantization] = None
    dynamic_quantization: Optional[DynamicQuantization] = None
    weight_only_quantization: Optional[WeightOnlyQuantization] = None
    oneshot_pruning: Optional[OneShotPruning] = None
    w8a8_quantization: Optional[W8A8Quantization] = None

    @model_validator(mode="after")
    def _one_mode(self):
        if (self.static_quantization is not None and self.static_quantization.enabled
                and self.dynamic_quantization is not None and self.dynamic_quantization.enabled):
            raise PathValueError("dynamic_quantization.enabled", "static_quantization and dynamic_quantization are "
                                 "both enabled; enable one of them (static needs a calibration loader, dynamic not)")
        if (self.weight_only_quantization is not None and self.weight_only_quantization.enabled
                and self.active is not None):
            raise PathValueError("weight_only_quantization.enabled", "weight_only_quantization and "
                                 "static/dynamic_quantization are both enabled; enable one of them (W8A8 with GPTQ "
                                 "weights is not available in this slimtorch version)")
        if self.weight_only is not None and self.w8a8 is not None:
            raise PathValueError("w8a8_quantization.enabled", "weight_only_quantization and w8a8_quantization are "
                                 "both enabled; a Linear gets one scheme: enable one of them")
        if self.w8a8 is not None and self.active is not None:
            raise PathValueError("w8a8_quantization.enabled", "w8a8_quantization runs in slimtorch.oneshot (decoder "
                                 "LLMs, block by block), static/dynamic_quantization in slimtorch.quantize; enable "
                                 "one of them")
        sections = {k: s for k, s in self.oneshot_sections().items() if s.blocks is not None}
        if len({s.blocks for s in sections.values()}) > 1:
            raise PathValueError(f"{list(sections)[-1]}.blocks", f"{' and '.join(sections)} name different blocks "
                                 f"({sorted({s.blocks for s in sections.values()})}); they run in one pass over the "
                                 "same blocks")
        return self

    @property
    def pruning(self) -> Optional[OneShotPruning]:
        """The one-shot pruning section when it is enabled, else None."""
        section = self.oneshot_pruning
        return section if section is not None and section.enabled else None

    @property
    def w8a8(self) -> Optional[W8A8Quantization]:
        """The W8A8 (int8 / FP8) section when it is enabled, else None."""
        section = self.w8a8_quantization
        return section if section is not None and section.enabled else None

    def oneshot_sections(self) -> dict:
        """The enabled sections of ``slimtorch.oneshot`` by key, in the order they act on a Linear."""
        pairs = (("oneshot_pruning", self.pruning), ("weight_only_quantization", self.weight_only),
                 ("w8a8_quantization", self.w8a8))
        return {k: s for k, s in pairs if s is not None}

    @property
    def weight_only(self) -> Optional[WeightOnlyQuantization]:
        """The weight-only section when it is enabled, else None."""
        section = self.weight_only_quantization
        return section if section is not None and section.enabled else None

    @property
    def active(self) -> Optional[Union[StaticQuantization, DynamicQuantization]]:
        """The enabled section, or None."""
        for section in (self.static_quantization, self.dynamic_quantization):
            if section is not None and section.enabled:
                return section
        return None
