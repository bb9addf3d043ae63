"""The process's heap policy: freed large buffers go back to the operating system.

glibc serves a large allocation with its own mmap and unmaps it when freed, but after each such
free it raises that size limit to the freed size (up to 32 MB), so the next buffers of that size
come from the heap, and the heap keeps the pages of whatever was freed under live blocks. A
prefill chunk allocates and frees tens of MB of activations per layer, a training step far
more: on MiniCPM-2B (int4, 2k context, int4 KV cache) the heap kept ~130 MiB resident beyond the
cache after the first prefill chunk (set here at model build: ~80 MiB less; set before anything
ran, as MALLOC_MMAP_THRESHOLD_=65536 in the environment does: ~130 MiB less), and LoRA training
of the default model kept ~5 GB after a step. A fixed 64 KiB limit keeps activation-sized
buffers out of the heap; a decode step's small tensors stay below it, and a large buffer pays
its page faults afresh, small beside the work done on it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 1 << 16
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
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    return _applied
