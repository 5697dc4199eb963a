"""Folders shipped beside the code: ds_configs/ (DeepSpeed JSON) and recipes/ (training recipes, TOML)."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def shipped_dir(name: str) -> Path:
    """`ds_configs` or `recipes`: the checkout's top-level folder, or the copy `pip install .` puts in the package
    (setup.py maps both into ghostvis/)."""
    installed = _PACKAGE / name
    return installed if installed.is_dir() else _PACKAGE.parent / name
