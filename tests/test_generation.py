"""The token generator and sampling: greedy equals argmax of full forwards, batches equal single
rows, seeds reproduce, each filter does what it says, bad parameters are clear errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import random_model, variant_config

from minicpm.errors import MiniCPMError
from minicpm.generation import SamplingParams, TokenGenerator, sample_next
from minicpm.generation.sampling import apply_repetition_penalty
from minicpm.generation.text import StopStringFilter

NO_STOP = {"stop_token_ids": []}


@pytest.fixture(scope="module")
def model():
    return random_model(variant_config("1b"), seed=11)


def _greedy_by_full_forward(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_equals_argmax_of_full_forward(variant):
    model = random_model(variant_config(variant), seed=2)
    prompt = [7, 100, 3, 55, 21]
    assert model.generate(prompt, max_new_tokens=12, **NO_STOP) == _greedy_by_full_forward(model, prompt, 12)


def test_batch_generation_equals_rows(model):
    prompts = [[5, 9, 33, 100, 7, 8, 9], [44, 12, 13], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    together = model.generate(prompts, max_new_tokens=9, **NO_STOP)
    assert together == [model.generate(p, max_new_tokens=9, **NO_STOP) for p in prompts]
    as_tensor = model.generate(torch.tensor([prompts[0]]), max_new_tokens=4, **NO_STOP)
    assert as_tensor.tolist() == [together[0][:4]]


def test_chunked_prefill_equals_one_pass(model):
    prompt = list(range(3, 60))
    whole = list(TokenGenerator(model, [prompt], SamplingParams(max_new_tokens=6, **NO_STOP)))
    chunked = list(TokenGenerator(model, [prompt], SamplingParams(max_new_tokens=6, **NO_STOP), prefill_chunk=8))
    assert whole == chunked


def test_stop_token_ends_a_row_but_not_the_batch(model):
    free = model.generate([[4, 5, 6], [9, 9, 2]], max_new_tokens=8, **NO_STOP)
    stop = free[0][2]  # the third token of row 0 becomes a stop token
    out = model.generate([[4, 5, 6], [9, 9, 2]], max_new_tokens=8, stop_token_ids=[stop])
    def until_stop(row):  # the stop token is included, nothing after it
        return row[:row.index(stop) + 1] if stop in row else row

    assert out == [until_stop(free[0]), until_stop(free[1])]
    assert len(out[0]) <= 3


def test_seeded_sampling_reproduces(model):
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.95, **NO_STOP)
    assert model.generate([3, 4], seed=7, **kw) == model.generate([3, 4], seed=7, **kw)
    runs = {tuple(model.generate([3, 4], seed=s, **kw)) for s in range(5)}
    assert len(runs) > 1  # different seeds explore different continuations


def test_degenerate_filters_reduce_to_greedy(model):
    greedy = model.generate([8, 1, 30], max_new_tokens=10, **NO_STOP)
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=0.999)):
        assert model.generate([8, 1, 30], max_new_tokens=10, temperature=1.5, seed=1, **kw, **NO_STOP) == greedy


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    params = SamplingParams(temperature=1.0, top_p=0.8)
    gen = torch.Generator().manual_seed(0)
    drawn = {int(sample_next(probs.log(), params, gen)) for _ in range(400)}
    assert drawn == {0, 1}


def test_top_k_and_min_p_filter():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    top2 = {int(sample_next(logits, SamplingParams(temperature=1.0, top_k=2), gen)) for _ in range(300)}
    assert top2 == {0, 1}
    # min_p 0.3: keep tokens with p >= 0.3 * p_max, i.e. logits within ln(1/0.3) = 1.2 of the max
    minp = {int(sample_next(logits, SamplingParams(temperature=1.0, min_p=0.3), gen)) for _ in range(300)}
    assert minp == {0, 1}


def test_sampling_follows_the_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits.expand(2000, 3), SamplingParams(temperature=2.0), gen)])
    freq = torch.bincount(draws.flatten(), minlength=3).float() / draws.numel()
    torch.testing.assert_close(freq, torch.softmax(logits[0] / 2.0, -1), atol=0.02, rtol=0)


def test_repetition_penalty_matches_transformers():
    transformers = pytest.importorskip("transformers")
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(3))
    history = torch.tensor([[1, 5, 5, 7], [0, 49, 20, 3]])
    expected = transformers.RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    seen = torch.zeros(2, 50, dtype=torch.bool).scatter_(1, history, True)
    ours = apply_repetition_penalty(logits, seen, 1.3)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    assert not torch.equal(ours, logits)


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be"),
    (dict(min_p=1.0), "min_p"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(num_beams=4), "beam search"),
    (dict(top_q=0.5), "unknown generation argument.*top_q"),
])
def test_bad_parameters_are_clear_errors(model, bad, message):
    with pytest.raises(MiniCPMError, match=message):
        model.generate([1, 2, 3], **bad)


def test_hf_style_arguments(model):
    greedy = model.generate([5, 6], max_new_tokens=5, **NO_STOP)
    assert model.generate([5, 6], max_new_tokens=5, do_sample=False, temperature=0.7, **NO_STOP) == greedy
    params = SamplingParams.from_kwargs(do_sample=True, eos_token_id=7)
    assert params.temperature == 1.0 and params.stop_token_ids == [7]


def test_overlong_prompt_is_cut_with_a_warning(model):
    context = model.config.max_position_embeddings
    prompt = list(range(1, context + 20))
    with pytest.warns(UserWarning, match=f"prompt has {len(prompt)} tokens.*dropped the first 20"):
        out = model.generate(prompt, max_new_tokens=1, **NO_STOP)
    assert out == model.generate(prompt[20:], max_new_tokens=1, **NO_STOP)


def test_max_new_tokens_is_capped_by_the_context(model):
    context = model.config.max_position_embeddings
    with pytest.warns(UserWarning, match="does not fit"):
        out = model.generate(list(range(1, context - 4)), max_new_tokens=50, **NO_STOP)
    assert len(out) == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(model.generate([1, 2], max_new_tokens=5, **NO_STOP)) == 5


def test_empty_or_malformed_input_ids(model):
    with pytest.raises(MiniCPMError, match="at least one token"):
        model.generate([[1, 2], []])
    with pytest.raises(MiniCPMError, match="list of ints"):
        model.generate(["hello"])


# --- stop strings across token boundaries -------------------------------------------------------

def _feed(stops, pieces):
    f = StopStringFilter(stops)
    shown = [f.push(p) for p in pieces]
    return shown, f


def test_stop_string_split_over_pieces_is_never_shown():
    shown, f = _feed(["<用户>"], ["Paris is", " the capital.<", "用", "户>more"])
    assert "".join(shown) == "Paris is the capital."
    assert f.stopped and f.flush() == ""


def test_text_that_only_looks_like_a_stop_start_is_released():
    shown, f = _feed(["</end>"], ["a <", "/e", "x> b"])
    assert shown == ["a ", "", "</ex> b"]  # held back while it could still become "</end>"
    assert not f.stopped


def test_held_text_is_flushed_at_the_end():
    shown, f = _feed(["STOP"], ["go ST"])
    assert shown == ["go "] and f.flush() == "ST"


def test_earliest_of_several_stop_strings_wins():
    shown, f = _feed(["world", "lo w"], ["hello world"])
    assert shown == ["hel"] and f.stopped


def test_chat_stops_at_the_end_of_turn_token_even_when_it_is_not_eos(spm_tokenizer_dir):
    """A ChatML turn ends with <|im_end|>; generation must stop there though eos is </s>."""
    from minicpm.generation.text import with_chat_stop_ids
    from minicpm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(spm_tokenizer_dir.parent / "minicpm-chatml")
    end = tokenizer.token_to_id("<|im_end|>")
    assert end is not None and end != tokenizer.eos_token_id
    model = random_model(variant_config("2b", vocab_size=tokenizer.vocab_size))
    params = with_chat_stop_ids(model, tokenizer, SamplingParams())
    assert set(params.stop_token_ids) >= {2, end}
    assert with_chat_stop_ids(model, tokenizer, SamplingParams(stop_token_ids=[7])).stop_token_ids == [7]


def test_prompt_cache_reuses_the_conversation_without_changing_it(model):
    """Greedy replies are identical with and without the cache; later turns run only new tokens."""
    from minicpm.generation.generate import PromptCache

    cache = PromptCache()
    turn1 = [5, 9, 33, 100, 7]
    params = SamplingParams(max_new_tokens=6, **NO_STOP)

    def reply(prompt, prompt_cache):
        gen = TokenGenerator(model, [prompt], params, prompt_cache=prompt_cache)
        return [step[0] for step in gen], gen.reused_tokens

    first, reused = reply(turn1, cache)
    assert reused == 0 and first == reply(turn1, None)[0]
    # the next prompt is the history so far (with the reply) plus a new question
    turn2 = turn1 + first + [44, 12, 13]
    second, reused = reply(turn2, cache)
    assert reused == len(turn1) + len(first) - 1  # the last reply token was never fed back
    assert second == reply(turn2, None)[0]
    # an edited history reuses only the common prefix
    edited = turn1[:3] + [77, 78]
    third, reused = reply(edited, cache)
    assert reused == 3 and third == reply(edited, None)[0]
