"""glibc malloc settings for engines whose library takes every activation from plain ``malloc``.

torch on CPU has no caching allocator: each forward pass allocates its activations (tens of MB per
tensor at bert-base shape) and frees them again. glibc serves blocks that large with ``mmap`` and
returns them with ``munmap`` (in thread arenas too, and trims freed heap tops), so the next batch's
first write to each page is a page fault: about 1,800 faults per scored copy at bert-base shape, 24
tokens, 8192 tokens a batch, 9 % of the CPU time spent in the kernel (measured; BENCHMARKS.md, "How
much memory does a run take?"). ``retain_freed_memory`` keeps freed memory in the process for reuse instead:

- ``M_MMAP_MAX = 0``: no block is served by its own ``mmap``;
- ``M_TRIM_THRESHOLD = 2 GiB``: freed memory at the top of the heap is not given back below that;
- ``M_ARENA_MAX = 1``: threads share the main arena (a thread arena's heap is at most 64 MiB and falls
  back to ``mmap`` for bigger blocks). glibc fixes its arena limit when the first thread arena is
  made, so this part only takes effect if no thread has allocated outside the main arena yet; the
  first two settings take effect whenever they are made.

The cost: the process keeps its peak heap (it does not shrink after a big batch), and all threads
take one arena's lock (the engines' threads make few, large allocations). The settings are
process-wide and are never undone.
"""
from __future__ import annotations

import ctypes
import platform
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int

_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Apply the settings above once per process; True if glibc accepted them (False elsewhere: not Linux,
    not glibc, or ``mallopt`` refused)."""
    global _applied
    if _applied is None:
        _applied = _mallopt_all()
    return _applied


def _mallopt_all() -> bool:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already uses
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    results = [mallopt(param, value) for param, value in
               ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_ARENA_MAX, 1))]
    return all(r == 1 for r in results)  # mallopt returns 1 on success
