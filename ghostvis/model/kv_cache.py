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
