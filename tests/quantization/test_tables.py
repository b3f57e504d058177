"""Every string choice of the quantization config is dispatched by one table; the schema accepts exactly its keys."""
from typing import get_args

import pytest

from slimtorch.config import quant_schema
from slimtorch.quantization.observers import OBSERVERS
from slimtorch.quantization.qdq import QDQ_MODULES
from slimtorch.quantization.steps import ACT_GRANULARITY, WEIGHT_SCALES
from slimtorch.quantization.weight_tuning import OUTPUT_SHIFTS


def _literal(model, key):
    return set(get_args(model.model_fields[key].annotation))


@pytest.mark.parametrize("choices, table", [
    (set(get_args(quant_schema.OpType)), QDQ_MODULES),
    (set(quant_schema.ALL_OP_TYPES), QDQ_MODULES),
    (set(get_args(quant_schema.OpType)), OUTPUT_SHIFTS),
    (set(get_args(quant_schema.Observer)), OBSERVERS),
    (_literal(quant_schema.StaticActivationQuant, "observer"), OBSERVERS),
    (_literal(quant_schema.WeightQuant, "observer"), WEIGHT_SCALES),
    (_literal(quant_schema.DynamicActivationQuant, "granularity"), ACT_GRANULARITY),
], ids=["op_types", "all_op_types", "output_shift", "observers", "activation.observer", "weight.observer",
        "activation.granularity"])
def test_schema_choices_are_the_table_keys(choices, table):
    assert choices == set(table)
