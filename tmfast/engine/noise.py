"""Seeded per-sequence random streams: embryos, history noise, tail noise."""
from __future__ import annotations

import math

import torch

from ..config import mix_seed

PURPOSES = {"embryo": 0, "history": 1, "tail": 2}


class EmbryoStream:
    """Per-sequence source of embryo vectors: a function of (seed, draw index) only,
    so a sequence's embryos do not depend on the batch it runs in. The same kind of stream,
    seeded from (seed, purpose), feeds history noise and tail noise."""

    @classmethod
    def for_purpose(cls, seed: int, purpose: str, dim: int, norm: float) -> "EmbryoStream":
        salt = PURPOSES[purpose]
        return cls(seed if salt == 0 else mix_seed(seed, salt), dim, norm)

    def __init__(self, seed: int, dim: int, norm: float, block: int = 64):
        self.gen = torch.Generator().manual_seed(seed)
        self.dim, self.scale, self.block = dim, norm / math.sqrt(dim), block
        self._buf, self._next = torch.empty(0, dim), block  # _next: draws of this block taken

    def _refill(self) -> None:
        self._buf = torch.randn(self.block, self.dim, generator=self.gen) * self.scale
        self._next = 0

    def take(self, n: int) -> torch.Tensor:
        """The next n draws (n, dim)."""
        if self._next + n <= self.block:  # the common case: a view of the current block
            self._next += n
            return self._buf[self._next - n:self._next]
        out = []
        while n > 0:
            if self._next == self.block:
                self._refill()
            m = min(n, self.block - self._next)
            out.append(self._buf[self._next:self._next + m])
            self._next += m
            n -= m
        return torch.cat(out)

    def take_first(self, n: int) -> torch.Tensor:
        """The first of the next n draws (dim,); the other n − 1 are drawn and dropped, so the
        stream stays where take(n) would leave it."""
        first = self.take(1)[0]
        n -= 1
        while n > 0:
            if self._next == self.block:
                self._refill()
            m = min(n, self.block - self._next)
            self._next += m
            n -= m
        return first
