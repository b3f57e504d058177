"""``slimtorch.deepspeed.initialize``: see :mod:`slimtorch.integrations.deepspeed` (DeepSpeed is imported only
when ``initialize`` is called)."""
from .integrations.deepspeed import CLIENT_STATE_KEY, DeepSpeedAccess, initialize

__all__ = ["initialize", "DeepSpeedAccess", "CLIENT_STATE_KEY"]
