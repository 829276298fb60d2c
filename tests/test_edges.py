"""The edges a hostile client, an untrusted checkpoint and a new user hit (issue 18): each gives a
clean 4xx in the one JSON shape, a one-line error with exit 2, or a documented behaviour.

The stalled-client / descriptor-exhaustion fault injection is tests/test_server_faults.py.
"""
import json
import os
import resource
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import torch

from tmfast import GenerationConfig, MaturationEngine
from tmfast.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tmfast.config import ConfigError
from tmfast.engine import Engine, EngineBusyError, GenerationError
from tmfast.testing import byte_tokenizer, tiny_model
from test_cli import ckpt, run, run_any, tiny_checkpoint  # noqa: F401  (the tiny checkpoint fixture)
from test_server import ERROR_KEYS, Served, make_model, post, server, served, tok  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    return body["error"]


# -- server: types, model, empty body, messages, HEAD ----------------------------------------
@pytest.mark.parametrize("field, value", [
    ("max_tokens", True), ("max_tokens", "4"), ("max_tokens", 4.0), ("seed", True), ("n", True),
    ("stream", "yes"), ("stream", 1), ("return_tail", "y"), ("tail", "4"), ("guidance", "2"), ("guidance", True),
    ("stop", 5), ("model", 3), ("stream_options", {"include_usage": "yes"}),
])
def test_a_json_type_is_not_coerced_into_an_accepted_value(served, field, value):
    r = post(served, {"prompt": "hi", "max_tokens": 2, field: value} if field != "max_tokens"
             else {"prompt": "hi", field: value})
    assert r.status_code == 400, (field, value, r.text)
    err = error_of(r)
    assert err["param"] == field and err["message"]


def test_an_integer_is_still_a_number(served):
    assert post(served, {"prompt": "hi", "max_tokens": 2, "guidance": 2, "tail_noise": 0}).status_code == 200


def test_a_model_the_server_does_not_serve_is_a_404(served):
    for name in ("gpt-4", "", "TINY"):
        r = post(served, {"prompt": "hi", "max_tokens": 2, "model": name})
        assert r.status_code == 404 and error_of(r)["code"] == "model_not_found" and error_of(r)["param"] == "model"
    assert post(served, {"prompt": "hi", "max_tokens": 2, "model": "tiny"}).status_code == 200
    assert post(served, {"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_an_empty_body_names_the_prompt(served):
    for content in (b"", b"{}"):
        r = httpx.post(served + "/v1/completions", content=content, headers={"content-type": "application/json"})
        err = error_of(r)
        assert r.status_code == 400 and err["param"] == "prompt" and not err["message"].startswith(":"), err


def test_a_400_for_max_tokens_speaks_of_max_tokens(served):
    r = post(served, {"prompt": "hi", "max_tokens": 10 ** 6})
    err = error_of(r)
    assert r.status_code == 400 and err["param"] == "max_tokens"
    assert "max_tokens" in err["message"] and "max_new_tokens" not in err["message"], err


def test_head_health_answers_like_get(served):
    r = httpx.head(served + "/health")
    assert r.status_code == 200 and r.content == b""


# -- server: what h11 cannot parse, and clients that hang up mid-body ------------------------
def raw_exchange(url: str, data: bytes, timeout: float = 10) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        got = b""
        while chunk := s.recv(4096):
            got += chunk
    return got


@pytest.mark.parametrize("request_bytes", [
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    b"GARBAGE\r\n\r\n",
], ids=["header line", "negative length", "two lengths", "chunk size", "request line"])
def test_a_request_http_cannot_parse_gets_the_json_error_shape(served, request_bytes):
    head, _, body = raw_exchange(served, request_bytes).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower(), head
    err = json.loads(body)["error"]
    assert set(err) == ERROR_KEYS and err["code"] == "invalid_http"


def outcomes(url: str) -> dict:
    text = httpx.get(url + "/metrics").text
    return {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("tmfast_requests_total{")}


def test_a_client_that_hangs_up_mid_body_is_disconnected_not_invalid(served):
    before = outcomes(served)
    host, port = served.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100\r\n\r\n{\"prompt\":")
    s.close()
    for _ in range(100):
        after = outcomes(served)
        if after.get("disconnected", 0) > before.get("disconnected", 0):
            break
        threading.Event().wait(0.05)
    assert after.get("disconnected", 0) == before.get("disconnected", 0) + 1
    assert after.get("invalid", 0) == before.get("invalid", 0)


# -- server: a model that can only fail does not look healthy --------------------------------
def test_a_model_that_can_only_fail_makes_health_fail(tok):
    broken = make_model(tok)
    with torch.no_grad():
        broken.blocks[0].attn.c_attn.weight.fill_(float("nan"))  # every forward is NaN
    s = Served(Engine(broken, tok, max_batch=2, k_window=4))
    try:
        assert httpx.get(s.url + "/health").status_code == 200
        for _ in range(5):  # failing_after requests in a row fail; then a plain self-check fails too
            r = post(s.url, {"prompt": "hi", "max_tokens": 2, "tail": 4})
            assert r.status_code == 500 and error_of(r)["code"] == "engine_error"
        for _ in range(100):
            h = httpx.get(s.url + "/health")
            if h.status_code != 200:
                break
            threading.Event().wait(0.05)
        assert h.status_code == 503 and h.json()["error"]["code"] == "engine_failing", h.text
        m = httpx.get(s.url + "/metrics").text
        assert "tmfast_engine_loop_healthy 0.0" in m
    finally:
        s.close()


def test_hostile_requests_that_fail_alone_leave_a_good_model_healthy(tok):
    """Requests at the magnitude bounds may fail on their own; the self-check then passes."""
    s = Served(Engine(make_model(tok), tok, max_batch=2, k_window=4))
    try:
        hostile = {"prompt": "hi", "max_tokens": 4, "tail": 4, "alpha_max": 0.5, "guidance": 1000.0,
                   "embryo_scale": 1000.0, "tail_noise": 1000.0, "history_noise": 1000.0}
        for _ in range(6):
            post(s.url, hostile)
        threading.Event().wait(0.3)
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.close()


# -- serve flags that cannot be honoured: one line, exit 2, before anything is allocated -----
def test_serve_with_a_cache_no_machine_holds_is_one_line(ckpt, capsys):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    code, _, err = run(["serve", "--checkpoint", ckpt, "--max-batch", "100000000", "--port", str(port)], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("tmfast: error: ") and "GiB" in err, err


def test_serve_on_a_port_in_use_is_one_line(ckpt, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = run(["serve", "--checkpoint", ckpt, "--port", str(port)], capsys)
    assert code == 2 and err.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in err, err


@pytest.mark.parametrize("args, message", [
    (["serve", "--read-timeout", "0"], "--read-timeout"),
    (["serve", "--read-timeout", "nan"], "--read-timeout"),
    (["serve", "--max-queue", "x"], "--max-queue"),
    (["generate", "hi", "--max-tokens", "3"], "did you mean --max-new-tokens?"),
    (["generate", "hi", "--tial", "3"], "did you mean --tail?"),
])
def test_cli_mistakes_are_one_line(args, message, capsys):
    code, _, err = run_any(args, capsys)
    assert code == 2 and err.count("\n") == 1 and message in err and err.count("tmfast:") == 1, err


def test_a_batch_file_that_is_a_directory_says_so(tmp_path, capsys):
    code, _, err = run(["generate", "--batch-file", str(tmp_path)], capsys)
    assert code == 2 and "is a directory" in err, err


def test_version(capsys):
    from tmfast import __version__
    with pytest.raises(SystemExit) as e:
        run(["--version"], capsys)
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"tmfast {__version__}")


def test_impl_that_cannot_run_is_one_tmfast_prefix(ckpt):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # no interpreter: Triton cannot run
    p = subprocess.run([sys.executable, "-m", "tmfast", "generate", "hi", "--checkpoint", ckpt, "--impl", "triton"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and p.stderr.count("tmfast:") == 1 and p.stderr.count("\n") == 1, p.stderr


def test_a_flag_that_cannot_change_the_output_says_so(ckpt, capsys):
    code, out, err = run(["generate", "hi", "--checkpoint", ckpt, "--max-new-tokens", "3", "--guidance", "2"], capsys)
    plain = run(["generate", "hi", "--checkpoint", ckpt, "--max-new-tokens", "3"], capsys)
    assert code == 0 and "--guidance changes nothing at --alpha-max 1" in err and out == plain[1]
    code, _, err = run(["generate", "hi", "--checkpoint", ckpt, "--max-new-tokens", "3", "--guidance", "2",
                        "--alpha-max", "0.7"], capsys)
    assert code == 0 and "changes nothing" not in err


def test_compile_says_it_is_compiling(ckpt, capsys, monkeypatch):
    import tmfast.cli as cli
    real = cli.Engine
    monkeypatch.setattr(cli, "Engine", lambda *a, **kw: real(*a, **{**kw, "compile": False}))  # the words, not the wait
    code, _, err = run(["generate", "hi", "--checkpoint", ckpt, "--max-new-tokens", "2", "--compile"], capsys)
    assert code == 0 and "tmfast: compiling" in err


def test_no_numpy_warning_without_numpy(ckpt):
    """numpy is not in the runtime install: torch's "Failed to initialize NumPy" must not show."""
    block = "import sys; sys.modules['numpy'] = None\n"  # as if numpy were not installed
    p = subprocess.run([sys.executable, "-W", "default", "-c",
                        block + f"from tmfast.cli import main; sys.exit(main(['generate', 'hi', '--checkpoint', "
                                f"{ckpt!r}, '--max-new-tokens', '2']))"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "NumPy" not in p.stderr, p.stderr


# -- checkpoints ------------------------------------------------------------------------------
def _child_load(path: str) -> subprocess.CompletedProcess:
    code = ("import sys\nfrom tmfast.checkpoint import load_checkpoint, CheckpointError\n"
            f"try:\n    load_checkpoint({path!r})\nexcept CheckpointError as e:\n    print(e); sys.exit(2)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_a_config_that_does_not_describe_the_weights_is_refused_before_allocating(tmp_path_factory):
    path = Path(tiny_checkpoint(tmp_path_factory, "huge", 64))
    cfg = json.loads((path / "config.json").read_text())
    cfg["vocab_size"] = 4_000_000  # > 6 GB of table and head if it were believed
    (path / "config.json").write_text(json.dumps(cfg))
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    p = _child_load(str(path))
    peak_mb = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    assert p.returncode == 2 and "do not match its config" in p.stdout and "4000000" in p.stdout, p
    assert peak_mb < 1500, f"loading peaked at {peak_mb:.0f} MB"


def test_weights_that_are_not_finite_are_refused(tmp_path):
    tok = byte_tokenizer()
    m = tiny_model(vocab_size=tok.get_vocab_size(), n_positions=64)
    with torch.no_grad():
        m.blocks[1].mlp.c_fc.weight[3, 5] = float("nan")
    save_checkpoint(m, tmp_path / "nan", tokenizer=tok)
    with pytest.raises(CheckpointError, match=r"not finite \(blocks\.1\.mlp\.c_fc\.weight"):
        load_checkpoint(tmp_path / "nan")


def test_a_tokenizer_bigger_than_the_model_is_refused_at_load(tmp_path):
    tok = byte_tokenizer()
    m = tiny_model(vocab_size=tok.get_vocab_size() - 10, n_positions=64)
    save_checkpoint(m, tmp_path / "small", tokenizer=tok)
    with pytest.raises(CheckpointError, match="more than the model's vocab_size"):
        load_checkpoint(tmp_path / "small")


# -- Python API ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_parts():
    tok = byte_tokenizer()
    return tiny_model(vocab_size=tok.get_vocab_size(), n_positions=64), tok


def test_prompt_tensors_without_values_are_generation_errors(engine_parts):
    model, tok = engine_parts
    eng = Engine(model, tok, max_batch=2, k_window=4)
    d = model.config.n_embd
    for bad in (torch.empty(3, d, device="meta"), torch.zeros(3, d).to_sparse()):
        with pytest.raises(GenerationError, match="dense tensor"):
            eng.add_request(bad)


def test_a_stop_string_that_is_not_unicode_is_a_config_error():
    with pytest.raises(ConfigError, match="valid Unicode") as e:
        GenerationConfig(stop="\ud800")
    assert e.value.param == "stop"


@pytest.mark.parametrize("kw, param", [
    ({"max_len": 1}, "max_len"), ({"max_batch": True}, "max_batch"), ({"max_batch": 2.5}, "max_batch"),
    ({"max_queue": None}, "max_queue"), ({"k_window": "4"}, "k_window"), ({"max_batch": 0}, "max_batch"),
])
def test_engine_arguments_are_checked_in_one_line(engine_parts, kw, param):
    model, tok = engine_parts
    with pytest.raises(GenerationError) as e:
        Engine(model, tok, **{"k_window": 4, **kw})
    assert e.value.param == param and "\n" not in str(e.value)


def test_generate_takes_a_dict_as_add_request_does(engine_parts):
    model, tok = engine_parts
    [r] = MaturationEngine(model, tok).generate(["a"], {"max_new_tokens": 3, "tail": 4})
    assert len(r.token_ids) == 3
    with pytest.raises(GenerationError, match="GenerationConfig or a dict"):
        MaturationEngine(model, tok).generate(["a"], 3)


def test_two_threads_in_one_engine_get_a_clear_error_and_the_engine_lives_on(engine_parts):
    model, tok = engine_parts
    g = GenerationConfig(max_new_tokens=6, tail=4, seed=1)
    [alone] = MaturationEngine(model, tok).generate(["Hi"], g)
    eng = Engine(model, tok, max_batch=2, k_window=4)
    rid = eng.add_request("Hi", g)
    inside, go_on = threading.Event(), threading.Event()
    real_launch = eng._batch.launch

    def held_launch(*a, **kw):  # the first thread stays inside step() until the second has tried
        inside.set()
        go_on.wait(10)
        return real_launch(*a, **kw)
    eng._batch.launch = held_launch
    events = []
    first = threading.Thread(target=lambda: events.extend(eng.step()))
    first.start()
    assert inside.wait(10)
    for call in (eng.step, lambda: eng.add_request("x"), lambda: eng.abort(rid)):
        with pytest.raises(EngineBusyError, match="not thread-safe"):
            call()
    go_on.set()
    first.join(10)
    eng._batch.launch = real_launch
    events += list(eng.run())
    assert [t for e in events if e.request_id == rid for t in e.token_ids] == alone.token_ids
    assert eng.num_running == 0 and not eng.has_work
