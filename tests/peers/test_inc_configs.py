"""Intel Neural Compressor configs, and DeepSpeed's snip_momentum configs, prune what INC 3.7.1 prunes.

The INC side is recorded data: ``benchmarks/peers/inc_reference.py`` ran INC 3.7.1 in its own virtual environment on
the shared protocol (``tests/reference/protocol.py``: seeded tiny BERT, 12 SGD updates), with INC's own example
configs as they are (steps fitted to 12 updates; ``_source`` in each file) and with the ``WeightPruningConfig`` that
DeepSpeed 0.19.6 builds from a snip_momentum config (``deepspeed/compression/compress.py``). Here the same files go
through ``slimtorch.load_config`` unchanged.

Global allocations follow the scores of each side, so per-layer equality is not expected there; the pruned layer
set, each pruner's overall sparsity (within one unit: a 4x1 block, an N:M group) and the exact N:M structure are.
"""
from __future__ import annotations

import pytest

from tests.reference import compare as C

DEEPSPEED_EXAMPLES = ["ds_snip_docs.json", "ds_snip_examples_bert.json"]
INC_EXAMPLES = ["inc_clm_local.json", "inc_glue_4x1.json", "inc_glue_2in4.json", "inc_glue_mixed.json",
                "inc_docs_template.json"]


def compared(name):
    reference = C.load_reference(name)
    return C.run_slimtorch(name, reference), reference


@pytest.mark.parametrize("name", DEEPSPEED_EXAMPLES)
def test_deepspeed_snip_momentum_examples_prune_what_inc_prunes(name):
    ours, reference = compared(name)
    assert ours.scope == "global"  # what DeepSpeed hands INC: no scope, so INC's default
    assert ours.same_layers, (ours.our_layers, ours.their_layers)
    assert ours.overall_gap_in_units() <= 1.0
    # the allocation follows each side's scores: report the largest per-layer difference, and bound it loosely
    assert ours.largest_layer_gap() <= 0.01, ours.largest_layer_gap()


@pytest.mark.parametrize("name", INC_EXAMPLES)
def test_inc_example_configs_load_unchanged_and_match_inc(name):
    ours, reference = compared(name)
    assert ours.same_layers, (ours.our_layers, ours.their_layers)
    pruners = reference["pruners"]
    for pruner, gap in zip(pruners, ours.pruner_gaps(pruners)):
        if pruner["pruning_scope"] == "global":
            assert gap <= 1.0, (pruner["index"], gap)  # one ranking: its total within one unit
        else:  # local: every layer within one unit (INC rounds each layer's count down, slimtorch to the nearest)
            for layer in pruner["modules"]:
                assert ours.layer_gaps()[layer] <= 1.0, layer
    if ":" in ours.pattern:
        assert ours.nm_exact and reference["nm_valid"]  # exactly N kept in every group of M, both sides


def test_inc_n_m_is_read_in_incs_convention():
    """INC's "2:4" prunes 2 of 4; a "1:4" in an INC config keeps 3 of 4 (slimtorch's "3:4")."""
    import slimtorch as st

    doc = C.config_document("inc_glue_2in4.json")
    doc["pattern"], doc["target_sparsity"] = "1:4", 0.25
    cfg = st.load_config(doc)
    assert str(cfg.sparse_pruning.settings_for(None).pattern) == "3:4"


def test_deepspeed_snip_momentum_groups_and_missing_ratio_follow_slimtorchs_rule():
    """Two configs where slimtorch differs from DeepSpeed's translation on purpose (docs/config.md):
    DeepSpeed drops different_groups when it hands snip_momentum to INC, and fills a missing dense_ratio with 0.1."""
    ours, reference = compared("ds_snip_request_4x1.json")
    assert ours.same_layers
    attention = [n for n in ours.our_layers if ".attention.self." in n]
    others = [n for n in ours.our_layers if n not in attention]
    group = sum(ours.ours[n].zeros for n in attention) / sum(ours.ours[n].weights for n in attention)
    rest = sum(ours.ours[n].zeros for n in others) / sum(ours.ours[n].weights for n in others)
    assert group == pytest.approx(0.5, abs=4 / 24576) and rest == pytest.approx(0.9, abs=4 / 45056)
    assert reference["overall_sparsity"] == pytest.approx(0.9, abs=1e-4)  # INC: one 90% ranking over everything

    ours, reference = compared("ds_snip_deepspeed_keys.json")
    assert sorted(ours.our_layers) == sorted(n for n in ours.their_layers if ".attention.self." in n)
    assert len(ours.their_layers) == 12  # INC, through DeepSpeed's 0.1 default: every layer at 90%


def test_inc_channel_ranking_counts_rows_slimtorch_counts_weights():
    """INC's global 1xchannel target counts rows; on layers of different widths it prunes fewer weights than the
    target says. slimtorch's global scope counts weights (docs/config.md)."""
    ours, reference = compared("inc_glue_perchannel.json")
    assert ours.same_layers
    assert ours.overall("ours") == pytest.approx(0.6, abs=128 / 65536)   # within one row of the target
    assert ours.overall("theirs") == pytest.approx(0.5791, abs=1e-4)
