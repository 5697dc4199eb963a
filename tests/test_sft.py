"""--stage sft through the one loop: a tiny VLM export (vision_pretrain-style) fine-tuned on a conversation
mixture of the embedded synth data, in this process (one rank, gloo, DeepSpeed ZeRO-2 on CPU); the
freezing flags (--freeze, --train-llm-layers, --vision-lr, --encoder-lr) as parameter groups; the
conversation batches' loss masks and length grouping."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from conftest import parse, run_stage

from data_prep import synth
from ghostvis.checkpoint_io import export
from ghostvis.config import get_preset
from ghostvis.data.multimodal import ConversationBatches, sample_source
from ghostvis.data.request import DataRequest
from ghostvis.model.vlm import VLM
from ghostvis.train import engine as ds_engine, loop
from ghostvis.train.settings import resolve_settings
from ghostvis.train.stages import ALL_LAYERS, STAGES


def tiny_vlm_export(out: Path, tokenizer, stage: str = "vision_pretrain") -> Path:
    """A random vlm_tiny sized to `tokenizer`, exported as a training stage would leave it."""
    torch.manual_seed(0)
    cfg, vcfg = get_preset("vlm_tiny", vocab_size=tokenizer.vocab_size, image_token_id=tokenizer.image_token_id)
    export(VLM(cfg, vcfg), out, tokenizer=tokenizer, extra={"stage": stage, "step": 1})
    return out


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    """Synth vqa + capchat + arith (calculator tool parts) mixed by a mixture.json."""
    root = tmp_path_factory.mktemp("sft")
    synth.generate(root / "synth", seed=3, num_captions=64, num_vqa=96, num_val=8, num_test=4, num_arith=32,
                   num_arith_test=4, num_text_docs=2, shard_size=32)
    (root / "mix").mkdir()
    (root / "mix" / "mixture.json").write_text(json.dumps({"datasets": [
        {"dir": "../synth/vqa", "weight": 3}, {"dir": "../synth/capchat", "weight": 1},
        {"dir": "../synth/arith", "weight": 1}]}))
    return root / "mix"


def request(data: Path, tokenizer, model, batch_size: int = 8) -> DataRequest:
    return DataRequest(data, "train", 96, batch_size, 0, 1, 0, tokenizer, torch.device("cpu"), False,
                       **loop.data_inputs(model))


def test_sft_learns_and_trains_only_the_configured_parameters(tmp_path, sft_data, tiny_tokenizer,
                                                            tiny_tokenizer_dir, world1):
    init = tiny_vlm_export(tmp_path / "aligned", tiny_tokenizer)
    common = ("--stage", "sft", "--init-from", init, "--data", sft_data, "--tokenizer", tiny_tokenizer_dir,
              "--micro-batch", "8", "--seq-len", "96", "--lr", "1e-2")
    loss = [r["loss"] for r in run_stage(*common, "--out", tmp_path / "all", "--steps", "30")]
    assert len(loss) == 30 and sum(loss[-5:]) / 5 < sum(loss[:3]) / 3 - 1.0  # default: connector + whole LLM

    out = tmp_path / "last1"
    run_stage(*common, "--out", out, "--steps", "3", "--train-llm-layers", "1")
    for name in ("llm.safetensors", "vision.safetensors"):
        before, after = load_file(str(init / name)), load_file(str(out / name))
        assert before.keys() == after.keys()
        for key in before:
            trains = key.startswith(("blocks.1.", "projector.", "resampler."))  # the last block + connector
            assert torch.equal(before[key], after[key]) != trains, f"{name}:{key} trains={trains}"


def test_freeze_flags_become_parameter_groups(tiny_tokenizer_dir, tiny_tokenizer):
    def trained(*argv) -> set[str]:
        args = parse("--model", "vlm_tiny", "--data", "x", "--out", "x", *argv)
        stage = STAGES[args.stage]
        settings = resolve_settings(stage, args)
        model = loop.starting_model(args, stage, tiny_tokenizer, settings)
        groups = ds_engine.build_param_groups(model, stage, settings, model.config.n_layer)
        assert model.vision.encoder.frozen == ("encoder" in settings.freeze)  # a trained encoder runs with grad
        parts = {"llm" if n.startswith("llm.") else n.split(".")[1] for g in groups for n in g["param_names"]}
        logged = loop.trainable_parts(groups)  # the run log's "training:" line names the same parts
        assert {p.split()[0] for p in logged.split(", ")} == {"connector" if p in ("projector", "resampler") else p
                                                              for p in parts}, logged
        return {n.split(".")[0] + "." + n.split(".")[1] for g in groups for n in g["param_names"]}

    assert trained("--stage", "vision_pretrain") == {"vision.projector"}
    assert trained("--stage", "vision_pretrain", "--encoder-lr", "1e-5") == {"vision.projector", "vision.encoder"}
    assert trained("--stage", "vision_pretrain", "--train-llm-layers", "1") == {"vision.projector", "llm.blocks"}
    assert trained("--stage", "sft") == {"vision.projector", "llm.blocks", "llm.wte", "llm.lm_head", "llm.norm_f"}
    assert trained("--stage", "sft", "--freeze", "connector,encoder") == {"llm.blocks", "llm.wte", "llm.lm_head",
                                                                         "llm.norm_f"}
    assert trained("--stage", "sft", "--freeze", "none") >= {"vision.encoder", "vision.projector", "llm.wte"}
    assert parse("--data", "x", "--out", "x", "--train-llm-layers", "all").train_llm_layers == ALL_LAYERS
    with pytest.raises(ds_engine.ConfigError, match="--encoder-lr trains the encoder but --freeze lists it"):
        trained("--stage", "sft", "--freeze", "encoder", "--encoder-lr", "1e-5")
    with pytest.raises(ds_engine.ConfigError, match="--train-llm-layers trains the llm but --freeze lists it"):
        trained("--stage", "sft", "--freeze", "llm", "--train-llm-layers", "2")
    with pytest.raises(ds_engine.ConfigError, match="--freeze vision: choose among llm,encoder,connector"):
        trained("--stage", "sft", "--freeze", "vision")


def test_conversation_loss_only_on_assistant_tokens(sft_data, tiny_tokenizer):
    """Every counted target is the next token inside an assistant turn (its end token included), never a
    user, image, tool-output or padding token; every such token is counted (nothing truncated here)."""
    tok = tiny_tokenizer
    cfg, vcfg = get_preset("vlm_tiny", vocab_size=tok.vocab_size, image_token_id=tok.image_token_id)
    builder = loop.DATA_BUILDERS[STAGES["sft"].data_kind]
    batches = iter(builder(request(sft_data, tok, VLM(cfg, vcfg))))
    start, end = tok.special_id("<|assistant_start|>"), tok.special_id("<|assistant_end|>")
    out_start, out_end = tok.special_id("<|output_start|>"), tok.special_id("<|output_end|>")
    seen_tool_output = 0
    for _ in range(4):
        batch = next(batches)
        for ids, targets in zip(batch["input_ids"].tolist(), batch["targets"].tolist()):
            in_reply = in_output = False
            for t, token in enumerate(ids):
                in_output = in_output or token == out_start  # the calculator's span, both markers included
                seen_tool_output += token == out_start
                if t > 0:
                    assert targets[t - 1] == (token if in_reply and not in_output else -1), (t, ids, targets)
                in_reply = (in_reply or token == start) and token != end
                in_output = in_output and token != out_end
            assert targets[-1] == -1
    assert seen_tool_output > 0  # arith replies were checked too


def test_sft_length_grouping_is_opt_in(sft_data, tiny_tokenizer):
    """Training batches come in stream order by default (length-sorted batches held one kind each and held
    binding back, docs/demo.md); --length-group 8 sorts 8 batches' worth by length: far less padding."""
    cfg, vcfg = get_preset("vlm_tiny", vocab_size=tiny_tokenizer.vocab_size, image_token_id=tiny_tokenizer.image_token_id)
    req = request(sft_data, tiny_tokenizer, VLM(cfg, vcfg))
    builder = loop.DATA_BUILDERS[STAGES["sft"].data_kind]

    def first(batches) -> list[dict]:
        it = iter(batches)
        return [next(it) for _ in range(8)]

    def padding(batches: list[dict]) -> int:
        return sum(b["input_ids"].numel() - b["num_tokens"] for b in batches)

    plain = first(ConversationBatches(sample_source(req, "conversation"), tiny_tokenizer, batch_size=8, max_len=96,
                                      num_vision_tokens=16, transform=lambda im: torch.zeros(3, 64, 64), seed=0,
                                      image_frame=vcfg.image_frame))
    default = first(builder(req))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(default, plain, strict=True))
    assert padding(first(builder(dataclasses.replace(req, length_group=8)))) < 0.5 * padding(plain)


def test_a_framed_tower_needs_a_tokenizer_with_the_frame_tokens():
    """vlm_tiny frames its images as Idefics3 does; a tokenizer trained before the frame tokens still trains
    unframed towers, and is refused for a framed one with the fix."""
    from ghostvis.tokenizer import SPECIAL_TOKENS, Tokenizer

    old = Tokenizer({bytes([i]): i for i in range(256)}, r"\S+|\s+", {s: 256 + i for i, s in enumerate(SPECIAL_TOKENS)})
    stage = STAGES["vision_pretrain"]

    def build(*argv):
        args = parse("--stage", "vision_pretrain", "--data", "x", "--out", "x", "--seq-len", "64", "--model",
                     "vlm_tiny", *argv)
        return loop.starting_model(args, stage, old, resolve_settings(stage, args))

    with pytest.raises(ds_engine.ConfigError, match=r"image_frame='idefics3' needs the special token "
                                                    r"<\|image_frame\|>.*image_frame=none.*launch/tok_train.py"):
        build()
    assert build("--vision", "image_frame=none").vision_config.image_frame == "none"


def test_a_perceiver_tower_takes_its_widths_from_the_llm(tmp_path, tiny_tokenizer):
    """vlm_small's perceiver heads and SwiGLU projector follow the LLM it is grown on (--depth, or a text export
    of another width), so the README's vlm_small on a d20 base builds and stays Idefics2-exportable; heads that
    do not divide the LLM's width are a one-line error naming the flag."""
    from ghostvis.interop.hf_idefics2 import idefics2_refusal
    from ghostvis.model.gpt import GPT

    for depth in (12, 20):
        llm, tower = get_preset("vlm_small", depth)
        resolved = tower.for_llm(llm)
        assert (resolved.projector_hidden, resolved.resampler_heads) == (llm.ffn_dim, llm.n_head)
        assert idefics2_refusal(llm, tower) is None
    cfg = get_preset("tiny", vocab_size=tiny_tokenizer.vocab_size)[0]  # 64 wide, 4 heads: vlm_small's own had 6
    text = tmp_path / "text"
    export(GPT(cfg), text, tokenizer=tiny_tokenizer, extra={"stage": "base", "step": 1})
    stage = STAGES["vision_pretrain"]

    def build(*argv):
        args = parse("--stage", "vision_pretrain", "--data", "x", "--out", "x", "--seq-len", "64", "--model",
                     "vlm_small", "--init-from", text, *argv)
        return loop.starting_model(args, stage, tiny_tokenizer, resolve_settings(stage, args))

    model = build()
    assert model.vision.resampler.layers[0].self_attn.heads == cfg.n_head
    assert model.vision.projector.gate_proj.out_features == cfg.ffn_dim
    assert model.vision_config.resampler_heads == 0  # the checkpoint keeps "the LLM's", as the preset says
    with pytest.raises(ds_engine.ConfigError, match=r"--model vlm_small's vision tower on this LLM: .*"
                                                    r"resampler_heads=6 does not divide the LLM's width 64.*"
                                                    r"--vision resampler_heads=N with N one of 1, 2, 4, 8, 16"):
        build("--vision", "resampler_heads=6")


def test_new_tower_encoder_weights_and_random_encoder_warning(tmp_path, tiny_tokenizer):
    """--encoder-weights fills a new tower's encoder (preset or text export); a tower from the export's
    vision.safetensors refuses it; a text export needs a vlm_* preset; a random frozen encoder warns."""
    import timm
    from safetensors.torch import save_file

    from ghostvis.model.gpt import GPT

    stage = STAGES["vision_pretrain"]
    vcfg = get_preset("vlm_tiny")[1]
    timm_model = timm.create_model(vcfg.encoder, num_classes=0, img_size=vcfg.image_size, **vcfg.encoder_kwargs)
    weights = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in timm_model.state_dict().items()}, str(weights))
    cfg = get_preset("tiny", vocab_size=tiny_tokenizer.vocab_size)[0]
    text = tmp_path / "text"
    export(GPT(cfg), text, tokenizer=tiny_tokenizer, extra={"stage": "base", "step": 1})
    vlm_export = tiny_vlm_export(tmp_path / "vlm", tiny_tokenizer)

    def build(*argv):
        args = parse("--stage", "vision_pretrain", "--data", "x", "--out", "x", "--seq-len", "64", *argv)
        settings = resolve_settings(stage, args)
        model = loop.starting_model(args, stage, tiny_tokenizer, settings)
        return model, loop.random_encoder_warning(args, stage, settings, model)

    for start in (("--model", "vlm_tiny"), ("--model", "vlm_tiny", "--init-from", text)):
        model, warning = build(*start, "--encoder-weights", weights)
        key = "blocks.0.attn.qkv.weight"  # a kept block (feature layer -2 of 2)
        assert torch.equal(model.vision.encoder.model.state_dict()[key], timm_model.state_dict()[key])
        assert warning is None
        model, warning = build(*start)
        assert not torch.equal(model.vision.encoder.model.state_dict()[key], timm_model.state_dict()[key])
        assert "randomly initialised, frozen vision encoder" in warning and "--encoder-weights" in warning
    assert build("--init-from", vlm_export)[1] is None  # the export's trained tower
    assert build("--model", "vlm_tiny", "--encoder-lr", "1e-5")[1] is None  # it trains
    with pytest.raises(ds_engine.ConfigError, match="already holds the vision tower.*drop --encoder-weights"):
        build("--init-from", vlm_export, "--encoder-weights", weights)
    with pytest.raises(ds_engine.ConfigError, match="--encoder-weights .*missing.safetensors does not exist"):
        build("--model", "vlm_tiny", "--encoder-weights", tmp_path / "missing.safetensors")
    with pytest.raises(ds_engine.ConfigError, match=r"--init-from .*text is a text-only model: pick a vlm_\* --model"):
        build("--init-from", text)  # --model defaults to small
