"""`minicpm train sft` through the real CLI on a tiny checkpoint: the logged loss is the loss a
plain forward pass gives, training lowers it, resume is bitwise, QLoRA runs, bad input is a
one-line error, and a checkpoint is never half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import FIXTURES, save_tiny_checkpoint

DATA = FIXTURES / "training" / "ocnli_chatml.json"
VALID = FIXTURES / "training" / "ocnli_chatml.dev.json"
COMMON = ["train.batch_size=4", "train.micro_batch_size=2", "train.log_every=1", "schedule.warmup_steps=2",
          "train.threads=1", f"data.train={DATA}"]


def train(kind: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "minicpm.cli.main", "train", kind, *args], capture_output=True,
                          text=True, timeout=600, env=env)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("base"))


def test_first_logged_loss_is_the_loss_of_a_plain_forward_pass(base, tmp_path):
    import minicpm
    from minicpm.training.data import load_chat_dataset
    from minicpm.training.tasks import sample_order

    run = tmp_path / "run"
    done = train("sft", f"model.path={base}", *COMMON, "train.steps=3", "train.precision=fp32", "--out", str(run))
    assert "memory estimate per process" in done.stdout and "trainable" in done.stdout
    model, tokenizer = minicpm.load(base, dtype="float32")
    examples = load_chat_dataset(DATA, tokenizer, max_len=512).examples
    total, count = 0.0, 0
    with torch.no_grad():
        for i in sample_order(len(examples), 0, 0, 4):  # the first step's four samples (seed 0)
            ids = torch.tensor([examples[i].input_ids])
            labels = torch.tensor(examples[i].labels[1:])
            logits = model(ids)[0, :-1]
            keep = labels != -100
            total += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            count += int(keep.sum())
    # a fresh LoRA adapter (B = 0) leaves the base model: its loss is the first step's
    assert losses(run)[1] == pytest.approx(total / count, rel=1e-5)
    assert (run / "final" / "adapter_model.safetensors").is_file() and (run / "loss.png").stat().st_size > 1000
    recipe = (run / "recipe.yaml").read_text()
    assert "method: lora" in recipe and "r: 8" in recipe and "alpha: 32.0" in recipe  # official defaults


def test_full_fine_tuning_lowers_the_loss_and_evaluates(base, tmp_path):
    run = tmp_path / "run"
    train("sft", f"model.path={base}", *COMMON, "train.steps=8", "train.method=full", "optim.lr=3e-3",
          "train.activation_checkpointing=true", f"data.valid={VALID}", "train.eval_every=4", "--out", str(run))
    seen = losses(run)
    assert seen[8] < seen[1] - 0.5, seen
    evals = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if "eval_loss" in line]
    assert [e["step"] for e in evals] == [4, 8] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[0]["eval_ppl"] == pytest.approx(2.718281828 ** evals[0]["eval_loss"], rel=1e-6)
    import minicpm

    model, _ = minicpm.load(run / "final")  # a full checkpoint: loads like any other
    assert model.config.vocab_size > 0


def test_resume_is_bitwise_equal_to_a_straight_run(base, tmp_path):
    args = [f"model.path={base}", *COMMON, "train.steps=6", "train.save_every=2", "train.keep_checkpoints=0"]
    train("sft", *args, "--out", str(tmp_path / "straight"))
    first = train("sft", *args, "train.stop_at=3", "--out", str(tmp_path / "resumed"))
    assert "stopped at step 3 of 6" in first.stdout
    assert not (tmp_path / "resumed" / "final").exists()
    train("sft", "--resume", "--out", str(tmp_path / "resumed"))  # the saved recipe, without stop_at
    straight = (tmp_path / "straight" / "final" / "adapter_model.safetensors").read_bytes()
    resumed = (tmp_path / "resumed" / "final" / "adapter_model.safetensors").read_bytes()
    assert straight == resumed  # LoRA dropout draws included: the RNG state is in the checkpoint
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")


def test_qlora_trains_over_an_int4_base_and_merges(base, tmp_path):
    run = tmp_path / "run"
    train("sft", f"model.path={base}", *COMMON, "train.steps=3", "train.method=qlora", "lora.quant_group_size=32",
          "--out", str(run))
    assert (run / "final" / "adapter_config.json").is_file()
    merged = subprocess.run([sys.executable, "-m", "minicpm.cli.main", "merge", str(base), str(run / "final"),
                             str(tmp_path / "merged")], capture_output=True, text=True, timeout=300)
    assert merged.returncode == 0, merged.stderr
    assert (tmp_path / "merged" / "config.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["data.train=/nonexistent.json"], "nonexistent.json"),
    (["optim.learning_rate=0.1"], "unknown setting optim.learning_rate"),
    (["train.steps=many"], "train.steps must be int"),
    (["train.batch_size=3"], "multiple of train.micro_batch_size"),
    (["train.micro_batch_size=0"], "train.micro_batch_size must be >= 1"),
    (["train.method=adapter"], "train.method must be full, lora or qlora"),
])
def test_bad_recipes_are_one_line_errors(base, tmp_path, args, message):
    done = train("sft", f"model.path={base}", *COMMON, "train.steps=3", *args, "--out", str(tmp_path / "r"),
                 check=False)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_run_is_never_overwritten_and_resume_needs_a_checkpoint(base, tmp_path):
    run = tmp_path / "run"
    train("sft", f"model.path={base}", *COMMON, "train.steps=3", "--out", str(run))
    again = train("sft", f"model.path={base}", *COMMON, "train.steps=3", "--out", str(run), check=False)
    assert again.returncode == 2 and "--resume" in again.stderr
    missing = train("sft", "--resume", "--out", str(tmp_path / "none"), check=False)
    assert missing.returncode == 2 and "no checkpoint" in missing.stderr


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    from minicpm.training import checkpoint as ckpt

    def good(directory: Path) -> None:  # a weights writer fills the directory it is given
        (directory / "weights.safetensors").write_bytes(b"old")

    def dies(directory: Path) -> None:
        (directory / "weights.safetensors").write_bytes(b"ne")
        raise KeyboardInterrupt  # the process is stopped while writing

    ckpt.write_checkpoint(tmp_path, 2, good, {"step": 2})
    with pytest.raises(KeyboardInterrupt):
        ckpt.write_checkpoint(tmp_path, 4, dies, {"step": 4})
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step-000002" and ckpt.read_trainer_state(latest)["step"] == 2
    root = tmp_path / "checkpoints"
    assert not (root / "step-000004").exists()
    (root / ".step-000004.x1y2.tmp").mkdir()  # what a process killed outright (no cleanup) leaves
    (root / ".latest.x1y2.tmp").write_text("step-000004\n")
    ckpt.write_checkpoint(tmp_path, 4, good, {"step": 4})  # the next save clears the debris
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000004"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002", "step-000004"]
