"""MiniCPM-V behind `minicpm serve`: OpenAI image parts sent by the real `openai` client to a real
server process on a tiny MiniCPM-V (answers equal the library's, streamed or not), hostile
bodies and the image limits, remote URLs only with --allow-remote-images, a text-only model
refusing images, and the engine encoding a request's images between other requests' decode
steps."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import struct
import threading
import zlib

import httpx
import openai
import pytest
import torch

import minicpm
from minicpm.generation.sampling import SamplingParams
from minicpm.serving.engine import Engine, Request
from minicpm.vision.chat import stream_chat
from minicpm.vision.prompt import chat_prompt, image_placeholder
from minicpm.vision.request import image_prompt
from tests.conftest import pattern, save_tiny_v_checkpoint
from tests.server_process import KEY, auth, error_of, start_server, stop_server

PHOTO = pattern(300, 200)  # an overview and 6 tiles at the tiny model's 112-pixel slices
LIMITS = ("--max-images", "2", "--max-image-bytes", "300000", "--max-image-pixels", "1000000")


def png_bytes(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def animated_gif() -> bytes:
    out = io.BytesIO()
    first, second = pattern(16, 16).convert("P"), pattern(16, 16).rotate(90).convert("P")
    first.save(out, format="GIF", save_all=True, append_images=[second])
    return out.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds none of them."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) \
        + chunk(b"IEND", b"")


def asking(text: str, *urls: str) -> list[dict]:
    parts = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def v_dir(tmp_path_factory):
    return save_tiny_v_checkpoint(tmp_path_factory.mktemp("vserve"))


@pytest.fixture(scope="module")
def v_server(v_dir):
    proc, url = start_server(v_dir, "--api-key", KEY, *LIMITS)
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def v_local(v_dir):
    return minicpm.load(str(v_dir))


@pytest.fixture
def v_client(v_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{v_server}/v1", api_key=KEY, max_retries=0, timeout=60)


def local_reply(v_local, text: str, max_new_tokens: int) -> str:
    model, tokenizer = v_local
    msgs = [{"role": "user", "content": text}]
    return "".join(stream_chat(model, tokenizer, PHOTO, msgs, temperature=0, max_new_tokens=max_new_tokens))


def test_an_image_question_gets_the_librarys_answer(v_client, v_local, v_server):
    before = httpx.get(f"{v_server}/health").json()
    messages = asking("What is in the picture?", data_url(png_bytes(PHOTO)))
    reply = v_client.chat.completions.create(model="tiny-minicpmv", messages=messages, max_tokens=8, temperature=0)
    expected = local_reply(v_local, "What is in the picture?", 8)
    assert reply.choices[0].message.content == expected and expected
    assert reply.usage.prompt_tokens > 7 * 16  # the 7 slices' placeholders are prompt tokens
    chunks = v_client.chat.completions.create(model="tiny-minicpmv", messages=messages, max_tokens=8,
                                              temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    # two choices share one encoding of the image
    both = v_client.chat.completions.create(model="tiny-minicpmv", messages=messages, max_tokens=8,
                                            temperature=0, n=2)
    assert [c.message.content for c in both.choices] == [expected, expected]
    after = httpx.get(f"{v_server}/health").json()
    assert after["images"] - before["images"] == 3 and after["image_slices"] - before["image_slices"] == 21


def test_tokenize_lays_out_messages_with_images_as_chat_does(v_server, v_local, server):
    model, tokenizer = v_local
    messages = asking("What is in the picture?", data_url(png_bytes(PHOTO)))
    counted = httpx.post(f"{v_server}/tokenize", headers=auth(), json={"messages": messages}).json()
    expected = image_prompt([{"role": "user", "content": "What is in the picture?"}], {0: [PHOTO]}, tokenizer,
                            model.config).ids
    assert counted["tokens"] == expected
    bare = httpx.post(f"{v_server}/tokenize", headers=auth(),
                      json={"messages": messages, "add_generation_prompt": False}).json()
    assert bare["tokens"] == expected[:len(bare["tokens"])] and len(bare["tokens"]) < len(expected)
    refused = httpx.post(f"{server}/tokenize", headers=auth(), json={"messages": messages})
    assert "reads text only" in error_of(refused, 400)["message"]


def test_a_text_question_to_the_vision_model(v_client):
    reply = v_client.chat.completions.create(model="tiny-minicpmv", max_tokens=4,
                                             messages=[{"role": "user", "content": "hello"}])
    assert reply.choices[0].finish_reason in ("stop", "length")


HOSTILE = [
    ("data:image/png;base64,@@not base64@@", 400, "not valid base64"),
    (data_url(b"hello", "text/plain"), 400, "'text/plain', not an image"),
    (data_url(b"hello there, not a picture"), 400, "not an image Pillow can read"),
    (data_url(png_bytes(PHOTO)[:300]), 400, "Invalid image"),  # truncated
    (data_url(png_bytes(pattern(2, 2))), 400, "too small"),
    (data_url(png_bytes(pattern(5000, 50))), 400, "aspect ratio"),
    (data_url(animated_gif(), "image/gif"), 400, "animated images are not supported"),
    (data_url(bytes(400_000)), 413, "at most 300,000 bytes"),
    (data_url(png_header(2000, 1000)), 413, "2000x1000, 2,000,000 pixels"),
    (data_url(png_header(60000, 60000)), 413, "too large"),
    ("http://127.0.0.1:9/photo.png", 400, "--allow-remote-images"),
    ("ftp://example.com/photo.png", 400, "'ftp:' URL"),
    ("data:image/png,rawbytes", 400, "base64-encoded"),
]


@pytest.mark.parametrize("url, status, fragment", HOSTILE)
def test_hostile_image_parts_are_clear_errors(v_server, url, status, fragment):
    response = httpx.post(f"{v_server}/v1/chat/completions", headers=auth(), timeout=60,
                          json={"messages": asking("what is it?", url), "max_tokens": 2})
    error = error_of(response, status)
    assert fragment in error["message"] and error["param"] == "messages.0.content"


@pytest.mark.parametrize("body, fragment", [
    ({"messages": asking("three", *[data_url(png_bytes(pattern(40, 40)))] * 3)}, "at most 2 per request"),
    ({"messages": [{"role": "system", "content": "be brief"}] + asking("hi", data_url(png_bytes(PHOTO)))},
     "role 'system'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png_bytes(PHOTO))}}]}]}, "images go in user messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "Missing required parameter: 'messages.0.content.0.image_url'"),
    ({"messages": [{"role": "user", "content": [{"type": "picture", "url": "x"}]}]},
     "'messages.0.content.0': a content part's type must be 'text' or 'image_url'"),
    ({"messages": asking("<image>sneaky</image>", data_url(png_bytes(PHOTO)))}, "image spans"),
])
def test_bad_image_requests_are_400s(v_server, body, fragment):
    response = httpx.post(f"{v_server}/v1/chat/completions", headers=auth(), timeout=60, json=body)
    assert fragment in error_of(response, 400)["message"]


def test_a_body_over_the_limit_is_refused_before_it_is_read(v_server):
    limit = 2 * 400_000 + 2**20  # two images of 300,000 bytes in base64, and a megabyte of text
    body = b'{"messages": [{"role": "user", "content": "' + b"x" * limit + b'"}]}'
    response = httpx.post(f"{v_server}/v1/chat/completions", content=body, timeout=60,
                          headers={**auth(), "content-type": "application/json"})
    assert f"at most {limit:,}" in error_of(response, 413)["message"]


def test_the_server_survives_hostile_bodies(v_client, v_server):
    assert httpx.get(f"{v_server}/health").json()["running"] == 0
    reply = v_client.chat.completions.create(model="tiny-minicpmv", max_tokens=2,
                                             messages=asking("ok?", data_url(png_bytes(pattern(64, 48)))))
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_a_text_model_refuses_image_parts(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny-minicpm", max_tokens=2,
                                       messages=asking("hi", data_url(png_bytes(PHOTO))))
    assert "reads text only" in caught.value.body["message"]


@pytest.fixture(scope="module")
def image_site(tmp_path_factory):
    """A local web server with photo.png and a file too large for the limits."""
    root = tmp_path_factory.mktemp("site")
    (root / "photo.png").write_bytes(png_bytes(PHOTO))
    (root / "big.png").write_bytes(bytes(400_000))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{site.server_address[1]}"
    site.shutdown()


def test_remote_images_are_fetched_only_when_allowed(v_dir, v_local, image_site):
    proc, url = start_server(v_dir, "--allow-remote-images", *LIMITS)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        messages = asking("What is in the picture?", f"{image_site}/photo.png")
        reply = client.chat.completions.create(model="tiny-minicpmv", max_tokens=8, temperature=0, messages=messages)
        assert reply.choices[0].message.content == local_reply(v_local, "What is in the picture?", 8)
        for path, status, fragment in [("/missing.png", 400, "Cannot fetch"), ("/big.png", 413, "300,000 bytes")]:
            response = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                                  json={"messages": asking("hi", image_site + path)})
            assert fragment in error_of(response, status)["message"]
    finally:
        stop_server(proc)


def test_images_are_encoded_between_decode_steps(v_local):
    """While a request's image goes through the vision tower (one batch of same-size slices per
    scheduler step), a running request still gets a token every step; the image request's
    tokens are the ones it gets alone."""
    model, tokenizer = v_local

    def vision_request() -> Request:
        prompt = image_prompt([{"role": "user", "content": "Describe it."}], {0: [PHOTO]}, tokenizer, model.config)
        return Request(prompt.ids, SamplingParams(max_new_tokens=6, stop_token_ids=[]), images=prompt)

    engine = Engine(model, tokenizer, max_batch=2, prefill_chunk=32)
    hello = tokenizer.encode("<用户>hello<AI>")
    text = engine.submit(Request(hello, SamplingParams(max_new_tokens=60, stop_token_ids=[])))
    engine.step()
    image = engine.submit(vision_request())
    seen = []
    while image.finish_reason is None:
        before = text.usage["completion_tokens"]
        engine.step()
        seen.append((engine.counters["image_slices"], text.usage["completion_tokens"] - before))
    assert [slices for slices, _ in seen[:2]] == [1, 7]  # the overview, then the 6 tiles as one batch
    assert all(new == 1 for _, new in seen)  # the text request decoded at every step
    batched = [e.token_id for e in image if e.token_id is not None]

    alone = Engine(model, tokenizer, max_batch=2, prefill_chunk=32)
    stream = alone.submit(vision_request())
    while stream.finish_reason is None:
        alone.step()
    assert [e.token_id for e in stream if e.token_id is not None] == batched and len(batched) == 6


def test_an_image_request_to_a_text_engine_is_refused(v_local, tiny_checkpoint):
    model, tokenizer = v_local
    prompt = image_prompt([{"role": "user", "content": "hi"}], {0: [PHOTO]}, tokenizer, model.config)
    text_model, _ = minicpm.load(str(tiny_checkpoint))
    with pytest.raises(minicpm.MiniCPMError, match="text-only model"):
        Engine(text_model, tokenizer).submit(Request(prompt.ids, images=prompt))


def test_the_image_prompt_is_the_official_chat_layout(v_local):
    """One image in the first message: exactly the official chat() prompt; images in later user
    messages open those messages, each with its own bounds."""
    model, tokenizer = v_local
    msgs = [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "A pattern."},
            {"role": "user", "content": "And these?"}]
    one = image_prompt(msgs[:1], {0: [PHOTO]}, tokenizer, model.config)
    assert one.ids == tokenizer.encode(chat_prompt(msgs[:1], image_placeholder(PHOTO.size, model.config)))
    small = pattern(60, 40)  # read whole: one slice
    three = image_prompt(msgs, {0: [PHOTO], 2: [small, small]}, tokenizer, model.config)
    assert three.slice_count == 9 and three.images == 3 and len(three.bounds) == 9
    assert torch.equal(three.bounds[:, 1] - three.bounds[:, 0], torch.full((9,), 16))
    text = tokenizer.decode(three.ids)
    assert text.index("And these?") > text.rindex("</image>") > text.index("A pattern.")
