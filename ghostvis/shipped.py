"""Folders shipped beside the code: ds_configs/ (DeepSpeed JSON) and recipes/ (training recipes, TOML)."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def shipped_dir(name: str) -> Path:
    """`ds_configs` or `recipes`: the checkout's top-level folder, or the copy `pip install .` puts in the package
    (setup.py maps both into ghostvis/)."""
    installed = _PACKAGE / name
    return installed if installed.is_dir() else _PACKAGE.parent / name


def shipped_ds_config(path: str | Path) -> Path:
    """`path`, or where it names a shipped config (`ds_configs/zero2.json`, `zero2.json`) that is not there, the
    shipped file: the canonical command and the recipes name it relative to the checkout, which need not be the
    working directory (or exist at all, after `pip install`)."""
    path = Path(path)
    if path.is_file() or path.parent not in (Path("."), Path("ds_configs")):
        return path
    shipped = shipped_dir("ds_configs") / path.name
    return shipped if shipped.is_file() else path
