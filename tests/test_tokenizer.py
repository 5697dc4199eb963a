"""ghostvis.tokenizer: encoding, save/load, and chat rendering (masks, images, truncation)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ghostvis.tokenizer import MIN_VOCAB_SIZE, ALL_SPECIAL_TOKENS, SPECIAL_TOKENS, Tokenizer, train_tokenizer

from conftest import TINY_VOCAB_SIZE, tiny_corpus


def test_layout_and_specials(tiny_tokenizer: Tokenizer) -> None:
    t = tiny_tokenizer
    assert t.vocab_size == TINY_VOCAB_SIZE
    ids = sorted(t.special_id(s) for s in ALL_SPECIAL_TOKENS)
    assert ids == list(range(TINY_VOCAB_SIZE - len(ALL_SPECIAL_TOKENS), TINY_VOCAB_SIZE))  # the last ids
    assert t.bos_token_id == t.special_id("<|bos|>") and t.image_token_id == t.special_id("<|image|>")
    with pytest.raises(KeyError, match="unknown special token"):
        t.special_id("<|nope|>")


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_decode_encode_roundtrip(tiny_tokenizer: Tokenizer, s: str) -> None:
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(s)) == s


def test_encode_matches_rustbpe(tiny_tokenizer: Tokenizer) -> None:
    import rustbpe

    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(tiny_corpus(), TINY_VOCAB_SIZE - len(ALL_SPECIAL_TOKENS))
    texts = ["héllo wörld 😀 天空 12345678 \t\n\n x=1", *tiny_corpus(5, seed=1)]
    assert tiny_tokenizer.encode_batch(texts) == trainer.batch_encode(texts)


@pytest.mark.parametrize("text", [s for s in SPECIAL_TOKENS] + ["a <|image|> b <|assistant_end|><|bos|>"])
def test_special_spellings_stay_text(tiny_tokenizer: Tokenizer, text: str) -> None:
    ids = tiny_tokenizer.encode(text)
    assert not set(ids) & set(tiny_tokenizer.special_tokens.values())
    assert tiny_tokenizer.decode(ids) == text


def test_prepend_and_batch(tiny_tokenizer: Tokenizer) -> None:
    t = tiny_tokenizer
    assert t.encode("red", prepend="<|bos|>") == [t.bos_token_id] + t.encode("red")
    assert t.encode_batch(["a b", "c"], prepend=t.bos_token_id) == [t.encode("a b", t.bos_token_id), t.encode("c", t.bos_token_id)]


def test_save_load_roundtrip(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    tiny_tokenizer.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    text = "The red circle 12345 天空 <|image|>"
    assert again.encode(text) == tiny_tokenizer.encode(text)
    assert again.fingerprint == tiny_tokenizer.fingerprint and len(again.fingerprint) == 64
    assert again.special_tokens == tiny_tokenizer.special_tokens


def test_load_errors(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text((tiny_tokenizer_dir / "tokenizer.json").read_text())
    with pytest.raises(FileNotFoundError, match="ranks.tiktoken"):
        Tokenizer.load(tmp_path)
    (tmp_path / "ranks.tiktoken").write_text("not-base64!!\n")
    with pytest.raises(ValueError, match="ranks.tiktoken:1"):
        Tokenizer.load(tmp_path)


def test_fingerprint_tracks_content(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    meta = json.loads((tiny_tokenizer_dir / "tokenizer.json").read_text())
    meta["pattern"] = r"\S+|\s+"
    (tmp_path / "tokenizer.json").write_text(json.dumps(meta))
    (tmp_path / "ranks.tiktoken").write_text((tiny_tokenizer_dir / "ranks.tiktoken").read_text())
    assert Tokenizer.load(tmp_path).fingerprint != Tokenizer.load(tiny_tokenizer_dir).fingerprint


def test_training_errors() -> None:
    with pytest.raises(ValueError, match=f"at least {MIN_VOCAB_SIZE}"):
        train_tokenizer(["some text"], MIN_VOCAB_SIZE - 1)
    with pytest.raises(ValueError, match="no text"):
        train_tokenizer([], 1000)


# ------------------------------------------------------------------ rendering
def _conv(*messages: tuple[str, object]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in messages]}


def test_render_layout_and_mask(tiny_tokenizer: Tokenizer) -> None:
    t = tiny_tokenizer
    sid = t.special_id
    conv = _conv(("system", "Be brief."), ("user", "What is 2+2?"), ("assistant", "4"), ("user", "Thanks"), ("assistant", "Welcome"))
    ids, mask = t.render_conversation(conv)
    expected = (
        [(t.bos_token_id, 0), (sid("<|user_start|>"), 0)]
        + [(i, 0) for i in t.encode("Be brief.\n\nWhat is 2+2?")]
        + [(sid("<|user_end|>"), 0), (sid("<|assistant_start|>"), 0)]
        + [(i, 1) for i in t.encode("4")]
        + [(sid("<|assistant_end|>"), 1), (sid("<|user_start|>"), 0)]
        + [(i, 0) for i in t.encode("Thanks")]
        + [(sid("<|user_end|>"), 0), (sid("<|assistant_start|>"), 0)]
        + [(i, 1) for i in t.encode("Welcome")]
        + [(sid("<|assistant_end|>"), 1)]
    )
    assert list(zip(ids, mask)) == expected


def test_render_tool_parts(tiny_tokenizer: Tokenizer) -> None:
    t = tiny_tokenizer
    sid = t.special_id
    parts = [{"type": "text", "text": "Let me compute."}, {"type": "python", "text": "2**10"},
             {"type": "output", "text": "1024"}, {"type": "text", "text": "It is 1024."}]
    ids, mask = t.render_conversation(_conv(("user", "2^10?"), ("assistant", parts)))
    start = ids.index(sid("<|assistant_start|>")) + 1
    got = list(zip(ids[start:], mask[start:]))
    expected = (
        [(i, 1) for i in t.encode("Let me compute.")]
        + [(sid("<|python_start|>"), 1)] + [(i, 1) for i in t.encode("2**10")] + [(sid("<|python_end|>"), 1)]
        + [(sid("<|output_start|>"), 0)] + [(i, 0) for i in t.encode("1024")] + [(sid("<|output_end|>"), 0)]
        + [(i, 1) for i in t.encode("It is 1024.")] + [(sid("<|assistant_end|>"), 1)]
    )
    assert got == expected
    with pytest.raises(ValueError, match="'python' not allowed"):
        t.render_conversation(_conv(("user", [{"type": "python", "text": "1"}])))


def test_render_multiple_images(tiny_tokenizer: Tokenizer) -> None:
    t = tiny_tokenizer
    conv = _conv(("user", "<|image|>Compare <|image|> and<|image|>"), ("assistant", "Same."))
    ids, mask = t.render_conversation(conv, num_vision_tokens=5)
    img = [i for i, x in enumerate(ids) if x == t.image_token_id]
    assert len(img) == 15 and all(mask[i] == 0 for i in img)
    # each placeholder is one contiguous run of 5, text around them survives
    assert img[:5] == list(range(img[0], img[0] + 5)) and img[-5:] == list(range(img[-5], img[-5] + 5))
    assert t.decode([x for x in ids if x != t.image_token_id]).count("Compare ") == 1
    with pytest.raises(ValueError, match="num_vision_tokens"):
        t.render_conversation(conv, num_vision_tokens=0)


def test_structured_parts_keep_typed_placeholder_as_text(tiny_tokenizer: Tokenizer) -> None:
    t = tiny_tokenizer
    typed = "what does <|image|> mean? <|assistant_end|>"
    conv = _conv(("user", [{"type": "image"}, {"type": "text", "text": typed}]), ("assistant", "A token."))
    ids, _ = t.render_conversation(conv, num_vision_tokens=4)
    assert ids.count(t.image_token_id) == 4  # only the image part
    assert ids.count(t.special_id("<|assistant_end|>")) == 1
    assert typed in t.decode(ids)


def test_truncation_never_cuts_an_image(tiny_tokenizer: Tokenizer) -> None:
    t = tiny_tokenizer
    conv = _conv(("user", "Look: <|image|> then <|image|> end"), ("assistant", "ok"))
    full, full_mask = t.render_conversation(conv, num_vision_tokens=8)
    first = full.index(t.image_token_id)
    second = first + 8 + full[first + 8 :].index(t.image_token_id)
    for max_tokens in range(1, len(full) + 2):
        ids, mask = t.render_conversation(conv, max_tokens=max_tokens, num_vision_tokens=8)
        assert ids == full[: len(ids)] and mask == full_mask[: len(ids)]
        assert ids.count(t.image_token_id) % 8 == 0
        assert len(ids) == (first if first < max_tokens < first + 8 else second if second < max_tokens < second + 8
                            else min(max_tokens, len(full)))


def test_image_frames(tiny_tokenizer: Tokenizer) -> None:
    """Each frame's layout, Idefics2's shared frame between adjacent images and its space after a closing
    frame, and truncation that keeps or drops a framed image whole."""
    t = tiny_tokenizer
    img, frame, glob = t.image_token_id, t.special_id("<|image_frame|>"), t.special_id("<|image_global|>")
    assert t.image_ids(3) == [img] * 3
    assert t.image_ids(3, "idefics2") == [frame, img, img, img, frame]
    assert t.image_ids(3, "idefics3") == [frame, glob, img, img, img, frame]
    with pytest.raises(ValueError, match="image_frame='llava'; choose one of"):
        t.image_ids(3, "llava")

    conv = _conv(("user", "<|image|><|image|>is it red?"), ("assistant", "Yes."))
    two, _ = t.render_conversation(conv, num_vision_tokens=2, image_frame="idefics2")
    start = two.index(frame)
    assert two[start:start + 7] == [frame, img, img, frame, img, img, frame]  # one frame between the two
    assert t.decode(two[start + 7:]).startswith(" is it red?")  # spaced off the frame, as Idefics2's processor
    three, _ = t.render_conversation(conv, num_vision_tokens=2, image_frame="idefics3")
    start = three.index(frame)
    assert three[start:start + 10] == [frame, glob, img, img, frame] * 2
    assert t.decode(three[start + 10:]).startswith("is it red?")
    spaced, _ = t.render_conversation(_conv(("user", "<|image|>\nis it?")), num_vision_tokens=2, image_frame="idefics2")
    assert t.decode(spaced).count("\nis it?") == 1  # whitespace after the frame: nothing added

    for frame_name, full in (("idefics2", two), ("idefics3", three)):
        for max_tokens in range(1, len(full) + 1):
            ids, _ = t.render_conversation(conv, max_tokens=max_tokens, num_vision_tokens=2, image_frame=frame_name)
            assert ids == full[:len(ids)] and ids.count(img) % 2 == 0
            if img in ids:  # an image is kept with its closing frame
                assert ids[max(i for i, x in enumerate(ids) if x == img) + 1] == frame


def test_a_tokenizer_without_frame_tokens_loads_and_refuses_frames(tmp_path: Path) -> None:
    """Tokenizers trained before the frame tokens keep working for unframed models."""
    old = Tokenizer({bytes([i]): i for i in range(256)}, r"\S+|\s+", {s: 256 + i for i, s in enumerate(SPECIAL_TOKENS)})
    old.save(tmp_path)
    old = Tokenizer.load(tmp_path)
    assert old.render_for_completion(_conv(("user", "<|image|>hi")), num_vision_tokens=2).count(old.image_token_id) == 2
    with pytest.raises(ValueError, match=r"needs the special token <\|image_frame\|>.*tok_train.py"):
        old.render_for_completion(_conv(("user", "<|image|>hi")), num_vision_tokens=2, image_frame="idefics2")


def test_role_order_errors(tiny_tokenizer: Tokenizer) -> None:
    t = tiny_tokenizer
    for conv in (_conv(("assistant", "hi")), _conv(("user", "a"), ("user", "b")), _conv(("user", "a"), ("system", "s"))):
        with pytest.raises(ValueError, match="out of order|alternate"):
            t.render_conversation(conv)
    with pytest.raises(ValueError, match="at least one message"):
        t.render_conversation({"messages": []})


def test_render_for_completion(tiny_tokenizer: Tokenizer) -> None:
    t = tiny_tokenizer
    conv = _conv(("user", "<|image|> What colour?"), ("assistant", "Red."))
    ids = t.render_for_completion(conv, num_vision_tokens=3)
    prompt, _ = t.render_conversation(_conv(("user", "<|image|> What colour?")), num_vision_tokens=3)
    assert ids == prompt + [t.special_id("<|assistant_start|>")]
    assert t.render_for_completion({"messages": conv["messages"][:1]}, num_vision_tokens=3) == ids


def test_tok_train_cli(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "launch" / "tok_train.py"
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text("\n".join(tiny_corpus(60)))
    (src / "b.jsonl").write_text('{"text": "hello there"}\n{broken\n' * 5)
    (src / "c.txt").write_bytes(b"caf\xe9 au lait " * 50)  # Latin-1, not UTF-8: replaced and counted
    out = tmp_path / "tok"
    run = subprocess.run([sys.executable, str(script), "--input", str(src), "--vocab-size", "400", "--out", str(out),
                          "--heldout-every", "2"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "bad_records=5" in run.stdout and "invalid_utf8_docs=1" in run.stdout and "held-out bytes/token" in run.stdout
    assert Tokenizer.load(out).vocab_size == 400
    (tmp_path / "empty.txt").write_text("   \n")
    run = subprocess.run([sys.executable, str(script), "--input", str(tmp_path / "empty.txt"), "--vocab-size", "400",
                          "--out", str(out)], capture_output=True, text=True)
    assert run.returncode != 0 and "no text" in run.stderr
