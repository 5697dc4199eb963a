"""The GhostVis tokenizer: rustbpe training, tiktoken encoding, chat rendering, plain-file save/load.

Ids: 0-255 are the bytes, then the learned merges in order, then the special tokens (the last ids).
``vocab_size`` counts all of them. Encoding goes through a tiktoken ``Encoding`` built from the
ranks (fast, and identical to rustbpe's own ``encode``); text is always encoded as ordinary text, so
a special token's spelling inside text never becomes a special id. Only the renderer emits specials.

Conversations: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str | list[part]}]}``.

* ``content`` as a **string** is the dataset shorthand: each literal ``<|image|>`` in it is an image
  placeholder.
* ``content`` as a **list of parts** is the structured form, where text is always literal and images
  come only from ``{"type": "image"}`` parts. Parts: ``{"type": "text", "text": ...}``,
  ``{"type": "image"}``, and in assistant turns ``{"type": "python"|"output", "text": ...}`` (tool use).
  Chat front ends put what a user types into a text part, so a typed ``<|image|>`` stays text.

See docs/tokenizer.md for the layout and the loss mask.
"""

from __future__ import annotations

import base64
import hashlib
import json
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import tiktoken

IMAGE_PLACEHOLDER = "<|image|>"
SPECIAL_TOKENS = (
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
    IMAGE_PLACEHOLDER,
    "<|pad|>",  # batch padding for inference/collation; never trained on
)
# The frame around an image's tokens for models that keep the Idefics families' prompts (VisionConfig.image_frame),
# so those families' transformers processors build our ids: Idefics' <fake_token_around_image> and Idefics3's
# <global-img>. Tokenizers trained before them lack them and still load; only a framed model needs them.
IMAGE_FRAME_TOKEN = "<|image_frame|>"
IMAGE_GLOBAL_TOKEN = "<|image_global|>"
FRAME_TOKENS = (IMAGE_FRAME_TOKEN, IMAGE_GLOBAL_TOKEN)
ALL_SPECIAL_TOKENS = SPECIAL_TOKENS + FRAME_TOKENS  # what a tokenizer trained or imported now holds
IMAGE_TOKENS = (IMAGE_PLACEHOLDER, *FRAME_TOKENS)  # only the renderer writes these, never the model
# "none": <|image|> x N. "idefics2": <|image_frame|> <|image|> x N <|image_frame|>, adjacent images sharing a frame
# and a word right after an image spaced off it, as Idefics2's processor writes them. "idefics3": <|image_frame|>
# <|image_global|> <|image|> x N <|image_frame|>, Idefics3's (SmolVLM's) unsplit image.
IMAGE_FRAMES = ("none", "idefics2", "idefics3")
RANKS_FILE = "ranks.tiktoken"
META_FILE = "tokenizer.json"
FORMAT = "ghostvis-tokenizer/1"
MIN_VOCAB_SIZE = 256 + len(ALL_SPECIAL_TOKENS)


class Tokenizer:
    """Byte-level BPE with GhostVis's special tokens. Build with ``train_from_iterator`` or ``load``."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str, special_tokens: dict[str, int]):
        n = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(n)):
            raise ValueError("mergeable_ranks must map distinct byte strings to the ids 0..N-1")
        missing = [s for s in SPECIAL_TOKENS if s not in special_tokens]
        if missing:
            raise ValueError(f"special_tokens lacks {missing}")
        if sorted(special_tokens.values()) != list(range(n, n + len(special_tokens))):
            raise ValueError(f"special token ids must be {n}..{n + len(special_tokens) - 1} (right after the ranks)")
        self.mergeable_ranks = dict(mergeable_ranks)
        self.pattern = pattern
        self.special_tokens = dict(special_tokens)
        self._enc = tiktoken.Encoding(
            name="ghostvis",
            pat_str=pattern,
            mergeable_ranks=self.mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        self.fingerprint = self._fingerprint()

    # ---------------------------------------------------------------- training / files
    @classmethod
    def train_from_iterator(
        cls, texts: Iterable[str], vocab_size: int, *, pattern: str | None = None, buffer_size: int = 8192
    ) -> Tokenizer:
        """Train with rustbpe. ``vocab_size`` counts bytes (256) + merges + special tokens."""
        try:
            import rustbpe  # the compiled trainer; only training needs it
        except ImportError as e:  # a ValueError so launch/tok_train.py prints it as a one-line error
            raise ValueError("the rustbpe trainer is not installed: run scripts/build_rustbpe.sh from a GhostVis "
                             "checkout (needs Rust), or `pip install ./rustbpe`") from e

        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size={vocab_size} is too small: it must cover the 256 byte tokens and "
                f"{len(ALL_SPECIAL_TOKENS)} special tokens, so at least {MIN_VOCAB_SIZE}"
            )
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(texts), vocab_size - len(ALL_SPECIAL_TOKENS), buffer_size, pattern)
        ranks = {bytes(b): i for b, i in trainer.get_mergeable_ranks()}
        if len(ranks) + len(ALL_SPECIAL_TOKENS) < vocab_size:
            warnings.warn(
                f"the corpus only supported {len(ranks) - 256} merges; vocab_size is "
                f"{len(ranks) + len(ALL_SPECIAL_TOKENS)} instead of {vocab_size}",
                stacklevel=2,
            )
        specials = {s: len(ranks) + i for i, s in enumerate(ALL_SPECIAL_TOKENS)}
        return cls(ranks, trainer.get_pattern(), specials)

    def _ranks_text(self) -> str:
        items = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        return "".join(f"{base64.b64encode(b).decode()} {r}\n" for b, r in items)

    def _meta_text(self) -> str:
        meta = {"format": FORMAT, "pattern": self.pattern, "special_tokens": self.special_tokens,
                "vocab_size": self.vocab_size}
        return json.dumps(meta, indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    def _files(self) -> dict[str, str]:
        """File name -> text of what ``save`` writes: ``ranks.tiktoken`` (base64 token + id per line) and
        ``tokenizer.json``. Subclasses with other files override this (and ``load``)."""
        return {RANKS_FILE: self._ranks_text(), META_FILE: self._meta_text()}

    def _fingerprint(self) -> str:
        """sha256 of the saved files' text: equal fingerprints = identical tokenizers."""
        return hashlib.sha256("".join(self._files().values()).encode()).hexdigest()

    def save(self, directory: str | Path) -> None:
        """Write the tokenizer's files (``_files``) into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for name, text in self._files().items():
            (d / name).write_text(text, encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Our own kind of tokenizer directory; `ghostvis.tokenizer_dir.load_tokenizer` reads either kind."""
        d = Path(directory)
        for name in (RANKS_FILE, META_FILE):
            if not (d / name).is_file():
                raise FileNotFoundError(
                    f"tokenizer directory {d} has no {name}; point to a directory written by "
                    f"Tokenizer.save / launch/tok_train.py"
                )
        ranks: dict[bytes, int] = {}
        with open(d / RANKS_FILE, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    tok, rank = line.split()
                    ranks[base64.b64decode(tok, validate=True)] = int(rank)
                except ValueError as e:
                    raise ValueError(f"{d / RANKS_FILE}:{lineno}: expected '<base64> <id>', got {line!r}") from e
        try:
            meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))
            if meta.get("format") != FORMAT:
                raise ValueError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
            tok = cls(ranks, meta["pattern"], meta["special_tokens"])
        except (ValueError, KeyError) as e:
            raise ValueError(f"{d / META_FILE}: invalid tokenizer metadata: {e!r}") from e
        if meta.get("vocab_size") != tok.vocab_size:
            raise ValueError(f"{d / META_FILE}: vocab_size {meta.get('vocab_size')} != {tok.vocab_size} in the files")
        return tok

    # ---------------------------------------------------------------- ids
    @property
    def vocab_size(self) -> int:
        return len(self.mergeable_ranks) + len(self.special_tokens)

    def special_id(self, name: str) -> int:
        """Id of a special token by spelling, e.g. ``special_id("<|bos|>")``."""
        try:
            return self.special_tokens[name]
        except KeyError:
            raise KeyError(f"unknown special token {name!r}; known: {list(self.special_tokens)}") from None

    @property
    def bos_token_id(self) -> int:
        return self.special_tokens["<|bos|>"]

    @property
    def image_token_id(self) -> int:
        return self.special_tokens[IMAGE_PLACEHOLDER]

    @property
    def pad_token_id(self) -> int:
        return self.special_tokens["<|pad|>"]

    def _prefix(self, prepend: int | str | None) -> list[int]:
        if prepend is None:
            return []
        return [self.special_id(prepend) if isinstance(prepend, str) else int(prepend)]

    def encode(self, text: str, prepend: int | str | None = None) -> list[int]:
        """Ids of ``text`` as ordinary text (special spellings stay text); ``prepend``: an id or special name."""
        return self._prefix(prepend) + self._enc.encode_ordinary(text)

    def encode_batch(
        self, texts: Sequence[str], prepend: int | str | None = None, num_threads: int = 8
    ) -> list[list[int]]:
        prefix = self._prefix(prepend)
        return [prefix + ids for ids in self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (special ids decode to their spelling; broken UTF-8 becomes U+FFFD)."""
        return self._enc.decode(list(ids))

    # ---------------------------------------------------------------- chat rendering
    def image_ids(self, num_vision_tokens: int, image_frame: str = "none") -> list[int]:
        """The ids of one image in a prompt: ``num_vision_tokens`` <|image|> ids in ``image_frame``'s frame
        (``IMAGE_FRAMES``)."""
        run = [self.image_token_id] * num_vision_tokens
        if image_frame == "none":
            return run
        if image_frame not in IMAGE_FRAMES:
            raise ValueError(f"image_frame={image_frame!r}; choose one of {IMAGE_FRAMES}")
        frame = self._frame_id(IMAGE_FRAME_TOKEN, image_frame)
        if image_frame == "idefics2":
            return [frame, *run, frame]
        return [frame, self._frame_id(IMAGE_GLOBAL_TOKEN, image_frame), *run, frame]

    def _frame_id(self, name: str, image_frame: str) -> int:
        if name not in self.special_tokens:
            raise ValueError(f"image_frame={image_frame!r} needs the special token {name}, which this tokenizer "
                             "(made before image frames) lacks: train the model with --vision image_frame=none, or "
                             "start from a tokenizer that has it (a new one from launch/tok_train.py, a new "
                             "launch/import_hf.py import, or an --alias onto a special token the model never writes, "
                             "e.g. <fake_token_around_image>)")
        return self.special_tokens[name]

    def render_caption(
        self, caption: str, num_vision_tokens: int, image_frame: str = "none", max_tokens: int | None = None
    ) -> tuple[list[int], list[int]]:
        """Ids and loss mask of vision_pretrain's caption row: <|bos|>, the image (``image_ids``), the caption
        (spaced off an Idefics2 frame, as in a conversation), trained on the caption only and cut to ``max_tokens``."""
        head = [self.bos_token_id] + self.image_ids(num_vision_tokens, image_frame)
        text = self.encode(_spaced_after_image(caption, image_frame))
        if max_tokens is not None:
            text = text[:max_tokens - len(head)]
        return head + text, [0] * len(head) + [1] * len(text)

    def render_conversation(
        self, conversation: dict[str, Any], max_tokens: int = 2048, num_vision_tokens: int = 0,
        image_frame: str = "none",
    ) -> tuple[list[int], list[int]]:
        """Token ids and loss mask (1 = train on it) of a whole conversation, truncated to ``max_tokens``; each
        image is ``image_ids(num_vision_tokens, image_frame)``.

        Truncation never cuts through an image: it stops before an image that would not fit whole,
        so ``ids.count(image_token_id) // num_vision_tokens`` images (the first ones) are kept.
        """
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        ids, mask, image_spans = self._render(_messages(conversation), num_vision_tokens, image_frame)
        cut = min(max_tokens, len(ids))
        for start, end in image_spans:
            if start < cut < end:
                cut = start
        return ids[:cut], mask[:cut]

    def render_for_completion(
        self, conversation: dict[str, Any], num_vision_tokens: int = 0, image_frame: str = "none"
    ) -> list[int]:
        """Ids primed for the assistant's reply: drops a trailing assistant turn, appends <|assistant_start|>."""
        messages = _messages(conversation)
        if messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        if not messages or messages[-1].get("role") != "user":
            raise ValueError("render_for_completion needs a conversation ending with a user message")
        ids, _, _ = self._render(messages, num_vision_tokens, image_frame)
        return ids + [self.special_id("<|assistant_start|>")]

    def _render(
        self, messages: list[dict[str, Any]], num_vision_tokens: int, image_frame: str
    ) -> tuple[list[int], list[int], list[tuple[int, int]]]:
        ids, mask, spans = [self.bos_token_id], [0], []
        # Idefics2's processor merges the frames of adjacent images and spaces a word off a closing frame
        idefics2_frame = self._frame_id(IMAGE_FRAME_TOKEN, image_frame) if image_frame == "idefics2" else None

        def emit(toks: list[int], m: int) -> None:
            ids.extend(toks)
            mask.extend([m] * len(toks))

        for i, msg in enumerate(_fold_system(messages)):
            role = msg["role"]
            if role != ("user", "assistant")[i % 2]:
                raise ValueError(
                    f"message {i}: role {role!r} out of order; messages must alternate user/assistant "
                    f"starting with user (an optional system message first)"
                )
            train = 1 if role == "assistant" else 0
            emit([self.special_id(f"<|{role}_start|>")], 0)
            for kind, text in _parts(msg, i):
                if kind == "image":
                    if num_vision_tokens <= 0:
                        raise ValueError(
                            f"message {i} has an image but num_vision_tokens={num_vision_tokens}; pass the "
                            f"number of vision tokens per image (> 0)"
                        )
                    block = self.image_ids(num_vision_tokens, image_frame)
                    if ids[-1] == idefics2_frame:
                        block = block[1:]
                    spans.append((len(ids), len(ids) + len(block)))
                    emit(block, 0)
                elif kind == "text":
                    emit(self.encode(_spaced_after_image(text, image_frame) if ids[-1] == idefics2_frame else text),
                         train)
                else:  # python (trained) or output (tool result, not trained)
                    m = 1 if kind == "python" else 0
                    emit([self.special_id(f"<|{kind}_start|>")], m)
                    emit(self.encode(text), m)
                    emit([self.special_id(f"<|{kind}_end|>")], m)
            emit([self.special_id(f"<|{role}_end|>")], train)
        return ids, mask, spans


def _spaced_after_image(text: str, image_frame: str) -> str:
    """Text right after an image, as Idefics2's processor writes it: a word spaced off the closing frame."""
    if image_frame == "idefics2" and text[:1] not in ("", "<") and not text[0].isspace():
        return " " + text
    return text


def message_images(message: dict[str, Any]) -> int:
    """Images in one message: ``<|image|>`` placeholders in string content, ``{"type": "image"}`` parts in a list."""
    content = message["content"]
    if isinstance(content, str):
        return content.count(IMAGE_PLACEHOLDER)
    return sum(isinstance(p, dict) and p.get("type") == "image" for p in content)


def _messages(conversation: dict[str, Any] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    messages = conversation.get("messages") if isinstance(conversation, dict) else conversation
    if not isinstance(messages, list) or not messages:
        raise ValueError('a conversation is {"messages": [...]} with at least one message')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i}: expected a dict with 'role' and 'content', got {m!r:.80}")
    return list(messages)


def _fold_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold a leading system message into the first user message (system text + blank line + user text)."""
    if messages[0]["role"] != "system":
        return messages
    if len(messages) < 2 or messages[1]["role"] != "user":
        raise ValueError("a system message must be first and followed by a user message")
    system, user = messages[0], messages[1]
    content = _as_parts(system["content"], 0) + [{"type": "text", "text": "\n\n"}] + _as_parts(user["content"], 1)
    return [{"role": "user", "content": content}] + messages[2:]


def _as_parts(content: str | list[dict[str, Any]], i: int) -> list[dict[str, Any]]:
    """Structured parts of a content; a string's ``<|image|>`` placeholders become image parts."""
    if isinstance(content, list):
        return content
    if not isinstance(content, str):
        raise ValueError(f"message {i}: content must be a string or a list of parts, got {type(content).__name__}")
    parts: list[dict[str, Any]] = []
    for j, piece in enumerate(content.split(IMAGE_PLACEHOLDER)):
        if j:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _parts(msg: dict[str, Any], i: int) -> list[tuple[str, str]]:
    """(kind, text) pieces of a message, adjacent text merged so it encodes as one string."""
    allowed = {"text", "image", "python", "output"} if msg["role"] == "assistant" else {"text", "image"}
    out: list[tuple[str, str]] = []
    for part in _as_parts(msg["content"], i):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in allowed:
            raise ValueError(f"message {i} ({msg['role']}): part type {kind!r} not allowed here; use one of {sorted(allowed)}")
        text = "" if kind == "image" else part.get("text")
        if not isinstance(text, str):
            raise ValueError(f"message {i}: part of type {kind!r} needs a string 'text'")
        if kind == "text" and out and out[-1][0] == "text":
            out[-1] = ("text", out[-1][1] + text)
        else:
            out.append((kind, text))
    return out


def bytes_per_token(encode_batch: Callable[[list[str]], list[list[int]]], texts: Sequence[str]) -> float:
    """UTF-8 bytes per token of ``texts`` under ``encode_batch(texts) -> list[list[int]]`` (compression)."""
    n_tokens = sum(len(ids) for ids in encode_batch(list(texts)))
    return sum(len(t.encode("utf-8")) for t in texts) / max(n_tokens, 1)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a GhostVis tokenizer on ``texts``; ``vocab_size`` counts bytes + merges + specials."""
    return Tokenizer.train_from_iterator(texts, vocab_size)
