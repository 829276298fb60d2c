"""The HTTP endpoint, served for real on loopback (bounded request counts and time)."""
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn

from tmfast.testing import byte_tokenizer, tiny_model
from tmfast import GenerationConfig, MaturationEngine
from tmfast.engine import Engine
from tmfast.server import create_app


def make_model(tok):
    return tiny_model(vocab_size=tok.get_vocab_size(), n_positions=96)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def reference(tok):
    """Solo answers from a separate, identical model (the server's runs in another thread)."""
    eng = MaturationEngine(make_model(tok), tok)

    def answer(prompt, **kw):  # kw: the other fields of a request body
        g = GenerationConfig(max_new_tokens=kw.get("max_tokens", 16), tail=kw.get("tail", 16),
                             guidance=kw.get("guidance", 1.0), seed=kw.get("seed", 0),
                             stop=tuple([kw["stop"]] if isinstance(kw.get("stop"), str) else kw.get("stop", ())))
        return eng.generate([prompt], g)[0].text
    return answer


class Served:
    def __init__(self, engine):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(engine, "tiny"), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def served(tok):
    s = Served(Engine(make_model(tok), tok, max_batch=4, k_window=16, max_queue=16))
    yield s.url
    s.close()


def test_health(served):
    r = httpx.get(served + "/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["max_batch"] == 4


def test_completion_matches_the_engine_alone(served, reference):
    r = httpx.post(served + "/v1/completions", json={"prompt": "In the beginning", "max_tokens": 12,
                                                     "tail": 4, "guidance": 2.0, "seed": 3}, timeout=60)
    body = r.json()
    assert r.status_code == 200, body
    choice = body["choices"][0]
    assert choice["text"] == reference("In the beginning", max_tokens=12, tail=4, guidance=2.0, seed=3)
    assert choice["finish_reason"] == "length" and len(choice["token_ids"]) == 12
    assert body["usage"]["completion_tokens"] == 12 and body["usage"]["prompt_tokens"] == len("In the beginning")


def test_streaming_deltas_concatenate_to_the_full_text(served, reference):
    req = {"prompt": "Hello", "max_tokens": 20, "tail": 8, "seed": 1, "stream": True, "return_tail": True}
    chunks, done = [], False
    with httpx.stream("POST", served + "/v1/completions", json=req, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunks.append(json.loads(line[6:])["choices"][0])
    assert done and len(chunks) == 20
    assert "".join(c["text"] for c in chunks) == reference("Hello", max_tokens=20, tail=8, seed=1)
    assert [c["finish_reason"] for c in chunks] == [None] * 19 + ["length"]
    assert all(len(c["tail"]) == 7 for c in chunks)  # the K-1 slots still liquid


def test_concurrent_clients_get_their_own_answers(served, reference):
    reqs = [{"prompt": f"Prompt number {i}", "max_tokens": 10 + i, "tail": (1, 4, 16)[i % 3],
             "guidance": (1.0, 2.0)[i % 2], "seed": i} for i in range(8)]

    def call(req):
        return httpx.post(served + "/v1/completions", json=req, timeout=120).json()["choices"][0]["text"]
    with ThreadPoolExecutor(max_workers=8) as pool:
        texts = list(pool.map(call, reqs))
    for req, text in zip(reqs, texts):
        assert text == reference(**req), req


@pytest.mark.parametrize("payload, status, param", [
    (b"{not json", 400, None),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "hi", "tail": 0}, 400, "tail"),
    ({"prompt": "hi", "tail": 17}, 400, "tail"),
    ({"prompt": "hi", "bogus": 1}, 400, "bogus"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": [1, 2, 9999]}, 400, "prompt"),
    ({"prompt": "hi", "max_tokens": 500}, 400, "max_tokens"),
    ({"prompt": "hi", "stop": [""]}, 400, "stop"),
    ({"prompt": "hi", "n": 2}, 400, "n"),
    ({"prompt": "hi", "guidance": "strong"}, 400, "guidance"),
    ({"prompt": "hi", "tail_noise": -1}, 400, "tail_noise"),
    ({"prompt": "hi", "history_noise": -0.5}, 400, "history_noise"),
])
def test_bad_requests_get_a_4xx_naming_the_field(served, payload, status, param):
    kw = {"content": payload, "headers": {"content-type": "application/json"}} if isinstance(payload, bytes) \
        else {"json": payload}
    r = httpx.post(served + "/v1/completions", timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"]


def test_queue_full_is_a_429(tok):
    s = Served(Engine(make_model(tok), tok, max_batch=1, k_window=4, max_queue=0))
    try:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "tail": 4}, timeout=30)
        assert r.status_code == 429 and r.json()["error"]["type"] == "queue_full"
    finally:
        s.close()


def test_clients_get_the_engine_between_steps_even_when_it_is_always_busy(tok):
    """A plain lock lets the loop thread take the engine back right after each step; then
    concurrent requests trickled in a few per step (measured: batches of ~2 under 32 clients).
    Each client must get in before the next step."""
    import asyncio

    from tmfast.server import EngineLoop
    engine = Engine(make_model(tok), tok, max_batch=16, k_window=4, max_queue=64)
    steps = []
    plain_step = engine.step

    def slow_step():  # a step long enough that every client is waiting when it ends, holding the GIL
        t = time.perf_counter()
        while time.perf_counter() - t < 0.01:
            pass
        out = plain_step()
        steps.append(engine.num_running)
        return out
    engine.step = slow_step
    loop = EngineLoop(engine)
    loop.start()
    try:
        async def submit(n_tokens):
            before = len(steps)
            loop.submit("Hello", GenerationConfig(max_new_tokens=n_tokens, tail=4), False)
            return len(steps) - before
        assert asyncio.run(submit(60)) <= 1  # keeps the loop busy for the whole test
        while not steps:
            time.sleep(0.005)
        barrier = threading.Barrier(8)

        def client(_):
            barrier.wait()
            return asyncio.run(submit(30))
        with ThreadPoolExecutor(max_workers=8) as pool:
            waited = list(pool.map(client, range(8)))
        assert max(waited) <= 2, waited  # steps the engine ran while a client waited to submit
        deadline = time.time() + 30
        while engine.has_work and time.time() < deadline:
            time.sleep(0.01)
        assert max(steps) == 9  # the 8 ran together, beside the long one
    finally:
        loop.stop()
