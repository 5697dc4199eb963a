"""manifest.json: what a shard directory holds (contract: docs/architecture.md, Data).

```json
{"format": "ghostvis-shards/1", "kind": "text-tokens",
 "shards": [{"name": "train-000000.tar", "samples": 1234}], "num_samples": 1234,
 "tokenizer": {"fingerprint": "...", "vocab_size": 32768}, "dtype": "uint16"}
```

Every reader goes through `read_manifest`, so a wrong directory, a missing file or shards made with
another tokenizer fail here, before training starts, with a message naming the file and the fix.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ghostvis.cli import UserError
from ghostvis.files import follow_umask

FORMAT = "ghostvis-shards/1"
MANIFEST_NAME = "manifest.json"
KINDS = ("text-tokens", "text", "image-text", "conversation")
# which stage reads each kind, for the message when a directory of the wrong kind is given
KIND_STAGES = {"text-tokens": "--stage base", "image-text": "--stage vision_pretrain",
               "conversation": "--stage sft or rl", "text": "none (tokenize it with data_prep.text_shards)"}


class DataError(UserError, ValueError):
    """Bad data input (missing/empty directory, bad manifest, wrong tokenizer, too many corrupt samples)."""


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name relative to the data directory
    samples: int


@dataclass
class Manifest:
    kind: str
    shards: list[ShardInfo]
    tokenizer: dict[str, Any] | None = None  # {"fingerprint": str, "vocab_size": int} where tokens are stored
    dtype: str | None = None  # token dtype for text-tokens ("uint16" / "uint32")
    extra: dict[str, Any] = field(default_factory=dict)  # any other keys, kept on rewrite

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format": FORMAT,
            "kind": self.kind,
            "shards": [{"name": s.name, "samples": s.samples} for s in self.shards],
            "num_samples": self.num_samples,
        }
        if self.tokenizer is not None:
            d["tokenizer"] = self.tokenizer
        if self.dtype is not None:
            d["dtype"] = self.dtype
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = MANIFEST_NAME) -> "Manifest":
        """Parse and check a manifest dict; `where` (the file) is named in every error."""

        def bad(field_name: str, why: str) -> DataError:
            return DataError(f"{where}: field '{field_name}' {why}")

        if not isinstance(d, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise bad("format", f"is {d.get('format')!r}, expected {FORMAT!r}")
        kind = d.get("kind")
        if kind not in KINDS:
            raise bad("kind", f"is {kind!r}, expected one of {', '.join(KINDS)}")
        raw = d.get("shards")
        if not isinstance(raw, list):
            raise bad("shards", "is missing or not a list")
        shards = []
        for i, s in enumerate(raw):
            if not (isinstance(s, dict) and isinstance(s.get("name"), str)
                    and isinstance(s.get("samples"), int) and s["samples"] >= 0):
                raise bad(f"shards[{i}]", 'must be {"name": str, "samples": int >= 0}')
            shards.append(ShardInfo(s["name"], s["samples"]))
        names = [s.name for s in shards]
        if len(set(names)) != len(names):
            raise bad("shards", "lists a shard name twice")
        n = d.get("num_samples")
        if n is not None and n != sum(s.samples for s in shards):
            raise bad("num_samples", f"is {n} but the shard counts add up to {sum(s.samples for s in shards)}")
        tok = d.get("tokenizer")
        if tok is not None and not (isinstance(tok, dict) and isinstance(tok.get("fingerprint"), str)):
            raise bad("tokenizer", 'must be {"fingerprint": str, "vocab_size": int}')
        if kind == "text-tokens":
            if tok is None:
                raise bad("tokenizer", "is required for kind text-tokens")
            if d.get("dtype") not in ("uint16", "uint32", "int32", "int64"):
                raise bad("dtype", f"is {d.get('dtype')!r}, expected uint16 or uint32")
        known = {"format", "kind", "shards", "num_samples", "tokenizer", "dtype"}
        extra = {k: v for k, v in d.items() if k not in known}
        return cls(kind=kind, shards=shards, tokenizer=tok, dtype=d.get("dtype"), extra=extra)


def write_manifest(data_dir: str | os.PathLike, manifest: Manifest) -> Path:
    """Write `data_dir/manifest.json` atomically (temp file + os.replace): readers never see half a file."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / MANIFEST_NAME
    fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=".manifest-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(manifest.to_dict(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        follow_umask(tmp)  # mkstemp made it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _fingerprint(tokenizer: Any) -> str:
    """Accept a Tokenizer (its `.fingerprint`) or a fingerprint string."""
    return tokenizer if isinstance(tokenizer, str) else tokenizer.fingerprint


def read_manifest(
    data_dir: str | os.PathLike,
    *,
    expected_kind: str | None = None,
    expected_tokenizer: Any = None,
) -> Manifest:
    """Read and validate `data_dir/manifest.json`.

    `expected_tokenizer` is a Tokenizer or a fingerprint string; shards that store tokens must have been
    made with it. Checks that every listed shard file exists.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist (or is not a directory)")
    path = data_dir / MANIFEST_NAME
    if not path.is_file():
        if not any(data_dir.iterdir()):
            raise DataError(f"data directory {data_dir} is empty: make shards with data_prep/ "
                            "(e.g. python -m data_prep.text_shards --input ... --tokenizer ... --out ...)")
        raise DataError(f"{data_dir} has no {MANIFEST_NAME}: it is not a GhostVis shard directory "
                        "(make one with data_prep/; a text_shards.py output has train/ and val/ subdirectories)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    m = Manifest.from_dict(raw, where=str(path))
    if expected_kind is not None and m.kind != expected_kind:
        raise DataError(f"{path}: field 'kind' is {m.kind!r} but this stage reads {expected_kind!r} shards; "
                        f"{m.kind} shards are for {KIND_STAGES.get(m.kind, 'no stage')}, {expected_kind} shards "
                        f"for {KIND_STAGES.get(expected_kind, 'no stage')}")
    if expected_tokenizer is not None and m.tokenizer is not None:
        want, have = _fingerprint(expected_tokenizer), m.tokenizer["fingerprint"]
        if want != have:
            raise DataError(f"shards in {data_dir} were made with tokenizer {have}, the run uses {want}: "
                            "rebuild with data_prep/text_shards.py --tokenizer <the run's tokenizer dir>")
    if not m.shards or m.num_samples == 0:
        raise DataError(f"{path}: lists no samples (field 'shards' is empty)")
    missing = [s.name for s in m.shards if not (data_dir / s.name).is_file()]
    if missing:
        raise DataError(f"{path}: {len(missing)} listed shard file(s) missing in {data_dir}: "
                        f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return m


def split_dir(data_dir: str | os.PathLike, split: str) -> Path:
    """Where a dataset keeps `split`: `data_dir/split`, except that a flat shard directory (manifest.json,
    no split subdirectories, e.g. `data_prep.image_shards` without --val-fraction) is its own train split."""
    d = Path(data_dir)
    if split == "train" and (d / MANIFEST_NAME).is_file() and not (d / split).is_dir():
        return d
    return d / split
