"""Token rows for language-model training from `text-tokens` shards, and bytes per token for bpb.

Packing: the documents of a rank's ShardStream, each written as [BOS, doc tokens...], form one
contiguous token stream. Row r of that stream is tokens [r*T, r*T + T + 1): rows are T+1 tokens long
and consecutive rows share one token, so every token after the first is a target exactly once and a
document that crosses a row boundary simply continues in the next row. A batch is B consecutive rows:
inputs = rows[:, :-1], targets = rows[:, 1:].

Resume: the state is the stream's state just before the current document plus the offset inside that
document (no tensors), so a restored loader yields exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import torch

from ghostvis.data.manifest import DataError, split_dir
from ghostvis.data.request import DataRequest
from ghostvis.data.shards import ShardStream


class TokenRowLoader:
    """Iterate `(inputs, targets)` LongTensors `[batch_size, seq_len]` from a `text-tokens` directory.

    `tokenizer`: the run's Tokenizer (its fingerprint must match the shards'; it also gives `bos_id` and
    the vocab size used to reject out-of-range ids) or just the expected fingerprint string (then pass
    `bos_id`). Training mode loops over epochs forever in a per-epoch shuffled shard order. `eval_mode`
    reads the shards once in manifest order, restarts at each `iter()`, and pads the last batch
    (inputs with BOS, targets with -1 = ignored) so every token is evaluated exactly once.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        tokenizer: Any = None,
        bos_id: int | None = None,
        device: str | torch.device = "cpu",
        eval_mode: bool = False,
        max_corrupt_fraction: float = 0.01,
    ) -> None:
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be >= 1")
        if bos_id is None:
            if tokenizer is None or isinstance(tokenizer, str):
                raise ValueError("TokenRowLoader needs bos_id (or a Tokenizer to take it from)")
            bos_id = tokenizer.bos_token_id
        self.stream = ShardStream(
            data_dir, seed=seed, rank=rank, world_size=world_size, loop=not eval_mode, shuffle=not eval_mode,
            max_corrupt_fraction=max_corrupt_fraction, expected_kind="text-tokens", expected_tokenizer=tokenizer)
        self.seq_len, self.batch_size, self.bos_id = seq_len, batch_size, int(bos_id)
        self.eval_mode = eval_mode
        self.device = torch.device(device)
        tok_info = self.stream.manifest.tokenizer or {}
        self.vocab_size = getattr(tokenizer, "vocab_size", None) or tok_info.get("vocab_size")
        self._forget_doc()

    def _forget_doc(self) -> None:
        self._it: Any = None  # iterator over self.stream
        self._doc = np.zeros(0, np.int64)  # current document, BOS first
        self._off = 0  # next row starts at self._doc[self._off]
        self._doc_state: dict[str, Any] | None = None  # stream state just before self._doc was read

    # ---- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self._doc_state is None:  # nothing read yet
            return {"stream": self.stream.state_dict(), "offset": None}
        return {"stream": self._doc_state, "offset": self._off}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])
        self._forget_doc()
        if state["offset"] is None:
            return
        if state["stream"]["world_size"] != self.stream.world_size:
            return  # another split: the saved document belongs to another rank now; start at the position
        if not self._next_doc():
            raise DataError(f"the document at the saved position in {self.stream.data_dir} can't be read "
                            "again: the shards changed since the checkpoint")
        self._off = int(state["offset"])

    @property
    def stats(self) -> dict[str, Any]:
        """Corrupt-sample counters of the underlying stream (see ShardStream)."""
        return self.stream.stats

    # ---- iteration -------------------------------------------------------------------------------

    def __iter__(self) -> "TokenRowLoader":
        if self.eval_mode:  # each validation pass starts from the beginning
            self.stream.epoch, self.stream.position = 0, 0
            self._forget_doc()
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        rows = np.full((self.batch_size, T + 1), self.bos_id, np.int64)
        lengths = np.zeros(self.batch_size, np.int64)  # tokens filled per row (T+1 unless the data ended)
        for b in range(self.batch_size):
            filled = self._fill(rows[b])
            lengths[b] = filled
            if filled < T + 1:
                break
        if lengths[0] < 2:  # not even one target left (eval mode at the end of the data)
            raise StopIteration
        targets = rows[:, 1:].copy()
        targets[np.arange(T)[None, :] >= (lengths[:, None] - 1)] = -1
        inputs = torch.from_numpy(rows[:, :-1])
        targets = torch.from_numpy(targets)
        if self.device.type == "cuda":
            return (inputs.pin_memory().to(self.device, non_blocking=True),
                    targets.pin_memory().to(self.device, non_blocking=True))
        return inputs.to(self.device), targets.to(self.device)

    def _fill(self, row: np.ndarray) -> int:
        """Copy the next len(row) stream tokens into `row`; returns how many were available."""
        filled = 0
        while filled < len(row):
            if self._off >= len(self._doc) and not self._next_doc():
                return filled
            n = min(len(row) - filled, len(self._doc) - self._off)
            row[filled:filled + n] = self._doc[self._off:self._off + n]
            filled += n
            self._off += n
        self._off -= 1  # the next row starts with this row's last token (it is that row's first input)
        return filled

    def _next_doc(self) -> bool:
        """Load the next readable document into self._doc; False at the end of an eval pass."""
        if self._it is None:
            self._it = iter(self.stream)
        while True:
            state = self.stream.state_dict()
            try:
                sample = next(self._it)
            except StopIteration:
                return False
            try:
                ids = self._decode(sample)
            except Exception as e:  # any failure to decode one sample (even RecursionError) skips just it
                self.stream.mark_corrupt(type(e).__name__)
                continue
            if ids is None:
                self.stream.mark_corrupt()
                continue
            self._doc_state = state
            self._doc = np.empty(len(ids) + 1, np.int64)
            self._doc[0] = self.bos_id
            self._doc[1:] = ids
            self._off = 0
            return True

    def _decode(self, sample: dict[str, Any]) -> np.ndarray | None:
        """Token ids of a sample, or None when it is not a readable 1-D array of in-range ids."""
        try:
            ids = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
        except (KeyError, ValueError, OSError, EOFError):
            return None
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            return None
        if len(ids) and (ids.min() < 0 or (self.vocab_size is not None and ids.max() >= self.vocab_size)):
            return None
        return ids


def text_batches(req: DataRequest) -> TokenRowLoader:
    """The text-tokens data builder: `req.data_dir/req.split`."""
    return TokenRowLoader(split_dir(req.data_dir, req.split), seq_len=req.seq_len, batch_size=req.batch_size, rank=req.rank,
                          world_size=req.world_size, seed=req.seed, tokenizer=req.tokenizer, device=req.device,
                          eval_mode=req.eval_mode, max_corrupt_fraction=req.max_corrupt_fraction)


def token_bytes(tokenizer: Any) -> torch.Tensor:
    """Byte length of each token id (0 for special tokens), for bits per byte:

    bpb = sum(loss in nats over targets) / (ln 2 * sum(token_bytes[targets])).
    """
    out = torch.zeros(tokenizer.vocab_size, dtype=torch.int64)
    for piece, i in tokenizer.mergeable_ranks.items():
        out[i] = len(piece)
    return out


def bpb_sums(losses: torch.Tensor, targets: torch.Tensor, byte_counts: torch.Tensor) -> torch.Tensor:
    """float64 [nats, bytes] of one batch: per-token `losses` and `token_bytes` summed over the counted
    targets (>= 0). Sum these over the data, then bpb = nats / (ln 2 * bytes)."""
    counted = targets >= 0
    return torch.stack([losses[counted].double().sum(),
                        byte_counts.to(targets.device)[targets[counted]].double().sum()])
