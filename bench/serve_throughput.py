"""Aggregate committed tokens/s of `tmfast serve` under C concurrent clients (loopback only).

    python bench/serve_throughput.py                      # shipped default model, C = 1 8 32
    python bench/serve_throughput.py --checkpoint DIR --concurrency 1 8 32 --max-tokens 48

Starts the HTTP server in this process on 127.0.0.1 (a free port), then C client
threads each send `--requests-per-client` completions back to back; counts are
bounded, so the run always ends by itself.
"""
from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import uvicorn

from evals.report import machine_info
from tmfast.checkpoint import load_checkpoint
from tmfast.checkpoint import DEFAULT_CHECKPOINT
from tmfast.engine import Engine
from tmfast.server import create_app, server_config

PROMPTS = ["And it came to pass", "In the beginning", "The LORD is my shepherd", "And Jesus answered",
           "Blessed are the", "Now the serpent was", "For God so loved", "Let there be"]


def run(url: str, concurrency: int, per_client: int, body: dict) -> tuple[int, float]:
    def client(c: int) -> int:
        n = 0
        with httpx.Client(timeout=600) as http:
            for r in range(per_client):
                req = dict(body, prompt=PROMPTS[(c + r) % len(PROMPTS)], seed=c * 1000 + r)
                out = http.post(url + "/v1/completions", json=req)
                out.raise_for_status()
                n += out.json()["usage"]["completion_tokens"]
        return n
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        tokens = sum(pool.map(client, range(concurrency)))
    return tokens, time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--tail", type=int, default=16)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--json", help="write the rows here too")
    args = p.parse_args(argv)

    model, tok = load_checkpoint(args.checkpoint)
    engine = Engine(model, tok, max_batch=args.max_batch, k_window=args.tail, max_queue=1024)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(server_config(create_app(engine), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    body = {"max_tokens": args.max_tokens, "tail": args.tail, "guidance": args.guidance}
    info = machine_info()
    print(f"# model: {args.checkpoint} ({model.num_params() / 1e6:.1f}M params); max_batch={args.max_batch}, "
          f"K={args.tail}, s={args.guidance:g}, {args.max_tokens} new tokens per request")
    print("# machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print("| concurrent clients | requests | committed tokens | wall s | tokens/s |")
    print("|---|---|---|---|---|")
    rows = []
    try:
        run(url, 1, 1, dict(body, max_tokens=4))  # warm-up
        for c in args.concurrency:
            tokens, wall = run(url, c, args.requests_per_client, body)
            rows.append({"concurrency": c, "requests": c * args.requests_per_client, "tokens": tokens,
                         "wall_s": wall, "tokens_per_s": tokens / wall})
            print(f"| {c} | {c * args.requests_per_client} | {tokens} | {wall:.1f} | {tokens / wall:.1f} |",
                  flush=True)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
