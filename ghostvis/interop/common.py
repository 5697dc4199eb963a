"""What every Hugging Face converter shares: its error type and lazy tensor access to a folder of
safetensors shards. It imports nothing of GhostVis's models, so any layer may use it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ghostvis.cli import UserError


class InteropError(UserError, ValueError):
    """Input that cannot be converted; the message names the file/field and what was expected."""


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class SafetensorsFolder:
    """Tensor name -> shard file of a HF folder (``model.safetensors.index.json`` or a single file);
    ``get`` opens the shard lazily and reads one tensor."""

    def __init__(self, hf_dir: str | Path):
        d = Path(hf_dir)
        index = d / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(d.glob("*.safetensors"))
            if not files:
                pickled = sorted(p.name for p in d.glob("*.bin")) + sorted(p.name for p in d.glob("*.pt"))
                hint = (f" (found {pickled[:3]}: pickled weights are never loaded; convert them once where you trust "
                        "them with transformers: model.save_pretrained(dir, safe_serialization=True))") if pickled else ""
                raise FileNotFoundError(f"{d}: no *.safetensors weights{hint}")
            if len(files) > 1:
                raise InteropError(f"{d}: several .safetensors files {[f.name for f in files]} but no "
                                   "model.safetensors.index.json saying which tensor is where")
            with safe_open(str(files[0]), framework="pt") as f:
                weight_map = {k: files[0].name for k in f.keys()}
        missing = sorted({f for f in weight_map.values() if not (d / f).is_file()})
        if missing:
            raise FileNotFoundError(f"{d}: shard(s) {missing} listed in model.safetensors.index.json are missing")
        self.dir, self.weight_map = d, weight_map
        self._open: dict[str, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _handle(self, name: str) -> Any:
        if name not in self.weight_map:
            raise InteropError(f"{self.dir}: tensor {name!r} not found in the checkpoint")
        file = self.weight_map[name]
        if file not in self._open:
            self._open[file] = safe_open(str(self.dir / file), framework="pt", device="cpu")
        return self._open[file]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from its shard's header (no data read)."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """A tensor's dtype, from its shard's header."""
        stored = self._handle(name).get_slice(name).get_dtype()
        if stored not in _DTYPES:
            raise InteropError(f"{self.dir}: tensor {name!r} is stored as {stored}; expected one of {sorted(_DTYPES)}")
        return _DTYPES[stored]

    def close_others(self, name: str) -> None:
        """Unmap every shard but `name`'s: pages read from a mapped shard count in the process's memory until
        it is closed, so a reader going shard by shard holds one at a time."""
        keep = self.weight_map[name]
        for file in [f for f in self._open if f != keep]:
            del self._open[file]

    def in_shard_order(self, names: list[str]) -> list[str]:
        """`names` grouped by the shard that holds them (stable within a shard), for `close_others`."""
        order = {f: i for i, f in enumerate(dict.fromkeys(sorted(self.weight_map.values())))}
        return sorted(names, key=lambda n: order[self.weight_map[n]] if n in self.weight_map else -1)
