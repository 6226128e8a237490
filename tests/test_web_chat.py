"""The chat page of python -m mmkit.serve, driven in headless Chromium (Selenium + Debian's
chromium and chromium-driver packages; .ci/run installs them and sets MMKIT_REQUIRE_BROWSER=1, so
CI fails rather than skips when they are missing)."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import REPO
from PIL import Image

from mmkit.synth.world import generate_scenes, render

sys.path.insert(0, str(REPO / "experiments"))
from web_chat_screenshot import ask, chromium_driver, open_page, start_server  # noqa: E402  the page's drivers

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401
except ImportError:  # pragma: no cover - the dev extra installs it
    selenium = None
BROWSER = bool(CHROMIUM and CHROMEDRIVER and selenium)
if not BROWSER and os.environ.get("MMKIT_REQUIRE_BROWSER"):
    raise RuntimeError("MMKIT_REQUIRE_BROWSER is set but chromium, chromedriver or selenium is missing "
                       "(apt-get install chromium chromium-driver; pip install -e '.[dev]')")
pytestmark = pytest.mark.skipif(not BROWSER, reason="needs chromium, chromium-driver and selenium")

MAX_TOKENS = 12
QUESTIONS = ["What colour is the circle?", "How many objects are there?"]


@pytest.fixture(scope="module")
def server(lively_run):
    process, port = start_server(lively_run, "served_model_name=lively", "limits.max_image_pixels=10000")
    yield port
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    driver = chromium_driver()
    yield driver
    driver.quit()


def _api(port: int, body: dict) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def _data_url(path: Path) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.mark.slow
def test_a_two_turn_chat_on_the_page_streams_the_apis_greedy_answers(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    image_path = tmp_path / "scene.png"
    render(generate_scenes("test", 1, seed=5)[0]).save(image_path)
    open_page(browser, server, image_path, MAX_TOKENS)
    assert browser.find_element(By.ID, "model").text == "lively"
    # Count how often the answer's text changes while it arrives: a streamed answer grows piece by piece.
    browser.execute_script("""
        window.textUpdates = 0;
        new MutationObserver(() => { window.textUpdates += 1; })
            .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    """)

    first = ask(browser, QUESTIONS[0])
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(image_path)}},
                                             {"type": "text", "text": QUESTIONS[0]}]}]
    status, body = _api(server, {"messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS})
    assert status == 200
    assert first == body["choices"][0]["message"]["content"].strip() and first
    assert browser.execute_script("return window.textUpdates") > 3  # bubbles added, then the text grew

    second = ask(browser, QUESTIONS[1])
    messages += [{"role": "assistant", "content": body["choices"][0]["message"]["content"]},
                 {"role": "user", "content": QUESTIONS[1]}]
    status, body = _api(server, {"messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS})
    assert second == body["choices"][0]["message"]["content"].strip() and second
    shot = tmp_path / "chat.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

    browser.find_element(By.ID, "reset").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".message") == []


@pytest.mark.slow
def test_an_image_over_the_servers_limit_shows_its_error_on_the_page(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    big = tmp_path / "big.png"
    Image.new("RGB", (200, 200), (30, 120, 200)).save(big)  # 40,000 pixels; the server allows 10,000
    open_page(browser, server, big)
    browser.find_element(By.ID, "prompt").send_keys("What is this?")
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "error").is_displayed())
    status, body = _api(server, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_url(big)}}, {"type": "text", "text": "What is this?"}]}]})
    assert status == 413
    assert browser.find_element(By.ID, "error").text == body["error"]["message"]
    assert "10000" in body["error"]["message"] or "10,000" in body["error"]["message"]
    assert browser.find_elements(By.CSS_SELECTOR, ".message") == []  # the failed turn left no bubbles
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "What is this?"  # kept to resend
