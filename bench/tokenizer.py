"""Benchmark: rustbpe training vs Hugging Face `tokenizers` BpeTrainer, and encoding tiktoken vs HF.

    python bench/tokenizer.py [--mb 20] [--vocab-size 32768]

Both trainers get the same ~20 MB corpus (real text any Linux box with Python has: the Python standard
library's sources and docstrings, plus /usr/share/doc and /usr/share/common-licenses where present), the same
split pattern and the same vocabulary size, in one run on one machine. Results are appended to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # launch/ when run as a script
import rustbpe  # noqa: E402

from ghostvis.tokenizer import SPECIAL_TOKENS, Tokenizer  # noqa: E402
from launch.tok_eval import hf_encode_batch, train_hf_bpe  # noqa: E402


def corpus(max_bytes: int) -> list[str]:
    """Up to ``max_bytes`` of real text, one document per file, in a fixed order (half prose, half code)."""
    docs, total = [], 0
    prose = sorted(Path("/usr/share/common-licenses").glob("*")) + sorted(Path("/usr/share/doc").rglob("*"))
    code = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    for files, budget in ((prose, max_bytes // 2), (code, max_bytes)):
        for f in tqdm(files, desc="corpus", leave=False):
            if total >= budget:
                break
            if not f.is_file() or f.is_symlink() or f.stat().st_size > 2_000_000:
                continue
            raw = gzip.open(f).read() if f.suffix == ".gz" else f.read_bytes()
            if b"\0" in raw[:1024]:
                continue  # binary
            text = raw.decode("utf-8", errors="replace")
            docs.append(text)
            total += len(raw)
    return docs


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or "unknown CPU")
    return f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, Python {platform.python_version()}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=20.0, help="corpus size in MB")
    p.add_argument("--vocab-size", type=int, default=32768, help="256 bytes + merges, for both trainers")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = p.parse_args()

    docs = corpus(int(args.mb * 1e6))
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    print(f"corpus: {len(docs)} documents, {n_bytes / 1e6:.1f} MB; machine: {machine()}")

    t0 = time.perf_counter()
    rb = rustbpe.Tokenizer()
    rb.train_from_iterator(iter(docs), args.vocab_size)
    t_rust = time.perf_counter() - t0
    print(f"rustbpe train: {t_rust:.2f}s")

    t0 = time.perf_counter()
    hf = train_hf_bpe(iter(docs), args.vocab_size, rb.get_pattern())
    t_hf = time.perf_counter() - t0
    print(f"HF BpeTrainer: {t_hf:.2f}s (vocab {hf.get_vocab_size()})")

    ranks = {bytes(b): i for b, i in rb.get_mergeable_ranks()}
    tok = Tokenizer(ranks, rb.get_pattern(), {s: len(ranks) + i for i, s in enumerate(SPECIAL_TOKENS)})
    threads = os.cpu_count() or 1
    t0 = time.perf_counter()
    n_tok = sum(map(len, tok.encode_batch(docs, num_threads=threads)))
    t_tik = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_hf = sum(map(len, hf_encode_batch(hf)(docs)))
    t_hfe = time.perf_counter() - t0
    print(f"encode: tiktoken {n_bytes / 1e6 / t_tik:.1f} MB/s, HF {n_bytes / 1e6 / t_hfe:.1f} MB/s")

    out = Path(args.out)
    if not out.exists():
        out.write_text("# GhostVis benchmarks\n\nAppended by the scripts in bench/; each entry names its machine.\n")
    with out.open("a") as f:
        f.write(
            f"\n## Tokenizer training and encoding ({datetime.date.today()})\n\n"
            f"Machine: {machine()}. Corpus: {n_bytes / 1e6:.1f} MB ({len(docs)} documents: Python stdlib sources, "
            f"/usr/share/doc, licenses); split pattern: GPT-4 style, digits 1-3; vocab {args.vocab_size} "
            f"(256 + {args.vocab_size - 256} merges). Command: `python bench/tokenizer.py`.\n\n"
            f"| what | rustbpe / tiktoken | HF tokenizers | ratio |\n| --- | --- | --- | --- |\n"
            f"| train time | {t_rust:.2f} s | {t_hf:.2f} s | {t_rust / t_hf:.2f}x HF's time |\n"
            f"| encode throughput ({threads} threads) | {n_bytes / 1e6 / t_tik:.1f} MB/s | "
            f"{n_bytes / 1e6 / t_hfe:.1f} MB/s | {t_hfe / t_tik:.2f}x |\n"
            f"| bytes per token (on the training corpus) | {n_bytes / n_tok:.3f} | {n_bytes / n_hf:.3f} | |\n"
        )
    print(f"appended to {out}")


if __name__ == "__main__":
    main()
