"""--data-workers: batches from DataLoader worker shares over real tars (synth captions, a caption + text
mixture, corrupt images), with and without workers: the order, exact resume at the loop's batch, corrupt
counts and the corrupt limit, text mixtures; and the training loop's data metrics."""

from __future__ import annotations

import dataclasses
import io
import json
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from conftest import REPO, parse, write_shards

from data_prep import synth
from ghostvis.config import get_preset
from ghostvis.data.loader import WorkerBatches
from ghostvis.data.manifest import DataError
from ghostvis.data.multimodal import CaptionBatches, caption_batches
from ghostvis.data.shards import ShardStream
from ghostvis.model.vlm import VLM
from ghostvis.train import loop
from ghostvis.data.request import DataRequest
from ghostvis.train.loop import data_inputs

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synth.generate(out, seed=2, num_captions=48, num_vqa=8, num_val=8, num_test=4, num_arith=4, num_arith_test=4,
                   num_text_docs=2, shard_size=12)
    return out


@pytest.fixture(scope="module")
def vlm(tiny_tokenizer) -> VLM:
    torch.manual_seed(0)
    cfg, vcfg = get_preset("vlm_tiny", vocab_size=tiny_tokenizer.vocab_size,
                           image_token_id=tiny_tokenizer.image_token_id)
    return VLM(cfg, vcfg)


def request(data: Path, tokenizer, model, rank: int = 0, world_size: int = 1) -> DataRequest:
    return DataRequest(data, "train", 48, 4, rank, world_size, 0, tokenizer, CPU, False, **data_inputs(model))


def take(it, n: int) -> list:
    return [next(it) for _ in range(n)]


def same(a: dict, b: dict) -> bool:
    keys = [k for k in ("input_ids", "targets", "pixel_values") if k in a or k in b]
    return all(k in a and k in b and torch.equal(a[k], b[k]) for k in keys)


@pytest.mark.parametrize("workers", [0, 2])
def test_worker_shares_order_and_exact_resume(synth_dir, tiny_tokenizer, vlm, workers):
    req = request(synth_dir / "captions", tiny_tokenizer, vlm)
    loader = WorkerBatches(caption_batches, req, workers, CPU)
    it = iter(loader)
    got = take(it, 9)
    assert got[0]["pixel_values"].dtype == torch.uint8  # normalised by the encoder, not in the workers
    # worker w reads as data-parallel reader w of max(workers, 1); the loop takes the shares in turn
    shares = max(workers, 1)
    direct = [iter(caption_batches(request(synth_dir / "captions", tiny_tokenizer, vlm, w, shares)))
              for w in range(shares)]
    assert all(same(b, next(direct[i % shares])) for i, b in enumerate(got))

    time.sleep(0.3)  # workers build ahead of the loop; the state is the loop's position all the same
    state = loader.state_dict()
    expected = take(it, 5)
    resumed = WorkerBatches(caption_batches, req, workers, CPU)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint stores it
    assert all(same(a, b) for a, b in zip(expected, take(iter(resumed), 5)))
    other = WorkerBatches(caption_batches, req, 3, CPU)
    with pytest.raises(DataError, match=f"resume with --data-workers {shares}"):
        other.load_state_dict(state)
    default = WorkerBatches(caption_batches, req, None, CPU)  # no --data-workers: the checkpoint's number
    default.load_state_dict(state)
    assert default.shares == shares and all(same(a, b) for a, b in zip(expected, take(iter(default), 5)))


def test_a_position_the_batchers_cannot_resume_is_refused_when_it_loads(synth_dir, tiny_tokenizer, vlm):
    """Checked on each worker share's saved position in the training process, as the checkpoint loads, before
    any worker starts (a worker would raise it only at its first batch)."""
    req = dataclasses.replace(request(synth_dir / "captions", tiny_tokenizer, vlm), pack=True)
    loader = WorkerBatches(caption_batches, req, 2, CPU)
    take(iter(loader), 3)
    state = json.loads(json.dumps(loader.state_dict()))
    assert any(share["emitted"] for share in state["states"] if share)  # inside a packing window
    other = WorkerBatches(caption_batches, dataclasses.replace(req, batch_size=3), 2, CPU)
    with pytest.raises(DataError, match="cut with --micro-batch 4; resume with --micro-batch 4 "):
        other.load_state_dict(state)
    WorkerBatches(caption_batches, req, 2, CPU).load_state_dict(state)


def png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 12), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def corrupt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 captions; samples 1 and 2 have broken images (one in each of two worker shares)."""
    good = png((200, 40, 40))
    samples = [{"__key__": f"{i:03d}", "txt": f"a red square number {i}.".encode(),
                "png": good[:40] if i in (1, 2) else good} for i in range(24)]
    return write_shards(tmp_path_factory.mktemp("corrupt") / "train", "image-text", samples, per_shard=6)


def corrupt_captions(limit: float):
    def build(req: DataRequest) -> CaptionBatches:
        source = ShardStream(req.data_dir / req.split, seed=req.seed, rank=req.rank, world_size=req.world_size,
                             max_corrupt_fraction=limit, min_count=4, expected_kind="image-text", shuffle=False)
        return CaptionBatches(source, req.tokenizer, batch_size=2, max_len=32, num_vision_tokens=4,
                              transform=req.transform)
    return build


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_samples_counted_and_limited_under_workers(corrupt_dir, tiny_tokenizer, vlm, workers):
    req = request(corrupt_dir.parent, tiny_tokenizer, vlm)
    loader = WorkerBatches(corrupt_captions(0.5), req, workers, CPU)
    it = iter(loader)
    take(it, 4)  # 8 good samples: global indices 0-9 without 1 and 2, however they are split
    time.sleep(0.3)
    assert loader.stats["corrupt"] == 2 and loader.stats["seen"] == 10  # as of the loop's batches, not read-ahead
    resumed = WorkerBatches(corrupt_captions(0.5), req, workers, CPU)
    resumed.load_state_dict(loader.state_dict())
    take(iter(resumed), 1)
    assert resumed.stats["corrupt"] == 2  # the counts travel with the checkpointed position

    strict = WorkerBatches(corrupt_captions(0.01), req, workers, CPU)
    with pytest.raises(DataError, match=r"were corrupt .* worst shards: data-000000.tar") as err:
        take(iter(strict), 10)
    assert "Traceback" not in str(err.value)  # the stream's own one-line error, not a worker's traceback


@pytest.mark.parametrize("workers", [0, 2])
def test_text_mixture_under_workers(synth_dir, text_data, tiny_tokenizer, vlm, workers, tmp_path):
    mix = tmp_path / "mix"
    mix.mkdir()
    (mix / "mixture.json").write_text(json.dumps({"datasets": [
        {"dir": str(synth_dir / "captions"), "weight": 2}, {"dir": str(text_data), "weight": 1}]}))
    req = request(mix, tiny_tokenizer, vlm)
    loader = WorkerBatches(caption_batches, req, workers, CPU)
    it = iter(loader)
    got = take(it, 11)  # odd: the resume starts at worker 1's share (with 2 workers)
    with_images = sum("pixel_values" in b for b in got)
    assert 0 < with_images < 11  # caption batches and text rows both come through the workers
    state = loader.state_dict()
    expected = take(it, 4)
    resumed = WorkerBatches(caption_batches, req, workers, CPU)
    resumed.load_state_dict(state)
    assert all(same(a, b) for a, b in zip(expected, take(iter(resumed), 4)))

    frozen = VLM(vlm.config, vlm.vision_config)
    frozen.llm.requires_grad_(False)
    with pytest.raises(DataError, match="LLM is frozen, so text rows train nothing: pass --train-llm-layers"):
        take(iter(WorkerBatches(caption_batches, request(mix, tiny_tokenizer, frozen), workers, CPU)), 1)


def test_worker_shares_draw_their_own_mixture_picks(synth_dir, text_data, tiny_tokenizer, vlm, tmp_path):
    """The loop takes the worker shares in turn, so shares that drew a mixture with one seed gave N text batches
    in a row under N workers. Each share draws its own; data-parallel ranks keep one draw (a step's batches
    are of one kind on every rank)."""
    mix = tmp_path / "mix"
    mix.mkdir()
    (mix / "mixture.json").write_text(json.dumps({"datasets": [
        {"dir": str(synth_dir / "captions"), "weight": 2}, {"dir": str(text_data), "weight": 1}]}))
    req = request(mix, tiny_tokenizer, vlm)

    def kinds(rank: int, world: int, share: int) -> list[bool]:
        reader = caption_batches(dataclasses.replace(req, rank=rank, world_size=world, share=share))
        return ["pixel_values" in b for b in take(iter(reader), 16)]

    shares = [kinds(w, 2, w) for w in range(2)]  # worker shares 0 and 1 of one rank
    assert shares[0] != shares[1]
    assert kinds(0, 2, 0) == kinds(1, 2, 0)  # two data-parallel ranks, no workers: the same draws
    assert 4 <= sum(shares[1]) <= 14  # still about two caption batches to one of text
    loader = WorkerBatches(caption_batches, req, 2, CPU)  # the loop takes the two shares in turn
    assert ["pixel_values" in b for b in take(iter(loader), 32)] == [k for pair in zip(*shares) for k in pair]


def test_worker_shares_each_read_every_question_type(tmp_path):
    """data_prep.synth's visual QA cycles its question types by sample index. Split i % readers, worker share w
    of 4 read only type w: its batches, each a step of its own, asked one kind of question, and binding failed
    with 8 workers where it succeeded with 1 (docs/demo.md). Each share now gets every type."""
    synth.generate(tmp_path, seed=4, num_captions=4, num_vqa=160, num_val=4, num_test=4, num_arith=4,
                   num_arith_test=4, num_text_docs=2, shard_size=16)
    workers = 4
    for share in range(workers):  # as WorkerBatches reads: rank 0 + 1 · share of 1 · workers
        stream = ShardStream(tmp_path / "vqa" / "train", seed=0, rank=share, world_size=workers, loop=False)
        types = [json.loads(s["json"])["type"] for s in stream]
        assert len(types) == 40
        counts = {t: types.count(t) for t in ("colour", "count", "shape", "position")}
        assert all(n >= 2 for n in counts.values()), (share, counts)


def test_training_resumes_exactly_with_workers_and_logs_data_metrics(synth_dir, tiny_tokenizer_dir, tmp_path,
                                                                    world1):
    """vision_pretrain through the loop with 2 data workers: stopped at step 2 and resumed from its checkpoint,
    the same losses as a straight run (workers had built batches past the checkpoint)."""
    def run(out: Path, *extra: str) -> None:
        loop.run(parse("--stage", "vision_pretrain", "--model", "vlm_tiny", "--data", synth_dir / "captions",
                       "--tokenizer", tiny_tokenizer_dir, "--micro-batch", "4", "--seq-len", "48", "--steps", "4",
                       "--data-workers", "2", "--out", out, "--ds_config", REPO / "ds_configs" / "zero2.json",
                       "--eval-every", "0", "--warmup", "1", "--vision-lr", "1e-2", *extra))

    run(tmp_path / "straight", "--save-every", "0")
    run(tmp_path / "resumed", "--save-every", "2", "--stop-at", "2")
    run(tmp_path / "resumed", "--save-every", "2")
    straight, resumed = (records(tmp_path / d) for d in ("straight", "resumed"))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight] and len(straight) == 4
    for r in straight:
        assert 0.0 <= r["data_wait_frac"] <= 1.0 and r["step_s"] > 0 and "peak_mem_gib" not in r  # CPU: no peak
        assert r["images_per_s"] == pytest.approx(4 / r["step_s"])


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_images_are_counted_in_every_stage_s_batches():
    """images_per_s counts the images a step took: pixel rows of a caption/conversation batch, and each prompt's
    list of images in rl's prompt batches (which have no pixel_values)."""
    from ghostvis.train.loop import TimedBatches

    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    batches = TimedBatches(iter([
        {"input_ids": torch.ones(2, 4, dtype=torch.long), "targets": torch.ones(2, 4, dtype=torch.long),
         "pixel_values": torch.zeros(3, 3, 8, 8)},
        {"prompts": [[1, 2], [3]], "images": [[image, image], [image]], "answers": ["a", "b"]},
        {"prompts": [[1]], "images": [[]], "answers": ["a"]},
    ]))
    counts = []
    for _ in batches:
        counts.append(batches.take()[1])
    assert counts == [3, 3, 0]
