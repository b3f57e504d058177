"""What needs an accelerator, checked in a few minutes: run it when a session is lent a GPU.

    python benchmarks/gpu_check.py                 # on cuda; exits 1 if any check fails
    python benchmarks/gpu_check.py --device cpu    # the same checks on the CPU (to check this script itself)

Checks, each printed PASS/FAIL with its numbers:

1. pruning in bf16 and fp16 on the device: hands-free 2:4 snip_momentum on a seeded tiny BERT; every mask exactly 2:4
   and the pruned weights exactly 0 in the half-precision weights;
2. static QDQ quantization on the device and ONNX export from there (verified in ONNX Runtime by export_onnx);
3. the LLM pipeline with offloading: a tiny Llama kept on the CPU, compressed with GPTQ int4 and SparseGPT 2:4 on the
   device one block at a time; the blocks are back on the CPU afterwards and the result matches a CPU run;
   FP8 and int8 W8A8 (SmoothQuant + GPTQ) and AWQ the same way, then run in bfloat16 on the device;
4. the test-suite cases that skip without CUDA (pytest -k cuda selection), including DeepSpeed/accelerate fp16.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


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


def check_llm_offloading(device: str) -> str:
    import slimtorch as st
    from tests.llm.tiny_models import TINY_MODELS, random_tokens

    cfg = {"compression_inference": {
        "oneshot_pruning": {"enabled": True, "pattern": "2:4"},
        "weight_only_quantization": {"enabled": True, "group_size": 32}}}
    model = TINY_MODELS["llama"]()
    calib = [random_tokens(model.config.vocab_size, 2, 64, seed) for seed in range(8)]
    on_device = st.oneshot(model, cfg, calib, device=device, progress=False)
    assert all(p.device.type == "cpu" for p in on_device.parameters()), "a block stayed on the device"
    on_cpu = st.oneshot(model, cfg, calib, device="cpu", progress=False)
    ids = random_tokens(model.config.vocab_size, 2, 32, seed=99)
    with torch.no_grad():
        a, b = on_device(input_ids=ids).logits, on_cpu(input_ids=ids).logits
    rel = float((a - b).norm() / b.norm())
    assert rel < 0.05, rel
    return f"blocks back on cpu; logits vs a cpu run: relative difference {rel:.2e}"


def check_llm_w8a8_awq(device: str) -> str:
    """FP8 and int8 W8A8 with SmoothQuant, and AWQ, compressed on the device one block at a time; the FP8 model then
    runs in bfloat16 on the device (its float8 weights and float32 scales kept) and agrees with its float32 CPU run."""
    import slimtorch as st
    from tests.llm.tiny_models import TINY_MODELS, random_tokens

    model = TINY_MODELS["llama"]()
    calib = [random_tokens(model.config.vocab_size, 2, 64, seed) for seed in range(8)]
    ids = random_tokens(model.config.vocab_size, 2, 32, seed=98)
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
            a = half(input_ids=ids.to(device)).logits.float().cpu()
        rel = float((a - b).norm() / b.norm())
        assert rel < 0.05, (name, rel)
        details.append(f"{name} {rel:.1e}")
    return "bf16 on the device vs float32 cpu run, relative logit difference: " + ", ".join(details)


def check_cuda_tests(device: str) -> str:
    if device == "cpu":
        return "skipped on cpu"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-k", "cuda or fp16 or CUDA",
                           "tests/quantization/test_fold.py", "tests/llm", "tests/integrations/test_hf.py"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:]
    return done.stdout.strip().splitlines()[-1]


CHECKS: List[Tuple[str, Callable[[str], str]]] = [
    ("pruning bf16/fp16", check_pruning_half), ("QDQ + ONNX export", check_qdq_export),
    ("LLM offloading", check_llm_offloading), ("LLM W8A8/FP8/AWQ", check_llm_w8a8_awq),
    ("CUDA test cases", check_cuda_tests)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu to check the script itself")
        return 2
    failed = 0
    for name, check in CHECKS:
        start = time.perf_counter()
        try:
            status, detail = "PASS", check(args.device)
        except Exception as e:  # report every check, then fail
            status, detail, failed = "FAIL", f"{type(e).__name__}: {e}", failed + 1
        print(f"{status}  {name:<18} {time.perf_counter() - start:6.1f} s  {detail}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
