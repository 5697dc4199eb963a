"""Load test of launch/serve.py on loopback: N concurrent streaming chats, for each N in --levels.

    python bench/serve.py --ckpt runs/demo/sft                                   # CPU, levels 1 8 32
    python bench/serve.py --preset vlm_small --random-depth 4 --vision vlm_tiny  # random, the demo's shape
    python bench/serve.py --preset vlm_small --random-depth 20 --device cuda --dtype bfloat16 --levels 1 8 32 128

The server runs in a subprocess (its own cores / GPU); this process only drives it. At level N, N
clients each send --per-client chats one after another (each one image, when the model has vision,
and a short question; greedy; up to --max-tokens tokens), streaming with usage. Reported per level:
requests, errors, aggregate completion tokens/s, p50/p95 request latency, and those as ratios to
level 1 (sequential). A random model stops at random (its stop token is as likely as any), so replies
vary in length; tokens/s counts the tokens actually generated. Prints a markdown table; --append
adds it, with the machine, to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    rows = max(args.levels + ([8] if args.rss else []))  # every client gets a row: nobody is refused
    model = ["--ckpt", args.ckpt] if args.ckpt else ["--random-preset", args.preset] + (
        ["--random-depth", str(args.random_depth)] if args.random_depth else []) + (
        ["--random-vision", args.vision] if args.vision else [])
    cmd = [sys.executable, str(REPO / "launch" / "serve.py"), *model, "--port", str(port), "--device", args.device,
           "--dtype", args.dtype, "--max-batch", str(rows), "--max-queue", str(rows),
           "--temperature", "0", "--max-new-tokens", str(args.max_tokens), "--request-timeout", str(args.timeout)]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"launch/serve.py exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("launch/serve.py did not come up within 600 s")


def health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as resp:
        return json.loads(resp.read())


def png_data_url() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (96, 64), (200, 60, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(port: int, i: int, image: str | None, max_tokens: int, timeout: float) -> tuple[bool, int, float]:
    """One streaming chat: (ok, completion tokens, seconds to the last byte)."""
    content = ([{"type": "image_url", "image_url": {"url": image}}] if image else []) + [
        {"type": "text", "text": f"Request {i}: what is in the picture, and where?"}]
    body = json.dumps({"model": "bench", "messages": [{"role": "user", "content": content}], "stream": True,
                       "max_tokens": max_tokens, "stream_options": {"include_usage": True}})
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            resp.read()
            return False, 0, time.perf_counter() - start
        tokens, ok = 0, False
        for line in resp:
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                return False, 0, time.perf_counter() - start
            if event.get("usage"):
                tokens, ok = event["usage"]["completion_tokens"], True
        return ok, tokens, time.perf_counter() - start
    except OSError:
        return False, 0, time.perf_counter() - start
    finally:
        conn.close()


def run_level(port: int, n: int, args: argparse.Namespace, image: str | None) -> dict:
    def client(c: int) -> list[tuple[bool, int, float]]:
        return [chat(port, c * args.per_client + k, image, args.max_tokens, args.timeout) for k in range(args.per_client)]

    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = [r for rs in pool.map(client, range(n)) for r in rs]
    wall = time.perf_counter() - start
    latencies = sorted(t for ok, _, t in results if ok)
    return {"level": n, "requests": len(results), "errors": sum(not ok for ok, _, _ in results),
            "tokens": sum(tok for _, tok, _ in results), "tok_s": sum(tok for _, tok, _ in results) / wall,
            "p50": statistics.median(latencies) if latencies else float("nan"),
            "p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else float("nan")}


def rss_growth(port: int, args: argparse.Namespace, image: str | None) -> list[tuple[int, int]]:
    """The server's RSS after the first and the last of args.rss = (FIRST, LAST) short chats."""
    out, sent = [], 0
    with ThreadPoolExecutor(8) as pool:
        for target in args.rss:
            results = list(pool.map(lambda i: chat(port, i, image, 16, args.timeout), range(sent, target)))
            if not all(ok for ok, _, _ in results):
                sys.exit(f"{sum(not ok for ok, _, _ in results)} of the memory-check chats failed")
            sent = target
            out.append((target, health(port)["rss_bytes"]))
    return out


def machine(args: argparse.Namespace) -> str:
    if args.device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    return f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="exported checkpoint (default: a random model of --preset)")
    p.add_argument("--preset", default="vlm_small", help="shape of the random model when no --ckpt is given")
    p.add_argument("--random-depth", type=int, default=4, help="depth of the random model (depth-scaled presets)")
    p.add_argument("--vision", default=None,
                   help="vision tower of the random model from this preset (default: --preset's own)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients per level")
    p.add_argument("--per-client", type=int, default=4, help="chats each client sends, one after another")
    p.add_argument("--max-tokens", type=int, default=64, help="longest reply")
    p.add_argument("--no-image", action="store_true", help="text-only chats")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one chat may take")
    p.add_argument("--rss", type=int, nargs=2, default=None, metavar=("FIRST", "LAST"),
                   help="also send LAST chats (8 at a time, 16 tokens) and compare the server's RSS after FIRST and LAST")
    p.add_argument("--append", action="store_true", help="append the table to --out")
    p.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    args = p.parse_args(argv)
    if 1 not in args.levels:
        p.error("--levels must include 1 (the sequential baseline the ratios are taken against)")
    port = free_port()
    server = start_server(args, port)
    try:
        info = health(port)
        image = png_data_url() if info["vision"] and not args.no_image else None
        run_level(port, 1, argparse.Namespace(**{**vars(args), "per_client": 1}), image)  # warm-up
        rows = [run_level(port, n, args, image) for n in sorted(set(args.levels))]
        memory = rss_growth(port, args, image) if args.rss else None
    finally:
        server.terminate()
        server.wait(timeout=60)
    base = rows[0]
    model = args.ckpt or (f"random {args.preset} --random-depth {args.random_depth}"
                          + (f" with {args.vision}'s vision tower" if args.vision else ""))
    lines = [f"### serve, {time.strftime('%Y-%m-%d')}, {machine(args)}", "",
             f"`launch/serve.py` with {model}, {args.device} {args.dtype}; streaming chats of "
             f"{'one image and ' if image else ''}a question, greedy, up to {args.max_tokens} tokens, "
             f"{args.per_client} per client; command: `python bench/serve.py {' '.join(argv or sys.argv[1:])}`", "",
             "| concurrent | requests | errors | tokens/s | × sequential | p50 latency | × seq | p95 latency | × seq |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['level']} | {r['requests']} | {r['errors']} | {r['tok_s']:,.1f} | "
                     f"{r['tok_s'] / base['tok_s']:.2f} | {r['p50']:.2f} s | {r['p50'] / base['p50']:.2f} | "
                     f"{r['p95']:.2f} s | {r['p95'] / base['p95']:.2f} |")
    if memory is not None:
        (first, rss_first), (last, rss_last) = memory
        lines += ["", f"Server RSS after {first} chats: {rss_first / 2**20:,.0f} MiB; after {last}: "
                  f"{rss_last / 2**20:,.0f} MiB ({(rss_last / rss_first - 1) * 100:+.1f}%)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.append:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write("\n" + text)
        print(f"appended to {args.out}")
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
