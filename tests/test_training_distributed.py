"""The same recipe under torchrun with 2 processes (FSDP2, gloo on CPU) matches one process:
each process takes half of every global batch, and the losses and final weights agree."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import save_tiny_checkpoint
from tests.test_training_sft import COMMON, losses


def test_sft_on_two_processes_matches_one(tmp_path):
    base = save_tiny_checkpoint(tmp_path)
    run_both("sft", [f"model.path={base}", *COMMON, "train.steps=4", "train.method=full", "optim.lr=3e-3",
                     "train.precision=fp32", "train.save_every=2"], tmp_path)


def test_pretraining_on_two_processes_matches_one(tmp_path):
    from minicpm.training.shards import pack_corpus
    from minicpm.training.tokenizer import train_tokenizer
    from tests.test_training_pretrain import WIKI, args

    train_tokenizer([WIKI / "wiki.test.raw"], tmp_path / "tokenizer", vocab_size=512)
    pack_corpus([WIKI / "wiki.test.raw"], tmp_path / "tokenizer", tmp_path / "train", log=lambda m: None)
    run_both("pretrain", args(tmp_path, "train.steps=4", "train.precision=fp32", "train.activation_checkpointing=true"),
             tmp_path)


def run_both(kind: str, args: list[str], tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "minicpm.training.run", kind, *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stdout + one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--standalone", "-m", "minicpm.training.run", kind, *args,
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "2 process(es)" in two.stdout and "x 2\n" in two.stdout
    single, double = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert list(single) == [1, 2, 3, 4] and single[4] < single[1]
    for step in single:
        assert double[step] == pytest.approx(single[step], rel=1e-5), (step, single, double)
    # the checkpoint written from the shards is the whole model, equal to the 1-process one
    a = load_file(tmp_path / "one" / "final" / "model.safetensors")
    b = load_file(tmp_path / "two" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
