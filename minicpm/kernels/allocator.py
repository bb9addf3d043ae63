"""The process's heap policy: "fast" (glibc's own), "mid" (buffers from 1 MiB up go back at once)
or "lean" (from 64 KiB up).

glibc serves a large allocation with its own mmap and unmaps it when freed, but after each such
free it raises that size limit to the freed size (up to 32 MB), so the next buffers of that size
come from the heap, and the heap keeps the pages of whatever was freed under live blocks.
"mid" and "lean" fix the limit: every buffer above it is mapped and unmapped, so nothing of it
stays resident once freed, and each pays its page faults afresh.

What that trade measured (AMD EPYC, 2 threads):
- inference, MiniCPM-2B int4 + int4 head + int4 KV cache, 2k context: peak RSS 2060 -> 1964 MiB
  (-4.7%), prefill 102 -> 67 tok/s (-35%) lean; MiniCPM-1B int4, a 512-token prompt: 2.2 ->
  3.5 s. The kernel's page zeroing costs more than the memory is worth: inference is "fast".
- training (LoRA of the default model, micro-batch 2, 20 steps, the heap trimmed after each
  micro-batch by the trainer; 2026-12-07): lean 128 tokens/s, peak 1,959 MiB; mid 202 and
  2,147 MiB; a 4 MiB limit 227 and 2,392 MiB; glibc's own 231 and 2,547 MiB. Lean maps and
  unmaps every activation-sized temporary of the step (per-row attention, LoRA's products), and
  their page faults took 40% of the step: training is "mid".

MINICPM_HEAP=lean|fast overrides the default everywhere. Set first in a process (the `minicpm`
command does): set later, buffers already freed into the heap stay there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
THRESHOLDS = {"fast": None, "mid": 1 << 20, "lean": 1 << 16}  # None: glibc's own, moving limit
POLICIES = tuple(THRESHOLDS)
ENV = "MINICPM_HEAP"
_applied: str | None = None  # the policy mallopt set in this process


def heap_policy(default: str = "fast") -> str:
    """The policy in force for a caller whose own default is `default` (MINICPM_HEAP wins)."""
    chosen = os.environ.get(ENV, "").strip().lower() or default
    if chosen not in POLICIES:
        raise ValueError(f"{ENV}={os.environ.get(ENV)!r}: expected one of {', '.join(POLICIES)}")
    return chosen


def apply_heap_policy(default: str = "fast") -> str:
    """Fix glibc's mmap threshold as the policy says (glibc only; the first policy set in a
    process stays: buffers already in the heap would not move). Returns the policy in force."""
    global _applied
    if _applied:
        return _applied
    policy = heap_policy(default)
    mallopt = getattr(_libc(), "mallopt", None)
    if THRESHOLDS[policy] is None or mallopt is None:  # not glibc (musl, macOS): no such knob
        return "fast"
    if mallopt(M_MMAP_THRESHOLD, THRESHOLDS[policy]):
        _applied = policy
    return _applied or "fast"


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
