"""Decoder LLM compression, block by block: :func:`oneshot` (weight-only int4/int8, RTN or GPTQ) and
:func:`perplexity`, the evaluation every number in docs/llm.md comes with."""
from .evaluation import PerplexityResult, perplexity
from .oneshot import oneshot

__all__ = ["oneshot", "perplexity", "PerplexityResult"]
