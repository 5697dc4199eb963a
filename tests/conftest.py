"""Shared fixtures: a tiny real tokenizer (trained by rustbpe) that every stage's tests can use."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ghostvis.tokenizer import Tokenizer, train_tokenizer

TINY_VOCAB_SIZE = 512

_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A red circle is to the left of a blue square.",
    "How many triangles are in the picture? There are 3 triangles.",
    "What colour is the shape at the top? It is green.",
    "Vision-language models read images and text together.",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "Question: what is 12 + 30? Answer: 42",
    "The model learns to look before it speaks.",
    "Es gibt zwei gelbe Kreise und ein rotes Dreieck.",
    "Il y a un carré bleu en bas à droite.",
    "天空是蓝色的，草是绿色的。",
]


def tiny_corpus(n_docs: int = 400, seed: int = 0) -> list[str]:
    """A fixed small corpus (same on every machine): shuffled sentences plus numbers."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        k = rng.randint(2, 6)
        body = " ".join(rng.choice(_SENTENCES) for _ in range(k))
        docs.append(f"{body} {rng.randint(0, 10**6)}\n")
    return docs


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding a saved tiny tokenizer (vocab 512, all GhostVis special tokens)."""
    d = tmp_path_factory.mktemp("tiny_tokenizer")
    train_tokenizer(tiny_corpus(), TINY_VOCAB_SIZE).save(d)
    return d


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir: Path) -> Tokenizer:
    """The tiny tokenizer, loaded from ``tiny_tokenizer_dir`` (so save/load is exercised too)."""
    return Tokenizer.load(tiny_tokenizer_dir)
