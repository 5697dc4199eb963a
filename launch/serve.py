"""Serve a checkpoint: OpenAI-compatible chat completions (continuous batching) and the chat page.

    python launch/serve.py --ckpt out/sft --port 8000 [--host 127.0.0.1] [--device cpu] [--dtype float32]
        [--max-batch 32] [--max-queue 64] [--request-timeout 300] [--image-root DIR] [--max-body-mb 20]

Then open http://127.0.0.1:8000/ or point an OpenAI client at http://127.0.0.1:8000/v1.
See docs/serving.md for the endpoints.
"""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

import torch
import uvicorn

from ghostvis.cli import console_script
from ghostvis.config import PRESETS
from ghostvis.infer.batching import Batcher
from ghostvis.infer.chat import add_chat_args, check_chat_args, load_or_exit, random_chat_model
from ghostvis.infer.web import create_app

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Serve a GhostVis checkpoint: OpenAI-compatible API and chat page.")
    add_chat_args(p, ckpt_required=False)
    p.add_argument("--random-preset", choices=PRESETS, default=None,
                   help="serve a randomly initialized model of this preset instead of --ckpt (load tests)")
    p.add_argument("--random-depth", type=int, default=None, help="depth of --random-preset (depth-scaled presets)")
    p.add_argument("--random-vision", choices=PRESETS, default=None,
                   help="give the random model the vision tower of this preset (e.g. vlm_tiny)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights and KV cache dtype")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 = every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="the model id clients see (default: the checkpoint folder's name)")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together (KV-cache rows)")
    p.add_argument("--max-context", type=int, default=None,
                   help="KV-cache positions per request, prompt + reply (default: the model's context); the cache "
                        "holds --max-batch x --max-context positions, so lower this for long-context models")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a row (503 beyond)")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds a request may take, queue included (504)")
    p.add_argument("--image-root", type=Path, default=None,
                   help="folder whose files a request may name as image urls (default: data: URLs only)")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body (413 above)")
    p.add_argument("--max-image-mb", type=float, default=10.0, help="largest image file under --image-root")
    args = p.parse_args(argv)
    check_chat_args(p, args)
    if (args.ckpt is None) == (args.random_preset is None):
        p.error("give --ckpt DIR (a checkpoint) or --random-preset NAME (a random model for load tests)")
    if not 0 < args.port < 65536:
        p.error(f"--port must be in 1..65535, got {args.port}")
    if args.max_context is not None and args.max_context < 2:
        p.error(f"--max-context must be >= 2, got {args.max_context}")
    for flag in ("max_batch", "request_timeout", "max_body_mb", "max_image_mb"):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.max_queue < 0:
        p.error(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.image_root is not None and not args.image_root.is_dir():
        p.error(f"--image-root {args.image_root} is not a folder")
    return args


class Server(uvicorn.Server):
    """uvicorn, plus: on SIGINT/SIGTERM the batcher ends every request at once (streams get a final
    error chunk and [DONE]), so shutdown never waits for long replies."""

    def __init__(self, config: uvicorn.Config, batcher: Batcher) -> None:
        super().__init__(config)
        self.batcher = batcher

    def handle_exit(self, sig: int, frame: object) -> None:
        super().handle_exit(sig, frame)
        if sig in (signal.SIGINT, signal.SIGTERM):
            self.batcher.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.ckpt is not None:
        chat = load_or_exit(args)
    else:
        chat = random_chat_model(args.random_preset, args.random_depth, args.device,
                                 vision_preset=args.random_vision)
    chat.engine.model.to(DTYPES[args.dtype])
    batcher = Batcher(chat.engine, max_batch=args.max_batch, max_queue=args.max_queue, cache_len=args.max_context)
    name = args.model_name or (Path(args.ckpt).resolve().name if args.ckpt else f"random-{args.random_preset}")
    app = create_app(chat, batcher, model_name=name, max_body_bytes=int(args.max_body_mb * (1 << 20)),
                     max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                     image_root=args.image_root, max_image_bytes=int(args.max_image_mb * (1 << 20)),
                     request_timeout=args.request_timeout)
    batcher.start()
    print(f"serving {chat.ckpt} as {name!r} on http://{args.host}:{args.port}/ (OpenAI API at /v1)", flush=True)
    Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5),
           batcher).run()
    batcher.stop()
    return 0


cli = console_script(main)

if __name__ == "__main__":
    cli()
