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
from tmfast.server import create_app, server_config


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
    def __init__(self, engine, server_options=None, **app_options):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.engine, self.app = engine, create_app(engine, "tiny", **app_options)
        self.server = uvicorn.Server(server_config(self.app, log_level="warning", **(server_options or {})))
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
def server(tok):
    s = Served(Engine(make_model(tok), tok, max_batch=4, k_window=16, max_queue=16))
    yield s
    s.close()


@pytest.fixture(scope="module")
def served(server):
    return server.url


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


def test_max_queue_0_means_no_waiting_not_no_requests(tok):
    """max_queue=0: a request a free slot takes is served; one that would have to wait is a 429."""
    s = Served(slowed(Engine(make_model(tok), tok, max_batch=1, k_window=4, max_queue=0), 0.02))
    try:
        assert post(s.url, {"prompt": "hi", "tail": 4, "max_tokens": 3}).status_code == 200
        with ThreadPoolExecutor(max_workers=1) as pool:
            first = pool.submit(post, s.url, {"prompt": "long", "max_tokens": 40, "tail": 4})
            assert wait_until(lambda: s.engine.num_running == 1, 5)
            r = post(s.url, {"prompt": "hi", "tail": 4})
            assert r.status_code == 429 and r.json()["error"]["type"] == "queue_full"
            assert int(r.headers["retry-after"]) >= 1 and set(r.json()["error"]) == ERROR_KEYS
            assert first.result().status_code == 200
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


# -- issue 11: what no request may break ------------------------------------------------------

ERROR_KEYS = {"message", "type", "param", "code"}


def post(url, body=None, timeout=30, **kw):
    return httpx.post(url + "/v1/completions", json=body, timeout=timeout, **kw)


def slowed(engine, seconds):
    """Each step takes at least `seconds` (a model big enough that a request lasts a while)."""
    plain = engine.step

    def step():
        time.sleep(seconds)
        return plain()
    engine.step = step
    return engine


def wait_until(cond, timeout, every=0.02):
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            return False
        time.sleep(every)
    return True


@pytest.mark.parametrize("seed", [18446744073709551616, 2 ** 200, -1])
def test_a_seed_out_of_range_is_a_400_naming_seed_and_the_server_lives_on(served, reference, seed):
    """Issue 11: seed 2**64 killed the engine thread; later requests hung, /health said ok."""
    r = post(served, {"prompt": "hi", "seed": seed, "alpha_max": 0.5, "max_tokens": 4})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "seed"
    assert httpx.get(served + "/health", timeout=10).status_code == 200
    r = post(served, {"prompt": "hi", "max_tokens": 6, "seed": 5})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference("hi", max_tokens=6, seed=5)


def test_the_loop_survives_a_failed_step_even_when_fail_running_fails_too(tok, reference):
    """The requests the engine lost get an error (no client waits forever); the loop goes on."""
    engine = Engine(make_model(tok), tok, max_batch=4, k_window=16, max_queue=16)
    plain_step, plain_fail = engine.step, engine.fail_running
    armed = [True]

    def step():
        out = plain_step()
        if armed[0]:
            armed[0] = False
            raise RuntimeError("boom")
        return out

    def fail_running(message):
        plain_fail(message)  # the requests are gone from the engine, and their events with them
        raise RuntimeError("fail_running broke too")
    engine.step, engine.fail_running = step, fail_running
    s = Served(engine)
    try:
        r = post(s.url, {"prompt": "hi", "max_tokens": 4}, timeout=20)
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert set(err) == ERROR_KEYS and "boom" in err["message"] and err["type"] == "server_error"
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200
        r = post(s.url, {"prompt": "hi", "max_tokens": 6, "seed": 2}, timeout=20)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference("hi", max_tokens=6, seed=2)
        assert s.app.state.engine_loop.thread.is_alive()
    finally:
        s.close()


def test_health_is_503_when_the_loop_is_stuck_or_dead(tok):
    """An orchestrator restarts what /health fails: a loop with no heartbeat while there is work
    (stuck in a step), or a loop thread that is gone."""
    engine = Engine(make_model(tok), tok, max_batch=4, k_window=16, max_queue=16)
    s = Served(engine, stall_after=0.5)
    gate = threading.Event()
    plain = engine.step

    def stuck():
        gate.wait(timeout=30)
        return plain()
    try:
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200
        engine.step = stuck
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(post, s.url, {"prompt": "hi", "max_tokens": 3}, 30)
            assert wait_until(lambda: httpx.get(s.url + "/health", timeout=10).status_code == 503, 5)
            body = httpx.get(s.url + "/health", timeout=10).json()
            assert body["status"] == "unhealthy" and body["error"]["code"] == "engine_stuck"
            gate.set()
            assert pending.result().status_code == 200
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200
        s.app.state.engine_loop.stop()
        r = httpx.get(s.url + "/health", timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        r = post(s.url, {"prompt": "hi", "max_tokens": 3})
        assert r.status_code == 503 and set(r.json()["error"]) == ERROR_KEYS
    finally:
        gate.set()
        s.close()


def test_requests_in_flight_when_the_loop_stops_get_a_503_not_a_hang(tok):
    s = Served(slowed(Engine(make_model(tok), tok, max_batch=2, k_window=16, max_queue=8), 0.03))
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            pending = [pool.submit(post, s.url, {"prompt": f"late {i}", "max_tokens": 60, "stream": i == 2}, 20)
                       for i in range(3)]
            assert wait_until(lambda: s.engine.num_running == 2, 5)
            s.app.state.engine_loop.stop()
            plain = [pending[0].result(), pending[1].result()]
            streamed = pending[2].result()
        for r in plain:
            assert r.status_code == 503 and r.json()["error"]["code"] == "aborted", r.text
        assert streamed.status_code == 200 and '"code":"aborted"' in streamed.text.replace(" ", "")
    finally:
        s.close()


HOSTILE = [
    {"guidance": 1e30, "alpha_max": 0.5},
    {"guidance": -1e30, "alpha_max": 0.5, "tail": 8},
    {"embryo_scale": 1e30, "alpha_max": 0.5},
    {"history_noise": 1e30},
    {"tail_noise": 1e30},
    {"guidance": "Infinity"},  # JSON as Python reads it: Infinity and NaN literals
    {"alpha_max": "NaN", "tail": 4},
]


def post_hostile(url, hostile):
    fields = ", ".join(f'"{k}": {v}' for k, v in hostile.items())
    return httpx.post(url + "/v1/completions", content='{"prompt": "hi", "max_tokens": 4, %s}' % fields,
                      headers={"content-type": "application/json"}, timeout=30)


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_magnitudes_get_a_4xx_naming_the_field(served, hostile):
    """Issue 11: {"guidance": 1e30, "alpha_max": 0.5} gave a 500 (and poisoned later requests)."""
    r = post_hostile(served, hostile)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["param"] in hostile


def test_after_hostile_requests_the_next_20_get_their_solo_answers(served, reference):
    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(400 <= r.status_code < 500 for r in pool.map(lambda h: post_hostile(served, h), HOSTILE))
    reqs = [{"prompt": f"After {i}", "max_tokens": 6 + i % 5, "tail": (1, 4, 16)[i % 3],
             "guidance": (1.0, 2.0)[i % 2], "seed": i} for i in range(20)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        texts = list(pool.map(lambda q: post(served, q, 120).json()["choices"][0]["text"], reqs))
    assert texts == [reference(**q) for q in reqs]


def test_a_request_at_the_magnitude_bounds_poisons_nothing(served, reference):
    """Whatever the largest allowed magnitudes do to their own request (200, or a 500 for a
    non-finite tail), the slot they ran in gives the next requests their solo answers."""
    edge = {"prompt": "edge", "max_tokens": 8, "guidance": 1000.0, "alpha_max": 0.5, "embryo_scale": 1000.0,
            "tail_noise": 1000.0, "history_noise": 1000.0}
    reqs = [{"prompt": f"Next {i}", "max_tokens": 8, "tail": 4, "seed": i, "guidance": 2.0} for i in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        edges = [pool.submit(post, served, edge) for _ in range(4)]
        assert all(f.result().status_code in (200, 500) for f in edges)
        texts = list(pool.map(lambda q: post(served, q, 120).json()["choices"][0]["text"], reqs))
    assert texts == [reference(**q) for q in reqs]


def test_clients_that_give_up_are_aborted(tok):
    """Issue 11: 32 non-streaming clients with a 0.3 s timeout kept 32 slots busy for ~15 s."""
    s = Served(slowed(Engine(make_model(tok), tok, max_batch=4, k_window=16, max_queue=32), 0.03))
    try:
        def give_up(i):
            req = {"prompt": f"client {i}", "max_tokens": 80, "tail": 4}
            if i % 2:
                with httpx.stream("POST", s.url + "/v1/completions", json={**req, "stream": True}, timeout=30) as r:
                    next(r.iter_lines())  # one chunk, then hang up
                return "stream"
            with pytest.raises(httpx.TimeoutException):
                post(s.url, req, timeout=0.3)
            return "plain"
        with ThreadPoolExecutor(max_workers=8) as pool:
            kinds = list(pool.map(give_up, range(8)))
        assert kinds.count("plain") == 4
        # unaborted, they would run 2 batches × 80 steps × 30 ms ≈ 5 s
        assert wait_until(lambda: not s.engine.has_work, 1.5), (s.engine.num_running, s.engine.num_queued)
        text = httpx.get(s.url + "/metrics", timeout=10).text
        assert 'tmfast_requests_total{outcome="disconnected"} 8.0' in text
    finally:
        s.close()


def test_an_oversize_body_is_a_413_and_a_long_prompt_a_400_before_it_is_tokenised(served):
    """Issue 11: a 10 MB prompt took 17.6 s to be refused, and RSS went 0.52 → 3.29 GB."""
    t = time.perf_counter()
    r = post(served, {"prompt": "x" * (10 << 20)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert set(r.json()["error"]) == ERROR_KEYS
    r = post(served, {"prompt": "word " * 150_000})  # 750 kB: under the body limit, far over the context
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert time.perf_counter() - t < 5
    r = post(served, {"prompt": "é" * 60})  # 60 characters, 120 byte tokens: over the 96-token context
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "prompt" and "120 tokens" in err["message"]
    r = post(served, {"prompt": [1] * 97})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_the_body_limit_is_configurable_and_counts_chunked_bodies(tok):
    s = Served(Engine(make_model(tok), tok, max_batch=2, k_window=16), max_body_bytes=64)

    def chunks():
        yield b'{"prompt": "'
        yield b"x" * 100
        yield b'"}'
    try:
        r = httpx.post(s.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"},
                       timeout=10)
        assert r.status_code == 413 and "64 bytes" in r.json()["error"]["message"]
        assert post(s.url, {"prompt": "hi", "max_tokens": 2}).status_code == 200
    finally:
        s.close()


def test_prompts_are_tokenised_off_the_event_loop_outside_the_engine_lock(tok):
    """The engine gets token ids; tokenising happened in a worker thread, not inside add_request."""
    inside = threading.local()
    seen = []

    class Tok:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def encode(self, text, *a, **kw):
            seen.append((threading.current_thread(), getattr(inside, "flag", False)))
            return self.inner.encode(text, *a, **kw)
    engine = Engine(make_model(tok), Tok(tok), max_batch=2, k_window=16)
    plain_add = engine.add_request
    prompts = []

    def add_request(prompt, *a, **kw):
        inside.flag = True
        try:
            prompts.append(prompt)
            return plain_add(prompt, *a, **kw)
        finally:
            inside.flag = False
    engine.add_request = add_request
    s = Served(engine)
    try:
        assert post(s.url, {"prompt": "Hello there", "max_tokens": 2}).status_code == 200
        assert seen and all(t is not s.thread and not flag for t, flag in seen)
        assert prompts == [list(tok.encode("Hello there").ids)]
    finally:
        s.close()


@pytest.mark.parametrize("raw, param", [
    (b'{"prompt": "\\ud800 abc"}', "prompt"),
    (b'{"prompt": ["fine", "\\udfff"]}', "prompt"),
    (b'{"prompt": "hi", "stop": ["\\ud800"]}', "stop"),
    (b'{"prompt": "hi", "\\ud800": 1}', None),  # a key: pydantic cannot say which
    (b'{"prompt": "\xff\xfe"}', None),  # not UTF-8 at all
])
def test_bad_unicode_is_a_400_json_error(served, raw, param):
    """Issue 11: "\\ud800 abc" gave a plain-text 500 and a reset connection."""
    with httpx.Client(timeout=30) as client:
        r = client.post(served + "/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.headers["content-type"] == "application/json"
        assert r.json()["error"]["param"] == param and r.json()["error"]["message"]
        assert client.post(served + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_every_error_has_one_shape(server, served):
    cases = [httpx.get(served + "/nope", timeout=10), httpx.get(served + "/v1/completions", timeout=10),
             httpx.post(served + "/v1/completions", content=b"[1, 2]", timeout=10,
                        headers={"content-type": "application/json"}),
             post(served, {"prompt": "x" * (2 << 20)}), httpx.get(served + "/v1/models/other", timeout=10)]
    assert [r.status_code for r in cases] == [404, 405, 400, 413, 404]
    engine = server.engine

    def broken(*a, **kw):
        raise RuntimeError("a bug")
    engine.add_request = broken
    try:
        cases.append(post(served, {"prompt": "hi"}))
    finally:
        del engine.add_request
    assert cases[-1].status_code == 500 and cases[-1].json()["error"]["type"] == "server_error"
    for r in cases:
        assert r.headers["content-type"] == "application/json", r.text
        assert set(r.json()) == {"error"} and set(r.json()["error"]) == ERROR_KEYS, r.text
    assert post(served, {"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_several_prompts_are_queued_all_or_none(tok):
    s = Served(slowed(Engine(make_model(tok), tok, max_batch=1, k_window=4, max_queue=2), 0.02))
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            first = pool.submit(post, s.url, {"prompt": "long", "max_tokens": 40, "tail": 4})
            assert wait_until(lambda: s.engine.num_running == 1, 5)
            second = pool.submit(post, s.url, {"prompt": "next", "max_tokens": 4, "tail": 4})
            assert wait_until(lambda: s.engine.num_queued == 1, 5)
            r = post(s.url, {"prompt": ["a", "b"], "max_tokens": 4, "tail": 4})  # room for one of the two
            assert r.status_code == 429 and r.headers["retry-after"]
            assert s.engine.num_queued == 1  # the one that fitted was taken back
            r = post(s.url, {"prompt": ["a", "b", "c", "d"], "max_tokens": 4, "tail": 4})
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"  # can never fit (1 slot + 2)
            assert first.result().status_code == 200 and second.result().status_code == 200
    finally:
        s.close()


def test_max_tokens_defaults_to_the_generation_config_default(served, reference):
    n = GenerationConfig().max_new_tokens
    r = post(served, {"prompt": "Hi"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == n
    assert r.json()["choices"][0]["text"] == reference("Hi", max_tokens=n)


def test_models_lists_the_one_model_with_its_context(served):
    body = httpx.get(served + "/v1/models", timeout=10).json()
    assert body["object"] == "list" and len(body["data"]) == 1
    card = body["data"][0]
    assert card["id"] == "tiny" and card["object"] == "model" and card["owned_by"] == "tmfast"
    assert card["max_model_len"] == card["context_length"] == 96 and isinstance(card["created"], int)
    assert httpx.get(served + "/v1/models/tiny", timeout=10).json() == card


def test_metrics_in_prometheus_format_from_the_apps_own_registry(served, tok):
    assert post(served, {"prompt": "hi", "max_tokens": 3}).status_code == 200
    assert post(served, {"prompt": "hi", "max_tokens": 0}).status_code == 400
    r = httpx.get(served + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in ("tmfast_requests_total{outcome=\"ok\"}", "tmfast_requests_total{outcome=\"invalid\"}",
                 "tmfast_queue_depth", "tmfast_running_sequences", "tmfast_generated_tokens_total",
                 "tmfast_prompt_tokens_total", "tmfast_time_to_first_token_seconds_bucket",
                 "tmfast_engine_step_seconds_bucket", "tmfast_engine_step_failures_total"):
        assert name in r.text, name
    create_app(Engine(make_model(tok), tok, max_batch=1, k_window=4), "second")  # no registry collision


@pytest.mark.parametrize("field, value", [
    ("logprobs", None), ("logprobs", 0), ("presence_penalty", 0), ("frequency_penalty", 0.0), ("echo", False),
    ("suffix", None), ("logit_bias", None), ("logit_bias", {}), ("n", 1), ("best_of", 1), ("temperature", 0.7),
    ("top_p", 0.9), ("user", "someone"), ("stream_options", {"include_usage": False}), ("model", "tiny"),
])
def test_openai_default_valued_fields_are_accepted(served, reference, field, value):
    r = post(served, {"prompt": "Hi", "max_tokens": 5, "seed": 4, field: value})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == reference("Hi", max_tokens=5, seed=4)


@pytest.mark.parametrize("field, value", [
    ("logprobs", 2), ("echo", True), ("presence_penalty", 0.5), ("frequency_penalty", -1), ("suffix", "end"),
    ("logit_bias", {"50": 10}), ("best_of", 3), ("n", 3),
])
def test_what_tmfast_cannot_do_is_a_clear_400(served, field, value):
    r = post(served, {"prompt": "Hi", field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field and field in r.json()["error"]["message"]


def test_a_list_of_prompts_gets_one_choice_each(served, reference):
    r = post(served, {"prompt": ["Hello", "In the beginning"], "max_tokens": 7, "seed": 2})
    body = r.json()
    assert r.status_code == 200, body
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["text"] for c in body["choices"]] == [reference(p, max_tokens=7, seed=2)
                                                    for p in ("Hello", "In the beginning")]
    assert body["usage"] == {"prompt_tokens": 5 + 16, "completion_tokens": 14, "total_tokens": 35}
    ids = [list(b"Hello"), list(b"Hi")]
    ids = [[t + 1 for t in p] for p in ids]  # byte_tokenizer: id = byte + 1 (0 is <|endoftext|>)
    r = post(served, {"prompt": ids, "max_tokens": 4})
    assert len(r.json()["choices"]) == 2 and r.json()["usage"]["prompt_tokens"] == 7
    r = post(served, {"prompt": ids[0], "max_tokens": 4})  # one list of ints: one prompt
    assert len(r.json()["choices"]) == 1 and r.json()["usage"]["prompt_tokens"] == 5


def stream_events(url, body):
    out = []
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line[6:])
    assert out[-1] == "[DONE]"
    return [json.loads(x) for x in out[:-1]]


def test_streams_of_several_prompts_with_usage(served, reference):
    chunks = stream_events(served, {"prompt": ["Hello", "Hi"], "max_tokens": 6, "seed": 1,
                                    "stream_options": {"include_usage": True}})
    *body, final = chunks
    assert final["choices"] == [] and final["usage"] == {"prompt_tokens": 7, "completion_tokens": 12,
                                                          "total_tokens": 19}
    assert all(c["usage"] is None for c in body)
    for i, p in enumerate(("Hello", "Hi")):
        mine = [c["choices"][0] for c in body if c["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == reference(p, max_tokens=6, seed=1)
        assert mine[-1]["finish_reason"] == "length"
    assert "usage" not in stream_events(served, {"prompt": "Hi", "max_tokens": 2})[-1]


def test_one_log_line_per_request_with_its_id(served, caplog):
    import logging
    with caplog.at_level(logging.INFO, logger="tmfast.server"):
        ok = post(served, {"prompt": "hi", "max_tokens": 3})
        bad = post(served, {"prompt": "hi", "tail": 99})
        time.sleep(0.1)
    lines = [r.getMessage() for r in caplog.records if r.name == "tmfast.server"]
    for resp, outcome in ((ok, "outcome=ok status=200"), (bad, "outcome=invalid status=400")):
        rid = resp.headers["x-request-id"]
        mine = [line for line in lines if rid in line]
        assert len(mine) == 1 and outcome in mine[0] and "duration_ms=" in mine[0], lines
    assert ok.json()["id"] == ok.headers["x-request-id"] and "completion_tokens=3" in \
        [line for line in lines if ok.headers["x-request-id"] in line][0]


SERVE_SCRIPT = """
import sys, time
from tmfast.testing import byte_tokenizer, tiny_model
from tmfast.engine import Engine
from tmfast.server import serve
tok = byte_tokenizer()
engine = Engine(tiny_model(vocab_size=tok.get_vocab_size(), n_positions=96), tok, max_batch=4, k_window=16)
plain = engine.step
def step():
    time.sleep(0.02)
    return plain()
engine.step = step
serve(engine, port=int(sys.argv[1]), model_name="tiny", log_level="warning")
"""


def test_one_sigterm_drains_the_requests_in_flight_and_exits(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-c", SERVE_SCRIPT, str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        def up():
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False
        assert wait_until(up, 60, 0.1), proc.stdout.read1().decode() if proc.poll() is not None else "no start"
        with ThreadPoolExecutor(max_workers=2) as pool:
            pending = [pool.submit(post, url, {"prompt": f"drain {i}", "max_tokens": 50, "tail": 4}, 30)
                       for i in range(2)]
            assert wait_until(lambda: httpx.get(url + "/health", timeout=5).json()["running"] == 2, 10)
            proc.send_signal(signal.SIGTERM)
            for f in pending:
                r = f.result()
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 50
        proc.wait(timeout=15)  # one signal is enough
        assert proc.returncode in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_compiling_server_says_starting_until_every_step_variant_is_compiled(tok):
    """`tmfast serve --compile`: the engine compiles before it serves; meanwhile /health is 503
    "starting" (a load balancer keeps it out) and a completion is a 503 with Retry-After."""
    engine = Engine(make_model(tok), tok, max_batch=2, k_window=4, max_queue=8)
    gate, calls = threading.Event(), []
    real = engine.warmup

    def slow_warmup(on_variant=None):  # what a compile of every variant does: take a while, report progress
        calls.append(1)
        on_variant(1, 2)
        gate.wait(timeout=30)
        return real(on_variant)
    engine.warmup = slow_warmup
    s = Served(engine, warmup=True)
    try:
        assert wait_until(lambda: calls, 5)
        r = httpx.get(s.url + "/health", timeout=10)
        body = r.json()
        assert r.status_code == 503 and body["status"] == "starting" and body["error"]["code"] == "engine_starting"
        assert "1/2 step variants" in body["error"]["message"]
        r = post(s.url, {"prompt": "hi", "max_tokens": 3})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_starting" and "retry-after" in r.headers
        gate.set()
        assert wait_until(lambda: httpx.get(s.url + "/health", timeout=10).status_code == 200, 10)
        assert post(s.url, {"prompt": "hi", "max_tokens": 3}).status_code == 200
    finally:
        gate.set()
        s.close()
