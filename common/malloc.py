"""Keep freed memory in the process instead of handing it back to the kernel at once (glibc).

glibc serves an allocation over its mmap threshold (dynamic, at most 32 MB) with a fresh mapping and
unmaps it on free; the heap's top is also trimmed back to the kernel past a threshold. A training step
that allocates the same large buffers every time (MiniLM's word-embedding gradient alone is 47 MB)
then pays page faults on each first touch: an RM step ran ~4% faster with both thresholds raised
(bench/RESULTS.md, session 10). The cost is resident memory: the process keeps its peak. For the
trainer, which reaches the same peak every step, that is the same memory; servers don't call this.
The same effect as running under jemalloc or tcmalloc, without a preload.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1   # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 30) -> bool:
    """Raises glibc's mmap and trim thresholds (bytes, each below 2 GiB: mallopt takes a C int) for
    this process. True if glibc took both; False where there is no glibc (musl, macOS): nothing
    changes there."""
    for v in (mmap_threshold, trim_threshold):
        if not 0 <= v < 1 << 31:
            raise ValueError(f"mallopt takes an int: a threshold in [0, 2**31), got {v}")
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) & bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
