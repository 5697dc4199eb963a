"""Model construction that scales (ghostvis/model/seeded.py, checkpoint_io.build_model): under ZeRO-3 each of
two real gloo ranks (deepspeed.zero.Init) builds, initialises and loads only its partition, and the gathered
weights equal the eager full model's of the same seed bit for bit; a TP shard equals the full model's slice. Both
also after `--init-shrink` (GPT.shrink_perturb)."""

import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ghostvis.config import get_preset
from ghostvis.model import GPT, shard_state_dict
from ghostvis.model.seeded import normal_rows
from conftest import TOK, free_port

SEED = 11
ZERO3 = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1,
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def _configs(preset: str):
    cfg, vcfg = get_preset(preset, vocab_size=TOK.vocab_size, image_token_id=TOK.image_token_id)
    return cfg, vcfg


def _assert_same_as_eager(zero_model: torch.nn.Module, eager: torch.nn.Module, world: int, what: str) -> None:
    import deepspeed

    full = dict(eager.named_parameters())
    names = [n for n, _ in zero_model.named_parameters()]
    assert names == list(full), what
    for name, param in zero_model.named_parameters():
        # this rank keeps only its share of the flat tensor
        assert param.ds_tensor.numel() == -(-param.ds_numel // world), f"{what}: {name}"
        with deepspeed.zero.GatheredParameters([param]):
            assert torch.equal(param.detach(), full[name].detach()), f"{what}: {name} differs from the eager init"


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import deepspeed

    from ghostvis.checkpoint_io import build_model, export

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    for preset in ("tiny", "vlm_tiny"):
        cfg, vcfg = _configs(preset)
        vcfg = vcfg if preset.startswith("vlm") else None
        torch.manual_seed(SEED)  # the tower is timm's init from torch's RNG, as it always was
        eager = build_model(cfg, vcfg, seed=SEED)
        torch.manual_seed(SEED)
        zero = build_model(cfg, vcfg, seed=SEED, zero3=ZERO3)
        _assert_same_as_eager(zero, eager, world, f"{preset} init")

        # --init-from: each rank reads its partition's rows of the export
        with torch.no_grad():
            for p in eager.parameters():
                p.add_(torch.randn_like(p))
        export_dir = os.path.join(tmp, preset)
        if rank == 0:
            export(eager, export_dir, tokenizer=TOK)
        dist.barrier()
        loaded = build_model(cfg, vcfg, export_dir, seed=SEED + 1, zero3=ZERO3)
        _assert_same_as_eager(loaded, eager, world, f"{preset} loaded")
        # --init-shrink: each rank shrinks and perturbs its partition to the whole model's numbers
        whole = build_model(cfg, vcfg, export_dir, seed=SEED + 1)
        for model in (loaded, whole):
            assert getattr(model, "llm", model).shrink_perturb(0.5, 0.1)
        _assert_same_as_eager(loaded, whole, world, f"{preset} shrunk")

    # a bf16 run: zero.Init casts what is built inside it; the weights are the fp32 init rounded, the RoPE
    # tables stay float32 and exact
    cfg, _ = _configs("tiny")
    eager = build_model(cfg, None, seed=SEED)
    zero = build_model(cfg, None, seed=SEED, zero3={**ZERO3, "bf16": {"enabled": True}})
    for name, param in zero.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            assert param.dtype == torch.bfloat16 and torch.equal(param, dict(eager.named_parameters())[name].bfloat16())
    assert zero.rotary.cos.dtype == torch.float32
    assert torch.equal(zero.rotary.cos, eager.rotary.cos) and torch.equal(zero.rotary.sin, eager.rotary.sin)

    # tensor parallelism: the shard a TP rank initialises is the full model's slice, without the full model
    cfg, vcfg = _configs("vlm_tiny")
    tp = GPT(cfg, tp_group=dist.group.WORLD, seed=SEED)
    mine = shard_state_dict(GPT(cfg, seed=SEED).state_dict(), cfg, rank, world)
    for name, tensor in tp.state_dict().items():
        assert torch.equal(tensor, mine[name]), f"tp shard {name}"
    # ... and a TP rank reads only its shard of an export
    export_dir = os.path.join(tmp, "vlm_tiny")
    loaded = build_model(cfg, vcfg, export_dir, tp_group=dist.group.WORLD, seed=SEED)
    whole = build_model(cfg, vcfg, export_dir, seed=SEED)
    mine = shard_state_dict(whole.llm.state_dict(), cfg, rank, world)
    for name, tensor in loaded.llm.state_dict().items():
        assert torch.equal(tensor, mine[name]), f"tp shard {name} loaded"
    # ... and shrinks and perturbs its shard to the full model's slice
    for model in (loaded, whole):
        model.llm.shrink_perturb(0.5, 0.1)
    mine = shard_state_dict(whole.llm.state_dict(), cfg, rank, world)
    for name, tensor in loaded.llm.state_dict().items():
        assert torch.equal(tensor, mine[name]), f"tp shard {name} shrunk"
    for (name, tensor), other in zip(loaded.vision.state_dict().items(), whole.vision.state_dict().values()):
        assert torch.equal(tensor, other), f"tower {name} loaded"
    dist.barrier()
    dist.destroy_process_group()


def test_zero3_construction_equals_eager_init_and_load(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)


def test_seeded_rows_do_not_depend_on_the_slice():
    shape = (3000, 700)  # 1497 rows per 1M-value block: slices cross block boundaries
    whole = normal_rows(5, "w", shape, 0.02, 0, shape[0])
    for a, b in ((0, 1), (1400, 1600), (2990, 3000)):
        assert torch.equal(normal_rows(5, "w", shape, 0.02, a, b), whole[a:b])
    assert not torch.equal(normal_rows(6, "w", shape, 0.02, 0, 10), whole[:10])
    assert abs(float(whole.std()) - 0.02) < 1e-3
    # under a device context (as zero.Init redirects torch.empty to the GPU) the draw stays float32 on the CPU,
    # where its generator lives; the fill copies it to the parameter's device and dtype
    with torch.device("meta"):
        assert torch.equal(normal_rows(5, "w", shape, 0.02, 1400, 1600), whole[1400:1600])


@pytest.mark.parametrize("seed", [None, 3])
def test_same_seed_same_weights(seed):
    cfg, _ = _configs("tiny")
    torch.manual_seed(0)
    a = GPT(cfg, seed=seed)
    torch.manual_seed(0)
    b = GPT(cfg, seed=seed)
    c = GPT(cfg, seed=None if seed is None else seed + 1)
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), name
        if p.dim() == 2:
            assert not torch.equal(p, r), name


def _topo(tp: int = 1, pp: int = 1) -> SimpleNamespace:
    return SimpleNamespace(tp_size=tp, pp_size=pp, cp_size=1, dp_size=1)


def test_bad_layout_or_plan_fails_from_the_shape_before_any_weight(monkeypatch):
    from ghostvis.checkpoint_io import build_model
    from ghostvis.train.engine import ConfigError, check_layout
    from ghostvis.train.loop import check_fits_card
    from ghostvis.train.stages import ALL_LAYERS
    from launch.train import build_parser

    cfg, _ = _configs("tiny")  # 4 heads, 2 KV heads, 2 blocks
    shape = build_model(cfg, None, device="meta")
    args = build_parser().parse_args(["--model", "qwen25_7b", "--data", "x", "--out", "x", "--micro-batch", "1"])
    for topo, message in ((_topo(tp=3), r"^--tp 3: .*n_head=4 is not divisible by tp=3"),
                          (_topo(pp=3), r"^--pp 3 is more than the model's 2 blocks")):
        with pytest.raises(ConfigError, match=message):
            check_layout(shape, topo, args)
    args.activation_checkpointing = 3
    with pytest.raises(ConfigError, match=r"^--activation-checkpointing: .* of 3 blocks: the model has 2"):
        check_layout(shape, _topo(), args)
    args.activation_checkpointing = False
    check_layout(shape, _topo(tp=2, pp=2), args)
    # the planner's verdict on a GPU: 7B with plain AdamW on one card does not fit 80 GiB; it fits 2 TiB
    with torch.device("meta"):
        big = GPT(get_preset("qwen25_7b")[0])
    zero1 = {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}
    with pytest.raises(ConfigError, match=r"^the planner puts this run at .* GiB per GPU, more than the card's 80"):
        check_fits_card(big, _topo(), zero1, args, "base", (), ALL_LAYERS, 80.0)
    check_fits_card(big, _topo(), zero1, args, "base", (), ALL_LAYERS, 2048.0)
    args.no_plan_check = True
    check_fits_card(big, _topo(), zero1, args, "base", (), ALL_LAYERS, 80.0)
    # a CNN tower (vlm_tiny_cnn), which the planner does not estimate, still starts on a GPU
    args.no_plan_check = False
    cnn_cfg, cnn_vcfg = _configs("vlm_tiny_cnn")
    check_fits_card(build_model(cnn_cfg, cnn_vcfg, device="meta"), _topo(), zero1, args, "vision_pretrain", (),
                    0, 80.0)
    # sft with --freeze llm: the trainer passes the stage's resolved default (every block), and the plan trains the
    # connector alone
    vit_cfg, vit_vcfg = _configs("vlm_tiny")
    check_fits_card(build_model(vit_cfg, vit_vcfg, device="meta"), _topo(), zero1, args, "sft", ("llm",),
                    ALL_LAYERS, 80.0)
    # offloaded, the card has room but the host must hold 7B's optimizer state (~128 GiB planned): refused on a
    # host that cannot, with the levers named; two ranks on one host need it twice
    from ghostvis.train import loop
    offload = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}, "bf16": {"enabled": True}}
    monkeypatch.setattr(loop, "host_memory_bytes", lambda: 200 * 2**30)
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    check_fits_card(big, _topo(), offload, args, "base", (), ALL_LAYERS, 2048.0)
    monkeypatch.setenv("LOCAL_SIZE", "2")  # the deepspeed launcher's name; torchrun sets LOCAL_WORLD_SIZE
    with pytest.raises(ConfigError, match=r"^the planner puts this run's offloaded state at 2\d\d\.\d GiB of host "
                                          r"memory \(2 rank\(s\) on this host\), more than its 200\.0 GiB: .*--lora-rank"):
        check_fits_card(big, _topo(), offload, args, "base", (), ALL_LAYERS, 2048.0)
    # to NVMe, the optimizer's state does not take host memory; the ZeRO-3 weights counted only where offloaded
    to_nvme = {**offload, "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}}
    check_fits_card(big, _topo(), to_nvme, args, "base", (), ALL_LAYERS, 2048.0)
    # --train-llm-layers, one of the levers the refusal names, shrinks what is offloaded (the last 4 of 28 blocks)
    monkeypatch.setenv("LOCAL_SIZE", "1")
    monkeypatch.setattr(loop, "host_memory_bytes", lambda: 64 * 2**30)
    with pytest.raises(ConfigError, match="host memory"):
        check_fits_card(big, _topo(), offload, args, "base", (), ALL_LAYERS, 2048.0)
    check_fits_card(big, _topo(), offload, args, "base", (), 4, 2048.0)
    monkeypatch.setenv("LOCAL_SIZE", "2")
    monkeypatch.setattr(loop, "host_memory_bytes", lambda: 230 * 2**30)  # under 2 × 128 GiB, over 2 × 114 GiB
    with pytest.raises(ConfigError, match="host memory"):
        check_fits_card(big, _topo(), {**offload, "zero_optimization": {
            "stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}}, args, "base", (),
            ALL_LAYERS, 2048.0)
    check_fits_card(big, _topo(), offload, args, "base", (), ALL_LAYERS, 2048.0)


@pytest.mark.parametrize("where", ["cpu-bf16", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU: a ZeRO-3 partition lives there, the initial values on the CPU"))])
def test_shrink_perturb_rounds_once_and_runs_where_the_weights_are(where):
    cfg, _ = _configs("tiny")
    fp32 = GPT(cfg, seed=SEED)
    with torch.no_grad():
        for p in fp32.parameters():
            p.mul_(3)  # away from the initial values
    model = GPT(cfg, seed=SEED)
    model.load_state_dict(fp32.state_dict())
    model = model.to(torch.bfloat16) if where == "cpu-bf16" else model.cuda()
    initial = GPT(cfg, seed=SEED).state_dict()
    model.shrink_perturb(0.5, 0.1)
    for name, value in model.state_dict().items():
        if name.startswith("blocks."):
            want = (fp32.state_dict()[name].to(value.dtype).float() * 0.5 + 0.1 * initial[name]).to(value.dtype)
            torch.testing.assert_close(value.cpu(), want, rtol=0, atol=1e-6 if where == "cuda" else 0, msg=name)


def test_activation_checkpointing_auto_takes_the_fewest_blocks_that_fit():
    """--activation-checkpointing auto: every checkpointed block costs its forward again, so the trainer takes the
    fewest checkpointed blocks whose plan fits AUTO_SHARE of the card (qwen25_1.5b at 32k here: about 34 GiB with
    every block, 109 without)."""
    import argparse

    from ghostvis.plan import AUTO_SHARE
    from ghostvis.train.loop import card_plan, choose_activation_checkpointing
    from ghostvis.train.stages import ALL_LAYERS
    from launch.train import build_parser

    parser = build_parser()
    base = ["--model", "qwen25_1.5b", "--data", "x", "--out", "x", "--micro-batch", "1", "--seq-len", "32768"]
    args = parser.parse_args([*base, "--activation-checkpointing", "auto"])
    assert args.activation_checkpointing == "auto"
    assert parser.parse_args([*base, "--activation-checkpointing", "6"]).activation_checkpointing == 6
    assert parser.parse_args([*base, "--activation-checkpointing"]).activation_checkpointing is True
    with pytest.raises(argparse.ArgumentTypeError, match="give a block count, auto"):
        parser._option_string_actions["--activation-checkpointing"].type("most")
    with torch.device("meta"):
        model = GPT(get_preset("qwen25_1.5b")[0])
    zero2 = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}

    def gib(n):
        return card_plan(model, _topo(), zero2, args, "base", (), ALL_LAYERS, n).gpu_total / 2**30

    n_layer = model.config.n_layer
    totals = [gib(n) for n in range(n_layer + 1)]
    assert all(a > b for a, b in zip(totals, totals[1:]))  # each checkpointed block saves memory
    for k in (0, 9, n_layer - 1):  # a card on which k blocks fit and k - 1 do not
        card = (totals[k] + (totals[k - 1] if k else totals[0] + 10)) / 2 / AUTO_SHARE
        value, note = choose_activation_checkpointing(model, _topo(), zero2, args, "base", (), ALL_LAYERS, card)
        assert value == k and f"auto → {k} of {n_layer} blocks" in note, (k, value, note)
    card = (totals[-1] + totals[-2]) / 2 / AUTO_SHARE  # only every block fits: True, as the plain flag
    assert choose_activation_checkpointing(model, _topo(), zero2, args, "base", (), ALL_LAYERS, card)[0] is True
    for card in (None, totals[-1] / 2):  # no card (CPU), or the plan does not fit even so: every block
        value, note = choose_activation_checkpointing(model, _topo(), zero2, args, "base", (), ALL_LAYERS, card)
        assert value is True and "every block" in note
    card = totals[0] / AUTO_SHARE + 1  # none checkpointed fits: False, as without the flag
    assert choose_activation_checkpointing(model, _topo(), zero2, args, "base", (), ALL_LAYERS, card)[0] is False
    # under pipeline parallelism the engine takes every block or none, never a count
    zero1 = {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}
    none, every = (card_plan(model, _topo(pp=2), zero1, args, "base", (), ALL_LAYERS, v).gpu_total / 2**30
                   for v in (False, True))
    for card, expected in (((none + every) / 2 / AUTO_SHARE, True), (none * 1.01 / AUTO_SHARE, False)):
        value, _ = choose_activation_checkpointing(model, _topo(pp=2), zero1, args, "base", (), ALL_LAYERS, card)
        assert value is expected


def test_activation_checkpointing_auto_through_the_trainer(tmp_path, text_data, tiny_tokenizer_dir, world1, capsys):
    """auto gets past the shape checks, is resolved before any weight is built, and with no card (CPU)
    checkpoints every block; the run's log records the value it ran with."""
    from conftest import run_stage

    out = tmp_path / "run"
    records = run_stage("--stage", "base", "--model", "tiny", "--data", text_data, "--tokenizer", tiny_tokenizer_dir,
                        "--micro-batch", "2", "--seq-len", "32", "--steps", "1", "--activation-checkpointing", "auto",
                        "--out", out)
    assert len(records) == 1
    assert "activation checkpointing: auto → every block (no card" in capsys.readouterr().out
    log = (out / "run_log.md").read_text()
    assert "activation_checkpointing" in log and "auto" not in log.split("activation_checkpointing", 1)[1][:40]
