"""What a run costs and what it is told: a warmup longer than a short run is clipped with a note,
`--dry-run` prints the plan and writes nothing, `--profile-memory` logs the phases measured by
the operating system, the activation estimate matches what autograd really keeps, and
recomputation is switched on when the estimate does not fit."""

from __future__ import annotations

import json

import pytest
import torch

from minicpm.training.distributed import Processes
from minicpm.training.lora import LoraSpec, add_lora
from minicpm.training.memory import (
    choose_recomputation,
    memory_estimate,
    probe_activations,
    saved_bytes,
)
from minicpm.training.model_setup import _frozen_linears_in_bf16
from minicpm.training.profile import MemoryProfile, resident
from minicpm.training.recipe import load_recipe
from tests.conftest import random_model, variant_config
from tests.test_training_sft import DATA, base, train  # noqa: F401  (base: the module's checkpoint)

QUICK = ["train.batch_size=2", "train.micro_batch_size=2", "train.threads=1", f"data.train={DATA}"]


def test_a_warmup_longer_than_the_run_becomes_a_tenth_of_it():
    recipe = load_recipe("sft", None, ["train.steps=30", "data.train=x.json"])  # the default warmup is 100 steps
    note = recipe.fit_warmup()
    assert recipe.schedule.warmup_steps == 3 and "schedule.warmup_steps (100)" in note and "0 to 29" in note
    recipe.validate()
    fits = load_recipe("sft", None, ["train.steps=300"])
    assert fits.fit_warmup() is None and fits.schedule.warmup_steps == 100


def test_short_run_with_the_default_warmup_trains(base, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    done = train("sft", f"model.path={base}", *QUICK, "train.steps=2", "--out", str(run))
    assert "warming up over 0 steps" in done.stdout
    assert "warmup_steps: 0" in (run / "recipe.yaml").read_text()


def test_dry_run_prints_the_plan_and_writes_nothing(base, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    done = train("sft", f"model.path={base}", *QUICK, "train.steps=5", "--dry-run", "--out", str(run))
    for part in ("M parameters", "trainable", "tokens per step", "optimizer state", "activations",
                 "logits and loss", "dry run: nothing trained or written"):
        assert part in done.stdout, done.stdout
    assert not run.exists()


def test_profile_memory_logs_each_phase(base, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    done = train("sft", f"model.path={base}", *QUICK, "train.steps=2", "train.log_every=1", "--profile-memory",
                 "--out", str(run))
    assert "memory by phase" in done.stdout
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    memory = [r["memory"] for r in records if "memory" in r]
    assert len(memory) == 1
    phases = memory[0]["phases"]
    assert list(phases) == ["runtime", "weights", "data", "optimizer and setup", "forward (activations)",
                            "logits and loss", "backward", "optimizer state", "allocator (freed, kept)",
                            "later steps"]
    assert phases["runtime"]["kept_mb"] > 50 and phases["weights"]["kept_mb"] > 0
    assert memory[0]["peak_mb"] >= max(p["peak_mb"] for p in phases.values()) > 0
    steps = [r for r in records if "loss" in r]
    assert all(r["memory_mb"] <= memory[0]["peak_mb"] + 1 for r in steps)


def touched_mapping(nbytes: int):
    """Anonymous memory of our own, every page written: resident until closed. (Not malloc: a
    large block may come from a free hole of the heap that earlier tests left, and go back to it,
    still resident, when freed.)"""
    import mmap

    memory = mmap.mmap(-1, nbytes)
    for offset in range(0, nbytes, mmap.PAGESIZE):
        memory[offset] = 1
    return memory


def test_a_phase_counts_what_it_keeps_and_its_peak():
    profile = MemoryProfile()
    profile.enter("big")
    kept = touched_mapping(64 * 2**20)  # 64 MB kept
    transient = touched_mapping(128 * 2**20)  # 128 MB returned before the phase ends
    transient.close()
    profile.leave()
    big = profile.phases["big"]
    assert 60 * 2**20 < big["kept"] < 70 * 2**20
    assert big["peak"] >= resident()[0] + 100 * 2**20  # the transient raised the peak
    kept.close()


@pytest.mark.parametrize("bf16", [False, True])
def test_the_activation_estimate_is_what_autograd_keeps(bf16):
    model = random_model(variant_config("1b"), seed=0).train()
    add_lora(model, LoraSpec(r=4), seed=0)
    if bf16:
        _frozen_linears_in_bf16(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    per_token, per_layer = probe_activations(model, bf16)
    estimate = model.config.num_hidden_layers * (ids.numel() * per_token + per_layer)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # the whole decoder, no loss
        measured = saved_bytes(model, lambda: model(ids, hidden=True))
    assert per_token > model.config.hidden_size * 4  # at least a layer's input
    assert abs(estimate - measured) <= 0.1 * measured, (estimate, measured)


def test_bf16_frozen_base_gives_the_same_loss_without_weight_casts():
    results = []
    for bf16_base in (False, True):
        model = random_model(variant_config("2b"), seed=0).train()
        add_lora(model, LoraSpec(r=4, dropout=0.0), seed=0)
        if bf16_base:
            _frozen_linears_in_bf16(model)
        ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids)
        results.append(logits)
        per_layer = probe_activations(model, bf16=True)[1]
        # an fp32 base is cast to bf16 at every forward pass, and the copy kept for the backward pass
        assert (per_layer > 0) != bf16_base
    assert torch.equal(results[0], results[1])


def test_recomputation_is_chosen_when_the_estimate_does_not_fit():
    from minicpm.training.tasks import PretrainTask

    class Windows:  # a stream of tokens, as PretrainTask reads packed shards
        num_tokens = 10_000

    recipe = load_recipe("pretrain", None, ["data.seq_len=64", "train.micro_batch_size=4"])
    model = random_model(variant_config("2b"), seed=0).train()
    task = PretrainTask(Windows(), 64)
    need = memory_estimate(model, recipe, 4, task.width(), recompute=False)
    assert choose_recomputation(model, recipe, Processes(), task, available=2 * need["total"]) is None
    assert model.gradient_checkpointing is False and recipe.train.activation_checkpointing is False
    note = choose_recomputation(model, recipe, Processes(), task, available=1.0)
    assert "recomputed" in note and model.gradient_checkpointing and recipe.train.activation_checkpointing
    with_recompute = memory_estimate(model, recipe, 4, task.width())
    assert with_recompute["activations"] < need["activations"]


@pytest.mark.parametrize("autocast", [False, True])
def test_a_quantized_frozen_weight_is_not_kept_for_the_backward_pass(autocast):
    import torch.nn.functional as F

    from minicpm.quantization import QuantizedLinear

    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(96, 256, generator=g) * 0.05)
    layer = QuantizedLinear.from_float(linear, 4, 64)
    x = torch.randn(3, 7, 256, generator=g, requires_grad=True)
    r = torch.randn(3, 7, 96, generator=g)
    results = []
    # the plain way (the layer's own path before: F.linear on the dequantized weight), then the layer
    for product in (lambda x: F.linear(x, layer.stored_weight()).to(x.dtype), layer):
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = product(x)
        (y.float() * r).sum().backward()
        results.append((y, x.grad.clone()))
    (want, want_grad), (got, got_grad) = results
    assert got.dtype == want.dtype and torch.equal(got, want) and torch.equal(got_grad, want_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        kept = saved_bytes(layer, lambda: layer(x))
    assert kept < layer.stored_weight().numel() * 2 / 4  # not the weight (bf16 or fp32), only small things


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_a_bf16_base_loads_as_stored_into_the_same_weights_as_an_fp32_load(method, tmp_path):
    from minicpm.formats import load_checkpoint
    from minicpm.quantization import quantize_model
    from minicpm.training.model_setup import _float_directory, build_trainable_model
    from tests.conftest import save_tiny_checkpoint

    path = save_tiny_checkpoint(tmp_path)  # bf16 on disk
    assert _float_directory(path)  # so the run loads it as stored, not as fp32
    recipe = load_recipe("sft", None, [f"model.path={path}", f"train.method={method}", "data.train=x.json",
                                       "train.precision=bf16"])
    model, _ = build_trainable_model(recipe, torch.device("cpu"))
    # what loading in the fp32 master dtype, then casting, gives
    reference, _ = load_checkpoint(path, dtype="float32")
    reference.requires_grad_(False)
    if method == "qlora":
        quantize_model(reference, bits=recipe.lora.quant_bits, group_size=recipe.lora.quant_group_size, head="bf16")
    add_lora(reference, LoraSpec(r=recipe.lora.r, alpha=recipe.lora.alpha, dropout=recipe.lora.dropout,
                                 targets=recipe.lora.targets), seed=recipe.seed)
    _frozen_linears_in_bf16(reference)
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    assert model.model.norm.weight.dtype == torch.float32


def file_mappings(directory) -> list[tuple[int, int]]:
    """Address ranges of this process mapped from files under `directory` (/proc/self/maps)."""
    from pathlib import Path

    root = str(Path(directory).resolve())
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(root):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="/proc/self/maps")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_lora_base_holds_no_view_of_the_checkpoint_files(dtype, tmp_path):
    """A weight left as a view of the checkpoint's file mapping keeps the mapping, and every page
    read from it while loading, resident for the whole run (a float32 SmolLM2: ~400 MB)."""
    from minicpm.training.model_setup import build_trainable_model
    from tests.conftest import save_tiny_checkpoint

    path = save_tiny_checkpoint(tmp_path, dtype=dtype)
    recipe = load_recipe("sft", None, [f"model.path={path}", "train.method=lora", "data.train=x.json",
                                       "train.precision=bf16"])
    model, _ = build_trainable_model(recipe, torch.device("cpu"))
    mapped = file_mappings(path)
    views = [name for name, p in model.named_parameters()
             if any(start <= p.data_ptr() < end for start, end in mapped)]
    assert views == []
    assert model.model.norm.weight.dtype == torch.float32  # the master dtype (an fp32 file's own)


def test_the_trainer_gives_the_heap_back_after_each_micro_batch(base, tmp_path, monkeypatch):  # noqa: F811
    """glibc keeps a micro-batch's freed activations in its heap (kernels/allocator.py): handed
    back after each backward pass, two steps of two micro-batches trim four times."""
    from minicpm.training import run, trainer

    calls = []
    monkeypatch.setattr(trainer, "return_free_heap", lambda: calls.append(1) or True)
    monkeypatch.setattr(run, "apply_heap_policy", lambda default: default)  # not this test process's heap
    recipe = load_recipe("sft", None, [f"model.path={base}", "train.batch_size=4", "train.micro_batch_size=2",
                                       f"data.train={DATA}", "train.steps=2", "schedule.warmup_steps=0",
                                       f"out={tmp_path / 'run'}"])
    recipe.validate()
    run.train(recipe, echo=lambda *a, **k: None)
    assert len(calls) == 4
