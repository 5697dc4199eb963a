"""Continuous batching: many requests share each decode step of one model.

One thread owns the model. It keeps a `RaggedKVCache` whose rows are the requests being decoded, each
at its own length (masked attention, per-row RoPE positions), packed into rows [0, n). Between two
decode steps it ends the rows that finished, were cancelled (the client went away) or ran past their
deadline, and prefills waiting requests (their images included) into the free rows. Every row samples
with its own settings and generator, so a request's tokens do not depend on what it is batched with.

Requests wait in a bounded queue: `submit` raises `QueueFull` when it is full (the server answers 503).
Results go back through each request's `emit` callback, called on the model thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ghostvis.infer.engine import Engine, ToolUse, sample
from ghostvis.model.kv_cache import KVCache, RaggedKVCache

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The wait queue holds `max_queue` requests already."""


class Update(NamedTuple):
    """What one decode step gives a request: a token (None when the request ended without one), and
    once it is over, why: "stop", "length", "timeout", "shutdown" or "error" (then `detail` says why)."""

    token: int | None
    finish: str | None = None
    detail: str = ""


@dataclass
class Request:
    """One generation. `prompt` ids with `images` (preprocessed, in order of their positions);
    `deadline` is a `time.monotonic()` time; `emit` receives every `Update`, on the model thread."""

    prompt: list[int]
    images: list[torch.Tensor]
    emit: Callable[[Update], None]
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    deadline: float = float("inf")
    cancelled: bool = False  # set by the server when the client is gone; read between steps


@dataclass
class _Row:
    request: Request
    logits: torch.Tensor  # [V], for the next token
    tools: ToolUse
    generator: torch.Generator | None
    produced: int = 0
    finished: bool = field(default=False)


class Batcher:
    """Serves `Request`s with `engine`, up to `max_batch` at once; at most `max_queue` wait.
    `cache_len` bounds prompt + reply per request (default: the model's context)."""

    def __init__(self, engine: Engine, max_batch: int = 32, max_queue: int = 64, cache_len: int | None = None) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.dtype = next(engine.llm.parameters()).dtype
        self.cache = RaggedKVCache.for_model(engine.llm.config, max_batch, cache_len, dtype=self.dtype,
                                             device=engine.device)
        self.stops = set(engine.default_stop_ids)
        self._queue: deque[Request] = deque()
        self._rows: list[_Row] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="ghostvis-batcher", daemon=True)

    @property
    def cache_len(self) -> int:
        return self.cache.max_len

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End every request (finish "shutdown") and the model thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        else:  # never started: answer whoever waits
            while self._queue:
                _send(self._queue.popleft(), Update(None, "shutdown", "the server is shutting down"))

    def submit(self, request: Request) -> None:
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._queue) >= self.max_queue:  # requests whose clients left hold no place
                self._queue = deque(r for r in self._queue if not r.cancelled)
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting already (the queue holds {self.max_queue})")
            self._queue.append(request)
            self._cond.notify()

    def load(self) -> dict[str, int]:
        """Rows decoding and requests waiting (for /health)."""
        return {"running": len(self._rows), "waiting": len(self._queue), "max_batch": self.max_batch,
                "max_queue": self.max_queue}

    # ---- the model thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._rows and not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    break
                admit = []
                while self._queue and len(self._rows) + len(admit) < self.max_batch:
                    admit.append(self._queue.popleft())
            for request in admit:  # prefill outside the lock: submit never waits for the model
                self._admit(request)
            if self._rows:
                try:
                    self._step()
                except Exception as e:  # a failed step ends its rows, never the server
                    log.exception("decode step failed")
                    for i in reversed(range(len(self._rows))):
                        self._end(i, Update(None, "error", f"{type(e).__name__}: {e}"))
        with self._cond:
            waiting, self._queue = list(self._queue), deque()
        for request in waiting:
            _send(request, Update(None, "shutdown", "the server is shutting down"))
        for i in reversed(range(len(self._rows))):
            self._end(i, Update(None, "shutdown", "the server is shutting down"))

    @torch.inference_mode()
    def _admit(self, request: Request) -> None:
        if request.cancelled:
            return
        if time.monotonic() > request.deadline:
            _send(request, Update(None, "timeout", "the request waited past its timeout"))
            return
        try:
            one = KVCache.for_model(self.engine.llm.config, 1, len(request.prompt), dtype=self.dtype,
                                    device=self.engine.device)
            logits = self.engine.prefill([request.prompt], [request.images], one)[0]
            self.cache.put_row(len(self._rows), one)
        except Exception as e:
            log.exception("prefill failed")
            _send(request, Update(None, "error", f"{type(e).__name__}: {e}"))
            return
        generator = None
        if request.seed is not None:
            generator = torch.Generator(device=self.engine.device).manual_seed(request.seed)
        self._rows.append(_Row(request, logits, ToolUse(self.engine.tokenizer), generator))

    @torch.inference_mode()
    def _step(self) -> None:
        """Pick every row's next token, end the rows that are done, and run one decode step for the rest."""
        logits = torch.stack([row.logits for row in self._rows])
        logits.index_fill_(-1, self.engine.never_sampled, float("-inf"))
        greedy = logits.argmax(dim=-1).tolist()
        now, tokens = time.monotonic(), []
        for i, row in enumerate(self._rows):
            r = row.request
            if r.cancelled or now > r.deadline:
                row.finished = True
                if not r.cancelled:
                    _send(r, Update(None, "timeout", "the reply ran past the request timeout"))
                tokens.append(0)
                continue
            forced = row.tools.next_forced()
            if forced is not None:
                token = forced
            elif r.temperature == 0.0:
                token = greedy[i]
            else:
                token = int(sample(logits[i:i + 1], r.temperature, r.top_k, r.top_p, row.generator)[0])
            row.tools.observe(token)
            row.produced += 1
            tokens.append(token)
            finish = None
            if forced is None and token in self.stops:
                finish = "stop"
            elif row.produced >= r.max_new_tokens or self.cache.host_lengths[i] >= self.cache.max_len:
                finish = "length"
            _send(r, Update(token, finish))
            row.finished = finish is not None
        for i in reversed(range(len(self._rows))):  # pack the survivors into rows [0, n)
            if self._rows[i].finished:
                last = len(self._rows) - 1
                if i != last:
                    self.cache.move_row(last, i)
                    self._rows[i] = self._rows[last]
                    tokens[i] = tokens[last]
                self._rows.pop()
                tokens.pop()
        if not self._rows:
            return
        self.cache.rows = len(self._rows)
        idx = torch.tensor(tokens, dtype=torch.long, device=self.engine.device).unsqueeze(1)
        out = self.engine.llm(idx, kv_cache=self.cache)[:, -1, :]
        for row, row_logits in zip(self._rows, out):
            row.logits = row_logits

    def _end(self, i: int, update: Update) -> None:
        _send(self._rows[i].request, update)
        last = len(self._rows) - 1
        if i != last:
            self.cache.move_row(last, i)
            self._rows[i] = self._rows[last]
        self._rows.pop()


def _send(request: Request, update: Update) -> None:
    try:
        request.emit(update)
    except Exception:  # a consumer that is gone (its event loop closed) must not stop the model thread
        log.debug("dropped an update for a finished consumer", exc_info=True)
