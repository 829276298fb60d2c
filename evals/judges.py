"""Judges: the negative log-likelihood of continuations given their prompts.

A tmfast checkpoint scores with its AR head (table logits) on token ids; any Hugging Face
causal LM ("hf:NAME_OR_PATH") scores the text, re-tokenised with its own tokenizer.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from tmfast.model import TMModel


class TmfastJudge:
    """A tmfast checkpoint scored with its AR head (table logits)."""

    def __init__(self, model: TMModel, tokenizer, name: str):
        self.model, self.tokenizer, self.name = model, tokenizer, name

    @torch.no_grad()
    def nll(self, pairs: list[tuple[list[int], list[int]]], batch_size: int = 64) -> list[tuple[float, int]]:
        """(Σ NLL nats, n tokens) of each continuation given its prompt (token ids of this judge)."""
        n_pos = self.model.config.n_positions
        out = []
        for lo in range(0, len(pairs), batch_size):
            chunk = pairs[lo:lo + batch_size]
            seqs = [(p + c)[-(n_pos + 1):] for p, c in chunk]
            T = max(len(s) for s in seqs) - 1
            x = torch.zeros(len(seqs), T, dtype=torch.long)
            y = torch.full((len(seqs), T), -100, dtype=torch.long)
            for i, ((_, c), s) in enumerate(zip(chunk, seqs)):
                x[i, :len(s) - 1] = torch.tensor(s[:-1])
                n = len(c)
                if n:
                    y[i, len(s) - 1 - n:len(s) - 1] = torch.tensor(s[-n:])
            dev = self.model.table.weight.device
            logits = self.model.table.logits(self.model.hidden(self.model.table(x.to(dev)))).float()
            nll = F.cross_entropy(logits.flatten(0, 1), y.to(dev).flatten(), reduction="none",
                                  ignore_index=-100).view(len(seqs), T)
            for i, (_, c) in enumerate(chunk):
                out.append((float(nll[i].sum()), len(c)))
        return out


class HFJudge:
    """Any Hugging Face causal LM: texts are re-tokenised with its own tokenizer."""

    def __init__(self, name_or_path: str, device="cpu", dtype=None, batch_size: int = 16):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.name = f"hf:{name_or_path}"
        self.tok = AutoTokenizer.from_pretrained(name_or_path)
        self.model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype).to(device).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def nll_text(self, pairs: list[tuple[str, str]]) -> list[tuple[float, int]]:
        """Scored batch_size pairs at a time, right-padded (causal: a position never sees the
        padding after it), on the model's device; the log-softmax in fp32."""
        n_pos = getattr(self.model.config, "n_positions", None) or self.model.config.max_position_embeddings
        dev = next(self.model.parameters()).device
        out: list[tuple[float, int] | None] = [None] * len(pairs)
        todo = []
        for i, (p, c) in enumerate(pairs):
            pi, ci = self.tok(p)["input_ids"], self.tok(c)["input_ids"]
            if not ci:
                out[i] = (0.0, 0)
            else:
                todo.append((i, (pi + ci)[-(n_pos + 1):], len(ci)))
        for lo in range(0, len(todo), self.batch_size):
            chunk = todo[lo:lo + self.batch_size]
            T = max(len(ids) for _, ids, _ in chunk) - 1
            x = torch.zeros(len(chunk), T, dtype=torch.long)
            mask = torch.zeros(len(chunk), T, dtype=torch.long)
            for r, (_, ids, _) in enumerate(chunk):
                x[r, :len(ids) - 1] = torch.tensor(ids[:-1])
                mask[r, :len(ids) - 1] = 1
            logp = F.log_softmax(self.model(x.to(dev), attention_mask=mask.to(dev)).logits.float(), -1)
            for r, (i, ids, n) in enumerate(chunk):
                y = torch.tensor(ids[1:], device=dev)
                nll = -logp[r, torch.arange(len(y), device=dev), y][-n:]
                out[i] = (float(nll.sum()), n)
        return out


def display_path(spec: str) -> str:
    """A checkpoint path as tables show it: relative to the working directory when inside it."""
    try:
        return str(Path(spec).resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return spec


def load_judge(spec: str, device="cpu", dtype=None, batch_size: int = 16):
    """hf:NAME_OR_PATH → HFJudge; anything else is a tmfast checkpoint directory."""
    if spec.startswith("hf:"):
        return HFJudge(spec[3:], device, dtype, batch_size)
    from tmfast.checkpoint import load_checkpoint
    model, tok = load_checkpoint(spec, device=device, dtype=dtype)
    return TmfastJudge(model, tok, display_path(spec))


def same_tokenizer(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return a is b or a.to_str() == b.to_str()


def judge_scores(judge, gen_tokenizer, prompts, conts: list[list[int]]) -> list[tuple[float, int]]:
    """Score continuations (generator token ids; prompts: evals.prompts.Prompt) with any judge;
    re-tokenise text when the judge's vocabulary is not the generator's."""
    if isinstance(judge, TmfastJudge) and same_tokenizer(judge.tokenizer, gen_tokenizer):
        return judge.nll([(p.ids, c) for p, c in zip(prompts, conts)])
    texts = [(p.text, gen_tokenizer.decode(c)) for p, c in zip(prompts, conts)]
    if isinstance(judge, HFJudge):
        return judge.nll_text(texts)
    enc = judge.tokenizer
    return judge.nll([(enc.encode(p).ids, enc.encode(c).ids) for p, c in texts])
