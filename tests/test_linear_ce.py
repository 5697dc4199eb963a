"""The chunked head + cross-entropy equals full logits + F.cross_entropy, values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from ghostvis.config import get_preset
from ghostvis.model import GPT
from ghostvis.model import linear_ce
from ghostvis.model.linear_ce import linear_cross_entropy

VOCAB, PADDED, D = 50, 64, 16  # columns 50..63 are padding


def reference(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, cap: float | None) -> torch.Tensor:
    logits = (x @ w.t()).float()[..., :VOCAB]
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-1,
                           reduction="none").view(targets.shape)


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, D, generator=g)
    w = torch.randn(PADDED, D, generator=g) * 0.5
    targets = torch.randint(0, VOCAB, (3, 7), generator=g)
    targets[0, :3] = -1
    return x, w, targets


@pytest.mark.parametrize("cap", [None, 2.0])
@pytest.mark.parametrize("chunk_elements", [PADDED * 4, PADDED * 1000])  # 6 uneven chunks of 4 rows; one chunk
def test_matches_full_logits_loss_and_gradients(cap, chunk_elements):
    x, w, targets = inputs()
    upstream = torch.rand(3, 7)  # per-token weights: the "none" reduction GRPO uses
    ours_x, ours_w = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref_x, ref_w = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = linear_cross_entropy(ours_x, ours_w, targets, vocab_size=VOCAB, softcap=cap, chunk_elements=chunk_elements)
    ref = reference(ref_x, ref_w, targets, cap)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert loss.dtype == torch.float32 and (loss[0, :3] == 0).all() and (loss[1] > 0).all()
    (loss * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(ours_x.grad, ref_x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_w.grad, ref_w.grad, rtol=1e-5, atol=1e-6)
    assert ours_w.grad[VOCAB:].abs().max() == 0  # padding rows never take probability


@pytest.mark.parametrize("cap", [None, 2.0])
def test_fused_chunk_kernels_match_full_logits(cap, monkeypatch):
    """The chunks' elementwise work compiled into fused kernels (what a GPU runs) gives the same losses and
    gradients: forced on CPU here, over chunks of 6 rows then 3 (one dynamic-shape graph per function)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(linear_ce, "_chunk_kernel", lambda fn, on_gpu: linear_ce._FUSED[fn])
    x, w, targets = inputs(2)
    upstream = torch.rand(3, 7)
    ours_x, ours_w = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref_x, ref_w = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = linear_cross_entropy(ours_x, ours_w, targets, vocab_size=VOCAB, softcap=cap, chunk_elements=PADDED * 6)
    ref = reference(ref_x, ref_w, targets, cap)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    (loss * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(ours_x.grad, ref_x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_w.grad, ref_w.grad, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]  # compiled, whole, once each


@pytest.mark.parametrize("name", ["_chunk_stats", "_chunk_grad"])
def test_each_chunk_function_compiles_to_one_kernel_with_no_fp32_chunk(name):
    """The point of compiling them: one pass over a chunk of bf16 logits, no fp32 copy of the chunk written out
    (a scatter in `_chunk_grad` once split it in two, behind an fp32 softmax buffer). Checked in inductor's CPU code."""
    import re

    from torch._inductor.utils import run_and_get_code

    rows, width, first_pad = 8, 64, 50
    z = torch.randn(rows, width, dtype=torch.bfloat16)
    t, hit = torch.randint(0, first_pad, (rows,)), torch.ones(rows, dtype=torch.bool)
    args = ((z, t, hit, None, first_pad) if name == "_chunk_stats"
            else (z, torch.rand(rows), t, hit, torch.rand(rows), None, first_pad))
    _, code = run_and_get_code(torch.compile(getattr(linear_ce, name), dynamic=True), *args)
    assert len(set(re.findall(r"cpp_fused_\w+", code[0]))) == 1, code[0]
    assert not re.search(r"empty_strided_cpu\(\(\w+, \w+\), \(\w+, 1\), torch\.float32\)", code[0]), code[0]


def test_fused_kernels_that_cannot_compile_fall_back_once_with_a_warning():
    class NoCompiler(torch._dynamo.exc.BackendCompilerFailed):
        def __init__(self):
            RuntimeError.__init__(self, "no C compiler for Triton's launcher")

    def fails(*args):
        raise NoCompiler()

    fused = linear_ce._Fused(linear_ce._chunk_stats)
    fused.compiled = fails
    z, t, hit = torch.randn(4, 64), torch.randint(0, 50, (4,)), torch.ones(4, dtype=torch.bool)
    with pytest.warns(UserWarning, match="runs unfused.*no C compiler"):
        got = fused(z.clone(), t, hit, None, 50)
    for a, b in zip(got, linear_ce._chunk_stats(z.clone(), t, hit, None, 50)):
        torch.testing.assert_close(a, b)
    assert fused.compiled is None  # later calls go straight to the eager function, without a warning


def test_frozen_head_gets_no_gradient_and_autocast_keeps_input_dtypes():
    x, w, targets = inputs(1)
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, w, targets, vocab_size=VOCAB)
        ref = reference(x, w, targets, None)  # autocast runs its matmul in bf16 too
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)
    loss.sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad is None


def test_gpt_loss_equals_cross_entropy_of_its_logits():
    cfg = get_preset("tiny", vocab_size=500, image_token_id=450, logit_softcap=4.0)[0]
    torch.manual_seed(0)
    model = GPT(cfg)
    idx = torch.randint(0, 400, (2, 12))
    targets = torch.roll(idx, -1, dims=1)
    targets[0, 4:6] = 450  # image placeholders are not predicted
    loss = model(idx, targets)
    logits = model(idx)
    counted = targets.masked_fill(targets == 450, -1)
    expected = F.cross_entropy(logits.reshape(-1, 500), counted.reshape(-1), ignore_index=-1)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    per_token = model(idx, targets, reduction="none")
    assert per_token.shape == (2, 12) and (per_token[0, 4:6] == 0).all()
    with pytest.raises(ValueError, match="reduction must be"):
        model(idx, targets, reduction="avg")


def _tp_worker(rank: int, world: int, init_file: str) -> None:
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(9, D, generator=g), torch.randn(64, D, generator=g)  # vocab 30: rank 1 holds only padding
        targets = torch.randint(0, 30, (9,), generator=g)
        targets[2] = -1
        shard = w.chunk(world)[rank].clone().requires_grad_()
        loss = linear_cross_entropy(x, shard, targets, vocab_size=30, softcap=3.0, tp_group=dist.group.WORLD,
                                    chunk_elements=32 * 4)
        logits = 3.0 * torch.tanh((x @ w.t())[:, :30] / 3.0)
        ref_w = w.clone().requires_grad_()
        ref = F.cross_entropy(3.0 * torch.tanh((x @ ref_w.t())[:, :30] / 3.0), targets, ignore_index=-1, reduction="none")
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(logits).all()
        loss.sum().backward()
        ref.sum().backward()
        torch.testing.assert_close(shard.grad, ref_w.grad.chunk(world)[rank], rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_with_a_shard_of_only_padding(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_tp_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=True)
