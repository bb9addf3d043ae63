"""The MiniCPM training recipe's pieces: the WSD and cosine schedules, muP init and lr groups."""

from __future__ import annotations

import math

import pytest
import torch

from minicpm.errors import MiniCPMError
from minicpm.training.mup import (
    hidden_matrices,
    mup_init,
    param_groups,
    set_learning_rate,
    width_multiplier,
)
from minicpm.training.schedules import WSD, Cosine, as_factor
from tests.conftest import random_model, variant_config


def test_wsd_phases():
    s = WSD(peak_lr=0.01, warmup_steps=10, decay_start=80, decay_steps=20, final_ratio=0.01)
    assert s(0) == pytest.approx(0.001) and s(9) == pytest.approx(0.01)  # linear warmup
    assert all(s(step) == 0.01 for step in range(10, 80))  # stable
    decay = [s(step) for step in range(80, 100)]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly decreasing
    assert decay[-1] == pytest.approx(0.0001) and s(500) == pytest.approx(0.0001)  # the floor
    # exponential: equal steps multiply the rate by the same factor
    ratios = [b / a for a, b in zip(decay, decay[1:])]
    assert max(ratios) == pytest.approx(min(ratios))


@pytest.mark.parametrize("shape", ["exp", "linear", "cosine"])
def test_wsd_decay_shapes_end_at_the_floor(shape):
    s = WSD(1.0, 0, decay_start=50, decay_steps=50, final_ratio=0.1, decay_shape=shape)
    assert s(49) == 1.0 and s(99) == pytest.approx(0.1)
    assert 0.1 < s(74) < 1.0


def test_decay_branches_share_the_stable_phase():
    """One stable run, decayed at two budgets: identical until the earlier decay starts."""
    short = WSD.for_budget(0.01, total_steps=1000, warmup_steps=50, decay_fraction=0.1)
    long = WSD.for_budget(0.01, total_steps=3000, warmup_steps=50, decay_fraction=0.1)
    assert short.decay_start == 900 and long.decay_start == 2700
    assert [short(s) for s in range(900)] == [long(s) for s in range(900)]
    assert short(999) == pytest.approx(0.01 * 0.01) and long(999) == 0.01


def test_cosine():
    s = Cosine(peak_lr=1.0, warmup_steps=10, total_steps=110, final_ratio=0.1)
    assert s(9) == pytest.approx(1.0)
    assert s(59) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s(109) == pytest.approx(0.1) and s(1000) == pytest.approx(0.1)


@pytest.mark.parametrize("kwargs", [
    dict(peak_lr=0, warmup_steps=1, decay_start=None),
    dict(peak_lr=1, warmup_steps=10, decay_start=5, decay_steps=3),
    dict(peak_lr=1, warmup_steps=0, decay_start=5, decay_steps=0),
    dict(peak_lr=1, warmup_steps=0, decay_start=5, decay_steps=5, decay_shape="step"),
    dict(peak_lr=1, warmup_steps=0, decay_start=5, decay_steps=5, final_ratio=0),
])
def test_bad_schedules_are_clear_errors(kwargs):
    with pytest.raises(MiniCPMError):
        WSD(**kwargs)


def test_lambda_lr_follows_the_schedule():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.5)
    s = WSD(0.5, 2, decay_start=4, decay_steps=2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, as_factor(s, 0.5))
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([s(i) for i in range(6)])


def test_mup_init_scales_hidden_matrices_with_width():
    config = variant_config("2b", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                            num_key_value_heads=4, dim_model_base=64, initializer_range=0.1)
    model = random_model(config)
    mup_init(model, seed=0)
    assert width_multiplier(config) == 4.0
    hidden = torch.cat([p.flatten() for _, p in hidden_matrices(model)])
    assert hidden.std().item() == pytest.approx(0.1 / 2, rel=0.02)  # 0.1 / sqrt(256 / 64)
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(0.1, rel=0.05)
    assert torch.all(model.model.norm.weight == 1)


def test_param_groups_scale_hidden_lr_and_keep_norms_undecayed():
    config = variant_config("128k")  # untied head
    model = random_model(config).requires_grad_(True)  # loaded models come frozen
    groups = {g["name"]: g for g in param_groups(model, lr=0.01, weight_decay=0.1)}
    m = width_multiplier(config)
    assert groups["hidden"]["lr"] == pytest.approx(0.01 / m) and groups["hidden"]["weight_decay"] == 0.1
    assert groups["matrices"]["lr"] == 0.01  # embedding and the untied head
    assert groups["vectors"]["weight_decay"] == 0.0
    n_params = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n_params == sum(p.numel() for p in model.parameters())  # every parameter exactly once
    model.model.norm.weight.requires_grad_(False)
    assert all(p is not model.model.norm.weight for g in param_groups(model, 0.01) for p in g["params"])
    opt = torch.optim.AdamW(list(groups.values()))
    set_learning_rate(opt, 0.002)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.002 / m, 0.002, 0.002])


@pytest.mark.parametrize("flags,device,asked,expected,noted", [
    ({"avx2", "fma"}, "cpu", "auto", "fp32", True),         # no bf16 instructions: fp32, said
    ({"avx512f", "avx512_bf16"}, "cpu", "auto", "bf16", False),
    ({"avx2", "amx_bf16"}, "cpu", "auto", "bf16", False),
    ({"avx2"}, "meta", "auto", "bf16", False),              # not a CPU: its own arithmetic
    ({"avx2"}, "cpu", "bf16", "bf16", False),               # asked for: kept
    ({"avx512_bf16"}, "cpu", "fp32", "fp32", False),
])
def test_auto_precision_follows_the_hardware(monkeypatch, flags, device, asked, expected, noted):
    from minicpm.kernels import linear
    from minicpm.training.recipe import load_recipe
    from minicpm.training.run import bf16_is_native

    monkeypatch.setattr(linear, "cpu_flags", lambda: set(flags))
    monkeypatch.setattr(linear, "is_x86", lambda: True)
    linear.bf16_is_native.cache_clear()
    try:
        recipe = load_recipe("pretrain", overrides=[f"train.precision={asked}"])
        note = recipe.fit_precision(bf16_is_native(torch.device(device)))
    finally:
        monkeypatch.undo()
        linear.bf16_is_native.cache_clear()
    assert recipe.train.precision == expected and (note is not None) == noted
    if noted:
        assert "train.precision=bf16" in note


def test_default_precision_is_auto_and_a_wrong_one_is_named():
    from minicpm.training.recipe import load_recipe

    assert load_recipe("sft").train.precision == "auto"
    with pytest.raises(MiniCPMError, match="train.precision must be auto, bf16 or fp32, got 'fp16'"):
        load_recipe("pretrain", overrides=["train.precision=fp16", "data.train=x",
                                           "model.tokenizer=t"]).validate()
