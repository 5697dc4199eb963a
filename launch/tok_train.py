"""Train the GhostVis tokenizer (rustbpe) on raw text.

    python launch/tok_train.py --input corpus/ extra.jsonl --vocab-size 32768 --out runs/tok [--max-chars 2000000000]

Inputs: .txt, .jsonl (a `text` field), .parquet (a text column), webdataset text shards, HF datasets saved to
disk (see data_prep/readers.py). Every --heldout-every'th document is held out of training and used to
report bytes per token. Invalid UTF-8 is replaced (and counted); empty documents are skipped (and counted).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator

from tqdm import tqdm

from data_prep.readers import iter_documents
from ghostvis.cli import console_script
from ghostvis.tokenizer import MIN_VOCAB_SIZE, Tokenizer, bytes_per_token


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files or directories of text")
    p.add_argument("--vocab-size", type=int, required=True,
                   help=f"total vocabulary: 256 bytes + merges + special tokens (>= {MIN_VOCAB_SIZE})")
    p.add_argument("--out", required=True, help="directory to write ranks.tiktoken and tokenizer.json to")
    p.add_argument("--max-chars", type=int, default=None, help="stop reading after this many characters")
    p.add_argument("--text-field", default="text", help="jsonl/parquet field holding the text")
    p.add_argument("--heldout-every", type=int, default=100, help="hold out every N-th document (0 = none)")
    p.add_argument("--heldout-chars", type=int, default=2_000_000, help="cap on held-out characters")
    args = p.parse_args(argv)
    if args.vocab_size < MIN_VOCAB_SIZE:
        p.error(f"--vocab-size {args.vocab_size} is too small: it must cover 256 bytes + the special tokens "
                f"(>= {MIN_VOCAB_SIZE})")

    stats: dict[str, int] = {}
    heldout: list[str] = []
    bar = tqdm(total=args.max_chars, unit="char", unit_scale=True, desc="reading")

    def training_docs() -> Iterator[str]:
        held_chars = 0
        for i, doc in enumerate(iter_documents(args.input, args.text_field, args.max_chars, stats)):
            bar.update(len(doc))
            if args.heldout_every and i % args.heldout_every == args.heldout_every - 1 and held_chars < args.heldout_chars:
                heldout.append(doc)
                held_chars += len(doc)
            else:
                yield doc

    t0 = time.perf_counter()
    try:
        tok = Tokenizer.train_from_iterator(training_docs(), args.vocab_size)
    except ValueError as e:  # e.g. no text in the inputs: a message, not a traceback
        sys.exit(f"error: {e} (inputs: {' '.join(args.input)}; read: {stats})")
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    tok.save(args.out)

    print(f"trained vocab_size={tok.vocab_size} in {elapsed:.1f}s on {stats.get('docs', 0)} documents "
          f"({stats.get('chars', 0):,} chars) -> {args.out} (fingerprint {tok.fingerprint[:16]})")
    problems = {k: v for k, v in stats.items() if k not in ("files", "docs", "chars") and v}
    if problems:
        print("input problems (skipped or replaced, not fatal):", ", ".join(f"{k}={v}" for k, v in problems.items()))
    if heldout:
        print(f"held-out bytes/token: {bytes_per_token(tok.encode_batch, heldout):.3f} ({len(heldout)} documents)")
    else:
        print("no held-out documents (corpus too small or --heldout-every 0): bytes/token not measured")


cli = console_script(main)

if __name__ == "__main__":
    cli()
