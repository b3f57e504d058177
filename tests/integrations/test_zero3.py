"""slimtorch.deepspeed.initialize under DeepSpeed ZeRO stage 3 (parameters partitioned): 2 CPU ranks, gloo."""
from __future__ import annotations

import pytest
import torch

from tests._multiproc import WORLD, case_dir, spawn_cases
from tests.distributed import _fsdp_workers as F

pytest.importorskip("deepspeed")

from tests.integrations import _zero3_workers as Z  # noqa: E402  (needs DeepSpeed)

TRAIN = [  # arch, pattern, persistence, scope, offload
    # DeepSpeed's default persistence: every tiny-Llama parameter stays whole between forwards
    ("llama", "2:4", 100000, "local", False),
    ("llama", "4x1", 0, "local", False),       # every parameter partitioned
    ("llama", "4x1", 0, "global", False),      # one ranking across the layers, from units gathered layer by layer
    ("llama", "2:4", 0, "local", True),        # fp32 masters and optimizer state offloaded to host memory
    ("minilm", "2:4", 100000, "local", False),
]


def _train_case(arch, pattern, persistence, scope, offload):
    return f"train-{arch}-{pattern.replace(':', 'to')}-{persistence}-{scope}-{offload}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every 2-rank case in one launch (each test asserts on its own case's directory)."""
    cases = {_train_case(*c): (Z.train, c[0], c[1], True, *c[2:]) for c in TRAIN}
    cases.update({"split_batches": (Z.train, "llama", "2:4", False, 0),
                  "resume": (Z.resume, 3),
                  **{f"memory-{scope}": (Z.memory, F.MEMORY_LAYERS, scope) for scope in ("local", "global")},
                  "refusals": (Z.refusals,),
                  "zero_init": (Z.zero_init,)})
    return spawn_cases(cases, tmp_path_factory.mktemp("zero3"), timeout=600)


def _ranks(tmp_path):
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.slow  # every case reads a multi-process launch (see tests/conftest.py)
@pytest.mark.parametrize("arch,pattern,persistence,scope,offload", TRAIN)
def test_zero3_masks_match_one_process_and_checkpoints_hold_the_zeros(arch, pattern, persistence, scope, offload,
                                                                       runs):
    """Every rank on the whole global batch: whole masks after every update equal on both ranks and one process's;
    each rank keeps its slice; the engine's 16-bit model and zero_to_fp32's consolidation hold exactly the zeros.

    The tiny Llama's masks are bitwise one process's. The engine's arithmetic is not exactly one process's: the loss
    and the last layers' gradients are bitwise equal, but attention's gradients differ in the last bits (about 3e-7
    relative, measured on the tiny Llama), so on all-MiniLM-L6-v2 near-ties flip in 2:4: 84 of 10.6 million mask
    entries after 8 updates (24,174 with DeepSpeed's memory_efficient_linear on, whose Linear rounds differently;
    the workers turn it off); its 4x1 masks, measured once, came out bitwise (4x1 runs on the tiny Llama here). The
    weights both runs keep agree within rtol 1e-5."""
    tmp_path = case_dir(runs, _train_case(arch, pattern, persistence, scope, offload))
    ranks = _ranks(tmp_path)
    one, weights = F.one_process(arch, pattern, scope)
    differing, total = F.masks_against_one_process(ranks[0]["steps"], ranks[1]["steps"], one)
    if arch == "llama":
        assert differing == 0
    assert differing <= 1e-4 * total, (differing, total)
    for name, (local, whole) in ranks[0]["local"].items():
        assert local == -(-whole // WORLD), name  # a rank holds its flat slice of each mask
    assert all(valid for _, p, _, valid in ranks[0]["report"] if p is not None)
    final = ranks[0]["steps"][-1]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    for saved in (torch.load(tmp_path / "16bit" / "model.bin", weights_only=True),
                  get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "ckpt"), tag="end")):
        for layer, mask in final.items():
            assert torch.equal(saved[f"{layer}.weight"] != 0, mask), layer  # zeros exactly where pruned
        for key, value in weights.items():
            if key in saved:
                kept = (saved[key] != 0) & (value != 0)  # the entries both runs keep
                torch.testing.assert_close(saved[key].float()[kept], value[kept], rtol=1e-5, atol=1e-5)


def test_zero3_with_split_batches_keeps_the_ranks_identical(runs):
    """Each rank on its half of the global batch: ZeRO-3 averages the halves' gradients, which is not one process's
    arithmetic, so masks are equal across ranks after every update and nearly one process's (near-ties)."""
    ranks = _ranks(case_dir(runs, "split_batches"))
    one, _ = F.one_process("llama", "2:4")
    differing, total = F.masks_against_one_process(ranks[0]["steps"], ranks[1]["steps"], one)
    assert differing <= 1e-3 * total, (differing, total)
    assert all(valid for _, p, _, valid in ranks[0]["report"] if p is not None)
    print(f"split batches: {differing} of {total} mask entries differ from one process over {len(one)} updates")


def test_zero3_resumes_bitwise_from_the_engines_checkpoint(runs):
    """engine.save_checkpoint after 3 updates (mid-schedule: masks are recomputed at 0, 2, 4 and 6) writes each
    rank's part of the pruning state beside ZeRO's partitions; a fresh engine that loads the checkpoint continues
    bitwise as the uninterrupted run."""
    tmp_path = case_dir(runs, "resume")
    for rank in range(WORLD):
        run = torch.load(tmp_path / f"rank{rank}.pt")
        straight, resumed = run["straight"], run["resumed"]
        assert run["rank_file"]
        assert straight["masks"] and straight["masks"].keys() == resumed["masks"].keys()
        for name, mask in straight["masks"].items():
            assert torch.equal(mask, resumed["masks"][name]), (rank, name)
        if rank == 0:
            for name, mask in straight["masks"].items():
                assert torch.equal(straight["weights"][f"{name}.weight"] != 0, mask), name
            for key, value in straight["weights"].items():
                assert torch.equal(value, resumed["weights"][key]), key


@pytest.mark.parametrize("scope", ["local", "global"])
def test_a_zero3_mask_update_holds_one_layer_whole_at_a_time(runs, scope):
    """Beside its partition, a rank holds during a mask update the whole weight and scores of one layer at a time,
    never more: counted on every whole tensor the ZeRO-3 access gathers, on a tiny Llama of F.MEMORY_LAYERS layers
    (global scope: units of every layer, whole tensors of one), and while the pruning state of a checkpoint is
    gathered."""
    F.check_one_layer_whole(case_dir(runs, f"memory-{scope}"), WORLD, F.MEMORY_LAYERS)


def test_what_zero3_cannot_serve_is_refused_on_every_rank(runs):
    tmp_path = case_dir(runs, "refusals")
    for rank in range(WORLD):
        topk, plain, mismatched = (tmp_path / f"rank{rank}.txt").read_text().split("\n")
        assert topk.startswith("UnsupportedModelError: compression_training.row_pruning.different_groups.rp1: "
                               "method topk"), topk
        assert plain.startswith("UnsupportedModelError: prepare_pruning: parameter "), plain
        assert "slimtorch.deepspeed.initialize" in plain, plain
        # caught before the engine is built, each differing setting named with its values
        assert mismatched.startswith(
            "DistributedError: slimtorch.deepspeed.initialize: the compression config differs between rank 0 and "
            "rank 1: compression_training.sparse_pruning.shared_parameters.pattern: '2:4' on rank 0, '4x1' on rank 1; "
            "compression_training.sparse_pruning.shared_parameters.dense_ratio: 0.5 on rank 0, 0.25 on rank 1."
        ), mismatched


def test_a_model_built_under_zero_init_is_planned_and_ranked_on_its_whole_weights(runs):
    """A model partitioned before slimtorch sees it (deepspeed.zero.Init): layers are planned from the real shapes,
    DeepSpeed's l1 ranks the whole (gathered) weights before the engine exists, and the zeros reach the 16-bit model."""
    from tests.reference.protocol import ceil_top_k

    tmp_path = case_dir(runs, "zero_init")
    ranks = _ranks(tmp_path)
    assert ranks[0]["partitioned"]
    saved = torch.load(tmp_path / "16bit" / "model.bin", weights_only=True)
    assert sorted(ranks[0]["masks"]) == [f"model.layers.{i}.mlp.up_proj" for i in range(4)]
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][name]), name
        assert torch.equal(mask, ceil_top_k(ranks[0]["start"][f"{name}.weight"], 0.5)), name
        assert torch.equal(saved[f"{name}.weight"] != 0, mask), name
