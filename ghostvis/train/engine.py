"""DeepSpeed wiring: the ds_config from file + CLI, parameter groups from a stage spec, the optimizer and
`deepspeed.initialize` (docs/training.md)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

import deepspeed
import torch
import torch.distributed as dist

from ghostvis.cli import UserError
from ghostvis.parallel.layout import canonical_named_parameters
from ghostvis.shipped import shipped_dir, shipped_ds_config
from ghostvis.train.stages import Stage

if TYPE_CHECKING:
    from ghostvis.train.settings import Settings

# Set from the CLI only: DeepSpeed can't resolve "auto" for them, and two sources would disagree.
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
DTYPES = ("auto", "bf16", "fp32")


class ConfigError(UserError, ValueError):
    """An inconsistent training setting; the message names the flag or file field to change."""


def load_ds_config(path: str | Path) -> dict[str, Any]:
    path = shipped_ds_config(path)
    if not path.is_file():
        shipped = ", ".join(sorted(f.name for f in shipped_dir("ds_configs").glob("*.json")))
        raise ConfigError(f"--ds_config {path}: no such file (shipped in ds_configs/: {shipped})")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"--ds_config {path}: not valid JSON ({err})") from err
    for key in BATCH_KEYS:
        if key in cfg:
            raise ConfigError(f"{path}: remove '{key}'; batch sizes come from --micro-batch, --grad-accum and "
                              "--global-batch so they always match the world size")
    if "optimizer" in cfg or "scheduler" in cfg:
        raise ConfigError(f"{path}: remove the 'optimizer'/'scheduler' blocks; the optimizer is built from the "
                          "stage's per-group learning rates and the schedule runs client-side (--schedule)")
    return cfg


def resolve_dtype(dtype: str, device_type: str) -> str:
    """`auto` = bf16 on GPU, fp32 on CPU (CPU bf16 works but is slow and only worth it for tests of bf16)."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}; choose one of {DTYPES}")
    if dtype == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return dtype


def batch_sizes(micro_batch: int, grad_accum: int | None, global_batch: int | None, world_size: int) -> tuple[int, int]:
    """(grad_accum, global_batch) consistent with `world_size`; global = micro × accum × world."""
    if micro_batch <= 0:
        raise ConfigError(f"--micro-batch must be positive, got {micro_batch}")
    per_step = micro_batch * world_size
    if grad_accum is None:
        if global_batch is None:
            return 1, per_step
        if global_batch % per_step:
            raise ConfigError(f"--global-batch {global_batch} is not divisible by --micro-batch {micro_batch} × "
                              f"world size {world_size} = {per_step}; change --global-batch or --micro-batch")
        return global_batch // per_step, global_batch
    if grad_accum <= 0:
        raise ConfigError(f"--grad-accum must be positive, got {grad_accum}")
    if global_batch is not None and global_batch != per_step * grad_accum:
        raise ConfigError(f"--global-batch {global_batch} != --micro-batch {micro_batch} × --grad-accum {grad_accum} "
                          f"× world size {world_size} = {per_step * grad_accum}; drop one of the flags or fix it")
    return grad_accum, per_step * grad_accum


def build_ds_config(base: dict[str, Any], *, micro_batch: int, grad_accum: int, world_size: int,
                    grad_clip: float, dtype: str, universal: bool = False) -> dict[str, Any]:
    """The file's ZeRO/comm settings + everything the CLI decides. `dtype` is resolved (bf16 | fp32)."""
    cfg = json.loads(json.dumps(base))  # deep copy
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = grad_accum
    cfg["train_batch_size"] = micro_batch * grad_accum * world_size
    cfg["gradient_clipping"] = grad_clip  # explicit: DeepSpeed >= 0.19.3 defaults to 1.0 when omitted
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": dtype == "bf16"}
    cfg.setdefault("steps_per_print", 10**9)  # our own logging; DeepSpeed's would interleave with tqdm
    # the loop times steps itself; DeepSpeed's throughput timer synchronizes the device twice per step
    cfg.setdefault("timers", {"throughput": {"enabled": False}})
    if universal:
        cfg.setdefault("checkpoint", {})["load_universal"] = True
    return cfg


def build_param_groups(model: torch.nn.Module, stage: Stage, settings: Settings, n_layer: int) -> list[dict[str, Any]]:
    """One group per (lr name, decay) the stage's rules produce, from trainable parameters only.

    Parameters no rule matches get requires_grad=False and join no group: ZeRO-1/2 crash on a group of
    frozen parameters and DeepSpeed drops empty groups, so groups are keyed by "name",
    never by position, and carry their own "base_lr" for the client-side schedule."""
    groups: dict[str, dict[str, Any]] = {}
    for name, param in canonical_named_parameters(model):  # a pipeline stage's too, under the plain names
        rule = stage.rule_for(name, n_layer, settings)
        param.requires_grad_(rule is not None)
        if rule is None:
            continue
        key = f"{rule.lr}/{'decay' if rule.weight_decay else 'no_decay'}"
        if key not in groups:
            lr = settings.lrs[rule.lr]
            groups[key] = {"name": key, "params": [], "param_names": [], "lr": lr, "base_lr": lr,
                           "weight_decay": settings.weight_decay if rule.weight_decay else 0.0}
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    if not groups:
        frozen = f" (--freeze {','.join(settings.freeze)} leaves nothing to train?)" if settings.freeze else ""
        raise ConfigError(f"stage {stage.name}: no parameter of this model matches its trainable rules{frozen}; "
                          f"is --model the right kind (needs_vision={stage.needs_vision})?")
    return list(groups.values())


def check_pipeline_zero(ds_config: dict[str, Any], pp: int, config_path: str | Path) -> None:
    """DeepSpeed's pipeline engine refuses ZeRO-2/3 (it asserts deep inside); say so up front."""
    zero = ds_config.get("zero_optimization", {}).get("stage", 0)
    if pp > 1 and zero > 1:
        raise ConfigError(f"--pp {pp} with ZeRO stage {zero} (--ds_config {config_path}): DeepSpeed's pipeline "
                          "engine allows ZeRO stage 0 or 1 only (stages 2/3 partition gradients/weights, which "
                          "conflicts with gradients accumulated over the pipeline's micro-batches); "
                          "use --ds_config ds_configs/zero1.json, or --pp 1 with ZeRO-2/3")


def check_context_parallel(cp: int, seq_len: int, stage: Stage, compile_model: bool) -> None:
    """What `--cp > 1` can't do, said before anything starts (the layout itself is checked by `Topology`)."""
    if cp == 1:
        return
    if seq_len % (2 * cp):
        raise ConfigError(f"--seq-len {seq_len} does not split into 2 × --cp {cp} = {2 * cp} equal chunks (each CP "
                          f"rank holds two); use a multiple of {2 * cp}")
    if stage.loss != "lm":
        raise ConfigError(f"--cp {cp} with --stage {stage.name}: its loss ({stage.loss!r}) generates and scores whole "
                          "sequences on each rank; run it with --cp 1")
    if compile_model:
        raise ConfigError(f"--compile with --cp {cp} is not verified to train correctly (collectives inside "
                          "autograd, as under --tp); drop --compile")


def check_compile(ds_config: dict[str, Any], compile_model: bool, has_vision: bool,
                  config_path: str | Path, tp: int = 1, pp: int = 1) -> None:
    """Refuse, before the engine exists, the `--compile` combinations that do not train correctly:
    - under TP/PP the collectives reduce into their outputs in place, the pattern that made compiled
      gradients vanish in the fused loss (docs/training.md, "torch.compile"): not verified to learn;
    - under ZeRO-3 with a VLM, torch.compile fails (torch 2.11, DeepSpeed 0.19.8: dynamo traces the timm
      encoder's partitioned, size-0 position embedding)."""
    if compile_model and (tp > 1 or pp > 1):
        raise ConfigError(f"--compile with --tp {tp} --pp {pp} is not verified to train correctly; drop --compile "
                          "(or run with --tp 1 --pp 1)")
    zero = ds_config.get("zero_optimization", {}).get("stage", 0)
    if compile_model and has_vision and zero >= 3:
        raise ConfigError(f"--compile with ZeRO stage 3 (--ds_config {config_path}) and a vision tower fails "
                          "inside torch.compile (it traces the encoder's partitioned weights); drop --compile, or "
                          "use ZeRO-1/2 (ds_configs/zero2.json) where the model fits")


def builds_partitioned(ds_config: dict[str, Any], tp: int = 1, pp: int = 1, lora_rank: int = 0) -> bool:
    """Whether the model is built under `deepspeed.zero.Init` (each rank allocates only its ZeRO-3 partition):
    ZeRO stage 3 at tp = pp = 1. LoRA wraps full weights after construction, and a TP/PP layout cuts its
    part from the built model, so those build it whole first (docs/parallelism.md, "Model construction")."""
    zero = ds_config.get("zero_optimization", {}).get("stage", 0)
    return zero >= 3 and tp == 1 and pp == 1 and not lora_rank


def check_layout(model: torch.nn.Module, topo: Any, args: Any) -> None:
    """Refuse, from the model's shape alone (`model` on the meta device), a --tp that does not split its heads,
    KV heads, FFN or vocabulary, a --pp with more stages than blocks, and a block count of
    --activation-checkpointing the model does not have (the planner's verdict: loop.check_fits_card)."""
    from ghostvis.config import checkpointed_blocks
    from ghostvis.model.parallel import check_tp

    cfg = model.config
    try:
        check_tp(cfg, topo.tp_size)
    except ValueError as err:
        raise ConfigError(f"--tp {topo.tp_size}: {err}") from None
    if topo.pp_size > cfg.n_layer:
        raise ConfigError(f"--pp {topo.pp_size} is more than the model's {cfg.n_layer} blocks (each pipeline stage "
                          f"needs one); use --pp {cfg.n_layer} or fewer")
    try:
        if args.activation_checkpointing != "auto":  # the trainer sizes auto to the card later
            checkpointed_blocks(args.activation_checkpointing, cfg.n_layer)
    except ValueError as err:
        raise ConfigError(f"--activation-checkpointing: {err}") from None
    if getattr(args, "recompute_attention", False) and topo.pp_size > 1:
        raise ConfigError("--recompute-attention: under --pp DeepSpeed checkpoints whole blocks already; drop it")


def make_optimizer(groups: list[dict[str, Any]], ds_config: dict[str, Any], device_type: str,
                   betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.Optimizer:
    """AdamW created by us, so every group keeps its own lr. With optimizer offload DeepSpeed requires its
    CPU Adam; elsewhere torch's AdamW (fused on GPU: no JIT build, works on both devices)."""
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload not in ("none", None):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, betas=betas, eps=eps, adamw_mode=True)
    return torch.optim.AdamW(groups, betas=betas, eps=eps, fused=device_type == "cuda")


def initialize(model: torch.nn.Module, groups: list[dict[str, Any]], ds_config: dict[str, Any],
               device_type: str, mpu: Any = None) -> Any:
    """`deepspeed.initialize` with our optimizer; returns the engine. Checks no group was dropped.
    `mpu` (a `ghostvis.parallel.Topology`) under tensor parallelism; a pipeline module brings its own."""
    optimizer = make_optimizer(groups, ds_config, device_type)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=mpu)
    match_norm_statistics(engine.module)
    got = [g.get("name") for g in engine.optimizer.param_groups]
    if sorted(got) != sorted(g["name"] for g in groups):
        raise RuntimeError(f"DeepSpeed changed the parameter groups: built {[g['name'] for g in groups]}, got {got}")
    return engine


def match_norm_statistics(model: torch.nn.Module) -> None:
    """Give each BatchNorm's running statistics its weight's dtype. DeepSpeed's bf16 casts parameters only and
    keeps buffers in fp32 (for RoPE tables); batch_norm then refuses a bf16 weight with fp32 statistics, so a
    CNN tower (vlm_tiny_cnn) failed at its first bf16 step."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.weight is not None:
            for name in ("running_mean", "running_var"):
                buf = getattr(m, name)
                if buf is not None and buf.dtype != m.weight.dtype:
                    setattr(m, name, buf.to(m.weight.dtype))


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under a launcher (torchrun / deepspeed) the env vars are set; a plain
    `python launch/train.py` becomes a world of one. Backend: nccl on GPU, gloo on CPU."""
    if "RANK" not in os.environ:  # a plain process: be rank 0 of 1 on a free local port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    return dist.get_rank(), dist.get_world_size(), device
