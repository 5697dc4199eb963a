"""Chat with an exported checkpoint in the browser.

    python launch/chat_web.py --ckpt out/sft --port 8000 [--host 127.0.0.1] [--device cpu] [--max-upload-mb 10]

Then open http://127.0.0.1:8000/. See docs/serving.md for the endpoints.
"""

from __future__ import annotations

import argparse
import sys

import uvicorn

from ghostvis.infer.chat import load_chat_model
from ghostvis.infer.web import create_app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Serve a GhostVis checkpoint as a chat web page.")
    p.add_argument("--ckpt", required=True, help="exported checkpoint directory (config.json, *.safetensors, tokenizer/)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 = every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted image upload (413 above)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply, in tokens")
    p.add_argument("--temperature", type=float, default=0.6, help="default sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=50, help="default top-k (0 = off)")
    args = p.parse_args(argv)
    if not 0 < args.port < 65536:
        p.error(f"--port must be in 1..65535, got {args.port}")
    if args.max_upload_mb <= 0:
        p.error(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not 0 <= args.temperature <= 2:
        p.error(f"--temperature must be in [0, 2], got {args.temperature}")
    if args.top_k < 0:
        p.error(f"--top-k must be >= 0, got {args.top_k}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        chat = load_chat_model(args.ckpt, args.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: cannot load --ckpt {args.ckpt}: {e}", file=sys.stderr)
        return 2
    app = create_app(chat, max_upload_bytes=int(args.max_upload_mb * (1 << 20)), max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_k=args.top_k)
    print(f"serving {args.ckpt} on http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
