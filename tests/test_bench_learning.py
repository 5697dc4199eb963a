"""The learning check every throughput bench applies before it writes a number (bench/learning.py)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.learning import check_beats_control, check_learning, learnable_batches

REPO = Path(__file__).resolve().parent.parent


def test_learnable_batches_are_deterministic_shifted_and_learnable():
    a, b = learnable_batches(1000, 3, 50, "cpu", seed=1), learnable_batches(1000, 3, 50, "cpu", seed=1)
    for _ in range(3):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(xa[:, 1:], ya[:, :-1])  # targets are the inputs shifted by one
        assert int(xa.max()) < 250  # a quarter of the vocabulary: the unigram part is learnable at once
    # every second token is the same fixed function of the one before it, in every row and every batch
    succ: dict[int, int] = {}
    for x, y in (next(learnable_batches(1000, 2, 200, "cpu")) for _ in range(3)):
        for a_tok, b_tok in zip(x[:, 0::2].flatten().tolist(), y[:, 0::2].flatten().tolist()):
            assert succ.setdefault(a_tok, b_tok) == b_tok
    assert len(set(succ.values())) == len(succ)  # a permutation: no two tokens share an image
    big, _ = next(learnable_batches(152_000, 1, 32_768, "cpu"))
    assert int(big.max()) < 4096 and big.shape == (1, 32_768)  # a small span even for a large vocabulary


def test_one_long_row_per_step_learns():
    """Batch 1 at a long sequence (the 32k benches): a small GPT trained with AdamW must pass
    the check within a bench's step count."""
    from ghostvis.config import get_preset
    from ghostvis.model.gpt import GPT

    torch.manual_seed(0)
    cfg, _ = get_preset("tiny", vocab_size=8192, max_seq_len=1024)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)  # a 64-wide model: the benches use 1e-4 at 1.5B
    losses = []
    for _, (x, y) in zip(range(13), learnable_batches(cfg.vocab_size, 1, 1024, "cpu")):
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    verdict = check_learning(losses)
    assert verdict.ok, verdict.message


def test_a_side_that_does_not_learn_fails():
    flat = [7.3, 7.31, 7.29, 7.3, 7.3, 7.3]  # what a zero-gradient (broken compile) run looks like
    verdict = check_learning(flat)
    assert not verdict.ok and "did not learn" in verdict.message
    assert not check_learning([7.0, 5.0, float("nan")]).ok
    assert not check_learning([]).ok


def test_a_side_must_track_its_reference():
    ref = [10.6, 9.0, 8.1, 7.6, 7.3, 7.1, 7.0]
    assert check_learning(ref).ok
    close = [x + 0.05 for x in ref]
    assert check_learning(close, ref).ok
    # learns, but to somewhere else: loss falls, yet the gap is past TRACK_ABS + TRACK_REL × mean
    drifted = [10.6, 9.6, 9.0, 8.8, 8.6, 8.5, 8.4]
    verdict = check_learning(drifted, ref)
    assert not verdict.ok and "does not track the reference" in verdict.message
    assert not check_learning(ref[:4], ref).ok  # fewer steps than the reference
    # one step late across the early cliff of a bench-length run is fine: means and ends are compared
    curve = [7.0 + 3.6 * math.exp(-i / 2) for i in range(25)]
    late = curve[:1] + curve[:-1]
    assert check_learning(late, curve).ok, check_learning(late, curve).message


def test_a_lora_side_must_end_below_its_frozen_adapter_control():
    control = [12.25, 12.22, 12.2, 12.19, 12.18, 12.17]  # only the connector learns
    assert check_beats_control([12.25, 12.1, 12.0, 11.9, 11.85, 11.8], control).ok
    verdict = check_beats_control([12.25, 12.2, 12.18, 12.16, 12.15, 12.14], control)  # the adapters add ~0.3%
    assert not verdict.ok and "the adapters did not learn" in verdict.message
    assert not check_beats_control(control[:3], control).ok  # other steps: not comparable
    assert not check_beats_control([12.25, float("nan")] * 3, control).ok
    broken = check_beats_control([12.25, 12.1, 12.0, 11.9, 11.85, 11.8], control[:3] + [float("nan")] * 3)
    assert not broken.ok and "the control: non-finite loss at step 3" in broken.message  # NaN never passes
    elsewhere = check_beats_control([10.0, 9.9, 9.8, 9.7, 9.6, 9.5], control)  # other flags: another start
    assert not elsewhere.ok and "not the same start" in elsewhere.message


@pytest.mark.slow
def test_parallel_throughput_lora_side_beats_its_control_and_only_it_writes_a_row(tmp_path):
    """The bench's LoRA pair on CPU (vlm_tiny): the control's adapters stay at zero, the LoRA side learns past it."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    out, losses = tmp_path / "bench.md", tmp_path / "control.json"
    common = [sys.executable, str(REPO / "bench" / "parallel_throughput.py"), "--model", "vlm_tiny", "--seq-len",
              "128", "--micro-batch", "4", "--steps", "10", "--warmup", "3", "--lr", "3e-3", "--lora-rank", "16",
              "--out", str(out)]

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*common, *extra], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    control = run("--lora-control", "--save-losses", str(losses))
    assert control.returncode == 0, control.stderr[-2000:]
    assert "no row: a control" in control.stdout and not out.exists()
    lora_side = run("--control-losses", str(losses))
    assert lora_side.returncode == 0, lora_side.stderr[-2000:]
    assert "below the control with frozen adapters" in lora_side.stdout and "FAILED" not in lora_side.stdout
    assert "LoRA rank 16" in out.read_text()
    for flags, message in ((["--lora-control", "--control-losses", str(losses)], "to the LoRA side only"),
                           (["--lora-control"], "add --save-losses FILE"),
                           (["--control-losses", str(losses), "--reference-losses", str(losses)],
                            "drop --reference-losses")):
        refused = run(*flags)
        assert refused.returncode == 2 and message in refused.stderr, (flags, refused.stderr[-500:])
