"""The for-use export of a trained model, and loading it back (docs/architecture.md, "Training").

    <dir>/llm.safetensors      the GPT's parameters, names as in docs/architecture.md
    <dir>/vision.safetensors   the vision tower's (VLMs only), names relative to the tower
    <dir>/config.json          {"format", "model": ModelConfig, "vision": VisionConfig | null, "tokenizer": {...}, ...}
    <dir>/tokenizer/           Tokenizer.save files

Files are written under a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from ghostvis.config import ModelConfig, VisionConfig
from ghostvis.files import TensorFileError, check_tensors, write_safetensors
from ghostvis.interop.hf_vision import read_encoder_weights
import ghostvis.model.seeded as seeded
from ghostvis.tokenizer import Tokenizer
from ghostvis.tokenizer_dir import load_tokenizer

if TYPE_CHECKING:
    from ghostvis.parallel.topology import Topology

FORMAT = "ghostvis-export/1"
CONFIG_FILE, LLM_FILE, VISION_FILE, TOKENIZER_DIR = "config.json", "llm.safetensors", "vision.safetensors", "tokenizer"


def module_files(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """File name -> module: a VLM (has `.llm` and `.vision`) splits in two, a GPT is all LLM."""
    if hasattr(model, "llm") and hasattr(model, "vision"):
        return {LLM_FILE: model.llm, VISION_FILE: model.vision}
    return {LLM_FILE: model}


def _file_tensors(model: torch.nn.Module) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(file name, name inside that file, tensor) for each parameter this rank holds, in any layout, and
    each persistent buffer (a CNN encoder's BatchNorm statistics: inference needs them; DeepSpeed never
    partitions buffers). A pipeline stage (`canonical_named_parameters`) yields the plain model's parameter
    names, split by prefix."""
    if not hasattr(model, "canonical_named_parameters"):
        for file_name, module in module_files(model).items():
            saved = module.state_dict(keep_vars=True)
            for name, tensor in saved.items():
                yield file_name, name, tensor
        return
    is_vlm = getattr(model, "vision_config", None) is not None
    for name, param in model.canonical_named_parameters():
        if not is_vlm:
            yield LLM_FILE, name, param
        else:
            head, rest = name.split(".", 1)
            yield (LLM_FILE if head == "llm" else VISION_FILE), rest, param


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    write_safetensors(path, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], iter(tensors.values()),
                      {"format": FORMAT})


def export(model: torch.nn.Module, out_dir: str | Path, *, tokenizer: Tokenizer, extra: dict[str, Any] | None = None,
           is_writer: bool = True, topology: Topology | None = None) -> None:
    """Write the export. In a multi-rank run every rank calls this and only `is_writer` (rank 0) writes:
    ZeRO-3 gathers each partitioned parameter collectively, TP ranks all-gather their shards, and with
    pipeline stages each stage's first rank writes its layers to `.export-stage{k}/`, which rank 0 merges.
    The files are the same whatever the (tp, pp, dp) layout. `extra` goes into config.json."""
    import deepspeed  # only training exports; loading must work without DeepSpeed state

    from ghostvis.parallel.layout import gather_tp

    out = Path(out_dir)
    model_cfg: ModelConfig = model.config
    vision_cfg: VisionConfig | None = getattr(model, "vision_config", None)
    staged = topology is not None and topology.pp_size > 1
    keeper = (topology.tp_rank == 0 and topology.dp_rank == 0) if staged else is_writer
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for file_name, name, tensor in _file_tensors(model):
        # one parameter at a time: a 7B model never has to fit gathered on one GPU
        gather = isinstance(tensor, torch.nn.Parameter)
        with deepspeed.zero.GatheredParameters([tensor] if gather else [], modifier_rank=None):
            full = tensor.detach()
            if file_name == LLM_FILE:
                full = gather_tp(name, full, topology)
            if keeper:
                tensors.setdefault(file_name, {})[name] = full.to("cpu", copy=True).contiguous()
    if staged:
        stage_dir = out / f".export-stage{topology.pp_rank}"
        if keeper:
            stage_dir.mkdir(parents=True, exist_ok=True)
            for file_name, part in tensors.items():
                _save(part, stage_dir / file_name)
        torch.distributed.barrier()  # every stage's layers are on disk
        if is_writer:
            tensors = {}
            for k in range(topology.pp_size):
                for path in sorted((out / f".export-stage{k}").glob("*.safetensors")):
                    tensors.setdefault(path.name, {}).update(load_file(str(path)))  # the tied table: same twice
                shutil.rmtree(out / f".export-stage{k}")
    if not is_writer:
        return
    out.mkdir(parents=True, exist_ok=True)
    for file_name, part in tensors.items():
        _save(part, out / file_name)
    write_config(out, model_cfg, vision_cfg, tokenizer, extra)


def write_config(out: Path, model_cfg: ModelConfig, vision_cfg: VisionConfig | None, tokenizer: Tokenizer,
                 extra: dict[str, Any] | None = None) -> None:
    """The export's tokenizer/ and config.json (written last: its presence means the weights are complete)."""
    tokenizer.save(out / TOKENIZER_DIR)
    config = {"format": FORMAT, "model": model_cfg.to_dict(), "vision": vision_cfg.to_dict() if vision_cfg else None,
              "tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size}, **(extra or {})}
    (out / f"{CONFIG_FILE}.tmp").write_text(json.dumps(config, indent=1))
    os.replace(out / f"{CONFIG_FILE}.tmp", out / CONFIG_FILE)


def read_config(path: str | Path) -> tuple[ModelConfig, VisionConfig | None, dict[str, Any]]:
    """(model config, vision config or None, the whole config.json) of an export directory."""
    cfg_path = Path(path) / CONFIG_FILE
    if not cfg_path.is_file():
        run = next((p.parent for p in (Path(path), *Path(path).parents)
                    if p.name == "ckpt" and (p / "latest").is_file()), None)
        hint = ("" if run is None else f"; {path} is inside a run's DeepSpeed checkpoints (resume state), and the "
                f"run's export is {run}")
        raise FileNotFoundError(f"{cfg_path} not found: point to a directory written by training (--out) or "
                                f"export{hint}")
    try:
        raw = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise TensorFileError(f"{cfg_path}: not valid JSON ({e}); re-export the model") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise TensorFileError(f"{cfg_path}: field 'format' is not {FORMAT!r}; point to a directory written by "
                              "training (--out), launch/import_hf.py or ghostvis.checkpoint_io.export")
    vision = VisionConfig.from_dict(raw["vision"]) if raw.get("vision") else None
    return ModelConfig.from_dict(raw["model"]), vision, raw


def load_weights(module: torch.nn.Module, file: str | Path, tp_size: int = 1, tp_rank: int = 0) -> None:
    """Copy a safetensors file into `module` tensor by tensor (each ZeRO-3 rank reads only its partition's
    rows, each TP rank its shard of an LLM's tensors); names and shapes are checked from the file's header
    first."""
    from ghostvis.model.parallel import tp_split_dim

    split_dims = tp_split_dim if tp_size > 1 else None
    check_tensors(file, {k: seeded.tp_full_shape(seeded.full_shape(v), split_dims(k) if split_dims else None, tp_size)
                         for k, v in module.state_dict(keep_vars=True).items()},
                  "it belongs to another model config (use the export it came with, or start a new --out)")
    seeded.load_module(module, str(file), split_dims, tp_rank)


def check_export_files(path: str | Path) -> None:
    """An export's weight files are all there: llm.safetensors, and vision.safetensors when config.json
    describes a VLM (a tower is never silently replaced by a new one)."""
    path = Path(path)
    _, vision_cfg, _ = read_config(path)
    for name in (LLM_FILE, VISION_FILE) if vision_cfg is not None else (LLM_FILE,):
        if not (path / name).is_file():
            others = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix != ".json")
            raise TensorFileError(f"{path / name} not found: {path / CONFIG_FILE} describes "
                                  f"{'a VLM' if name == VISION_FILE else 'a model'} whose export holds those "
                                  f"weights there (found {others or 'no weight files'}); re-export the model "
                                  "from its training --out")


def build_model(model_cfg: ModelConfig, vision_cfg: VisionConfig | None, weights_dir: str | Path | None = None, *,
                device: str | torch.device = "cpu", encoder_weights: str | Path | None = None,
                freeze_encoder: bool = True, seed: int | None = None, zero3: dict[str, Any] | None = None,
                tp_group: Any = None) -> torch.nn.Module:
    """A GPT (no `vision_cfg`) or a VLM on `device`, with an export's weights when `weights_dir` is given:
    llm.safetensors always, vision.safetensors when it is there. Without that file (a text export growing a
    tower, or no export) the tower is new: its encoder takes `encoder_weights` (a timm .safetensors file or
    a Hugging Face SigLIP/CLIP folder), else stays random. `freeze_encoder` is the run's choice (a frozen
    encoder runs under no_grad). `seed` fixes the LLM's initial weights (None: drawn from torch's RNG).
    On the meta device only the architecture is built (nothing to load into).

    Each weight exists once (docs/parallelism.md, "Model construction"): an LLM to be loaded is built on
    the meta device and materialised by the load. With `zero3` (a DeepSpeed config of ZeRO stage 3) the LLM
    is built under `deepspeed.zero.Init`, so each rank allocates, initialises and reads from the file only its
    partition, with the same values as the full model of this seed; the (much smaller) tower is built whole
    as timm initialises it, loaded, then partitioned the same way. With `tp_group` the LLM is this rank's
    tensor-parallel shard, initialised or read as such (the full model's slice; the tower is whole)."""
    from ghostvis.model.gpt import GPT

    if weights_dir is not None:
        check_export_files(weights_dir)
    tower_saved = weights_dir is not None and (Path(weights_dir) / VISION_FILE).is_file()
    device = torch.device(device)
    tower = None
    if vision_cfg is not None:  # first: under ZeRO-3 its whole copy is gone before the LLM's partitions exist
        from ghostvis.vision.tower import VisionTower

        with torch.device("cpu" if zero3 is not None else device):
            tower = VisionTower(vision_cfg, model_cfg, freeze_encoder=freeze_encoder)
        if device.type != "meta":
            if tower_saved:
                load_weights(tower, Path(weights_dir) / VISION_FILE)
            elif encoder_weights:
                load_encoder_weights(tower.encoder, encoder_weights)
        if zero3 is not None:
            import deepspeed

            deepspeed.zero.Init(module=tower, config_dict_or_path=zero3)  # partitions the built tower in place
    if zero3 is not None:
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=zero3):
            llm = GPT(model_cfg, tp_group, seed=seed)
        # zero.Init casts every float tensor made inside it to the run's dtype, the RoPE tables' float64
        # arithmetic too (bf16 positions): rebuild them outside, in float32 as everywhere else
        llm.rotary.float()
        llm.rotary.reset_parameters()
    elif weights_dir is not None and device.type != "meta":
        with torch.device("meta"):  # the file's tensors are the only copy: nothing to initialise first
            llm = GPT(model_cfg, tp_group, seed=seed)
        llm.to_empty(device=device)
        llm.rotary.reset_parameters()  # not in the file: rebuilt from the config
    else:
        with device:
            llm = GPT(model_cfg, tp_group, seed=seed)
    if weights_dir is not None and device.type != "meta":
        load_weights(llm, Path(weights_dir) / LLM_FILE, llm.tp_size, llm.tp_rank)
    if tower is None:
        return llm
    from ghostvis.model.vlm import VLM

    return VLM(model_cfg, vision_cfg, llm=llm, tower=tower, freeze_encoder=freeze_encoder)


def load_encoder_weights(encoder: torch.nn.Module, path: str | Path) -> None:
    """Read a timm .safetensors file or a Hugging Face SigLIP/CLIP folder (converted) into a VisionEncoder."""
    encoder.load_timm_state_dict(read_encoder_weights(path, encoder.model), path)


def load_export(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Tokenizer, dict[str, Any]]:
    """(model in eval mode on `device`, tokenizer, the whole config.json: stage, step, ...) of an export directory."""
    path = Path(path)
    model_cfg, vision_cfg, raw = read_config(path)
    tokenizer = load_tokenizer(path / TOKENIZER_DIR)
    if tokenizer.fingerprint != raw["tokenizer"]["fingerprint"]:
        raise TensorFileError(f"{path / TOKENIZER_DIR} is not the tokenizer this model was trained with "
                         f"(fingerprint {tokenizer.fingerprint[:12]} != {raw['tokenizer']['fingerprint'][:12]} in {CONFIG_FILE})")
    return build_model(model_cfg, vision_cfg, path, device=device).eval(), tokenizer, raw


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Tokenizer, ModelConfig]:
    """(model in eval mode on `device`, tokenizer, model config) from an export directory."""
    model, tokenizer, _ = load_export(path, device)
    return model, tokenizer, model.config
