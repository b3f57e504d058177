"""slimtorch.oneshot on tiny random-init decoders: block inputs captured exactly, RTN and GPTQ through the block
pipeline, the caller's model untouched, and every user mistake a clear error."""
import copy

import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.llm.blocks import capture_block_inputs, find_blocks
from slimtorch.llm.modules import WeightOnlyLinear
from slimtorch.quantization.grid import WeightGrid, quantize_rtn
from slimtorch.quantization.grid import dequantize_groups as dequantize
from slimtorch.quantization.smoothquant.scales import linear_weight

from .tiny_models import TINY_MODELS, random_tokens

pytestmark = pytest.mark.usefixtures("one_thread")


def config(**section):
    return {"compression_inference": {"weight_only_quantization": {"enabled": True, **section}}}


def calibration(model, batches=4, length=32, seed=0):
    vocab = model.config.vocab_size
    return [random_tokens(vocab, 2, length, seed + i) for i in range(batches)]


def last_block_output(model, ids):
    """What the last block returns inside the model's own forward."""
    _, blocks = find_blocks(model)
    seen = []
    handle = blocks[-1].register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_captured_inputs_replay_the_models_own_forward(arch):
    """Running the blocks one after the other from the captured calls gives exactly what the model computes
    (Gemma3: its sliding-window and full-attention layers each get their own mask and rotary embeddings)."""
    model = TINY_MODELS[arch]().eval()
    ids = random_tokens(model.config.vocab_size, 2, 16, seed=5)
    path, blocks = find_blocks(model)
    captured = capture_block_inputs(model, blocks, [ids], where=path)
    assert len(captured) == 1 and len(captured.calls[0]) == len(blocks)
    hidden = captured.hidden
    with torch.no_grad():
        for i, block in enumerate(blocks):
            (call,) = captured.inputs_of(i, hidden)
            out = block(*call.args, **call.kwargs)
            hidden = [out[0] if isinstance(out, tuple) else out]
    torch.testing.assert_close(hidden[0], last_block_output(model, ids), rtol=0, atol=0)


def test_capture_leaves_the_blocks_as_they_were():
    model = TINY_MODELS["llama"]()
    ids = random_tokens(model.config.vocab_size, 2, 16, seed=5)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    path, blocks = find_blocks(model)
    capture_block_inputs(model, blocks, [ids], where=path)
    assert all("forward" not in vars(b) and not b._forward_pre_hooks and not b._forward_hooks for b in blocks)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)



@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_capture_moves_every_tensor_argument_to_the_compute_device(arch):
    """With a compute device, the hidden states and every tensor the blocks receive (rotary embeddings, masks,
    positions) are on it: "meta" stands in for a GPU here, a device the CPU model is not on. A GPU run once found
    the rotary embeddings left on the CPU."""
    model = TINY_MODELS[arch]()
    path, blocks = find_blocks(model)
    captured = capture_block_inputs(model, blocks, [random_tokens(model.config.vocab_size, 2, 16, seed=5)],
                                    where=path, device=torch.device("meta"))
    found = []

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            found.append(obj.device.type)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk(captured.hidden)
    for calls in captured.calls:
        for call in calls:
            walk(call.args)
            walk(call.kwargs)
    assert len(found) > len(blocks) and set(found) == {"meta"}, found

def test_gemma3_layers_get_their_own_attention_masks():
    model = TINY_MODELS["gemma3"]()
    types = model.config.layer_types
    assert len(set(types)) == 2, types  # the tiny config mixes sliding and full attention
    ids = random_tokens(model.config.vocab_size, 1, 48, seed=1)  # longer than the sliding window
    path, blocks = find_blocks(model)
    calls = capture_block_inputs(model, blocks, [ids], where=path).calls[0]
    masks = [c.kwargs["attention_mask"] for c in calls]
    for i in range(len(blocks)):
        for j in range(len(blocks)):
            same = masks[i] is masks[j] or (masks[i] is not None and masks[j] is not None
                                             and torch.equal(masks[i], masks[j]))
            assert same == (types[i] == types[j]), (i, j, types)


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_rtn_through_the_pipeline_is_rtn_of_every_block_weight(arch):
    model = TINY_MODELS[arch]()
    grid = WeightGrid(4, True, 32)
    q_model = st.oneshot(model, config(algorithm="rtn", group_size=32), calibration(model), progress=False)
    float_layers = dict(model.named_modules())
    quantized = {n: m for n, m in q_model.named_modules() if isinstance(m, WeightOnlyLinear)}
    assert quantized and all(".lm_head" not in n and n != "lm_head" for n in quantized)
    for name, layer in quantized.items():
        q, scale, zero = quantize_rtn(linear_weight(float_layers[name]), grid)
        torch.testing.assert_close(layer.dequantized_weight(), dequantize(q, scale, zero, 32), rtol=0, atol=0)
    report = st.quantization_report(q_model)
    assert report.mode == "weight-only" and len(report.quantized) == len(quantized)
    assert any("outside the repeated blocks" in f.reason for f in report.left_float)
    assert report.calibration_batches == 0  # RTN reads no activations: the model never ran
    no_data = st.oneshot(model, config(algorithm="rtn", group_size=32), None, progress=False)
    for name, layer in no_data.named_modules():
        if isinstance(layer, WeightOnlyLinear):
            assert torch.equal(layer.dequantized_weight(), quantized[name].dequantized_weight()), name


def test_a_config_that_reads_activations_needs_calibration_data():
    model = TINY_MODELS["llama"]()
    with pytest.raises(st.CalibrationError, match="this config needs calibration data .* pass calib_data"):
        st.oneshot(model, config(algorithm="gptq", group_size=32), None, progress=False)


def _logit_error(reference, model, ids):
    with torch.no_grad():
        ref, out = reference(input_ids=ids).logits, model(input_ids=ids).logits
    return float(((out - ref) ** 2).mean() / (ref ** 2).mean())


@pytest.mark.parametrize("static_groups", [True, False])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gptq_through_the_pipeline_beats_rtn_on_held_out_tokens(arch, static_groups):
    model = TINY_MODELS[arch]()
    calib = calibration(model, batches=8, length=64)
    held_out = random_tokens(model.config.vocab_size, 4, 64, seed=99)
    gptq = config(algorithm="gptq", group_size=32, gptq={"static_groups": static_groups})
    errors = {name: _logit_error(model, st.oneshot(model, cfg, calib, progress=False), held_out)
              for name, cfg in (("rtn", config(algorithm="rtn", group_size=32)), ("gptq", gptq))}
    # random weights and tokens: no outliers for GPTQ to work around, so the margin is modest (SmolLM2's real
    # numbers are in BENCHMARKS.md)
    assert errors["gptq"] < 0.9 * errors["rtn"], errors


def test_the_callers_model_is_untouched_unless_inplace():
    model = TINY_MODELS["llama"]()
    before = copy.deepcopy(model.state_dict())
    q_model = st.oneshot(model, config(algorithm="rtn", group_size=32), calibration(model), progress=False)
    assert q_model is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, WeightOnlyLinear) for m in model.modules())
    same = st.oneshot(model, config(algorithm="rtn", group_size=32), calibration(model), inplace=True,
                      progress=False)
    assert same is model and any(isinstance(m, WeightOnlyLinear) for m in model.modules())


def test_blocks_after_the_last_compressed_one_are_not_run():
    model = TINY_MODELS["llama"](num_hidden_layers=4)
    _, blocks = find_blocks(model)
    calls = [0] * len(blocks)
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
    cfg = config(algorithm="gptq", group_size=32, excluded_modules=[r"layers\.[23]\."])
    q = st.oneshot(model, cfg, calibration(model, batches=8, length=64), progress=False)
    # the capture calls every block once per batch (blocks 1-3 as stand-ins that hand the hidden states on); then
    # block 0 runs twice per batch (the Hessian pass, the pass feeding block 1), block 1, the last compressed one,
    # only its Hessian pass; blocks 2 and 3 never
    assert calls == [8 + 2 * 8, 8 + 8, 8, 8], calls
    compressed = [n for n, m in q.named_modules() if isinstance(m, WeightOnlyLinear)]
    assert compressed and all(n.startswith(("model.layers.0.", "model.layers.1.")) for n in compressed), compressed
    assert len(compressed) == 14  # 7 Linears in each of the 2 blocks


def test_blocks_are_found_or_named():
    model = TINY_MODELS["llama"]()
    assert find_blocks(model)[0] == "model.layers"
    assert find_blocks(TINY_MODELS["gpt2"]())[0] == "transformer.h"
    with pytest.raises(st.ConfigError, match="blocks: .*'model.nothing'.*e.g. 'model.layers'"):
        st.oneshot(model, config(blocks="model.nothing"), calibration(model), progress=False)
    with pytest.raises(st.UnsupportedModelError, match="no repeated blocks found in Sequential.*Set "
                                                       "compression_inference.weight_only_quantization.blocks"):
        st.oneshot(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), config(), [torch.zeros(1, 4)], progress=False)


def test_group_size_that_does_not_divide_a_width_is_an_error_before_any_work():
    model = TINY_MODELS["llama"]()
    width = model.config.hidden_size
    with pytest.raises(st.ConfigError, match=rf"model\.layers\.0\.self_attn\.q_proj.*{width}"):
        st.oneshot(model, config(group_size=width + 1), calibration(model), progress=False)


class _NaNActivation(nn.Module):
    def forward(self, x):
        return x * float("nan")


def test_nan_in_a_block_names_the_block():
    model = TINY_MODELS["llama"]()
    model.model.layers[1].mlp.act_fn = _NaNActivation()
    with pytest.raises(st.CalibrationError, match=r"model\.layers\.1 returned NaN or inf"):  # GPTQ runs the blocks
        st.oneshot(model, config(algorithm="gptq", group_size=32), calibration(model), progress=False)


def test_wrong_entry_point_and_empty_data_are_errors():
    model = TINY_MODELS["llama"]()
    with pytest.raises(st.ConfigError, match="call slimtorch.compress"):
        st.quantize(model, config(), calib_dataloader=calibration(model))
    with pytest.raises(st.ConfigError, match="none of weight_only_quantization, w8a8_quantization and "
                                                    "oneshot_pruning is enabled"):
        st.oneshot(model, {"compression_inference": {"dynamic_quantization": {"enabled": True}}}, [],
                   progress=False)
    with pytest.raises(st.CalibrationError, match="yielded no batches"):
        st.oneshot(model, config(), [], progress=False)


def test_linears_reading_one_input_share_one_hessian():
    from slimtorch.llm.blocks import capture_block_inputs
    from slimtorch.llm.gptq import HessianAccumulator
    from slimtorch.llm.hessians import BlockHessians
    from slimtorch.quantization.passes import hooks_attached

    model = TINY_MODELS["llama"]()
    path, blocks = find_blocks(model)
    captured = capture_block_inputs(model, blocks, calibration(model), where=path)
    block = blocks[0]
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    hessians = BlockHessians(f"{path}.0")
    separate = {n: HessianAccumulator() for n in linears}

    def own(name):
        return lambda module, args: separate[name].add(args[0])

    with hooks_attached(pre=[(m, hessians.hook(n)) for n, m in linears.items()], with_kwargs=True), \
            hooks_attached(pre=[(m, own(n)) for n, m in linears.items()]), torch.no_grad():
        for call in captured.inputs_of(0, captured.hidden):
            block(*call.args, **call.kwargs)
    assert sorted(map(sorted, hessians.shared().values())) == [
        ["mlp.down_proj"], ["mlp.gate_proj", "mlp.up_proj"],
        ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"], ["self_attn.o_proj"]]
    for name in linears:
        taken = hessians.take(name)
        assert taken.tokens == separate[name].tokens == 4 * 2 * 32
        torch.testing.assert_close(taken.hessian, separate[name].hessian, rtol=0, atol=0)
    assert not hessians.shared()  # every Hessian freed once taken


def test_act_order_keeps_groups_in_column_order_unless_static_groups_is_off(tmp_path):
    model = TINY_MODELS["llama"]()
    ids = random_tokens(model.config.vocab_size, 2, 16, seed=7)
    for static in (True, False):
        section = dict(algorithm="gptq", group_size=32, gptq={"act_order": True, "static_groups": static})
        q_model = st.oneshot(model, config(**section), calibration(model), progress=False)
        layers = [m for m in q_model.modules() if isinstance(m, WeightOnlyLinear)]
        assert all((m.weight_g_idx is None) == static for m in layers)
        for m in layers:  # the forward computes with the weight the integers, scales and permutation describe
            x = torch.randn(3, m.in_features)
            torch.testing.assert_close(m(x), x @ m.dequantized_weight().T, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            assert torch.isfinite(q_model(input_ids=ids).logits).all()
    with pytest.raises(st.ConfigError, match="column permutation"):
        st.save_compressed(q_model, tmp_path)


class _CallsForwardDirectly(nn.Module):
    """Its forward calls each block's forward() itself, bypassing nn.Module.__call__ (and so every hook)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(3))

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer.forward(x)
        return x


def test_blocks_the_forward_does_not_call_as_modules_are_an_error():
    model = _CallsForwardDirectly()
    with pytest.raises(st.UnsupportedModelError, match=r"reached layers\[1\] without calling layers\[0\] as a "
                                                       r"module.*blocks key"):
        st.oneshot(model, config(algorithm="gptq", group_size=8), [torch.randint(0, 64, (1, 8))], progress=False)
    assert isinstance(model.layers[0], nn.Linear)  # untouched


@pytest.mark.parametrize("section", [config(algorithm="gptq", group_size=32),
                                     {"compression_inference": {"oneshot_pruning": {"enabled": True,
                                                                                    "pattern": "2:4"}}}])
def test_too_few_tokens_names_the_layer_and_the_count_before_any_change_even_in_place(section):
    model = TINY_MODELS["gpt2"]()
    before = copy.deepcopy(model.state_dict())
    few = [random_tokens(model.config.vocab_size, 1, 64, seed=0)]  # 64 tokens; c_attn reads 128 wide
    with pytest.raises(st.CalibrationError, match=r"transformer\.h\.0\.attn\.c_attn saw 64 calibration tokens; "
                                                  r"(GPTQ|SparseGPT) needs at least 128"):
        st.oneshot(model, section, few, inplace=True, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
