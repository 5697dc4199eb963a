"""Export a GhostVis model directory (training --out or launch/import_hf.py output) to Hugging Face format.

    python launch/export.py --ckpt runs/sft --format hf --out runs/sft-hf [--dtype bfloat16] [--llm-only]

The language model becomes a transformers Qwen2 folder (q/k/v biases) or a Llama folder (otherwise) that
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` open; padding rows of the vocabulary
are cut and the chat template renders like GhostVis. A VLM's connector (perceiver / avgpool / pixel_shuffle
resampler + MLP) has no transformers equivalent: its directory is already its own format
(`ghostvis.load_pretrained`), and --llm-only exports just its language model. See docs/interop.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root when run as a script
from ghostvis.checkpoint_io import read_config  # noqa: E402
from ghostvis.interop.hf_llm import DTYPES, export_llm  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="directory with llm.safetensors, config.json, tokenizer/")
    p.add_argument("--format", choices=["hf"], default="hf", help="output format (hf = transformers folder)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: as stored)")
    p.add_argument("--llm-only", action="store_true", help="export only the language model of a VLM")
    args = p.parse_args(argv)
    model_cfg, vision_cfg, _ = read_config(args.ckpt)
    if vision_cfg is not None and not args.llm_only:
        p.error(f"--ckpt {args.ckpt} is a VLM with a {vision_cfg.resampler!r} connector, which no transformers "
                "model class expresses; its directory is already loadable with ghostvis.load_pretrained. "
                "Pass --llm-only to export its language model as a transformers folder.")
    hf_cfg = export_llm(args.ckpt, args.out, dtype=DTYPES[args.dtype] if args.dtype else None, cfg=model_cfg)
    print(f"wrote {args.out}: transformers {hf_cfg.architectures[0]}")


if __name__ == "__main__":
    main()
