"""compression_inference: defaults, the docs/conventions.md example, and every bad key named by its path."""
import copy
import json

import pytest

from slimtorch import ConfigError, load_config

STATIC = "compression_inference.static_quantization"
DYNAMIC = "compression_inference.dynamic_quantization"

DOCUMENTED_EXAMPLE = {"compression_inference": {"static_quantization": {
    "enabled": True,
    "weight": {"dtype": "int8", "scheme": "symmetric", "granularity": "per_channel"},
    "activation": {"dtype": "int8", "scheme": "symmetric", "observer": "minmax", "percentile": 99.99},
    "num_calibration_batches": 100,
    "op_types": ["Linear", "Conv1d", "Conv2d", "Conv1D"],
    "quantize_attention_matmuls": False,
    "excluded_modules": [],
    "fold_batchnorm": True,
    "smoothquant": {"enabled": False, "alpha": 0.5, "folding": True}}}}


def static(**body):
    return {"compression_inference": {"static_quantization": {"enabled": True, **body}}}


def dynamic(**body):
    return {"compression_inference": {"dynamic_quantization": {"enabled": True, **body}}}


def test_enabled_alone_is_a_whole_config_with_documented_defaults():
    q = load_config(static()).quantization
    assert q.weight.granularity == "per_channel" and q.weight.scheme == "symmetric"
    assert (q.activation.dtype, q.activation.symmetric, q.activation.observer) == ("uint8", False, "minmax")
    assert q.num_calibration_batches == 100 and q.op_types == ["Linear", "Conv1d", "Conv2d", "Conv1D"]
    assert q.fold_batchnorm and not q.smoothquant.enabled and q.smoothquant.alpha == 0.8
    d = load_config(dynamic()).quantization
    assert d.activation.granularity == "per_tensor" and d.activation.dtype == "uint8"
    assert not hasattr(d, "num_calibration_batches")


def test_conventions_example_loads_as_written():
    q = load_config(DOCUMENTED_EXAMPLE).quantization
    assert q.activation.dtype == "int8" and q.activation.symmetric


def test_smoothquant_has_one_default_alpha_in_both_sections():
    static_sq = load_config(static(smoothquant={"enabled": True})).quantization.smoothquant
    w8a8 = load_config({"compression_inference": {"w8a8_quantization": {"enabled": True, "smoothquant": {
        "enabled": True}}}}).compression_inference.w8a8_quantization.smoothquant
    assert static_sq.alpha == w8a8.alpha == 0.8


def test_int8_activation_defaults_to_symmetric_and_alpha_auto():
    q = load_config(static(activation={"dtype": "int8"}, smoothquant={"enabled": True, "alpha": "auto"}))
    assert q.quantization.activation.symmetric and q.quantization.smoothquant.alpha == "auto"


def test_disabled_section_is_no_quantization():
    assert load_config({"compression_inference": {"static_quantization": {"enabled": False}}}).quantization is None


def test_json_text_with_integer_alpha():
    q = load_config(json.dumps(static(smoothquant={"enabled": True, "alpha": 1}))).quantization
    assert q.smoothquant.alpha == 1.0


BAD = [
    ("both_enabled", {"compression_inference": {"static_quantization": {"enabled": True},
                                                "dynamic_quantization": {"enabled": True}}},
     [f"{DYNAMIC}.enabled", "both enabled"]),
    ("typo_section", {"compression_inference": {"static_quantisation": {"enabled": True}}},
     ["compression_inference.static_quantisation", "did you mean 'static_quantization'"]),
    ("typo_key", static(num_calibration_batch=8), [f"{STATIC}.num_calibration_batch", "did you mean"]),
    ("typo_nested", static(activation={"observr": "mse"}), [f"{STATIC}.activation.observr", "did you mean 'observer'"]),
    ("bad_observer", static(activation={"observer": "entropi"}), [f"{STATIC}.activation.observer", "'entropy'"]),
    ("uint8_symmetric", static(activation={"dtype": "uint8", "scheme": "symmetric"}),
     [f"{STATIC}.activation.scheme", "uint8 activations are asymmetric"]),
    ("weight_uint8", static(weight={"dtype": "uint8"}), [f"{STATIC}.weight.dtype", "'int8'"]),
    ("weight_asymmetric", static(weight={"scheme": "asymmetric"}), [f"{STATIC}.weight.scheme"]),
    ("bad_granularity", static(weight={"granularity": "per_row"}), [f"{STATIC}.weight.granularity", "per_channel"]),
    ("zero_batches", static(num_calibration_batches=0),
     [f"{STATIC}.num_calibration_batches", "greater than or equal to 1"]),
    ("batches_string", static(num_calibration_batches="8"), [f"{STATIC}.num_calibration_batches"]),
    ("percentile_range", static(activation={"observer": "percentile", "percentile": 101}),
     [f"{STATIC}.activation.percentile"]),
    ("bad_op_type", static(op_types=["Linear", "LSTM"]), [f"{STATIC}.op_types.1", "'Conv2d'"]),
    ("empty_op_types", static(op_types=[]), [f"{STATIC}.op_types", "at least 1 item"]),
    ("bad_regex", static(excluded_modules=["pooler", "(dense"]), [f"{STATIC}.excluded_modules", "entry 1"]),
    ("alpha_range", static(smoothquant={"enabled": True, "alpha": 1.5}), [f"{STATIC}.smoothquant.alpha", "[0, 1]"]),
    ("alpha_word", static(smoothquant={"enabled": True, "alpha": "automatic"}), [f"{STATIC}.smoothquant.alpha"]),
    ("alpha_bool", static(smoothquant={"enabled": True, "alpha": True}), [f"{STATIC}.smoothquant.alpha"]),
    ("dynamic_calibration_key", dynamic(num_calibration_batches=4),
     [f"{DYNAMIC}.num_calibration_batches", "unknown key"]),
    ("dynamic_observer", dynamic(activation={"observer": "minmax"}), [f"{DYNAMIC}.activation.observer", "unknown key"]),
    ("dynamic_smoothquant", dynamic(smoothquant={"enabled": True}), [f"{DYNAMIC}.smoothquant", "unknown key"]),
    ("static_per_token", static(activation={"granularity": "per_token"}), [f"{STATIC}.activation.granularity"]),
    ("bad_token_granularity", dynamic(activation={"granularity": "token"}),
     [f"{DYNAMIC}.activation.granularity", "'per_token'"]),
    ("enabled_string", static(enabled="yes"), [f"{STATIC}.enabled"]),
]


@pytest.mark.parametrize("config,expected", [pytest.param(c, e, id=i) for i, c, e in BAD])
def test_bad_quantization_config_names_key_path(config, expected):
    before = copy.deepcopy(config)
    with pytest.raises(ConfigError) as info:
        load_config(config)
    for part in expected:
        assert part in str(info.value), f"{part!r} not in:\n{info.value}"
    assert config == before
