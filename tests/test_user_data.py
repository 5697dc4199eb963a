"""A user's own images end to end, as docs/datasets.md documents it: textures drawn here (not the synth
scenes) -> `image_shards folder` (captions, one flat shard directory) -> vision_pretrain -> `image_shards
llava --val-fraction` (conversations with no `answer` field) -> sft (validated on val/) -> launch/eval.py,
well above chance, and at about chance with the images blanked. Plus the one-line errors of bad input.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import parse, write_shards
from PIL import Image

from data_prep import image_shards
from ghostvis.data.manifest import DataError, read_manifest
from ghostvis.train import loop
from ghostvis.train.engine import ConfigError

PATTERNS = ("horizontal", "vertical", "checkered", "plain")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40)}
QUESTION = "<image>\nWhat colour is the pattern?"


def texture(pattern: str, colour: str, rng: random.Random, size: int = 64) -> Image.Image:
    """`pattern` in `colour` (jittered) on a random dark grey, with a random period and phase."""
    fg = np.array([min(255, max(0, c + rng.randint(-25, 25))) for c in COLOURS[colour]], np.uint8)
    bg = np.full(3, rng.randint(10, 90), np.uint8)
    period, phase = rng.randrange(8, 17), rng.randrange(16)
    y, x = np.mgrid[:size, :size]
    on = {"horizontal": (y + phase) % period < period // 2, "vertical": (x + phase) % period < period // 2,
          "checkered": ((x + phase) // (period // 2) + (y + phase) // (period // 2)) % 2 == 0,
          "plain": np.ones((size, size), bool)}[pattern]
    return Image.fromarray(np.where(on[..., None], fg, bg))


@pytest.fixture(scope="module")
def user_data(tmp_path_factory) -> Path:
    """photos/*.png, captions.jsonl and llava.json, as a user would bring them."""
    root = tmp_path_factory.mktemp("user")
    (root / "photos").mkdir()
    rng = random.Random(0)
    captions, entries = [], []
    for i in range(320):
        pattern, colour = rng.choice(PATTERNS), list(COLOURS)[i % len(COLOURS)]
        texture(pattern, colour, rng).save(root / "photos" / f"{i:04d}.png")
        captions.append({"file": f"{i:04d}.png", "caption": f"a {colour} {pattern} pattern"})
        entries.append({"id": f"img{i}", "image": f"{i:04d}.png", "type": "tint", "conversations": [
            {"from": "human", "value": QUESTION}, {"from": "gpt", "value": colour}]})
    (root / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))
    (root / "llava.json").write_text(json.dumps(entries))
    return root


def train(*argv) -> None:
    """launch/train.py in this process, with the run's defaults for --eval-every (unlike conftest.run_stage)."""
    loop.run(parse(*argv, "--ds_config", Path(__file__).parent.parent / "ds_configs" / "zero2.json",
                   "--save-every", "0", "--warmup", "5", "--data-workers", "0"))  # 2 cores: no loader process


def test_val_fraction_is_a_deterministic_split(user_data, tmp_path):
    args = ["llava", "--json", str(user_data / "llava.json"), "--images", str(user_data / "photos"),
            "--val-fraction", "0.2", "--workers", "1"]
    image_shards.main([*args, "--out", str(tmp_path / "a")])
    image_shards.main([*args, "--out", str(tmp_path / "b"), "--shard-size", "50"])
    val, train_m = read_manifest(tmp_path / "a" / "val"), read_manifest(tmp_path / "a" / "train")
    assert val.num_samples + train_m.num_samples == 320 and 40 <= val.num_samples <= 90
    assert read_manifest(tmp_path / "b" / "val").num_samples == val.num_samples  # by source, not by position
    from ghostvis.data.shards import ShardStream
    record = json.loads(next(iter(ShardStream(tmp_path / "a" / "val", seed=0, loop=False)))["json"])
    assert record["type"] == "tint" and record["id"].startswith("img")  # the entry's extra fields are kept
    with pytest.raises(SystemExit):
        image_shards.main([*args[:-4], "--val-fraction", "1.5", "--out", str(tmp_path / "c")])


def test_own_images_from_ingest_to_eval(user_data, tmp_path, tiny_tokenizer_dir, world1, capsys):
    import importlib.util

    caps, conv = tmp_path / "caps", tmp_path / "conv"
    image_shards.main(["folder", "--images", str(user_data / "photos"), "--captions",
                       str(user_data / "captions.jsonl"), "--out", str(caps), "--workers", "1"])
    image_shards.main(["llava", "--json", str(user_data / "llava.json"), "--images", str(user_data / "photos"),
                       "--out", str(conv), "--val-fraction", "0.25", "--workers", "1"])
    tok = ["--tokenizer", tiny_tokenizer_dir]
    # a flat shard directory trains as it is, and says that nothing validates
    train("--stage", "vision_pretrain", "--model", "vlm_tiny", "--data", caps, *tok, "--out", tmp_path / "vp",
          "--micro-batch", "16", "--seq-len", "32", "--steps", "40", "--lr", "3e-3", "--encoder-lr", "1e-3",
          "--train-llm-layers", "all")
    assert "has no val/ split: no validation runs" in capsys.readouterr().out
    train("--stage", "sft", "--init-from", tmp_path / "vp", "--data", conv, *tok, "--out", tmp_path / "sft",
          "--micro-batch", "16", "--seq-len", "48", "--steps", "50", "--lr", "3e-3", "--encoder-lr", "1e-3",
          "--eval-batches", "2")
    records = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert "val_bpb" in records[-1]  # val/ exists, so the default interval validates (at the last step)

    spec = importlib.util.spec_from_file_location("ghostvis_eval_cli", Path(__file__).parent.parent / "launch" / "eval.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--ckpt", str(tmp_path / "sft"), "--data", str(conv), "--split", "val", "--blank-images",
                     "--device", "cpu", "--no-report", "--report-dir", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    seen, blank = result["vqa"]["per_type"]["tint"], result["vqa_blank"]["per_type"]["tint"]
    assert seen["n"] >= 40 and result["vqa"]["skipped"] == {}  # answers came from the last assistant turn
    assert seen["accuracy"] >= 0.5, result["vqa"]["examples"]  # chance: 1/4 (61% measured)
    assert blank["accuracy"] <= 0.45  # one constant image: about one answer for all


def test_bad_input_gets_one_line_errors(user_data, tmp_path, tiny_tokenizer_dir, world1):
    caps = tmp_path / "caps"
    image_shards.main(["folder", "--images", str(user_data / "photos"), "--captions",
                       str(user_data / "captions.jsonl"), "--out", str(caps), "--workers", "1", "--shard-size", "400"])
    common = ["--model", "vlm_tiny", "--tokenizer", tiny_tokenizer_dir, "--out", tmp_path / "run", "--steps", "1",
              "--micro-batch", "2", "--seq-len", "32"]
    with pytest.raises(DataError, match="'image-text' but this stage reads 'conversation'.*--stage vision_pretrain"):
        train("--stage", "sft", "--data", caps, *common)
    with pytest.raises(DataError, match=r"--eval-every 5: .*caps has no val/ split.*--val-fraction"):
        train("--stage", "vision_pretrain", "--data", caps, "--eval-every", "5", *common)
    with pytest.raises(ConfigError, match=r"--train-llm-layers 5: the LLM has 2 blocks; give 0\.\.2, or all"):
        train("--stage", "vision_pretrain", "--data", caps, "--train-llm-layers", "5", *common)
    mix = tmp_path / "mix"
    mix.mkdir()
    for text, why in (("{not json", "not valid JSON"), ('{"datasets": []}', "field 'datasets' is missing or empty"),
                      ('{"datasets": [{"dir": "../caps", "weight": -1}]}', r"datasets\[0\]")):
        (mix / "mixture.json").write_text(text)
        with pytest.raises(DataError, match=f"mixture.json: {why}"):
            train("--stage", "vision_pretrain", "--data", mix, *common)
    # a --data that is not a training set names what was given and how to make one
    (mix / "mixture.json").write_text('{"datasets": [{"dir": "../nope", "weight": 1}]}')
    with pytest.raises(DataError, match=r"mixture.json: datasets\[0\].dir .*nope does not exist"):
        train("--stage", "vision_pretrain", "--data", mix, *common)
    with pytest.raises(DataError, match=r"--data .*caps-typo: no such directory"):
        train("--stage", "vision_pretrain", "--data", tmp_path / "caps-typo", *common)
    with pytest.raises(DataError, match=r"--data .*photos is not a shard directory .*holds images \(\d+\): make "
                                        r"shards with python -m data_prep.image_shards folder --images .*photos"):
        train("--stage", "vision_pretrain", "--data", user_data / "photos", *common)
    with pytest.raises(DataError, match=r"--data .* is not a shard directory .*holds datasets: pick one \(caps\)"):
        train("--stage", "vision_pretrain", "--data", tmp_path, *common)
    no_tok = [a for a in common if a not in ("--tokenizer", tiny_tokenizer_dir)]
    with pytest.raises(DataError, match=r"no --tokenizer given, and .*tokenizer \(the default: tokenizer/ beside "
                                        r"--data\) does not exist: pass --tokenizer DIR"):
        train("--stage", "vision_pretrain", "--data", caps, *no_tok)
    # conversations whose placeholders don't match their images, and ones with nothing to answer
    bad = write_shards(tmp_path / "bad", "conversation", [
        {"__key__": f"k{i}", "json": json.dumps({"messages": [{"role": "user", "content": "<|image|> hi"},
                                                              {"role": "assistant", "content": "x"}]}).encode()}
        for i in range(4)] + [{"__key__": f"q{i}", "json": json.dumps(
            {"messages": [{"role": "user", "content": "hi"}]}).encode()} for i in range(4)])
    from ghostvis.eval.vqa import iter_samples
    from ghostvis.tasks.qa import Skips

    skips = Skips()
    stream, samples = iter_samples(bad, None, skips)
    stream.max_corrupt_fraction = 1.0
    assert list(samples) == [] and skips.report(stream) == {"image missing": 4, "no answer": 4}
