"""Resumable checkpoints: DeepSpeed state + our client state, published atomically (docs/training.md).

Layout under `<out>/ckpt/`:

    step-00000100/            DeepSpeed files (model + ZeRO optimizer shards) and, per rank r,
                              client_state_rank{r}.json (the training state: step, data position, ...;
                              the run's meta: stage, config, args, layout; world size)
                              rng_rank{r}.safetensors (python, numpy, torch CPU and CUDA generator states)
    latest                    the tag of the newest complete checkpoint (written last, atomically)

A save writes into `tmp-step-N/`; only when every rank has finished does rank 0 fsync it, rename it to
`step-N` and replace `latest`. A crash or a full disk at any point before that leaves `latest` naming the
previous, complete checkpoint; the next save or resume deletes the leftover `tmp-*` directory.
Never pickle: JSON and safetensors only (DeepSpeed's own files are its business).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                            UNIVERSAL_CHECKPOINT_VERSION_VALUE)
from safetensors import safe_open
from safetensors.torch import save_file

from ghostvis.cli import UserError
from ghostvis.files import follow_umask

LATEST = "latest"
PREVIOUS = ".previous"  # suffix of a checkpoint set aside while the same step is published again
_STEP_DIR = re.compile(r"step-(\d{8})$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be written or does not fit this run; the message says what to do."""


def step_tag(step: int) -> str:
    return f"step-{step:08d}"


# ---- RNG states as tensors (safetensors holds tensors + string metadata) -------------------------

def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    version, mt, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"python": torch.tensor(mt, dtype=torch.int64), "numpy": torch.from_numpy(np_keys.astype(np.int64)),
               "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    meta = {"python_version": str(version), "python_gauss": json.dumps(gauss), "numpy_pos": str(np_pos),
            "numpy_has_gauss": str(np_has_gauss), "numpy_gauss": float(np_gauss).hex()}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    random.setstate((int(meta["python_version"]), tuple(tensors["python"].tolist()), json.loads(meta["python_gauss"])))
    np.random.set_state(("MT19937", tensors["numpy"].numpy().astype(np.uint32), int(meta["numpy_pos"]),
                         int(meta["numpy_has_gauss"]), float.fromhex(meta["numpy_gauss"])))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda_{i}"] for i in range(torch.cuda.device_count()) if f"cuda_{i}" in tensors]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)


# ---- save ----------------------------------------------------------------------------------------

class Stateful(Protocol):
    """A training object a checkpoint saves and restores (JSON-able state), as torchtitan's are."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def save(engine: Any, out_dir: str | Path, step: int, state: Stateful, keep: int,
         meta: dict[str, Any] | None = None) -> Path:
    """Every rank calls this: the engine's state, `state.state_dict()` and this rank's RNG states, with
    `meta` (what run wrote it; JSON) beside them. Returns the published `ckpt/step-N` directory; raises
    CheckpointError (with `latest` untouched) when any part fails, e.g. OSError for a full disk."""
    client_state = {**(meta or {}), **state.state_dict()}
    rank, world = dist.get_rank(), dist.get_world_size()
    ckpt_dir = Path(out_dir) / "ckpt"
    tmp_tag, tag = f"tmp-{step_tag(step)}", step_tag(step)
    tmp = ckpt_dir / tmp_tag
    if rank == 0:  # files of an earlier failed attempt at this step must not mix into this one
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        _write_json(tmp / f"client_state_rank{rank}.json", {**client_state, "world_size": world, "rank": rank})
        tensors, meta = rng_state()
        save_file(tensors, str(tmp / f"rng_rank{rank}.safetensors"), metadata=meta)
        follow_umask(tmp / f"rng_rank{rank}.safetensors")  # safetensors writes through a private temporary file
        # save_latest=False: DeepSpeed's own `latest` would point at the tmp tag; ours is written below
        # universal_checkpoint_info: what ds_to_universal requires to convert for another world size
        engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, save_latest=False,
                               client_state={UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY:
                                                                         UNIVERSAL_CHECKPOINT_VERSION_VALUE}})
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError (inline_container)
        # a rank failing alone dies here; the launcher then stops the others
        free = shutil.disk_usage(ckpt_dir).free if ckpt_dir.exists() else 0
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"saving checkpoint {tmp} failed on rank {rank} ({why}; {free / 2**20:.0f} MiB free "
                              f"there: is the disk full?); {ckpt_dir / LATEST} still names the previous "
                              "checkpoint: free space or pick another --out, then resume") from err
    dist.barrier()  # every rank's files are written
    error = ""
    if rank == 0:
        try:
            _publish(ckpt_dir, tmp, tag)
            _prune(ckpt_dir, keep)
        except (OSError, RuntimeError) as err:
            error = f"publishing checkpoint {tmp} as {tag} failed: {err}"
    still = f"; {ckpt_dir / LATEST} still names the previous checkpoint"
    _agree(error and error + still, f"rank 0 failed to publish {tmp}{still}")
    return ckpt_dir / tag


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(ckpt_dir: Path, tmp: Path, tag: str) -> None:
    """Make `tmp` durable, rename it to `tag`, then point `latest` at it: each step is atomic."""
    for f in tmp.rglob("*"):
        if f.is_file():
            _fsync(f)
    _fsync(tmp)
    final = ckpt_dir / tag
    previous = ckpt_dir / (tag + PREVIOUS)
    if final.exists():  # the same step saved again (e.g. --resume none into the same --out): keep the old
        shutil.rmtree(previous, ignore_errors=True)  # copy aside until the new one is in place, since
        os.replace(final, previous)  # `latest` may name it; read_latest falls back to it meanwhile
    os.replace(tmp, final)
    _point_latest(ckpt_dir, tag)
    shutil.rmtree(previous, ignore_errors=True)


def _point_latest(ckpt_dir: Path, tag: str) -> None:
    latest_tmp = ckpt_dir / f"{LATEST}.tmp"
    latest_tmp.write_text(tag)
    _fsync(latest_tmp)
    os.replace(latest_tmp, ckpt_dir / LATEST)
    _fsync(ckpt_dir)


def discard(out_dir: str | Path, steps: list[int]) -> str | None:
    """Every rank calls this. Deletes the checkpoints of `steps` (they may hold ruined weights) and points
    `latest` at the newest one left (no `latest` when none is); returns its tag or None."""
    ckpt_dir = Path(out_dir) / "ckpt"
    if dist.get_rank() == 0 and ckpt_dir.is_dir():
        for step in steps:
            for name in (step_tag(step), step_tag(step) + "_universal"):
                shutil.rmtree(ckpt_dir / name, ignore_errors=True)
        left = sorted(p.name for p in ckpt_dir.iterdir() if _STEP_DIR.match(p.name))
        if left:
            _point_latest(ckpt_dir, left[-1])
        else:
            (ckpt_dir / LATEST).unlink(missing_ok=True)
    dist.barrier()
    return read_latest(out_dir)


def saved_state(out_dir: str | Path) -> dict[str, Any] | None:
    """Rank 0's client state of the latest checkpoint (read before anything loads it), or None."""
    tag = read_latest(out_dir)
    if tag is None:
        return None
    return json.loads((Path(out_dir) / "ckpt" / tag / "client_state_rank0.json").read_text())


def _prune(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest `keep` step directories (0 = keep all); drop leftovers of failed saves."""
    latest = read_latest(ckpt_dir.parent)
    steps = sorted(p for p in ckpt_dir.iterdir() if _STEP_DIR.match(p.name))
    old = steps[:-keep] if keep > 0 else []
    kept = {p.name for p in steps} - {p.name for p in old}
    # leftovers: failed saves, and universal conversions of checkpoints no longer kept
    stale = [p for p in ckpt_dir.iterdir() if p.name.startswith("tmp-")
             or (p.name.endswith("_universal") and p.name[:-len("_universal")] not in kept)]
    for p in old + stale:
        if p.name != latest:
            shutil.rmtree(p, ignore_errors=True)


# ---- resume --------------------------------------------------------------------------------------

def read_latest(out_dir: str | Path) -> str | None:
    """Tag named by `<out>/ckpt/latest`, or None when there is no checkpoint yet. If a crash interrupted the
    re-publishing of that same tag, its previous copy (set aside by `_publish`) is restored first."""
    ckpt_dir = Path(out_dir) / "ckpt"
    path = ckpt_dir / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    previous = ckpt_dir / (tag + PREVIOUS)
    if not (ckpt_dir / tag).exists() and previous.exists():
        try:
            os.replace(previous, ckpt_dir / tag)
        except FileNotFoundError:  # another rank restored it first
            pass
    return tag


def _saved_layout(state: dict[str, Any]) -> dict[str, int]:
    """(tp, pp, dp[, cp]) a checkpoint was saved with; checkpoints from before layouts were recorded were tp=pp=1."""
    return state.get("layout", {"tp": 1, "pp": 1, "dp": state["world_size"]})


def _flags(layout: dict[str, int]) -> str:
    cp = layout.get("cp", 1)
    return f"--tp {layout['tp']} --pp {layout['pp']}" + (f" --cp {cp}" if cp > 1 else "")


def prepare_universal(out_dir: str | Path, layout: dict[str, int]) -> bool:
    """Every rank calls this before `deepspeed.initialize`. True when the latest checkpoint was saved with
    another data-parallel size and must be loaded as a universal checkpoint (`load_universal`); rank 0 then
    converts it once, with DeepSpeed's `ds_to_universal`, into `ckpt/<tag>_universal/`. A changed tensor-
    or pipeline-parallel size is refused: only the data-parallel size may change on resume."""
    tag = read_latest(out_dir)
    if tag is None:
        return False
    ckpt_dir = Path(out_dir) / "ckpt"
    saved = _saved_layout(json.loads((ckpt_dir / tag / "client_state_rank0.json").read_text()))
    if (saved["tp"], saved["pp"], saved.get("cp", 1)) != (layout["tp"], layout["pp"], layout.get("cp", 1)):
        raise CheckpointError(f"{ckpt_dir / tag} was saved with {_flags(saved)}, this run has {_flags(layout)}: resume "
                              "with the same --tp/--pp/--cp (only the data-parallel size may change), or start from "
                              "its export with --init-from")
    if saved["dp"] == layout["dp"]:
        return False
    error = ""
    target = ckpt_dir / f"{tag}_universal"
    if dist.get_rank() == 0:
        convert = not target.is_dir()
        print(f"resuming {ckpt_dir / tag}, saved with {saved['dp']} data-parallel replica(s), on {layout['dp']}: "
              f"loading it as DeepSpeed's universal checkpoint {target}"
              + (" (converting it once now)" if convert else ""), flush=True)
        if convert:
            error = _to_universal(ckpt_dir / tag, target)
    _agree(error, f"converting {ckpt_dir / tag} to a universal checkpoint failed on rank 0")
    return True


def _to_universal(src: Path, target: Path) -> str:
    """Run DeepSpeed's converter into a temporary folder, then rename it; '' or the error text."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stderr[-3000:]}"
    os.replace(tmp, target)
    # the converter also writes `latest_universal` naming its (temporary) output; we load by tag instead
    (target.parent / "latest_universal").unlink(missing_ok=True)
    return ""


def _agree(error: str, fallback: str) -> None:
    """Rank 0's outcome reaches every rank, so all of them stop (or go on) together."""
    on_gpu = dist.get_backend() == "nccl"  # nccl only moves GPU tensors
    failed = torch.tensor([1 if error else 0], device=torch.cuda.current_device() if on_gpu else "cpu")
    dist.broadcast(failed, src=0)
    if failed.item():
        raise CheckpointError(error or fallback)


def load(engine: Any, out_dir: str | Path, state: Stateful | None = None, *,
         universal: bool = False) -> dict[str, Any] | None:
    """Every rank calls this. Restores the engine, the RNG states and `state` (`load_state_dict` of what
    `save` took from it), and returns this rank's whole client state (None when `out_dir` holds no
    checkpoint: nothing is touched). A changed world size needs a universal checkpoint."""
    rank, world = dist.get_rank(), dist.get_world_size()
    ckpt_dir = Path(out_dir) / "ckpt"
    tag = read_latest(out_dir)
    if tag is None:
        return None
    src = ckpt_dir / tag
    saved_world = json.loads((src / "client_state_rank0.json").read_text())["world_size"]
    if universal:
        load_tag = f"{tag}_universal"
        if not (ckpt_dir / load_tag).is_dir():
            raise CheckpointError(f"--universal: {ckpt_dir / load_tag} does not exist; make it with\n"
                                  f"  python -m deepspeed.checkpoint.ds_to_universal --input_folder {src} "
                                  f"--output_folder {ckpt_dir / load_tag}")
    elif saved_world != world:
        raise CheckpointError(
            f"{src} was saved by {saved_world} ranks, this run has {world}: ZeRO state is sharded per rank. "
            f"Convert it once with\n  python -m deepspeed.checkpoint.ds_to_universal --input_folder {src} "
            f"--output_folder {ckpt_dir / (tag + '_universal')}\nthen resume with --universal")
    else:
        load_tag = tag
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=load_tag, load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt_dir / load_tag}")
    # after a world-size change rank r takes rank (r mod old world)'s data position; RNG restarts from seed
    own = rank if saved_world == world else rank % saved_world
    client = json.loads((src / f"client_state_rank{own}.json").read_text())
    if saved_world == world:
        with safe_open(str(src / f"rng_rank{rank}.safetensors"), framework="pt") as f:
            set_rng_state({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    if state is not None:
        state.load_state_dict(client)
    return client
