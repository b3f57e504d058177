"""What needs an accelerator, checked in a few minutes: run it when a session is lent a GPU.

    python benchmarks/gpu_check.py                 # on cuda; exits 1 if any check fails
    python benchmarks/gpu_check.py --device cpu    # the same checks on the CPU (to check this script itself)

Checks, each printed PASS/FAIL with its numbers:

1. pruning in bf16 and fp16 on the device: hands-free 2:4 snip_momentum on a seeded tiny BERT; every mask exactly 2:4
   and the pruned weights exactly 0 in the half-precision weights; the same through DeepSpeed's ZeRO-2/3 fp16 and bf16
   engines (one process, nccl), with the zeros in DeepSpeed's fp32 master copy too;
2. static QDQ quantization on the device and ONNX export from there (verified in ONNX Runtime by export_onnx);
3. the LLM pipeline with offloading: a tiny Llama kept on the CPU, compressed with GPTQ int4 and SparseGPT 2:4 on the
   device one block at a time; the blocks are back on the CPU afterwards and the result matches a CPU run;
   FP8 and int8 W8A8 (SmoothQuant + GPTQ) and AWQ the same way, then run in bfloat16 on the device;
4. slim() of a masked tiny BERT and tiny Llama on the device, outputs equal to the masked model's; DeepSpeed's
   row_pruning and head_pruning with topk (scores trained in bf16 on the device), finalized and slimmed there;
5. the transformers Trainer with FSDP2 (accelerate shards only on accelerators): one torchrun process, pruned through
   FSDP2's access;
6. the test-suite cases that skip without CUDA (pytest -k cuda selection), including DeepSpeed/accelerate fp16.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, List, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.extensions_dir import own_extensions_dir  # noqa: E402

own_extensions_dir()  # DeepSpeed's CPU op compiles into a folder of its own version (tests/extensions_dir.py)


def check_pruning_half(device: str) -> str:
    import slimtorch as st
    from tests.reference.protocol import batches, tiny_bert

    cfg = {"compression_training": {"sparse_pruning": {"shared_parameters": {
        "enabled": True, "method": "snip_momentum", "pattern": "2:4", "scope": "local", "schedule_offset": 0,
        "schedule_offset_end": 4, "frequency": 1}}}}
    results = []
    for dtype in (torch.bfloat16, torch.float16):
        if device == "cpu" and dtype == torch.float16:
            continue  # fp16 matmuls are slow or missing on some CPUs; the device run covers it
        model = tiny_bert().to(device=device, dtype=dtype)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        cb = st.prepare_pruning(model, cfg, optimizer=opt)
        for batch in batches(steps=6):
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss.float()
            opt.zero_grad()
            loss.backward()
            opt.step()
        cb.finalize()
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and "classifier" not in name:
                groups = (m.weight.reshape(m.weight.shape[0], -1, 4) != 0).sum(-1)
                assert bool((groups <= 2).all()), f"{dtype} {name}: not 2:4"
        results.append(str(dtype).replace("torch.", ""))
    return f"2:4 exact in {', '.join(results)}"


def check_deepspeed_half(device: str) -> str:
    """slimtorch.deepspeed.initialize under ZeRO-2 and ZeRO-3 fp16 and bf16 engines (one process): hands-free 2:4
    snip_momentum on the digits CNN; every mask exactly 2:4, and the pruned weights exactly 0 both in the half-precision
    module and in DeepSpeed's fp32 master copy."""
    if device == "cpu":
        return "skipped on cpu (DeepSpeed's fp16/bf16 engine under test here runs on CUDA; the CPU suite covers gloo)"
    import os

    import deepspeed

    import slimtorch as st
    from tests.distributed import _workers as W

    rendezvous = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    saved = {k: os.environ.get(k) for k in rendezvous}
    os.environ.update(rendezvous)
    deepspeed.init_distributed(dist_backend="nccl")
    try:
        return _deepspeed_half_runs(W, st)
    finally:  # the test cases run later start their own process groups
        torch.distributed.destroy_process_group()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _deepspeed_half_runs(W, st) -> str:
    from deepspeed.utils import safe_get_full_fp32_param
    from torch import nn

    from slimtorch.pruning.access import whole

    x, y = W.digits_tensors()
    details = []
    for stage, half in ((2, "fp16"), (2, "bf16"), (3, "fp16"), (3, "bf16")):
        model = W.digits_cnn()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        config = {"train_micro_batch_size_per_gpu": W.GLOBAL_BATCH, "zero_optimization": {"stage": stage},
                  half: {"enabled": True}, "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 6,
                  **W.config()}
        engine, _, _, _, cb = st.deepspeed.initialize(model=model, optimizer=opt, config=config,
                                                      dist_init_required=False, hands_free=True)
        dtype = torch.float16 if half == "fp16" else torch.bfloat16
        for step in range(W.UPDATES):
            xb = x[step * W.GLOBAL_BATCH:(step + 1) * W.GLOBAL_BATCH].to(engine.device, dtype)
            yb = y[step * W.GLOBAL_BATCH:(step + 1) * W.GLOBAL_BATCH].to(engine.device)
            engine.backward(nn.functional.cross_entropy(engine(xb).float(), yb))
            engine.step()
        zeros = 0
        for layer in cb.pruner.layers:
            weight = whole(engine.module.get_submodule(layer.name).weight)  # ZeRO-3: gathered
            # 2:4 runs along the input channels (for a conv: at each kernel position)
            per_input = weight.transpose(0, 1).reshape(weight.shape[1], -1).t() if weight.dim() == 4 else weight
            groups = (per_input.reshape(weight.shape[0] if weight.dim() == 2 else per_input.shape[0], -1, 4) != 0)
            assert bool((groups.sum(-1) <= 2).all()), f"{half} {layer.name}: not 2:4"
            pruned = layer.full_mask().to(weight.device).reshape(weight.shape) == 0
            master = safe_get_full_fp32_param(engine.module.get_submodule(layer.name).weight)
            assert bool((weight[pruned] == 0).all()), f"{half} {layer.name}: pruned weights are not 0"
            assert master is not None and bool((master.reshape(weight.shape)[pruned.to(master.device)] == 0).all()), (
                f"{half} {layer.name}: the fp32 master copy lost pruned zeros")
            zeros += int(pruned.sum())
        details.append(f"ZeRO-{stage} {half} {zeros} zeros in module and master")
    return "2:4 exact; " + ", ".join(details)


def check_qdq_export(device: str) -> str:
    import tempfile

    from torch import nn

    import slimtorch as st

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 10)).to(device).eval()
    calib = [torch.randn(32, 64, device=device) for _ in range(4)]
    q = st.quantize(model, {"compression_inference": {"static_quantization": {"enabled": True}}},
                    calib_dataloader=calib, progress=False)
    x = torch.randn(8, 64, device=device)
    with torch.no_grad():
        err = float((q(x) - model(x)).norm() / model(x).norm())
    with tempfile.TemporaryDirectory() as tmp:
        st.export_onnx(q, x, Path(tmp) / "q.onnx")  # raises unless ONNX Runtime agrees
    assert err < 0.05, err
    return f"relative error {err:.4f}, exported and verified"


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm())


def _as_good(name: str, on_device: float, on_cpu: float, slack: float) -> None:
    """The device's compression is as faithful to the float model as the CPU's: GPTQ, SparseGPT and AWQ make
    discrete choices (rounding, which 2 of 4, the scale grid) that float differences between devices flip, so the
    two compressed models differ; the error each makes against the float model must not."""
    assert on_device <= on_cpu * (1 + slack) + 0.005, (
        f"{name}: relative logit error vs float {on_device:.4f} on the device, {on_cpu:.4f} on the cpu")


def check_llm_offloading(device: str) -> str:
    """SparseGPT 2:4 + GPTQ int4 with the model on the CPU and each block compressed on the device: the blocks come
    back to the CPU, and the result is as close to the float model as a CPU run's."""
    import slimtorch as st
    from tests.llm.tiny_models import TINY_MODELS, random_tokens

    cfg = {"compression_inference": {
        "oneshot_pruning": {"enabled": True, "pattern": "2:4"},
        "weight_only_quantization": {"enabled": True, "group_size": 32}}}
    model = TINY_MODELS["llama"]()
    calib = [random_tokens(model.config.vocab_size, 2, 64, seed) for seed in range(8)]
    on_device = st.oneshot(model, cfg, calib, device=device, progress=False)
    assert all(t.device.type == "cpu" for t in list(on_device.parameters()) + list(on_device.buffers())), (
        "a block stayed on the device")
    on_cpu = st.oneshot(model, cfg, calib, device="cpu", progress=False)
    ids = random_tokens(model.config.vocab_size, 2, 32, seed=99)
    with torch.no_grad():
        ref, a, b = (m(input_ids=ids).logits for m in (model, on_device, on_cpu))
    _as_good("2:4 + int4", _relative(a, ref), _relative(b, ref), slack=0.15)
    return (f"blocks back on cpu; vs float: {_relative(a, ref):.4f} compressed on the device, {_relative(b, ref):.4f} "
            f"on the cpu (the two differ by {_relative(a, b):.4f})")


def check_llm_w8a8_awq(device: str) -> str:
    """FP8 and int8 W8A8 with SmoothQuant, and AWQ, compressed on the device one block at a time; each model then
    runs in bfloat16 on the device (its 8-bit weights and float32 scales kept) and is as close to the float model
    as its float32 CPU run."""
    import slimtorch as st
    from tests.llm.tiny_models import TINY_MODELS, random_tokens

    model = TINY_MODELS["llama"]()
    calib = [random_tokens(model.config.vocab_size, 2, 64, seed) for seed in range(8)]
    ids = random_tokens(model.config.vocab_size, 2, 32, seed=98)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    details = []
    for name, section in (
            ("fp8", {"w8a8_quantization": {"enabled": True, "format": "fp8_e4m3", "algorithm": "rtn"}}),
            ("int8 sq+gptq", {"w8a8_quantization": {"enabled": True, "smoothquant": {"enabled": True}}}),
            ("awq", {"weight_only_quantization": {"enabled": True, "group_size": 32, "awq": {"enabled": True}}})):
        cfg = {"compression_inference": section}
        on_device = st.oneshot(model, cfg, calib, device=device, progress=False)
        on_cpu = st.oneshot(model, cfg, calib, device="cpu", progress=False)
        with torch.no_grad():
            b = on_cpu(input_ids=ids).logits
            half = on_device.to(device=device, dtype=torch.bfloat16)
            a = half(input_ids=ids.to(device)).logits
        _as_good(name, _relative(a, ref), _relative(b, ref), slack=0.25)  # bf16 inference adds its own rounding
        details.append(f"{name} {_relative(a, ref):.4f} / {_relative(b, ref):.4f}")
    return "vs float, bf16 on the device / float32 cpu run: " + ", ".join(details)


def check_slim(device: str) -> str:
    """slim() of a masked tiny BERT (half its FFN units and one head per layer) and of a masked tiny Llama (a key/value
    group) on the device: traced, narrowed and checked there; outputs equal the masked model's."""
    import slimtorch as st
    from tests.llm.tiny_models import TINY_MODELS, random_tokens
    from tests.reference.protocol import SEQ, VOCAB, tiny_bert

    bert = tiny_bert().eval()
    with torch.no_grad():
        for layer in bert.bert.encoder.layer:
            layer.output.dense.weight[:, ::2] = 0
            layer.attention.output.dense.weight[:, 16:32] = 0
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    bert = bert.to(device)
    small = st.slim(bert, {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)})
    llama = TINY_MODELS["llama"]().eval()
    with torch.no_grad():
        for layer in llama.model.layers:
            layer.self_attn.o_proj.weight[:, 64:] = 0
    llama = llama.to(device)
    tokens = random_tokens(llama.config.vocab_size, 2, 10, 0).to(device)
    small_llama = st.slim(llama, {"input_ids": tokens, "use_cache": False})
    diffs = [st.slim_report(m).max_relative_difference for m in (small, small_llama)]
    assert all(d <= 1e-5 for d in diffs), diffs
    assert small.bert.encoder.layer[0].intermediate.dense.weight.device.type == torch.device(device).type
    return (f"BERT {st.slim_report(small).macs_after / st.slim_report(small).macs_before:.2f}x MACs, Llama GQA group "
            f"cut; max relative difference {max(diffs):.1e}")


def check_structured_topk(device: str) -> str:
    """DeepSpeed's row and head pruning with topk on a bf16 tiny BERT on the device: the scores train (in bf16, as
    DeepSpeed's would under a bf16 engine), the unit counts are ceil(dense_ratio * n), finalize() leaves the
    outputs as they were, and slim() on the device cuts the units."""
    import slimtorch as st
    from tests.reference.protocol import batches, tiny_bert

    cfg = {"compression_training": {
        "row_pruning": {"shared_parameters": {"enabled": True, "method": "topk", "schedule_offset": 1},
                        "different_groups": {"rp1": {"params": {"dense_ratio": 0.5},
                                                     "modules": ["intermediate.dense"]}}},
        "head_pruning": {"shared_parameters": {"enabled": True, "method": "topk", "schedule_offset": 1,
                                               "num_heads": 4},
                         "different_groups": {"hp1": {"params": {"dense_ratio": 0.5},
                                                      "modules": ["attention.output.dense"]}}}}}
    torch.manual_seed(0)
    model = tiny_bert().to(device=device, dtype=torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    cb = st.prepare_pruning(model, cfg, optimizer=opt)
    first = {l.name: l.learned.scores.detach().clone() for l in cb.pruner.layers}
    data = [{k: v.to(device) for k, v in b.items()} for b in batches(steps=6)]
    for batch in data:
        loss = model(**batch).loss.float()
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = sum(not torch.equal(first[l.name], l.learned.scores.detach()) for l in cb.pruner.layers)
    assert moved == len(first), f"only {moved} of {len(first)} score tensors trained"
    assert all(int(l.learned.keep().sum()) == l.learned.units // 2 for l in cb.pruner.layers)
    model.eval()
    inputs = {k: v for k, v in data[0].items() if k != "labels"}
    with torch.no_grad():
        before = model(**inputs).logits
        cb.finalize()
        after = model(**inputs).logits
    assert torch.equal(before, after), "finalize() changed the outputs"
    small = st.slim(model.float(), inputs, measure_latency=False)
    layer = small.bert.encoder.layer[0]
    assert layer.intermediate.dense.out_features == 64 and layer.attention.self.num_attention_heads == 2
    return (f"scores trained in bf16 on {device}; finalize exact; slim: max relative difference "
            f"{st.slim_report(small).max_relative_difference:.1e}")


TRAINER_FSDP2 = """
import os, sys, torch
sys.path[:0] = [{root!r}]
from slimtorch.pruning.access import whole
from tests.integrations.test_hf import make_trainer, tiny_bert, prune_config, PruningCallback
model = tiny_bert()
cb = PruningCallback(prune_config(start_step=2, end_step=8, frequency=2), finalize_at_end=False)
trainer = make_trainer(model, {out!r}, [cb], max_steps=10, per_device_train_batch_size=8, use_cpu=False,
                       fsdp="full_shard", fsdp_config={{"version": 2,
                                                        "transformer_layer_cls_to_wrap": ["BertLayer"]}})
trainer.train()
access = type(cb.callbacks.pruner.access).__name__
assert access == "FSDP2Access", access
for layer in cb.callbacks.pruner.layers:
    mask, weight = layer.full_mask(), whole(layer.weight)  # collectives
    assert bool(mask.reshape(mask.shape[0], -1, 4).sum(-1).eq(2).all()), layer.name
    assert bool(weight[~mask.to(weight.device)].eq(0).all()), layer.name
print("TRAINER_FSDP2_OK", len(cb.callbacks.pruner.layers), cb.step)
torch.distributed.destroy_process_group()
"""


def check_trainer_fsdp2(device: str) -> str:
    """The transformers Trainer with FSDP2 (accelerate shards the model with fully_shard; it does so only on
    accelerators, so the CPU suite cannot run it): one torchrun process on the device, the PruningCallback prunes
    through FSDP2's access, every mask 2:4 and the pruned weights 0."""
    if device == "cpu":
        return "skipped on cpu (accelerate enables FSDP only on accelerators)"
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        script = Path(out) / "trainer_fsdp2.py"
        script.write_text(TRAINER_FSDP2.format(root=str(ROOT), out=out))
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               "1", str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env=dict(__import__("os").environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 0 and "TRAINER_FSDP2_OK" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def check_cuda_tests(device: str) -> str:
    if device == "cpu":
        return "skipped on cpu"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-k", "cuda or fp16 or CUDA",
                           "tests/quantization/test_fold.py", "tests/llm", "tests/integrations/test_hf.py"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout.strip().splitlines()[-1]


CHECKS: List[Tuple[str, Callable[[str], str]]] = [
    ("pruning bf16/fp16", check_pruning_half), ("DeepSpeed fp16/bf16", check_deepspeed_half),
    ("QDQ + ONNX export", check_qdq_export),
    ("LLM offloading", check_llm_offloading), ("LLM W8A8/FP8/AWQ", check_llm_w8a8_awq), ("slim", check_slim),
    ("row/head topk", check_structured_topk), ("Trainer + FSDP2", check_trainer_fsdp2),
    ("CUDA test cases", check_cuda_tests)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--only", nargs="+", choices=[name for name, _ in CHECKS], help="run only these checks")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu to check the script itself")
        return 2
    failed = 0
    for name, check in [(n, c) for n, c in CHECKS if not args.only or n in args.only]:
        start = time.perf_counter()
        try:
            status, detail = "PASS", check(args.device)
        except Exception as e:  # report every check, then fail
            status, detail, failed = "FAIL", f"{type(e).__name__}: {e}", failed + 1
            traceback.print_exc()
        print(f"{status}  {name:<18} {time.perf_counter() - start:6.1f} s  {detail}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
