"""The binding probes of docs/demo.md run, and a warm encoder written by one loads into the other and into the
trainer's `--encoder-weights` reader (timm-format safetensors)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from ghostvis import checkpoint_io
from ghostvis.config import get_preset, small_config
from ghostvis.vision.tower import VisionTower

ROOT = Path(__file__).resolve().parent.parent


def test_warm_encoder_from_tower_probe_starts_vlm_probe(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    warm = tmp_path / "warm.safetensors"
    probe = [sys.executable, "bench/tower_probe.py", "--task", "bind", "--steps", "1", "--save-encoder", str(warm)]
    subprocess.run(probe, cwd=ROOT, check=True, capture_output=True)
    saved = load_file(str(warm))
    tower = VisionTower(get_preset("vlm_tiny_cnn")[1], small_config(4), freeze_encoder=False)
    assert not any(k.startswith("model.") for k in saved)  # timm's own names, as --encoder-weights reads them
    checkpoint_io.load_encoder_weights(tower.encoder, warm)
    for name, value in tower.encoder.model.state_dict().items():
        assert (value == saved[name]).all(), name
    probe = [sys.executable, "bench/vlm_probe.py", "--tokenizer", str(tiny_tokenizer_dir), "--init-encoder", str(warm),
             "--sentences", "--steps", "2", "--eval-every", "2", "--batch", "4"]
    out = subprocess.run(probe, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    assert "step     2" in out and "colour" in out and "position" in out, out
