"""The binding probes of docs/demo.md run, and a warm encoder written by one loads into the other and into the
trainer's `--encoder-weights` reader (timm-format safetensors)."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from ghostvis import checkpoint_io
from ghostvis.config import get_preset, small_config
from ghostvis.vision.tower import VisionTower
from conftest import run_one


@pytest.mark.slow
def test_warm_encoder_from_tower_probe_starts_vlm_probe(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    warm = tmp_path / "warm.safetensors"
    proc = run_one("bench/tower_probe.py", ["--task", "bind", "--steps", "1", "--save-encoder", warm])
    assert proc.returncode == 0, proc.stderr
    saved = load_file(str(warm))
    tower = VisionTower(get_preset("vlm_tiny_cnn")[1], small_config(4), freeze_encoder=False)
    assert not any(k.startswith("model.") for k in saved)  # timm's own names, as --encoder-weights reads them
    checkpoint_io.load_encoder_weights(tower.encoder, warm)
    for name, value in tower.encoder.model.state_dict().items():
        assert (value == saved[name]).all(), name
    proc = run_one("bench/vlm_probe.py", ["--tokenizer", tiny_tokenizer_dir, "--init-encoder", warm, "--sentences",
                                          "--steps", "2", "--eval-every", "2", "--batch", "4", "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr
    assert "step     2" in proc.stdout and "colour" in proc.stdout and "position" in proc.stdout, proc.stdout
