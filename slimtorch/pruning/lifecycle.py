"""The pruning state machine: what one optimizer update does to the masks, whoever drives it.

Per update: :meth:`~PruningLifecycle.before_update` scores the gradients, the optimizer steps, then
:meth:`~PruningLifecycle.after_update` zeros the pruned weights again, counts the update and, at a pruning step,
recomputes the masks (why in this order: :mod:`slimtorch.pruning.callbacks`); an update the optimizer did not apply
ends in :meth:`~PruningLifecycle.skipped_update` instead, neither counted nor scored. :mod:`.drivers` decides when
these are called.
"""
from __future__ import annotations

from typing import Any, Dict, List

from ..errors import LifecycleError, StateDictError
from .distributed import active_world, check_same_masks
from .pruner import Pruner

HISTORY_EVENTS_PER_LAYER = 64  # history keeps the last 64 mask recomputations of each layer


class PruningLifecycle:
    """Update and micro-batch counters, the history of mask recomputations, and the pruner they drive.

    ``accumulate`` micro-batches make one update; ``finish()`` is the terminal state (masks and scores dropped).
    """

    def __init__(self, pruner: Pruner, accumulate: int):
        self.pruner = pruner
        self.accumulate = accumulate
        self.step = 0          # applied updates so far
        self.micro = 0         # micro-batches counted so far (by the drivers that see micro-batches)
        self.masks_for = -1    # the pruning step whose masks were last computed
        self.history: List[Dict[str, Any]] = []  # recent mask recomputations: step, layer, target, sparsity
        self.finished = False

    # ------------------------------------------------------------ one update
    def before_update(self) -> None:
        """The update's gradients are ready and the optimizer is about to apply them."""
        self.check_alive("optimizer.step")
        self.pruner.observe(self.step)
        if self.pruner.due(self.step) and self.masks_for != self.step:
            self._update_masks()  # only when no earlier update could prepare them (the very first one)

    def after_update(self) -> None:
        """The optimizer applied the update."""
        self.pruner.keep_last_observation()
        self.pruner.apply_masks()
        self.pruner.check_learning()
        self.step += 1
        if self.pruner.due(self.step):
            # prune now, before the next forward, so that update's gradient already sees the pruned network
            self._update_masks()

    def skipped_update(self) -> None:
        """The optimizer did not apply the update."""
        # the gradients the criteria saw were not applied (inf/NaN under AMP): forget them too
        self.pruner.forget_last_observation()
        self.pruner.apply_masks()

    def at_boundary(self) -> bool:
        """Whether the next micro-batch completes an update."""
        return (self.micro + 1) % self.accumulate == 0

    def _update_masks(self) -> None:
        events = self.pruner.update_masks(self.step)
        self.history.extend(events)
        if events and active_world() is not None:
            updated = {e["layer"] for e in events}
            layers = [l for l in self.pruner.layers if l.name in updated]
            check_same_masks([l.name for l in layers], [l.fingerprint() for l in layers], self.step)
        # the recent recomputations are for inspection; a long schedule must not grow checkpoints without bound
        limit = HISTORY_EVENTS_PER_LAYER * max(1, len(self.pruner.layers))
        if len(self.history) > limit:
            del self.history[:-limit]
        self.masks_for = self.step

    # ------------------------------------------------------------ checkpoints and the end
    def state_dict(self, sharded: bool = False) -> Dict[str, Any]:
        """Counters, history, masks and (complete) criterion scores; a collective where scores are partial.
        ``sharded``: this rank's parts of sharded parameters' masks and scores (:meth:`Pruner.state_dict`)."""
        return {"step": self.step, "micro": self.micro, "masks_for": self.masks_for, "history": list(self.history),
                "pruner": self.pruner.state_dict(sharded)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict) or not {"step", "micro", "pruner"} <= set(state):
            raise StateDictError("load_state_dict expects the dict PruningCallbacks.state_dict() returned")
        self.pruner.load_state_dict(state["pruner"])
        self.step = int(state["step"])
        self.micro = int(state["micro"])
        self.masks_for = int(state.get("masks_for", -1))
        self.history = list(state.get("history", []))

    def finish(self) -> None:
        """Apply the masks a last time and drop masks and scores; the zeros stay and nothing is pruned any more."""
        self.pruner.finish_learned()
        self.pruner.apply_masks()
        self.pruner = Pruner([])
        self.finished = True

    def check_alive(self, what: str) -> None:
        if self.finished:
            raise LifecycleError(f"{what}: these callbacks were finalized; prepare_pruning again to prune more")
