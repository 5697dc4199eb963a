"""Compare a trained tokenizer's compression (bytes per token) with a Hugging Face BPE trained on the same data.

    python launch/tok_eval.py --tokenizer runs/tok --train-input corpus/ [--max-chars 20000000] [--eval-input more.txt]

Kinds of text scored: prose, code, numbers, non-Latin scripts (built in, from text any Python install has),
plus your own files with --eval-input. Higher bytes/token = better compression. The Hugging Face `tokenizers`
BPE uses the same split pattern and the same number of merges, so the difference is the training itself.
"""

from __future__ import annotations

import argparse
import inspect
import random
from collections.abc import Iterable

from data_prep.readers import iter_documents
from ghostvis.cli import console_script
from ghostvis.tokenizer import Tokenizer, bytes_per_token
from ghostvis.tokenizer_dir import load_tokenizer

NON_LATIN = [
    "天空是蓝色的，草是绿色的。我们今天去公园散步，看到了很多花。",
    "東京は日本の首都です。今日はとても良い天気ですね。",
    "Москва — столица России. Сегодня хорошая погода, и мы идём гулять.",
    "القاهرة هي عاصمة مصر. الطقس جميل اليوم ونحن نذهب للتنزه.",
    "नई दिल्ली भारत की राजधानी है। आज मौसम बहुत अच्छा है।",
    "서울은 대한민국의 수도입니다. 오늘은 날씨가 아주 좋습니다.",
    "Αθήνα είναι η πρωτεύουσα της Ελλάδας. Σήμερα ο καιρός είναι ωραίος.",
]


def eval_texts() -> dict[str, list[str]]:
    """Built-in evaluation text by kind (deterministic, offline)."""
    import argparse as a, json as j, textwrap as t  # noqa: E401  stdlib modules = real code and docstrings

    modules = (a, j, t)
    prose = [inspect.getdoc(obj) or "" for m in modules for _, obj in inspect.getmembers(m) if inspect.getdoc(obj)]
    code = [inspect.getsource(m) for m in modules]
    rng = random.Random(0)
    numbers = [
        " ".join(f"{rng.uniform(-1e6, 1e6):.{rng.randint(0, 4)}f}" for _ in range(200)),
        ", ".join(str(rng.randint(0, 10**12)) for _ in range(200)),
        "\n".join(f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
                  for _ in range(100)),
    ]
    return {"prose": prose, "code": code, "numbers": numbers, "non-latin": NON_LATIN * 20}


def train_hf_bpe(texts: Iterable[str], vocab_size: int, pattern: str):
    """A Hugging Face byte-level BPE with our split pattern; ``vocab_size`` = 256 bytes + merges."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    hf.train_from_iterator(texts, trainer)
    return hf


def hf_encode_batch(hf):
    return lambda texts: [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="directory written by launch/tok_train.py")
    p.add_argument("--train-input", nargs="+", required=True, help="the data the tokenizer was trained on")
    p.add_argument("--max-chars", type=int, default=20_000_000, help="characters of --train-input for the HF BPE")
    p.add_argument("--eval-input", nargs="*", default=[], help="extra files scored as kind 'user'")
    p.add_argument("--text-field", default="text", help="jsonl/parquet field holding the text")
    args = p.parse_args(argv)

    tok = load_tokenizer(args.tokenizer)
    n_ranks = tok.vocab_size - len(tok.special_tokens)
    print(f"training a Hugging Face BPE ({n_ranks - 256} merges, same split pattern) on {args.train_input}")
    hf = train_hf_bpe(iter_documents(args.train_input, args.text_field, args.max_chars), n_ranks, tok.pattern)
    kinds = eval_texts()
    if args.eval_input:
        kinds["user"] = list(iter_documents(args.eval_input, args.text_field))
    print(f"{'kind':<10} {'ghostvis':>9} {'hf-bpe':>9}   (bytes per token, higher is better)")
    for kind, texts in kinds.items():
        ours = bytes_per_token(tok.encode_batch, texts)
        theirs = bytes_per_token(hf_encode_batch(hf), texts)
        print(f"{kind:<10} {ours:>9.3f} {theirs:>9.3f}")


cli = console_script(main)

if __name__ == "__main__":
    cli()
