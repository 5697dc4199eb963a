"""`load_tokenizer`: a saved tokenizer directory of either kind, above both classes (`Tokenizer`, ours, and
the Hugging Face import's `HFTokenizer`), so neither class needs to know the other."""

from __future__ import annotations

from pathlib import Path

from ghostvis.interop.hf_tokenizer import HF_MARKER_FILE, HFTokenizer
from ghostvis.tokenizer import Tokenizer


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer saved in `directory`: an imported Hugging Face one where its marker file is there
    (ghostvis/interop/hf_tokenizer.py), else ours (rustbpe ranks)."""
    d = Path(directory)
    if (d / HF_MARKER_FILE).is_file():
        return HFTokenizer.load(d)
    return Tokenizer.load(d)
