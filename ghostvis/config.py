"""Model and vision configuration dataclasses and the named presets (docs/model.md, docs/vision.md)."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ghostvis.tokenizer import IMAGE_FRAMES

VOCAB_PAD_MULTIPLE = 64


@dataclass
class ModelConfig:
    """Decoder-only GPT shape. `head_dim=None` means n_embd // n_head."""

    vocab_size: int = 32768
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 6
    n_kv_head: int = 3
    head_dim: int | None = None
    ffn_dim: int = 2688
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    logit_softcap: float | None = None
    image_token_id: int | None = None
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "ffn_dim", "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(
                    f"ModelConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                    "change n_head or set head_dim explicitly"
                )
            self.head_dim = self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"ModelConfig: n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head} "
                "(grouped-query attention needs whole groups)"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig: head_dim={self.head_dim} must be even for rotary embeddings")
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            raise ValueError(f"ModelConfig: logit_softcap must be positive or None, got {self.logit_softcap}")

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows: vocab_size rounded up to a multiple of 64 (independent of the TP size, so
        checkpoints move between layouts; TP needs padded_vocab_size % tp == 0)."""
        return math.ceil(self.vocab_size / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, d)


def int_or(word: str, hint: str) -> Callable[[str], int | str]:
    """An argparse type: an integer, or `word`; anything else is refused with `hint` (what to give)."""
    import argparse

    def parse(text: str) -> int | str:
        if text == word:
            return text
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: {hint}") from None

    return parse


# --activation-checkpointing's value: a block count, or "auto" (the trainer picks the fewest checkpointed blocks
# whose plan fits the card: plan.fewest_checkpointed_blocks)
activation_checkpointing_arg = int_or("auto", "give a block count, auto, or the flag alone for every block")


def checkpointed_blocks(activation_checkpointing: bool | int, n_layer: int) -> int:
    """Blocks recomputed in backward: all for True, none for False, else the first N (0..n_layer)."""
    n = n_layer if activation_checkpointing is True else int(activation_checkpointing)
    if not 0 <= n <= n_layer:
        raise ValueError(f"activation checkpointing of {n} blocks: the model has {n_layer}; "
                         f"give 0..{n_layer}, or the flag alone for every block")
    return n


# widths a tower takes from the LLM it is grown on, so one preset fits any LLM (--init-from, --depth)
LLM_WIDTH = -1  # VisionConfig.projector_hidden: the MLP is as wide as the LLM it feeds (LLaVA's, FastVLM's)
LLM_FFN = -2  # VisionConfig.projector_hidden: the LLM's ffn_dim (Idefics2's SwiGLU connector)
LLM_HEADS = 0  # VisionConfig.resampler_heads: the LLM's n_head (the perceiver runs at the LLM's width)


@dataclass
class VisionConfig:
    """Vision tower: a timm encoder, a resampler to `num_vision_tokens`, an MLP projector."""

    encoder: str = "vit_small_patch16_224"
    image_size: int = 224
    feature_layer: int = -2  # block whose patch tokens we take; -2 = second to last
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs
    resampler: str = "perceiver"  # "perceiver" | "avgpool" | "pixel_shuffle" | "none"
    num_vision_tokens: int = 64
    resampler_depth: int = 2
    resampler_heads: int = 8  # the perceiver's; LLM_HEADS (0) = the LLM's n_head
    projector_hidden: int = 2048  # 0 = one bias-free linear layer instead of the MLP (SmolVLM/Idefics3's);
    # LLM_WIDTH (-1) = the LLM's n_embd, LLaVA's and FastVLM's MLP, whatever LLM the tower is grown on;
    # with the perceiver, the width of its SwiGLU projector: LLM_FFN (-2) = the LLM's ffn_dim, Idefics2's
    # a learned row + column embedding on each token of a grid resampler, so the LLM knows where it lies
    position_embedding: bool = False
    feature_norm: bool = False  # the encoder's final norm on the feature layer's output (Idefics3 applies it)
    pad_to_square: bool = True  # false: squash to a square, as the Idefics families' processors do
    # the special tokens around each image's tokens (ghostvis.tokenizer.IMAGE_FRAMES): "idefics2"/"idefics3" keep
    # that family's prompt, so its transformers processor builds our ids (docs/interop.md)
    image_frame: str = "none"

    def __post_init__(self) -> None:
        if self.resampler not in RESAMPLERS:
            raise ValueError(f"VisionConfig.resampler={self.resampler!r}; choose one of {RESAMPLERS}")
        if self.image_frame not in IMAGE_FRAMES:
            raise ValueError(f"VisionConfig.image_frame={self.image_frame!r}; choose one of {IMAGE_FRAMES}")
        if self.num_vision_tokens <= 0:
            raise ValueError(f"VisionConfig.num_vision_tokens must be positive, got {self.num_vision_tokens}")
        if self.projector_hidden < LLM_FFN:
            raise ValueError(f"VisionConfig.projector_hidden={self.projector_hidden}; give a width, 0 (one linear "
                             f"layer), {LLM_WIDTH} (the LLM's width) or {LLM_FFN} (the LLM's ffn_dim)")
        if self.resampler_heads < LLM_HEADS:
            raise ValueError(f"VisionConfig.resampler_heads={self.resampler_heads}; give a head count or "
                             f"{LLM_HEADS} (the LLM's n_head)")

    def for_llm(self, model_cfg: ModelConfig) -> VisionConfig:
        """This tower on `model_cfg`'s LLM: the widths taken from the LLM (LLM_WIDTH, LLM_FFN, LLM_HEADS) resolved.
        Raises ValueError, naming the field and the values that fit, where the perceiver's heads do not divide
        the LLM's width."""
        hidden = {LLM_WIDTH: model_cfg.n_embd, LLM_FFN: model_cfg.ffn_dim}.get(self.projector_hidden,
                                                                               self.projector_hidden)
        heads = model_cfg.n_head if self.resampler_heads == LLM_HEADS else self.resampler_heads
        if self.resampler == "perceiver" and model_cfg.n_embd % heads:
            fits = [h for h in range(1, 65) if model_cfg.n_embd % h == 0]
            raise ValueError(f"VisionConfig.resampler_heads={heads} does not divide the LLM's width "
                             f"{model_cfg.n_embd}, at which the perceiver runs: give --vision resampler_heads=N "
                             f"with N one of {', '.join(map(str, fits))}, or {LLM_HEADS} (the LLM's n_head)")
        return dataclasses.replace(self, projector_hidden=hidden, resampler_heads=heads)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionConfig:
        return _from_dict(cls, d)


RESAMPLERS = ("perceiver", "avgpool", "pixel_shuffle", "none")


def parse_vision_override(text: str) -> tuple[str, Any]:
    """A `--vision KEY=VALUE` flag: a VisionConfig field and its value (JSON: numbers, true/false, lists;
    anything else is text)."""
    import difflib
    import json

    key, sep, value = text.partition("=")
    fields = [f.name for f in dataclasses.fields(VisionConfig)]
    if not sep:
        raise ValueError(f"{text!r}: give KEY=VALUE with KEY a VisionConfig field ({', '.join(fields)})")
    if key not in fields:
        near = difflib.get_close_matches(key, fields, n=1)
        hint = f"did you mean {near[0]!r}?" if near else f"fields: {', '.join(fields)}"
        raise ValueError(f"{key!r} is not a VisionConfig field; {hint}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def vision_override_arg(text: str) -> tuple[str, Any]:
    """`parse_vision_override` as an argparse type: its message, not argparse's generic "invalid value"."""
    import argparse

    try:
        return parse_vision_override(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


# Run settings that configs written by earlier versions carried; they are read past, never applied: the
# run decides them (launch/train.py --activation-checkpointing, --encoder-weights, --freeze).
RETIRED_FIELDS = {"ModelConfig": ("activation_checkpointing",), "VisionConfig": ("pretrained_path", "freeze_encoder")}


def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    d = {k: v for k, v in d.items() if k not in RETIRED_FIELDS.get(cls.__name__, ())}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields: {sorted(known)}")
    return cls(**d)


def small_config(depth: int = 12) -> ModelConfig:
    """The depth-scaled family: width 64·depth, head_dim ~128, GQA 2:1, SwiGLU at 3.5× width."""
    if depth <= 0:
        raise ValueError(f"--depth must be positive, got {depth}")
    n_embd = 64 * depth
    n_head = max(2, n_embd // 128)
    return ModelConfig(
        n_layer=depth,
        n_embd=n_embd,
        n_head=n_head,
        n_kv_head=max(1, n_head // 2),
        head_dim=n_embd // n_head,
        ffn_dim=math.ceil(3.5 * n_embd / 64) * 64,
        rope_theta=10000.0,
        max_seq_len=2048,
    )


def _tiny() -> ModelConfig:
    return ModelConfig(vocab_size=512, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, ffn_dim=128, max_seq_len=256)


def _qwen25(n_embd: int, n_layer: int, n_head: int, n_kv_head: int, ffn_dim: int, tied: bool, vocab: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_kv_head=n_kv_head,
        ffn_dim=ffn_dim, rope_theta=1e6, max_seq_len=32768, norm_eps=1e-6, qkv_bias=True,
        tie_embeddings=tied,
    )


_SIGLIP = "vit_so400m_patch14_siglip_384"
# SigLIP's released weights (big_vision / Hugging Face) use the tanh GELU; timm's default is exact GELU.
_SIGLIP_KW = {"act_layer": "gelu_tanh"}
# a timm ViT built as SigLIP is (no class token, tanh GELU; pre-LN blocks, LayerNorm eps 1e-6 and no pre-norm are
# already timm's ViT defaults), so a from-scratch tower exports as a transformers SigLIP/Idefics vision model
_SIGLIP_SHAPED = {"class_token": False, "global_pool": "", **_SIGLIP_KW}
# the family's prompt and pixels (its processor squashes an image to the square; it never pads), so what its
# transformers processor makes of an image and a prompt is what the model trained on
_IDEFICS2_PROMPT = {"image_frame": "idefics2", "pad_to_square": False}
_IDEFICS3_PROMPT = {"image_frame": "idefics3", "pad_to_square": False}

# name -> (model config factory taking depth or None, vision config or None)
_PRESETS: dict[str, tuple[Any, VisionConfig | None]] = {
    "tiny": (lambda depth: _tiny(), None),
    "small": (lambda depth: small_config(12 if depth is None else depth), None),
    "qwen25_0.5b": (lambda depth: _qwen25(896, 24, 14, 2, 4864, True, 151936), None),
    "qwen25_1.5b": (lambda depth: _qwen25(1536, 28, 12, 2, 8960, True, 151936), None),
    "qwen25_7b": (lambda depth: _qwen25(3584, 28, 28, 4, 18944, False, 152064), None),
    # the tiny presets' towers train from scratch in minutes on a CPU, and each connector is one transformers has,
    # so what they train exports (docs/interop.md): a ViT-Ti built SigLIP-shaped (2 blocks, read after the first,
    # 8-px patches: 8 x 8 at 64 px), pixel-shuffled 2 x 2 into 16 tokens, one linear layer, images squashed and
    # framed as Idefics3's processor does: Idefics3/SmolVLM
    "vlm_tiny": (
        lambda depth: _tiny(),
        VisionConfig(encoder="vit_tiny_patch16_224", image_size=64,
                     encoder_kwargs={"depth": 2, "patch_size": 8, **_SIGLIP_SHAPED}, feature_norm=True,
                     resampler="pixel_shuffle", num_vision_tokens=16, projector_hidden=0, **_IDEFICS3_PROMPT),
    ),
    # the same LLM with a small CNN (ResNet-10t, from scratch; its stride-8 form saw shapes far sooner than the ViT,
    # docs/demo.md "Learning to look") read at its stride-16 stage: every cell of the 4 x 4 map a token, through an
    # MLP of the LLM's width: FastVLM
    "vlm_tiny_cnn": (
        lambda depth: _tiny(),
        VisionConfig(encoder="resnet10t", image_size=64, feature_layer=3, resampler="none",
                     num_vision_tokens=16, projector_hidden=LLM_WIDTH),
    ),
    # the perceiver presets: Idefics2's connector (SwiGLU projector of the LLM's ffn width, then the perceiver at
    # the LLM's width); with a SigLIP-shaped encoder, feature_norm, and images squashed and framed as Idefics2's
    # processor does, they export as Idefics2ForConditionalGeneration with its processor
    "vlm_small": (
        lambda depth: small_config(12 if depth is None else depth),
        VisionConfig(encoder="vit_small_patch16_224", image_size=224, encoder_kwargs=dict(_SIGLIP_SHAPED),
                     resampler="perceiver", num_vision_tokens=64, resampler_depth=2,
                     resampler_heads=LLM_HEADS, projector_hidden=LLM_FFN, feature_norm=True, **_IDEFICS2_PROMPT),
    ),
    "vlm_1.5b": (
        lambda depth: _qwen25(1536, 28, 12, 2, 8960, True, 151936),
        VisionConfig(encoder=_SIGLIP, image_size=384, encoder_kwargs=dict(_SIGLIP_KW), resampler="perceiver", num_vision_tokens=64,
                     resampler_depth=2, resampler_heads=16, projector_hidden=LLM_FFN, feature_norm=True,
                     **_IDEFICS2_PROMPT),
    ),
    "vlm_7b": (
        lambda depth: _qwen25(3584, 28, 28, 4, 18944, False, 152064),
        VisionConfig(encoder=_SIGLIP, image_size=384, encoder_kwargs=dict(_SIGLIP_KW), resampler="perceiver", num_vision_tokens=64,
                     resampler_depth=2, resampler_heads=16, projector_hidden=LLM_FFN, feature_norm=True,
                     **_IDEFICS2_PROMPT),
    ),
}
PRESETS: list[str] = list(_PRESETS)
_DEPTH_SCALED = ("small", "vlm_small")


def get_preset(name: str, depth: int | None = None, **overrides: Any) -> tuple[ModelConfig, VisionConfig | None]:
    """Build a preset's configs. `depth` scales the `small` family; `overrides` set fields of
    ModelConfig or VisionConfig by name (e.g. vocab_size=..., num_vision_tokens=...)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    if depth is not None and name not in _DEPTH_SCALED:
        raise ValueError(f"--depth only applies to {_DEPTH_SCALED}; preset {name!r} has a fixed shape")
    make_model, vision = _PRESETS[name]
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    vision_fields = {f.name for f in dataclasses.fields(VisionConfig)}
    unknown = sorted(set(overrides) - model_fields - vision_fields)
    if unknown:
        raise ValueError(f"get_preset({name!r}): unknown override(s) {unknown}")
    vision_over = {k: v for k, v in overrides.items() if k in vision_fields}
    if vision_over and vision is None:
        raise ValueError(f"preset {name!r} has no vision tower; cannot override {sorted(vision_over)}")
    base = make_model(depth)
    # replace() re-runs validation; head_dim is re-derived when the width or head count changes
    model_over = {k: v for k, v in overrides.items() if k in model_fields}
    if ("n_embd" in model_over or "n_head" in model_over) and "head_dim" not in model_over:
        model_over["head_dim"] = None
    model_cfg = dataclasses.replace(base, **model_over)
    vision_cfg = dataclasses.replace(copy.deepcopy(vision), **vision_over) if vision is not None else None
    return model_cfg, vision_cfg
