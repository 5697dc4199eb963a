"""Context parallelism (ghostvis/parallel/context.py): two real gloo ranks each holding two chunks of the
sequence give the one-rank loss, per-token losses and gradients, for text and for images whose vision
tokens span a chunk boundary; and the trainer with --cp 2 × dp 2 and with --tp 2 × --cp 2 (four ranks each)
trains exactly like the same run without CP."""

from __future__ import annotations

import copy
import datetime
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import REPO, TOK, TRAIN, run_one, run_ranks, tiny_gpt, tiny_vlm
from safetensors.torch import load_file

from ghostvis.parallel import Topology
from ghostvis.parallel.context import ContextParallel
from ghostvis.parallel.layout import parallelize

IMAGE = TOK.image_token_id


def _compare(ref: torch.nn.Module, cp_model: torch.nn.Module, cp: ContextParallel, idx: torch.Tensor,
             targets: torch.Tensor, **images: torch.Tensor) -> None:
    ref_loss = ref(idx, targets, **images)
    cp_loss = cp_model(idx, targets, **images)
    torch.testing.assert_close(cp_loss, ref_loss, rtol=1e-5, atol=1e-6)
    ref_loss.backward()
    cp_loss.backward()
    checked = 0
    for (name, p), (_, q) in zip(ref.named_parameters(), cp_model.named_parameters(), strict=True):
        if p.grad is None:
            assert q.grad is None, name
            continue
        grad = q.grad.clone()
        if p.grad.abs().sum() > 0:  # each rank computed only its share (×cp): not the whole gradient
            assert not torch.allclose(grad, p.grad, rtol=1e-3, atol=0), name
        dist.all_reduce(grad)  # what DeepSpeed does over the CP × DP group: the mean over CP ranks
        torch.testing.assert_close(grad / cp.size, p.grad, rtol=1e-4, atol=1e-6, msg=name)
        checked += 1
    assert checked > 10
    with torch.no_grad():
        for reduction in ("none", "sum"):
            torch.testing.assert_close(cp_model(idx, targets, reduction=reduction, **images),
                                       ref(idx, targets, reduction=reduction, **images), rtol=1e-5, atol=1e-5)


def _worker(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        topo = Topology(cp=2)  # the trainer's way in: Topology, then parallelize
        cp = topo.context_parallel
        assert (topo.cp_size, topo.cp_rank, topo.dp_size, cp.rank) == (2, rank, 1, rank)
        assert topo.get_data_parallel_world_size() == 2  # DeepSpeed averages over the CP ranks
        # text: 30 positions pad to 32 = 4 chunks of 8; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
        assert cp.positions(32, torch.device("cpu")).tolist() == ([*range(8), *range(24, 32)] if rank == 0
                                                                 else list(range(8, 24)))
        ref = tiny_gpt(seed=0).train()
        cp_model = parallelize(copy.deepcopy(ref), topo)
        g = torch.Generator().manual_seed(1)
        idx = torch.randint(0, 256, (2, 30), generator=g)
        targets = torch.roll(idx, -1, dims=1)
        targets[1, :7] = -1
        _compare(ref, cp_model, cp, idx, targets)

        # images: 3 of 16 vision tokens in 2 rows of 64 (chunks of 16). Row 0's first image covers 10-25,
        # across the chunk 0 | 1 boundary (rank 0 | rank 1); row 1's two cover 20-35 and 40-55
        ref = tiny_vlm(seed=0).train()
        ref.vision.encoder.frozen = False  # the whole tower's gradients must come back whole too
        ref.vision.encoder.requires_grad_(True)
        cp_model = parallelize(copy.deepcopy(ref), topo)
        idx = torch.randint(0, 256, (2, 64), generator=g)
        idx[0, 10:26] = idx[1, 20:36] = idx[1, 40:56] = IMAGE
        targets = torch.roll(idx, -1, dims=1)
        targets[0, 50:] = -1
        pixels = torch.randn(3, 3, 64, 64, generator=g)
        _compare(ref, cp_model, cp, idx, targets, pixel_values=pixels)
        # a text-only batch through the VLM: the empty image tensor still reaches the tower on every rank
        for model in (ref, cp_model):
            model.zero_grad()
        _compare(ref, cp_model, cp, idx.masked_fill(idx == IMAGE, 5), targets, pixel_values=pixels[:0])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_cp2_matches_one_rank_for_text_and_images(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=True)


@pytest.fixture(scope="module")
def captions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data_prep import synth

    out = tmp_path_factory.mktemp("synth")
    synth.generate(out, seed=3, num_captions=24, num_vqa=4, num_val=4, num_test=4, num_arith=4, num_arith_test=4,
                   num_text_docs=2, shard_size=12)
    return out / "captions"


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_trainer_cp2_dp2_and_tp2_cp2_train_like_without_cp(tmp_path, captions, tiny_tokenizer_dir):
    """vision_pretrain with the encoder, the projector and both LLM blocks training, ZeRO-2 (partitioned over
    the CP × DP ranks). Caption rows are padded to their batch's longest (not a multiple of 4: the model pads),
    and each image's 16 vision tokens start near position 1, across the first chunk boundary."""
    common = ("--stage", "vision_pretrain", "--model", "vlm_tiny", "--data", captions, "--tokenizer",
              tiny_tokenizer_dir, "--seq-len", "64", "--steps", "2", "--save-every", "0", "--eval-every", "0",
              "--warmup", "1", "--lr", "3e-3", "--encoder-lr", "1e-3", "--train-llm-layers", "all",
              "--ds_config", REPO / "ds_configs" / "zero2.json")
    runs = {}
    val = ("--eval-every", "2", "--eval-batches", "2")  # validation bits per byte: per-token losses gathered
    for name, nproc, flags in (("one", 1, ("--micro-batch", "4", *val)), ("dp2", 2, ("--micro-batch", "2")),
                               ("cp2dp2", 4, ("--micro-batch", "2", "--cp", "2")),
                               # TP inside each CP rank, and the blocks recomputed in backward (a second all-gather)
                               ("tp2cp2", 4, ("--micro-batch", "4", "--cp", "2", "--tp", "2",
                                              "--activation-checkpointing", *val))):
        runs[name] = tmp_path / name
        run_ranks(TRAIN, [*common, "--out", runs[name], *flags], nproc=nproc)
    assert "4 rank(s) as Topology(tp=1, pp=1, cp=2, dp=2)" in (runs["cp2dp2"] / "run_log.md").read_text()
    for ref, got in (("dp2", "cp2dp2"), ("one", "tp2cp2")):
        # same weights, same batches (CP ranks of a replica read the same ones), same update
        for r, g in zip(_metrics(runs[ref]), _metrics(runs[got]), strict=True):
            assert g["loss"] == pytest.approx(r["loss"], rel=1e-5), got
            assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-4), got
            # each sequence's tokens counted once, not once per CP rank
            assert g["tokens_per_s"] * g["step_s"] == pytest.approx(r["tokens_per_s"] * r["step_s"], rel=1e-6), got
        if got == "tp2cp2":
            assert _metrics(runs[got])[-1]["val_bpb"] == pytest.approx(_metrics(runs[ref])[-1]["val_bpb"], rel=1e-5)
        for part in ("llm", "vision"):
            wa, wb = (load_file(str(runs[n] / f"{part}.safetensors")) for n in (ref, got))
            assert wa.keys() == wb.keys()
            for key in wa:
                # Adam's normalised step turns reduction-order noise in a near-zero gradient into ~lr·1e-2
                torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=5e-5, msg=f"{got} {key}")


def test_bad_cp_settings_get_one_line_errors(world1, tmp_path):
    from ghostvis.parallel import Topology
    from ghostvis.train import engine as ds_engine
    from ghostvis.train.stages import STAGES

    with pytest.raises(ValueError, match=r"--tp 1 × --pp 1 × --cp 2 = 2 does not divide the world size 1; launch"):
        Topology(cp=2)
    with pytest.raises(ValueError, match="--cp 2 with --pp 2: context parallelism runs without pipeline stages"):
        Topology(pp=2, cp=2)
    with pytest.raises(ds_engine.ConfigError, match=r"--seq-len 66 does not split into 2 × --cp 2 = 4 .*of 4"):
        ds_engine.check_context_parallel(2, 66, STAGES["base"], False)
    with pytest.raises(ds_engine.ConfigError, match="--cp 2 with --stage rl.*run it with --cp 1"):
        ds_engine.check_context_parallel(2, 64, STAGES["rl"], False)
    with pytest.raises(ds_engine.ConfigError, match="--compile with --cp 2 is not verified"):
        ds_engine.check_context_parallel(2, 64, STAGES["base"], True)
    ds_engine.check_context_parallel(2, 64, STAGES["sft"], False)
    ds_engine.check_context_parallel(1, 63, STAGES["rl"], True)  # nothing to check without CP
    # a checkpoint records its --cp; resuming with another is refused like another --tp
    from ghostvis.train import checkpoint

    tag = tmp_path / "run" / "ckpt" / "step-00000002"
    tag.mkdir(parents=True)
    (tag.parent / "latest").write_text(tag.name)
    state = {"world_size": 2, "layout": {"tp": 1, "pp": 1, "dp": 1, "cp": 2}}
    (tag / "client_state_rank0.json").write_text(json.dumps(state))
    assert not checkpoint.prepare_universal(tmp_path / "run", {"tp": 1, "pp": 1, "dp": 1, "cp": 2})
    with pytest.raises(checkpoint.CheckpointError, match="saved with --tp 1 --pp 1 --cp 2, this run has --tp 1 --pp 1: "
                                                         "resume with the same --tp/--pp/--cp"):
        checkpoint.prepare_universal(tmp_path / "run", {"tp": 1, "pp": 1, "dp": 2})
    # through the command line: one line on stderr, exit 2
    proc = run_one(TRAIN, ["--model", "tiny", "--data", tmp_path, "--out", tmp_path / "out", "--cp", "2"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --tp 1 × --pp 1 × --cp 2 = 2 does not divide the world size 1; launch a multiple of 2 ranks or "
        "change --tp/--pp/--cp")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the lower-right causal kernels are CUDA's")
def test_attend_prefix_on_cuda_matches_fp32_math():
    """A late chunk's queries over the whole prefix of keys, in bf16 through the kernel CP uses on GPU,
    against the explicit-mask fp32 attention: output and gradients."""
    from ghostvis.model.attention import attend_masked
    from ghostvis.parallel.context import attend_prefix

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, t, 128, device="cuda", generator=g) for h, t in ((12, 1024), (2, 4096), (2, 4096)))
    grad = torch.randn(1, 12, 1024, 128, device="cuda", generator=g)
    mask = torch.arange(4096, device="cuda") <= (torch.arange(1024, device="cuda") + 3072).unsqueeze(-1)
    results = []
    for fn, dtype in ((attend_prefix, torch.bfloat16), (lambda a, b, c: attend_masked(a, b, c, mask), torch.float32)):
        ins = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
        out = fn(*ins)
        out.backward(grad.to(dtype))
        results.append([out.float(), *(t.grad.float() for t in ins)])
    for name, got, ref in zip(("out", "dq", "dk", "dv"), *results):
        assert ((got - ref).norm() / ref.norm()).item() < 2e-2, name
