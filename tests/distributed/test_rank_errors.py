"""A config that differs between ranks ends with an error on every rank, soon, naming the setting: never a rank left
waiting in a collective (a hang inside deepspeed.initialize, or gloo's "Connection closed by peer" much later).
2 CPU ranks (gloo): prepare_pruning on an FSDP2 model, slimtorch.deepspeed.initialize under ZeRO-3, and the Trainer
callback's constructor; quantize() shares the mechanism (tests/quantization/test_distributed_calibration.py)."""
from __future__ import annotations

import importlib.util
import json

from tests._multiproc import WORLD, spawn
from tests.distributed import _rank_error_workers as R

SOON = 30.0  # seconds from the start of a case to its error, on every rank
GROUP_SETTING = ("compression_training.sparse_pruning.different_groups.sp1.params.dense_ratio: 0.5 on rank 0, 0.25 "
                 "on rank 1")


def test_a_config_that_differs_between_ranks_raises_on_every_rank(tmp_path):
    """One launch, every entry point in turn: the errors come in well under a second (a hang, or a rank raising
    while the other waits in a collective, ends this test at the spawn's timeout or the gloo timeout of 60 s)."""
    spawn(R.entry_points, tmp_path, timeout=240)
    outcomes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    expected = ["prepare_pruning"]
    for module, entry in (("deepspeed", "slimtorch.deepspeed.initialize"), ("transformers", "PruningCallback")):
        if importlib.util.find_spec(module) is not None:
            expected.append(entry)
    assert sorted(outcomes[0]) == sorted(expected) == sorted(outcomes[1])
    for what in expected:
        _check([o[what] for o in outcomes], what)


def _check(outcomes, what: str) -> None:
    for rank, cases in enumerate(outcomes):
        for name, case in cases.items():
            assert case["seconds"] < SOON, (what, rank, name, case)
    invalid = [o["invalid_on_one_rank"]["error"] for o in outcomes]
    # rank 1 raises its own error; rank 0 a DistributedError that carries it, so both say what to fix
    assert invalid[1].startswith(
        "ConfigError: invalid slimtorch config:\n  compression_training.sparse_pruning.shared_parameters.dense_ratio: "
        "dense_ratio 0.25 is impossible with pattern '2:4'"), invalid
    assert invalid[0] == f"DistributedError: {what} failed on rank 1: {invalid[1]}", invalid
    if what == "PruningCallback":
        return  # its constructor reads the config alone; prepare_pruning compares the ranks' when training begins
    for text in (o["different_groups_differ"]["error"] for o in outcomes):
        assert text.startswith(f"DistributedError: {what}: the compression config differs between rank 0 and rank 1: "
                               f"{GROUP_SETTING}. "), text


def test_config_differences_name_every_setting_with_both_values():
    from slimtorch.ranks import differences

    ours = {"a": {"b": 0.5, "c": [1, 2], "d": "x"}, "e": 1}
    theirs = {"a": {"b": 0.25, "c": [1, 2], "f": True}, "e": 1}
    assert differences(ours, theirs) == [("a.b", 0.5, 0.25), ("a.d", "x", "(not set)"), ("a.f", "(not set)", True)]
    assert differences(ours, ours) == []
