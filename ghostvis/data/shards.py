"""ShardStream: the deterministic, resumable, rank-split sample stream every stage reads.

A shard directory is `<prefix>-%06d.tar` webdataset shards plus `manifest.json` (see manifest.py). The
stream yields raw samples, one dict per sample key:

    {"__key__": "000000042", "__url__": "/data/train/train-000003.tar",
     "__epoch__": 0, "__index__": 1234,          # position of this sample in the epoch's global order
     "npy": b"...", "txt": b"...", "0.jpg": b"..."}  # extension (lower-cased, after the first dot) -> bytes

Decoding is the consumer's job (text.py decodes `npy`, multimodal.py images/JSON); a sample the consumer
can't decode is reported with `stream.mark_corrupt()` (or rejected by the `validate` callback) so it is
skipped and counted like a sample the tar reader couldn't read.

Order. Epoch e visits shards in a permutation drawn from (seed, e) (manifest order with shuffle=False),
and samples in the order they are stored in each shard. Counting with the manifest's sample counts, the
samples of an epoch get global indices 0..N-1. Split: each round of world_size consecutive indices gives
one index to every rank, which one drawn from (seed, epoch) by one generator per window of SPLIT_WINDOW
rounds, so the ranks stay within one sample of each other at any position. Every rank reads the same
order, so ranks' samples are disjoint and together cover the epoch exactly once, and each reads its own in
stored order. Not i % world_size: in a dataset stored with a period (data_prep.synth's visual QA cycles
its question types by index; a user's file may alternate its sources), a reader whose count shares a
factor with the period would get samples of one kind only, and a data worker's batches are steps of their
own (docs/data.md, "Rank split").

State. `state_dict()` = {epoch, position (next global index), stats}; after loading it the stream resumes
with the sample after the last one yielded. Resuming skips whole shards by their manifest counts and,
inside the partly read shard, skips the samples before `position` without reading their bytes into
memory. A manifest's counts are what positions mean, so a different data directory is refused.

Corrupt data. A shard that can't be opened or ends early (truncated tar) counts every one of this rank's
samples it didn't deliver as corrupt; a bad sample (duplicate member, rejected by `validate`, marked with
`mark_corrupt(reason)`) counts as one. `stats` = {"seen": n, "corrupt": n, "by_shard": {name: n},
"by_reason": {reason: n}} (this rank's samples only; part of the state, so counts survive a resume). Once
at least `min_count` samples were seen (and at each epoch end), a corrupt fraction above
`max_corrupt_fraction` raises `DataError` naming the worst shards. An intact shard holding more or fewer
samples than its manifest entry says is refused (DataError): positions are defined by those counts.
"""

from __future__ import annotations

import copy
import io
import os
import random
import tarfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

from webdataset.tariterators import base_plus_ext

from ghostvis.data.manifest import DataError, Manifest, ShardInfo, read_manifest

Sample = dict[str, Any]

# Rounds of the rank split (module docstring) drawn together: one random generator and one prefix count
# per window of world_size × SPLIT_WINDOW indices.
SPLIT_WINDOW = 64

# What a damaged or truncated tar raises while being read.
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


class ShardStream:
    """Raw samples of one shard directory for one rank (see the module docstring for order, state
    and corruption). Iterate it once at a time: the stream object holds the position."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        loop: bool = True,
        shuffle: bool = True,
        max_corrupt_fraction: float = 0.01,
        min_count: int = 100,
        expected_kind: str | None = None,
        expected_tokenizer: Any = None,
        validate: Callable[[Sample], bool] | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.data_dir = Path(data_dir)
        self.manifest: Manifest = read_manifest(
            self.data_dir, expected_kind=expected_kind, expected_tokenizer=expected_tokenizer)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.loop, self.shuffle, self.validate = loop, shuffle, validate
        self.max_corrupt_fraction, self.min_count = max_corrupt_fraction, min_count
        self.epoch, self.position = 0, 0
        self.stats: dict[str, Any] = {"seen": 0, "corrupt": 0, "by_shard": {}, "by_reason": {}}
        self._last_shard: str | None = None  # shard of the last yielded sample, for mark_corrupt()
        self._prefix_key: tuple[int, int] | None = None  # the rank split's window last dealt, and its counts
        self._prefix: list[int] = []

    # ---- order and split -------------------------------------------------------------------------

    def shard_order(self, epoch: int) -> list[int]:
        """Indices into manifest.shards in the order epoch `epoch` visits them."""
        order = list(range(len(self.manifest.shards)))
        if self.shuffle:
            # String seeds hash with sha512: the same order on every Python version and machine.
            random.Random(f"ghostvis-shards:{self.seed}:{epoch}").shuffle(order)
        return order

    def _window_prefix(self, window: int) -> list[int]:
        """prefix[j]: how many of the first j indices of `window` (this epoch) belong to this reader."""
        key = (self.epoch, window)
        if self._prefix_key != key:
            rng, owners = random.Random(f"ghostvis-split:{self.seed}:{self.epoch}:{window}"), []
            for _ in range(SPLIT_WINDOW):  # each round of world_size indices: one to every rank, in a drawn order
                owners += rng.sample(range(self.world_size), self.world_size)
            prefix = [0]
            for owner in owners:
                prefix.append(prefix[-1] + (owner == self.rank))
            self._prefix_key, self._prefix = key, prefix
        return self._prefix

    def _below(self, x: int) -> int:
        """How many global indices in [0, x) of this epoch belong to this reader."""
        if self.world_size == 1:
            return x
        window, offset = divmod(x, self.world_size * SPLIT_WINDOW)
        return window * SPLIT_WINDOW + (self._window_prefix(window)[offset] if offset else 0)

    def _count_mine(self, lo: int, hi: int) -> int:
        """How many global indices in [lo, hi) belong to this reader."""
        return self._below(hi) - self._below(lo) if hi > lo else 0

    def _is_mine(self, index: int) -> bool:
        return self._count_mine(index, index + 1) == 1

    # ---- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_samples": self.manifest.num_samples, "rank": self.rank, "world_size": self.world_size,
                "stats": copy.deepcopy(self.stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the last sample the saved stream yielded.

        A state saved with another world size resumes at its global position with the new split
        (approximate: ranks were at slightly different positions)."""
        if state["num_samples"] != self.manifest.num_samples:
            raise DataError(f"the saved data position is for a dataset of {state['num_samples']} samples, "
                            f"{self.data_dir} has {self.manifest.num_samples}: the data directory changed "
                            "since the checkpoint (point --data at the original shards)")
        if state["seed"] != self.seed:
            raise DataError(f"the saved data position used seed {state['seed']}, this run uses {self.seed}: "
                            "resume with the original seed")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.stats = copy.deepcopy(state["stats"])
        self.stats.setdefault("by_reason", {})  # states saved before reasons were counted
        self._last_shard = None

    # ---- corrupt accounting ----------------------------------------------------------------------

    def mark_corrupt(self, reason: str = "undecodable") -> None:
        """The consumer could not decode the sample just yielded: count it as corrupt, for `reason`."""
        if self._last_shard is None:
            raise RuntimeError("mark_corrupt() needs a sample yielded and not yet marked")
        shard, self._last_shard = self._last_shard, None
        self._add_corrupt(shard, 1, reason)
        self._check_fraction(final=False)

    def _add_corrupt(self, shard: str, n: int, reason: str) -> None:
        if n:
            self.stats["corrupt"] += n
            self.stats["by_shard"][shard] = self.stats["by_shard"].get(shard, 0) + n
            self.stats["by_reason"][reason] = self.stats["by_reason"].get(reason, 0) + n

    def _check_fraction(self, *, final: bool) -> None:
        seen, bad = self.stats["seen"], self.stats["corrupt"]
        if bad == 0 or (not final and seen < self.min_count) or bad <= self.max_corrupt_fraction * seen:
            return
        worst = sorted(self.stats["by_shard"].items(), key=lambda kv: -kv[1])[:5]
        raise DataError(
            f"{bad} of {seen} samples read by rank {self.rank} from {self.data_dir} were corrupt "
            f"({bad / seen:.1%} > max_corrupt_fraction {self.max_corrupt_fraction:.1%}); worst shards: "
            + ", ".join(f"{name} ({n})" for name, n in worst)
            + ". Rebuild those shards or raise --max-corrupt-fraction.")

    # ---- reading ---------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Sample]:
        while True:
            began, delivered = self.position, 0
            for sample in self._iter_epoch():
                delivered += 1
                yield sample
            self._check_fraction(final=True)
            if not self.loop:
                return
            if delivered == 0 and began == 0:
                raise DataError(f"rank {self.rank} got no readable samples from {self.data_dir} in a whole "
                                f"epoch ({self.manifest.num_samples} samples for {self.world_size} readers)")
            self.epoch, self.position = self.epoch + 1, 0

    def _iter_epoch(self) -> Iterator[Sample]:
        start = 0
        for si in self.shard_order(self.epoch):
            info = self.manifest.shards[si]
            end = start + info.samples
            if end > self.position:  # shards fully behind the saved position are skipped unopened
                yield from self._iter_shard(info, start)
            start = end
        self.position = start

    def _iter_shard(self, info: ShardInfo, start: int) -> Iterator[Sample]:
        end = start + info.samples
        if self._count_mine(max(self.position, start), end) > 0:
            for k, sample in self._read_tar(self.data_dir / info.name, start, info.samples):
                g = start + k
                # Our samples between the last delivered one and this one never came: corrupt.
                self._add_corrupt(info.name, self._count_mine(self.position, g), "unreadable")
                self.stats["seen"] += self._count_mine(self.position, g) + 1
                self.position = g + 1
                bad = "duplicate member" if sample.pop("__bad__", False) else None
                if bad or not self._valid(sample):
                    self._add_corrupt(info.name, 1, bad or "rejected")
                    self._check_fraction(final=False)
                    continue
                self._check_fraction(final=False)
                sample["__epoch__"], sample["__index__"] = self.epoch, g
                self._last_shard = info.name
                yield sample
        missing = self._count_mine(self.position, end)  # truncated / short shard
        self.stats["seen"] += missing
        self._add_corrupt(info.name, missing, "unreadable")
        self.position = end
        self._check_fraction(final=False)

    def _valid(self, sample: Sample) -> bool:
        if self.validate is None:
            return True
        try:
            return bool(self.validate(sample))
        except Exception:  # a validator that raises rejects the sample; the count says how many
            return False

    def _read_tar(self, path: Path, start: int, count: int) -> Iterator[tuple[int, Sample]]:
        """(index in shard, sample) for this reader's samples at or after `self.position`.

        The tar is opened seekable, so only member headers and this reader's members are read: the other
        readers' bytes of an uncompressed tar are seeked over (each rank reads ~1/world of the data, not
        all of it). Stops quietly at a read error; the caller counts what didn't arrive.
        """
        first = self.position - start
        k, prev_base = -1, None  # index in the shard of the sample whose members are being read
        pending: Sample | None = None
        pk = -1
        try:
            with tarfile.open(path, mode="r:*") as tar:  # compressed shards read too (streamed, not seeked)
                for member in tar:
                    base, ext = base_plus_ext(member.name) if member.isfile() else (None, None)
                    if base is None:
                        continue
                    if base != prev_base:
                        prev_base, k = base, k + 1
                    if k >= count:  # positions are defined by the manifest's counts: refuse, never drop
                        raise DataError(_miscount(path, count, "more"))
                    if k < first or not self._is_mine(start + k):
                        continue
                    if k != pk:
                        if pending is not None:
                            yield pk, pending
                        pending, pk = {"__key__": base, "__url__": str(path)}, k
                    ext = ext.lower()
                    if ext in pending:
                        pending["__bad__"] = True  # two members with the same name in one sample
                    pending[ext] = tar.extractfile(member).read()
            intact = _ends_with_marker(path, tar)
        except _READ_ERRORS:
            # A member of a later sample started, so the pending one was complete before the damage.
            if pending is not None and k > pk:
                yield pk, pending
            return
        if intact and k + 1 < count:  # the whole tar was read: it holds fewer samples than listed
            raise DataError(_miscount(path, count, "fewer"))
        if pending is not None:
            yield pk, pending


def _miscount(path: Path, count: int, which: str) -> str:
    return (f"{path} holds {which} samples than the {count} its entry in {path.parent / 'manifest.json'} lists: "
            "the manifest does not describe these shards; rebuild it with the data_prep/ script that made them")


def _ends_with_marker(path: Path, tar: tarfile.TarFile) -> bool:
    """Whether an uncompressed tar read to its end has its end-of-archive blocks (a tar cut at a member
    boundary reads cleanly but lacks them). Compressed tars check their own stream's integrity."""
    if type(tar.fileobj) is not io.BufferedReader:  # gzip/bz2/xz: a cut stream raises while reading
        return True
    try:
        with path.open("rb") as f:
            f.seek(tar.offset)
            return f.read(1024) == bytes(1024)
    except OSError:
        return False


def corrupt_summary(state: Any) -> dict[str, Any]:
    """Corrupt-sample counts summed over every shard stream's stats in a data state (any nesting:
    mixtures, data-worker shares, text rows): {"corrupt": n, "by_shard": {...}, "by_reason": {...}}."""
    total: dict[str, Any] = {"corrupt": 0, "by_shard": {}, "by_reason": {}}
    todo = [state]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            stats = item.get("stats")
            if isinstance(stats, dict) and "by_shard" in stats:
                total["corrupt"] += stats.get("corrupt", 0)
                for key in ("by_shard", "by_reason"):
                    for name, n in stats.get(key, {}).items():
                        total[key][name] = total[key].get(name, 0) + n
            todo.extend(v for k, v in item.items() if k != "stats")
        elif isinstance(item, list):
            todo.extend(item)
    return total
