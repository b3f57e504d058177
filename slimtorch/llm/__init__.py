"""Decoder LLM compression, block by block: :func:`oneshot` (weight-only int4/int8, RTN or GPTQ),
:func:`save_compressed` (the compressed-tensors format transformers loads) and
:func:`perplexity`, the evaluation every number in docs/llm.md comes with."""
from .checkpoint import load_compressed, save_compressed
from .evaluation import PerplexityResult, perplexity
from .oneshot import oneshot

__all__ = ["oneshot", "save_compressed", "load_compressed", "perplexity", "PerplexityResult"]
