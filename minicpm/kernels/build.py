"""Compile a kernel's C file once per machine and load it with ctypes.

Why not torch.utils.cpp_extension: compiling against torch's C++ headers takes minutes on two
cores; these files are plain C with intrinsics and build in about a second. The shared object is
cached under `$XDG_CACHE_HOME/minicpm/kernels/<hash>/` (hash of source, flags, compiler version
and CPU flags), written under a temporary name and renamed, so processes starting together see
either no file or a whole one. It links libgomp.so.1: the OpenMP runtime torch's wheel ships has
that soname and is already loaded once torch is imported, so both share one thread pool.

The kernels are written with AVX-512 intrinsics; on CPUs with only AVX2 (+ FMA, F16C) they
compile against avx512_on_avx2.h, which gives the same operations on 256-bit halves. Which one a
build took is decided by the compiler (-march=native), so the cache key includes the headers.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from minicpm.files import atomic_file

FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
# what every kernel needs at least (each is written for AVX-512; avx512_on_avx2.h runs it on AVX2)
AVX2 = ("avx2", "fma", "f16c")


class KernelUnavailable(RuntimeError):
    """Why a native kernel cannot serve on this machine (one line, shown once)."""


def disabled() -> bool:
    return os.environ.get("MINICPM_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def avx512_kernels() -> bool:
    """Whether the native kernels run their AVX-512 code here: an x86 CPU with AVX-512F, not
    sent to the AVX2 path by MINICPM_NATIVE_ISA=avx2."""
    return (is_x86() and "avx512f" in cpu_flags()
            and os.environ.get("MINICPM_NATIVE_ISA", "").strip().lower() != "avx2")


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "minicpm" / "kernels"


def check_machine(required_flags: tuple[str, ...]) -> set[str]:
    """The CPU flags, or KernelUnavailable when the kernels cannot run here at all."""
    if disabled():
        raise KernelUnavailable("disabled by MINICPM_NATIVE=0")
    if platform.system() != "Linux" or not is_x86():
        raise KernelUnavailable(f"needs x86-64 Linux, this is {platform.system()} {platform.machine()}")
    flags = cpu_flags()
    missing = [f for f in required_flags if f not in flags]
    if missing:
        raise KernelUnavailable(f"the CPU lacks {', '.join(missing)}")
    return flags


def compile_source(source: Path, cpu: set[str], extra_flags: tuple[str, ...] = ()) -> Path:
    """The cached shared object built from `source` (compiled now if missing), with FLAGS and
    the kernel's own `extra_flags` (both part of the cache key). MINICPM_NATIVE_ISA=avx2 builds
    the AVX2 path on an AVX-512 CPU too (how the tests check it there)."""
    flags = FLAGS + _isa_flags() + tuple(extra_flags)
    cc = os.environ.get("CC") or "gcc"
    compiler = shutil.which(cc)
    if compiler is None:
        raise KernelUnavailable(f"no C compiler ({cc!r} not found; set CC)")
    version = _compiler_version(compiler, cc)
    headers = [h.read_bytes() for h in sorted(source.parent.glob("*.h"))]  # what the sources include
    key = hashlib.sha256(b"\0".join([source.read_bytes(), *headers, " ".join(flags).encode(), compiler.encode(),
                                     version.encode(), " ".join(sorted(cpu)).encode()])).hexdigest()[:16]
    target = cache_root() / key / (source.stem + ".so")
    with _target_lock(target):  # prebuild's thread and a first use may ask for the same file
        if not target.exists():
            _compile(compiler, flags, source, target)
    return target


def _isa_flags() -> tuple[str, ...]:
    isa = os.environ.get("MINICPM_NATIVE_ISA", "").strip().lower()
    if isa not in ("", "native", "avx2"):
        raise KernelUnavailable(f"MINICPM_NATIVE_ISA={isa!r} is not avx2 or native (unset it to use "
                                "what the CPU has)")
    return ("-mno-avx512f",) if isa == "avx2" else ()


@functools.cache
def _compiler_version(compiler: str, cc: str) -> str:
    """`compiler --version` (part of the cache key), run once per process, not once per kernel."""
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelUnavailable(f"{cc} --version failed: {exc}") from None


_target_locks: dict[Path, threading.Lock] = {}
_target_locks_guard = threading.Lock()


def _fresh_locks_in_child() -> None:
    """A child forked while a build thread held a lock would wait on it forever."""
    global _target_locks_guard
    _target_locks.clear()
    _target_locks_guard = threading.Lock()


os.register_at_fork(after_in_child=_fresh_locks_in_child)


def _target_lock(target: Path) -> threading.Lock:
    with _target_locks_guard:
        return _target_locks.setdefault(target, threading.Lock())


def _compile(compiler: str, flags: tuple[str, ...], source: Path, target: Path) -> None:
    # a first run waits here for seconds: say why, where a person is watching
    tell = sys.stderr is not None and sys.stderr.isatty()
    if tell:
        print(f"building the native {source.stem} kernel for this CPU (once; cached in {target.parent.parent})",
              file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        with atomic_file(target, suffix=".so") as tmp:  # processes building at once: one wins
            result = subprocess.run([compiler, *flags, "-o", str(tmp), str(source)], capture_output=True,
                                    text=True, timeout=300)
            if result.returncode != 0:
                tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
                raise KernelUnavailable(f"compiling {source.name} failed: {tail}")
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelUnavailable(f"compiling {source.name} into {target.parent} failed: {exc}") from None
    if tell:
        print(f"built {source.stem} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def prebuild(kernels, workers: int = 2) -> list[Future]:
    """Start compiling the kernels' missing shared objects, `workers` at a time, in the
    background; one future per kernel. A first use of a kernel still being built waits
    for it; a failure is left for that first use to report. On a cold cache this overlaps the
    compiles with each other and with loading the weights (first run of the default model on 2
    cores: the three kernels it uses one after another cost the sum of their compile times)."""
    def build(kernel) -> None:
        try:
            compile_source(kernel.source, check_machine(kernel.required_flags), kernel.extra_flags)
        except KernelUnavailable:
            pass

    # the executor's threads are joined at exit: a compile is never cut off half-written
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="minicpm-kernel-build")
    futures = [pool.submit(build, kernel) for kernel in kernels]
    pool.shutdown(wait=False)
    return futures


def load(source: Path, required_flags: tuple[str, ...] = AVX2, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Build (once) and load `source`; raises KernelUnavailable with the reason."""
    path = compile_source(source, check_machine(required_flags), extra_flags)
    try:
        return ctypes.CDLL(str(path))
    except OSError as exc:
        raise KernelUnavailable(f"loading {path} failed: {exc}") from None


_warned: set[str] = set()  # reasons already shown: no compiler is one message, not one per kernel


class Kernel:
    """One C file (`name`.c beside this module), built and loaded on first use; `library()` is
    None where it cannot serve.

    `setup` names a function "module:function" that, given the library, declares its ctypes
    signatures and runs a self-check against PyTorch; it raises KernelUnavailable to refuse a
    build (a stale or miscompiled one). A name, not the function: the kernels are listed in
    `libraries` without importing the torch modules that use them. The reason is warned once.
    `extra_flags` are compiler flags of this kernel only (e.g. -ffp-contract=off).
    """

    def __init__(self, name: str, what: str, setup: str, required_flags: tuple[str, ...] = AVX2,
                 extra_flags: tuple[str, ...] = ()):
        self.name, self.what, self.setup = name, what, setup
        self.source = Path(__file__).with_name(name + ".c")
        self.required_flags, self.extra_flags = required_flags, extra_flags
        self.reason: str | None = None
        self._lib: ctypes.CDLL | None = None
        self._tried = False
        self._lock = threading.Lock()

    def library(self) -> ctypes.CDLL | None:
        if not self._tried:
            with self._lock:
                if not self._tried:
                    self._lib = self._load()
                    self._tried = True
        return self._lib

    def unchecked_library(self) -> ctypes.CDLL:
        """The built library without `setup` (which needs PyTorch): for the torch-free runtime,
        which declares and checks what it calls itself. Raises KernelUnavailable with the reason."""
        return load(self.source, self.required_flags, self.extra_flags)

    def _load(self) -> ctypes.CDLL | None:
        try:
            lib = load(self.source, self.required_flags, self.extra_flags)
            import importlib

            import torch  # here: building needs no torch, a self-check does

            module, function = self.setup.split(":")
            # the self-checks compare with PyTorch in fp32: not in the caller's autocast (a
            # training step may be the first to reach a kernel)
            with torch.autocast("cpu", enabled=False):
                getattr(importlib.import_module(module), function)(lib)
            return lib
        except KernelUnavailable as exc:
            self.reason = str(exc)
            if not disabled() and self.reason not in _warned:
                _warned.add(self.reason)
                warnings.warn(f"native {self.what} unavailable ({exc}); using PyTorch's", RuntimeWarning,
                              stacklevel=4)
            return None
