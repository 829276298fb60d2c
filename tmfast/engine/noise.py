"""Randomness as a pure function: every embryo and noise vector is computed, inside the step and
on the step's device, from (seed, the token's absolute position, the tail slot it is drawn for,
what it is for) by a counter-based generator.

    seed_key(seed)                         host, once per request: a 32-bit key of the 63-bit seed
    row_keys(seed_key, counter(...))       device: one 32-bit key per vector to draw
    normal_rows(keys, basis)               device: (…, d) standard normal vectors, one per key

A sequence's draws therefore depend on nothing but its own seed and positions: not on the batch
it runs in, on which step kind ran (a front-only step draws the front's vector, the one a full
step draws for it), on eager vs compiled, or on the device. Every operation is exact integer
arithmetic plus a table lookup, so the vectors are bit-identical on CPU and CUDA, eager and
compiled. Nothing is drawn that is not used.

The hash is a two-round xorshift-multiply 32-bit hash, [16 21f0aaad 15 735a2d97 15] from
C. Wellons' "hash-prospector" (avalanche as good as lowbias32's, measured), over int64 tensors
that hold 32-bit values: both multipliers are below 2³¹, so no product reaches 2⁶³ (signed
overflow is undefined behaviour in the C++ that inductor emits). A component hashes twice (the
counter before the seed key is XORed in, then with each component's word), so two seeds never
share a shifted stream. A component's top 16 bits pick one of 2¹⁶ equiprobable N(0,1) quantiles,
rescaled to unit variance:
mean 0 and variance 1 exactly, tails cut at 4.3σ; a lookup instead of erfinv, which differs by
an ulp between libms and costs ~9× more on a compiled CPU step (measured).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

PURPOSES = {"embryo": 0, "history": 1, "tail": 2}
MASK32 = 0xFFFFFFFF
_M1, _M2 = 0x21F0AAAD, 0x735A2D97  # both < 2³¹: x · M < 2⁶³ for any 32-bit x
POSITION_BITS, SLOT_BITS = 20, 10  # counter = position | slot << 20 | purpose << 30
MAX_POSITIONS, MAX_SLOTS = 1 << POSITION_BITS, 1 << SLOT_BITS
QUANTILE_BITS = 16


def hash32(x):
    """The 32-bit hash of 32-bit values held in int64 tensors (or of a Python int). In place on
    its own intermediate: eager steps pay per op, so each op counts (11 on a tensor)."""
    if isinstance(x, int):
        x ^= x >> 16
        x = (x * _M1) & MASK32
        x ^= x >> 15
        x = (x * _M2) & MASK32
        return x ^ (x >> 15)
    x = x ^ (x >> 16)  # a new tensor: the caller's is never written
    x.mul_(_M1).bitwise_and_(MASK32)
    x ^= x >> 15
    x.mul_(_M2).bitwise_and_(MASK32)
    x ^= x >> 15
    return x


def seed_key(seed: int) -> int:
    """The 32-bit key of a request's seed (0 ≤ seed < 2⁶³), computed once on the host."""
    return hash32((seed & MASK32) ^ hash32(((seed >> 32) & MASK32) ^ 0x5EED5EED))


def counter(purpose: int, pos, slot=0):
    """What a draw is for, as one 32-bit counter: pos < 2²⁰ (positions), slot < 2¹⁰ (tail slots)."""
    return pos + ((slot << POSITION_BITS) + (purpose << (POSITION_BITS + SLOT_BITS)))


def row_keys(key, count):
    """One key per vector to draw, from the sequence's seed_key and the draw's counter: the
    counter is hashed before it meets the key, so two seeds' keys differ by a constant XOR that
    no structured set of counters reproduces (no shifted streams); the component hash mixes it."""
    return hash32(count) ^ key


@dataclass
class NoiseBasis:
    """The constants normal_rows reads, made once per (d, device): a 32-bit word per component
    and the quantile table."""
    words: torch.Tensor  # (d,) int64
    quantiles: torch.Tensor  # (2¹⁶,) fp32


@functools.lru_cache(maxsize=8)
def _quantiles() -> torch.Tensor:
    n = 1 << QUANTILE_BITS
    q = torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n)
    return (q / q.pow(2).mean().sqrt()).float()  # symmetric: mean 0; rescaled: variance 1


def noise_basis(d: int, device=None) -> NoiseBasis:
    words = hash32(torch.arange(d, dtype=torch.int64) + 0x3C6EF372)
    return NoiseBasis(words.to(device), _quantiles().to(device))


def normal_rows(keys: torch.Tensor, words: torch.Tensor, quantiles: torch.Tensor) -> torch.Tensor:
    """(…, d) fp32 standard normal vectors; row r is a function of keys[r] alone."""
    x = hash32(keys.unsqueeze(-1) ^ words)
    return quantiles[x >> (32 - QUANTILE_BITS)]


def draw(seed: int, purpose: str, positions, slots, d: int, norm: float) -> torch.Tensor:
    """One sequence's vectors of expected norm ≈ `norm` (CPU): what the engine's step computes for
    it. positions: a sequence of positions; slots: the same length, or one int. For the naive
    reference and tests."""
    pos = torch.as_tensor(positions, dtype=torch.int64)
    slot = slots if isinstance(slots, int) else torch.as_tensor(slots, dtype=torch.int64)
    basis = noise_basis(d)
    keys = row_keys(seed_key(seed), counter(PURPOSES[purpose], pos, slot))
    return normal_rows(keys, basis.words, basis.quantiles) * (norm / math.sqrt(d))
