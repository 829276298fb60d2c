"""Soak the HTTP server with a storm of mixed requests, then check nothing broke (loopback only).

    python bench/soak.py                                  # shipped default model, 300 requests
    python bench/soak.py --requests 600 --concurrency 96  # bigger
    python bench/soak.py --tiny --requests 80             # a tiny random model (tests/test_soak.py)

Starts the server in this process on 127.0.0.1 (a free port) and fires every request at once
(at most --concurrency in flight): valid completions with many settings (seeds, tails, guidance,
α, noises, stop strings), streams, several prompts per request, OpenAI default-valued fields,
then malformed JSON, hostile magnitudes, seeds out of range, bad Unicode, oversize bodies,
prompts over the context, values tmfast cannot honour, settings at the magnitude bounds, wrong
JSON types (true for an integer, "4", "yes"), a model the server does not serve, clients that hang
up early (streaming or not, or in the middle of their body), requests HTTP itself cannot parse, and
clients that stall mid-request (the server must cut them off after its read timeout). A 429 is retried after its Retry-After, as a
client should. Every valid answer must equal its solo answer (MaturationEngine, one request
at a time, computed before the storm); afterwards the server must be healthy with no slot busy.
Prints one row per kind and exits 1 on any failure (wrong status or error shape), lost request
(no answer, an unfinished stream), changed answer, or an unhealthy server.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvicorn

from evals.report import machine_info
from tmfast import GenerationConfig, MaturationEngine
from tmfast.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from tmfast.engine import Engine
from tmfast.server import create_app, server_config

PROMPTS = ["And it came to pass", "In the beginning", "The LORD is my shepherd", "And Jesus answered",
           "Blessed are the", "Now the serpent was", "For God so loved", "Let there be"]
STOPS = [None, None, None, [" the"], ["\n"], [",", "."]]
KINDS = {  # kind: share of the requests (each kind at least once)
    "valid": 0.26, "stream": 0.14, "prompts": 0.07, "defaults": 0.05, "hangup": 0.07, "hangup_stream": 0.07,
    "malformed": 0.05, "hostile": 0.06, "seed": 0.04, "unicode": 0.04, "oversize": 0.03, "context": 0.03,
    "unsupported": 0.05, "bounds": 0.04, "wrong_types": 0.04, "unknown_model": 0.02, "protocol": 0.03,
    "midbody": 0.02, "stalled": 0.02,
}
MODEL_NAME = "soak"  # the name the server serves
CHECKED = {"valid", "stream", "prompts", "defaults"}  # answers compared with their solo answers
HANGUPS = {"hangup", "hangup_stream"}
RAW = {"protocol", "midbody", "stalled"}  # sent byte by byte over a socket, not through httpx


@dataclass
class Case:
    kind: str
    body: dict | bytes
    expect: set
    prompts: list = field(default_factory=list)  # valid: the prompts whose solo answers are expected
    stream: bool = False
    # outcome
    status: int | None = None
    texts: list | None = None
    error: str | None = None
    shape_ok: bool = True
    retries: int = 0
    retry_after: float = 1.0


def valid_body(rng: random.Random, max_tokens: int) -> dict:
    body = {"prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(4, max_tokens), "seed": rng.randrange(2 ** 31),
            "tail": rng.choice([1, 4, 8, 16]), "guidance": rng.choice([1.0, 1.0, 1.5, 2.0]),
            "alpha_max": rng.choice([1.0, 1.0, 0.7]), "tail_noise": rng.choice([0.0, 0.4]),
            "history_noise": rng.choice([0.0, 0.0, 0.02])}
    stop = rng.choice(STOPS)
    if stop:
        body["stop"] = stop
    return body


def make_case(kind: str, rng: random.Random, args, context: int) -> Case:
    if kind in CHECKED or kind in HANGUPS:
        body = valid_body(rng, args.max_tokens)
        if kind == "prompts":
            body["prompt"] = rng.sample(PROMPTS, rng.randint(2, 3))
        if kind == "defaults":
            body.update(logprobs=None, echo=False, suffix=None, logit_bias={}, n=1, best_of=1, presence_penalty=0,
                        frequency_penalty=0, temperature=rng.choice([0.0, 0.7, 1.0]), top_p=1.0, user="soak",
                        model=MODEL_NAME)
        if kind in HANGUPS:  # long enough to be running still when the client hangs up; fits the context
            body["max_tokens"] = context // 2
        stream = kind in ("stream", "hangup_stream") or (kind == "prompts" and rng.random() < 0.5)
        if stream:
            body["stream"] = True
            if rng.random() < 0.5:
                body["stream_options"] = {"include_usage": True}
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        return Case(kind, body, {200}, prompts if kind in CHECKED else [], stream)
    if kind == "malformed":
        raw = rng.choice([b"{not json", b"", b"[1, 2]", b'{"prompt": 5}', b'{"prompt": "hi", "max_tokens": "many"}',
                          b'{"max_tokens": 3}', b'{"prompt": "hi", "tail": 0}', b'{"prompt": "hi", "bogus": 1}'])
        return Case(kind, raw, {400})
    if kind == "hostile":
        raw = rng.choice(['"guidance": 1e30, "alpha_max": 0.5', '"guidance": -1e30, "alpha_max": 0.5',
                          '"guidance": Infinity', '"alpha_max": NaN', '"embryo_scale": 1e30, "alpha_max": 0.5',
                          '"tail_noise": 1e9', '"history_noise": 1e30', '"alpha_max": 5'])
        return Case(kind, ('{"prompt": "Let there be", "max_tokens": 4, %s}' % raw).encode(), {400})
    if kind == "seed":
        return Case(kind, {"prompt": "Let there be", "max_tokens": 4, "alpha_max": 0.5,
                           "seed": rng.choice([2 ** 64, 2 ** 100, -5, 2 ** 63])}, {400})
    if kind == "unicode":
        raw = rng.choice([b'{"prompt": "\\ud800 abc"}', b'{"prompt": ["ok", "\\udfff"]}',
                          b'{"prompt": "hi", "stop": ["\\ud800"]}', b'{"prompt": "\xff\xfe"}'])
        return Case(kind, raw, {400})
    if kind == "oversize":
        return Case(kind, {"prompt": "x" * (args.body_limit + 1)}, {413})
    if kind == "context":
        return Case(kind, {"prompt": "word " * (context * 4), "max_tokens": 4}, {400})
    if kind == "unsupported":
        field_, value = rng.choice([("logprobs", 5), ("echo", True), ("presence_penalty", 1.0), ("n", 2),
                                    ("suffix", "amen"), ("logit_bias", {"5": 1})])
        return Case(kind, {"prompt": "Let there be", field_: value}, {400})
    if kind == "bounds":  # the largest magnitudes allowed: the request may fail alone, nothing else may
        return Case(kind, {"prompt": "Let there be", "max_tokens": 8, "alpha_max": 0.5, "guidance": 1000.0,
                           "embryo_scale": 1000.0, "tail_noise": 1000.0, "history_noise": 1000.0}, {200, 500})
    if kind == "wrong_types":  # JSON types a lax parser would coerce into something accepted
        field_, value = rng.choice([("max_tokens", True), ("max_tokens", "4"), ("seed", True), ("n", True),
                                    ("stream", "yes"), ("return_tail", "y"), ("tail", 4.0), ("guidance", "2")])
        return Case(kind, {"prompt": "Let there be", field_: value}, {400})
    if kind == "unknown_model":
        return Case(kind, {"prompt": "Let there be", "max_tokens": 4, "model": rng.choice(["gpt-4", "", "Soak"])},
                    {404})
    if kind == "protocol":  # h11 cannot parse these: 400 in the JSON shape, then the connection closes
        head = rng.choice([b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n",
                           b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
                           b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                           b"Content-Length: 3\r\n\r\n{}",
                           b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"zz\r\n{}\r\n0\r\n\r\n"])
        return Case(kind, head, {400})
    if kind in ("midbody", "stalled"):  # 100 bytes declared, 10 sent; then hang up, or wait to be cut off
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{\"prompt\":")
        return Case(kind, head, {"closed"})
    raise ValueError(kind)


def plan(args, context: int) -> list[Case]:
    rng = random.Random(args.seed)
    kinds = [k for k, share in KINDS.items() for _ in range(max(1, round(share * args.requests)))]
    rng.shuffle(kinds)
    return [make_case(k, rng, args, context) for k in kinds]


def settings(body: dict) -> GenerationConfig:
    """What the server makes of a valid body (GenerationConfig's defaults for what it omits)."""
    stop = body.get("stop") or ()
    return GenerationConfig().overriding(
        max_new_tokens=body.get("max_tokens"), tail=body.get("tail"), guidance=body.get("guidance"),
        seed=body.get("seed"), stop=tuple(stop), alpha_max=body.get("alpha_max"),
        history_noise=body.get("history_noise"), tail_noise=body.get("tail_noise"))


def solo_answers(model, tok, cases: list[Case]) -> dict:
    eng = MaturationEngine(model, tok)
    answers = {}
    for c in cases:
        for p in c.prompts:
            g = settings(c.body)
            key = (p, json.dumps(g.to_dict(), sort_keys=True))
            if key not in answers:
                answers[key] = eng.generate([p], g)[0].text
    return answers


def error_shape_ok(payload) -> bool:
    return isinstance(payload, dict) and set(payload) == {"error"} and \
        set(payload["error"]) == {"message", "type", "param", "code"} and bool(payload["error"]["message"])


async def fire_raw(url: str, c: Case, args) -> None:
    """protocol: read the answer to the end; midbody: hang up; stalled: wait for the server to
    close the connection (it must within its read timeout; status "closed")."""
    host, port = url.removeprefix("http://").split(":")
    t0 = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
    except OSError as e:
        c.error = f"connect: {e!r}"
        return
    try:
        writer.write(c.body)
        await writer.drain()
        if c.kind == "midbody":
            c.status = "closed"
            return
        try:
            raw = await asyncio.wait_for(reader.read(), timeout=args.read_timeout + 10)
        except asyncio.TimeoutError:  # a failure of the server's, not a lost answer
            c.status = f"held for {time.perf_counter() - t0:.1f} s"
            return
        if c.kind == "stalled":
            waited = time.perf_counter() - t0
            c.status = "closed" if raw == b"" and waited >= args.read_timeout * 0.9 else f"answered after {waited:.1f} s"
            return
        head, _, body = raw.partition(b"\r\n\r\n")
        c.status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else None
        try:
            c.shape_ok = error_shape_ok(json.loads(body)) and b"application/json" in head.lower()
        except ValueError:
            c.shape_ok = False
    except OSError as e:
        c.error = f"{type(e).__name__}: {e}"
    finally:
        writer.close()


async def fire(client: httpx.AsyncClient, url: str, c: Case, sem: asyncio.Semaphore, args) -> None:
    if c.kind in RAW:
        async with sem:
            return await fire_raw(url, c, args)
    kw = {"content": c.body, "headers": {"content-type": "application/json"}} if isinstance(c.body, bytes) \
        else {"json": c.body}
    async with sem:
        for _ in range(args.retries + 1):
            try:
                if c.stream:
                    await stream(client, url, c, kw)
                else:
                    timeout = httpx.Timeout(120, read=args.hang_after) if c.kind == "hangup" else 120
                    r = await client.post(url + "/v1/completions", timeout=timeout, **kw)
                    c.status = r.status_code
                    c.retry_after = float(r.headers.get("retry-after", 1))
                    payload = r.json()
                    if r.status_code == 200:
                        c.texts = [ch["text"] for ch in sorted(payload["choices"], key=lambda ch: ch["index"])]
                    else:
                        c.shape_ok = error_shape_ok(payload)
            except httpx.TimeoutException as e:
                c.error = "hung up" if c.kind == "hangup" else f"timeout: {e!r}"
                return
            except (httpx.HTTPError, ValueError, KeyError) as e:
                c.error = f"{type(e).__name__}: {e}"
                return
            if c.status != 429:
                return
            c.retries += 1
            await asyncio.sleep(c.retry_after)


async def stream(client: httpx.AsyncClient, url: str, c: Case, kw: dict) -> None:
    async with client.stream("POST", url + "/v1/completions", timeout=120, **kw) as resp:
        c.status = resp.status_code
        c.retry_after = float(resp.headers.get("retry-after", 1))
        if resp.status_code != 200:
            c.shape_ok = error_shape_ok(json.loads(await resp.aread()))
            return
        n = len(c.prompts) or 1
        texts, done, finished, chunks = [""] * n, False, set(), 0
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                c.error = f"stream error: {chunk['error']['message']}"
                return
            for ch in chunk["choices"]:
                texts[ch["index"]] += ch["text"]
                if ch["finish_reason"]:
                    finished.add(ch["index"])
            chunks += 1
            if c.kind == "hangup_stream" and chunks >= 2:
                c.error = "hung up"
                return
        if not done or len(finished) != n:
            c.error = "the stream ended unfinished"
            return
        c.texts = texts


def judge(c: Case, answers: dict) -> str | None:
    """None when right; else "failures", "lost" or "changed"."""
    if c.kind in HANGUPS:  # hung up, or finished first; either way no error
        return None if c.error == "hung up" or c.status == 200 else "failures" if c.status else "lost"
    if c.error is not None or c.status is None:
        return "lost"
    if c.status not in c.expect or not c.shape_ok:
        return "failures"
    if c.kind in CHECKED:
        g = json.dumps(settings(c.body).to_dict(), sort_keys=True)
        if c.texts != [answers[(p, g)] for p in c.prompts]:
            return "changed"
    return None


def serve(engine: Engine, body_limit: int, read_timeout: float):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = create_app(engine, MODEL_NAME, max_body_bytes=body_limit)
    server = uvicorn.Server(server_config(app, log_level="error", read_timeout=read_timeout))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--tiny", action="store_true", help="a tiny random model and a byte tokenizer instead")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight at once")
    p.add_argument("--max-tokens", type=int, default=32, help="largest max_tokens of a valid request")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-queue", type=int, default=32)
    p.add_argument("--body-limit", type=int, default=1 << 20)
    p.add_argument("--hang-after", type=float, default=0.15, help="seconds a hanging-up client waits")
    p.add_argument("--read-timeout", type=float, default=2.0,
                   help="the server's read timeout (seconds a request may take to arrive whole)")
    p.add_argument("--retries", type=int, default=50, help="429s retried per request")
    p.add_argument("--seed", type=int, default=0, help="seed of the request plan")
    p.add_argument("--out", help="also write OUT.md and OUT.json")
    args = p.parse_args(argv)

    if args.tiny:
        from tmfast.testing import byte_tokenizer, tiny_model
        tok = byte_tokenizer()
        model, name = tiny_model(vocab_size=tok.get_vocab_size(), n_positions=96), "tiny random model"
    else:
        model, tok = load_checkpoint(args.checkpoint)
        name = os.path.relpath(args.checkpoint)
    context = model.config.n_positions
    cases = plan(args, context)
    t0 = time.perf_counter()
    answers = solo_answers(model, tok, cases)
    t_solo = time.perf_counter() - t0
    engine = Engine(model, tok, max_batch=args.max_batch, k_window=16, max_queue=args.max_queue)
    url, server, thread = serve(engine, args.body_limit, args.read_timeout)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    async def storm():
        sem = asyncio.Semaphore(args.concurrency)
        limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
        async with httpx.AsyncClient(limits=limits) as client:
            await asyncio.gather(*(fire(client, url, c, sem, args) for c in cases))
    t0 = time.perf_counter()
    try:
        asyncio.run(storm())
        wall = time.perf_counter() - t0
        deadline = time.time() + 10
        while engine.has_work and time.time() < deadline:  # hung-up requests must be aborted, not run out
            time.sleep(0.05)
        busy = engine.num_running + engine.num_queued
        health = httpx.get(url + "/health", timeout=10)
        metrics = httpx.get(url + "/metrics", timeout=10).text
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    rows, verdicts = {}, {}
    for c in cases:
        v = verdicts[id(c)] = judge(c, answers)
        expected = ("hang up (or 200)" if c.kind in HANGUPS else "hang up mid-body" if c.kind == "midbody"
                    else f"cut off after {args.read_timeout:g} s" if c.kind == "stalled"
                    else "/".join(map(str, sorted(c.expect))))
        row = rows.setdefault(c.kind, {"requests": 0, "expected": expected,
                                       "failures": 0, "lost": 0, "changed": 0, "retried_429": 0})
        row["requests"] += 1
        row["retried_429"] += c.retries
        if v:
            row[v] += 1
    total = {k: sum(r[k] for r in rows.values()) for k in ("requests", "failures", "lost", "changed", "retried_429")}
    outcomes = {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                if line.startswith("tmfast_requests_total{")}
    healthy = health.status_code == 200 and busy == 0
    info = machine_info()
    lines = [f"# model: {name}; max_batch={args.max_batch}, max_queue={args.max_queue}, "
             f"concurrency={args.concurrency}, body limit={args.body_limit} B, plan seed={args.seed}",
             "# machine: " + ", ".join(f"{k}={v}" for k, v in info.items()),
             "| kind | requests | expected status | failures | lost | changed | 429s retried |",
             "|---|---|---|---|---|---|---|"]
    for kind in KINDS:
        if kind in rows:
            r = rows[kind]
            lines.append(f"| {kind} | {r['requests']} | {r['expected']} | {r['failures']} | {r['lost']} | "
                         f"{r['changed']} | {r['retried_429']} |")
    lines.append(f"| **all** | {total['requests']} | | {total['failures']} | {total['lost']} | {total['changed']} "
                 f"| {total['retried_429']} |")
    lines.append(f"\nstorm {wall:.1f} s (solo answers {t_solo:.1f} s, {len(answers)} of them); after it: /health "
                 f"{health.status_code}, sequences still running or queued {busy}; peak RSS {rss0:.0f} → "
                 f"{rss1:.0f} MB; server outcomes: " + ", ".join(f"{k} {v:.0f}" for k, v in outcomes.items()))
    bad = [c for c in cases if verdicts[id(c)]]
    for c in bad[:10]:
        lines.append(f"- {verdicts[id(c)]}: {c.kind} status={c.status} error={c.error} "
                     f"body={str(c.body)[:120]}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
        command = f"# {env}python bench/soak.py {' '.join(sys.argv[1:] if argv is None else argv)}"
        Path(args.out + ".md").write_text(f"{command}\n{text}\n")
        Path(args.out + ".json").write_text(json.dumps({"machine": info, "args": vars(args), "rows": rows,
                                                        "total": total,
                                                        "wall_s": wall, "health": health.status_code, "busy": busy,
                                                        "server_outcomes": outcomes}, indent=2))
    return 0 if healthy and not (total["failures"] or total["lost"] or total["changed"]) else 1


if __name__ == "__main__":
    sys.exit(main())
