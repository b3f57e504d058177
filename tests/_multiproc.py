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
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import pytest
import torch
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
    _join(ctx, timeout, fn.__name__)
    return tmp_path


def _join(ctx, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{what} did not finish in {timeout:.0f} s (a rank waits in a collective?)")


def _cases_entry(rank: int, cases: Sequence[tuple], root: str) -> None:
    seed = torch.initial_seed()  # a fresh process's; every case starts from it, as if it had the process alone
    for name, fn, args in cases:
        out_dir = Path(root) / name
        torch.manual_seed(seed)
        started = time.perf_counter()
        try:
            fn(rank, WORLD, str(out_dir / "init"), str(out_dir), *args)
        except BaseException:  # noqa: BLE001  (recorded for that case's test; the next case still runs)
            (out_dir / f"rank{rank}.error").write_text(traceback.format_exc())
        # each case's wall time, for whoever weighs the suite's time: SLIMTORCH_CASE_TIMES names a file to append to
        if rank == 0 and os.environ.get("SLIMTORCH_CASE_TIMES"):
            with open(os.environ["SLIMTORCH_CASE_TIMES"], "a") as log:
                log.write(f"{time.perf_counter() - started:7.2f} s  {name}\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_cases(cases: Mapping[str, tuple], tmp_path: Path, timeout: float = 300.0) -> Dict[str, Path]:
    """Run several cases in one launch of WORLD processes, one after another: ``cases`` maps a name to
    ``(fn, *args)``, run as ``fn(rank, WORLD, init_file, case_dir, *args)`` with its own directory and process group.

    Starting the ranks (imports of torch, slimtorch, DeepSpeed, transformers) costs more than most cases, so a module
    launches once and each test asserts on its own case's directory, through :func:`case_dir`. A case that raises on a
    rank leaves the traceback in ``rank<r>.error`` there and the ranks go on with the next case (a rank left waiting
    in a collective meets gloo's timeout first). ``timeout`` is per case: a hang fails after ``timeout`` times the
    number of cases."""
    for name in cases:
        (tmp_path / name).mkdir(parents=True, exist_ok=True)  # the caller may have put a case's inputs there
    listed = [(name, spec[0], tuple(spec[1:])) for name, spec in cases.items()]
    ctx = mp.spawn(_cases_entry, args=(listed, str(tmp_path)), nprocs=WORLD, join=False)
    _join(ctx, timeout * len(cases), f"cases {list(cases)}")
    return {name: tmp_path / name for name in cases}


def case_dir(dirs: Mapping[str, Path], name: str) -> Path:
    """The directory of case ``name`` of :func:`spawn_cases`; fails the calling test with the case's tracebacks."""
    errors = sorted(dirs[name].glob("rank*.error"))
    if errors:
        pytest.fail(f"case {name} raised:\n" + "\n".join(f"{e.stem}: {e.read_text()}" for e in errors),
                    pytrace=False)
    return dirs[name]


def torchrun(script: Path, *args: str, timeout: float = 300.0,
             env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node WORLD script args``, as users launch it; returns the finished run."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(WORLD), str(_EXIT_AFTER), str(script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, **(env or {})))
