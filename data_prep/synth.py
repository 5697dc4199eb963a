"""Generate the embedded default data (docs/datasets.md): shape scenes, their captions and questions,
a small text corpus and an arithmetic set for the calculator-tool RL task.

    python -m data_prep.synth --out data/synth            # defaults: the `make demo` sizes

Layout under --out (docs/datasets.md):
    captions/{train,val}/     image-text shards:   <key>.png + <key>.txt + <key>.json (the scene)
    capchat/{train,val}/      the same captions as chats ("describe the image."), for the SFT mixture
    vqa/{train,val,test}/     conversation shards: <key>.json {"messages", "answer", "type"} + <key>.0.png
    arith/{train,val,test}/   conversation shards: <key>.json (calculator-tool reference answer)
    text/corpus-*.jsonl       plain text, one {"text": ...} document per line

Every sample is a pure function of (seed, dataset, split, index), so output is byte-identical for a
seed, and splits are disjoint by construction (scenes and arithmetic problems are assigned to a split by
a hash of their content).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Callable

import webdataset as wds
from tqdm import tqdm

from ghostvis.cli import console_script
from ghostvis.data import scenes
from ghostvis.data.manifest import Manifest, ShardInfo, write_manifest
from ghostvis.data.scenes import chance_accuracy  # re-exported for the eval's "beside chance" line

__all__ = ["generate", "chance_accuracy", "main"]

IMAGE = "<|image|>"


@dataclass(frozen=True)
class Style:
    """How captions and training conversations are worded (docs/demo.md measures each choice)."""

    vqa_turns: int = 1  # questions per training conversation (scenes.conversation_qas); val/test keep one
    places: bool = False  # captions say where each object lies (scenes.place), not only the order


def caption_sample(seed: int, split: str, index: int, image_size: int, style: Style = Style()) -> dict:
    rng = scenes.scene_rng(seed, split, index, "captions")
    scene, _ = scenes.sample_split_scene(rng, split)
    return {
        "__key__": f"{split}-{index:07d}",
        "png": scenes.png_bytes(scenes.render(scene, image_size)),
        "txt": scenes.caption(scene, style.places).encode(),
        "json": json.dumps(scene.to_json()).encode(),
    }


def capchat_sample(seed: int, split: str, index: int, image_size: int, style: Style = Style()) -> dict:
    """A caption as a chat turn, for the SFT mixture (same scenes as captions/, in the chat format)."""
    sample = caption_sample(seed, split, index, image_size, style)
    record = {"messages": [{"role": "user", "content": f"{IMAGE}\ndescribe the image."},
                           {"role": "assistant", "content": sample["txt"].decode()}], "type": "caption"}
    return {"__key__": sample["__key__"], "json": json.dumps(record).encode(), "0.png": sample["png"]}


def vqa_sample(seed: int, split: str, index: int, image_size: int, style: Style = Style()) -> dict:
    """One scene and a question about it; on the train split with `style.vqa_turns` > 1, a conversation of up
    to that many questions whose answers no earlier turn gives away (scenes.conversation_qas). The record's
    `answer`/`type` are the last turn's, so eval and RL ask that one; val and test stay single-question."""
    # Question types take turns so every split is balanced across types.
    qtype = scenes.QUESTION_TYPES[index % len(scenes.QUESTION_TYPES)]
    rng = scenes.scene_rng(seed, split, index, "vqa")
    scene, qas = scenes.sample_split_scene(rng, split, qtype)
    qa = rng.choice([q for q in qas if q.type == qtype])
    multi = split == "train" and style.vqa_turns > 1
    chat = scenes.conversation_qas(scene, qa, rng, style.vqa_turns) if multi else [qa]
    messages: list[dict] = []
    for i, q in enumerate(chat):
        messages += [{"role": "user", "content": f"{IMAGE}\n{q.question}" if i == 0 else q.question},
                     {"role": "assistant", "content": q.answer}]
    record = {"messages": messages, "answer": chat[-1].answer, "type": chat[-1].type, "scene": scene.to_json()}
    return {
        "__key__": f"{split}-{index:07d}",
        "json": json.dumps(record).encode(),
        "0.png": scenes.png_bytes(scenes.render(scene, image_size)),
    }


ARITH_OPS: dict[str, Callable[[int, int], int]] = {"+": lambda a, b: a + b, "-": lambda a, b: a - b,
                                                    "*": lambda a, b: a * b}


def arith_problem(seed: int, split: str, index: int) -> tuple[int, str, int]:
    """a op b with a non-negative result; split chosen by a hash of the problem (10% test, 10% val)."""
    rng = scenes.scene_rng(seed, split, index, "arith")
    while True:
        op = rng.choice(list(ARITH_OPS))
        a, b = (rng.randint(2, 30), rng.randint(2, 30)) if op == "*" else (rng.randint(0, 999), rng.randint(0, 999))
        if op == "-" and b > a:
            a, b = b, a
        bucket = int(hashlib.sha256(f"{a}{op}{b}".encode()).hexdigest()[:8], 16) % 10
        if ("test" if bucket == 0 else "val" if bucket == 1 else "train") == split:
            return a, op, b


def arith_sample(seed: int, split: str, index: int, image_size: int, style: Style = Style()) -> dict:
    """The reference assistant turn calls the calculator (python/output parts); RL keeps only the prompt."""
    a, op, b = arith_problem(seed, split, index)
    expr, answer = f"{a} {op} {b}", str(ARITH_OPS[op](a, b))
    record = {
        "messages": [
            {"role": "user", "content": f"what is {expr}?"},
            {"role": "assistant", "content": [
                {"type": "python", "text": expr},
                {"type": "output", "text": answer},
                {"type": "text", "text": answer},
            ]},
        ],
        "answer": answer,
        "type": "arith",
    }
    return {"__key__": f"{split}-{index:07d}", "json": json.dumps(record).encode()}


def text_document(seed: int, index: int) -> str:
    """A paragraph the base stage can learn from: a scene described in the words the later stages use,
    its questions answered, a count and an arithmetic fact."""
    rng = scenes.scene_rng(seed, "train", index, "text")
    scene, qas = scenes.sample_split_scene(rng, "train")
    lines = [scenes.caption(scene)]
    lines += [f"the {o.name} is on the {'left' if o.x < 0.5 else 'right'}." for o in scenes.left_to_right(scene)]
    lines += [f"q: {qa.question} a: {qa.answer}" for qa in rng.sample(qas, min(3, len(qas)))]
    n = rng.randint(1, 8)
    lines.append("counting: " + " ".join(str(i) for i in range(1, n + 2)) + ".")
    a, op, b = arith_problem(seed, "train", index)
    lines.append(f"{a} {op} {b} = {ARITH_OPS[op](a, b)}")
    return "\n".join(lines)


SAMPLERS = {"captions": caption_sample, "capchat": capchat_sample, "vqa": vqa_sample, "arith": arith_sample}
KINDS = {"captions": "image-text", "capchat": "conversation", "vqa": "conversation", "arith": "conversation"}


def _make(job: tuple[str, int, str, int, int, Style]) -> dict:
    dataset, seed, split, index, image_size, style = job
    return SAMPLERS[dataset](seed, split, index, image_size, style)


def write_split(out: Path, dataset: str, split: str, n: int, *, seed: int, image_size: int,
                shard_size: int, pool: Pool | None, style: Style = Style()) -> Manifest:
    """Render `n` samples in order (in parallel when a pool is given) into `<split>-%06d.tar` shards."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{split}-*.tar"):
        old.unlink()  # a smaller re-run must not leave stale shards behind
    shards: list[ShardInfo] = []
    jobs = [(dataset, seed, split, i, image_size, style) for i in range(n)]
    samples = pool.imap(_make, jobs, chunksize=64) if pool else map(_make, jobs)
    # mtime/user fixed so the same seed gives byte-identical tars.
    writer = wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=shard_size, encoder=False, mtime=0,
                             user="ghostvis", group="ghostvis", verbose=0,
                             post=lambda fname: shards.append(ShardInfo(Path(fname).name, writer.count)))
    for sample in tqdm(samples, total=n, desc=f"{dataset}/{split}", leave=False):
        writer.write(sample)
    writer.close()
    manifest = Manifest(kind=KINDS[dataset], shards=shards,
                        extra={"source": "ghostvis synth", "seed": seed, "image_size": image_size})
    write_manifest(out, manifest)
    return manifest


def write_text(out: Path, num_docs: int, *, seed: int, docs_per_file: int = 5000) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("corpus-*.jsonl"):
        old.unlink()
    paths = []
    # jsonl, one document per line: the form data_prep/readers.py reads as separate documents
    # (a .txt file is one document), so the text stage packs many BOS-delimited documents.
    for f, start in enumerate(range(0, num_docs, docs_per_file)):
        docs = [text_document(seed, i) for i in range(start, min(num_docs, start + docs_per_file))]
        path = out / f"corpus-{f:03d}.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        paths.append(path)
    return paths


def generate(out: str | os.PathLike, *, seed: int = 0, image_size: int = 64, num_captions: int = 8000,
             num_vqa: int = 16000, num_val: int = 400, num_test: int = 800, num_arith: int = 4000,
             num_arith_test: int = 400, num_text_docs: int = 10000, shard_size: int = 1000,
             workers: int = 1, style: Style = Style()) -> dict[str, Manifest]:
    """Write every dataset under `out`; returns {"captions/train": manifest, ...}."""
    out = Path(out)
    plan = [("captions", "train", num_captions), ("captions", "val", num_val),
            ("capchat", "train", num_captions // 4), ("capchat", "val", num_val),
            ("vqa", "train", num_vqa), ("vqa", "val", num_val), ("vqa", "test", num_test),
            ("arith", "train", num_arith), ("arith", "val", num_arith_test), ("arith", "test", num_arith_test)]
    pool = Pool(workers) if workers > 1 else None
    try:
        written = {f"{d}/{s}": write_split(out / d / s, d, s, n, seed=seed, image_size=image_size,
                                           shard_size=shard_size, pool=pool, style=style)
                   for d, s, n in plan}
    finally:
        if pool:
            pool.close()
            pool.join()
    write_text(out / "text", num_text_docs, seed=seed)
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64, help="square image side in pixels (64 or 96 suit CPU)")
    p.add_argument("--num-captions", type=int, default=8000, help="caption training samples")
    p.add_argument("--num-vqa", type=int, default=16000, help="visual-QA training samples")
    p.add_argument("--vqa-turns", type=int, default=1,
                   help="questions per training conversation about one scene (val/test stay at one)")
    p.add_argument("--places", action="store_true", help="captions say where each object lies (\"at the top left\")")
    p.add_argument("--num-val", type=int, default=400, help="validation samples (captions and vqa)")
    p.add_argument("--num-test", type=int, default=800, help="held-out vqa test samples")
    p.add_argument("--num-arith", type=int, default=4000, help="arithmetic training problems")
    p.add_argument("--num-arith-test", type=int, default=400, help="arithmetic val and test problems (each)")
    p.add_argument("--num-text-docs", type=int, default=10000, help="text-corpus paragraphs")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    a = p.parse_args(argv)
    if a.vqa_turns < 1:
        p.error(f"--vqa-turns {a.vqa_turns}: give at least 1")
    if a.image_size < 16:
        p.error(f"--image-size {a.image_size} is too small to draw shapes; use 64 or 96")
    written = generate(a.out, seed=a.seed, image_size=a.image_size, num_captions=a.num_captions,
                       num_vqa=a.num_vqa, num_val=a.num_val, num_test=a.num_test, num_arith=a.num_arith,
                       num_arith_test=a.num_arith_test, num_text_docs=a.num_text_docs,
                       shard_size=a.shard_size, workers=a.workers,
                       style=Style(a.vqa_turns, a.places))
    for name, m in written.items():
        print(f"{name:16s} {m.kind:12s} {m.num_samples:7d} samples in {len(m.shards)} shards")
    print(f"text corpus      {a.out}/text")


cli = console_script(main)

if __name__ == "__main__":
    cli()
