"""slimtorch.compress, the one post-training entry point: it runs every enabled compression_inference section in
order (one-shot pruning, then quantization) on the pipeline the model needs, gives the same model as the older
functions called stage by stage, and keeps the caller's model unless inplace=True. Also: quantize() with data where
mpu goes, and the error base class's old name."""
import copy

import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.llm.modules import WeightOnlyLinear
from slimtorch.posttraining import is_decoder_llm
from slimtorch.quantization.qdq import QDQLinear

from .llm.tiny_models import VOCAB, random_tokens, tiny_llama


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

PRUNE_2_4 = {"enabled": True, "method": "wanda", "pattern": "2:4"}
RTN_G32 = {"enabled": True, "algorithm": "rtn", "group_size": 32}


def inference(**sections):
    return {"compression_inference": sections}


def tiny_bert(seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertModel(config).eval()


def bert_batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 100, (4, 16), generator=g),
             "attention_mask": torch.ones(4, 16, dtype=torch.long)} for _ in range(n)]


def llm_batches(n=4):
    return [random_tokens(VOCAB, 2, 32, seed=i) for i in range(n)]


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def assert_2_of_4(weight):
    nonzero = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
    assert int(nonzero.max()) <= 2


def test_encoder_prune_then_static_quantize_in_one_call_equals_the_stages_and_keeps_the_zeros():
    model = tiny_bert()
    before = copy.deepcopy(model)
    cfg = inference(oneshot_pruning=PRUNE_2_4, static_quantization={"enabled": True})
    q = st.compress(model, cfg, bert_batches(), progress=False)
    assert same_state(model, before)  # copy rule: the caller's model is untouched

    pruned = st.compress(model, inference(oneshot_pruning=PRUNE_2_4), bert_batches(), progress=False)
    staged = st.quantize(pruned, inference(static_quantization={"enabled": True}), calib_dataloader=bert_batches(),
                         progress=False)
    assert same_state(q, staged)  # one call == prune, then quantize the pruned model
    layer = q.encoder.layer[0].intermediate.dense
    assert isinstance(layer, QDQLinear) and not layer.dynamic
    assert_2_of_4(layer.weight_int8)
    assert torch.equal(layer.weight_int8 == 0, pruned.encoder.layer[0].intermediate.dense.weight == 0)
    report = st.quantization_report(q)
    schemes = {r.name: r.scheme for r in report.quantized}
    assert schemes["encoder.layer.1.output.dense"].startswith("pruned 2:4 (wanda) + w int8 per_channel")
    assert not schemes["pooler.dense"].startswith("pruned")  # outside the repeated blocks: not pruned
    assert isinstance(q.pooler.dense, QDQLinear) and float((q.pooler.dense.weight_int8 == 0).float().mean()) < 0.2


def test_encoder_batches_follow_the_feeding_rules_and_a_generator_is_read_once():
    """A tuple batch is fed by its first item, a bare tensor as the model's first argument, and a one-shot
    generator serves both stages the same batches."""
    model = tiny_bert()
    cfg = inference(oneshot_pruning=PRUNE_2_4, dynamic_quantization={"enabled": True})
    ids = [b["input_ids"] for b in bert_batches()]
    from_list = st.compress(model, cfg, ids, progress=False)
    from_tuples = st.compress(model, cfg, ((t, "label") for t in ids), progress=False)
    assert same_state(from_list, from_tuples)
    fn = st.compress(model, cfg, ids, calib_input_fn=lambda t: {"input_ids": t}, progress=False)
    assert same_state(from_list, fn)


def test_decoder_llm_runs_the_block_pipeline_as_oneshot_does():
    model = tiny_llama()
    assert is_decoder_llm(model) and not is_decoder_llm(tiny_bert())
    cfg = inference(oneshot_pruning={"enabled": True, "method": "magnitude", "pattern": "2:4"},
                    weight_only_quantization=RTN_G32)
    q = st.compress(model, cfg, progress=False)  # data-free: no calibration data needed
    assert same_state(q, st.oneshot(model, cfg, None, progress=False))
    assert isinstance(q.model.layers[0].mlp.down_proj, WeightOnlyLinear)
    gptq = inference(weight_only_quantization={"enabled": True, "group_size": 32})
    assert same_state(st.compress(model, gptq, llm_batches(), progress=False),
                      st.oneshot(model, gptq, llm_batches(), progress=False))


def test_inplace_returns_the_model_itself_on_both_paths():
    model = tiny_bert()
    out = st.compress(model, inference(oneshot_pruning=PRUNE_2_4, dynamic_quantization={"enabled": True}),
                      bert_batches(), inplace=True, progress=False)
    assert out is model and isinstance(model.encoder.layer[0].output.dense, QDQLinear)
    llm = tiny_llama()
    assert st.compress(llm, inference(weight_only_quantization=RTN_G32), inplace=True, progress=False) is llm
    assert isinstance(llm.model.layers[1].self_attn.q_proj, WeightOnlyLinear)


def test_cnn_quantizes_and_one_shot_pruning_on_it_is_a_config_error():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 4 * 4, 10)).eval()
    images = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    static = inference(static_quantization={"enabled": True})
    assert same_state(st.compress(cnn, static, images, progress=False),
                      st.quantize(cnn, static, calib_dataloader=images, progress=False))
    with pytest.raises(st.ConfigError, match=r"oneshot_pruning: .* Sequential has none .*sparse_pruning"):
        st.compress(cnn, inference(oneshot_pruning=PRUNE_2_4, **static["compression_inference"]), images)


def test_compress_mistakes_are_errors_before_any_change():
    model, llm = tiny_bert(), tiny_llama()
    before = copy.deepcopy(model)
    with pytest.raises(st.ConfigError, match="weight_only_quantization: runs block by block on a decoder LLM, "
                                             "and BertModel is not one .*no text-generation.*pipeline"):
        st.compress(model, inference(weight_only_quantization=RTN_G32), inplace=True)
    with pytest.raises(st.ConfigError, match="is not one .*pipeline"):
        st.compress(llm, inference(pipeline="whole_model", weight_only_quantization=RTN_G32))
    with pytest.raises(st.CalibrationError, match="pass calib_data="):
        st.compress(model, inference(oneshot_pruning=PRUNE_2_4, static_quantization={"enabled": True}),
                    inplace=True)
    with pytest.raises(st.ConfigError, match="eval_fn drives the accuracy search"):
        st.compress(model, inference(oneshot_pruning=PRUNE_2_4), bert_batches(), eval_fn=lambda m: 1.0)
    with pytest.raises(st.ConfigError, match=r"device is where the block pipeline .*\(model\.to\(device\)\)"):
        st.compress(model, inference(dynamic_quantization={"enabled": True}), device="cpu")
    with pytest.raises(st.ConfigError, match="no section is enabled"):
        st.compress(model, inference(static_quantization={"enabled": False}))
    with pytest.raises(st.CalibrationError, match="calibration batch 0 .*cannot be fed to BertModel"):
        st.compress(model, inference(oneshot_pruning=PRUNE_2_4), [3.0], inplace=True)
    assert same_state(model, before)


def test_older_entry_points_refuse_a_config_they_would_run_only_half_of():
    both = inference(oneshot_pruning=PRUNE_2_4, static_quantization={"enabled": True})
    with pytest.raises(st.ConfigError, match="oneshot_pruning is enabled too.*slimtorch.compress"):
        st.quantize(tiny_bert(), both, calib_dataloader=bert_batches())
    with pytest.raises(st.ConfigError, match="static/dynamic_quantization is enabled too.*slimtorch.compress"):
        st.oneshot(tiny_llama(), both, llm_batches(), progress=False)


@pytest.mark.parametrize("data", ["list", "tuple", "tensor", "dataloader", "generator", "dict"])
def test_quantize_with_data_where_mpu_goes_says_to_pass_calib_dataloader(data):
    model = nn.Sequential(nn.Linear(4, 2)).eval()
    xs = [torch.randn(2, 4) for _ in range(2)]
    given = {"list": xs, "tuple": tuple(xs), "tensor": xs[0], "dict": {"x": xs[0]},
             "dataloader": torch.utils.data.DataLoader(torch.randn(4, 4), batch_size=2),
             "generator": (x for x in xs)}[data]
    with pytest.raises(st.ConfigError, match=r"the third argument is mpu .* quantize\(model, config, "
                                             r"calib_dataloader=batches\)"):
        st.quantize(model, {"compression_inference": {"static_quantization": {"enabled": True}}}, given)


def test_error_base_class_keeps_its_old_name():
    assert st.SlimError is st.SlimtorchError
    assert issubclass(st.ConfigError, st.SlimtorchError)
    with pytest.raises(st.SlimError):
        st.compress(tiny_bert(), {})


def test_compress_command_compresses_and_saves_what_load_reads(tmp_path, capsys):
    import json

    from slimtorch.cli import main

    cfg = inference(oneshot_pruning=PRUNE_2_4, static_quantization={"enabled": True})
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    torch.save(bert_batches(), tmp_path / "calib.pt")
    code = main(["compress", str(tmp_path / "cfg.json"), "--model", "tests.test_compress:tiny_bert", "--calib",
                 str(tmp_path / "calib.pt"), "--output", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "BertModel: 13 layers compressed, 0 left as they were" in printed
    assert same_state(st.load(tmp_path / "out"), st.compress(tiny_bert(), cfg, bert_batches(), progress=False))
    assert main(["compress", str(tmp_path / "cfg.json"), "--model", "tests.test_compress:tiny_bert", "--output",
                 str(tmp_path / "none")]) == 2
    assert "pass calib_data=" in capsys.readouterr().err


# ------------------------------------------------------------------ acceptance: one call each on the real models
@pytest.mark.slow
def test_minilm_prune_2_4_then_static_int8_in_one_call(minilm, paragraphs):
    """all-MiniLM-L6-v2 with oneshot_pruning (Wanda 2:4) and static_quantization in one config: every Linear of
    the six layers holds 2:4 int8 weights, and Wanda, which reads the calibration activations, keeps the sentence
    embeddings much closer to the float model's than magnitude pruning (measured: cosine 0.71 against 0.55 with
    int8 too; 2:4 without fine-tuning costs this much on a 22M-parameter encoder; static int8 alone: 0.99)."""
    from .conftest import token_batches

    model, tok = minilm
    model.eval()
    calib = list(token_batches(tok, paragraphs[:16], 8, 64))
    held_out = next(token_batches(tok, paragraphs[200:232], 32, 64))

    def cosine(m):
        with torch.no_grad():
            mask = held_out["attention_mask"].unsqueeze(-1)
            ref = (model(**held_out).last_hidden_state * mask).sum(1) / mask.sum(1)
            out = (m(**held_out).last_hidden_state * mask).sum(1) / mask.sum(1)
        return float(torch.nn.functional.cosine_similarity(ref, out).mean())

    q = st.compress(model, inference(oneshot_pruning=PRUNE_2_4, static_quantization={"enabled": True}), calib,
                    progress=False)
    layers = [m for n, m in q.named_modules() if isinstance(m, QDQLinear) and n.startswith("encoder.layer.")]
    assert len(layers) == 36
    for layer in layers:
        assert_2_of_4(layer.weight_int8)
    magnitude = st.compress(model, inference(oneshot_pruning=dict(PRUNE_2_4, method="magnitude")), progress=False)
    assert cosine(q) > 0.68 and cosine(q) > cosine(magnitude) + 0.1, (cosine(q), cosine(magnitude))


@pytest.mark.slow
def test_efficientnet_lite0_static_in_one_call_equals_quantize():
    from .quantization.cnn_data import image_crops, load_efficientnet_lite0

    lite0 = load_efficientnet_lite0()
    calib = [image_crops(8, seed=1)[i:i + 4] for i in (0, 4)]
    cfg = inference(static_quantization={"enabled": True})
    q = st.compress(lite0, cfg, calib, progress=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
    assert len(st.quantization_report(q).quantized) == 50  # every conv (16 blocks, stem, head) and the classifier
    assert same_state(q, st.quantize(lite0, cfg, calib_dataloader=calib, progress=False))


@pytest.mark.slow
def test_smollm2_prune_and_rtn_int4_in_one_call():
    """SmolLM2-135M, magnitude 2:4 then RTN int4 group 64 (data-free: no calibration pass), one call."""
    from .llm.test_smollm2 import _smollm2_module

    S = _smollm2_module()
    model, tokenizer = S.load_smollm2()
    assert is_decoder_llm(model)
    cfg = inference(oneshot_pruning={"enabled": True, "method": "magnitude", "pattern": "2:4"},
                    weight_only_quantization={"enabled": True, "algorithm": "rtn", "group_size": 64})
    q = st.compress(model, cfg, progress=False)
    report = st.quantization_report(q)
    assert len(report.quantized) == 30 * 7 and "lm_head" in {r.name for r in report.left_float}
    w = q.model.layers[5].mlp.down_proj.dequantized_weight()
    assert_2_of_4(w)
    assert isinstance(model.model.layers[5].mlp.down_proj, nn.Linear)  # the model passed is unchanged
