"""Chat with an exported checkpoint in the terminal.

    python launch/chat_cli.py --ckpt out/sft [--device cpu] [--temperature 0.6] [--top-k 50] [--max-new-tokens 256]

Commands: `/image PATH` attaches an image to your next message, `/clear` starts over, `/quit` exits
(so does end of input). Replies stream as they are generated.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ghostvis.infer.chat import ChatModel, ContextTooLong, Reply, load_chat_model, user_message
from ghostvis.vision.transforms import BadImage

HELP = "commands: /image PATH (attach to your next message), /clear (start over), /quit"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Chat with a GhostVis checkpoint in the terminal.")
    p.add_argument("--ckpt", required=True, help="exported checkpoint directory (config.json, *.safetensors, tokenizer/)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply, in tokens")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    args = p.parse_args(argv)
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k < 0:
        p.error(f"--top-k must be >= 0, got {args.top_k}")
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    return args


def read_image(chat: ChatModel, path_text: str):
    """The preprocessed image at `path_text`, or None after printing why it can't be used."""
    path = Path(path_text).expanduser()
    if not path_text:
        print("usage: /image PATH")
    elif not path.is_file():
        print(f"error: no such file: {path}")
    else:
        try:
            return chat.preprocess(path.read_bytes())
        except BadImage as e:
            print(f"error: {path} is not a usable image ({e.reason})")
        except ValueError as e:
            print(f"error: {e}")
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        chat = load_chat_model(args.ckpt, args.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: cannot load --ckpt {args.ckpt}: {e}", file=sys.stderr)
        return 2
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k or None, seed=args.seed)
    messages, images, pending = [], [], []
    print(f"GhostVis chat ({args.ckpt}); {HELP}")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            break
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/clear":
            messages, images, pending = [], [], []
            print("(conversation cleared)")
            continue
        if line == "/image" or line.startswith("/image "):
            image = read_image(chat, line[len("/image"):].strip())
            if image is not None:
                pending.append(image)
                print(f"(image attached to your next message; {len(pending)} pending)")
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]!r}; {HELP}")
            continue
        try:
            reply = Reply(chat, messages + [user_message(line, len(pending))], images + pending, **sampling)
        except ContextTooLong as e:
            print(f"error: {e}")
            continue
        if reply.dropped:
            print(f"(the {reply.dropped} oldest messages no longer fit the context and were dropped)")
        print("assistant> ", end="", flush=True)
        for piece in reply:
            print(piece, end="", flush=True)
        print()
        (messages, images), pending = reply.conversation(), []
    return 0


if __name__ == "__main__":
    sys.exit(main())
