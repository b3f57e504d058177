"""``slimtorch.deepspeed.initialize``: see :mod:`slimtorch.integrations.deepspeed` (DeepSpeed is imported only
when ``initialize`` is called)."""
from .integrations.deepspeed import CLIENT_STATE_KEY, initialize
from .integrations.deepspeed_access import DeepSpeedAccess
from .integrations.zero3 import ZeRO3Access
from .pruning.structured_targets import attach_learned_scores

__all__ = ["initialize", "attach_learned_scores", "DeepSpeedAccess", "ZeRO3Access", "CLIENT_STATE_KEY"]
