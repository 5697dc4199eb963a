"""Evaluation on real tiny parts: synth shards, exported checkpoints, the eval CLI and its report card.

The end-to-end checkpoint is a tiny VLM (random vision tower) whose language model is test_infer's bigram
chain: it always answers " Square." (images can't reach the last position: attention and MLP outputs are
zeroed), so the expected accuracy per question type is known exactly from the reference answers.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from conftest import TOK, bigram_gpt, tiny_gpt, tiny_vlm

from data_prep import text_shards
from data_prep.synth import generate, vqa_sample
from ghostvis.checkpoint_io import export
from ghostvis.config import get_preset
from ghostvis.eval import evaluate_vqa, normalize_answer, read_metrics
from ghostvis.eval.report import results_table
from ghostvis.eval.vqa import aggregate, blank_like
from ghostvis.infer.chat import reply_text
from ghostvis.infer.engine import Engine
from ghostvis.model.vlm import VLM
from ghostvis.train.logging import RunLogger

ROOT = Path(__file__).resolve().parents[1]
NUM_TEST = 12  # vqa/test samples: question types take turns, so 3 of each
ANSWER = " Square."  # what the bigram checkpoint always says


def load_eval_cli():
    spec = importlib.util.spec_from_file_location("ghostvis_eval_cli", ROOT / "launch" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def answering_vlm(answer: str) -> VLM:
    """A random tiny VLM whose LLM continues <|assistant_start|> with `answer`, then <|assistant_end|>."""
    chain = [TOK.special_id("<|assistant_start|>"), *TOK.encode(answer), TOK.special_id("<|assistant_end|>")]
    assert len(set(chain)) == len(chain)  # a bigram chain needs distinct tokens
    _, vcfg = get_preset("vlm_tiny")
    torch.manual_seed(1)
    return VLM.from_llm(bigram_gpt(chain), vcfg, image_token_id=TOK.image_token_id).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Synth data (+ text-token shards), the answering VLM export with a training log, a text-only export."""
    root = tmp_path_factory.mktemp("eval")
    TOK.save(root / "tokenizer")
    data = root / "synth"
    generate(data, num_captions=6, num_vqa=4, num_val=6, num_test=NUM_TEST, num_arith=2, num_arith_test=2,
             num_text_docs=30, shard_size=5)
    text_shards.main(["--input", str(data / "text"), "--tokenizer", str(root / "tokenizer"),
                      "--out", str(data / "tokens"), "--val-docs", "1", "--workers", "1"])
    ckpt = root / "sft"
    export(answering_vlm(ANSWER), ckpt, tokenizer=TOK, extra={"stage": "sft", "step": 3})
    for start, losses in ((0, [5.0, 4.0, 3.5]), (2, [9.9])):  # the second logger is a resume from step 2
        log = RunLogger(out_dir=ckpt, total_steps=3, start_step=start, enabled=True, wandb_mode="off",
                        run_config={}, header="test run")
        for step, loss in enumerate(losses, start=start + 1):
            log.step(step, {"loss": loss, "lr_mult": 1.0, "tokens_per_s": 100.0, "mfu": None,
                            "val_bpb": 2.0 if step == 3 else None})
        log.close()
    text_ckpt = root / "base"
    export(tiny_gpt(), text_ckpt, tokenizer=TOK, extra={"stage": "base", "step": 1})
    return {"root": root, "data": data, "ckpt": ckpt, "text_ckpt": text_ckpt}


def test_normalize_answer():
    assert normalize_answer("  Square. ") == "square"
    assert normalize_answer("RIGHT!") == "right"
    assert normalize_answer("3") == normalize_answer(" 3\n")
    assert normalize_answer("a  red\tcircle") == "a red circle"
    assert normalize_answer("red") != normalize_answer("reds")
    assert normalize_answer("") == ""


def test_aggregate_per_type_and_chance():
    out = aggregate([("colour", True, "red"), ("colour", False, "Orange."), ("colour", False, "orange"),
                     ("position", True, "left")])
    assert out["per_type"]["colour"] == {"correct": 1, "n": 3, "chance": 1 / 6, "accuracy": 1 / 3,
                                         "top_answer": {"answer": "orange", "share": 2 / 3}}
    assert out["per_type"]["position"]["accuracy"] == 1.0 and out["per_type"]["position"]["chance"] == 0.5
    assert out["overall"]["accuracy"] == 0.5 and out["overall"]["n"] == 4
    assert out["overall"]["chance"] == pytest.approx((3 / 6 + 0.5) / 4)
    # a type with open answers has no chance level, so the overall one is unknown too
    out = aggregate([("arith", True, "4"), ("shape", False, ""), ("colour", False, "Red " * 20)])
    assert out["overall"]["chance"] is None
    assert out["per_type"]["shape"]["top_answer"] == {"answer": "", "share": 1.0}  # an empty reply counts too
    table = results_table({"vqa": out})  # an empty reply and a rambling one, each readable in its cell
    assert "| ∅ (100.0%) |" in table and "| red red red red red red red re… (100.0%) |" in table


def test_reply_text_leaves_tool_calls_out():
    sp = TOK.special_id
    tokens = [*TOK.encode("it is "), sp("<|python_start|>"), *TOK.encode("1+2"), sp("<|python_end|>"),
              sp("<|output_start|>"), *TOK.encode("3"), sp("<|output_end|>"), *TOK.encode("3"), sp("<|assistant_end|>")]
    assert reply_text(Engine(tiny_gpt(), TOK), tokens) == "it is 3"


def test_max_samples_caps_captions_and_text_rows_exactly(setup):
    """--max-samples is a count of captions (text rows), not of whole batches."""
    from ghostvis.eval import caption_loss, text_bpb
    from ghostvis.checkpoint_io import load_pretrained

    model, tok, _ = load_pretrained(setup["ckpt"])
    captions = setup["data"] / "captions" / "val"
    full = caption_loss(model, tok, captions, batch_size=4, progress=False)
    assert full["samples"] > 5
    assert caption_loss(model, tok, captions, max_samples=5, batch_size=4, progress=False)["samples"] == 5
    assert caption_loss(model, tok, captions, max_samples=2, batch_size=4, progress=False)["samples"] == 2
    text = setup["data"] / "tokens" / "val"
    one_row = text_bpb(model, tok, text, seq_len=16, max_samples=1, batch_size=1, progress=False)
    three = text_bpb(model, tok, text, seq_len=16, max_samples=3, batch_size=2, progress=False)
    assert one_row["rows"] == 1 and three["rows"] == 3 and three["tokens"] == 3 * one_row["tokens"]


def test_the_header_says_which_directory_each_evaluation_read(tmp_path):
    from ghostvis.eval.report import read_from

    for d in ("vqa/val", "capsA/test", "capsB/val", "capsB/test"):
        (tmp_path / d).mkdir(parents=True)
    results = {"split": "test", "vqa": {"data": str(tmp_path / "vqa" / "val")},
               "caption": {"data": str(tmp_path / "flat")}, "text": {"data": str(tmp_path / "capsB" / "val")}}
    assert read_from(results) == (f"read vqa from {tmp_path / 'vqa' / 'val'} (no test/ split there), caption from "
                                  f"{tmp_path / 'flat'}, text from {tmp_path / 'capsB' / 'val'}")
    assert read_from({"split": "test", "vqa": {"overall": {}}}) == "read the given shards"  # no `data` recorded


def test_blanked_images_reach_the_model_as_one_constant_image(setup):
    image = Image.new("RGB", (64, 64), (200, 10, 10))
    assert blank_like(image).size == image.size
    assert blank_like(image).tobytes() == blank_like(Image.new("RGB", (64, 64), (0, 90, 0))).tobytes()
    model = tiny_vlm().train()  # as the training loop would hand it over
    test_dir = setup["data"] / "vqa" / "test"
    out = evaluate_vqa(model, TOK, test_dir, max_samples=8, batch_size=4, blank_images=True,
                       num_examples=8, progress=False)
    assert model.training  # restored for the loop
    assert out["blank_images"] and out["skipped"] == {} and out["overall"]["n"] == 8
    assert sum(e["n"] for e in out["per_type"].values()) == 8
    by_question: dict[str, set[str]] = {}
    for e in out["examples"]:
        by_question.setdefault(e["question"], set()).add(e["prediction"])
    repeated = [q for q in by_question if sum(e["question"] == q for e in out["examples"]) > 1]
    assert repeated  # "how many shapes are there?" comes twice in 8 samples
    assert all(len(by_question[q]) == 1 for q in repeated)  # same question + blank image = same answer


def test_eval_cli_end_to_end(setup, capsys):
    ckpt, data = setup["ckpt"], setup["data"]
    # in-process (a subprocess would spend most of the test importing torch and timm again)
    assert load_eval_cli().main(["--ckpt", str(ckpt), "--data", str(data), str(data / "tokens"), "--blank-images",
                                 "--max-samples", str(NUM_TEST), "--batch-size", "6", "--device", "cpu"]) == 0
    stdout = capsys.readouterr().out
    results = json.loads((ckpt / "eval.json").read_text())
    # the bigram model always says " Square.": right exactly where the reference answer is "square"
    refs = [json.loads(vqa_sample(0, "test", i, 64)["json"]) for i in range(NUM_TEST)]
    for qtype, entry in results["vqa"]["per_type"].items():
        answers = [r["answer"] for r in refs if r["type"] == qtype]
        assert entry["n"] == len(answers) == NUM_TEST // 4
        assert entry["correct"] == answers.count("square")
        assert results["vqa_blank"]["per_type"][qtype]["correct"] == entry["correct"]  # it never looked
        assert entry["top_answer"] == {"answer": "square", "share": 1.0}  # one answer to every question
    assert results["vqa"]["overall"]["n"] == NUM_TEST and results["vqa"]["overall"]["correct"] > 0
    assert results["vqa"]["per_type"]["shape"]["chance"] == pytest.approx(1 / 3)
    assert all(e["prediction"] == ANSWER for e in results["vqa"]["examples"])
    assert results["caption"]["data"].endswith(str(Path("captions") / "val"))  # no captions/test: val
    assert math.isfinite(results["caption"]["loss"]) and results["caption"]["loss"] > 0
    assert results["caption"]["samples"] == 6 and results["caption"]["tokens"] > 6
    assert results["text"]["bpb"] > 0 and results["text"]["bytes"] > 0
    assert (results["stage"], results["step"], results["split"]) == ("sft", 3, "test")
    assert "| shape | 3 |" in stdout and "chance" in stdout and "text bits per byte" in stdout
    assert f"read vqa from {data / 'vqa' / 'test'}, caption from {data / 'captions' / 'val'} (no test/ split " in stdout
    report = (ckpt / "report.md").read_text()
    for png in ("accuracy.png", "training_curves.png"):
        assert f"({png})" in report
        with Image.open(ckpt / png) as im:
            assert im.format == "PNG" and im.width > 100
    assert "image blanked" in report and "stage `sft`" in report
    assert "| square (100.0%) | square (100.0%) |" in report  # the most given answer, with and without the image


def test_training_log_keeps_the_last_record_of_a_step(setup):
    series = read_metrics(setup["ckpt"] / "metrics.jsonl")
    assert series["loss"] == [(1, 5.0), (2, 4.0), (3, 9.9)]  # the resumed run re-logged step 3
    assert list(series)[:2] == ["loss", "val_bpb"] and series["val_bpb"] == [(3, 2.0)]
    assert "mfu" not in series  # None values are not plotted


def test_wrong_stage_checkpoint_gives_a_clear_error(setup, tmp_path, capsys):
    cli = load_eval_cli()
    vqa_test = setup["data"] / "vqa" / "test"
    assert cli.main(["--ckpt", str(setup["text_ckpt"]), "--data", str(vqa_test), "--report-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "text-only model" in err and "stage base" in err and "vision_pretrain, sft or rl" in err
    assert not (tmp_path / "eval.json").exists()
    # a whole data root: the text-only model is scored on text, and the visual QA is listed as not run
    assert cli.main(["--ckpt", str(setup["text_ckpt"]), "--data", str(setup["data"]), str(setup["data"] / "tokens"),
                     "--max-samples", "2", "--report-dir", str(tmp_path), "--no-report"]) == 0
    results = json.loads((tmp_path / "eval.json").read_text())
    assert "text" in results and "vqa" not in results and "caption" not in results
    assert "text-only model" in results["not_run"]["vqa"] and "not run" in capsys.readouterr().out
    assert cli.main(["--ckpt", str(tmp_path / "nothing"), "--data", str(vqa_test)]) == 2
    assert "cannot load --ckpt" in capsys.readouterr().err
