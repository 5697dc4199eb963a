"""A preallocated key/value cache for generation: prefill T tokens, then decode one at a time."""

from __future__ import annotations

import torch

from ghostvis.config import ModelConfig


class KVCache:
    """Per-layer K/V buffers `[batch, n_kv_head, max_len, head_dim]`. Every layer writes its new
    keys/values at `pos`; `GPT.forward` calls `advance(T)` once all layers have run, so positions
    (and RoPE angles) continue from `pos` on the next call."""

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.pos = 0

    @classmethod
    def for_model(cls, config: ModelConfig, batch_size: int, max_len: int | None = None, *, tp_size: int = 1,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> KVCache:
        """A cache shaped for `config` (this rank's KV heads under TP); max_len defaults to max_seq_len."""
        max_len = config.max_seq_len if max_len is None else max_len
        if max_len > config.max_seq_len:
            raise ValueError(f"KVCache max_len={max_len} exceeds the model's max_seq_len={config.max_seq_len}")
        return cls(config.n_layer, batch_size, config.n_kv_head // tp_size, max_len, config.head_dim,
                   dtype=dtype, device=device)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v `[B, n_kv_head, T, head_dim]` at [pos, pos+T); return all cached keys/values so far."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache overflow: {end} positions needed, cache holds max_len={self.max_len}")
        self.k[layer_idx, :, :, self.pos:end] = k
        self.v[layer_idx, :, :, self.pos:end] = v
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n

    def reset(self) -> None:
        """Forget everything (the buffers are reused; stale entries beyond pos are never read)."""
        self.pos = 0


class RaggedKVCache:
    """Decode-only cache for continuous batching: rows are requests at their own lengths.

    `lengths[r]` positions of row r are filled; a decode step (T == 1) over the first `rows` rows
    writes each row's new key/value at its own length, reads keys up to the longest row, and exposes
    `attn_mask` (a row never attends past its own length) and `positions` (per-row RoPE positions).
    Rows are filled by `put_row` from a single-row prefill and kept packed by `move_row`.
    """

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len, self.batch_size = max_len, batch_size
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.host_lengths = [0] * batch_size  # the same, readable without a device sync
        self.rows = 0  # rows [0, rows) take part in the next step
        self.attn_mask: torch.Tensor | None = None

    @classmethod
    def for_model(cls, config: ModelConfig, batch_size: int, max_len: int | None = None, *,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> RaggedKVCache:
        max_len = config.max_seq_len if max_len is None else min(max_len, config.max_seq_len)
        return cls(config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim, dtype=dtype, device=device)

    @property
    def pos(self) -> int:
        """The longest active row (what GPT.forward checks against max_seq_len)."""
        return max(self.host_lengths[:self.rows], default=0)

    @property
    def positions(self) -> torch.Tensor:
        """RoPE position of each active row's next token, [rows, 1]."""
        return self.lengths[:self.rows].unsqueeze(1)

    def put_row(self, row: int, prefilled: KVCache) -> None:
        """Copy a one-row prefill cache into `row`."""
        n = prefilled.pos
        if n > self.max_len:
            raise ValueError(f"a prompt of {n} tokens does not fit the cache of {self.max_len} positions")
        self.k[:, row, :, :n] = prefilled.k[:, 0, :, :n]
        self.v[:, row, :, :n] = prefilled.v[:, 0, :, :n]
        self.lengths[row] = n
        self.host_lengths[row] = n

    def move_row(self, src: int, dst: int) -> None:
        n = self.host_lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n
        self.host_lengths[dst] = n

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if k.shape[0] != self.rows or k.shape[2] != 1:
            raise ValueError(f"RaggedKVCache decodes one token for each of its {self.rows} rows; got {tuple(k.shape)}")
        end = self.pos + 1
        if end > self.max_len:
            raise ValueError(f"RaggedKVCache overflow: {end} positions needed, cache holds max_len={self.max_len}")
        rows, lengths = torch.arange(self.rows, device=k.device), self.lengths[:self.rows]
        self.k[layer_idx, rows, :, lengths] = k[:, :, 0]
        self.v[layer_idx, rows, :, lengths] = v[:, :, 0]
        if layer_idx == 0:  # [rows, 1, 1, end]: key j is visible to a row iff j <= its length
            self.attn_mask = (torch.arange(end, device=k.device) <= lengths.unsqueeze(1)).view(self.rows, 1, 1, end)
        return self.k[layer_idx, :self.rows, :, :end], self.v[layer_idx, :self.rows, :, :end]

    def advance(self, n: int) -> None:
        self.lengths[:self.rows] += n
        for r in range(self.rows):
            self.host_lengths[r] += n
