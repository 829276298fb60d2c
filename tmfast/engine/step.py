"""The maturation step: pure functions over tensors, what torch.compile sees.

One step, for every slot b of the batch (fixed shapes, positions as data):
  window  = [last committed | tail slots 0..Kw−2 | the same again, unconditional, if guided]
            (the back slot is never forwarded: nothing reads its output); or
            [last committed] alone when every tail is inert (front α = 1)
  draws   = embryos and noises, computed here from (seed, position, slot, purpose)  (noise.py)
  forward = one call; the committed vector's K/V land in the static cache at its position, the
            tail's are transient (slots that later commits overwrite)
  guide   = ẑ_u + s(ẑ_c − ẑ_u), the unconditional stream seeing the tail only
  update  = z̃ += α(ẑ − z̃) [+ noise]              (csrc_triton.maturation_update)
  commit  = argmax_j <z̃_front, e_j>, snap to e_j  (csrc_triton.nn_commit)
  shift   = drop the front, new embryo at the back of this sequence's K slots

Cache layout of a row: slots 0..S−1 are the unconditional stream's scratch (S = Kw − 1: the
tail window minus one), position p lives in slot S + p. So every slot a step reads or writes
lies below S + (longest committed length) + Kw − 1, and a step attends over that span only:
a prefix of the cache whatever the step kind.

The state the step reads and writes (SlotTensors, the KV cache, the batch's constants) lives at
one address for the engine's life; the rows and span a step covers come in as views made once
per bucket. Nothing here syncs with the host. The tail, the last committed vector and the update
are fp32 whatever the model's dtype (small α·Δ steps round away in bf16).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from csrc_triton import maturation_update, nn_commit

from ..model import KVCache, TMModel
from .noise import PURPOSES, counter, normal_rows, row_keys


@dataclass
class SlotTensors:
    """The device state of batch slots, one row per slot. Everything a sequence carries on the
    device is a field here, so moving a sequence to another slot (`move`) moves all of it."""
    last: torch.Tensor  # (B,d) fp32: committed vector at position length−1 (history noise included)
    tail: torch.Tensor  # (B,Kw,d) fp32, front first; inert tails are zeros
    length: torch.Tensor  # (B,) int64: committed count P
    k: torch.Tensor  # (B,) int64: tail lengths ≤ Kw
    alpha: torch.Tensor  # (B,Kw) α per slot (0 on dead slots; [1, 0…] for inert tails)
    guidance: torch.Tensor  # (B,)
    seed_key: torch.Tensor  # (B,) int64: noise.seed_key of the request's seed
    noise_scale: torch.Tensor  # (B,3) per-component scale of embryo, history, tail noise (0: none)

    @classmethod
    def zeros(cls, batch: int, k_window: int, d: int, device) -> "SlotTensors":
        f32 = dict(device=device, dtype=torch.float32)
        i64 = dict(device=device, dtype=torch.long)
        return cls(last=torch.zeros(batch, d, **f32), tail=torch.zeros(batch, k_window, d, **f32),
                   length=torch.ones(batch, **i64), k=torch.ones(batch, **i64),
                   alpha=torch.zeros(batch, k_window, **f32), guidance=torch.ones(batch, **f32),
                   seed_key=torch.zeros(batch, **i64), noise_scale=torch.zeros(batch, 3, **f32))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    def rows(self, n: int) -> "SlotTensors":
        """The first n slots (views: writes go to the state)."""
        return SlotTensors(*(t[:n] for t in self.tensors()))

    def move(self, src: int, dst: int) -> None:
        for t in self.tensors():
            t[dst] = t[src]


@dataclass
class StepConstants:
    """What every step reads that does not change while the engine serves (made once)."""
    slot_ids: torch.Tensor  # (cache slots,) int64 arange: a step's span is a view slot_ids[:span]
    words: torch.Tensor  # noise.NoiseBasis
    quantiles: torch.Tensor
    committed_maturity: torch.Tensor  # (1,1,d) MLP(SinEmb(1)): the front-only step's conditioning
    commit_table: torch.Tensor  # the table in the layout the commit reads fastest


def step_window(model: TMModel, state: SlotTensors, front_only: bool, guided: bool, scratch: int,
                span_ids: torch.Tensor):
    """The step's forward inputs (x, pos, alpha_in, mask, cache slots) for every sequence.

    The output at a position predicts the slot after it, so a step needs exactly:
      front_only  [last committed]                    its output is the front's prediction
      else        [last committed | tail slots 0..Kw−2 | the same again, unconditional, if guided]
    The back slot is never forwarded: its output would predict a slot that does not exist, and
    in a causal window nothing attends to it. The unconditional copy sits at the same positions
    in the scratch slots 0..Kw−2 and sees only the tail; its front prediction is the committed
    position's (history is shared by both streams). alpha_in is None for the front-only window:
    every position there is committed (α = 1, see TMModel.hidden). span_ids: the cache slots
    attended (a prefix; every slot this step reads or writes lies in it).
    """
    last, length = state.last, state.length
    B, dev = last.shape[0], last.device
    P = length.view(B, 1)
    pos = P - 1
    x = last.unsqueeze(1)
    slot = pos + scratch
    lo, hi, a_in = torch.full_like(pos, scratch), slot, None
    if not front_only:
        tail, alpha = state.tail, state.alpha
        T = tail.shape[1] - 1
        j = torch.arange(T, device=dev)
        x = torch.cat([x, tail[:, :T]], dim=1)
        pos = torch.cat([pos, P + j], dim=1)
        slot = pos + scratch
        lo, hi = torch.full_like(pos, scratch), slot
        a_in = torch.cat([torch.ones(B, 1, device=dev), alpha[:, :T]], dim=1)
        if guided:
            own = j.expand(B, T)  # scratch slot j holds tail slot j of the unconditional stream
            pos = torch.cat([pos, P + j], dim=1)
            slot = torch.cat([slot, own], dim=1)
            lo = torch.cat([lo, torch.zeros_like(own)], dim=1)
            hi = torch.cat([hi, own], dim=1)
            x = torch.cat([x, tail[:, :T]], dim=1)
            a_in = torch.cat([a_in, alpha[:, :T]], dim=1)
    s = span_ids.view(1, 1, -1)
    mask = ((s >= lo.unsqueeze(-1)) & (s <= hi.unsqueeze(-1))).unsqueeze(1)
    return x, pos.clamp(max=model.config.n_positions - 1), a_in, mask, slot


def step_draws(state: SlotTensors, c: StepConstants, front_only: bool, history: bool, tail_noise: bool):
    """This step's random vectors, one normal_rows call for all of them: (embryo (B,d) | None,
    history noise (B,d) | None, tail noise (B,Kw,d) — (B,d) front-only — | None), scaled.
    Keys: the embryo of position P+k (the new back slot), the history noise of position P (the
    vector committed now), the tail noise of slot j at position P+j (j = 0 only, front-only)."""
    P, key, scale = state.length, state.seed_key, state.noise_scale
    B = P.shape[0]
    counts = []
    if not front_only:
        counts.append(counter(PURPOSES["embryo"], P + state.k))
    if history:
        counts.append(counter(PURPOSES["history"], P))
    if tail_noise:
        if front_only:
            counts.append(counter(PURPOSES["tail"], P))
        else:
            j = torch.arange(state.tail.shape[1], device=P.device)
            counts.append(counter(PURPOSES["tail"], P.unsqueeze(1) + j, j).flatten())
    if not counts:
        return None, None, None
    sizes = [t.shape[0] for t in counts]
    if len(counts) == 1:  # the common case (front-only steps with tail noise): no cat, no split
        z = (normal_rows(row_keys(_keys_for(key, sizes), counts[0]), c.words, c.quantiles),)
    else:
        z = normal_rows(row_keys(_keys_for(key, sizes), torch.cat(counts)), c.words, c.quantiles).split(sizes)
    i, embryo, hist, noise = 0, None, None, None
    if not front_only:
        embryo, i = z[i] * scale[:, 0:1], i + 1
    if history:
        hist, i = z[i] * scale[:, 1:2], i + 1
    if tail_noise:
        noise = z[i] * scale[:, 2:3] if front_only else \
            z[i].view(B, -1, z[i].shape[-1]) * (scale[:, 2:3] * state.alpha.sqrt()).unsqueeze(-1)
    return embryo, hist, noise


def _keys_for(key: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Each row's seed key, for rows laid out as size-B blocks (one per sequence) or B·Kw blocks
    (Kw per sequence, sequence-major)."""
    B = key.shape[0]
    parts = [key if n == B else key.repeat_interleave(n // B) for n in sizes]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def decode_step_tensors(model: TMModel, cache_k, cache_v, last, tail, length, k, alpha, guidance, seed_key,
                        noise_scale, n_running, span_ids, words, quantiles, committed_maturity, commit_table, *,
                        front_only: bool, guided: bool, scratch: int, history: bool = True,
                        tail_noise: bool = True, keep_tail: bool = True, impl: str | None = None):
    """One maturation step for the first B slots (B = last.shape[0]), in place on the state (last,
    tail, length) and the cache; plain tensors in (a compiled function checks its inputs on every
    call, and plain tensors are checked in C++). Slots b ≥ n_running (a 0-d tensor) are padding:
    computed, never advanced.

    front_only — for a batch whose tails are all inert (front α = 1: the front is overwritten by
    the prediction from the last committed position, so no other slot can change a commit):
    forward [last committed] alone and commit prediction + the front's tail noise; tail, alpha
    and guidance are unused. guided: compute the unconditional stream (scratch slots).
    history / tail_noise: draw those noises (an optimisation only: a sequence without them has
    scale 0, and adding 0 changes nothing; a compiled engine always draws them, one graph fewer).
    keep_tail: also return the tail after the update and before the shift (what a probe reads).
    A slot whose front vector is not finite commits index −1 (no sync: the caller ends that
    sequence alone). Returns (committed ids (B,), ‖Δz̃‖ (B,Kw) | None, kept tail | None).
    """
    cache = KVCache.of(cache_k, cache_v)
    state = SlotTensors(last, tail, length, k, alpha, guidance, seed_key, noise_scale)
    consts = StepConstants(span_ids, words, quantiles, committed_maturity, commit_table)
    B = last.shape[0]
    active = torch.arange(B, device=last.device) < n_running
    embryo, hist, noise = step_draws(state, consts, front_only, history, tail_noise)
    x, pos, a_in, mask, slot = step_window(model, state, front_only, guided, scratch, span_ids)
    span = span_ids.shape[0]
    matured = delta_norm = None
    if front_only:
        out = model(x, pos=pos, alpha=a_in, k=k, mask=mask, cache=cache, cache_slots=slot,
                    maturity=committed_maturity, cache_span=span)
        front = out[:, 0].float()
        if noise is not None:
            front = front + noise
    else:
        Kw = tail.shape[1]
        out = model(x, pos=pos, alpha=a_in, k=k, mask=mask, cache=cache, cache_slots=slot,
                    cache_span=span).float()
        pred_c = out[:, :Kw]
        pred_u = torch.cat([out[:, :1], out[:, Kw:]], dim=1) if guided else None
        new = tail.clone()
        delta_norm, _ = maturation_update(new, pred_c, alpha * active.unsqueeze(1), pred_uncond=pred_u,
                                          guidance=guidance if guided else None, noise=noise, impl=impl)
        front = new[:, 0]
        matured = new if keep_tail else None
        # drop the front, a fresh embryo at the back of each sequence's own K slots
        j = torch.arange(Kw, device=tail.device)
        shifted = torch.cat([new[:, 1:], embryo.unsqueeze(1)], dim=1)
        shifted = torch.where((j == (k - 1).unsqueeze(1)).unsqueeze(-1), embryo.unsqueeze(1), shifted)
        tail.copy_(torch.where(active.view(-1, 1, 1), shifted, new))
    idx, _, _, _ = nn_commit(front, commit_table, impl=impl, check_finite=False)
    committed = model.table(idx.clamp(min=0)).float()
    if hist is not None:
        committed = committed + hist
    last.copy_(torch.where(active.unsqueeze(1), committed, last))
    length.add_(active.long())
    return idx, delta_norm, matured
