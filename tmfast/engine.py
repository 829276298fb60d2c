"""The generation engine: prefill, the maturation step, stopping, batch state.

One step, for every sequence b of the batch (fixed shapes, positions as data):
  window  = [last committed vector | K tail slots | K tail slots again if guided]
  forward = one call; the committed vector's K/V land in the static cache at its
            position, the tail's K/V are transient (they occupy slots that later
            commits overwrite; the unconditional copy uses K scratch slots past the end)
  guide   = ẑ_u + s(ẑ_c − ẑ_u), the unconditional stream seeing the tail only
  update  = z̃ += α(ẑ − z̃)                      (csrc_triton.maturation_update)
  commit  = argmax_j <z̃_front, e_j>, snap to e_j (csrc_triton.nn_commit)
  shift   = drop the front, new embryo at the back of this sequence's K slots
Sequences may have different prompt lengths, tail lengths K ≤ the window's, guidance
and seeds; slots past a sequence's K are dead (α = 0, nobody attends to them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from csrc_triton import maturation_update, nn_commit

from .config import ConfigError, GenerationConfig
from .model import TMModel


class GenerationError(ValueError):
    """A generation request that cannot be served as asked."""


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "eos" | "stop" | "length"


@dataclass
class StepEvent:
    step: int
    committed: list[int | None]  # token committed this step, per sequence (None: finished)
    tail_tokens: list[list[int]] | None = None  # nearest token of each live tail slot, front first
    delta_norm: torch.Tensor | None = None  # (B, K) ‖Δz̃‖ of this step's update
    texts: list[str] = field(default_factory=list)  # committed text so far (kept when show_tail or stop strings)


class EmbryoStream:
    """Per-sequence source of embryo vectors: a function of (seed, draw index) only,
    so a sequence's embryos do not depend on the batch it runs in."""

    def __init__(self, seed: int, dim: int, norm: float, block: int = 64):
        self.gen = torch.Generator().manual_seed(seed)
        self.dim, self.scale, self.block = dim, norm / math.sqrt(dim), block
        self._buf, self._next = torch.empty(0, dim), 0

    def take(self, n: int) -> torch.Tensor:
        out = []
        while n > 0:
            if self._next == len(self._buf):
                self._buf = torch.randn(self.block, self.dim, generator=self.gen) * self.scale
                self._next = 0
            m = min(n, len(self._buf) - self._next)
            out.append(self._buf[self._next:self._next + m])
            self._next += m
            n -= m
        return torch.cat(out)


# --------------------------------------------------------------------------------------
# the two compiled-friendly functions
# --------------------------------------------------------------------------------------
def prefill(model: TMModel, ids: torch.Tensor, k: torch.Tensor) -> None:
    """Write the K/V of prompt tokens ids (B, T) (right-padded) into cache slots 0..T-1."""
    B, T = ids.shape
    slots = model.blocks[0].attn.kv_cache.k.shape[1]
    t = torch.arange(T, device=ids.device)
    mask = (torch.arange(slots, device=ids.device).view(1, 1, 1, -1) <= t.view(1, 1, T, 1))
    model.hidden(model.table(ids), pos=t.expand(B, T), alpha=torch.ones(B, T, device=ids.device),
                 k=k, mask=mask, cache_slots=t.expand(B, T))


def decode_step(model: TMModel, last, tail, length, k, alpha, guidance, active, embryo,
                n_slots: int, guided: bool, impl: str | None = None):
    """One maturation step for the whole batch. Shapes never change between steps.

    last (B,d) committed vector at position length-1; tail (B,Kw,d) front first;
    length (B,) committed count P; k (B,) tail lengths ≤ Kw; alpha (B,Kw) (0 on dead slots);
    guidance (B,); active (B,) bool; embryo (B,d) the vector appended this step.
    Returns (last, tail, length, committed ids, ‖Δz̃‖, ‖z̃‖, commit score).
    """
    B, Kw, d = tail.shape
    dev = tail.device
    j = torch.arange(Kw, device=dev)
    P = length.view(B, 1)
    max_pos = model.config.n_positions - 1

    pos = torch.cat([P - 1, P + j], dim=1)  # c0, tail
    slot = pos
    lo = torch.zeros_like(pos)
    hi = pos
    x = torch.cat([last.unsqueeze(1), tail], dim=1)
    a_in = torch.cat([torch.ones(B, 1, device=dev), alpha], dim=1)
    if guided:  # unconditional tail: same positions, scratch slots, sees only the tail
        scratch = (n_slots + j).expand(B, Kw)
        pos = torch.cat([pos, P + j], dim=1)
        slot = torch.cat([slot, scratch], dim=1)
        lo = torch.cat([lo, torch.full_like(scratch, n_slots)], dim=1)
        hi = torch.cat([hi, scratch], dim=1)
        x = torch.cat([x, tail], dim=1)
        a_in = torch.cat([a_in, alpha], dim=1)
    s = torch.arange(model.blocks[0].attn.kv_cache.k.shape[1], device=dev).view(1, 1, -1)
    mask = ((s >= lo.unsqueeze(-1)) & (s <= hi.unsqueeze(-1))).unsqueeze(1)

    out = model(x, pos=pos.clamp(max=max_pos), alpha=a_in, k=k, mask=mask, cache_slots=slot)
    pred_c = out[:, :Kw]
    pred_u = torch.cat([out[:, :1], out[:, 1 + Kw:2 * Kw]], dim=1) if guided else None

    tail = tail.clone()
    delta_norm, tail_norm = maturation_update(
        tail, pred_c, alpha * active.unsqueeze(1), pred_uncond=pred_u,
        guidance=guidance if guided else None, impl=impl)
    idx, score, _, _ = nn_commit(tail[:, 0], model.table.weight, impl=impl)

    shifted = torch.cat([tail[:, 1:], embryo.unsqueeze(1)], dim=1)
    shifted = torch.where((j == (k - 1).unsqueeze(1)).unsqueeze(-1), embryo.unsqueeze(1), shifted)
    act = active.view(B, 1)
    new_tail = torch.where(act.unsqueeze(-1), shifted, tail)
    new_last = torch.where(act, model.table(idx), last)
    return new_last, new_tail, length + active.long(), idx, delta_norm, tail_norm, score


# --------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------
class MaturationEngine:
    """Batched Token Maturation over a TMModel with a static KV cache.

    compile=True wraps the step in torch.compile(fullgraph=True); the step's shapes
    depend only on (batch, cache slots, tail window, guided), so it compiles once per
    such setup and never again between steps.
    """

    def __init__(self, model: TMModel, tokenizer=None, *, compile: bool = False,
                 compile_mode: str | None = None, impl: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.impl = impl
        self.compile = compile
        self._step = torch.compile(decode_step, fullgraph=True, dynamic=False, mode=compile_mode) \
            if compile else decode_step
        self._cache_shape = None

    @property
    def device(self):
        return self.model.table.weight.device

    # -- input handling ----------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise GenerationError("prompt is empty")
        if self.tokenizer is None:
            raise GenerationError("this engine has no tokenizer: pass token ids")
        return self.tokenizer.encode(prompt).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids)) if self.tokenizer is not None else ""

    def _check_request(self, ids: list[int], g: GenerationConfig) -> None:
        cfg = self.model.config
        if len(ids) == 0:
            raise GenerationError("prompt is empty")
        if min(ids) < 0 or max(ids) >= cfg.vocab_size:
            raise GenerationError(f"token ids must lie in [0, {cfg.vocab_size})")
        if g.tail > cfg.k_max:
            raise GenerationError(f"tail length K={g.tail} exceeds the model's k_max={cfg.k_max}")
        room = cfg.n_positions - len(ids) - g.tail + 1
        if room < 1:
            raise GenerationError(
                f"prompt of {len(ids)} tokens plus a tail of K={g.tail} does not fit the model "
                f"context of {cfg.n_positions} positions")
        if g.max_new_tokens > room:
            raise GenerationError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({g.max_new_tokens}) + tail K={g.tail} - 1 "
                f"exceeds the context of {cfg.n_positions}; at most {room} new tokens fit")

    def _setup(self, batch: int, n_slots: int, k_window: int, guided: bool) -> None:
        shape = (batch, n_slots, k_window, guided)
        if self._cache_shape != shape:  # allocate once per setup, not per call
            self.model.setup_caches(batch, n_slots + (k_window if guided else 0))
            self._cache_shape = shape

    # -- generation --------------------------------------------------------------------
    def generate(self, prompts, gen: GenerationConfig | Sequence[GenerationConfig] | None = None,
                 on_step: Callable[[StepEvent], None] | None = None, show_tail: bool = False
                 ) -> list[GenerationResult]:
        """Generate for a batch of prompts (strings or token-id lists); returns one result each."""
        stream = self.stream(prompts, gen, show_tail=show_tail)
        while True:
            try:
                ev = next(stream)
            except StopIteration as stop:
                return stop.value
            if on_step is not None:
                on_step(ev)

    @torch.no_grad()
    def stream(self, prompts, gen=None, show_tail: bool = False
               ) -> Iterator[StepEvent]:
        """Yield a StepEvent per maturation step; the generator's return value is the results."""
        if isinstance(prompts, (str, bytes)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise GenerationError("no prompts given")
        B = len(prompts)
        gens = [gen or GenerationConfig()] * B if not isinstance(gen, (list, tuple)) else list(gen)
        if len(gens) != B:
            raise GenerationError(f"{len(gens)} generation configs for {B} prompts")
        ids = [self.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        for i, g in zip(ids, gens):
            self._check_request(i, g)

        cfg, dev = self.model.config, self.device
        d, R = cfg.n_embd, cfg.table_radius
        Kw = max(g.tail for g in gens)
        guided = any(g.guidance != 1.0 for g in gens)
        n_slots = max(len(i) + g.max_new_tokens + Kw for i, g in zip(ids, gens))
        self._setup(B, n_slots, Kw, guided)

        k = torch.tensor([g.tail for g in gens], device=dev)
        alpha = torch.zeros(B, Kw)
        for b, g in enumerate(gens):
            alpha[b, :g.tail] = torch.tensor(g.alpha_profile())
        alpha = alpha.to(dev)
        guidance = torch.tensor([g.guidance for g in gens], dtype=torch.float32, device=dev)
        embryos = [EmbryoStream(g.seed, d, g.embryo_scale * R) for g in gens]
        tail = torch.zeros(B, Kw, d)
        for b, g in enumerate(gens):
            tail[b, :g.tail] = embryos[b].take(g.tail)
        tail = tail.to(dev, self.model.table.weight.dtype)

        T_pre = max(len(i) for i in ids) - 1
        if T_pre > 0:
            padded = torch.zeros(B, T_pre, dtype=torch.long)
            for b, i in enumerate(ids):
                padded[b, :len(i) - 1] = torch.tensor(i[:-1])
            prefill(self.model, padded.to(dev), k)
        last = self.model.table(torch.tensor([i[-1] for i in ids], device=dev))
        length = torch.tensor([len(i) for i in ids], device=dev)
        active_list = [True] * B
        out_ids: list[list[int]] = [[] for _ in range(B)]
        texts = [""] * B
        reasons = [""] * B

        step = 0
        while any(active_list):
            active = torch.tensor(active_list, device=dev)
            embryo = torch.stack([e.take(1)[0] for e in embryos]).to(dev, tail.dtype)
            last, tail, length, idx, delta, _, _ = self._step(
                self.model, last, tail, length, k, alpha, guidance, active, embryo,
                n_slots=n_slots, guided=guided, impl=self.impl)
            idx_list = idx.tolist()
            committed: list[int | None] = [None] * B
            for b in range(B):
                if not active_list[b]:
                    continue
                tok, g = idx_list[b], gens[b]
                committed[b] = tok
                if g.stop_at_eos and cfg.eos_token_id is not None and tok == cfg.eos_token_id:
                    reasons[b], active_list[b] = "eos", False
                    continue
                out_ids[b].append(tok)
                if self.tokenizer is not None and (g.stop or show_tail):  # else decode once at the end
                    texts[b] = self.decode(out_ids[b])
                    cut = min((texts[b].find(s) for s in g.stop if s in texts[b]), default=-1)
                    if cut >= 0:
                        texts[b], reasons[b], active_list[b] = texts[b][:cut], "stop", False
                        continue
                if len(out_ids[b]) >= g.max_new_tokens:
                    reasons[b], active_list[b] = "length", False
            tail_tokens = None
            if show_tail:
                tail_ids = nn_commit(tail.reshape(B * Kw, d), self.model.table.weight, impl=self.impl)[0]
                tail_ids = tail_ids.view(B, Kw).tolist()
                tail_tokens = [tail_ids[b][:gens[b].tail - 1] for b in range(B)]  # back slot = fresh embryo
            yield StepEvent(step, committed, tail_tokens, delta, list(texts))
            step += 1

        return [GenerationResult(ids[b], out_ids[b], texts[b] if reasons[b] == "stop" else self.decode(out_ids[b]),
                                 reasons[b]) for b in range(B)]
