"""The process's heap policy: "fast" (glibc's own) or "lean" (freed large buffers go back at once).

glibc serves a large allocation with its own mmap and unmaps it when freed, but after each such
free it raises that size limit to the freed size (up to 32 MB), so the next buffers of that size
come from the heap, and the heap keeps the pages of whatever was freed under live blocks.
"lean" fixes the limit at 64 KiB: every activation-sized buffer is mapped and unmapped, so
nothing freed stays resident, and each pays its page faults afresh.

What that trade measured (AMD EPYC, 2 threads, 2026-12-03):
- inference, MiniCPM-2B int4 + int4 head + int4 KV cache, 2k context: peak RSS 2060 -> 1964 MiB
  (-4.7%), prefill 102 -> 67 tok/s (-35%); MiniCPM-1B int4, a 512-token prompt: 2.2 -> 3.5 s.
  The kernel's page zeroing costs more than the memory is worth: inference is "fast" by default;
- training (LoRA of the default model): the heap kept ~5 GB after a step, the step's activations
  being far larger than a prefill chunk's: training is "lean" by default.

MINICPM_HEAP=lean|fast overrides the default everywhere. Set first in a process (the `minicpm`
command does): set later, buffers already freed into the heap stay there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 1 << 16
POLICIES = ("fast", "lean")
ENV = "MINICPM_HEAP"
_lean = False


def heap_policy(default: str = "fast") -> str:
    """The policy in force for a caller whose own default is `default` (MINICPM_HEAP wins)."""
    chosen = os.environ.get(ENV, "").strip().lower() or default
    if chosen not in POLICIES:
        raise ValueError(f"{ENV}={os.environ.get(ENV)!r}: expected one of {', '.join(POLICIES)}")
    return chosen


def apply_heap_policy(default: str = "fast") -> bool:
    """Make the heap lean if the policy says so (glibc only; once per process, never undone).
    Returns whether the lean policy is in force."""
    global _lean
    if _lean or heap_policy(default) != "lean":
        return _lean
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:  # not glibc (musl, macOS): its allocator has no such knob
        return False
    _lean = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    return _lean


def return_free_heap() -> bool:
    """Give the heap's free pages back to the system (glibc's malloc_trim), e.g. after loading,
    whose temporaries leave freed memory under live blocks: the lean runtime's MiniCPM-2B load
    kept 72 MiB of it resident. False where the C library has no such call."""
    trim = getattr(_libc(), "malloc_trim", None)
    return bool(trim and trim(0))


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, looked up once (find_library runs ldconfig: ~2 ms, and MiniCPM-V trims
    after every batch of image slices); None where it cannot be found or opened."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None
