"""Tensor parallelism: tp=2 on two real gloo processes equals tp=1 from the same weights."""

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ghostvis.config import get_preset
from ghostvis.model import GPT, KVCache, gather_state_dict, shard_state_dict

IMAGE = 450
CASES = [
    {},
    # tied head through the vocab-parallel embedding, biases, QK-norm, soft-cap, 4 query heads per KV head
    {"tie_embeddings": True, "qkv_bias": True, "qk_norm": True, "logit_softcap": 5.0, "n_head": 8, "n_kv_head": 2},
]


def config(**overrides):
    # vocab 500 -> 512 rows: rank 1's shard ends in 12 padding rows the loss must skip
    return get_preset("tiny", vocab_size=500, image_token_id=IMAGE, **overrides)[0]


def _gather(tensors: dict, world: int) -> list[dict]:
    per_rank = [{} for _ in range(world)]
    for name, t in tensors.items():
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        for r in range(world):
            per_rank[r][name] = parts[r]
    return per_rank


def _check_case(rank: int, world: int, overrides: dict) -> None:
    cfg = config(**overrides)
    torch.manual_seed(0)
    full = GPT(cfg)
    tp = GPT(cfg, tp_group=dist.group.WORLD)
    tp.load_state_dict(shard_state_dict(full.state_dict(), cfg, rank, world))
    assert tp.blocks[0].attn.n_head == cfg.n_head // 2 and tp.blocks[0].attn.n_kv_head == cfg.n_kv_head // 2

    idx = torch.randint(0, 400, (2, 16))
    idx[0, 2:6] = IMAGE
    targets = torch.roll(idx, -1, dims=1)
    targets[1, :5] = -1
    images = torch.randn(1, 4, cfg.n_embd)
    ref_images, tp_images = images.clone().requires_grad_(True), images.clone().requires_grad_(True)

    ref_loss = full(idx, targets, image_embeds=ref_images)
    tp_loss = tp(idx, targets, image_embeds=tp_images)
    torch.testing.assert_close(tp_loss, ref_loss, rtol=1e-5, atol=1e-6)
    ref_loss.backward()
    tp_loss.backward()
    grads = gather_state_dict(_gather({n: p.grad for n, p in tp.named_parameters()}, world), cfg)
    ref_grads = {n: p.grad for n, p in full.named_parameters()}
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(tp_images.grad, ref_images.grad, rtol=1e-4, atol=1e-6)

    with torch.no_grad():
        text = torch.randint(0, 400, (2, 10))
        full_logits = full(text)
        torch.testing.assert_close(tp(text), full_logits, rtol=1e-5, atol=1e-5)
        cache = KVCache.for_model(cfg, batch_size=2, max_len=16, tp_size=world)
        steps = [tp(text[:, :7], kv_cache=cache)] + [tp(text[:, t:t + 1], kv_cache=cache) for t in range(7, 10)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full_logits, rtol=1e-4, atol=1e-5)


def _worker(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for overrides in CASES:
            _check_case(rank, world, overrides)
        with pytest.raises(ValueError, match="n_kv_head=1 is not divisible by tp=2"):
            GPT(config(n_kv_head=1), tp_group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_tp2_matches_tp1_loss_gradients_and_logits(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=True)


def test_shard_gather_roundtrip_splits_by_kv_groups():
    cfg = config(n_head=8, n_kv_head=2)
    sd = GPT(cfg).state_dict()
    shards = [shard_state_dict(sd, cfg, r, 2) for r in range(2)]
    hd = cfg.head_dim
    # rank 1 holds query heads 4..7 and KV head 1: exactly the group those queries attend to
    torch.testing.assert_close(shards[1]["blocks.0.attn.q_proj.weight"], sd["blocks.0.attn.q_proj.weight"][4 * hd:])
    torch.testing.assert_close(shards[1]["blocks.0.attn.k_proj.weight"], sd["blocks.0.attn.k_proj.weight"][hd:])
    assert shards[0]["blocks.0.attn.o_proj.weight"].shape == (cfg.n_embd, 4 * hd)
    assert shards[0]["wte.weight"].shape == (cfg.padded_vocab_size // 2, cfg.n_embd)
    back = gather_state_dict(shards, cfg)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_tp_refuses_heads_that_do_not_divide():
    cfg = config()  # 4 heads, 2 KV heads
    sd = GPT(cfg).state_dict()
    with pytest.raises(ValueError, match="n_kv_head=2 is not divisible by tp=4"):
        shard_state_dict(sd, cfg, 0, 4)
    with pytest.raises(ValueError, match="n_head=4 is not divisible by tp=3"):
        shard_state_dict(sd, cfg, 0, 3)
