"""Training batches built in worker processes (`--data-workers N`), pinned, and copied to the device one
batch ahead of the step.

Split. Each of N workers runs the stage's own data builder as a data-parallel reader of its own: worker w
of data-parallel rank r reads as rank r + dp·w of dp·N, so workers read disjoint samples and together
cover what the rank would read alone; its own draws (mixture picks, batch order) are share w's
(DataRequest.draw_seed). The loop takes batches from the workers in turn (a torch
DataLoader's in-order delivery), so the batch order is a function of (seed, dp, N) alone. N = 0 builds
batches in the training process itself, in the same order as N = 1.

Exact resume. Every batch travels with its worker's state right after it. The loader's state is, per
worker, the state of the last batch the *loop* took, plus which worker is next: batches the workers had
built ahead are built again after a resume. A checkpoint resumes with the same N (another N splits the
samples differently and is refused; without --data-workers, the checkpoint's N is taken).

Corrupt samples. Each worker's streams count their own and enforce the corrupt-fraction limit (the
worker's DataError is raised in the loop); `stats` sums the counts of every worker as of its last batch
the loop took.

Device. On CUDA, batches arrive in pinned memory and batch i+1's host->device copy is issued on a side
stream before the loop computes on batch i; on CPU batches are used where they are.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ghostvis.data.manifest import DataError

MAX_DEFAULT_WORKERS = 8  # ~5 ms per image on one core (docs/data.md): 8 workers make ~1,700 images/s


def local_world_size() -> int:
    """The training processes on this host (1 outside a launcher)."""
    # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or "1"))


def default_workers() -> int:
    """min(8, this rank's share of the CPU cores minus one for the training process itself)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_rank = cores // local_world_size()
    return max(0, min(MAX_DEFAULT_WORKERS, per_rank - 1))


class _Shares(IterableDataset):
    """What one DataLoader worker iterates: its share's batches, each with the share's state after it."""

    def __init__(self, build: Callable[[Any], Any], req: Any, shares: int, states: list[Any], first: int) -> None:
        self.build, self.req, self.shares, self.states, self.first = build, req, shares, states, first

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        # after a resume the loop's next batch is share `first`'s: DataLoader worker 0 takes that share
        share = ((0 if info is None else info.id) + self.first) % self.shares
        req = dataclasses.replace(self.req, rank=self.req.rank + self.req.world_size * share,
                                  world_size=self.req.world_size * self.shares, share=share, device=torch.device("cpu"))
        try:
            data = self.build(req)
            if self.states[share] is not None:
                data.load_state_dict(self.states[share])
            for batch in data:
                yield share, batch, copy.deepcopy(data.state_dict()), copy.deepcopy(getattr(data, "stats", None))
        except Exception as err:  # raised again in the training process, as itself (not a worker traceback)
            yield err


class WorkerBatches:
    """The training batches of `build(req)` from `workers` processes; `state_dict()` / `load_state_dict()`
    give the loop's position (module docstring). Iterate once per run."""

    def __init__(self, build: Callable[[Any], Any], req: Any, workers: int | None, device: torch.device) -> None:
        """`workers` None: `default_workers()`, and a resume takes the checkpoint's number instead."""
        self.adopt = workers is None
        workers = default_workers() if workers is None else workers
        if workers < 0:
            raise ValueError(f"--data-workers {workers}: give the number of worker processes (0 = build batches "
                             "in the training process)")
        self.build, self.req, self.workers, self.device = build, req, workers, torch.device(device)
        # built once here (cheap: manifests, no samples read) so a bad data directory or a refused mixture
        # fails in the training process before any worker starts, and so does a position it cannot resume
        self._probe = build(dataclasses.replace(req, device=torch.device("cpu")))
        self.shares = max(workers, 1)
        self._states: list[Any] = [None] * self.shares  # None: the share has not given the loop a batch yet
        self._stats: list[Any] = [None] * self.shares
        self._next = 0

    def state_dict(self) -> dict[str, Any]:
        return {"shares": self.shares, "next": self._next, "states": copy.deepcopy(self._states),
                "stats": copy.deepcopy(self._stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("shares", 1)
        if saved != self.shares and self.adopt:  # the default differs between machines; the split must not
            self.workers = self.shares = saved
        if saved != self.shares:
            raise DataError(f"the checkpoint's data position was saved with --data-workers {saved} (each worker "
                            f"reads its own share of the samples); resume with --data-workers {saved}")
        if "shares" not in state:  # a batcher's own state, saved before worker shares existed
            state = {"shares": 1, "next": 0, "states": [state], "stats": [None]}
        check = getattr(self._probe, "check_state", None)  # batchers that cut groups of batches have one
        for saved_share in state["states"]:
            if check is not None and saved_share is not None:
                check(saved_share)
        self._states, self._stats = copy.deepcopy(state["states"]), copy.deepcopy(state["stats"])
        self._next = int(state["next"])

    @property
    def stats(self) -> dict[str, Any]:
        """Samples seen and corrupt, summed over the workers' shares (each as of its last batch the loop took)."""
        per = [s or {} for s in self._stats]
        return {"seen": sum(s.get("seen", 0) for s in per), "corrupt": sum(s.get("corrupt", 0) for s in per),
                "by_worker": per}

    def _items(self) -> Iterator[Any]:
        loader = DataLoader(_Shares(self.build, self.req, self.shares, list(self._states), self._next),
                            batch_size=None, num_workers=self.workers, pin_memory=self.device.type == "cuda")
        for item in loader:
            if isinstance(item, BaseException):
                raise item
            yield item

    def _took(self, share: int, state: Any, stats: Any) -> None:
        self._states[share], self._stats[share], self._next = state, stats, (share + 1) % self.shares

    def __iter__(self) -> Iterator[Any]:
        items = self._items()
        if self.device.type != "cuda":
            for share, batch, state, stats in items:
                self._took(share, state, stats)
                yield batch
            return
        stream = torch.cuda.Stream(self.device)

        def fetch() -> tuple | None:
            item = next(items, None)
            if item is None:
                return None
            share, batch, state, stats = item
            with torch.cuda.stream(stream):
                batch = _map_tensors(batch, lambda t: t.to(self.device, non_blocking=True))
            return share, batch, state, stats

        ahead = fetch()
        while ahead is not None:
            share, batch, state, stats = ahead
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(stream)
            # made on the side stream, used (and freed) on the main one: keep the allocator from reusing early
            _map_tensors(batch, lambda t: t.record_stream(main))
            ahead = fetch()  # batch i+1's copy overlaps step i
            self._took(share, state, stats)
            yield batch


def _map_tensors(batch: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """`fn` over the tensors of a dict or tuple batch (other values kept)."""
    if isinstance(batch, dict):
        return {k: fn(v) if torch.is_tensor(v) else v for k, v in batch.items()}
    return type(batch)(fn(v) if torch.is_tensor(v) else v for v in batch)
