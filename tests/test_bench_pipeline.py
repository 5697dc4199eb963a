"""bench/pipeline.py's pieces (the full run is a GPU benchmark; on CPU it takes minutes): the child
environment keeps the caller's PYTHONPATH, the per-stage summary read from a real run's metrics.jsonl, and the
learning check against the fp32 reference run (FAILED in place of the numbers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, bench_module

from ghostvis.train.logging import RunLogger


def pipeline():
    return bench_module("pipeline")


def test_child_env_prepends_the_repository_to_pythonpath(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/opt/wheels")
    env = pipeline().child_env(cuda=False)
    assert env["PYTHONPATH"].split(":") == [str(REPO), "/opt/wheels"] and env["DS_ACCELERATOR"] == "cpu"


def test_stage_summary_and_table(tmp_path):
    bench = pipeline()
    log = RunLogger(out_dir=tmp_path, total_steps=10, start_step=0, enabled=True, wandb_mode="off",
                    run_config={}, header="test")
    for step in range(1, 11):  # the first fifth (start-up) is left out of the medians
        log.step(step, {"loss": 5.0 - 0.3 * step, "lr_mult": 1.0, "grad_norm": 1.0, "step_s": 0.5,
                        "tokens_per_s": 100.0 if step > 2 else 1.0, "images_per_s": 8.0 * step, "mfu": 0.25,
                        "data_wait_frac": 0.1 if step > 2 else 0.9, "peak_mem_gib": float(step)})
    log.close()
    r = bench.stage_summary(tmp_path / "metrics.jsonl")
    assert r["steps"] == 10 and r["tokens_per_s"] == 100.0 and r["data_wait_frac"] == pytest.approx(0.1)
    assert r["images_per_s"] == pytest.approx(8.0 * 6.5) and r["peak_mem_gib"] == 10.0
    assert (r["loss_first"], r["loss_last"]) == pytest.approx((4.7, 2.0))
    vqa = {"per_type": {"colour": {"accuracy": 0.5, "chance": 1 / 6}}, "overall": {"accuracy": 0.4, "chance": 0.3}}
    text = bench.table({"vision_pretrain": {**r, "wall_s": 12.0}}, vqa)
    assert ("| vision_pretrain | 10 | 100 | 52 | 25.0% | 10.0 | 10% | 4.700 → 2.000 | 12 s | "
            "no reference run: not a valid figure |") in text
    assert "| accuracy | 50% | - | - | - | 40% |" in text
    json.dumps(r)  # a summary is plain data
    assert bench.losses(tmp_path / "metrics.jsonl") == pytest.approx([5.0 - 0.3 * s for s in range(1, 11)])


def test_a_stage_that_does_not_track_its_reference_prints_failed_in_place_of_its_numbers():
    bench = pipeline()
    learned = [5.0 - 0.3 * s for s in range(10)]
    row = {"steps": 10, "tokens_per_s": 100.0, "images_per_s": 50.0, "mfu": 0.25, "peak_mem_gib": 3.0,
           "data_wait_frac": 0.1, "loss_first": 5.0, "loss_last": 2.3, "wall_s": 12.0}
    vqa = {"per_type": {}, "overall": {"accuracy": 0.4, "chance": 0.3}}
    for timed, ok in ((learned, True), ([5.0] * 10, False), ([x + 0.5 for x in learned], False)):
        verdict = bench.check_learning(timed, learned)
        assert verdict.ok is ok
        text = bench.table({"sft": {**row, "learning": {"ok": verdict.ok, "message": verdict.message}}}, vqa)
        line = next(x for x in text.splitlines() if x.startswith("| sft |"))
        if ok:
            assert "| 100 | 50 | 25.0% | 3.0 | 10% |" in line and "passed: " in line
        else:
            assert line.count("FAILED") == 6 and "100" not in line.split("|")[3]


def test_the_reference_run_is_fp32_not_compiled_and_picks_its_own_kernel():
    flags = ["--stage", "sft", "--compile", "--attention", "cudnn", "--dtype", "bf16", "--steps", 5, "--attention=flex"]
    ref = pipeline().reference_flags(flags)
    assert ref == ["--stage", "sft", "--dtype", "bf16", "--steps", 5, "--dtype", "fp32", "--attention", "auto"]


@pytest.mark.parametrize("crashing", ["sft", "sft_reference", "eval"])
def test_a_run_that_crashes_keeps_the_rows_measured_before_it(tmp_path, monkeypatch, capsys, crashing):
    """sft crashing (as on the GPU at its first image-free batch), its fp32 reference crashing, or the eval
    crashing must not lose the rows already measured: the table keeps them, names the crash, and the bench
    exits non-zero."""
    bench = pipeline()
    monkeypatch.setattr(bench, "prepare_data", lambda out, *a: {
        "data": out / "data", "tokenizer": out / "tok", "tokens": out / "tokens", "sft_mix": out / "sft_mix"})

    def fake_sh(cmd, env, log):  # a run "runs" by writing the metrics a real run writes; one crashes
        cmd = [str(c) for c in cmd]
        is_eval = "launch/eval.py" in cmd
        run_dir = None if is_eval else Path(cmd[cmd.index("--out") + 1])
        name = "eval" if is_eval else run_dir.name
        if name == crashing:
            raise SystemExit(f"{cmd[0]} ... exited with 1 (log {log}):\n[rank0]: Traceback\n"
                             "[rank0]:     return self.o_proj(F.scaled_dot_product_attention(q, k, v))\n"
                             "[rank0]: AttributeError: 'NoneType' object has no attribute 'transpose'\n"
                             "[rank1]: RuntimeError: a later error on another rank")
        if is_eval:
            report = Path(cmd[cmd.index("--report-dir") + 1])
            report.mkdir(parents=True)
            (report / "eval.json").write_text(json.dumps({"vqa": {"per_type": {}, "overall": {
                "accuracy": 0.5, "chance": 0.3}}}))
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "metrics.jsonl").write_text("".join(
                json.dumps({"loss": 5.0 - 0.4 * s, "tokens_per_s": 100.0, "images_per_s": 0.0, "mfu": None,
                            "data_wait_frac": 0.0, "peak_mem_gib": None}) + "\n" for s in range(10)))

    monkeypatch.setattr(bench, "sh", fake_sh)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    with pytest.raises(SystemExit, match="CRASHED: sft|CRASHED: eval|FAILED learning check: sft"):
        bench.main(["--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert "| base | 10 | 100 |" in text and "| vision_pretrain | 10 | 100 |" in text and "passed: " in text
    assert ("held-out" in text) is (crashing == "sft_reference")  # accuracy only from a finished eval
    row = next(x for x in text.splitlines() if x.startswith("| sft |" if crashing != "eval" else "| eval |"))
    assert row.count("|") == 11
    cause = "AttributeError: 'NoneType' object has no attribute 'transpose'"
    if crashing == "sft_reference":  # the timed run's loss stays; no figure without its reference
        assert "FAILED" in row and "reference run crashed" in row and cause in row and "5.000 → 1.400" in row
    else:
        assert "CRASHED" in row and row.endswith(f"{cause} |") and "RuntimeError" not in row


def test_a_refused_flag_is_named_in_the_crash_cell():
    """A stage refused at its command line (a flag it does not know) is named by argparse's line."""
    cell = pipeline().crash_summary("python ... exited with 2 (log sft.log):\nusage: train.py [-h] ...\n"
                                    "train.py: error: unrecognized arguments: --no-such-flag 1")
    assert cell == "python ... exited with 2 (log sft.log): train.py: error: unrecognized arguments: --no-such-flag 1"
