"""The memory planner against measured memory: torch AdamW after a real step, and 2-rank DeepSpeed ZeRO-1/2/3
engines on CPU (this file is also the rank script: `python tests/test_plan.py OUT_DIR` under torchrun)."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from ghostvis.config import get_preset
from ghostvis.plan import Layout, Plan, PlanError, build_meta_model, format_plan, plan
from ghostvis.train.settings import Settings
from ghostvis.train.stages import ALL_LAYERS

# DeepSpeed pads each flat parameter group to a multiple of 2·dp elements; the planner leaves that out.
PAD_ELEMENTS_PER_GROUP = 2


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def adam_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """exp_avg + exp_avg_sq; the 0-d `step` counters (4 bytes per parameter tensor) are not state worth planning."""
    return nbytes(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)


def one_adamw_step(model: torch.nn.Module, loss_fn) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss_fn(model).backward()
    opt.step()
    return opt


def test_fp32_adamw_step_matches_plan_exactly():
    torch.manual_seed(0)
    cfg, _ = get_preset("small", depth=2)
    from ghostvis.model.gpt import GPT

    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 32))
    opt = one_adamw_step(model, lambda m: m(idx, idx))
    p = plan("small", Layout(zero=0, dtype="fp32"), depth=2)
    assert p.params_total == sum(t.numel() for t in model.parameters())
    assert p.gpu["weights (fp32)"] == nbytes(model.parameters())
    assert p.gpu["gradients (fp32)"] == nbytes(t.grad for t in model.parameters())
    assert p.gpu["optimizer states (Adam m, v fp32)"] == adam_state_bytes(opt)
    assert "master weights (fp32)" not in p.gpu  # fp32 training keeps no second copy


def test_frozen_parts_carry_no_gradients_or_optimizer_state():
    """vision_pretrain on vlm_tiny: the trainer's own rules freeze LLM and encoder; only the connector
    (the projector; the pixel shuffle has no weights) gets gradients and Adam state, as measured after a step."""
    from ghostvis.model.vlm import VLM
    from ghostvis.train.engine import build_param_groups
    from ghostvis.train.stages import get_stage

    torch.manual_seed(0)
    cfg, vcfg = get_preset("vlm_tiny")
    cfg.image_token_id = cfg.vocab_size - 1
    model = VLM(cfg, vcfg)
    stage = get_stage("vision_pretrain")
    build_param_groups(model, stage, Settings.of(stage, stage.defaults), cfg.n_layer)
    n_img = model.num_vision_tokens
    idx = torch.cat([torch.full((1, n_img), cfg.image_token_id), torch.randint(0, 100, (1, 16))], dim=1)
    pixels = torch.randn(1, 3, vcfg.image_size, vcfg.image_size)
    opt = one_adamw_step(model, lambda m: m(idx, idx, pixel_values=pixels))

    p = plan("vlm_tiny", Layout(zero=0, dtype="fp32"), stage="vision_pretrain")
    trained = [t for t in model.parameters() if t.grad is not None]
    assert nbytes(trained) == nbytes(model.vision.projector.parameters())  # nothing else got a gradient
    assert p.params_trainable == sum(t.numel() for t in trained)
    assert p.gpu["gradients (fp32)"] == nbytes(t.grad for t in trained)
    assert p.gpu["optimizer states (Adam m, v fp32)"] == adam_state_bytes(opt)
    assert p.gpu["weights (fp32)"] == nbytes(model.parameters())
    # --freeze replaces the stage's default as in the trainer: `none` trains the encoder too
    enc = sum(t.numel() for t in model.vision.encoder.parameters())
    unfrozen = plan("vlm_tiny", Layout(zero=0, dtype="fp32"), stage="vision_pretrain", freeze=())
    assert unfrozen.params_trainable == p.params_trainable + enc
    # freezing the connector as well leaves nothing to train: refused, as the trainer refuses it
    with pytest.raises(PlanError, match="--freeze encoder,connector"):
        plan("vlm_tiny", Layout(zero=0, dtype="fp32"), stage="vision_pretrain", freeze=("encoder", "connector"))
    # --train-llm-layers as in the trainer: sft's last block trains beside the connector (default: every block)
    sft = get_stage("sft")
    build_param_groups(model, sft, Settings.of(sft, {**sft.defaults, "train_llm_layers": 1}), cfg.n_layer)
    last_block = plan("vlm_tiny", Layout(zero=0, dtype="fp32"), stage="sft", train_llm_layers=1)
    assert last_block.params_trainable == sum(t.numel() for t in model.parameters() if t.requires_grad)
    assert last_block.params_trainable < plan("vlm_tiny", Layout(zero=0, dtype="fp32"), stage="sft").params_trainable
    with pytest.raises(PlanError, match="--train-llm-layers needs --stage"):
        plan("vlm_tiny", Layout(), train_llm_layers=1)
    # the trainer passes its resolved value (sft's default: every block); --freeze llm then freezes them all, and
    # (replacing the default freeze) the encoder and connector train, as in vision_pretrain with --freeze none
    frozen_llm = plan("vlm_tiny", Layout(zero=0, dtype="fp32"), stage="sft", freeze=("llm",),
                      train_llm_layers=ALL_LAYERS)
    assert frozen_llm.params_trainable == unfrozen.params_trainable


@pytest.mark.slow
def test_two_rank_deepspeed_zero_shards_match_plan(tmp_path):
    from conftest import run_ranks

    run_ranks(Path(__file__), [tmp_path], nproc=2, timeout=120)
    for rank in (0, 1):
        measured = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for zero, m in measured.items():
            p = plan("tiny", Layout(gpus=2, zero=int(zero), dtype="bf16"))
            slack = m["groups"] * PAD_ELEMENTS_PER_GROUP * 2  # elements, across 2 ranks
            expect = {"weights": p.gpu["weights (bf16)"], "master": p.gpu["master weights (fp32)"],
                      "grads": p.gpu["gradients (bf16)"], "adam": p.gpu["optimizer states (Adam m, v fp32)"]}
            per_element = {"weights": 2, "master": 4, "grads": 2, "adam": 8}
            for key, want in expect.items():
                assert abs(m[key] - want) <= slack * per_element[key], (zero, key, m[key], want)
    # what ZeRO-3 shards, stages 1/2 keep whole: the weights
    assert measured["3"]["weights"] * 2 == measured["1"]["weights"]


def test_sharding_scales_with_data_parallel_size():
    model = build_meta_model(*get_preset("vlm_7b"))  # built once: 8B parameters on the meta device
    plans = {dp: plan("vlm_7b", Layout(gpus=dp, zero=3), model=model) for dp in (1, 2, 4, 8)}
    for dp, p in plans.items():
        for line in ("weights (bf16)", "master weights (fp32)", "gradients (bf16)", "optimizer states (Adam m, v fp32)"):
            assert abs(p.gpu[line] * dp - plans[1].gpu[line]) <= dp, (dp, line)
    z1 = plan("vlm_7b", Layout(gpus=8, zero=1), model=model)
    assert z1.gpu["weights (bf16)"] == plans[1].gpu["weights (bf16)"]  # ZeRO-1 keeps every weight on every GPU
    assert z1.gpu["optimizer states (Adam m, v fp32)"] == plans[8].gpu["optimizer states (Adam m, v fp32)"]
    # frozen encoder (the default) and the stage rules: Adam state only for what trains
    enc = sum(t.numel() for t in model.vision.encoder.parameters())
    assert plans[1].params_trainable == plans[1].params_total - enc
    vp = plan("vlm_7b", Layout(gpus=8, zero=2), model=model, stage="vision_pretrain")
    connector = sum(t.numel() for n, t in model.named_parameters() if n.startswith(("vision.resampler", "vision.projector")))
    assert vp.params_trainable == connector
    assert abs(vp.gpu["optimizer states (Adam m, v fp32)"] - connector * 8 / 8) <= 1
    # TP halves the split matrices only: norms and the vision tower stay whole on every rank
    tp2 = plan("vlm_7b", Layout(gpus=2, tp=2, zero=0), model=model)
    assert plans[1].params_total / 2 < tp2.params_on_gpu < plans[1].params_total * 0.6
    # PP: the heaviest stage holds about half the blocks plus the front or the back
    pp2 = plan("vlm_7b", Layout(gpus=2, pp=2, zero=1), model=model)
    assert pp2.params_on_gpu < 0.6 * plans[1].params_total
    # activation checkpointing keeps block inputs only
    ckpt = plan("vlm_7b", Layout(gpus=8, zero=3, seq_len=4096, activation_checkpointing=True), model=model)
    full = plan("vlm_7b", Layout(gpus=8, zero=3, seq_len=4096), model=model)
    assert ckpt.gpu["activations"] < full.gpu["activations"] / 2
    # checkpointing the first N of 28 blocks lands in between, growing as N falls
    part = [plan("vlm_7b", Layout(gpus=8, zero=3, seq_len=4096, activation_checkpointing=n), model=model)
            for n in (24, 20)]
    assert ckpt.gpu["activations"] < part[0].gpu["activations"] < part[1].gpu["activations"] < full.gpu["activations"]
    with pytest.raises(PlanError, match="--activation-checkpointing 29: vlm_7b has 28 blocks"):
        plan("vlm_7b", Layout(gpus=8, zero=3, activation_checkpointing=29), model=model)


def test_pipeline_stages_match_deepspeed_partition():
    """stage_blocks cuts as DeepSpeed's `type:PipeBlock` partition does (front layer, blocks, norm, head)."""
    from deepspeed.runtime.utils import partition_balanced

    from ghostvis.plan import stage_blocks

    for n_layer, pp in ((28, 3), (28, 4), (7, 4), (5, 2), (24, 8)):
        bounds = partition_balanced([0] + [1] * n_layer + [0, 0], pp)
        expect = [range(max(0, int(a) - 1), min(n_layer, int(b) - 1)) for a, b in zip(bounds, bounds[1:])]
        assert stage_blocks(n_layer, pp) == expect, (n_layer, pp)


def test_bad_layouts_name_the_flag():
    with pytest.raises(PlanError, match="--zero 1"):
        plan("tiny", Layout(gpus=2, pp=2, zero=3))
    with pytest.raises(PlanError, match="--tp 3"):
        plan("tiny", Layout(gpus=3, tp=3))
    with pytest.raises(PlanError, match="not divisible by --tp 2"):
        plan("tiny", Layout(gpus=3, tp=2))
    with pytest.raises(PlanError, match="--freeze decoder"):
        plan("tiny", Layout(), stage="base", freeze=("decoder",))
    with pytest.raises(PlanError, match="--freeze needs --stage"):
        plan("tiny", Layout(), freeze=("llm",))


def test_cli_json_and_exit_status(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
    import plan as plan_cli

    assert plan_cli.main(["--model", "tiny", "--gpus", "2", "--zero", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["layout"]["dp"] == 2 and out["gpu_total_bytes"] == sum(out["gpu_bytes"].values())
    assert plan_cli.main(["--model", "qwen25_7b", "--gpus", "1", "--zero", "0", "--gpu-mem-gib", "80"]) == 1
    assert "does not fit on a 80 GiB card" in capsys.readouterr().out
    # --freeze takes launch/train.py's syntax and feeds the trainer's rules
    assert plan_cli.main(["--model", "vlm_tiny", "--stage", "sft", "--freeze", "llm,encoder", "--json"]) == 0
    connector_only = json.loads(capsys.readouterr().out)["params_trainable"]
    assert plan_cli.main(["--model", "vlm_tiny", "--stage", "sft", "--freeze", "none", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params_trainable"] > connector_only > 0
    assert plan_cli.main(["--model", "tiny", "--stage", "base", "--freeze", "decoder"]) == 2
    assert "--freeze decoder: choose among llm,encoder,connector" in capsys.readouterr().err
    assert plan_cli.main(["--model", "vlm_tiny", "--stage", "sft", "--freeze", "llm", "--train-llm-layers", "1"]) == 2
    assert "--train-llm-layers trains the llm but --freeze lists it" in capsys.readouterr().err
    assert plan_cli.main(["--model", "tiny", "--pp", "2", "--gpus", "2", "--zero", "2"]) == 2
    # offloaded state counts against one node's host memory: 7B trained whole and offloaded from one GPU needs
    # ~128 GiB there (bf16 weights, fp32 master weights, gradients and Adam states of 7.6 B parameters)
    offload_7b = ["--model", "qwen25_7b", "--gpus", "1", "--zero", "3", "--offload", "--seq", "1024",
                  "--gpu-mem-gib", "139"]
    assert plan_cli.main([*offload_7b, "--host-mem-gib", "100"]) == 1
    out = capsys.readouterr().out
    assert "fits on a 139 GiB card" in out and "offloaded state does not fit in 100 GiB of host memory" in out
    assert plan_cli.main([*offload_7b, "--host-mem-gib", "512", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["host_bytes_per_node"] == sum(out["host_bytes_per_gpu"].values()) > 100 * 2**30
    two = [*offload_7b[:3], "2", *offload_7b[4:]]  # two GPUs of one node: each holds half, the host all of it
    assert plan_cli.main([*two, "--host-mem-gib", "100", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["host_bytes_per_node"] == pytest.approx(out["host_bytes_per_node"],
                                                                                       rel=1e-3)


# ---- rank script: measured bytes of real DeepSpeed ZeRO engines (CPU, gloo, bf16) ----------------

def _measure(out_dir: Path) -> None:
    import torch.distributed as dist

    from ghostvis.model.gpt import GPT
    from ghostvis.train import engine as ds_engine
    from ghostvis.train.stages import get_stage

    rank, world, _ = ds_engine.init_distributed()
    result = {}
    for zero in (1, 2, 3):
        torch.manual_seed(0)
        cfg, _ = get_preset("tiny")
        model = GPT(cfg)
        stage = get_stage("base")
        settings = Settings.of(stage, {**stage.defaults, "weight_decay": 0.1})
        groups = ds_engine.build_param_groups(model, stage, settings, cfg.n_layer)
        ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2 * world,
              "gradient_clipping": 1.0, "bf16": {"enabled": True}, "zero_optimization": {"stage": zero}}
        engine = ds_engine.initialize(model, groups, ds, "cpu")
        idx = torch.randint(0, cfg.vocab_size, (2, 16))
        engine.backward(engine(idx, idx))
        opt = engine.optimizer
        if zero < 3:
            m = {"weights": nbytes(engine.module.parameters()), "master": nbytes(opt.single_partition_of_fp32_groups),
                 "grads": nbytes(t for g in opt.averaged_gradients.values() for t in g or [])}
        else:
            m = {"weights": nbytes(p.ds_tensor for p in engine.module.parameters()),
                 "master": nbytes(opt.fp32_partitioned_groups_flat), "grads": nbytes(opt.grad_partitions_flat_buffer)}
        engine.step()
        result[zero] = {**m, "adam": adam_state_bytes(opt.optimizer), "groups": len(groups)}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    _measure(Path(sys.argv[1]))


def test_offload_places_the_optimizer_state_and_the_weights_apart():
    """DeepSpeed offloads the optimizer's state (offload_optimizer) and the ZeRO-3 weights (offload_param) each on
    its own: the trainer plans from its config's two devices, launch/plan.py --offload takes both."""
    base = dict(gpus=1, zero=3, seq_len=256, micro_batch=1)
    both = plan("tiny", Layout(offload=True, **base), stage="base")
    optimizer_only = plan("tiny", Layout(offload=True, offload_weights=False, **base), stage="base")
    weights_only = plan("tiny", Layout(offload_weights=True, **base), stage="base")
    assert set(weights_only.host) == {"weights (bf16)"} and "weights (bf16)" in optimizer_only.gpu
    assert set(both.host) == set(optimizer_only.host) | set(weights_only.host)
    assert both.host_bytes(weights=False) == optimizer_only.host_bytes() > 0
    assert both.host_bytes(optimizer=False) == weights_only.host_bytes() > 0
    assert both.gpu_total < optimizer_only.gpu_total and both.gpu_total < weights_only.gpu_total


def test_lora_rank_trains_the_adapters_and_the_connector():
    full = plan("vlm_tiny", Layout(zero=1), stage="sft")
    adapted = plan("vlm_tiny", Layout(zero=1), stage="sft", lora_rank=4)
    model = build_meta_model(*get_preset("vlm_tiny"))
    projections = [m for n, m in model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj",
                                                                       "gate_proj", "up_proj", "down_proj"))]
    adapters = sum(4 * (m.weight.shape[0] + m.weight.shape[1]) for m in projections)
    connector = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("vision.resampler.",
                                                                                      "vision.projector.")))
    assert adapted.params_trainable == adapters + connector
    assert adapted.params_total == full.params_total + adapters
    assert adapted.gpu["optimizer states (Adam m, v fp32)"] < full.gpu["optimizer states (Adam m, v fp32)"] / 2
    with pytest.raises(PlanError, match="--lora-rank needs --stage"):
        plan("vlm_tiny", Layout(zero=1), lora_rank=4)
    with pytest.raises(PlanError, match="matches no linear layer"):
        plan("vlm_tiny", Layout(zero=1), stage="sft", lora_rank=4, lora_targets="nothing_here")


def test_context_parallel_splits_activations_and_zero_shards():
    model = build_meta_model(*get_preset("qwen25_1.5b"))
    cfg = model.config
    one = plan("qwen25_1.5b", Layout(gpus=1, zero=3, seq_len=32768), model=model)
    cp = {n: plan("qwen25_1.5b", Layout(gpus=n, cp=n, zero=3, seq_len=32768), model=model) for n in (2, 4)}
    for n, p in cp.items():
        assert p.layout.dp == 1 and p.layout.zero_ranks == n
        # ZeRO-3 shards over the CP ranks, which hold the same parameters
        assert abs(p.gpu["optimizer states (Adam m, v fp32)"] * n - one.gpu["optimizer states (Adam m, v fp32)"]) <= n
        # each rank keeps what a sequence of 1/n the length keeps, plus the whole sequence's K/V in every block
        short = plan("qwen25_1.5b", Layout(gpus=1, zero=3, seq_len=32768 // n), model=model)
        kv = (32768 - 32768 // n) * 2 * cfg.n_kv_head * cfg.head_dim * 2 * cfg.n_layer  # bf16 K and V
        # and the prefix attention's K/V repeated to every query head (fa4/cuDNN) on the busiest rank
        repeated = (2 * n + 1) * (32768 // (2 * n)) * 2 * cfg.n_head * cfg.head_dim * 2 * cfg.n_layer
        assert p.gpu["activations"] == short.gpu["activations"] + kv + repeated
        assert kv + repeated < 0.3 * p.gpu["activations"] and p.gpu["activations"] < 0.7 * one.gpu["activations"]
    assert "tp 1 × pp 1 × cp 2 × dp 1" in format_plan(cp[2], 80)
    with pytest.raises(PlanError, match=r"--seq 100 does not split into 2 × --cp 4 = 8 equal chunks"):
        plan("tiny", Layout(gpus=4, cp=4, seq_len=100))
    with pytest.raises(PlanError, match="--cp 2 with --pp 2"):
        plan("tiny", Layout(gpus=4, cp=2, pp=2, zero=1))
    with pytest.raises(PlanError, match=r"not divisible by --tp 1 × --pp 1 × --cp 2"):
        plan("tiny", Layout(gpus=3, cp=2))


def test_checkpointed_blocks_keep_their_attention_output_unless_recomputed():
    """Each checkpointed block keeps its input and its attention output + fp32 log-sum-exp (selective
    checkpointing); --recompute-attention drops the latter, and so do PP (DeepSpeed's checkpoint) and CP."""
    cfg = get_preset("qwen25_1.5b")[0]
    tokens, blocks = 4096, 6
    layout = Layout(zero=2, seq_len=tokens, activation_checkpointing=blocks)
    kept = plan("qwen25_1.5b", layout).gpu["activations"]
    recomputed = plan("qwen25_1.5b", dataclasses.replace(layout, recompute_attention=True)).gpu["activations"]
    assert kept - recomputed == blocks * tokens * (cfg.n_head * cfg.head_dim * 2 + 4 * cfg.n_head)
    for whole in (dataclasses.replace(layout, gpus=2, pp=2, zero=1, activation_checkpointing=True),
                  dataclasses.replace(layout, gpus=2, cp=2)):
        assert (plan("qwen25_1.5b", whole).gpu["activations"] ==
                plan("qwen25_1.5b", dataclasses.replace(whole, recompute_attention=True)).gpu["activations"])


def test_cli_auto_activation_checkpointing_is_the_trainers_choice(capsys):
    """launch/plan.py --activation-checkpointing auto prints and plans the count the trainer's auto takes on a card
    of --gpu-mem-gib: the fewest checkpointed blocks whose plan fits AUTO_SHARE of it."""
    from ghostvis.plan import AUTO_SHARE, ds_bucket_settings
    from launch import plan as plan_cli

    base = ["--model", "qwen25_1.5b", "--zero", "2", "--seq", "32768", "--activation-checkpointing", "auto"]
    layout = Layout(zero=2, seq_len=32768, **ds_bucket_settings(2, False))

    def fits(blocks: int, card: float) -> bool:
        return plan("qwen25_1.5b", dataclasses.replace(layout, activation_checkpointing=blocks)).fits_card(
            AUTO_SHARE * card)

    for card in (60.0, 80.0, 141.0):
        capsys.readouterr()
        assert plan_cli.main([*base, "--gpu-mem-gib", str(card)]) == 0
        out = capsys.readouterr().out
        n = int(re.search(r"auto → (\d+) of 28 blocks", out).group(1))
        assert fits(n, card) and (n == 0 or not fits(n - 1, card)), (card, n)
        assert (f"activation checkpointing of {n} blocks" in out) == (0 < n < 28)  # the table plans that count
        assert plan_cli.main([*base, "--gpu-mem-gib", str(card), "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["layout"]["activation_checkpointing"] == out["activation_checkpointing_auto"]["value"]
        assert out["activation_checkpointing_auto"]["value"] == (True if n == 28 else (n or False))
    assert plan_cli.main([*base, "--gpu-mem-gib", "20"]) == 1  # even every block: the plan says it does not fit
    assert "every block (even so" in capsys.readouterr().out
    assert plan_cli.main([*base, "--gpu-mem-gib", "38", "--json"]) == 0  # fits the card, not AUTO_SHARE of it
    assert json.loads(capsys.readouterr().out)["activation_checkpointing_auto"] == {"value": True, "fits_share": False,
                                                                                 "share": AUTO_SHARE}


def test_cli_seq_max_is_the_longest_sequence_that_fits(capsys):
    """launch/plan.py --seq max: the longest multiple of the step whose plan fits LONGEST_SHARE of the card (the
    next step does not), planned in the table; with --cp the step doubles per CP rank; host memory binds too."""
    from ghostvis.plan import LONGEST_SHARE, SEQ_STEP, ds_bucket_settings
    from launch import plan as plan_cli

    model = build_meta_model(*get_preset("qwen25_1.5b"))
    layout = Layout(zero=2, activation_checkpointing=True, **ds_bucket_settings(2, False))

    def fits(seq: int, card: float, **change) -> bool:
        return plan("qwen25_1.5b", dataclasses.replace(layout, seq_len=seq, **change), model=model).fits_card(
            LONGEST_SHARE * card)

    base = ["--model", "qwen25_1.5b", "--zero", "2", "--activation-checkpointing", "--seq", "max"]
    for card, cp in ((80.0, 1), (141.0, 1), (80.0, 2)):
        step = SEQ_STEP * 2 * cp
        capsys.readouterr()
        assert plan_cli.main([*base, "--gpu-mem-gib", str(card), "--gpus", str(cp), "--cp", str(cp)]) == 0
        out = capsys.readouterr().out
        seq = int(re.search(r"--seq max → ([\d,]+) tokens", out).group(1).replace(",", ""))
        assert seq % step == 0 and fits(seq, card, gpus=cp, cp=cp) and not fits(seq + step, card, gpus=cp, cp=cp)
        assert re.search(rf"× seq {seq}\b", out)  # the table plans that sequence
    assert plan_cli.main([*base, "--gpu-mem-gib", "141", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["seq_max"] == {"seq_len": out["layout"]["seq_len"], "share": LONGEST_SHARE, "capped": False}
    assert out["fits"]
    assert plan_cli.main([*base, "--gpu-mem-gib", "20"]) == 1  # the weights alone fill 85% of 20 GiB
    assert "not even 2,048 tokens fit 85% of the card" in capsys.readouterr().out
    assert plan_cli.main(["--model", "qwen25_7b", "--zero", "3", "--offload", "--seq", "max", "--gpu-mem-gib", "141",
                          "--host-mem-gib", "64"]) == 1
    assert "the host memory of --host-mem-gib" in capsys.readouterr().out
    assert plan_cli.main(["--model", "qwen25_1.5b", "--seq", "max", "--activation-checkpointing", "auto"]) == 2
    assert "for a fixed checkpointing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plan_cli.main([*base[:-1], "longest"])
    assert "give a token count (e.g. 32768) or max" in capsys.readouterr().err


def test_longest_sequence_finds_every_threshold_and_says_when_capped():
    """The doubling-then-bisection search against a plan whose memory grows by one GiB a step of tokens: for
    every card size, the answer is the last step that fits; past the search's cap it says so."""
    from ghostvis.plan import GIB, LONGEST_SHARE, SEQ_LIMIT, longest_sequence

    step = 2048

    def plan_for_seq(seq: int):
        return Plan("made-up", Layout(seq_len=seq), 0, 0, 0, 0, gpu={"activations": seq // step * GIB})

    top = SEQ_LIMIT // step
    for fitting in [*range(0, 70), top - 1]:  # the card holds exactly `fitting` steps at LONGEST_SHARE
        found = longest_sequence(plan_for_seq, (fitting + 0.5) / LONGEST_SHARE, None, step)
        assert found.seq_len == fitting * step and not found.capped, (fitting, found.seq_len)
        assert found.plan.layout.seq_len == max(fitting, 1) * step
    for step in (2048, 6144):  # a cap that is a power of two steps, and one that is not (--cp 3)
        capped = longest_sequence(plan_for_seq, 10**9, None, step)
        assert capped.capped and capped.seq_len == SEQ_LIMIT // step * step, (step, capped.seq_len)
        assert "where the search stops" in capped.line()
