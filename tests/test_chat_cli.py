"""launch/chat_cli.py as a person uses it: lines on stdin, streamed replies on stdout."""

import io
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def run_cli(ckpt, lines: list[str], *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / "chat_cli.py"), "--ckpt", str(ckpt), "--temperature", "0",
         "--max-new-tokens", "6", *extra],
        input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )


def run_main(ckpt, lines: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """The same program in this process (no interpreter start-up), for the quicker cases."""
    main = runpy.run_path(str(ROOT / "launch" / "chat_cli.py"), run_name="chat_cli")["main"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    try:
        code = main(["--ckpt", str(ckpt), "--temperature", "0", "--max-new-tokens", "6"])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def png_bytes(size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def replies(stdout: str) -> list[str]:
    return [line.split("assistant> ", 1)[1] for line in stdout.splitlines() if "assistant> " in line]


@pytest.fixture(scope="module")
def vlm_ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("vlm_ckpt"))


def test_multi_turn_with_image_and_commands(vlm_ckpt, tmp_path):
    (tmp_path / "red.png").write_bytes(png_bytes())
    (tmp_path / "notes.txt").write_text("not an image")
    result = run_cli(vlm_ckpt, [
        "hello again",
        f"/image {tmp_path / 'missing.png'}",
        f"/image {tmp_path / 'notes.txt'}",
        f"/image {tmp_path / 'red.png'}",
        "what colour is the picture?",
        "and its shape?",
        "/clear",
        "hello again",
        "/nonsense",
        "/quit",
        "this line is never read",
    ])
    out = result.stdout
    assert result.returncode == 0, result.stderr
    assert f"no such file: {tmp_path / 'missing.png'}" in out
    assert f"{tmp_path / 'notes.txt'} is not a usable image" in out
    assert "image attached to your next message" in out
    assert "(conversation cleared)" in out
    assert "unknown command '/nonsense'" in out
    got = replies(out)
    assert len(got) == 4  # four messages sent; the line after /quit is not
    assert got[3] == got[0]  # greedy: after /clear the model sees exactly what a fresh session did
    assert got[1] != got[0] or got[2] != got[0]  # ... and before it, the image and history mattered
    assert any(r.strip() for r in got)


def test_text_only_checkpoint_refuses_images_clearly(tmp_path, monkeypatch, capsys):
    ckpt = tiny_checkpoint(tmp_path / "gpt", vision=False)
    (tmp_path / "red.png").write_bytes(png_bytes())
    code, out, err = run_main(ckpt, [f"/image {tmp_path / 'red.png'}", "hi"], monkeypatch, capsys)
    assert code == 0, err
    assert "text-only model (no vision tower)" in out
    assert len(replies(out)) == 1


def test_bad_checkpoint_directory_exits_with_a_message(tmp_path, monkeypatch, capsys):
    code, _, err = run_main(tmp_path, [], monkeypatch, capsys)
    assert code == 2
    assert "cannot load --ckpt" in err and "config.json not found" in err and "DeepSpeed" not in err
    step = tmp_path / "run" / "ckpt" / "step-00000004"  # a resume state, not the export beside it
    step.mkdir(parents=True)
    code, _, err = run_main(step, [], monkeypatch, capsys)
    assert code == 2 and "DeepSpeed" not in err  # a folder named ckpt is not yet a run's checkpoints
    (step.parent / "latest").write_text(step.name)
    code, _, err = run_main(step, [], monkeypatch, capsys)
    assert code == 2 and f"inside a run's DeepSpeed checkpoints (resume state), and the run's export is " \
                          f"{tmp_path / 'run'}" in err
