"""The maturation step: pure functions over tensors, what torch.compile sees.

One step, for every slot b of the batch (fixed shapes, positions as data):
  window  = [last committed | tail slots 0..Kw−2 | the same again, unconditional, if guided]
            (the back slot is never forwarded: nothing reads its output); or
            [last committed] alone when every tail is inert (front α = 1)
  forward = one call; the committed vector's K/V land in the static cache at its
            position, the tail's K/V are transient (they occupy slots that later
            commits overwrite; the unconditional copy uses scratch slots past the end)
  guide   = ẑ_u + s(ẑ_c − ẑ_u), the unconditional stream seeing the tail only
  update  = z̃ += α(ẑ − z̃)                      (csrc_triton.maturation_update)
  commit  = argmax_j <z̃_front, e_j>, snap to e_j (csrc_triton.nn_commit)
  shift   = drop the front, new embryo at the back of this sequence's K slots
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from csrc_triton import maturation_update, nn_commit

from ..model import KVCache, TMModel


@dataclass
class SlotTensors:
    """The device state of batch slots, one row per slot. Everything a sequence carries on the
    device is a field here, so moving a sequence to another slot (`move`) moves all of it."""
    last: torch.Tensor  # (B,d) committed vector at position length−1
    tail: torch.Tensor  # (B,Kw,d) front first; inert tails are zeros
    length: torch.Tensor  # (B,) committed count P
    k: torch.Tensor  # (B,) tail lengths ≤ Kw
    alpha: torch.Tensor  # (B,Kw) α per slot (0 on dead slots; [1, 0…] for inert tails)
    guidance: torch.Tensor  # (B,)

    @classmethod
    def zeros(cls, batch: int, k_window: int, d: int, dtype, device) -> "SlotTensors":
        return cls(last=torch.zeros(batch, d, device=device, dtype=dtype),
                   tail=torch.zeros(batch, k_window, d, device=device, dtype=dtype),
                   length=torch.ones(batch, dtype=torch.long, device=device),
                   k=torch.ones(batch, dtype=torch.long, device=device),
                   alpha=torch.zeros(batch, k_window, device=device),
                   guidance=torch.ones(batch, device=device))

    def rows(self, n: int) -> "SlotTensors":
        """The first n slots (views: writes go to the state)."""
        return SlotTensors(*(getattr(self, f.name)[:n] for f in fields(self)))

    def move(self, src: int, dst: int) -> None:
        for f in fields(self):
            t = getattr(self, f.name)
            t[dst] = t[src]


@dataclass
class StepDraws:
    """This step's random vectors, drawn on the host per sequence (None: not used)."""
    embryo: torch.Tensor | None = None  # (B,d) appended at the back of each tail
    history_noise: torch.Tensor | None = None  # (B,d) added to the committed vector as read
    tail_noise: torch.Tensor | None = None  # (B,Kw,d) unscaled (× √α in the update); (B,d) front-only


def step_window(model: TMModel, state: SlotTensors, front_only: bool, guided: bool, n_slots: int,
                span: int | None = None, cache_slots: int | None = None):
    """The step's forward inputs (x, pos, alpha_in, mask, cache slots) for every sequence.

    The output at a position predicts the slot after it, so a step needs exactly:
      front_only  [last committed]                    its output is the front's prediction
      else        [last committed | tail slots 0..Kw−2 | the same again, unconditional, if guided]
    The back slot is never forwarded: its output would predict a slot that does not exist, and
    in a causal window nothing attends to it. The unconditional copy sits at the same positions
    in scratch cache slots past n_slots and sees only the tail; its front prediction is the
    committed position's (history is shared by both streams). alpha_in is None for the
    front-only window: every position there is committed (α = 1, see TMModel.hidden).
    span: attend over the first `span` cache slots only (default: all `cache_slots`).
    """
    last, length = state.last, state.length
    B, dev = last.shape[0], last.device
    P = length.view(B, 1)
    pos = P - 1
    x = last.unsqueeze(1)
    slot, lo, hi, a_in = pos, torch.zeros_like(pos), pos, None
    if not front_only:
        tail, alpha = state.tail, state.alpha
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
    s = torch.arange(span or cache_slots, device=dev).view(1, 1, -1)
    mask = ((s >= lo.unsqueeze(-1)) & (s <= hi.unsqueeze(-1))).unsqueeze(1)
    return x, pos.clamp(max=model.config.n_positions - 1), a_in, mask, slot


def step_tensors(cache: KVCache, state: SlotTensors, active: torch.Tensor, draws: StepDraws) -> tuple:
    """decode_step's inputs as plain tensors, the signature a compiled step is traced with: a
    compiled function checks its inputs on every call, and plain tensors are checked in C++
    (dataclass inputs cost ~0.5 ms a call in Python guards, measured at batch 1)."""
    return (cache.k, cache.v, state.last, state.tail, state.length, state.k, state.alpha, state.guidance, active,
            draws.embryo, draws.history_noise, draws.tail_noise)


def decode_step(model: TMModel, cache: KVCache, state: SlotTensors, active: torch.Tensor, draws: StepDraws,
                **options):
    """One maturation step for the whole batch, in place on `state` (last, tail, length); the
    options are decode_step_tensors'. Shapes never change between steps and nothing in here
    syncs with the host.

    The B sequences own cache rows 0..B−1 (a prefix of the cache: a view, no copy).
    active (B,) bool: slots that advance. draws: this step's embryos and noises.
    Returns (committed ids (B,), ‖Δz̃‖ (B,Kw) or None, the tail after the update and before the
    shift (B,Kw,d) when keep_tail — what a tail probe reads — else None).
    """
    return decode_step_tensors(model, *step_tensors(cache, state, active, draws), **options)


def decode_step_tensors(model: TMModel, cache_k, cache_v, last, tail, length, k, alpha, guidance, active,
                        embryo, history_noise, tail_noise, *, front_only: bool, guided: bool, n_slots: int,
                        span: int | None = None, impl: str | None = None,
                        committed_maturity: torch.Tensor | None = None, commit_table: torch.Tensor | None = None,
                        keep_tail: bool = False):
    """decode_step over plain tensors (what torch.compile traces; see step_tensors).

    front_only — for a batch whose tails are all inert (front α = 1: the front is overwritten by
    the prediction from the last committed position, so no other slot can change a commit):
    forward [last committed] alone, commit prediction (+ tail_noise (B,d), the front slot's draw).
    tail/alpha/guidance and the embryo are unused; committed_maturity, the maturity
    conditioning at α = 1, may be passed precomputed (it is a constant while serving).
    guided: compute the unconditional stream (scratch cache slots n_slots.. ).
    n_slots: cache slots for positions. span: attend over the first `span` cache slots only
    (every position this step reads or writes must lie below it; default: the whole cache, one
    shape for every step). commit_table: the table to commit against, in whatever layout its
    matmul reads fastest (default: model.table.weight; lookups always use the model's table).
    A slot whose front vector is not finite commits index −1 (no sync here: the caller ends
    that sequence alone).
    """
    cache = KVCache.of(cache_k, cache_v)
    state = SlotTensors(last, tail, length, k, alpha, guidance)
    draws = StepDraws(embryo, history_noise, tail_noise)
    x, pos, a_in, mask, slot = step_window(model, state, front_only, guided, n_slots, span, cache.slots)
    noise = draws.tail_noise
    matured = None
    if front_only:
        out = model(x, pos=pos, alpha=a_in, k=state.k, mask=mask, cache=cache, cache_slots=slot,
                    maturity=committed_maturity, cache_span=span)
        front = out[:, 0] if noise is None else out[:, 0] + noise
        delta_norm = None
    else:
        tail, alpha = state.tail, state.alpha
        Kw = tail.shape[1]
        out = model(x, pos=pos, alpha=a_in, k=state.k, mask=mask, cache=cache, cache_slots=slot, cache_span=span)
        pred_c = out[:, :Kw]
        pred_u = torch.cat([out[:, :1], out[:, Kw:]], dim=1) if guided else None
        if noise is not None:  # slots that move more get more noise (α is 0 on unused slots)
            noise = noise * alpha.sqrt().unsqueeze(-1)
        new = tail.clone()
        delta_norm, _ = maturation_update(
            new, pred_c, alpha * active.unsqueeze(1), pred_uncond=pred_u,
            guidance=state.guidance if guided else None, noise=noise, impl=impl)
        front = new[:, 0]
        matured = new if keep_tail else None
    table = model.table.weight if commit_table is None else commit_table
    idx, _, _, _ = nn_commit(front, table, impl=impl, check_finite=False)
    if not front_only:  # drop the front, a fresh embryo at the back of each sequence's own K slots
        k, embryo = state.k, draws.embryo
        j = torch.arange(Kw, device=tail.device)
        shifted = torch.cat([new[:, 1:], embryo.unsqueeze(1)], dim=1)
        shifted = torch.where((j == (k - 1).unsqueeze(1)).unsqueeze(-1), embryo.unsqueeze(1), shifted)
        tail.copy_(torch.where(active.view(-1, 1, 1), shifted, new))
    committed = model.table(idx.clamp(min=0))
    if draws.history_noise is not None:
        committed = committed + draws.history_noise
    state.last.copy_(torch.where(active.unsqueeze(1), committed, state.last))
    state.length.add_(active.long())
    return idx, delta_norm, matured


def prefill(model: TMModel, cache: KVCache, x: torch.Tensor, k: torch.Tensor, rows: slice) -> None:
    """Write the K/V of committed vectors x (n, T, d) (right-padded) into cache rows `rows`
    (a range of n rows), slots 0..T−1, attending over those T slots only."""
    n, T, _ = x.shape
    model.prefill(x, cache, alpha=torch.ones(n, T, device=x.device), k=k, rows=rows, span=T)
