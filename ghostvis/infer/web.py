"""The chat web app: one page, image upload, replies streamed as server-sent events.

    GET  /             the page (ghostvis/infer/static/index.html)
    GET  /health       {"status": "ok", ...} once the model is loaded
    POST /api/images   raw image bytes -> {"id": ...}; 400 not an image, 413 over the upload limit
    POST /api/chat     {"messages": [...], "temperature"?, "top_k"?, "max_new_tokens"?}
                       -> text/event-stream of `data: {"text": ...}` then `event: done` with the
                       assistant message to send back next turn; 400 for a bad conversation

The server keeps no conversations: the page sends the whole history each turn (user turns as
`{"role": "user", "text": ..., "images": [ids]}`, assistant turns as the `message` it was given).
Uploaded images are kept preprocessed in a small LRU; an evicted id gets a 400 asking to re-upload.
Every bad input is a 4xx with a message; nothing a client sends can produce a 500.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from ghostvis.infer.chat import ChatModel, ContextTooLong, Reply, user_message
from ghostvis.vision.transforms import BadImage

log = logging.getLogger(__name__)
PAGE = Path(__file__).parent / "static" / "index.html"
MAX_JSON_BYTES = 1 << 20  # a conversation's JSON (images travel separately, by id)
MAX_TEXT_CHARS = 20_000  # one message


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


async def read_body(request: Request, limit: int, what: str, flag: str) -> bytes:
    """The request body, refusing (413) past `limit` bytes without reading the rest."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"{what} is {int(declared)} bytes; the limit is {limit} bytes ({flag})")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPError(413, f"{what} is over the limit of {limit} bytes ({flag})")
    return bytes(body)


class ImageStore:
    """Preprocessed uploads by content id, least recently used dropped first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, image_id: str, tensor: torch.Tensor) -> None:
        with self._lock:
            self._items[image_id] = tensor
            self._items.move_to_end(image_id)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, image_id: str) -> torch.Tensor:
        with self._lock:
            if image_id not in self._items:
                raise HTTPError(400, f"image {image_id!r} is unknown or expired; upload it again")
            self._items.move_to_end(image_id)
            return self._items[image_id]


def parse_chat_request(payload: Any, store: ImageStore, defaults: dict[str, Any]) -> tuple[list, list, dict]:
    """(messages, images, sampling) from the page's JSON, or HTTPError(400) naming the bad field.
    `defaults` holds the server's temperature, top_k and max_new_tokens (also the cap on the latter)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("messages"), list) or not payload["messages"]:
        raise HTTPError(400, 'expected JSON {"messages": [...]} with at least one message')
    messages, images = [], []
    for i, m in enumerate(payload["messages"]):
        role = m.get("role") if isinstance(m, dict) else None
        if role == "user":
            text, ids = m.get("text", ""), m.get("images", [])
            if not isinstance(text, str) or not isinstance(ids, list) or not all(isinstance(x, str) for x in ids):
                raise HTTPError(400, f"messages[{i}]: a user turn is {{'text': str, 'images': [image ids]}}")
            if len(text) > MAX_TEXT_CHARS:
                raise HTTPError(400, f"messages[{i}]: text is {len(text)} characters; the limit is {MAX_TEXT_CHARS}")
            if not text and not ids:
                raise HTTPError(400, f"messages[{i}]: empty message (no text, no image)")
            images += [store.get(x) for x in ids]
            messages.append(user_message(text, len(ids)))
        elif role == "assistant":
            content = m.get("content")
            if not isinstance(content, list) or not all(
                    isinstance(p, dict) and p.get("type") in ("text", "python", "output")
                    and isinstance(p.get("text"), str) for p in content):
                raise HTTPError(400, f"messages[{i}]: an assistant turn is the 'message' the server sent back")
            messages.append({"role": "assistant", "content": content})
        else:
            raise HTTPError(400, f"messages[{i}]: role must be 'user' or 'assistant', got {role!r}")
    if messages[-1]["role"] != "user":
        raise HTTPError(400, "the last message must be the user's")
    sampling = {
        "temperature": _number(payload, "temperature", defaults["temperature"], 0.0, 2.0, float),
        "top_k": _number(payload, "top_k", defaults["top_k"], 0, 100_000, int) or None,
        "max_new_tokens": _number(payload, "max_new_tokens", defaults["max_new_tokens"], 1,
                                  defaults["max_new_tokens"], int),
    }
    return messages, images, sampling


def _number(payload: dict, key: str, default: float, lo: float, hi: float, kind: type) -> Any:
    value = payload.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise HTTPError(400, f"{key} must be a number, got {value!r}")
    if not lo <= value <= hi:
        raise HTTPError(400, f"{key} must be between {lo} and {hi}, got {value}")
    return kind(value)


def sse(event: str | None, data: dict) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n"


def create_app(chat: ChatModel, *, max_upload_bytes: int = 10 << 20, max_new_tokens: int = 256,
               temperature: float = 0.6, top_k: int = 50, image_capacity: int = 64) -> FastAPI:
    """The app for one loaded model. `max_upload_bytes` caps an image upload (chat_web's
    --max-upload-mb); `max_new_tokens` caps a reply; temperature / top_k (0 = off) are the defaults
    a request may override."""
    app = FastAPI(title="GhostVis chat", docs_url=None, redoc_url=None)
    store = ImageStore(image_capacity)
    defaults = {"temperature": temperature, "top_k": top_k, "max_new_tokens": max_new_tokens}
    generate_lock = threading.Lock()  # one reply at a time: the model already uses every core

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "checkpoint": chat.ckpt, "vision": chat.transform is not None,
                "max_seq_len": chat.engine.max_seq_len, "max_upload_bytes": max_upload_bytes}

    @app.post("/api/images")
    async def upload(request: Request) -> dict[str, str]:
        data = await read_body(request, max_upload_bytes, "the upload", "--max-upload-mb")
        if not data:
            raise HTTPError(400, "empty upload: send the image file's bytes as the request body")
        try:
            tensor = chat.preprocess(data)
        except BadImage as e:
            raise HTTPError(400, f"not a usable image: {e.reason}") from e
        except ValueError as e:  # a text-only model
            raise HTTPError(400, str(e)) from e
        image_id = hashlib.sha256(data).hexdigest()[:16]
        store.put(image_id, tensor)
        return {"id": image_id}

    @app.post("/api/chat")
    async def chat_reply(request: Request) -> StreamingResponse:
        body = await read_body(request, MAX_JSON_BYTES, "the conversation", "MAX_JSON_BYTES")
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"request body is not JSON: {e}") from e
        messages, images, sampling = parse_chat_request(payload, store, defaults)
        try:
            reply = Reply(chat, messages, images, **sampling)
        except ContextTooLong as e:
            raise HTTPError(400, str(e)) from e
        except ValueError as e:  # the tokenizer refused the conversation (e.g. roles out of order)
            raise HTTPError(400, f"bad conversation: {e}") from e
        return StreamingResponse(stream(reply), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def stream(reply: Reply) -> Iterator[str]:
        # a plain generator: Starlette runs it in a worker thread, so the event loop stays free
        with generate_lock:
            try:
                for piece in reply:
                    yield sse(None, {"text": piece})
                yield sse("done", {"message": reply.message(), "dropped": reply.dropped})
            except Exception as e:  # headers are sent: report in-stream rather than drop the connection
                log.exception("generation failed")
                yield sse("error", {"error": f"generation failed: {type(e).__name__}: {e}"})

    return app
