"""Batch slots: fixed-shape decoding state over one static KV cache, and its per-slot registry."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from csrc_triton import nn_commit, prepare_table, resolve_impl

from ..config import GenerationConfig
from ..model import TMModel
from .noise import MAX_POSITIONS, MAX_SLOTS, PURPOSES, counter, noise_basis, normal_rows, row_keys, seed_key
from .readback import Readback, Ticket, to_device
from .step import SlotTensors, StepConstants

MIN_SPAN = 64  # the smallest attention span bucket of a compiled step (cache slots)
NEEDS = ("live", "guided", "history", "tail_noise")  # the SlotInfo flags that choose a step's kind


@dataclass
class SlotInfo:
    """The host-side state of one running sequence (its device rows live in SlotTensors).
    One object per slot: moving a sequence moves all of it."""
    live: bool  # its tail can change a commit or is watched (else inert: front-only steps)
    guided: bool  # its step needs the unconditional stream
    history: bool  # it reads committed vectors with noise
    tail_noise: bool  # its tail updates add noise
    base: int  # committed count = base + the batch's step counter (no per-step host work)


@dataclass(slots=True)
class StepOutput:
    """What one batch step produced, for the slots running when it was launched."""
    committed: list[int]  # per slot; −1: the front vector was not finite
    delta_norm: list[list[float]] | None  # (n, Kw); None after a step without a probe
    tail_ids: list[list[int]] | None  # nearest token per tail slot after the update (probe)
    tail_entropy: dict[float, list[list[float]]]  # τ → (n, Kw) entropy of softmax(cos(z̃,E)/τ)


@dataclass(slots=True)
class PendingStep:
    """A launched step whose results are on their way to the host."""
    ticket: Ticket
    n: int  # slots 0..n−1 were running
    probe: tuple | None  # (Kw, taus) when the packet carries the probe


def available_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can still take on this device (None: unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(model: TMModel, rows: int, slots: int) -> None:
    """Refuse, in one line and before allocating, a KV cache the device cannot hold."""
    c, p = model.config, model.table.weight
    need = 2 * c.n_layer * rows * slots * c.n_embd * p.element_size()
    free = available_bytes(p.device)
    if free is not None and need > 0.9 * free:
        raise MemoryError(f"a KV cache of {rows} rows × {slots} slots needs {need / 2 ** 30:.1f} GiB; "
                          f"{free / 2 ** 30:.1f} GiB is available on {p.device}: lower max_batch (or max_len)")


def row_buckets(max_batch: int) -> list[int]:
    """Rows a step computes: the running count rounded up to a power of two (capped)."""
    sizes, n = [], 1
    while n < max_batch:
        sizes.append(n)
        n *= 2
    return sizes + [max_batch]


def span_buckets(slots: int) -> list[int]:
    """Spans a compiled step attends over: MIN_SPAN · 2^i below the cache size, then the cache."""
    spans, s = [], MIN_SPAN
    while s < slots:
        spans.append(s)
        s *= 2
    return spans + [slots]


class DecodeBatch:
    """max_batch slots of fixed-shape decoding state over one static KV cache, which it owns.

    Running sequences always occupy slots 0..n−1: a step computes the first n slots rounded up to
    a bucket (row_buckets) and attends over the cache slots in use (exact when nothing is
    compiled; span_buckets when compiled: one graph per shape, and the cost follows the longest
    sequence, not the cache); when a sequence leaves a hole, the last one moves into it (one
    cache-row copy per finished sequence).

    Every tensor a step reads or writes — cache, state, constants, the per-bucket views of them —
    is made once here and keeps its address for the batch's life (marked static for dynamo, so a
    compiled step can be captured as a CUDA graph). A step is `launch`ed (queued on the device,
    its results copied back without blocking) and `collect`ed later.

    A sequence's tail is *live* when it can change a commit or is watched: front α < 1, or its
    request reads the tail (preview, per-slot stats). Otherwise it is *inert* and kept as zeros
    with α = [1, 0, …, 0]: only its front prediction (and its noise) matters. A step in which
    every running tail is inert forwards the committed positions alone (front-only); any live
    tail makes it forward the tail window for the whole batch.

    max_len: cache slots for positions; a sequence needs prompt + new tokens + k_window − 1 of
    them. The cache holds k_window − 1 scratch slots more, first, for the unconditional stream.
    """

    def __init__(self, model: TMModel, max_batch: int, max_len: int, k_window: int, step_fn,
                 impl: str | None = None, compiled: bool = False, cuda_graphs: bool = False):
        cfg = model.config
        if cfg.n_positions > MAX_POSITIONS or k_window > MAX_SLOTS:
            raise ValueError(f"the noise counters hold positions < {MAX_POSITIONS} and tail slots < {MAX_SLOTS}")
        self.model, self.step_fn, self.impl, self.compiled = model, step_fn, impl, compiled
        self.cuda_graphs = cuda_graphs  # a step's outputs live until the next replay: read them before
        self.max_batch, self.max_len, self.k_window = max_batch, max_len, k_window
        self.scratch = k_window - 1
        # a compiled step sees the rows and span it covers as dynamic sizes (one graph for all
        # buckets but batch 1); a slice of the whole cache dimension would be specialised
        # (another graph), so a compiled batch keeps one spare row and slot it never uses
        spare = 1 if compiled else 0
        rows, slots_all = max_batch + (spare if max_batch > 1 else 0), self.scratch + max_len + spare
        check_memory(model, rows, slots_all)
        self.cache = model.new_cache(rows, slots_all)
        slots = self.scratch + max_len  # the ones in use
        model.cpu_weight_layout()
        table = model.table.weight.detach()
        dev, d = table.device, cfg.n_embd
        self.table_inv_norm = prepare_table(table)
        # the commit's matmul reads a column-major table faster on CPU (bench/layout.py: 2.6× at
        # batch 1 for the default model, 1.5× for GPT-2-Medium's): a copy beside the row-major
        # table that lookups use, for the torch path (the Triton kernels want rows contiguous);
        # fp32, since the CPU matmul of an fp32 query and a 16-bit table would convert the table
        commit_table = table
        if dev.type == "cpu" and resolve_impl(impl, dev, "tmfast") == "torch":
            commit_table = table.float().t().contiguous().t()
        basis = noise_basis(d, dev)
        self.consts = StepConstants(torch.arange(slots, device=dev), basis.words, basis.quantiles,
                                    model.maturity_at(1.0), commit_table)
        self.state = SlotTensors.zeros(max_batch, k_window, d, dev)
        self.n_running = torch.zeros((), dtype=torch.long, device=dev)  # slots b < n_running advance
        self._n_running_set = 0
        self.slots = slots
        self.rows = row_buckets(max_batch)
        self.spans = span_buckets(slots)
        # views made once: a step's inputs are the same tensors, at the same addresses, every time
        self._row_views = {n: self.state.rows(n).tensors() for n in self.rows}
        self._span_views = {s: self.consts.slot_ids[:s] for s in self.spans}
        if compiled:  # (an eager batch does not import dynamo: ~70 MB and a second of start-up)
            for t in self.static_tensors():
                torch._dynamo.mark_static_address(t)
            for n, views in self._row_views.items():
                for t in views if n > 1 else ():  # size 1 is always specialised
                    torch._dynamo.maybe_mark_dynamic(t, 0)
            for t in self._span_views.values():
                torch._dynamo.maybe_mark_dynamic(t, 0)
        self.readback = Readback(dev, max_batch)
        self.info: list[SlotInfo | None] = [None] * max_batch  # the per-slot registry (host side)
        self.n_active = 0  # running sequences occupy slots 0..n_active−1
        self._t = 0  # steps launched: a slot's committed count is its base + _t
        self._max_base = 0  # max base over the running slots (the span's bound)
        self._needs = dict.fromkeys(NEEDS, 0)  # running sequences that are live, guided, … (kinds())
        self._kinds: dict | None = None
        self._bucket = 1
        c = self.consts
        # the step's positional inputs, one tuple per rows bucket (the span view goes between)
        self._row_args = {n: (self.cache.k, self.cache.v, *views, self.n_running) for n, views in self._row_views.items()}
        self._const_args = (c.words, c.quantiles, c.committed_maturity, c.commit_table)

    def static_tensors(self) -> list[torch.Tensor]:
        """Every tensor a step is given (each at a fixed address)."""
        c = self.consts
        views = [t for ts in self._row_views.values() for t in ts] + list(self._span_views.values())
        return [*self.cache.k, *self.cache.v, *self.state.tensors(), self.n_running, c.slot_ids, c.words,
                c.quantiles, c.committed_maturity, c.commit_table, *views]

    def free_slots(self) -> list[int]:
        return list(range(self.n_active, self.max_batch))

    def length(self, slot: int) -> int:
        return self.info[slot].base + self._t

    # -- admission ---------------------------------------------------------------------------
    @torch.no_grad()
    def admit(self, items: list[tuple[int, list[int] | torch.Tensor, GenerationConfig, bool]]) -> None:
        """Start sequences: (slot, prompt token ids or committed vectors (T,d) on the device,
        settings, watched: the request reads its tail); one batched prefill, one host→device copy
        of everything the host knows about them. Slots must be the next free ones, in order."""
        if not items:
            return
        a = self.n_active
        if [item[0] for item in items] != list(range(a, a + len(items))):
            raise ValueError("admit() takes the next free slots, in order")
        cfg, st, model = self.model.config, self.state, self.model
        dev, d, Kw, n = st.tail.device, cfg.n_embd, self.k_window, len(items)
        R, inv_sqrt_d = cfg.table_radius, 1.0 / math.sqrt(d)
        lens = [len(p) for _, p, _, _ in items]
        T = max(lens)
        ids = torch.zeros(n, T, dtype=torch.long)
        # per sequence: length, k, guidance, seed key, 3 noise scales, Kw α (float64: every int exact)
        values = torch.zeros(n, 7 + Kw, dtype=torch.float64)
        infos = []
        for i, (_, prompt, g, watched) in enumerate(items):
            profile = g.alpha_profile()
            live = watched or profile[0] < 1.0
            infos.append(SlotInfo(live=live,
                                  # the front's prediction comes from a committed position, which both
                                  # streams share: guidance changes only slots behind the front, so with
                                  # K = 1 or an inert tail its stream is not computed
                                  guided=live and g.guidance != 1.0 and g.tail > 1,
                                  history=g.history_noise > 0, tail_noise=g.tail_noise > 0, base=0))
            if not isinstance(prompt, torch.Tensor):
                ids[i, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
            alpha = profile + [0.0] * (Kw - g.tail) if live else [1.0] + [0.0] * (Kw - 1)
            values[i] = torch.tensor([len(prompt), g.tail, g.guidance, seed_key(g.seed),
                                      g.embryo_scale * R * inv_sqrt_d if live else 0.0,
                                      g.history_noise * R * inv_sqrt_d, g.tail_noise * R * inv_sqrt_d] + alpha,
                                     dtype=torch.float64)
        ids, values = to_device(ids, dev), to_device(values, dev)
        length, k, key = values[:, 0].long(), values[:, 1].long(), values[:, 3].long()
        scale = values[:, 4:7].float()
        x = model.table(ids).float()
        for i, (_, prompt, _, _) in enumerate(items):
            if isinstance(prompt, torch.Tensor):
                x[i, :len(prompt)] = prompt
        c = self.consts
        if any(info.history for info in infos):  # the prompt is committed history too
            pos = torch.arange(T, device=dev)
            z = normal_rows(row_keys(key.unsqueeze(1), counter(PURPOSES["history"], pos)), c.words, c.quantiles)
            x = x + z * scale[:, 1].view(n, 1, 1)
        rows = slice(a, a + n)
        if T > 1:
            model.prefill(x[:, :T - 1], self.cache, alpha=torch.ones(n, T - 1, device=dev), k=k, rows=rows,
                          span=self.scratch + T - 1, offset=self.scratch)
        j = torch.arange(Kw, device=dev)
        embryos = normal_rows(row_keys(key.unsqueeze(1), counter(PURPOSES["embryo"], length.unsqueeze(1) + j)),
                              c.words, c.quantiles)
        # nothing below can fail for a validated request; n_active moves last, so a failure above
        # leaves the running slots as they were
        st.last[rows] = x[torch.arange(n, device=dev), length - 1]
        st.tail[rows] = embryos * (scale[:, 0:1] * (j < k.unsqueeze(1))).unsqueeze(-1)
        st.alpha[rows] = values[:, 7:].float()
        st.length[rows] = length
        st.k[rows] = k
        st.guidance[rows] = values[:, 2].float()
        st.seed_key[rows] = key
        st.noise_scale[rows] = scale
        for i, info in enumerate(infos):
            info.base = lens[i] - self._t
            self.info[a + i] = info
            self._count(info, 1)
        self.n_active += n
        self._occupancy_changed()

    # -- leaving -----------------------------------------------------------------------------
    def release(self, slot: int, failed: bool = False) -> int | None:
        """Free a slot. If it was not the last running one, the last one moves into it: returns
        the slot that moved (its sequence now lives at `slot`), else None. The cache only ever
        holds finite values (KVCache.write), so what a sequence leaves behind cannot poison the
        next occupant; a failed one's row is zeroed all the same (no sync: the host knows)."""
        if failed:
            self.scrub(slot)
        self._count(self.info[slot], -1)
        last = self.n_active - 1
        self.n_active = last
        moved = None
        if slot != last:
            n = self.scratch + self.length(last) + self.k_window  # the slots its attention can reach
            self.cache.move_row(last, slot, min(n, self.slots))
            self.state.move(last, slot)
            self.info[slot] = self.info[last]
            moved = last
        self.info[last] = None
        self._occupancy_changed()
        return moved

    @torch.no_grad()
    def reset(self) -> None:
        """Free and scrub every slot (after a failure that leaves the batch state in doubt)."""
        for slot in range(self.max_batch):
            self.scrub(slot)
            self.info[slot] = None
        self.n_active = 0
        self._needs = dict.fromkeys(NEEDS, 0)
        self._kinds = None
        self._occupancy_changed()

    def _count(self, info: SlotInfo, sign: int) -> None:
        for name in NEEDS:
            self._needs[name] += sign * getattr(info, name)
        self._kinds = None

    def _occupancy_changed(self) -> None:
        """After admit/release: the rows bucket and the span's bound."""
        self._bucket = next(n for n in self.rows if n >= self.n_active)
        self._max_base = max((i.base for i in self.info[:self.n_active]), default=0)

    @torch.no_grad()
    def scrub(self, slot: int) -> None:
        """Zero a slot's cache row (every layer, every slot) and its state rows."""
        self.cache.zero_row(slot)
        for t in (self.state.last, self.state.tail, self.state.alpha):
            t[slot].zero_()

    # -- the step ----------------------------------------------------------------------------
    def span(self, front_only: bool) -> int:
        """Cache slots the step attends over: all it reads or writes lie below scratch + the
        longest committed length (+ Kw − 1 with the tail window). Exact when eager; rounded up to
        a span bucket when compiled."""
        need = self.scratch + self._max_base + self._t + (0 if front_only else self.k_window - 1)
        need = min(need, self.slots)
        return next(s for s in self.spans if s >= need) if self.compiled else need

    def kinds(self) -> dict:
        """What the running sequences need of the next step (the graph variant it selects);
        kept until a sequence joins or leaves."""
        need = self._needs
        front_only = not need["live"]
        self._kinds = dict(front_only=front_only, guided=bool(need["guided"]),
                           history=self.compiled or bool(need["history"]),
                           tail_noise=self.compiled or bool(need["tail_noise"]),
                           keep_tail=self.compiled and not front_only)
        return self._kinds

    def run_step(self, rows: int, span: int, kinds: dict):
        """Call the step function over the first `rows` slots and `span` cache slots (under no_grad)."""
        if self.n_active != self._n_running_set:  # a device write only when the count changes
            self.n_running.fill_(self.n_active)
            self._n_running_set = self.n_active
        if self.cuda_graphs:  # a new iteration: the previous step's outputs may be overwritten now
            torch.compiler.cudagraph_mark_step_begin()
        span_ids = self._span_views.get(span)
        if span_ids is None:  # eager: any span (nothing is compiled for it)
            span_ids = self.consts.slot_ids[:span]
        return self.step_fn(self.model, *self._row_args[rows], span_ids, *self._const_args,
                            scratch=self.scratch, impl=self.impl, **kinds)

    @torch.inference_mode()  # cheaper dispatch than no_grad (no version counters): eager steps pay per op
    def launch(self, probe: bool = False, entropy_taus=()) -> PendingStep:
        """Queue one step of the running sequences (slots 0..n_active−1) and the copy of its
        results to the host; returns at once. probe: the results also carry each tail slot's
        nearest token after the update, ‖Δz̃‖, and the entropy of softmax(cos(z̃,E)/τ) for each τ
        in entropy_taus (a separate lookup: probing never changes what is committed)."""
        n = self.n_active
        kinds = self._kinds if self._kinds is not None else self.kinds()
        if probe:
            if kinds["front_only"]:
                raise ValueError("a tail probe needs a watched (live) sequence in the batch")
            kinds = {**kinds, "keep_tail": True}
        idx, delta, matured = self.run_step(self._bucket, self.span(kinds["front_only"]), kinds)
        self._t += 1
        if not probe:  # the packet covers the bucket's rows; slots ≥ n are padding, never read
            return PendingStep(self.readback.start(idx), n, None)
        Kw = self.k_window
        flat = matured[:n].reshape(n * Kw, -1)
        parts = [idx[:n].double().unsqueeze(1), delta[:n].double()]
        taus = list(entropy_taus)
        for i, tau in enumerate(taus or [None]):
            ids, _, _, ent = nn_commit(flat, self.consts.commit_table, entropy_tau=tau, impl=self.impl,
                                       table_inv_norm=self.table_inv_norm, check_finite=False)
            if i == 0:
                parts.append(ids.view(n, Kw).double())
            if tau is not None:
                parts.append(ent.view(n, Kw).double())
        return PendingStep(self.readback.start(torch.cat(parts, dim=1)), n, (Kw, taus))

    def collect(self, pending: PendingStep) -> StepOutput:
        """The results of a launched step, on the host (waits for them if they are not there yet)."""
        host = self.readback.wait(pending.ticket)
        if pending.probe is None:
            return StepOutput(host, None, None, {})
        Kw, taus = pending.probe
        committed = [int(row[0]) for row in host]

        def cols(i):  # the i-th (n, Kw) block after the committed id
            return [row[1 + i * Kw:1 + (i + 1) * Kw] for row in host]
        tail_ids = [[int(t) for t in r] for r in cols(1)]
        return StepOutput(committed, cols(0), tail_ids, {tau: cols(2 + i) for i, tau in enumerate(taus)})
