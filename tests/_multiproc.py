"""Launching the multi-process tests: ranks spawned by the test itself, or scripts run under torchrun.

Every rank leaves through ``os._exit`` once its work is done and written: gloo can abort a process during
interpreter teardown ("terminate called without an active exception", SIGABRT) even after a clean
``destroy_process_group()``. That failed two CI runs in about a hundred launches, after all results were on disk;
skipping the teardown removes it. A rank that raises still exits non-zero with its traceback.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import pytest
import torch.multiprocessing as mp

WORLD = 2
ROOT = Path(__file__).resolve().parents[1]
_EXIT_AFTER = Path(__file__).resolve().parent / "_exit_after.py"


def _rank_entry(rank: int, fn: Callable[..., None], *args: Any) -> None:
    fn(rank, *args)  # an exception propagates: mp.spawn reports it and the rank exits 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn: Callable[..., None], tmp_path: Path, *args: Any, timeout: float = 300.0) -> Path:
    """Run ``fn(rank, WORLD, init_file, out_dir, *args)`` on WORLD processes; a hang fails after ``timeout`` s."""
    ctx = mp.spawn(_rank_entry, args=(fn, WORLD, str(tmp_path / "init"), str(tmp_path), *args), nprocs=WORLD,
                   join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{fn.__name__} did not finish in {timeout:.0f} s (a rank waits in a collective?)")
    return tmp_path


def torchrun(script: Path, *args: str, timeout: float = 300.0,
             env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node WORLD script args``, as users launch it; returns the finished run."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(WORLD), str(_EXIT_AFTER), str(script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, **(env or {})))
