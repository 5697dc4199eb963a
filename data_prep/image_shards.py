"""Ingest image data into GhostVis shards (contract: docs/architecture.md, Data; guide: docs/datasets.md).

    python -m data_prep.image_shards folder --images DIR --captions captions.jsonl --out OUT
    python -m data_prep.image_shards llava --json llava.json --images DIR --out OUT
    python -m data_prep.image_shards img2dataset --input DIR [--rewrite --out OUT]
    python -m data_prep.image_shards hf --path DIR [--split train] --image-column image --text-column text --out OUT

Every image is opened and checked with `ghostvis.vision.transforms.load_image`; a sample whose image is
corrupt, missing or too large, whose caption is missing, or whose `<|image|>` placeholders don't match its
images is skipped and listed in OUT/skipped.jsonl (one {"key", "source", "reason"} per line). Original
JPEG/PNG/WebP bytes are kept as they are; other formats, and images over --max-side, are re-encoded.

Splits: without --val-fraction OUT is one shard directory, which `launch/train.py --data OUT` trains on
(without validation) and `launch/eval.py --data OUT` evaluates. `--val-fraction F` writes OUT/train/ and
OUT/val/ instead: a sample goes to val/ when a hash of its source (file name, LLaVA id, tar:key, HF row)
falls below F, so about a fraction F goes there, the same samples on every run, and conversations about
the same LLaVA id stay together.

Resumable: input item i goes to shard i // --shard-size, and a finished shard is recorded in
OUT/.progress/; a re-run keeps every recorded shard whose inputs and settings are unchanged.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import itertools
import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from ghostvis.cli import console_script
from ghostvis.data.manifest import Manifest, ShardInfo, write_manifest
from ghostvis.data.multimodal import IMAGE_EXTS, count_images
from ghostvis.tokenizer import IMAGE_PLACEHOLDER
from ghostvis.vision.transforms import BadImage, load_image

KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
PROGRESS = ".progress"
SKIPPED = "skipped.jsonl"


@dataclass
class Item:
    """One input sample before checking. `images` are file paths or raw bytes."""

    key: str
    source: str  # where it came from, for the report
    images: list[str | bytes] = field(default_factory=list)
    caption: str | None = None  # image-text kind
    record: dict[str, Any] | None = None  # conversation kind: {"messages": ...}; image-text: extra metadata
    problem: str | None = None  # already known to be unusable (e.g. missing caption)


class Skip(Exception):
    """A sample that can't be used; the message is the reason written to skipped.jsonl."""


# ---- checking one sample (runs in pool workers) -----------------------------------------------------

def checked_image(src: str | bytes, max_side: int | None) -> tuple[str, bytes]:
    """(extension, bytes) of a usable image: the original bytes when JPEG/PNG/WebP within the size cap,
    else re-encoded (JPEG stays JPEG, anything else becomes PNG)."""
    if isinstance(src, str):
        try:
            data = Path(src).read_bytes()
        except OSError as e:
            raise Skip(f"image file unreadable: {e.strerror or e}: {src}") from e
    else:
        data = src
    try:
        img = load_image(data)
    except BadImage as e:
        raise Skip(f"bad image: {e.reason}") from e
    fmt = Image.open(io.BytesIO(data)).format  # header only
    too_big = max_side is not None and max(img.size) > max_side
    if fmt in KEPT_FORMATS and not too_big:
        return KEPT_FORMATS[fmt], data
    if too_big:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=95)
        return "jpg", buf.getvalue()
    img.save(buf, format="PNG")
    return "png", buf.getvalue()


def check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise Skip("conversation has no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise Skip(f"message {i}: role must be system/user/assistant, got {m.get('role') if isinstance(m, dict) else m!r}")
        if not isinstance(m.get("content"), (str, list)):
            raise Skip(f"message {i}: content missing or not a string/list")


def prepare(item: Item, kind: str, max_side: int | None) -> tuple[Item, dict | None, str | None]:
    """(item, sample ready for the tar writer, None) or (item, None, reason to skip)."""
    try:
        if item.problem:
            raise Skip(item.problem)
        sample: dict[str, Any] = {"__key__": item.key}
        if kind == "image-text":
            if not item.caption or not item.caption.strip():
                raise Skip("missing caption")
            if len(item.images) != 1:
                raise Skip(f"expected 1 image, got {len(item.images)}")
            ext, data = checked_image(item.images[0], max_side)
            sample[ext], sample["txt"] = data, item.caption.strip().encode()
            if item.record:
                sample["json"] = json.dumps(item.record).encode()
        else:
            assert item.record is not None
            check_messages(item.record.get("messages"))
            n = count_images(item.record)
            if n != len(item.images):
                raise Skip(f"{n} {IMAGE_PLACEHOLDER} placeholders but {len(item.images)} images")
            for i, src in enumerate(item.images):
                ext, data = checked_image(src, max_side)
                sample[f"{i}.{ext}"] = data
            sample["json"] = json.dumps(item.record).encode()
        return item, sample, None
    except Skip as e:
        return item, None, str(e)


def _prepare_job(args: tuple[Item, str, int | None]) -> tuple[Item, dict | None, str | None]:
    return prepare(*args)


# ---- resumable shard writing ---------------------------------------------------------------------

def _fingerprint(items: list[Item], settings: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for it in items:
        h.update(f"{it.key}\0{it.source}\n".encode())
    return h.hexdigest()


def _load_record(out: Path, name: str, fingerprint: str) -> dict | None:
    path = out / PROGRESS / f"{name}.json"
    if not (path.exists() and (out / name).exists()):
        return None
    record = json.loads(path.read_text())
    return record if record.get("fingerprint") == fingerprint else None


def _save_record(out: Path, name: str, record: dict) -> None:
    path = out / PROGRESS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def _check_all(chunk: list[Item], kind: str, max_side: int | None, pool: Pool | None,
               bar: tqdm) -> Iterator[tuple[Item, dict | None, str | None]]:
    jobs = [(it, kind, max_side) for it in chunk]
    results = pool.imap(_prepare_job, jobs, chunksize=8) if pool else map(_prepare_job, jobs)
    for r in results:
        bar.update(1)
        yield r


def _finish(out: Path, kind: str, records: list[tuple[str, dict]], extra: dict[str, Any]) -> Manifest:
    """Write manifest.json and skipped.jsonl from the shard records; print the skip counts."""
    shards = [ShardInfo(name, r["samples"]) for name, r in records if r["samples"] > 0]
    skipped = [s for _, r in records for s in r["skipped"]]
    with open(out / SKIPPED, "w") as f:
        for s in skipped:
            f.write(json.dumps(s) + "\n")
    reasons = Counter(": ".join(s["reason"].split(": ")[:2]) for s in skipped)
    extra = {**extra, "skipped": len(skipped)}
    manifest = Manifest(kind=kind, shards=shards, extra=extra)
    write_manifest(out, manifest)
    print(f"{out}: {manifest.num_samples} samples in {len(shards)} shards ({kind}); {len(skipped)} skipped"
          + "".join(f"\n  {n:6d}  {why}" for why, n in reasons.most_common()))
    if skipped:
        print(f"  details: {out / SKIPPED}")
    return manifest


def write_shards(items: Iterable[Item], out: str | os.PathLike, *, kind: str, total: int | None = None,
                 shard_size: int = 1000, prefix: str = "shard", max_side: int | None = None,
                 workers: int = 1, extra: dict[str, Any] | None = None) -> Manifest:
    """Check every item and write the good ones as `<prefix>-%06d.tar` shards + manifest.json under `out`.

    Resumable: a shard already recorded with the same inputs and settings is kept as it is.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"kind": kind, "max_side": max_side, "shard_size": shard_size, "prefix": prefix}
    records: list[tuple[str, dict]] = []
    it = iter(items)
    pool = Pool(workers) if workers > 1 else None
    try:
        with tqdm(total=total, desc=f"checking -> {out.name}", unit="sample") as bar:
            for index in itertools.count():
                chunk = list(itertools.islice(it, shard_size))
                if not chunk:
                    break
                name = f"{prefix}-{index:06d}.tar"
                fingerprint = _fingerprint(chunk, settings)
                record = _load_record(out, name, fingerprint)
                if record is None:
                    record = {"fingerprint": fingerprint, "samples": 0, "skipped": []}
                    tmp = out / f".{name}.tmp"
                    # mtime fixed: the same input gives the same bytes.
                    with wds.TarWriter(str(tmp), encoder=False, mtime=0, user="ghostvis", group="ghostvis") as w:
                        for item, sample, reason in _check_all(chunk, kind, max_side, pool, bar):
                            if sample is None:
                                record["skipped"].append({"key": item.key, "source": item.source, "reason": reason})
                            else:
                                w.write(sample)
                                record["samples"] += 1
                    os.replace(tmp, out / name)
                    _save_record(out, name, record)  # last: a shard without its record is redone
                else:
                    bar.update(len(chunk))
                records.append((name, record))
    finally:
        if pool:
            pool.close()
            pool.join()
    return _finish(out, kind, records, {"source": "data_prep.image_shards", **(extra or {})})


# ---- input formats -------------------------------------------------------------------------------

def _read_table(path: Path) -> list[dict[str, Any]]:
    """Rows of a csv, a jsonl (one object a line) or a JSON array of objects."""
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    text = path.read_text()
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None  # jsonl: one document a line
    if isinstance(whole, list):
        rows = whole
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{n}: not valid JSON ({e.msg}); expected one object per line, or "
                                     "one JSON array of objects") from e
    for n, row in enumerate(rows):
        if not isinstance(row, dict):
            raise SystemExit(f"{path}: row {n} is a JSON {type(row).__name__}, not an object with the fields "
                             "file|image and caption|text")
    return rows


def _field(row: dict[str, Any], names: tuple[str, ...], path: Path, n: int) -> Any:
    for name in names:
        if name in row:
            return row[name]
    raise SystemExit(f"{path}: row {n} has none of the fields {' / '.join(names)} (found: {sorted(row)})")


def folder_items(images: Path, captions: Path) -> list[Item]:
    """Rows of a captions jsonl, JSON array or csv with fields file|image (relative to `images`) and caption|text."""
    items = []
    for n, row in enumerate(_read_table(captions)):
        if "conversations" in row and not {"caption", "text"} & set(row):
            raise SystemExit(f"{captions}: row {n} is a LLaVA conversation (\"conversations\"), not a caption: "
                             f"python -m data_prep.image_shards llava --json {captions} --images {images} --out ...")
        file = str(_field(row, ("file", "image"), captions, n))
        caption = row.get("caption", row.get("text"))
        items.append(Item(key=f"{n:09d}", source=file, images=[str(images / file)],
                          caption=caption if isinstance(caption, str) else None, record={"file": file},
                          problem=None if isinstance(caption, str) and caption.strip() else "missing caption"))
    return items


def llava_messages(turns: Any) -> list[dict[str, Any]]:
    """LLaVA `conversations` ([{"from": "human"|"gpt", "value": str}]) -> our messages;
    `<image>` becomes our `<|image|>` placeholder."""
    if not isinstance(turns, list) or not turns:
        raise Skip("no conversations")
    messages = []
    for i, t in enumerate(turns):
        role = LLAVA_ROLES.get(t.get("from", t.get("role")) if isinstance(t, dict) else None)
        value = t.get("value", t.get("content")) if isinstance(t, dict) else None
        if role is None or not isinstance(value, str):
            raise Skip(f"turn {i}: expected {{'from': human|gpt|system, 'value': str}}, got {str(t)[:80]}")
        messages.append({"role": role, "content": value.replace("<image>", IMAGE_PLACEHOLDER)})
    return messages


def llava_items(json_path: Path, images: Path | None) -> list[Item]:
    try:
        entries = json.loads(json_path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"{json_path}: not valid JSON ({e}); expected a LLaVA-format list of entries") from e
    if not isinstance(entries, list):
        raise SystemExit(f"{json_path}: expected a JSON list of LLaVA entries, got {type(entries).__name__}")
    items = []
    for n, e in enumerate(entries):
        e = e if isinstance(e, dict) else {}
        files = e.get("image") or []
        files = [files] if isinstance(files, str) else list(files)
        item = Item(key=f"{n:09d}", source=str(e.get("id", n)))
        if files and images is None:
            item.problem = "entry has images but no --images folder was given"
        item.images = [str((images or Path(".")) / f) for f in files]
        try:
            # the entry's other fields (an `answer`, a `type`, ...) are kept beside the messages
            extra = {k: v for k, v in e.items() if k not in ("conversations", "image", "messages")}
            item.record = {**extra, "messages": llava_messages(e.get("conversations")), "id": e.get("id")}
        except Skip as s:
            item.problem = str(s)
        items.append(item)
    return items


def tar_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) in stored order; members grouped by webdataset's key convention."""
    key, sample = None, {}
    with tarfile.open(path) as tf:
        for m in tf:
            if not m.isfile():
                continue
            base, ext = wds.tariterators.base_plus_ext(m.name)
            if base is None:
                continue
            if base != key and key is not None:
                yield key, sample
                sample = {}
            key = base
            sample[ext.lower()] = tf.extractfile(m).read()
    if key is not None:
        yield key, sample


def img2dataset_item(tar_name: str, key: str, sample: dict[str, bytes]) -> Item:
    image_ext = next((e for e in IMAGE_EXTS if e in sample), None)
    caption = sample.get("txt", b"").decode("utf-8", errors="replace")
    try:
        meta = json.loads(sample["json"]) if "json" in sample else None
    except ValueError:
        meta = None  # img2dataset's metadata is informational; a broken one doesn't spoil the sample
    return Item(key=key, source=f"{tar_name}:{key}", images=[sample[image_ext]] if image_ext else [],
                caption=caption, record=meta,
                problem="no image member" if image_ext is None else None if caption.strip() else "missing caption")


def index_img2dataset(input_dir: Path, workers: int) -> Manifest:
    """Validate img2dataset tars in place and write our manifest beside them (no rewrite).

    The manifest counts every sample in each tar (positions in the stream depend on it); bad ones stay
    in the tars, are listed in skipped.jsonl, and the loader skips them when it can't decode them.
    """
    tars = sorted(input_dir.glob("*.tar"))
    if not tars:
        raise SystemExit(f"{input_dir}: no .tar files; point --input at img2dataset's output folder")
    records = []
    pool = Pool(workers) if workers > 1 else None
    try:
        with tqdm(desc=f"validating {input_dir.name}", unit="sample") as bar:
            for tar in tars:
                st = tar.stat()
                fingerprint = f"{st.st_size}:{st.st_mtime_ns}"
                record = _load_record(input_dir, tar.name, fingerprint)
                if record is None:
                    items = [img2dataset_item(tar.name, k, s) for k, s in tar_samples(tar)]
                    record = {"fingerprint": fingerprint, "samples": len(items), "skipped": [
                        {"key": it.key, "source": it.source, "reason": reason}
                        for it, _, reason in _check_all(items, "image-text", None, pool, bar) if reason]}
                    _save_record(input_dir, tar.name, record)
                records.append((tar.name, record))
    finally:
        if pool:
            pool.close()
            pool.join()
    return _finish(input_dir, "image-text", records, {"source": "img2dataset (indexed in place)"})


def img2dataset_items(input_dir: Path) -> Iterator[Item]:
    for tar in sorted(input_dir.glob("*.tar")):
        for key, sample in tar_samples(tar):
            yield img2dataset_item(tar.name, key, sample)


def hf_items(path: Path, split: str | None, image_column: str, text_column: str,
             images: Path | None) -> tuple[Callable[[], Iterator[Item]], int, str]:
    """Rows of a `datasets.save_to_disk` folder. A string text column gives image-text samples; a list of
    messages ({"role", "content"} or LLaVA's {"from", "value"}) gives conversations."""
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            split = "train" if "train" in ds else next(iter(ds))
        if split not in ds:
            raise SystemExit(f"{path}: no split {split!r}; --split one of {list(ds)}")
        ds = ds[split]
    for col, flag in ((image_column, "--image-column"), (text_column, "--text-column")):
        if col not in ds.column_names:
            raise SystemExit(f"{path}: no column {col!r} ({flag}); columns: {ds.column_names}")
    if isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))  # raw bytes, no PIL round trip
    text_dtype = getattr(ds.features[text_column], "dtype", None)
    kind = "image-text" if text_dtype in ("string", "large_string") else "conversation"

    def image_source(v: Any) -> list[str | bytes]:
        if v is None:
            return []
        if isinstance(v, dict):
            return [v["bytes"]] if v.get("bytes") else [str((images or path) / v["path"])] if v.get("path") else []
        if isinstance(v, (bytes, str)):
            return [v if isinstance(v, bytes) else str((images or path) / v)]
        if isinstance(v, list):
            return [s for x in v for s in image_source(x)]
        return []

    def rows() -> Iterator[Item]:  # a function: --val-fraction reads the rows once per split
        for n, row in enumerate(ds):
            item = Item(key=f"{n:09d}", source=f"row {n}", images=image_source(row[image_column]))
            if kind == "image-text":
                item.caption = row[text_column]
            else:
                try:
                    item.record = {"messages": llava_messages(row[text_column])}
                except Skip as s:
                    item.problem = str(s)
            yield item

    return rows, len(ds), kind


def in_val(item: Item, fraction: float) -> bool:
    """Whether `item` belongs to the val split: a hash of its source, so the split is the same on every run."""
    h = int.from_bytes(hashlib.sha256(f"ghostvis-split:{item.source}".encode()).digest()[:8], "big")
    return h < fraction * 2**64


def write_splits(items: Callable[[], Iterable[Item]], out: Path, val_fraction: float | None, *, kind: str,
                 total: int | None, **opts: Any) -> Manifest:
    """`write_shards` into `out`, or into out/train and out/val by `in_val` (the train manifest is returned)."""
    if val_fraction is None:
        return write_shards(items(), out, kind=kind, total=total, **opts)
    val = write_shards((it for it in items() if in_val(it, val_fraction)), out / "val", kind=kind, **opts)
    train = write_shards((it for it in items() if not in_val(it, val_fraction)), out / "train", kind=kind, **opts)
    if not val.num_samples or not train.num_samples:
        raise SystemExit(f"--val-fraction {val_fraction}: {val.num_samples} val and {train.num_samples} train "
                         f"samples in {out}; choose a fraction that leaves both splits some samples")
    return train


# ---- CLI -----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> Manifest:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="format", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, help="output shard directory")
    common.add_argument("--max-side", type=int, default=None, help="re-encode images whose longest side exceeds N")
    common.add_argument("--shard-size", type=int, default=1000, help="input samples per shard")
    common.add_argument("--prefix", default="shard", help="shard names: <prefix>-%%06d.tar")
    common.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    common.add_argument("--val-fraction", type=float, default=None, metavar="F",
                        help="write OUT/train and OUT/val (about a fraction F, chosen by a hash of each sample's "
                             "source) instead of one shard directory")
    f = sub.add_parser("folder", parents=[common], help="image folder + captions jsonl/json/csv")
    f.add_argument("--images", type=Path, required=True)
    f.add_argument("--captions", type=Path, required=True,
                   help="jsonl, a JSON array of objects, or csv, with file|image and caption|text")
    ll = sub.add_parser("llava", parents=[common], help="LLaVA-format JSON + image folder")
    ll.add_argument("--json", type=Path, required=True)
    ll.add_argument("--images", type=Path, default=None)
    i2d = sub.add_parser("img2dataset", parents=[common], help="img2dataset output (tar shards)")
    i2d.add_argument("--input", type=Path, required=True)
    i2d.add_argument("--rewrite", action="store_true", help="write new shards to --out without bad samples")
    hf = sub.add_parser("hf", parents=[common], help="Hugging Face dataset saved with save_to_disk")
    hf.add_argument("--path", type=Path, required=True)
    hf.add_argument("--split", default=None)
    hf.add_argument("--image-column", default="image")
    hf.add_argument("--text-column", default="text")
    hf.add_argument("--images", type=Path, default=None, help="folder for image paths stored as strings")
    a = p.parse_args(argv)

    for flag in ("images", "captions", "json", "input", "path"):
        v = getattr(a, flag, None)
        if v is not None and not v.exists():
            p.error(f"--{flag} {v}: no such file or directory")
    if a.val_fraction is not None and not 0 < a.val_fraction < 1:
        p.error(f"--val-fraction {a.val_fraction}: give a fraction between 0 and 1, e.g. 0.05")
    if a.format == "img2dataset" and not a.rewrite:
        if a.val_fraction is not None:
            p.error("--val-fraction writes new train/ and val/ shards: add --rewrite --out OUT")
        if a.max_side is not None or (a.out is not None and a.out.resolve() != a.input.resolve()):
            p.error("img2dataset without --rewrite indexes the tars in place (manifest written into --input); "
                    "add --rewrite to write resized/filtered shards to --out")
        return index_img2dataset(a.input, a.workers)
    if a.out is None:
        p.error("--out is required")
    opts = dict(shard_size=a.shard_size, prefix=a.prefix, max_side=a.max_side, workers=a.workers)
    if a.format in ("folder", "llava"):
        items = folder_items(a.images, a.captions) if a.format == "folder" else llava_items(a.json, a.images)
        kind = "image-text" if a.format == "folder" else "conversation"
        return write_splits(lambda: items, a.out, a.val_fraction, kind=kind, total=len(items), **opts)
    if a.format == "img2dataset":
        return write_splits(lambda: img2dataset_items(a.input), a.out, a.val_fraction, kind="image-text",
                            total=None, **opts)
    rows, total, kind = hf_items(a.path, a.split, a.image_column, a.text_column, a.images)
    return write_splits(rows, a.out, a.val_fraction, kind=kind, total=total, **opts)


cli = console_script(main, exit_status=False)

if __name__ == "__main__":
    cli()
