"""slim(): pruned FFN units, attention heads (GQA groups) and conv channels cut out of tiny seeded models; the slim
model computes what the masked one does, and every unremovable case is a clear error with the model unchanged."""
import copy

import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.slimming import slim, slim_report
from slimtorch.slimming.trace import analyze
from tests.llm.tiny_models import TINY_MODELS, random_tokens
from tests.reference.protocol import SEQ, VOCAB, tiny_bert


def bert_inputs(seed=0):
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def masked_bert(head=1, every=2, zero_ffn_bias=True):
    """Tiny BERT with one head of each layer and every ``every``-th FFN unit pruned (rows and biases zero)."""
    model = tiny_bert().eval()
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            units = torch.arange(0, layer.intermediate.dense.out_features, every)
            layer.intermediate.dense.weight[units] = 0
            if zero_ffn_bias:
                layer.intermediate.dense.bias[units] = 0
            att = layer.attention.self
            rows = slice(head * 16, (head + 1) * 16)
            for proj in (att.query, att.key, att.value):
                proj.weight[rows] = 0
                proj.bias[rows] = 0
    return model


def outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out


def test_bert_heads_and_ffn_units_are_cut_and_compute_the_same():
    model = masked_bert()
    before = copy.deepcopy(model.state_dict())
    small = slim(model, bert_inputs(), measure_latency=False)
    layer = small.bert.encoder.layer[0]
    assert layer.intermediate.dense.weight.shape == (64, 64) and layer.output.dense.weight.shape == (64, 64)
    assert layer.attention.self.query.weight.shape == (48, 64)
    assert layer.attention.output.dense.weight.shape == (64, 48)
    assert layer.attention.self.num_attention_heads == 3
    for seed in (1, 2):  # other inputs than the example the trace used
        torch.testing.assert_close(outputs(small, bert_inputs(seed)), outputs(model, bert_inputs(seed)),
                                   rtol=1e-5, atol=1e-6)
    report = slim_report(small)
    assert [(g.units_before, g.units_after) for g in report.groups] == [(4, 3), (128, 64)] * 2
    assert report.parameters_after < 0.7 * report.parameters_before and report.max_relative_difference <= 1e-5
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model is unchanged


def test_a_pruned_unit_that_keeps_its_bias_is_folded_into_the_next_layer():
    model = masked_bert(zero_ffn_bias=False)  # gelu(b) flows into output.dense for every token
    small = slim(model, bert_inputs(), measure_latency=False)
    assert small.bert.encoder.layer[0].intermediate.dense.out_features == 64
    torch.testing.assert_close(outputs(small, bert_inputs(3)), outputs(model, bert_inputs(3)), rtol=1e-5, atol=1e-6)


def test_a_head_whose_output_columns_are_masked_loses_its_projections_too():
    """DeepSpeed's head pruning masks the output projection's columns of a head: q, k and v rows of that head are
    then dead and go with it (their values are never read, so nothing is folded)."""
    model = tiny_bert().eval()
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.attention.output.dense.weight[:, 32:48] = 0  # head 2 of 4
    small = slim(model, bert_inputs(), measure_latency=False)
    att = small.bert.encoder.layer[1].attention
    assert att.self.value.out_features == 48 and att.output.dense.in_features == 48
    torch.testing.assert_close(outputs(small, bert_inputs(4)), outputs(model, bert_inputs(4)), rtol=1e-5, atol=1e-6)


def llama_inputs(model, seed=0):
    return {"input_ids": random_tokens(model.config.vocab_size, 2, 10, seed), "use_cache": False}


def test_gqa_removes_a_key_value_head_with_its_query_heads():
    model = TINY_MODELS["llama"]().eval()  # 4 query heads, 2 key/value heads of 32
    with torch.no_grad():
        for layer in model.model.layers:
            att, mlp = layer.self_attn, layer.mlp
            att.k_proj.weight[32:] = 0
            att.v_proj.weight[32:] = 0
            att.q_proj.weight[64:] = 0  # query heads 2 and 3 read key/value head 1
            units = torch.arange(1, mlp.gate_proj.out_features, 4)
            mlp.gate_proj.weight[units] = 0
            mlp.up_proj.weight[units] = 0
    small = slim(model, llama_inputs(model), measure_latency=False)
    att = small.model.layers[0].self_attn
    assert (att.q_proj.out_features, att.k_proj.out_features, att.v_proj.out_features, att.o_proj.in_features) == \
        (64, 32, 32, 64)
    assert small.model.layers[0].mlp.down_proj.in_features == 192
    torch.testing.assert_close(outputs(small, llama_inputs(model, 5)), outputs(model, llama_inputs(model, 5)),
                               rtol=1e-5, atol=1e-5)


def test_a_decoder_example_without_use_cache_still_cuts_heads():
    """Without use_cache=False the model would return its KV cache (the k and v projections' outputs); slim() turns
    the cache off for the trace, as it does not change the logits."""
    model = TINY_MODELS["llama"]().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, 64:] = 0
    small = slim(model, {"input_ids": random_tokens(model.config.vocab_size, 2, 10, 0)}, measure_latency=False)
    assert small.model.layers[0].self_attn.k_proj.out_features == 32


def test_a_query_head_alone_is_not_a_removable_unit_under_gqa():
    model = TINY_MODELS["llama"]().eval()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[:32] = 0  # one query head of the 2 that share kv head 0
    with pytest.raises(st.UnsupportedModelError, match=r"q_proj: 32 zero output rows .* not aligned"):
        slim(model, llama_inputs(model), measure_latency=False)


def mobile_block():
    """Expansion 1x1 conv, BN, ReLU6, depthwise 3x3, BN, ReLU6, projection 1x1 conv, BN, then a head."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(8, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU6(),
        nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False), nn.BatchNorm2d(24), nn.ReLU6(),
        nn.Conv2d(24, 8, 1, bias=False), nn.BatchNorm2d(8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    with torch.no_grad():
        for bn in (model[1], model[4], model[7]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return model


def test_conv_channels_go_with_their_batchnorms_and_depthwise_conv():
    model = mobile_block()
    pruned = torch.tensor([0, 5, 6, 11, 17])
    with torch.no_grad():
        model[0].weight[pruned] = 0
        model[1].weight[pruned] = 0  # the channel's BatchNorm is pruned with it: its output is then 0
        model[1].bias[pruned] = 0
    x = torch.randn(2, 8, 9, 9)
    small = slim(model, x, measure_latency=False)
    assert (small[0].out_channels, small[1].num_features, small[3].groups, small[4].num_features,
            small[6].in_channels) == (19, 19, 19, 19, 19)
    with torch.no_grad():  # the second BN's shift of the removed channels is folded into the projection's new bias
        torch.testing.assert_close(small(torch.randn(3, 8, 9, 9, generator=torch.Generator().manual_seed(1))),
                                   model(torch.randn(3, 8, 9, 9, generator=torch.Generator().manual_seed(1))),
                                   rtol=1e-5, atol=1e-5)


def test_channels_that_still_vary_are_refused():
    model = mobile_block()
    with torch.no_grad():
        model[0].weight[[1, 2]] = 0
        model[1].bias[[1, 2]] = 1.0  # the BatchNorm keeps a positive shift: the padded depthwise conv makes it vary
    with pytest.raises(st.UnsupportedModelError, match="vary with the input"):
        slim(model, torch.randn(2, 8, 9, 9), measure_latency=False)


def test_the_residual_stream_is_refused_with_the_reason():
    model = tiny_bert().eval()
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.output.dense.weight[:8] = 0
    with pytest.raises(st.UnsupportedModelError, match="nothing to remove.*residual connection"):
        slim(model, bert_inputs(), measure_latency=False)
    groups = {g.producers[0].module: g for g in analyze(model, bert_inputs()).groups}
    assert "residual" in groups["bert.encoder.layer.0.output.dense"].reason


def test_a_model_still_being_pruned_is_refused():
    model = tiny_bert()
    cb = st.prepare_pruning(model, {"compression_training": {"sparse_pruning": {"shared_parameters": {
        "enabled": True, "method": "magnitude", "pattern": "1xchannel", "dense_ratio": 0.5, "schedule_offset": 0}}}})
    with pytest.raises(st.LifecycleError, match="finalize"):
        slim(model, bert_inputs(), measure_latency=False)
    cb.finalize()


def test_the_slim_model_exports_to_onnx(tmp_path):
    """The exported file holds the narrowed layers, and ONNX Runtime computes what the slim PyTorch model does, on
    other inputs than the export's (another batch size and sequence length: both axes stay dynamic)."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model = masked_bert()
    small = slim(model, bert_inputs(), measure_latency=False)
    path = st.export_onnx(small, bert_inputs(), tmp_path / "slim.onnx")
    assert path == str(tmp_path / "slim.onnx")
    graph = onnx.load(path).graph
    shapes = {i.name: tuple(i.dims) for i in graph.initializer}
    for i in range(2):  # 3 heads of 16 and 64 FFN units left in every layer
        for proj in ("query", "key", "value"):
            assert shapes[f"model.bert.encoder.layer.{i}.attention.self.{proj}.bias"] == (48,)
        assert shapes[f"model.bert.encoder.layer.{i}.intermediate.dense.bias"] == (64,)
    stored = sum(torch.Size(dims).numel() for dims in shapes.values())
    assert stored < 0.7 * sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, VOCAB, (3, SEQ - 5), generator=torch.Generator().manual_seed(11))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    inputs["attention_mask"][0, -4:] = 0  # padding in one sequence
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(inputs) and [o.name for o in graph.output] == ["logits"]
    (logits,) = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    torch.testing.assert_close(torch.from_numpy(logits), outputs(small, inputs), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(logits), outputs(model, inputs), rtol=1e-4, atol=1e-5)


def test_pruning_whole_columns_during_training_then_slimming():
    """The training-time pruner masks what slim() removes: 'channelx1' on the FFN output projections (units) and
    'channelx16' on the attention output projections (heads of 16), magnitude, hands-free; after finalize(), slim()
    cuts half the units and heads of every layer and computes what the pruned model does."""
    from tests.reference.protocol import batches

    model = tiny_bert()
    cfg = {"compression_training": {"sparse_pruning": {
        "shared_parameters": {"enabled": True, "method": "magnitude", "schedule_offset": 0,
                              "schedule_offset_end": 4, "frequency": 2},
        "different_groups": {
            "ffn": {"params": {"pattern": "channelx1", "dense_ratio": 0.5}, "modules": [r"layer\.\d+\.output\.dense"]},
            "heads": {"params": {"pattern": "channelx16", "dense_ratio": 0.5},
                      "modules": [r"attention\.output\.dense"]},
        }}}}
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cb = st.prepare_pruning(model, cfg, optimizer=opt)
    for batch in batches(steps=6):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    cb.finalize()
    model.eval()
    small = slim(model, bert_inputs(), measure_latency=False)
    assert [(g.units_before, g.units_after) for g in slim_report(small).groups] == [(4, 2), (128, 64)] * 2
    torch.testing.assert_close(outputs(small, bert_inputs(6)), outputs(model, bert_inputs(6)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("source", ["float", "gguf"])
def test_uniform_widths_save_with_save_pretrained_and_load_in_transformers(tmp_path, source):
    """Also for a model loaded from a GGUF file, which transformers refuses to save_pretrained (its weights are
    float): save_slim writes it as a plain checkpoint and leaves the GGUF quantizer on the model."""
    import json

    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    model = TINY_MODELS["llama"]().eval()
    if source == "gguf":
        pytest.importorskip("gguf")
        from tests.llm.tiny_models import write_llama_gguf

        write_llama_gguf(model, tmp_path / "tiny.gguf")
        model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
        tmp_path = tmp_path / "slim"
    with torch.no_grad():
        for layer in model.model.layers:  # the same units and key/value head in every layer
            layer.mlp.down_proj.weight[:, :64] = 0
            layer.self_attn.o_proj.weight[:, 64:] = 0
    small = slim(model, llama_inputs(model), measure_latency=False)
    quantizer = getattr(small, "hf_quantizer", None)
    assert st.save_slim(small, tmp_path) == "transformers"
    assert getattr(small, "hf_quantizer", None) is quantizer and (quantizer is not None) == (source == "gguf")
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    loaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert (loaded.config.intermediate_size, loaded.config.num_attention_heads, loaded.config.num_key_value_heads) \
        == (192, 2, 1)
    torch.testing.assert_close(outputs(loaded, llama_inputs(model, 7)), outputs(model, llama_inputs(model, 7)),
                               rtol=1e-5, atol=1e-5)


def test_layer_dependent_widths_save_in_slimtorch_format_and_load_back(tmp_path):
    small = slim(masked_bert(), bert_inputs(), measure_latency=False)  # BERT derives the head width from the count
    assert st.save_slim(small, tmp_path) == "slimtorch"
    from transformers import AutoModel

    with pytest.raises(OSError, match="model.safetensors"):  # transformers cannot: the folder's README says why
        AutoModel.from_pretrained(tmp_path)
    readme = (tmp_path / "README.md").read_text()
    assert f'slimtorch.load_slim("{tmp_path.name}")' in readme and "BERT derives its head width" in readme
    loaded = st.load_slim(tmp_path)
    torch.testing.assert_close(outputs(loaded, bert_inputs(8)), outputs(small, bert_inputs(8)), rtol=0, atol=0)
    block = mobile_block()
    with torch.no_grad():
        block[0].weight[:4] = 0
        block[1].weight[:4] = 0
        block[1].bias[:4] = 0
    small = slim(block, torch.randn(2, 8, 9, 9), measure_latency=False)
    st.save_slim(small, tmp_path / "cnn")
    with pytest.raises(st.SlimError, match="pass a fresh instance"):
        st.load_slim(tmp_path / "cnn")
    assert 'load_slim("cnn", model=fresh_float_model)' in (tmp_path / "cnn" / "README.md").read_text()
    loaded = st.load_slim(tmp_path / "cnn", model=mobile_block())
    x = torch.randn(1, 8, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)


def test_the_slim_model_quantizes_and_the_report_times_each_narrowed_layer(tmp_path):
    small = slim(masked_bert(), bert_inputs())  # latency measured: whole model and every narrowed layer
    report = slim_report(small)
    assert report.latency_before_s > 0 and report.latency_after_s > 0
    assert all(": " in line and " -> " in line for line in report.slower_layers)  # "name: t0 -> t1 us" when flagged
    cfg = {"compression_inference": {"dynamic_quantization": {"enabled": True}}}

    def int8_error(model):
        reference = outputs(model, bert_inputs(9))
        return float((outputs(st.quantize(model, cfg), bert_inputs(9)) - reference).norm() / reference.norm())

    # int8 costs the slim model about what it costs the masked one (its dropped zeros only widened the ranges).
    # Measured on this seeded tiny BERT: 0.052 vs 0.040 with the old amax/127 weight rule, 0.078 vs 0.034 with the
    # one grid's amax/127.5 (the masked model gains, the slim one loses): why the rule moves the two apart is open
    # (issue 24's closing note); the bound holds the slim model's cost to the same order as the masked one's.
    assert int8_error(small) < 2.5 * int8_error(masked_bert()) + 0.01


def test_efficientnet_lite0_expansion_channels_slim_exactly():
    """30% of every MBConv block's expansion channels pruned with their BatchNorm (the static 'same' padding before
    the depthwise convs pads space, not channels); the slim network gives the masked one's logits."""
    from tests.quantization.cnn_data import load_efficientnet_lite0, zero_expansion_channels

    model = load_efficientnet_lite0().eval()
    assert zero_expansion_channels(model, 0.3) == 15
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    small = slim(model, x, measure_latency=False)
    report = slim_report(small)
    assert len(report.groups) == 15
    assert all(g.units_after == g.units_before - int(0.3 * g.units_before) for g in report.groups)
    with torch.no_grad():
        torch.testing.assert_close(small(x[:1]), model(x[:1]), rtol=1e-5, atol=1e-5)
    assert report.macs_after < 0.8 * report.macs_before


def test_gpt2_conv1d_mlp_units_slim_and_its_fused_qkv_is_refused(tmp_path):
    """transformers' Conv1D (weight [in, out], an addmm in the graph) narrows like a Linear; GPT-2's fused c_attn
    is split into q, k and v by the model, which the trace refuses (naming it) rather than guessing the heads."""
    model = TINY_MODELS["gpt2"]().eval()
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_proj.weight[:128] = 0  # input rows of the [in, out] weight: a quarter of the MLP units
            block.attn.c_proj.weight[:32] = 0  # one head's columns: stays (fused c_attn)
    inputs = {"input_ids": random_tokens(model.config.vocab_size, 2, 10, 0), "use_cache": False}
    small = slim(model, inputs, measure_latency=False)
    mlp = small.transformer.h[0].mlp
    assert tuple(mlp.c_fc.weight.shape) == (128, 384) and tuple(mlp.c_proj.weight.shape) == (384, 128)
    reasons = {g.producers[0].module: g.reason for g in analyze(model, inputs).groups}
    assert "fused projection" in reasons["transformer.h.0.attn.c_attn"]
    other = {**inputs, "input_ids": random_tokens(model.config.vocab_size, 2, 10, 3)}
    torch.testing.assert_close(outputs(small, other), outputs(model, other), rtol=1e-5, atol=1e-5)
    assert st.save_slim(small, tmp_path) in ("transformers", "slimtorch")
    loaded = st.load_slim(tmp_path)
    torch.testing.assert_close(outputs(loaded, inputs), outputs(small, inputs), rtol=0, atol=0)


@pytest.mark.slow
def test_the_minilm_example_prunes_units_then_slims(tmp_path):
    """examples/prune_minilm.py with the units config: half of all-MiniLM-L6-v2's FFN units and heads pruned while
    distilling, then cut out. The shipped config's groups on a shorter schedule (target at update 20 of 28, not 60 of
    64+): the same code path in ~25 s instead of ~45 s."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    config = json.loads((root / "examples" / "configs" / "minilm_units_50.json").read_text())
    config["compression_training"]["sparse_pruning"]["shared_parameters"].update(end_step=20, frequency=4)
    (tmp_path / "units.json").write_text(json.dumps(config))
    done = subprocess.run([sys.executable, "examples/prune_minilm.py", "--config", str(tmp_path / "units.json"),
                           "--steps", "28", "--slim"], cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "slimtorch slim: 12 group(s) cut" in out, out[-3000:]  # 6 layers' FFN units and heads
    cosine_line = out.split("held-out sentence-embedding cosine to the dense model")[1]
    cosine = float(cosine_line.split("mean ")[1].split(",")[0])
    assert cosine > 0.75, cosine  # 0.771 after 8 updates at the target (seed 0)
