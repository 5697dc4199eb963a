"""Batches for the multimodal stages: captions (vision_pretrain) and conversations (sft, eval).

Both batchers read raw samples from a sample source (a `ShardStream`, or a `MixtureBatches` of them) and
yield dict batches:

    input_ids     [B, T] long   right-padded with <|pad|> to the longest row (T <= max_len)
    targets       [B, T] long   targets[b, t] = input_ids[b, t + 1] where that token carries loss, else -1
    pixel_values  [N, 3, H, W]  uint8, every image of the batch in order of appearance (N may be 0; the
                                encoder normalises them on its device)
    image_features [N, P, d]    instead of pixel_values when `use_features=True` (cached encoder output)
    num_tokens    int           real (non-padding) input tokens, for throughput
    num_loss_tokens int         targets != -1, for loss normalisation across micro-batches
    document_ids  [B, T] long   with `pack=True` only: which sample of its row each position holds
                                (ghostvis/data/packing.py); rows are then padded to max_len

Caption layout (vision_pretrain), conversation-free on purpose: the LLM is frozen and has only seen
plain text, so a caption is plain text after the image and the projector alone learns to make the image
tokens predictive of it:

    <|bos|> <|image|> x num_vision_tokens  caption tokens

(`Tokenizer.render_caption`: the image's ids in the model's frame, the caption spaced off an Idefics2 frame)

Loss on caption tokens only (including the first one, predicted from the last image position); no end
token, since the frozen base model never learned one. Conversations use `Tokenizer.render_conversation`
(loss on assistant tokens only); text-only conversations are fine.

A sample that can't be used (undecodable image or JSON, placeholders that don't match the images, a
conversation the renderer refuses) is skipped and reported with `source.mark_corrupt()`, so it counts
in the stream's stats and its corrupt-fraction limit.

Cached features: with `use_features=True` the batcher reads `<key>.feat.npy` (captions) or
`<key>.<i>.feat.npy` (conversations) — the frozen encoder's patch features [num_patches, dim], what
`VLM(image_features=...)` takes — instead of decoding pixels; a sample without them counts as corrupt.
For an image-free batch the empty tensor needs `feature_shape=(num_patches, dim)` until one was seen.

The training loop gets its batchers from `caption_batches(req)` / `conversation_batches(req)` at the
end of this file (a `mixture.json` in the data directory mixes several datasets by weight). With
`req.cached_features` (launch/train.py --cached-features) they read cached features, after
`ghostvis.data.features.check_features` has matched every dataset's manifest against the model's encoder.

Length grouping: with `group_batches=G > 1`, G·B samples are read, sorted by length and cut into G
batches (emitted in a seeded random order), so little compute goes to padding. Off by default in training
(launch/train.py --length-group): each batch then holds one length, and on the embedded data length tells
the scene's object count and the conversation's kind, so batches of one kind held binding back
(docs/demo.md). The seed of these orders and of a mixture's draws is `DataRequest.draw_seed`: each
data-worker share draws its own.

Packing (`pack=True`, launch/train.py --pack): a group is instead a window of samples holding about
PACK_WINDOW_BATCHES batches' worth of tokens, packed first-fit in read order into rows of max_len tokens (and
at most `pack_images` images), shuffled (rows opened early are the fullest) and cut into batches of batch_size
rows, emitted in a seeded random order; the window's last batch may hold fewer rows. The loss per token is
the unpacked one's (ghostvis/data/packing.py).

Exact resume: the state is the source's state at the start of the current group plus the number of
batches already emitted from it; `load_state_dict` re-reads that group and skips what was emitted (packing
re-packs the same window the same way).
"""

from __future__ import annotations

import dataclasses
import io
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np
import torch
from PIL import Image

from ghostvis.data.features import FEATURES_KEY, check_features
from ghostvis.data.manifest import DataError, read_manifest, split_dir
from ghostvis.data.packing import PACK_WINDOW_BATCHES, pack_rows
from ghostvis.data.request import DataRequest
from ghostvis.data.shards import ShardStream
from ghostvis.data.text import TokenRowLoader, text_batches
from ghostvis.tokenizer import Tokenizer, message_images
from ghostvis.vision.transforms import BadImage, load_image

Transform = Callable[[Image.Image], torch.Tensor]
Batch = dict[str, Any]
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_CONV_IMAGE = re.compile(rf"^(\d+)\.({'|'.join(IMAGE_EXTS)})$")  # a conversation's i-th image


class SampleSource(Protocol):
    def __iter__(self) -> Iterator[dict[str, Any]]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def mark_corrupt(self, reason: str = ...) -> None: ...


class Unusable(Exception):
    """A sample the batcher must skip (counted via the source's mark_corrupt). `cause` is how reports
    group it (eval.json, rl's metrics)."""

    cause = "unreadable"


class ImageMissing(Unusable):
    """A conversation whose images don't match its placeholders, or whose image can't be decoded."""

    cause = "image missing"


@dataclass
class Row:
    ids: list[int]
    mask: list[int]  # 1 where ids[t] carries loss
    images: list[torch.Tensor]
    docs: list[int] | None = None  # a packed row: its samples' lengths, in order


def join_rows(rows: list[Row]) -> Row:
    """Samples as one packed row (their lengths kept in `docs`)."""
    return Row([t for r in rows for t in r.ids], [m for r in rows for m in r.mask],
               [im for r in rows for im in r.images], [len(r.ids) for r in rows])


def shift_targets(ids: list[int], mask: list[int]) -> list[int]:
    """targets[t] = ids[t+1] if mask[t+1] else -1; the last position predicts nothing."""
    return [ids[t + 1] if mask[t + 1] else -1 for t in range(len(ids) - 1)] + [-1]


class _Batcher:
    """Shared machinery: reading rows, grouping, collating, resumable state. Subclasses define `_row`."""

    def __init__(self, source: SampleSource, tokenizer: Tokenizer, *, batch_size: int, max_len: int,
                 num_vision_tokens: int, transform: Transform | None, use_features: bool = False,
                 feature_shape: tuple[int, int] | None = None, group_batches: int = 1, seed: int | str = 0,
                 device: str | torch.device = "cpu", restart: bool = False, pack: bool = False,
                 pack_images: int = 0, image_frame: str = "none") -> None:
        if batch_size < 1 or group_batches < 1:
            raise ValueError(f"batch_size ({batch_size}) and group_batches ({group_batches}) must be >= 1")
        if pack and group_batches > 1:
            raise ValueError(f"group_batches ({group_batches}) sorts unpacked rows; pack=True reads its own window "
                             "of PACK_WINDOW_BATCHES batches' tokens")
        self.pack, self.pack_images = pack, pack_images
        if transform is None and not use_features and num_vision_tokens > 0:
            raise ValueError("pass an image transform (PIL -> tensor), or use_features=True for cached features")
        self.source, self.tok = source, tokenizer
        self.batch_size, self.max_len, self.n_vis = batch_size, max_len, num_vision_tokens
        self.image_frame = image_frame  # VisionConfig.image_frame
        self.transform, self.use_features = transform, use_features
        self.group_batches, self.seed = group_batches, seed
        self.device = torch.device(device)
        self._group, self._skip = 0, 0
        self._state: dict[str, Any] | None = None  # set while iterating
        # An image-free batch still carries an empty [0, ...] tensor so every rank runs the vision modules.
        self._empty: torch.Tensor | None = None if feature_shape is None else torch.zeros(0, *feature_shape)
        # restart=True (evaluation): every iter() starts again from the initial position.
        self._initial = self.state_dict() if restart else None

    # ---- images ----------------------------------------------------------------------------------

    def _image(self, sample: dict[str, Any], stem: str) -> torch.Tensor:
        """The image (or cached features) stored under `<key>.<stem>.*` (stem "" for image-text)."""
        prefix = f"{stem}." if stem else ""
        if self.use_features:
            data = sample.get(f"{prefix}feat.npy")
            if data is None:
                raise Unusable(f"no cached features {prefix}feat.npy")
            return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False)).float()
        data = next((sample[f"{prefix}{e}"] for e in IMAGE_EXTS if f"{prefix}{e}" in sample), None)
        if data is None:
            raise Unusable("no image")
        try:
            return self.transform(load_image(data))
        except BadImage as e:
            raise Unusable(e.reason) from e

    def _no_images(self) -> torch.Tensor:
        if self._empty is None:
            if self.use_features:
                raise ValueError("a batch without images in use_features mode needs feature_shape="
                                 "(num_patches, dim) to build its empty image_features tensor")
            # the transform's output shape, from a dummy image
            pixels = self.transform(Image.new("RGB", (8, 8)))
            self._empty = torch.zeros((0, *pixels.shape), dtype=pixels.dtype)
        return self._empty

    # ---- rows and batches ------------------------------------------------------------------------

    def _row(self, sample: dict[str, Any]) -> Row:
        raise NotImplementedError

    def collate(self, rows: list[Row]) -> Batch:
        # packed rows all take max_len: one shape for every batch (compiled and flex attention keep theirs)
        T = self.max_len if self.pack else max(len(r.ids) for r in rows)
        ids = np.full((len(rows), T), self.tok.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), T), dtype=bool)
        for b, r in enumerate(rows):
            ids[b, : len(r.ids)] = r.ids
            mask[b, : len(r.mask)] = r.mask
        # shift_targets, vectorised: a padding position carries no loss, so a row's last token predicts nothing
        targets = np.full_like(ids, -1)
        targets[:, :-1] = np.where(mask[:, 1:], ids[:, 1:], -1)
        batch = {"input_ids": torch.from_numpy(ids), "targets": torch.from_numpy(targets)}
        if self.pack:
            docs = np.empty_like(ids)
            for b, r in enumerate(rows):
                docs[b] = np.repeat(np.arange(len(r.docs) + 1), [*r.docs, T - len(r.ids)])  # padding: its own
            targets[:, :-1][docs[:, 1:] != docs[:, :-1]] = -1  # a sample's last token predicts nothing
            batch["document_ids"] = torch.from_numpy(docs)
        batch.update(num_tokens=sum(len(r.ids) for r in rows), num_loss_tokens=int((targets != -1).sum()))
        if self.n_vis > 0:  # a text-only model takes no image argument
            images = [im for r in rows for im in r.images]
            if images and self._empty is None:
                self._empty = images[0].new_zeros((0, *images[0].shape))
            batch["image_features" if self.use_features else "pixel_values"] = (
                # numpy's single-threaded copy: torch.stack's intra-op threads cost up to 100x more when the
                # training process keeps every core busy
                torch.from_numpy(np.stack([im.numpy() for im in images])) if images else self._no_images())
        cuda = self.device.type == "cuda"
        return {k: v.pin_memory().to(self.device, non_blocking=True) if cuda and torch.is_tensor(v)
                else v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _read_rows(self, it: Iterator[dict[str, Any]]) -> tuple[list[Row], bool]:
        """One group's samples: group_batches batches' worth, or a packing window's tokens; and whether the
        group is whole (False: a non-looping source ran out)."""
        rows: list[Row] = []
        tokens, budget = 0, self.batch_size * self.max_len * PACK_WINDOW_BATCHES
        for sample in it:
            try:
                rows.append(self._row(sample))
            except Exception as e:  # any failure to decode one sample (even RecursionError) skips just it
                self.source.mark_corrupt(type(e).__name__)
                continue
            tokens += len(rows[-1].ids)
            if tokens >= budget if self.pack else len(rows) == self.batch_size * self.group_batches:
                return rows, True
        return rows, False

    def _arrange(self, rows: list[Row]) -> list[list[Row]]:
        if not self.pack and self.group_batches == 1:
            return [rows]
        order = random.Random(f"ghostvis-groups:{self.seed}:{self._group}")
        if self.pack:
            bins = pack_rows([len(r.ids) for r in rows], [len(r.images) for r in rows], self.max_len,
                             self.pack_images)
            rows = [join_rows([rows[i] for i in b]) for b in bins]
            # rows opened early in the window are the fullest, the last ones hold what no earlier row had room
            # for: every row is max_len long anyway, so mix them across batches
            order.shuffle(rows)
        else:
            rows = sorted(rows, key=lambda r: len(r.ids))
        batches = [rows[i: i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        order.shuffle(batches)  # packed: this places the window's short last batch
        return batches

    def __iter__(self) -> Iterator[Batch]:
        if self._initial is not None:
            self.load_state_dict(self._initial)
        it = iter(self.source)
        while True:
            start = self.source.state_dict()
            rows, whole = self._read_rows(it)
            if not rows:
                return
            batches = self._arrange(rows)
            for j in range(self._skip, len(batches)):
                last = j == len(batches) - 1
                # After a group's last batch the source's own position is exact: no re-read on resume.
                self._state = ({"source": self.source.state_dict(), "emitted": 0, "group": self._group + 1}
                               if last else {"source": start, "emitted": j + 1, "group": self._group})
                if last:
                    self._group, self._skip = self._group + 1, 0
                yield self.collate(batches[j])
            self._skip = 0
            if not whole:
                return  # a non-looping source ran out

    @property
    def stats(self) -> dict[str, Any]:
        """The source's sample counts (seen, corrupt)."""
        return self.source.stats

    def state_dict(self) -> dict[str, Any]:
        state = self._state or {"source": self.source.state_dict(), "emitted": self._skip, "group": self._group}
        return {**state, "group_batches": self.group_batches, "pack": self.pack, "cut": self._cut()}

    def _cut(self) -> dict[str, int]:
        """The flags that decide a group's batches, by the trainer's flag names: a group of unpacked rows is
        --micro-batch × --length-group samples, sorted by their length cut at --seq-len; a packing window's
        budget and rows take --seq-len and --pack-images."""
        cut = {"micro-batch": self.batch_size, "seq-len": self.max_len}
        return {**cut, "pack-images": self.pack_images} if self.pack else cut

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        self.source.load_state_dict(state["source"])
        self._skip, self._group, self._state = int(state["emitted"]), int(state["group"]), None

    def check_state(self, state: dict[str, Any]) -> None:
        """Refuse a saved position this batcher would resume at other samples (DataError with the fix)."""
        # a position inside a group is "batch j of this group's cut": another group size, micro-batch, row
        # length, packing switched on or off (or, packed, another image cap) cuts other batches (between groups
        # anything resumes). A state saved before the keys existed was sft's then fixed 8 and its packing is
        # unknown. A packing window does not depend on the group size.
        if int(state["emitted"]) == 0:
            return
        saved_pack = state.get("pack")
        if saved_pack is not None and saved_pack != self.pack:
            fix = "add --pack" if saved_pack else "drop --pack"
            raise DataError(f"the checkpoint's data position was saved {'with' if saved_pack else 'without'} --pack, "
                            f"inside a group of batches cut that way; resume as it ran ({fix})")
        saved = state.get("group_batches", 8)
        if saved != self.group_batches and not self.pack:
            raise DataError(f"the checkpoint's data position was saved with --length-group {saved} (its batches "
                            f"are cut from groups of {saved}); resume with --length-group {saved}")
        cut = self._cut()
        changed = [f"--{flag} {value}" for flag, value in state.get("cut", {}).items() if cut.get(flag, value) != value]
        if changed:
            raise DataError(f"the checkpoint's data position was saved inside a group of batches cut with "
                            f"{', '.join(changed)}; resume with {' '.join(changed)} (or from a checkpoint saved "
                            "between groups)")


class CaptionBatches(_Batcher):
    """Image-text shards -> `<|bos|> <|image|>×n caption` rows, loss on the caption (see module doc)."""

    def __init__(self, source: SampleSource, tokenizer: Tokenizer, *, batch_size: int, max_len: int,
                 num_vision_tokens: int, transform: Transform | None, **kw: Any) -> None:
        super().__init__(source, tokenizer, batch_size=batch_size, max_len=max_len,
                         num_vision_tokens=num_vision_tokens, transform=transform, **kw)
        image = len(tokenizer.image_ids(num_vision_tokens, self.image_frame))
        if num_vision_tokens < 1 or max_len < image + 2:
            raise ValueError(f"max_len ({max_len}) must leave room for <|bos|>, {image} image "
                             "tokens and at least one caption token; raise --max-len or lower the vision tokens")

    def _row(self, sample: dict[str, Any]) -> Row:
        caption = sample.get("txt", b"").decode("utf-8", errors="replace").strip()
        if not caption:
            raise Unusable("missing caption")
        image = self._image(sample, "")
        ids, mask = self.tok.render_caption(caption, self.n_vis, self.image_frame, self.max_len)
        return Row(ids, mask, [image])


class ConversationBatches(_Batcher):
    """Conversation shards -> rendered chats (loss on assistant tokens), images `<key>.<i>.<ext>`."""

    def _row(self, sample: dict[str, Any]) -> Row:
        record, _ = read_conversation(sample)  # images are read by index below (or their cached features)
        try:
            ids, mask = self.tok.render_conversation(record, self.max_len, self.n_vis, self.image_frame)
        except (ValueError, TypeError, KeyError) as e:
            raise Unusable(f"conversation not renderable: {e}") from e
        kept = ids.count(self.tok.image_token_id) // self.n_vis if self.n_vis else 0  # truncation drops tail images
        return Row(ids, mask, [self._image(sample, str(i)) for i in range(kept)])  # keys numbered 0..n-1


def count_images(record: dict[str, Any]) -> int:
    """Image placeholders in a stored conversation (the sum of `message_images` over its messages)."""
    return sum(message_images(m) for m in record["messages"])


def read_conversation(sample: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A conversation sample's JSON record and its image members' keys in order (`0.png`, `1.jpg`, ...).

    Raises Unusable (the caller counts the sample as corrupt) when the JSON is missing or invalid, the
    images are not numbered 0..n-1, or their number differs from the conversation's image placeholders.
    """
    try:
        record = json.loads(sample["json"])
    except (KeyError, ValueError) as e:
        raise Unusable(f"conversation JSON missing or invalid: {e}") from e
    if not isinstance(record, dict):
        raise Unusable(f"conversation JSON is a {type(record).__name__}, expected an object with 'messages'")
    found = sorted((int(m.group(1)), k) for k in sample if (m := _CONV_IMAGE.match(k)))
    if [i for i, _ in found] != list(range(len(found))):
        raise ImageMissing(f"image members are not numbered 0..n-1: {[k for _, k in found]}")
    try:
        expected = count_images(record)
    except (KeyError, TypeError) as e:
        raise Unusable(f"malformed messages: {e!r}") from e
    if expected != len(found):
        raise ImageMissing(f"{expected} image placeholders but {len(found)} images")
    return record, [k for _, k in found]


class MixtureBatches:
    """Draw from several sources by weight: `MixtureBatches([(stream_a, 3), (stream_b, 1)], seed)`.

    Works over sample sources (per-sample mixing: wrap it in a batcher) or over batchers (per-batch
    mixing). Draw k picks source i from a generator seeded by (seed, k) alone, so the state is just the
    draw count, the exhausted set (non-looping sources drop out) and each source's state.
    """

    def __init__(self, sources: Iterable[tuple[Any, float]], seed: int | str, name: str = "mix") -> None:
        pairs = list(sources)
        self.sources = [s for s, _ in pairs]
        self.weights = [float(w) for _, w in pairs]
        if not pairs or any(w <= 0 for w in self.weights):
            raise ValueError(f"MixtureBatches needs at least one (source, weight > 0) pair, got weights {self.weights}")
        self.seed, self.step, self.name = seed, 0, name  # name: independent draws for nested mixtures
        self.exhausted: set[int] = set()
        self._last: int | None = None

    def _pick(self) -> int:
        live = [i for i in range(len(self.sources)) if i not in self.exhausted]
        u = random.Random(f"ghostvis-{self.name}:{self.seed}:{self.step}").random() * sum(self.weights[i] for i in live)
        for i in live:
            u -= self.weights[i]
            if u < 0:
                return i
        return live[-1]

    def __iter__(self) -> Iterator[Any]:
        its = [iter(s) for s in self.sources]
        while len(self.exhausted) < len(self.sources):
            i = self._pick()
            try:
                item = next(its[i])
            except StopIteration:
                self.exhausted.add(i)
                continue
            self.step, self._last = self.step + 1, i
            yield item

    def mark_corrupt(self, reason: str = "undecodable") -> None:
        if self._last is None:
            raise RuntimeError("mark_corrupt() needs an item drawn first")
        self.sources[self._last].mark_corrupt(reason)

    @property
    def stats(self) -> dict[str, Any]:
        per = [getattr(s, "stats", {}) for s in self.sources]
        return {"seen": sum(p.get("seen", 0) for p in per), "corrupt": sum(p.get("corrupt", 0) for p in per),
                "by_source": per}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "exhausted": sorted(self.exhausted),
                "sources": [s.state_dict() for s in self.sources]}

    def check_state(self, state: dict[str, Any]) -> None:
        """The saved mixture has as many sources, and each batcher's own check (`_Batcher.check_state`) passes."""
        if len(state["sources"]) != len(self.sources):
            raise DataError(f"the checkpoint's data position is of a mixture of {len(state['sources'])} datasets, this "
                            f"run's has {len(self.sources)}: resume with the mixture it ran with")
        for source, saved in zip(self.sources, state["sources"]):
            check = getattr(source, "check_state", None)
            if check is not None:
                check(saved)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        for s, st in zip(self.sources, state["sources"]):
            s.load_state_dict(st)
        self.step, self.exhausted, self._last = int(state["step"]), set(state["exhausted"]), None


# ---- data builders for the training loop (ghostvis.train.loop.DATA_BUILDERS) ----------------------

MIXTURE_FILE = "mixture.json"


def mixture_entries(data_dir: Path) -> list[tuple[Path, float]] | None:
    """The datasets of `data_dir/mixture.json` with their weights, or None without that file:
    {"datasets": [{"dir": "../vqa", "weight": 3}, {"dir": "../arith", "weight": 1}]} (dirs relative to the
    file, each holding train/ and val/ like a plain data directory, or one flat shard directory)."""
    spec_path = Path(data_dir) / MIXTURE_FILE
    if not spec_path.is_file():
        return None
    shape = '{"datasets": [{"dir": "../vqa", "weight": 3}, ...]} (weights > 0, dirs relative to the file)'
    try:
        spec = json.loads(spec_path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise DataError(f"{spec_path}: not valid JSON ({e}); expected {shape}") from None
    entries = spec.get("datasets") if isinstance(spec, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{spec_path}: field 'datasets' is missing or empty; expected {shape}")
    for i, e in enumerate(entries):
        ok = (isinstance(e, dict) and isinstance(e.get("dir"), str) and isinstance(e.get("weight"), (int, float))
              and not isinstance(e.get("weight"), bool) and e["weight"] > 0)
        if not ok:
            raise DataError(f"{spec_path}: datasets[{i}] is {json.dumps(e)}; expected {shape}")
    return [(spec_path.parent / e["dir"], float(e["weight"])) for e in entries]


def sample_source(req: DataRequest, kind: str, entries: list[tuple[Path, float]] | None = None) -> SampleSource:
    """The split's ShardStream of `req.data_dir`, or a weighted MixtureBatches of the `entries` datasets
    (default: those of `req.data_dir/mixture.json` where it exists)."""
    def stream(d: Path, seed: int) -> ShardStream:
        return ShardStream(split_dir(d, req.split), seed=seed, rank=req.rank, world_size=req.world_size,
                           loop=not req.eval_mode, shuffle=not req.eval_mode, expected_kind=kind,
                           max_corrupt_fraction=getattr(req, "max_corrupt_fraction", 0.01))

    entries = mixture_entries(req.data_dir) if entries is None else entries
    if entries is None:
        return stream(Path(req.data_dir), req.seed)
    return MixtureBatches([(stream(d, req.seed + i), w) for i, (d, w) in enumerate(entries)], seed=req.draw_seed)


class TextRows:
    """Packed plain-text rows (`TokenRowLoader`) as dict batches, mixed into a multimodal stage so the LLM
    keeps modelling the text it was pretrained on (without it, text bits per byte degrade ~10× in the demo)."""

    def __init__(self, loader: TokenRowLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for x, y in self.loader:
            yield {"input_ids": x, "targets": y, "num_tokens": x.numel(), "num_loss_tokens": int((y >= 0).sum())}

    @property
    def stats(self) -> dict[str, Any]:
        return self.loader.stats

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


def multimodal_batches(req: DataRequest, kind: str, make: Callable[[SampleSource], Any]) -> Any:
    """`make(source)` over the stage's data; when a mixture.json lists text-tokens datasets as well, their
    rows are mixed in per batch by weight (training only: validation measures the stage's own data)."""
    entries = mixture_entries(req.data_dir)
    if entries is None:
        return make(sample_source(req, kind))
    is_text = [read_manifest(split_dir(d, req.split)).kind == "text-tokens" for d, _ in entries]
    own = [e for e, t in zip(entries, is_text) if not t]
    if not own:
        raise DataError(f"{Path(req.data_dir) / MIXTURE_FILE}: every dataset is text-tokens; this stage needs "
                         f"at least one {kind} dataset")
    main = make(sample_source(req, kind, own))
    text = [(i, e) for i, (e, t) in enumerate(zip(entries, is_text)) if t]
    if not text or req.eval_mode:
        return main
    if not req.llm_trains:
        # a text-only batch would reach no trainable parameter: a loss without gradient, which DeepSpeed rejects
        raise DataError(f"{Path(req.data_dir) / MIXTURE_FILE} mixes text-tokens datasets in, but the LLM is frozen, "
                        "so text rows train nothing: pass --train-llm-layers K (or all), or drop them from the mixture")
    rows = [(TextRows(text_batches(dataclasses.replace(req, data_dir=d, seed=req.seed + i))), w) for i, (d, w) in text]
    return MixtureBatches([(main, sum(w for _, w in own)), *rows], seed=req.draw_seed, name="text-mix")


def _batcher_args(req: DataRequest, source: SampleSource) -> dict[str, Any]:
    """What the model decides: vision tokens per image and the encoder's preprocessing (VLMs only); with
    `req.cached_features`, the checked cached features instead of the preprocessing."""
    args = {"batch_size": req.batch_size, "max_len": req.seq_len, "seed": req.draw_seed, "device": req.device,
            "restart": req.eval_mode, "pack": req.pack, "pack_images": req.pack_images,
            "num_vision_tokens": req.num_vision_tokens, "image_frame": req.image_frame, "transform": req.transform}
    if req.cached_features:
        streams = getattr(source, "sources", [source])  # a MixtureBatches' ShardStreams, or the one stream
        shape = check_features({str(s.data_dir): s.manifest.extra.get(FEATURES_KEY) for s in streams}, req.encoder)
        args.update(transform=None, use_features=True, feature_shape=shape)
    return args


def caption_batches(req: DataRequest) -> CaptionBatches | MixtureBatches:
    """vision_pretrain data."""
    return multimodal_batches(req, "image-text", lambda source: CaptionBatches(
        source, req.tokenizer, **_batcher_args(req, source)))


def conversation_batches(req: DataRequest) -> ConversationBatches | MixtureBatches:
    """sft / eval data (a single directory or a mixture.json); length-grouped while training with
    `req.length_group` > 1."""
    return multimodal_batches(req, "conversation", lambda source: ConversationBatches(
        source, req.tokenizer, group_batches=1 if req.eval_mode else req.length_group, **_batcher_args(req, source)))
