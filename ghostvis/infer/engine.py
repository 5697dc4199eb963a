"""Batched generation with a KV cache: prefill the prompt (images encoded once and spliced in), then
decode one token at a time; sampling with temperature / top-k / top-p; calculator tool use.

Batching scheme (correctness first): `KVCache` keeps one position for the whole batch and the
attention kernels have no padding mask, so rows are grouped by prompt length and each group is one
batch — no padding anywhere, so every row sees exactly what it would see alone. Groups run one after
another. A group whose prompts (and images) are all identical — GRPO's G samples of one prompt — is
prefilled once and its keys/values copied into every row.

Tool use: when a row emits <|python_start|> expr <|python_end|>, the expression goes to the safe
calculator and the engine force-feeds <|output_start|> result <|output_end|> before the model
continues. Forced tokens are reported with `sampled=False` (RL must not put loss on them).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn

from ghostvis.infer.calculator import CalculatorError, calculate
from ghostvis.model.kv_cache import KVCache
from ghostvis.tokenizer import IMAGE_TOKENS, Tokenizer


class TokenEvent(NamedTuple):
    """One generated token of row `row`; `sampled=False` marks a token forced by the tool."""

    row: int
    token: int
    sampled: bool


@dataclass
class Completion:
    tokens: list[int] = field(default_factory=list)  # generated ids, the stop token included
    sampled: list[bool] = field(default_factory=list)  # per token: False = forced tool output
    finish_reason: str = "length"  # "stop" (a stop token) or "length" (max_new_tokens / context full)


class ToolUse:
    """Per-row calculator state machine: watches the row's tokens and queues the forced reply.

    `observe` every token the row gets (sampled or forced); `next_forced` pops the next token the
    engine must feed instead of sampling, or None.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.python_start = tokenizer.special_id("<|python_start|>")
        self.python_end = tokenizer.special_id("<|python_end|>")
        self.output_start = tokenizer.special_id("<|output_start|>")
        self.output_end = tokenizer.special_id("<|output_end|>")
        self.expression: list[int] | None = None  # tokens since <|python_start|>, None outside a call
        self.forced: deque[int] = deque()

    def observe(self, token: int) -> None:
        if token == self.python_start:
            self.expression = []
        elif token == self.python_end and self.expression is not None:
            result = tool_result(self.tokenizer.decode(self.expression))
            self.expression = None
            self.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
        elif self.expression is not None:
            self.expression.append(token)

    def next_forced(self) -> int | None:
        return self.forced.popleft() if self.forced else None


def tool_result(expression: str) -> str:
    """What the model sees between the output tokens: the value, or why the calculator refused."""
    try:
        return calculate(expression)
    except CalculatorError as e:
        return f"error: {e}"


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row from logits [B, V]; temperature 0 is greedy."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Engine:
    """Generation for a `GPT` or a `VLM` (`.llm` + `.vision`) with its tokenizer."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, device: torch.device | str = "cpu") -> None:
        self.model = model.eval()
        self.llm = getattr(model, "llm", model)
        self.vision = getattr(model, "vision", None)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.default_stop_ids = (tokenizer.special_id("<|assistant_end|>"), tokenizer.bos_token_id)
        # a reply may never hold an image placeholder (the next decode step would have no image for it) or
        # the frame around one
        self.never_sampled = torch.tensor([tokenizer.special_tokens[name] for name in IMAGE_TOKENS
                                           if name in tokenizer.special_tokens], device=self.device)

    @property
    def max_seq_len(self) -> int:
        return self.llm.config.max_seq_len

    @property
    def num_vision_tokens(self) -> int:
        """Image-token positions per image in a prompt (0 for a text-only model)."""
        return 0 if self.vision is None else self.vision.num_vision_tokens

    @property
    def image_frame(self) -> str:
        """The special tokens around each image's positions in a prompt (`VisionConfig.image_frame`)."""
        vision_cfg = getattr(self.model, "vision_config", None)
        return "none" if vision_cfg is None else vision_cfg.image_frame

    def _validate(self, prompts: Sequence[Sequence[int]], images: Sequence[Sequence[torch.Tensor]] | None,
                  temperature: float, top_k: int | None, top_p: float | None) -> None:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt, each with at least one token")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
        if images is not None and len(images) != len(prompts):
            raise ValueError(f"images has {len(images)} rows for {len(prompts)} prompts (one list per prompt)")
        image_id = self.tokenizer.image_token_id
        for i, prompt in enumerate(prompts):
            if len(prompt) >= self.max_seq_len:
                raise ValueError(
                    f"prompt {i} has {len(prompt)} tokens; the model's context is {self.max_seq_len}: "
                    "shorten the conversation"
                )
            n_images = len(images[i]) if images is not None else 0
            n_slots = sum(1 for t in prompt if t == image_id)
            if n_slots != n_images * self.num_vision_tokens:
                raise ValueError(
                    f"prompt {i} has {n_slots} image-token positions but {n_images} image(s) × "
                    f"{self.num_vision_tokens} vision tokens were given"
                )

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], images: Sequence[Sequence[torch.Tensor]] | None = None,
                 max_new_tokens: int = 256, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None,
                 stop_ids: Sequence[int] | None = None) -> Iterator[TokenEvent]:
        """Stream `TokenEvent`s for a batch of prompts (token ids, images already preprocessed to
        [3, H, W] tensors, one list per prompt, in the order of their image positions)."""
        self._validate(prompts, images, temperature, top_k, top_p)
        stops = set(self.default_stop_ids if stop_ids is None else stop_ids)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        groups: dict[int, list[int]] = {}
        for row, prompt in enumerate(prompts):
            groups.setdefault(len(prompt), []).append(row)
        for rows in groups.values():
            yield from self._generate_group(
                rows, [list(prompts[r]) for r in rows], [list(images[r]) if images else [] for r in rows],
                max_new_tokens, temperature, top_k, top_p, generator, stops,
            )

    def prefill(self, prompts: list[list[int]], images: list[list[torch.Tensor]], cache: KVCache) -> torch.Tensor:
        """Run the prompts through the model, filling `cache`; returns last-position logits [B, V]."""
        same = len(prompts) > 1 and all(p == prompts[0] for p in prompts) and all(
            len(im) == len(images[0]) and all(torch.equal(a, b) for a, b in zip(im, images[0])) for im in images
        )
        if same:  # prefill one row, then copy its keys/values into every row
            one = KVCache.for_model(self.llm.config, 1, cache.max_len, dtype=cache.k.dtype, device=cache.k.device)
            logits = self.prefill(prompts[:1], images[:1], one)
            cache.k.copy_(one.k.expand_as(cache.k))
            cache.v.copy_(one.v.expand_as(cache.v))
            cache.advance(one.pos)
            return logits.expand(len(prompts), -1)
        idx = torch.tensor(prompts, dtype=torch.long, device=self.device)
        pixels = [im for row in images for im in row]
        image_embeds = None
        if pixels:
            image_embeds = self.vision(torch.stack(pixels).to(self.device))  # the encoder casts (and normalises uint8)
        return self.llm(idx, image_embeds=image_embeds, kv_cache=cache)[:, -1, :]

    def _generate_group(self, rows: list[int], prompts: list[list[int]], images: list[list[torch.Tensor]],
                        max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                        generator: torch.Generator | None, stops: set[int]) -> Iterator[TokenEvent]:
        batch, prompt_len = len(rows), len(prompts[0])
        cache_len = min(self.max_seq_len, prompt_len + max_new_tokens)
        dtype = next(self.llm.parameters()).dtype
        cache = KVCache.for_model(self.llm.config, batch, cache_len, dtype=dtype, device=self.device)
        logits = self.prefill(prompts, images, cache)
        tools = [ToolUse(self.tokenizer) for _ in rows]
        done = [False] * batch
        for _ in range(max_new_tokens):
            logits = logits.index_fill(-1, self.never_sampled, float("-inf"))
            sampled = sample(logits, temperature, top_k, top_p, generator).tolist()
            next_tokens = []
            for i in range(batch):
                forced = tools[i].next_forced()
                token = sampled[i] if forced is None else forced
                next_tokens.append(token)
                if done[i]:
                    continue
                yield TokenEvent(rows[i], token, forced is None)
                tools[i].observe(token)
                done[i] = forced is None and token in stops
            if all(done) or cache.pos >= cache_len:  # the cache is full: the context is used up
                return
            idx = torch.tensor(next_tokens, dtype=torch.long, device=self.device).unsqueeze(1)
            logits = self.llm(idx, kv_cache=cache)[:, -1, :]

    def complete(self, prompts: Sequence[Sequence[int]], images: Sequence[Sequence[torch.Tensor]] | None = None,
                 max_new_tokens: int = 256, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None,
                 stop_ids: Sequence[int] | None = None) -> list[Completion]:
        """Non-streaming `generate`: one `Completion` per prompt, in order."""
        stops = set(self.default_stop_ids if stop_ids is None else stop_ids)
        out = [Completion() for _ in prompts]
        for row, token, was_sampled in self.generate(prompts, images, max_new_tokens, temperature, top_k, top_p,
                                                      seed, stop_ids):
            out[row].tokens.append(token)
            out[row].sampled.append(was_sampled)
            if was_sampled and token in stops:
                out[row].finish_reason = "stop"
        return out


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the duration; a model called from the training loop goes back to training."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
