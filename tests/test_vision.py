"""Vision tower and VLM: splicing, resamplers, frozen encoder, local weights, robust image decoding."""

from __future__ import annotations

import dataclasses
import io
import types

import numpy as np
import pytest
import timm
import timm.data
import torch
import torch.nn.functional as F
from PIL import Image

from ghostvis.checkpoint_io import load_encoder_weights
from ghostvis.config import VisionConfig, get_preset
from ghostvis.model.vlm import VLM
from ghostvis.vision import resampler as resampler_module
from ghostvis.vision.encoder import VisionEncoder
from ghostvis.vision.resampler import AvgPoolResampler, PerceiverResampler, PixelShuffleResampler, build_resampler
from ghostvis.vision.transforms import BadImage, data_config, image_transform, load_image, normalize_pixels

IMG = 500  # image token id inside the tiny preset's 512-token vocabulary


def tiny_vlm(seed: int = 0, **vision_overrides) -> VLM:
    torch.manual_seed(seed)
    model_cfg, vision_cfg = get_preset("vlm_tiny", image_token_id=IMG, **vision_overrides)
    return VLM(model_cfg, vision_cfg)


def first_block_input(vlm: VLM, idx: torch.Tensor, **kw) -> torch.Tensor:
    seen = []
    handle = vlm.llm.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    vlm(idx, **kw)
    handle.remove()
    return seen[0]


def test_splice_images_in_order_across_mixed_batch():
    vlm = tiny_vlm().eval()
    n = vlm.num_vision_tokens
    idx = torch.randint(0, 400, (3, 3 * n + 10))
    idx[0, 2:2 + n] = IMG  # sample 0: two images
    idx[0, 5 + n:5 + 2 * n] = IMG
    idx[2, 7:7 + n] = IMG  # sample 1: none, sample 2: one
    pixels = torch.randn(3, 3, 64, 64)
    x = first_block_input(vlm, idx, pixel_values=pixels)
    with torch.no_grad():
        embeds = vlm.vision(pixels)
        text = vlm.llm.wte(idx)
    assert torch.equal(x[0, 2:2 + n], embeds[0])
    assert torch.equal(x[0, 5 + n:5 + 2 * n], embeds[1])
    assert torch.equal(x[2, 7:7 + n], embeds[2])
    is_text = idx != IMG
    assert torch.equal(x[is_text], text[is_text])
    assert not torch.equal(embeds[0], embeds[1])  # distinct images give distinct tokens


def test_splice_count_mismatch_is_a_clear_error():
    vlm = tiny_vlm().eval()
    n = vlm.num_vision_tokens
    idx = torch.randint(0, 400, (2, 2 * n + 4))
    idx[0, :n] = IMG
    idx[1, 2:2 + n] = IMG
    with pytest.raises(ValueError, match="image-token positions"):
        vlm(idx, pixel_values=torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="image-token positions"):
        vlm(idx)
    with pytest.raises(ValueError, match=r"\[N, 3, 64, 64\]"):
        vlm(idx, pixel_values=torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="not both"):
        vlm(idx, pixel_values=torch.randn(2, 3, 64, 64), image_features=torch.randn(2, 64, 192))


@pytest.mark.parametrize("tower", [
    {},  # ViT + pixel shuffle + one linear layer
    {"resampler": "avgpool", "projector_hidden": 32},
    {"resampler": "perceiver", "num_vision_tokens": 8, "resampler_heads": 2, "projector_hidden": 128},
    {"encoder": "resnet10t", "feature_layer": 2, "resampler": "pixel_shuffle", "encoder_kwargs": {}},
])
def test_text_only_batch_with_empty_images_gives_zero_vision_grads(tower, monkeypatch):
    """An SFT mixture has text-only batches (arithmetic): every tower must take zero images, and give every
    weight that trains a zero gradient. On CUDA, torch 2.11's SDPA returned None for the perceiver's empty
    batch; the resampler's SDPA does so here too, so it must not be called on one (the timm encoder is pinned
    on CUDA to SDPA backends that accept empty batches)."""
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(resampler_module, "F", types.SimpleNamespace(**{**vars(F), "scaled_dot_product_attention": (
        lambda q, *a, **k: None if q.shape[0] == 0 else sdpa(q, *a, **k))}))
    vlm = tiny_vlm(**tower)
    idx = torch.randint(0, 400, (2, 24))
    loss = vlm(idx, idx, pixel_values=torch.zeros(0, 3, 64, 64))
    assert torch.equal(loss, vlm.llm(idx, idx))
    loss.backward()
    grads = [p.grad for p in vlm.vision.parameters() if p.requires_grad]
    assert grads and all(g is not None and not g.any() for g in grads)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the None came from CUDA's SDPA backends")
def test_perceiver_takes_an_empty_batch_on_cuda_in_bf16():
    """The GPU half of the test above, with the real kernels: the perceiver as sft runs it (bf16 autocast,
    SDPA unpinned) on a batch with no image and on one with images; every weight gets a gradient."""
    llm, vision = get_preset("vlm_small")
    resampler = build_resampler(vision.for_llm(llm), llm.n_embd, 196).cuda()
    for n in (0, 3):
        resampler.zero_grad()
        x = torch.randn(n, 196, 768, device="cuda", requires_grad=True)
        with torch.autocast("cuda", torch.bfloat16):
            y = resampler(x)
        assert y.shape == (n, vision.num_vision_tokens, 768)
        y.float().sum().backward()
        assert all(p.grad is not None for p in resampler.parameters())


def test_cached_features_path_matches_pixels():
    vlm = tiny_vlm().eval()
    n = vlm.num_vision_tokens
    idx = torch.randint(0, 400, (1, n + 6))
    idx[0, 3:3 + n] = IMG
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = vlm.vision.encode(pixels)
        assert torch.equal(vlm(idx, pixel_values=pixels), vlm(idx, image_features=features))
    with pytest.raises(ValueError, match="cached features"):
        vlm(idx, image_features=features[:, :10])


def test_vlm_requires_image_token_id():
    model_cfg, vision_cfg = get_preset("vlm_tiny")
    with pytest.raises(ValueError, match="image_token_id"):
        VLM(model_cfg, vision_cfg)


@pytest.mark.parametrize("make, tokens, dim", [
    (lambda: PerceiverResampler(96, num_tokens=9, depth=2, heads=4), 9, 96),
    (lambda: AvgPoolResampler(96, num_tokens=16, num_patches=64), 16, 96),
    (lambda: PixelShuffleResampler(96, num_tokens=16, num_patches=64), 16, 96 * 4),
])
def test_resampler_output_shapes(make, tokens, dim):
    resampler = make()
    out = resampler(torch.randn(3, 64, 96))
    assert out.shape == (3, tokens, dim)
    assert (resampler.num_tokens, resampler.out_dim) == (tokens, dim)


def test_pixel_shuffle_is_space_to_depth():
    grid = torch.arange(16.0).reshape(1, 16, 1)  # a 4x4 grid of scalar patches, row-major
    out = PixelShuffleResampler(1, num_tokens=4, num_patches=16)(grid)
    assert out[0, 0].tolist() == [0, 1, 4, 5]  # the top-left 2x2 block
    assert out[0, 3].tolist() == [10, 11, 14, 15]


def test_grid_position_embedding_tells_tokens_apart():
    """position_embedding adds row + column embeddings (zero at the start) to a grid resampler's tokens;
    once trained, two images that differ only in where a patch lies give different tokens there."""
    plain = PixelShuffleResampler(1, num_tokens=4, num_patches=16)
    placed = PixelShuffleResampler(1, num_tokens=4, num_patches=16, position=True)
    grid = torch.arange(16.0).reshape(1, 16, 1)
    assert torch.equal(placed(grid), plain(grid))  # zero-initialised: no change until it learns
    with torch.no_grad():
        placed.position.row.copy_(torch.tensor([0.0, 10.0]).reshape(2, 1, 1))
        placed.position.col.copy_(torch.tensor([0.0, 1.0]).reshape(1, 2, 1))
    shift = placed(torch.zeros(1, 16, 1))[0, :, 0]
    assert shift.tolist() == [0.0, 1.0, 10.0, 11.0]  # token i = row i // 2, column i % 2
    assert [n for n, _ in placed.named_parameters()] == ["position.row", "position.col"]
    vlm = tiny_vlm(resampler="avgpool", position_embedding=True)
    assert {n for n, _ in vlm.vision.named_parameters() if "position" in n} == {"resampler.position.row",
                                                                               "resampler.position.col"}
    with pytest.raises(ValueError, match="grid resampler"):
        tiny_vlm(resampler="perceiver", resampler_heads=4, projector_hidden=128, position_embedding=True)


def test_resampler_config_errors():
    with pytest.raises(ValueError, match="num_vision_tokens"):
        PixelShuffleResampler(96, num_tokens=10, num_patches=64)
    with pytest.raises(ValueError, match="resampler_heads"):
        PerceiverResampler(96, num_tokens=4, depth=1, heads=7)
    with pytest.raises(ValueError, match="perfect square"):
        AvgPoolResampler(96, num_tokens=12, num_patches=64)
    with pytest.raises(ValueError, match=r"projector_hidden=-3; .* -1 \(the LLM's width\) or -2 \(the LLM's ffn"):
        VisionConfig(projector_hidden=-3)
    with pytest.raises(ValueError, match=r"resampler_heads=-1; give a head count or 0 \(the LLM's n_head\)"):
        VisionConfig(resampler_heads=-1)


def test_perceiver_is_idefics2_shaped_and_old_checkpoints_are_refused():
    vlm = tiny_vlm(resampler="perceiver", resampler_heads=4, projector_hidden=128)
    assert vlm.vision.resampler.out_dim == vlm.config.n_embd  # it runs after the projector, at the LLM's width
    names = set(vlm.vision.state_dict())
    assert {"projector.gate_proj.weight", "resampler.layers.0.self_attn.k_proj.weight",
            "resampler.layers.0.input_context_norm.weight", "resampler.norm.weight"} <= names
    state = {k: v for k, v in vlm.state_dict().items() if not k.startswith("vision.resampler.layers.")}
    state["vision.resampler.blocks.0.norm_q.weight"] = torch.ones(64)  # the earlier perceiver's layout
    with pytest.raises(ValueError, match=r"vision\.resampler\.blocks\.\*: .*earlier, pre-Idefics2.*retrain"):
        vlm.load_state_dict(state)


def test_frozen_encoder_untouched_by_training_step():
    vlm = tiny_vlm(resampler="perceiver", resampler_heads=4, projector_hidden=128).train()
    encoder = vlm.vision.encoder
    assert not encoder.training  # frozen encoder stays in eval inside model.train()
    enc_before = {k: v.clone() for k, v in encoder.state_dict().items()}
    trained_before = {k: v.clone() for k, v in vlm.vision.named_parameters() if not k.startswith("encoder.")}
    opt = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=1e-2)
    n = vlm.num_vision_tokens
    idx = torch.randint(0, 400, (2, n + 8))
    idx[:, 4:4 + n] = IMG
    vlm(idx, idx, pixel_values=torch.randn(2, 3, 64, 64)).backward()
    assert all(p.grad is None for p in encoder.parameters())
    opt.step()
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, enc_before[k]), k
    changed = {k for k, v in vlm.vision.named_parameters() if k in trained_before and not torch.equal(v, trained_before[k])}
    assert any(k.startswith("resampler.") for k in changed) and any(k.startswith("projector.") for k in changed)


def _encoder_cfg(**overrides) -> VisionConfig:
    _, cfg = get_preset("vlm_tiny", **{"encoder_kwargs": {"depth": 3, "patch_size": 8}, "feature_norm": False,
                                       **overrides})
    return cfg


def test_encoder_weights_roundtrip_and_full_timm_checkpoint(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    cfg = _encoder_cfg()
    full = timm.create_model(cfg.encoder, pretrained=False, num_classes=0, img_size=64, **cfg.encoder_kwargs).eval()
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "timm.safetensors"))
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        (expected,) = full.forward_intermediates(pixels, indices=[1], output_fmt="NLC", intermediates_only=True)

    torch.manual_seed(2)  # different init: only loading can make the features match
    loaded = VisionEncoder(cfg)
    load_encoder_weights(loaded, tmp_path / "timm.safetensors")
    assert torch.equal(loaded(pixels), expected)
    assert len(loaded.model.blocks) == 2  # the unused last block is pruned

    loaded.save_encoder_weights(tmp_path / "encoder.safetensors")
    fresh = VisionEncoder(cfg)
    assert not torch.equal(fresh(pixels), expected)
    load_encoder_weights(fresh, tmp_path / "encoder.safetensors")
    assert torch.equal(fresh(pixels), expected)


def test_cnn_encoder_feature_map_as_patch_tokens(tmp_path):
    """A timm CNN (vlm_tiny_cnn: ResNet-10t, stride-16 stage) gives its feature map as row-major patch
    tokens, trains when unfrozen, and saves/loads its pruned weights."""
    torch.manual_seed(0)
    model_cfg, cfg = get_preset("vlm_tiny_cnn", image_token_id=IMG)
    enc = VisionEncoder(cfg, frozen=False)
    assert enc.grid == (4, 4) and enc.dim == 256 and not list(enc.model.layer4.children())  # the last stage pruned
    pixels = torch.randn(2, 3, 64, 64)
    feats = enc(pixels)
    with torch.no_grad():
        (fmap,) = enc.model.forward_intermediates(pixels, indices=[3], intermediates_only=True)
    assert feats.shape == (2, 16, 256) and torch.equal(feats[:, 5], fmap[:, :, 1, 1])  # token 5 = row 1, col 1
    feats.sum().backward()
    assert all(p.grad is not None for p in enc.parameters())
    vlm = VLM(model_cfg, cfg)
    assert vlm.num_vision_tokens == 16
    enc.save_encoder_weights(tmp_path / "cnn.safetensors")
    other = VisionEncoder(cfg)
    load_encoder_weights(other, tmp_path / "cnn.safetensors")
    assert torch.equal(other.eval()(pixels), enc.eval()(pixels))
    with pytest.raises(ValueError, match="feature stages"):
        VisionEncoder(dataclasses.replace(cfg, feature_layer=5))


def test_encoder_refuses_downloads_and_unsafe_files(tmp_path):
    with pytest.raises(ValueError, match="download"):
        VisionEncoder(_encoder_cfg(encoder="hf-hub:timm/vit_tiny_patch16_224.augreg_in21k"))
    with pytest.raises(ValueError, match="download"):
        VisionEncoder(_encoder_cfg(encoder_kwargs={"pretrained": True, "patch_size": 8}))
    with pytest.raises(ValueError, match="not a timm model"):
        VisionEncoder(_encoder_cfg(encoder="no_such_vit"))
    hf = tmp_path / "siglip"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a SigLIP/CLIP"):
        load_encoder_weights(VisionEncoder(_encoder_cfg()), hf)
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="never loaded"):
        load_encoder_weights(VisionEncoder(_encoder_cfg()), tmp_path / "w.bin")
    with pytest.raises(FileNotFoundError, match="missing.safetensors.*do not exist"):
        load_encoder_weights(VisionEncoder(_encoder_cfg()), tmp_path / "missing.safetensors")


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_load_image_converts_every_mode_to_rgb():
    cmyk = load_image(_encode(Image.new("CMYK", (8, 6), (0, 255, 255, 0)), "JPEG"))  # red in CMYK
    assert cmyk.mode == "RGB" and cmyk.size == (8, 6)
    r, g, b = cmyk.getpixel((4, 3))
    assert r > 200 and g < 60 and b < 60

    rgba = Image.new("RGBA", (4, 4), (0, 0, 255, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent -> white background shows
    out = load_image(_encode(rgba, "PNG"))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (0, 0, 255)

    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    assert load_image(_encode(pal, "PNG")).getpixel((2, 2)) == (0, 255, 0)
    pal.info["transparency"] = 1
    assert load_image(_encode(pal, "PNG")).getpixel((2, 2)) == (255, 255, 255)

    deep = Image.fromarray(np.array([[0, 32896], [65535, 65535]], dtype=np.uint16))  # 16-bit grayscale
    out = load_image(_encode(deep, "PNG"))
    assert [out.getpixel(p) for p in [(0, 0), (1, 0), (0, 1)]] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]

    assert load_image(_encode(Image.new("L", (3, 3), 77), "PNG")).getpixel((1, 1)) == (77, 77, 77)


def test_load_image_rejects_bad_input():
    jpeg = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(BadImage, match="truncated"):
        load_image(jpeg[: len(jpeg) // 2])
    with pytest.raises(BadImage, match="corrupt"):
        load_image(b"definitely not an image")
    with pytest.raises(BadImage, match="too large") as err:
        load_image(_encode(Image.new("RGB", (200, 100)), "PNG"), max_pixels=10_000)
    assert "200x100" in err.value.reason


def test_image_transform_pads_to_square_without_cropping():
    _, cfg = get_preset("vlm_tiny_cnn")
    assert cfg.pad_to_square
    wide = Image.new("RGB", (128, 32), (255, 255, 255))
    padded = image_transform(cfg)(wide)
    assert padded.shape == (3, 64, 64) and padded.dtype == torch.uint8
    norm = data_config(cfg)
    padded = normalize_pixels(padded[None], norm["mean"], norm["std"])[0]
    assert torch.allclose(padded[:, 0, 0], torch.zeros(3), atol=0.01)  # pad = mean colour -> 0 after normalize
    assert padded[:, 32, 0].min() > 0.9  # the image itself spans the full width
    squashed = image_transform(dataclasses.replace(cfg, pad_to_square=False))(wide)
    assert squashed.shape == (3, 64, 64) and squashed.min() == 255


def test_uint8_pixels_normalised_in_the_encoder_match_timms_float_transform():
    """Workers ship uint8 pixels and the encoder normalises them: the same features as timm's own float
    preprocessing (resize, ToTensor, Normalize) fed to the encoder; an image already at size skips the resize."""
    _, cfg = get_preset("vlm_tiny")
    assert not cfg.pad_to_square  # as Idefics3's processor, it squashes
    norm = data_config(cfg)
    timm_float = timm.data.create_transform(input_size=norm["input_size"], interpolation=norm["interpolation"],
                                            mean=norm["mean"], std=norm["std"], crop_pct=1.0, crop_mode="squash")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 90), (64, 64))]
    pixels = torch.stack([image_transform(cfg)(im) for im in images])
    assert torch.equal(pixels[1], torch.from_numpy(np.array(images[1])).permute(2, 0, 1))  # no resize at size
    torch.manual_seed(0)
    encoder = VisionEncoder(cfg)
    with torch.no_grad():
        ours = encoder(pixels)
        theirs = encoder(torch.stack([timm_float(im) for im in images]))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_cnn_tower_export_keeps_batchnorm_statistics(tmp_path):
    """A CNN tower's BatchNorm running statistics are buffers, not parameters: the export must carry them,
    or the reloaded tower normalises with fresh statistics (and the strict load refuses the file)."""
    from conftest import TOK

    from ghostvis.checkpoint_io import export, load_export

    torch.manual_seed(0)
    model_cfg, cfg = get_preset("vlm_tiny_cnn", vocab_size=TOK.vocab_size, image_token_id=TOK.image_token_id)
    vlm = VLM(model_cfg, cfg, freeze_encoder=False)  # a tower that trains
    vlm.train()
    vlm.vision.encoder(torch.rand(4, 3, 64, 64))  # a training-mode pass moves the running statistics
    export(vlm.eval(), tmp_path / "out", tokenizer=TOK)
    loaded, _, _ = load_export(tmp_path / "out")
    want = {k: v for k, v in vlm.vision.state_dict().items() if "running_" in k}
    got = loaded.vision.state_dict()
    assert want and all(torch.equal(got[k], v) for k, v in want.items())
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in want.items() if "running_mean" in k)


def test_configs_written_with_run_settings_still_load(tmp_path):
    """Earlier exports stored the encoder's weight path and freeze choice in VisionConfig (run settings
    now): such a config.json reads, the old fields are ignored, and the export loads."""
    import json

    from conftest import TOK

    from ghostvis.checkpoint_io import export, load_export

    model_cfg, cfg = get_preset("vlm_tiny", vocab_size=TOK.vocab_size, image_token_id=TOK.image_token_id)
    export(VLM(model_cfg, cfg).eval(), tmp_path, tokenizer=TOK)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["vision"].update(pretrained_path="/gone/encoder.safetensors", freeze_encoder=False)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    model, _, _ = load_export(tmp_path)
    assert model.vision_config == cfg and model.vision.encoder.frozen
    with pytest.raises(ValueError, match="unknown field"):
        VisionConfig.from_dict({**cfg.to_dict(), "no_such_field": 1})


def test_tower_attention_never_runs_cudnn_on_cuda() -> None:
    """The tower's SDPA backends on CUDA exclude cuDNN (it returned None on a changed image count) and keep the
    fast ones; on CPU nothing is pinned."""
    from ghostvis.vision.encoder import _tower_sdpa

    with _tower_sdpa(True):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with _tower_sdpa(False):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_bf16_engine_trains_a_batchnorm_tower(world1):
    """DeepSpeed's bf16 casts parameters only; a CNN tower's BatchNorm statistics must follow its weights."""
    from ghostvis.train import engine as ds_engine

    torch.manual_seed(0)
    model_cfg, vision_cfg = get_preset("vlm_tiny_cnn", image_token_id=IMG)
    vlm = VLM(model_cfg, vision_cfg, freeze_encoder=False)  # a training encoder: its statistics move
    groups = [{"name": "all", "params": list(vlm.parameters()), "lr": 1e-3, "weight_decay": 0.0}]
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
              "zero_optimization": {"stage": 1}}
    engine = ds_engine.initialize(vlm, groups, config, "cpu")
    bn = next(m for m in engine.module.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bn.running_mean.dtype == bn.weight.dtype == torch.bfloat16
    idx = torch.cat([torch.full((2, 16), IMG), torch.randint(0, 400, (2, 8))], dim=1)
    before = bn.running_mean.clone()
    loss = engine(idx, idx, pixel_values=torch.rand(2, 3, 64, 64))
    engine.backward(loss)
    engine.step()
    assert torch.isfinite(loss) and not torch.equal(bn.running_mean, before)
