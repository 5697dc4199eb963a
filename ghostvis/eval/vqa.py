"""Held-out visual QA: greedy answers from the inference engine, exact match against the reference.

Reads conversation shards (`"type"` names the question type; samples without one count under "other"):
the prompt is the conversation up to the final assistant turn, the reply is generated greedily (KV cache,
images spliced in) and compared with the reference after `normalize_answer`. The reference is the sample's
`"answer"` field, or else the text of its last assistant turn (so any user conversation, e.g. one from
LLaVA JSON, can be evaluated). Samples that can't be used are counted by cause: "no answer", "image
missing", "prompt too long", "unreadable". Tool calls in the reply are not part of the answer: only its text parts are.

`blank_images=True` swaps every image for a constant one of the same size (the embedded scenes'
background, i.e. the scene with every shape removed). Such an image carries no information, so a model
that really looks at the image falls to chance level there, and one that guesses from the question alone
does not change.
"""

from __future__ import annotations

import math
import string
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from ghostvis.data.multimodal import ImageMissing, Unusable, read_conversation
from ghostvis.data.scenes import BACKGROUND, chance_accuracy
from ghostvis.data.shards import ShardStream
from ghostvis.infer.chat import ReplyStream
from ghostvis.infer.engine import Engine
from ghostvis.tokenizer import IMAGE_PLACEHOLDER, Tokenizer
from ghostvis.vision.transforms import BadImage, image_transform, load_image

OTHER = "other"  # the question type of samples that name none
_PUNCTUATION = str.maketrans("", "", string.punctuation)


class WrongCheckpoint(ValueError):
    """The checkpoint can't run this evaluation (e.g. a text-only model asked about images)."""


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation removed, whitespace collapsed: "  The Red. " -> "the red"."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def is_correct(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def chance_of(qtype: str) -> float | None:
    """Accuracy of a uniform guess for the embedded question types; None for types with open answers."""
    try:
        return chance_accuracy(qtype)
    except ValueError:
        return None


@dataclass
class QASample:
    key: str
    record: dict[str, Any]  # the stored conversation JSON
    images: list[Image.Image]

    @property
    def answer(self) -> str:
        return reference_answer(self.record)  # parse_sample checked that there is one

    @property
    def qtype(self) -> str:
        return str(self.record.get("type") or OTHER)

    @property
    def question(self) -> str:
        """The last user turn's text (image placeholders dropped), for the report's examples."""
        content = next((m.get("content") for m in reversed(self.record["messages"]) if m.get("role") == "user"), "")
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        return " ".join(str(content).replace(IMAGE_PLACEHOLDER, " ").split())


class PromptTooLong(Unusable):
    """A prompt that leaves no room for the answer in the context."""

    cause = "prompt too long"


class NoAnswer(Unusable):
    """Neither an `answer` field nor a final assistant turn: nothing to compare a reply with."""

    cause = "no answer"


def reference_answer(record: dict[str, Any]) -> str | None:
    """The `answer` field, else the text of the conversation's last turn when the assistant speaks it."""
    if "answer" in record:
        return str(record["answer"])
    messages = record.get("messages") or []
    last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
    if last.get("role") != "assistant":
        return None
    content = last.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content.strip() if isinstance(content, str) and content.strip() else None


def parse_sample(sample: dict[str, Any]) -> QASample:
    """A raw shard sample -> QASample; raises Unusable (the caller counts it by its `cause`) when it can't
    be used."""
    record, image_keys = read_conversation(sample)
    if reference_answer(record) is None:
        raise NoAnswer("no 'answer' field and no final assistant turn")
    try:
        images = [load_image(sample[k]) for k in image_keys]
    except BadImage as e:
        raise ImageMissing(e.reason) from e
    return QASample(str(sample["__key__"]), record, images)


SKIP_CAUSES = (NoAnswer.cause, ImageMissing.cause, PromptTooLong.cause, Unusable.cause)


@dataclass
class Skips:
    """Samples not used, by cause. A broken sample (not merely lacking an answer or too long for the
    context) also counts as corrupt in its stream, against the stream's corrupt-fraction limit."""

    causes: Counter = field(default_factory=Counter)
    marked: int = 0  # how many of them were marked corrupt in the stream

    def add(self, error: Unusable, stream: ShardStream | None = None) -> None:
        """Count `error`'s sample; with the stream that yielded it, a broken one is marked corrupt there."""
        self.causes[error.cause] += 1
        if stream is not None and not isinstance(error, (NoAnswer, PromptTooLong)):
            stream.mark_corrupt(error.cause)
            self.marked += 1

    def report(self, stream: Any) -> dict[str, int]:
        """{cause: n}; "unreadable" adds what the tar reader itself couldn't read."""
        report = Counter(self.causes)
        report["unreadable"] += stream.stats["corrupt"] - self.marked
        return {cause: n for cause, n in sorted(report.items()) if n}


def qa_prompt(sample: QASample, tokenizer: Tokenizer, num_vision_tokens: int, max_len: int) -> list[int]:
    """Ids that prime the model for the sample's answer: the conversation up to its last user turn, images
    expanded, then <|assistant_start|> (`Tokenizer.render_for_completion`). Raises Unusable when it can't
    be rendered and PromptTooLong when it is `max_len` tokens or more (no room left to answer)."""
    try:
        ids = tokenizer.render_for_completion(sample.record, num_vision_tokens)
    except (ValueError, TypeError, KeyError) as e:
        raise Unusable(f"sample {sample.key}: conversation not renderable: {e}") from e
    if len(ids) >= max_len:
        raise PromptTooLong(f"sample {sample.key}: {len(ids)} prompt tokens leave no room in {max_len}")
    return ids


def blank_like(image: Image.Image) -> Image.Image:
    """A constant image of the same size: the same for every sample, so it tells the model nothing."""
    return Image.new("RGB", image.size, BACKGROUND)


def aggregate(results: list[tuple[str, bool]]) -> dict[str, Any]:
    """(question type, correct) pairs -> {"overall": {...}, "per_type": {type: {...}}}, each entry
    {"accuracy", "correct", "n", "chance"}. Overall chance is the n-weighted mean of the per-type
    chances (None when any type has no chance level)."""
    per_type: dict[str, dict[str, Any]] = {}
    for qtype, ok in results:
        entry = per_type.setdefault(qtype, {"correct": 0, "n": 0, "chance": chance_of(qtype)})
        entry["correct"] += int(ok)
        entry["n"] += 1
    for entry in per_type.values():
        entry["accuracy"] = entry["correct"] / entry["n"]
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


def reply_text(engine: Engine, tokens: list[int]) -> str:
    """The text parts of a generated reply (tool calls and their outputs left out)."""
    stream = ReplyStream(engine)
    for token in tokens:
        stream.feed(token)
    return "".join(p["text"] for p in stream.finish()["content"] if p["type"] == "text")


def check_model(model: torch.nn.Module, needs_images: bool, where: str) -> None:
    if needs_images and getattr(model, "vision", None) is None:
        raise WrongCheckpoint(f"{where} has images but the checkpoint is a text-only model (no vision tower); "
                              "use a checkpoint from the vision_pretrain, sft or rl stage")


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the duration; a model called from the training loop goes back to training."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


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
    results: list[tuple[str, bool]] = []
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
                results.append((s.qtype, is_correct(prediction, s.answer)))
                if len(examples) < num_examples:
                    examples.append({"key": s.key, "type": s.qtype, "question": s.question, "answer": s.answer,
                                     "prediction": prediction})
            bar.update(len(batch))

    window: list[tuple[list[int], QASample]] = []
    for sample in samples:
        check_model(model, bool(sample.images), f"{data_dir} sample {sample.key}")
        try:
            ids = qa_prompt(sample, tokenizer, engine.num_vision_tokens, engine.max_seq_len)
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
