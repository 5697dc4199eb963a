"""Chat with an exported checkpoint in the terminal.

    python launch/chat_cli.py --ckpt out/sft [--device cpu] [--temperature 0.6] [--top-k 50] [--max-new-tokens 256]

Commands: `/image PATH` attaches an image to your next message, `/clear` starts over, `/quit` exits
(so does end of input). Replies stream as they are generated.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ghostvis.cli import console_script
from ghostvis.infer.chat import (ChatModel, ContextTooLong, Reply, add_chat_args, check_chat_args, load_or_exit,
                                 user_message)
from ghostvis.vision.transforms import BadImage

HELP = "commands: /image PATH (attach to your next message), /clear (start over), /quit"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Chat with a GhostVis checkpoint in the terminal.")
    add_chat_args(p)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    args = p.parse_args(argv)
    check_chat_args(p, args)
    return args


def read_image(chat: ChatModel, path_text: str) -> torch.Tensor | None:
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
    chat = load_or_exit(args)
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


cli = console_script(main)

if __name__ == "__main__":
    cli()
