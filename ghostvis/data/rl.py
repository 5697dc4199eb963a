"""Prompt batches for RL (`--stage rl`): what GRPO samples completions for and checks them against.

Reads conversation shards whose samples carry a reference `"answer"` (docs/architecture.md, "Data"), from
one directory or a `mixture.json` (the same mixing as sft). Each sample becomes

    prompt   the conversation up to its last user turn, rendered for completion
             (`Tokenizer.render_for_completion`: ends with <|assistant_start|>, images expanded)
    images   its images, preprocessed for the model's encoder ([3, S, S] each)
    answer   the reference answer, compared after `normalize_answer` (ghostvis/tasks/qa.py)
    type     the question type ("other" when the sample names none)

and a batch is `{"prompts": [[ids]], "images": [[tensor]], "answers": [str], "types": [str],
"num_tokens": int, "skipped": {cause: n}}` of `req.batch_size` prompts. The reference answer is the
sample's `answer` field, else its last assistant turn (`ghostvis.tasks.qa.reference_answer`). Samples that
can't be used are skipped and counted by cause ("no answer", "image missing", "prompt too long" = no room
to answer in `req.seq_len`, "unreadable"; logged as `skipped_<cause>` metrics); broken ones also count as
corrupt in their stream. A whole pass over the data without one usable prompt is a DataError naming the causes.

The state is the source's position after the last emitted batch, so resume is exact. In `eval_mode` (the
loop's validation) the builder returns the ordinary conversation batches of the val split instead: the
loop measures bits per byte of the reference replies there, a check that RL doesn't wreck the model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch

from ghostvis.data.manifest import DataError
from ghostvis.data.multimodal import (ConversationBatches, SampleSource, Unusable, conversation_batches,
                                      sample_source)
from ghostvis.data.request import DataRequest
from ghostvis.tasks.qa import Skips, parse_sample, qa_prompt
from ghostvis.tokenizer import Tokenizer


class PromptBatches:
    """Batches of RL prompts with their reference answers (see the module doc)."""

    def __init__(self, source: SampleSource, tokenizer: Tokenizer, *, batch_size: int, max_prompt_len: int,
                 num_vision_tokens: int, transform: Any, device: torch.device | str = "cpu",
                 image_frame: str = "none") -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.source, self.tok = source, tokenizer
        self.batch_size, self.max_prompt_len = batch_size, max_prompt_len
        self.n_vis, self.transform, self.image_frame = num_vision_tokens, transform, image_frame
        self.device = torch.device(device)
        self.skips = Skips()
        # a pass over every sample without a usable one means none will come
        self.num_samples = sum(s.manifest.num_samples for s in getattr(source, "sources", [source]))

    def _prompt(self, raw: dict[str, Any]) -> dict[str, Any] | None:
        """One sample as a prompt, or None (counted) when it can't be used."""
        try:
            sample = parse_sample(raw)
            if sample.images and self.transform is None:
                raise Unusable("a sample has images but the model has no vision tower")
            ids = qa_prompt(sample, self.tok, self.n_vis, self.max_prompt_len, self.image_frame)
        except Unusable as e:
            self.skips.add(e, self.source)
            return None
        except Exception:  # any other failure to decode one sample (even RecursionError) skips just it
            self.skips.add(Unusable(), self.source)
            return None
        return {"prompt": ids, "images": [self.transform(im).to(self.device) for im in sample.images],
                "answer": sample.answer, "type": sample.qtype}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        unused = 0  # samples in a row that gave no prompt
        for raw in self.source:
            row = self._prompt(raw)
            if row is None:
                unused += 1
                if unused >= self.num_samples:
                    skipped = self.skips.report(self.source)
                    raise DataError(f"--stage rl: none of {unused} samples in a row can be used ("
                                    + ", ".join(f"{n} {cause}" for cause, n in skipped.items())
                                    + "); a prompt needs an 'answer' field or a final assistant turn, its "
                                    "images, and room to answer within --seq-len")
                continue
            unused = 0
            rows.append(row)
            if len(rows) == self.batch_size:
                yield {"prompts": [r["prompt"] for r in rows], "images": [r["images"] for r in rows],
                       "answers": [r["answer"] for r in rows], "types": [r["type"] for r in rows],
                       "num_tokens": sum(len(r["prompt"]) for r in rows),
                       "skipped": self.skips.report(self.source)}
                rows = []

    def state_dict(self) -> dict[str, Any]:
        return {"source": self.source.state_dict(), "skips": dict(self.skips.causes), "marked": self.skips.marked}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state["source"])
        self.skips = Skips(Counter(state["skips"]), int(state["marked"]))


def prompt_batches(req: DataRequest) -> PromptBatches | ConversationBatches:
    """The rl data builder; see the module doc for eval_mode."""
    if req.eval_mode:
        return conversation_batches(req)
    return PromptBatches(sample_source(req, "conversation"), req.tokenizer, batch_size=req.batch_size,
                         max_prompt_len=req.seq_len, num_vision_tokens=req.num_vision_tokens,
                         transform=req.transform, device=req.device, image_frame=req.image_frame)
