"""The report card of a run: `report.md` with PNG plots, written next to the checkpoint.

Inputs: the eval results (the dict launch/eval.py writes as eval.json) and the training run's
`metrics.jsonl` (ghostvis/train/logging.py: one JSON object per step, {"step", "loss", "lr_mult",
"grad_norm", "tokens_per_s", "mfu", "val_bpb" (at eval points), ...}). A resumed run appends steps it had
already logged, so the last record of a step wins.

Plots: `training_curves.png` (one panel per logged metric) and `accuracy.png` (per question type: with
the image, with the image blanked, and the chance level).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

METRICS_FILE = "metrics.jsonl"
# Panels in this order first; any other numeric metric follows alphabetically.
PREFERRED = ("loss", "val_bpb", "reward", "lr_mult", "grad_norm", "tokens_per_s", "mfu")
NOT_PLOTTED = {"step", "skipped_steps", "skipped_no_answer", "skipped_image_missing", "skipped_prompt_too_long",
               "skipped_unreadable"}  # counts, not curves


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] sorted by step; unreadable lines and non-numeric values are left out."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash mid-write
        by_step[step] = record
    series: dict[str, list[tuple[int, float]]] = {}
    for step in sorted(by_step):
        for key, value in by_step[step].items():
            if key not in NOT_PLOTTED and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                series.setdefault(key, []).append((step, float(value)))
    order = [k for k in PREFERRED if k in series] + sorted(k for k in series if k not in PREFERRED)
    return {k: series[k] for k in order}


def plot_training_curves(series: dict[str, list[tuple[int, float]]], out_png: Path) -> Path:
    cols = min(3, len(series))
    rows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, points) in zip(axes.flat, series.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def plot_accuracy(vqa: dict[str, Any], blank: dict[str, Any] | None, out_png: Path) -> Path:
    """Grouped bars per question type (and overall): accuracy, blanked-image accuracy, chance."""
    names = list(vqa["per_type"]) + ["overall"]
    entries = [*vqa["per_type"].values(), vqa["overall"]]
    blank_entries = None if blank is None else [blank["per_type"].get(n) for n in names[:-1]] + [blank["overall"]]
    width = 0.38 if blank is not None else 0.6
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2.5, 3.6))
    offset = width / 2 if blank is not None else 0.0
    ax.bar([x - offset for x in xs], [e["accuracy"] for e in entries], width, label="with image")
    if blank_entries is not None:
        ax.bar([x + offset for x in xs], [e["accuracy"] if e else 0.0 for e in blank_entries], width,
               label="image blanked")
    for x, e in zip(xs, entries):
        if e["chance"] is not None:
            ax.hlines(e["chance"], x - 0.45, x + 0.45, colors="black", linestyles="dashed",
                      label="chance" if x == 0 else None)
    ax.set_xticks(list(xs), [f"{n}\n(n={e['n']})" for n, e in zip(names, entries)])
    ax.set_ylim(0, 1)
    ax.set_ylabel("exact-match accuracy")
    ax.legend(loc="upper right", fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _most_given(entry: dict[str, Any] | None) -> str:
    """'answer (share)' of a type's most given answer; empty for the overall row and for eval.json files
    written before it was recorded."""
    top = (entry or {}).get("top_answer")
    return f"{_cell(_short(top['answer']))} ({_pct(top['share'])})" if top else ""


def results_table(results: dict[str, Any]) -> str:
    """Markdown table: question type, n, accuracy, blanked accuracy (when run), chance, the most given answer
    and its share (a model stuck on one answer shows there; with the image blanked too, when run); then the
    losses."""
    lines = []
    vqa, blank = results.get("vqa"), results.get("vqa_blank")
    if vqa is not None:
        head = ("| question type | n | accuracy |" + (" image blanked |" if blank else "")
                + " chance | most given answer |" + (" most given, image blanked |" if blank else ""))
        lines += [head, "| --- | ---: | ---: |" + (" ---: |" if blank else "") + " ---: | --- |"
                  + (" --- |" if blank else "")]
        rows = [*vqa["per_type"].items(), ("**overall**", vqa["overall"])]
        blank_rows = {**blank["per_type"], "**overall**": blank["overall"]} if blank else {}
        for name, e in rows:
            cell = f" {_pct(blank_rows[name]['accuracy'])} |" if name in blank_rows else (" — |" if blank else "")
            tail = f" {_most_given(blank_rows.get(name))} |" if blank else ""
            lines.append(f"| {name} | {e['n']} | {_pct(e['accuracy'])} |{cell} {_pct(e['chance'])} | "
                         f"{_most_given(e)} |{tail}")
        lines.append("")
        if vqa.get("skipped"):
            lines += ["- samples not used: " + ", ".join(f"{n} {cause}" for cause, n in vqa["skipped"].items()), ""]
    if "caption" in results:
        c = results["caption"]
        lines.append(f"- caption loss: **{c['loss']:.4f}** nats/token ({c['samples']} captions, {c['tokens']} tokens)")
    if "text" in results:
        t = results["text"]
        lines.append(f"- text bits per byte: **{t['bpb']:.4f}** ({t['rows']} rows, {t['bytes']:,} bytes)")
    for name, why in results.get("not_run", {}).items():
        lines.append(f"- {name}: not run ({why})")
    return "\n".join(lines)


def read_from(results: dict[str, Any]) -> str:
    """Which shard directory each evaluation read, saying where the asked split was not there (val/ or a flat
    directory was read instead), so no figure is taken for a split it did not come from."""
    split, parts = results.get("split"), []
    for name in ("vqa", "caption", "text"):
        if results.get(name, {}).get("data"):
            data = Path(results[name]["data"])
            fell_back = data.name == "val" != split and not (data.parent / str(split)).is_dir()
            parts.append(f"{name} from {data}" + (f" (no {split}/ split there)" if fell_back else ""))
    return "read " + (", ".join(parts) or "the given shards")


def write_report(out_dir: str | Path, results: dict[str, Any], *, metrics_path: str | Path | None = None) -> Path:
    """Write `report.md` (+ PNGs) into out_dir; returns its path. `metrics_path` defaults to
    out_dir/metrics.jsonl; without it the card has no training curves (and says so)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = Path(metrics_path) if metrics_path else out / METRICS_FILE
    title = f"stage `{results['stage']}`, step {results.get('step')}" if results.get("stage") else "checkpoint"
    md = [f"# Report card: {title}", "",
          f"Checkpoint `{results['checkpoint']}`; {read_from(results)}; "
          f"evaluated {time.strftime('%Y-%m-%d %H:%M:%S')}.", "", "## Evaluation", "", results_table(results), ""]
    if results.get("vqa"):
        plot_accuracy(results["vqa"], results.get("vqa_blank"), out / "accuracy.png")
        md += ["![accuracy per question type](accuracy.png)", ""]
        examples = results["vqa"].get("examples", [])
        if examples:
            md += ["<details><summary>sample answers</summary>", "", "| type | question | answer | model |",
                   "| --- | --- | --- | --- |"]
            md += [f"| {e['type']} | {_cell(e['question'])} | {_cell(e['answer'])} | {_cell(e['prediction'])} |"
                   for e in examples]
            md += ["", "</details>", ""]
    md += ["## Training", ""]
    series = read_metrics(metrics) if metrics.is_file() else {}
    if series:
        plot_training_curves(series, out / "training_curves.png")
        last = {k: v[-1][1] for k, v in series.items()}
        md += [f"{metrics.name}: steps {min(s for v in series.values() for s, _ in v)}–"
               f"{max(s for v in series.values() for s, _ in v)}; last "
               + ", ".join(f"{k} {v:.4g}" for k, v in last.items()), "",
               "![training curves](training_curves.png)", ""]
    else:
        md += [f"No training log found ({metrics} missing or empty).", ""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path


def _short(text: str, limit: int = 30) -> str:
    """A reply cut to `limit` characters: a model that rambles instead of answering would widen the table."""
    return text if len(text) <= limit else text[:limit] + "…"


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|") or "∅"
