"""A screenshot of mmkit.serve's chat page after a chat, taken in headless Chromium.

    python experiments/web_chat_screenshot.py --model RUN_FOLDER --image scene.png \
        --question "What colour is the circle?" --question "How many objects are there?" --out experiments/web_chat.png

Needs Debian's chromium and chromium-driver and the selenium package (the dev extra). The browser
helpers here are the ones tests/test_web_chat.py drives the page with.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments" / "soak"))
from serve_soak import start_server  # noqa: E402  launches python -m mmkit.serve on a free port


def chromium_driver(width: int = 1280, height: int = 860) -> Any:
    """Headless Chromium through Selenium, with the system's browser and driver (never downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not browser or not driver_path:
        raise SystemExit("needs chromium and chromedriver: apt-get install chromium chromium-driver")
    options = Options()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver_path), options=options)


def open_page(driver: Any, port: int, image: Path | None = None, max_tokens: int | None = None) -> None:
    """Load the page, wait for the model's name, choose ``image`` and set the token budget."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"http://127.0.0.1:{port}/")
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "model").text)
    if image is not None:
        driver.find_element(By.ID, "image-input").send_keys(str(image))
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "image-preview").is_displayed())
    if max_tokens is not None:
        field = driver.find_element(By.ID, "max-tokens")
        field.clear()
        field.send_keys(str(max_tokens))


def ask(driver: Any, question: str, timeout: float = 120) -> str:
    """Send ``question`` and wait until its answer has finished streaming (or the page shows an error)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    done = ".message.assistant[data-done='true']"
    before = len(driver.find_elements(By.CSS_SELECTOR, done))
    driver.find_element(By.ID, "prompt").send_keys(question)
    driver.find_element(By.ID, "send").click()
    WebDriverWait(driver, timeout).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, done)) > before or d.find_element(By.ID, "error").is_displayed())
    error = driver.find_element(By.ID, "error")
    if error.is_displayed():
        raise RuntimeError(f"the page shows an error: {error.text}")
    # The text the page holds, not WebDriver's rendering of it, which folds whitespace and control
    # characters (an untrained model's answer can hold a vertical tab) differently from the API's JSON.
    answer = driver.find_elements(By.CSS_SELECTOR, ".message.assistant .text")[-1]
    return driver.execute_script("return arguments[0].textContent;", answer).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a run folder of python -m mmkit.train")
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--question", action="append", required=True, help="one per turn")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "web_chat.png")
    args = parser.parse_args(argv)
    server, port = start_server(args.model)
    driver = chromium_driver()
    try:
        open_page(driver, port, args.image.resolve(), args.max_tokens)
        for question in args.question:
            print(f"Q: {question}\nA: {ask(driver, question)}")
        driver.save_screenshot(str(args.out))
        print(f"screenshot: {args.out}")
    finally:
        driver.quit()
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
