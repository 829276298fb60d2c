"""The continuous-in / vector-out Transformer (GPT-2 architecture).

Inputs are vectors (B, T, d) in embedding space — committed table rows or liquid
tail vectors — never token ids. The output at position t is the predicted
vector for slot t+1 (`forward`), or logits against the table for the AR
objective (`table.logits(hidden(...))`).

Conditioning, both zero-initialised so a pretrained backbone is unchanged:
  maturity  h_t += MLP(SinEmb(α_t))         (per position)
  tail len  h ← (1+γ_l(K)) ⊙ h + β_l(K)      (FiLM at the input of every block, or of the first)

Static KV cache (gpt-fast's setup_caches, here `new_cache`): one (B, H, S, hd) buffer pair
per layer, owned by its user and passed to each cached call. A cached call names, per input
position, the cache slot its K/V go to; it writes them there, then attends over the whole
cache under a boolean mask, so every call of a given window size has the same shapes.
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


class KVCache:
    """A static K/V cache for every layer — one (batch, heads, slots, head_dim) tensor pair per
    layer — owned by whoever made it (`TMModel.new_cache`) and passed to each cached call: the
    model holds no cache, so two users of one model (a serving engine, an AR scorer, a training
    unroll) can never overwrite each other's. Each head's keys are contiguous, which is what
    attention reads (half the memory traffic of a (batch, slots, heads, hd) layout). Separate
    tensors per layer, not one (layers, …) tensor: a compiled step writes each in place, where a
    write into a view of one big tensor makes the compiled graph copy the whole cache (measured:
    batch 32, 5.7 → 18–29 ms a step)."""

    def __init__(self, n_layer: int, batch: int, slots: int, n_head: int, head_dim: int, dtype, device):
        shape = (batch, n_head, slots, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]

    @classmethod
    def of(cls, k: list[torch.Tensor], v: list[torch.Tensor]) -> "KVCache":
        """A cache over existing per-layer (batch, heads, slots, head_dim) tensors (no copy)."""
        cache = cls.__new__(cls)
        cache.k, cache.v = k, v
        return cache

    @property
    def slots(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def write(self, layer: int, index: tuple, k: torch.Tensor, v: torch.Tensor):
        """index = (row per input (n,W), slot per input (n,W), rows (n,) / a slice / None, span) from
        `cache_index`; k, v (n,W,H,hd). Returns layer's (n,H,span,hd) cache of those rows to attend over."""
        r, slots, rows, span = index
        ck, cv = self.k[layer], self.v[layer]
        # what persists is always finite: a NaN in a slot nobody attends still turns attention into
        # NaN (0·NaN in p·v), so a poisoned sequence must leave nothing behind for its row's next
        # occupant (its own outputs stay NaN: the engine ends it)
        ck[r, :, slots] = torch.nan_to_num(k, nan=0.0, posinf=0.0, neginf=0.0)
        cv[r, :, slots] = torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
        if rows is None:  # rows 0..n-1: a view of the cache, no copy
            return ck[:k.shape[0], :, :span], cv[:k.shape[0], :, :span]
        return ck[rows, :, :span], cv[rows, :, :span]

    def move_row(self, src: int, dst: int, n_slots: int) -> None:
        """Copy the first n_slots cache slots of row src into row dst, in every layer."""
        for t in self.k + self.v:
            t[dst, :, :n_slots] = t[src, :, :n_slots]

    def zero_row(self, row: int) -> None:
        for t in self.k + self.v:
            t[row].zero_()


def cache_index(slots: torch.Tensor, rows: torch.Tensor | slice | None = None, span: int | None = None) -> tuple:
    """Where a cached call's inputs go: slots (n,W) per input, rows (n,) or a slice of n rows
    (default 0..n-1), and the first `span` slots to attend over (default all). Built once per
    call, shared by every layer."""
    if rows is None:
        r = torch.arange(slots.shape[0], device=slots.device)
    elif isinstance(rows, slice):  # a range of rows: the cache rows to attend over are a view
        r = torch.arange(rows.start, rows.stop, device=slots.device)
    else:
        r = rows
    return r.unsqueeze(1).expand_as(slots), slots, rows, span


def attend(q, k, v, bias, dropout_p: float = 0.0):
    """softmax(q·kᵀ/√hd + bias)·v; bias is the additive mask (0 or −inf), shared by every layer.
    One query position over a batch on CPU goes through plain matmul–softmax–matmul: the CPU
    flash kernel tiles over query positions and runs it ~2× slower (bench: batch 32, 102 slots,
    0.67 vs 0.31 ms a layer). Everything else goes to scaled_dot_product_attention."""
    if q.shape[2] == 1 and q.shape[0] > 1 and q.device.type == "cpu" and not dropout_p:
        scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5) + bias
        return torch.matmul(torch.softmax(scores, dim=-1), v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout_p)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x, bias, cache=None):
        """cache: (KVCache, layer index, cache_index(...)) for a cached call."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)
        if cache is None:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        else:
            kv, layer, index = cache
            k, v = kv.write(layer, index, k, v)
        y = attend(q.transpose(1, 2), k, v, bias, self.dropout if self.training else 0.0)
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

    def forward(self, x, bias, cache=None):
        x = x + self.drop(self.attn(self.ln_1(x), bias, cache))
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
    def hidden(self, x, pos=None, alpha=None, k=None, mask=None, cache=None, cache_slots=None, cache_rows=None,
               maturity=None, cache_span=None):
        """Final hidden states (after ln_f) for input vectors x (B,T,d).

        pos (B,T) or (T,) positions (default arange); alpha (B,T) maturity, None = no
        maturity conditioning; maturity: MLP(SinEmb(α)) precomputed (broadcastable to (B,T,d)),
        used instead of alpha (the engine's front-only step, where α = 1 is a constant, see
        `maturity_at`); k (B,) tail lengths, None = no FiLM; mask: bool (B|1,1,T,S)
        with True = may attend (default causal; required with cache_slots);
        cache (KVCache, from new_cache) with cache_slots (B,T): write K/V into the cache at these
        slots and attend over the whole cache, or its first cache_span slots (then mask is (…, cache_span));
        cache_rows (B,) or a slice of B rows: which cache rows (default: rows 0..B-1).
        """
        B, T, _ = x.shape
        if pos is None:
            pos = torch.arange(T, device=x.device)
        h = x.to(self.wpe.weight.dtype) + self.wpe(pos)  # the engine keeps its vectors in fp32
        if maturity is not None:
            h = h + maturity
        elif alpha is not None:
            h = h + self.maturity(alpha)
        h = self.drop(h)
        if mask is None:
            mask = causal_mask(T, x.device)
        # the boolean mask as an additive bias, once for every layer (what SDPA would make per call)
        bias = torch.zeros(mask.shape, dtype=h.dtype, device=h.device).masked_fill_(~mask, float("-inf"))
        index = cache_index(cache_slots, cache_rows, cache_span) if cache is not None else None
        if k is not None:  # FiLM: (1 + γ_l, β_l) per layer, every block or the first only ("input")
            film = self.tail_film(k)
            scales, shifts = (1 + film[:, 0]).unbind(0), film[:, 1].unbind(0)
        for i, block in enumerate(self.blocks):
            if k is not None and i < len(scales):
                h = h * scales[i] + shifts[i]
            h = block(h, bias, (cache, i, index) if index is not None else None)
        return self.ln_f(h)

    def forward(self, x, pos=None, alpha=None, k=None, mask=None, cache=None, cache_slots=None, cache_rows=None,
                maturity=None, cache_span=None):
        """Predicted next-slot vectors (B,T,d)."""
        return self.vector_head(self.hidden(x, pos, alpha, k, mask, cache, cache_slots, cache_rows, maturity,
                                            cache_span))

    def prefill(self, x, cache: KVCache, *, alpha=None, k=None, rows=None, span: int | None = None,
                offset: int = 0) -> torch.Tensor:
        """Hidden states of committed inputs x (n,T,d) (right-padded) at positions 0..T-1, each
        attending causally to what precedes it; their K/V land in cache slots offset..offset+T-1
        of `rows` (a range of n rows; default 0..n-1). What every cached user (engine, AR decoding,
        the training unroll) runs first; later calls attend over these slots.
        span: attend over the first `span` cache slots (≥ offset + T; default the whole cache;
        offset + T reads nothing but what is written). offset: slots below it are someone
        else's (the engine keeps its guidance scratch there)."""
        n, T, _ = x.shape
        t = torch.arange(T, device=x.device)
        s = torch.arange(span or cache.slots, device=x.device)
        mask = (s.view(1, 1, 1, -1) <= t.view(1, 1, T, 1) + offset) & (s.view(1, 1, 1, -1) >= offset)
        return self.hidden(x, pos=t.expand(n, T), alpha=alpha, k=k, mask=mask, cache=cache,
                           cache_slots=(t + offset).expand(n, T), cache_rows=rows, cache_span=span)

    @torch.no_grad()
    def maturity_at(self, alpha: float) -> torch.Tensor:
        """MLP(SinEmb(α)) for one α, shape (1,1,d): a constant to pass as `maturity` while the
        weights do not change."""
        p = self.table.weight
        return self.maturity(torch.full((1, 1), alpha, device=p.device))

    @torch.no_grad()
    def cpu_weight_layout(self) -> None:
        """On CPU, keep each widening Linear weight (out > in) transposed in memory — same shape
        and values, column-major strides — so x @ Wᵀ reads Wᵀ as a row-major (in, out) operand.
        Read cold, one row at a time (a decode step at batch 1), the CPU matmul runs that 24–29 %
        faster for widening weights and slower for narrowing ones (bench/layout.py; at 8–32 rows
        the two layouts are within ±20 % either way); the engine's end-to-end gain, GPT-2-Medium
        shape at batch 1: 92 → 82 ms a step. For inference; idempotent; save_checkpoint writes
        contiguous tensors either way."""
        for m in self.modules():
            if (isinstance(m, nn.Linear) and m.out_features > m.in_features and m.weight.device.type == "cpu"
                    and m.weight.is_contiguous()):
                m.weight.data = m.weight.data.t().contiguous().t()

    # -- static KV cache ----------------------------------------------------------------
    def new_cache(self, batch: int, slots: int, dtype=None, device=None) -> KVCache:
        """A (batch, slots) KV cache for every layer, allocated once (gpt-fast's setup_caches),
        owned by the caller and passed to cached calls as `cache=`."""
        p = next(self.parameters())
        c = self.config
        return KVCache(c.n_layer, batch, slots, c.n_head, c.n_embd // c.n_head, dtype or p.dtype, device or p.device)

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
