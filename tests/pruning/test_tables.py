"""Every name the config schema accepts has an entry in the table that implements it, and nothing more."""
from typing import get_args

import pytest
import torch
from torch import nn

from slimtorch.config import schema
from slimtorch.pruning import criteria
from slimtorch.pruning.criteria import CRITERIA
from slimtorch.pruning.schedules import DECAYS, sparsity_at
from slimtorch.pruning.targets import LAYER_KINDS, layer_type


@pytest.mark.parametrize("literal,table", [
    (schema.Method, CRITERIA),
    (schema.DecayType, DECAYS),
    (schema.LayerType, LAYER_KINDS),
], ids=["method", "sparsity_decay_type", "op_types"])
def test_schema_literal_names_exactly_the_table_keys(literal, table):
    names = get_args(literal)
    assert len(names) == len(set(names))
    assert set(names) == set(table)


def test_each_layer_kind_recognizes_its_module():
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    modules = {"Linear": nn.Linear(4, 4), "Conv1d": nn.Conv1d(4, 4, 3), "Conv2d": nn.Conv2d(4, 4, 3),
               "Conv1D": conv1d(4, 4)}
    assert {name: layer_type(module) for name, module in modules.items()} == {name: name for name in modules}
    assert layer_type(nn.Embedding(4, 4)) is None


def test_unknown_names_are_refused():
    w = torch.ones(2, 2)
    with pytest.raises(ValueError, match="unknown pruning method 'l2'; use one of magnitude, l1"):
        criteria.score("l2", w, None)
    with pytest.raises(ValueError, match="unknown pruning method"):
        criteria.observation_window("l2", 0.9)
    with pytest.raises(ValueError, match="unknown sparsity_decay_type 'quadratic'; use one of exp, cos, linear, cube"):
        sparsity_at(1, 0, 2, 0.5, "quadratic")
