"""Small random models and tokenizers for tests (no network, no training)."""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tmfast.config import ModelConfig
from tmfast.model import TMModel


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
