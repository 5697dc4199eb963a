"""LoRA (ghostvis/lora.py) through launch/train.py's run, in this process (one rank, gloo, ZeRO-2 on CPU): a
run learns with only the adapters training, the adapter file reproduces the merged export's logits, a
stopped and resumed run is exact, a target pattern that matches nothing is refused; and a 2-rank ZeRO-3 run
(torchrun) whose partitioned adapters are gathered and merged."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, TRAIN, losses, parse, run_ranks, train_args
from safetensors.torch import load_file

import ghostvis
from ghostvis import lora
from ghostvis.checkpoint_io import export
from ghostvis.config import get_preset
from ghostvis.model.gpt import GPT
from ghostvis.train import engine as ds_engine, loop


@pytest.fixture(scope="module")
def base_export(tmp_path_factory, tiny_tokenizer):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("lora") / "base"
    gpt = GPT(get_preset("tiny", vocab_size=tiny_tokenizer.vocab_size)[0])
    with torch.no_grad():  # a random head is near zero and, frozen, would cap how peaked the logits can get
        for name, param in gpt.named_parameters():
            if name.startswith(("lm_head.", "wte.")):
                param.mul_(30)
    export(gpt, out, tokenizer=tiny_tokenizer, extra={"stage": "base", "step": 1})
    return out


def _run(base, text_data, tok_dir, out, *extra):
    args = parse("--stage", "base", "--init-from", base, "--data", text_data, "--tokenizer", tok_dir, "--out", out,
                 "--ds_config", REPO / "ds_configs" / "zero2.json", "--micro-batch", "4", "--seq-len", "64",
                 "--lr", "1e-2", "--warmup", "2", "--schedule", "constant", "--eval-every", "0",
                 "--lora-rank", "8", "--lora-alpha", "16", *extra)
    return loop.run(args)


def test_lora_learns_saves_adapter_and_merges(tmp_path, base_export, text_data, tiny_tokenizer_dir, world1):
    out = tmp_path / "run"
    _run(base_export, text_data, tiny_tokenizer_dir, out, "--steps", "16", "--save-every", "0")
    curve = losses(out)
    assert len(curve) == 16 and sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.5

    before, after = load_file(str(base_export / "llm.safetensors")), load_file(str(out / "llm.safetensors"))
    assert before.keys() == after.keys()  # the export is a plain model: adapters merged, none left
    for key in before:  # only the adapted projections changed
        adapted = key.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                                "gate_proj.weight", "up_proj.weight", "down_proj.weight"))
        assert torch.equal(before[key], after[key]) != adapted, key

    adapter = load_file(str(out / lora.ADAPTER_FILE))
    assert len(adapter) == 2 * 7 * 2 and all(k.endswith((".lora_A", ".lora_B")) for k in adapter)
    model = ghostvis.load_pretrained(base_export)[0]  # base + adapter file == the merged export
    lora.add_lora(model, 8, 16)
    lora.load_adapter(model, str(out))  # a path as a user types it
    merged = ghostvis.load_pretrained(out)[0]
    ids = torch.randint(0, 200, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), model(ids), rtol=1e-4, atol=1e-4)


def test_lora_resume_is_exact(tmp_path, base_export, text_data, tiny_tokenizer_dir, world1):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("--steps", "6", "--save-every", "3")
    _run(base_export, text_data, tiny_tokenizer_dir, straight, *common)
    _run(base_export, text_data, tiny_tokenizer_dir, resumed, *common, "--stop-at", "3")
    _run(base_export, text_data, tiny_tokenizer_dir, resumed, *common)
    assert losses(resumed) == losses(straight)
    for name in ("llm.safetensors", lora.ADAPTER_FILE):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_lora_zero3_two_ranks_merges_the_gathered_adapter(tmp_path, base_export, text_data, tiny_tokenizer_dir):
    out = tmp_path / "z3"
    run_ranks(TRAIN, train_args(text_data, tiny_tokenizer_dir, out, "zero3.json", "--init-from", base_export,
                                "--steps", "4", "--save-every", "0", "--lr", "1e-2", "--lora-rank", "4"))
    adapter = load_file(str(out / lora.ADAPTER_FILE))
    assert all(v.norm() > 0 for k, v in adapter.items() if k.endswith("lora_B"))  # trained, whole (gathered)
    model = ghostvis.load_pretrained(base_export)[0]
    lora.add_lora(model, 4, 4)
    lora.load_adapter(model, out)
    ids = torch.randint(0, 200, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ghostvis.load_pretrained(out)[0](ids), model(ids), rtol=1e-4, atol=1e-4)


def test_lora_target_matching_nothing_is_refused(tmp_path, base_export, text_data, tiny_tokenizer_dir, world1):
    with pytest.raises(ds_engine.ConfigError, match=r"--lora-targets 'qkv_proj' matches no linear layer.*blocks\.0"):
        _run(base_export, text_data, tiny_tokenizer_dir, tmp_path / "bad", "--lora-targets", "qkv_proj",
             "--steps", "1")
