"""common/omp.py: a thread done with torch work frees its OpenMP pool (the workers exit), and torch
works as before afterwards. In child processes: the thread counts are the process's."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import os, threading, torch
from common.omp import release_thread_pool
torch.set_num_threads(2)

def threads():
    return len(os.listdir("/proc/self/task"))

a = torch.randn(512, 512)
ref = a @ a                          # a parallel op: this thread's pool starts (one worker with 2 threads)
with_pool = threads()
assert release_thread_pool()
after = threads()
again = a @ a                        # the next parallel op starts a fresh pool
assert torch.equal(ref, again)
assert threads() == with_pool

out = {}
def other():                          # another thread's pool is its own
    out["r"] = a @ a
    out["with"] = threads()
    out["released"] = release_thread_pool()
    out["after"] = threads()
t = threading.Thread(target=other); t.start(); t.join()
assert torch.equal(out["r"], ref) and out["released"]
print(with_pool, after, out["with"], out["after"])
"""


def test_release_frees_the_calling_threads_pool_and_torch_goes_on():
    r = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    with_pool, after, other_with, other_after = map(int, r.stdout.split()[-4:])
    assert after == with_pool - 1                 # the main thread's worker exited
    assert other_after == other_with - 1          # and the other thread's, not the main thread's


def test_torch_libgomp_is_torchs_own_copy_or_the_only_one():
    from common.omp import torch_libgomp
    torch_dir = Path("/site/torch")
    sk = "/site/scikit_learn.libs/libgomp-e985bcbb.so.1.0.0"
    assert torch_libgomp([sk, "/site/torch/lib/libgomp.so.1", "/usr/lib/libc.so.6"], torch_dir) == "/site/torch/lib/libgomp.so.1"
    assert torch_libgomp(["/usr/lib/x86_64-linux-gnu/libgomp.so.1", "/usr/lib/libc.so.6"], torch_dir) \
        == "/usr/lib/x86_64-linux-gnu/libgomp.so.1"                   # a torch linked to the system's
    assert torch_libgomp([sk, "/usr/lib/x86_64-linux-gnu/libgomp.so.1"], torch_dir) is None   # which one is torch's?
    assert torch_libgomp(["/usr/lib/libiomp5.so"], torch_dir) is None                        # another runtime
