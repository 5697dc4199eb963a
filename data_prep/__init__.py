"""Data preparation: text and image shards, cached vision features, synthetic data."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def console_script(main: Callable[[], Any]) -> Callable[[], None]:
    """The console-script form of a main() whose return value is for Python callers, not an exit code."""

    def run() -> None:
        main()

    return run
