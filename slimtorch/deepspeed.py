"""``slimtorch.deepspeed.initialize``: see :mod:`slimtorch.integrations.deepspeed` (DeepSpeed is imported only
when ``initialize`` is called)."""
from .integrations.deepspeed import CLIENT_STATE_KEY, DeepSpeedAccess, initialize
from .pruning.structured_targets import attach_learned_scores

__all__ = ["initialize", "attach_learned_scores", "DeepSpeedAccess", "CLIENT_STATE_KEY"]
