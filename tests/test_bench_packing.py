"""bench/packing.py's pieces (the full run trains seven times; on CPU it takes minutes): the LLaVA-665K-like
mix through the real conversation batcher, the summary of a run's metrics.jsonl and the learning check."""

from __future__ import annotations

import json

import pytest
from conftest import bench_module

from ghostvis.data.multimodal import read_conversation


def bench():
    return bench_module("packing")


def test_llava_like_mix_is_deterministic_and_long_tailed(tmp_path, tiny_tokenizer):
    b = bench()
    samples = [b.llava_like_sample(0, i, 16) for i in range(300)]
    assert samples[7] == b.llava_like_sample(0, 7, 16)
    lengths = []
    for s in samples:
        record, images = read_conversation(s)  # valid: placeholders match the images
        assert len(images) == (1 if "0.png" in s else 0)
        lengths.append(len(tiny_tokenizer.render_conversation(record, 10**6, 4)[0]))
    turns = [len(json.loads(s["json"])["messages"]) // 2 for s in samples]
    assert 0.35 < sum(t == 1 for t in turns) / len(turns) < 0.65 and max(turns) > 10  # many short, a long tail
    lengths.sort()
    assert lengths[-5] > 4 * lengths[len(lengths) // 2]


def test_summary_and_learning_check(tmp_path):
    b = bench()

    def write(name: str, tokens_per_step: float, losses: list[float], val_bpb: float | None = None) -> dict:
        rows = [{"loss": x, "tokens_per_s": tokens_per_step / 0.5, "step_s": 0.5, "padding_frac": 0.1} for x in losses]
        if val_bpb is not None:
            rows[-1]["val_bpb"] = val_bpb
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return b.side_summary(path, positions=1000)

    unpacked = write("u", 250.0, [5.0 - 0.05 * i for i in range(20)])
    assert unpacked["fill"] == pytest.approx(0.25) and unpacked["tokens_per_step"] == pytest.approx(250.0)
    assert unpacked["tokens_per_s"] == pytest.approx(500.0) and unpacked["padding_frac"] == pytest.approx(0.1)
    ref, verdict = b.learning_verdicts(unpacked, write("p", 240.0, [4.98 - 0.05 * i for i in range(20)]))
    assert ref.ok and verdict.ok, verdict.message
    assert not b.learning_verdicts(unpacked, write("w", 240.0, [5.0 - 0.02 * i for i in range(20)]))[1].ok
    assert not b.learning_verdicts(unpacked, write("w", 240.0, [5.0] * 20), min_drop=0.01)[1].ok
    with_val = write("v", 250.0, unpacked["losses"], val_bpb=2.0)  # validation decides, not the step-by-step gap
    assert b.learning_verdicts(with_val, write("p", 240.0, [5.0 - 0.02 * i for i in range(20)], val_bpb=2.03))[1].ok
    assert not b.learning_verdicts(with_val, write("p", 240.0, unpacked["losses"], val_bpb=2.1))[1].ok
    assert b.learning_verdicts(with_val, write("p", 240.0, unpacked["losses"], val_bpb=1.9))[1].ok  # better is fine
    assert not b.learning_verdicts(with_val, write("p", 240.0, [5.0] * 20, val_bpb=2.0))[1].ok  # did not learn
    assert b.smooth([4.0, 2.0, 3.0] * 10) == [4.0, 3.0] + [3.0] * 28  # a tenth of the steps: threes
    same = b.learning_verdicts(with_val, write("p", 240.0, unpacked["losses"], val_bpb=2.0), cuts=(0, 0, True))[1]
    assert same.ok and "held-out samples cut u / p: 0 / 0" in same.message
    apart = b.learning_verdicts(with_val, write("p", 240.0, unpacked["losses"], val_bpb=2.0), cuts=(3, 1, False))[1]
    assert not apart.ok and "not comparable" in apart.message  # validations over different tokens


def test_held_out_cuts_count_what_each_sides_length_cuts(tmp_path, tiny_tokenizer_dir, tiny_tokenizer):
    """The LLaVA-like val split's conversations, counted against each side's --seq-len as the batcher renders
    them; directories that are not conversation shards are not counted."""
    from ghostvis.config import get_preset

    b = bench()
    data = b.write_llava_like(tmp_path / "llava", 40, image_size=16, shard_size=20)  # val: 8 conversations
    assert b.write_llava_like(tmp_path / "llava", 40) == data  # reused as it is
    with pytest.raises(SystemExit, match=r"llava/train holds 40 conversations, not 80: pass another --out"):
        b.write_llava_like(tmp_path / "llava", 80)
    _, vision = get_preset("vlm_tiny", vocab_size=tiny_tokenizer.vocab_size,
                           image_token_id=tiny_tokenizer.image_token_id)
    lengths = sorted(len(tiny_tokenizer.render_conversation(record, 10**9, vision.num_vision_tokens,
                                                            vision.image_frame)[0])
                     for record in (json.loads(b.llava_like_sample(0, 10**7 + i, 16)["json"]) for i in range(8)))
    T, cut = lengths[3], sum(n > lengths[3] for n in lengths)
    assert cut >= 3
    assert b.held_out_cuts(data, tiny_tokenizer_dir, "vlm_tiny", (T, lengths[-1])) == (cut, 0, False)
    longer = lengths[5]  # cuts fewer (or none) than T, and those it cuts keep more tokens: not the same
    assert b.held_out_cuts(data, tiny_tokenizer_dir, "vlm_tiny", (T, longer)) == (
        cut, sum(n > longer for n in lengths), False)
    assert b.held_out_cuts(data, tiny_tokenizer_dir, "vlm_tiny", (T, T)) == (cut, cut, True)  # cut alike
    assert b.held_out_cuts(data, tiny_tokenizer_dir, "vlm_tiny", (lengths[-1], lengths[-1] + 9)) == (0, 0, True)
    assert b.held_out_cuts(tmp_path / "nothing", tiny_tokenizer_dir, "vlm_tiny", (T, T)) is None


def test_packed_fill_sizes_the_packed_side_by_its_real_tokens(tmp_path, tiny_tokenizer_dir):
    """The packed side's rows come from the unpacked side's tokens per step over the packed rows' own fill
    (first fit leaves part of each row empty); measured on the stage's batcher over real shards, it is fuller than
    the same rows holding one caption each. (Longer rows did not fill measurably more: 0.891 at 64 and 256.)"""
    from data_prep import synth
    b = bench()
    synth.generate(tmp_path, seed=1, num_captions=200, num_vqa=8, num_val=4, num_test=4, num_arith=4,
                   num_arith_test=4, num_text_docs=2, shard_size=100)
    import torch

    from ghostvis.data.request import DataRequest
    from ghostvis.train.loop import DATA_BUILDERS
    from ghostvis.vision.transforms import image_transform

    tok, vision = b.tokenizer_and_vision(tiny_tokenizer_dir, "vlm_tiny")
    for n in (64, 256):
        fill = b.packed_fill("vision_pretrain", tmp_path / "captions", tiny_tokenizer_dir, "vlm_tiny", n, 4)
        assert 0.5 < fill < 1  # real tokens and padding both
        # one caption a row, as the unpacked side has them: packing fills the same rows far more
        req = DataRequest(tmp_path / "captions", "train", n, 4, 0, 1, 0, tok, torch.device("cpu"), False,
                          num_vision_tokens=vision.num_vision_tokens, image_frame=vision.image_frame,
                          transform=image_transform(vision))
        unpacked = [batch["num_tokens"] for batch, _ in zip(DATA_BUILDERS["image-text"](req), range(8))]
        assert fill > sum(unpacked) / (len(unpacked) * 4 * n)


def test_packed_geometry_matches_the_unpacked_tokens_per_step():
    """Whole rows of k·T are too coarse when a step holds few rows (2 × 1024 held 0.76× the unpacked side's
    2,425 tokens on the LLaVA-like mix): rows are lengthened until a step holds at least the target at the
    fill measured for the length returned, and never shorter than k·T."""
    b = bench()
    measured = set()

    def smooth(row_len: int, rows: int) -> float:  # longer rows fill a little more, as measured
        measured.add(row_len)
        return min(0.95, 0.85 + row_len / 10240)

    def stepped(row_len: int, rows: int) -> float:  # a fill that drops past a length: one more round is needed
        measured.add(row_len)
        return 0.95 if row_len < 1200 else 0.8

    for fill_of in (smooth, stepped):
        for target, k_t in ((2425.0, 1024), (5103.0, 512), (924.0, 256), (40000.0, 2048)):
            measured.clear()
            rows, row_len = b.packed_geometry(target, k_t, fill_of)
            assert row_len >= k_t and row_len % b.ROW_LEN_STEP == 0
            assert row_len == k_t or row_len in measured  # its fill was measured, not assumed
            held = rows * row_len * fill_of(row_len, rows)
            assert target <= held < target + rows * b.ROW_LEN_STEP / 0.8, (fill_of, target, rows, row_len, held)
    assert b.packed_geometry(2425.0, 1024, smooth) == (2, 1280)
    assert b.packed_geometry(2425.0, 1024, stepped) == (2, 1520)  # 1280 fills 80%, so 1520 at 80% holds 2,432
    assert b.packed_geometry(100.0, 512, lambda n, r: 0.9) == (1, 512)  # less than one row: one row of k·T
