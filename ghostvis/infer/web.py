"""The server: OpenAI-compatible chat completions over continuous batching, and the chat page.

    GET  /                     the page (ghostvis/infer/static/index.html); it uses the endpoint below
    GET  /health               {"status": "ok", ...} with the batcher's load
    GET  /v1/models            the one model served
    POST /v1/chat/completions  OpenAI's request; a JSON completion, or with "stream": true
                               server-sent chunks ending with `data: [DONE]`

Request handling keeps the event loop free: the body is read with a size limit (413), parsed,
the prompt fitted and the images it keeps decoded in a worker thread, then the request goes to the `Batcher`
(503 with Retry-After when its queue is full). Tokens come back through an asyncio queue; a client
that disconnects cancels its request, which frees its row at the next decode step. Every bad input
is a 4xx in OpenAI's error shape; nothing a client sends can produce a 500.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ghostvis.infer.batching import Batcher, QueueFull, Request as Generation, Update
from ghostvis.infer.chat import ChatModel, ReplyStream
from ghostvis.infer.openai_api import (APIError, ChatRequest, Completion, StopText, parse_chat_request, parse_json,
                                       prepare_prompt)

PAGE = Path(__file__).parent / "static" / "index.html"
RETRY_AFTER_S = 1


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) past `limit` bytes without reading the rest."""
    declared = request.headers.get("content-length")
    too_big = APIError(413, f"the request body is over the limit of {limit} bytes (the server's --max-body-mb)",
                       type="request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


def rss_bytes() -> int | None:
    """This process's resident memory (Linux), for watching memory under load."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def create_app(chat: ChatModel, batcher: Batcher, *, model_name: str, max_body_bytes: int = 20 << 20,
               max_tokens: int = 256, temperature: float = 0.6, top_k: int = 50, image_root: Path | None = None,
               max_image_bytes: int = 10 << 20, request_timeout: float = 300.0) -> FastAPI:
    """The app for one loaded model served by `batcher` (started by the caller). `max_tokens` caps a
    reply and is the default; `temperature` is the default a request may override; `top_k` (0 = off)
    applies to every sampled request (OpenAI has no such field)."""
    app = FastAPI(title="GhostVis", docs_url=None, redoc_url=None)
    engine = chat.engine
    root = image_root.resolve() if image_root is not None else None

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "checkpoint": chat.ckpt, "vision": chat.transform is not None,
                "max_seq_len": engine.max_seq_len, "max_context": batcher.cache_len, "max_body_bytes": max_body_bytes,
                "rss_bytes": rss_bytes(), **batcher.load()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "ghostvis"}]}

    def prepare(req: ChatRequest) -> tuple[list[int], list[Any]]:
        """The prompt fitted, then its images decoded: blocking work, run in a worker thread."""
        return prepare_prompt(engine, req, chat.preprocess, root, max_image_bytes, batcher.cache_len)

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> Any:
        body = await read_body(request, max_body_bytes)
        req = parse_chat_request(parse_json(body), max_tokens_cap=max_tokens, default_temperature=temperature)
        ids, images = await run_in_threadpool(prepare, req)
        loop, updates = asyncio.get_running_loop(), asyncio.Queue()
        gen = Generation(ids, images, lambda u: loop.call_soon_threadsafe(updates.put_nowait, u),
                         max_new_tokens=req.max_tokens, temperature=req.temperature,
                         top_k=(top_k or None) if req.temperature > 0 else None, top_p=req.top_p, seed=req.seed,
                         deadline=time.monotonic() + request_timeout)
        try:
            batcher.submit(gen)
        except QueueFull as e:
            raise APIError(503, f"the server is busy: {e}; retry later", type="server_busy",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        reply = APIReply(engine, req, gen, updates, len(ids), Completion(model_name))
        if req.stream:
            return StreamingResponse(reply.events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return await reply.collect(request)
        finally:
            gen.cancelled = True  # done, or the client left: either way the row is freed

    return app


class APIReply:
    """One request's updates turned into text (tool calls displayed as in the chat), stop strings applied."""

    def __init__(self, engine: Any, req: ChatRequest, gen: Generation, updates: asyncio.Queue, prompt_tokens: int,
                 completion: Completion) -> None:
        self.req, self.gen, self.updates, self.completion = req, gen, updates, completion
        self.prompt_tokens, self.completion_tokens = prompt_tokens, 0
        self.decoder, self.stop = ReplyStream(engine), StopText(req.stop)

    async def pieces(self, request: Request | None = None) -> AsyncIterator[tuple[str, str | None]]:
        """(text, finish) pairs; the last has the finish reason. Raises APIError for timeout / shutdown /
        error. Given the `request` (non-streaming), ends early when its client disconnects."""
        while True:
            remaining = self.gen.deadline - time.monotonic()
            try:  # the deadline holds here too, for a request still waiting in the queue
                update: Update = await asyncio.wait_for(self.updates.get(),
                                                        max(0.0, remaining if request is None else min(1.0, remaining)))
            except asyncio.TimeoutError:  # TimeoutError itself only from Python 3.11
                if time.monotonic() >= self.gen.deadline:
                    self.gen.cancelled = True
                    raise APIError(504, "the request ran past the server's --request-timeout", type="timeout") from None
                if request is not None and await request.is_disconnected():
                    self.gen.cancelled = True
                    return
                continue
            piece = ""
            if update.token is not None:
                self.completion_tokens += 1
                piece = self.stop.feed(self.decoder.feed(update.token))
            if update.finish is None and self.stop.stopped:
                self.gen.cancelled = True
                yield piece, "stop"
                return
            if update.finish in ("stop", "length"):
                yield piece + self.stop.feed(self.decoder.flush(), final=True), update.finish
                return
            if update.finish is not None:
                status = {"timeout": 504, "shutdown": 503}.get(update.finish, 500)
                raise APIError(status, f"the reply was cut: {update.detail}", type=update.finish)
            if piece:
                yield piece, None

    async def collect(self, request: Request) -> dict[str, Any]:
        text, finish = [], "stop"
        async for piece, finish in self.pieces(request):
            text.append(piece)
        return self.completion.response("".join(text), finish, self.prompt_tokens, self.completion_tokens)

    async def events(self) -> AsyncIterator[str]:
        c = self.completion
        try:
            yield sse(c.chunk({"role": "assistant", "content": ""}))
            async for piece, finish in self.pieces():
                if piece:
                    yield sse(c.chunk({"content": piece}))
                if finish is not None:
                    yield sse(c.chunk({}, finish))
            if self.req.include_usage:
                yield sse(c.usage_chunk(self.prompt_tokens, self.completion_tokens))
        except APIError as e:  # the headers are sent: report in-stream, as OpenAI does
            yield sse(e.body())
        finally:  # normal end, or the client went away (the generator is closed): free the row
            self.gen.cancelled = True
        yield sse("[DONE]")
