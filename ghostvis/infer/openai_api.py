"""The OpenAI chat-completions format: parsing a request (every bad field is an `APIError` naming it,
answered 400 in OpenAI's error shape), resolving its images, and the response / chunk objects.

Messages become the tokenizer's structured form: text parts stay literal (a typed `<|image|>` or
`<|assistant_start|>` is text, never a special token), `image_url` parts become image parts whose
urls are resolved by `load_images` (only those of the turns `prepare_prompt` keeps when it fits the prompt): a
`data:image/...;base64,` URL, or a file under `--image-root`.
The server fetches nothing from the network.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ghostvis.infer.chat import ContextTooLong, fit_prompt
from ghostvis.vision.transforms import BadImage

MAX_STOP_SEQUENCES = 4  # as OpenAI


class APIError(Exception):
    """An answer other than 200: `status`, a message, OpenAI's error `type` and the offending `param`."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": None}}


@dataclass
class ChatRequest:
    messages: list[dict[str, Any]]  # the tokenizer's structured form
    image_urls: list[str]  # in order of the image parts
    max_tokens: int
    temperature: float
    top_p: float | None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False


def parse_json(body: bytes) -> Any:
    """The body as JSON; 400 for anything else (bad UTF-8, NaN/Infinity, absurd nesting or digits)."""
    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not a JSON number")
    try:
        return json.loads(body, parse_constant=no_constants)
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply to be a chat request") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError; so is the int-digits limit
        raise APIError(400, f"the request body is not valid JSON: {str(e)[:200]}") from None


def parse_chat_request(payload: Any, *, max_tokens_cap: int, default_temperature: float) -> ChatRequest:
    """A `ChatRequest` from the decoded JSON body, or APIError(400) naming the bad field."""
    if not isinstance(payload, dict):
        raise APIError(400, "the request body must be a JSON object")
    messages, urls = _messages(payload.get("messages"))
    if payload.get("n", 1) != 1:
        raise APIError(400, "only n=1 is supported", "n")
    max_tokens = max_tokens_cap
    for key in ("max_completion_tokens", "max_tokens"):
        if payload.get(key) is not None:
            max_tokens = _integer(payload, key, 1, max_tokens_cap)
    temperature = default_temperature
    if payload.get("temperature") is not None:
        temperature = _number(payload, "temperature", 0.0, 2.0)
    top_p = None
    if payload.get("top_p") is not None:
        top_p = _number(payload, "top_p", 0.0, 1.0)
        if top_p == 0.0:
            raise APIError(400, "top_p must be in (0, 1], got 0", "top_p")
    seed = None if payload.get("seed") is None else _integer(payload, "seed", 0, 2**63 - 1)
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, f"stream must be true or false, got {stream!r:.40}", "stream")
    options = payload.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise APIError(400, 'stream_options must be {"include_usage": true|false}', "stream_options")
    return ChatRequest(messages, urls, max_tokens, temperature, top_p, _stop(payload.get("stop")), seed, stream,
                       options.get("include_usage", False))


def _messages(raw: Any) -> tuple[list[dict[str, Any]], list[str]]:
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    messages, urls = [], []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"{where}.role must be 'system', 'user' or 'assistant', got {role!r:.40}",
                           f"{where}.role")
        role = "system" if role == "developer" else role
        turn = len(messages) - _has_system(messages)  # user turns are even, assistant turns odd
        expected = "system" if i == 0 and role == "system" else ("user", "assistant")[turn % 2]
        if role != expected:
            article = "an" if role == "assistant" else "a"
            raise APIError(400, f"{where}: {article} {role} message here is out of order; messages are an optional "
                           "system message, then user and assistant turns alternating, ending with a user turn",
                           f"{where}.role")
        parts = _content(m.get("content"), role, where, urls)
        messages.append({"role": role, "content": parts})
    if messages[-1]["role"] != "user":
        raise APIError(400, "the last message must be a user message", f"messages[{len(raw) - 1}].role")
    return messages, urls


def _has_system(messages: list[dict[str, Any]]) -> int:
    return 1 if messages and messages[0]["role"] == "system" else 0


def _content(content: Any, role: str, where: str, urls: list[str]) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of content parts", f"{where}.content")
    parts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url" and role == "user":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise APIError(400, f'{at}.image_url must be {{"url": "data:image/...;base64,..." or a path}}',
                               f"{at}.image_url")
            urls.append(url)
            parts.append({"type": "image"})
        else:
            allowed = "'text' and 'image_url'" if role == "user" else "'text'"
            raise APIError(400, f"{at}: content part type {kind!r:.40} is not supported in a {role} message "
                           f"(use {allowed}, each with its field)", f"{at}.type")
    return parts


def _stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_SEQUENCES
            or not all(isinstance(s, str) and s for s in stops)):
        raise APIError(400, f"stop must be a non-empty string or a list of up to {MAX_STOP_SEQUENCES} of them", "stop")
    return stops


def _number(payload: dict[str, Any], key: str, lo: float, hi: float) -> float:
    value = payload[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise APIError(400, f"{key} must be a number in [{lo}, {hi}], got {value!r:.40}", key)
    return float(value)


def _integer(payload: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = payload[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise APIError(400, f"{key} must be an integer in [{lo}, {hi}], got {value!r:.40}", key)
    return value


def image_bytes(url: str, image_root: Path | None, max_bytes: int, param: str) -> bytes:
    """The bytes behind an image url: a base64 data URL, or a file inside `image_root`."""
    if url.startswith("data:"):
        head, sep, data = url.partition(",")
        if not sep or not head.endswith(";base64"):  # the media type is not trusted: the decoder decides
            raise APIError(400, "an image data URL must look like data:image/png;base64,...", param)
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "the image data URL is not valid base64", param) from None
    if "://" in url and not url.startswith("file://"):
        raise APIError(400, "the server fetches no URLs: send the image inline as a data:image/...;base64 URL "
                       "(or a path under the server's --image-root)", param)
    if image_root is None:
        raise APIError(400, "image paths are refused: the server was started without --image-root; "
                       "send the image as a data:image/...;base64 URL", param)
    try:  # a NUL byte, an over-long name or an unreadable file is the client's problem, not a 500
        path = (image_root / url.removeprefix("file://")).resolve()
        if not path.is_relative_to(image_root) or not path.is_file():
            raise APIError(400, f"{url!r:.200} is not a file under the server's --image-root", param)
        if path.stat().st_size > max_bytes:
            raise APIError(400, f"{url!r:.200} is over the image limit of {max_bytes} bytes", param)
        return path.read_bytes()
    except (OSError, ValueError) as e:
        raise APIError(400, f"{url!r:.200} cannot be read under the server's --image-root "
                       f"({type(e).__name__})", param) from None


def prepare_prompt(engine: Any, request: ChatRequest, preprocess: Callable[[bytes], torch.Tensor],
                   image_root: Path | None, max_bytes: int, context: int) -> tuple[list[int], list[torch.Tensor]]:
    """Prompt ids and image tensors for a request (blocking: run it off the event loop). The prompt is fitted to
    `context` on the image parts alone, then only the images of the turns it keeps are read and decoded, so a
    long history costs rendering its text, never decoding its images. APIError(400) names what is wrong."""
    images = list(enumerate(request.image_urls))  # (place in the request, url): errors name the image
    if images and not engine.num_vision_tokens:
        try:  # a text-only model says why it takes no image before any url is read (a bad url is not the reason)
            preprocess(b"")
        except ValueError as e:
            raise APIError(400, str(e), f"image {images[0][0]}") from None
    try:
        ids, kept, _ = fit_prompt(engine, request.messages, images, request.max_tokens, context)
    except ContextTooLong as e:
        raise APIError(400, str(e), "messages") from None
    except ValueError as e:  # the tokenizer refused the conversation
        raise APIError(400, f"bad conversation: {e}", "messages") from None
    return ids, load_images(kept, preprocess, image_root, max_bytes)


def load_images(images: list[tuple[int, str]], preprocess: Callable[[bytes], torch.Tensor], image_root: Path | None,
                max_bytes: int) -> list[torch.Tensor]:
    """Read and preprocess each (k, url): the request's image k."""
    out = []
    for k, url in images:
        param = f"image {k}"
        data = image_bytes(url, image_root, max_bytes, param)
        try:
            out.append(preprocess(data))
        except BadImage as e:
            raise APIError(400, f"image {k} is not a usable image: {e.reason}", param) from None
    return out


class Completion:
    """Builds the response objects of one request."""

    def __init__(self, model: str) -> None:
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": usage(prompt_tokens, completion_tokens)}

    def response(self, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                             "logprobs": None}],
                "usage": usage(prompt_tokens, completion_tokens)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class StopText:
    """Cuts the reply at the first stop string. `feed` returns the text safe to show: it holds back a
    tail that could still become a stop string; `stopped` turns True once one matched."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.hold = stops, max((len(s) for s in stops), default=1) - 1
        self.text, self.shown, self.stopped = "", 0, False

    def feed(self, piece: str, final: bool = False) -> str:
        if self.stopped:
            return ""
        self.text += piece
        cut = min((i for i in (self.text.find(s, max(0, self.shown - len(s))) for s in self.stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.stopped, self.text = True, self.text[:cut]
            end = len(self.text)
        else:
            end = len(self.text) if final else max(self.shown, len(self.text) - self.hold)
        out, self.shown = self.text[self.shown:end], end
        return out
