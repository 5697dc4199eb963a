"""What the chat front ends (launch/chat_cli.py, ghostvis/infer/web.py) share: fitting a conversation
into the context, and turning streamed tokens into display text and the assistant's message parts.

Conversations use the tokenizer's structured form: user content is a list of `{"type": "image"}` and
`{"type": "text"}` parts (typed text is always literal, so a typed `<|image|>` stays text), assistant
content a list of text / python / output parts. `images` hold one preprocessed tensor per image part,
in order of appearance.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ghostvis.checkpoint_io import load_pretrained
from ghostvis.infer.engine import Engine
from ghostvis.tokenizer import message_images
from ghostvis.vision.transforms import DEFAULT_MAX_PIXELS, image_transform, preprocess

# what the reader sees around a calculator call: "[calc: 2+3 = 5]"
_TOOL_DISPLAY = {"<|python_start|>": "[calc: ", "<|python_end|>": "", "<|output_start|>": " = ", "<|output_end|>": "]"}


class ContextTooLong(ValueError):
    """The newest user message alone does not fit the model's context."""


def user_message(text: str, n_images: int = 0) -> dict[str, Any]:
    """A user turn: the attached images first, then the typed text (kept literal)."""
    parts: list[dict[str, Any]] = [{"type": "image"} for _ in range(n_images)]
    if text:
        parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


def fit_prompt(engine: Engine, messages: list[dict[str, Any]], images: list[Any],
               reply_tokens: int, context: int | None = None) -> tuple[list[int], list[Any], int]:
    """Prompt ids and images for `messages` ([system], then user/assistant pairs, ending with a user
    turn), dropping the oldest pairs (with their images) until the prompt leaves `reply_tokens` of
    context (`context` positions, default the model's). A system message is kept. Every message is
    tokenized about once, so this is linear in the request. `images` holds one item per image part, in
    order: tensors, or what stands for them until they are decoded (the server fits on its image urls).

    Returns (ids, images, number of messages dropped). Raises ContextTooLong when even the newest
    user message alone does not fit.
    """
    if sum(message_images(m) for m in messages) != len(images):
        raise ValueError(f"the conversation has {sum(message_images(m) for m in messages)} image parts "
                         f"but {len(images)} images were given")
    tok, n_vis, frame = engine.tokenizer, engine.num_vision_tokens, engine.image_frame
    context = engine.max_seq_len if context is None else context
    budget = context - min(reply_tokens, context // 2)
    system = messages[:1] if messages and messages[0].get("role") == "system" else []
    turns = messages[len(system):]
    if len(turns) % 2 == 0:
        raise ValueError("the conversation must end with a user message")
    # tokens each user/assistant pair adds (rendered once each), then the shortest suffix that fits
    pair_cost = [len(tok.render_conversation({"messages": turns[i:i + 2]}, sys.maxsize, n_vis, frame)[0]) - 1
                 for i in range(0, len(turns) - 1, 2)]
    need = len(tok.render_for_completion({"messages": system + turns[-1:]}, n_vis, frame))
    first = len(pair_cost)
    while first > 0 and need + pair_cost[first - 1] <= budget:
        first -= 1
        need += pair_cost[first]
    while True:  # one render; more only where the system text joins a different first turn
        kept = system + turns[2 * first:]
        ids = tok.render_for_completion({"messages": kept}, n_vis, frame)
        if len(ids) <= budget:
            break
        if first == len(pair_cost):
            raise ContextTooLong(
                f"the message is {len(ids)} tokens long but the context holds {context} "
                f"with {context - budget} kept for the reply; send a shorter message or fewer images"
            )
        first += 1
    head = sum(message_images(m) for m in system)
    dropped = sum(message_images(m) for m in turns[:2 * first])
    return ids, images[:head] + images[head + dropped:], 2 * first


class ReplyStream:
    """Turns one row's tokens into display text pieces and the assistant message parts.

    Text is decoded per segment, and held back while it ends in an incomplete UTF-8 sequence so a
    multi-byte character is never shown broken.
    """

    def __init__(self, engine: Engine) -> None:
        self.tokenizer = engine.tokenizer
        self.parts: list[dict[str, str]] = []
        self._stops = set(engine.default_stop_ids)
        self._markers = {self.tokenizer.special_id(name): name for name in _TOOL_DISPLAY}
        self._kind = "text"  # the segment being decoded: "text", "python" or "output"
        self._tokens: list[int] = []
        self._shown = 0  # characters of the current segment already emitted

    def feed(self, token: int) -> str:
        """Display text this token adds (may be empty)."""
        if token in self._stops:
            return self.flush()
        marker = self._markers.get(token)
        if marker is None:
            self._tokens.append(token)
            text = self.tokenizer.decode(self._tokens)
            if text.endswith("\ufffd"):
                return ""
            piece, self._shown = text[self._shown:], len(text)
            return piece
        out = self.flush()
        self._kind = marker[2:-8] if marker.endswith("_start|>") else "text"  # "python" / "output"
        return out + _TOOL_DISPLAY[marker]

    def flush(self) -> str:
        """End the current segment: return the text held back so far and record it as a part."""
        text = self.tokenizer.decode(self._tokens)
        piece = text[self._shown:]
        if self._tokens or self._kind != "text":
            if self._kind == "text" and self.parts and self.parts[-1]["type"] == "text":
                self.parts[-1]["text"] += text
            else:
                self.parts.append({"type": self._kind, "text": text})
        self._kind, self._tokens, self._shown = "text", [], 0
        return piece

    def finish(self) -> dict[str, Any]:
        """Flush, and return the assistant message to append to the conversation."""
        self.flush()
        return {"role": "assistant", "content": self.parts}


class Reply:
    """One assistant reply to `messages` (ending with the new user turn): fits the prompt at once (so
    ContextTooLong surfaces before any output), then iterating streams display text; `conversation()`
    afterwards is what to keep for the next turn."""

    def __init__(self, chat: ChatModel, messages: list[dict[str, Any]], images: list[torch.Tensor],
                 **sampling: Any) -> None:
        ids, self.images, self.dropped = fit_prompt(chat.engine, messages, images, sampling["max_new_tokens"])
        head = 1 if messages[0].get("role") == "system" else 0
        self.messages = messages[:head] + messages[head + self.dropped:]
        self._events = chat.engine.generate([ids], [self.images], **sampling)
        self._stream = ReplyStream(chat.engine)

    def __iter__(self) -> Iterator[str]:
        for event in self._events:
            piece = self._stream.feed(event.token)
            if piece:
                yield piece
        piece = self._stream.flush()  # a reply cut at max_new_tokens may end mid-character
        if piece:
            yield piece

    def message(self) -> dict[str, Any]:
        """The assistant turn (call after iterating)."""
        return self._stream.finish()

    def conversation(self) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
        """(messages, images) for the next turn: what still fits, plus this reply."""
        return self.messages + [self.message()], self.images


def reply_text(engine: Engine, tokens: list[int]) -> str:
    """The text parts of a generated reply (tool calls and their outputs left out)."""
    stream = ReplyStream(engine)
    for token in tokens:
        stream.feed(token)
    return "".join(p["text"] for p in stream.finish()["content"] if p["type"] == "text")


@dataclass
class ChatModel:
    """A loaded checkpoint ready to chat: the engine and, for a VLM, its image preprocessing."""

    engine: Engine
    transform: Callable[[Image.Image], torch.Tensor] | None
    ckpt: str

    def preprocess(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        """Image bytes -> model-ready tensor. Raises BadImage for non-images, ValueError for a text-only model."""
        if self.transform is None:
            raise ValueError(f"the checkpoint {self.ckpt} is a text-only model (no vision tower), so it cannot "
                             "take images; use a checkpoint from the vision_pretrain, sft or rl stage")
        return preprocess(data, self.transform, max_pixels=max_pixels)


def load_chat_model(ckpt: str | Path, device: str = "cpu") -> ChatModel:
    """Load an exported checkpoint directory (FileNotFoundError / ValueError say what is wrong with it)."""
    model, tokenizer, _ = load_pretrained(ckpt, device=device)
    vision_cfg = getattr(model, "vision_config", None)
    transform = image_transform(vision_cfg) if vision_cfg is not None else None
    return ChatModel(Engine(model, tokenizer, device), transform, str(ckpt))


def random_chat_model(preset: str, depth: int | None = None, device: str = "cpu", seed: int = 0,
                      vision_preset: str | None = None) -> ChatModel:
    """A randomly initialized model shaped like `preset` (and `depth`) with a byte-level tokenizer: a
    stand-in for load tests where only the shape matters, needing no checkpoint. `vision_preset` takes
    the vision tower from another preset (the demo is `vlm_small` depth 4 with `vlm_tiny`'s tower)."""
    from ghostvis.config import get_preset
    from ghostvis.model.gpt import GPT
    from ghostvis.model.vlm import VLM
    from ghostvis.tokenizer import ALL_SPECIAL_TOKENS, Tokenizer

    tokenizer = Tokenizer({bytes([i]): i for i in range(256)}, r"\S+|\s+",
                          {name: 256 + i for i, name in enumerate(ALL_SPECIAL_TOKENS)})
    torch.manual_seed(seed)
    cfg, vision_cfg = get_preset(preset, depth, vocab_size=tokenizer.vocab_size,
                                 image_token_id=tokenizer.image_token_id)
    if vision_preset is not None:
        vision_cfg = get_preset(vision_preset)[1]
        if vision_cfg is None:
            raise ValueError(f"preset {vision_preset!r} has no vision tower to borrow")
    model = (GPT(cfg) if vision_cfg is None else VLM(cfg, vision_cfg)).to(device).eval()
    transform = image_transform(vision_cfg) if vision_cfg is not None else None
    return ChatModel(Engine(model, tokenizer, device), transform, f"random {preset} (depth {depth})")


def add_chat_args(p: argparse.ArgumentParser, ckpt_required: bool = True) -> None:
    """The flags both front ends take: the checkpoint, the device and the sampling defaults."""
    p.add_argument("--ckpt", required=ckpt_required, help="exported checkpoint directory (config.json, *.safetensors, tokenizer/)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply, in tokens")


def check_chat_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 0 <= args.temperature <= 2:
        p.error(f"--temperature must be in [0, 2], got {args.temperature}")
    if args.top_k < 0:
        p.error(f"--top-k must be >= 0, got {args.top_k}")
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")


def load_or_exit(args: argparse.Namespace) -> ChatModel:
    """`load_chat_model` for a command line: a bad --ckpt prints why and exits with status 2."""
    try:
        return load_chat_model(args.ckpt, args.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: cannot load --ckpt {args.ckpt}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
