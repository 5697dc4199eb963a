"""rustbpe against a slow, obviously-correct Python BPE, and against tiktoken's encoder."""

from __future__ import annotations

import sysconfig
from collections import Counter
from pathlib import Path

import pytest
import regex
import rustbpe
import tiktoken

REFERENCE_MERGES = 500


def real_text(max_chars: int) -> list[str]:
    """Real text present wherever Python is: stdlib sources (code + docstrings), plus Debian's licenses."""
    files = sorted(Path("/usr/share/common-licenses").glob("*")) if Path("/usr/share/common-licenses").is_dir() else []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files += [stdlib / n for n in ("textwrap.py", "argparse.py", "json/decoder.py", "calendar.py", "fractions.py")]
    out, total = [], 0
    for f in files:
        if f.is_file() and total < max_chars:
            text = f.read_text(encoding="utf-8", errors="replace")[: max_chars - total]
            out.append(text)
            total += len(text)
    return out


def reference_bpe(texts: list[str], pattern: str, num_merges: int) -> dict[bytes, int]:
    """Textbook BPE: recount every pair after every merge; most frequent wins, ties -> smallest pair.

    Like rustbpe, a pair whose bytes already form a token is never merged (it would duplicate a token).
    """
    chunks = Counter(m for t in texts for m in regex.findall(pattern, t))
    words = [(list(c.encode("utf-8")), n) for c, n in chunks.items()]
    vocab = [bytes([i]) for i in range(256)]
    known = set(vocab)
    while len(vocab) < 256 + num_merges:
        counts: Counter = Counter()
        for w, n in words:
            for pair in zip(w, w[1:]):
                counts[pair] += n
        candidates = [(n, p) for p, n in counts.items() if vocab[p[0]] + vocab[p[1]] not in known]
        if not candidates:
            break
        _, (a, b) = max(candidates, key=lambda np: (np[0], -np[1][0], -np[1][1]))
        new_id = len(vocab)
        vocab.append(vocab[a] + vocab[b])
        known.add(vocab[-1])
        for w, _ in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i : i + 2] = [new_id]
                i += 1
    return {b: i for i, b in enumerate(vocab)}


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return real_text(300_000)


@pytest.fixture(scope="module")
def trained(corpus: list[str]) -> rustbpe.Tokenizer:
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(corpus), 256 + 1000)
    return tok


def test_merges_match_reference(corpus: list[str]) -> None:
    assert sum(map(len, corpus)) > 200_000
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(corpus), 256 + REFERENCE_MERGES, buffer_size=3)  # tiny buffers: streaming path
    got = {bytes(b): i for b, i in tok.get_mergeable_ranks()}
    assert got == reference_bpe(corpus, tok.get_pattern(), REFERENCE_MERGES)


def test_training_is_independent_of_buffer_size(corpus: list[str], trained: rustbpe.Tokenizer) -> None:
    other = rustbpe.Tokenizer()
    other.train_from_iterator(iter(corpus), 256 + 1000, buffer_size=1_000_000)
    assert other.get_mergeable_ranks() == trained.get_mergeable_ranks()


def test_ties_go_to_smallest_pair() -> None:
    # "ab" and "cd" occur equally often: (97, 98) < (99, 100), so "ab" is merge 0.
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(["cd ab cd ab"], 256 + 1, pattern=r"\S+|\s+")
    assert tok.get_mergeable_ranks()[256] == (b"ab", 256)


VARIED = [
    "",
    "Hello, world! It's a test; they'll see we've done it.",
    "Unicode: naïve café résumé Ünïcödé — “quotes” ½ ∑ ∞ Ω",
    "emoji 😀🎉👩‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and skin tones 👍🏽",
    "CJK 天空是蓝色的，草是绿色的。日本語のテキスト 한국어 텍스트",
    "Arabic مرحبا بالعالم Hebrew שלום עולם Devanagari नमस्ते दुनिया",
    "def f(x):\n\treturn {'a': [x**2 for x in range(10)]}  # comment\n",
    "spaces     runs   \n\n\n\t\t  \r\n trailing   ",
    "digits 1234567890123456789 3.14159 1,000,000 -42 ① ² ٣",
    "control \x00\x01\x07\x1b[31m\x7f chars \u200b\u200d\ufeff",
    "<|bos|> <|image|> <|endoftext|> special spellings",
]


@pytest.mark.parametrize("text", VARIED)
def test_encode_matches_tiktoken_and_roundtrips(trained: rustbpe.Tokenizer, text: str) -> None:
    enc = tiktoken.Encoding("t", pat_str=trained.get_pattern(), mergeable_ranks=dict(trained.get_mergeable_ranks()), special_tokens={})
    ids = trained.encode(text)
    assert ids == enc.encode_ordinary(text)
    assert trained.decode(ids) == text


def test_batch_encode_matches_encode(trained: rustbpe.Tokenizer, corpus: list[str]) -> None:
    texts = corpus[:4] + VARIED
    assert trained.batch_encode(texts) == [trained.encode(t) for t in texts]


def test_digits_split_in_groups_of_three(trained: rustbpe.Tokenizer) -> None:
    ids = trained.encode("12345678901234567890")
    assert max(len(trained.decode([i])) for i in ids) <= 3
    assert len(ids) >= 7


def test_bad_input_errors() -> None:
    tok = rustbpe.Tokenizer()
    with pytest.raises(ValueError, match="below 256"):
        tok.train_from_iterator(["abc"], 100)
    with pytest.raises(ValueError, match="no text"):
        tok.train_from_iterator(iter([]), 300)
    with pytest.raises(TypeError, match="str items"):
        tok.train_from_iterator([b"bytes"], 300)
    with pytest.raises(ValueError, match="invalid split pattern"):
        tok.train_from_iterator(["abc"], 300, pattern="(")
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([10**6])
