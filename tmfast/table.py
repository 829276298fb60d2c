"""The vocabulary embedding table E (V×d): rows at one radius R, frozen by default.

With every row at the same norm, nearest neighbour by L2 is the largest inner
product, so commit is an argmax of E·z (csrc_triton.nn_commit).
"""
from __future__ import annotations

import torch
from torch import nn


def normalise_rows(weight: torch.Tensor, radius: float) -> torch.Tensor:
    """Rows scaled to l2 norm `radius` (zero rows stay zero)."""
    return weight * (radius / weight.norm(dim=-1, keepdim=True).clamp_min(1e-12))


class EmbeddingTable(nn.Module):
    def __init__(self, vocab_size: int, dim: int, radius: float = 1.0, normalised: bool = True,
                 trainable: bool = False):
        super().__init__()
        self.radius = radius
        self.normalised = normalised
        w = torch.randn(vocab_size, dim) * 0.02
        if normalised:
            w = normalise_rows(w, radius)
        self.weight = nn.Parameter(w, requires_grad=trainable)

    @torch.no_grad()
    def load_rows(self, weight: torch.Tensor) -> None:
        """Set the table from raw embeddings (normalised to the radius if this table is normalised)."""
        if weight.shape != self.weight.shape:
            raise ValueError(f"table shape {tuple(weight.shape)} != expected {tuple(self.weight.shape)}")
        self.weight.copy_(normalise_rows(weight.float(), self.radius) if self.normalised else weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids → committed vectors (exact table rows)."""
        return self.weight[ids]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Inner product with every row: the tied LM head of the AR objective."""
        return h @ self.weight.t()
