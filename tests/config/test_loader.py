"""load_config: the RFC config, DeepSpeed's own keys, and bad input (acceptance point 5 of issue 2).

Every bad config must raise ``slimtorch.ConfigError`` naming the full key path; random configs either load or
raise ConfigError, never anything else.
"""
from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

import slimtorch
from slimtorch import ConfigError, load_config
from slimtorch.config import BlockPattern, NMPattern, PruningSettings

SP = "compression_training.sparse_pruning"
SHARED = f"{SP}.shared_parameters"
GROUP = f"{SP}.different_groups.sp1"

RFC = {"compression_training": {"sparse_pruning": {
    "shared_parameters": {"enabled": True, "method": "snip_momentum", "pattern": "4x1", "dense_ratio": 0.1,
                          "gradient_accumulation_steps": 1, "sparsity_decay_type": "exp", "start_step": 0,
                          "end_step": 10000},
    "different_groups": {"sp1": {"params": {"dense_ratio": 0.5}, "modules": ["attention.self"]}}}}}

# snip_momentum ranks globally unless told otherwise (what DeepSpeed hands INC), blocks at most 98% per layer
RFC_SP1 = PruningSettings(method="snip_momentum", pattern=BlockPattern(4, 1), dense_ratio=0.5, decay="exp",
                          start_step=0, end_step=10000, frequency=1, beta=0.9, scope="global", max_sparsity=0.98)
RFC_SHARED = PruningSettings(method="snip_momentum", pattern=BlockPattern(4, 1), dense_ratio=0.1, decay="exp",
                             start_step=0, end_step=10000, frequency=1, beta=0.9, scope="global",
                             max_sparsity=0.98)

# A DeepSpeed config as DeepSpeed's compression tutorial writes it: its own key names, method "l1", the
# techniques slimtorch does not implement present but disabled.
DEEPSPEED = {
    "train_batch_size": 32, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4,
    "fp16": {"enabled": False}, "optimizer": {"type": "AdamW", "params": {"lr": 5e-5, "weight_decay": 0.01}},
    "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
    "compression_training": {
        "weight_quantization": {
            "shared_parameters": {"enabled": False, "schedule_offset": 0, "quantization_type": "symmetric",
                                  "fp16_mixed_quantize": {"enabled": False, "quantize_change_ratio": 0.001}},
            "different_groups": {"wq1": {"params": {"start_bits": 8, "target_bits": 8}, "modules": ["attention"]}}},
        "activation_quantization": {"shared_parameters": {"enabled": False, "range_calibration": "dynamic"}},
        "sparse_pruning": {
            "shared_parameters": {"enabled": True, "schedule_offset": 30, "schedule_offset_end": 90,
                                  "schedule_offset_stride": 15, "method": "l1", "block_pattern": "4x1",
                                  "dense_ratio": 0.4, "excluded_modules": ["classifier", "pooler"]},
            "different_groups": {
                "sp1": {"params": {"dense_ratio": 0.5}, "modules": ["attention.self"],
                        "related_modules": [["attention.output.dense"]]},
                "sp2": {"params": {"method": "snip_momentum", "block_pattern": "2:4", "dense_ratio": 0.5,
                                   "schedule_offset": 40, "schedule_offset_stride": 5},
                        "modules": ["intermediate.dense"], "related_modules": [["output.dense"], ["pooler"]]}}},
        "row_pruning": {
            "shared_parameters": {"enabled": False, "schedule_offset": 20, "method": "topk"},
            "different_groups": {"rp1": {"params": {"dense_ratio": 0.5}, "modules": ["intermediate.dense"],
                                         "related_modules": [["layer.\\w+.output.dense"]]}}},
        "head_pruning": {"shared_parameters": {"enabled": False, "method": "topk", "num_heads": 12}},
        "channel_pruning": {"shared_parameters": {"enabled": False, "schedule_offset": 0, "method": "topk"}},
        "layer_reduction": {"enabled": False, "keep_number_layer": 5, "module_name_prefix": "bert.encoder.layer",
                            "teacher_layer": [2, 4, 6, 8, 10], "other_module_name": ["bert.pooler", "classifier"]}},
}


def sp(shared=None, groups=None, **shared_overrides):
    """A valid sparse_pruning config with ``shared`` keys merged in and optional different_groups."""
    params = {"enabled": True, "pattern": "4x1", "dense_ratio": 0.1, "start_step": 0, "end_step": 100}
    params.update(shared or {})
    params.update(shared_overrides)
    section = {"shared_parameters": params}
    if groups is not None:
        section["different_groups"] = groups
    return {"compression_training": {"sparse_pruning": section}}


def group(params=None, modules=("attention.self",), **extra):
    return {"sp1": {"params": dict(params or {}), "modules": list(modules), **extra}}


# ------------------------------------------------------------------------------------------ good configs
@pytest.mark.parametrize("form", ["dict", "json_text", "path_str", "path_obj", "inside_deepspeed", "section_only"])
def test_rfc_config_loads_in_every_form(form, tmp_path):
    if form == "dict":
        source = RFC
    elif form == "json_text":
        source = json.dumps(RFC, indent=2)
    elif form in ("path_str", "path_obj"):
        path = tmp_path / "ds_config.json"
        path.write_text(json.dumps(RFC))
        source = str(path) if form == "path_str" else path
    elif form == "inside_deepspeed":
        source = {k: v for k, v in DEEPSPEED.items() if k != "compression_training"}
        source["compression_training"] = copy.deepcopy(RFC["compression_training"])
    else:  # just the body of compression_training
        source = copy.deepcopy(RFC["compression_training"])
    cfg = load_config(source)
    assert isinstance(cfg, slimtorch.CompressionConfig)
    assert cfg.pruning_enabled
    sp_cfg = cfg.sparse_pruning
    assert sp_cfg.settings_for("sp1") == RFC_SP1
    assert sp_cfg.settings_for(None) == RFC_SHARED
    assert sp_cfg.settings_for("sp1").target_sparsity == pytest.approx(0.5)
    assert sp_cfg.settings_for(None).target_sparsity == pytest.approx(0.9)
    assert sp_cfg.shared_parameters.gradient_accumulation_steps == 1
    assert sp_cfg.shared_parameters.excluded_modules == []
    assert sp_cfg.different_groups["sp1"].modules == ["attention.self"]
    assert load_config(cfg) is cfg  # a loaded config passes through


def test_deepspeed_keys_load_with_deepspeeds_meaning():
    cfg = load_config(DEEPSPEED)
    sp_cfg = cfg.sparse_pruning
    assert sp_cfg.shared_parameters.excluded_modules == ["classifier", "pooler"]
    assert sp_cfg.shared_parameters.method == "l1"  # DeepSpeed's own method keeps DeepSpeed's semantics
    # l1: unstructured (block_pattern is not read, as DeepSpeed does not read it), pruned once at schedule_offset
    assert sp_cfg.settings_for(None) == PruningSettings(
        method="l1", pattern=BlockPattern(1, 1), dense_ratio=0.4, decay="exp",
        start_step=30, end_step=30, frequency=15, beta=0.9)
    assert sp_cfg.settings_for("sp1") == PruningSettings(
        method="l1", pattern=BlockPattern(1, 1), dense_ratio=0.5, decay="exp",
        start_step=30, end_step=30, frequency=15, beta=0.9)
    assert sp_cfg.settings_for("sp1").ranks_at_prepare
    # a group with its own method reads its block_pattern; snip_momentum ranks globally
    assert sp_cfg.settings_for("sp2") == PruningSettings(
        method="snip_momentum", pattern=NMPattern(2, 4), dense_ratio=0.5, decay="exp",
        start_step=40, end_step=90, frequency=5, beta=0.9, scope="global", max_sparsity=0.5)
    assert sp_cfg.different_groups["sp1"].related_modules == [["attention.output.dense"]]
    assert sp_cfg.different_groups["sp2"].related_modules == [["output.dense"], ["pooler"]]
    assert sp_cfg.different_groups["sp2"].modules == ["intermediate.dense"]
    # layers in no group stay dense under l1, whatever shared_parameters says
    assert "DeepSpeed's 'l1' prunes only the groups' modules" in sp_cfg.unlisted_rule()
    assert any("shared_parameters.block_pattern '4x1' is not read" in n for n in cfg.notes)


def test_deepspeed_defaults_and_group_aliases():
    """DeepSpeed's minimal form: only schedule_offset and method; l1 prunes once, at schedule_offset."""
    cfg = load_config({"compression_training": {"sparse_pruning": {
        "shared_parameters": {"enabled": True, "schedule_offset": 30, "method": "l1"},
        "different_groups": {"sp1": {"params": {"dense_ratio": 0.5, "schedule_offset_end": 60, "method": "l1"},
                                     "modules": ["attention.self"]}}}}})
    assert cfg.sparse_pruning.settings_for(None) == PruningSettings(
        method="l1", pattern=BlockPattern(1, 1), dense_ratio=0.1, decay="exp",
        start_step=30, end_step=30, frequency=1, beta=0.9)
    assert cfg.sparse_pruning.settings_for("sp1") == PruningSettings(
        method="l1", pattern=BlockPattern(1, 1), dense_ratio=0.5, decay="exp",
        start_step=30, end_step=30, frequency=1, beta=0.9)
    assert cfg.notes == ()
    # N:M defaults its dense_ratio to N/M; 2:4 through block_pattern means the same in both conventions
    cfg = load_config({"compression_training": {"sparse_pruning": {"shared_parameters": {
        "enabled": True, "block_pattern": "2:4", "schedule_offset": 0}}}})
    assert cfg.sparse_pruning.settings_for(None).pattern == NMPattern(2, 4)
    assert cfg.sparse_pruning.settings_for(None).dense_ratio == 0.5


def test_deepspeed_schedule_offset_defaults_to_its_code_value():
    """DeepSpeed's code starts at 1000 when schedule_offset is missing (its docs say 0); the note says so."""
    cfg = load_config({"compression_training": {"sparse_pruning": {
        "shared_parameters": {"enabled": True, "method": "l1"},
        "different_groups": {"sp1": {"params": {"dense_ratio": 0.5}, "modules": ["attention.self"]}}}}})
    assert cfg.sparse_pruning.settings_for("sp1").start_step == 1000
    assert len(cfg.notes) == 1 and "DeepSpeed's default 1000 applies" in cfg.notes[0]
    # slimtorch's own keys keep slimtorch's default
    cfg = sp(end_step=0)
    del cfg["compression_training"]["sparse_pruning"]["shared_parameters"]["start_step"]
    cfg = load_config(cfg)
    assert cfg.sparse_pruning.settings_for(None).start_step == 0 and cfg.notes == ()


@pytest.mark.parametrize("section", ["weight_quantization", "activation_quantization", "layer_reduction"])
def test_enabled_unsupported_deepspeed_section_is_refused_by_name(section):
    config = copy.deepcopy(DEEPSPEED)
    body = config["compression_training"][section]
    if "shared_parameters" in body:
        body["shared_parameters"]["enabled"] = True
    else:
        body["enabled"] = True
    with pytest.raises(ConfigError,
                       match=rf"compression_training\.{section}: DeepSpeed's {section} is not implemented"):
        load_config(config)


def test_every_enabled_unsupported_section_is_reported_at_once():
    """D7: DeepSpeed's unit-test config enables several sections; one error lists them all, each with its nearest
    slimtorch feature, so the user fixes the config in one round."""
    config = copy.deepcopy(DEEPSPEED)
    for name in ("weight_quantization", "activation_quantization", "row_pruning", "head_pruning"):
        config["compression_training"][name]["shared_parameters"]["enabled"] = True
    with pytest.raises(ConfigError) as info:
        load_config(config)
    message = str(info.value)
    assert message.startswith("2 enabled DeepSpeed sections are not implemented by slimtorch")
    for name in ("weight_quantization", "activation_quantization"):
        assert f"compression_training.{name}: DeepSpeed's {name} is not implemented" in message
    # quantization-aware training points at slimtorch's post-training quantization
    assert message.count("compression_inference.static_quantization or dynamic_quantization") == 2
    # row and head pruning are implemented; the disabled layer_reduction stays quiet
    assert "row_pruning" not in message and "head_pruning" not in message and "layer_reduction" not in message


def test_deepspeed_row_and_head_pruning_sections_load_with_deepspeeds_defaults():
    config = copy.deepcopy(DEEPSPEED)
    training = config["compression_training"]
    training["row_pruning"]["shared_parameters"]["enabled"] = True
    training["head_pruning"]["shared_parameters"]["enabled"] = True
    training["head_pruning"]["different_groups"] = {
        "hp1": {"params": {"dense_ratio": 0.25}, "modules": ["attention.output.dense"],
                "related_modules": [["self.query", "self.key", "self.value"]]}}
    cfg = load_config(config)
    row, head = cfg.structured_groups
    assert (row.technique.section, row.method, row.dense_ratio, row.start_step) == ("row_pruning", "topk", 0.5, 20)
    # head_pruning sets no schedule_offset: DeepSpeed's code default 1000 applies, and the loader says so
    assert (head.method, head.dense_ratio, head.start_step, head.num_heads) == ("topk", 0.25, 1000, 12)
    assert any("head_pruning.shared_parameters.schedule_offset is not set" in n for n in cfg.notes)


@pytest.mark.parametrize("section,shared,groups,match", [
    ("head_pruning", {"enabled": True, "method": "l1", "num_heads": 4}, True,
     r"head_pruning\.shared_parameters\.method: DeepSpeed's head_pruning implements only method 'topk'"),
    ("head_pruning", {"enabled": True}, True,
     r"head_pruning\.shared_parameters\.num_heads: head_pruning needs num_heads"),
    ("row_pruning", {"enabled": True, "num_heads": 4}, True, r"num_heads belongs to head_pruning"),
    ("channel_pruning", {"enabled": True}, False,
     r"channel_pruning\.different_groups: channel_pruning is enabled but has no different_groups"),
    ("row_pruning", {"enabled": True, "method": "snip"}, True, r"row_pruning\.shared_parameters\.method"),
])
def test_structured_section_mistakes_name_the_key(section, shared, groups, match):
    body = {"shared_parameters": shared}
    if groups:
        body["different_groups"] = {"g": {"params": {"dense_ratio": 0.5}, "modules": ["dense"]}}
    with pytest.raises(ConfigError, match=match):
        load_config({"compression_training": {section: body}})


def test_structured_group_needs_dense_ratio_and_paired_related_modules():
    base = {"shared_parameters": {"enabled": True}}
    with pytest.raises(ConfigError, match=r"row_pruning\.different_groups\.g\.params\.dense_ratio: Field required"):
        load_config({"row_pruning": {**base, "different_groups": {"g": {"params": {}, "modules": ["x"]}}}})
    with pytest.raises(ConfigError, match=r"related_modules has 1 entries but modules has 2"):
        load_config({"row_pruning": {**base, "different_groups": {
            "g": {"params": {"dense_ratio": 0.5}, "modules": ["x", "y"], "related_modules": [["z"]]}}}})


@pytest.mark.parametrize("where,key,expected", [
    ("params", "excluded_modules", "a group's excluded_modules sits beside its params, not inside them"),
    ("params", "modules", "a group's modules sits beside its params"),
    ("group", "op_types", "op_types is read from shared_parameters only"),
    ("params", "gradient_accumulation_steps", "gradient_accumulation_steps is read from shared_parameters only"),
])
def test_keys_valid_elsewhere_say_where_they_belong(where, key, expected):
    """D8: a shared-only key inside a group is not a typo of related_modules; the message says where it goes."""
    value = ["pooler"] if key.endswith("modules") else ["Linear"] if key == "op_types" else 2
    grp = group({key: value}) if where == "params" else group(**{key: value})
    with pytest.raises(ConfigError) as info:
        load_config(sp(groups=grp))
    message = str(info.value)
    assert expected in message and "did you mean" not in message, message


@pytest.mark.parametrize("doc,expected", [
    ({"compression": {"sparse_pruning": {"shared_parameters": {"enabled": True}}}},
     "compression.sparse_pruning: sparse_pruning belongs under the top-level 'compression_training'"),
    ({"deepspeed": {"compression_training": {}}},
     "deepspeed.compression_training: compression_training must be a top-level key"),
    ({"training": {"static_quantization": {"enabled": True}}},
     "belongs under the top-level 'compression_inference'"),
])
def test_a_section_under_an_unknown_key_is_refused_not_ignored(doc, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(doc)


def test_disabled_sections_and_other_top_level_keys_are_ignored():
    cfg = load_config({**DEEPSPEED, "compression_inference": {"static_quantization": {"enabled": False}}})
    assert cfg.pruning_enabled
    assert set(cfg.model_dump()) == {"compression_training", "compression_inference"}
    assert cfg.quantization is None
    training = cfg.model_dump()["compression_training"]
    assert training["row_pruning"]["shared_parameters"]["enabled"] is False and cfg.structured_groups == []
    assert "weight_quantization" not in training and "layer_reduction" not in training
    # a config without compression sections is valid and prunes nothing
    empty = load_config({"train_batch_size": 8, "optimizer": {"type": "Adam"}})
    assert empty.sparse_pruning is None and not empty.pruning_enabled


@pytest.mark.parametrize("source", [RFC, DEEPSPEED, sp(block_pattern="4x1"),
                                    sp(groups=group({"pattern": "2:4"}))])  # the last one fails validation
def test_callers_dict_is_not_mutated(source):
    before = copy.deepcopy(source)
    try:
        load_config(source)
    except ConfigError:
        pass
    assert source == before
    assert json.dumps(source) == json.dumps(before)  # same key order too


# ------------------------------------------------------------------------------------------- bad configs
TOO_LONG = "[" + "1, " * 200 + "1]"  # JSON text longer than a file name may be

BAD = [
    # typos at every level, each with the nearest valid key
    ("top_level_typo", {"compresion_training": RFC["compression_training"]},
     ["compresion_training", "did you mean 'compression_training'"]),
    ("section_typo", {"compression_training": {"sparse_prunning": {}}},
     ["compression_training.sparse_prunning", "did you mean 'sparse_pruning'"]),
    ("shared_typo", {"compression_training": {"sparse_pruning": {"shared_paramters": {}}}},
     [f"{SP}.shared_paramters", "did you mean 'shared_parameters'"]),
    ("groups_typo", {"compression_training": {"sparse_pruning": {"different_group": {}}}},
     [f"{SP}.different_group", "did you mean 'different_groups'"]),
    ("end_tep", sp(end_tep=5), [f"{SHARED}.end_tep", "did you mean 'end_step'"]),
    ("deepspeed_alias_typo", sp(schedule_ofset=5), [f"{SHARED}.schedule_ofset", "did you mean 'schedule_offset'"]),
    ("group_param_typo", sp(groups=group({"dense_ratoi": 0.5})),
     [f"{GROUP}.params.dense_ratoi", "did you mean 'dense_ratio'"]),
    ("group_modlues", sp(groups={"sp1": {"params": {}, "modlues": ["attention"]}}),
     [f"{GROUP}.modlues", "did you mean 'modules'"]),
    ("unknown_key_lists_valid", sp(xyzzy=1), [f"{SHARED}.xyzzy", "valid keys: beta, block_pattern"]),
    ("group_only_key", sp(groups=group({"excluded_modules": ["x"]})), [f"{GROUP}.params.excluded_modules",
                                                                      "sits beside its params"]),
    ("method_typo", sp(method="snip_momentun"), [f"{SHARED}.method", "did you mean 'snip_momentum'"]),
    ("method_unknown", sp(method="movement"), [f"{SHARED}.method", "'magnitude'", "got 'movement'"]),
    ("method_topk", sp(method="topk"), [f"{SHARED}.method", "DeepSpeed's 'topk' in sparse_pruning", "not per weight",
                                        "Nearest: 'snip_momentum'"]),
    ("decay_unknown", sp(sparsity_decay_type="exponential"), [f"{SHARED}.sparsity_decay_type", "'cube'"]),
    # wrong types
    ("ratio_as_string", sp(dense_ratio="0.5"), [f"{SHARED}.dense_ratio", "valid number", "'0.5'"]),
    ("step_as_string", sp(start_step="10"), [f"{SHARED}.start_step", "valid integer"]),
    ("step_as_float", sp(frequency=1.5), [f"{SHARED}.frequency", "valid integer"]),
    ("bool_as_string", sp(enabled="true"), [f"{SHARED}.enabled", "valid boolean"]),
    ("ratio_as_bool", sp(dense_ratio=True), [f"{SHARED}.dense_ratio", "valid number"]),
    ("shared_as_list", {"compression_training": {"sparse_pruning": {"shared_parameters": [{"enabled": True}]}}},
     [SHARED, "a JSON object"]),
    ("groups_as_list", sp(groups=[{"params": {}, "modules": ["a"]}]), [f"{SP}.different_groups", "a JSON object"]),
    ("modules_as_string", sp(groups={"sp1": {"params": {}, "modules": "attention.self"}}),
     [f"{GROUP}.modules", "valid list"]),
    ("pattern_as_int", sp(pattern=4), [f"{SHARED}.pattern", "valid string"]),
    ("excluded_entry_int", sp(excluded_modules=[1]), [f"{SHARED}.excluded_modules.0", "valid string"]),
    # out of range
    ("ratio_zero", sp(dense_ratio=0), [f"{SHARED}.dense_ratio", "greater than 0"]),
    ("ratio_above_one", sp(dense_ratio=1.5), [f"{SHARED}.dense_ratio", "less than or equal to 1"]),
    ("ratio_negative", sp(groups=group({"dense_ratio": -0.1})), [f"{GROUP}.params.dense_ratio", "greater than 0"]),
    ("start_negative", sp(start_step=-1), [f"{SHARED}.start_step", "greater than or equal to 0"]),
    ("end_negative_alias", sp(groups=group({"schedule_offset_end": -5})),
     [f"{GROUP}.params.schedule_offset_end (alias of end_step)", "greater than or equal to 0"]),
    ("frequency_zero", sp(frequency=0), [f"{SHARED}.frequency", "greater than or equal to 1"]),
    ("beta_one", sp(beta=1.0), [f"{SHARED}.beta", "less than 1"]),
    ("accumulation_zero", sp(gradient_accumulation_steps=0), [f"{SHARED}.gradient_accumulation_steps"]),
    # bad patterns
    ("pattern_4x", sp(pattern="4x"), [f"{SHARED}.pattern", "unknown pattern '4x'", "'N:M'"]),
    ("pattern_2:2", sp(pattern="2:2"), [f"{SHARED}.pattern", "1 <= N < M"]),
    ("pattern_0x4", sp(pattern="0x4"), [f"{SHARED}.pattern", "block sides must be >= 1"]),
    ("pattern_5:4", sp(groups=group({"pattern": "5:4"})), [f"{GROUP}.params.pattern", "1 <= N < M"]),
    ("pattern_channelxchannel", sp(pattern="channelxchannel"), [f"{SHARED}.pattern", "whole layers"]),
    ("pattern_abc", sp(pattern="abc"), [f"{SHARED}.pattern", "unknown pattern 'abc'"]),
    # impossible combinations, explained
    ("nm_ratio_too_low", sp(pattern="2:4", dense_ratio=0.1),
     [f"{SHARED}.dense_ratio", "impossible with pattern '2:4'", "keeps 2 of every 4", "at least 0.5"]),
    ("nm_group_inherits_low_ratio", sp(groups=group({"pattern": "2:4"})),
     [f"{GROUP}.params.dense_ratio", "dense_ratio 0.1 (inherited from shared_parameters.dense_ratio",
      "is impossible with pattern '2:4'"]),
    ("start_after_end", sp(start_step=200, end_step=100),
     [f"{SHARED}.end_step", "end_step 100 is before start_step 200"]),
    ("group_start_after_shared_end", sp(groups=group({"start_step": 500})),
     [f"{GROUP}.params.end_step", "before start_step 500"]),
    ("alias_and_canonical", sp(block_pattern="4x1"), [SHARED, "both 'block_pattern' and its alias 'pattern'"]),
    ("deepspeed_1:4", {"compression_training": {"sparse_pruning": {"shared_parameters": {
        "enabled": True, "block_pattern": "1:4", "dense_ratio": 0.75}}}},
     [f"{SHARED}.block_pattern", "ambiguous", "*pruned*", "*kept*", "'3:4' keeps 3 of 4"]),
    ("deepspeed_group_3:4", sp(groups=group({"block_pattern": "3:4"}), pattern="4x1"),
     [f"{GROUP}.params.block_pattern", "ambiguous"]),
    ("bad_regex_modules", sp(groups=group(modules=["attention.(self"])),
     [f"{GROUP}.modules", "entry 0 ('attention.(self') is not a valid regular expression"]),
    ("bad_regex_excluded", sp(excluded_modules=["ok", "[cls"]), [f"{SHARED}.excluded_modules", "entry 1"]),
    ("group_without_modules", sp(groups={"sp1": {"params": {}}}), [f"{GROUP}.modules", "Field required"]),
    ("group_empty_modules", sp(groups=group(modules=[])), [f"{GROUP}.modules", "at least 1 item"]),
    # global scope: bounds that contradict the target, the pattern or each other
    ("scope_typo", sp(scope="globl"), [f"{SHARED}.scope", "did you mean 'global'"]),
    ("bounds_below_target", sp(scope="global", dense_ratio=0.2, min_sparsity_per_layer=0.9),
     [f"{SHARED}.min_sparsity_per_layer", "target sparsity 0.8", "below min_sparsity_per_layer 0.9",
      "cannot reach its target"]),
    ("bounds_above_target", sp(scope="global", dense_ratio=0.2, max_sparsity_per_layer=0.5),
     [f"{SHARED}.max_sparsity_per_layer", "above max_sparsity_per_layer 0.5"]),
    ("default_max_below_target", sp(scope="global", dense_ratio=0.01),
     [f"{SHARED}.max_sparsity_per_layer", "0.98 (the default)"]),
    ("bounds_crossed", sp(scope="global", dense_ratio=0.5, min_sparsity_per_layer=0.6, max_sparsity_per_layer=0.4),
     [f"{SHARED}.min_sparsity_per_layer", "above max_sparsity_per_layer 0.4"]),
    ("bound_above_nm_cap", sp(scope="global", pattern="2:4", dense_ratio=0.6, max_sparsity_per_layer=0.8),
     [f"{SHARED}.max_sparsity_per_layer", "above what pattern '2:4' can prune", "at most 0.5"]),
    ("bound_without_global", sp(min_sparsity_per_layer=0.1), [f"{SHARED}.min_sparsity_per_layer", "scope 'global'"]),
    ("group_bound_local", sp(groups=group({"scope": "local", "max_sparsity_per_layer": 0.95}), scope="global"),
     [f"{GROUP}.params.max_sparsity_per_layer", "scope 'global'"]),
    ("group_bounds_vs_inherited_target", sp(groups=group({"scope": "global", "min_sparsity_per_layer": 0.95})),
     [f"{GROUP}.params.min_sparsity_per_layer", "target sparsity 0.9"]),
    ("bound_above_one", sp(scope="global", max_sparsity_per_layer=1.5),
     [f"{SHARED}.max_sparsity_per_layer", "less than or equal to 1"]),
    # sources that are not configs
    ("not_json", '{"compression_training": {sparse_pruning: {}}}', ["JSON text", "invalid JSON at line 1 column"]),
    ("missing_file", "/nonexistent/ds_config.json", ["'/nonexistent/ds_config.json' does not exist"]),
    ("not_a_source", 42, ["load_config takes a path, a dict or JSON text, got int"]),
    # BUG (slimtorch/config/loader.py:_read): only text starting with "{" is parsed as JSON, so a JSON list is
    # taken for a file name: "config file '[1, 2]' does not exist".
    ("json_list_text", "[1, 2]", ["top level", "JSON object", "list"]),
]


@pytest.mark.parametrize("config,expected", [pytest.param(c, e, id=i) for i, c, e in BAD])
def test_bad_config_names_key_path(config, expected):
    with pytest.raises(ConfigError) as info:
        load_config(config)
    message = str(info.value)
    for part in expected:
        assert part in message, f"{part!r} not in:\n{message}"


def test_bad_configs_are_distinct():
    assert len(BAD) >= 25
    assert len({i for i, _, _ in BAD}) == len(BAD)
    assert len({json.dumps(c, sort_keys=True) for _, c, _ in BAD}) == len(BAD)


def test_json_list_file_is_refused(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="top level of a config must be a JSON object, got list"):
        load_config(path)


def test_bad_file_names_line_and_column(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text('{\n  "compression_training": {\n    "sparse_pruning": {,}\n  }\n}\n')
    with pytest.raises(ConfigError, match=r"ds_config\.json: invalid JSON at line 3 column 24"):
        load_config(str(path))


def _non_utf8_file(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('{"compression_training": {}, "comment": "d\xe9j\xe0"}'.encode("latin-1"))
    return str(path)


# BUGS (slimtorch/config/loader.py:_read): these escape as OSError ("File name too long"), RecursionError and
# UnicodeDecodeError instead of ConfigError.
@pytest.mark.parametrize("make", [
    pytest.param(lambda tmp: TOO_LONG, id="long_json_list_text"),
    pytest.param(lambda tmp: '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", id="deeply_nested_json"),
    pytest.param(_non_utf8_file, id="non_utf8_file"),
    pytest.param(lambda tmp: str(tmp), id="directory"),
])
def test_unreadable_sources_raise_config_error(make, tmp_path):
    with pytest.raises(ConfigError):
        load_config(make(tmp_path))


# BUG (slimtorch/config/loader.py:_normalise and _alias_params): a dict from Python code may have non-string keys;
# difflib and ".".join() then raise TypeError instead of ConfigError.
@pytest.mark.parametrize("config", [
    pytest.param({1: {}}, id="int_top_level_key"),
    pytest.param({None: {}, "compression_training": {}}, id="none_top_level_key"),
    pytest.param(sp(groups={1: {"params": {"block_pattern": "4x1"}, "modules": ["a"]}}, pattern="8x1"),
                 id="int_group_name_with_alias"),
])
def test_non_string_keys_raise_config_error(config):
    with pytest.raises(ConfigError):
        load_config(config)


# ------------------------------------------------------------------------------------------ property test
VALID_PARAM_VALUES = {
    "enabled": [True, False], "method": ["magnitude", "l1", "snip", "snip_momentum", "gradient"],
    "pattern": ["4x1", "1x1", "2:4", "1:4", "4:8", "channelx1", "1xchannel", "8x2"],
    "block_pattern": ["4x1", "2:4", "1:4"], "dense_ratio": [0.1, 0.5, 0.75, 1.0, 1],
    "sparsity_decay_type": ["exp", "cos", "linear", "cube"], "start_step": [0, 5, 100], "end_step": [0, 10, 1000],
    "schedule_offset": [0, 30], "schedule_offset_end": [90], "frequency": [1, 10], "schedule_offset_stride": [15],
    "beta": [0.0, 0.9], "gradient_accumulation_steps": [1, 4],
    "excluded_modules": [[], ["classifier"], ["(bad"]], "modules": [["attention"], ["[bad"]],
}
PARAM_KEYS = sorted(VALID_PARAM_VALUES)
MISSPELT = ["end_tep", "dense_ratoi", "Pattern", "num_heads", "", "params", "shared_paramters", "modlues"]
OTHER_SECTIONS = ["weight_quantization", "activation_quantization", "row_pruning", "head_pruning", "channel_pruning",
               "layer_reduction"]

scalars = hs.one_of(hs.none(), hs.booleans(), hs.integers(-3, 20_000), hs.integers(),
                    hs.floats(allow_nan=True, allow_infinity=True), hs.text(max_size=12),
                    hs.sampled_from(["4x1", "2:4", "3:4", "0x1", "channel", "l1", "topk", "attention.self", "(", "{"]))
anything = hs.recursive(scalars, lambda inner: hs.one_of(hs.lists(inner, max_size=3),
                                                          hs.dictionaries(hs.text(max_size=6), inner, max_size=3)),
                        max_leaves=8)


def mutated(draw, doc):
    """Now and then misspell a key, replace a value with a random one, drop a key or add an unknown one.

    (Hypothesis favours small integers, so a roll of 0 leaves things as they are.)"""
    out = {}
    for key, value in doc.items():
        roll = draw(hs.integers(0, 19))
        if roll == 19:
            continue
        if roll == 18:
            key = draw(hs.one_of(hs.sampled_from(MISSPELT), hs.text(max_size=8)))
        elif roll == 17:
            value = draw(anything)
        out[key] = value
    if draw(hs.integers(0, 9)) == 9:
        out[draw(hs.one_of(hs.sampled_from(MISSPELT + PARAM_KEYS), hs.text(max_size=8)))] = draw(anything)
    return out


@hs.composite
def params(draw, shared):
    keys = draw(hs.lists(hs.sampled_from(PARAM_KEYS), max_size=7, unique=True))
    if shared:
        keys = ["enabled"] + [k for k in keys if k != "enabled"]
    elif draw(hs.integers(0, 9)) == 9:
        keys += ["enabled"]
    doc = {k: draw(anything) if draw(hs.integers(0, 4)) == 4 else draw(hs.sampled_from(VALID_PARAM_VALUES[k]))
           for k in keys}
    if shared and draw(hs.integers(0, 3)) != 3:
        doc["enabled"] = True
    return mutated(draw, doc)


@hs.composite
def groups(draw):
    names = draw(hs.lists(hs.one_of(hs.sampled_from(["sp1", "sp2"]), hs.text(max_size=4)), max_size=3, unique=True))
    out = {}
    for name in names:
        group = {"params": draw(params(shared=False)),
                 "modules": draw(hs.lists(hs.sampled_from(["attention.self", "intermediate", r"layer\.\d+", "", "("]),
                                         min_size=1, max_size=2))}
        if draw(hs.booleans()):
            group["related_modules"] = draw(hs.lists(hs.one_of(hs.text(max_size=4), hs.lists(hs.text(max_size=4),
                                                                                             max_size=2)), max_size=2))
        out[name] = mutated(draw, group)
    return out


@hs.composite
def random_config(draw):
    pruning = mutated(draw, {"shared_parameters": draw(params(shared=True)), "different_groups": draw(groups())})
    training = {"sparse_pruning": pruning}
    for name in draw(hs.lists(hs.sampled_from(OTHER_SECTIONS), max_size=2, unique=True)):
        flag = draw(hs.one_of(hs.booleans(), anything))
        training[name] = {"enabled": flag} if name == "layer_reduction" else {"shared_parameters": {"enabled": flag}}
    training = mutated(draw, training)
    form = draw(hs.integers(0, 9))
    if form == 9:
        return training  # only the body of compression_training
    doc = {"compression_training": training}
    if form == 1:
        doc["compression_inference"] = {"static_quantization": {"enabled": draw(hs.booleans())}}
    if form == 2:
        doc.update(train_batch_size=8, optimizer={"type": "AdamW", "params": {"lr": 1e-4}})
    return mutated(draw, doc)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(config=random_config(), as_text=hs.booleans())
def test_random_configs_load_or_raise_config_error(config, as_text):
    before = repr(config)
    source = json.dumps(config) if as_text else config
    try:
        cfg = load_config(source)
    except ConfigError as exc:
        assert str(exc)
    else:
        if cfg.sparse_pruning is not None:  # a config that loads resolves for every group
            cfg.sparse_pruning.settings_for(None)
            for name in cfg.sparse_pruning.different_groups:
                cfg.sparse_pruning.settings_for(name)
    assert repr(config) == before
