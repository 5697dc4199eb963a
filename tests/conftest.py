"""Shared fixtures and helpers: a tiny real tokenizer (trained by rustbpe) and a byte tokenizer, tiny
models and checkpoints, text shards, a one-rank process group, shard writing and the trainer's CLI in
this process. Heavy imports (torch models, DeepSpeed, the trainer) happen inside the helpers that need them."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from ghostvis.tokenizer import ALL_SPECIAL_TOKENS, Tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parent.parent
TINY_VOCAB_SIZE = 512

_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A red circle is to the left of a blue square.",
    "How many triangles are in the picture? There are 3 triangles.",
    "What colour is the shape at the top? It is green.",
    "Vision-language models read images and text together.",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "Question: what is 12 + 30? Answer: 42",
    "The model learns to look before it speaks.",
    "Es gibt zwei gelbe Kreise und ein rotes Dreieck.",
    "Il y a un carré bleu en bas à droite.",
    "天空是蓝色的，草是绿色的。",
]


def tiny_corpus(n_docs: int = 400, seed: int = 0) -> list[str]:
    """A fixed small corpus (same on every machine): shuffled sentences plus numbers."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        k = rng.randint(2, 6)
        body = " ".join(rng.choice(_SENTENCES) for _ in range(k))
        docs.append(f"{body} {rng.randint(0, 10**6)}\n")
    return docs


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding a saved tiny tokenizer (vocab 512, all GhostVis special tokens)."""
    d = tmp_path_factory.mktemp("tiny_tokenizer")
    train_tokenizer(tiny_corpus(), TINY_VOCAB_SIZE).save(d)
    return d


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir: Path) -> Tokenizer:
    """The tiny tokenizer, loaded from ``tiny_tokenizer_dir`` (so save/load is exercised too)."""
    return Tokenizer.load(tiny_tokenizer_dir)


# ---- a byte tokenizer and tiny random models ---------------------------------------------------------

def byte_tokenizer() -> Tokenizer:
    """A real tokenizer with no merges: ids 0-255 are bytes, then the specials."""
    ranks = {bytes([i]): i for i in range(256)}
    return Tokenizer(ranks, r"\S+|\s+", {s: 256 + i for i, s in enumerate(ALL_SPECIAL_TOKENS)})


TOK = byte_tokenizer()


def tiny_gpt(seed: int = 0, **overrides: Any) -> Any:
    import torch

    from ghostvis.config import get_preset
    from ghostvis.model.gpt import GPT

    torch.manual_seed(seed)
    cfg, _ = get_preset("tiny", vocab_size=TOK.vocab_size, **overrides)
    return GPT(cfg).eval()


def tiny_vlm(seed: int = 0) -> Any:
    import torch

    from ghostvis.config import get_preset
    from ghostvis.model.vlm import VLM

    torch.manual_seed(seed)
    cfg, vcfg = get_preset("vlm_tiny", vocab_size=TOK.vocab_size, image_token_id=TOK.image_token_id)
    return VLM(cfg, vcfg).eval()


def tiny_checkpoint(out_dir: str | Path, vision: bool = True) -> str:
    """An exported checkpoint directory of a tiny random model, as training writes it."""
    from ghostvis.checkpoint_io import export

    export(tiny_vlm() if vision else tiny_gpt(), out_dir, tokenizer=TOK)
    return str(out_dir)


@pytest.fixture(scope="session")
def tiny_vlm_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One exported tiny VLM checkpoint for the whole session (an export costs a DeepSpeed import)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny_vlm_ckpt"))


def bigram_gpt(chain: list[int]) -> Any:
    """A GPT whose weights make it a bigram model following `chain` (each token predicts the next):
    zeroed residual branches leave the embedding as the final hidden state, so one-hot embeddings and
    a matching head pick the successor."""
    import torch

    model = tiny_gpt(seed=4)
    sd = model.state_dict()
    with torch.no_grad():
        for name, tensor in sd.items():
            if name.endswith(("attn.o_proj.weight", "mlp.down_proj.weight")):
                tensor.zero_()
        sd["lm_head.weight"].zero_()
        for i, (cur, nxt) in enumerate(zip(chain, chain[1:])):
            sd["wte.weight"][cur] = torch.nn.functional.one_hot(torch.tensor(i), model.config.n_embd).float()
            sd["lm_head.weight"][nxt, i] = 10.0
    return model


# ---- data ----------------------------------------------------------------------------------------------

def write_shards(d: Path, kind: str, samples: list[dict], per_shard: int = 4) -> Path:
    """Raw samples as webdataset tars with a manifest of `kind`, `per_shard` samples a shard."""
    import webdataset as wds

    from ghostvis.data.manifest import Manifest, ShardInfo, write_manifest

    d.mkdir(parents=True)
    shards = []
    for i in range(0, len(samples), per_shard):
        name = f"data-{i // per_shard:06d}.tar"
        with wds.TarWriter(str(d / name), encoder=False) as w:
            for s in samples[i: i + per_shard]:
                w.write(s)
        shards.append(ShardInfo(name, len(samples[i: i + per_shard])))
    write_manifest(d, Manifest(kind=kind, shards=shards))
    return d


@pytest.fixture(scope="module")
def text_data(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """train/ and val/ text-tokens shards of the tiny corpus, made by data_prep/text_shards.py."""
    from data_prep import text_shards

    root = tmp_path_factory.mktemp("text")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in tiny_corpus(1500, seed=1)))
    text_shards.main(["--input", str(corpus), "--tokenizer", str(tiny_tokenizer_dir), "--out", str(root / "data"),
                      "--docs-per-shard", "150", "--val-docs", "100", "--workers", "1"])
    return root / "data"


# ---- training ------------------------------------------------------------------------------------------

TRAIN = REPO / "launch" / "train.py"


@pytest.fixture(scope="module")
def world1():
    """A real one-rank process group (gloo) in this process, for in-process DeepSpeed engines."""
    import deepspeed

    from ghostvis.train import engine as ds_engine

    saved = dict(os.environ)
    os.environ["DS_ACCELERATOR"] = "cpu"
    yield ds_engine.init_distributed()
    deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached groups: a later world can start
    os.environ.clear()
    os.environ.update(saved)


def train_args(data: Path, tok: Path, out: Path, ds_config: str, *extra: str) -> list[str]:
    """launch/train.py flags of a short tiny-model run on `data` (for run_ranks)."""
    return ["--model", "tiny", "--data", data, "--tokenizer", tok, "--out", out, "--ds_config",
            REPO / "ds_configs" / ds_config, "--micro-batch", "4", "--seq-len", "64", "--lr", "3e-3",
            "--warmup", "2", "--eval-every", "0", *extra]


def losses(out: Path) -> list[float]:
    """The training losses a run wrote to metrics.jsonl, in step order."""
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@functools.cache
def train_cli() -> ModuleType:
    """launch/train.py as a module (it is a script, not part of the package); loaded once, on first use."""
    spec = importlib.util.spec_from_file_location("ghostvis_train_cli", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_module(name: str) -> ModuleType:
    """bench/NAME.py as a module; bench/ is on sys.path while it loads, since the scripts import their neighbours
    (learning, pipeline) as top-level modules."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "bench"))
    return module


def parse(*argv: Any) -> Any:
    """launch/train.py's parsed arguments for `argv` (paths may be Path objects)."""
    return train_cli().build_parser().parse_args([str(a) for a in argv])


def run_stage(*argv: Any) -> list[dict]:
    """launch/train.py's run in this process; returns the run's metrics.jsonl records."""
    from ghostvis.train import loop

    args = parse(*argv, "--ds_config", REPO / "ds_configs" / "zero2.json", "--eval-every", "0",
                 "--save-every", "0", "--warmup", "2", "--schedule", "constant")
    loop.run(args)
    return [json.loads(line) for line in (Path(args.out) / "metrics.jsonl").read_text().splitlines()]


# ---- several ranks on CPU (torchrun + DeepSpeed's CPU accelerator + gloo), as CI can ----
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env() -> dict[str, str]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # never inherit a world
        env.pop(var, None)
    return env


def run_one(script: str | Path, args: list[Any], timeout: float = 300) -> subprocess.CompletedProcess:
    """`python script args...` as one fresh process from the repo root (no inherited process group);
    the caller checks the exit code and output."""
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=REPO, env=_child_env(),
                          capture_output=True, text=True, timeout=timeout)


def run_ranks(script: str | Path, args: list[str], nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node nproc script args...` from the repo root; raises with the output on failure."""
    env = _child_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited with {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-8000:]}")
    return proc


# ---- the server (launch/serve.py) in a subprocess ------------------------------------------------------

class ServerProcess:
    """launch/serve.py running on a free port; `base` is its URL."""

    def __init__(self, script: str, ckpt: str, *flags: str) -> None:
        import urllib.request

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "launch" / script), "--ckpt", ckpt, "--port", str(self.port), *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        deadline = time.monotonic() + 120  # readiness wait for the model to load, not a timing assertion
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"{script} exited early:\n{self.proc.stdout.read()}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"{script} did not answer /health:\n{self.proc.stdout.read()}")
            time.sleep(0.3)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
