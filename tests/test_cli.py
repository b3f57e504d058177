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
    assert "valid; sparse_pruning enabled" in out and "shared_parameters:" in out


def test_request_config_resolves_groups(capsys):
    main(["check", str(EXAMPLES / "request_4x1.json")])
    out = capsys.readouterr().out
    assert "snip_momentum 4x1 dense_ratio 0.1 (sparsity 90.0%)" in out
    assert "different_groups.sp1: snip_momentum 4x1 dense_ratio 0.5" in out and "'attention.self'" in out


def test_bad_config_exits_2_with_the_path(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"compression_training": {"sparse_pruning": {"shared_parameters": {"end_tep": 1}}}}))
    assert main(["check", str(bad)]) == 2
    assert "shared_parameters.end_tep: unknown key; did you mean 'end_step'?" in capsys.readouterr().err
