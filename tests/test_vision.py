"""MiniCPM-V 2.0 (minicpm.vision): parity with the official code on a tiny checkpoint in the
released layout (fixtures/minicpmv, README there), slicing against the facts sheet's vectors,
image loading, chat (sampling, beam search, the per-conversation cache) and bad input."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import minicpm
from minicpm.errors import MiniCPMError
from minicpm.vision import (
    MiniCPMV,
    MiniCPMVConfig,
    image_placeholder,
    load_image,
    slice_image,
    to_pixel_values,
)
from minicpm.vision.beam import beam_search
from minicpm.vision.image import sliced_images
from minicpm.vision.prompt import chat_prompt
from tests.conftest import pattern, save_tiny_v_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = FIXTURES / "minicpmv"
EXPECTED = json.loads((REFERENCE / "expected.json").read_text())


def digest(image: Image.Image) -> str:
    return hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def reference():
    model, tokenizer = minicpm.load(str(REFERENCE), dtype="float32")
    return model, load_file(REFERENCE / "expected.safetensors")


# --- parity with the official code ---------------------------------------------------------------
@pytest.mark.parametrize("case", list(EXPECTED["cases"]))
def test_logits_match_the_official_code(reference, case):
    model, expected = reference
    c = EXPECTED["cases"][case]
    images, grid = sliced_images(pattern(*c["size"]), model.config)
    assert grid == c["grid"]
    assert [list(i.size) for i in images] == c["sizes"]
    assert [digest(i) for i in images] == c["sha256"]
    assert image_placeholder(tuple(c["size"]), model.config) == c["placeholder"]
    pixels = [to_pixel_values(i) for i in images]
    with torch.no_grad():
        logits = model(torch.tensor([c["ids"]]), pixel_values=[pixels], image_bound=[torch.tensor(c["bound"])])
    assert logits.dtype == torch.float32 and logits.shape == (1, len(c["ids"]), 320)
    err = (logits[0, expected[f"{case}.rows"]] - expected[f"{case}.logits"]).abs().max()
    assert err < 1e-4, f"{case}: max |logit difference| {err:.2e}"
    if f"{case}.vision" in expected:
        with torch.no_grad():
            features = model.get_vision_embedding(pixels)
        assert (features - expected[f"{case}.vision"]).abs().max() < 1e-4


def test_released_layout_loads_as_stored_in_bf16():
    model, tokenizer = minicpm.load(str(REFERENCE))
    assert isinstance(model, MiniCPMV) and tokenizer is None
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    c = EXPECTED["cases"]["tiles3"]
    pixels = [to_pixel_values(i) for i in sliced_images(pattern(*c["size"]), model.config)[0]]
    with torch.no_grad():
        logits = model(torch.tensor([c["ids"]]), [pixels], [torch.tensor(c["bound"])])[0, -4:]
    expected = load_file(REFERENCE / "expected.safetensors")["tiles3.logits_bf16"]
    assert (logits - expected).abs().max() < 0.05  # bf16 rounding on both sides (0.023 seen); logits reach 1.5


def test_batch_rows_are_independent(reference):
    """Two rows (one with an image, one text only) give what each gives alone."""
    model, _ = reference
    c = EXPECTED["cases"]["upscale"]
    pixels = [to_pixel_values(i) for i in sliced_images(pattern(*c["size"]), model.config)[0]]
    ids = torch.tensor([c["ids"], list(range(3, 3 + len(c["ids"])))])
    with torch.no_grad():
        both = model(ids, [pixels, []], [torch.tensor(c["bound"]), torch.zeros(0, 2)])
        first = model(ids[:1], [pixels], [torch.tensor(c["bound"])])
        second = model.llm(ids[1:])
    assert (both[0] - first[0]).abs().max() < 1e-5
    assert (both[1] - second[0]).abs().max() < 1e-5


# --- slicing and placeholders against the facts sheet ----------------------------------------------
FACTS = [  # (W, H) -> overview, grid [cols, rows], slice size, images (S=448, p=14, at most 9)
    ((448, 448), (448, 448), None, None, 1), ((300, 200), (546, 364), None, None, 1),
    ((1024, 768), (518, 392), [2, 2], (518, 392), 5), ((1920, 1080), (602, 336), [4, 2], (420, 476), 9),
    ((640, 480), (518, 392), [2, 1], (364, 546), 3), ((896, 448), (630, 322), [2, 1], (448, 448), 3),
    ((1344, 1344), (448, 448), [3, 3], (448, 448), 10), ((500, 2000), (224, 896), [1, 4], (448, 448), 5),
    ((4000, 100), (2800, 70), [3, 1], (1624, 126), 4), ((100, 4000), (70, 2828), [1, 3], (126, 1638), 4),
]


@pytest.mark.parametrize("size,overview,grid,tile,count", FACTS)
def test_slicing_geometry_matches_the_facts_sheet(size, overview, grid, tile, count):
    source, tiles, best = slice_image(pattern(*size), max_slice_nums=9, scale_resolution=448, patch_size=14)
    assert source.size == overview and best == grid
    assert 1 + sum(map(len, tiles)) == count
    assert all(t.size == tile for row in tiles for t in row)
    assert len(tiles) == (grid[1] if grid else 0)


@pytest.mark.parametrize("size", list(EXPECTED["geometry"]))
def test_slice_pixels_equal_the_official_ones(size):
    expected = EXPECTED["geometry"][size]
    source, tiles, grid = slice_image(pattern(*map(int, size.split("x"))))
    images = [source] + [t for row in tiles for t in row]
    assert grid == expected["grid"]
    assert [list(i.size) for i in images] == expected["sizes"]
    assert [digest(i) for i in images] == expected["sha256"]


def test_placeholder_layout():
    config = MiniCPMVConfig.from_file(REFERENCE / "config.json")  # query_num 16, S=112
    unit = "<image>" + "<unk>" * 16 + "</image>"
    row = unit * 3
    assert image_placeholder((300, 300), config) == unit + "<slice>" + "\n".join([row] * 3) + "</slice>"
    assert image_placeholder((60, 40), config) == unit
    assert image_placeholder((100, 400), config) == unit + "<slice>" + "\n".join([unit] * 4) + "</slice>"
    assert image_placeholder((300, 300), config.replace(slice_mode=False)) == unit
    msgs = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"}]
    assert chat_prompt(msgs, "PH") == "<用户>PH\nq1<AI>a1<用户>q2<AI>"


def test_sincos_grid_is_column_first():
    from minicpm.vision.resampler import sincos_table

    table = sincos_table(8, 2, 3)  # dim 8: [sin, cos](col w0, col w1), [sin, cos](row ...)
    assert table.shape == (6, 8)
    position = 1 * 3 + 2  # row 1, column 2
    assert table[position, 0].item() == pytest.approx(np.sin(2.0), abs=1e-6)
    assert table[position, 4].item() == pytest.approx(np.sin(1.0), abs=1e-6)


# --- opening images ------------------------------------------------------------------------------
def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kw)
    return out.getvalue()


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = _encoded(pattern(40, 20), "JPEG", exif=exif)
    assert Image.open(io.BytesIO(data)).size == (40, 20)
    assert load_image(data).size == (20, 40)


def test_transparency_lands_on_white_and_modes_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (8, 8), (0, 0, 0, 128))
    assert load_image(half).getpixel((0, 0)) == (127, 127, 127)
    assert load_image(Image.new("L", (8, 8), 77)).getpixel((3, 3)) == (77, 77, 77)
    palette = pattern(16, 16).convert("P")
    assert load_image(palette).mode == "RGB"
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(path)  # 16-bit grayscale
    assert load_image(path).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("bad,message", [
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not an image"),
    (_encoded(pattern(64, 64), "PNG")[:200], "readable"),
    (b"just some text, not a picture", "not an image"),
    (Image.new("RGB", (1, 1)), "too small"),
    (Image.new("RGB", (20000, 100)), "aspect ratio"),
    ("/nonexistent/photo.jpg", "not found"),
    (42, "PIL image, a file path or bytes"),
])
def test_bad_images_are_clear_errors(bad, message):
    with pytest.raises(MiniCPMError, match=message):
        load_image(bad)


def test_an_animated_gif_is_refused_a_still_one_read():
    frames = [pattern(16, 16).convert("P"), Image.new("P", (16, 16), 3)]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(MiniCPMError, match="animated"):
        load_image(out.getvalue())
    assert load_image(_encoded(frames[0], "GIF")).size == (16, 16)


# --- chat ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A random tiny MiniCPM-V with the fixture tokenizer's vocabulary, saved in shards and
    loaded back through minicpm.load."""
    path = save_tiny_v_checkpoint(tmp_path_factory.mktemp("v"), max_shard_bytes=1_500_000)
    assert (path / "model.safetensors.index.json").exists()
    return minicpm.load(str(path), dtype="float32")


@pytest.fixture
def encodes(chat_model) -> list[int]:
    """Counts the vision tower's runs (a forward hook on its patch embedding)."""
    calls = [0]
    handle = chat_model[0].vpm.patch_embed.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    yield calls
    handle.remove()


def test_chat_samples_with_the_official_defaults(chat_model):
    model, tokenizer = chat_model
    model.reset_conversation()
    msgs = [{"role": "user", "content": "What is in the picture?"}]
    answer, context, config = model.chat(image=pattern(300, 200), msgs=msgs, context=None,
                                         tokenizer=tokenizer, max_new_tokens=12, seed=3)
    assert config == {"top_p": 0.8, "top_k": 100, "temperature": 0.7, "repetition_penalty": 1.05, "seed": 3}
    assert isinstance(answer, str) and answer == answer.strip()
    assert context == msgs + [{"role": "assistant", "content": answer}] and len(msgs) == 1
    model.reset_conversation()
    again, _, _ = model.chat(image=pattern(300, 200), msgs=msgs, tokenizer=tokenizer, max_new_tokens=12, seed=3)
    assert again == answer


def test_follow_up_reuses_the_image_features_and_cache(chat_model, encodes):
    model, tokenizer = chat_model
    image = pattern(300, 200)
    calls = encodes
    model.reset_conversation()
    first = [{"role": "user", "content": "Describe it."}]
    answer, context, _ = model.chat(image=image, msgs=first, tokenizer=tokenizer, sampling=False, max_new_tokens=6)
    assert calls[0] == 2  # the overview, then its 6 tiles (one size) as one batch
    encodes = calls[0]
    follow = context + [{"role": "user", "content": "And the colours?"}]
    kept, _, _ = model.chat(image=image.copy(), msgs=follow, tokenizer=tokenizer, sampling=False, max_new_tokens=6)
    assert calls[0] == encodes  # same pixels: not encoded again
    model.reset_conversation()
    fresh, _, _ = model.chat(image=image, msgs=follow, tokenizer=tokenizer, sampling=False, max_new_tokens=6)
    assert calls[0] > encodes and kept == fresh  # the kept cache gives what a fresh run gives


def test_beam_search_with_one_beam_is_greedy(chat_model):
    model, tokenizer = chat_model
    ids = tokenizer.encode("<用户>hello there<AI>")
    cache = model.llm.new_cache(1, 64)
    with torch.no_grad():
        model.llm(torch.tensor([ids[:-1]]), cache=cache)
    beam = beam_search(model.llm, cache, ids[-1], num_beams=1, max_new_tokens=8, eos_ids={2})
    greedy = model.llm.generate(ids, max_new_tokens=8, temperature=0, stop_token_ids=[2])
    assert beam == greedy


def test_beam_search_matches_transformers(chat_model):
    """Our beam search (KV cache reordered per step) against transformers' on the same decoder,
    fed the same merged embeddings, in a Llama model with the scalings folded in."""
    transformers = pytest.importorskip("transformers")
    from minicpm.formats.llama import to_llama

    model, tokenizer = chat_model
    config, state = to_llama(model.config.llm, model.llm.state_dict())
    hf_config = transformers.LlamaConfig(**{k: v for k, v in config.to_hf().items()
                                            if k not in ("architectures", "torch_dtype")})
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    hf.load_state_dict(state)
    image = pattern(120, 90)
    prompt = chat_prompt([{"role": "user", "content": "hi"}], image_placeholder(image.size, model.config))
    ids = tokenizer.encode(prompt)
    model.reset_conversation()
    with torch.no_grad():
        features = model.get_vision_embedding([to_pixel_values(i) for i in sliced_images(image, model.config)[0]])
        embeds = model.embed(torch.tensor([ids]), [features], [_bounds(ids)])
        theirs = hf.generate(inputs_embeds=embeds, num_beams=3, repetition_penalty=1.2, max_new_tokens=10,
                             do_sample=False, pad_token_id=0, eos_token_id=2)[0].tolist()
    ours, _, _ = model.chat(image=image, msgs=[{"role": "user", "content": "hi"}], tokenizer=tokenizer,
                            sampling=False, max_new_tokens=10)
    assert ours == tokenizer.decode([t for t in theirs if t not in (0, 2)]).strip()


def _bounds(ids: list[int]) -> torch.Tensor:
    from minicpm.vision.prompt import image_bounds

    return image_bounds(torch.tensor(ids), 101, 102)


@pytest.mark.parametrize("msgs,message", [
    ([{"role": "assistant", "content": "hi"}], "first message must be the user's"),
    ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "content must be a string"),
    ([{"role": "system", "content": "x"}], "role 'system'"),
    ([], "non-empty list"),
    ([{"role": "user", "content": "<image>look</image>"}], "image spans"),
])
def test_bad_messages_are_clear_errors(chat_model, msgs, message):
    model, tokenizer = chat_model
    with pytest.raises(MiniCPMError, match=message):
        model.chat(image=pattern(60, 40), msgs=msgs, tokenizer=tokenizer, max_new_tokens=2)


def test_text_only_chat_without_an_image(chat_model):
    model, tokenizer = chat_model
    answer, _, _ = model.chat(image=None, msgs=[{"role": "user", "content": "hi"}], tokenizer=tokenizer,
                              max_new_tokens=4, seed=0)
    assert isinstance(answer, str)


def test_an_image_to_a_text_only_model_is_a_clear_error(tiny_checkpoint):
    model, tokenizer = minicpm.load(str(tiny_checkpoint))
    with pytest.raises(MiniCPMError, match="text-only model"):
        model.chat(image=pattern(60, 40), msgs=[{"role": "user", "content": "hi"}], tokenizer=tokenizer)


def test_info_describes_the_vision_model():
    from minicpm.formats.info import describe

    facts = describe(str(REFERENCE))
    assert facts["architecture"].startswith("MiniCPMV")
    assert facts["parameters"].startswith("1.4 M")  # 1,375,262: every stored tensor counted
    assert "2 blocks (last of 3 dropped)" in facts["vision tower"]


def test_released_sizes_count_the_released_parameters():
    raw = json.loads((REFERENCE / "config.json").read_text())
    for key in ("vision_config", "vision_encoder"):
        raw.pop(key)
    raw.update(vocab_size=122753, hidden_size=2304, intermediate_size=5760, num_hidden_layers=40,
               num_attention_heads=36, num_key_value_heads=36, query_num=64, scale_resolution=448)
    config = MiniCPMVConfig.from_hf(raw)
    assert config.vision.hidden_size == 1152 and config.vision_layers == 26
    assert config.num_parameters() == 3_434_965_792  # the released index: 6,869,931,584 bf16 bytes
