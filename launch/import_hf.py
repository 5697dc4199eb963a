"""Import Hugging Face weights from a local folder (nothing is downloaded).

    python launch/import_hf.py --hf-dir ~/models/Qwen2.5-1.5B --out runs/qwen15 [--dtype bfloat16]
                               [--alias '<|assistant_end|>=<|im_end|>']
    python launch/import_hf.py --vision ~/models/siglip-so400m-patch14-384 --out siglip.safetensors

--hf-dir: a Qwen2/Qwen2.5 or Llama folder (config.json, *.safetensors sharded or not, tokenizer.json) becomes a
GhostVis export directory (llm.safetensors, config.json, tokenizer/) that `ghostvis.load_pretrained` opens and
`launch/train.py --init-from` starts from. GhostVis special tokens the vocabulary lacks are added (new embedding
rows initialized from existing ones); --alias maps one to a token the vocabulary already has instead.
--vision: a SigLIP/CLIP folder becomes a timm-format .safetensors, and the VisionConfig fields that fit it are
printed (launch/train.py --encoder-weights also takes the folder itself). See docs/interop.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ghostvis.cli import console_script
from ghostvis.interop.common import InteropError
from ghostvis.interop.hf_llm import DTYPES, import_llm
from ghostvis.interop.hf_vision import timm_spec_from_hf, timm_state_dict_from_hf


def parse_aliases(items: list[str]) -> dict[str, str]:
    aliases = {}
    for item in items:
        name, sep, target = item.partition("=")
        if not sep or not name or not target:
            raise InteropError(f"--alias {item!r}: expected GHOSTVIS_SPECIAL=HF_TOKEN, e.g. "
                               "'<|assistant_end|>=<|im_end|>'")
        aliases[name] = target
    return aliases


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-dir", help="local Hugging Face Qwen2/Llama model folder")
    src.add_argument("--vision", help="local Hugging Face SigLIP/CLIP (vision) model folder")
    p.add_argument("--out", required=True, help="output directory (--hf-dir) or .safetensors file (--vision)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: as stored)")
    p.add_argument("--alias", action="append", default=[], metavar="SPECIAL=TOKEN",
                   help="use an existing HF token for a GhostVis special token (repeatable)")
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.hf_dir:
        cfg = import_llm(args.hf_dir, args.out, dtype=dtype, aliases=parse_aliases(args.alias))
        print(f"wrote {args.out}: {cfg.n_layer} layers, d={cfg.n_embd}, vocab {cfg.vocab_size}")
        return
    from safetensors.torch import save_file

    if Path(args.out).suffix != ".safetensors":
        p.error(f"--out {args.out}: with --vision, give a .safetensors file name")
    state = timm_state_dict_from_hf(args.vision)
    save_file({k: v.to(dtype) if dtype else v for k, v in state.items()}, args.out)
    print(f"wrote {args.out} (train with --encoder-weights {args.out}); VisionConfig fields for it:")
    print(json.dumps(timm_spec_from_hf(args.vision), indent=1))


cli = console_script(main)

if __name__ == "__main__":
    cli()
