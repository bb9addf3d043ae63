"""`minicpm train pretrain` from scratch through the real CLI: muP init and learning rates, the
WSD schedule as logged, decay branches off a stable checkpoint, exact resume, and the run's files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from minicpm.training.recipe import load_recipe
from minicpm.training.shards import pack_corpus
from minicpm.training.tokenizer import train_tokenizer
from tests.conftest import FIXTURES
from tests.test_training_sft import train

WIKI = FIXTURES / "training" / "wiki"
MODEL = ("{hidden_size: 64, intermediate_size: 160, num_hidden_layers: 2, num_attention_heads: 4, "
         "num_key_value_heads: 2, scale_emb: 12, dim_model_base: 16, scale_depth: 1.4, max_position_embeddings: 64}")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pretrain")
    train_tokenizer([WIKI / "wiki.test.raw"], root / "tokenizer", vocab_size=512)
    pack_corpus([WIKI / "wiki.test.raw"], root / "tokenizer", root / "train", log=lambda m: None)
    pack_corpus([WIKI / "wiki.valid.raw"], root / "tokenizer", root / "valid", log=lambda m: None)
    return root


def args(data: Path, *more: str) -> list[str]:
    return [f"model.tokenizer={data / 'tokenizer'}", f"model.config={MODEL}", f"data.train={data / 'train'}",
            "data.seq_len=32", "train.batch_size=8", "train.micro_batch_size=4", "train.log_every=1",
            "schedule.warmup_steps=2", "train.threads=1", "optim.lr=0.02", *more]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_pretraining_from_scratch(data, tmp_path):
    run = tmp_path / "run"
    done = train("pretrain", *args(data, "train.steps=20", f"data.valid={data / 'valid'}", "train.eval_every=10",
                                   "train.eval_batches=2"), "--out", str(run))
    log = records(run)
    steps = [r for r in log if "loss" in r]
    # muP initialisation: logits start near uniform (they are divided by d / d_base = 4)
    assert steps[0]["loss"] == pytest.approx(math.log(512), abs=0.3)
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0
    for r in steps:
        assert r["tokens_per_s"] > 0 and r["memory_mb"] > 0 and r["grad_norm"] > 0 and "eta_s" in r
    evals = [r for r in log if "eval_loss" in r]
    assert [e["step"] for e in evals] == [10, 20] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    # WSD as logged: warmup 2 steps, stable at 0.02, exponential decay over the last 10% (2 steps)
    lrs = [r["lr"] for r in steps]
    assert lrs[:2] == pytest.approx([0.01, 0.02]) and all(lr == pytest.approx(0.02) for lr in lrs[2:18])
    assert lrs[18:] == pytest.approx([0.02 * 0.01 ** 0.5, 0.02 * 0.01])
    assert (run / "loss.png").stat().st_size > 1000 and "decay_shape: exp" in (run / "recipe.yaml").read_text()
    import minicpm

    model, tokenizer = minicpm.load(run / "final")  # a checkpoint like any other: chat works
    reply, _ = model.chat(tokenizer, "The", max_new_tokens=4, temperature=0)
    assert isinstance(reply, str)
    assert "pretrain (full): 0.12 M parameters, 0.12 M trainable" in done.stdout and "memory estimate per process" in done.stdout


def test_mup_learning_rates_and_initialisation(data):
    from minicpm.training.model_setup import build_trainable_model
    from minicpm.training.optimizer_setup import build_optimizer

    recipe = load_recipe("pretrain", None, args(data))
    model, _ = build_trainable_model(recipe, torch.device("cpu"))
    optimizer = build_optimizer(model, recipe)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == {"hidden": pytest.approx(0.02 / 4), "matrices": 0.02, "vectors": 0.02}  # d / d_base = 4
    q = model.model.layers[0].self_attn.q_proj.weight
    assert float(q.detach().std()) == pytest.approx(0.1 / 2, rel=0.1)  # init_std / sqrt(d / d_base)
    assert float(model.model.embed_tokens.weight.detach().std()) == pytest.approx(0.1, rel=0.1)


def test_decay_branch_from_a_stable_checkpoint(data, tmp_path):
    stable, branch = tmp_path / "stable", tmp_path / "branch"
    train("pretrain", *args(data, "train.steps=12", "schedule.decay_fraction=0", "train.save_every=8",
                            "train.keep_checkpoints=0"), "--out", str(stable))
    assert all(r["lr"] == pytest.approx(0.02) for r in records(stable) if r["step"] > 2)  # never decays
    done = train("pretrain", *args(data, "train.steps=12", f"schedule.decay_from={stable / 'checkpoints' / 'step-000008'}"),
                 "--out", str(branch))
    assert "decay branch from" in done.stdout
    log = records(branch)
    assert [r["step"] for r in log] == [9, 10, 11, 12]
    assert [r["lr"] for r in log] == pytest.approx([0.02 * 0.01 ** (k / 4) for k in (1, 2, 3, 4)])
    # it starts from the stable run's state: its step 9 is the stable run's step 9 but for the lr
    assert log[0]["loss"] == pytest.approx(records(stable)[8]["loss"], rel=1e-6)


def test_pretraining_resumes_bitwise(data, tmp_path):
    common = args(data, "train.steps=8", "train.save_every=4")
    train("pretrain", *common, "--out", str(tmp_path / "a"))
    train("pretrain", *common, "train.stop_at=4", "--out", str(tmp_path / "b"))
    train("pretrain", "--resume", "--out", str(tmp_path / "b"))
    a = (tmp_path / "a" / "final" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "final" / "model.safetensors").read_bytes()
    assert [r["loss"] for r in records(tmp_path / "a")] == [r["loss"] for r in records(tmp_path / "b")]


def test_recipe_file_and_overrides(data, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("kind: pretrain\noptim:\n  lr: 0.005\ntrain:\n  steps: 50\n")
    loaded = load_recipe("pretrain", recipe, ["train.steps=7", "schedule.kind=cosine"])
    assert (loaded.optim.lr, loaded.train.steps, loaded.schedule.kind) == (0.005, 7, "cosine")
    printed = train("pretrain", "--recipe", str(recipe), "--print-recipe", "optim.betas=[0.9, 0.99]")
    assert "lr: 0.005" in printed.stdout and "- 0.99" in printed.stdout
    recipe.write_text("kind: pretrain\noptim:\n  learning_rate: 0.005\n")
    bad = train("pretrain", "--recipe", str(recipe), "--print-recipe", check=False)
    assert bad.returncode == 2 and "unknown setting optim.learning_rate" in bad.stderr


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    from tests.conftest import random_model, variant_config

    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    results = []
    for recompute in (False, True):
        model = random_model(variant_config("1b"), seed=0).train().requires_grad_(True)
        model.gradient_checkpointing = recompute
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-7)
