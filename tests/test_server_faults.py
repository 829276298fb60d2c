"""Fault injection: `tmfast serve` in its own process with few file descriptors, against clients
that stall in the middle of their requests until the server runs out of descriptors.

They must be cut off after the read timeout (`--read-timeout`), /health must answer again once
they are, a real request must still be served, SIGTERM must end the server cleanly with a client
still stalled, and the log must stay a bounded number of lines (no traceback per accept).
"""
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from test_cli import tiny_checkpoint

READ_TIMEOUT = 1.0
FD_LIMIT = 96  # the server's soft RLIMIT_NOFILE: a loaded idle server holds fewer than 40 here
STALLED = 160  # more stalled clients than the server has descriptors
STALL = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"pr"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path_factory, tmp_path):
    ckpt = tiny_checkpoint(tmp_path_factory, "faults", 64)
    port = free_port()
    log = open(tmp_path / "server.log", "w+b")

    def few_fds():
        resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))
    proc = subprocess.Popen([sys.executable, "-m", "tmfast", "serve", "--checkpoint", ckpt, "--port", str(port),
                             "--read-timeout", str(READ_TIMEOUT), "--max-batch", "4"],
                            stdout=log, stderr=subprocess.STDOUT, preexec_fn=few_fds,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        assert proc.poll() is None, log_text(log)
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "server did not start:\n" + log_text(log)
        time.sleep(0.2)
    yield proc, url, port, log
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


def log_text(log) -> str:
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")


def stall(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(STALL)
    return s


def stalled_client(port: int) -> tuple[float, bytes]:
    """Connect (the kernel may hold the SYN while the listen queue is full), send a request that
    stops mid-body, wait for the server to end it: (seconds from connect to close, what it sent)."""
    with stall(port) as s:
        t0, got = time.perf_counter(), b""
        try:
            while chunk := s.recv(4096):
                got += chunk
        except ConnectionResetError:
            pass
        return time.perf_counter() - t0, got


def test_stalled_clients_are_cut_off_the_server_recovers_and_the_log_stays_short(server):
    proc, url, port, log = server
    n_idle = len(os.listdir(f"/proc/{proc.pid}/fd"))
    assert n_idle + 20 < FD_LIMIT, f"the idle server holds {n_idle} descriptors: raise FD_LIMIT"
    with ThreadPoolExecutor(STALLED) as pool:  # all at once: more than the server can hold
        futures = [pool.submit(stalled_client, port) for _ in range(STALLED)]
        peak = 0
        while not all(f.done() for f in futures):
            peak = max(peak, len(os.listdir(f"/proc/{proc.pid}/fd")))
            time.sleep(0.02)
        ends = [f.result() for f in futures]  # a client held for good would raise socket.timeout here
    # the server kept descriptors to spare; every stalled client was ended, those it held after the
    # read timeout (not before), those past its connection cap at once with a 503 in the JSON shape
    assert peak <= FD_LIMIT - 8, f"{peak} of {FD_LIMIT} descriptors taken"
    cut = [t for t, got in ends if got == b""]
    refused = [got for t, got in ends if got.startswith(b"HTTP/1.1 503")]
    assert len(cut) + len(refused) == STALLED, [got[:60] for _, got in ends]
    assert cut and refused, (len(cut), len(refused))  # it ran out of room, and it cut clients off
    assert min(cut) >= 0.9 * READ_TIMEOUT and max(cut) < READ_TIMEOUT + 2, (min(cut), max(cut))
    for answer in refused:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"application/json" in head and b"retry-after: 1" in head.lower()
        assert json.loads(body)["error"]["code"] == "too_many_connections"
    # /health answers again, and the server still serves
    deadline = time.time() + 10
    while True:
        try:
            r = httpx.get(url + "/health", timeout=2)
            if r.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "/health did not answer again:\n" + log_text(log)[-3000:]
        time.sleep(0.1)
    r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 3
    # SIGTERM with a client still stalled mid-body: the server ends cleanly, within the read timeout
    # (not the 30 s grace period), with no traceback and no plain-text 500
    last = stall(port)
    time.sleep(0.2)
    t_term = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it caught
    assert time.perf_counter() - t_term < READ_TIMEOUT + 5
    answer = b""
    try:
        answer = last.recv(4096)
    except OSError:
        pass
    last.close()
    assert b"500" not in answer.split(b"\r\n", 1)[0]
    text = log_text(log)
    lines = text.splitlines()
    # one line per cut-off client at most, refusals summarised, never a traceback per accept
    assert len(lines) < STALLED + 40, f"{len(lines)} log lines:\n" + "\n".join(lines[:40])
    assert "Traceback" not in text, text[:3000]
