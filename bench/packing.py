"""Packed against unpacked rows (launch/train.py --pack), timed through the real trainer, with the learning check.

    python bench/packing.py                          # CUDA: vlm_small, embedded data and a LLaVA-665K-like mix
    python bench/packing.py --append                 # ... and append the table to BENCHMARKS.md
    DS_ACCELERATOR=cpu python bench/packing.py       # CPU: vlm_tiny, a few steps: a check of the same path

Runs (each from the same base export, trained once here on the embedded text):
    vision_pretrain on the embedded captions; sft on the embedded SFT mixture (bench/pipeline.py's); sft on
    a LLaVA-665K-like length mix (`llava_like_sample`: about half single-turn questions, a long tail of
    multi-turn conversations up to 24 turns about one image, 4% long text-only conversations).

Sides, with the same real tokens per optimizer step. Unpacked: --micro-batch B --seq-len T, rows padded to the
longest in the batch, in stream order (training's default; `--sft-args` reach both sides, so not `--length-group`,
which `--pack` refuses). Packed: --pack, rows of at least k·T tokens, as many and as long as hold the unpacked
run's real tokens per step (its mean, with rows as full as the packer fills them, measured on the stage's own
batcher before the packed run: `packed_geometry`), so both sides take about as many real tokens per step: the same
optimization, its steps cheaper by the padding not computed. From each run's metrics.jsonl (medians after the
first fifth): tokens/s (real tokens, padding excluded), real tokens a step (their mean: the two sides' should be
close), padding fraction (inside the rows), the share of each side's B·T row positions real tokens filled (length
grouping, when on, keeps unpacked padding low by making batches of short rows, which leaves positions unused),
peak memory; the ratio packed/unpacked.

Learning check (bench/learning.py): each side's training loss must fall (5%; 1% for vision_pretrain, whose LLM
is frozen: only the connector trains; over trailing means of a tenth of the steps, `smooth`), and the packed side
must end at most 2% above the unpacked side's validation bits per byte on the same held-out samples (run once
after the last step). The step-by-step gap of the training losses is printed as well but decides only without a val
split: unpacked and packed rows compose steps differently, and on a LLaVA-like mix that moves single
steps' losses by more than learning.py's tolerance (`learning_verdicts`). A side that fails prints FAILED for
its speed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import webdataset as wds

from ghostvis.model.attention import PACKED_CHOICES

from learning import MIN_DROP, check_learning
from pipeline import REPO, append_to_benchmarks, child_env, launcher, prepare_data, sh

IMAGE = "<|image|>"
# turns per image conversation (weight, lowest, highest): many short, a long tail (LLaVA-665K's VQA/GQA
# conversations group up to tens of questions per image)
TURNS = ((0.5, 1, 1), (0.25, 2, 4), (0.15, 5, 10), (0.1, 11, 24))
TEXT_ONLY = 0.04  # long text-only conversations (LLaVA-665K's ShareGPT part)
STAGE_MIN_DROP = {"vision_pretrain": 0.01, "sft": MIN_DROP}  # connector-only training: 1%, as BENCHMARKS.md says
VAL_RTOL = 0.02  # the packed side's final validation bits per byte may be this much above the unpacked side's


def sizes(cuda: bool) -> dict[str, Any]:
    if cuda:
        return {"model": "vlm_small", "steps": 200, "base_steps": 300, "vocab": 4096, "eval_batches": 100,
                "vp_args": "--lr 1e-3", "sft_args": "--lr 1e-3",
                "embedded": {"micro_batch": 64, "seq_len": 128, "pack_factor": 4},
                # T = 2048 holds every LLaVA-like sample, so both sides validate on the same tokens: the longest
                # held-out one is 1,586 tokens with the CPU check's 300-token vocabulary and vlm_tiny's 16 image
                # tokens; vlm_small adds at most 48, and the 4,096 vocabulary (not counted) likely fewer. At T = 1024
                # (the twelfth session) the unpacked side may have cut some that the packed side's longer rows kept.
                "llava": {"micro_batch": 16, "seq_len": 2048, "pack_factor": 1},
                "num_llava": 20000, "synth": {"num_captions": 20000, "num_vqa": 20000, "num_val": 400,
                "num_test": 100, "num_arith": 2000, "num_arith_test": 100, "num_text_docs": 10000,
                "shard_size": 1000}}
    return {"model": "vlm_tiny", "steps": 16, "base_steps": 10, "vocab": 300, "eval_batches": 16,
            "vp_args": "--lr 3e-3", "sft_args": "--lr 3e-3",
            "embedded": {"micro_batch": 8, "seq_len": 64, "pack_factor": 2},
            "llava": {"micro_batch": 8, "seq_len": 256, "pack_factor": 1},
            "num_llava": 200, "synth": {"num_captions": 200, "num_vqa": 200, "num_val": 8, "num_test": 8,
            "num_arith": 16, "num_arith_test": 4, "num_text_docs": 200, "shard_size": 50}}


def llava_like_sample(seed: int, index: int, image_size: int) -> dict:
    """One conversation of the LLaVA-665K-like mix: a scene's questions as 1-24 turns (TURNS), or a long
    text-only exchange; a pure function of (seed, index)."""
    from ghostvis.data import scenes
    from data_prep.synth import text_document

    rng = random.Random(f"llava-like:{seed}:{index}")
    key = f"{index:08d}"
    if rng.random() < TEXT_ONLY:
        docs = [text_document(seed, rng.randrange(10**6)) for _ in range(rng.randint(3, 8))]
        record = {"messages": [{"role": "user", "content": "tell me about some scenes, in detail."},
                               {"role": "assistant", "content": "\n\n".join(docs)}]}
        return {"__key__": key, "json": json.dumps(record).encode()}
    u, low, high = rng.random(), 1, 1
    for weight, low, high in TURNS:
        if u < weight:
            break
        u -= weight
    scene, qas = scenes.sample_split_scene(rng, "train")
    messages = []
    for turn in range(rng.randint(low, high)):
        qa = qas[rng.randrange(len(qas))]
        messages += [{"role": "user", "content": (f"{IMAGE}\n" if turn == 0 else "") + qa.question},
                     {"role": "assistant", "content": qa.answer}]
    return {"__key__": key, "json": json.dumps({"messages": messages}).encode(),
            "0.png": scenes.png_bytes(scenes.render(scene, image_size))}


def write_llava_like(out: Path, n: int, seed: int = 0, image_size: int = 64, shard_size: int = 1000) -> Path:
    """`n` llava_like_sample conversations under out/train and n/40 others under out/val (8 at least), as
    conversation shards (reused when present and of that size; another size is an error)."""
    from ghostvis.data.manifest import Manifest, ShardInfo, read_manifest, write_manifest

    for split, first, count in (("train", 0, n), ("val", 10**7, max(8, n // 40))):  # disjoint sample indices
        d = out / split
        if (d / "manifest.json").is_file():
            held = read_manifest(d).num_samples
            if held != count:
                raise SystemExit(f"{d} holds {held} conversations, not {count}: pass another --out (or delete "
                                 f"{out}) for --llava-samples {n}")
            continue
        d.mkdir(parents=True, exist_ok=True)
        shards = []
        for s, start in enumerate(range(0, count, shard_size)):
            name = f"{split}-{s:06d}.tar"
            with wds.TarWriter(str(d / name), encoder=False) as w:
                for i in range(start, min(count, start + shard_size)):
                    w.write(llava_like_sample(seed, first + i, image_size))
            shards.append(ShardInfo(name, min(count, start + shard_size) - start))
        write_manifest(d, Manifest(kind="conversation", shards=shards, extra={"source": "bench/packing.py"}))
    return out


def side_summary(metrics_path: Path, positions: int) -> dict[str, Any]:
    """Medians after the first fifth of the steps, and every step's loss; `fill`: real tokens over the
    micro-batch's `positions` (B·T) row positions; `tokens_per_step`: the mean real tokens of a step (a mean,
    not a median: steps range from a batch of short answers to one of full rows)."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    steady = rows[len(rows) // 5:] or rows
    for r in rows:
        r["tokens_per_step"] = r["tokens_per_s"] * r["step_s"]
        r["fill"] = r["tokens_per_step"] / positions  # one micro-batch a step (no --grad-accum here)

    def median(key: str) -> float | None:
        values = [r[key] for r in steady if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {"steps": len(rows), "tokens_per_s": median("tokens_per_s"), "padding_frac": median("padding_frac"),
            "fill": median("fill"), "tokens_per_step": statistics.mean(r["tokens_per_step"] for r in rows),
            "peak_mem_gib": max((r.get("peak_mem_gib") or 0.0 for r in rows), default=0.0) or None,
            "losses": [r["loss"] for r in rows],
            "val_bpb": next((r["val_bpb"] for r in reversed(rows) if "val_bpb" in r), None)}


def smooth(losses: list[float]) -> list[float]:
    """Trailing means over a tenth of the steps (3 at least): a batch of long conversations and one of short
    answers differ in loss more than the two sides do, so single steps are too noisy to compare."""
    w = max(3, len(losses) // 10)
    return [sum(losses[max(0, i - w + 1): i + 1]) / (i + 1 - max(0, i - w + 1)) for i in range(len(losses))]


def tokenizer_and_vision(tokenizer_dir: Path, model: str) -> tuple[Any, Any]:
    """The bench's tokenizer and the preset's vision config at its vocabulary (image tokens per image, transform)."""
    from ghostvis.config import get_preset
    from ghostvis.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    return tok, get_preset(model, vocab_size=tok.vocab_size, image_token_id=tok.image_token_id)[1]


def held_out_cuts(data: Path, tokenizer_dir: Path, model: str,
                  lengths: tuple[int, int]) -> tuple[int, int, bool] | None:
    """(how many held-out conversations the unpacked side's T cuts, how many the packed row length cuts, whether
    the two validations score the same tokens: the lengths are equal or neither cuts one; a sample both cut keeps
    a different number of tokens on each side). None where `data/val` is not a conversation shard directory (a
    mixture or captions: not counted)."""
    from ghostvis.data.manifest import read_manifest
    from ghostvis.data.multimodal import read_conversation

    val = Path(data) / "val"
    manifest = read_manifest(val) if (val / "manifest.json").is_file() else None
    if manifest is None or manifest.kind != "conversation":
        return None
    tok, vision = tokenizer_and_vision(tokenizer_dir, model)
    shards = [str(val / s.name) for s in manifest.shards]
    sizes = [len(tok.render_conversation(read_conversation(s)[0], 10**9, vision.num_vision_tokens,
                                         vision.image_frame)[0])
             for s in wds.WebDataset(shards, shardshuffle=False)]
    cut_u, cut_p = sum(n > lengths[0] for n in sizes), sum(n > lengths[1] for n in sizes)
    return cut_u, cut_p, lengths[0] == lengths[1] or cut_u == cut_p == 0


def learning_verdicts(unpacked: dict[str, Any], packed: dict[str, Any], min_drop: float = MIN_DROP,
                      cuts: tuple[int, int, bool] | None = None) -> tuple[Any, Any]:
    """(unpacked's verdict, packed's verdict). Each side's (smoothed) training loss must fall. Equal loss is
    judged on the same held-out samples: the packed side's final validation bits per byte at most VAL_RTOL
    above the unpacked side's. Step-by-step tracking of the training loss (check_learning against the unpacked
    side) is reported too, and decides only where no validation ran: packed and unpacked batches differ in
    composition step by step (a batch of long text-only conversations against rows of mixed samples), so their
    per-step losses differ by more than its tolerance on a mix like LLaVA-665K's. `cuts` (`held_out_cuts`): where
    the sides' lengths cut held-out samples differently, their validations score different tokens and cannot be
    compared, so the packed side fails."""
    ref = smooth(unpacked["losses"])
    own = check_learning(smooth(packed["losses"]), min_drop=min_drop)
    tracked = check_learning(smooth(packed["losses"]), ref, min_drop=min_drop)
    u, p = unpacked.get("val_bpb"), packed.get("val_bpb")
    if u is None or p is None:
        return check_learning(ref, min_drop=min_drop), tracked
    gap = (p - u) / u
    message = (f"{own.message}; val bpb {u:.3f} → {p:.3f} ({100 * gap:+.1f}%, at most +{100 * VAL_RTOL:.0f}%); "
               f"train loss against unpacked, for information: {tracked.message.split(', ', 1)[-1]}")
    same_tokens = cuts is None or cuts[2]
    if cuts is not None:
        message += (f"; held-out samples cut u / p: {cuts[0]} / {cuts[1]}"
                    f"{'' if same_tokens else ': the validations score different tokens, not comparable'}")
    return (check_learning(ref, min_drop=min_drop),
            type(own)(own.ok and gap <= VAL_RTOL and same_tokens, message))  # lower is fine


def packed_fill(stage: str, data: Path, tokenizer_dir: Path, model: str, row_len: int, rows: int,
                seed: int = 0) -> float:
    """The share of a packed step's `rows` × `row_len` positions real tokens fill, on the mean, from the stage's
    own batcher on the CPU over about its first two packing windows (a window holds that many batches' tokens).
    First fit leaves part of each row empty (1-8% on our data sets), and a window's last batch may be
    short: sized without them, the packed side took 11% (embedded captions) to 24% fewer tokens a step."""
    from ghostvis.data.packing import PACK_WINDOW_BATCHES
    from ghostvis.data.request import DataRequest
    from ghostvis.train.loop import DATA_BUILDERS
    from ghostvis.train.stages import STAGES
    from ghostvis.vision.transforms import image_transform

    tok, vision = tokenizer_and_vision(tokenizer_dir, model)
    req = DataRequest(Path(data), "train", row_len, rows, 0, 1, seed, tok, torch.device("cpu"), False,
                      num_vision_tokens=vision.num_vision_tokens, image_frame=vision.image_frame,
                      transform=image_transform(vision), pack=True)
    batches = DATA_BUILDERS[STAGES[stage].data_kind](req)  # the builder the trainer uses for this stage
    taken = [b for b, _ in zip(batches, range(2 * PACK_WINDOW_BATCHES + 2))]
    # over whole steps of `rows` × `row_len`: a window's last batch may hold fewer rows, and the target is the
    # unpacked side's mean tokens a step (the LLaVA-like mix's rows were 97% full, its steps 90% on the mean)
    return sum(b["num_tokens"] for b in taken) / (len(taken) * rows * row_len)


ROW_LEN_STEP = 16  # packed rows are lengthened in these steps to meet the unpacked side's tokens per step


def packed_geometry(target_tokens: float, min_row_len: int, fill_of: Callable[[int, int], float]) -> tuple[int, int]:
    """(rows, row length) of the packed side: at least the unpacked side's `target_tokens` real tokens a step,
    rows at least `min_row_len` (k·T) long; `fill_of(row_len, rows)` is the share of a step's rows × row length
    that real tokens fill (`packed_fill`). Whole rows of k·T alone are too coarse when a step holds only a few
    rows: on the LLaVA-like mix, 2 rows of 1024 held 0.76× the unpacked side's 2,425 tokens (BENCHMARKS.md,
    eleventh session). So: as many whole rows of k·T as the target fills (at least one), then rows lengthened
    (rounded up to ROW_LEN_STEP) to hold the rest, at the fill measured at that length. Samples are cut at each
    side's --seq-len, so longer rows keep more of a sample longer than T: the two sides see the same tokens
    only where T holds every sample (the GPU LLaVA-like geometry, `sizes`; not counted for the others)."""
    fill = fill_of(min_row_len, max(1, round(target_tokens / min_row_len)))
    rows = max(1, int(target_tokens // (min_row_len * fill)))

    def length(fill: float) -> int:
        return max(min_row_len, math.ceil(target_tokens / (rows * fill) / ROW_LEN_STEP) * ROW_LEN_STEP)

    row_len = length(fill)
    for _ in range(3):  # the fill moves with the row length: measure it at the length chosen, until that holds
        if row_len == min_row_len or (new := length(fill_of(row_len, rows))) == row_len:
            break
        row_len = new
    return rows, row_len


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    size = sizes(cuda)
    model, steps = args.model or size["model"], args.steps or size["steps"]
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    env = child_env(cuda)
    paths = prepare_data(out, size["synth"], size["vocab"], env)
    llava = write_llava_like(out / "llava_like", args.llava_samples or size["num_llava"],
                             shard_size=size["synth"]["shard_size"])
    common = ["--ds_config", REPO / "ds_configs" / args.ds_config, "--tokenizer", paths["tokenizer"],
              "--save-every", "0", "--resume", "none", "--warmup", max(1, steps // 20), "--seed", args.seed]
    # validation once, after the last step, on the same held-out samples for both sides: eval_batches covers
    # every val split here, so neither side stops part-way
    val = ["--eval-every", steps, "--eval-batches", size["eval_batches"]]
    if args.data_workers is not None:
        common += ["--data-workers", args.data_workers]
    base = out / "base"
    if not (base / "llm.safetensors").is_file():
        sh([*launcher(cuda), "--stage", "base", "--model", model, "--data", paths["tokens"], "--seq-len",
            size["embedded"]["seq_len"] * 4, "--micro-batch", size["embedded"]["micro_batch"] // 4,
            "--steps", size["base_steps"], *common, "--eval-every", "0", "--out", base], env, out / "logs" / "base.log")
    cases = [("embedded captions", "vision_pretrain", paths["data"] / "captions", size["embedded"]),
             ("embedded sft mix", "sft", paths["sft_mix"], size["embedded"]),
             ("LLaVA-665K-like", "sft", llava, size["llava"])]
    results = []
    for data_name, stage, data, geometry in cases:
        if args.only and data_name.split()[0].lower() not in args.only:
            continue
        B, T = args.micro_batch or geometry["micro_batch"], args.seq_len or geometry["seq_len"]
        k = args.pack_factor or geometry["pack_factor"]
        sides: dict[str, Any] = {}
        for side in ("unpacked", "packed"):
            if side == "unpacked":
                flags = ["--micro-batch", B, "--seq-len", T]
            else:
                rows, row_len = packed_geometry(sides["unpacked"]["tokens_per_step"], k * T,
                                                lambda n, r: packed_fill(stage, data, paths["tokenizer"], model, n, r,
                                                                         args.seed))
                flags = ["--pack", "--packed-attention", args.packed_attention, "--micro-batch", rows, "--seq-len",
                         row_len]
            kernel = f"_{args.packed_attention}" if side == "packed" and args.packed_attention != "auto" else ""
            run_dir = out / (f"{stage}_{data_name.split()[0].lower()}_{side}{kernel}"
                             f"{f'_seed{args.seed}' if args.seed else ''}")
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            t0 = time.perf_counter()
            stage_args = shlex.split((args.vp_args if stage == "vision_pretrain" else args.sft_args)
                                     or size["vp_args" if stage == "vision_pretrain" else "sft_args"])
            sh([*launcher(cuda), "--stage", stage, "--model", model, "--init-from", base, "--data", data,
                "--steps", steps, *flags, *common, *val, *stage_args, "--out", run_dir], env,
               out / "logs" / f"{run_dir.name}.log")
            sides[side] = {**side_summary(run_dir / "metrics.jsonl", flags[-3] * flags[-1]),
                           "wall_s": time.perf_counter() - t0,
                           "geometry": f"{flags[-3]} × {flags[-1]}"}
        cuts = held_out_cuts(data, paths["tokenizer"], model, (T, row_len))
        ref, packed = learning_verdicts(sides["unpacked"], sides["packed"], STAGE_MIN_DROP[stage], cuts)
        sides["unpacked"]["verdict"], sides["packed"]["verdict"] = ref, packed
        for side, r in sides.items():
            print(f"{data_name} / {stage} / {side} ({r['geometry']}): {r['tokens_per_s']:,.0f} tokens/s, "
                  f"{r['tokens_per_step']:,.0f} a step, padding {r['padding_frac']:.1%}, positions filled "
                  f"{r['fill']:.1%}; {r['verdict'].message}", flush=True)
        results.append({"data": data_name, "stage": stage, **sides})
    return results


def table(results: list[dict[str, Any]]) -> str:
    def speed(r: dict[str, Any]) -> str:
        return f"{r['tokens_per_s']:,.0f}" if r["verdict"].ok else f"FAILED ({r['verdict'].message})"

    lines = ["| data | stage | unpacked B × T | packed B × T | tokens/s unpacked | tokens/s packed | ratio | "
             "real tokens a step u / p | padding u / p | B·T filled u / p | peak GiB u / p | "
             "learning (packed against unpacked) |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        u, p = r["unpacked"], r["packed"]
        ratio = f"{p['tokens_per_s'] / u['tokens_per_s']:.2f}×" if u["verdict"].ok and p["verdict"].ok else "-"
        mem = "-" if u["peak_mem_gib"] is None else f"{u['peak_mem_gib']:.1f} / {p['peak_mem_gib']:.1f}"
        lines.append(f"| {r['data']} | {r['stage']} | {u['geometry']} | {p['geometry']} | {speed(u)} | {speed(p)} | "
                     f"{ratio} | {u['tokens_per_step']:,.0f} / {p['tokens_per_step']:,.0f} | "
                     f"{u['padding_frac']:.1%} / {p['padding_frac']:.1%} | "
                     f"{u['fill']:.0%} / {p['fill']:.0%} | {mem} | "
                     f"{p['verdict'].message} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "runs" / "bench_packing"), help="data, runs and logs (data is reused)")
    p.add_argument("--model", default=None, help="VLM preset (default: vlm_small on CUDA, vlm_tiny on CPU)")
    p.add_argument("--steps", type=int, default=None, help="steps per side (default: 200 on CUDA, 16 on CPU)")
    p.add_argument("--micro-batch", type=int, default=None, help="the unpacked side's B (default per data set)")
    p.add_argument("--seq-len", type=int, default=None, help="the unpacked side's T (default per data set)")
    p.add_argument("--pack-factor", type=int, default=None,
                   help="k: the packed side's rows hold at least k·T tokens (default per data set: 4 for the embedded "
                        "data, whose samples nearly fill T, 1 for the LLaVA-like mix)")
    p.add_argument("--only", nargs="*", choices=("embedded", "llava-665k-like"), help="run only these data sets")
    p.add_argument("--data-workers", type=int, default=None, help="launch/train.py --data-workers (default: its own)")
    p.add_argument("--ds-config", default="zero1.json", help="a file of ds_configs/")
    p.add_argument("--vp-args", default=None, help="launch/train.py flags for vision_pretrain, one string "
                   "(default: --lr 1e-3 on CUDA, 3e-3 on CPU: the learning check needs a clear drop in few steps)")
    p.add_argument("--sft-args", default=None, help="... for sft (same defaults)")
    p.add_argument("--llava-samples", type=int, default=None,
                   help="LLaVA-665K-like training conversations, and 1 in 40 more held out (default: 20,000 on CUDA, "
                        "200 on CPU; written once per --out)")
    p.add_argument("--packed-attention", default="auto", choices=PACKED_CHOICES,
                   help="the packed side's launch/train.py --packed-attention")
    p.add_argument("--seed", type=int, default=0,
                   help="launch/train.py --seed of both sides (their data order and the new tower's initial "
                        "weights; a base model already in --out is reused, else trained with it): rerun with others "
                        "to see the run-to-run spread")
    p.add_argument("--append", action="store_true", help="append the table to BENCHMARKS.md")
    args = p.parse_args(argv)
    text = table(run(args))
    print(text)
    if args.append:
        append_to_benchmarks("packing", argv, text)


if __name__ == "__main__":
    main()
