"""glibc malloc settings for the torch engine (``engines._malloc``): freed memory is kept and reused, so a
batch's activations do not page-fault in again. Each check runs in a fresh interpreter: the settings are
process-wide and cannot be undone."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="glibc's mallopt only")

# Allocate and touch 64 MiB, free it, allocate and touch it again: how many page faults does the second
# touch cost? In the main thread and in a thread started afterwards (the engines' streams are threads).
_PROBE = textwrap.dedent("""
    import ctypes, json, resource, sys, threading
    retain = sys.argv[1] == "retain"
    ok = None
    if retain:
        from mlm_scorer.engines._malloc import retain_freed_memory
        ok = retain_freed_memory()
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    N = 64 << 20

    def second_touch_faults(out, key):
        p = libc.malloc(N); ctypes.memset(p, 1, N); libc.free(p)
        p = libc.malloc(N)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        ctypes.memset(p, 2, N)
        out[key] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        libc.free(p)

    out = {"applied": ok}
    second_touch_faults(out, "main")
    t = threading.Thread(target=second_touch_faults, args=(out, "thread")); t.start(); t.join()
    print(json.dumps(out))
""")


def _probe(mode: str) -> dict:
    r = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_without_page_faults():
    pages = (64 << 20) // 4096
    plain = _probe("system")
    kept = _probe("retain")
    # Without the settings glibc maps a fresh block each time: every page faults again (the control shows
    # the probe can see it).
    assert plain["main"] > pages // 2 and plain["thread"] > pages // 2, plain
    assert kept["applied"] is True
    assert kept["main"] < pages // 50 and kept["thread"] < pages // 50, kept


def test_retain_freed_memory_is_applied_once():
    code = ("from mlm_scorer.engines import _malloc as m; calls = []; real = m._mallopt_all\n"
            "m._mallopt_all = lambda: calls.append(1) or real()\n"
            "print(m.retain_freed_memory(), m.retain_freed_memory(), len(calls))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True", "1"]
