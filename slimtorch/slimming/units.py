"""Which units of a coupled group are pruned: read from the producers' weights (pure functions)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from .surgery import linear_view
from .trace import Group


def output_rows(module: nn.Module) -> Tensor:
    """The weight as ``[out, ...]`` rows (Linear ``[out, in]``, Conv ``[out, in, k...]``; Conv1D transposed)."""
    return linear_view(module).detach()


@dataclass
class UnitPlan:
    """The units of ``group`` to remove (sorted indices) and, per module, the channels it keeps."""

    group: Group
    removed: List[int]
    #: why no unit goes although some producers' rows are zero (a residual stream pruned in part); None otherwise
    refused: Optional[str] = None

    @property
    def kept(self) -> List[int]:
        gone = set(self.removed)
        return [u for u in range(self.group.units) if u not in gone]

    def channels(self, width: int, keep: bool = True) -> Tensor:
        """Indices of the channels (out of ``width``, split evenly into the group's units) kept, or removed."""
        per_unit = width // self.group.units
        units = self.kept if keep else self.removed
        if not units:
            return torch.zeros(0, dtype=torch.long)
        base = torch.tensor(units, dtype=torch.long)[:, None] * per_unit
        return (base + torch.arange(per_unit)[None, :]).flatten()


def pruned_units(group: Group, modules: Dict[str, nn.Module]) -> UnitPlan:
    """The units that contribute nothing the consumers cannot absorb: those whose rows are zero in every producer
    (what they still carry is a constant, folded later), and those whose input columns are zero in every consumer
    (DeepSpeed's head pruning masks the output projection's columns of a head; the head's q, k and v rows then go
    too).

    A producer with zero rows that do not fill whole units, or a unit zero in some producers' rows and not in
    others', is an error naming the layer: its mask does not follow the units that can be removed (prune the
    coupled layers together with a pattern whose units are the removable ones). Except where the producers are
    added into one stream (a CNN's residual stream, from its stem conv on): a unit that not every producer prunes
    carries the others' values, so nothing of the group goes and the plan says why (``refused``)."""
    units = group.units
    zero_per_producer = []
    for space in group.producers:
        rows = output_rows(modules[space.module])
        per_unit = rows.shape[0] // units
        zero_rows = ~rows.reshape(rows.shape[0], -1).ne(0).any(dim=1).cpu()  # unit bookkeeping on the CPU
        per = zero_rows.reshape(units, per_unit)
        whole, partial = per.all(dim=1), per.any(dim=1) & ~per.all(dim=1)
        if bool(partial.any()):
            kind = f"heads of {per_unit} rows" if group.head_dim is not None else f"units of {per_unit} rows"
            raise UnsupportedModelError(
                f"{space.module}: {int(zero_rows.sum())} zero output rows that do not fill whole {kind} (e.g. unit "
                f"{int(partial.nonzero()[0])}): the mask is not aligned to removable units; prune the coupled layers "
                f"{', '.join(s.module for s in group.producers)} with a pattern that removes whole units")
        zero_per_producer.append(whole)
    all_zero = torch.stack(zero_per_producer).all(dim=0)
    some_zero = torch.stack(zero_per_producer).any(dim=0)
    if len(group.producers) > 1 and bool((some_zero & ~all_zero).any()):
        unit = int((some_zero & ~all_zero).nonzero()[0])
        zero_in = [s.module for s, z in zip(group.producers, zero_per_producer) if bool(z[unit])]
        kept_in = [s.module for s, z in zip(group.producers, zero_per_producer) if not bool(z[unit])]
        if group.summed_in is not None:
            return UnitPlan(group, [], refused=(
                f"they are added to other layers' channels (a residual stream) in {group.summed_in}, and unit "
                f"{unit} is pruned in {', '.join(zero_in)} but not in {', '.join(kept_in)}: a stream channel goes "
                "only when every layer adding into it prunes it (prune them in one group)"))
        raise UnsupportedModelError(
            f"unit {unit} is pruned in {', '.join(zero_in)} but not in {', '.join(kept_in)}: layers whose units are "
            "removed together must be pruned together (one group in the config, a coupled pattern)")
    unread = torch.ones(units, dtype=torch.bool)
    for name, _ in group.consumers:
        unread &= zero_inputs(modules[name]).reshape(units, -1).all(dim=1)
    return UnitPlan(group, [int(u) for u in (all_zero | unread).nonzero().flatten()])


def zero_inputs(module: nn.Module) -> Tensor:
    """Bool ``[in]``: the input channels a Linear ``[out, in]`` or conv ``[out, in, ...]`` never reads (zero for
    every output; a grouped conv's channels are read by their group only and count as read)."""
    weight = linear_view(module).detach()
    if getattr(module, "groups", 1) > 1:
        return torch.zeros(int(module.in_channels), dtype=torch.bool)
    return ~weight.transpose(0, 1).reshape(weight.shape[1], -1).ne(0).any(dim=1).cpu()


def rounded(plan: UnitPlan, round_to: int) -> UnitPlan:
    """Remove fewer units so that the kept count is a multiple of ``round_to`` units (the zero units left in stay
    zero; the last-ranked removals are the ones kept)."""
    if round_to <= 1 or not plan.removed:
        return plan
    kept = plan.group.units - len(plan.removed)
    extra = (-kept) % round_to
    return UnitPlan(plan.group, plan.removed[:len(plan.removed) - extra] if extra else plan.removed)
