"""Saving a model that transformers loaded through a quantizer whose weights are float after loading (GGUF).

Used by :func:`slimtorch.save_compressed` and :func:`slimtorch.save_slim`, which both call ``save_pretrained``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from .errors import UnsupportedModelError

#: where transformers defines the layers that keep GGUF blocks unpacked (GgufLinear); a dequantized load has none
_GGUF_MODULES = "transformers.integrations.gguf"


@contextmanager
def saving_as_float(model: nn.Module) -> Iterator[None]:
    """Let ``save_pretrained`` write a model loaded with ``from_pretrained(..., gguf_file=...)``.

    transformers keeps a GGUF "quantizer" on such a model and refuses to save it ("The model is quantized with gguf
    and is not serializable"), although a dequantized GGUF holds plain float weights (which slimtorch compressed or
    slimmed as such). The quantizer and the config's GGUF ``quantization_config`` are set aside for the write and
    put back, so the user's model is as it was and the folder loads as a float (or compressed-tensors) checkpoint.
    Any other non-serializable quantizer (weights that are not float) is an error that says to load in float.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or quantizer.is_serializable():
        yield
        return
    config = getattr(quantizer, "quantization_config", None)
    method = getattr(getattr(config, "quant_method", None), "value", getattr(config, "quant_method", None))
    in_blocks = [name for name, m in model.named_modules() if type(m).__module__.startswith(_GGUF_MODULES)]
    if method != "gguf" or in_blocks:
        kept = f"{in_blocks[0]} keeps its weights in GGUF blocks" if in_blocks else f"its weights are {method} ones"
        raise UnsupportedModelError(
            f"{type(model).__name__} was loaded with transformers' {method} quantizer and {kept}, which transformers "
            "cannot save and slimtorch does not compress; load it as a float model (for a GGUF file: "
            "from_pretrained(..., gguf_file=..., quantization_config=GgufConfig(dequantize=True)); else a float "
            "checkpoint) and compress that")
    gguf_config = getattr(model.config, "quantization_config", None)
    model.hf_quantizer = None
    if gguf_config is not None:
        del model.config.quantization_config
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        if gguf_config is not None:
            model.config.quantization_config = gguf_config
