"""Base-stage training throughput on one GPU: our DeepSpeed engine vs a plain PyTorch loop, same run.

    TORCH_CUDA_ARCH_LIST=9.0 python bench/train_throughput.py             # d20 shape, seq 2048, bf16
    TORCH_CUDA_ARCH_LIST=9.0 python bench/train_throughput.py --variants all --batch 16 --warmup 3 --steps 10
    DS_ACCELERATOR=cpu python bench/train_throughput.py --smoke [--variants all]   # tiny shape on CPU, no MFU

Every side trains the same GPT class from the same initial weights on the same learnable batches
(bench/learning.py). Ours: ghostvis.train's param groups, ds_config (ZeRO-1 by default, bf16), engine-side
torch.compile and the loop's own `train_step`. Plain: fp32 weights + bf16 autocast, torch.compile,
fused AdamW. The reference is the plain loop run eagerly: every side's losses over its warmup + timed steps
must fall and track the reference's (bench/learning.py); a side that does not learn prints FAILED in
place of its number. Prints tokens/s, MFU (flops_per_token · tokens/s / peak) and the ratio to the
compiled plain loop; appends a table with the card's name to BENCHMARKS.md.

`--variants` times several engine configurations (VARIANTS below) one after another in the same process,
after the plain loop, to find where the engine loses time outside forward/backward. On a GPU each row
also gives the peak memory and the device synchronisations of one extra (untimed) step, counted with
`torch.cuda.set_sync_debug_mode` and attributed to file:line. `--profile-steps N` profiles N more untimed steps of
each side and prints where its device time went (matmuls, attention, the rest) and its longest kernels.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import deepspeed
import torch

from ghostvis.config import ModelConfig, get_preset
from ghostvis.model.gpt import GPT, count_params, flops_per_token
from ghostvis.train import engine as ds_engine
from ghostvis.train.logging import H100_BF16_PEAK, mfu
from ghostvis.train.loop import lm_loss, train_step
from ghostvis.train.schedule import apply_lr
from ghostvis.train.settings import Settings
from ghostvis.model.attention import ATTENTION_CHOICES, select_attention
from ghostvis.train.stages import STAGES
from learning import Verdict, check_learning, learnable_batches, loss_series

REPO = Path(__file__).resolve().parent.parent


def timed(step: Callable[[], float], warmup: int, steps: int) -> tuple[float, list[float]]:
    """(seconds per step after `warmup` untimed steps (compilation happens there), every step's loss).
    Each step ends in `loss.item()`, which waits for the GPU, so wall time is device time."""
    losses = [step() for _ in range(warmup)]
    t0 = time.perf_counter()
    losses += [step() for _ in range(steps)]
    return (time.perf_counter() - t0) / steps, losses


@dataclass(frozen=True)
class Variant:
    """One engine configuration: ds_configs/<ds_config>.json through build_ds_config, then `overrides`
    merged in (so they win over our defaults, e.g. the throughput timer)."""

    about: str
    ds_config: str = "zero1"
    overrides: dict[str, Any] = field(default_factory=dict)
    autocast: bool = False  # fp32 parameters + DeepSpeed's torch_autocast (bf16), like the plain loop
    compile_first: bool = False  # module.compile() before deepspeed.initialize instead of engine.compile()
    no_dp1_allreduce: bool = False  # ZeRO-0 on one rank: skip the engine's flatten/all-reduce/unflatten


_AUTOCAST = {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}
VARIANTS = {
    "zero1": Variant("ds_configs/zero1.json as shipped (bf16 params, fp32 gradient accumulation: BF16_Optimizer)"),
    "zero1+timers": Variant("DeepSpeed's throughput timer on (its default: 2 device syncs per step)",
                            overrides={"timers": {"throughput": {"enabled": True}}}),
    "zero1-nocheck": Variant("bf16.check_grad_overflow off (no inf/NaN scan, no .item() in the step)",
                             overrides={"bf16": {"check_grad_overflow": False}}),
    "zero1-bf16acc": Variant("data_types.grad_accum_dtype bf16 (ZeRO-1 optimizer, overflow scan every step)",
                             overrides={"data_types": {"grad_accum_dtype": "bf16"}}),
    "zero1-noncontig": Variant("contiguous_gradients off (no copy into the 5e8-element bucket)",
                               overrides={"zero_optimization": {"contiguous_gradients": False}}),
    "zero1-precompile": Variant("module.compile() before deepspeed.initialize", compile_first=True),
    "zero2": Variant("ds_configs/zero2.json as shipped (overlap_comm: a device sync after backward)", "zero2"),
    "zero2-nooverlap": Variant("zero2 with overlap_comm off", "zero2",
                               overrides={"zero_optimization": {"overlap_comm": False}}),
    "zero0-bf16": Variant("ZeRO stage 0, bf16 params (DeepSpeed wraps AdamW in FP16_UnfusedOptimizer, bf16)",
                          overrides={"zero_optimization": {"stage": 0}}),
    "zero0-autocast": Variant("ZeRO stage 0, fp32 params + torch_autocast bf16, our fused AdamW unwrapped",
                              overrides={"zero_optimization": {"stage": 0}, **_AUTOCAST}, autocast=True),
    "zero0-autocast-noar": Variant("zero0-autocast without the one-rank gradient all-reduce",
                                   overrides={"zero_optimization": {"stage": 0}, **_AUTOCAST}, autocast=True,
                                   no_dp1_allreduce=True),
    "zero1-autocast": Variant("ZeRO-1, fp32 params + torch_autocast bf16", overrides=_AUTOCAST, autocast=True),
}


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` merged in recursively (dicts merge, everything else replaces)."""
    out = json.loads(json.dumps(base))
    for key, value in overrides.items():
        out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def engine_step(args: argparse.Namespace, device: torch.device, dtype: str, variant: Variant,
                compile_model: bool) -> tuple[Any, Callable[[], float]]:
    """(engine, one optimizer step through the loop's `train_step`) for `variant`."""
    torch.manual_seed(0)
    cfg, _ = get_preset(args.model, args.depth, max_seq_len=args.seq_len)
    model = GPT(cfg).to(device)
    settings = Settings(lrs={name: args.lr for name in STAGES["base"].lr_names}, weight_decay=0.1)
    groups = ds_engine.build_param_groups(model, STAGES["base"], settings, cfg.n_layer)
    base = ds_engine.load_ds_config(REPO / "ds_configs" / f"{variant.ds_config}.json"
                                    if args.variants else args.ds_config)
    ds_config = merged(ds_engine.build_ds_config(base, micro_batch=args.batch, grad_accum=1, world_size=1,
                                                 grad_clip=1.0, dtype="fp32" if variant.autocast else dtype),
                       variant.overrides)
    if compile_model and variant.compile_first:
        model.compile()
    engine = ds_engine.initialize(model, groups, ds_config, device.type)
    if variant.no_dp1_allreduce:
        engine.enable_backward_allreduce = False  # one rank: the all-reduce is a copy round trip
    if compile_model and not variant.compile_first:
        engine.compile()
    batches = learnable_batches(cfg.vocab_size, args.batch, args.seq_len, device)

    def step() -> float:
        apply_lr(engine.optimizer.param_groups, 1.0)
        return train_step(engine, batches, lm_loss, 1).loss  # ends in loss.item(): the step is finished

    return engine, step


def sync_sites(step: Callable[[], None]) -> Counter:
    """Device synchronisations of one step, by the Python file:line that caused them (CUDA only)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return Counter(f"{Path(w.filename).parent.name}/{Path(w.filename).name}:{w.lineno}" for w in caught
                   if "synchroniz" in str(w.message))


KERNEL_CLASSES = (("attention", ("fmha", "flash", "attention", "sdpa")),
                  ("matmul", ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas", "triton_tem_fused_mm")),
                  ("optimizer", ("multi_tensor", "fusedadam")))


def kernel_class(name: str) -> str:
    """The KERNEL_CLASSES entry a CUDA kernel's name falls in (attention first: flash kernels say "cutlass" too)."""
    low = name.lower()
    return next((cls for cls, words in KERNEL_CLASSES if any(w in low for w in words)), "other")


def device_time_profile(step: Callable[[], float], steps: int, top: int = 12) -> str:
    """Where `steps` steps spent their device time: a share per kernel class, then the `top` longest kernels."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = [(e.key, e.device_time_total) for e in prof.key_averages() if e.device_time_total > 0
               and e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(t for _, t in kernels)
    if not total:
        return f"the profiler saw no device kernels in {steps} steps"
    shares = Counter()
    for name, t in kernels:
        shares[kernel_class(name)] += t
    lines = [f"device time of {steps} steps: {total / 1e3 / steps:.1f} ms a step; "
             + ", ".join(f"{cls} {100 * t / total:.1f}%" for cls, t in shares.most_common())]
    lines += [f"  {100 * t / total:5.1f}%  {name[:110]}" for name, t in sorted(kernels, key=lambda k: -k[1])[:top]]
    return "\n".join(lines)


def plain_step(args: argparse.Namespace, device: torch.device, dtype: str,
               compile_model: bool) -> tuple[None, Callable[[], float]]:
    torch.manual_seed(0)
    cfg, _ = get_preset(args.model, args.depth, max_seq_len=args.seq_len)
    model = GPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    fwd = torch.compile(model) if compile_model else model
    batches = learnable_batches(cfg.vocab_size, args.batch, args.seq_len, device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def step() -> float:
        idx, targets = next(batches)
        with amp:
            loss = fwd(idx, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # same synchronisation as ours

    return None, step


@dataclass
class Row:
    name: str
    about: str
    tokens_per_s: float | None = None  # None: the side failed (error says why)
    mfu: str = "n/a"
    peak_gib: float | None = None
    syncs: Counter | None = None
    error: str = ""
    losses: list[float] = field(default_factory=list)
    learning: Verdict | None = None


def measure(name: str, about: str, make: Callable[[], tuple[Any, Callable[[], float]]], args: argparse.Namespace,
            device: torch.device, tokens: int, flops: int, reference: Row | None) -> Row:
    """Build one side, time it, check that it learned (against `reference`'s losses), count its syncs,
    then free everything it held (the next side needs the memory). A failing side (OOM, a DeepSpeed
    assertion, no learning) becomes a row with its error: the run goes on."""
    on_gpu = device.type == "cuda"
    row = Row(name, about)
    engine = step = None
    try:
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
        engine, step = make()
        seconds, row.losses = timed(step, args.warmup, args.steps)
        row.learning = check_learning(row.losses, None if reference is None else reference.losses)
        if not row.learning.ok:
            print(f"{name}:\n{loss_series(row.losses, None if reference is None else reference.losses)}", flush=True)
            raise RuntimeError(f"learning check: {row.learning.message}")
        tps = tokens / seconds
        m = mfu(flops, tps, args.peak_flops if on_gpu else None)
        row.tokens_per_s, row.mfu = tps, "n/a" if m is None else f"{100 * m:.1f}%"
        if on_gpu:
            row.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
            # diagnostics only: the timing above stands whatever happens here
            try:
                row.syncs = sync_sites(step)
            except Exception as err:  # noqa: BLE001
                print(f"{name}: sync count failed ({type(err).__name__}: {err})", flush=True)
            if args.profile_steps:
                try:
                    print(f"{name}: {device_time_profile(step, args.profile_steps, args.profile_top)}", flush=True)
                except Exception as err:  # noqa: BLE001
                    print(f"{name}: profile failed ({type(err).__name__}: {err})", flush=True)
    except Exception as err:  # noqa: BLE001 - reported in the table, the other sides still run
        row.error = f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
    finally:
        if engine is not None and hasattr(engine, "destroy"):
            engine.destroy()
        del engine, step
        gc.collect()
        torch._dynamo.reset()  # a fresh model per side: drop the compiled graphs of this one
        if on_gpu:
            torch.cuda.empty_cache()
    left = f", {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB still allocated" if on_gpu else ""
    print(f"{name:20s} " + (f"{row.tokens_per_s:12,.0f} tokens/s  MFU {row.mfu}  ({row.learning.message})"
                            if row.error == "" else f"FAILED {row.error}") + left, flush=True)
    if row.syncs:
        print(f"{'':20s} {sum(row.syncs.values())} device syncs/step: {dict(row.syncs.most_common(6))}", flush=True)
    return row


def table(rows: list[Row], plain: Row) -> str:
    """Markdown table of every side; the ratio is to the (compiled, if compiling) plain loop of the run."""
    out = "| loop | tokens/s | MFU | vs plain | peak GiB | syncs/step | where the syncs are | learning | what |\n"
    out += "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |\n"
    for r in rows:
        if r.error:
            out += f"| {r.name} | FAILED | | | | | | | {r.about}: `{r.error}` |\n"
            continue
        ratio = f"{r.tokens_per_s / plain.tokens_per_s:.3f}" if plain.tokens_per_s and r is not plain else ""
        peak = "" if r.peak_gib is None else f"{r.peak_gib:.1f}"
        syncs = "" if r.syncs is None else str(sum(r.syncs.values()))
        where = "" if not r.syncs else ", ".join(f"{k}×{n}" for k, n in r.syncs.most_common(4))
        out += (f"| {r.name} | {r.tokens_per_s:,.0f} | {r.mfu} | {ratio} | {peak} | {syncs} | {where} | "
                f"{r.learning.message} | {r.about} |\n")
    return out


def record(args: argparse.Namespace, cfg: ModelConfig, card: str, dtype: str, rows: list[Row], plain: Row) -> None:
    """Append one self-contained block to --out (never breaks someone else's table)."""
    shape = (f"{args.model}{'' if args.depth is None else f' --depth {args.depth}'} "
             f"({count_params(cfg):,} non-embedding parameters), seq {args.seq_len}, batch {args.batch}, {dtype}, "
             f"{'compiled' if args.compile else 'eager'}, attention {args.attention_used}, {args.warmup} warmup + "
             f"{args.steps} timed steps per side, learning checked against the plain eager loop")
    base = "variants of ds_configs/ (below)" if args.variants else Path(args.ds_config).stem
    with Path(args.out).open("a") as f:
        f.write(f"\n### train_throughput, {time.strftime('%Y-%m-%d')}, {card}\n\n{shape}, {base}; torch "
                f"{torch.__version__}, deepspeed {deepspeed.__version__}\n\n{table(rows, plain)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shape, few steps (CPU check of the script)")
    p.add_argument("--model", default="small")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=32, help="sequences per step (one micro-batch)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per side (compilation)")
    p.add_argument("--ds_config", default=str(REPO / "ds_configs" / "zero1.json"),
                   help="the engine's config when --variants is not given")
    p.add_argument("--variants", default="",
                   help=f"comma-separated engine configurations to time after the plain loop, or 'all': "
                        f"{', '.join(VARIANTS)}")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--also-eager", action="store_true", help="also time our engine without compile")
    p.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES,
                   help="attention kernel for every side (ghostvis/model/attention.py)")
    p.add_argument("--skip-plain", action="store_true", help="skip the compiled plain loop (the eager reference always runs)")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate of every side (constant)")
    p.add_argument("--profile-steps", type=int, default=0, metavar="N",
                   help="profile N more untimed steps of each side (GPU): its device time by kernel class")
    p.add_argument("--profile-top", type=int, default=12, metavar="K", help="longest kernels listed per profile")
    p.add_argument("--peak-flops", type=float, default=H100_BF16_PEAK)
    p.add_argument("--out", default=str(REPO / "BENCHMARKS.md"), help="markdown file to append the result to")
    args = p.parse_args()
    names = list(VARIANTS) if args.variants == "all" else [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)} or 'all'")
    if args.smoke:
        args.model, args.depth, args.seq_len, args.batch, args.steps, args.warmup = "tiny", None, 64, 4, 6, 2
        args.lr = 3e-3
        args.compile = False

    _, _, device = ds_engine.init_distributed()
    on_gpu = device.type == "cuda"
    dtype = "bf16" if on_gpu else "fp32"
    choice = select_attention(args.attention, device, torch.bfloat16 if on_gpu else torch.float32,
                              get_preset(args.model, args.depth, max_seq_len=args.seq_len)[0].head_dim,
                              seq_len=args.seq_len)
    args.attention_used = choice.kernel
    print(f"attention: {choice.describe()}", flush=True)
    card = torch.cuda.get_device_name(device) if on_gpu else "CPU"
    cfg, _ = get_preset(args.model, args.depth, max_seq_len=args.seq_len)
    flops = flops_per_token(cfg, args.seq_len)
    tokens = args.batch * args.seq_len
    engines = [(n, VARIANTS[n]) for n in names] or [("ghostvis engine", Variant(f"--ds_config {args.ds_config}"))]

    plain_about = "fp32 weights + autocast bf16, fused AdamW, torch clip_grad_norm_"
    reference = measure("plain eager", f"{plain_about}; the learning reference",
                        lambda: plain_step(args, device, dtype, False), args, device, tokens, flops, None)
    if reference.error:
        raise SystemExit(f"the reference side failed, so no side can be checked: {reference.error}")

    def run(name: str, about: str, make: Callable[[], tuple[Any, Callable[[], float]]]) -> Row:
        return measure(name, about, make, args, device, tokens, flops, reference)

    plain = reference
    if args.compile and not args.skip_plain:
        plain = run("plain compiled", plain_about, lambda: plain_step(args, device, dtype, True))
    rows = [reference] + ([plain] if plain is not reference else [])
    for name, variant in engines:
        rows.append(run(name, variant.about, lambda v=variant: engine_step(args, device, dtype, v, args.compile)))
    if args.compile and args.also_eager:
        rows.append(run("ghostvis engine eager", "as above, no compile",
                        lambda: engine_step(args, device, dtype, Variant(f"--ds_config {args.ds_config}"), False)))
    if plain.tokens_per_s:
        for r in rows:
            if r.tokens_per_s and r is not plain:
                print(f"ratio {r.name} / {plain.name}: {r.tokens_per_s / plain.tokens_per_s:.3f}")
    record(args, cfg, card, dtype, rows, plain)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
