"""The heap policy (kernels/allocator.py): glibc's own unless a caller or MINICPM_HEAP asks for
lean, a bad value is a clear error; the trainer gives the heap's freed pages back after each
micro-batch."""

import os
import subprocess
import sys

import pytest

from minicpm.kernels.allocator import heap_policy

# After a 4 MiB block is freed, glibc serves a smaller block from its heap (its mmap threshold
# has risen); under a fixed threshold below the block's size it is mapped on its own. mallinfo2
# counts mapped blocks. Prints whether a fixed policy is in force, then the blocks mapped.
PROBE = """
import ctypes, sys
from minicpm.kernels.allocator import apply_heap_policy
fixed = apply_heap_policy(default=sys.argv[1]) != "fast"
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = Info
libc.free(libc.malloc(4 << 20))
before = libc.mallinfo2().hblks
block = libc.malloc(int(sys.argv[2]))
print(int(fixed), libc.mallinfo2().hblks - before)
libc.free(block)
"""


def probe(default: str, env: str | None = None, size: int = 200_000) -> tuple[int, int]:
    environ = {k: v for k, v in os.environ.items() if k != "MINICPM_HEAP"}
    if env is not None:
        environ["MINICPM_HEAP"] = env
    out = subprocess.run([sys.executable, "-c", PROBE, default, str(size)], capture_output=True, text=True, env=environ,
                         check=True).stdout.split()
    return int(out[0]), int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt/mallinfo2")
def test_lean_and_mid_heaps_map_large_blocks_and_fast_keeps_them_in_the_heap():
    assert probe("fast") == (0, 0)      # inference's default: from the heap
    assert probe("lean") == (1, 1)      # a block of its own
    assert probe("fast", env="lean") == (1, 1)
    assert probe("lean", env="fast") == (0, 0)
    assert probe("mid") == (1, 0)       # training's default: 200 KB from the heap,
    assert probe("mid", size=2 << 20) == (1, 1)  # 2 MiB mapped
    assert probe("fast", size=2 << 20) == (0, 0)


def test_heap_policy_reads_the_environment(monkeypatch):
    monkeypatch.delenv("MINICPM_HEAP", raising=False)
    assert heap_policy() == "fast" and heap_policy("lean") == "lean"
    monkeypatch.setenv("MINICPM_HEAP", " Lean ")
    assert heap_policy("fast") == "lean"
    monkeypatch.setenv("MINICPM_HEAP", "small")
    with pytest.raises(ValueError, match="MINICPM_HEAP='small': expected one of fast, mid, lean"):
        heap_policy()


def test_command_refuses_a_bad_heap_policy():
    env = {**os.environ, "MINICPM_HEAP": "tiny"}
    command = "import sys; from minicpm.cli.main import main; sys.exit(main(['--version']))"
    result = subprocess.run([sys.executable, "-c", command], capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert "MINICPM_HEAP='tiny'" in result.stderr and "Traceback" not in result.stderr


# 200 MB of 100 KB blocks freed under a live block that pins the heap's top: glibc keeps their
# pages resident (as it kept MiniCPM-V's freed tower activations) until return_free_heap.
TRIM_PROBE = """
import ctypes
from pathlib import Path
from minicpm.kernels.allocator import return_free_heap
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def anon_mb():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("RssAnon"))
    return int(line.split()[1]) // 1024
blocks = [libc.malloc(100_000) for _ in range(2000)]
for b in blocks:
    libc.memset(b, 1, 100_000)
pin = libc.malloc(100_000)
for b in blocks:
    libc.free(b)
freed = anon_mb()
trimmed = return_free_heap()
print(freed, anon_mb(), int(trimmed))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_return_free_heap_gives_freed_pages_back():
    freed, after, trimmed = map(int, subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True,
                                                           text=True, check=True).stdout.split())
    assert trimmed == 1  # malloc_trim says it released memory
    assert freed - after > 150, (freed, after)  # the ~200 MB freed under the pin went back
