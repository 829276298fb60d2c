"""The HTTP connection: uvicorn's h11 protocol with a read deadline, a connection cap and JSON
protocol errors.

uvicorn reads a request for as long as the client takes: a client that stops in the middle of its
headers or body holds its connection (a file descriptor) forever, and enough of them exhaust the
process's descriptors. Here every request must arrive whole — headers and body — within
`read_timeout` seconds of its first byte (or of the connection, or of the previous response on a
kept-alive connection); otherwise the connection is closed (the handler, if one is waiting for the
body, sees the client as gone). A request that h11 cannot parse (a bad header line, two
Content-Lengths, a negative one, a bad chunk size) is answered in the one JSON error shape
instead of uvicorn's text/plain.

Connections are capped below the process's file-descriptor limit (`connection_limits()`): past the cap
a new connection is answered 503 (JSON, Retry-After) and closed at once, so accept() never fails
for want of a descriptor — asyncio would log a traceback per failed accept, thousands a second.
If it fails anyway (descriptors taken elsewhere), `quiet_accept_errors()` makes that one line every
few seconds.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import error_body

log = logging.getLogger("tmfast.server")


DESCRIPTOR_RESERVE = 32  # descriptors kept for everything but client connections
RETRY_AFTER = 1  # seconds, in the 503 past the connection cap


class RateLimitedLog:
    """At most one log line per `every` seconds for a recurring event, with the count since."""

    def __init__(self, every: float, level: int = logging.WARNING):
        self.every, self.level, self.last, self.count = every, level, -float("inf"), 0

    def __call__(self, message: str) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= self.every:
            log.log(self.level, "%s (%d time(s) since the last such line)", message, self.count)
            self.last, self.count = now, 0


def connection_limits(reserve: int = DESCRIPTOR_RESERVE) -> tuple[int | None, int]:
    """(client connections this process can hold, its listen backlog), from its descriptor limit.

    asyncio accepts up to `backlog` connections at once before any of them is seen (and possibly
    refused), so the cap leaves that much room below the limit: descriptors open now + reserve +
    backlog + cap = the soft limit. (None, 2048) when the limit is unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None, 2048
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_now = 64  # no /proc (macOS): a guess on the safe side
    budget = max(16, soft - open_now - reserve)
    backlog = min(2048, max(8, budget // 4))
    return max(8, budget - backlog), backlog


def _refusal() -> bytes:
    body = json.dumps(error_body("the server is at its connection limit; retry shortly", type="server_error",
                                 code="too_many_connections")).encode("ascii")
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"retry-after: %d\r\ncontent-length: %d\r\n\r\n" % (RETRY_AFTER, len(body))) + body


class DeadlineH11Protocol(H11Protocol):
    read_timeout = 10.0  # seconds a request may take to arrive (set per server: protocol_class())
    max_connections: int | None = None  # past it a connection is refused (set per server)
    refused_log = RateLimitedLog(5.0)
    cut_off_log = RateLimitedLog(5.0, logging.INFO)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._deadline = None
        self._refused = self.max_connections is not None and len(self.connections) > self.max_connections
        if self._refused:  # answered before reading a byte: the descriptor comes free at once
            self.refused_log(f"connection limit ({self.max_connections}) reached: refusing connections with 503")
            transport.write(_refusal())
            transport.close()
            return
        self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._deadline is None and self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
            self._arm()  # the first bytes of a request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            self._disarm()  # the request is whole (or the connection is done)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.read_timeout, self._expired)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            return
        waiting = self.cycle is not None and not self.cycle.response_complete
        self.cut_off_log(f"connection from {'%s:%d' % self.client if self.client else '?'} closed: "
                         f"the request did not arrive within {self.read_timeout:g} s")
        if waiting:  # a handler is reading this body: it sees the client go away
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse: 400 in the one JSON error shape, then close."""
        body = json.dumps(error_body(f"malformed HTTP request: {msg}", code="invalid_http"),
                          ensure_ascii=True).encode("ascii")
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                   (b"content-length", str(len(body)).encode())]
        try:
            self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")))
            self.transport.write(self.conn.send(h11.Data(data=body)))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:  # a response was already under way: just close
            pass
        self.transport.close()


def protocol_class(read_timeout: float, max_connections: int | None) -> type[DeadlineH11Protocol]:
    """The protocol uvicorn instantiates per connection, with this server's read deadline and cap."""
    return type("DeadlineH11Protocol", (DeadlineH11Protocol,),
                {"read_timeout": float(read_timeout), "max_connections": max_connections})


class _QuietAcceptErrors(logging.Filter):
    """asyncio's "socket.accept() out of system resource" (a traceback per attempt) → one line
    every few seconds."""

    def __init__(self):
        super().__init__()
        self.note = RateLimitedLog(5.0)

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("socket.accept() out of system resource"):
            self.note("out of file descriptors: accept() failed, asyncio retries in 1 s")
            return False
        return True


def quiet_accept_errors() -> None:
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _QuietAcceptErrors) for f in logger.filters):
        logger.addFilter(_QuietAcceptErrors())
