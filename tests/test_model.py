"""GPT model: attention/GQA, masking, RoPE, presets, image splice, KV cache, loss, configs."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
import torch.utils._python_dispatch

from ghostvis.config import PRESETS, ModelConfig, VisionConfig, get_preset
from ghostvis.model import GPT, KVCache
from ghostvis.model.attention import attend, attention_backend
from ghostvis.model.layers import RotaryEmbedding, apply_rotary


def tiny(**overrides) -> ModelConfig:
    # vocab 500 pads to 512, so padding columns are exercised
    return get_preset("tiny", **{"vocab_size": 500, **overrides})[0]


def make_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny(**overrides))


def reference_attention(q, k, v, offset=0):
    """Explicit repeat-KV softmax attention; queries are positions offset..offset+Tq of the keys."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    q_pos = torch.arange(q.shape[2]).unsqueeze(-1) + offset
    scores = scores.masked_fill(torch.arange(k.shape[2]) > q_pos, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("q_len,kv_len", [(12, 12), (1, 12), (5, 12)])
def test_gqa_attention_matches_repeat_kv_reference(q_len, kv_len):
    torch.manual_seed(0)
    q = torch.randn(2, 6, q_len, 16, dtype=torch.float64)
    k, v = torch.randn(2, 2, kv_len, 16, dtype=torch.float64), torch.randn(2, 2, kv_len, 16, dtype=torch.float64)
    assert attention_backend(q, q_len, kv_len) == "expand"  # CPU / fp32 never asks SDPA for GQA
    torch.testing.assert_close(attend(q, k, v), reference_attention(q, k, v, offset=kv_len - q_len))


def test_causal_future_tokens_do_not_change_past_logits():
    model = make_model().eval()
    idx = torch.randint(0, 500, (1, 20))
    changed = idx.clone()
    changed[0, 12:] = (changed[0, 12:] + 7) % 500
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3


def test_rope_relative_and_norm_preserving():
    rope = RotaryEmbedding(head_dim=32, max_seq_len=64, theta=10000.0)
    torch.manual_seed(0)
    q, k = torch.randn(32, dtype=torch.float64), torch.randn(32, dtype=torch.float64)

    def rot(x, pos):
        cos, sin = rope(pos, 1)
        return apply_rotary(x.view(1, 32), cos.double(), sin.double()).view(32)

    dots = [rot(q, m) @ rot(k, m - 3) for m in (3, 10, 40)]
    torch.testing.assert_close(torch.stack(dots), dots[0].expand(3), rtol=1e-5, atol=1e-5)  # fp32 tables
    assert (rot(q, 10) @ rot(k, 0) - dots[0]).abs() > 1e-3  # a different offset gives a different score
    torch.testing.assert_close(rot(q, 17).norm(), q.norm())


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds_with_contract_shapes(name):
    cfg, vision = get_preset(name)
    assert (vision is not None) == name.startswith("vlm")
    with torch.device("meta"):
        model = GPT(cfg)
        logits = model(torch.zeros(2, 8, dtype=torch.long))
    assert logits.shape == (2, 8, cfg.vocab_size)
    assert cfg.padded_vocab_size % 64 == 0 and cfg.padded_vocab_size >= cfg.vocab_size
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    d, hd, V = cfg.n_embd, cfg.head_dim, cfg.padded_vocab_size
    assert shapes["wte.weight"] == (V, d)
    assert shapes["blocks.0.attn.q_proj.weight"] == (cfg.n_head * hd, d)
    assert shapes["blocks.0.attn.k_proj.weight"] == (cfg.n_kv_head * hd, d)
    assert shapes["blocks.0.attn.o_proj.weight"] == (d, cfg.n_head * hd)
    assert shapes["blocks.0.mlp.down_proj.weight"] == (d, cfg.ffn_dim)
    assert ("blocks.0.attn.q_proj.bias" in shapes) == cfg.qkv_bias
    assert ("lm_head.weight" in shapes) == (not cfg.tie_embeddings)
    assert f"blocks.{cfg.n_layer - 1}.mlp_norm.weight" in shapes and "norm_f.weight" in shapes
    assert sum(p.numel() for p in model.parameters()) == model.num_params(non_embedding=False)


def test_qwen25_parameter_counts_and_flops():
    cfg, _ = get_preset("qwen25_0.5b")
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params(non_embedding=False) == 494_032_768  # Qwen2.5-0.5B's published count
    non_emb = model.num_params()
    assert non_emb == 494_032_768 - 151936 * 896
    # tied head still costs a matmul per token
    assert model.flops_per_token(2048) == 6 * (non_emb + 151936 * 896) + 12 * 24 * 14 * 64 * 2048


def test_small_preset_scales_with_depth():
    cfg, _ = get_preset("small", depth=20)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.ffn_dim) == (20, 1280, 10, 5, 128, 4480)
    assert not cfg.tie_embeddings and cfg.max_seq_len == 2048 and cfg.rope_theta == 10000.0


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="known presets: .*qwen25_7b"):
        get_preset("gpt5")
    with pytest.raises(ValueError, match="n_head=4 is not divisible by n_kv_head=3"):
        get_preset("tiny", n_kv_head=3)
    with pytest.raises(ValueError, match="n_embd=64 is not divisible by n_head=3"):
        get_preset("tiny", n_head=3, n_kv_head=1)
    with pytest.raises(ValueError, match="--depth only applies"):
        get_preset("qwen25_7b", depth=4)
    with pytest.raises(ValueError, match="unknown override"):
        get_preset("tiny", n_layers=3)
    with pytest.raises(ValueError, match="unknown field.*'bogus'"):
        ModelConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="resampler"):
        get_preset("vlm_tiny", resampler="qformer")


def test_config_json_roundtrip():
    cfg, vision = get_preset("vlm_tiny", image_token_id=7, num_vision_tokens=4)
    assert vision.num_vision_tokens == 4 and cfg.image_token_id == 7
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert VisionConfig.from_dict(json.loads(json.dumps(vision.to_dict()))) == vision
    assert get_preset("vlm_tiny")[1].num_vision_tokens == 16  # overrides never leak into the preset


def _image_batch(token):
    # sample 0: image, text, image, text; sample 1: text, image  (3 images of 4 tokens)
    idx = torch.randint(0, 400, (2, 24))
    idx[0, 1:5] = token
    idx[0, 10:14] = token
    idx[1, 6:10] = token
    return idx


def test_image_splice_order_and_gradient():
    model = make_model(image_token_id=450).eval()
    idx = _image_batch(450)
    torch.manual_seed(1)
    a, b, c = (torch.randn(1, 4, 64) for _ in range(3))
    base = model(idx, image_embeds=torch.cat([a, b, c]))
    # replacing the second image changes sample 0 only after its position 10
    other = model(idx, image_embeds=torch.cat([a, torch.randn(1, 4, 64), c]))
    torch.testing.assert_close(base[0, :10], other[0, :10])
    torch.testing.assert_close(base[1], other[1])
    assert (base[0, 10:] - other[0, 10:]).abs().max() > 1e-4
    # sample 1 sees the third image
    alone = model(idx[1:], image_embeds=c)
    torch.testing.assert_close(base[1:], alone)
    embeds = torch.cat([a, b, c]).requires_grad_(True)
    model(idx, idx, image_embeds=embeds).backward()
    assert all(embeds.grad[i].abs().sum() > 0 for i in range(3))


def test_image_splice_none_and_mismatch():
    model = make_model(image_token_id=450)
    text = torch.randint(0, 400, (2, 8))
    assert model(text).shape == (2, 8, 500)
    with pytest.raises(ValueError, match="12 image-token positions but image_embeds holds 2 images x 4 tokens = 8"):
        model(_image_batch(450), image_embeds=torch.randn(2, 4, 64))
    with pytest.raises(ValueError, match="no image_embeds"):
        model(_image_batch(450))
    with pytest.raises(ValueError, match="image_token_id is None"):
        make_model()(text, image_embeds=torch.randn(1, 4, 64))


@pytest.mark.parametrize("overrides", [{}, {"qk_norm": True, "qkv_bias": True, "tie_embeddings": True}])
def test_kv_cache_prefill_and_decode_match_full_forward(overrides):
    model = make_model(**overrides).eval()
    idx = torch.randint(0, 500, (2, 16))
    full = model(idx)
    cache = KVCache.for_model(model.config, batch_size=2, max_len=32)
    for _ in range(2):  # the second round checks reset()
        cache.reset()
        steps = [model(idx[:, :9], kv_cache=cache), model(idx[:, 9:13], kv_cache=cache)]  # prefill, chunked prefill
        steps += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(13, 16)]  # decode
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)
        assert cache.pos == 16
    with pytest.raises(ValueError, match="KVCache overflow"):
        model(torch.zeros(2, 17, dtype=torch.long), kv_cache=cache)


def test_loss_ignores_targets_and_padding_columns():
    model = make_model()
    assert model.config.padded_vocab_size == 512 and model.config.vocab_size == 500
    idx, targets = torch.randint(0, 500, (2, 10)), torch.randint(0, 500, (2, 10))
    targets[0, :4] = -1
    targets[1, 7:] = -1
    logits = model(idx)
    keep = targets != -1
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(model(idx, targets), expected)
    per_token = model(idx, targets, reduction="none")
    assert per_token.shape == (2, 10) and (per_token[~keep] == 0).all()
    torch.testing.assert_close(per_token.sum(), model(idx, targets, reduction="sum"))
    none_left = model(idx, torch.full_like(targets, -1))
    assert none_left.item() == 0.0
    with pytest.raises(ValueError, match="reduction"):
        model(idx, targets, reduction="avg")


def test_logit_softcap_bounds_logits():
    model = make_model(logit_softcap=3.0, init_std=1.0)
    logits = model(torch.randint(0, 500, (2, 8)))
    assert logits.abs().max() <= 3.0 and logits.abs().max() > 2.5


def test_activation_checkpointing_same_loss_and_grads():
    idx = torch.randint(0, 500, (2, 12))
    results = []
    for on in (False, True):
        model = make_model().train()
        model.set_activation_checkpointing(on)
        loss = model(idx, idx)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for g0, g1 in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g0, g1)


class _KernelCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the attention kernels' forward calls (outside checkpointing's own dispatch mode, so a kept output
    that is not recomputed is not counted)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from ghostvis.model.attention import is_attention_kernel
        self.calls += is_attention_kernel(func)
        return func(*args, **(kwargs or {}))


def test_checkpointed_blocks_keep_attention_and_recompute_the_rest():
    """Selective checkpointing: the attention forward runs once a block (the rest is recomputed), and loss and
    gradients equal the uncheckpointed model's; with recompute_attention the attention runs twice."""
    idx = torch.randint(0, 500, (2, 16))
    model = make_model(n_layer=3).train()
    results = {}
    for ac, recompute in ((False, False), (True, False), ("whole", True)):
        model.set_activation_checkpointing(ac is not False, recompute_attention=recompute)
        model.zero_grad()
        counter = _KernelCounter()
        with counter:
            loss = model(idx, idx)
            loss.backward()
        results[ac] = (counter.calls, loss.detach(), [p.grad.clone() for p in model.parameters()])
    assert results[False][0] == results[True][0] == 3  # one attention forward per block, recompute or not
    assert results["whole"][0] == 6  # --recompute-attention: the whole block again in backward
    for ac in (True, "whole"):
        torch.testing.assert_close(results[ac][1], results[False][1])
        for g0, g1 in zip(results[False][2], results[ac][2]):
            torch.testing.assert_close(g1, g0)


def test_meta_build_then_materialize():
    with torch.device("meta"):
        model = GPT(tiny(qk_norm=True))
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert torch.isfinite(model(torch.randint(0, 500, (1, 8)), torch.randint(0, 500, (1, 8)))).all()
    torch.testing.assert_close(model.rotary.cos, RotaryEmbedding(16, 256, 10000.0).cos)


def test_block_forward_has_no_graph_breaks():
    model = make_model().train()
    cos, sin = model.rotary(0, 8)
    explained = torch._dynamo.explain(model.blocks[0])(torch.randn(2, 8, 64), cos, sin)
    assert explained.graph_break_count == 0


def test_matches_hugging_face_qwen2():
    transformers = pytest.importorskip("transformers")
    cfg = tiny(qkv_bias=True, tie_embeddings=True, rope_theta=1e6, norm_eps=1e-6, vocab_size=512)
    hf_cfg = transformers.Qwen2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    names = {"model.embed_tokens.": "wte.", "model.norm.": "norm_f.", "model.layers.": "blocks.",
             "self_attn.": "attn.", "input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}
    sd = {}
    for key, value in hf.state_dict().items():
        if key == "lm_head.weight":
            continue
        for old, new in names.items():
            key = key.replace(old, new)
        sd[key] = value
    model = GPT(cfg).eval()
    model.load_state_dict(sd)
    idx = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, rtol=1e-4, atol=1e-4)



def _saved_bytes_and_grads(model: GPT, idx: torch.Tensor) -> tuple[int, dict]:
    """Bytes autograd keeps for backward over one training forward, and the gradients after it."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(idx, torch.roll(idx, -1, dims=1))
    loss.backward()
    return sum(saved), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_of_the_first_blocks_saves_memory_not_math():
    model = make_model(n_layer=4)
    idx = torch.randint(0, 500, (2, 32))
    results = {}
    for ac in (False, 2, True):
        model.set_activation_checkpointing(ac)
        results[ac] = _saved_bytes_and_grads(model, idx)
    assert results[True][0] < results[2][0] < results[False][0]
    for ac in (2, True):
        for name, grad in results[False][1].items():
            torch.testing.assert_close(results[ac][1][name], grad, msg=name)
    with pytest.raises(ValueError, match="activation checkpointing of 5 blocks: the model has 4"):
        model.set_activation_checkpointing(5)


def test_attention_choice_on_cpu_is_expand_and_named_gpu_kernels_are_refused():
    from ghostvis.model.attention import AttentionError, select_attention, selected_attention

    assert select_attention("auto", "cpu", torch.float32).kernel == "expand"
    assert select_attention("expand", "cpu", torch.bfloat16).describe() == "expand"
    assert selected_attention() == "expand"
    for name in ("fa4", "cudnn", "sdpa_flash", "fa2"):
        with pytest.raises(AttentionError, match=rf"--attention {name} needs a CUDA device.*--attention auto"):
            select_attention(name, "cpu", torch.bfloat16)
    with pytest.raises(AttentionError, match="unknown kernel"):
        select_attention("xformers", "cpu", torch.float32)


def test_auto_tries_cudnn_first_on_short_rows_and_fa4_on_long_ones():
    from ghostvis.model.attention import AUTO_ORDER, FA4_FROM_SEQ, auto_order
    assert auto_order(None) == auto_order(FA4_FROM_SEQ) == AUTO_ORDER
    short = auto_order(FA4_FROM_SEQ - 1)
    assert short[:2] == ("cudnn", "fa4") and sorted(short) == sorted(AUTO_ORDER)


def test_attention_probe_rejects_a_wrong_kernel_and_passes_a_right_one():
    """The probe that guards every kernel choice on the GPU, run here with CPU stand-ins: the expand
    path passes, a kernel that forgets the causal mask or drops a gradient fails."""
    from ghostvis.model import attention as A

    assert A.probe_kernel(A._expand, torch.device("cpu"), torch.float32, 16) is None

    def not_causal(q, k, v):
        g = q.shape[1] // k.shape[1]
        return torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1))

    assert "relative error" in A.probe_kernel(not_causal, torch.device("cpu"), torch.float32, 16)
    assert "relative error" in A.probe_kernel(lambda q, k, v: A._expand(q, k.detach(), v), torch.device("cpu"),
                                        torch.float32, 16)

    def broken(q, k, v):
        raise RuntimeError("no kernel image is available")

    assert "failed its probe (RuntimeError: no kernel image" in A.probe_kernel(broken, torch.device("cpu"), torch.float32, 16)
