"""The continuous-in / vector-out Transformer (GPT-2 architecture).

Inputs are vectors (B, T, d) in embedding space — committed table rows or liquid
tail vectors — never token ids. The output at position t is the predicted
vector for slot t+1 (`forward`), or logits against the table for the AR
objective (`table.logits(hidden(...))`).

Conditioning, both zero-initialised so a pretrained backbone is unchanged:
  maturity  h_t += MLP(SinEmb(α_t))         (per position)
  tail len  h ← (1+γ_l(K)) ⊙ h + β_l(K)      (FiLM at the input of every block, or of the first)

Static KV cache (gpt-fast's setup_caches): one (B, S, H, hd) buffer per layer.
A cached call names, per input position, the cache slot its K/V go to; it
writes them there, then attends over the whole cache under a boolean mask, so
every call of a given window size has the same shapes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .table import EmbeddingTable


def sinusoidal_embedding(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Diffusion-style embedding of a scalar field x (..., ) → (..., dim); α∈[0,1] is scaled to [0,1000]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = (x.float() * 1000.0).unsqueeze(-1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MaturityConditioning(nn.Module):
    """h_t += MLP(SinEmb(α_t)); the last layer starts at zero."""

    def __init__(self, d: int, sin_dim: int = 128):
        super().__init__()
        self.sin_dim = sin_dim
        self.fc1 = nn.Linear(sin_dim, d)
        self.fc2 = nn.Linear(d, d)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, alpha: torch.Tensor) -> torch.Tensor:
        e = sinusoidal_embedding(alpha, self.sin_dim).to(self.fc1.weight.dtype)
        return self.fc2(F.gelu(self.fc1(e)))


class TailLengthFiLM(nn.Module):
    """Learned embedding of K → per-layer (γ, β); zero rows = identity."""

    def __init__(self, k_max: int, n_layer: int, d: int):
        super().__init__()
        self.n_layer, self.d = n_layer, d
        self.embed = nn.Embedding(k_max + 1, 2 * n_layer * d)
        nn.init.zeros_(self.embed.weight)

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        """k (B,) → (n_layer, 2, B, 1, d)."""
        p = self.embed(k).view(-1, self.n_layer, 2, 1, self.d)
        return p.permute(1, 2, 0, 3, 4)


class KVCache(nn.Module):
    def __init__(self, batch: int, slots: int, n_head: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, slots, n_head, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None = None):
        """slots (n,W) long; k, v (n,W,H,hd); rows (n,) the cache rows (default: rows 0..n-1).
        Returns the (n,H,S,hd) cache views of those rows to attend over."""
        if rows is None:  # rows 0..n-1: a view of the cache, no copy
            n = k.shape[0]
            r = torch.arange(n, device=k.device).unsqueeze(1).expand_as(slots)
            self.k.index_put_((r, slots), k)
            self.v.index_put_((r, slots), v)
            return self.k[:n].transpose(1, 2), self.v[:n].transpose(1, 2)
        r = rows.unsqueeze(1).expand_as(slots)
        self.k.index_put_((r, slots), k)
        self.v.index_put_((r, slots), v)
        return self.k[rows].transpose(1, 2), self.v[rows].transpose(1, 2)


    def move_row(self, src: int, dst: int, n_slots: int) -> None:
        """Copy the first n_slots cache slots of row src into row dst."""
        self.k[dst, :n_slots] = self.k[src, :n_slots]
        self.v[dst, :n_slots] = self.v[src, :n_slots]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout
        self.kv_cache: KVCache | None = None

    def forward(self, x, mask, cache_slots=None, cache_rows=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)
        if cache_slots is None:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        else:
            k, v = self.kv_cache.write(cache_slots, k, v, cache_rows)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's gelu_new


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask, cache_slots=None, cache_rows=None):
        x = x + self.drop(self.attn(self.ln_1(x), mask, cache_slots, cache_rows))
        return x + self.drop(self.mlp(self.ln_2(x)))


class TMModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        d = cfg.n_embd
        self.table = EmbeddingTable(cfg.vocab_size, d, cfg.table_radius, cfg.table_normalised,
                                    cfg.table_trainable)
        self.wpe = nn.Embedding(cfg.n_positions, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.maturity = MaturityConditioning(d)
        self.tail_film = TailLengthFiLM(cfg.k_max, cfg.n_layer if cfg.film == "every_block" else 1, d)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(d, eps=cfg.layer_norm_epsilon)
        self.vector_head = nn.Linear(d, d)  # identity at init: the tied-head direction
        self._init_weights()

    def _init_weights(self):
        std = 0.02
        for name, p in self.named_parameters():
            if name.startswith(("table.", "maturity.fc2", "tail_film.", "vector_head.")):
                continue
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                # GPT-2: residual projections scaled by 1/sqrt(2·n_layer)
                scale = std / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj.weight") else std
                nn.init.normal_(p, 0.0, scale)
        with torch.no_grad():
            self.vector_head.weight.copy_(torch.eye(self.config.n_embd))
            self.vector_head.bias.zero_()
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- the forward ------------------------------------------------------------------
    def hidden(self, x, pos=None, alpha=None, k=None, mask=None, cache_slots=None, cache_rows=None):
        """Final hidden states (after ln_f) for input vectors x (B,T,d).

        pos (B,T) or (T,) positions (default arange); alpha (B,T) maturity, None = no
        maturity conditioning; k (B,) tail lengths, None = no FiLM; mask: bool (B|1,1,T,S)
        with True = may attend (default causal; required with cache_slots);
        cache_slots (B,T): write K/V into the static cache at these slots and attend
        over the whole cache; cache_rows (B,): which cache rows (default: rows 0..B-1).
        """
        B, T, _ = x.shape
        if pos is None:
            pos = torch.arange(T, device=x.device)
        h = x + self.wpe(pos)
        if alpha is not None:
            h = h + self.maturity(alpha)
        h = self.drop(h)
        if mask is None:
            mask = causal_mask(T, x.device)
        film = self.tail_film(k) if k is not None else None
        for i, block in enumerate(self.blocks):
            if film is not None and i < len(film):  # every block, or the first only ("input")
                h = h * (1 + film[i, 0]) + film[i, 1]
            h = block(h, mask, cache_slots, cache_rows)
        return self.ln_f(h)

    def forward(self, x, pos=None, alpha=None, k=None, mask=None, cache_slots=None, cache_rows=None):
        """Predicted next-slot vectors (B,T,d)."""
        return self.vector_head(self.hidden(x, pos, alpha, k, mask, cache_slots, cache_rows))

    # -- static KV cache ----------------------------------------------------------------
    def setup_caches(self, batch: int, slots: int, dtype=None, device=None):
        """Allocate one (batch, slots) KV cache per layer, once."""
        p = next(self.parameters())
        for block in self.blocks:
            block.attn.kv_cache = KVCache(batch, slots, self.config.n_head,
                                          self.config.n_embd // self.config.n_head,
                                          dtype or p.dtype, device or p.device)

    def num_params(self, trainable_only=False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def causal_mask(T: int, device=None) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def tail_only_mask(T: int, tail_start: torch.Tensor) -> torch.Tensor:
    """(B,1,T,T): causal, except that positions ≥ tail_start[b] may not attend to
    positions < tail_start[b] (the unconditional / guidance mode)."""
    i = torch.arange(T, device=tail_start.device)
    q, kpos = i.view(1, T, 1), i.view(1, 1, T)
    ts = tail_start.view(-1, 1, 1)
    in_tail = q >= ts
    allowed = (kpos <= q) & (~in_tail | (kpos >= ts))
    return allowed.unsqueeze(1)
