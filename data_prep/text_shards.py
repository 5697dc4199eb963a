"""Tokenize text corpora into `text-tokens` webdataset shards (train/ and val/, each with manifest.json).

    python -m data_prep.text_shards --input corpus/ more.jsonl --tokenizer runs/tok --out data/text

Each document becomes `<key>.npy` (its token ids, no BOS; uint16 when the vocab fits, else uint32) in
`<prefix>-%06d.tar` under OUT/train/ (val shards: OUT/val/val-%06d.tar). Inputs: see data_prep/readers.py.
Document i (counting non-empty documents in input order) goes to val when i < --val-docs, or, with
--val-fraction f, when i is a multiple of round(1/f), so val is spread over the whole corpus.

Resumable: every shard is written under a temporary name and renamed when complete, and OUT/prep.json
records the settings; running the same command again skips the complete shards (refusing to mix in
shards made with other settings).
"""

from __future__ import annotations

import argparse
import io
import json
import os
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm
from webdataset import TarWriter
from webdataset.tariterators import tar_file_iterator

from data_prep.readers import iter_documents
from ghostvis.cli import console_script
from ghostvis.data.manifest import Manifest, ShardInfo, write_manifest
from ghostvis.tokenizer import Tokenizer
from ghostvis.tokenizer_dir import load_tokenizer

_TOKENIZER: Tokenizer | None = None  # one per worker process


def _init_worker(tokenizer_dir: str) -> None:
    global _TOKENIZER
    _TOKENIZER = load_tokenizer(tokenizer_dir)


def _write_shard(path: str, docs: list[tuple[int, str]], dtype: str, threads: int) -> tuple[int, int]:
    """Tokenize `docs` ((index, text) pairs) into the tar `path`; returns (samples, tokens)."""
    assert _TOKENIZER is not None
    ids_list = _TOKENIZER.encode_batch([text for _, text in docs], num_threads=threads)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        writer = TarWriter(f, encoder=False, mtime=0)  # fixed mtime: the same inputs give identical shards
        for (index, _), ids in zip(docs, ids_list):
            buf = io.BytesIO()
            np.save(buf, np.asarray(ids, dtype=dtype), allow_pickle=False)
            writer.write({"__key__": f"{index:010d}", "npy": buf.getvalue()})
        writer.close()
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # only complete shards ever carry the final name
    return len(docs), sum(len(ids) for ids in ids_list)


def _count_tokens(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(len(np.load(io.BytesIO(m["data"]), allow_pickle=False)) for m in tar_file_iterator(f))


def _is_val(i: int, val_docs: int | None, val_every: int | None) -> bool:
    if val_docs is not None:
        return i < val_docs
    return val_every is not None and i % val_every == 0


def _chunks(docs: Iterator[str], args: argparse.Namespace) -> Iterator[tuple[str, int, list[tuple[int, str]]]]:
    """(split, shard index, [(doc index, text)]) in input order; each split fills its own shards."""
    val_every = None if args.val_fraction in (None, 0) else max(1, round(1 / args.val_fraction))
    buffers: dict[str, list[tuple[int, str]]] = {"train": [], "val": []}
    counts = {"train": 0, "val": 0}
    for i, text in enumerate(docs):
        split = "val" if _is_val(i, args.val_docs, val_every) else "train"
        buffers[split].append((i, text))
        if len(buffers[split]) == args.docs_per_shard:
            yield split, counts[split], buffers[split]
            buffers[split], counts[split] = [], counts[split] + 1
    for split in ("train", "val"):
        if buffers[split]:
            yield split, counts[split], buffers[split]


def _check_settings(out: Path, settings: dict) -> None:
    """Refuse to resume into an output directory made with other settings."""
    path = out / "prep.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise SystemExit(f"text_shards: {out} holds shards made with other settings ({', '.join(diff)} "
                             f"differ, see {path}): use a new --out or delete it")
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(settings, indent=1))
    os.replace(tmp, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="files or directories (.txt .jsonl .parquet "
                   ".tar, optionally .gz; HF datasets saved to disk)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (launch/tok_train.py output)")
    p.add_argument("--out", required=True, help="output directory; gets train/ and val/")
    p.add_argument("--prefix", default="train", help="train shard name prefix (default: train)")
    p.add_argument("--text-field", default="text", help="JSON field / parquet column holding the text")
    p.add_argument("--docs-per-shard", type=int, default=8192)
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=float, default=None, help="share of documents for val/ (default 0.01)")
    val.add_argument("--val-docs", type=int, default=None, help="the first N documents go to val/")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    args = p.parse_args(argv)
    if args.val_docs is None and args.val_fraction is None:
        args.val_fraction = 0.01
    if args.val_fraction is not None and not 0 <= args.val_fraction <= 1:
        p.error(f"--val-fraction {args.val_fraction} must be in [0, 1]")
    if args.docs_per_shard < 1:
        p.error("--docs-per-shard must be >= 1")
    for path in args.input:
        if not Path(path).exists():
            p.error(f"--input {path} does not exist")
    if not Path(args.tokenizer).is_dir():
        p.error(f"--tokenizer {args.tokenizer} is not a directory (train one with launch/tok_train.py)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    tok = load_tokenizer(args.tokenizer)
    dtype = "uint16" if tok.vocab_size < 2**16 else "uint32"
    out = Path(args.out)
    _check_settings(out, {
        "inputs": [str(Path(p).resolve()) for p in args.input], "tokenizer": tok.fingerprint,
        "prefix": args.prefix, "text_field": args.text_field, "docs_per_shard": args.docs_per_shard,
        "val_fraction": args.val_fraction, "val_docs": args.val_docs})
    prefixes = {"train": args.prefix, "val": "val"}
    for split in prefixes:
        (out / split).mkdir(parents=True, exist_ok=True)

    results: dict[str, dict[int, tuple[str, int, int]]] = {"train": {}, "val": {}}  # idx -> (name, samples, tokens)
    reused = 0
    read_stats: dict[str, int] = {}
    workers = max(1, args.workers)
    if workers == 1:
        _init_worker(args.tokenizer)
        pool = None
    else:  # spawn: tokenizer threads and fork don't mix
        pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                   initargs=(args.tokenizer,))
    pending: dict[Future, tuple[str, int, str]] = {}

    def collect(done: set[Future]) -> None:
        for fut in done:
            split, idx, name = pending.pop(fut)
            results[split][idx] = (name, *fut.result())

    docs = tqdm(iter_documents(args.input, text_field=args.text_field, stats=read_stats),
                desc="text_shards", unit="doc", mininterval=1.0)
    try:
        for split, idx, chunk in _chunks(iter(docs), args):
            name = f"{prefixes[split]}-{idx:06d}.tar"
            path = out / split / name
            if path.is_file():  # complete from an earlier run
                results[split][idx] = (name, len(chunk), _count_tokens(path))
                reused += 1
            elif pool is None:
                results[split][idx] = (name, *_write_shard(str(path), chunk, dtype, 8))
            else:
                pending[pool.submit(_write_shard, str(path), chunk, dtype, 1)] = (split, idx, name)
                if len(pending) >= 2 * workers:  # bound the documents held in memory
                    collect(wait(pending, return_when=FIRST_COMPLETED).done)
        collect(wait(pending).done if pending else set())
    finally:
        docs.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    if not results["train"] and not results["val"]:
        raise SystemExit(f"text_shards: no documents found in {' '.join(args.input)}")
    totals = {"docs": 0, "tokens": 0}
    for split, done in results.items():
        if not done:
            continue
        shards = [done[i] for i in sorted(done)]
        tokens = sum(t for _, _, t in shards)
        write_manifest(out / split, Manifest(
            kind="text-tokens", shards=[ShardInfo(n, s) for n, s, _ in shards],
            tokenizer={"fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size}, dtype=dtype,
            extra={"num_tokens": tokens}))
        totals["docs"] += sum(s for _, s, _ in shards)
        totals["tokens"] += tokens
    skipped = sum(read_stats.get(k, 0) for k in ("empty_docs", "bad_records", "missing_field"))
    summary = {
        **totals, "train_shards": len(results["train"]), "val_shards": len(results["val"]),
        "val_docs": sum(s for _, s, _ in results["val"].values()), "reused_shards": reused,
        "skipped_docs": skipped, "invalid_utf8_bytes": read_stats.get("invalid_utf8_bytes", 0)}
    print(f"text_shards: {summary['docs']} docs ({summary['val_docs']} val), {summary['tokens']} tokens, "
          f"{summary['train_shards']} train + {summary['val_shards']} val shards ({reused} already complete), "
          f"{skipped} skipped docs, {summary['invalid_utf8_bytes']} invalid UTF-8 bytes replaced -> {out}",
          flush=True)
    return summary


cli = console_script(main, exit_status=False)

if __name__ == "__main__":
    cli()
