"""Training: 2-rank DeepSpeed runs on CPU (ZeRO-2, ZeRO-3), exact resume, freezing rules, settings errors."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import REPO, TOK, TRAIN, losses, parse, run_one, run_ranks, tiny_vlm, train_args
from safetensors.torch import load_file

import ghostvis
from ghostvis.config import get_preset
from ghostvis.model.gpt import GPT
from ghostvis.model.vlm import VLM
from ghostvis.train import checkpoint, engine as ds_engine, loop
from ghostvis.train.schedule import lr_multiplier
from ghostvis.train.settings import Settings
from ghostvis.train.stages import DATA_KINDS, LOSS_KINDS, STAGES, ParamRule, Stage


def test_zero2_two_ranks_learns_and_resumes_exactly(tmp_path, text_data, tiny_tokenizer_dir, world1):
    common = ["--steps", "12", "--save-every", "4"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_ranks(TRAIN, train_args(text_data, tiny_tokenizer_dir, straight, "zero2.json", *common))
    run_ranks(TRAIN, train_args(text_data, tiny_tokenizer_dir, resumed, "zero2.json", *common, "--stop-at", "6"))
    assert checkpoint.read_latest(resumed) == "step-00000006"
    run_ranks(TRAIN, train_args(text_data, tiny_tokenizer_dir, resumed, "zero2.json", *common))

    curve = losses(straight)
    assert len(curve) == 12 and curve[-1] < curve[0] - 1.0
    assert losses(resumed) == curve  # steps 1-6, then 7-12 after the resume
    a, b = load_file(str(straight / "llm.safetensors")), load_file(str(resumed / "llm.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # --keep 3: step 4 is gone, 8 and 12 kept; both ranks wrote their client state
    assert sorted(p.name for p in (straight / "ckpt").glob("step-*")) == [f"step-{s:08d}" for s in (4, 8, 12)]
    assert {p.name for p in (straight / "ckpt" / "step-00000012").glob("client_state_rank*.json")} == {
        "client_state_rank0.json", "client_state_rank1.json"}
    assert "attention: expand" in (straight / "run_log.md").read_text()  # the kernel that ran is named
    # this process is a world of one: the 2-rank ZeRO state must go through the universal conversion
    with pytest.raises(checkpoint.CheckpointError, match="(?s)saved by 2 ranks.*ds_to_universal.*--universal"):
        checkpoint.load(None, straight)


def test_zero3_two_ranks_learns_and_exports(tmp_path, text_data, tiny_tokenizer_dir):
    out = tmp_path / "z3"
    run_ranks(TRAIN, train_args(text_data, tiny_tokenizer_dir, out, "zero3.json", "--steps", "10",
                                "--save-every", "0", "--eval-every", "5", "--eval-batches", "3"))
    curve = losses(out)
    assert curve[-1] < curve[0] - 1.0
    bpb = [json.loads(line).get("val_bpb") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert bpb[4] is not None and bpb[9] is not None and bpb[9] < bpb[4]
    model, tok, cfg = ghostvis.load_pretrained(out)  # the export gathers ZeRO-3's partitioned weights
    assert not model.training and cfg.n_layer == 2
    ids = torch.tensor([tok.encode("The quick brown fox", prepend=tok.bos_token_id)])
    assert model(ids).shape == (1, ids.shape[1], tok.vocab_size)


def tiny_engine(stage: Stage, ds_file: str, lrs: dict[str, float], tokenizer) -> tuple[GPT, object]:
    torch.manual_seed(0)
    cfg, _ = get_preset("tiny", vocab_size=tokenizer.vocab_size)
    model = GPT(cfg)
    groups = ds_engine.build_param_groups(model, stage, Settings(lrs, weight_decay=0.1), cfg.n_layer)
    ds_config = ds_engine.build_ds_config(ds_engine.load_ds_config(REPO / "ds_configs" / ds_file), micro_batch=2,
                                          grad_accum=1, world_size=1, grad_clip=1.0, dtype="fp32")
    return model, ds_engine.initialize(model, groups, ds_config, "cpu")


def random_batches(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        rows = torch.randint(0, vocab, (2, 17), generator=g)
        yield rows[:, :-1], rows[:, 1:]


def test_frozen_rules_keep_weights_and_stay_out_of_the_optimizer(world1, tiny_tokenizer):
    stage = Stage("only_block1", "text-tokens", "lm", (ParamRule(r"blocks\.1\.", "llm_lr", weight_decay=True),))
    model, engine = tiny_engine(stage, "zero2.json", {"llm_lr": 1e-2}, tiny_tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = random_batches(tiny_tokenizer.vocab_size)
    for _ in range(3):
        loop.train_step(engine, batches, loop.lm_loss, 1)
    trained = {n for g in engine.optimizer.param_groups for n in g["param_names"]}
    assert trained and all(n.startswith("blocks.1.") for n in trained)
    for name, p in model.named_parameters():
        if name.startswith("blocks.1."):
            assert p.requires_grad and not torch.equal(p, before[name]), name
        else:
            assert not p.requires_grad and torch.equal(p, before[name]), name
    # ZeRO-2's fp32 master partitions hold exactly the trainable weights
    masters = sum(t.numel() for t in engine.optimizer.single_partition_of_fp32_groups)
    assert masters >= sum(model.get_parameter(n).numel() for n in trained)
    assert masters < sum(p.numel() for p in model.parameters())


class Step:
    """The smallest training state a checkpoint saves and restores."""

    def __init__(self, step: int = 0) -> None:
        self.step = step

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


def test_failed_save_leaves_previous_checkpoint_loadable(world1, tiny_tokenizer, tmp_path, monkeypatch):
    model, engine = tiny_engine(STAGES["base"], "zero2.json",
                                {"embed_lr": 1e-2, "head_lr": 1e-2, "llm_lr": 1e-2}, tiny_tokenizer)
    batches = random_batches(tiny_tokenizer.vocab_size)
    loop.train_step(engine, batches, loop.lm_loss, 1)
    checkpoint.save(engine, tmp_path, 1, Step(1), keep=2)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    loop.train_step(engine, batches, loop.lm_loss, 1)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:  # the disk fills while DeepSpeed writes its files
        m.setattr(torch, "save", disk_full)
        with pytest.raises(checkpoint.CheckpointError, match="No space left.*still names the previous"):
            checkpoint.save(engine, tmp_path, 2, Step(2), keep=2)
    with monkeypatch.context() as m:  # every file written, then publishing fails
        m.setattr(os, "replace", disk_full)
        with pytest.raises(checkpoint.CheckpointError, match="publishing.*still names the previous"):
            checkpoint.save(engine, tmp_path, 2, Step(2), keep=2)
    assert checkpoint.read_latest(tmp_path) == "step-00000001"
    assert not any(torch.equal(p, saved[n]) for n, p in model.named_parameters() if p.requires_grad)

    restored = Step()
    client = checkpoint.load(engine, tmp_path, restored)
    assert restored.step == 1 and client["world_size"] == 1
    assert all(torch.equal(p, saved[n]) for n, p in model.named_parameters())
    checkpoint.save(engine, tmp_path, 3, Step(3), keep=2)  # a good save clears the failed leftovers
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.is_dir()) == ["step-00000001", "step-00000003"]

    # saving step 3 again (e.g. `--resume none` into the same --out) sets the old copy aside first; a crash
    # before the new copy is in place must not lose the checkpoint `latest` names
    real_replace = os.replace

    def crash_on_new_copy(src, dst):
        if Path(src).name.startswith("tmp-"):
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", crash_on_new_copy)
        with pytest.raises(checkpoint.CheckpointError, match="publishing"):
            checkpoint.save(engine, tmp_path, 3, Step(3), keep=2)
    assert not (tmp_path / "ckpt" / "step-00000003").exists()
    assert checkpoint.read_latest(tmp_path) == "step-00000003"  # restored from the set-aside copy
    assert checkpoint.load(engine, tmp_path)["step"] == 3


def test_batch_settings_must_match_world_size():
    assert ds_engine.batch_sizes(4, None, 32, 2) == (4, 32)
    assert ds_engine.batch_sizes(4, 2, None, 2) == (2, 16)
    with pytest.raises(ds_engine.ConfigError, match=r"--global-batch 20 != --micro-batch 4 × --grad-accum 3 × world size 2"):
        ds_engine.batch_sizes(4, 3, 20, 2)
    with pytest.raises(ds_engine.ConfigError, match="--global-batch 30 is not divisible by --micro-batch 4"):
        ds_engine.batch_sizes(4, None, 30, 2)


def test_a_gpu_kernel_on_cpu_is_one_line_error(tmp_path, text_data, tiny_tokenizer_dir):
    proc = run_one(TRAIN, train_args(text_data, tiny_tokenizer_dir, tmp_path / "x", "zero1.json", "--steps", "1",
                                     "--attention", "cudnn"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "error: --attention cudnn needs a CUDA device" in proc.stderr and "use --attention auto" in proc.stderr


def test_stop_at_before_the_first_step_is_refused():
    for stop in ("6", "9"):  # past --steps: the run ends at --steps (a job array's last chunk)
        loop.check_stop_at(parse("--data", "d", "--out", "o", "--steps", "6", "--stop-at", stop))
    with pytest.raises(ds_engine.ConfigError, match="--stop-at 0: give a step from 1"):
        loop.check_stop_at(parse("--data", "d", "--out", "o", "--steps", "6", "--stop-at", "0"))


def test_ds_config_file_may_not_set_batch_or_optimizer(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ds_engine.ConfigError, match=r"bad.json: remove 'train_batch_size'.*--micro-batch"):
        ds_engine.load_ds_config(bad)
    bad.write_text(json.dumps({"scheduler": {"type": "WarmupLR"}}))
    with pytest.raises(ds_engine.ConfigError, match="per-group learning rates"):
        ds_engine.load_ds_config(bad)
    cfg = ds_engine.build_ds_config(ds_engine.load_ds_config(REPO / "ds_configs" / "zero3.json"), micro_batch=2,
                                    grad_accum=3, world_size=4, grad_clip=0.5, dtype="bf16", universal=True)
    assert (cfg["train_batch_size"], cfg["gradient_clipping"], cfg["bf16"]["enabled"]) == (24, 0.5, True)
    assert cfg["checkpoint"]["load_universal"] is True


def test_a_shipped_ds_config_is_found_from_any_working_directory(tmp_path, monkeypatch):
    """`--ds_config ds_configs/zero2.json` (the canonical command, the recipes) names the shipped file relative to
    the checkout; run from elsewhere it still loads it. A file of that name in the working directory wins; a path
    elsewhere is never redirected, and a missing one lists what ships."""
    shipped = ds_engine.load_ds_config(REPO / "ds_configs" / "zero2.json")
    monkeypatch.chdir(tmp_path)
    assert ds_engine.load_ds_config("ds_configs/zero2.json") == shipped == ds_engine.load_ds_config("zero2.json")
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "zero2.json").write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert ds_engine.load_ds_config("ds_configs/zero2.json") == {"zero_optimization": {"stage": 1}}
    from ghostvis.plan import ds_bucket_settings

    assert ds_bucket_settings(3, False, "ds_configs/zero3.json") == ds_bucket_settings(3, False)  # the planner too
    with pytest.raises(ds_engine.ConfigError, match=r"--ds_config mine/zero2.json: no such file \(shipped in "
                                                    r"ds_configs/: .*zero1.json, zero2.json"):
        ds_engine.load_ds_config("mine/zero2.json")


def test_every_data_kind_and_loss_has_a_builder():
    assert set(loop.DATA_BUILDERS) == set(DATA_KINDS) and set(loop.LOSSES) == set(LOSS_KINDS)


def test_lr_schedule_shapes():
    kw = dict(total=100, warmup=10)
    assert lr_multiplier(0, schedule="constant", **kw) == pytest.approx(0.1)
    assert lr_multiplier(50, schedule="constant", **kw) == 1.0
    assert lr_multiplier(79, schedule="warmdown", warmdown=0.2, **kw) == 1.0
    assert lr_multiplier(90, schedule="warmdown", warmdown=0.2, **kw) == pytest.approx(0.5)
    assert lr_multiplier(99, schedule="cosine", **kw) < 0.01 < lr_multiplier(55, schedule="cosine", **kw) == pytest.approx(0.5)


def test_micro_batches_weigh_by_loss_tokens(world1, tiny_tokenizer):
    """Conversation batches of different lengths: the step's loss is the mean over all loss tokens, not the
    mean of the micro-batch means (which would overweight the short one)."""
    torch.manual_seed(0)
    cfg, _ = get_preset("tiny", vocab_size=tiny_tokenizer.vocab_size)
    model = GPT(cfg)
    stage = STAGES["base"]
    settings = Settings.of(stage, {**stage.defaults, "embed_lr": 0.0, "head_lr": 0.0, "llm_lr": 0.0,
                                   "weight_decay": 0.0})
    groups = ds_engine.build_param_groups(model, stage, settings, cfg.n_layer)
    ds_config = ds_engine.build_ds_config(ds_engine.load_ds_config(REPO / "ds_configs" / "zero2.json"),
                                          micro_batch=2, grad_accum=2, world_size=1, grad_clip=1.0, dtype="fp32")
    engine = ds_engine.initialize(model, groups, ds_config, "cpu")
    g = torch.Generator().manual_seed(1)
    micro = []
    for n_loss in (3, 29):  # a short and a long answer
        ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
        targets = torch.full((2, 16), -1)
        targets.view(-1)[:n_loss] = torch.randint(0, cfg.vocab_size, (n_loss,), generator=g)
        micro.append({"input_ids": ids, "targets": targets, "num_tokens": 32, "num_loss_tokens": n_loss})
    assert loop.loss_token_weights(engine, micro) == pytest.approx([2 * 3 / 32, 2 * 29 / 32])
    with torch.no_grad():
        sums = [float(model(b["input_ids"], b["targets"], reduction="sum")) for b in micro]
    result = loop.train_step(engine, iter(micro), loop.lm_loss, 2)
    assert result.loss == pytest.approx(sum(sums) / 32, rel=1e-5)
    means = [s / n for s, n in zip(sums, (3, 29))]
    # the unweighted mean would differ, by far more than the tolerance above
    assert abs(result.loss - sum(means) / 2) > 1e-3 * result.loss


def test_resume_check_reads_client_states_whose_config_held_run_settings(tmp_path):
    """Checkpoints written when ModelConfig carried activation_checkpointing still resume; another
    architecture is still refused, naming the field."""
    import dataclasses

    cfg = get_preset("tiny")[0]
    tag = checkpoint.step_tag(5)
    (tmp_path / "ckpt" / tag).mkdir(parents=True)
    (tmp_path / "ckpt" / "latest").write_text(tag)
    saved = {"stage": "base", "model": {**cfg.to_dict(), "activation_checkpointing": True}}
    (tmp_path / "ckpt" / tag / "client_state_rank0.json").write_text(json.dumps(saved))
    loop.check_resumable(tmp_path, "base", cfg)
    with pytest.raises(checkpoint.CheckpointError, match="holds a base run of another model.*n_layer 2 vs 3"):
        loop.check_resumable(tmp_path, "base", dataclasses.replace(cfg, n_layer=3))


def test_resume_check_compares_the_vision_tower(tmp_path):
    """A checkpoint records its tower: resuming with another one (vlm_small's earlier class-token encoder, say)
    is refused naming the field; a checkpoint from before towers were recorded is compared on the LLM only; an
    MLP's width given as a number resumes under LLM_WIDTH (-1), the same width."""
    import dataclasses

    cfg, cnn = get_preset("vlm_tiny_cnn")
    tag = checkpoint.step_tag(5)
    (tmp_path / "cnn" / "ckpt" / tag).mkdir(parents=True)
    (tmp_path / "cnn" / "ckpt" / "latest").write_text(tag)
    explicit = dataclasses.replace(cnn, projector_hidden=cfg.n_embd)
    (tmp_path / "cnn" / "ckpt" / tag / "client_state_rank0.json").write_text(json.dumps(
        {"stage": "sft", "model": cfg.to_dict(), "vision": explicit.to_dict()}))
    assert cnn.projector_hidden == -1
    loop.check_resumable(tmp_path / "cnn", "sft", cfg, cnn)
    with pytest.raises(checkpoint.CheckpointError, match=f"vision projector_hidden {cfg.n_embd} vs {2 * cfg.n_embd}"):
        loop.check_resumable(tmp_path / "cnn", "sft", cfg, dataclasses.replace(cnn, projector_hidden=2 * cfg.n_embd))

    # vlm_small before its perceiver took the LLM's heads and ffn width (6 and 2688, given as numbers): the same
    # tower at its d12; at another depth another model, refused as such (each tower resolved on its own LLM)
    d12, small = get_preset("vlm_small")
    (tmp_path / "cnn" / "ckpt" / tag / "client_state_rank0.json").write_text(json.dumps(
        {"stage": "sft", "model": d12.to_dict(),
         "vision": dataclasses.replace(small, resampler_heads=6, projector_hidden=2688).to_dict()}))
    loop.check_resumable(tmp_path / "cnn", "sft", d12, small)
    d20 = get_preset("vlm_small", 20)[0]
    with pytest.raises(checkpoint.CheckpointError, match="another model.*n_embd 768 vs 1280"):
        loop.check_resumable(tmp_path / "cnn", "sft", d20, small)

    cfg, vision = get_preset("vlm_tiny")
    tag = checkpoint.step_tag(5)
    (tmp_path / "ckpt" / tag).mkdir(parents=True)
    (tmp_path / "ckpt" / "latest").write_text(tag)
    state = tmp_path / "ckpt" / tag / "client_state_rank0.json"
    state.write_text(json.dumps({"stage": "sft", "model": cfg.to_dict(), "vision": vision.to_dict()}))
    loop.check_resumable(tmp_path, "sft", cfg, vision)
    other = dataclasses.replace(vision, encoder_kwargs={**vision.encoder_kwargs, "class_token": True})
    with pytest.raises(checkpoint.CheckpointError, match="another model.*vision encoder_kwargs"):
        loop.check_resumable(tmp_path, "sft", cfg, other)
    state.write_text(json.dumps({"stage": "sft", "model": cfg.to_dict()}))
    loop.check_resumable(tmp_path, "sft", cfg, other)


def test_init_shrink_starts_the_blocks_shrunk_and_perturbed(tmp_path):
    from ghostvis import checkpoint_io
    from ghostvis.train.settings import resolve_settings

    base = tiny_vlm(seed=1)
    with torch.no_grad():  # a "trained" base: far from any initial weights
        for p in base.parameters():
            p.add_(torch.randn_like(p))
    export_dir = tmp_path / "base"
    checkpoint_io.export(base, export_dir, tokenizer=TOK)

    def start(*flags: str) -> torch.nn.Module:
        args = parse("--stage", "sft", "--data", tmp_path, "--out", tmp_path / "run", "--init-from", export_dir,
                     "--seq-len", "64", "--seed", "5", *flags)
        stage = STAGES["sft"]
        return loop.starting_model(args, stage, TOK, resolve_settings(stage, args))

    plain, shrunk = start(), start("--init-shrink", "0.5", "--init-perturb", "0.2")
    fresh = GPT(plain.llm.config, seed=5).state_dict()  # the initial weights of this run's seed
    changed = 0
    for name, value in shrunk.state_dict().items():
        start_value = plain.state_dict()[name]
        if name.startswith("llm.blocks."):
            torch.testing.assert_close(value, 0.5 * start_value + 0.2 * fresh[name.removeprefix("llm.")])
            changed += 1
        else:  # embeddings, head, final norm and the tower keep the export's weights
            assert torch.equal(value, start_value), name
    assert changed == len([n for n in fresh if n.startswith("blocks.")])
    default = start("--init-shrink", "0.5").llm.state_dict()["blocks.0.mlp.up_proj.weight"]
    torch.testing.assert_close(default, 0.5 * plain.llm.state_dict()["blocks.0.mlp.up_proj.weight"]
                               + 0.1 * fresh["blocks.0.mlp.up_proj.weight"])

    # shrunk blocks that would not train are refused
    with pytest.raises(ds_engine.ConfigError, match="--freeze llm keeps the shrunk blocks"):
        start("--init-shrink", "0.5", "--freeze", "llm")
    with pytest.raises(ds_engine.ConfigError, match=r"only the last 1 of \d+ blocks train"):
        start("--init-shrink", "0.5", "--train-llm-layers", "1")
    with pytest.raises(ds_engine.ConfigError, match="LoRA freezes the shrunk blocks"):
        start("--init-shrink", "0.5", "--lora-rank", "4")
    with pytest.raises(ds_engine.ConfigError, match="--init-shrink shrinks the weights of --init-from"):
        loop.init_shrink_perturb(parse("--data", tmp_path, "--out", tmp_path, "--init-shrink", "0.5"))
    with pytest.raises(ds_engine.ConfigError, match="give --init-shrink S too"):
        loop.init_shrink_perturb(parse("--data", tmp_path, "--out", tmp_path, "--init-from", export_dir,
                                       "--init-perturb", "0.1"))
    for zero_or_nothing, why in ((("0", "0"), "would zero every block weight"), (("1", "0"), "changes nothing")):
        with pytest.raises(ds_engine.ConfigError, match=why):
            loop.init_shrink_perturb(parse("--data", tmp_path, "--out", tmp_path, "--init-from", export_dir,
                                           "--init-shrink", zero_or_nothing[0], "--init-perturb", zero_or_nothing[1]))
    with pytest.raises(SystemExit):
        parse("--data", tmp_path, "--out", tmp_path, "--init-from", export_dir, "--init-shrink", "1.5")


def test_engine_steps_a_vlm_as_adamw_does_counting_a_missing_gradient_as_zero(world1):
    """The learning check at its smallest: a ZeRO-1 engine (fp32, CPU) trains a VLM with a BatchNorm tower
    exactly as torch's AdamW with the same groups and clipping, over image, text-only and image-free batches
    (an SFT mixture's). On a text-only batch the tower gets no gradient: DeepSpeed still steps it with a zero
    one (its momentum carries on), where AdamW alone would skip it, so the reference does the same."""
    import copy

    torch.manual_seed(0)
    cfg, vcfg = get_preset("vlm_tiny_cnn", vocab_size=TOK.vocab_size, image_token_id=TOK.image_token_id)
    model = VLM(dataclasses.replace(cfg, n_layer=2), vcfg, freeze_encoder=False)
    ref = copy.deepcopy(model)
    settings = Settings({"llm_lr": 1e-3, "embed_lr": 1e-3, "head_lr": 1e-3, "vision_lr": 2e-3, "encoder_lr": 1e-3})
    groups = ds_engine.build_param_groups(model, STAGES["sft"], settings, 2)
    mine = dict(ref.named_parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([{**g, "params": [mine[names[id(p)]] for p in g["params"]]} for g in groups],
                            betas=(0.9, 0.95), eps=1e-8)
    ds_config = ds_engine.build_ds_config(ds_engine.load_ds_config(REPO / "ds_configs" / "zero1.json"), micro_batch=4,
                                          grad_accum=1, world_size=1, grad_clip=1.0, dtype="fp32")
    engine = ds_engine.initialize(model, groups, ds_config, "cpu")

    g = torch.Generator().manual_seed(1)
    n_vis, size = model.num_vision_tokens, vcfg.image_size

    def batch(images: int | None) -> dict:
        ids = torch.randint(3, 250, (4, 1 + n_vis + 12), generator=g)
        targets = ids.roll(-1, 1)
        if images is None:  # a text-tokens batch: no image argument at all
            return {"input_ids": ids, "targets": targets}
        if images:
            ids[:, 1:1 + n_vis], targets[:, :1 + n_vis] = TOK.image_token_id, -1
        pixels = torch.randint(0, 255, (images, 3, size, size), generator=g, dtype=torch.uint8)
        return {"input_ids": ids, "targets": targets, "pixel_values": pixels}

    for b in [batch(4), batch(None), batch(4), batch(0), batch(None), batch(4)]:
        loop.train_step(engine, iter([b]), loop.lm_loss, 1)
        opt.zero_grad(set_to_none=True)
        idx, targets, kwargs = loop.split_batch(b)
        ref(idx, targets, **kwargs).backward()
        for p in ref.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        for (name, p), q in zip(model.state_dict().items(), ref.state_dict().values()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")
