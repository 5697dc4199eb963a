"""Evaluate an exported checkpoint: held-out visual QA accuracy (per question type, beside chance), caption
loss and text bits per byte; writes eval.json and a report card (report.md + PNGs).

    python launch/eval.py --ckpt runs/demo/sft --data data/synth [data/text_tokens] [--split test]
        [--max-samples 1000] [--blank-images] [--batch-size 32] [--device cpu] [--report-dir DIR]

Each --data is a shard directory (its manifest's kind decides the evaluation: conversation -> visual QA,
image-text -> caption loss, text-tokens -> bits per byte), a dataset directory holding <split>/ (or val/)
shard directories, or a root holding such datasets (the data_prep/synth.py output: vqa/, captions/, ...).
See docs/eval.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from ghostvis.checkpoint_io import load_export
from ghostvis.cli import console_script
from ghostvis.data.manifest import MANIFEST_NAME, DataError, read_manifest
from ghostvis.eval import caption_loss, evaluate_vqa, text_bpb, write_report
from ghostvis.eval.report import METRICS_FILE, read_from, results_table
from ghostvis.eval.vqa import WrongCheckpoint

EVALS = {"conversation": "vqa", "image-text": "caption", "text-tokens": "text"}  # manifest kind -> evaluation
QA_DATASET = "vqa"  # in a root, only this conversation dataset is a QA eval (others, e.g. arith: point at them)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate a GhostVis checkpoint on held-out data.")
    p.add_argument("--ckpt", required=True,
                   help="exported checkpoint directory (config.json, *.safetensors, tokenizer/)")
    p.add_argument("--data", required=True, nargs="+", type=Path,
                   help="shard directories, dataset directories (with <split>/) or a data_prep/synth.py root")
    p.add_argument("--split", default="test", help="split to read inside dataset directories (val when it is absent)")
    p.add_argument("--max-samples", type=int, default=1000,
                   help="at most this many samples per evaluation (QA questions, captions, text rows); 0 = all")
    p.add_argument("--blank-images", action="store_true",
                   help="also run visual QA with every image blanked (accuracy should fall to chance)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per text row for bits per byte (default: the model's context)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="answer length limit for visual QA")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="write the report card (report.md + PNGs) beside eval.json")
    p.add_argument("--report-dir", type=Path, default=None, help="where eval.json and the report go (default: --ckpt)")
    p.add_argument("--metrics", type=Path, default=None,
                   help=f"training log for the curves (default: --ckpt/{METRICS_FILE})")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.max_samples < 0 or args.max_new_tokens < 1:
        p.error("--batch-size and --max-new-tokens must be >= 1, --max-samples >= 0")
    return args


def _split_dir(dataset: Path, split: str) -> Path | None:
    for name in (split, "val"):
        if (dataset / name / MANIFEST_NAME).is_file():
            return dataset / name
    return None


def find_datasets(paths: list[Path], split: str) -> dict[str, Path]:
    """Evaluation name ("vqa", "caption", "text") -> shard directory; the first found of each wins."""
    found: dict[str, Path] = {}

    def add(shard_dir: Path, from_root: bool) -> None:
        kind = read_manifest(shard_dir).kind
        name = EVALS.get(kind)
        if name is None:
            if not from_root:
                raise DataError(f"{shard_dir}: shards of kind {kind!r} have no evaluation; give "
                                f"{', '.join(EVALS)} shards")
            return
        if from_root and name == "vqa" and shard_dir.parent.name != QA_DATASET:
            return
        found.setdefault(name, shard_dir)

    for path in paths:
        if not path.is_dir():
            raise DataError(f"--data {path} is not a directory")
        if (path / MANIFEST_NAME).is_file():
            add(path, from_root=False)
        elif (shard_dir := _split_dir(path, split)) is not None:
            add(shard_dir, from_root=False)
        else:
            children = [d for c in sorted(path.iterdir()) if c.is_dir() and (d := _split_dir(c, split))]
            if not children:
                raise DataError(f"--data {path}: no shard directories found (neither {MANIFEST_NAME}, nor "
                                f"{split}/ or val/ in it or its subdirectories); make data with data_prep/")
            for shard_dir in children:
                add(shard_dir, from_root=True)
    return found


def evaluate(args: argparse.Namespace, model: torch.nn.Module, tokenizer: Any,
             datasets: dict[str, Path]) -> dict[str, Any]:
    """Run every evaluation the data allows; what the checkpoint can't run goes to "not_run" with why."""
    limit = args.max_samples or None
    common = dict(max_samples=limit, batch_size=args.batch_size, device=args.device)
    results: dict[str, Any] = {"not_run": {}}
    runs = {
        "vqa": lambda d: evaluate_vqa(model, tokenizer, d, max_new_tokens=args.max_new_tokens, **common),
        "caption": lambda d: caption_loss(model, tokenizer, d, **common),
        "text": lambda d: text_bpb(model, tokenizer, d, seq_len=args.seq_len, **common),
    }
    for name, data_dir in datasets.items():
        try:
            results[name] = {**runs[name](data_dir), "data": str(data_dir)}
            if name == "vqa" and args.blank_images:
                blank = evaluate_vqa(model, tokenizer, data_dir, blank_images=True,
                                     max_new_tokens=args.max_new_tokens, **common)
                results["vqa_blank"] = {**blank, "data": str(data_dir)}
        except WrongCheckpoint as e:
            results["not_run"][name] = str(e)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model, tokenizer, raw = load_export(args.ckpt, device=args.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: cannot load --ckpt {args.ckpt}: {e}", file=sys.stderr)
        return 2
    try:
        datasets = find_datasets(args.data, args.split)
        results = evaluate(args, model, tokenizer, datasets)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ran = [k for k in ("vqa", "caption", "text") if k in results]
    if not ran:
        why = "; ".join(results["not_run"].values()) or "no visual QA, caption or text-token shards in --data"
        print(f"error: nothing to evaluate for checkpoint {args.ckpt} (stage {raw.get('stage', '?')}): {why}",
              file=sys.stderr)
        return 2
    results = {"checkpoint": str(args.ckpt), "stage": raw.get("stage"), "step": raw.get("step"),
               "split": args.split, **results}
    print(f"checkpoint {args.ckpt} (stage {results['stage'] or '?'}, step {results['step']}); "
          f"{read_from(results)}\n")
    print(results_table(results))
    out = args.report_dir or Path(args.ckpt)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out / 'eval.json'}")
    if args.report:
        print(f"wrote {write_report(out, results, metrics_path=args.metrics or Path(args.ckpt) / METRICS_FILE)}")
    return 0


cli = console_script(main)

if __name__ == "__main__":
    cli()
