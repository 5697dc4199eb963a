"""Chat with an exported checkpoint in the browser.

    python launch/chat_web.py --ckpt out/sft --port 8000 [--host 127.0.0.1] [--device cpu] [--max-upload-mb 10]

Then open http://127.0.0.1:8000/. See docs/serving.md for the endpoints.
"""

from __future__ import annotations

import argparse

import uvicorn

from ghostvis.infer.chat import add_chat_args, check_chat_args, load_or_exit
from ghostvis.infer.web import create_app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Serve a GhostVis checkpoint as a chat web page.")
    add_chat_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 = every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted image upload (413 above)")
    args = p.parse_args(argv)
    check_chat_args(p, args)
    if not 0 < args.port < 65536:
        p.error(f"--port must be in 1..65535, got {args.port}")
    if args.max_upload_mb <= 0:
        p.error(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chat = load_or_exit(args)
    app = create_app(chat, max_upload_bytes=int(args.max_upload_mb * (1 << 20)), max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_k=args.top_k)
    print(f"serving {args.ckpt} on http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    from ghostvis.cli import run_main

    run_main(main)
