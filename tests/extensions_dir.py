"""The tests', CI's and benchmarks' own ``TORCH_EXTENSIONS_DIR``.

DeepSpeed compiles its CPU shared-memory op (``deepspeed_shm_comm``) when its first engine is built on a CPU, into
``TORCH_EXTENSIONS_DIR``; unset, that is the user-wide ``~/.cache/torch_extensions``, shared by every DeepSpeed
version on the machine. Two versions side by side (the tests' 0.19.8 and the 0.19.6 of benchmarks/peers/) then
rebuilt the op in turn, and runs failed ("deepspeed_shm_comm has no attribute vector_kernel_level", a segfault).
Here each DeepSpeed, torch and Python version gets its own folder under ``~/.cache/slimtorch/torch_extensions/``
(``$XDG_CACHE_HOME`` if set), kept between runs and shared by every checkout, so the op compiles once per machine
and version. Only the standard library is imported: this runs before anything
imports DeepSpeed.
"""
from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slimtorch" / "torch_extensions"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


def own_extensions_dir() -> str:
    """Set ``TORCH_EXTENSIONS_DIR`` to ``~/.cache/slimtorch/torch_extensions/deepspeed-<version>-torch-<version>-
    py<version>`` unless the user set it; return the folder in use. Processes started later (torchrun's,
    mp.spawn's) inherit it. (torch puts the ops right in that folder: no Python or torch version below it.)"""
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    name = f"deepspeed-{_version('deepspeed')}-torch-{_version('torch')}-{python}"
    folder = CACHE / name
    return os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(folder))
