"""Step results device → host without stalling the device.

A step's results (the committed ids; with a probe, the tail's nearest tokens and stats) are one
packet. On CUDA it is copied into pinned host memory with one non-blocking copy, queued behind
the step, and an event marks its arrival: the host waits on that event only when it processes
the step, by which time the next step is already queued (the engine reads one step behind).
Elsewhere the step ran synchronously and the packet is read as it is.

`wait` is the one place the engine's loop reads device values on the host: it turns the packet
into Python lists there (`reading()` says when that is happening; a test uses it to prove the
loop never syncs anywhere else).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

_state = threading.local()


def reading() -> bool:
    """True while a Readback is turning a packet into host values (in this thread)."""
    return getattr(_state, "reading", False)


@dataclass(slots=True)
class Ticket:
    packet: torch.Tensor  # the host copy (CUDA) or the packet itself
    event: "torch.cuda.Event | None"


class Readback:
    """Two pinned buffers of `rows` int64 for the common packet (committed ids), used in turn (at
    most one step is in flight while its predecessor is read); other packets get a pinned
    buffer of their own from torch's caching host allocator."""

    def __init__(self, device: torch.device, rows: int):
        self.cuda = device.type == "cuda"
        self._ids = [torch.empty(rows, dtype=torch.long, pin_memory=True) for _ in range(2)] if self.cuda else []
        self._turn = 0

    def start(self, packet: torch.Tensor) -> Ticket:
        if not self.cuda:
            return Ticket(packet, None)
        if packet.dim() == 1 and packet.dtype == torch.long:
            host = self._ids[self._turn][:packet.shape[0]]
            self._turn ^= 1
        else:
            host = torch.empty(packet.shape, dtype=packet.dtype, pin_memory=True)
        host.copy_(packet, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return Ticket(host, event)

    @staticmethod
    def wait(ticket: Ticket) -> list:
        """The packet as (nested) Python lists, once it has arrived."""
        _state.reading = True  # (a plain flag, not a context manager: this runs every step)
        try:
            if ticket.event is not None:
                ticket.event.synchronize()
            return ticket.packet.tolist()
        finally:
            _state.reading = False


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without blocking the host: pinned and non-blocking on CUDA (the
    caching host allocator keeps the pinned block until the copy is done)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
