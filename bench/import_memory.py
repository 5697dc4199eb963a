"""Peak host memory of launch/import_hf.py against the size of the model it imports.

    python bench/import_memory.py --preset qwen25_7b --append   # a Qwen2.5-7B-shaped checkpoint (~15 GB bf16)
    python bench/import_memory.py --preset qwen25_1.5b --layers 4 # a small check of the same path

Writes a random Hugging Face Qwen2 checkpoint of the preset's shape (bf16, 4 GB shards with
model.safetensors.index.json, each tensor written as it is drawn, so building it never holds the model), a
byte-level BPE tokenizer.json of the preset's vocabulary, then runs `launch/import_hf.py --hf-dir` on it in a
fresh process and reports that process's peak resident memory (VmHWM: anonymous memory and any file pages it
maps) divided by the checkpoint's bytes. Target: <= 1.2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline import REPO, append_to_benchmarks, child_env

sys.path.insert(0, str(REPO))
from ghostvis.config import get_preset  # noqa: E402
from ghostvis.files import write_safetensors  # noqa: E402
from ghostvis.interop.hf_llm import hf_names  # noqa: E402

SHARD_BYTES = 4 << 30  # transformers' default max_shard_size is about this
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_BASE_VOCAB = 151643  # Qwen2.5's tokenizer, before its added specials; the embedding has 152064 rows


def write_tokenizer(path: Path, base_vocab: int) -> None:
    """A byte-level BPE tokenizer.json of exactly `base_vocab` tokens: the 256 byte symbols, then merges of
    ever longer strings (their content does not matter to an import)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    frontier = list(alphabet)
    while len(vocab) < base_vocab - len(SPECIALS):
        grown = []
        for left in frontier:
            for right in alphabet:
                if len(vocab) >= base_vocab - len(SPECIALS):
                    break
                token = left + right
                if token not in vocab:
                    vocab[token] = len(vocab)
                    merges.append((left, right))
                    grown.append(token)
        frontier = grown
    raw = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens(SPECIALS)
    raw.save(str(path))


def write_checkpoint(d: Path, preset: str, layers: int | None) -> int:
    """A random HF Qwen2 folder of the preset's shape in `d`; returns the weights' bytes."""
    from ghostvis.model.gpt import GPT

    cfg = get_preset(preset)[0]
    if layers is not None:
        cfg = dataclasses.replace(cfg, n_layer=layers)
    rows = cfg.padded_vocab_size  # Qwen's embedding rows (152064 for 7B, 151936 for the smaller ones)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    names = hf_names(cfg)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for ours, theirs in names.items():
        nbytes = 2 * torch.Size(shapes[ours]).numel()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((theirs, shapes[ours]))
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(d / file, [(n, torch.bfloat16, s) for n, s in shard],
                          (torch.randn(s).mul_(0.02).to(torch.bfloat16) for _, s in shard), metadata={"format": "pt"})
        weight_map.update({n: file for n, _ in shard})
        total += sum(2 * torch.Size(s).numel() for _, s in shard)
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                "weight_map": weight_map}))
    hf = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": rows,
          "hidden_size": cfg.n_embd, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layer,
          "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "hidden_act": "silu",
          "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
          "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "bfloat16", "use_sliding_window": False}
    (d / "config.json").write_text(json.dumps(hf, indent=1))
    write_tokenizer(d / "tokenizer.json", min(QWEN_BASE_VOCAB, rows - len(SPECIALS)))
    return total


# the script run in the measured process, which then prints its own peak: VmHWM, as bench/init_memory.py's
# `peak_rss` reads it (not imported here: the measured checkout's ghostvis must be the one on sys.path)
_MEASURED = """
import re, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("VmHWM=" + re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1), flush=True)
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen25_7b", help="a Qwen2.5-shaped preset of ghostvis/config.py")
    p.add_argument("--layers", type=int, default=None, help="fewer decoder layers (a smaller check)")
    p.add_argument("--dir", default=None, help="where to write the checkpoint and the import (default: a temp dir)")
    p.add_argument("--repo", default=str(REPO), help="the checkout whose launch/import_hf.py runs (compare versions)")
    p.add_argument("--append", action="store_true", help="append the result to BENCHMARKS.md")
    p.add_argument("--keep", default=None, metavar="DIR",
                   help="write the checkpoint to DIR/hf and the import to DIR/imported (a new directory) and keep "
                        "them, e.g. to train from the import with launch/train.py --init-from DIR/imported")
    args = p.parse_args(argv)
    if args.keep and args.dir:
        p.error("--keep DIR writes into DIR; --dir (a temporary directory's parent) does not apply: give one")
    if args.keep and Path(args.keep).exists():
        p.error(f"--keep {args.keep} exists: give a new directory")
    keep = Path(args.keep).resolve() if args.keep else None  # the import runs with the repository as its cwd
    with (contextlib.nullcontext(keep) if keep else tempfile.TemporaryDirectory(dir=args.dir)) as tmp:
        hf_dir, out = Path(tmp) / "hf", Path(tmp) / "imported"
        hf_dir.mkdir(parents=True)
        t0 = time.time()
        model_bytes = write_checkpoint(hf_dir, args.preset, args.layers)
        print(f"wrote {model_bytes / 2**30:.2f} GiB of random bf16 weights in {time.time() - t0:.0f} s", flush=True)
        env = child_env(cuda=False)
        env["PYTHONPATH"] = str(args.repo)
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-c", _MEASURED, str(Path(args.repo) / "launch" / "import_hf.py"),
                               "--hf-dir", str(hf_dir), "--out", str(out)], cwd=args.repo, env=env,
                              capture_output=True, text=True)
        seconds = time.time() - t0
        if proc.returncode:
            raise SystemExit(f"import_hf.py exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
        peak = int(proc.stdout.split("VmHWM=")[-1]) * 1024  # /proc reports kB (KiB)
        out_bytes = (out / "llm.safetensors").stat().st_size
    shape = f"{args.preset}" + (f" with {args.layers} layers" if args.layers else "")
    text = (f"| model | checkpoint | import peak RSS | peak / model | import time |\n|---|---|---|---|---|\n"
            f"| {shape} | {model_bytes / 2**30:.2f} GiB (llm.safetensors {out_bytes / 2**30:.2f} GiB) | "
            f"{peak / 2**30:.2f} GiB | {peak / model_bytes:.2f} (target <= 1.2) | {seconds:.0f} s |")
    print(text)
    if args.append:
        append_to_benchmarks("import_memory", argv, text)


if __name__ == "__main__":
    main()
