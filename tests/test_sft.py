"""--stage sft through the one loop: a tiny VLM export (vision_pretrain-style) fine-tuned on a conversation
mixture of the embedded synth data, in this process (one rank, gloo, DeepSpeed ZeRO-2 on CPU); the
freezing flags (--freeze, --train-llm-layers, --vision-lr, --encoder-lr) as parameter groups; the
conversation batches' loss masks and length grouping."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from dist_utils import REPO
from safetensors.torch import load_file
from test_train import world1  # noqa: F401  (fixture: a one-rank gloo process group in this process)

from data_prep import synth
from ghostvis.checkpoint_io import export
from ghostvis.config import get_preset
from ghostvis.data.multimodal import ConversationBatches, _streams
from ghostvis.model.vlm import VLM
from ghostvis.train import engine as ds_engine, loop
from ghostvis.train.stages import ALL_LAYERS, STAGES


def _train_cli():
    spec = importlib.util.spec_from_file_location("ghostvis_train_cli", REPO / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRAIN_CLI = _train_cli()


def parse(*argv) -> object:
    return TRAIN_CLI.build_parser().parse_args([str(a) for a in argv])


def run_stage(*argv) -> list[dict]:
    """launch/train.py's run in this process; returns the run's metrics.jsonl records."""
    args = parse(*argv, "--ds_config", REPO / "ds_configs" / "zero2.json", "--eval-every", "0",
                 "--save-every", "0", "--warmup", "2", "--schedule", "constant")
    loop.run(args)
    return [json.loads(line) for line in (Path(args.out) / "metrics.jsonl").read_text().splitlines()]


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


def request(data: Path, tokenizer, model, batch_size: int = 8) -> loop.DataRequest:
    return loop.DataRequest(data, "train", 96, batch_size, 0, 1, 0, tokenizer, torch.device("cpu"), False, model)


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
        settings = loop.stage_settings(stage, args)
        model = loop.build_model(args, stage, tiny_tokenizer, settings)
        groups = ds_engine.build_param_groups(model, stage, {k: settings[k] for k in stage.lr_names}, 0.0, settings,
                                              model.config.n_layer)
        assert model.vision.encoder.frozen == ("encoder" in settings["freeze"])  # a trained encoder runs with grad
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
    builder, _ = loop.check_available(STAGES["sft"])
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


def test_sft_batches_are_length_grouped(sft_data, tiny_tokenizer):
    """The sft builder sorts 8 batches' worth of conversations by length: far less padding than the
    same samples batched in stream order."""
    cfg, vcfg = get_preset("vlm_tiny", vocab_size=tiny_tokenizer.vocab_size, image_token_id=tiny_tokenizer.image_token_id)
    req = request(sft_data, tiny_tokenizer, VLM(cfg, vcfg))
    builder, _ = loop.check_available(STAGES["sft"])

    def padding(batches) -> int:
        it = iter(batches)
        return sum(b["input_ids"].numel() - b["num_tokens"] for b in (next(it) for _ in range(8)))

    plain = ConversationBatches(_streams(req, "conversation"), tiny_tokenizer, batch_size=8, max_len=96,
                                num_vision_tokens=16, transform=lambda im: torch.zeros(3, 64, 64), seed=0)
    assert padding(builder(req)) < 0.5 * padding(plain)
