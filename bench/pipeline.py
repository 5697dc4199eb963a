"""What users run, timed: base -> vision_pretrain -> sft through the real launch/train.py (the DeepSpeed
launcher on CUDA), then launch/eval.py, on the embedded data (data_prep.synth + a tokenizer trained on it).

    python bench/pipeline.py                         # CUDA: vlm_small, micro-batch 64, a few hundred steps
    python bench/pipeline.py --append                # ... and append the table to BENCHMARKS.md
    DS_ACCELERATOR=cpu python bench/pipeline.py      # CPU: tiny sizes, a smoke test of the same path

Per stage, from the run's metrics.jsonl (medians over the steps after the first fifth, which hold start-up
and compilation): tokens/s, images/s, MFU, peak GPU memory, the fraction of step time the loop waited for its
next batch, and the loss at the first and the last step; after sft, the held-out visual-QA accuracy per
question type. Prints a markdown table; --append adds it to BENCHMARKS.md with the device's name.

The learning check (bench/learning.py). Each stage runs twice from the same starting export, seed and
data workers, so on the same batches: the timed run as a user runs it, then a reference run of the same
command in fp32 (`--dtype fp32`, no `--compile`). The timed run's loss must fall and track the reference's
(`check_learning`), or its row prints FAILED in place of its numbers. The reference is the trainer itself in
its plainest setting, not an independent loop: it catches a fast path (bf16, compile, a kernel) that trains
nothing or trains differently, not a bug both settings share. On CPU both runs are fp32 and not compiled, so
there the check only shows the run is deterministic. `--reference none` skips it (no valid figure).

A stage that crashes keeps the rows before it: its row names the crash (the log's first exception line), the
later stages and the eval, which start from its export, do not run, and the bench exits non-zero. A crashed
reference run fails its stage's learning check; a crashed eval gets a row of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from learning import check_learning

REPO = Path(__file__).resolve().parent.parent
QUESTION_TYPES = ("colour", "count", "shape", "position")


def sizes(cuda: bool) -> dict[str, Any]:
    """GPU sizes on CUDA (the issue's vision_pretrain setting: vlm_small, micro-batch 64, seq 128); tiny on CPU."""
    if cuda:
        return {"model": "vlm_small", "steps": 300, "micro_batch": 64, "seq_len": 128, "base_seq_len": 512,
                "vocab": 4096, "eval_samples": 800, "synth": {"num_captions": 20000, "num_vqa": 20000,
                "num_val": 400, "num_test": 800, "num_arith": 2000, "num_arith_test": 200,
                "num_text_docs": 10000, "shard_size": 1000}}
    return {"model": "vlm_tiny", "steps": 3, "micro_batch": 4, "seq_len": 64, "base_seq_len": 64, "vocab": 300,
            "eval_samples": 16, "synth": {"num_captions": 48, "num_vqa": 48, "num_val": 8, "num_test": 16,
            "num_arith": 8, "num_arith_test": 4, "num_text_docs": 200, "shard_size": 16}}


def child_env(cuda: bool) -> dict[str, str]:
    """The repository PREPENDED to PYTHONPATH: the GPU machine installs packages under a PYTHONPATH dir too."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    if not cuda:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def sh(cmd: list[Any], env: dict[str, str], log: Path) -> None:
    """Run `cmd` from the repository root, its output to `log`; on failure, raise with the log's tail."""
    cmd = [str(c) for c in cmd]
    print("$", " ".join(cmd), flush=True)
    with log.open("w") as f:
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        raise SystemExit(f"{cmd[0]} ... exited with {code} (log {log}):\n{tail}")


def prepare_data(out: Path, synth: dict[str, int], vocab: int, env: dict[str, str]) -> dict[str, Path]:
    """The embedded data, a tokenizer trained on its text, text-tokens shards and the SFT mixture."""
    data, tok, tokens, sft_mix = out / "data", out / "tokenizer", out / "tokens", out / "sft_mix"
    logs = out / "logs"
    if not (data / "vqa" / "test").is_dir():
        flags = [x for k, v in synth.items() for x in (f"--{k.replace('_', '-')}", v)]
        sh([sys.executable, "-m", "data_prep.synth", "--out", data, *flags], env, logs / "synth.log")
    if not (tok / "tokenizer.json").is_file():
        sh([sys.executable, "launch/tok_train.py", "--input", data / "text", "--vocab-size", vocab, "--out", tok],
           env, logs / "tok_train.log")
    if not (tokens / "train").is_dir():
        sh([sys.executable, "-m", "data_prep.text_shards", "--input", data / "text", "--tokenizer", tok,
            "--out", tokens, "--val-docs", max(8, synth["num_text_docs"] // 50)], env, logs / "text_shards.log")
    sft_mix.mkdir(exist_ok=True)
    (sft_mix / "mixture.json").write_text(json.dumps({"datasets": [
        {"dir": "../data/vqa", "weight": 8}, {"dir": "../data/capchat", "weight": 1},
        {"dir": "../data/arith", "weight": 1}]}))
    return {"data": data, "tokenizer": tok, "tokens": tokens, "sft_mix": sft_mix}


# a traceback's last line, "ValueError: ...", with the launcher's "[rank0]: " in front (not an indented source
# line), or argparse's refusal of a flag, "train.py: error: ..."
ERROR_LINE = re.compile(r"(\[rank\d+\]:\s*)?([\w.]+(Error|Exception): .*|[\w.]+: error: .*)")


def crash_summary(message: str) -> str:
    """One table cell for a run that crashed: `sh`'s first line and the log tail's first error line (the
    cause; teardown and other ranks add later ones)."""
    lines = message.splitlines()
    errors = [m.group(2) for x in lines[1:] if (m := ERROR_LINE.match(x))]
    return " ".join(lines[:1] + errors[:1]).replace("|", "/")


def attempt(cmd: list[Any], env: dict[str, str], log: Path) -> str | None:
    """`sh`; a failure is printed in full and returned as its table cell (None: it ran)."""
    try:
        sh(cmd, env, log)
    except SystemExit as crash:
        print(crash, file=sys.stderr, flush=True)
        return crash_summary(str(crash))
    return None


def launcher(cuda: bool) -> list[str]:
    # the deepspeed launcher as a module: its `deepspeed` script may not be on PATH where it is installed
    # under a PYTHONPATH directory
    if cuda:
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "launch/train.py"]
    return [sys.executable, "launch/train.py"]


def losses(metrics_path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in metrics_path.read_text().splitlines()]


def reference_flags(flags: list[Any]) -> list[Any]:
    """The same stage in the trainer's plainest setting: fp32, not compiled, the attention kernel fp32 has
    (an explicitly named kernel is refused in fp32); the last --dtype / --attention wins."""
    kept: list[Any] = []
    skip = False
    for f in flags:
        if skip:
            skip = False
        elif f == "--attention":
            skip = True  # and its value
        elif f != "--compile" and not str(f).startswith("--attention="):
            kept.append(f)
    return kept + ["--dtype", "fp32", "--attention", "auto"]


def stage_summary(metrics_path: Path) -> dict[str, Any]:
    """Medians of the per-step metrics after the first fifth of the steps; loss at the first and last step."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    steady = rows[len(rows) // 5:] or rows

    def median(key: str) -> float | None:
        values = [r[key] for r in steady if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {"steps": len(rows), "tokens_per_s": median("tokens_per_s"), "images_per_s": median("images_per_s"),
            "mfu": median("mfu"), "peak_mem_gib": max((r.get("peak_mem_gib") or 0.0 for r in rows), default=0.0) or None,
            "data_wait_frac": median("data_wait_frac"), "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"]}


def run(args: argparse.Namespace) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    size = sizes(cuda)
    model = args.model or size["model"]
    steps = args.steps or size["steps"]
    micro = args.micro_batch or size["micro_batch"]
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    env = child_env(cuda)
    paths = prepare_data(out, size["synth"], size["vocab"], env)
    common = ["--ds_config", REPO / "ds_configs" / args.ds_config, "--tokenizer", paths["tokenizer"],
              "--save-every", "0", "--eval-every", "0", "--resume", "none", "--steps", steps, "--warmup",
              max(1, steps // 20), "--micro-batch", micro]
    if args.data_workers is not None:
        common += ["--data-workers", args.data_workers]
    stages = {
        "base": ["--stage", "base", "--model", model, "--data", paths["tokens"], "--seq-len", size["base_seq_len"]],
        "vision_pretrain": ["--stage", "vision_pretrain", "--model", model, "--init-from", out / "base",
                            "--data", paths["data"] / "captions", "--seq-len", size["seq_len"]],
        "sft": ["--stage", "sft", "--init-from", out / "vision_pretrain", "--data", paths["sft_mix"],
                "--seq-len", size["seq_len"]],
    }
    for name, extra in (("base", args.base_args), ("vision_pretrain", args.vp_args), ("sft", args.sft_args)):
        stages[name] += shlex.split(extra)
    results: dict[str, dict[str, Any]] = {}
    for name, flags in stages.items():
        run_dir = out / name
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        t0 = time.perf_counter()
        crash = attempt([*launcher(cuda), *flags, *common, "--out", run_dir], env, out / "logs" / f"{name}.log")
        if crash:  # keep the stages measured so far; the next ones start from this one's export
            results[name] = {"crashed": crash}
            return results, None
        results[name] = {**stage_summary(run_dir / "metrics.jsonl"), "wall_s": time.perf_counter() - t0}
        if args.reference == "fp32":
            ref_dir = out / f"{name}_reference"
            (ref_dir / "metrics.jsonl").unlink(missing_ok=True)
            crash = attempt([*launcher(cuda), *reference_flags([*flags, *common]), "--out", ref_dir], env,
                            out / "logs" / f"{name}_reference.log")
            if crash:  # no reference, no valid figure: the row keeps its loss and says why
                results[name]["learning"] = {"ok": False, "message": f"the fp32 reference run crashed: {crash}"}
            else:
                verdict = check_learning(losses(run_dir / "metrics.jsonl"), losses(ref_dir / "metrics.jsonl"))
                results[name]["learning"] = {"ok": verdict.ok, "message": f"{verdict.message} (reference: fp32)"}
        print(f"{name}: {results[name]}", flush=True)
    crash = attempt([sys.executable, "launch/eval.py", "--ckpt", out / "sft", "--data", paths["data"], "--split",
                     "test", "--max-samples", size["eval_samples"], "--seq-len", size["seq_len"], "--no-report",
                     "--report-dir", out / "eval"], env, out / "logs" / "eval.log")
    if crash:
        results["eval"] = {"crashed": crash}
        return results, None
    vqa = json.loads((out / "eval" / "eval.json").read_text())["vqa"]
    return results, vqa


def table(results: dict[str, dict[str, Any]], vqa: dict[str, Any] | None) -> str:
    """The stages' rows (a crashed stage says so and has no numbers), then held-out accuracy if sft finished."""
    def fmt(v: float | None, spec: str, scale: float = 1.0) -> str:
        return "-" if v is None else format(v * scale, spec)

    lines = ["| stage | steps | tokens/s | images/s | MFU | peak GiB | data wait | loss first → last | wall | "
             "learning check |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, r in results.items():
        if "crashed" in r:
            lines.append(f"| {name} | - |" + " - |" * 7 + f" **CRASHED**: {r['crashed']} |")
            continue
        check = r.get("learning")
        if check is not None and not check["ok"]:  # no number for a run that did not learn
            speed = ["FAILED"] * 5
        else:
            speed = [fmt(r["tokens_per_s"], ",.0f"), fmt(r["images_per_s"] or None, ",.0f"), fmt(r["mfu"], ".1%"),
                     fmt(r["peak_mem_gib"], ".1f"), fmt(r["data_wait_frac"], ".0%")]
        verdict = "no reference run: not a valid figure" if check is None else ("passed: " if check["ok"] else
                                                                         "**FAILED**: ") + check["message"]
        lines.append(f"| {name} | {r['steps']} | " + " | ".join(speed) +
                     f" | {r['loss_first']:.3f} → {r['loss_last']:.3f} | {r['wall_s']:.0f} s | {verdict} |")
    if vqa is None:
        return "\n".join(lines)
    per_type = vqa.get("per_type", {})
    lines += ["", "| held-out VQA after sft | " + " | ".join(QUESTION_TYPES) + " | overall |",
              "| --- |" + " ---: |" * (len(QUESTION_TYPES) + 1),
              "| accuracy | " + " | ".join(f"{per_type[t]['accuracy']:.0%}" if t in per_type else "-"
                                          for t in QUESTION_TYPES) + f" | {vqa['overall']['accuracy']:.0%} |",
              "| chance | " + " | ".join(f"{per_type[t]['chance']:.0%}" if t in per_type else "-"
                                        for t in QUESTION_TYPES) + f" | {vqa['overall']['chance']:.0%} |"]
    return "\n".join(lines)


def device_name() -> str:
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu":
        return f"1 × {torch.cuda.get_device_name(0)}"
    return f"{platform.machine()}, {os.cpu_count()} cores, CPU"


def append_to_benchmarks(bench: str, argv: list[str] | None, text: str) -> None:
    """Append `text` to BENCHMARKS.md under a heading naming the bench, the date and the device, with the command."""
    cmd = f"python bench/{bench}.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with (REPO / "BENCHMARKS.md").open("a") as f:
        f.write(f"\n### {bench}, {time.strftime('%Y-%m-%d')}, {device_name()}\n\n`{cmd}`\n\n{text}\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "runs" / "bench_pipeline"), help="data, runs and logs (data is reused)")
    p.add_argument("--model", default=None, help="VLM preset (default: vlm_small on CUDA, vlm_tiny on CPU)")
    p.add_argument("--steps", type=int, default=None, help="steps per stage (default: 300 on CUDA, 3 on CPU)")
    p.add_argument("--micro-batch", type=int, default=None, help="default: 64 on CUDA, 4 on CPU")
    p.add_argument("--data-workers", type=int, default=None, help="launch/train.py --data-workers (default: its own)")
    p.add_argument("--ds-config", default="zero1.json", help="a file of ds_configs/")
    p.add_argument("--base-args", default="", help="more launch/train.py flags for base (one string)")
    p.add_argument("--vp-args", default="", help="... for vision_pretrain, e.g. \"--encoder-lr 1e-3\" (the stage "
                   "defaults keep the encoder frozen, and offline it has random weights: docs/demo.md)")
    p.add_argument("--sft-args", default="", help="... for sft")
    p.add_argument("--reference", choices=("fp32", "none"), default="fp32",
                   help="rerun each stage in fp32 on the same batches and check the timed run's loss tracks it "
                        "(module docstring); none: no check, and the table says the figures are not valid")
    p.add_argument("--append", action="store_true", help="append the table to BENCHMARKS.md")
    args = p.parse_args(argv)
    results, vqa = run(args)
    text = table(results, vqa)
    print(text)
    if args.append:
        append_to_benchmarks("pipeline", argv, text)
    crashed = [name for name, r in results.items() if "crashed" in r]
    if crashed:
        raise SystemExit(f"CRASHED: {crashed[0]} (its log is in {Path(args.out) / 'logs'}); the table keeps the "
                         "stages before it")
    failed = [name for name, r in results.items() if r.get("learning") and not r["learning"]["ok"]]
    if failed:
        raise SystemExit(f"FAILED learning check: {', '.join(failed)}; the table shows FAILED in place of their "
                         "speed figures")


if __name__ == "__main__":
    main()
