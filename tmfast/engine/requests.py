"""Requests: prompt parsing and checks, and one request's bookkeeping (ids, text, stopping, deltas)."""
from __future__ import annotations

import operator

import torch
from tokenizers.decoders import DecodeStream

from ..config import GenerationConfig, unicode_error
from ..model import TMModel


class GenerationError(ValueError):
    """A generation request that cannot be served as asked; `param` names the field when known."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class QueueFullError(GenerationError):
    """The engine's request queue is full; retry later."""


def _too_long(n: int, cfg) -> GenerationError:
    return GenerationError(f"prompt of {n} tokens does not fit the model context of {cfg.n_positions} positions",
                           "prompt")


def max_prompt_chars(model: TMModel, tokenizer) -> int | None:
    """A text longer than this cannot fit the model context whatever it tokenises to: context
    positions × the characters of the tokenizer's longest vocabulary entry (None: no bound known).
    Computed once per engine, so an oversize text is rejected without being tokenised."""
    try:
        longest = max(len(t) for t in tokenizer.get_vocab())
    except (AttributeError, TypeError, ValueError):
        return None
    return model.config.n_positions * longest


def prompt_ids(model: TMModel, tokenizer, prompt, max_chars: int | None = None) -> list[int] | None:
    """The token ids of a text or token-id prompt (None for vectors), checked before anything is
    embedded: the length against the model context (for text, a bound from its length in
    characters comes first, so an oversize text is never tokenised), the ids against the vocabulary."""
    cfg = model.config
    if isinstance(prompt, torch.Tensor):
        return None
    if isinstance(prompt, str):
        if not prompt.strip():
            raise GenerationError("prompt is empty", "prompt")
        if tokenizer is None:
            raise GenerationError("this engine has no tokenizer: pass token ids or vectors", "prompt")
        if max_chars is not None and len(prompt) > max_chars:
            raise GenerationError(f"prompt of {len(prompt)} characters does not fit the model context of "
                                  f"{cfg.n_positions} positions", "prompt")
        bad = unicode_error(prompt)
        if bad:
            raise GenerationError(f"prompt is not valid Unicode ({bad})", "prompt")
        ids = tokenizer.encode(prompt).ids
    else:
        if isinstance(prompt, (bytes, dict)) or not hasattr(prompt, "__iter__"):
            raise GenerationError("prompt must be a string, a list of token ids or a (T, d) tensor", "prompt")
        try:  # integers of any kind (int, numpy, 0-d tensors); not floats, not bools
            if any(isinstance(t, bool) for t in prompt):
                raise TypeError
            ids = [operator.index(t) for t in prompt]
        except TypeError:
            raise GenerationError("prompt must be a string, a list of token ids or a (T, d) tensor",
                                  "prompt") from None
    if not ids:
        raise GenerationError("prompt is empty", "prompt")
    if len(ids) > cfg.n_positions:
        raise _too_long(len(ids), cfg)
    if min(ids) < 0 or max(ids) >= cfg.vocab_size:
        raise GenerationError(f"token ids must lie in [0, {cfg.vocab_size})", "prompt")
    return ids


def prompt_vectors(model: TMModel, tokenizer, prompt, max_chars: int | None = None
                   ) -> tuple[list[int] | None, torch.Tensor]:
    """(token ids or None, committed vectors (T,d)) for a text, token-id or vector prompt."""
    cfg, table = model.config, model.table.weight
    if isinstance(prompt, torch.Tensor):
        if prompt.layout != torch.strided or prompt.is_meta:
            what = "a meta tensor" if prompt.is_meta else f"a {str(prompt.layout).replace('torch.', '')} tensor"
            raise GenerationError(f"prompt vectors must be a dense tensor with values, got {what}", "prompt")
        if prompt.dim() != 2 or prompt.shape[1] != cfg.n_embd or prompt.shape[0] == 0:
            raise GenerationError(f"prompt vectors must have shape (T>0, {cfg.n_embd}), "
                                  f"got {tuple(prompt.shape)}", "prompt")
        if not prompt.dtype.is_floating_point:
            raise GenerationError(f"prompt vectors must be real floating point, got {prompt.dtype}", "prompt")
        if prompt.shape[0] > cfg.n_positions:
            raise _too_long(prompt.shape[0], cfg)
        if not torch.isfinite(prompt).all():
            raise GenerationError("prompt vectors must be finite", "prompt")
        v = prompt.detach().to(table.device, table.dtype)
        if not torch.isfinite(v).all():  # finite in float64, not in the model's dtype
            raise GenerationError(f"prompt vectors overflow {table.dtype}", "prompt")
        return None, v
    ids = prompt_ids(model, tokenizer, prompt, max_chars)
    return ids, model.table(torch.tensor(ids, device=table.device))


def prompt_input(model: TMModel, tokenizer, prompt, max_chars: int | None = None
                 ) -> tuple[list[int] | None, torch.Tensor | None]:
    """(token ids, None) for a text or token-id prompt — embedded on the device when it is
    admitted, with everything else the host sends then — or (None, vectors (T,d)) for a vector
    prompt (checked, on the model's device)."""
    if isinstance(prompt, torch.Tensor):
        return prompt_vectors(model, tokenizer, prompt, max_chars)
    return prompt_ids(model, tokenizer, prompt, max_chars), None


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


def _streams(tokenizer) -> bool:
    """Whether DecodeStream can decode for this tokenizer (a `tokenizers.Tokenizer`)."""
    from tokenizers import Tokenizer
    return isinstance(tokenizer, Tokenizer)


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
        # incremental detokenisation: each commit decodes only what is new (tokenizers' own
        # DecodeStream holds back an incomplete character), so the host's work per step does not
        # grow with the text; the final text is one full decode
        self._decoder = DecodeStream(skip_special_tokens=True) if self.track_text and _streams(tokenizer) else None
        self._longest_stop = max((len(s) for s in gen.stop), default=0)
        self._decoded = False  # final_text has decoded the finished text
        self._stop_id = eos_token_id if gen.stop_at_eos else None  # commit's test, precomputed
        self._max_new = gen.max_new_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def commit(self, tok: int) -> None:
        if tok < 0:
            raise GenerationError("the front tail vector is not finite (NaN/inf): nothing to commit")
        if tok == self._stop_id:
            self.finish_reason = "eos"
            return
        ids = self.token_ids
        ids.append(tok)
        if self.track_text:
            before = len(self.text)
            if self._decoder is not None:
                piece = self._decoder.step(self.tokenizer, tok)
                if piece:
                    self.text += piece
            else:  # a tokenizer without DecodeStream (not a `tokenizers` one): decode it all
                self.text = self.tokenizer.decode(ids)
            stop = self.gen.stop
            if stop and len(self.text) > before:  # a new match ends in the new text
                start = max(0, before - self._longest_stop + 1)
                found = [i for i in (self.text.find(s, start) for s in stop) if i >= 0]
                if found:
                    self.text, self.finish_reason = self.text[:min(found)], "stop"
                    return
        if len(ids) >= self._max_new:
            self.finish_reason = "length"

    def advance(self, tok: int) -> tuple[list[int], str]:
        """commit(tok), then what this step's event carries: the committed ids (none for EOS) and
        the new text that is safe to stream (when the text is tracked, or at the end)."""
        self.commit(tok)
        reason = self.finish_reason
        if reason is None and not self.track_text:
            return self.token_ids[-1:], ""
        return (self.token_ids[-1:] if reason != "eos" else []), self.text_delta()

    def final_text(self) -> str:
        """The whole text, decoded once when the request has finished (the streamed pieces up to
        a stop string's cut otherwise)."""
        if self.tokenizer is None:
            return ""
        if self.finish_reason != "stop" and not self._decoded:
            self.text = self.tokenizer.decode(self.token_ids)
            self._decoded = self.finished
        return self.text

    def text_delta(self) -> str:
        """New text that is safe to stream: held back while it ends in an incomplete UTF-8
        character or in what may become a stop string."""
        done = self.finish_reason is not None
        text = self.final_text() if done else self.text
        end, emitted = len(text), self._emitted
        if end == emitted:
            return ""
        if not done:
            while end > emitted and text[end - 1] == "\ufffd":
                end -= 1
            if self.gen.stop:  # the longest tail of the text that some stop string could still complete
                end -= max((n for s in self.gen.stop for n in range(min(len(s) - 1, end - emitted), 0, -1)
                            if text[end - n:end] == s[:n]), default=0)
        self._emitted = max(emitted, end)
        return text[emitted:end]
