"""How every command ends (`launch/*.py`, `data_prep` modules, the installed `ghostvis-*` scripts: `cli`, made by
`console_script`): `run_main(main)` turns a user's mistake into one `error: ...` line
(exit 2) and a diverged training run into one line (exit 3); real bugs keep their traceback. `--debug` on
the command line or `GHOSTVIS_DEBUG=1` shows the traceback of user errors too."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

USER_ERROR_EXIT, DIVERGED_EXIT, INTERRUPTED_EXIT = 2, 3, 130  # 130: a shell's Ctrl-C


class UserError(Exception):
    """A mistake in flags, files or data that the user can fix; the message names what and how."""


class Diverged(Exception):
    """Training stopped because its updates kept failing (non-finite loss or gradients)."""


def debug_requested(argv: list[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get("GHOSTVIS_DEBUG", "") not in ("", "0")


def run_main(main: Callable[..., Any], *args: Any) -> None:
    """Call `main(*args)` and exit with its return value (None = 0); user errors (UserError, and a missing
    file a flag named: FileNotFoundError) print one line and exit 2, Diverged exits 3."""
    argv = [a for a in sys.argv[1:] if a != "--debug"]
    debug = debug_requested()
    sys.argv[1:] = argv  # --debug is ours, not the command's
    try:
        code = main(*args)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        _close_progress_bars()
        print("interrupted", file=sys.stderr, flush=True)  # training: the same command resumes (docs/training.md)
        sys.exit(INTERRUPTED_EXIT)
    except (UserError, FileNotFoundError, Diverged) as err:
        if debug:
            traceback.print_exc()
        _close_progress_bars()
        message = str(err) if not isinstance(err, FileNotFoundError) or not err.filename else \
            f"{err.filename}: {err.strerror}"
        print(f"{'stopped' if isinstance(err, Diverged) else 'error'}: {message}", file=sys.stderr, flush=True)
        _leave_process_group()
        sys.exit(DIVERGED_EXIT if isinstance(err, Diverged) else USER_ERROR_EXIT)
    sys.exit(code or 0)


def console_script(main: Callable[[], Any], *, exit_status: bool = True) -> Callable[[], None]:
    """The `[project.scripts]` entry of a command: `main` under run_main, as `python launch/x.py` runs it, so the
    installed `ghostvis-*` command ends a user error in one line too. exit_status=False: main's return value is
    for Python callers (a manifest, say), not the exit status."""

    def value_for_callers() -> None:
        main()

    def run() -> None:
        run_main(main if exit_status else value_for_callers)

    return run


def _leave_process_group() -> None:
    """A training command exits cleanly: gloo/nccl torn down explicitly (only if torch was imported)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _close_progress_bars() -> None:
    """A progress bar left open ends its line, so the error starts on its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()
