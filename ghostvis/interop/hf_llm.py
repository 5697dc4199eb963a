"""Qwen2/Llama (transformers) <-> GhostVis GPT: configs, parameter names, streaming import and export.

Import streams: each tensor is read from the folder's safetensors (plain reads, no memory map), converted and
written to ``llm.safetensors`` before the next is read, so about one tensor is ever held, never the model;
pickled ``.bin`` files are refused. The result is the layout training exports, so
``ghostvis.load_pretrained`` and ``launch/train.py --init-from`` open it. See docs/interop.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from ghostvis import checkpoint_io
from ghostvis.config import ModelConfig
from ghostvis.files import write_safetensors
from ghostvis.interop.common import InteropError, SafetensorsFolder
from ghostvis.interop.hf_tokenizer import HFTokenizer, hf_tokenizer_files
from ghostvis.tokenizer import Tokenizer
from ghostvis.tokenizer_dir import load_tokenizer

ARCHITECTURES = ("qwen2", "llama")  # HF model_type values we read and write
VOCAB_TENSORS = ("wte.weight", "lm_head.weight")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------- names and configs

def hf_names(cfg: ModelConfig) -> dict[str, str]:
    """GhostVis parameter name -> transformers Qwen2/Llama name (the GPT's parameters, in order)."""
    names = {"wte.weight": "model.embed_tokens.weight"}
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        names[ours + "attn_norm.weight"] = theirs + "input_layernorm.weight"
        for p in ("q_proj", "k_proj", "v_proj"):
            names[f"{ours}attn.{p}.weight"] = f"{theirs}self_attn.{p}.weight"
            if cfg.qkv_bias:
                names[f"{ours}attn.{p}.bias"] = f"{theirs}self_attn.{p}.bias"
        names[ours + "attn.o_proj.weight"] = theirs + "self_attn.o_proj.weight"
        names[ours + "mlp_norm.weight"] = theirs + "post_attention_layernorm.weight"
        for p in ("gate_proj", "up_proj", "down_proj"):
            names[f"{ours}mlp.{p}.weight"] = f"{theirs}mlp.{p}.weight"
    names["norm_f.weight"] = "model.norm.weight"
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --hf-dir must be a Hugging Face model folder (config.json + "
                                "*.safetensors + tokenizer.json)")
    return json.loads(path.read_text())


def _rope(hf: dict[str, Any], where: str) -> float:
    """rope_theta from either config style (top-level rope_theta/rope_scaling, or rope_parameters);
    scaled RoPE (llama3, yarn, dynamic, ...) changes the frequencies, which our RotaryEmbedding lacks."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type", "default")
    if kind != "default":
        raise InteropError(
            f"{where}: rope scaling {kind!r} is not supported (GhostVis implements plain RoPE); use a checkpoint "
            "without rope_scaling (e.g. Qwen2.5 or Llama 2/3.0) or extend ghostvis/model/layers.py RotaryEmbedding")
    theta = hf.get("rope_theta", params.get("rope_theta"))
    if theta is None:
        raise InteropError(f"{where}: no rope_theta (top level or in rope_parameters)")
    return float(theta)


def model_config_from_hf(hf: dict[str, Any], vocab_size: int, where: str = "config.json") -> ModelConfig:
    """ModelConfig of a Qwen2/Llama config.json; ``vocab_size`` is the (grown) tokenizer's."""
    arch = hf.get("model_type")
    if arch not in ARCHITECTURES:
        raise InteropError(f"{where}: model_type {arch!r} is not supported; supported: {ARCHITECTURES} "
                           "(Qwen2/Qwen2.5 and Llama families)")
    if hf.get("hidden_act", "silu") != "silu":
        raise InteropError(f"{where}: hidden_act {hf['hidden_act']!r}; GhostVis's MLP is SwiGLU (silu)")
    if hf.get("use_sliding_window"):
        raise InteropError(f"{where}: use_sliding_window=true; GhostVis attention is full causal attention")
    if arch == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise InteropError(f"{where}: attention_bias/mlp_bias on a Llama model (o_proj/MLP biases) are not supported")
    n_head = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=vocab_size, n_layer=hf["num_hidden_layers"], n_embd=hf["hidden_size"], n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head, head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
        ffn_dim=hf["intermediate_size"], rope_theta=_rope(hf, where),
        max_seq_len=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=arch == "qwen2", tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def hf_config_from_model(cfg: ModelConfig, tok: Tokenizer, dtype: torch.dtype) -> Any:
    """A transformers Qwen2Config (q/k/v bias, standard head_dim) or LlamaConfig for ``cfg``. A biased model
    with a non-standard head_dim becomes Llama with attention_bias (its o_proj bias is written as zeros)."""
    from transformers import LlamaConfig, Qwen2Config

    if cfg.logit_softcap is not None or cfg.qk_norm:
        raise InteropError("ModelConfig.logit_softcap / qk_norm have no Qwen2/Llama equivalent; this model "
                           "cannot be exported to transformers (keep the GhostVis export, ghostvis.load_pretrained)")
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu", bos_token_id=tok.bos_token_id,
        eos_token_id=tok.special_id("<|assistant_end|>"), pad_token_id=tok.pad_token_id, dtype=dtype,
    )
    if cfg.qkv_bias and cfg.head_dim == cfg.n_embd // cfg.n_head:
        return Qwen2Config(**common)
    return LlamaConfig(**common, head_dim=cfg.head_dim, attention_bias=cfg.qkv_bias, mlp_bias=False)


# ---------------------------------------------------------------- reading HF weights

def _grow_vocab(rows: torch.Tensor, cfg: ModelConfig, tok: HFTokenizer, spelling_init: bool) -> torch.Tensor:
    """[padded_vocab, d] table: the HF rows of the original vocabulary, new special tokens initialized
    from existing rows, padding rows zero. Embedding rows (``spelling_init``) start as the mean of the
    rows of the pieces their spelling encodes to, so each new token starts distinct (a frozen embedding
    keeps them apart); output-head rows start as the mean of all rows (an average logit)."""
    base = tok.base_vocab_size
    mean = torch.zeros(rows.shape[1], dtype=torch.float64)
    for start in range(0, base, 8192):  # in chunks: no float copy of the whole table
        mean += rows[start:min(start + 8192, base)].double().sum(0)
    mean = (mean / base).float()
    new_rows = {}
    for name, i in tok.added_ids.items():
        pieces = tok.spelling_ids(name) if spelling_init else []
        new_rows[i] = (rows[pieces].float().mean(0) if pieces else mean).to(rows.dtype)
    if rows.shape[0] >= cfg.padded_vocab_size:  # the file's table has room: rewrite it in place, no second copy
        out = rows[:cfg.padded_vocab_size]
        out[base:].zero_()
    else:
        out = torch.zeros(cfg.padded_vocab_size, rows.shape[1], dtype=rows.dtype)
        out[:base] = rows[:base]
    for i, row in new_rows.items():
        out[i] = row
    return out


def _llm_specs(weights: SafetensorsFolder, cfg: ModelConfig, tok: HFTokenizer,
               dtype: torch.dtype | None) -> list[tuple[str, str, torch.dtype, tuple[int, ...]]]:
    """[(GhostVis name, HF name, dtype, shape)] of the import, checked against ``cfg`` from the
    files' headers alone: a mismatch is refused before any tensor is read."""
    from ghostvis.model.gpt import GPT

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    names = hf_names(cfg)
    specs = []
    for ours, theirs in names.items():
        shape = weights.shape(theirs)
        if ours in VOCAB_TENSORS:
            if len(shape) == 2 and shape[0] < tok.base_vocab_size:
                raise InteropError(f"{weights.dir}: tensor {theirs} has {shape[0]} rows but tokenizer.json has "
                                   f"{tok.base_vocab_size} tokens; the tokenizer does not belong to these weights")
            shape = (cfg.padded_vocab_size, *shape[1:])
        if shape != expected[ours]:
            raise InteropError(f"{weights.dir}: tensor {theirs} has shape {shape}, expected {expected[ours]} from "
                               "config.json")
        specs.append((ours, theirs, dtype or weights.dtype(theirs), shape))
    return specs


def _llm_tensors(weights: SafetensorsFolder, specs: list[tuple[str, str, torch.dtype, tuple[int, ...]]],
                 cfg: ModelConfig, tok: HFTokenizer) -> Iterator[torch.Tensor]:
    """The tensors of `specs`, read, converted and handed on one at a time."""
    for ours, theirs, dtype, _ in tqdm(specs, desc="import", unit="tensor"):
        t = weights.get(theirs)
        if ours in VOCAB_TENSORS:
            t = _grow_vocab(t, cfg, tok, spelling_init=ours == "wte.weight")
        yield t.to(dtype)


def import_llm(hf_dir: str | Path, out_dir: str | Path, *, dtype: torch.dtype | None = None,
               aliases: dict[str, str] | None = None) -> ModelConfig:
    """HF Qwen2/Llama folder -> GhostVis export directory (llm.safetensors, config.json, tokenizer/), the layout
    training exports. Streams: each tensor is read, converted and written before the next is read, so the
    process holds about one tensor, never the model (docs/interop.md)."""
    where = str(Path(hf_dir) / "config.json")
    hf = read_hf_config(hf_dir)
    tok = HFTokenizer.from_hf_dir(hf_dir, aliases)
    cfg = model_config_from_hf(hf, tok.vocab_size, where)
    weights = SafetensorsFolder(hf_dir)
    specs = _llm_specs(weights, cfg, tok, dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / checkpoint_io.LLM_FILE, [(ours, dt, shape) for ours, _, dt, shape in specs],
                      _llm_tensors(weights, specs, cfg, tok), metadata={"format": checkpoint_io.FORMAT})
    checkpoint_io.write_config(out, cfg, None, tok,
                               extra={"source": {"format": "huggingface", "model_type": hf["model_type"],
                                                 "hf_dir": str(Path(hf_dir).resolve()),
                                                 "added_tokens": tok.added_ids}})
    return cfg


# ---------------------------------------------------------------- export

def hf_llm_state(ckpt_dir: str | Path, cfg: ModelConfig, tok: Tokenizer,
                 dtype: torch.dtype | None = None) -> tuple[Any, dict[str, torch.Tensor]]:
    """(transformers config, tensors under transformers names) of a GhostVis export's language model, in
    ``dtype`` (default: as stored). Padding rows are cut; a tied head is left out (transformers ties it back)."""
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(Path(ckpt_dir) / checkpoint_io.LLM_FILE), framework="pt", device="cpu") as f:
        store_dtype = dtype or f.get_tensor("norm_f.weight").dtype  # default: as trained/imported
        hf_cfg = hf_config_from_model(cfg, tok, store_dtype)
        for ours, theirs in tqdm(hf_names(cfg).items(), desc="export", unit="tensor"):
            t = f.get_tensor(ours)
            state[theirs] = (t[:cfg.vocab_size] if ours in VOCAB_TENSORS else t).to(store_dtype).contiguous()
    if hf_cfg.model_type == "llama" and cfg.qkv_bias:  # Llama's attention_bias also biases o_proj
        for i in range(cfg.n_layer):
            state[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros(cfg.n_embd, dtype=store_dtype)
    hf_cfg.architectures = ["Qwen2ForCausalLM" if hf_cfg.model_type == "qwen2" else "LlamaForCausalLM"]
    return hf_cfg, state


def export_llm(ckpt_dir: str | Path, out_dir: str | Path, *, dtype: torch.dtype | None = None,
               cfg: ModelConfig | None = None) -> Any:
    """GhostVis export directory -> transformers folder (config.json, model.safetensors, tokenizer files,
    generation_config.json) that ``AutoModelForCausalLM.from_pretrained`` opens. Padding rows are cut;
    a tied head is written once (transformers ties it back). Returns the transformers config."""
    ckpt = Path(ckpt_dir)
    if cfg is None:
        cfg = checkpoint_io.read_config(ckpt)[0]
    tok = load_tokenizer(ckpt / checkpoint_io.TOKENIZER_DIR)
    hf_cfg, state = hf_llm_state(ckpt, cfg, tok, dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})  # transformers needs "pt"
    hf_cfg.save_pretrained(str(out))
    write_generation_and_tokenizer(hf_cfg, tok, out)
    return hf_cfg


# what a processor writes; removed with every export, so a folder never keeps an earlier model's processor
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def write_generation_and_tokenizer(hf_cfg: Any, tok: Tokenizer, out: Path,
                                   spellings: dict[str, str] | None = None) -> None:
    """generation_config.json (bos/eos = <|assistant_end|>/pad, so generate stops at the end of the turn)
    and the transformers tokenizer files (``spellings``: see ``hf_tokenizer_files``); an earlier export's
    processor files are removed (a VLM export writes its own after this)."""
    from transformers import GenerationConfig

    for name in PROCESSOR_FILES:
        (out / name).unlink(missing_ok=True)
    GenerationConfig(bos_token_id=hf_cfg.bos_token_id, eos_token_id=hf_cfg.eos_token_id,
                     pad_token_id=hf_cfg.pad_token_id).save_pretrained(str(out))
    hf_tokenizer_files(tok, out, spellings)
