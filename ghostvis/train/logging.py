"""Training progress: a tqdm bar (rank 0), wandb (off | offline | online), MFU, a short markdown run log
`<out>/run_log.md` for people and `<out>/metrics.jsonl` (one JSON object per step) for programs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of one H100 SXM
WANDB_MODES = ("off", "offline", "online")


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1] of ONE device (pass per-device tokens/s); None without a peak."""
    return flops_per_token * tokens_per_s / peak_flops if peak_flops else None


class RunLogger:
    """Everything a run reports. Ranks other than 0 get an inert logger, so the loop never branches."""

    def __init__(self, *, out_dir: str | Path, total_steps: int, start_step: int, enabled: bool, wandb_mode: str,
                 run_config: dict[str, Any], header: str) -> None:
        if wandb_mode not in WANDB_MODES:
            raise ValueError(f"--wandb {wandb_mode!r}; choose one of {WANDB_MODES}")
        self.enabled = enabled
        self.path = Path(out_dir) / "run_log.md"
        self.metrics_path = Path(out_dir) / "metrics.jsonl"
        self._wandb = None
        self._bar = None
        self._notes: list[str] = []  # written below the table at close (text between rows would split it)
        self._corrupt: dict[str, Any] | None = None  # the last metrics that counted corrupt samples
        if not enabled:
            return
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        if wandb_mode != "off":
            import wandb

            self._wandb = wandb.init(project="ghostvis", mode=wandb_mode, dir=str(out_dir), config=run_config)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(f"\n## Run started {time.strftime('%Y-%m-%d %H:%M:%S')}\n\n{header}\n\n"
                    f"<details><summary>settings</summary>\n\n```json\n{json.dumps(run_config, indent=1)}\n```\n"
                    "</details>\n\n| step | loss | lr mult | grad norm | tok/s | MFU | val bpb |\n"
                    "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")

    def step(self, step: int, metrics: dict[str, float | None]) -> None:
        """Per-step update of the bar (and wandb)."""
        if not self.enabled:
            return
        post = {"loss": f"{metrics['loss']:.4f}", "lr×": f"{metrics['lr_mult']:.3g}",
                "tok/s": f"{metrics['tokens_per_s']:,.0f}"}
        if metrics.get("mfu") is not None:
            post["MFU"] = f"{100 * metrics['mfu']:.1f}%"
        if metrics.get("data_wait_frac") is not None:
            post["data wait"] = f"{100 * metrics['data_wait_frac']:.0f}%"
        if metrics.get("corrupt_samples"):
            post["corrupt"] = metrics["corrupt_samples"]
            self._corrupt = metrics
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(1)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def row(self, step: int, metrics: dict[str, float | None]) -> None:
        """A line of the markdown table (at evaluation points, not every step)."""
        if not self.enabled:
            return

        def fmt(key: str, spec: str, scale: float = 1.0) -> str:
            v = metrics.get(key)
            return "" if v is None else format(v * scale, spec)

        with self.path.open("a") as f:
            f.write(f"| {step} | {fmt('loss', '.4f')} | {fmt('lr_mult', '.3g')} | {fmt('grad_norm', '.3g')} | "
                    f"{fmt('tokens_per_s', ',.0f')} | {fmt('mfu', '.1f', 100)} | {fmt('val_bpb', '.4f')} |\n")

    def note(self, text: str) -> None:
        """A line above the bar, and in the run log's event list (checkpoints, skipped steps, the end)."""
        if not self.enabled:
            return
        self._bar.write(text)
        self._notes.append(text)

    def close(self) -> None:
        if not self.enabled:
            return
        self._bar.close()
        if self._corrupt is not None:
            c = self._corrupt
            worst = sorted(c["corrupt_by_shard"].items(), key=lambda kv: -kv[1])[:5]
            self._notes.append(f"corrupt samples skipped (rank 0's reader): {c['corrupt_samples']}; by reason: "
                               + ", ".join(f"{k} {n}" for k, n in sorted(c["corrupt_by_reason"].items()))
                               + "; worst shards: " + ", ".join(f"{k} {n}" for k, n in worst))
        with self.path.open("a") as f:
            f.write("\n" + "".join(f"- {t}\n" for t in self._notes))
        if self._wandb is not None:
            self._wandb.finish()
