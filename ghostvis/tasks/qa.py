"""The visual question-answering task, in one place for everything that uses it: the data builders of RL
(ghostvis/data/rl.py), GRPO's reward (ghostvis/train/grpo.py) and held-out evaluation (ghostvis/eval/vqa.py).

A sample is a conversation shard record (`"type"` names the question type; samples without one count
under "other"). Its prompt is the conversation up to the final user turn, rendered for completion; its
reference answer is the `"answer"` field, or else the text of its last assistant turn (so any user
conversation, e.g. one from LLaVA JSON, can be used). A reply is right when it equals the reference after
`normalize_answer`; the reward is 1.0 for a right reply, else 0.0. Samples that can't be used are counted
by cause: "no answer", "image missing", "prompt too long", "unreadable".
"""

from __future__ import annotations

import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ghostvis.data.multimodal import ImageMissing, Unusable, read_conversation
from ghostvis.data.shards import ShardStream
from ghostvis.tokenizer import IMAGE_PLACEHOLDER, Tokenizer
from ghostvis.vision.transforms import BadImage, load_image

OTHER = "other"  # the question type of samples that name none
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation removed, whitespace collapsed: "  The Red. " -> "the red"."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def is_correct(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def reward(reply: str, answer: str) -> float:
    """GRPO's verifiable reward of one reply: 1.0 when it is correct, else 0.0."""
    return float(is_correct(reply, answer))


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


def qa_prompt(sample: QASample, tokenizer: Tokenizer, num_vision_tokens: int, max_len: int,
              image_frame: str = "none") -> list[int]:
    """Ids that prime the model for the sample's answer: the conversation up to its last user turn, images
    expanded (in `image_frame`), then <|assistant_start|> (`Tokenizer.render_for_completion`). Raises Unusable
    when it can't be rendered and PromptTooLong when it is `max_len` tokens or more (no room left to answer)."""
    try:
        ids = tokenizer.render_for_completion(sample.record, num_vision_tokens, image_frame)
    except (ValueError, TypeError, KeyError) as e:
        raise Unusable(f"sample {sample.key}: conversation not renderable: {e}") from e
    if len(ids) >= max_len:
        raise PromptTooLong(f"sample {sample.key}: {len(ids)} prompt tokens leave no room in {max_len}")
    return ids
