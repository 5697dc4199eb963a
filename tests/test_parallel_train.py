"""3D parallelism through the trainer, on CPU ranks with gloo: TP=2 and PP=2 train exactly like one rank,
TP=2 × DP=2 on four ranks learns, and a ZeRO-2 checkpoint from two ranks resumes on one (universal)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_ranks
from safetensors.torch import load_file
from conftest import TRAIN, losses, train_args

import ghostvis
from ghostvis.config import get_preset
from ghostvis.model.gpt import GPT
from ghostvis.parallel import Topology
from ghostvis.train import checkpoint, engine as ds_engine
from ghostvis.train.settings import Settings
from ghostvis.train.stages import STAGES

# ZeRO-1 (the most the pipeline engine allows), 2 micro-batches per step = 2 pipeline micro-batches
SAME_RUN = ("--steps", "3", "--save-every", "0", "--grad-accum", "2")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "llm.safetensors")), load_file(str(b / "llm.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=2e-5, msg=name)


def test_tp2_and_pp2_train_like_one_rank(tmp_path, text_data, tiny_tokenizer_dir):
    runs = {}
    for name, nproc, flags in (("one", 1, ()), ("tp2", 2, ("--tp", "2")), ("pp2", 2, ("--pp", "2"))):
        runs[name] = tmp_path / name
        run_ranks(TRAIN, train_args(text_data, tiny_tokenizer_dir, runs[name], "zero1.json", *SAME_RUN, *flags),
                  nproc=nproc)
    ref = metrics(runs["one"])
    assert len(ref) == 3 and ref[-1]["loss"] < ref[0]["loss"]
    for name in ("tp2", "pp2"):
        got = metrics(runs[name])
        # same initial weights (full init, then sharded / staged), same batches, same update: the loss, the
        # clipped gradient norm (replicated weights counted once under TP) and the final weights all agree
        for r, g in zip(ref, got, strict=True):
            assert g["loss"] == pytest.approx(r["loss"], rel=1e-5), name
            assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-4), name
        assert_same_weights(runs["one"], runs[name])  # the export gathers TP shards / merges stages
        assert not list(runs[name].glob(".export-stage*"))
    assert "Topology(tp=1, pp=2, dp=1)" in (runs["pp2"] / "run_log.md").read_text()


def test_tp2_dp2_on_four_ranks_learns(tmp_path, text_data, tiny_tokenizer_dir):
    out = tmp_path / "tp2dp2"
    run_ranks(TRAIN, train_args(text_data, tiny_tokenizer_dir, out, "zero1.json", "--tp", "2", "--steps", "6",
                                "--micro-batch", "2", "--save-every", "0"), nproc=4)
    curve = losses(out)
    assert len(curve) == 6 and curve[-1] < curve[0] - 0.5
    log = (out / "run_log.md").read_text()
    assert "4 rank(s) as Topology(tp=2, pp=1, dp=2)" in log and "4 sequences of 64 tokens per step" in log
    model, _, cfg = ghostvis.load_pretrained(out)  # full-size weights from the TP shards
    assert model.wte.weight.shape == (cfg.padded_vocab_size, cfg.n_embd)


def _engine(tokenizer, universal: bool):
    torch.manual_seed(1)  # other weights than the checkpoint's, so the load must overwrite them
    cfg, _ = get_preset("tiny", vocab_size=tokenizer.vocab_size)
    model = GPT(cfg)
    lrs = {name: 3e-3 for name in STAGES["base"].lr_names}
    settings = Settings.of(STAGES["base"], {**STAGES["base"].defaults, **lrs, "weight_decay": 0.1})
    groups = ds_engine.build_param_groups(model, STAGES["base"], settings, cfg.n_layer)
    ds_config = ds_engine.build_ds_config(ds_engine.load_ds_config(REPO / "ds_configs" / "zero2.json"), micro_batch=4,
                                          grad_accum=1, world_size=1, grad_clip=1.0, dtype="fp32", universal=universal)
    return model, ds_engine.initialize(model, groups, ds_config, "cpu")


def test_zero2_checkpoint_of_two_ranks_resumes_on_one(tmp_path, text_data, tiny_tokenizer_dir, tiny_tokenizer, world1,
                                                      capsys):
    out = tmp_path / "run"
    args = ("--steps", "7", "--save-every", "4")
    run_ranks(TRAIN, train_args(text_data, tiny_tokenizer_dir, out, "zero2.json", *args, "--stop-at", "4"))
    at_step4 = load_file(str(out / "llm.safetensors"))  # exported right after the step-4 checkpoint

    # in this process (one rank): the conversion happens once, and the load restores step 4's weights
    layout = {"tp": 1, "pp": 1, "dp": 1}
    assert checkpoint.prepare_universal(out, layout)
    assert "saved with 2 data-parallel replica(s), on 1: loading it as DeepSpeed's universal checkpoint" \
        in capsys.readouterr().out  # the user is told why this resume takes longer and where the copy goes
    assert (out / "ckpt" / "step-00000004_universal").is_dir() and not (out / "ckpt" / "latest_universal").exists()
    model, engine = _engine(tiny_tokenizer, universal=True)
    state = checkpoint.load(engine, out, universal=True)
    assert state["step"] == 4 and state["layout"] == {"tp": 1, "pp": 1, "dp": 2}
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), at_step4[name], rtol=0, atol=0, msg=name)
    with pytest.raises(checkpoint.CheckpointError, match="saved with --tp 1 --pp 1, this run has --tp 2"):
        checkpoint.prepare_universal(out, {"tp": 2, "pp": 1, "dp": 1})

    # the trainer on one rank picks the universal checkpoint up by itself and trains on
    shutil.rmtree(out / "ckpt" / "step-00000004_universal")  # ... converting it itself
    run_ranks(TRAIN, train_args(text_data, tiny_tokenizer_dir, out, "zero2.json", *args), nproc=1)
    curve = losses(out)
    assert len(curve) == 7 and all(math.isfinite(x) for x in curve)
    assert "resumed at step 4" in (out / "run_log.md").read_text()
    assert checkpoint.read_latest(out) == "step-00000007"
    saved = json.loads((out / "ckpt" / "step-00000007" / "client_state_rank0.json").read_text())
    assert saved["layout"] == layout and saved["world_size"] == 1


def test_layout_errors_name_the_flag(world1):
    topo = Topology()
    assert (topo.tp_size, topo.pp_size, topo.dp_size, topo.tp_group, topo.model_parallel) == (1, 1, 1, None, False)
    with pytest.raises(ValueError, match=r"--tp 2 × --pp 1 = 2 does not divide the world size 1"):
        Topology(tp=2)
    cfg = ds_engine.load_ds_config(REPO / "ds_configs" / "zero2.json")
    with pytest.raises(ds_engine.ConfigError, match="--pp 2 with ZeRO stage 2.*ZeRO stage 0 or 1.*zero1.json"):
        ds_engine.check_pipeline_zero(cfg, 2, "ds_configs/zero2.json")
    ds_engine.check_pipeline_zero(cfg, 1, "ds_configs/zero2.json")  # ZeRO-2 without pipeline stages is fine
    z3 = ds_engine.load_ds_config(REPO / "ds_configs" / "zero3.json")
    with pytest.raises(ds_engine.ConfigError, match="--compile with ZeRO stage 3.*drop --compile"):
        ds_engine.check_compile(z3, True, True, "ds_configs/zero3.json")
    ds_engine.check_compile(z3, True, False, "ds_configs/zero3.json")  # a text model may try
    ds_engine.check_compile(cfg, True, True, "ds_configs/zero2.json")
    for tp, pp in ((2, 1), (1, 2)):  # compiled TP/PP collectives are not verified to learn
        with pytest.raises(ds_engine.ConfigError, match=f"--compile with --tp {tp} --pp {pp} is not verified.*drop"):
            ds_engine.check_compile(cfg, True, False, "ds_configs/zero2.json", tp, pp)
    ds_engine.check_compile(cfg, False, False, "ds_configs/zero2.json", 2, 2)
    from ghostvis.model.pipeline import GPTPipe

    tiny = get_preset("tiny")[0]
    with pytest.raises(ValueError, match="--activation-checkpointing 1: a block count is for --pp 1"):
        GPTPipe(tiny, None, topo.grid, None, activation_checkpointing=1)


def test_pipeline_front_embeds_like_the_gpt():
    """The first pipeline stage's embedding (text-only, `(idx,)` and `(idx, vision tokens)` inputs) is
    GPT.embed's, image splice included."""
    from ghostvis.model.pipeline import PipeEmbed

    cfg, _ = get_preset("tiny", image_token_id=5)
    torch.manual_seed(0)
    gpt, front = GPT(cfg), PipeEmbed(cfg, None)
    front.wte.load_state_dict(gpt.wte.state_dict())
    text, idx, images = torch.tensor([[1, 3, 4, 2]]), torch.tensor([[1, 5, 5, 2]]), torch.randn(1, 2, cfg.n_embd)
    assert torch.equal(front(text), gpt.embed(text)) and torch.equal(front((text,)), gpt.embed(text))
    assert torch.equal(front((idx, images)), gpt.embed(idx, images))
    assert not torch.equal(front((idx, images)), gpt.embed(idx, torch.zeros_like(images)))
