"""The child process of one benchmark case; prints its results as one JSON line.

    python -m minicpm.bench ENGINE PRECISION WORKDIR THREADS [MODE]
"""

import json
import sys
from pathlib import Path

engine, precision, workdir, threads = sys.argv[1:5]
mode = sys.argv[5] if len(sys.argv) > 5 else "speed"
if engine in ("ours", "lean"):  # as the `minicpm` command does first; the peers keep their allocator
    import os

    from minicpm.bench.cases import LEAN_HEAP

    if precision.endswith(LEAN_HEAP):
        os.environ["MINICPM_HEAP"] = "lean"
    from minicpm.kernels.allocator import apply_heap_policy

    apply_heap_policy()

from minicpm.bench.engines import run_case_here  # noqa: E402  (after the heap policy: its runners import torch)

print(json.dumps(run_case_here(engine, precision, Path(workdir), int(threads), mode)))
