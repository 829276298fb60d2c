"""The two objectives on one backbone, and the batches they eat.

Every random choice of an optimiser step (crop offsets, K, tail start, guidance
drop, negatives, noise) is drawn for the GLOBAL batch from one generator seeded by
(seed, step); each rank then takes its slice. So a step is a function of the step
number alone (exact resume), and N ranks see exactly the samples one process would
(DDP == single process). Losses are sums divided by the global normaliser, times the
world size (DDP averages gradients), so the gradient equals the single-process one.

ar          CE(E·h_t, x_{t+1}) with the tied table as LM head.
maturation  a K-slot tail at positions P..P+K-1 of each sequence is corrupted:
                z_{P+j} = s_j·e_{x_{P+j}} + (1−s_j)·n_j,  n_j ~ N(0, (noise_scale·R)²/d · I)
            with α_j the engine's linear ramp (front α_max → back α_min, default α_max/K),
            s_j = α_j ("alpha") or the share of signal K−1−j engine updates leave in a slot
            that started as noise ("engine": 1 − ∏_{m>j}(1−α_m)); α fed per position
            (1 on committed), K to FiLM. Loss at outputs t ≤ P+K−2 (those predict a real
            slot): ||ẑ_t − e_{x_{t+1}}||²/R² + λ·InfoNCE(cos(ẑ_t, ·)·scale). A share
            uncond_prob of sequences use the tail-only mask (unconditional mode, guidance).
            A share self_cond_prob of sequences instead hold the tail the ENGINE would hold there
            (`unrolled_tail`): starting from embryos K−1 steps earlier, the model's own updates
            z̃ ← z̃ + α(ẑ − z̃) with the true tokens committed, run without gradient by the current
            weights — the inputs the model meets at inference, refreshed as it learns.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from csrc_triton import maturation_update
from tmfast.config import alpha_profile, mix_seed
from tmfast.model import TMModel, causal_mask, tail_only_mask


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(seed, step, stream))


def crop_batch(data: np.ndarray, n: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """n random windows of T+1 tokens (inputs + next-token targets)."""
    if len(data) < T + 2:
        raise ValueError(f"split of {len(data)} tokens is shorter than block_size+2 ({T + 2}); "
                         f"lower block_size or use more data")
    ix = torch.randint(len(data) - T - 1, (n,), generator=gen).tolist()
    return torch.from_numpy(np.stack([np.asarray(data[i:i + T + 1], dtype=np.int64) for i in ix]))


def alpha_ramp(K: int, alpha_max: float, alpha_min: float | None) -> torch.Tensor:
    """The engine's profile (tmfast.config.alpha_profile) as a tensor."""
    return torch.tensor(alpha_profile(K, alpha_max, alpha_min))


def signal_share(alpha: torch.Tensor, kind: str) -> torch.Tensor:
    """s_j: how much of slot j is the true vector. 'engine': a slot that entered at the
    back as noise and got the updates α_{K-1}, …, α_{j+1} holds 1 − ∏(1 − α_m) of signal."""
    if kind == "alpha":
        return alpha.clone()
    K = len(alpha)
    s = torch.empty(K)
    for j in range(K):
        s[j] = 1 - torch.prod(1 - alpha[j + 1:]) if j < K - 1 else 0.0
    return s


@dataclass
class MicroBatch:
    ids: torch.Tensor  # (b, T+1)
    k: int = 0
    start: torch.Tensor | None = None  # (b,) tail start P
    uncond: torch.Tensor | None = None  # (b,) bool
    noise: torch.Tensor | None = None  # (b, K, d) unit-variance
    neg: torch.Tensor | None = None  # (N,) negative ids (shared)
    weight: torch.Tensor | None = None  # (b, T) loss weight per output position
    self_cond: torch.Tensor | None = None  # (b,) bool: tail from the unrolled engine dynamics
    embryo: torch.Tensor | None = None  # (b, 2K-1, d) unit-variance embryos of that unroll
    jitter: torch.Tensor | None = None  # (b, K-1, K, d) unit-variance tail noise of that unroll
    alpha: torch.Tensor | None = None  # (K,) the α ramp of this K (made on the host, shared by rows)
    share: torch.Tensor | None = None  # (K,) the signal share s_j of each slot

    # plain bools, decided on the host when the batch is made (None: work them out): under
    # torch.compile a data-dependent branch on a tensor is a graph break, a bool attribute of the
    # input a guarded constant
    any_uncond: bool | None = None
    any_self_cond: bool | None = None

    def __post_init__(self):
        if self.any_uncond is None:
            self.any_uncond = self.uncond is not None and bool(self.uncond.any())
        if self.any_self_cond is None:
            self.any_self_cond = self.self_cond is not None and bool(self.self_cond.any())

    def to(self, device) -> "MicroBatch":
        f = lambda t: None if t is None else t.to(device)  # noqa: E731
        return MicroBatch(f(self.ids), self.k, f(self.start), f(self.uncond), f(self.noise), f(self.neg),
                          f(self.weight), f(self.self_cond), f(self.embryo), f(self.jitter), f(self.alpha),
                          f(self.share), self.any_uncond, self.any_self_cond)

    def slice(self, lo: int, hi: int) -> "MicroBatch":
        f = lambda t: None if t is None else t[lo:hi]  # noqa: E731
        return MicroBatch(self.ids[lo:hi], self.k, f(self.start), f(self.uncond), f(self.noise), self.neg,
                          f(self.weight), f(self.self_cond), f(self.embryo), f(self.jitter), self.alpha, self.share)


def plan_step(cfg, data, step: int, d: int, vocab: int, micro: int, n: int, seed_stream: int = 0):
    """The global micro-batches of one step (or of one eval when seed_stream != 0)."""
    gen = step_generator(cfg.seed, step, seed_stream)
    T = cfg.block_size
    out = []
    for _ in range(micro):
        ids = crop_batch(data, n, T, gen)
        if cfg.objective == "ar":
            out.append(MicroBatch(ids, weight=torch.ones(n, T)))
            continue
        K = int(torch.randint(1, cfg.k_max + 1, (1,), generator=gen))
        if cfg.tail_position == "random":
            start = torch.randint(1, T - K + 1, (n,), generator=gen)
        else:
            start = torch.full((n,), T - K)
        uncond = torch.rand(n, generator=gen) < cfg.uncond_prob
        noise = torch.randn(n, K, d, generator=gen)
        m = cfg.nce_negatives
        neg = torch.randint(vocab, (m,), generator=gen) if 0 < m < vocab else None
        # loss weight per output position t (predicting slot t+1)
        t = torch.arange(T).view(1, T)
        P = start.view(n, 1)
        first = torch.zeros_like(P) if cfg.prefix_loss else P - 1
        w = ((t >= first) & (t <= P + K - 2)).float()
        a = alpha_ramp(K, cfg.alpha_max, cfg.alpha_min)
        if cfg.tail_weighting != "uniform":
            tw = a if cfg.tail_weighting == "alpha" else 1.0 / a
            tw = tw / tw.mean()
            j = (t - (P - 1)).clamp(0, K - 1)  # output t predicts tail slot j = t - P + 1
            in_tail = (t >= P - 1) & (t <= P + K - 2)
            w = torch.where(in_tail, tw[j], w)
        self_cond = embryo = jitter = None
        if cfg.self_cond_prob > 0:  # drawn last: runs without it keep their exact random stream
            self_cond = torch.rand(n, generator=gen) < cfg.self_cond_prob
            embryo = torch.randn(n, 2 * K - 1, d, generator=gen)
            if cfg.unroll_tail_noise > 0:
                jitter = torch.randn(n, max(K - 1, 0), K, d, generator=gen)
        out.append(MicroBatch(ids, K, start, uncond, noise, neg, w, self_cond, embryo, jitter, a,
                              signal_share(a, cfg.corruption)))
    return out


def mark_dynamic_tail(mb: MicroBatch) -> None:
    """Before a compiled objective sees mb: the tail length K (drawn per step) is a dynamic size,
    so one graph serves every K ≥ 2 instead of one graph per K (K = 1 stays its own)."""
    if mb.noise is None or mb.noise.shape[1] < 2:
        return
    for t, dim in ((mb.noise, 1), (mb.alpha, 0), (mb.share, 0)):
        if t is not None:
            torch._dynamo.maybe_mark_dynamic(t, dim)


class Objective(nn.Module):
    """Wraps the model so DDP sees one forward: returns (loss_sum, stats sums)."""

    def __init__(self, model: TMModel, cfg):
        super().__init__()
        self.model = model
        self.cfg = cfg

    def forward(self, mb: MicroBatch):
        mb = mb.to(self.model.table.weight.device)
        if self.cfg.objective == "ar":
            return self.ar(mb)
        return self.maturation(mb)

    def ar(self, mb: MicroBatch):
        m = self.model
        x, y = mb.ids[:, :-1], mb.ids[:, 1:]
        logits = m.table.logits(m.hidden(m.table(x)))
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        w = mb.weight.to(nll.device)
        loss = (nll * w).sum()
        acc = ((logits.argmax(-1) == y).float() * w).sum()
        return loss, {"loss": loss.detach(), "acc": acc.detach(), "weight": w.sum()}

    def corrupt(self, mb: MicroBatch):
        """Inputs z (b,T,d), α (b,T), k (b,), mask (b,1,T,T) of the simulated tail."""
        cfg, m = self.cfg, self.model
        x = mb.ids[:, :-1]
        b, T = x.shape
        dev = m.table.weight.device
        K = mb.noise.shape[1]  # a size, not mb.k: under compile it may be dynamic (mark_dynamic_tail)
        z = m.table(x)
        R = m.config.table_radius
        a = mb.alpha if mb.alpha is not None else alpha_ramp(K, cfg.alpha_max, cfg.alpha_min)
        s = mb.share if mb.share is not None else signal_share(a, cfg.corruption)
        slots = mb.start.view(b, 1) + torch.arange(K, device=dev).view(1, K)  # (b,K) positions of the tail
        rows = torch.arange(b, device=dev).view(b, 1).expand(b, K)
        clean = z[rows, slots]
        noise = mb.noise.to(dev, z.dtype) * (cfg.noise_scale * R / m.config.n_embd ** 0.5)
        s_ = s.to(dev, z.dtype).view(1, K, 1)
        z = z.clone()
        tail = s_ * clean + (1 - s_) * noise
        if mb.any_self_cond:
            jit = None if mb.jitter is None else mb.jitter.to(dev, z.dtype)
            own = self.unrolled_tail(z, mb.start.to(dev), K, a.to(dev), mb.embryo.to(dev, z.dtype), jit)
            tail = torch.where(mb.self_cond.to(dev).view(b, 1, 1), own, tail)
        z[rows, slots] = tail
        alpha = torch.ones(b, T, device=dev)
        alpha[rows, slots] = a.to(dev, alpha.dtype).view(1, K).expand(b, K)
        kvec = torch.full((b,), K, dtype=torch.long, device=dev)
        mask = causal_mask(T, dev).view(1, 1, T, T).expand(b, 1, T, T)
        if mb.any_uncond:
            mask = torch.where(mb.uncond.to(dev).view(b, 1, 1, 1), tail_only_mask(T, mb.start.to(dev)), mask)
        return z, alpha, kvec, mask

    @torch.no_grad()
    def unrolled_tail(self, z: torch.Tensor, start: torch.Tensor, K: int, alpha: torch.Tensor,
                      embryo: torch.Tensor, jitter: torch.Tensor | None = None) -> torch.Tensor:
        """The engine's tail (b,K,d) at committed length P = start: K−1 maturation steps from an
        all-embryo tail at P−K+1 (fewer where the sequence is shorter), true tokens committed.

        One prefill of the true sequence fills a KV cache (committed positions are true tokens at
        every step, so their K/V never change); each step then runs only the K tail positions,
        written to K scratch slots past the sequence, each attending to the committed slots < L
        and to the tail up to itself — exactly the engine's window. The front slot's prediction
        is the prefill's output at L−1 (a committed position sees only the true prefix).
        jitter (b,K−1,K,d) unit variance: the engine's tail noise (unroll_tail_noise·R·√α_j/√d).
        """
        m = self.model
        was_training = m.training
        m.eval()
        b, T, d = z.shape
        dev = z.device
        R = m.config.table_radius
        kvec = torch.full((b,), K, dtype=torch.long, device=dev)
        cache = m.new_cache(b, T + K, dtype=z.dtype, device=dev)  # this unroll's own, dropped after it
        try:
            front_pred = m.vector_head(m.prefill(z, cache, alpha=torch.ones(b, T, device=dev), k=kvec))
            emb = embryo * (self.cfg.noise_scale * R / d ** 0.5)
            tail = emb[:, :K].clone()
            j = torch.arange(K, device=dev)
            s = torch.arange(T + K, device=dev).view(1, 1, T + K)
            scratch = (T + j).expand(b, K)
            rows = torch.arange(b, device=dev)
            alpha_b = alpha.view(1, K).expand(b, K).contiguous()
            for u in range(K - 1):
                L = start - (K - 1) + u  # (b,) committed length at this step
                active = L >= 1
                if not bool(active.any()):
                    continue
                Lc = L.clamp(min=1)
                pos = Lc.view(b, 1) + j.view(1, K)
                mask = (s < Lc.view(b, 1, 1)) | ((s >= T) & (s <= (T + j).view(1, K, 1)))
                out = m(tail, pos=pos, alpha=alpha_b, k=kvec, mask=mask.unsqueeze(1), cache=cache,
                        cache_slots=scratch)
                pred = torch.cat([front_pred[rows, Lc - 1].unsqueeze(1), out[:, :K - 1]], dim=1)
                noise = None
                if jitter is not None:
                    noise = jitter[:, u] * (self.cfg.unroll_tail_noise * R / d ** 0.5 * alpha.sqrt().view(1, K, 1))
                new = tail.clone()
                maturation_update(new, pred.contiguous(), alpha_b, noise=noise)  # the engine's op, in place
                new = torch.cat([new[:, 1:], emb[:, K + u].unsqueeze(1)], dim=1)
                tail = torch.where(active.view(b, 1, 1), new, tail)
        finally:
            m.train(was_training)
        return tail

    def maturation(self, mb: MicroBatch):
        cfg, m = self.cfg, self.model
        y = mb.ids[:, 1:].to(m.table.weight.device)
        z, alpha, kvec, mask = self.corrupt(mb)
        pred = m(z, alpha=alpha, k=kvec, mask=mask).float()
        E = m.table.weight.float()
        R = m.config.table_radius
        target = E[y].detach()
        mse = ((pred - target) ** 2).sum(-1) / (R * R)
        pn = F.normalize(pred, dim=-1)
        En = F.normalize(E, dim=-1)
        if mb.neg is None:  # full vocabulary
            logits = cfg.nce_scale * (pn @ En.t())
            nce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        else:
            neg = mb.neg.to(y.device)
            pos = cfg.nce_scale * (pn * En[y]).sum(-1, keepdim=True)
            negl = cfg.nce_scale * (pn @ En[neg].t())
            negl = negl.masked_fill(neg.view(1, 1, -1) == y.unsqueeze(-1), float("-inf"))
            logits = torch.cat([pos, negl], dim=-1)
            nce = -F.log_softmax(logits, dim=-1)[..., 0]
        w = mb.weight.to(y.device)
        per = cfg.mse_weight * mse + cfg.nce_weight * nce
        loss = (per * w).sum()
        with torch.no_grad():
            nn_ok = ((pred @ E.t()).argmax(-1) == y).float()
            T = y.shape[1]
            t = torch.arange(T, device=y.device).view(1, T)
            P = mb.start.to(y.device).view(-1, 1)
            front = (t == P - 1).float()
            tail = ((t >= P - 1) & (t <= P + mb.noise.shape[1] - 2)).float()
            stats = {"loss": loss.detach(), "mse": (mse * w).sum(), "nce": (nce * w).sum(), "weight": w.sum(),
                     "acc": (nn_ok * w).sum(), "front_acc": (nn_ok * front).sum(), "front_n": front.sum(),
                     "tail_acc": (nn_ok * tail).sum(), "tail_n": tail.sum()}
        return loss, stats


def summarise(stats: dict) -> dict:
    """Sums → means (loss, mse, nce, acc are per weighted output; *_acc per slot)."""
    W = float(stats["weight"]) or 1.0
    out = {"loss": float(stats["loss"]) / W, "acc": float(stats["acc"]) / W}
    for k in ("mse", "nce"):
        if k in stats:
            out[k] = float(stats[k]) / W
    for k in ("front", "tail"):
        if f"{k}_n" in stats:
            out[f"{k}_acc"] = float(stats[f"{k}_acc"]) / max(float(stats[f"{k}_n"]), 1.0)
    return out
