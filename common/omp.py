"""Keep one OpenMP thread pool busy at a time: release the pool a thread no longer needs.

torch's CPU ops run on OpenMP (libgomp, shipped in torch/lib). Every thread that runs a parallel
op gets its own pool of worker threads, and the pool lives as long as that thread. libgomp counts
the workers of all pools, idle ones included, and once they outnumber the CPUs it stops spinning
at its barriers and sleeps on a futex at every parallel region instead (`do_spin` in libgomp's
config/linux/wait.h: gomp_managed_threads > gomp_available_cpus). So a server whose main thread
loaded the model, and whose engine thread then runs it, decodes at the speed of two sleeping
pools: a GPT-2-small decode step at batch 4 took 40 ms on the engine thread of such a process and
23 ms once the main thread's pool was released (2-core Xeon, bench/RESULTS.md session 11). The
same held for the trainer's rollout engine beside the thread that runs PPO, and for a hot swap's
load on the update watcher's thread.

The rule: a thread that ran torch work and now waits (the main thread after start-up, the update
watcher after a swap, a caller that hands the work to an engine thread) calls `release_thread_pool`.
Its next parallel op starts a fresh pool (one thread start per worker, microseconds).
"""
from __future__ import annotations

import ctypes
import os
import re
from functools import cache
from pathlib import Path

OMP_PAUSE_HARD = 2   # omp_pause_resource_t (OpenMP 5.0): free the pool's threads and state


def torch_libgomp(mapped: list[str], torch_dir: Path) -> str | None:
    """Of the libgomp files mapped into the process, the one torch runs: the copy inside torch's own
    folder (PyPI wheels ship torch/lib/libgomp.so.1), else the only one mapped (a build linked to the
    system's). None when that is ambiguous: other packages bring their own copies (scikit-learn's and
    ctranslate2's wheels do), and pausing one of those would free nothing of torch's."""
    gomp = sorted({p for p in mapped if re.search(r"/libgomp[^/]*\.so[^/]*$", p)})
    own = [p for p in gomp if Path(p).is_relative_to(torch_dir)]
    return own[0] if own else gomp[0] if len(gomp) == 1 else None


@cache
def _libgomp() -> ctypes.CDLL | None:
    """torch's libgomp, or None (another OpenMP runtime, none, or not Linux)."""
    import torch
    try:
        with open(f"/proc/{os.getpid()}/maps") as f:
            mapped = [line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6]
    except OSError:
        return None
    path = torch_libgomp(mapped, Path(torch.__file__).resolve().parent)
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path)   # already loaded: the same handle, nothing new is mapped
        lib.omp_pause_resource_all.argtypes, lib.omp_pause_resource_all.restype = [ctypes.c_int], ctypes.c_int
    except (OSError, AttributeError):   # a libgomp before OpenMP 5.0 has no omp_pause_resource_all
        return None
    return lib


def release_thread_pool() -> bool:
    """Frees the OpenMP worker threads the calling thread started (libgomp's omp_pause_resource_all
    frees the calling thread's pool). Call it from a thread that is done with torch work for a while,
    never from inside a torch op. True if a libgomp pool was released (or there was none to release);
    False where the process does not run libgomp: nothing changes there."""
    lib = _libgomp()   # imports torch first: its libgomp is mapped before we look
    return lib is not None and lib.omp_pause_resource_all(OMP_PAUSE_HARD) == 0
