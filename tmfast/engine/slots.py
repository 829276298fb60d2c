"""Batch slots: fixed-shape decoding state over one static KV cache, and its per-slot registry."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from csrc_triton import nn_commit, prepare_table, resolve_impl

from ..config import GenerationConfig
from ..model import TMModel
from .noise import EmbryoStream
from .step import SlotTensors, StepDraws, prefill, step_tensors


@dataclass
class SlotInfo:
    """The host-side state of one running sequence (its device rows live in SlotTensors).
    One object per slot: moving a sequence moves all of it."""
    live: bool  # its tail can change a commit or is watched (else inert: front-only steps)
    guided: bool  # its step needs the unconditional stream
    k: int  # tail length K (host copy: no device sync per step)
    length: int  # committed count (host copy)
    embryos: EmbryoStream | None  # None for an inert tail (no embryos drawn)
    history_noise: EmbryoStream | None
    tail_noise: EmbryoStream | None


@dataclass
class StepOutput:
    """What one batch step produced, for the running slots 0..n−1."""
    committed: list[int]  # per slot; −1: the front vector was not finite
    delta_norm: torch.Tensor | None  # (n, Kw); None after a front-only step
    tail_ids: list[list[int]] | None  # nearest token per tail slot after the update (probe)
    tail_entropy: dict[float, torch.Tensor]  # τ → (n, Kw) entropy of softmax(cos(z̃,E)/τ)


class DecodeBatch:
    """max_batch slots of fixed-shape decoding state over one static KV cache, which it owns.

    Running sequences always occupy slots 0..n−1: a step computes the first n slots
    rounded up to a power of two (cache rows as a view), and when a sequence leaves a
    hole, the last one moves into it (one cache-row copy per finished sequence).

    A sequence's tail is *live* when it can change a commit or is watched: front α < 1, or its
    request reads the tail (preview, per-slot stats). Otherwise it is *inert* and kept as
    zeros with α = [1, 0, …, 0]: only its front prediction (and its noise) matters. A step in
    which every running tail is inert forwards the committed positions alone (decode_step with
    front_only); any live tail makes it forward the tail window for the whole batch.

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
        self.cache = model.new_cache(max_batch, max_len + k_window - 1)
        model.cpu_weight_layout()
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
        self.state = SlotTensors.zeros(max_batch, k_window, d, dt, dev)
        self.info: list[SlotInfo | None] = [None] * max_batch  # the per-slot registry (host side)
        self.active = torch.arange(max_batch, device=dev)  # compared with n_active per step
        self.n_active = 0  # running sequences occupy slots 0..n_active−1
        # host staging buffers for the per-step draws (one copy to the device each)
        self._embryo_buf = torch.zeros(max_batch, d)
        self._hist_buf = torch.zeros(max_batch, d)
        self._front_noise_buf = torch.zeros(max_batch, d)
        self._tail_noise_buf = torch.zeros(max_batch, k_window, d)
        self._zero_row = torch.zeros(d)

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
        cfg, st = self.model.config, self.state
        dev = st.tail.device
        R, d = cfg.table_radius, cfg.n_embd
        infos, prompts = [], []
        for slot, v, g, watched in items:
            profile = g.alpha_profile()
            live = watched or profile[0] < 1.0
            info = SlotInfo(
                live=live,
                # the front's prediction comes from a committed position, which both streams share:
                # guidance changes only slots behind the front, so with K = 1 or an inert tail its
                # stream is not computed
                guided=live and g.guidance != 1.0 and g.tail > 1,
                k=g.tail, length=len(v),
                embryos=EmbryoStream.for_purpose(g.seed, "embryo", d, g.embryo_scale * R) if live else None,
                history_noise=EmbryoStream.for_purpose(g.seed, "history", d, g.history_noise * R)
                if g.history_noise > 0 else None,
                tail_noise=EmbryoStream.for_purpose(g.seed, "tail", d, g.tail_noise * R) if g.tail_noise > 0 else None)
            if info.history_noise is not None:  # the prompt is committed history too
                v = v + info.history_noise.take(len(v)).to(v.device, v.dtype)
            infos.append((slot, info, profile))
            prompts.append(v)
        T_pre = max(len(v) for v in prompts) - 1
        rows = slice(items[0][0], items[0][0] + len(items))
        if T_pre > 0:
            x = torch.zeros(len(items), T_pre, d, dtype=st.tail.dtype, device=dev)
            for i, v in enumerate(prompts):
                x[i, :len(v) - 1] = v[:-1]
            prefill(self.model, self.cache, x, torch.tensor([g.tail for _, _, g, _ in items], device=dev), rows)
        for (slot, info, profile), v, (_, _, g, _) in zip(infos, prompts, items):
            # nothing below can fail for a validated request; n_active moves last, so a failure
            # above leaves the running slots as they were
            self.info[slot] = info
            st.last[slot] = v[-1]
            st.tail[slot].zero_()
            st.alpha[slot].zero_()
            if info.live:
                st.tail[slot, :g.tail] = info.embryos.take(g.tail).to(dev, st.tail.dtype)
                st.alpha[slot, :g.tail] = torch.tensor(profile)
            else:  # inert: only the front moves (α = 1); the rest stays zero and is never read
                st.alpha[slot, 0] = 1.0
            st.length[slot] = len(v)
            st.k[slot] = g.tail
            st.guidance[slot] = g.guidance
        self.n_active += len(items)

    def release(self, slot: int, failed: bool = False) -> int | None:
        """Free a slot. If it was not the last running one, the last one moves into it:
        returns the slot that moved (its sequence now lives at `slot`), else None.
        A slot whose sequence failed or holds a non-finite vector is scrubbed first: a masked-out
        NaN in a cache slot still turns attention into NaN, so it must never reach a later
        occupant (or a sequence that moves in)."""
        st = self.state
        if failed or not bool(torch.isfinite(st.last[slot]).all() & torch.isfinite(st.tail[slot]).all()):
            self.scrub(slot)
        last = self.n_active - 1
        self.n_active = last
        moved = None
        if slot != last:
            n = self.info[last].length + self.k_window  # the slots its attention can reach
            self.cache.move_row(last, slot, n)
            self.state.move(last, slot)
            self.info[slot] = self.info[last]
            moved = last
        self.info[last] = None
        return moved

    @torch.no_grad()
    def reset(self) -> None:
        """Free and scrub every slot (after a failure that leaves the batch state in doubt)."""
        for slot in range(self.max_batch):
            self.scrub(slot)
            self.info[slot] = None
        self.n_active = 0

    @torch.no_grad()
    def scrub(self, slot: int) -> None:
        """Zero a slot's cache row (every layer, every slot) and its state rows."""
        self.cache.zero_row(slot)
        for t in (self.state.last, self.state.tail, self.state.alpha):
            t[slot].zero_()

    def _bucket(self) -> int:
        """Slots to compute: the running ones rounded up to a power of two (at most max_batch)."""
        size = 1
        while size < self.n_active:
            size *= 2
        return min(size, self.max_batch)

    def _draw(self, infos: list[SlotInfo], size: int, front_only: bool) -> StepDraws:
        """This step's host draws, staged for one copy each. Each stream draws exactly what the
        full Algorithm-1 step draws for its sequence (K tail noise vectors a step even where only
        the front's is used), so the text never depends on which kind of step ran."""
        dev, dt = self.state.tail.device, self.state.tail.dtype
        n, zero = len(infos), self._zero_row
        draws = StepDraws()
        if not front_only:
            torch.stack([i.embryos.take(1)[0] if i.embryos is not None else zero for i in infos],
                        out=self._embryo_buf[:n])
            self._embryo_buf[n:size].zero_()  # padding rows: inactive, but never stale
            draws.embryo = self._embryo_buf[:size].to(dev, dt)
        if any(i.history_noise is not None for i in infos):
            torch.stack([i.history_noise.take(1)[0] if i.history_noise is not None else zero for i in infos],
                        out=self._hist_buf[:n])
            self._hist_buf[n:size].zero_()
            draws.history_noise = self._hist_buf[:size].to(dev, dt)
        if any(i.tail_noise is not None for i in infos) and front_only:  # the common case: one stack
            buf = self._front_noise_buf
            torch.stack([i.tail_noise.take_first(i.k) if i.tail_noise is not None else zero for i in infos],
                        out=buf[:n])
            buf[n:size].zero_()
            draws.tail_noise = buf[:size].to(dev, dt)
        elif any(i.tail_noise is not None for i in infos):
            buf = self._tail_noise_buf
            buf[:size].zero_()
            for b, i in enumerate(infos):
                if i.tail_noise is not None and i.live:
                    buf[b, :i.k] = i.tail_noise.take(i.k)
                elif i.tail_noise is not None:  # an inert tail in a tail step: the front's draw, the rest stays zero
                    buf[b, 0] = i.tail_noise.take_first(i.k)
            draws.tail_noise = buf[:size].to(dev, dt)
        return draws

    @torch.no_grad()
    def step(self, probe: bool = False, entropy_taus=()) -> StepOutput:
        """Advance the running sequences (slots 0..n_active−1) by one step. probe: also report
        each tail slot's nearest token after the update, and the entropy of softmax(cos(z̃,E)/τ)
        for each τ in entropy_taus (a separate lookup: probing never changes what is committed)."""
        n, size = self.n_active, self._bucket()
        infos = self.info[:n]
        front_only = not any(i.live for i in infos)
        if probe and front_only:
            raise ValueError("a tail probe needs a watched (live) sequence in the batch")
        draws = self._draw(infos, size, front_only)
        active = self.active[:size] < n
        # the unconditional stream is only computed while some running sequence asks for guidance
        guided = any(i.guided for i in infos)
        span = None  # the window reaches position P + Kw − 2; the guided stream's scratch slots lie past max_len
        if self.bounded_span and not guided:
            span = min(max(i.length for i in infos) + (0 if front_only else self.k_window - 1), self.max_len)
        idx, delta, matured = self.step_fn(
            self.model, *step_tensors(self.cache, self.state.rows(size), active, draws),
            front_only=front_only, guided=guided,
            n_slots=self.max_len, span=span, impl=self.impl, committed_maturity=self.committed_maturity,
            commit_table=self.commit_table, keep_tail=probe)
        for i in infos:
            i.length += 1
        out = StepOutput(idx.tolist()[:n], delta[:n] if delta is not None else None, None, {})
        if probe:
            flat = matured[:n].reshape(-1, matured.shape[-1])
            for tau in list(entropy_taus) or [None]:
                ids, _, _, ent = nn_commit(flat, self.commit_table, entropy_tau=tau, table_inv_norm=self.table_inv_norm,
                                           impl=self.impl, check_finite=False)
                if out.tail_ids is None:
                    out.tail_ids = ids.view(n, -1).tolist()
                if tau is not None:
                    out.tail_entropy[tau] = ent.view(n, -1)
        return out
