"""A Hugging Face ``tokenizer.json`` behind the GhostVis ``Tokenizer`` interface (docs/interop.md).

An imported Qwen2/Llama model keeps its own vocabulary; this wrapper gives it what the rest of GhostVis
expects: ``encode``/``decode``, the chat renderer (inherited from ``Tokenizer``, so conversations render
exactly like ours), ``bos_token_id``/``image_token_id``/``special_id``, ``fingerprint`` and plain-file
``save``/``load``. GhostVis special tokens the vocabulary lacks are appended as new special tokens;
some may instead be *aliased* to a token the vocabulary already has (``<|bos|>`` to the model's BOS, or
``<|endoftext|>`` for Qwen, which has none).

Files (``save``): the HF ``tokenizer.json`` with the added tokens, and ``ghostvis_hf.json`` (GhostVis
special name -> id, the size of the original vocabulary). ``ghostvis.tokenizer_dir.load_tokenizer``
recognizes the latter and hands the directory to ``HFTokenizer.load``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from tokenizers import AddedToken
from tokenizers import Tokenizer as RawTokenizer

from ghostvis.interop.common import InteropError
from ghostvis.tokenizer import (ALL_SPECIAL_TOKENS, IMAGE_FRAME_TOKEN, IMAGE_GLOBAL_TOKEN, IMAGE_PLACEHOLDER,
                                SPECIAL_TOKENS, Tokenizer)

HF_MARKER_FILE = "ghostvis_hf.json"  # marks an imported tokenizer's directory (load_tokenizer looks for it)
HF_TOKENIZER_FILE = "tokenizer.json"
FORMAT = "ghostvis-hf-tokenizer/1"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


# our image token and its frame as the Idefics families (and their processors) spell them
IDEFICS_SPELLINGS = {IMAGE_PLACEHOLDER: "<image>", IMAGE_FRAME_TOKEN: "<fake_token_around_image>",
                     IMAGE_GLOBAL_TOKEN: "<global-img>"}


def default_aliases(hf_dir: str | Path, raw: RawTokenizer) -> dict[str, str]:
    """GhostVis special -> existing HF token: ``<|bos|>`` is the model's BOS (tokenizer_config.json), or
    ``<|endoftext|>`` when there is none (Qwen separates documents with it, our BOS does the same job); the image
    token and its frame are the vocabulary's own Idefics-spelled special tokens where it has them (a SmolVLM or
    Idefics text model's, trained for that job)."""
    cfg_path = Path(hf_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    bos = cfg.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    if not bos and raw.token_to_id("<|endoftext|>") is not None:
        bos = "<|endoftext|>"
    specials = {t.content for t in raw.get_added_tokens_decoder().values() if t.special}
    image = {ours: theirs for ours, theirs in IDEFICS_SPELLINGS.items() if theirs in specials}
    return {**({"<|bos|>": bos} if bos else {}), **image}


class HFTokenizer(Tokenizer):
    """``Tokenizer`` over a ``tokenizers.Tokenizer``. Build with ``from_hf_dir`` (import) or ``load``."""

    def __init__(self, raw: RawTokenizer, special_tokens: dict[str, int], base_vocab_size: int):
        missing = [s for s in SPECIAL_TOKENS if s not in special_tokens]
        if missing:
            raise ValueError(f"HFTokenizer: special_tokens lacks {missing}")
        self._raw = raw
        # text is always ordinary text: a typed "<|im_end|>" must not become the special id
        self._raw.encode_special_tokens = True
        self.special_tokens = dict(special_tokens)
        self.base_vocab_size = base_vocab_size
        n = raw.get_vocab_size(with_added_tokens=True)
        bad = {k: v for k, v in special_tokens.items() if not 0 <= v < n}
        if bad:
            raise ValueError(f"HFTokenizer: special ids {bad} are outside the vocabulary of {n}")
        self.fingerprint = self._fingerprint()

    # ---------------------------------------------------------------- building / files
    @classmethod
    def from_hf_dir(cls, hf_dir: str | Path, aliases: dict[str, str] | None = None) -> HFTokenizer:
        """Wrap ``hf_dir/tokenizer.json``. ``aliases`` (GhostVis special -> existing HF token spelling)
        override ``default_aliases``; every other GhostVis special missing from the vocabulary is appended."""
        path = Path(hf_dir) / HF_TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: the import reads the fast-tokenizer file tokenizer.json (save one with "
                "transformers: AutoTokenizer.from_pretrained(dir).save_pretrained(dir))")
        raw = RawTokenizer.from_file(str(path))
        base = raw.get_vocab_size(with_added_tokens=True)
        vocab_ids = sorted(raw.get_vocab(with_added_tokens=True).values())
        if vocab_ids != list(range(base)):
            raise ValueError(f"{path}: token ids are not contiguous 0..{base - 1}; such a vocabulary is not supported")
        chosen = {**default_aliases(hf_dir, raw), **(aliases or {})}
        unknown = sorted(set(chosen) - set(ALL_SPECIAL_TOKENS))
        if unknown:
            raise InteropError(f"--alias for {unknown}: not GhostVis special tokens; known: {list(ALL_SPECIAL_TOKENS)}")
        specials: dict[str, int] = {}
        for name, target in chosen.items():
            tid = raw.token_to_id(target)
            if tid is None:
                raise InteropError(f"alias {name}={target} (--alias, or a default from tokenizer_config.json): "
                                   f"{target!r} is not a token of {path}")
            specials[name] = tid
        for name in ALL_SPECIAL_TOKENS:
            if name in specials:
                continue
            existing = raw.token_to_id(name)  # a vocabulary that already has our spelling keeps its id
            if existing is None:
                raw.add_special_tokens([AddedToken(name, special=True, normalized=False)])
                existing = raw.token_to_id(name)
            specials[name] = existing
        if raw.get_vocab_size(with_added_tokens=True) != base + len(set(specials.values()) - set(range(base))):
            raise ValueError(f"{path}: added special tokens did not get the ids right after the vocabulary")
        return cls(raw, specials, base)

    def _hf_text(self) -> str:
        return self._raw.to_str()

    def _marker_text(self) -> str:
        meta = {"format": FORMAT, "special_tokens": self.special_tokens, "base_vocab_size": self.base_vocab_size,
                "vocab_size": self.vocab_size}
        return json.dumps(meta, indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    def _files(self) -> dict[str, str]:
        """What ``save`` writes: the HF ``tokenizer.json`` (added tokens included) and ``ghostvis_hf.json``."""
        return {HF_TOKENIZER_FILE: self._hf_text(), HF_MARKER_FILE: self._marker_text()}

    @classmethod
    def load(cls, directory: str | Path) -> HFTokenizer:
        d = Path(directory)
        for name in (HF_TOKENIZER_FILE, HF_MARKER_FILE):
            if not (d / name).is_file():
                raise FileNotFoundError(f"tokenizer directory {d} has no {name}; point to a directory written by "
                                        "launch/import_hf.py")
        meta = json.loads((d / HF_MARKER_FILE).read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{d / HF_MARKER_FILE}: format is {meta.get('format')!r}, expected {FORMAT!r}")
        # round-trip through the same text save() wrote, so the fingerprint is stable
        raw = RawTokenizer.from_str((d / HF_TOKENIZER_FILE).read_text(encoding="utf-8"))
        tok = cls(raw, meta["special_tokens"], meta["base_vocab_size"])
        if meta.get("vocab_size") != tok.vocab_size:
            raise ValueError(f"{d / HF_MARKER_FILE}: vocab_size {meta.get('vocab_size')} != {tok.vocab_size} in "
                             f"{HF_TOKENIZER_FILE}")
        return tok

    # ---------------------------------------------------------------- ids
    @property
    def vocab_size(self) -> int:
        return self._raw.get_vocab_size(with_added_tokens=True)

    @property
    def raw(self) -> RawTokenizer:
        """The underlying ``tokenizers.Tokenizer`` (for export to transformers)."""
        return self._raw

    @property
    def added_ids(self) -> dict[str, int]:
        """GhostVis specials appended by the import (id >= base_vocab_size): their model rows are new."""
        return {k: v for k, v in self.special_tokens.items() if v >= self.base_vocab_size}

    @property
    def mergeable_ranks(self) -> dict[bytes, int]:
        """Byte string of every ordinary token (what bits-per-byte counts); specials are left out."""
        special_ids = {i for i, t in self._raw.get_added_tokens_decoder().items() if t.special}
        byte_level = "ByteLevel" in json.dumps(json.loads(self._hf_text()).get("decoder"))
        table = {c: b for b, c in _bytes_to_unicode().items()}
        out: dict[bytes, int] = {}
        for piece, i in self._raw.get_vocab(with_added_tokens=True).items():
            if i in special_ids:
                continue
            if byte_level and all(c in table for c in piece):
                out[bytes(table[c] for c in piece)] = i
            else:
                out[self._raw.decode([i], skip_special_tokens=False).encode()] = i
        return out

    def encode(self, text: str, prepend: int | str | None = None) -> list[int]:
        """Ids of ``text`` as ordinary text (special spellings stay text); ``prepend``: an id or special name."""
        return self._prefix(prepend) + self._raw.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], prepend: int | str | None = None,
                     num_threads: int = 8) -> list[list[int]]:
        prefix = self._prefix(prepend)
        return [prefix + e.ids for e in self._raw.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._raw.decode(list(ids), skip_special_tokens=False)

    def spelling_ids(self, name: str) -> list[int]:
        """Ids of a token's spelling as ordinary text among the original vocabulary (for initializing
        its new embedding row from the pieces it is made of)."""
        return [i for i in self.encode(name) if i < self.base_vocab_size]


def hf_tokenizer_files(tok: Tokenizer, out_dir: str | Path, spellings: dict[str, str] | None = None) -> None:
    """Write ``tok`` as transformers tokenizer files (tokenizer.json + tokenizer_config.json) that
    ``AutoTokenizer.from_pretrained`` opens. A native GhostVis tokenizer is converted from its tiktoken
    ranks (byte-level BPE, same pattern and specials). The chat template renders like ours. ``spellings``
    respells special tokens (ours -> the target family's, e.g. ``<|image|>`` -> ``<image>``); ids stay."""
    from transformers import PreTrainedTokenizerFast

    if isinstance(tok, HFTokenizer):
        raw = RawTokenizer.from_str(tok.raw.to_str())
    else:
        raw = _raw_from_ranks(tok)
    if spellings:
        raw = _respelled(raw, tok, spellings)
    raw.encode_special_tokens = False  # transformers decides how specials in text are handled
    fast = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token=_spelling(tok, tok.bos_token_id), pad_token=_spelling(tok, tok.pad_token_id),
        eos_token=_spelling(tok, tok.special_id("<|assistant_end|>")))
    fast.chat_template = chat_template(tok, raw.id_to_token(tok.image_token_id))
    fast.save_pretrained(str(out_dir))


def _respelled(raw: RawTokenizer, tok: Tokenizer, spellings: dict[str, str]) -> RawTokenizer:
    """``raw`` with the added tokens of ``tok``'s specials named in ``spellings`` respelled (ours -> theirs; the
    ids stay). InteropError where the vocabulary already has a spelling at another id (two tokens would read as
    one), or where our special is an ordinary token of an imported vocabulary (it cannot be renamed)."""
    data = json.loads(raw.to_str())
    added = {t["id"]: t for t in data["added_tokens"]}
    for ours, theirs in spellings.items():
        if ours not in tok.special_tokens:  # a tokenizer made before that special: nothing to name
            continue
        tid = tok.special_tokens[ours]
        existing = raw.token_to_id(theirs)
        if existing not in (None, tid):
            raise InteropError(f"the tokenizer already has {theirs!r} (id {existing}), which our {ours} (id {tid}) "
                               f"must be spelled as: import the model again with --alias '{ours}={theirs}' so they "
                               "are one token")
        if existing == tid:  # already spelled so (an alias onto the vocabulary's own token)
            continue
        if tid not in added:
            raise InteropError(f"our {ours} is the imported vocabulary's ordinary token {tok.decode([tid])!r} "
                               f"(id {tid}), which cannot be renamed {theirs!r}: import the model again without "
                               "that --alias")
        added[tid]["content"] = theirs
    return RawTokenizer.from_str(json.dumps(data))


def _spelling(tok: Tokenizer, token_id: int) -> str:
    return tok.decode([token_id])


def _raw_from_ranks(tok: Tokenizer) -> RawTokenizer:
    import tempfile

    from transformers.convert_slow_tokenizer import TikTokenConverter

    with tempfile.TemporaryDirectory() as tmp:
        tok.save(tmp)  # ranks.tiktoken is tiktoken's own "<base64> <rank>" format
        specials = sorted(tok.special_tokens, key=tok.special_tokens.__getitem__)
        raw = TikTokenConverter(vocab_file=str(Path(tmp) / "ranks.tiktoken"), pattern=tok.pattern,
                                extra_special_tokens=specials).converted()
    got = {s: raw.token_to_id(s) for s in tok.special_tokens}
    if got != tok.special_tokens:
        raise ValueError(f"tokenizer conversion put the special tokens at {got}, expected {tok.special_tokens}")
    return raw


def chat_template(tok: Tokenizer, image: str) -> str:
    """A transformers chat template that renders like ``Tokenizer.render_conversation`` (a system message folded
    into the first user turn), with the spellings of ``tok``'s special ids. A content is a string, or a list of
    parts as processors take them: ``{"type": "text", "text": ...}`` as its text, ``{"type": "image"}`` as
    ``image`` (the image token's spelling in the written tokenizer, which the processor expands), and in assistant
    turns the tool parts ``{"type": "python"|"output", "text": ...}`` between their start and end tokens; other
    parts are an error."""
    sp = {name.strip("<|>"): _spelling(tok, i) for name, i in tok.special_tokens.items()}
    return (
        "{% macro text(content) %}{% if content is string %}{{ content }}{% else %}{% for p in content %}"
        f"{{% if p['type'] == 'image' %}}{image}{{% elif p['type'] == 'text' %}}{{{{ p['text'] }}}}"
        f"{{% elif p['type'] == 'python' %}}{sp['python_start']}{{{{ p['text'] }}}}{sp['python_end']}"
        f"{{% elif p['type'] == 'output' %}}{sp['output_start']}{{{{ p['text'] }}}}{sp['output_end']}"
        "{% else %}{{ raise_exception('a content part is text, image, python or output, not ' + p['type']) }}"
        "{% endif %}{% endfor %}{% endif %}{% endmacro %}"
        f"{{{{ '{sp['bos']}' }}}}{{% set ns = namespace(sys='') %}}"
        "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.sys = text(m['content']) + '\\n\\n' %}"
        f"{{% elif m['role'] == 'user' %}}{{{{ '{sp['user_start']}' + ns.sys + text(m['content']) + "
        f"'{sp['user_end']}' }}}}{{% set ns.sys = '' %}}"
        f"{{% else %}}{{{{ '{sp['assistant_start']}' + text(m['content']) + '{sp['assistant_end']}' }}}}{{% endif %}}"
        f"{{% endfor %}}{{% if add_generation_prompt %}}{{{{ '{sp['assistant_start']}' }}}}{{% endif %}}"
    )
