"""Print sampled continuations of a few text prompts from an exported checkpoint (a quick look at a base model).

    python launch/sample.py --ckpt runs/demo/base --prompt "a red circle" --prompt "q: how many" [--temperature 0.8]
"""

from __future__ import annotations

import argparse
import sys

from ghostvis import load_pretrained
from ghostvis.cli import console_script
from ghostvis.infer.engine import Engine

DEFAULT_PROMPTS = ("a red", "the blue square is on the", "q: how many shapes are there? a:")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Print sampled continuations of text prompts.")
    p.add_argument("--ckpt", required=True, help="exported checkpoint directory (config.json, llm.safetensors, tokenizer/)")
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable; default: three built-in ones)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=20, help="0 = all tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        model, tokenizer, _ = load_pretrained(args.ckpt, device=args.device)
    except (OSError, ValueError) as e:
        print(f"error: cannot load --ckpt {args.ckpt}: {e}", file=sys.stderr)
        return 2
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    engine = Engine(model, tokenizer, device=args.device)
    ids = [tokenizer.encode(text, prepend=tokenizer.bos_token_id) for text in prompts]
    # Base models never learned an end token: stop at the next document (BOS) or at the length cap.
    completions = engine.complete(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k or None, seed=args.seed, stop_ids=[tokenizer.bos_token_id])
    for text, completion in zip(prompts, completions):
        reply = tokenizer.decode([t for t in completion.tokens if t != tokenizer.bos_token_id])
        print(f"  {text!r} -> {(reply.splitlines() or [''])[0]!r}")
    return 0


cli = console_script(main)

if __name__ == "__main__":
    cli()
