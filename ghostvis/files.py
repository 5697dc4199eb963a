"""Tensor files checked before anything loads them, and written files that follow the umask.

A safetensors file starts with an 8-byte little-endian header length and a JSON header naming every
tensor's dtype and shape, so names and shapes are compared from the header alone: a mismatched file is
refused with one line before a loader allocates anything or fails half-way. A file that has no such header
(a pickle renamed to `.safetensors`) is refused, never unpickled.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ghostvis.cli import UserError

_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class TensorFileError(UserError, ValueError):
    """A tensor file that is missing, not safetensors, or does not fit the model it is loaded into."""


def safetensors_header(path: str | Path) -> tuple[dict[str, dict[str, Any]], int]:
    """({tensor name: {"dtype", "shape", "data_offsets"}}, the offset where the data starts) of a safetensors
    file, from its header alone."""
    path = Path(path)
    if not path.is_file():
        raise TensorFileError(f"{path} not found")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        raw = f.read(n) if 0 < n <= min(_MAX_HEADER, size - 8) else b""
    try:
        header = json.loads(raw)
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        for v in entries.values():
            v["shape"] = tuple(int(d) for d in v["shape"])
    except (ValueError, TypeError, KeyError, AttributeError):
        pickled = head[:1] == b"\x80" or head[:2] == b"PK"  # pickle protocol 2+ / torch.save's zip
        raise TensorFileError(
            f"{path} is not a safetensors file{' (it looks like a pickle)' if pickled else ''}; pickled weights "
            "are never loaded: re-export it, or convert it with safetensors.torch.save_file") from None
    return entries, 8 + n


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} read from a safetensors file's header (no tensor data is read)."""
    return {k: v["shape"] for k, v in safetensors_header(path)[0].items()}


def tensor_dtype(entry: dict[str, Any], where: str) -> torch.dtype:
    """The torch dtype of a safetensors header entry."""
    if entry["dtype"] not in _ST_DTYPES:
        raise TensorFileError(f"{where}: dtype {entry['dtype']} is not one of {sorted(_ST_DTYPES)}")
    return _ST_DTYPES[entry["dtype"]]


def read_tensor(f: BinaryIO, entry: dict[str, Any], data_start: int, where: str) -> Any:
    """One tensor of an open safetensors file (`entry`: its header entry), read with plain reads into a new
    tensor: unlike a memory map (safe_open), none of the file's pages stay in the process's memory after."""
    tensor = torch.empty(entry["shape"], dtype=tensor_dtype(entry, where))
    begin, end = entry["data_offsets"]
    f.seek(data_start + begin)
    if tensor.numel() and f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) != end - begin:
        raise TensorFileError(f"{where}: the file ends inside the tensor's data (a truncated copy?)")
    return tensor


def check_tensors(path: str | Path, expected: dict[str, tuple[int, ...]], fix: str) -> None:
    """Refuse `path` unless it holds exactly the tensors of `expected` ({name: shape}); `fix` ends the message."""
    have = safetensors_shapes(path)
    missing = sorted(set(expected) - set(have))
    unexpected = sorted(set(have) - set(expected))
    wrong = [f"{k} {list(have[k])} (model: {list(expected[k])})" for k in sorted(set(have) & set(expected))
             if have[k] != tuple(expected[k])]
    problems = ([f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}"] if missing else []) + \
        ([f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}"] if unexpected else []) + \
        ([f"shape of {', '.join(wrong[:2])}{' ...' if len(wrong) > 2 else ''}"] if wrong else [])
    if problems:
        raise TensorFileError(f"{path} does not fit the model: {'; '.join(problems)}; {fix}")


def current_umask() -> int:
    """The process umask (read without changing it where /proc tells it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path) -> None:
    """Give a file written through a private temporary file (mkstemp: 0600) the mode a plain open() would."""
    os.chmod(path, 0o666 & ~current_umask())


def write_safetensors(path: str | Path, specs: list[tuple[str, Any, tuple[int, ...]]],
                      tensors: Iterator[Any], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file one tensor at a time: `specs` [(name, torch dtype, shape)] fixes the header up
    front, then `tensors` yields them in that order and each is written and dropped, so the file's contents
    are never all in memory (safetensors' own `save_file` holds a bytes copy of every tensor). Written under
    a temporary name and renamed, following the umask."""
    path = Path(path)
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in specs:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-aligned, as safetensors writes it
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for (name, dtype, shape), tensor in zip(specs, tensors, strict=True):
                if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                    raise ValueError(f"write_safetensors: {name} is {tensor.dtype} {tuple(tensor.shape)}, the "
                                     f"header says {dtype} {tuple(shape)}")
                f.write(memoryview(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    follow_umask(tmp)
    os.replace(tmp, path)
