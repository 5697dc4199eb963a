"""Export a GhostVis model directory (training --out or launch/import_hf.py output) to Hugging Face format.

    python launch/export.py --ckpt runs/sft --format hf --out runs/sft-hf [--dtype bfloat16] [--llm-only]

The language model becomes a transformers Qwen2 folder (q/k/v biases) or a Llama folder (otherwise) that
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` open; padding rows of the vocabulary
are cut and the chat template renders like GhostVis. A VLM becomes, by its connector:
  - resampler "none" + MLP of the LLM's width (LLaVA-1.5): `LlavaForConditionalGeneration`, with its processor
    (for a model trained without an image frame);
  - resampler "pixel_shuffle" + linear (projector_hidden 0), feature_norm, SigLIP encoder (SmolVLM):
    `Idefics3ForConditionalGeneration` (the vlm_tiny preset);
  - resampler "perceiver" (SwiGLU projector of the LLM's ffn_dim, then the perceiver), feature_norm, SigLIP
    encoder: `Idefics2ForConditionalGeneration` (the vlm_small, vlm_1.5b and vlm_7b presets);
  - a timm ResNet read at a stage, resampler "none" + MLP of the LLM's width: `FastVlmForConditionalGeneration`
    (the vlm_tiny_cnn preset).
The Idefics ones come with their processor when the model was trained on the family's prompt and pixels
(--vision image_frame=idefics3|idefics2 --vision pad_to_square=false, as those presets are).
Other connectors (avgpool, pixel_shuffle + MLP, ...) have no transformers equivalent: their directory is
already their own format (`ghostvis.load_pretrained`), and --llm-only exports just the language model. Train an
exportable one with `launch/train.py --vision KEY=VALUE`. See docs/interop.md.
"""

from __future__ import annotations

import argparse

from ghostvis.checkpoint_io import read_config
from ghostvis.cli import console_script
from ghostvis.interop.hf_fastvlm import export_fastvlm, fastvlm_refusal
from ghostvis.interop.hf_idefics2 import export_idefics2, idefics2_refusal
from ghostvis.interop.hf_idefics3 import export_idefics3, idefics3_refusal
from ghostvis.interop.hf_llava import export_llava, llava_refusal
from ghostvis.interop.hf_llm import DTYPES, export_llm


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="directory with llm.safetensors, config.json, tokenizer/")
    p.add_argument("--format", choices=["hf"], default="hf", help="output format (hf = transformers folder)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: as stored)")
    p.add_argument("--llm-only", action="store_true", help="export only the language model of a VLM (any connector)")
    args = p.parse_args(argv)
    model_cfg, vision_cfg, _ = read_config(args.ckpt)
    dtype = DTYPES[args.dtype] if args.dtype else None
    if vision_cfg is not None and not args.llm_only:
        exporters = {"LLaVA": (llava_refusal, export_llava), "Idefics3": (idefics3_refusal, export_idefics3),
                     "Idefics2": (idefics2_refusal, export_idefics2), "FastVLM": (fastvlm_refusal, export_fastvlm)}
        reasons = {name: refusal(model_cfg, vision_cfg) for name, (refusal, _) in exporters.items()}
        fits = [name for name, reason in reasons.items() if reason is None]
        if not fits:
            p.error(f"--ckpt {args.ckpt} is a VLM whose connector has no transformers equivalent ("
                    + "; ".join(f"{name}: {reason}" for name, reason in reasons.items())
                    + "). Exportable connectors: resampler=none + an MLP of the LLM's width (projector_hidden=-1; "
                    "LLaVA), resampler=pixel_shuffle + projector_hidden=0 + feature_norm=true (Idefics3), resampler="
                    f"perceiver + projector_hidden={model_cfg.ffn_dim} (the LLM's ffn_dim) + feature_norm=true "
                    "(Idefics2), the Idefics ones with a SigLIP-like encoder (no class token); a timm ResNet with "
                    "resampler=none + an MLP of the LLM's width (FastVLM). Its directory is "
                    "already its own format (llm.safetensors + vision.safetensors + config.json + tokenizer/, "
                    "opened by ghostvis.load_pretrained); --llm-only exports its language model as a transformers "
                    "folder.")
        folder = exporters[fits[0]][1](args.ckpt, args.out, dtype=dtype)
        config = folder.config
        processor = "with its processor" if folder.no_processor is None else f"no processor: {folder.no_processor}"
        print(f"wrote {args.out}: transformers {config.architectures[0]} "
              f"({config.text_config.model_type} + {config.vision_config.model_type}), {processor}")
        return
    hf_cfg = export_llm(args.ckpt, args.out, dtype=dtype, cfg=model_cfg)
    print(f"wrote {args.out}: transformers {hf_cfg.architectures[0]}")


cli = console_script(main)

if __name__ == "__main__":
    cli()
