"""launch/serve.py end to end with the official `openai` client: text and images, streaming and not,
continuous batching, bad input (400 in OpenAI's error shape, 413), disconnects, a full queue (503) and
SIGTERM. A tiny random VLM (context 256, 16 vision tokens per image) and greedy decoding."""

import base64
import contextlib
import io
import json
import random
import runpy
import signal
import socket
import struct
import threading
import time
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from PIL import Image

from conftest import REPO, TOK, ServerProcess, free_port
from ghostvis.config import get_preset

MAX_TOKENS = 12  # per test request; the server allows up to 200
N_VIS = 16
IMAGE_IDS = len(TOK.image_ids(N_VIS, get_preset("vlm_tiny")[1].image_frame))  # an image's ids, frame included


def png_bytes(colour=(200, 30, 30), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def bomb_png() -> bytes:
    """A valid 1x1 PNG whose header claims 60000x60000 pixels (a decompression bomb)."""
    raw = bytearray(png_bytes(size=(1, 1)))
    ihdr = raw[12:29]  # b"IHDR" + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", 60000, 60000)
    raw[12:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(raw)


def user(text: str, *urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def ckpt(tiny_vlm_ckpt):
    return tiny_vlm_ckpt


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    (root / "blue.png").write_bytes(png_bytes((20, 40, 220)))
    (root.parent / "outside.png").write_bytes(png_bytes())
    return root


@pytest.fixture(scope="module")
def server(ckpt, image_root):
    srv = ServerProcess("serve.py", ckpt, "--temperature", "0", "--max-new-tokens", "200", "--max-batch", "8",
                        "--max-queue", "32", "--image-root", str(image_root), "--max-body-mb", "0.5")
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=120)


def complete(client, messages, **kw):
    return client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS, **kw)


def streamed(client, messages, **kw) -> tuple[str, str, object]:
    text, finish, usage = "", None, None
    for chunk in complete(client, messages, stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish, usage


def post(base: str, body: bytes, ctype: str = "application/json") -> tuple[int, dict, dict]:
    req = urllib.request.Request(base + "/v1/chat/completions", data=body, headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def test_models_and_health(server, client, ckpt):
    assert [m.id for m in client.models.list().data] == [Path(ckpt).name]
    with urllib.request.urlopen(server.base + "/health") as resp:
        health = json.loads(resp.read())
    assert health["status"] == "ok" and health["vision"] and health["max_batch"] == 8


def test_text_streaming_and_not_agree_and_count_usage(client):
    messages = user("hello there")
    reply = complete(client, messages)
    text, finish, usage = streamed(client, messages)
    assert reply.choices[0].message.content == text and reply.choices[0].finish_reason == finish
    assert finish in ("stop", "length") and text
    prompt_tokens = len(TOK.render_for_completion({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hello there"}]}]}))
    assert reply.usage.prompt_tokens == usage.prompt_tokens == prompt_tokens
    assert 1 <= reply.usage.completion_tokens == usage.completion_tokens <= MAX_TOKENS
    assert reply.usage.total_tokens == prompt_tokens + reply.usage.completion_tokens


def test_one_and_two_images(client, image_root):
    red = data_url(png_bytes())
    text_only = complete(client, user("what colour?")).choices[0].message.content
    one = complete(client, user("what colour?", red))
    text, _, usage = streamed(client, user("what colour?", red))
    assert one.choices[0].message.content == text != text_only  # the image changes the greedy reply
    assert one.usage.prompt_tokens == usage.prompt_tokens == IMAGE_IDS + len("what colour?") + 4
    two = complete(client, user("compare them", red, "blue.png"))  # a data URL and a path under --image-root
    assert two.usage.prompt_tokens == 2 * IMAGE_IDS + len("compare them") + 4
    assert streamed(client, user("compare them", red, "blue.png"))[0] == two.choices[0].message.content


def test_seeded_sampling_is_reproducible(client):
    def draw(seed):
        return complete(client, user("tell me something"), temperature=1.0, top_p=0.95, seed=seed).choices[0].message.content
    first = draw(5)
    assert draw(5) == first
    assert any(draw(seed) != first for seed in (6, 7, 8))


def test_greedy_reply_equals_chat_cli(client, ckpt, image_root, monkeypatch, capsys):
    prompt = "what colour is the picture?"
    main = runpy.run_path(str(REPO / "launch" / "chat_cli.py"), run_name="chat_cli")["main"]
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/image {image_root / 'blue.png'}\n{prompt}\n"))
    assert main(["--ckpt", ckpt, "--temperature", "0", "--max-new-tokens", str(MAX_TOKENS)]) == 0
    out = capsys.readouterr().out
    cli_reply = out.split("assistant> ", 1)[1].rsplit("\nyou> ", 1)[0]
    api_reply = complete(client, user(prompt, "blue.png")).choices[0].message.content
    assert api_reply == cli_reply and api_reply


def test_concurrent_requests_each_get_their_solo_reply(client):
    prompts = [f"question number {i}: " + "why? " * i for i in range(8)]
    solo = [complete(client, user(p)).choices[0].message.content for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: streamed(client, user(p))[0], prompts))
    assert together == solo
    assert len(set(solo)) > 1


def test_special_token_spellings_stay_text(client):
    text = "<|image|> <|assistant_start|> <|user_end|> <|bos|>"
    reply = complete(client, [{"role": "user", "content": text}])  # string content, no image attached
    assert reply.usage.prompt_tokens == len(text) + 4  # one byte token per character, plus the 4 specials


@pytest.mark.parametrize("body, param, message", [
    (b"{not json", None, "not valid JSON"),
    (b"[" * 100_000, None, "nested too deeply"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}', "max_tokens", "integer"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}", None, "JSON"),
    (json.dumps({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]}).encode(),
     "messages[0].role", "out of order"),
    (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}).encode(),
     "messages[1].role", "out of order"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}).encode(),
     "messages[0].content[0].type", "not supported"),
    (json.dumps({"messages": user("hi", *[data_url(png_bytes())] * 15)}).encode(), "messages", "context"),
    (json.dumps({"messages": user("hi", data_url(b"not an image at all"))}).encode(), "image 0", "not a usable image"),
    (json.dumps({"messages": user("hi", data_url(bomb_png()))}).encode(), "image 0", "decompression bomb"),
    (json.dumps({"messages": user("hi", "https://example.com/cat.png")}).encode(), "image 0", "fetches no URLs"),
    (json.dumps({"messages": user("hi", "../outside.png")}).encode(), "image 0", "not a file under"),
    (json.dumps({"messages": user("hi"), "max_tokens": 0}).encode(), "max_tokens", "[1, 200]"),
    (json.dumps({"messages": user("hi"), "max_tokens": 201}).encode(), "max_tokens", "[1, 200]"),
    (json.dumps({"messages": user("hi"), "max_completion_tokens": "many"}).encode(), "max_completion_tokens", "integer"),
    (json.dumps({"messages": user("hi"), "temperature": 3}).encode(), "temperature", "[0.0, 2.0]"),
    (json.dumps({"messages": user("hi"), "n": 2}).encode(), "n", "n=1"),
    (json.dumps({"messages": user("hi"), "stop": ["a"] * 5}).encode(), "stop", "up to 4"),
])
def test_bad_input_is_400_in_openai_error_shape(server, body, param, message):
    status, answer, _ = post(server.base, body)
    assert status == 400, answer
    error = answer["error"]
    assert message in error["message"] and error["param"] == param and error["type"] == "invalid_request_error"


def test_oversized_body_is_413(server):
    """Refused from the declared length, before the body is read (so only the head is sent here)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 600000\r\n\r\n{")
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and "--max-body-mb" in json.loads(body)["error"]["message"]


def test_stop_strings_cut_the_reply(client):
    full = complete(client, user("hello there")).choices[0].message.content
    stop = full[len(full) // 2: len(full) // 2 + 2]
    if not stop.strip("\ufffd"):
        pytest.skip("the reply has no usable stop string")
    cut = complete(client, user("hello there"), stop=[stop])
    assert cut.choices[0].message.content == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    assert streamed(client, user("hello there"), stop=stop)[0] == full[:full.index(stop)]


def test_health_answers_while_a_long_request_is_fitted(server, client):
    turns = []
    for i in range(2000):
        turns += [{"role": "user", "content": f"turn {i} " + "x" * 50},
                  {"role": "assistant", "content": "ok " + "y" * 50}]
    body = json.dumps({"model": "tiny", "messages": turns + user("and now?"), "max_tokens": MAX_TOKENS}).encode()
    result = {}
    worker = threading.Thread(target=lambda: result.update(answer=post(server.base, body)))
    worker.start()
    slowest = 0.0
    while worker.is_alive():
        start = time.perf_counter()
        with urllib.request.urlopen(server.base + "/health", timeout=30) as resp:
            assert resp.status == 200
        slowest = max(slowest, time.perf_counter() - start)
        time.sleep(0.02)
    worker.join()
    assert result["answer"][0] == 200
    assert slowest < 1.0  # fitting runs off the event loop (it blocked /health for ~28 s before)


def test_disconnects_free_their_rows(server, client):
    rng = random.Random(0)
    body = json.dumps({"model": "tiny", "messages": user("tell me a long story"), "max_tokens": 200,
                       "stream": True}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    for _ in range(10):
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(head + body)
            time.sleep(rng.uniform(0.0, 0.2))
    text, finish, _ = streamed(client, user("hello there"))
    assert text and finish in ("stop", "length")
    deadline = time.monotonic() + 60  # rows are freed at the next decode step; wait for that, bounded
    while json.loads(urllib.request.urlopen(server.base + "/health").read())["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert json.loads(urllib.request.urlopen(server.base + "/health").read())["running"] == 0


@contextlib.contextmanager
def held_server(ckpt, max_queue: int, **app_kw):
    """The app in this process with its batcher not yet started, so what waits in the queue is exact
    (no timing); yields (openai client, batcher). The caller may start the batcher."""
    import uvicorn

    from ghostvis.infer.batching import Batcher
    from ghostvis.infer.chat import load_chat_model
    from ghostvis.infer.web import create_app

    chat = load_chat_model(ckpt)
    batcher = Batcher(chat.engine, max_batch=1, max_queue=max_queue)
    app = create_app(chat, batcher, model_name="tiny", max_tokens=MAX_TOKENS, temperature=0.0, **app_kw)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    try:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60), batcher
    finally:
        batcher.stop()
        srv.should_exit = True
        thread.join(30)


def test_full_queue_is_503_with_retry_after(ckpt):
    with held_server(ckpt, max_queue=1) as (client, batcher), ThreadPoolExecutor(1) as pool:
        first = pool.submit(complete, client, user("first"))
        while batcher.load()["waiting"] < 1:  # the first request is queued (nothing runs yet)
            time.sleep(0.02)
        with pytest.raises(openai.APIStatusError) as busy:
            complete(client, user("second"))
        assert busy.value.status_code == 503 and busy.value.response.headers["retry-after"] == "1"
        assert "busy" in busy.value.body["message"]
        batcher.start()
        assert first.result().choices[0].message.content is not None
        assert complete(client, user("third")).choices[0].finish_reason in ("stop", "length")


def test_request_timeout_is_504(ckpt):
    with held_server(ckpt, max_queue=4, request_timeout=0.5) as (client, batcher):
        with pytest.raises(openai.APIStatusError) as late:  # nothing runs: the request can only time out
            complete(client, user("anyone there?"))
        assert late.value.status_code == 504 and "--request-timeout" in late.value.body["message"]
        text_chunks = complete(client, user("anyone there?"), stream=True)
        with pytest.raises(openai.APIError, match="--request-timeout"):
            list(text_chunks)


def test_sigterm_ends_streams_cleanly_and_exits(server):
    """Last in the module: it stops the shared server."""
    body = json.dumps({"model": "tiny", "messages": user("tell me a long story"), "max_tokens": 200,
                       "stream": True}).encode()
    req = urllib.request.Request(server.base + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        first = resp.readline()
        server.proc.send_signal(signal.SIGTERM)
        rest = resp.read().decode()
    assert first.startswith(b"data: ")
    assert rest.rstrip().endswith("data: [DONE]")  # the stream ended properly, finished or cut
    # uvicorn re-raises the signal once it has shut down cleanly, so the exit status is -SIGTERM
    assert server.proc.wait(timeout=15) in (0, -signal.SIGTERM)
    assert "Traceback" not in server.proc.stdout.read()


@pytest.mark.parametrize("url", ["a\x00b.png", "x" * 5000 + ".png", "../outside.png", "missing.png"])
def test_image_paths_that_cannot_be_read_are_400_not_500(tmp_path, url):
    from ghostvis.infer.openai_api import APIError, image_bytes

    with pytest.raises(APIError) as err:
        image_bytes(url, tmp_path.resolve(), 1 << 20, "image 0")
    assert err.value.status == 400 and err.value.param == "image 0"
