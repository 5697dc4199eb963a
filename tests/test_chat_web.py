"""launch/chat_web.py end to end: the real server on a free port with a tiny model, bad input over
HTTP, and the page driven in headless Chromium (Debian packages `chromium` and `chromium-driver`)."""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from conftest import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
UPLOAD_LIMIT_MB = 0.05  # 52 428 bytes: small, so the 413 test needs no big body
MAX_NEW_TOKENS = 8
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(base: str, path: str, body: bytes | None = None, ctype: str = "application/octet-stream"):
    req = urllib.request.Request(base + path, data=body, headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def chat(base: str, payload: dict):
    return request(base, "/api/chat", json.dumps(payload).encode(), "application/json")


def png_bytes(colour=(30, 160, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 32), colour).save(buf, format="PNG")
    return buf.getvalue()


def streamed_text(sse_body: str) -> tuple[str, dict]:
    """Concatenated text events and the `done` event's data."""
    text, done = "", None
    for event in sse_body.split("\n\n"):
        if event.startswith("data: "):
            text += json.loads(event[len("data: "):])["text"]
        elif event.startswith("event: done\n"):
            done = json.loads(event.split("data: ", 1)[1])
    return text, done


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("web_ckpt"))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "launch" / "chat_web.py"), "--ckpt", ckpt, "--port", str(port),
         "--max-upload-mb", str(UPLOAD_LIMIT_MB), "--max-new-tokens", str(MAX_NEW_TOKENS), "--temperature", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120  # readiness wait for the model to load, not a timing assertion
    while True:
        if proc.poll() is not None:
            pytest.fail(f"chat_web.py exited early:\n{proc.stdout.read()}")
        try:
            if request(base, "/health")[0] == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"chat_web.py did not answer /health:\n{proc.stdout.read()}")
        time.sleep(0.3)
    yield base
    proc.terminate()
    proc.wait(timeout=30)


def test_health_and_page(server):
    status, body = request(server, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok" and json.loads(body)["vision"] is True
    status, page = request(server, "/")
    assert status == 200 and 'id="image"' in page and 'id="message"' in page


def test_bad_uploads_are_4xx_with_a_message(server):
    status, body = request(server, "/api/images", b"just some text", "text/plain")
    assert status == 400 and "not a usable image" in json.loads(body)["error"]
    status, body = request(server, "/api/images", png_bytes()[:60], "image/png")  # truncated PNG
    assert status == 400 and "not a usable image" in json.loads(body)["error"]
    status, body = request(server, "/api/images", b"\0" * 60_000, "image/png")
    assert status == 413 and "--max-upload-mb" in json.loads(body)["error"]
    status, body = request(server, "/api/images", b"", "image/png")
    assert status == 400 and "empty upload" in json.loads(body)["error"]


@pytest.mark.parametrize("payload, message", [
    ({"messages": []}, "at least one message"),
    ({"messages": [{"role": "user", "text": "x" * 600}]}, "context holds 256"),
    ({"messages": [{"role": "user", "text": "hi", "images": ["0123"]}]}, "upload it again"),
    ({"messages": [{"role": "user", "text": "a"}, {"role": "user", "text": "b"}]}, "out of order"),
    ({"messages": [{"role": "system", "text": "a"}]}, "role must be"),
    ({"messages": [{"role": "user", "text": "hi"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "text": "hi"}], "max_new_tokens": 10_000}, "max_new_tokens"),
])
def test_bad_conversations_are_400_with_a_message(server, payload, message):
    status, body = chat(server, payload)
    assert status == 400 and message in json.loads(body)["error"]


def test_not_json_is_400(server):
    status, body = request(server, "/api/chat", b"{not json", "application/json")
    assert status == 400 and "not JSON" in json.loads(body)["error"]


def test_long_history_is_truncated_not_refused(server):
    turn = "y" * 50
    history = []
    for _ in range(4):
        history += [{"role": "user", "text": turn}, {"role": "assistant", "content": [{"type": "text", "text": turn}]}]
    status, body = chat(server, {"messages": history + [{"role": "user", "text": "still there?"}]})
    assert status == 200
    _, done = streamed_text(body)
    assert done["dropped"] > 0 and done["message"]["role"] == "assistant"


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
    # what the same conversation streams over plain HTTP (greedy: the page must show exactly this)
    status, body = request(server, "/api/images", image.read_bytes(), "image/png")
    expected, _ = streamed_text(chat(server, {"messages": [
        {"role": "user", "text": "what colour is it?", "images": [json.loads(body)["id"]]}]})[1])
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
        upload.send_keys(str(notes))
        wait.until(lambda d: "Upload failed (400)" in d.find_element(By.ID, "error").text)
        assert "not a usable image" in driver.find_element(By.ID, "error").text

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
