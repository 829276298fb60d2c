"""Closed batches: generate(prompts) / stream(prompts) over an Engine sized to the batch."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence as Seq

import torch

from ..config import GenerationConfig
from ..model import TMModel
from .continuous import Engine, check_impl
from .requests import GenerationError, check_fits, prompt_input


@dataclass
class GenerationResult:
    prompt_ids: list[int] | None
    token_ids: list[int]
    text: str
    finish_reason: str  # "eos" | "stop" | "length" | "error" (then `error` says why)
    error: str | None = None


@dataclass
class StepEvent:
    step: int
    committed: list[int | None]  # token committed this step, per sequence (None: finished or EOS)
    tail_token_ids: list[list[int]] | None = None  # nearest token per tail slot after the update, front first
    tail_entropy: list[list[float]] | None = None  # entropy of softmax(cos(z̃,E)/τ) per tail slot
    delta_norm: list[list[float]] | None = None  # ‖Δz̃‖ per tail slot
    texts: list[str] = field(default_factory=list)  # committed text so far (when show_tail or stop strings)


def _config(g) -> GenerationConfig:
    """A GenerationConfig, or a dict of its fields (as Engine.add_request takes)."""
    if isinstance(g, GenerationConfig):
        return g
    if isinstance(g, dict):
        return GenerationConfig.from_dict(g)
    raise GenerationError(f"generation settings must be a GenerationConfig or a dict, got {type(g).__name__}")


class MaturationEngine:
    """Generate for a whole batch of prompts at once (the continuous-batching Engine,
    sized to the batch). compile=True wraps the step in torch.compile(fullgraph=True); it
    compiles once per (batch size, cache length, tail window, step kind) and never between steps.
    """

    def __init__(self, model: TMModel, tokenizer=None, *, compile: bool = False,
                 compile_mode: str | None = None, impl: str | None = None):
        check_impl(impl, model.table.weight.device)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.compile, self.compile_mode, self.impl = compile, compile_mode, impl
        self._engine: Engine | None = None
        self._shape = None

    @property
    def kv_cache_bytes(self) -> int:
        """Memory of the KV cache held for the last batch shape (0 before the first batch)."""
        return self._engine.kv_cache_bytes if self._engine is not None else 0

    def decode(self, ids: Seq[int]) -> str:
        return self.tokenizer.decode(list(ids)) if self.tokenizer is not None else ""

    def _engine_for(self, batch: int, max_len: int, k_window: int) -> Engine:
        shape = (batch, max_len, k_window)
        if self._shape != shape:  # caches and compiled step are reused while the shape holds
            self._engine = Engine(self.model, self.tokenizer, max_batch=batch, max_len=max_len,
                                  k_window=k_window, max_queue=batch, compile=self.compile,
                                  compile_mode=self.compile_mode, impl=self.impl)
            self._shape = shape
        return self._engine

    def generate(self, prompts, gen: GenerationConfig | dict | Seq[GenerationConfig | dict] | None = None,
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
        gens = list(gen) if isinstance(gen, (list, tuple)) else [gen if gen is not None else GenerationConfig()] * B
        if len(gens) != B:
            raise GenerationError(f"{len(gens)} generation configs for {B} prompts")
        gens = [_config(g) for g in gens]
        parsed = [prompt_input(self.model, self.tokenizer, p) for p in prompts]
        lengths = [len(ids) if v is None else len(v) for ids, v in parsed]
        for n, g in zip(lengths, gens):  # before anything is allocated
            check_fits(self.model.config, n, g)
        # size the engine to this batch: every request fits, nothing is allocated twice
        kw = max(g.tail for g in gens)
        max_len = max(n + g.max_new_tokens for n, g in zip(lengths, gens)) + kw - 1
        show, stats = show_tail or entropy_tau is not None, entropy_tau is not None
        engine = self._engine_for(B, max_len, kw)
        order = [engine.add_request(ids if ids is not None else v, g, return_tail=show, return_stats=stats,
                                    track_text=show_tail, entropy_tau=entropy_tau)
                 for (ids, v), g in zip(parsed, gens)]
        views = [engine.request(rid) for rid in order]
        index = {rid: b for b, rid in enumerate(order)}
        errors: list[str | None] = [None] * B
        step = 0
        try:
            while engine.has_work:
                ev = StepEvent(step, [None] * B)
                if show:
                    ev.tail_token_ids = [[] for _ in range(B)]
                if stats:
                    ev.tail_entropy, ev.delta_norm = [[] for _ in range(B)], [[] for _ in range(B)]
                events = engine.step()
                if not events:  # a pipelined engine's first call: the step is launched, not read yet
                    continue
                for e in events:
                    b = index.get(e.request_id)
                    if b is None:  # the end of an earlier stream that its consumer left early
                        continue
                    ev.committed[b] = e.token_ids[0] if e.token_ids else None
                    errors[b] = e.error
                    if show:
                        ev.tail_token_ids[b] = e.tail_token_ids
                    if stats:
                        ev.tail_entropy[b], ev.delta_norm[b] = e.tail_entropy, e.delta_norm
                ev.texts = [v.text for v in views]
                yield ev
                step += 1
        finally:
            for rid in order:  # a consumer that stops early leaves nothing running
                engine.abort(rid)
        return [GenerationResult(v.prompt_ids, v.token_ids, v.text, v.finish_reason, err)
                for v, err in zip(views, errors)]
