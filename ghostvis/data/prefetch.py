"""Batches built in a background thread, a few ahead of the training loop (`--prefetch`).

Reading tars, decoding and resizing images, tokenizing and padding then overlap the model's step instead
of running between steps. Threads suffice: PIL decoding, numpy and tiktoken release the GIL, and the
training thread releases it while it waits on the GPU.

Exact resume is kept: `state_dict()` is the source's state right after the last batch the *loop* took,
not where the thread has got to, so a checkpoint resumes with the first batch training had not seen.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Iterator
from typing import Any

_END = object()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetch:
    """Wraps a batch source with `state_dict()` / `load_state_dict()` (every data builder's result)."""

    def __init__(self, source: Any, depth: int = 2) -> None:
        """`depth` batches wait in the queue (one more may be built meanwhile). Iterate once: the thread
        consumes the source, so a second pass would skip what it had read ahead."""
        if depth < 1:
            raise ValueError(f"--prefetch {depth}: give the number of batches to build ahead (>= 1), or 0 for none")
        self.source, self.depth = source, depth
        self._state: dict[str, Any] | None = None  # None: nothing taken yet, the source's own state holds
        self._iterated = False

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._state) if self._state is not None else self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)
        self._state = None

    def __iter__(self) -> Iterator[Any]:
        if self._iterated:
            raise RuntimeError("a Prefetch is iterated once (its thread has read ahead of the loop)")
        self._iterated = True
        ready: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                for batch in self.source:
                    if not put((batch, copy.deepcopy(self.source.state_dict()))):
                        return
                put(_END)
            except BaseException as err:  # handed to the loop's thread, which raises it
                put(_Failed(err))

        thread = threading.Thread(target=work, name="ghostvis-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = ready.get()
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    raise item.error
                batch, self._state = item
                yield batch
        finally:
            stop.set()  # the loop stopped taking batches: let the thread finish
            thread.join()
