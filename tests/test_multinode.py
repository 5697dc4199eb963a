"""Two "nodes" on localhost: the DeepSpeed launcher in its no-ssh mode, started once per node with
--node_rank 0/1 (as a cluster scheduler would on each machine), runs launch/train.py as one 2-rank job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, free_port, tiny_corpus

from data_prep import text_shards
from ghostvis.train import checkpoint

DEEPSPEED = Path(sys.executable).with_name("deepspeed")


@pytest.mark.slow
def test_two_nodes_without_ssh_train_one_job(tmp_path, tiny_tokenizer_dir):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in tiny_corpus(200, seed=2)))
    text_shards.main(["--input", str(corpus), "--tokenizer", str(tiny_tokenizer_dir), "--out", str(tmp_path / "data"),
                      "--docs-per-shard", "50", "--val-docs", "20", "--workers", "1"])
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")  # names are not resolved in no-ssh mode
    out = tmp_path / "run"  # one directory both "nodes" write to: the shared filesystem of a real cluster
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    port = str(free_port())
    train = [str(REPO / "launch" / "train.py"), "--stage", "base", "--model", "tiny", "--data", str(tmp_path / "data"),
             "--tokenizer", str(tiny_tokenizer_dir), "--out", str(out), "--ds_config", str(REPO / "ds_configs" / "zero2.json"),
             "--micro-batch", "2", "--seq-len", "32", "--steps", "2", "--save-every", "2", "--eval-every", "0", "--lr", "1e-3"]

    def node(rank: int) -> subprocess.Popen:
        cmd = [str(DEEPSPEED), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
               "--master_addr", "127.0.0.1", "--master_port", port, *train]
        with open(tmp_path / f"node{rank}.log", "w") as log:  # its own process group: launcher, agent and rank
            return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    nodes = [node(0), node(1)]
    deadline = time.monotonic() + 150
    try:  # a node whose peer failed would wait at the rendezvous: stop waiting at the first failure
        while any(p.poll() is None for p in nodes) and all(p.poll() in (None, 0) for p in nodes):
            assert time.monotonic() < deadline, "the two nodes did not finish within 150 s"
            time.sleep(0.5)
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    for rank, p in enumerate(nodes):
        log = (tmp_path / f"node{rank}.log").read_text()
        assert p.returncode == 0, f"node {rank} exited with {p.returncode}:\n{log[-6000:]}"
        assert "nnodes=2" in log and f"node_rank={rank}" in log

    assert "stage `base`, 2 rank(s)" in (out / "run_log.md").read_text()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    step = out / "ckpt" / checkpoint.read_latest(out)
    states = [json.loads((step / f"client_state_rank{r}.json").read_text()) for r in (0, 1)]
    assert [(s["rank"], s["world_size"], s["step"]) for s in states] == [(0, 2, 2), (1, 2, 2)]
    assert (out / "llm.safetensors").is_file()


def test_hostfile_example_parses_with_deepspeed():
    from deepspeed.launcher.runner import fetch_hostfile

    hosts = fetch_hostfile(str(REPO / "launch" / "hostfile.example"))
    assert hosts and all(slots == 8 for slots in hosts.values()) and len(hosts) == 2
