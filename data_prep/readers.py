"""Read raw text corpora as a stream of documents (shared by text_shards.py and launch/tok_train.py).

`iter_documents(paths)` accepts files and directories, in the order given (directories are walked in
sorted order):

* `.txt`: the whole file is one document.
* `.jsonl`: one JSON object per line, the document is its `text_field` (a line that is a bare JSON string
  is the document itself). Bad JSON lines are skipped and counted.
* `.parquet`: the `text_field` column.
* `.tar`: webdataset text shards; every `.txt` member is a document.
* A directory saved by Hugging Face `datasets` (`save_to_disk`): read with pyarrow, no `datasets` import.
  For a DatasetDict the `train` split is read (point at `DIR/<split>` for another).
* A directory with a `manifest.json` of kind `text`: its shards, in manifest order.
* `.gz` on any of the file types above: gunzipped on the fly.

Bytes that are not valid UTF-8 are replaced with U+FFFD and counted, never fatal. Empty documents
(whitespace only) are skipped and counted. `stats`, if given, is a dict updated in place with:
files, skipped_files (unsupported types in directories), docs, chars, empty_docs, bad_records,
missing_field, invalid_utf8_docs, invalid_utf8_bytes.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

FILE_TYPES = (".txt", ".jsonl", ".parquet", ".tar")
_SURROGATES = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of each invalid byte


def decode_utf8(raw: bytes, stats: dict[str, int] | None = None) -> str:
    """UTF-8 text of `raw`; each invalid byte becomes U+FFFD and is counted in `stats`."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text, n = _SURROGATES.subn("\ufffd", raw.decode("utf-8", "surrogateescape"))
        _add(stats, invalid_utf8_docs=1, invalid_utf8_bytes=n)
        return text


def _add(stats: dict[str, int] | None, **counts: int) -> None:
    if stats is not None:
        for k, v in counts.items():
            stats[k] = stats.get(k, 0) + v


def _file_type(path: Path) -> str:
    """Type suffix of a file, looking through a trailing .gz ('' when unsupported)."""
    suffixes = path.suffixes
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes and suffixes[-1] in FILE_TYPES else ""


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _expand(path: Path, stats: dict[str, int] | None) -> Iterator[Path]:
    """The readable sources under `path`: files, HF dataset directories, shard directories."""
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    if path.is_file():
        if not _file_type(path):
            raise ValueError(f"input {path}: unsupported file type (supported: "
                             f"{', '.join(FILE_TYPES)}, optionally .gz, HF datasets saved to disk)")
        yield path
    elif _is_hf_dataset(path) or (path / "manifest.json").is_file():
        yield path  # read whole, not walked into
    else:
        for child in sorted(path.iterdir()):
            if child.name.startswith("."):
                continue
            if child.is_dir():
                yield from _expand(child, stats)
            elif _file_type(child):
                yield child
            else:
                _add(stats, skipped_files=1)


def _is_hf_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def iter_documents(
    paths: Iterable[str | os.PathLike] | str | os.PathLike,
    text_field: str = "text",
    max_chars: int | None = None,
    stats: dict[str, int] | None = None,
) -> Iterator[str]:
    """Documents from `paths` in a fixed order. `max_chars` caps the total characters yielded (the last
    document is cut); `stats` (a dict) is updated in place, see the module docstring."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    budget = max_chars if max_chars is not None else float("inf")
    for p in paths:
        for src in _expand(Path(p), stats):
            _add(stats, files=1)
            for doc in _read_source(src, text_field, stats):
                if not doc.strip():
                    _add(stats, empty_docs=1)
                    continue
                if len(doc) > budget:
                    doc = doc[: int(budget)]
                budget -= len(doc)
                _add(stats, docs=1, chars=len(doc))
                yield doc
                if budget <= 0:
                    return


def _read_source(src: Path, text_field: str, stats: dict[str, int] | None) -> Iterator[str]:
    if src.is_dir():
        if (src / "manifest.json").is_file():
            yield from _read_shard_dir(src, stats)
        else:
            yield from _read_hf_dataset(src, text_field, stats)
        return
    kind = _file_type(src)
    if kind == ".txt":
        with _open(src) as f:
            yield decode_utf8(f.read(), stats)
    elif kind == ".jsonl":
        yield from _read_jsonl(src, text_field, stats)
    elif kind == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(src)
        _check_column(src, pf.schema_arrow.names, text_field)
        for batch in pf.iter_batches(columns=[text_field]):
            yield from _column_texts(batch.column(0).to_pylist(), stats)
    elif kind == ".tar":
        yield from _read_tar(src, stats)


def _read_jsonl(src: Path, text_field: str, stats: dict[str, int] | None) -> Iterator[str]:
    got, missing_keys = 0, None
    with _open(src) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(decode_utf8(line, stats))
            except json.JSONDecodeError:
                _add(stats, bad_records=1)
                continue
            if isinstance(obj, str):
                text = obj
            elif isinstance(obj, dict) and isinstance(obj.get(text_field), str):
                text = obj[text_field]
            else:
                _add(stats, missing_field=1)
                missing_keys = missing_keys or (sorted(obj) if isinstance(obj, dict) else type(obj).__name__)
                continue
            got += 1
            yield text
    if got == 0 and missing_keys is not None:
        raise ValueError(f"{src}: no record has a string field '{text_field}' (first record has: "
                         f"{missing_keys}); pass the right one with --text-field")


def _check_column(src: Path, names: list[str], text_field: str) -> None:
    if text_field not in names:
        raise ValueError(f"{src}: no column '{text_field}' (columns: {', '.join(names)}); "
                         "pass the right one with --text-field")


def _column_texts(values: list[Any], stats: dict[str, int] | None) -> Iterator[str]:
    for v in values:
        if isinstance(v, bytes):  # binary columns: decode like files
            yield decode_utf8(v, stats)
        elif isinstance(v, str):
            yield v
        else:
            _add(stats, missing_field=1)


def _read_tar(src: Path, stats: dict[str, int] | None) -> Iterator[str]:
    from webdataset.tariterators import tar_file_iterator

    with _open(src) as f:
        for member in tar_file_iterator(f, select_files=lambda name: name.endswith(".txt")):
            yield decode_utf8(member["data"], stats)


def _read_shard_dir(src: Path, stats: dict[str, int] | None) -> Iterator[str]:
    from ghostvis.data.manifest import read_manifest

    for shard in read_manifest(src, expected_kind="text").shards:
        yield from _read_tar(src / shard.name, stats)


def _read_hf_dataset(src: Path, text_field: str, stats: dict[str, int] | None) -> Iterator[str]:
    """A `datasets` save_to_disk directory: Arrow stream files listed in state.json."""
    import pyarrow as pa

    if (src / "dataset_dict.json").is_file():
        splits = json.loads((src / "dataset_dict.json").read_text())["splits"]
        if "train" not in splits:
            raise ValueError(f"{src} is a DatasetDict without a 'train' split (splits: {', '.join(splits)}); "
                             f"pass {src}/<split> to read one")
        yield from _read_hf_dataset(src / "train", text_field, stats)
        return
    state = json.loads((src / "state.json").read_text())
    for entry in state["_data_files"]:
        with pa.memory_map(str(src / entry["filename"]), "r") as source:
            reader = pa.ipc.open_stream(source)
            _check_column(src, reader.schema.names, text_field)
            for batch in reader:
                yield from _column_texts(batch.column(text_field).to_pylist(), stats)
