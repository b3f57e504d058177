"""Holds the masks and scores of the pruned layers and applies them to the parameters.

Masks live here, not on the modules, so the model's state_dict keys never change; they follow the weights to
whatever device and dtype the weights are on (checked lazily, so ``model.to(...)`` after ``prepare_pruning``
just works). Everything is plain tensor math: no CPU-only or vendor op.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..config.patterns import BlockPattern
from ..errors import StateDictError
from . import allocation, criteria, learned, masks
from .access import ParamAccess, full_shape
from .distributed import mask_fingerprint
from .schedules import is_pruning_step, sparsity_at
from .targets import TargetLayer

STATE_VERSION = 1


class LayerState:
    """One pruned layer: its target description, keep-mask, criterion state and a cast copy of the mask."""

    def __init__(self, target: TargetLayer, ranked: Optional[Tensor] = None, access: Optional[ParamAccess] = None):
        self.target = target
        self.access = access or ParamAccess()
        # masks and scores are shaped like this rank's part of the weight (the whole weight unless sharded: FSDP2)
        self.mask: Optional[Tensor] = None       # bool, weight's (local) shape; None = not pruned yet
        self.bias_mask: Optional[Tensor] = None  # bool [out] (whole: it is small), only for whole-row patterns
        self.row_keeps: Dict[int, Tuple[Tensor, Tensor]] = {}  # id(per-row param) -> (bias_mask, its local part)
        self.fingerprint_of_full: Optional[Tuple[float, float]] = None  # of the whole mask, where it is sharded
        self.state: Optional[Tensor] = None      # criterion state (float32), e.g. snip_momentum's S
        self._cast: Optional[Tensor] = None      # mask in the weight's dtype, for a fused multiply
        self._spare: Optional[Tensor] = None     # reused buffer for the next criterion state
        self._warned_no_grad = False
        # DeepSpeed's l1: the keep-mask ranked from the weights at prepare time (or earlier, before an engine cast
        # them: ``ranked``), held (1 byte a weight) until the schedule applies it at start_step
        self.ranked: Optional[Tensor] = None
        if target.settings.ranks_at_prepare:
            self.ranked = self._rank_now() if ranked is None else ranked.to(self.weight.device)  # the whole mask
        # DeepSpeed's topk for rows, heads and channels: trained scores, masking in forward from start_step on
        self.learned: Optional[learned.LearnedMask] = None
        s = target.settings
        if s.learned:
            self.learned = learned.for_target(target)
            if s.start_step == 0:
                self.learned.activate()  # DeepSpeed masks from the very first forward when schedule_offset is 0
        self._warned_stuck = False
        # updates before a pruning step whose gradients still matter: fixed by the settings, so computed once
        self._window = None if s.learned else criteria.observation_window(s.method, s.beta)

    @property
    def name(self) -> str:
        return self.target.name

    def _rank_now(self) -> Tensor:
        s, layout = self.target.settings, self.target.layout
        with torch.no_grad():
            full = self.access.full(self.weight)
            scores = masks.to_matrix(criteria.score("magnitude", full, None), layout)
            keep = masks.compute_mask(scores, s.pattern, s.target_sparsity, kept_ratio_ceil=s.dense_ratio)
        return masks.from_matrix(keep, full.shape, layout)

    @property
    def weight(self) -> Tensor:
        return self.target.module.weight

    @property
    def local_weight(self) -> Tensor:
        """The part of the weight this rank holds (the weight itself unless it is sharded)."""
        return self.access.local(self.weight)

    def fingerprint(self) -> Tuple[float, float]:
        """Of the whole mask in force (equal on every rank), for the cross-rank check."""
        if self.fingerprint_of_full is not None and (self.learned is None or not self.learned.active):
            return self.fingerprint_of_full
        return mask_fingerprint(self.current_mask())

    def set_mask(self, full: Tensor, keep: Tensor) -> None:
        """Install the whole mask ``full`` (and the row keep of the ``[out, reduction]`` matrix ``keep``): this rank
        keeps its part."""
        s = self.target.settings
        self.mask = self.access.shard_of(self.weight, full)
        self.fingerprint_of_full = mask_fingerprint(full) if self.mask is not full else None
        self.bias_mask = None
        if isinstance(s.pattern, BlockPattern) and s.pattern.prunes_rows:
            self.bias_mask = keep.all(dim=1)
        self._cast = None

    def full_mask(self) -> Optional[Tensor]:
        """The whole mask (a collective where it is sharded)."""
        return None if self.mask is None else self.access.gather(self.weight, self.mask)

    def current_mask(self) -> Optional[Tensor]:
        """The keep-mask in force: the fixed one, or topk's current top-k once its masking has begun."""
        if self.learned is not None and self.learned.active:
            return self.learned.weight_mask()
        return self.mask

    def cast_mask(self) -> Tensor:
        w = self.local_weight
        if self.mask.device != w.device:
            self.mask = self.mask.to(w.device)
        if self._cast is None or self._cast.device != w.device or self._cast.dtype != w.dtype:
            self._cast = self.mask.to(w.dtype)
        return self._cast

    def observes_at(self, step: int) -> bool:
        s = self.target.settings
        window = self._window
        if window is None:
            return False
        # update t's gradient feeds the masks computed after it (pruning steps > t); only at t == 0 does it also
        # feed step t's own masks, which have no earlier gradient. After end_step nothing is observed, so the
        # freed scores stay freed and an engine's collective gradient reads stop.
        first = step == 0 and is_pruning_step(0, s.start_step, s.end_step, s.frequency)
        if window == 0:  # only the update just before a pruning step
            return first or is_pruning_step(step + 1, s.start_step, s.end_step, s.frequency)
        return first or s.start_step - window <= step < s.end_step


class Pruner:
    """Applies the masks of ``layers`` and recomputes them along their schedules."""

    def __init__(self, layers: List[TargetLayer], access: Optional[ParamAccess] = None,
                 ranked: Optional[Dict[str, Tensor]] = None):
        self.access = access or ParamAccess()  # where gradients come from and masked weights go to
        self.layers = [LayerState(t, (ranked or {}).get(t.name), self.access) for t in layers]
        self._last_observed: List[LayerState] = []

    # ------------------------------------------------------------ per update
    def observe(self, step: int) -> None:
        """Fold the current gradients into the criteria of the layers that need them at ``step``."""
        self._last_observed = []
        with torch.no_grad():
            for layer in self.layers:
                if not layer.observes_at(step):
                    continue
                grad = self.access.grad(layer.weight)
                if grad is None:
                    if not layer._warned_no_grad:
                        warnings.warn(f"slimtorch: layer {layer.name!r} has no gradient at step {step}; its "
                                      f"{layer.target.settings.method} score keeps its last value", stacklevel=3)
                        layer._warned_no_grad = True
                    continue
                s = layer.target.settings
                layer.state, layer._spare = criteria.observe(s.method, s.beta, layer.state, layer._spare,
                                                             layer.local_weight, grad)
                self._last_observed.append(layer)

    def keep_last_observation(self) -> None:
        """The last observation's update was applied: it can no longer be undone."""
        self._last_observed = []

    def forget_last_observation(self) -> None:
        """Undo the last :meth:`observe` (its update was skipped, e.g. by an AMP overflow: inf/NaN gradients).

        ``observe`` leaves the previous state intact in the spare buffer, so this is a swap, not a recomputation.
        """
        for layer in self._last_observed:
            layer.state, layer._spare = layer._spare, layer.state
        self._last_observed = []

    def due(self, step: int) -> bool:
        return any(self._due(layer, step) for layer in self.layers)

    @staticmethod
    def _due(layer: LayerState, step: int) -> bool:
        s = layer.target.settings
        return is_pruning_step(step, s.start_step, s.end_step, s.frequency)

    def update_masks(self, step: int) -> List[Dict[str, Any]]:
        """Recompute the masks of the layers whose schedule prunes at ``step``; returns what was done.

        Layers of a "global" group share one ranking (:mod:`allocation`), which sets each one's sparsity; the mask
        inside a layer is then computed exactly as for "local" layers.
        """
        events = []
        with torch.no_grad():
            due = [layer for layer in self.layers if self._due(layer, step)]
            # global layers are ranked together by their units (a block's or an N:M group's score, 1/M to 1/block
            # of the scores); local ones one at a time. Where parameters are sharded, each layer's whole scores are
            # gathered for its units and dropped, then gathered again for its mask: a rank holds one layer whole at
            # a time plus the units. Unsharded, the score matrices are kept between the two uses.
            keep_matrices = not self.access.shards_parameters
            matrices: Dict[int, Tensor] = {}
            units: Dict[int, allocation.Units] = {}
            for layer in due:
                if layer.target.settings.is_global:
                    matrix = self._score_matrix(layer)
                    units[id(layer)] = allocation.layer_units(matrix, layer.target.settings.pattern)
                    if keep_matrices:
                        matrices[id(layer)] = matrix
                    del matrix
            allocated: Dict[int, float] = {}
            for members in _global_groups(due).values():
                allocated.update(_allocate(members, units, step))
            for layer in due:
                s = layer.target.settings
                group_target = sparsity_at(step, s.start_step, s.end_step, s.dense_ratio, s.decay)
                target = allocated.get(id(layer), group_target)
                weight = layer.weight
                if layer.learned is not None:  # topk: masking in forward begins; the weights keep their values
                    layer.learned.activate()
                    kept = int(layer.learned.keep().sum())
                    events.append({"step": step, "layer": layer.name, "target": s.target_sparsity,
                                   "sparsity": 1.0 - kept / layer.learned.units})
                    continue
                if layer.ranked is not None:  # ranked at prepare time (DeepSpeed's l1): applied as it was chosen
                    full, layer.ranked = layer.ranked.to(weight.device), None
                    keep = masks.to_matrix(full, layer.target.layout)
                else:
                    # a global group's N:M units were counted cheapest-first, so the layer drops those same groups
                    scores = matrices.pop(id(layer)) if id(layer) in matrices else self._score_matrix(layer)
                    keep = masks.compute_mask(scores, s.pattern, target, "cheapest" if s.is_global else "clearest")
                    full = masks.from_matrix(keep, full_shape(weight), layer.target.layout)
                layer.set_mask(full, keep)
                if step >= s.end_step:
                    layer.state = layer._spare = None  # the schedule is over: the mask is final
                achieved = 1.0 - keep.sum().item() / keep.numel()
                scores = None  # this layer's whole scores go before the next layer's are gathered (FSDP2)
                del full, keep
                event = {"step": step, "layer": layer.name, "target": target, "sparsity": achieved}
                if s.is_global:
                    event["group_target"] = group_target
                events.append(event)
        self.apply_masks()
        return events

    def check_learning(self) -> None:
        """Warn once per layer when topk scores do not move after an update: they are in no optimizer."""
        for layer in self.layers:
            if layer.learned is None or layer._warned_stuck or not layer.learned.active:
                continue
            if layer.learned.scores.grad is not None and layer.learned.stuck():
                scores = layer.target.settings.scores_attribute
                warnings.warn(f"slimtorch: layer {layer.name!r}: its topk scores ({scores}) did not change in an "
                              "update although they have a gradient, so the mask cannot learn. Pass the optimizer "
                              "to prepare_pruning, or build it after prepare_pruning from model.parameters()",
                              stacklevel=3)
                layer._warned_stuck = True

    def finish_learned(self) -> None:
        """topk layers: turn the current top-k into fixed masks (applied by the next :meth:`apply_masks`) and remove
        the scores and hooks; a layer whose schedule never started keeps its weights."""
        for layer in self.layers:
            if layer.learned is None:
                continue
            if layer.learned.active:
                layer.mask, layer.bias_mask = layer.learned.weight_mask(), layer.learned.bias_mask()
                layer._cast = None
            layer.learned.remove()
            layer.learned = None

    def apply_masks(self) -> None:
        """Zero the pruned weights (and the biases of pruned rows) in place."""
        active = [l for l in self.layers if l.mask is not None]
        if not active:
            return
        changed: List[Tuple[Tensor, Tensor]] = []  # (parameter, its local keep-mask), for the engine's copies
        with torch.no_grad():
            by_dtype: Dict[Tuple[torch.device, torch.dtype], Tuple[List[Tensor], List[Tensor]]] = defaultdict(
                lambda: ([], []))
            for layer in active:
                cast = layer.cast_mask()
                weights, ms = by_dtype[(cast.device, cast.dtype)]
                weights.append(layer.local_weight)
                ms.append(cast)
                changed.append((layer.weight, layer.mask))
                if layer.bias_mask is None:
                    continue
                bias = getattr(layer.target.module, "bias", None)
                followers = [p for _, norm in layer.target.followers for p in (norm.weight, norm.bias)]
                for param in [bias] + followers:  # a follower's scale and shift go with the layer's rows
                    if param is not None:
                        changed.append((param, _mask_rows(layer, param)))
            for weights, ms in by_dtype.values():
                torch._foreach_mul_(weights, ms)
        self.access.masks_applied(changed)

    def _score_matrix(self, layer: LayerState) -> Tensor:
        """The layer's (complete) element scores in the ``[out, reduction]`` matrix view."""
        state = None if layer.state is None else self.access.complete_scores(layer.weight, layer.state)
        full = self.access.full(layer.weight)  # the one layer's whole weight, where it is sharded
        return masks.to_matrix(criteria.score(layer.target.settings.method, full, state), layer.target.layout)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self, sharded: bool = False) -> Dict[str, Any]:
        """Whole masks and complete scores; a collective where ranks keep partial scores (DeepSpeed ZeRO 1/2) or
        shards (FSDP2, ZeRO-3). Sharded, each layer is gathered in turn and moved to the host, so the device never
        holds two layers whole (the host holds the whole state, as a consolidated checkpoint does).

        ``sharded``: where parameters are sharded, this rank's parts only (no collective, no whole layer), to be
        written by every rank and loaded by the same rank of the same world size."""
        if sharded and self.access.shards_parameters:
            return self._local_state_dict()
        host = self.access.shards_parameters

        def saved(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t.detach().to("cpu", copy=True) if host else t.detach().clone()

        return {
            "version": STATE_VERSION,
            "layers": {
                l.name: {
                    "shape": tuple(full_shape(l.weight)),
                    "pattern": str(l.target.settings.pattern),
                    "mask": None if l.mask is None else saved(l.full_mask()),
                    "bias_mask": saved(l.bias_mask),
                    "state": None if l.state is None else saved(self.access.complete_scores(l.weight, l.state)),
                    "ranked": saved(l.ranked),
                    # topk: the scores are the model's parameters; whether forward masking has begun is ours
                    "learned_active": l.learned is not None and l.learned.active,
                }
                for l in self.layers
            },
        }

    def _local_state_dict(self) -> Dict[str, Any]:
        """This rank's masks and scores as it holds them (rows, flat slices), on the host."""
        def saved(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t.detach().to("cpu", copy=True)

        return {
            "version": STATE_VERSION,
            "sharded": {"world": _world(), "rank": _rank()},
            "layers": {
                l.name: {
                    "shape": tuple(full_shape(l.weight)),
                    "pattern": str(l.target.settings.pattern),
                    "mask": saved(l.mask),
                    "fingerprint": None if l.mask is None else l.fingerprint(),  # of the whole mask
                    "bias_mask": saved(l.bias_mask),
                    "state": saved(l.state),
                    "ranked": saved(l.ranked),
                    "learned_active": False,  # topk is refused where parameters are sharded
                }
                for l in self.layers
            },
        }

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        if not isinstance(sd, dict) or sd.get("version") != STATE_VERSION or "layers" not in sd:
            raise StateDictError("not a slimtorch pruning state_dict (expected the dict PruningCallbacks.state_dict() "
                                 "returns)")
        local = sd.get("sharded") is not None
        if local:
            theirs, here = sd["sharded"], {"world": _world(), "rank": _rank()}
            if theirs != here or not self.access.shards_parameters:
                raise StateDictError(
                    f"this pruning state holds the parts of rank {theirs['rank']} of {theirs['world']} (saved with "
                    f"state_dict(sharded=True)); here is rank {here['rank']} of {here['world']}"
                    f"{'' if self.access.shards_parameters else ' without sharded parameters'}. Load each rank's own "
                    "file with the same world size and sharding, or save with state_dict() (whole masks) to reshard")
        saved = sd["layers"]
        ours = {l.name: l for l in self.layers}
        if set(saved) != set(ours):
            missing, extra = sorted(set(ours) - set(saved)), sorted(set(saved) - set(ours))
            raise StateDictError(f"pruning state_dict is for other layers: missing {missing[:5]}, unexpected "
                                 f"{extra[:5]}; load it into callbacks prepared with the same model and config")
        for name, entry in saved.items():
            layer = ours[name]
            pattern = str(layer.target.settings.pattern)
            shape = tuple(full_shape(layer.weight))
            if tuple(entry["shape"]) != shape or entry["pattern"] != pattern:
                raise StateDictError(f"layer {name!r}: saved shape {tuple(entry['shape'])} / pattern "
                                     f"{entry['pattern']!r}"
                                     f" differ from the model's {shape} / "
                                     f"{layer.target.settings.pattern}")
            device = layer.weight.device
            if local:  # this rank's own parts, saved by this rank
                layer.mask = None if entry["mask"] is None else entry["mask"].to(device).clone()
                layer.state = None if entry["state"] is None else entry["state"].to(device).clone()
                layer.bias_mask = None if entry["bias_mask"] is None else entry["bias_mask"].to(device).clone()
                layer.fingerprint_of_full = None if entry["fingerprint"] is None else tuple(entry["fingerprint"])
                layer.ranked = None if entry.get("ranked") is None else entry["ranked"].to(device).clone()
                layer.row_keeps = {}
                layer._cast = None
                continue
            layer.mask = None if entry["mask"] is None else self.access.shard_of(layer.weight,
                                                                                  entry["mask"].to(device).clone())
            layer.bias_mask = None if entry["bias_mask"] is None else entry["bias_mask"].to(device).clone()
            # the cross-rank check compares whole masks: a rank holding part of one keeps the whole one's fingerprint
            sharded_mask = entry["mask"] is not None and self.access.shards_parameters
            layer.fingerprint_of_full = mask_fingerprint(entry["mask"]) if sharded_mask else None
            layer.row_keeps = {}
            layer.state = (None if entry["state"] is None
                           else self.access.local_scores(layer.weight, entry["state"].to(device).clone()))
            layer.ranked = None if entry.get("ranked") is None else entry["ranked"].to(device).clone()
            layer._cast = None
            if layer.learned is not None:
                if entry.get("learned_active", False):
                    layer.learned.activate()
                else:
                    layer.learned.deactivate()
        self.apply_masks()




def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _mask_rows(layer: LayerState, param: Tensor) -> Tensor:
    """Zero the entries of a per-row ``param`` (the layer's bias; the scale and shift of channel_pruning's related
    BatchNorms, so pruned channels carry nothing in training as after it) whose rows the layer prunes, in place on
    this rank's part; returns that part's keep-mask (the same tensor until the rows change)."""
    local = layer.access.local(param)
    cached = layer.row_keeps.get(id(param))
    if cached is None or cached[0] is not layer.bias_mask:
        cached = (layer.bias_mask, layer.access.shard_of(param, layer.bias_mask.to(local.device)))
        layer.row_keeps[id(param)] = cached
    keep = cached[1]
    local.mul_(keep.to(device=local.device, dtype=local.dtype))  # the model may have moved since (model.to)
    return keep


def rank_at_prepare(layers: List[TargetLayer], access: Optional[ParamAccess] = None) -> Dict[str, Tensor]:
    """The prepare-time keep-masks of the layers that rank once (DeepSpeed's l1), by name.

    An engine that casts the weights (DeepSpeed fp16/bf16) calls this on the float model first, as DeepSpeed's own
    ``init_compression`` ranks before its engine exists, and hands the result to :class:`Pruner`.
    """
    return {t.name: LayerState(t, access=access).ranked for t in layers if t.settings.ranks_at_prepare}


def _global_groups(layers: List[LayerState]) -> Dict[Optional[str], List[LayerState]]:
    """The due layers of each "global" group (``None``: the layers shared_parameters selects)."""
    groups: Dict[Optional[str], List[LayerState]] = defaultdict(list)
    for layer in layers:
        if layer.target.settings.is_global:
            groups[layer.target.group].append(layer)
    return groups


def _allocate(members: List[LayerState], units: Dict[int, allocation.Units], step: int) -> Dict[int, float]:
    """Sparsity of each layer of one global group at ``step`` (by ``id`` of its LayerState), from each layer's
    units (a "head" pattern resolves to each layer's own head width)."""
    s = members[0].target.settings  # one group: one pattern, schedule and bounds
    target = sparsity_at(step, s.start_step, s.end_step, s.dense_ratio, s.decay)
    low = allocation.scaled_low(s.min_sparsity, target, s.target_sparsity)
    ours = [units[id(layer)] for layer in members]
    counts = allocation.allocate(ours, target, [low] * len(ours), [s.max_sparsity] * len(ours))
    return {id(layer): u.sparsity(c) for layer, u, c in zip(members, ours, counts)}
