"""Hugging Face interop against transformers itself (no downloads): tiny random Qwen2/Llama/SigLIP/CLIP
models built from configs, imported, compared, exported back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, LlamaConfig,
                          LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel)

import ghostvis
from conftest import tiny_corpus
from ghostvis.checkpoint_io import load_encoder_weights
from ghostvis.config import VisionConfig, get_preset
from ghostvis.interop.common import InteropError
from ghostvis.interop.hf_llm import import_llm
from ghostvis.interop.hf_tokenizer import HFTokenizer, hf_tokenizer_files
from ghostvis.interop.hf_vision import timm_spec_from_hf
from ghostvis.model.vlm import VLM
from ghostvis.tokenizer import ALL_SPECIAL_TOKENS, Tokenizer
from ghostvis.tokenizer_dir import load_tokenizer
from ghostvis.train import engine as ds_engine
from ghostvis.train.settings import Settings
from ghostvis.train.stages import get_stage
from ghostvis.vision.encoder import VisionEncoder
from launch import export as export_cli
from launch import import_hf as import_cli

PROMPT = "The quick brown fox jumps over the lazy dog. How many triangles"
CONV = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What colour?"},
                     {"role": "assistant", "content": "It is green."}]}


@pytest.fixture(scope="module")
def hf_tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer.json with Qwen-like specials, trained by `tokenizers`."""
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(tiny_corpus(), trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    path = tmp_path_factory.mktemp("hf_tok") / "tokenizer.json"
    raw.save(str(path))
    return path


def _hf_model(kind: str, vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    dims = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, max_position_embeddings=128)
    if kind == "qwen2":  # q/k/v bias, tied head
        return Qwen2ForCausalLM(Qwen2Config(**dims, tie_word_embeddings=True, rope_theta=1e6)).eval()
    return LlamaForCausalLM(LlamaConfig(**dims, tie_word_embeddings=False, rope_theta=5e5, rms_norm_eps=1e-5)).eval()


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def hf_folder(request: pytest.FixtureRequest, hf_tokenizer_file: Path, tmp_path_factory: pytest.TempPathFactory):
    """(kind, folder, the transformers model) — Llama saved in shards to exercise the index."""
    vocab = RawTokenizer.from_file(str(hf_tokenizer_file)).get_vocab_size()
    model = _hf_model(request.param, vocab)
    d = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(d, max_shard_size="40KB" if request.param == "llama" else "5GB")
    (d / "tokenizer.json").write_bytes(hf_tokenizer_file.read_bytes())
    return request.param, d, model


@pytest.fixture(scope="module")
def imported(hf_folder, tmp_path_factory: pytest.TempPathFactory):
    kind, d, hf_model = hf_folder
    out = tmp_path_factory.mktemp(f"{kind}_gv")
    import_cli.main(["--hf-dir", str(d), "--out", str(out), "--dtype", "float32"])
    model, tok, cfg = ghostvis.load_pretrained(out)
    return out, model, tok, hf_model


def _greedy(model: torch.nn.Module, ids: list[int], n: int, vocab: int) -> list[int]:
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1, :vocab].argmax()))
    return ids


def test_import_logit_parity_and_greedy(imported, hf_folder):
    out, model, tok, hf_model = imported
    n = hf_model.config.vocab_size
    assert (hf_folder[1] / "model.safetensors.index.json").is_file() == (hf_folder[0] == "llama")
    ids = torch.tensor([tok.encode(PROMPT)])
    with torch.no_grad():
        ours, theirs = model(ids)[..., :n], hf_model(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())
    generated = hf_model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)[0].tolist()
    assert _greedy(model, ids[0].tolist(), 20, n) == generated


def test_imported_tokenizer_adds_specials_and_reloads(imported, hf_folder):
    out, model, tok, _ = imported
    hf_vocab = RawTokenizer.from_file(str(hf_folder[1] / "tokenizer.json")).get_vocab_size()
    assert isinstance(tok, HFTokenizer) and isinstance(load_tokenizer(out / "tokenizer"), HFTokenizer)
    assert tok.bos_token_id == tok.raw.token_to_id("<|endoftext|>")  # aliased: Qwen-style vocab without a BOS
    assert sorted(tok.added_ids.values()) == list(range(hf_vocab, tok.vocab_size))
    assert set(tok.added_ids) == set(ALL_SPECIAL_TOKENS) - {"<|bos|>"}
    assert tok.encode("<|im_end|>") != [tok.raw.token_to_id("<|im_end|>")]  # specials in text stay text
    assert tok.decode(tok.encode(PROMPT)) == PROMPT
    ids, mask = tok.render_conversation(CONV)
    assert ids[:2] == [tok.bos_token_id, tok.special_id("<|user_start|>")] and ids[-1] == tok.special_id("<|assistant_end|>")
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "It is green.<|assistant_end|>"
    raw_cfg = json.loads((out / "config.json").read_text())
    assert load_tokenizer(out / "tokenizer").fingerprint == raw_cfg["tokenizer"]["fingerprint"]
    assert [t for t in tok.mergeable_ranks if len(t) == 1] and all(isinstance(t, bytes) for t in tok.mergeable_ranks)


def test_new_rows_initialized_from_existing_ones(imported):
    _, model, tok, hf_model = imported
    hf_emb = hf_model.get_input_embeddings().weight.detach()
    wte = model.wte.weight.detach()
    image = tok.image_token_id
    torch.testing.assert_close(wte[image], hf_emb[tok.spelling_ids("<|image|>")].mean(0))
    assert not torch.equal(wte[image], wte[tok.special_id("<|user_start|>")])  # distinct new tokens
    assert wte[tok.vocab_size:].abs().sum() == 0  # padding rows
    if model.lm_head is not None:
        torch.testing.assert_close(model.lm_head.weight[image].detach(), hf_model.lm_head.weight[:image].mean(0).detach())


def test_export_roundtrip_to_transformers(imported, tmp_path):
    out, model, tok, hf_model = imported
    export_cli.main(["--ckpt", str(out), "--format", "hf", "--out", str(tmp_path)])
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(back) is type(hf_model)
    assert back.config.vocab_size == tok.vocab_size  # padding rows cut
    ids = torch.tensor([tok.render_conversation(CONV, num_vision_tokens=0)[0]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids), rtol=1e-5, atol=1e-5)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tok.encode(PROMPT, add_special_tokens=False) == tok.encode(PROMPT)
    assert hf_tok.apply_chat_template(CONV["messages"], tokenize=True, return_dict=False) == ids[0].tolist()


def test_native_tokenizer_exports_for_transformers(tiny_tokenizer, tmp_path):
    hf_tokenizer_files(tiny_tokenizer, tmp_path)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "Question: what is 12 + 30? Answer: 42 天空是蓝色的"
    assert hf_tok.encode(text, add_special_tokens=False) == tiny_tokenizer.encode(text)
    assert hf_tok.apply_chat_template(CONV["messages"], tokenize=True, return_dict=False) == \
        tiny_tokenizer.render_conversation(CONV)[0]
    # contents as lists of parts: a system message, an image (one image token, which a processor expands), tools
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is 2+2?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "calc "},
                                               {"type": "python", "text": "2+2"}, {"type": "output", "text": "4"},
                                               {"type": "text", "text": " so 4"}]}]
    assert hf_tok.apply_chat_template(parts, tokenize=True, return_dict=False) == \
        tiny_tokenizer.render_conversation({"messages": parts}, num_vision_tokens=1)[0]
    with pytest.raises(Exception, match="a content part is text, image, python or output, not image_url"):
        hf_tok.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "text": "x"}]}])


def test_idefics_spellings_never_take_a_token_the_vocabulary_has(tmp_path):
    """A vocabulary with the Idefics tokens (a SmolVLM text model's) lends them to our image token and its frame on
    import. An Idefics export spells our image token `<image>`: where the vocabulary has `<image>` at another id
    (our token aliased elsewhere), the export is refused with the fix, the alias that makes them one token."""
    from ghostvis.interop.hf_tokenizer import IDEFICS_SPELLINGS

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(tiny_corpus(100), trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<image>", "<fake_token_around_image>", "<global-img>", "<extra>"]))
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = HFTokenizer.from_hf_dir(tmp_path)
    assert (tok.image_token_id, tok.special_id("<|image_frame|>"), tok.special_id("<|image_global|>")) == (1, 2, 3)
    hf_tokenizer_files(tok, tmp_path / "out", IDEFICS_SPELLINGS)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert [hf_tok.convert_tokens_to_ids(t) for t in IDEFICS_SPELLINGS.values()] == [1, 2, 3]
    elsewhere = HFTokenizer.from_hf_dir(tmp_path, aliases={"<|image|>": "<extra>"})
    with pytest.raises(InteropError, match=r"already has '<image>' \(id 1\).*--alias '<\|image\|>=<image>'"):
        hf_tokenizer_files(elsewhere, tmp_path / "refused", IDEFICS_SPELLINGS)
    # a wrong --alias is the user's mistake (one line from the command), not a bug
    with pytest.raises(InteropError, match=r"alias <\|image\|>=<nope> \(--alias, or a default .*\): '<nope>' is not a token of"):
        HFTokenizer.from_hf_dir(tmp_path, aliases={"<|image|>": "<nope>"})
    with pytest.raises(InteropError, match=r"--alias for \['foo'\]: not GhostVis special tokens"):
        HFTokenizer.from_hf_dir(tmp_path, aliases={"foo": "<extra>"})


def test_import_refuses_bad_input(hf_tokenizer_file, tmp_path):
    src = tmp_path / "src"
    _hf_model("qwen2", RawTokenizer.from_file(str(hf_tokenizer_file)).get_vocab_size()).save_pretrained(src)
    (src / "tokenizer.json").write_bytes(hf_tokenizer_file.read_bytes())

    def folder(name: str, **config_changes) -> Path:
        d = tmp_path / name
        d.mkdir()
        for f in src.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        cfg = {**json.loads((src / "config.json").read_text()), **config_changes}
        (d / "config.json").write_text(json.dumps(cfg))
        return d

    with pytest.raises(InteropError, match="model_type 'gpt2'"):
        import_llm(folder("arch", model_type="gpt2"), tmp_path / "o1")
    with pytest.raises(InteropError, match="rope scaling 'llama3'"):
        import_llm(folder("rope", rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}),
                   tmp_path / "o2")
    with pytest.raises(InteropError, match=r"mlp.gate_proj.weight has shape \(96, 64\), expected \(128, 64\)"):
        import_llm(folder("shape", intermediate_size=128), tmp_path / "o3")
    pickled = folder("bin")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="never loaded"):
        import_llm(pickled, tmp_path / "o4")


@pytest.mark.parametrize("family", ["siglip", "clip"])
def test_vision_features_match_transformers(family, tmp_path):
    torch.manual_seed(0)
    config_cls, model_cls = {"siglip": (SiglipVisionConfig, SiglipVisionModel),
                             "clip": (CLIPVisionConfig, CLIPVisionModel)}[family]
    hf = model_cls(config_cls(hidden_size=64, intermediate_size=136, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8)).eval()
    hf.save_pretrained(tmp_path)
    encoder = VisionEncoder(VisionConfig(**timm_spec_from_hf(tmp_path), resampler="avgpool", num_vision_tokens=4))
    load_encoder_weights(encoder, tmp_path)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    expected = hidden[:, 1:] if family == "clip" else hidden  # CLIP's class token is dropped
    torch.testing.assert_close(encoder(pixels), expected, rtol=1e-5, atol=1e-5)
    wrong_act = timm_spec_from_hf(tmp_path)
    wrong_act["encoder_kwargs"]["act_layer"] = "gelu"
    with pytest.raises(ValueError, match="act_layer"):
        load_encoder_weights(VisionEncoder(VisionConfig(**wrong_act, resampler="avgpool", num_vision_tokens=4)), tmp_path)


def test_imported_llm_with_new_vision_tower_trains_connector(imported):
    """The mix-and-match path: imported LLM + fresh vision modules, one vision_pretrain step's gradients."""
    _, gpt, tok, _ = imported
    _, vision_cfg = get_preset("vlm_tiny")
    vlm = VLM.from_llm(gpt, vision_cfg, image_token_id=tok.image_token_id).train()
    stage = get_stage("vision_pretrain")
    ds_engine.build_param_groups(vlm, stage, Settings.of(stage, {**stage.defaults, "vision_lr": 1e-3}),
                                 gpt.config.n_layer)
    conv = {"messages": [{"role": "user", "content": "<|image|>Describe it."}, {"role": "assistant", "content": "A red circle."}]}
    ids, mask = tok.render_conversation(conv, num_vision_tokens=vlm.num_vision_tokens)
    idx = torch.tensor([ids[:-1]])
    targets = torch.tensor([[t if m else -1 for t, m in zip(ids[1:], mask[1:])]])
    loss = vlm(idx, targets, pixel_values=torch.randn(1, 3, vision_cfg.image_size, vision_cfg.image_size))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in vlm.llm.parameters()) and all(p.grad is None for p in vlm.vision.encoder.parameters())
    assert all(p.grad.abs().sum() > 0 for p in vlm.vision.projector.parameters())
