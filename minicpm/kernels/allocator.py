"""The process's heap policy: freed large buffers go back to the operating system.

glibc serves a large allocation with its own mmap and unmaps it when freed, but after each such
free it raises that size limit to the freed size (up to 32 MB), so the next buffers of that size
come from the heap, and the heap keeps the pages of whatever was freed under live blocks. A
prefill chunk allocates and frees tens of MB of activations per layer; on MiniCPM-2B (int4,
2k context) the heap kept ~130 MB resident after the first chunk, 6% of the whole process.
Fixing the limit at 1 MiB keeps every activation-sized buffer out of the heap. Small tensors
(a decode step's, all below it) are unaffected; a large one costs its page faults afresh, which
is small beside the work done on it (measured: no change in prefill time).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 1 << 16
TRIM_THRESHOLD = 1 << 20
_applied = False


def return_freed_memory() -> bool:
    """Apply the policy once per process (glibc only; MINICPM_MALLOC_POLICY=0 leaves the
    allocator alone). Returns whether it is in force."""
    global _applied
    if _applied:
        return True
    if os.environ.get("MINICPM_MALLOC_POLICY", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        mallopt = None
    if mallopt is None:  # not glibc (musl, macOS): its allocator has no such knob
        return False
    # both: the automatic raise of the mmap limit also raised the trim limit (to twice it)
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
