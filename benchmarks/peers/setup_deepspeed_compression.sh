#!/usr/bin/env bash
# Create (or reuse) the virtual environment of the DeepSpeed 0.19.6 compression-library peer and print its path.
#
#   venv="$(benchmarks/peers/setup_deepspeed_compression.sh)" && "$venv/bin/python" benchmarks/peers/deepspeed_compression.py
#
# Location: $SLIMTORCH_DS_VENV if set, else ${SLIMTORCH_PEERS:-$HOME/.cache/slimtorch-peers}/deepspeed-0.19.6.
# DeepSpeed 0.19.6 is the last release that ships deepspeed.compression (init_compression, compression_scheduler).
#
# Order matters: torch==2.13.0 is installed FIRST and then held by a constraint file for every later pip call, so
# nothing can swap it for another build (an unpinned `pip install torch` on Linux pulls a multi-GB CUDA build).
# Where pip's configuration has a local CPU wheel (find-links), that one is taken; elsewhere set
# SLIMTORCH_TORCH_INDEX=https://download.pytorch.org/whl/cpu to get the CPU build.
# DeepSpeed is installed from its sdist with DS_BUILD_OPS=0 (no C++/CUDA op is compiled; the compression library is
# pure python) and without build isolation: the sdist has no pyproject.toml and its setup.py imports torch to record
# the torch version and accelerator it is built against, which an isolated build environment would not have.
# transformers is pinned to the version of the calling environment's python ($PYTHON, default python3) when it
# has one, so that both sides of the benchmark run the same model code; override with SLIMTORCH_TRANSFORMERS_SPEC.
#
# Progress goes to stderr; stdout carries only the venv path. Reuse is decided by a marker file written after a
# successful install and an import check, so an interrupted install is redone, not trusted.
set -euo pipefail

DS_VERSION="0.19.6"
TORCH_VERSION="2.13.0"
PY="${PYTHON:-python3}"
VENV="${SLIMTORCH_DS_VENV:-${SLIMTORCH_PEERS:-$HOME/.cache/slimtorch-peers}/deepspeed-${DS_VERSION}}"

log() { echo "[setup_deepspeed_compression] $*" >&2; }

if [[ -z "${SLIMTORCH_TRANSFORMERS_SPEC:-}" ]]; then
    caller_tf="$("$PY" -c 'import transformers; print(transformers.__version__)' 2>/dev/null || true)"
    if [[ -n "$caller_tf" ]]; then
        SLIMTORCH_TRANSFORMERS_SPEC="transformers==${caller_tf}"
    else
        SLIMTORCH_TRANSFORMERS_SPEC="transformers"
    fi
fi
# the build-time helpers (setuptools, wheel) are part of the spec: they decide whether the sdist builds at all
BUILD_DEPS=("setuptools<81" wheel)
SPEC="deepspeed==${DS_VERSION} torch==${TORCH_VERSION} ${SLIMTORCH_TRANSFORMERS_SPEC} ${BUILD_DEPS[*]}"
MARKER="$VENV/.slimtorch-ready"

check() {  # the venv imports everything the peer script needs, at the right versions
    "$VENV/bin/python" - "$DS_VERSION" "$TORCH_VERSION" <<'EOF' >&2
import sys, warnings
warnings.filterwarnings("ignore")
import torch, transformers, deepspeed
from deepspeed.compression.compress import init_compression  # noqa: F401
from deepspeed.compression.scheduler import compression_scheduler  # noqa: F401
from deepspeed.compression.config import get_compression_config  # noqa: F401
from deepspeed.compression.basic_layer import LinearLayer_Compress  # noqa: F401
assert deepspeed.__version__.split("+")[0] == sys.argv[1], deepspeed.__version__
assert torch.__version__.split("+")[0] == sys.argv[2], torch.__version__
print(f"[setup_deepspeed_compression] ok: deepspeed {deepspeed.__version__}, torch {torch.__version__}, "
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
"${PIP[@]}" install -q -c "$constraints" "${BUILD_DEPS[@]}" >&2
DS_BUILD_OPS=0 "${PIP[@]}" install -q -c "$constraints" --no-build-isolation "deepspeed==${DS_VERSION}" >&2
"${PIP[@]}" install -q -c "$constraints" "$SLIMTORCH_TRANSFORMERS_SPEC" >&2

check
echo "$SPEC" > "$MARKER"
log "ready: $VENV"
echo "$VENV"
