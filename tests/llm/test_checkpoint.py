"""save_compressed: the compressed-tensors directory loads in transformers and computes exactly what the slimtorch
model computes; what cannot be written is a clear error."""
import json

import pytest
import torch

import slimtorch as st

from .tiny_models import TINY_MODELS, random_tokens

pytest.importorskip("compressed_tensors")
pytestmark = pytest.mark.usefixtures("one_thread")


def compress(arch, **section):
    model = TINY_MODELS[arch]()
    calib = [random_tokens(model.config.vocab_size, 2, 32, seed) for seed in range(4)]
    cfg = {"compression_inference": {"weight_only_quantization": {"enabled": True, "algorithm": "rtn",
                                                                  "group_size": 32, **section}}}
    return model, st.oneshot(model, cfg, calib, progress=False)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, -1), (8, 64)])
def test_transformers_loads_what_slimtorch_computes(arch, bits, group_size, tmp_path):
    from transformers import AutoModelForCausalLM

    _, q_model = compress(arch, bits=bits, group_size=group_size)
    st.save_compressed(q_model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = random_tokens(q_model.config.vocab_size, 2, 24, seed=99)
    with torch.no_grad():
        expected, got = q_model(input_ids=ids).logits, loaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert (weights["num_bits"], weights["symmetric"]) == (bits, True)
    assert weights["strategy"] == ("channel" if group_size == -1 else "group")
    assert "lm_head" in config["ignore"]


def test_int4_weights_are_packed_eight_to_an_int32(tmp_path):
    from safetensors.torch import load_file

    _, q_model = compress("llama", bits=4, group_size=32)
    st.save_compressed(q_model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    packed = tensors["model.layers.0.mlp.down_proj.weight_packed"]
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (128, 256 // 8)
    assert tuple(tensors["model.layers.0.mlp.down_proj.weight_scale"].shape) == (128, 256 // 32)
    assert "model.layers.0.mlp.down_proj.weight" not in tensors


def test_what_cannot_be_written_is_an_error(tmp_path):
    _, asymmetric = compress("llama", symmetric=False)
    with pytest.raises(st.ConfigError, match="asymmetric weights cannot be saved.*symmetric: true"):
        st.save_compressed(asymmetric, tmp_path / "a")
    _, gpt2 = compress("gpt2")
    with pytest.raises(st.UnsupportedModelError, match=r"transformer\.h\.0\..*Conv1D.*nn\.Linear only"):
        st.save_compressed(gpt2, tmp_path / "b")
    float_model, _ = compress("llama")
    with pytest.raises(st.ConfigError, match="no quantized layer.*oneshot first"):
        st.save_compressed(float_model, tmp_path / "c")
    assert not any((tmp_path / d).exists() for d in "abc")  # nothing half-written


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, -1)])
def test_load_compressed_rebuilds_slimtorch_layers_with_the_saved_integers(arch, bits, group_size, tmp_path):
    from slimtorch.llm.modules import WeightOnlyLinear

    _, q_model = compress(arch, bits=bits, group_size=group_size)
    st.save_compressed(q_model, tmp_path)
    loaded = st.load_compressed(tmp_path)
    saved = {n: m for n, m in q_model.named_modules() if isinstance(m, WeightOnlyLinear)}
    rebuilt = {n: m for n, m in loaded.named_modules() if isinstance(m, WeightOnlyLinear)}
    assert saved.keys() == rebuilt.keys()
    for name, layer in saved.items():
        assert torch.equal(rebuilt[name].weight_int, layer.weight_int), name
        assert torch.equal(rebuilt[name].weight_scale, layer.weight_scale), name
    ids = random_tokens(q_model.config.vocab_size, 2, 24, seed=99)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, q_model(input_ids=ids).logits, rtol=0, atol=0)


def test_load_compressed_of_a_float_checkpoint_is_an_error(tmp_path):
    model, _ = compress("llama")
    model.save_pretrained(tmp_path)
    with pytest.raises(st.ConfigError, match="no compressed-tensors quantization_config"):
        st.load_compressed(tmp_path)


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("activations", ["dynamic_per_token", "static_per_tensor"])
def test_w8a8_round_trips_through_transformers_and_load_compressed(fmt, activations, tmp_path):
    """int8 / FP8 W8A8 is written in the int-quantized / float-quantized format: transformers (compressed-tensors)
    computes exactly what slimtorch computes, activation quantization included, and load_compressed rebuilds the
    W8A8Linear layers with the saved 8-bit weights and scales."""
    from transformers import AutoModelForCausalLM

    from slimtorch.llm.modules import W8A8Linear

    model = TINY_MODELS["qwen2"]()
    calib = [random_tokens(model.config.vocab_size, 2, 32, seed) for seed in range(4)]
    cfg = {"compression_inference": {"w8a8_quantization": {"enabled": True, "algorithm": "rtn", "format": fmt,
                                                           "activations": activations}}}
    q_model = st.oneshot(model, cfg, calib, progress=False)
    st.save_compressed(q_model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    group = config["config_groups"]["group_0"]
    assert config["format"] == ("float" if fmt == "fp8_e4m3" else "int") + "-quantized"
    assert (group["input_activations"]["strategy"], group["input_activations"]["dynamic"]) == (
        ("token", True) if activations == "dynamic_per_token" else ("tensor", False))
    ids = random_tokens(model.config.vocab_size, 2, 24, seed=99)
    with torch.no_grad():
        expected = q_model(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path).eval()(input_ids=ids).logits
        rebuilt = st.load_compressed(tmp_path)
        again = rebuilt(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(again, expected, rtol=0, atol=1e-5)
    layers = {n: m for n, m in q_model.named_modules() if isinstance(m, W8A8Linear)}
    for name, layer in layers.items():
        loaded = rebuilt.get_submodule(name)
        assert isinstance(loaded, W8A8Linear) and loaded.weight.dtype == layer.weight.dtype
        torch.testing.assert_close(loaded.weight.float(), layer.weight.float(), rtol=0, atol=0)
        assert loaded.dynamic == layer.dynamic


def test_a_2_4_pruned_int4_model_keeps_exact_2_4_zeros_after_loading_and_says_so(tmp_path):
    from transformers import AutoModelForCausalLM

    model = TINY_MODELS["llama"]()
    calib = [random_tokens(model.config.vocab_size, 2, 64, seed) for seed in range(4)]
    cfg = {"compression_inference": {
        "oneshot_pruning": {"enabled": True, "method": "sparsegpt", "pattern": "2:4"},
        "weight_only_quantization": {"enabled": True, "algorithm": "gptq", "group_size": 32}}}
    q_model = st.oneshot(model, cfg, calib, progress=False)
    st.save_compressed(q_model, tmp_path)
    sparsity = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sparsity["sparsity_structure"] == "2:4" and sparsity["format"] == "dense"
    assert 0.5 <= sparsity["global_sparsity"] < 0.6  # half pruned, plus the few weights that round to 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    checked = 0
    for name, module in loaded.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            nonzero = _loaded_nonzero(module)
            assert bool((nonzero.reshape(nonzero.shape[0], -1, 4).sum(-1) <= 2).all()), name
            checked += 1
    assert checked == 14
    ids = random_tokens(model.config.vocab_size, 2, 24, seed=99)
    with torch.no_grad():  # with sparsity metadata transformers keeps the packed weights: same function
        torch.testing.assert_close(loaded(input_ids=ids).logits, q_model(input_ids=ids).logits, rtol=0, atol=1e-5)
    _, dense = compress("llama")
    st.save_compressed(dense, tmp_path / "dense")
    assert json.loads((tmp_path / "dense" / "config.json").read_text())["quantization_config"]["sparsity_config"] == {}


def _loaded_nonzero(module):
    """Which weights of a Linear loaded by transformers are non-zero: compressed-tensors keeps a sparse + quantized
    checkpoint's weights packed (``weight_packed``) and decompresses them in the forward."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    if hasattr(module, "weight_packed"):
        return unpack_from_int32(module.weight_packed, 4, torch.Size(module.weight_shape.tolist())) != 0
    return module.weight.detach() != 0


def test_a_model_loaded_from_a_gguf_file_saves_and_stays_as_loaded(tmp_path):
    """transformers keeps a GGUF "quantizer" on a model loaded with gguf_file= and refuses save_pretrained; the
    weights are float, so save_compressed writes them and leaves the quantizer where it was."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    from .tiny_models import tiny_llama, write_llama_gguf

    original = tiny_llama()
    write_llama_gguf(original, tmp_path / "tiny.gguf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    ids = random_tokens(original.config.vocab_size, 2, 24, seed=99)
    with torch.no_grad():  # the GGUF round trip itself is exact
        torch.testing.assert_close(model(input_ids=ids).logits, original(input_ids=ids).logits, rtol=0, atol=0)
    quantizer = model.hf_quantizer
    with pytest.raises(ValueError, match="not serializable"):  # what the user meets without slimtorch's handling
        model.save_pretrained(tmp_path / "plain")

    calib = [random_tokens(model.config.vocab_size, 2, 32, seed) for seed in range(4)]
    cfg = {"compression_inference": {"weight_only_quantization": {"enabled": True, "algorithm": "rtn",
                                                                  "group_size": 32}}}
    q_model = st.oneshot(model, cfg, calib, progress=False)
    st.save_compressed(q_model, tmp_path / "out")
    assert model.hf_quantizer is quantizer and q_model.hf_quantizer is not None  # both as they were
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, q_model(input_ids=ids).logits, rtol=0, atol=1e-5)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"


def test_a_quantizer_whose_weights_are_not_float_is_an_error(tmp_path):
    class Bnb:  # what transformers leaves on a model loaded with bitsandbytes: its weights are not float
        quantization_config = type("Config", (), {"quant_method": "bitsandbytes"})()

        def is_serializable(self):
            return False

    _, q_model = compress("llama")
    q_model.hf_quantizer = Bnb()
    with pytest.raises(st.UnsupportedModelError, match="bitsandbytes quantizer.*load it as a float model"):
        st.save_compressed(q_model, tmp_path)
