"""What `minicpm bench` measures: prompt and reply lengths, and the rows of its two tables."""

from __future__ import annotations

PROMPT_TOKENS = 512
NEW_TOKENS = 128
CTX = 2048                # the memory case: a full 2k context ...
CTX_NEW = 32              # ... of which this many tokens are generated
CTX_PROMPT = CTX - CTX_NEW
SEED = 0
GGUF_Q4_0 = "q4_0 GGUF"    # ours running llama.cpp's q4_0 file itself, its blocks as stored
FP32_KV = ", fp32 KV"  # the lean runtime with an fp32 KV cache, the PyTorch model's (its default: fp16, as llama.cpp's)
# (engine, precision) in table order; the peer row of the same "class" is each row's peer.
# "lean" is ours too: the torch-free runtime (minicpm.lean) on the q4_0 GGUF, as `minicpm chat` runs it.
CASES = [
    ("ours", "bf16"), ("ours", "int8"), ("ours", "int4"), ("ours", GGUF_Q4_0), ("lean", GGUF_Q4_0),
    ("lean", GGUF_Q4_0 + FP32_KV),
    ("llama.cpp", "f16"), ("llama.cpp", "q8_0"), ("llama.cpp", "q4_0"),
    ("llama-bench", "f16"), ("llama-bench", "q8_0"), ("llama-bench", "q4_0"),
    ("transformers", "bf16"),
]
# The peers: llama.cpp through llama-cpp-python, and llama.cpp's own llama-bench on the same file
# (no Python between tokens, its own thread settings). A row's ratios are to llama-bench's row
# where it ran, else to llama-cpp-python's.
PEER_ENGINES = ("llama.cpp", "llama-bench")
PEER = {"bf16": "f16", "int8": "q8_0", "int4": "q4_0", GGUF_Q4_0: "q4_0", GGUF_Q4_0 + FP32_KV: "q4_0", "f16": "f16",
        "q8_0": "q8_0", "q4_0": "q4_0"}
INT4_HEAD4 = "int4, int4 head"  # the least memory: the head in int4 groups of 32 too
# our quantized checkpoints: precision -> (bits, head); int4 layers in groups of 128
QUANTIZED = {"int8": (8, "int8"), "int4": (4, "int8"), INT4_HEAD4: (4, "int4")}
INT4_KV4 = ", int4 KV"  # a memory case's precision ending so runs with an int4 KV cache (else int8)
LEAN_HEAP = ", lean heap"  # ... and this one (last) with MINICPM_HEAP=lean (kernels/allocator.py)
HEAD4 = ", int4 head"  # the lean runtime with the file's head rounded again to int4 (lean.load's head)
MEMORY_CASES = [("ours", "int4"), ("ours", INT4_HEAD4), ("ours", INT4_HEAD4 + INT4_KV4),
                ("ours", INT4_HEAD4 + INT4_KV4 + LEAN_HEAP), ("lean", GGUF_Q4_0), ("lean", GGUF_Q4_0 + INT4_KV4),
                ("lean", GGUF_Q4_0 + HEAD4 + INT4_KV4), ("llama.cpp", "q4_0")]


def checkpoint_and_kv(precision: str, default: str = "int8") -> tuple[str, str]:
    """A case's precision as (the checkpoint's precision, our KV cache kind: `default` unless the
    precision names one; the memory cases' default is int8)."""
    precision = precision.removesuffix(LEAN_HEAP)
    for suffix, kv in ((INT4_KV4, "int4"), (FP32_KV, "fp32")):
        if precision.endswith(suffix):
            return precision[:-len(suffix)].removesuffix(HEAD4), kv
    return precision.removesuffix(HEAD4), default


def lean_head(precision: str) -> str:
    """The lean runtime's head option for a case's precision."""
    return "int4" if HEAD4 in precision else "stored"


def prompt_ids(vocab: int, n: int = PROMPT_TOKENS) -> list[int]:
    """The same seeded prompt for every engine: `n` token ids from [10, vocab)."""
    import random

    rng = random.Random(SEED)
    return [rng.randrange(10, vocab) for _ in range(n)]
