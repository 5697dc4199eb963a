"""Recipe files: a TOML file of flag values for launch/train.py (docs/training.md#recipes).

    # recipes/demo_sft.toml
    stage = "sft"
    seq-len = 96
    lr = 1e-3

Keys are the flags' long names without the dashes (`micro-batch` or `micro_batch`). Values become the flags'
text before the command line's, so every flag keeps its own checks and a flag given on the command line wins.
`OUT/run_config.toml` holds the resolved values of a run: `--config OUT/run_config.toml` runs it again.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import Any

from ghostvis.cli import UserError
from ghostvis.shipped import shipped_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the tomllib backport
    import tomli as tomllib

RESOLVED_NAME = "run_config.toml"
_NOT_RECORDED = {"help", "config", "local_rank"}  # the recipe itself, and what the launcher sets per rank


class RecipeError(UserError, ValueError):
    """A recipe file that cannot be used; the message names the file, the key and the fix."""


def find_recipe(name: str) -> Path:
    """A recipe path, or the name of a shipped one (`demo_sft` = recipes/demo_sft.toml)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = shipped_dir("recipes") / f"{path.stem}.toml"
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    names = sorted(p.stem for p in shipped_dir("recipes").glob("*.toml"))
    raise RecipeError(f"--config {name}: no such file, nor a shipped recipe (shipped: {', '.join(names)})")


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every name a recipe key may use for each flag: its long option strings without dashes, and its dest."""
    names: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest in _NOT_RECORDED:
            continue
        for name in [*(s.lstrip("-") for s in action.option_strings if s.startswith("--")), action.dest]:
            names[name] = action
    return names


def _tokens(action: argparse.Action, key: str, value: Any, source: Path) -> list[str]:
    """The command-line text of one recipe value."""
    flag = action.option_strings[0]
    if isinstance(value, dict):
        raise RecipeError(f"{source}: key {key!r} holds a table; recipes are flat `flag = value` lines")
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise RecipeError(f"{source}: key {key!r} is a switch: write {key} = true or false")
        return [flag] if value else []
    if isinstance(value, bool):
        if action.nargs == "?" and action.const is True:  # a switch with an optional number
            return [flag] if value else []
        raise RecipeError(f"{source}: key {key!r} takes a value, not true/false")
    if isinstance(value, list):
        if isinstance(action, argparse._AppendAction):  # a repeatable flag: once per value
            return [t for v in value for t in (flag, str(v))]
        return [flag, *map(str, value)]
    return [flag, str(value)]


def recipe_argv(parser: argparse.ArgumentParser, path: Path) -> list[str]:
    """The flags a recipe file stands for, checked against `parser`'s flags."""
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML ({e})") from e
    options = _options(parser)
    argv: list[str] = []
    for key, value in values.items():
        if key not in options:
            near = difflib.get_close_matches(key.replace("_", "-"), options, n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]!r}?" if near else "; `--help` lists the flags"
            raise RecipeError(f"{path}: unknown key {key!r}{hint}")
        argv += _tokens(options[key], key, value, path)
    return argv


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """`parser.parse_args` where `--config FILE` (a flag of `parser`) adds the recipe's flags before the rest;
    returns the arguments and the whole command line they came from (for write_resolved)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    config = pre.parse_known_args(argv)[0].config
    if config:  # a RecipeError is the command's one-line error (run_main), without argparse's usage block
        argv = recipe_argv(parser, find_recipe(config)) + argv
    return parser.parse_args(argv), argv


def write_resolved(parser: argparse.ArgumentParser, argv: list[str], out: Path) -> Path:
    """Write `out`/run_config.toml: every flag's value in this run, as recipe text that re-parses to the same
    values (unset flags, which take the stage's defaults, are left out)."""
    # Flags with a converting type (e.g. --freeze, --train-llm-layers) are recorded as written, not converted.
    converting = [a for a in parser._actions if a.type not in (None, int, float, str)]
    saved = [a.type for a in converting]
    for a in converting:
        a.type = None
    try:
        raw = parser.parse_args(argv)
    finally:
        for a, t in zip(converting, saved):
            a.type = t
    lines = [f"# launch/train.py --config {out / RESOLVED_NAME} runs this again (flags override it)"]
    for action in parser._actions:
        if action.dest in _NOT_RECORDED or not action.option_strings:
            continue
        value = getattr(raw, action.dest)
        if value is None or (value is False and isinstance(action, argparse._StoreTrueAction)):
            continue
        lines.append(f"{action.option_strings[0].lstrip('-')} = {_toml_value(value)}")
    path = out / RESOLVED_NAME
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
