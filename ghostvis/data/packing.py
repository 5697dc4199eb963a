"""Padding-free packing (`launch/train.py --pack`, docs/data.md "Packing"): several samples share one row.

The packer is first-fit in read order over a window of samples: each sample, in the order the (shuffled)
stream gives them, goes into the first row that still has room for its tokens and its images; a row holds at
most `capacity` tokens (--seq-len) and `max_images` images (--pack-images, 0 = no bound but the tokens). It is
not first-fit *decreasing*: taking samples longest first fills rows a little fuller but leaves the window's
shortest samples to rows of their own, and with one row a step such a step weighs a handful of answer tokens
(on the LLaVA-665K-like mix of bench/packing.py, rows of 2 to 66 samples and as few as 6 loss tokens; on CPU
the packed run validated 12% worse than the unpacked one, read order 0.2% better, and on an H100 packed runs
that had validated 70-203% worse validated at most 2% worse: BENCHMARKS.md, fourteenth session). A sample is
never split, so an image and its `<|image|>` span always stay in one row; a sample that can't fit an empty row
is an error (the batchers truncate text to --seq-len first, so in training that is a sample with more images
than --pack-images). Inside a row, samples keep their read order. The result is a pure function of the
window's lengths and image counts: re-reading the same window after a resume packs it the same way.

The model learns where samples start from `document_ids` [B, T] (0, 1, ... per row; the padding at a row's
end is one more document of its own): attention never crosses a document boundary and RoPE positions restart
at 0 in every document (ghostvis/model/attention.py, `documents` and `document_positions`). Targets never cross
a boundary either: a sample's last token predicts nothing, exactly as at the end of an unpacked row, so the
loss per counted token is the unpacked batch's.
"""

from __future__ import annotations

from collections.abc import Sequence

from ghostvis.cli import UserError

PACKABLE_KINDS = ("image-text", "conversation")  # the data kinds whose batchers pack (vision_pretrain, sft)
PACK_WINDOW_BATCHES = 8  # a window holds about this many batches' tokens: enough for full rows, short to re-read
PACK_HINT_STEPS = 10  # an unpacked run's first steps whose padding decides whether the log suggests --pack
PACK_HINT_PADDING = 0.5  # the mean padding fraction above which it does


class PackError(UserError, ValueError):
    """Packing asked of a stage that can't pack, or a sample that fits no row."""


def pack_refusal(stage_name: str, data_kind: str, pp: int, cp: int = 1) -> str | None:
    """Why `--pack` can't apply to this stage and layout, as a one-line error with the fix; None where it can."""
    if data_kind not in PACKABLE_KINDS:
        why = ("base already fills every row from one token stream (docs/data.md)" if data_kind == "text-tokens"
               else f"its {data_kind} data is generated per step")
        return (f"--pack: --stage {stage_name} can't pack ({why}); packing applies to vision_pretrain and sft: "
                "drop --pack")
    if pp > 1:
        return (f"--pack with --pp {pp}: the pipeline engine passes no document boundaries between stages; use "
                "--pp 1 (or drop --pack)")
    if cp > 1:
        return (f"--pack with --cp {cp}: context parallelism does not split packed rows' document masks yet; use "
                "--cp 1 (or drop --pack)")
    return None


def check_packing(stage_name: str, data_kind: str, pp: int, pack_images: int, cp: int = 1) -> None:
    """Refuse `--pack` where it can't apply, before anything is built."""
    if (why := pack_refusal(stage_name, data_kind, pp, cp)) is not None:
        raise PackError(why)
    if pack_images < 0:
        raise PackError(f"--pack-images {pack_images}: give the most images a packed row may hold (0 = no bound)")


def pack_rows(lengths: Sequence[int], images: Sequence[int], capacity: int, max_images: int = 0) -> list[list[int]]:
    """Sample indices per row (first-fit in read order; module docstring): every row's lengths sum to at most
    `capacity` and its images to at most `max_images` (0 = unbounded). Raises PackError for a sample that
    can't fit an empty row."""
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    for i, (n, m) in enumerate(zip(lengths, images)):
        if n > capacity:
            raise PackError(f"a sample of {n} tokens is longer than a packed row ({capacity} tokens, --seq-len); "
                            "raise --seq-len")
        if max_images and m > max_images:
            raise PackError(f"a sample with {m} images does not fit a packed row of at most {max_images} images; "
                            f"raise --pack-images to {m} or more (0 = no bound)")
    rows: list[list[int]] = []
    room: list[int] = []  # tokens left per row
    pics: list[int] = []  # images in each row
    for i, (n, m) in enumerate(zip(lengths, images)):
        for r in range(len(rows)):
            if room[r] >= n and (not max_images or pics[r] + m <= max_images):
                rows[r].append(i)
                room[r] -= n
                pics[r] += m
                break
        else:
            rows.append([i])
            room.append(capacity - n)
            pics.append(m)
    return rows


def pack_hint(paddings: Sequence[float]) -> str | None:
    """The run-log note that suggests --pack to an unpacked run of a stage that packs, given the padding fraction
    of its first steps' rows: None unless their mean is above PACK_HINT_PADDING."""
    mean = sum(paddings) / len(paddings)
    if mean <= PACK_HINT_PADDING:
        return None
    return (f"rows were {mean:.0%} padding over the first {len(paddings)} steps: --pack puts several samples in "
            "each row (its --micro-batch counts full rows: lower it to keep the real tokens a step). On a "
            "LLaVA-like mix that padded 66%, packed sft ran at 2.4-3.1x the tokens/s on an H100 (docs/data.md, "
            "Packing)")
