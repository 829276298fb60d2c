"""Test helpers that tests and benchmarks share (importable from an installed tmfast, like
torch.testing): small random models and tokenizers, and the naive reference generator.

naive_generate is a deliberately naive Token Maturation generator: no cache, the whole
sequence is recomputed every step, masks built from scratch, update and commit written
inline. The correctness anchor the cached engine is checked against.
"""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .config import GenerationConfig, ModelConfig
from .engine.noise import draw
from .model import TMModel, tail_only_mask


def byte_tokenizer() -> Tokenizer:
    """Byte-level tokenizer without merges: <|endoftext|> = 0, then the 256 byte symbols."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=257, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator([], trainer=trainer)
    return tok


def tiny_model(vocab_size=97, n_positions=128, n_embd=32, n_layer=2, n_head=2, k_max=16, seed=0,
               eos_token_id=None) -> TMModel:
    """A random model whose output depends on its input: conditioning perturbed away from
    identity (so α, K and masks matter) and a random vector head (an identity head would
    just echo the last input, and every sequence would repeat one token)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, n_positions=n_positions, n_layer=n_layer, n_head=n_head,
                      n_embd=n_embd, k_max=k_max, table_radius=4.0, eos_token_id=eos_token_id)
    model = TMModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
        model.vector_head.weight.normal_(0, n_embd ** -0.5)
    return model.eval()


@torch.no_grad()
def naive_generate(model, prompt_ids: list[int], g: GenerationConfig) -> list[int]:
    """Algorithm 1, literally: the whole window recomputed every step; embryos and noises are
    the engine's (noise.draw: a function of seed, position, slot and purpose)."""
    cfg = model.config
    E = model.table.weight.float()
    K = g.tail
    alpha = torch.tensor(g.alpha_profile())
    R, d = cfg.table_radius, cfg.n_embd
    committed = [E[t] for t in prompt_ids]
    if g.history_noise > 0:  # the model reads committed vectors with noise; commits stay table rows
        committed = list(torch.stack(committed) + draw(g.seed, "history", range(len(committed)), 0, d,
                                                       g.history_noise * R))
    P = len(committed)
    tail = draw(g.seed, "embryo", range(P, P + K), 0, d, g.embryo_scale * R)  # embryo of position P + j
    out = []
    for _ in range(g.max_new_tokens):
        P = len(committed)
        x = torch.cat([torch.stack(committed), tail]).unsqueeze(0)
        a = torch.cat([torch.ones(P), alpha]).unsqueeze(0)
        k = torch.tensor([K])
        pred_c = model(x, alpha=a, k=k)[0, P - 1:P - 1 + K].float()
        zhat = pred_c
        if g.guidance != 1.0:
            mask = tail_only_mask(P + K, torch.tensor([P]))
            pred_u = model(x, alpha=a, k=k, mask=mask)[0, P - 1:P - 1 + K].float()
            zhat = pred_u + g.guidance * (pred_c - pred_u)
        tail = tail + alpha.unsqueeze(1) * (zhat - tail)
        if g.tail_noise > 0:  # slot j holds position P + j
            tail = tail + draw(g.seed, "tail", range(P, P + K), range(K), d, g.tail_noise * R) * alpha.sqrt().unsqueeze(1)
        tok = int(torch.argmax(E @ tail[0]))
        if g.stop_at_eos and tok == cfg.eos_token_id:
            break
        out.append(tok)
        hist = draw(g.seed, "history", [P], 0, d, g.history_noise * R)[0] if g.history_noise > 0 else 0
        committed.append(E[tok] + hist)
        tail = torch.cat([tail[1:], draw(g.seed, "embryo", [P + K], 0, d, g.embryo_scale * R)])
    return out
