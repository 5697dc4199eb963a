"""Held-out visual QA: greedy answers from the inference engine, exact match against the reference.

Reads conversation shards; the task itself (prompt, reference answer, normalisation, scoring, the causes a
sample is skipped for) is ghostvis/tasks/qa.py, shared with RL. The reply is generated greedily (KV cache,
images spliced in) and scored there. Tool calls in the reply are not part of the answer: only its text
parts are.

`blank_images=True` swaps every image for a constant one of the same size (the embedded scenes'
background, i.e. the scene with every shape removed). Such an image carries no information, so a model
that really looks at the image falls to chance level there, and one that guesses from the question alone
does not change.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from ghostvis.data.multimodal import Unusable
from ghostvis.data.scenes import BACKGROUND, chance_accuracy
from ghostvis.data.shards import ShardStream
from ghostvis.infer.chat import reply_text
from ghostvis.infer.engine import Engine, evaluating
from ghostvis.tasks.qa import QASample, Skips, is_correct, normalize_answer, parse_sample, qa_prompt
from ghostvis.tokenizer import Tokenizer
from ghostvis.vision.transforms import image_transform



class WrongCheckpoint(ValueError):
    """The checkpoint can't run this evaluation (e.g. a text-only model asked about images)."""


def chance_of(qtype: str) -> float | None:
    """Accuracy of a uniform guess for the embedded question types; None for types with open answers."""
    try:
        return chance_accuracy(qtype)
    except ValueError:
        return None


def blank_like(image: Image.Image) -> Image.Image:
    """A constant image of the same size: the same for every sample, so it tells the model nothing."""
    return Image.new("RGB", image.size, BACKGROUND)


def aggregate(results: list[tuple[str, bool, str]]) -> dict[str, Any]:
    """(question type, correct, prediction) triples -> {"overall": {...}, "per_type": {type: {...}}}, each
    type's entry {"accuracy", "correct", "n", "chance", "top_answer"}. `top_answer` is the type's most given
    (normalised) prediction and its share: a model that gives one answer to every question of a type ("always
    left") sits near chance without looking, which accuracy alone does not show. Overall chance is the
    n-weighted mean of the per-type chances (None when any type has no chance level)."""
    per_type: dict[str, dict[str, Any]] = {}
    answers: dict[str, Counter[str]] = {}
    for qtype, ok, prediction in results:
        entry = per_type.setdefault(qtype, {"correct": 0, "n": 0, "chance": chance_of(qtype)})
        entry["correct"] += int(ok)
        entry["n"] += 1
        answers.setdefault(qtype, Counter())[normalize_answer(prediction)] += 1
    for qtype, entry in per_type.items():
        entry["accuracy"] = entry["correct"] / entry["n"]
        top, count = answers[qtype].most_common(1)[0]
        entry["top_answer"] = {"answer": top, "share": count / entry["n"]}
    n = len(results)
    chances = [e["chance"] for e in per_type.values()]
    overall_chance = (sum(e["chance"] * e["n"] for e in per_type.values()) / n
                      if n and None not in chances else None)
    correct = sum(e["correct"] for e in per_type.values())
    return {"overall": {"accuracy": correct / n if n else math.nan, "correct": correct, "n": n,
                        "chance": overall_chance},
            "per_type": dict(sorted(per_type.items()))}


def iter_samples(data_dir: str | Path, max_samples: int | None,
                 skips: Skips) -> tuple[ShardStream, Iterator[QASample]]:
    """The stream (for its corrupt counters) and its usable samples, in manifest order, at most max_samples;
    the others are counted in `skips`."""
    stream = ShardStream(data_dir, seed=0, loop=False, shuffle=False, expected_kind="conversation",
                         max_corrupt_fraction=0.05)

    def samples() -> Iterator[QASample]:
        taken = 0
        for raw in stream:
            if max_samples is not None and taken >= max_samples:
                return
            try:
                sample = parse_sample(raw)
            except Unusable as e:
                skips.add(e, stream)
                continue
            taken += 1
            yield sample

    return stream, samples()


def check_model(model: torch.nn.Module, needs_images: bool, where: str) -> None:
    if needs_images and getattr(model, "vision", None) is None:
        raise WrongCheckpoint(f"{where} has images but the checkpoint is a text-only model (no vision tower); "
                              "use a checkpoint from the vision_pretrain, sft or rl stage")


@torch.no_grad()
def evaluate_vqa(model: torch.nn.Module, tokenizer: Tokenizer, data_dir: str | Path, *,
                 max_samples: int | None = None, batch_size: int = 32, device: str | torch.device = "cpu",
                 blank_images: bool = False, max_new_tokens: int = 24, num_examples: int = 8,
                 progress: bool = True) -> dict[str, Any]:
    """Exact-match accuracy of greedy answers on the conversation shards in `data_dir` (one split).

    Returns `aggregate(...)` plus "skipped" ({cause: n} of the samples not used, see the module doc),
    "blank_images" and "examples" (the first `num_examples` {key, type, question, answer, prediction}).
    Single process: call it on rank 0 with the whole model (an export, or the module under ZeRO <= 2).
    """
    with evaluating(model):
        return _evaluate_vqa(model, tokenizer, data_dir, max_samples, batch_size, device, blank_images,
                             max_new_tokens, num_examples, progress)


# Samples read ahead and sorted by prompt length before batching: the engine batches only equal-length
# prompts (no padding), so sorting turns a batch of mixed questions into a few large groups.
WINDOW_BATCHES = 8


def _evaluate_vqa(model: torch.nn.Module, tokenizer: Tokenizer, data_dir: str | Path, max_samples: int | None,
                  batch_size: int, device: str | torch.device, blank_images: bool, max_new_tokens: int,
                  num_examples: int, progress: bool) -> dict[str, Any]:
    engine = Engine(model, tokenizer, device)
    transform = image_transform(model.vision_config) if engine.vision is not None else None
    skips = Skips()
    stream, samples = iter_samples(data_dir, max_samples, skips)
    results: list[tuple[str, bool, str]] = []
    examples: list[dict[str, str]] = []
    total = stream.manifest.num_samples if max_samples is None else min(max_samples, stream.manifest.num_samples)
    bar = tqdm(total=total, desc=f"vqa{' (blanked)' if blank_images else ''}", leave=False,
               disable=not progress)

    def run(window: list[tuple[list[int], QASample]]) -> None:
        window.sort(key=lambda item: len(item[0]))
        for start in range(0, len(window), batch_size):
            batch = window[start:start + batch_size]
            images = [[transform(blank_like(im) if blank_images else im) for im in s.images] for _, s in batch]
            completions = engine.complete([ids for ids, _ in batch], images, max_new_tokens=max_new_tokens,
                                          temperature=0.0)
            for (_, s), c in zip(batch, completions):
                prediction = reply_text(engine, c.tokens)
                results.append((s.qtype, is_correct(prediction, s.answer), prediction))
                if len(examples) < num_examples:
                    examples.append({"key": s.key, "type": s.qtype, "question": s.question, "answer": s.answer,
                                     "prediction": prediction})
            bar.update(len(batch))

    window: list[tuple[list[int], QASample]] = []
    for sample in samples:
        check_model(model, bool(sample.images), f"{data_dir} sample {sample.key}")
        try:
            ids = qa_prompt(sample, tokenizer, engine.num_vision_tokens, engine.max_seq_len, engine.image_frame)
        except Unusable as e:
            skips.add(e)  # a prompt problem, not a damaged sample: not counted as corrupt
            bar.update(1)
            continue
        window.append((ids, sample))
        if len(window) == batch_size * WINDOW_BATCHES:
            run(window)
            window = []
    run(window)
    bar.close()
    skipped = skips.report(stream)
    if not results:
        raise ValueError(f"{data_dir}: no usable question/answer samples ("
                         + ", ".join(f"{n} {cause}" for cause, n in skipped.items())
                         + f"; the context is {engine.max_seq_len} tokens). A sample needs an 'answer' field or "
                         "a final assistant turn, and its images")
    return {**aggregate(results), "skipped": skipped, "blank_images": blank_images,
            "examples": examples}
