"""Whether this CPU's int8 dot products saturate in ONNX Runtime's fused uint8 x int8 kernels.

x86 CPUs with AVX2 or AVX-512 but without VNNI multiply uint8 by int8 with ``vpmaddubsw``, which adds two products
into an int16 with saturation: 255 * 127 * 2 = 64770 does not fit, so a large activation next to a large weight is
clipped. ONNX Runtime (MLAS) runs its fused int8 GEMMs (``MatMulIntegerToFloat``, ``QLinearConv``) that way on such
CPUs, and a QDQ model with uint8 activations then computes something a little different from what the file says
(onnxruntime issues 5849 and 6004). VNNI (``avx512_vnni``, ``avx_vnni``) and AMX accumulate in int32 and do not
saturate; int8 x int8 (symmetric activations) takes another kernel that does not either.
"""
from __future__ import annotations

import platform
from functools import lru_cache
from typing import Iterable

#: instruction sets that accumulate uint8 x int8 in int32 (no saturation)
EXACT_INT8_DOT = frozenset({"avx512_vnni", "avx512vnni", "avx_vnni", "amx_int8"})
#: instruction sets whose uint8 x int8 dot product saturates in int16 when none of the above is present
SATURATING_INT8_DOT = frozenset({"avx2", "avx512bw"})


def saturates(flags: Iterable[str]) -> bool:
    """``True`` for a set of /proc/cpuinfo flags with AVX2/AVX-512BW but no VNNI or AMX int8."""
    flags = set(flags)
    return bool(flags & SATURATING_INT8_DOT) and not flags & EXACT_INT8_DOT


@lru_cache(maxsize=1)
def int8_dot_saturates() -> bool:
    """Whether this machine's CPU saturates uint8 x int8 dot products (x86 Linux only; elsewhere ``False``)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return saturates(line.split(":", 1)[1].split())
    except OSError:
        pass
    return False
