"""Data: webdataset shards with a manifest, read as a deterministic, resumable, rank-split stream.

manifest.py  manifest.json read/write/validation (DataError for bad input)
shards.py    ShardStream: raw samples (ext -> bytes) in seeded order, split by rank, resumable
text.py      TokenRowLoader: BOS-packed token rows from text-tokens shards; token_bytes for bits per byte
See docs/data.md.
"""

from ghostvis.data.manifest import DataError, Manifest, ShardInfo, read_manifest, write_manifest
from ghostvis.data.shards import ShardStream
from ghostvis.data.text import TokenRowLoader, token_bytes

__all__ = ["DataError", "Manifest", "ShardInfo", "ShardStream", "TokenRowLoader", "read_manifest",
           "token_bytes", "write_manifest"]
