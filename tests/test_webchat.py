"""The web chat page at / in a real headless browser (Debian's chromium, driven by selenium)
against a real `minicpm serve` process: streaming replies, multi-turn history, Stop, errors."""

from __future__ import annotations

import re
import shutil
import tempfile
import time

import httpx
import pytest

from tests.conftest import save_tiny_checkpoint
from tests.server_process import start_server, stop_server

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
KEY = "sk-page"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, url = start_server(save_tiny_checkpoint(tmp_path_factory.mktemp("webchat")), "--api-key", KEY)
    yield url
    stop_server(proc)


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
    browser.find_element(By.ID, "new-chat").click()
    cancelled = metric(server, 'minicpm_finished_sequences_total{reason="cancelled"}')
    ask(browser, "Tell me a very long story")
    browser.find_element(By.ID, "stop").click()  # at once: the reply cannot have finished yet
    stats = wait_for(lambda: turns(browser, "assistant")[-1].find_element(By.CLASS_NAME, "stats").text,
                     what="the reply to end")
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
