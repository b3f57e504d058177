#!/usr/bin/env bash
# Create (or reuse) the virtual environment of the DeepSpeed 0.19.6 compression-library peer and print its path.
#
#   venv="$(benchmarks/peers/setup_deepspeed_compression.sh)" && "$venv/bin/python" benchmarks/peers/deepspeed_compression.py
#
# Location: $SLIMTORCH_DS_VENV if set, else ${SLIMTORCH_PEERS:-$HOME/.cache/slimtorch-peers}/deepspeed-0.19.6.
# DeepSpeed 0.19.6 is the last release that ships deepspeed.compression (init_compression, compression_scheduler).
#
# torch, transformers and venv reuse: benchmarks/peers/_venv.sh (torch first, then held by a constraints file).
# DeepSpeed is installed from its sdist with DS_BUILD_OPS=0 (no C++/CUDA op is compiled; the compression library is
# pure python) and without build isolation: the sdist has no pyproject.toml and its setup.py imports torch to record
# the torch version and accelerator it is built against, which an isolated build environment would not have.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"

DS_VERSION="0.19.6"
LOG_NAME="setup_deepspeed_compression"
VENV="${SLIMTORCH_DS_VENV:-${SLIMTORCH_PEERS:-$HOME/.cache/slimtorch-peers}/deepspeed-${DS_VERSION}}"
# the build-time helpers (setuptools, wheel) are part of the spec: they decide whether the sdist builds at all
BUILD_DEPS=("setuptools<81" wheel)
SPEC="deepspeed==${DS_VERSION} torch==${TORCH_VERSION} $(transformers_spec) ${BUILD_DEPS[*]}"

check() {  # the venv imports everything the peer script needs, at the right versions
    "$VENV/bin/python" - "$DS_VERSION" "$TORCH_VERSION" <<'PYEOF' >&2
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
PYEOF
}

reuse_if_ready
create_venv
install_torch_first
"${PIP[@]}" install -q -c "$CONSTRAINTS" "${BUILD_DEPS[@]}" >&2
DS_BUILD_OPS=0 "${PIP[@]}" install -q -c "$CONSTRAINTS" --no-build-isolation "deepspeed==${DS_VERSION}" >&2
"${PIP[@]}" install -q -c "$CONSTRAINTS" "$(transformers_spec)" >&2
finish
