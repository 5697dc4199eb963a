"""What every Hugging Face converter shares: its error type and lazy tensor access to a folder of
safetensors shards. It imports nothing of GhostVis's models, so any layer may use it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ghostvis.cli import UserError
from ghostvis.files import read_tensor, safetensors_header, tensor_dtype


class InteropError(UserError, ValueError):
    """Input that cannot be converted; the message names the file/field and what was expected."""


class SafetensorsFolder:
    """Tensor name -> shard file of a HF folder (``model.safetensors.index.json`` or a single file);
    ``get`` opens the shard lazily and reads one tensor."""

    def __init__(self, hf_dir: str | Path):
        d = Path(hf_dir)
        index = d / "model.safetensors.index.json"
        headers: dict[str, tuple[dict[str, Any], int]] = {}
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
            header = safetensors_header(files[0])
            headers[files[0].name] = header  # parsed once: the reads below look tensors up in it
            weight_map = dict.fromkeys(header[0], files[0].name)
        missing = sorted({f for f in weight_map.values() if not (d / f).is_file()})
        if missing:
            raise FileNotFoundError(f"{d}: shard(s) {missing} listed in model.safetensors.index.json are missing")
        self.dir, self.weight_map = d, weight_map
        self._headers = headers

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _entry(self, name: str) -> tuple[Path, dict[str, Any], int]:
        if name not in self.weight_map:
            raise InteropError(f"{self.dir}: tensor {name!r} not found in the checkpoint")
        file = self.weight_map[name]
        if file not in self._headers:
            self._headers[file] = safetensors_header(self.dir / file)
        entries, data_start = self._headers[file]
        if name not in entries:
            raise InteropError(f"{self.dir / file}: no tensor {name!r}, though model.safetensors.index.json puts "
                               "it there")
        return self.dir / file, entries[name], data_start

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read with plain file reads: nothing of the shard stays mapped in memory after."""
        path, entry, data_start = self._entry(name)
        with path.open("rb") as f:
            return read_tensor(f, entry, data_start, f"{path}: tensor {name!r}")

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from its shard's header (no data read)."""
        return self._entry(name)[1]["shape"]

    def dtype(self, name: str) -> torch.dtype:
        """A tensor's dtype, from its shard's header."""
        return tensor_dtype(self._entry(name)[1], f"{self.dir}: tensor {name!r}")
