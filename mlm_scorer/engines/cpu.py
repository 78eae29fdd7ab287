"""The CPU features that decide how reduced precision computes: what ONNX Runtime's and oneDNN's kernels
dispatch on.

On x86-64 the features come from the ``CPUID`` instruction itself, as the runtimes read them (a few bytes
of machine code run through ``ctypes``): under an emulator (``qemu-x86_64 -cpu Haswell``) or a hypervisor
that hides features, ``/proc/cpuinfo`` may describe the host while the runtime sees the emulated CPU.
Elsewhere, or where executable memory is refused, the flags of ``/proc/cpuinfo`` are read instead.

Why it matters for int8 (ONNX Runtime's MLAS, ``MlasPlatform`` in ``platform.cpp``): an int8 matrix
product with unsigned activations and signed weights (U8S8) runs on

  * AVX512-VNNI / AVX-VNNI (``vpdpbusd``) or AMX (``tdpbusd``): 32-bit sums, exact;
  * AVX2, or AVX-512 without VNNI: ``vpmaddubsw``, which adds two u8 x s8 products into a *saturating*
    16-bit sum (|sum| <= 32767) before widening: a pair of large activations times large weights of
    the same sign is clipped. A file quantized for the first class can then drift 10x more on this one.
  * aarch64: ``udot``/``sdot`` or widening multiplies: exact.
"""
from __future__ import annotations

import ctypes
import functools
import mmap
import platform
import re
from pathlib import Path

#: CPUID (leaf, subleaf, register, bit) of the features named like /proc/cpuinfo's flags.
_BITS = {
    "fma": (1, 0, "ecx", 12),
    "avx": (1, 0, "ecx", 28),
    "avx2": (7, 0, "ebx", 5),
    "avx512f": (7, 0, "ebx", 16),
    "avx512bw": (7, 0, "ebx", 30),
    "avx512_vnni": (7, 0, "ecx", 11),
    "amx_bf16": (7, 0, "edx", 22),
    "amx_tile": (7, 0, "edx", 24),
    "amx_int8": (7, 0, "edx", 25),
    "avx_vnni": (7, 1, "eax", 4),
    "avx512_bf16": (7, 1, "eax", 5),
    "avx_vnni_int8": (7, 1, "edx", 4),
}
_REGS = ("eax", "ebx", "ecx", "edx")

# x86-64 System V: cpuid(leaf=edi, subleaf=esi, out=rdx) -> out[0..3] = eax, ebx, ecx, edx
_CPUID_CODE = bytes([
    0x53,                    # push rbx
    0x49, 0x89, 0xD0,        # mov r8, rdx
    0x89, 0xF8,              # mov eax, edi
    0x89, 0xF1,              # mov ecx, esi
    0x0F, 0xA2,              # cpuid
    0x41, 0x89, 0x00,        # mov [r8], eax
    0x41, 0x89, 0x58, 0x04,  # mov [r8+4], ebx
    0x41, 0x89, 0x48, 0x08,  # mov [r8+8], ecx
    0x41, 0x89, 0x50, 0x0C,  # mov [r8+12], edx
    0x5B,                    # pop rbx
    0xC3,                    # ret
])


def _cpuid_reader():
    """A function (leaf, subleaf) -> (eax, ebx, ecx, edx), or None off x86-64 or where memory cannot be
    made executable."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError, AttributeError, TypeError):  # refused (W^X), or no prot argument (Windows)
        return None
    buf.write(_CPUID_CODE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    fn = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32))(addr)

    def cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        out = (ctypes.c_uint32 * 4)()
        fn(leaf, subleaf, out)
        return tuple(out)

    cpuid._keep = buf  # the code page lives as long as the function
    return cpuid


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The features of ``_BITS`` this CPU has (from CPUID on x86-64), plus on Linux the other flags of
    /proc/cpuinfo when CPUID could not be run; empty if neither can be read."""
    cpuid = _cpuid_reader()
    if cpuid is not None:
        max_leaf = cpuid(0)[0]
        regs: dict[tuple[int, int], tuple[int, int, int, int]] = {}
        flags = set()
        for name, (leaf, sub, reg, bit) in _BITS.items():
            if leaf > max_leaf or (leaf == 7 and sub > 0 and cpuid(7, 0)[0] < sub):
                continue
            r = regs.setdefault((leaf, sub), cpuid(leaf, sub))
            if r[_REGS.index(reg)] >> bit & 1:
                flags.add(name)
        return frozenset(flags)
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    m = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.M)
    return frozenset(m.group(1).split()) if m else frozenset()


def int8_exact() -> bool:
    """True if ONNX Runtime's U8S8 products add in 32 bits on this CPU (VNNI, AMX, or not x86), False where
    they pass through a saturating 16-bit sum (x86 without VNNI)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return True
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def int8_class() -> str:
    """A short name of this CPU's int8 arithmetic, as reported in drift records and messages:
    "AMX", "AVX512-VNNI", "AVX-VNNI", "AVX-512 without VNNI", "AVX2", "x86 without AVX2" or the machine."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return platform.machine() or "unknown"
    f = cpu_flags()
    for flag, name in (("amx_int8", "AMX"), ("avx512_vnni", "AVX512-VNNI"), ("avx_vnni", "AVX-VNNI")):
        if flag in f:
            return name
    if "avx512bw" in f:
        return "AVX-512 without VNNI"
    return "AVX2" if "avx2" in f else "x86 without AVX2"


def has_bf16() -> bool:
    """True if this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
