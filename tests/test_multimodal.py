"""Caption / conversation batches: shapes, masks and target alignment, skips, grouping, mixture, resume."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import write_shards

from data_prep import synth
from ghostvis.data.manifest import DataError
from ghostvis.data.multimodal import CaptionBatches, ConversationBatches, MixtureBatches, shift_targets
from ghostvis.data.shards import ShardStream

NV = 3  # vision tokens per image
SIDE = 16


def to_tensor(img: Image.Image) -> torch.Tensor:
    """A plain PIL -> [3, SIDE, SIDE] float transform (the real one comes from the encoder config)."""
    arr = np.asarray(img.resize((SIDE, SIDE)), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 12), colour).save(buf, format="PNG")
    return buf.getvalue()


def conv(user: str, answer: str) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": user},
                                    {"role": "assistant", "content": answer}]}).encode()


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synth.generate(out, seed=1, num_captions=40, num_vqa=40, num_val=8, num_test=8, num_arith=8,
                   num_arith_test=8, num_text_docs=4, shard_size=10)
    return out


def stream(d: Path, **kw) -> ShardStream:
    return ShardStream(d, seed=kw.pop("seed", 0), **kw)


def test_caption_batches_layout(synth_dir: Path, tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    batches = CaptionBatches(stream(synth_dir / "captions/train", loop=False), tok, batch_size=4, max_len=64,
                             num_vision_tokens=NV, transform=to_tensor)
    seen = 0
    for batch in batches:
        ids, targets, pix = batch["input_ids"], batch["targets"], batch["pixel_values"]
        B, T = ids.shape
        assert targets.shape == (B, T) and pix.shape == (B, 3, SIDE, SIDE) and T <= 64
        assert int((ids == tok.image_token_id).sum()) == B * NV
        for b in range(B):
            row = ids[b].tolist()
            n = T - row.count(tok.pad_token_id)
            assert row[0] == tok.bos_token_id and row[1: 1 + NV] == [tok.image_token_id] * NV
            assert (targets[b, :NV] == -1).all()  # nothing predicts the image tokens
            assert targets[b, NV].item() == row[NV + 1]  # the last image position predicts the first word
            assert targets[b, NV: n - 1].tolist() == row[NV + 1: n] and (targets[b, n - 1:] == -1).all()
            assert tok.decode(row[NV + 1: n]).endswith(".")
        assert batch["num_loss_tokens"] == int((targets != -1).sum())
        assert batch["num_tokens"] == int((ids != tok.pad_token_id).sum())
        seen += B
    assert seen == 40


def test_caption_truncation_and_bad_max_len(synth_dir: Path, tiny_tokenizer) -> None:
    b = next(iter(CaptionBatches(stream(synth_dir / "captions/train"), tiny_tokenizer, batch_size=2, max_len=NV + 3,
                                 num_vision_tokens=NV, transform=to_tensor)))
    assert b["input_ids"].shape == (2, NV + 3) and b["num_loss_tokens"] == 2 * 2
    with pytest.raises(ValueError, match="max_len"):
        CaptionBatches(stream(synth_dir / "captions/train"), tiny_tokenizer, batch_size=2, max_len=NV + 1,
                       num_vision_tokens=NV, transform=to_tensor)


@pytest.fixture()
def conv_dir(tmp_path: Path) -> Path:
    red, green, blue = png((255, 0, 0)), png((0, 255, 0)), png((0, 0, 255))
    samples = [
        {"__key__": "none", "json": conv("what is 2 + 2?", "4")},
        {"__key__": "one", "json": conv("<|image|>\nwhat colour?", "red"), "0.png": red},
        {"__key__": "two", "json": conv("<|image|> or <|image|>?", "the second"), "0.png": green, "1.png": blue},
        {"__key__": "broken", "json": conv("<|image|>", "x"), "0.png": red[:30]},
        {"__key__": "mismatch", "json": conv("<|image|><|image|>", "x"), "0.png": red},
        {"__key__": "badjson", "json": b"{not json"},
        {"__key__": "last", "json": conv("<|image|>", "blue"), "0.png": blue},
    ]
    return write_shards(tmp_path / "conv", "conversation", samples)


def test_conversation_batches_images_masks_and_skips(conv_dir: Path, tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    src = stream(conv_dir, loop=False, shuffle=False, max_corrupt_fraction=1.0)
    (batch,) = list(ConversationBatches(src, tok, batch_size=4, max_len=128, num_vision_tokens=NV,
                                        transform=to_tensor))
    ids, targets, pix = batch["input_ids"], batch["targets"], batch["pixel_values"]
    assert ids.shape[0] == 4 and src.stats["corrupt"] == 3  # broken image, mismatch, bad JSON
    assert pix.shape == (4, 3, SIDE, SIDE)  # images of "one", "two", "last" in order
    colours = [tuple(int(round(float(c) * 255)) for c in pix[i, :, 0, 0]) for i in range(4)]
    assert colours == [(255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 255)]
    texts = [("what is 2 + 2?", "4"), ("<|image|>\nwhat colour?", "red"), ("<|image|> or <|image|>?", "the second"),
             ("<|image|>", "blue")]
    for b, (user, answer) in enumerate(texts):
        want_ids, want_mask = tok.render_conversation(json.loads(conv(user, answer)), 128, NV)
        n = len(want_ids)
        assert ids[b, :n].tolist() == want_ids and (ids[b, n:] == tok.pad_token_id).all()
        assert targets[b, :n].tolist() == shift_targets(want_ids, want_mask) and (targets[b, n:] == -1).all()
        assert tok.decode([t for t in targets[b].tolist() if t >= 0]) == answer + "<|assistant_end|>"
    assert int((ids == tok.image_token_id).sum()) == 4 * NV


def test_conversation_text_only_and_truncated_images(conv_dir: Path, tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    src = stream(conv_dir, loop=False, shuffle=False, max_corrupt_fraction=1.0)
    first = next(iter(ConversationBatches(src, tok, batch_size=1, max_len=64, num_vision_tokens=NV,
                                          transform=to_tensor)))
    assert first["pixel_values"].shape == (0, 3, SIDE, SIDE) and first["num_loss_tokens"] > 0
    # max_len that fits the first image of "two" but cuts into the second: only one image is kept.
    two = tok.render_conversation(json.loads(conv("<|image|> or <|image|>?", "x")), 1000, NV)[0]
    cut = two.index(tok.image_token_id) + NV + 2
    batches = list(ConversationBatches(stream(conv_dir, loop=False, shuffle=False, max_corrupt_fraction=1.0), tok, batch_size=4,
                                       max_len=cut, num_vision_tokens=NV, transform=to_tensor))
    ids = batches[0]["input_ids"]
    assert int((ids[2] == tok.image_token_id).sum()) == NV and batches[0]["pixel_values"].shape[0] == 3


def test_cached_features(tmp_path: Path, tiny_tokenizer) -> None:
    feats = [np.full((NV, 5), i, dtype=np.float32) for i in range(2)]

    def npy(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    d = write_shards(tmp_path / "caps", "image-text", [
        {"__key__": f"k{i}", "png": png((0, 0, 0)), "txt": b"a red circle.", "feat.npy": npy(f)}
        for i, f in enumerate(feats)])
    b = next(iter(CaptionBatches(stream(d, shuffle=False), tiny_tokenizer, batch_size=2, max_len=32,
                                 num_vision_tokens=NV, transform=None, use_features=True)))
    assert "pixel_values" not in b and torch.equal(b["image_features"], torch.from_numpy(np.stack(feats)))


def _take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def _same(a: list[dict], b: list[dict]) -> bool:
    return all(torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["targets"], y["targets"])
               and x.keys() == y.keys() and torch.equal(x.get("pixel_values", x["targets"]), y.get("pixel_values", y["targets"]))
               for x, y in zip(a, b, strict=True))


def test_length_grouping_and_exact_resume(synth_dir: Path, tiny_tokenizer) -> None:
    def make() -> ConversationBatches:
        return ConversationBatches(stream(synth_dir / "vqa/train", seed=5), tiny_tokenizer, batch_size=3,
                                   max_len=64, num_vision_tokens=NV, transform=to_tensor, group_batches=3, seed=7)

    full = _take(iter(make()), 12)  # crosses group and epoch boundaries (40 samples, 9 per group)
    for cut in (1, 3, 5):  # mid-group, at a group end, and in the next group
        a = make()
        it = iter(a)
        assert _same(_take(it, cut), full[:cut])
        state = json.loads(json.dumps(a.state_dict()))  # what a checkpoint stores
        b = make()
        b.load_state_dict(state)
        assert _same(_take(iter(b), 12 - cut), full[cut:])
    # grouping: within a group each batch is length-sorted relative to the others
    lengths = [(b["input_ids"] != tiny_tokenizer.pad_token_id).sum(1) for b in full[:3]]
    spans = sorted((int(x.min()), int(x.max())) for x in lengths)
    assert all(spans[i][1] <= spans[i + 1][0] for i in range(2))


def test_resume_inside_a_length_group_needs_its_group_size(synth_dir: Path, tiny_tokenizer) -> None:
    """A position inside a length group names a batch of that group's cut: another --length-group is refused
    with the flag to give; between groups any size resumes. States saved before the size was stored came from
    sft's then fixed 8."""
    def make(group: int) -> ConversationBatches:
        return ConversationBatches(stream(synth_dir / "vqa/train", seed=5), tiny_tokenizer, batch_size=3,
                                   max_len=64, num_vision_tokens=NV, transform=to_tensor, group_batches=group, seed=7)

    a = make(3)
    it = iter(a)
    _take(it, 1)
    inside = json.loads(json.dumps(a.state_dict()))
    _take(it, 2)
    between = json.loads(json.dumps(a.state_dict()))
    assert inside["emitted"] == 1 and between["emitted"] == 0
    with pytest.raises(DataError, match="resume with --length-group 3"):
        make(1).load_state_dict(inside)
    make(3).load_state_dict(inside)
    make(1).load_state_dict(between)
    old = {k: v for k, v in inside.items() if k != "group_batches"}
    with pytest.raises(DataError, match="resume with --length-group 8"):
        make(1).load_state_dict(old)


def _labelled(tmp_path: Path, name: str, n: int) -> Path:
    return write_shards(tmp_path / name, "text", [{"__key__": f"{name}{i}", "txt": name.encode()} for i in range(n)],
                        per_shard=50)


def test_mixture_weights_and_resume(tmp_path: Path) -> None:
    a, b = _labelled(tmp_path, "a", 200), _labelled(tmp_path, "b", 100)

    def make() -> MixtureBatches:
        return MixtureBatches([(stream(a), 3.0), (stream(b), 1.0)], seed=11)

    mix = make()
    it = iter(mix)
    drawn = [s["txt"] for s in _take(it, 2000)]
    assert 0.72 < drawn.count(b"a") / 2000 < 0.78
    state = json.loads(json.dumps(mix.state_dict()))
    after = [s["__key__"] for s in _take(it, 300)]
    again = make()
    again.load_state_dict(state)
    assert [s["__key__"] for s in _take(iter(again), 300)] == after
    assert [s["txt"] for s in _take(iter(make()), 50)] == drawn[:50]  # same seed, same draws
    assert [s["txt"] for s in _take(iter(MixtureBatches([(stream(a), 3.0), (stream(b), 1.0)], seed=12)), 50)] != drawn[:50]


def test_mixture_drops_exhausted_sources_and_feeds_a_batcher(conv_dir: Path, tmp_path: Path, tiny_tokenizer) -> None:
    arith = write_shards(tmp_path / "arith", "conversation",
                         [{"__key__": f"q{i}", "json": conv(f"what is {i} + 1?", str(i + 1))} for i in range(5)])
    conv_src, arith_src = stream(conv_dir, loop=False, max_corrupt_fraction=1.0), stream(arith, loop=False)
    mix = MixtureBatches([(conv_src, 1.0), (arith_src, 1.0)], seed=0)
    batches = list(ConversationBatches(mix, tiny_tokenizer, batch_size=3, max_len=128, num_vision_tokens=NV,
                                       transform=to_tensor))
    assert sum(b["input_ids"].shape[0] for b in batches) == 4 + 5  # every usable sample once
    assert conv_src.stats["corrupt"] == 3 and mix.stats["corrupt"] == 3  # skips land in the right stream
    with pytest.raises(ValueError, match="weight"):
        MixtureBatches([(conv_src, 0.0)], seed=0)


def test_loop_builders_with_a_real_vlm(synth_dir: Path, tmp_path: Path, tiny_tokenizer) -> None:
    from ghostvis.config import get_preset
    from ghostvis.data.multimodal import caption_batches, conversation_batches
    from ghostvis.model.vlm import VLM
    from ghostvis.data.request import DataRequest
    from ghostvis.train.loop import data_inputs

    model_cfg, vision_cfg = get_preset("vlm_tiny", vocab_size=tiny_tokenizer.vocab_size,
                                       image_token_id=tiny_tokenizer.image_token_id)
    model = VLM(model_cfg, vision_cfg)

    def req(data: Path, eval_mode: bool) -> DataRequest:
        return DataRequest(data, "val" if eval_mode else "train", 96, 4, 0, 1, 0, tiny_tokenizer,
                           torch.device("cpu"), eval_mode, **data_inputs(model))

    val = caption_batches(req(synth_dir / "captions", True))
    first, second = list(val), list(val)  # finite, and restarts at each iter()
    assert sum(b["input_ids"].shape[0] for b in first) == 8 and _same(first, second)
    assert first[0]["pixel_values"].shape[1:] == (3, vision_cfg.image_size, vision_cfg.image_size)
    loss = model(first[0]["input_ids"], first[0]["targets"], pixel_values=first[0]["pixel_values"])
    assert torch.isfinite(loss)

    (tmp_path / "mixture.json").write_text(json.dumps(
        {"datasets": [{"dir": str(synth_dir / "vqa"), "weight": 3}, {"dir": str(synth_dir / "arith"), "weight": 1}]}))
    train = conversation_batches(req(tmp_path, False))
    batch = next(iter(train))
    n_images = int((batch["input_ids"] == tiny_tokenizer.image_token_id).sum()) // model.num_vision_tokens
    assert batch["pixel_values"].shape[0] == n_images
    assert torch.isfinite(model(batch["input_ids"], batch["targets"], pixel_values=batch["pixel_values"]))


def test_text_rows_mixed_into_a_stage_by_weight_and_resumed(synth_dir: Path, text_data: Path, tmp_path: Path,
                                                              tiny_tokenizer) -> None:
    """A text-tokens dataset in mixture.json is mixed in per batch (against forgetting), training only."""
    from ghostvis.config import get_preset
    from ghostvis.data.multimodal import caption_batches, conversation_batches
    from ghostvis.model.vlm import VLM
    from ghostvis.data.request import DataRequest
    from ghostvis.train.loop import data_inputs

    model = VLM(*get_preset("vlm_tiny", vocab_size=tiny_tokenizer.vocab_size,
                            image_token_id=tiny_tokenizer.image_token_id))

    def req(eval_mode: bool = False) -> DataRequest:
        return DataRequest(tmp_path, "val" if eval_mode else "train", 64, 4, 0, 1, 0, tiny_tokenizer,
                           torch.device("cpu"), eval_mode, **data_inputs(model))

    (tmp_path / "mixture.json").write_text(json.dumps(
        {"datasets": [{"dir": str(synth_dir / "captions"), "weight": 3}, {"dir": str(text_data), "weight": 1}]}))
    mix = caption_batches(req())
    it = iter(mix)
    drawn = _take(it, 200)
    text = [b for b in drawn if "pixel_values" not in b]
    assert 0.17 < len(text) / 200 < 0.33  # weight 1 of 4
    row = text[0]
    assert row["input_ids"].shape == (4, 64) and row["num_loss_tokens"] == int((row["targets"] >= 0).sum()) > 0
    assert torch.isfinite(model(row["input_ids"], row["targets"]))  # a text-only batch through the VLM
    state = json.loads(json.dumps(mix.state_dict()))
    after = _take(it, 20)
    again = caption_batches(req())
    again.load_state_dict(state)
    assert _same(_take(iter(again), 20), after)
    assert all("pixel_values" in b for b in caption_batches(req(eval_mode=True)))  # validation: captions only

    (tmp_path / "mixture.json").write_text(json.dumps({"datasets": [{"dir": str(text_data), "weight": 1}]}))
    with pytest.raises(ValueError, match="every dataset is text-tokens; this stage needs at least one conversation"):
        conversation_batches(req())
