# Shared steps of the peers' virtual environments; sourced by setup_inc.sh and setup_deepspeed_compression.sh.
#
# Each setup script sets LOG_NAME, VENV, SPEC and defines check() (its import check), then calls
#   reuse_if_ready        prints the venv path and exits when a marker of the same SPEC and check() pass
#   create_venv           (re)creates the venv and sets PIP
#   install_torch_first   torch==$TORCH_VERSION first, then held by $CONSTRAINTS for every later pip call, so that
#                         nothing can swap it for another build (an unpinned torch on Linux pulls a CUDA build)
#   finish                runs check(), writes the marker, prints the venv path
# transformers_spec prints transformers pinned to the calling python's version ($PYTHON, default python3) when it
# has one, so both sides of a benchmark run the same model code; SLIMTORCH_TRANSFORMERS_SPEC overrides it.
# Where pip's configuration has a local CPU wheel (find-links) that one is taken; elsewhere set
# SLIMTORCH_TORCH_INDEX=https://download.pytorch.org/whl/cpu. Progress goes to stderr, only the path to stdout.

PY="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"

log() { echo "[${LOG_NAME}] $*" >&2; }

transformers_spec() {
    if [[ -n "${SLIMTORCH_TRANSFORMERS_SPEC:-}" ]]; then
        echo "$SLIMTORCH_TRANSFORMERS_SPEC"
        return
    fi
    local caller_tf
    caller_tf="$("$PY" -c 'import transformers; print(transformers.__version__)' 2>/dev/null || true)"
    if [[ -n "$caller_tf" ]]; then echo "transformers==${caller_tf}"; else echo "transformers"; fi
}

reuse_if_ready() {
    MARKER="$VENV/.slimtorch-ready"
    if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$SPEC" ]] && check; then
        log "reusing $VENV"
        echo "$VENV"
        exit 0
    fi
}

create_venv() {
    log "building $VENV ($SPEC)"
    mkdir -p "$(dirname "$VENV")"
    rm -f "$MARKER"
    if [[ ! -x "$VENV/bin/python" ]]; then
        "$PY" -m venv "$VENV"
    fi
    PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
}

install_torch_first() {
    local torch_args=() installed cuda
    if [[ -n "${SLIMTORCH_TORCH_INDEX:-}" ]]; then
        torch_args=(--index-url "$SLIMTORCH_TORCH_INDEX")
    fi
    "${PIP[@]}" install -q ${torch_args[@]+"${torch_args[@]}"} "torch==${TORCH_VERSION}" >&2
    installed="$("$VENV/bin/python" -W ignore -c 'import torch; print(torch.__version__)')"
    cuda="$("$VENV/bin/python" -W ignore -c 'import torch; print(torch.version.cuda or "")')"
    if [[ -n "$cuda" ]]; then
        log "WARNING: torch $installed is a CUDA build (CUDA $cuda); set SLIMTORCH_TORCH_INDEX for the CPU one"
    fi
    CONSTRAINTS="$VENV/slimtorch-constraints.txt"
    echo "torch==${installed}" > "$CONSTRAINTS"
}

finish() {
    check
    echo "$SPEC" > "$MARKER"
    log "ready: $VENV"
    echo "$VENV"
}
