"""The generation engine: prefill, the maturation step, stopping, batch state.

One step, for every slot b of the batch (fixed shapes, positions as data):
  window  = [last committed vector | K tail slots | K tail slots again if guided]
  forward = one call; the committed vector's K/V land in the static cache at its
            position, the tail's K/V are transient (they occupy slots that later
            commits overwrite; the unconditional copy uses K scratch slots past the end)
  guide   = ẑ_u + s(ẑ_c − ẑ_u), the unconditional stream seeing the tail only
  update  = z̃ += α(ẑ − z̃)                      (csrc_triton.maturation_update)
  commit  = argmax_j <z̃_front, e_j>, snap to e_j (csrc_triton.nn_commit)
  shift   = drop the front, new embryo at the back of this sequence's K slots
Slots may hold sequences of different prompt lengths, tail lengths K ≤ the window,
guidance and seeds; tail slots past a sequence's own K are dead (α = 0, attended by
nobody), and idle batch slots are computed but never change.

Layers, bottom up:
  decode_step / prefill   pure functions over tensors (what torch.compile sees)
  DecodeBatch             max_batch slots of fixed-shape state over one static KV cache
  Sequence                one request's bookkeeping: ids, text, stopping, text deltas
  Engine                  continuous batching: add_request / step / abort, events
  MaturationEngine        closed batches: generate(prompts) / stream(prompts)
"""
from __future__ import annotations

import asyncio
import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator, Sequence as Seq

import torch

from csrc_triton import maturation_update, nn_commit, prepare_table, resolve_impl

from .config import GenerationConfig, mix_seed
from .model import TMModel


class GenerationError(ValueError):
    """A generation request that cannot be served as asked; `param` names the field when known."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class QueueFullError(GenerationError):
    """The engine's request queue is full; retry later."""


def check_impl(impl: str | None, device: torch.device) -> None:
    """Fail at construction, in one line, when the kernel implementation asked for cannot run here."""
    try:
        resolve_impl(impl, device, "tmfast")
    except (RuntimeError, ValueError) as e:
        raise GenerationError(str(e), "impl") from None


# --------------------------------------------------------------------------------------
# the two compiled-friendly functions
# --------------------------------------------------------------------------------------
def prefill(model: TMModel, x: torch.Tensor, k: torch.Tensor, rows: slice) -> None:
    """Write the K/V of committed vectors x (n, T, d) (right-padded) into cache rows `rows`
    (a range of n rows), slots 0..T-1."""
    n, T, _ = x.shape
    t = torch.arange(T, device=x.device)
    mask = t.view(1, 1, 1, T) <= t.view(1, 1, T, 1)  # causal over the T slots written: nothing else is read
    model.hidden(x, pos=t.expand(n, T), alpha=torch.ones(n, T, device=x.device), k=k, mask=mask,
                 cache_slots=t.expand(n, T), cache_rows=rows, cache_span=T)


def step_window(model: TMModel, last, tail, length, alpha, n_slots: int, guided: bool, span: int | None = None):
    """The step's forward inputs (x, pos, alpha_in, mask, cache slots) for every sequence.

    The output at a position predicts the slot after it, so a step needs exactly:
      tail None   [last committed]                    the front-only window (inert tails):
                                                      its output is the front's prediction
      tail given  [last committed | tail slots 0..Kw−2 | the same again, unconditional, if guided]
    The back slot is never forwarded: its output would predict a slot that does not exist, and
    in a causal window nothing attends to it. The unconditional copy sits at the same positions
    in scratch cache slots past n_slots and sees only the tail; its front prediction is the
    committed position's (history is shared by both streams). alpha_in is None for the
    front-only window: every position there is committed (α = 1, see TMModel.hidden).
    span: attend over the first `span` cache slots only (default: the whole cache).
    """
    B, dev = last.shape[0], last.device
    P = length.view(B, 1)
    pos = P - 1
    x = last.unsqueeze(1)
    slot, lo, hi, a_in = pos, torch.zeros_like(pos), pos, None
    if tail is not None:
        T = tail.shape[1] - 1
        j = torch.arange(T, device=dev)
        x = torch.cat([x, tail[:, :T]], dim=1)
        pos = torch.cat([pos, P + j], dim=1)
        slot, lo, hi = pos, torch.zeros_like(pos), pos
        a_in = torch.cat([torch.ones(B, 1, device=dev), alpha[:, :T]], dim=1)
        if guided:
            scratch = (n_slots + j).expand(B, T)
            pos = torch.cat([pos, P + j], dim=1)
            slot = torch.cat([slot, scratch], dim=1)
            lo = torch.cat([lo, torch.full_like(scratch, n_slots)], dim=1)
            hi = torch.cat([hi, scratch], dim=1)
            x = torch.cat([x, tail[:, :T]], dim=1)
            a_in = torch.cat([a_in, alpha[:, :T]], dim=1)
    s = torch.arange(span or model.blocks[0].attn.kv_cache.slots, device=dev).view(1, 1, -1)
    mask = ((s >= lo.unsqueeze(-1)) & (s <= hi.unsqueeze(-1))).unsqueeze(1)
    return x, pos.clamp(max=model.config.n_positions - 1), a_in, mask, slot


def decode_step(model: TMModel, last, tail, length, k, alpha, guidance, active, embryo,
                n_slots: int, guided: bool, impl: str | None = None, probe: bool = False,
                entropy_tau: float | None = None, table_inv_norm: torch.Tensor | None = None,
                history_noise: torch.Tensor | None = None, tail_noise: torch.Tensor | None = None,
                committed_maturity: torch.Tensor | None = None, span: int | None = None,
                commit_table: torch.Tensor | None = None):
    """One maturation step for the whole batch, in place on the state (last, tail, length).
    Shapes never change between steps and nothing in here syncs with the host.

    last (B,d) committed vector at position length-1; tail (B,Kw,d) front first;
    length (B,) committed count P; k (B,) tail lengths ≤ Kw; alpha (B,Kw) (0 on dead slots);
    guidance (B,); active (B,) bool; embryo (B,d) the vector appended this step.
    history_noise (B,d): added to the committed vector as the model will read it (the paper's
    "history noise"); tail_noise (B,Kw,d), unscaled: × √α is added to the tail in the update
    ("stochastic dynamics").
    tail None — the front-only step, for a batch whose tails are all inert (front α = 1: the
    front is overwritten by the prediction from the last committed position, so no other slot
    can change a commit): forward [last committed] alone, commit prediction (+ tail_noise (B,d),
    the front slot's draw). alpha, guidance and embryo are unused; committed_maturity, the
    maturity conditioning at α = 1, may be passed precomputed (it is a constant while serving).
    n_slots: cache slots for positions (the unconditional stream's scratch slots follow).
    span: attend over the first `span` cache slots only (every position this step reads or
    writes must lie below it; default: the whole cache, one shape for every step).
    commit_table: the table to commit against, in whatever layout its matmul reads fastest
    (default: model.table.weight; lookups always use the model's table).
    The B sequences own KV-cache rows 0..B-1 (a prefix of the cache: a view, no copy).
    probe: also return each tail slot's nearest token (and, with entropy_tau, the entropy of
    softmax(cos(z̃,E)/τ), using table_inv_norm), measured after the update and before the
    shift (slot 0 = committed). A slot whose vector is not finite commits index -1 (no sync
    here: the caller ends that sequence alone).
    Returns (committed ids, ‖Δz̃‖ or None, probe ids, probe entropy).
    """
    x, pos, a_in, mask, slot = step_window(model, last, tail, length, alpha, n_slots, guided, span)
    if tail is None:
        out = model(x, pos=pos, alpha=a_in, k=k, mask=mask, cache_slots=slot, maturity=committed_maturity,
                    cache_span=span)
        front = out[:, 0] if tail_noise is None else out[:, 0] + tail_noise
        delta_norm = None
    else:
        B, Kw, d = tail.shape
        out = model(x, pos=pos, alpha=a_in, k=k, mask=mask, cache_slots=slot, cache_span=span)
        pred_c = out[:, :Kw]
        pred_u = torch.cat([out[:, :1], out[:, Kw:]], dim=1) if guided else None
        if tail_noise is not None:  # slots that move more get more noise (α is 0 on unused slots)
            tail_noise = tail_noise * alpha.sqrt().unsqueeze(-1)
        new = tail.clone()
        delta_norm, _ = maturation_update(
            new, pred_c, alpha * active.unsqueeze(1), pred_uncond=pred_u,
            guidance=guidance if guided else None, noise=tail_noise, impl=impl)
        front = new[:, 0]
    table = model.table.weight if commit_table is None else commit_table
    idx, _, _, _ = nn_commit(front, table, impl=impl, check_finite=False)
    probe_ids = probe_entropy = None
    if probe:  # a separate call: probing must never change what is committed
        probe_ids, _, _, probe_entropy = nn_commit(new.reshape(B * Kw, d), table, entropy_tau=entropy_tau,
                                                   table_inv_norm=table_inv_norm, impl=impl,
                                                   check_finite=False)
        probe_ids = probe_ids.view(B, Kw)
        probe_entropy = probe_entropy.view(B, Kw) if probe_entropy is not None else None
    if tail is not None:  # drop the front, a fresh embryo at the back of each sequence's own K slots
        j = torch.arange(Kw, device=tail.device)
        shifted = torch.cat([new[:, 1:], embryo.unsqueeze(1)], dim=1)
        shifted = torch.where((j == (k - 1).unsqueeze(1)).unsqueeze(-1), embryo.unsqueeze(1), shifted)
        tail.copy_(torch.where(active.view(-1, 1, 1), shifted, new))
    committed = model.table(idx.clamp(min=0))
    if history_noise is not None:
        committed = committed + history_noise
    last.copy_(torch.where(active.unsqueeze(1), committed, last))
    length.add_(active.long())
    return idx, delta_norm, probe_ids, probe_entropy


# --------------------------------------------------------------------------------------
# batch state
# --------------------------------------------------------------------------------------
class EmbryoStream:
    """Per-sequence source of embryo vectors: a function of (seed, draw index) only,
    so a sequence's embryos do not depend on the batch it runs in. The same kind of stream,
    seeded from (seed, purpose), feeds history noise and tail noise."""

    @classmethod
    def for_purpose(cls, seed: int, purpose: str, dim: int, norm: float) -> "EmbryoStream":
        salt = {"embryo": 0, "history": 1, "tail": 2}[purpose]
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


@dataclass
class StepOutput:
    committed: list[int]  # per slot (meaningful for the slots that were active)
    delta_norm: torch.Tensor | None  # (B, Kw); None after a front-only step
    tail_ids: list[list[int]] | None
    tail_entropy: torch.Tensor | None


class DecodeBatch:
    """max_batch slots of fixed-shape decoding state over one static KV cache.

    Running sequences always occupy slots 0..n-1: a step computes the first n slots
    rounded up to a power of two (cache rows as a view), and when a sequence leaves a
    hole, the last one moves into it (one cache-row copy per finished sequence).

    A sequence's tail is *live* when it can change a commit or is watched: front α < 1, or its
    request asked for the tail (preview, per-slot stats). Otherwise it is *inert* and kept as
    zeros with α = [1, 0, …, 0]: only its front prediction (and its noise) matters. A step in
    which every running tail is inert forwards the committed positions alone (decode_step with
    tail=None); any live tail makes it forward the tail window for the whole batch.

    max_len: cache slots for positions; a sequence needs prompt + new tokens + k_window − 1
    of them. The cache holds k_window − 1 scratch slots more for the unconditional stream.
    """

    def __init__(self, model: TMModel, max_batch: int, max_len: int, k_window: int, step_fn,
                 impl: str | None = None, bounded_span: bool = True):
        self.model, self.step_fn, self.impl = model, step_fn, impl
        # attend over the cache slots in use, not the whole cache: a shape that changes every
        # step, so only where nothing is compiled (a compiled step keeps one shape per bucket)
        self.bounded_span = bounded_span
        self.max_batch, self.max_len, self.k_window = max_batch, max_len, k_window
        model.setup_caches(max_batch, max_len + k_window - 1)
        model.cpu_weight_layout()
        self._caches = [b.attn.kv_cache for b in model.blocks]
        # constants while serving (the weights do not change under the engine)
        table = model.table.weight.detach()
        self.table_inv_norm = prepare_table(table)
        self.committed_maturity = model.maturity_at(1.0)
        # the commit's matmul reads a column-major table faster on CPU (bench/layout.py: 2.6× at
        # batch 1 for the default model, 1.5× for GPT-2-Medium's): a copy beside the row-major
        # table that lookups use, for the torch path (the Triton kernels want rows contiguous)
        self.commit_table = table
        if table.device.type == "cpu" and resolve_impl(impl, table.device, "tmfast") == "torch":
            self.commit_table = table.t().contiguous().t()
        p = model.table.weight
        dev, dt, d = p.device, p.dtype, model.config.n_embd
        self.last = torch.zeros(max_batch, d, device=dev, dtype=dt)
        self.tail = torch.zeros(max_batch, k_window, d, device=dev, dtype=dt)
        self.length = torch.ones(max_batch, dtype=torch.long, device=dev)
        self.k = torch.ones(max_batch, dtype=torch.long, device=dev)
        self.alpha = torch.zeros(max_batch, k_window, device=dev)
        self.guidance = torch.ones(max_batch, device=dev)
        self.active = torch.arange(max_batch, device=dev)  # compared with n_active per step
        self.n_active = 0  # running sequences occupy slots 0..n_active-1
        # host-side per-slot state; release() moves all of it with the sequence
        self.live = [False] * max_batch
        self.guided = [False] * max_batch
        self.embryos: list[EmbryoStream | None] = [None] * max_batch
        self.history_noise: list[EmbryoStream | None] = [None] * max_batch  # None: no noise
        self.tail_noise: list[EmbryoStream | None] = [None] * max_batch
        self.tail_k = [0] * max_batch  # host copy of k (no device sync per step)
        self.host_length = [0] * max_batch  # host copy of length
        # host staging buffers for the per-step draws (one copy to the device each)
        self._embryo_buf = torch.zeros(max_batch, d)
        self._hist_buf = torch.zeros(max_batch, d)
        self._front_noise_buf = torch.zeros(max_batch, d)
        self._tail_noise_buf = torch.zeros(max_batch, k_window, d)
        self._zero_row = torch.zeros(d)

    def _own_caches(self) -> None:
        """Another batch over the same model may have installed its caches: put ours back."""
        if self.model.blocks[0].attn.kv_cache is not self._caches[0]:
            for block, cache in zip(self.model.blocks, self._caches):
                block.attn.kv_cache = cache

    def free_slots(self) -> list[int]:
        return list(range(self.n_active, self.max_batch))

    @torch.no_grad()
    def admit(self, items: list[tuple[int, torch.Tensor, GenerationConfig, bool]]) -> None:
        """Start sequences: (slot, committed prompt vectors (T,d), settings, watched: the request
        reads its tail); one batched prefill. Slots must be the next free ones, in order."""
        if not items:
            return
        if [item[0] for item in items] != list(range(self.n_active, self.n_active + len(items))):
            raise ValueError("admit() takes the next free slots, in order")
        self._own_caches()
        cfg, dev = self.model.config, self.tail.device
        R, d = cfg.table_radius, cfg.n_embd
        noisy = []
        for slot, v, g, watched in items:
            self.history_noise[slot] = EmbryoStream.for_purpose(g.seed, "history", d, g.history_noise * R) \
                if g.history_noise > 0 else None
            self.tail_noise[slot] = EmbryoStream.for_purpose(g.seed, "tail", d, g.tail_noise * R) \
                if g.tail_noise > 0 else None
            if self.history_noise[slot] is not None:  # the prompt is committed history too
                v = v + self.history_noise[slot].take(len(v)).to(v.device, v.dtype)
            noisy.append((slot, v, g, watched))
        items = noisy
        T_pre = max(len(v) for _, v, _, _ in items) - 1
        rows = slice(items[0][0], items[0][0] + len(items))
        if T_pre > 0:
            x = torch.zeros(len(items), T_pre, cfg.n_embd, dtype=self.tail.dtype, device=dev)
            for i, (_, v, _, _) in enumerate(items):
                x[i, :len(v) - 1] = v[:-1]
            prefill(self.model, x, torch.tensor([g.tail for _, _, g, _ in items], device=dev), rows)
        for slot, v, g, watched in items:
            profile = g.alpha_profile()
            live = watched or profile[0] < 1.0
            self.live[slot] = live
            self.last[slot] = v[-1]
            self.tail[slot].zero_()
            self.alpha[slot].zero_()
            self.embryos[slot] = None
            if live:
                stream = EmbryoStream.for_purpose(g.seed, "embryo", d, g.embryo_scale * R)
                self.embryos[slot] = stream
                self.tail[slot, :g.tail] = stream.take(g.tail).to(dev, self.tail.dtype)
                self.alpha[slot, :g.tail] = torch.tensor(profile)
            else:  # inert: only the front moves (α = 1); the rest stays zero and is never read
                self.alpha[slot, 0] = 1.0
            self.length[slot] = len(v)
            self.host_length[slot] = len(v)
            self.k[slot] = g.tail
            self.tail_k[slot] = g.tail
            self.guidance[slot] = g.guidance
            # the front's prediction comes from a committed position, which both streams share:
            # guidance changes only slots behind the front, so with K = 1 or an inert tail its
            # stream is not computed
            self.guided[slot] = live and g.guidance != 1.0 and g.tail > 1
        self.n_active += len(items)

    _HOST_STATE = ("live", "guided", "embryos", "history_noise", "tail_noise", "tail_k", "host_length")
    _DEVICE_STATE = ("last", "tail", "length", "k", "alpha", "guidance")

    def release(self, slot: int) -> int | None:
        """Free a slot. If it was not the last running one, the last one moves into it:
        returns the slot that moved (its sequence now lives at `slot`), else None."""
        last = self.n_active - 1
        self.n_active = last
        moved = None
        if slot != last:
            self._own_caches()
            n = int(self.length[last]) + self.k_window  # the slots its attention can reach
            for cache in self._caches:
                cache.move_row(last, slot, n)
            for name in self._DEVICE_STATE:
                t = getattr(self, name)
                t[slot] = t[last]
            for name in self._HOST_STATE:
                getattr(self, name)[slot] = getattr(self, name)[last]
            moved = last
        self.live[last] = self.guided[last] = False
        self.embryos[last] = self.history_noise[last] = self.tail_noise[last] = None
        return moved

    def _bucket(self) -> int:
        """Slots to compute: the running ones rounded up to a power of two (at most max_batch)."""
        size = 1
        while size < self.n_active:
            size *= 2
        return min(size, self.max_batch)

    def _draw_noise(self, n: int, front_only: bool):
        """This step's host draws, staged for one copy each: (embryo, history noise, tail noise).
        Each stream draws exactly what the full Algorithm-1 step draws for its sequence (K tail
        noise vectors a step even where only the front's is used), so the text never depends on
        which kind of step ran."""
        dev, dt = self.tail.device, self.tail.dtype
        size = self._bucket()
        zero = self._zero_row
        embryo = hist = tnoise = None
        if not front_only:
            torch.stack([s.take(1)[0] if s is not None else zero for s in self.embryos[:n]],
                        out=self._embryo_buf[:n])
            self._embryo_buf[n:size].zero_()  # padding rows: inactive, but never stale
            embryo = self._embryo_buf[:size].to(dev, dt)
        if any(s is not None for s in self.history_noise[:n]):
            torch.stack([s.take(1)[0] if s is not None else zero for s in self.history_noise[:n]],
                        out=self._hist_buf[:n])
            self._hist_buf[n:size].zero_()
            hist = self._hist_buf[:size].to(dev, dt)
        if any(s is not None for s in self.tail_noise[:n]) and front_only:  # the common case: one stack
            buf = self._front_noise_buf
            torch.stack([s.take_first(K) if s is not None else zero
                         for s, K in zip(self.tail_noise[:n], self.tail_k[:n])], out=buf[:n])
            buf[n:size].zero_()
            tnoise = buf[:size].to(dev, dt)
        elif any(s is not None for s in self.tail_noise[:n]):
            buf = self._tail_noise_buf
            buf[:size].zero_()
            for b, (s, K, live) in enumerate(zip(self.tail_noise[:n], self.tail_k[:n], self.live[:n])):
                if s is not None and live:
                    buf[b, :K] = s.take(K)
                elif s is not None:  # an inert tail in a tail step: the front's draw, the rest stays zero
                    buf[b, 0] = s.take_first(K)
            tnoise = buf[:size].to(dev, dt)
        return embryo, hist, tnoise

    @torch.no_grad()
    def step(self, probe: bool = False, entropy_tau: float | None = None) -> StepOutput:
        """Advance the running sequences (slots 0..n_active-1) by one step."""
        self._own_caches()
        n, size = self.n_active, self._bucket()
        front_only = not any(self.live[:n])
        if probe and front_only:
            raise ValueError("a tail probe needs a watched (live) sequence in the batch")
        embryo, hist, tnoise = self._draw_noise(n, front_only)
        active = self.active[:size] < n
        # the unconditional stream is only computed while some running sequence asks for guidance
        guided = any(self.guided[:n])
        span = None  # the window reaches position P + Kw − 2; the guided stream's scratch slots lie past max_len
        if self.bounded_span and not guided:
            span = min(max(self.host_length[:n]) + (0 if front_only else self.k_window - 1), self.max_len)
        idx, delta, probe_ids, probe_ent = self.step_fn(
            self.model, self.last[:size], None if front_only else self.tail[:size], self.length[:size],
            self.k[:size], self.alpha[:size], self.guidance[:size], active, embryo, n_slots=self.max_len,
            guided=guided, impl=self.impl, probe=probe, entropy_tau=entropy_tau,
            table_inv_norm=self.table_inv_norm, history_noise=hist, tail_noise=tnoise,
            committed_maturity=self.committed_maturity, span=span, commit_table=self.commit_table)
        for b in range(n):
            self.host_length[b] += 1
        return StepOutput(idx.tolist()[:n], delta[:n] if delta is not None else None,
                          probe_ids.tolist()[:n] if probe_ids is not None else None,
                          probe_ent[:n] if probe_ent is not None else None)


# --------------------------------------------------------------------------------------
# requests
# --------------------------------------------------------------------------------------
def prompt_vectors(model: TMModel, tokenizer, prompt) -> tuple[list[int] | None, torch.Tensor]:
    """(token ids or None, committed vectors (T,d)) for a text, token-id or vector prompt."""
    cfg, table = model.config, model.table.weight
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() != 2 or prompt.shape[1] != cfg.n_embd or prompt.shape[0] == 0:
            raise GenerationError(f"prompt vectors must have shape (T>0, {cfg.n_embd}), "
                                  f"got {tuple(prompt.shape)}", "prompt")
        if not torch.isfinite(prompt).all():
            raise GenerationError("prompt vectors must be finite", "prompt")
        return None, prompt.detach().to(table.device, table.dtype)
    if isinstance(prompt, str):
        if not prompt.strip():
            raise GenerationError("prompt is empty", "prompt")
        if tokenizer is None:
            raise GenerationError("this engine has no tokenizer: pass token ids or vectors", "prompt")
        ids = tokenizer.encode(prompt).ids
    else:
        try:
            ids = [int(t) for t in prompt]
        except (TypeError, ValueError):
            raise GenerationError("prompt must be a string, a list of token ids or a (T, d) tensor",
                                  "prompt") from None
    if not ids:
        raise GenerationError("prompt is empty", "prompt")
    if min(ids) < 0 or max(ids) >= cfg.vocab_size:
        raise GenerationError(f"token ids must lie in [0, {cfg.vocab_size})", "prompt")
    return ids, model.table(torch.tensor(ids, device=table.device))


def check_fits(cfg, n_prompt: int, g: GenerationConfig, max_len: int | None = None,
               k_window: int | None = None) -> None:
    """Reject up front what would not fit: never truncate silently."""
    kw = g.tail if k_window is None else k_window
    if g.tail > cfg.k_max:
        raise GenerationError(f"tail length K={g.tail} exceeds the model's k_max={cfg.k_max}", "tail")
    if g.tail > kw:
        raise GenerationError(f"tail length K={g.tail} exceeds this engine's tail window of {kw}", "tail")
    room = cfg.n_positions - n_prompt - g.tail + 1
    if max_len is not None:
        room = min(room, max_len - n_prompt - kw + 1)
    if room < 1:
        raise GenerationError(f"prompt of {n_prompt} tokens plus a tail of K={g.tail} does not fit "
                              f"the model context of {cfg.n_positions} positions", "prompt")
    if g.max_new_tokens > room:
        raise GenerationError(f"prompt ({n_prompt} tokens) + max_new_tokens ({g.max_new_tokens}) + "
                              f"tail − 1 exceeds the context; at most {room} new tokens fit", "max_new_tokens")


class Sequence:
    """One request: its committed tokens, its text, when it stops, what to stream next."""

    def __init__(self, request_id: str, prompt_ids: list[int] | None, n_prompt: int, gen: GenerationConfig,
                 tokenizer, eos_token_id: int | None, track_text: bool):
        self.id, self.prompt_ids, self.n_prompt, self.gen = request_id, prompt_ids, n_prompt, gen
        self.tokenizer, self.eos = tokenizer, eos_token_id
        self.track_text = tokenizer is not None and (track_text or bool(gen.stop))
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.slot = -1
        self._emitted = 0  # characters of text already streamed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def commit(self, tok: int) -> None:
        if tok < 0:
            raise GenerationError("the front tail vector is not finite (NaN/inf): nothing to commit")
        g = self.gen
        if g.stop_at_eos and self.eos is not None and tok == self.eos:
            self.finish_reason = "eos"
            return
        self.token_ids.append(tok)
        if self.track_text:
            self.text = self.tokenizer.decode(self.token_ids)
            cut = min((self.text.find(s) for s in g.stop if s in self.text), default=-1)
            if cut >= 0:
                self.text, self.finish_reason = self.text[:cut], "stop"
                return
        if len(self.token_ids) >= g.max_new_tokens:
            self.finish_reason = "length"

    def final_text(self) -> str:
        if self.tokenizer is None:
            return ""
        if self.finish_reason != "stop":
            self.text = self.tokenizer.decode(self.token_ids)
        return self.text

    def text_delta(self) -> str:
        """New text that is safe to stream: held back while it ends in an incomplete UTF-8
        character or in what may become a stop string."""
        text = self.final_text() if self.finished else self.text
        end = len(text)
        if not self.finished:
            while end > self._emitted and text[end - 1] == "\ufffd":
                end -= 1
            # the longest tail of the text that some stop string could still complete
            end -= max((n for s in self.gen.stop for n in range(min(len(s) - 1, end - self._emitted), 0, -1)
                        if text[end - n:end] == s[:n]), default=0)
        delta, self._emitted = text[self._emitted:end], max(self._emitted, end)
        return delta


@dataclass
class RequestEvent:
    """What one request did in one engine step."""
    request_id: str
    token_ids: list[int]  # committed this step (empty when the step committed EOS or nothing)
    text: str  # new text to append
    finished: bool = False
    finish_reason: str | None = None  # "eos" | "stop" | "length" | "abort" | "error"
    tail_tokens: list[int] | None = None  # nearest token per tail slot (return_tail)
    tail_entropy: list[float] | None = None  # per tail slot (return_stats)
    delta_norm: list[float] | None = None  # ‖Δz̃‖ per tail slot (return_stats)
    vectors: torch.Tensor | None = None  # committed vectors (return_vectors)
    error: str | None = None  # with finish_reason "error"


@dataclass
class _Pending:
    seq: Sequence
    vectors: torch.Tensor
    return_tail: bool
    return_stats: bool
    return_vectors: bool


class Engine:
    """Continuous batching over a static KV cache of `max_batch` slots.

    add_request() queues a request (token ids, text, or raw prompt vectors); step()
    admits queued requests into free slots, advances every active request by one
    maturation step and returns their events; abort() ends one. A request's output is
    the same whatever else runs beside it. Not thread-safe: serialise calls (the HTTP
    server runs one loop thread).
    """

    def __init__(self, model: TMModel | str | Path, tokenizer=None, *, max_batch: int = 8,
                 max_len: int | None = None, k_window: int = 16, max_queue: int = 64,
                 compile: bool = False, compile_mode: str | None = None, impl: str | None = None,
                 entropy_tau: float = 1.0, track_text: bool = True):
        if isinstance(model, (str, Path)):
            from .checkpoint import load_checkpoint
            model, loaded_tok = load_checkpoint(model)
            tokenizer = tokenizer or loaded_tok
        cfg = model.config
        check_impl(impl, model.table.weight.device)
        if not 1 <= k_window <= cfg.k_max:
            raise GenerationError(f"k_window must lie in [1, k_max={cfg.k_max}], got {k_window}")
        if max_batch < 1 or max_queue < 0:
            raise GenerationError("max_batch must be >= 1 and max_queue >= 0")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_len = max_len or cfg.n_positions + k_window - 1
        self.max_queue, self.entropy_tau, self.track_text = max_queue, entropy_tau, track_text
        step_fn = decode_step
        if compile:
            # one graph per (row bucket, step kind, noises in use): 1, 2, 4, … max_batch rows
            # × {front-only, tail, guided tail, probed (guided) tail} × history noise × tail noise
            variants = 24 * (max_batch.bit_length() + 1)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, variants)
            step_fn = torch.compile(decode_step, fullgraph=True, dynamic=False, mode=compile_mode)
        self.batch = DecodeBatch(model, max_batch, self.max_len, k_window, step_fn, impl, bounded_span=not compile)
        self.queue: deque[_Pending] = deque()
        self.running: dict[int, _Pending] = {}  # slot → request
        self._aborted: list[RequestEvent] = []
        self._ids = itertools.count()

    # -- requests ----------------------------------------------------------------------
    def add_request(self, prompt, params: GenerationConfig | dict | None = None, *,
                    request_id: str | None = None, return_tail: bool = False, return_stats: bool = False,
                    return_vectors: bool = False) -> str:
        """Queue a request; it joins the batch at the next step with a free slot. Returns its id."""
        g = params if isinstance(params, GenerationConfig) else GenerationConfig.from_dict(params or {})
        ids, vectors = prompt_vectors(self.model, self.tokenizer, prompt)
        check_fits(self.model.config, len(vectors), g, self.max_len, self.batch.k_window)
        if g.stop and self.tokenizer is None:
            raise GenerationError("stop strings need a tokenizer", "stop")
        if len(self.queue) >= self.max_queue:  # after validation: a bad request hears what is wrong
            raise QueueFullError(f"request queue is full ({self.max_queue} waiting); retry later")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if any(p.seq.id == rid for p in itertools.chain(self.queue, self.running.values())):
            raise GenerationError(f"request id {rid!r} is already in use")
        seq = Sequence(rid, ids, len(vectors), g, self.tokenizer, self.model.config.eos_token_id,
                       self.track_text)
        self.queue.append(_Pending(seq, vectors, return_tail, return_stats, return_vectors))
        return rid

    def abort(self, request_id: str) -> bool:
        """End a request now (queued or running); its last event has finish_reason 'abort'."""
        for p in list(self.queue):
            if p.seq.id == request_id:
                self.queue.remove(p)
                break
        else:
            for slot, p in list(self.running.items()):
                if p.seq.id == request_id:
                    self._release(slot)
                    break
            else:
                return False
        p.seq.finish_reason = "abort"
        self._aborted.append(RequestEvent(request_id, [], p.seq.text_delta(), True, "abort"))
        return True

    @property
    def has_work(self) -> bool:
        return bool(self.queue or self.running or self._aborted)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # -- the loop ----------------------------------------------------------------------
    def step(self) -> list[RequestEvent]:
        """Admit what fits, advance every running request by one step, return their events."""
        events, self._aborted = self._aborted, []
        admitted = []
        for slot in self.batch.free_slots():
            if not self.queue:
                break
            p = self.queue.popleft()
            p.seq.slot = slot
            self.running[slot] = p
            admitted.append((slot, p.vectors, p.seq.gen, p.return_tail or p.return_stats))
        self.batch.admit(admitted)
        if not self.running:
            return events
        want_tail = any(p.return_tail or p.return_stats for p in self.running.values())
        want_stats = any(p.return_stats for p in self.running.values())
        out = self.batch.step(probe=want_tail, entropy_tau=self.entropy_tau if want_stats else None)
        done = []
        for slot, p in sorted(self.running.items()):
            try:
                ev = self._event(p, slot, out)
            except Exception as e:  # one request's failure (say, its text decoding) ends only that request
                p.seq.finish_reason = "error"
                ev = RequestEvent(p.seq.id, [], "", True, "error", error=f"{type(e).__name__}: {e}")
            events.append(ev)
            if ev.finished:
                done.append(slot)
        for slot in reversed(done):  # highest first: what moves into a hole is still running
            self._release(slot)
        return events

    def _release(self, slot: int) -> None:
        del self.running[slot]
        moved = self.batch.release(slot)
        if moved is not None:
            p = self.running.pop(moved)
            p.seq.slot = slot
            self.running[slot] = p

    def _event(self, p: _Pending, slot: int, out: StepOutput) -> RequestEvent:
        seq = p.seq
        seq.commit(out.committed[slot])
        committed = seq.token_ids[-1:] if seq.finish_reason != "eos" else []
        ev = RequestEvent(seq.id, committed, seq.text_delta() if seq.track_text or seq.finished else "",
                          seq.finished, seq.finish_reason)
        K = seq.gen.tail
        if p.return_tail:
            ev.tail_tokens = out.tail_ids[slot][:K]
        if p.return_stats:
            ev.tail_entropy = out.tail_entropy[slot, :K].tolist()
            ev.delta_norm = out.delta_norm[slot, :K].tolist()
        if p.return_vectors and committed:
            ev.vectors = self.model.table.weight[committed].detach().cpu()
        return ev

    def fail_running(self, message: str) -> list[RequestEvent]:
        """End every running request with an error (after a failed step); queued ones stay."""
        events = []
        for slot in sorted(self.running, reverse=True):
            p = self.running[slot]
            p.seq.finish_reason = "error"
            events.append(RequestEvent(p.seq.id, [], "", True, "error", error=message))
            self._release(slot)
        return events

    def run(self) -> Iterator[RequestEvent]:
        """Step until every request is done, yielding events as they come."""
        while self.has_work:
            yield from self.step()

    async def arun(self) -> AsyncIterator[RequestEvent]:
        """Async form of run(): each step runs in a worker thread, the event loop stays free."""
        while self.has_work:
            for ev in await asyncio.to_thread(self.step):
                yield ev


# --------------------------------------------------------------------------------------
# closed batches
# --------------------------------------------------------------------------------------
@dataclass
class GenerationResult:
    prompt_ids: list[int] | None
    token_ids: list[int]
    text: str
    finish_reason: str  # "eos" | "stop" | "length"


@dataclass
class StepEvent:
    step: int
    committed: list[int | None]  # token committed this step, per sequence (None: finished or EOS)
    tail_tokens: list[list[int]] | None = None  # nearest token per tail slot after the update, front first
    tail_entropy: list[list[float]] | None = None  # entropy of softmax(cos(z̃,E)/τ) per tail slot
    delta_norm: list[list[float]] | None = None  # ‖Δz̃‖ per tail slot
    texts: list[str] = field(default_factory=list)  # committed text so far (when show_tail or stop strings)


class MaturationEngine:
    """Generate for a whole batch of prompts at once (the continuous-batching Engine,
    sized to the batch). compile=True wraps the step in torch.compile(fullgraph=True); it
    compiles once per (batch size, cache length, tail window, guided) and never between steps.
    """

    def __init__(self, model: TMModel, tokenizer=None, *, compile: bool = False,
                 compile_mode: str | None = None, impl: str | None = None):
        check_impl(impl, model.table.weight.device)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.compile, self.compile_mode, self.impl = compile, compile_mode, impl
        self._engine: Engine | None = None
        self._shape = None

    def decode(self, ids: Seq[int]) -> str:
        return self.tokenizer.decode(list(ids)) if self.tokenizer is not None else ""

    def _engine_for(self, batch: int, max_len: int, k_window: int, track_text: bool) -> Engine:
        shape = (batch, max_len, k_window)
        if self._shape != shape:  # caches and compiled step are reused while the shape holds
            self._engine = Engine(self.model, self.tokenizer, max_batch=batch, max_len=max_len,
                                  k_window=k_window, max_queue=batch, compile=self.compile,
                                  compile_mode=self.compile_mode, impl=self.impl)
            self._shape = shape
        self._engine.track_text = track_text
        return self._engine

    def generate(self, prompts, gen: GenerationConfig | Seq[GenerationConfig] | None = None,
                 on_step: Callable[[StepEvent], None] | None = None, show_tail: bool = False,
                 entropy_tau: float | None = None) -> list[GenerationResult]:
        """Generate for a batch of prompts (strings, token-id lists or (T,d) tensors)."""
        stream = self.stream(prompts, gen, show_tail=show_tail, entropy_tau=entropy_tau)
        while True:
            try:
                ev = next(stream)
            except StopIteration as stop:
                return stop.value
            if on_step is not None:
                on_step(ev)

    def stream(self, prompts, gen=None, show_tail: bool = False, entropy_tau: float | None = None
               ) -> Iterator[StepEvent]:
        """Yield a StepEvent per step; the generator's return value is the list of results.
        entropy_tau: also report per-slot entropy and ‖Δz̃‖ (implies the tail probe)."""
        if isinstance(prompts, (str, torch.Tensor)) or (len(prompts) and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not len(prompts):
            raise GenerationError("no prompts given")
        B = len(prompts)
        gens = list(gen) if isinstance(gen, (list, tuple)) else [gen or GenerationConfig()] * B
        if len(gens) != B:
            raise GenerationError(f"{len(gens)} generation configs for {B} prompts")
        parsed = [prompt_vectors(self.model, self.tokenizer, p) for p in prompts]
        for (_, v), g in zip(parsed, gens):  # before anything is allocated
            check_fits(self.model.config, len(v), g)
        # size the engine to this batch: every request fits, nothing is allocated twice
        kw = max(g.tail for g in gens)
        max_len = max(len(v) + g.max_new_tokens for (_, v), g in zip(parsed, gens)) + kw - 1
        show = show_tail or entropy_tau is not None
        engine = self._engine_for(B, max_len, kw, track_text=show_tail)
        order = [engine.add_request(v, g, return_tail=show, return_stats=entropy_tau is not None)
                 for (_, v), g in zip(parsed, gens)]
        seqs = [p.seq for p in engine.queue]
        for seq, (ids, _) in zip(seqs, parsed):  # results report the prompt's token ids
            seq.prompt_ids = ids
        saved_tau = engine.entropy_tau
        engine.entropy_tau = entropy_tau if entropy_tau is not None else saved_tau
        index = {rid: b for b, rid in enumerate(order)}
        step = 0
        try:
            while engine.has_work:
                events = engine.step()
                ev = StepEvent(step, [None] * B)
                if show:
                    ev.tail_tokens = [[] for _ in range(B)]
                if entropy_tau is not None:
                    ev.tail_entropy, ev.delta_norm = [[] for _ in range(B)], [[] for _ in range(B)]
                for e in events:
                    b = index[e.request_id]
                    ev.committed[b] = e.token_ids[0] if e.token_ids else None
                    if show:
                        ev.tail_tokens[b] = e.tail_tokens
                    if entropy_tau is not None:
                        ev.tail_entropy[b], ev.delta_norm[b] = e.tail_entropy, e.delta_norm
                ev.texts = [seq.text for seq in seqs]
                yield ev
                step += 1
        finally:
            engine.entropy_tau = saved_tau
            for rid in order:  # a consumer that stops early leaves nothing running
                engine.abort(rid)
            engine._aborted.clear()
        return [GenerationResult(s.prompt_ids, s.token_ids, s.final_text(), s.finish_reason) for s in seqs]
