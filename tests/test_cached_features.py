"""Cached encoder features end to end: data_prep/encode_features.py over tiny synth caption shards with a
vlm_tiny export's encoder, then training batches that read the features instead of pixels (same loss),
a vision_pretrain run through launch/train.py --cached-features, and the refusals."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from test_sft import run_stage, tiny_vlm_export

from data_prep import encode_features, synth
from data_prep.image_shards import tar_samples
from ghostvis.checkpoint_io import load_pretrained
from ghostvis.data.features import FEATURES_KEY
from ghostvis.data.manifest import DataError, Manifest, ShardInfo, read_manifest, write_manifest
from ghostvis.data.multimodal import caption_batches
from ghostvis.data.request import DataRequest
from ghostvis.train import loop


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cached")
    synth.generate(root / "synth", seed=5, num_captions=48, num_vqa=4, num_val=8, num_test=2, num_arith=2,
                   num_arith_test=2, num_text_docs=2, shard_size=16)
    export = tiny_vlm_export(root / "export", tiny_tokenizer)
    encode_features.main(["--data", str(root / "synth" / "captions"), "--ckpt", str(export),
                          "--out", str(root / "feat"), "--batch-size", "16", "--device", "cpu"])
    return {"pixels": root / "synth" / "captions", "feat": root / "feat", "export": export}


def first_batch(data: Path, model, tokenizer, cached_features: bool) -> dict:
    req = DataRequest(data, "train", 64, 8, 0, 1, 0, tokenizer, torch.device("cpu"), True,
                      **loop.data_inputs(model, cached_features))
    return next(iter(caption_batches(req)))


def test_encoded_shards_keep_samples_and_record_the_encoder(cached):
    for split in ("train", "val"):
        src, out = read_manifest(cached["pixels"] / split), read_manifest(cached["feat"] / split)
        assert [(s.name, s.samples) for s in out.shards] == [(s.name, s.samples) for s in src.shards]
    meta = read_manifest(cached["feat"] / "train").extra[FEATURES_KEY]
    assert meta["encoder"] == "vit_tiny_patch16_224" and meta["image_size"] == 64
    assert meta["feature_shape"] == [64, 192] and meta["dtype"] == "float16" and len(meta["weights"]) == 64
    # resumable: a re-run keeps every finished shard as it is
    shard = cached["feat"] / "train" / "train-000000.tar"
    before = (shard.stat().st_mtime_ns, shard.read_bytes())
    encode_features.main(["--data", str(cached["pixels"]), "--ckpt", str(cached["export"]),
                          "--out", str(cached["feat"]), "--device", "cpu"])
    assert (shard.stat().st_mtime_ns, shard.read_bytes()) == before


def test_conversations_get_numbered_features_and_corrupt_images_are_counted(cached, tmp_path):
    src = cached["pixels"].parent / "vqa" / "train"
    samples = [{"__key__": k, **m} for k, m in tar_samples(src / read_manifest(src).shards[0].name)][:3]
    samples[1]["0.png"] = samples[1]["0.png"][:100]  # truncated
    (tmp_path / "conv").mkdir()
    with wds.TarWriter(str(tmp_path / "conv" / "conv-000000.tar"), encoder=False) as w:
        for sample in samples:
            w.write(sample)
    write_manifest(tmp_path / "conv", Manifest("conversation", [ShardInfo("conv-000000.tar", 3)]))
    (m,) = encode_features.main(["--data", str(tmp_path / "conv"), "--ckpt", str(cached["export"]),
                                 "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert m.num_samples == 2 and m.extra["skipped"] == 1
    assert json.loads((tmp_path / "out" / "skipped.jsonl").read_text())["key"] == samples[1]["__key__"]
    kept = [dict(x) for _, x in tar_samples(tmp_path / "out" / "conv-000000.tar")]
    assert [sorted(x) for x in kept] == [["0.feat.npy", "0.png", "json"]] * 2
    assert np.load(io.BytesIO(kept[0]["0.feat.npy"])).dtype == np.float16


def test_cached_batch_gives_the_pixel_loss(cached, tiny_tokenizer):
    model, _, _ = load_pretrained(cached["export"])  # fp32 on CPU
    pixels = first_batch(cached["pixels"], model, tiny_tokenizer, False)
    feats = first_batch(cached["feat"], model, tiny_tokenizer, True)
    assert torch.equal(pixels["input_ids"], feats["input_ids"]) and "pixel_values" not in feats
    with torch.no_grad():
        live = model.vision.encode(pixels["pixel_values"])
        # the cache is the live features rounded to float16, nothing else
        torch.testing.assert_close(feats["image_features"], live.half().float(), rtol=1e-3, atol=1e-3)
        loss_pixels = model(pixels["input_ids"], pixels["targets"], pixel_values=pixels["pixel_values"])
        loss_cached = model(feats["input_ids"], feats["targets"], image_features=feats["image_features"])
    assert abs(loss_pixels.item() - loss_cached.item()) < 1e-4


def test_vision_pretrain_trains_on_cached_features_and_refuses_mismatches(cached, tmp_path, tiny_tokenizer_dir,
                                                                          world1):
    common = ("--stage", "vision_pretrain", "--data", cached["feat"], "--tokenizer", tiny_tokenizer_dir,
              "--micro-batch", "8", "--seq-len", "64", "--lr", "1e-2", "--cached-features")
    loss = [r["loss"] for r in run_stage(*common, "--init-from", cached["export"], "--out", tmp_path / "ok",
                                         "--steps", "12")]
    assert len(loss) == 12 and sum(loss[-4:]) / 4 < sum(loss[:2]) / 2 - 0.02  # only the connector learns

    # a fresh vlm_tiny from another seed has other (random) encoder weights than the export's
    with pytest.raises(DataError, match="encoded with other encoder weights.*data_prep.encode_features"):
        run_stage(*common, "--model", "vlm_tiny", "--seed", "1", "--out", tmp_path / "fresh", "--steps", "1")
    with pytest.raises(DataError, match="frozen encoder.*--encoder-lr"):
        run_stage(*common, "--init-from", cached["export"], "--encoder-lr", "1e-5", "--out", tmp_path / "enc",
                  "--steps", "1")
    # pixel-only shards, and features of another shape
    with pytest.raises(DataError, match="no 'features' entry"):
        run_stage(*common[:2], "--data", cached["pixels"], *common[4:], "--init-from", cached["export"],
                  "--out", tmp_path / "pix", "--steps", "1")
    bad = tmp_path / "bad"
    shutil.copytree(cached["feat"], bad)
    for split in ("train", "val"):
        raw = json.loads((bad / split / "manifest.json").read_text())
        raw[FEATURES_KEY]["image_size"] = 96
        (bad / split / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="image_size=96"):
        run_stage(*common[:2], "--data", bad, *common[4:], "--init-from", cached["export"], "--out", tmp_path / "sz",
                  "--steps", "1")
