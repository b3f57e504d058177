"""Config: typed schema, the DeepSpeed-compatible loader and pattern strings."""
from .loader import load_config
from .patterns import BlockPattern, HeadPattern, NMPattern, Pattern, parse_pattern
from .schema import CompressionConfig, PruningSettings, SparsePruningConfig

__all__ = [
    "load_config", "CompressionConfig", "SparsePruningConfig", "PruningSettings",
    "BlockPattern", "HeadPattern", "NMPattern", "Pattern", "parse_pattern",
]
