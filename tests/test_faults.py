"""Fault injection (docs/training.md, "What we test and what we promise"): kill -9 at random moments and
inside saves, a full disk during a save, forced divergence and rollback, every user mistake as one line,
files that follow the umask, and fuzzed shards. Trainer runs are fresh subprocesses (a fork of this
process after torch work can hang in the child)."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, TOK, TRAIN, tiny_checkpoint, write_shards

pytestmark = pytest.mark.faults

STEPS, SAVE_EVERY = 8, 2


def env() -> dict[str, str]:
    e = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GHOSTVIS_DEBUG"):
        e.pop(var, None)
    return e


def train_cmd(data: Path, tok: Path, out: Path, *extra: object) -> list[str]:
    return [sys.executable, str(TRAIN), "--stage", "base", "--model", "small", "--depth", "2", "--seq-len", "64",
            "--micro-batch", "4", "--data", str(data), "--tokenizer", str(tok), "--out", str(out),
            "--eval-every", "0", "--warmup", "2", "--steps", str(STEPS), "--save-every", str(SAVE_EVERY),
            "--data-workers", "0", *map(str, extra)]


def run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout,
                          preexec_fn=lambda: os.umask(0o022))


def weights(out: Path) -> dict[str, bytes]:
    from safetensors.torch import load_file

    return {k: v.numpy().tobytes() for k, v in load_file(str(out / "llm.safetensors")).items()}


def assert_one_line(proc: subprocess.CompletedProcess, code: int, *needles: str, case: str = "") -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, f"{case}: rc {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, f"{case}: traceback printed\n{proc.stderr[-3000:]}"
    last = lines[-1] if lines else ""
    assert last.startswith(("error: ", "stopped: ")), f"{case}: last line {last!r}"
    for needle in needles:
        assert needle in last, f"{case}: {needle!r} not in {last!r}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, text_data, tiny_tokenizer_dir) -> Path:
    """An uninterrupted run: the weights every interrupted run must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = run(train_cmd(text_data, tiny_tokenizer_dir, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# ---- kill -9 ---------------------------------------------------------------------------------------

def _open_under(pid: int, marker: str) -> bool:
    """Whether process `pid` has a file open whose path contains `marker` (a real moment inside I/O)."""
    try:
        return any(marker in os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def _training(out: Path, since: float) -> bool:
    """Whether the run has a complete checkpoint and has logged a step since `since` (time.time())."""
    metrics = out / "metrics.jsonl"
    return (out / "ckpt" / "latest").is_file() and metrics.is_file() and metrics.stat().st_mtime > since


def _kill_when(proc: subprocess.Popen, moment: str, rng: random.Random, out: Path) -> str:
    """kill -9 `proc` at `moment`; returns what actually happened.
    - "save": a checkpoint file open for writing.
    - "load": a file under ckpt/ open: while resuming, or, where the poll misses the resume's brief reads, the
      run's first save (so one miss does not leave the later runs nothing to do).
    - "random": up to 0.15 s after this run has logged a step with a complete checkpoint behind it (a delay
      counted from the start outlasted the whole run on a fast box, or came before any checkpoint and left the
      next run nothing to load)."""
    deadline = time.monotonic() + 200
    delay, since, armed = rng.uniform(0.0, 0.15), time.time(), None
    while proc.poll() is None and time.monotonic() < deadline:
        if moment == "random" and armed is None and _training(out, since):
            armed = time.monotonic()
        hit = (moment == "save" and (_open_under(proc.pid, "/tmp-step-") or any((out / "ckpt").glob("tmp-*")))) \
            or (moment == "load" and _open_under(proc.pid, "/ckpt/")) \
            or (armed is not None and time.monotonic() - armed > delay)
        if hit:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return moment
        time.sleep(0.001)
    proc.wait()
    return "finished first"


def test_kill9_at_random_moments_resumes_bit_identical(reference, text_data, tiny_tokenizer_dir, tmp_path):
    """Five kills in a row on one run directory (two inside checkpoint writes, one while a resume loads its
    checkpoint, two at random moments), then a resume to the end: the export equals the uninterrupted run's."""
    out = tmp_path / "run"
    rng = random.Random(13)
    happened = []
    for moment in ("save", "random", "load", "save", "random"):
        proc = subprocess.Popen(train_cmd(text_data, tiny_tokenizer_dir, out), cwd=REPO, env=env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        happened.append(_kill_when(proc, moment, rng, out))
        latest = out / "ckpt" / "latest"
        if latest.is_file():  # `latest` always names a complete checkpoint
            tag = latest.read_text().strip()
            assert (out / "ckpt" / tag / "client_state_rank0.json").is_file()
            assert (out / "ckpt" / tag / "mp_rank_00_model_states.pt").is_file()
    assert happened.count("finished first") <= 1, happened
    proc = run(train_cmd(text_data, tiny_tokenizer_dir, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert weights(out) == weights(reference), f"final weights differ after kills at {happened}"


# ---- full disk -------------------------------------------------------------------------------------

def _tmpfs_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /mnt 2>/dev/null || mount -t tmpfs -o size=1m tmpfs "
                            "/tmp"], capture_output=True)
    return probe.returncode == 0


def test_full_disk_during_save_is_one_line_and_keeps_the_previous_checkpoint(reference, text_data,
                                                                              tiny_tokenizer_dir, tmp_path):
    """A real tmpfs sized for one checkpoint (in a user+mount namespace) where the machine allows, else a
    torch.save that fails the way a full disk makes it fail (RuntimeError from the zip writer)."""
    ckpt = reference / "ckpt" / (reference / "ckpt" / "latest").read_text()
    one = sum(f.stat().st_size for f in ckpt.iterdir())
    if _tmpfs_works():
        mnt = tmp_path / "disk"
        mnt.mkdir()
        size_kib = int(one * 1.5) // 1024
        cmd = train_cmd(text_data, tiny_tokenizer_dir, mnt / "run")
        script = (f"mount -t tmpfs -o size={size_kib}k tmpfs {mnt} && {{ {' '.join(map(repr, cmd))}; "
                  f"echo rc=$? >&2; cat {mnt}/run/ckpt/latest >&2; }}")
        proc = run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script])
        rc, latest = proc.stderr.strip().splitlines()[-2:]
        error = proc.stderr.strip().splitlines()[-3]
    else:
        patch = ("import runpy, sys, torch\nsave = torch.save\n"
                 "def full(obj, f, *a, **k):\n"
                 "    if 'tmp-step-00000004' in str(f):\n"
                 "        raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0')\n"
                 "    return save(obj, f, *a, **k)\n"
                 f"torch.save = full\nsys.argv = {train_cmd(text_data, tiny_tokenizer_dir, tmp_path / 'run')[1:]!r}\n"
                 "runpy.run_path(sys.argv[0], run_name='__main__')\n")
        proc = run([sys.executable, "-c", patch])
        rc, latest = f"rc={proc.returncode}", (tmp_path / "run" / "ckpt" / "latest").read_text()
        error = proc.stderr.strip().splitlines()[-1]
    assert rc == "rc=2", proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert error.startswith("error: saving checkpoint") and "is the disk full?" in error, error
    assert "still names the previous checkpoint" in error
    assert latest.strip() == "step-00000002"


# ---- divergence ------------------------------------------------------------------------------------

def test_divergence_stops_keeps_the_trusted_checkpoint_and_rolls_back(text_data, tiny_tokenizer_dir, tmp_path):
    """Four sane steps (checkpoints 2 and 4), then --lr 1e30: step 5 starts from good weights (so checkpoint
    4 is trusted), its update ruins them, and the run stops with one line, keeps checkpoint 4, drops the
    later ones and writes no export. With --rollbacks the same run reloads checkpoint 4, lowers the
    learning rates and finishes."""
    out = tmp_path / "run"
    first = run(train_cmd(text_data, tiny_tokenizer_dir, out, "--stop-at", "4"))
    assert first.returncode == 0, first.stderr[-3000:]
    said = first.stdout + first.stderr
    assert "stopped at step 4 (--stop-at 4 of --steps" in said and "without it" in said
    export_before = (out / "llm.safetensors").read_bytes()
    wild = ("--lr", "1e30", "--grad-clip", "0", "--max-skipped-updates", "2")
    proc = run(train_cmd(text_data, tiny_tokenizer_dir, out, *wild))
    assert_one_line(proc, 3, "training diverged at step", "step-00000004", "Lower --lr", case="diverged")
    assert (out / "ckpt" / "latest").read_text() == "step-00000004"
    assert not (out / "ckpt" / "step-00000006").exists()
    assert (out / "llm.safetensors").read_bytes() == export_before  # nothing exported from ruined weights
    assert json.loads((out / "config.json").read_text())["step"] == 4

    proc = run(train_cmd(text_data, tiny_tokenizer_dir, out, *wild, "--rollbacks", "1",
                         "--rollback-lr-factor", "1e-33", "--data-workers", "1"))  # a worker process is rewound too
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rolled back to step-00000004" in (out / "run_log.md").read_text()
    assert json.loads((out / "config.json").read_text())["step"] == STEPS
    assert all(np.isfinite(np.frombuffer(b, np.float32)).all() for b in weights(out).values())


# ---- one line per user mistake ---------------------------------------------------------------------

def test_user_mistakes_get_one_line(reference, text_data, tiny_tokenizer_dir, tmp_path):
    """Each case: exit 2, one `error:` line naming the file or flag, no traceback (run in parallel)."""
    import torch
    from safetensors.torch import load_file, save_file

    chat = [sys.executable, str(REPO / "launch" / "chat_cli.py"), "--ckpt"]
    base = train_cmd(text_data, tiny_tokenizer_dir, tmp_path / "new")
    tok = str(reference / "tokenizer")

    mismatched = tmp_path / "mismatched"
    shutil.copytree(reference, mismatched, ignore=shutil.ignore_patterns("ckpt"))
    state = load_file(str(reference / "llm.safetensors"))
    name = sorted(state)[0]
    state[name] = torch.zeros(state[name].shape[0] + 1, *state[name].shape[1:])
    save_file(state, str(mismatched / "llm.safetensors"))

    pickled = tmp_path / "pickled"
    shutil.copytree(reference, pickled, ignore=shutil.ignore_patterns("ckpt"))
    torch.save(load_file(str(reference / "llm.safetensors")), pickled / "llm.safetensors")

    vlm = Path(tiny_checkpoint(tmp_path / "vlm"))
    (vlm / "vision.safetensors").rename(vlm / "vision.bin")

    other_shape = tmp_path / "other_shape"
    shutil.copytree(reference, other_shape)

    mixtures = {}
    for label, text in (("bad_json", "{not json"), ("bad_schema", json.dumps({"datasets": [{"path": "x"}]}))):
        d = tmp_path / label
        d.mkdir()
        (d / "mixture.json").write_text(text)
        mixtures[label] = d
    encoder_pt = tmp_path / "encoder.pt"
    torch.save({"w": torch.zeros(1)}, encoder_pt)

    def vlm_train(data: Path, *extra: str) -> list[str]:
        return [sys.executable, str(TRAIN), "--stage", "vision_pretrain", "--model", "vlm_tiny", "--data", str(data),
                "--tokenizer", str(tiny_tokenizer_dir), "--out", str(tmp_path / "vlm_out"), "--seq-len", "64",
                "--micro-batch", "2", "--eval-every", "0", *extra]

    cases = {
        "lr out of range": (base + ["--lr", "1e38"], ["--lr 1e+38 is out of range"]),
        "resume into another shape": (_replace(train_cmd(text_data, tiny_tokenizer_dir, other_shape), "--depth", "3"),
                                      ["holds a base run of another model", "n_layer 2 vs 3"]),
        "init-from mismatched": (base + ["--init-from", str(mismatched), "--tokenizer", tok],
                                 [f"{mismatched / 'llm.safetensors'} does not fit the model", "shape of"]),
        "chat on mismatched": (chat + [str(mismatched)], ["does not fit the model"]),
        "init-from pickle": (base + ["--init-from", str(pickled), "--tokenizer", tok],
                             ["is not a safetensors file (it looks like a pickle)"]),
        "chat on pickle": (chat + [str(pickled)], ["is not a safetensors file"]),
        "init-from without vision.safetensors": (
            [sys.executable, str(TRAIN), "--stage", "sft", "--init-from", str(vlm), "--data", str(text_data),
             "--tokenizer", str(vlm / "tokenizer"), "--out", str(tmp_path / "sft")],
            [f"{vlm / 'vision.safetensors'} not found", "vision.bin"]),
        "chat without vision.safetensors": (chat + [str(vlm)], ["vision.safetensors not found"]),
        "mixture.json not JSON": (vlm_train(mixtures["bad_json"]), ["mixture.json: not valid JSON"]),
        "mixture.json wrong schema": (vlm_train(mixtures["bad_schema"]), ["mixture.json: datasets[0] is"]),
        "encoder weights .pt": (vlm_train(text_data, "--encoder-weights", str(encoder_pt)),
                                ["--encoder-weights", "only .safetensors"]),
        "import_hf refusal": ([sys.executable, str(REPO / "launch" / "import_hf.py"), "--vision", str(reference),
                               "--out", str(tmp_path / "imported.safetensors")],
                              [f"{reference / 'config.json'}: model_type None is not a SigLIP/CLIP vision model"]),
    }
    with ThreadPoolExecutor(max_workers=4) as pool:
        procs = dict(zip(cases, pool.map(lambda c: run(c[0]), cases.values())))
    for case, (_, needles) in cases.items():
        assert_one_line(procs[case], 2, *needles, case=case)


def test_debug_gives_the_traceback_back(monkeypatch, capsys):
    """--debug (or GHOSTVIS_DEBUG=1) prints the traceback of a user error, still exiting 2; bugs always keep it."""
    from ghostvis.cli import UserError, run_main

    def mistake():
        raise UserError("--flag x is wrong; pass y")

    for argv, env_value in ((["prog"], None), (["prog", "--debug"], None), (["prog"], "1")):
        wanted = argv != ["prog"] or env_value is not None
        monkeypatch.setattr(sys, "argv", argv)
        monkeypatch.delenv("GHOSTVIS_DEBUG", raising=False)
        if env_value:
            monkeypatch.setenv("GHOSTVIS_DEBUG", env_value)
        with pytest.raises(SystemExit) as exit_:
            run_main(mistake)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.endswith("error: --flag x is wrong; pass y\n")
        assert ("Traceback" in err) == wanted and "--debug" not in sys.argv  # the command never sees it
    with pytest.raises(ZeroDivisionError):
        run_main(lambda: 1 / 0)

    def ctrl_c():
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "argv", ["prog"])
    monkeypatch.delenv("GHOSTVIS_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:  # Ctrl-C: one line saying how to go on, a shell's exit status
        run_main(ctrl_c)
    err = capsys.readouterr().err
    assert exit_.value.code == 130 and err == "interrupted\n"


def test_installed_commands_end_user_errors_in_one_line(monkeypatch, capsys):
    """Every `ghostvis-*` console script goes through run_main, as `python launch/x.py` does: a user error raised
    deep inside (not an argparse error) is one line and exit 2, not a traceback."""
    import importlib
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert len(scripts) >= 14
    for name, target in scripts.items():
        module, attr = target.split(":")
        entry = getattr(importlib.import_module(module), attr)
        assert entry.__qualname__ == "console_script.<locals>.run", (name, target)
    monkeypatch.setattr(sys, "argv", ["ghostvis-export", "--ckpt", str(REPO / "no-such-run"), "--out", "x"])
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module("launch.export").cli()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and "no-such-run" in err and "Traceback" not in err


def _replace(cmd: list[str], flag: str, value: str) -> list[str]:
    i = cmd.index(flag)
    return cmd[:i + 1] + [value] + cmd[i + 2:]


# ---- umask -----------------------------------------------------------------------------------------

def test_exports_checkpoints_and_manifests_follow_the_umask(reference, tmp_path):
    from ghostvis.data.manifest import Manifest, ShardInfo, write_manifest

    files = [reference / "llm.safetensors", reference / "config.json",
             *(reference / "ckpt" / (reference / "ckpt" / "latest").read_text()).iterdir()]
    old = os.umask(0o022)
    try:
        files.append(write_manifest(tmp_path, Manifest(kind="text", shards=[ShardInfo("a.tar", 1)])))
    finally:
        os.umask(old)
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in files}
    assert set(modes.values()) == {"0o644"}, modes


# ---- corrupt data is visible ---------------------------------------------------------------------

def test_corrupt_counts_reach_the_bar_metrics_and_run_log(tmp_path):
    """The loop's corrupt metrics come from the data state (any nesting) and show in the progress bar's
    postfix, metrics.jsonl and run_log.md."""
    from ghostvis.data.shards import ShardStream
    from ghostvis.train.logging import RunLogger
    from ghostvis.train.loop import corrupt_metrics

    good = [{"__key__": f"{i:06d}", "txt": b"ok"} for i in range(8)]
    d = write_shards(tmp_path / "d", "text", good, per_shard=4)
    cut = d / "data-000001.tar"
    with tarfile.open(cut) as tar:
        last = tar.getmembers()[-1]
    cut.write_bytes(cut.read_bytes()[:last.offset_data + 1])  # inside the last member: one sample lost
    stream = ShardStream(d, seed=0, loop=False, shuffle=False, max_corrupt_fraction=1.0,
                         validate=lambda smp: smp["__key__"] != "000001")
    _drain(stream)
    metrics = corrupt_metrics({"sources": [{"stream": stream.state_dict()}]})
    assert metrics["corrupt_samples"] == 2
    assert metrics["corrupt_by_reason"] == {"rejected": 1, "unreadable": 1}
    assert metrics["corrupt_by_shard"] == {"data-000000.tar": 1, "data-000001.tar": 1}

    log = RunLogger(out_dir=tmp_path / "out", total_steps=1, start_step=0, enabled=True, wandb_mode="off",
                    run_config={}, header="h")
    log.step(1, {"loss": 1.0, "lr_mult": 1.0, "tokens_per_s": 1.0, "mfu": None, **metrics})
    assert log._bar.postfix.endswith("corrupt=2")
    log.close()
    record = json.loads((tmp_path / "out" / "metrics.jsonl").read_text())
    assert record["corrupt_by_reason"] == {"rejected": 1, "unreadable": 1}
    assert "corrupt samples skipped (rank 0's reader): 2; by reason: rejected 1, unreadable 1" in \
        (tmp_path / "out" / "run_log.md").read_text()


# ---- fuzzing ---------------------------------------------------------------------------------------

def _mutate(data: bytes, rng: random.Random) -> bytes:
    """One random damage: flipped bytes, a cut, inserted garbage, a swapped block or pure noise."""
    b = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        b = b[:rng.randrange(len(b))]
    elif kind == 2:
        at = rng.randrange(len(b) + 1)
        b[at:at] = rng.randbytes(rng.randint(1, 64))
    elif kind == 3:
        at = rng.randrange(len(b))
        b[at:at + 16] = rng.randbytes(16)
    else:
        b = bytearray(rng.randbytes(rng.randint(0, 256)))
    return bytes(b)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _image(fmt: str, rng: random.Random) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (24, 24), tuple(rng.randrange(256) for _ in range(3))).save(buf, fmt)
    return buf.getvalue()


def _conversation(rng: random.Random) -> bytes:
    record = {"messages": [{"role": "user", "content": "what shape?"}, {"role": "assistant", "content": "a circle"}]}
    if rng.random() < 0.1:  # nested far beyond the JSON parser's recursion limit
        return b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    return json.dumps(record).encode()


def _drain(source, seconds: float = 60) -> None:
    """Iterate to the end; a hang fails (SIGALRM)."""
    def hang(*_):
        raise TimeoutError("the reader hung")
    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(int(seconds))
    try:
        for _ in source:
            pass
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_fuzzed_samples_are_skipped_and_counted_or_refused_in_one_line(tmp_path):
    """1,140 mutated samples: 300 npy token arrays, 300 PNG/JPEG images, 300 conversation JSONs (some nested
    50,000 deep) through the real decoders, and 240 whole tars through the shard reader. Each decodes, or is
    skipped and counted, or (a tar whose damage changes its sample count) is refused with a DataError; none
    hangs or raises anything else."""
    from ghostvis.config import get_preset
    from ghostvis.data.manifest import DataError
    from ghostvis.data.multimodal import CaptionBatches, ConversationBatches
    from ghostvis.data.shards import ShardStream, corrupt_summary
    from ghostvis.data.text import TokenRowLoader
    from ghostvis.vision.transforms import image_transform

    rng = random.Random(7)
    tokens = [_npy(np.arange(rng.randint(1, 40), dtype=np.uint16) % 200) for _ in range(300)]
    samples = {
        "npy": [{"__key__": f"{i:06d}", "npy": _mutate(t, rng) if i % 3 else t} for i, t in enumerate(tokens)],
        "image": [{"__key__": f"{i:06d}", "txt": b"a red circle",
                   ("png" if i % 2 else "jpg"): _mutate(_image("PNG" if i % 2 else "JPEG", rng), rng)}
                  for i in range(300)],
        "json": [{"__key__": f"{i:06d}", "json": (lambda c: c if len(c) > 10_000 or i % 4 == 0 else _mutate(c, rng))(
                  _conversation(rng))} for i in range(300)],
    }
    d = {k: write_shards(tmp_path / k, kind, v, per_shard=50) for k, v, kind in (
        ("npy", samples["npy"], "text-tokens"), ("image", samples["image"], "image-text"),
        ("json", samples["json"], "conversation"))}
    manifest = json.loads((d["npy"] / "manifest.json").read_text())
    manifest.update(tokenizer={"fingerprint": "fuzz", "vocab_size": 256}, dtype="uint16")
    (d["npy"] / "manifest.json").write_text(json.dumps(manifest))

    def stream(path: Path, kind: str) -> ShardStream:
        return ShardStream(path, seed=0, loop=False, shuffle=False, max_corrupt_fraction=1.0, expected_kind=kind)

    vcfg = get_preset("vlm_tiny")[1]
    common = dict(batch_size=4, max_len=128, num_vision_tokens=4, transform=image_transform(vcfg), restart=True)
    text = TokenRowLoader(d["npy"], seq_len=32, batch_size=4, bos_id=0, eval_mode=True, max_corrupt_fraction=1.0)
    text.vocab_size = 256
    readers = {"npy": (text, text.stream),
               "image": (CaptionBatches(s := stream(d["image"], "image-text"), TOK, **common), s),
               "json": (ConversationBatches(c := stream(d["json"], "conversation"), TOK, **common), c)}
    for name, (reader, source) in readers.items():
        _drain(reader)
        stats = source.stats
        assert stats["seen"] == 300, (name, stats)
        assert 0 < stats["corrupt"] < 300, (name, stats)
        nested = {"sources": [{"stream": source.state_dict()}]}  # as a mixture's or a loader's state holds it
        assert sum(stats["by_reason"].values()) == stats["corrupt"] == corrupt_summary(nested)["corrupt"]
    assert "RecursionError" in readers["json"][1].stats["by_reason"]

    refused = counted = 0
    tar_bytes = (d["npy"] / "data-000000.tar").read_bytes()
    for i in range(240):
        t = tmp_path / "tars" / f"{i:03d}"
        t.mkdir(parents=True)
        (t / "data-000000.tar").write_bytes(_mutate(tar_bytes, rng))
        (t / "manifest.json").write_text(json.dumps({"format": "ghostvis-shards/1", "kind": "text",
                                                     "shards": [{"name": "data-000000.tar", "samples": 50}]}))
        s = stream(t, "text")
        try:
            _drain(s)
        except DataError as e:
            assert "\n" not in str(e)
            refused += 1
            continue
        assert s.stats["seen"] == 50, s.stats
        counted += 1
    assert refused + counted == 240 and counted > 0
