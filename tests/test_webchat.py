"""The web chat page at / in a real headless browser (Debian's chromium, driven by selenium)
against a real `minicpm serve` process: streaming replies, multi-turn history, Stop, errors."""

from __future__ import annotations

import re
import shutil
import tempfile
import time

import httpx
import pytest

from tests.conftest import pattern, save_tiny_checkpoint, save_tiny_v_checkpoint
from tests.server_process import start_server, stop_server

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
KEY = "sk-page"


def serving(checkpoint):
    """A fixture's body: the URL of a server on `checkpoint` while the module's tests run."""
    proc, url = start_server(checkpoint, "--api-key", KEY)
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serving(save_tiny_checkpoint(tmp_path_factory.mktemp("webchat")))


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="minicpm-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait_for(condition, timeout: float = 60, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def open_page(browser, server: str, key: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{server}/")
    browser.execute_script("localStorage.clear()")
    browser.get(f"{server}/")
    field = browser.find_element(By.ID, "api_key")
    field.clear()
    field.send_keys(key)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", field)


def set_field(browser, name: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    field = browser.find_element(By.ID, name)
    field.clear()
    field.send_keys(value)


def ask(browser, text: str) -> None:
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "prompt").send_keys(text)
    browser.find_element(By.ID, "send").click()


def turns(browser, role: str) -> list:
    from selenium.webdriver.common.by import By

    return browser.find_elements(By.CSS_SELECTOR, f".turn.{role}")


def metric(server: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", httpx.get(f"{server}/metrics").text, re.M)
    return float(found.group(1)) if found else 0.0


def test_streams_a_reply_and_keeps_the_history(browser, server):
    from selenium.webdriver.common.by import By

    open_page(browser, server, KEY)
    wait_for(lambda: browser.find_element(By.ID, "model").text == "tiny-minicpm", what="the model name")
    set_field(browser, "temperature", "0")
    set_field(browser, "max_tokens", "12")
    prompt_tokens = metric(server, "minicpm_prompt_tokens_total")
    ask(browser, "Hello there")
    stats = wait_for(lambda: turns(browser, "assistant")[-1].find_element(By.CLASS_NAME, "stats").text,
                     what="the reply's statistics")
    assert re.search(r"\d+ tokens", stats) and "tokens/s" in stats
    reply = turns(browser, "assistant")[-1].find_element(By.CLASS_NAME, "text").text
    assert reply  # the random model says something
    first_prompt = metric(server, "minicpm_prompt_tokens_total") - prompt_tokens

    ask(browser, "And again")
    wait_for(lambda: len(turns(browser, "assistant")) == 2
             and turns(browser, "assistant")[-1].find_element(By.CLASS_NAME, "stats").text, what="second reply")
    second_prompt = metric(server, "minicpm_prompt_tokens_total") - prompt_tokens - first_prompt
    # the second request carried the first question and answer as well
    assert second_prompt > first_prompt + 2
    assert [t.text for t in turns(browser, "user")] == ["Hello there", "And again"]


def test_stop_ends_a_long_reply(browser, server):
    from selenium.webdriver.common.by import By

    open_page(browser, server, KEY)
    set_field(browser, "max_tokens", "200")  # the tiny model holds 256 tokens; 200 take over a second
    for _ in range(3):  # the random model samples its end token now and then: a reply that ended so is asked again
        browser.find_element(By.ID, "new-chat").click()
        cancelled = metric(server, 'minicpm_finished_sequences_total{reason="cancelled"}')
        ask(browser, "Tell me a very long story")
        browser.find_element(By.ID, "stop").click()  # at once: the reply cannot have run 200 tokens yet
        stats = wait_for(lambda: turns(browser, "assistant")[-1].find_element(By.CLASS_NAME, "stats").text,
                         what="the reply to end")
        if not stats.endswith("· stop"):
            break
    assert "stopped" in stats and int(stats.split(" tokens")[0]) < 200
    assert browser.find_element(By.ID, "send").is_enabled()
    # the server saw the request go away and freed its slot
    wait_for(lambda: metric(server, 'minicpm_finished_sequences_total{reason="cancelled"}') == cancelled + 1,
             timeout=10, what="the server to count the cancellation")
    wait_for(lambda: httpx.get(f"{server}/health").json()["running"] == 0, timeout=10, what="a free slot")


def test_wrong_key_shows_the_servers_error(browser, server):
    from selenium.webdriver.common.by import By

    open_page(browser, server, "sk-wrong")
    error = wait_for(lambda: browser.find_element(By.ID, "error").text, what="an error message")
    assert "API key" in error
    ask(browser, "hi")
    wait_for(lambda: browser.find_element(By.ID, "send").is_enabled(), what="the request to end")
    assert "API key" in browser.find_element(By.ID, "error").text
    # the failed turn is taken back and its text returned to the input box
    assert not turns(browser, "assistant") and not turns(browser, "user")
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "hi"


# --- images: attach button, paste, drag-and-drop ---------------------------------------------------
RECORD_REQUESTS = """
window.sentBodies = [];
const originalFetch = window.fetch;
window.fetch = (url, options) => {
  if (String(url).endsWith('/v1/chat/completions')) window.sentBodies.push(JSON.parse(options.body));
  return originalFetch(url, options);
};"""

# a synthetic paste or drop of one PNG (base64 in arguments[0]) on an element (arguments[1])
SYNTHETIC_EVENT = """
const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
const transfer = new DataTransfer();
transfer.items.add(new File([bytes], arguments[2], {type: arguments[3]}));
const event = arguments[4] === 'paste'
  ? new ClipboardEvent('paste', {clipboardData: transfer, bubbles: true, cancelable: true})
  : new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true});
arguments[1].dispatchEvent(event);"""


@pytest.fixture(scope="module")
def v_server(tmp_path_factory):
    yield from serving(save_tiny_v_checkpoint(tmp_path_factory.mktemp("webchat-v")))


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photos") / "photo.png"
    pattern(300, 200).save(path)
    return path


def attached(browser) -> int:
    from selenium.webdriver.common.by import By

    return len(browser.find_elements(By.CSS_SELECTOR, "#attachments img"))


def images_seen(server: str) -> int:
    return httpx.get(f"{server}/health").json()["images"]


def test_attach_paste_and_drop_send_images(browser, v_server, photo):
    import base64

    from selenium.webdriver.common.by import By

    open_page(browser, v_server, KEY)
    wait_for(lambda: browser.find_element(By.ID, "model").text == "tiny-minicpmv", what="the model name")
    browser.execute_script(RECORD_REQUESTS)
    set_field(browser, "temperature", "0")
    set_field(browser, "max_tokens", "6")
    seen = images_seen(v_server)

    browser.find_element(By.ID, "image_file").send_keys(str(photo))  # what the attach button opens
    wait_for(lambda: attached(browser) == 1, what="the attached image's preview")
    ask(browser, "What is in the picture?")
    wait_for(lambda: turns(browser, "assistant") and turns(browser, "assistant")[-1]
             .find_element(By.CLASS_NAME, "stats").text, what="the reply")
    assert turns(browser, "assistant")[-1].find_element(By.CLASS_NAME, "text").text
    assert attached(browser) == 0 and len(turns(browser, "user")[-1].find_elements(By.TAG_NAME, "img")) == 1
    sent = browser.execute_script("return window.sentBodies")[-1]["messages"][-1]["content"]
    assert sent[0] == {"type": "text", "text": "What is in the picture?"}
    assert sent[1]["type"] == "image_url" and sent[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert base64.b64decode(sent[1]["image_url"]["url"].split(",", 1)[1]) == photo.read_bytes()
    assert images_seen(v_server) == seen + 1  # the server read it

    browser.find_element(By.ID, "new-chat").click()
    png = base64.b64encode(photo.read_bytes()).decode()
    browser.execute_script(SYNTHETIC_EVENT, png, browser.find_element(By.ID, "prompt"), "pasted.png", "image/png",
                           "paste")
    wait_for(lambda: attached(browser) == 1, what="the pasted image")
    browser.execute_script(SYNTHETIC_EVENT, png, browser.find_element(By.ID, "composer"), "dropped.png", "image/png",
                           "drop")
    wait_for(lambda: attached(browser) == 2, what="the dropped image")
    browser.execute_script(SYNTHETIC_EVENT, base64.b64encode(b"notes").decode(),
                           browser.find_element(By.ID, "composer"), "notes.txt", "text/plain", "drop")
    wait_for(lambda: "notes.txt is not an image" in browser.find_element(By.ID, "error").text,
             what="the refusal of a dropped text file")
    assert attached(browser) == 2
    ask(browser, "Compare them")
    wait_for(lambda: len(turns(browser, "assistant")) == 1 and turns(browser, "assistant")[-1]
             .find_element(By.CLASS_NAME, "stats").text, what="the second reply")
    sent = browser.execute_script("return window.sentBodies")[-1]["messages"]
    assert len(sent) == 1 and [p["type"] for p in sent[0]["content"]] == ["text", "image_url", "image_url"]
    assert images_seen(v_server) == seen + 3


def test_an_image_to_a_text_model_shows_the_servers_error(browser, server, photo):
    from selenium.webdriver.common.by import By

    open_page(browser, server, KEY)
    wait_for(lambda: browser.find_element(By.ID, "model").text == "tiny-minicpm", what="the model name")
    browser.find_element(By.ID, "image_file").send_keys(str(photo))
    wait_for(lambda: attached(browser) == 1, what="the attached image's preview")
    ask(browser, "What is this?")
    error = wait_for(lambda: browser.find_element(By.ID, "error").text, what="the server's error")
    assert "reads text only" in error
    # the turn is taken back: its text and image wait to be sent again
    assert not turns(browser, "user") and attached(browser) == 1
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "What is this?"
