"""Run a reference config through slimtorch on the shared protocol and compare it with a peer's recorded result.

Used by ``tests/peers/`` (assertions) and ``benchmarks/peer_configs.py`` (the table in the closing notes and
docs). The peer's side is recorded data (``tests/reference/data/``), made by ``benchmarks/peers/`` in the peer's own
virtual environment.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import protocol as P

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
INC_DATA = HERE / "data" / "inc_3.7.1.json"


@dataclass
class LayerResult:
    zeros: int
    weights: int
    unit: int  # weights in one pruning unit of the layer's pattern (a block, or M - N of an N:M group)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.weights


@dataclass
class Comparison:
    config: str
    ours: Dict[str, LayerResult]
    theirs: Dict[str, dict]
    our_layers: List[str]
    their_layers: List[str]
    scope: str
    pattern: str
    nm_exact: Optional[bool] = None
    notes: List[str] = field(default_factory=list)

    @property
    def same_layers(self) -> bool:
        return sorted(self.our_layers) == sorted(self.their_layers)

    def overall(self, side: str) -> float:
        layers = self.our_layers if side == "ours" else self.their_layers
        if side == "ours":
            return sum(self.ours[n].zeros for n in layers) / sum(self.ours[n].weights for n in layers)
        return sum(self.theirs[n]["zeros"] for n in layers) / sum(self.theirs[n]["weights"] for n in layers)

    def overall_gap_in_units(self) -> float:
        """|ours - theirs| in pruned weights, divided by the largest pruning unit of the layers."""
        weights = sum(self.ours[n].weights for n in self.our_layers)
        unit = max(self.ours[n].unit for n in self.our_layers)
        return abs(self.overall("ours") - self.overall("theirs")) * weights / unit

    def pruner_gaps(self, pruners: List[dict]) -> List[float]:
        """Per INC pruner (one ranking and target each): |ours - theirs| over its layers, in its largest unit."""
        gaps = []
        for pruner in pruners:
            layers = pruner["modules"]
            ours = sum(self.ours[n].zeros for n in layers)
            theirs = sum(self.theirs[n]["zeros"] for n in layers)
            gaps.append(abs(ours - theirs) / max(self.ours[n].unit for n in layers))
        return gaps

    def layer_gaps(self) -> Dict[str, float]:
        """|ours - theirs| per pruned layer, in the layer's pruning units."""
        return {n: abs(self.ours[n].zeros - self.theirs[n]["zeros"]) / self.ours[n].unit for n in self.our_layers}

    def largest_layer_gap(self) -> float:
        """The largest per-layer sparsity difference (a fraction of the layer's weights)."""
        return max(abs(self.ours[n].sparsity - self.theirs[n]["sparsity"]) for n in self.our_layers)


def load_reference(name: str) -> dict:
    return json.loads(INC_DATA.read_text())[name]


def config_document(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text())


def run_slimtorch(name: str, reference: dict) -> Comparison:
    """Prune the protocol's tiny BERT with the config file as it is, hands-free, with the protocol's SGD."""
    import slimtorch as st
    from slimtorch.config.patterns import NMPattern, parse_pattern
    from slimtorch.pruning import masks

    model = P.tiny_bert(0)
    if P.fingerprint(model) != reference["fingerprint"]:
        raise AssertionError("the protocol's model changed since the reference was recorded: regenerate it")
    cfg = st.load_config(str(CONFIGS / name))
    opt = torch.optim.SGD(model.parameters(), lr=P.LR)
    cb = st.prepare_pruning(model, cfg, optimizer=opt)
    P.train(model, opt, P.batches(0))
    weights = {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    ours, nm_exact = {}, None
    settings = {t.name: t.settings for t in cb.plan.layers}
    for n, w in weights.items():
        s = settings.get(n)
        pattern = s.pattern if s else parse_pattern("1x1")
        if isinstance(pattern, NMPattern):
            unit = pattern.m - pattern.n
            holds = masks.pattern_holds(w != 0, pattern) and bool(
                ((w != 0).reshape(-1, pattern.m).sum(dim=1) == pattern.n).all())
            nm_exact = holds if nm_exact is None else nm_exact and holds
        else:
            rows, cols = masks.block_sides(pattern, *w.shape)
            unit = rows * cols
        ours[n] = LayerResult(int((w == 0).sum()), w.numel(), unit)
    scope = "+".join(sorted({t.settings.scope for t in cb.plan.layers}))
    pattern = "+".join(sorted({str(t.settings.pattern) for t in cb.plan.layers}))
    cb.finalize()
    return Comparison(name, ours, reference["layers"], list(cb.layers), list(reference["pruned_layers"]),
                      scope, pattern, nm_exact, list(cfg.notes))
