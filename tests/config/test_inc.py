"""Intel Neural Compressor 3.x pruning configs: the mapping onto sparse_pruning, and its errors."""
from __future__ import annotations

import pytest

from slimtorch import ConfigError, load_config
from slimtorch.config import BlockPattern, NMPattern


def inc(**keys):
    return {"target_sparsity": 0.8, "pattern": "4x1", "start_step": 2, "end_step": 10, "pruning_frequency": 2,
            **keys}


def test_global_keys_become_shared_parameters_with_incs_defaults_written_out():
    cfg = load_config({"target_sparsity": 0.9})  # everything else INC's default
    sp = cfg.sparse_pruning
    s = sp.settings_for(None)
    assert cfg.pruning_enabled and sp.unlisted_rule() is None  # every default target, like INC's op_names [".*"]
    assert (s.method, s.pattern, s.scope, s.decay) == ("snip_momentum", BlockPattern(4, 1), "global", "exp")
    assert s.dense_ratio == pytest.approx(0.1) and (s.start_step, s.end_step, s.frequency) == (0, 0, 1)
    assert (s.min_sparsity, s.max_sparsity) == (0.0, 0.98)
    assert sp.shared_parameters.op_types == ["Conv1D", "Conv1d", "Conv2d", "Linear"]


@pytest.mark.parametrize("inc_pattern,ours", [("2:4", NMPattern(2, 4)), ("1:4", NMPattern(3, 4)),
                                              ("3:4", NMPattern(1, 4)), ("4:8", NMPattern(4, 8)),
                                              ("oc_pattern_4x1", BlockPattern(4, 1)),
                                              ("1xchannel", BlockPattern(1, None))])
def test_patterns_are_read_in_incs_convention(inc_pattern, ours):
    """INC's "N:M" prunes N of every M: slimtorch's "(M-N):M"; INC's layout prefixes are dropped as INC does."""
    target = 0.25 if inc_pattern == "1:4" else 0.5 if ":" in inc_pattern else 0.8
    assert load_config(inc(pattern=inc_pattern, target_sparsity=target)).sparse_pruning.settings_for(None).pattern \
        == ours


def test_pruning_configs_entries_are_groups_with_their_own_exclusions():
    cfg = load_config(inc(excluded_op_names=["pooler"], pruning_op_types=["Linear"], pruning_configs=[
        {"op_names": ["layer.0.*"], "pattern": "2:4", "target_sparsity": 0.5, "pruning_scope": "local"},
        {"op_names": ["layer.1.*"], "excluded_op_names": ["value"], "pruning_type": "snip"}]))
    sp = cfg.sparse_pruning
    assert sp.shared_parameters.modules == [] and sp.shared_parameters.op_types == ["Linear"]
    first, second = sp.different_groups["pruning_configs[0]"], sp.different_groups["pruning_configs[1]"]
    assert first.modules == ["layer.0.*"] and first.excluded_modules == ["pooler"]  # the global list, inherited
    assert second.modules == ["layer.1.*"] and second.excluded_modules == ["value"]  # its own list replaces it
    s0, s1 = sp.settings_for("pruning_configs[0]"), sp.settings_for("pruning_configs[1]")
    assert (s0.pattern, s0.dense_ratio, s0.scope) == (NMPattern(2, 4), 0.5, "local")
    assert (s1.method, s1.pattern, s1.scope) == ("snip", BlockPattern(4, 1), "global")
    assert s1.dense_ratio == pytest.approx(0.2)


def test_an_entry_without_op_names_covers_every_layer_but_not_the_head():
    cfg = load_config(inc(pruning_configs=[{"op_names": ["query"]}, {"pattern": "1x1"}]))
    assert cfg.sparse_pruning.different_groups["pruning_configs[1]"].modules == [".*"]


def test_end_step_off_the_frequency_grid_ends_at_incs_last_mask_update():
    cfg = load_config(inc(start_step=1, end_step=10, pruning_frequency=2))
    assert cfg.sparse_pruning.settings_for(None).end_step == 9
    assert any("INC's last mask update" in note and "step 9" in note for note in cfg.notes)


def test_comment_keys_are_ignored_and_a_misspelt_key_is_named():
    assert load_config(inc(_source="a comment")).pruning_enabled
    with pytest.raises(ConfigError, match=r"target_sparsty: not a key of INC's WeightPruningConfig; did you mean "
                                          r"'target_sparsity'\?"):
        load_config({"target_sparsty": 0.9, "pattern": "4x1"})
    with pytest.raises(ConfigError, match=r"pruning_configs\[0\]\.op_name: .* did you mean 'op_names'"):
        load_config(inc(pruning_configs=[{"op_name": ["query"]}]))


@pytest.mark.parametrize("keys,expected", [
    ({"pruning_type": "snip_momentum_progressive"}, "pruning_type: INC's 'snip_momentum_progressive' is not available"),
    ({"pruning_type": "pattern_lock"}, "pattern_lock, retrain_free, sparse_gpt and block_mask pruners"),
    ({"target_sparsity": 1.0}, "target_sparsity: a number in [0, 1)"),
    ({"pattern": "mha"}, "multi-head-attention pattern 'mha' is not available"),
    ({"pattern": "4:4"}, "needs 0 < N < M (N = weights pruned of every M)"),
    ({"pruning_op_types": ["Embedding"]}, "pruning_op_types: slimtorch prunes INC's 'Linear' and 'Conv'"),
    ({"reg_type": "group_lasso"}, "reg_type: 'group_lasso' is not supported"),
    ({"criterion_reduce_type": "sum"}, "criterion_reduce_type: 'sum' is not supported"),
    ({"pruning_configs": [{"pruning_op_types": ["Linear"]}, {"pruning_op_types": ["Conv"]}]},
     "give all pruning_configs entries the same pruning_op_types"),
    ({"pattern": "2:4", "target_sparsity": 0.6}, "dense_ratio 0.4 is impossible with pattern '2:4'"),
])
def test_inc_mistakes_are_config_errors_that_say_what_to_do(keys, expected):
    with pytest.raises(ConfigError) as info:
        load_config(inc(**keys))
    assert expected in str(info.value), str(info.value)


def test_a_validation_error_names_the_inc_key_the_user_wrote():
    with pytest.raises(ConfigError) as info:
        load_config(inc(pruning_scope="everywhere"))
    assert "pruning_scope: Input should be 'local' or 'global'" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(inc(pruning_configs=[{"op_names": ["q"]}, {"op_names": ["k"], "pruning_frequency": 0}]))
    assert "pruning_configs[1].pruning_frequency: Input should be greater than or equal to 1" in str(info.value)
