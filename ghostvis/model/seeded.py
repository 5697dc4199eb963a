"""Initial weights that do not depend on how the model is laid out (docs/parallelism.md, "Model construction").

Each parameter's values are a function of (seed, its name in the plain tp=1 model, its full shape) only:
rows are drawn in fixed blocks, each from its own generator seeded by a hash of (seed, name, block). So a
full model, a tensor-parallel shard, a ZeRO-3 partition and any slice of them get the same numbers, each
rank draws only the blocks its part touches, and no two copies of a tensor are ever needed. Weights read
from safetensors are loaded the same way: each rank reads the rows of its part (`safe_open` slices).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

BLOCK_ELEMENTS = 1 << 20  # values drawn per generator: fixed, so the numbers never depend on the layout
CHUNK_ELEMENTS = 1 << 24  # values produced per copy into a parameter: bounds the transient memory

# (start, end) of a flat range of the local tensor -> those values, 1-D, float32 or the stored dtype
Values = Callable[[int, int], torch.Tensor]


def block_seed(seed: int, name: str, block: int) -> int:
    """A stable 63-bit generator seed for block `block` of parameter `name` (not Python's salted hash)."""
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def normal_rows(seed: int, name: str, shape: tuple[int, ...], std: float, start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of parameter `name` of full shape `shape` drawn from Normal(0, std), as [end - start,
    row numel]. A block is a run of whole rows of about BLOCK_ELEMENTS values."""
    row = math.prod(shape[1:])
    per_block = max(1, BLOCK_ELEMENTS // row)
    # on the CPU, explicitly: a device context or deepspeed.zero.Init (which sends torch.empty to the GPU)
    # would otherwise put the values where the CPU generator cannot draw
    out = torch.empty(end - start, row, device="cpu", dtype=torch.float32)
    for block in range(start // per_block, -(-end // per_block)):
        b0, b1 = block * per_block, min((block + 1) * per_block, shape[0])
        gen = torch.Generator().manual_seed(block_seed(seed, name, block))
        values = torch.empty(b1 - b0, row, device="cpu", dtype=torch.float32).normal_(0.0, std, generator=gen)
        lo, hi = max(b0, start), min(b1, end)
        out[lo - start:hi - start] = values[lo - b0:hi - b0]
    return out


def local_rows(full_rows: Callable[[int, int], torch.Tensor], local_shape: tuple[int, ...], split_dim: int | None,
               tp_rank: int) -> Values:
    """The flat-range reader of a local tensor (a TP shard of rows or columns of the full one, or all of it)
    given `full_rows(a, b)` -> full rows [a, b) as [b - a, full row numel]."""
    row = math.prod(local_shape[1:])
    offset = tp_rank * local_shape[0] if split_dim == 0 else 0

    def values(start: int, end: int) -> torch.Tensor:
        a, b = start // row, -(-end // row)
        rows = full_rows(offset + a, offset + b)
        if split_dim == 1:  # a row-parallel shard: these columns of every row
            rows = rows[:, tp_rank * local_shape[1]:(tp_rank + 1) * local_shape[1]]
        return rows.reshape(-1)[start - a * row:end - a * row]

    return values


def constant(value: float) -> Values:
    return lambda start, end: torch.full((end - start,), value, device="cpu", dtype=torch.float32)


def is_partitioned(param: torch.Tensor) -> bool:
    """A ZeRO-3 parameter built under `deepspeed.zero.Init`: this rank holds `ds_tensor`, a flat slice."""
    return getattr(param, "ds_tensor", None) is not None


def _held(param: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(flat tensor, start, end): what this rank holds of `param` as a flat range of the whole, i.e. all of
    it, or under ZeRO-3 its partition [rank·n, rank·n + n) clipped to the parameter (the rest is padding)."""
    if is_partitioned(param):
        part, n = param.ds_tensor, param.ds_tensor.ds_numel
        start = dist.get_rank(group=param.ds_process_group) * n
        return part, start, min(start + n, param.ds_numel)
    return param.view(-1), 0, param.numel()


def _chunks(start: int, end: int) -> Iterator[tuple[int, int]]:
    for s in range(start, end, CHUNK_ELEMENTS):
        yield s, min(s + CHUNK_ELEMENTS, end)


@torch.no_grad()
def fill(param: torch.Tensor, values: Values) -> None:
    """Write `values` into what this rank holds of `param`: all of it, or under ZeRO-3 its partition (zero
    past the parameter's end), a chunk at a time."""
    if param.is_meta:
        return
    target, offset, end = _held(param)
    if is_partitioned(param):
        target.zero_()
    for s, e in _chunks(offset, end):
        target[s - offset:e - offset].copy_(values(s, e))


@torch.no_grad()
def shrink_perturb(param: torch.Tensor, values: Values, shrink: float, perturb: float) -> None:
    """param <- shrink · param + perturb · `values`, over what this rank holds of it (as `fill`)."""
    if param.is_meta:
        return
    target, offset, end = _held(param)
    for s, e in _chunks(offset, end):
        chunk = target[s - offset:e - offset]
        # values are made on the CPU and a ZeRO-3 partition may live on the GPU; in float32, so a bf16
        # partition is rounded once
        chunk.copy_(chunk.float().mul_(shrink).add_(values(s, e).to(chunk.device), alpha=perturb))


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The shape of this rank's tensor (a TP shard, or the whole), also for a ZeRO-3 partitioned parameter."""
    return tuple(param.ds_shape) if is_partitioned(param) else tuple(param.shape)


def tp_full_shape(local: tuple[int, ...], split_dim: int | None, tp_size: int) -> tuple[int, ...]:
    """The tp=1 shape of a tensor-parallel shard of shape `local` split along `split_dim` (None: not split)."""
    return local if split_dim is None else tuple(n * tp_size if i == split_dim else n for i, n in enumerate(local))


def safetensors_rows(handle, name: str) -> Callable[[int, int], torch.Tensor]:
    """full_rows(a, b) of tensor `name` in an open safetensors file (`safe_open`): only those rows are read."""
    sl = handle.get_slice(name)

    def rows(a: int, b: int) -> torch.Tensor:
        t = sl[a:b]
        return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)

    return rows


def load_module(module: nn.Module, path: str, split_dims: Callable[[str], int | None] | None = None,
                tp_rank: int = 0) -> None:
    """Copy the safetensors file at `path` into `module`'s parameters and persistent buffers, each rank only
    the rows of what it holds (a TP shard per `split_dims(name)`, a ZeRO-3 partition). Names and shapes are
    checked by the caller from the file's header."""
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        for name, tensor in module.state_dict(keep_vars=True).items():
            if tensor.dim() == 0:  # a counter (BatchNorm's num_batches_tracked): never partitioned
                tensor.data.copy_(f.get_tensor(name))
                continue
            dim = split_dims(name) if split_dims is not None else None
            fill(tensor, local_rows(safetensors_rows(f, name), full_shape(tensor), dim, tp_rank))
