"""The chat page served by launch/chat_web.py (an alias of launch/serve.py): the page and its endpoint,
and the page driven in headless Chromium (Debian packages `chromium` and `chromium-driver`)."""

import base64
import io
import json
import os
import shutil
import urllib.request

import pytest
from PIL import Image

from conftest import ServerProcess

MAX_NEW_TOKENS = 8
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def png_bytes(colour=(30, 160, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 32), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tiny_vlm_ckpt):
    srv = ServerProcess("chat_web.py", tiny_vlm_ckpt, "--max-new-tokens", str(MAX_NEW_TOKENS), "--temperature", "0")
    yield srv.base
    srv.close()


def reply_text(base: str, messages: list) -> str:
    """The greedy reply the page's endpoint gives (what the page must show)."""
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps({"messages": messages}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())["choices"][0]["message"]["content"]


def test_health_and_page(server):
    with urllib.request.urlopen(server + "/health", timeout=30) as resp:
        assert resp.status == 200 and json.loads(resp.read())["vision"] is True
    with urllib.request.urlopen(server + "/", timeout=30) as resp:
        page = resp.read().decode()
    assert 'id="image"' in page and 'id="message"' in page and "/v1/chat/completions" in page


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
def test_page_in_chromium_uploads_an_image_and_streams_a_reply(server, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "green.png"
    image.write_bytes(png_bytes())
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not an image")
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    question = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what colour is it?"}]
    expected = reply_text(server, [{"role": "user", "content": question}])
    assert expected

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for drivers online
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        wait = WebDriverWait(driver, 90)
        driver.get(server + "/")
        upload = driver.find_element(By.ID, "image")
        upload.send_keys(str(notes))  # not an image: the server refuses it when sent, the page says why
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#pending img.pending-image"))
        driver.find_element(By.ID, "message").send_keys("what is this?")
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: "Error (400)" in d.find_element(By.ID, "error").text)
        assert "not a usable image" in driver.find_element(By.ID, "error").text
        assert not driver.find_elements(By.CSS_SELECTOR, ".turn")  # the refused turn is not kept

        upload.send_keys(str(image))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#pending img.pending-image"))
        driver.find_element(By.ID, "message").send_keys("what colour is it?")
        driver.find_element(By.ID, "send").click()
        bubble = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".turn.assistant.done"))
        assert bubble.get_attribute("textContent") == expected
        assert driver.find_element(By.ID, "error").text == ""  # the earlier upload error was cleared
        user_turn = driver.find_element(By.CSS_SELECTOR, ".turn.user")
        assert "what colour is it?" in user_turn.text and user_turn.find_elements(By.TAG_NAME, "img")

        # a second turn carries the history: the server accepts the page's record of the first reply
        driver.find_element(By.ID, "message").send_keys("are you sure?")
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".turn.assistant.done")) == 2)
        assert driver.find_element(By.ID, "error").text == ""
    finally:
        driver.quit()
