"""VLM export against transformers itself (no downloads, CPU, float32): tiny random GhostVis VLMs with a
SigLIP-like and a CLIP-like timm encoder and resampler "none" are exported and must give the same logits as
`LlavaForConditionalGeneration`; with pixel_shuffle + a linear projector, as `Idefics3ForConditionalGeneration`,
with the perceiver as `Idefics2ForConditionalGeneration` (both through AutoModelForImageTextToText); other
connectors are refused."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import run_stage
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

import ghostvis
from data_prep import synth
from ghostvis import checkpoint_io
from ghostvis.checkpoint_io import load_encoder_weights
from ghostvis.config import PRESETS, VisionConfig, get_preset, parse_vision_override
from ghostvis.interop.common import InteropError
from ghostvis.model.vlm import VLM
from ghostvis.vision.encoder import VisionEncoder
from ghostvis.vision.resampler import build_resampler
from ghostvis.vision.transforms import data_config, image_transform, normalize_pixels
from launch import export as export_cli

IMAGE_SIZE, PATCH = 32, 8
PATCHES = (IMAGE_SIZE // PATCH) ** 2
CONV = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
                     {"role": "assistant", "content": "It is green."}]}
# timm names with small kwargs; 3 blocks, feature layer -2 keeps 2
ENCODERS = {
    "siglip": ("vit_base_patch16_siglip_224", "gelu_tanh"),
    "clip": ("vit_base_patch16_clip_224", "quick_gelu"),
    "supervised": ("vit_tiny_patch16_224", "gelu"),  # class token but no pre-norm: neither SigLIP nor CLIP
}


def _vlm(tok, family: str, resampler: str = "none", num_vision_tokens: int = PATCHES, projector_hidden: int = 64,
         feature_norm: bool = False, llama: bool | None = None) -> VLM:
    torch.manual_seed(0)
    name, act = ENCODERS[family]
    vision_cfg = VisionConfig(
        encoder=name, image_size=IMAGE_SIZE, feature_layer=-2, resampler=resampler,
        num_vision_tokens=num_vision_tokens, resampler_heads=4, projector_hidden=projector_hidden,
        feature_norm=feature_norm,
        encoder_kwargs={"embed_dim": 64, "depth": 3, "num_heads": 4, "patch_size": PATCH, "mlp_ratio": 2.0,
                        "act_layer": act})
    # Qwen2-style LLM (q/k/v bias, untied) or Llama-style (no bias, tied head); by default the CLIP case is Llama
    llama = family == "clip" if llama is None else llama
    model_cfg, _ = get_preset("tiny", vocab_size=tok.vocab_size, image_token_id=tok.image_token_id,
                              qkv_bias=not llama, tie_embeddings=llama)
    return _perturbed(VLM(model_cfg, vision_cfg))


def _perturbed(vlm: VLM) -> VLM:
    with torch.no_grad():  # perturb everything, norms included, so a swapped or skipped tensor shows
        for p in vlm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vlm.eval()


def _assert_same_logits(vlm, hf, tok, tokens: int, image_size: int = IMAGE_SIZE, image_dim: bool = True) -> None:
    """Our logits and transformers' for a conversation with one image (a batch of two); the Idefics classes
    take pixels as [batch, images, 3, S, S] (`image_dim`), LLaVA as [batch, 3, S, S]."""
    ids = torch.tensor([tok.render_conversation(CONV, num_vision_tokens=tokens,
                                                image_frame=vlm.vision_config.image_frame)[0]] * 2)
    assert (ids == tok.image_token_id).sum() == 2 * tokens
    pixels = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        ours = vlm(ids, pixel_values=pixels)[..., :tok.vocab_size]
        theirs = hf(input_ids=ids, pixel_values=pixels.unsqueeze(1) if image_dim else pixels).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def _export_and_load(vlm, tok, tmp_path, loader=AutoModelForImageTextToText):
    """Export through launch/export.py --format hf, then load the folder with transformers: every weight
    mapped both ways, eval mode."""
    checkpoint_io.export(vlm, tmp_path / "ckpt", tokenizer=tok)
    export_cli.main(["--ckpt", str(tmp_path / "ckpt"), "--format", "hf", "--out", str(tmp_path / "hf")])
    hf, info = loader.from_pretrained(tmp_path / "hf", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return hf.eval()


@pytest.mark.parametrize("family", ["siglip", "clip"])
def test_llava_export_matches_transformers(family, tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    vlm = _vlm(tok, family)
    hf = _export_and_load(vlm, tok, tmp_path, LlavaForConditionalGeneration)
    assert hf.config.image_seq_length == PATCHES and hf.config.image_token_id == tok.image_token_id
    assert hf.config.vision_config.num_hidden_layers == 2  # only the blocks up to the feature layer
    _assert_same_logits(vlm, hf, tok, PATCHES, image_dim=False)

    _assert_processor_matches(tmp_path / "hf", vlm, tok, PATCHES)


# prompts as a user writes them ("<I>" = the processor's image token): one image, two adjacent ones, and a word
# right after an image (Idefics2's processor merges adjacent frames and spaces such a word off the frame)
PROMPTS = ["<I>What colour?", "<I><I>\nWhich is red?", "Look:<I>is it red?"]


def _assert_processor_matches(folder, vlm, tok, tokens: int) -> None:
    """The exported processor, as a user runs it (chat template, then the processor on text and images): our
    renderer's ids, each image's tokens framed as the model was trained; pixels as our transform makes them."""
    processor = AutoProcessor.from_pretrained(folder)
    cfg = vlm.vision_config
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    for text in PROMPTS:
        n = text.count("<I>")
        ours = tok.render_for_completion({"messages": [{"role": "user", "content": text.replace("<I>", "<|image|>")}]},
                                         cfg.num_vision_tokens, cfg.image_frame)
        assert ours.count(tok.image_token_id) == n * tokens
        # the content as a string with the image token written in, and as the parts processors take
        parts = [{"type": "image"} if p == "<I>" else {"type": "text", "text": p}
                 for p in text.replace("<I>", "\0<I>\0").split("\0") if p]
        for chat in (processor.tokenizer.apply_chat_template(
                         [{"role": "user", "content": text.replace("<I>", processor.image_token)}], tokenize=False,
                         add_generation_prompt=True),
                     processor.apply_chat_template([{"role": "user", "content": parts}], tokenize=False,
                                                   add_generation_prompt=True)):
            batch = processor(text=chat, images=[image] * n, return_tensors="pt")
            assert batch["input_ids"][0].tolist() == ours, (text, chat)
    norm = data_config(cfg)
    expected = normalize_pixels(image_transform(cfg)(image)[None], norm["mean"], norm["std"])[0]
    size = cfg.image_size
    pixels = batch["pixel_values"].reshape(-1, 3, size, size)  # the Idefics processors' are [batch, images, ...]
    assert pixels.shape[0] == 1
    diff = (pixels[0] - expected).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.06  # the resize kernels differ by a level or two of 255


def test_a_processor_only_where_it_builds_our_inputs(tiny_tokenizer, tmp_path, capsys):
    """LLaVA's processor frames no image: a LLaVA-shaped model trained on framed images exports without one, saying
    why, and a re-export into a folder that held a processor leaves none of its files behind."""
    tok = tiny_tokenizer
    plain = _vlm(tok, "siglip")
    framed = VLM(plain.config, dataclasses.replace(plain.vision_config, image_frame="idefics2"))
    processor_files = [tmp_path / "hf" / f for f in ("processor_config.json", "preprocessor_config.json")]

    def export(name, vlm, *flags):
        checkpoint_io.export(vlm, tmp_path / name, tokenizer=tok)
        export_cli.main(["--ckpt", str(tmp_path / name), "--format", "hf", "--out", str(tmp_path / "hf"), *flags])
        return capsys.readouterr().out

    assert "with its processor" in export("plain", plain) and processor_files[0].is_file()
    export("plain", plain, "--llm-only")  # a language model alone: the VLM's processor goes
    assert not any(f.exists() for f in processor_files)
    export("plain", plain)
    assert "no processor: the model's images are framed 'idefics2', the processor's 'none': train with " \
           "--vision image_frame=none" in export("framed", framed)
    assert not any(f.exists() for f in processor_files)


@pytest.mark.parametrize("llama", [False, True], ids=["qwen2-untied", "llama-tied"])
def test_idefics3_export_matches_transformers(llama, tiny_tokenizer, tmp_path, capsys):
    tok = tiny_tokenizer
    tokens = PATCHES // 4  # pixel shuffle r = 2
    vlm = _vlm(tok, "siglip", resampler="pixel_shuffle", num_vision_tokens=tokens, projector_hidden=0,
               feature_norm=True, llama=llama)
    hf = _export_and_load(vlm, tok, tmp_path)
    assert type(hf).__name__ == "Idefics3ForConditionalGeneration"
    assert hf.config.scale_factor == 2 and hf.config.text_config.model_type == ("llama" if llama else "qwen2")
    _assert_same_logits(vlm, hf, tok, tokens)
    # unframed, padded to a square: Idefics3's processor would build other inputs, so none is written
    assert not (tmp_path / "hf" / "processor_config.json").exists()
    assert "no processor: the model's images are framed 'none'" in capsys.readouterr().out


@pytest.mark.parametrize("llama", [False, True], ids=["qwen2-untied", "llama-tied"])
def test_idefics2_export_matches_transformers(llama, tiny_tokenizer, tmp_path):
    """The perceiver connector (the vlm_1.5b/vlm_7b presets' shape at tiny size) as Idefics2."""
    tok = tiny_tokenizer
    tokens = 6  # latents: any count, not tied to the patch grid
    vlm = _vlm(tok, "siglip", resampler="perceiver", num_vision_tokens=tokens, projector_hidden=128,  # tiny's ffn_dim
               feature_norm=True, llama=llama)
    hf = _export_and_load(vlm, tok, tmp_path)
    assert type(hf).__name__ == "Idefics2ForConditionalGeneration"
    assert hf.config.perceiver_config.resampler_n_latents == tokens
    assert hf.config.text_config.model_type == ("llama" if llama else "qwen2")
    _assert_same_logits(vlm, hf, tok, tokens)


def test_vlm_small_preset_exports_as_idefics2(tiny_tokenizer, tmp_path):
    """vlm_small's tower: timm's vit_small ViT built SigLIP-shaped (no class token, tanh GELU, final norm on the
    features) under Idefics2's connector; a supervised checkpoint with a class token is refused as its weights."""
    tok = tiny_tokenizer
    torch.manual_seed(0)
    model_cfg, vision_cfg = get_preset("vlm_small", depth=1, vocab_size=tok.vocab_size,
                                       image_token_id=tok.image_token_id)
    small = {"embed_dim": 64, "depth": 3, "num_heads": 4, "patch_size": PATCH}  # the preset's kwargs, test-sized
    vision_cfg = dataclasses.replace(vision_cfg, image_size=IMAGE_SIZE,
                                     encoder_kwargs={**vision_cfg.encoder_kwargs, **small}, num_vision_tokens=6)
    assert (vision_cfg.resampler_heads, vision_cfg.projector_hidden) == (0, -2)  # the LLM's: resolved on export
    vlm = _perturbed(VLM(model_cfg, vision_cfg))
    hf = _export_and_load(vlm, tok, tmp_path)
    assert type(hf).__name__ == "Idefics2ForConditionalGeneration"
    assert hf.config.vision_config.hidden_act == "gelu_pytorch_tanh"
    _assert_same_logits(vlm, hf, tok, 6)
    _assert_processor_matches(tmp_path / "hf", vlm, tok, 6)  # the preset frames and squashes as Idefics2's does

    supervised = VisionEncoder(dataclasses.replace(vlm.vision_config, encoder_kwargs={
        k: v for k, v in vlm.vision_config.encoder_kwargs.items() if k not in ("class_token", "global_pool")}))
    supervised.save_encoder_weights(tmp_path / "supervised.safetensors")
    with pytest.raises(InteropError, match=r"have a class token.*--vision 'encoder_kwargs=\{\}'"):
        load_encoder_weights(vlm.vision.encoder, tmp_path / "supervised.safetensors")


def _prune_resnets_to_identity(monkeypatch) -> None:
    """timm as some versions are: a ResNet's pruned stages become Identity, not an empty Sequential (ours)."""
    from timm.models.resnet import ResNet

    prune = ResNet.prune_intermediate_layers

    def pruned_to_identity(self, *args, **kwargs):
        kept = prune(self, *args, **kwargs)
        for name in ("layer1", "layer2", "layer3", "layer4"):
            if not list(getattr(self, name).children()):
                setattr(self, name, torch.nn.Identity())
        return kept

    monkeypatch.setattr(ResNet, "prune_intermediate_layers", pruned_to_identity)


@pytest.mark.parametrize("feature_layer,identity", [(2, False), (3, True)])
def test_fastvlm_export_of_a_resnet_tower(feature_layer, identity, tiny_tokenizer, tmp_path, monkeypatch):
    """vlm_tiny_cnn's ResNet-10t (its stride-16 stage, and the stride-8 one) under LLaVA's connector (every cell of
    the map, an MLP of the LLM's width) as FastVLM, whose tower is transformers' TimmWrapperModel; BatchNorm
    statistics included; also where timm prunes the later stages to Identity (the export counts them as empty)."""
    if identity:
        _prune_resnets_to_identity(monkeypatch)
    tok = tiny_tokenizer
    torch.manual_seed(0)
    cells = (IMAGE_SIZE // 2 ** (feature_layer + 1)) ** 2
    model_cfg, vision_cfg = get_preset("vlm_tiny_cnn", vocab_size=tok.vocab_size, image_token_id=tok.image_token_id,
                                       image_size=IMAGE_SIZE, feature_layer=feature_layer, num_vision_tokens=cells)
    vlm = _perturbed(VLM(model_cfg, vision_cfg))
    with torch.no_grad():
        for name, b in vlm.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                b.add_(0.1 * torch.rand_like(b))
    assert isinstance(vlm.vision.encoder.model.layer4, torch.nn.Identity) == identity
    hf = _export_and_load(vlm, tok, tmp_path)
    assert type(hf).__name__ == "FastVlmForConditionalGeneration"
    assert vlm.vision.projector.fc1.out_features == model_cfg.n_embd  # the preset's LLM_WIDTH
    layers = [1] * feature_layer + [0] * (4 - feature_layer)  # the stages after the feature layer pruned
    assert hf.config.vision_config.model_args["layers"] == layers
    _assert_same_logits(vlm, hf, tok, cells, image_dim=False)


@pytest.mark.parametrize("preset,target,image_dim", [("vlm_tiny", "Idefics3ForConditionalGeneration", True),
                                                     ("vlm_tiny_cnn", "FastVlmForConditionalGeneration", False)])
def test_tiny_presets_export_as_they_are(preset, target, image_dim, tiny_tokenizer, tmp_path):
    """The CPU presets, unchanged but for an LLM twice their own width (as the demo grows them on a wider base):
    vlm_tiny_cnn's MLP follows it (projector_hidden -1), and both match transformers' logits."""
    tok = tiny_tokenizer
    torch.manual_seed(0)
    model_cfg, vision_cfg = get_preset(preset, vocab_size=tok.vocab_size, image_token_id=tok.image_token_id, n_embd=128)
    vlm = _perturbed(VLM(model_cfg, vision_cfg))
    if preset == "vlm_tiny_cnn":
        assert vlm.vision.projector.fc1.out_features == 128
    hf = _export_and_load(vlm, tok, tmp_path)
    assert type(hf).__name__ == target
    _assert_same_logits(vlm, hf, tok, 16, image_size=vision_cfg.image_size, image_dim=image_dim)
    _assert_processor_matches(tmp_path / "hf", vlm, tok, 16)  # LLaVA's for FastVLM (which has none of its own)


def test_every_vlm_preset_exports_or_is_refused():
    """The table of docs/interop.md: which transformers class each vlm_* preset's connector and encoder become."""
    from ghostvis.interop.hf_fastvlm import fastvlm_refusal
    from ghostvis.interop.hf_idefics2 import idefics2_refusal
    from ghostvis.interop.hf_idefics3 import idefics3_refusal
    from ghostvis.interop.hf_llava import llava_refusal
    from ghostvis.interop.hf_vision import timm_family

    verdicts = {}
    for name in (p for p in PRESETS if p.startswith("vlm_")):
        model_cfg, vision_cfg = get_preset(name)
        fits = [target for target, refusal in (("LLaVA", llava_refusal), ("Idefics3", idefics3_refusal),
                                               ("Idefics2", idefics2_refusal), ("FastVLM", fastvlm_refusal))
                if refusal(model_cfg, vision_cfg) is None]
        with torch.device("meta"):
            encoder = VisionEncoder(vision_cfg)
        family = timm_family(encoder.model) if encoder.is_vit else "cnn"
        verdicts[name] = (fits, family)
    assert verdicts == {
        "vlm_1.5b": (["Idefics2"], "siglip"), "vlm_7b": (["Idefics2"], "siglip"),
        "vlm_small": (["Idefics2"], "siglip"),  # timm's vit_small built SigLIP-shaped (no class token)
        "vlm_tiny": (["Idefics3"], "siglip"),  # ViT-Ti built SigLIP-shaped, pixel shuffle + one linear layer
        "vlm_tiny_cnn": (["FastVLM"], "cnn"),  # every cell of a ResNet's map, an MLP of the LLM's width
    }


def test_train_an_exportable_connector_with_vision_flags(tmp_path, tiny_tokenizer, tiny_tokenizer_dir, world1):
    """The user's path: --vision gives vlm_tiny another SigLIP-shaped encoder (Idefics3's connector is the preset's);
    the trained export loads in transformers."""
    root = tmp_path / "synth"
    synth.generate(root, seed=1, num_captions=32, num_vqa=8, num_val=4, num_test=4, num_arith=4, num_arith_test=4,
                   num_text_docs=2, shard_size=16)
    encoder = {"embed_dim": 64, "depth": 3, "num_heads": 4, "patch_size": 8, "mlp_ratio": 2.0, "act_layer": "gelu_tanh"}
    vision = ["encoder=vit_base_patch16_siglip_224", f"encoder_kwargs={json.dumps(encoder)}",
              "resampler=pixel_shuffle", "num_vision_tokens=16", "projector_hidden=0", "feature_norm=true"]
    out = tmp_path / "vp"
    records = run_stage("--stage", "vision_pretrain", "--model", "vlm_tiny", "--data", root / "captions",
                        "--tokenizer", tiny_tokenizer_dir, "--out", out, "--micro-batch", "4", "--seq-len", "64",
                        "--steps", "2", *[a for v in vision for a in ("--vision", v)])
    assert len(records) == 2
    export_cli.main(["--ckpt", str(out), "--out", str(tmp_path / "hf")])
    hf = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    vlm = ghostvis.load_pretrained(out)[0]
    ids = torch.tensor([tiny_tokenizer.render_conversation(CONV, num_vision_tokens=16)[0]])
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids, pixel_values=pixels.unsqueeze(1)).logits,
                                   vlm(ids, pixel_values=pixels)[..., :tiny_tokenizer.vocab_size], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="'feature_nrom'.*did you mean 'feature_norm'"):
        parse_vision_override("feature_nrom=true")


def test_other_connectors_are_refused(tiny_tokenizer, tmp_path, capsys):
    vlm = _vlm(tiny_tokenizer, "siglip", resampler="avgpool", num_vision_tokens=4)
    checkpoint_io.export(vlm, tmp_path / "ckpt", tokenizer=tiny_tokenizer)
    with pytest.raises(SystemExit):
        export_cli.main(["--ckpt", str(tmp_path / "ckpt"), "--format", "hf", "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert "'avgpool'" in err and "ghostvis.load_pretrained" in err and "--llm-only" in err
    assert "Exportable connectors: resampler=none" in err and "pixel_shuffle + projector_hidden=0" in err
    assert "perceiver + projector_hidden=128" in err  # the tiny LLM's ffn_dim
    assert not (tmp_path / "hf").exists()
    with pytest.raises(ValueError, match=f"set num_vision_tokens={PATCHES}"):
        build_resampler(VisionConfig(resampler="none", num_vision_tokens=4), in_dim=64, num_patches=PATCHES)


def test_encoder_without_hf_equivalent_is_refused(tiny_tokenizer, tmp_path):
    vlm = _vlm(tiny_tokenizer, "supervised")
    checkpoint_io.export(vlm, tmp_path / "ckpt", tokenizer=tiny_tokenizer)
    # a checkpoint of such a tower (vlm_small's before it became SigLIP-shaped) still loads: config.json carries it
    assert ghostvis.load_pretrained(tmp_path / "ckpt")[0].vision.encoder.model.cls_token is not None
    with pytest.raises(InteropError, match=r"patch_embed\.proj\.bias.*norm_pre\.weight"):
        export_cli.main(["--ckpt", str(tmp_path / "ckpt"), "--format", "hf", "--out", str(tmp_path / "hf")])
